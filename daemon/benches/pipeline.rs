//! P4: MQTT → grayscale → Dapr sink on this machine, with 640×480 JPEG camera frames
//! (run: `cargo bench --bench pipeline`). A real mosquitto, the real daemon, the contract fake
//! sidecar; frames are published from this process so publish and receipt share one clock.
//!
//! Prints sustained frames/s (block policy, nothing dropped), publish→sidecar latency p50/p99
//! at 70 % of that rate, and the native grayscale ceiling (P2 native × cores) beside them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Daemon;
use common::broker::Broker;
use common::fake_dapr::FakeDapr;
use edgefn::mqtt::{self, Event};

const CAMERAS: usize = 2;

fn config(broker: &Broker, dapr: &FakeDapr) -> String {
    format!(
        "[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-bench\"\nmax_frame = \"1 MiB\"\n\n[dapr]\nurl = \"http://127.0.0.1:{}\"\n\n\
         [[pipeline]]\nname = \"gray\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"grayscale\"]\n\
         sinks = [{{ dapr = {{ pubsub = \"upstream\", topic = \"frames/gray\" }} }}]\npolicy = \"block\"\nqueue = 4\n",
        broker.url(),
        dapr.port
    )
}

/// Publishes `per_camera` frames on each camera at `fps` in total (0: as fast as possible);
/// returns each frame's publish instant by (camera, seq).
async fn publish(broker: &Broker, frame: Bytes, per_camera: usize, fps: f64) -> Vec<Vec<Instant>> {
    let cfg = edgefn::config::Mqtt { url: broker.url(), client_id: "bench-camera".into(), ..Default::default() };
    let (client, mut conn) = mqtt::connect(&cfg, "", 4 << 20).unwrap();
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match conn.poll().await {
                Ok(Event::Published) => {
                    a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => panic!("bench publisher: {e}"),
            }
        }
    });
    let mut sent = vec![Vec::new(); CAMERAS];
    let gap = if fps > 0.0 { Duration::from_secs_f64(1.0 / fps) } else { Duration::ZERO };
    let start = Instant::now();
    for i in 0..per_camera * CAMERAS {
        if fps > 0.0 {
            let due = start + gap * i as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        let cam = i % CAMERAS;
        sent[cam].push(Instant::now());
        client.publish(&format!("cameras/cam{cam}/frames"), frame.clone()).await.unwrap();
    }
    while acked.load(std::sync::atomic::Ordering::Relaxed) < per_camera * CAMERAS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    poller.abort();
    sent
}

/// Runs one round on a fresh daemon; returns (frames/s over the round, latencies).
fn round(tokio: &tokio::runtime::Runtime, frame: &Bytes, per_camera: usize, fps: f64) -> (f64, Vec<Duration>) {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    let d = Daemon::start_in(tmp.path(), &config(&broker, &dapr));
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let sent = tokio.block_on(publish(&broker, frame.clone(), per_camera, fps));
    let total = per_camera * CAMERAS;
    dapr.wait_for(300, "every frame at the sidecar", |e| e.len() >= total);
    let events = dapr.events();
    let mut latencies = Vec::with_capacity(total);
    for e in &events {
        let id = e.event["id"].as_str().unwrap();
        let mut parts = id.rsplitn(2, '/');
        let seq: usize = parts.next().unwrap().parse().unwrap();
        let cam: usize = parts.next().unwrap().rsplit("cam").next().unwrap().parse().unwrap();
        latencies.push(e.at - sent[cam][seq - 1]);
    }
    let first = sent.iter().map(|s| s[0]).min().unwrap();
    let last = events.iter().map(|e| e.at).max().unwrap();
    latencies.sort();
    (total as f64 / (last - first).as_secs_f64(), latencies)
}

fn pct(v: &[Duration], p: usize) -> f64 {
    v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e3
}

fn main() {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let frame = Bytes::from(common::camera_jpeg());

    // Native ceiling: the same grayscale code, natively, on every core.
    let mut native = Vec::new();
    for _ in 0..40 {
        let t = Instant::now();
        grayscale::grayscale(&frame).unwrap();
        native.push(t.elapsed());
    }
    native.sort();
    let native_ms = native[native.len() / 2].as_secs_f64() * 1e3;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ceiling = cores as f64 * 1000.0 / native_ms;

    let (sustained, saturated) = round(&tokio, &frame, 300, 0.0);
    let rate = (sustained * 0.7).max(1.0);
    let (_, lat) = round(&tokio, &frame, (rate * 10.0 / CAMERAS as f64) as usize, rate);

    println!("P4 MQTT → grayscale → Dapr, 640×480 JPEG, {CAMERAS} cameras, {cores} cores");
    println!(
        "  sustained (publish as fast as possible)  : {sustained:7.1} frames/s  (latency p50 {:.1} ms, p99 {:.1} ms, queueing included)",
        pct(&saturated, 50),
        pct(&saturated, 99)
    );
    println!(
        "  at 70 % load ({rate:.0} frames/s)          : latency p50 {:6.1} ms, p99 {:6.1} ms  (publish → sidecar receipt)",
        pct(&lat, 50),
        pct(&lat, 99)
    );
    println!(
        "  native grayscale ceiling (P2 native × cores): {ceiling:7.1} frames/s  ({native_ms:.2} ms/frame native)"
    );
    println!("  sustained / ceiling                       : {:7.2}", sustained / ceiling);
}
