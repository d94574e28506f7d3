//! P1 and P2, side by side in one run, printed as ratios (run: `cargo bench --bench invoke`).
//!
//! - P1: one invocation of a no-op WASI function (echo 64 bytes: instantiate, stdin, stdout,
//!   teardown) in the daemon, against the seed's design of one process per request
//!   (`edgefn invoke echo`, warm AOT cache, so the process only maps native code).
//! - P2: grayscale of a 640×480 JPEG as AOT-compiled wasm, against the same Rust code native.
//!   Then what the deadline costs: the same module straight on wasmtime with its epoch checks
//!   compiled in (a deadline that never comes, so no yields) and compiled out, against the
//!   daemon's call, which also yields to the executor every tick.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefn::config::Config;
use edgefn::metrics::Metrics;
use edgefn::runtime::Runtime;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// `n` timed calls of `echo` on `input`, after `warm` untimed ones.
fn echo_times(
    tokio: &tokio::runtime::Runtime,
    rt: &Runtime,
    input: bytes::Bytes,
    warm: usize,
    n: usize,
) -> Vec<Duration> {
    tokio.block_on(async {
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n {
            let t = Instant::now();
            let out = rt.invoke("echo", input.clone(), &[]).await.unwrap();
            let dt = t.elapsed();
            assert_eq!(out.stdout.len(), input.len());
            if i >= warm {
                samples.push(dt);
            }
        }
        samples
    })
}

/// Grayscale straight on wasmtime, synchronously: `epoch` compiles the daemon's deadline
/// checks in, with a deadline that never comes.
struct Bare {
    engine: wasmtime::Engine,
    pre: wasmtime::InstancePre<wasmtime_wasi::p1::WasiP1Ctx>,
}

impl Bare {
    fn new(epoch: bool, wasm: &[u8]) -> Bare {
        let mut config = edgefn::runtime::compilation_config(None).unwrap();
        config.epoch_interruption(epoch);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let module = wasmtime::Module::new(&engine, wasm).unwrap();
        let mut linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |c| c).unwrap();
        let pre = linker.instantiate_pre(&module).unwrap();
        Bare { engine, pre }
    }

    /// `n` timed calls on `jpeg`.
    fn times(&self, jpeg: &[u8], n: usize) -> Vec<Duration> {
        use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let stdout = MemoryOutputPipe::new(16 << 20);
            let wasi = wasmtime_wasi::WasiCtxBuilder::new()
                .stdin(MemoryInputPipe::new(jpeg.to_vec()))
                .stdout(stdout.clone())
                .build_p1();
            let mut store = wasmtime::Store::new(&self.engine, wasi);
            store.set_epoch_deadline(u64::MAX / 2);
            let t = Instant::now();
            let instance = self.pre.instantiate(&mut store).unwrap();
            let run = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap().call(&mut store, ());
            samples.push(t.elapsed());
            if let Err(e) = run {
                let code = e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|x| x.0);
                assert_eq!(code, Some(0), "grayscale failed: {e:#}");
            }
            assert!(!stdout.contents().is_empty());
        }
        samples
    }
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = tmp.path().join("edgefn.toml");
    std::fs::write(
        &config_path,
        format!(
            "[runtime]\nfunctions_dir = {:?}\ncache_dir = {:?}\n",
            common::functions_dir(),
            std::env::temp_dir().join("edgefn-bench-aot")
        ),
    )
    .unwrap();
    let cfg = Config::load(&config_path, true).unwrap();
    let rt = Runtime::load(&cfg, Arc::new(Metrics::new()), None, &Default::default()).unwrap();
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    // P1: in-process invocation, then with a frame's worth of bytes (what moving 41 KB in
    // and out of a guest costs).
    let input = bytes::Bytes::from(vec![b'x'; 64]);
    let samples = echo_times(&tokio, &rt, input.clone(), 1000, 20_000);
    let p1_daemon = median(samples.clone());
    let p1_daemon_p99 = p99(samples);
    let p1_frame = median(echo_times(&tokio, &rt, bytes::Bytes::from(common::camera_jpeg()), 500, 5_000));

    if std::env::var("EDGEFN_BENCH").as_deref() == Ok("p1-only") {
        println!("P1 no-op invocation, in-process : median {:.1} µs", p1_daemon.as_secs_f64() * 1e6);
        return;
    }

    // P1: a process per request, as the seed did.
    let mut spawn = Vec::new();
    for i in 0..105 {
        let t = Instant::now();
        let mut child = common::edgefn()
            .args(["--config", config_path.to_str().unwrap(), "invoke", "echo"])
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let out = child.wait_with_output().unwrap();
        let dt = t.elapsed();
        assert_eq!(out.stdout.len(), 64);
        if i >= 5 {
            spawn.push(dt);
        }
    }
    let p1_spawn = median(spawn);

    // P2: grayscale, wasm vs native, interleaved so drift hits both alike.
    let jpeg = common::camera_jpeg();
    let (mut wasm, mut native) = (Vec::new(), Vec::new());
    tokio.block_on(async {
        for i in 0..65 {
            let t = Instant::now();
            let a = rt.invoke("grayscale", jpeg.clone().into(), &[]).await.unwrap().stdout;
            let dw = t.elapsed();
            let t = Instant::now();
            let b = grayscale::grayscale(&jpeg).unwrap();
            let dn = t.elapsed();
            if i == 0 {
                // jpeg-decoder's simd128 and SSSE3 kernels round alike but for a level here and there.
                let (a, b) =
                    (image::load_from_memory(&a).unwrap().to_luma8(), image::load_from_memory(&b).unwrap().to_luma8());
                assert_eq!(a.dimensions(), b.dimensions());
                let most = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
                assert!(most <= 3, "wasm and native outputs differ by up to {most} levels");
            }
            if i >= 5 {
                wasm.push(dw);
                native.push(dn);
            }
        }
    });
    let (p2_wasm, p2_native) = (median(wasm), median(native));

    let module = std::fs::read(common::functions_dir().join("grayscale.wasm")).unwrap();
    let (with, without) = (Bare::new(true, &module), Bare::new(false, &module));
    let (mut checked, mut unchecked) = (Vec::new(), Vec::new());
    with.times(&jpeg, 5);
    without.times(&jpeg, 5);
    for _ in 0..6 {
        checked.extend(with.times(&jpeg, 10));
        unchecked.extend(without.times(&jpeg, 10));
    }
    let (checked, unchecked) = (median(checked), median(unchecked));

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("P1 no-op invocation, in-process : median {:8.1} µs  (p99 {:.1} µs)", us(p1_daemon), us(p1_daemon_p99));
    println!(
        "P1 41 KB echo, in-process       : median {:8.1} µs  ({:.1}× the no-op)",
        us(p1_frame),
        us(p1_frame) / us(p1_daemon)
    );
    println!("P1 no-op invocation, spawn/req  : median {:8.1} µs", us(p1_spawn));
    println!(
        "P1 ratio spawn / in-process     : {:8.0}×   (goal ≥ 200×, in-process ≤ 20 µs)",
        us(p1_spawn) / us(p1_daemon)
    );
    println!("P2 grayscale 640×480 JPEG, wasm : median {:8.2} ms", us(p2_wasm) / 1e3);
    println!("P2 grayscale 640×480 JPEG, native: median {:7.2} ms", us(p2_native) / 1e3);
    println!("P2 ratio wasm / native          : {:8.2}×   (goal ≤ 1.3×)", us(p2_wasm) / us(p2_native));
    println!(
        "P2 bare wasmtime, epoch checks in: median {:6.2} ms, out: {:.2} ms ({:.3}×); the daemon's call: {:.3}× of checks out",
        us(checked) / 1e3,
        us(unchecked) / 1e3,
        us(checked) / us(unchecked),
        us(p2_wasm) / us(unchecked)
    );
}
