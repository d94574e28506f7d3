//! Scaling with cores (run: `cargo bench --bench scaling`): MQTT → grayscale → file sink with
//! the daemon pinned to one core and then to two (`taskset`; tokio sizes its workers, and the
//! runtime its instance pool, from the affinity).
//!
//! For each: four cameras publish 100 frames each at once, and the daemon's saturated
//! throughput (results made per second) and CPU per frame are measured; then the cameras
//! publish at 70 % of that rate for 10 s, and a frame's latency (published → result made, the
//! result's own timestamp) is taken at p50 and p99. The CPU per frame should not grow with the
//! cores: if it does, something serialises.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::broker::{Broker, now_ms, publish_frames};
use common::{Daemon, cpu_seconds, percentile};

const CAMERAS: usize = 4;

/// Every result in the file: (camera, seq) → when it was made (ms since the epoch).
fn results(path: &std::path::Path) -> HashMap<(String, u64), u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let made = humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();
            let made = made.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
            ((v["subject"].as_str().unwrap().to_string(), v["edgefnseq"].as_u64().unwrap()), made)
        })
        .collect()
}

fn wait_for(path: &std::path::Path, keys: &[(String, u64)], secs: u64) -> HashMap<(String, u64), u64> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = results(path);
        if keys.iter().all(|k| got.contains_key(k)) {
            return got;
        }
        assert!(
            Instant::now() < until,
            "{} of {} results after {secs} s",
            keys.iter().filter(|k| got.contains_key(*k)).count(),
            keys.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Measured {
    cores: usize,
    fps: f64,
    cpu_per_frame: f64,
    rate: f64,
    p50: u64,
    p99: u64,
}

fn measure(
    broker: &Broker,
    root: &std::path::Path,
    cpus: &str,
    cores: usize,
    frame: &[u8],
    rt: &tokio::runtime::Runtime,
) -> Measured {
    let dir = root.join(format!("cores{cores}"));
    let file = dir.join("results.jsonl");
    let cfg = format!(
        "[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-scaling-{cores}\"\nmax_frame = \"1 MiB\"\n\n\
         [[pipeline]]\nname = \"gray\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"grayscale\"]\npolicy = \"block\"\n\
         sinks = [{{ file = {{ path = {:?} }} }}]\n",
        broker.url(),
        file.to_str().unwrap()
    );
    let d = Daemon::start_env(&dir, &cfg, &[("EDGEFN_TEST_TASKSET", cpus.to_string())]);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let pid = d.child.id();

    let warm = rt.block_on(publish_frames(broker.port, CAMERAS, "warm", frame, 10, Duration::ZERO));
    wait_for(&file, &warm.keys().cloned().collect::<Vec<_>>(), 60);

    let cpu0 = cpu_seconds(pid);
    let sent = rt.block_on(publish_frames(broker.port, CAMERAS, "sat", frame, 100, Duration::ZERO));
    let keys: Vec<_> = sent.keys().cloned().collect();
    let got = wait_for(&file, &keys, 120);
    let cpu = cpu_seconds(pid) - cpu0;
    let made: Vec<u64> = keys.iter().map(|k| got[k]).collect();
    let first_sent = *sent.values().min().unwrap();
    let span = (*made.iter().max().unwrap() - first_sent).max(1) as f64 / 1000.0;
    let fps = keys.len() as f64 / span;
    let cpu_per_frame = cpu / keys.len() as f64;

    let rate = 0.7 * fps;
    let per_camera = (rate * 10.0 / CAMERAS as f64).round() as usize;
    let sent = rt.block_on(publish_frames(
        broker.port,
        CAMERAS,
        "load",
        frame,
        per_camera,
        Duration::from_secs_f64(1.0 / rate),
    ));
    let keys: Vec<_> = sent.keys().cloned().collect();
    let got = wait_for(&file, &keys, 120);
    let mut latency: Vec<u64> = keys.iter().map(|k| got[k].saturating_sub(sent[k])).collect();
    let (p50, p99) = (percentile(&mut latency, 50), percentile(&mut latency, 99));
    Measured { cores, fps, cpu_per_frame, rate, p50, p99 }
}

fn main() {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(online >= 2, "scaling needs two cores, this machine has {online}");
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let frame = common::camera_jpeg();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let runs: Vec<Measured> = [("0", 1), ("0-1", 2)]
        .into_iter()
        .map(|(cpus, cores)| measure(&broker, tmp.path(), cpus, cores, &frame, &rt))
        .collect();
    println!("MQTT → grayscale → file sink, 4 cameras, 41 KB 640×480 JPEG");
    println!("cores | saturated frames/s | per core | daemon CPU per frame | at 70 %: p50 | p99 | p99/p50");
    for m in &runs {
        println!(
            "{:5} | {:18.1} | {:8.1} | {:17.2} ms | at {:5.1} frames/s: {:3} ms | {:3} ms | {:.2}",
            m.cores,
            m.fps,
            m.fps / m.cores as f64,
            m.cpu_per_frame * 1e3,
            m.rate,
            m.p50,
            m.p99,
            m.p99 as f64 / m.p50.max(1) as f64
        );
    }
    println!(
        "CPU per frame, 2 cores ÷ 1 core: {:.3} (goal: within 10 %)",
        runs[1].cpu_per_frame / runs[0].cpu_per_frame
    );
}
