//! P3, side by side in one run, printed as ratios (run: `cargo bench --bench classify`).
//!
//! One image end to end, bytes in → JSON out: `classify` as AOT-compiled wasm in the daemon's
//! runtime (decode and resize in wasm, inference through wasi-nn on LiteRT), against the same
//! pipeline native: the `classify` crate's decode, resize and ranking plus direct LiteRT calls,
//! with the same number of threads. Also the inference alone: the time inside LiteRT's run
//! through wasi-nn (the daemon's `edgefn_inference_duration_seconds`) against the direct call.
//! For 1 and 2 threads; the runs alternate so machine noise hits both sides alike.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefn::config::Config;
use edgefn::metrics::Metrics;
use edgefn::runtime::Runtime;
use edgefn::runtime::nn::litert;

const ROUNDS: usize = 300;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len() as u32
}

/// Sum and count of a histogram in the OpenMetrics text.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}{{")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

fn main() {
    let model_path = common::assets_dir().join("efficientnet_lite0.tflite");
    let image = bytes::Bytes::from(common::asset("chelsea.png"));
    let labels = classify::labels_from_model(std::fs::File::open(&model_path).unwrap()).unwrap();
    let lib = litert::Library::open(&common::litert_lib()).unwrap();
    let model = litert::Model::load(&lib, &model_path).unwrap();
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!("P3: classify chelsea.png (451×300 PNG) end to end, {ROUNDS} rounds each, medians");

    for threads in [1u32, 2] {
        let tmp = tempfile::tempdir().unwrap();
        let config_path = tmp.path().join("edgefn.toml");
        std::fs::write(
            &config_path,
            format!(
                "[runtime]\nfunctions_dir = {:?}\ncache_dir = {:?}\nlitert = {:?}\n\n\
                 [models.efficientnet-lite0]\npath = {model_path:?}\nthreads = {threads}\n\n\
                 [functions.classify]\ndirs = {{ \"/models\" = {:?} }}\n",
                common::functions_dir(),
                std::env::temp_dir().join("edgefn-bench-aot"),
                common::litert_lib(),
                common::assets_dir(),
            ),
        )
        .unwrap();
        let cfg = Config::load(&config_path, true).unwrap();
        let metrics = Arc::new(Metrics::new());
        let rt = Runtime::load(&cfg, metrics.clone(), Some("classify"), &Default::default()).unwrap();
        let mut ctx = model.compile(threads).unwrap();

        let mut native = || {
            let pixels = classify::preprocess(&image).unwrap();
            ctx.write_input(0, &pixels).unwrap();
            let t = Instant::now();
            ctx.run().unwrap();
            let run = t.elapsed();
            let top = classify::rank(&ctx.read_output(0).unwrap(), &labels).unwrap();
            (classify::to_json(&top, "efficientnet-lite0"), run)
        };
        let (mut wasm_t, mut native_t, mut native_run) = (vec![], vec![], vec![]);
        let mut warm_inference = (0.0, 0.0);
        for i in 0..ROUNDS + 20 {
            let t = Instant::now();
            let out = tokio.block_on(rt.invoke("classify", image.clone(), &[])).unwrap();
            let dt_wasm = t.elapsed();
            let t = Instant::now();
            let (json, run) = native();
            let dt_native = t.elapsed();
            assert_eq!(out.stdout, json.as_bytes(), "wasm and native answers differ");
            if i == 19 {
                warm_inference = histogram(&metrics.encode(), "edgefn_inference_duration_seconds");
            }
            if i >= 20 {
                wasm_t.push(dt_wasm);
                native_t.push(dt_native);
                native_run.push(run);
            }
        }
        let (sum, count) = histogram(&metrics.encode(), "edgefn_inference_duration_seconds");
        let via_wasi_nn = Duration::from_secs_f64((sum - warm_inference.0) / (count - warm_inference.1));
        let (w, n) = (median(wasm_t), median(native_t));
        let direct = mean(&native_run);
        println!(
            "  threads {threads}: edgefn {:.2} ms, native {:.2} ms: {:.2}× (goal ≤ 1.2×); \
             inference alone (mean) {:.2} ms via wasi-nn vs {:.2} ms direct: {:.3}× (goal ≤ 1.05×)",
            w.as_secs_f64() * 1e3,
            n.as_secs_f64() * 1e3,
            w.as_secs_f64() / n.as_secs_f64(),
            via_wasi_nn.as_secs_f64() * 1e3,
            direct.as_secs_f64() * 1e3,
            via_wasi_nn.as_secs_f64() / direct.as_secs_f64(),
        );
    }
}
