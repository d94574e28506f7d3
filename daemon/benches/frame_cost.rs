//! What a frame costs the daemon itself, and what it costs the disk (run:
//! `cargo bench --bench frame_cost`; needs `perf` for the fsync counts).
//!
//! Serial keep-alive HTTP calls to one daemon, interleaved in rounds so drift hits every path
//! alike:
//! - a tiny echo call (64 B) and a 41 KB echo call (`POST /v1/functions/echo`);
//! - the 41 KB frame through an echo pipeline with a file sink (`POST /v1/pipelines/echo`),
//!   which commits the result to the outbox and delivers it to the file.
//!
//! CPU is the daemon's utime + stime from `/proc/<pid>/stat`; bytes written its `write_bytes`
//! from `/proc/<pid>/io`; fsyncs are counted by perf's syscall tracepoints. Then the same
//! pipeline at 1, 10 and 100 frames/s over 1 and 4 cameras (open loop, one client per camera):
//! fsyncs per second and per frame, bytes written per result byte, and the latency of a call
//! (the price of any commit window); and four MQTT cameras at 100 frames/s in all, whose
//! workers make a frame while the one before it commits (latency: published → in the file).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::{Broker, now_ms, publish_frames};
use common::{Daemon, cpu_seconds, percentile, write_bytes};

/// `perf stat` counting the daemon's fsync-family calls until [`Syncs::stop`].
struct Syncs(Child);

impl Syncs {
    fn start(pid: u32) -> Syncs {
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e"])
            .arg("syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_sync_file_range")
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perf (apt install linux-perf)");
        std::thread::sleep(Duration::from_millis(300));
        Syncs(child)
    }

    fn stop(self) -> u64 {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGINT)
            .unwrap();
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("syscalls:sys_enter_"))
            .map(|l| l.split(',').next().unwrap().trim().parse().unwrap_or_else(|_| panic!("perf: {text}")))
            .collect();
        assert_eq!(counts.len(), 3, "perf printed: {text}");
        counts.iter().sum()
    }
}

struct Round {
    cpu: f64,
    written: u64,
}

fn serial(d: &Daemon, path: &str, body: &[u8], n: usize) -> Round {
    let agent = common::agent();
    let url = d.url(path);
    let pid = d.child.id();
    let (cpu0, w0) = (cpu_seconds(pid), write_bytes(pid));
    for _ in 0..n {
        let mut resp = agent.post(&url).send(body).unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        resp.body_mut().read_to_vec().unwrap();
    }
    Round { cpu: cpu_seconds(pid) - cpu0, written: write_bytes(pid) - w0 }
}

struct Rate {
    frames: usize,
    secs: f64,
    syncs: u64,
    written: u64,
    result_bytes: usize,
    p50: Duration,
    p99: Duration,
}

/// `fps` frames a second in total over `cameras` clients for `secs`, each on its own schedule.
fn at_rate(d: &Daemon, pipeline: &str, frame: &[u8], fps: f64, cameras: usize, secs: f64) -> Rate {
    let pid = d.child.id();
    let syncs = Syncs::start(pid);
    let w0 = write_bytes(pid);
    let start = Instant::now();
    let per_camera = ((fps * secs) / cameras as f64).round().max(1.0) as usize;
    let gap = Duration::from_secs_f64(cameras as f64 / fps);
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..cameras)
            .map(|c| {
                let url = d.url(&format!("/v1/pipelines/{pipeline}?camera=cam{c}"));
                s.spawn(move || {
                    let agent = common::agent();
                    // Cameras out of phase by no plan, as independent ones are (a fixed draw,
                    // so runs compare).
                    let offset = gap.mul_f64([0.0, 0.37, 0.58, 0.91][c % 4]);
                    let mut lat = Vec::new();
                    for i in 0..per_camera {
                        let due = start + offset + gap * i as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let t = Instant::now();
                        let mut resp = agent.post(&url).send(frame).unwrap();
                        assert_eq!(resp.status(), 200);
                        resp.body_mut().read_to_vec().unwrap();
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    // Let delivery to the file catch up before the counts close.
    std::thread::sleep(Duration::from_millis(500));
    let written = write_bytes(pid) - w0;
    let syncs = syncs.stop();
    let frames = latencies.len();
    Rate {
        frames,
        secs,
        syncs,
        written,
        result_bytes: frames * frame.len(),
        p50: percentile(&mut latencies, 50),
        p99: percentile(&mut latencies, 99),
    }
}

/// When each result first shows in the file at `path`, by (camera, seq), in wall-clock ms:
/// polled every millisecond until `stop` is set.
fn arrivals(path: &std::path::Path, stop: &std::sync::atomic::AtomicBool) -> HashMap<(String, u64), u64> {
    let mut seen = HashMap::new();
    let mut offset = 0usize;
    let mut partial = String::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let bytes = std::fs::read(path).unwrap_or_default();
        if bytes.len() > offset {
            let now = now_ms();
            partial.push_str(&String::from_utf8_lossy(&bytes[offset..]));
            offset = bytes.len();
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let key =
                        (v["subject"].as_str().unwrap_or_default().to_string(), v["edgefnseq"].as_u64().unwrap_or(0));
                    seen.entry(key).or_insert(now);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    seen
}

/// Four cameras publishing over MQTT at `fps` in all for `secs`: their workers make the next
/// frame while one commits. Latency runs from the publish to the result in the file sink.
fn mqtt_at_rate(d: &Daemon, broker: &Broker, results: &std::path::Path, frame: &[u8], fps: f64, secs: f64) -> Rate {
    let pid = d.child.id();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let syncs = Syncs::start(pid);
    let w0 = write_bytes(pid);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    let per_camera = (fps * secs / 4.0).round() as usize;
    let (sent, seen) = std::thread::scope(|s| {
        let watcher = s.spawn(|| arrivals(results, &stop));
        let prefix = format!("rate{}", start.elapsed().as_nanos() % 100_000);
        let sent =
            rt.block_on(publish_frames(broker.port, 4, &prefix, frame, per_camera, Duration::from_secs_f64(1.0 / fps)));
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until
            && std::fs::read_to_string(results).unwrap_or_default().lines().filter(|l| l.contains(&prefix)).count()
                < sent.len()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (sent, watcher.join().unwrap())
    });
    let written = write_bytes(pid) - w0;
    let syncs = syncs.stop();
    // The rate is the cameras': from the first publish to the last.
    let secs = (sent.values().max().unwrap() - sent.values().min().unwrap()) as f64 / 1000.0;
    let mut latencies: Vec<Duration> = sent
        .iter()
        .map(|(k, t)| {
            Duration::from_millis(seen.get(k).unwrap_or_else(|| panic!("no result for {k:?}")).saturating_sub(*t))
        })
        .collect();
    let frames = latencies.len();
    Rate {
        frames,
        secs,
        syncs,
        written,
        result_bytes: frames * frame.len(),
        p50: percentile(&mut latencies, 50),
        p99: percentile(&mut latencies, 99),
    }
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let d = Daemon::start_in(
        tmp.path(),
        &format!(
            "[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\nsinks = [{{ file = {{ path = {results:?} }} }}]\n"
        ),
    );
    let frame = common::camera_jpeg();
    let tiny = vec![b'x'; 64];

    // Warm-up: the pool, the outbox file, the page cache.
    serial(&d, "/v1/functions/echo", &frame, 200);
    serial(&d, "/v1/pipelines/echo", &frame, 200);

    let (n_call, n_frame) = (2000usize, 600usize);
    let (mut tiny_cpu, mut echo_cpu, mut pipe_cpu, mut pipe_written) = (0.0, 0.0, 0.0, 0u64);
    for _ in 0..2 {
        tiny_cpu += serial(&d, "/v1/functions/echo", &tiny, n_call).cpu;
        echo_cpu += serial(&d, "/v1/functions/echo", &frame, n_call).cpu;
        let r = serial(&d, "/v1/pipelines/echo", &frame, n_frame);
        pipe_cpu += r.cpu;
        pipe_written += r.written;
    }
    let per = |cpu: f64, n: usize| cpu / (2 * n) as f64 * 1e6;
    let (tiny_us, echo_us, pipe_us) = (per(tiny_cpu, n_call), per(echo_cpu, n_call), per(pipe_cpu, n_frame));

    let syncs = Syncs::start(d.child.id());
    serial(&d, "/v1/pipelines/echo", &frame, 300);
    std::thread::sleep(Duration::from_millis(500));
    let serial_syncs = syncs.stop();

    println!("frame: {} byte 640×480 JPEG; result: the same bytes (echo)", frame.len());
    println!("serial keep-alive calls, daemon CPU (utime + stime):");
    println!("  tiny echo call (64 B)          {tiny_us:8.1} µs");
    println!("  41 KB echo call                {echo_us:8.1} µs   ({:.1}× the tiny call)", echo_us / tiny_us);
    println!("  echo pipeline + file sink      {pipe_us:8.1} µs");
    println!("  daemon's own per frame         {:8.1} µs   (pipeline − echo call)", pipe_us - echo_us);
    println!(
        "  bytes written per result byte  {:8.2}     ({:.1} KiB per result)",
        pipe_written as f64 / (2 * n_frame * frame.len()) as f64,
        pipe_written as f64 / (2 * n_frame) as f64 / 1024.0
    );
    println!(
        "  fsyncs per frame               {:8.2}     ({serial_syncs} for 300 frames)",
        serial_syncs as f64 / 300.0
    );

    println!("at a rate (open loop, one client per camera), by outbox.commit_window:");
    println!("  window  pipeline  frames/s cams  fsyncs/s  fsyncs/frame  written/result  p50 ms  p99 ms");
    drop(d);
    let broker = Broker::start(&tmp.path().join("broker"));
    // EDGEFN_BENCH_WINDOWS=0ms,20ms runs only those.
    let windows = std::env::var("EDGEFN_BENCH_WINDOWS").unwrap_or_else(|_| "0ms,5ms,20ms,50ms".into());
    for window in windows.split(',') {
        let dir = tmp.path().join(format!("w{window}"));
        let sink = format!("sinks = [{{ file = {{ path = {:?} }} }}]\n", dir.join("r.jsonl"));
        let mqtt_results = dir.join("mqtt.jsonl");
        let d = Daemon::start_env(
            &dir,
            &format!(
                "[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-frame-cost\"\nmax_frame = \"1 MiB\"\n\n\
                 [[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\n{sink}\n\
                 [[pipeline]]\nname = \"gray\"\nfunctions = [\"grayscale\"]\n{sink}\n\
                 [[pipeline]]\nname = \"mqtt\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"echo\"]\n\
                 sinks = [{{ file = {{ path = {mqtt_results:?} }} }}]\n",
                broker.url()
            ),
            &[("EDGEFN__OUTBOX__COMMIT_WINDOW", window.to_string())],
        );
        d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
        serial(&d, "/v1/pipelines/echo", &frame, 100);
        serial(&d, "/v1/pipelines/gray", &frame, 20);
        let rounds = [
            ("echo", 1.0, 1, 10.0),
            ("echo", 10.0, 4, 6.0),
            ("echo", 100.0, 1, 6.0),
            ("echo", 100.0, 4, 6.0),
            ("gray", 100.0, 4, 6.0),
        ];
        for (pipeline, fps, cams, secs) in rounds {
            let r = at_rate(&d, pipeline, &frame, fps, cams, secs);
            println!(
                "  {window:>6}  {pipeline:>8}  {:8.0} {cams:4}  {:8.1}  {:12.2}  {:14.2}  {:6.2}  {:6.2}",
                r.frames as f64 / r.secs,
                r.syncs as f64 / r.secs,
                r.syncs as f64 / r.frames as f64,
                r.written as f64 / r.result_bytes as f64,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
            );
        }
        let r = mqtt_at_rate(&d, &broker, &mqtt_results, &frame, 100.0, 6.0);
        println!(
            "  {window:>6}  echo mqtt  {:7.0} {:4}  {:8.1}  {:12.2}  {:14.2}  {:6.2}  {:6.2}   (published → in the file)",
            r.frames as f64 / r.secs,
            4,
            r.syncs as f64 / r.secs,
            r.syncs as f64 / r.frames as f64,
            r.written as f64 / r.result_bytes as f64,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
        );
    }
}
