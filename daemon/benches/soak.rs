//! The soak: edgefn under steady MQTT load while everything around it fails on a schedule, and
//! an account of every frame at the end (run: `cargo bench --bench soak`; `EDGEFN_SOAK_SECS`,
//! default 1800; the README's test command runs 180).
//!
//! - Frames: distinct payloads published at QoS 1 to mosquitto; a frame is *in* once the
//!   broker acknowledged it. The rate is 70 % of the rate measured in a first, unthrottled
//!   phase.
//! - Out: the same pipeline writes to three sinks: the real daprd (`pubsub.mqtt3` back to the
//!   same broker), an MQTT topic, and a file.
//! - Faults: daprd is SIGKILLed and restarted every 1/6 of the run (5 min of 30), the broker
//!   restarted every 7/30, and the daemon reloaded (SIGHUP) every 1/10.
//! - Report: the daemon's RSS each minute (each tenth of a shorter run), frames in and results out per
//!   sink; the run fails if any frame that was in has no result in some sink.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use common::broker::{Broker, Subscriber};
use common::daprd::{self, Daprd};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;

/// Frames in (acknowledged by the broker), by number.
#[derive(Default)]
struct Published {
    acked: Mutex<BTreeSet<u64>>,
    next: AtomicU64,
}

/// Publishes frames `f<n>` at `fps` (0: as fast as acks come back) until `stop`. Frames are
/// sent in windows of 10 and count as in when their PUBACK arrives; a window cut by a broker
/// restart is not counted (its frames may or may not have reached the broker).
async fn publish(port: u16, fps: u32, published: Arc<Published>, stop: Arc<AtomicBool>) {
    let connect = || {
        let mut opts = MqttOptions::new(format!("soak-pub-{port}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        AsyncClient::new(opts, 64)
    };
    let (mut client, mut events) = connect();
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let window: Vec<u64> = (0..10).map(|_| published.next.fetch_add(1, Ordering::Relaxed)).collect();
        for n in &window {
            let topic = format!("cameras/cam{}/frames", n % 4);
            let _ = client.publish(topic, QoS::AtLeastOnce, false, format!("f{n:010}")).await;
        }
        let mut pkids = std::collections::VecDeque::new();
        let mut acked = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while acked.len() < window.len() {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    if let Some(&n) = window.get(pkids.len()) {
                        pkids.push_back((pkid, n));
                    }
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    if let Some(&(_, n)) = pkids.iter().find(|(p, _)| *p == ack.pkid) {
                        acked.push(n);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => {
                    // The broker is away: the window is uncertain, so none of it counts as in.
                    // A new client, so that no packet of it is resent into the next window's
                    // packet ids (rumqttc resends unacknowledged publishes on reconnect).
                    acked.clear();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    (client, events) = connect();
                    break;
                }
            }
        }
        published.acked.lock().unwrap().extend(acked);
        sent += window.len() as u64;
        if fps > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / fps as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// The frame number in a result: `f<n>` as an MQTT payload, or a CloudEvent's `data`.
fn frame_of(v: &Value) -> Option<u64> {
    let text = v["not_json"].as_str().or_else(|| v["data"].as_str())?;
    text.strip_prefix('f')?.parse().ok()
}

fn config(broker: &Broker, daprd_port: u16, results: &std::path::Path) -> String {
    format!(
        r#"
[mqtt]
url = "{}"
client_id = "edgefn-soak"

[dapr]
url = "http://127.0.0.1:{daprd_port}"
startup_wait = "1s"

[server]
shutdown_grace = "2s"

[[pipeline]]
name = "soak"
source.mqtt = "cameras/+/frames"
functions = ["echo"]
policy = "block"
queue = 64
sinks = [{{ dapr = {{ pubsub = "upstream", topic = "soak-dapr" }} }},
         {{ mqtt = {{ topic = "soak-mqtt/{{camera}}" }} }},
         {{ file = {{ path = {:?} }} }}]
"#,
        broker.url(),
        results.to_str().unwrap()
    )
}

fn main() {
    let secs: u64 = std::env::var("EDGEFN_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(1800);
    let total = Duration::from_secs(secs);
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&tmp.path().join("broker"));
    let results = tmp.path().join("results.jsonl");
    let daprd_port = common::free_port();
    // Only the function the soak runs, as on a board: every other module would be one more
    // mapping whose resident pages the kernel, not the daemon, decides.
    let functions = tmp.path().join("functions");
    std::fs::create_dir_all(&functions).unwrap();
    std::os::unix::fs::symlink(common::wasm("echo"), functions.join("echo.wasm")).unwrap();
    let d =
        Daemon::start_with_functions(&tmp.path().join("edgefn"), &functions, &config(&broker, daprd_port, &results));
    let components = [("pubsub.yaml", daprd::mqtt3("upstream", broker.port))];
    let mut sidecar = Daprd::start_on(&tmp.path().join("daprd"), daprd_port, d.addr.port(), &components, &[]);
    let via_dapr = Subscriber::start_persistent(&broker, "soak-dapr", "soak-sub-dapr");
    let via_mqtt = Subscriber::start_persistent(&broker, "soak-mqtt/#", "soak-sub-mqtt");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();

    // The maximum: unthrottled for a tenth of the run (at most 30 s), counted in the file sink.
    let probe = Duration::from_secs((secs / 10).clamp(10, 30));
    let published = Arc::new(Published::default());
    let stop = Arc::new(AtomicBool::new(false));
    let lines = || std::fs::read_to_string(&results).map(|t| t.lines().count()).unwrap_or(0);
    let before = lines();
    let publisher = rt.spawn(publish(broker.port, 0, published.clone(), stop.clone()));
    std::thread::sleep(probe);
    let max_rate = (lines() - before) as f64 / probe.as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    rt.block_on(publisher).unwrap();
    let fps = (max_rate * 0.7).max(1.0) as u32;
    println!("soak: maximum {max_rate:.0} frames/s through three sinks; running {secs} s at {fps} frames/s (70 %)");

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = rt.spawn(publish(broker.port, fps, published.clone(), stop.clone()));
    let started = Instant::now();
    let every = |fraction: f64| Duration::from_secs_f64(secs as f64 * fraction);
    let (kill_every, broker_every, reload_every, sample_every) =
        (every(1.0 / 6.0), every(7.0 / 30.0), every(0.1), every(0.1).min(Duration::from_secs(60)));
    let (mut next_kill, mut next_broker, mut next_reload, mut next_sample) =
        (kill_every, broker_every, reload_every, Duration::ZERO);
    let (mut kills, mut broker_restarts, mut reloads) = (0, 0, 0);
    // (seconds, RSS, its anonymous part) per sample.
    let mut rss: Vec<(u64, u64, u64)> = Vec::new();
    while started.elapsed() < total {
        let t = started.elapsed();
        if t >= next_sample {
            let pid = d.child.id();
            rss.push((t.as_secs(), common::rss_kib(pid), common::anon_kib(pid)));
            println!(
                "soak: t={:>5} s  rss {:>7} KiB (anon {:>6}, file {:>6}, {:>2} threads)  frames in {:>8}",
                t.as_secs(),
                rss.last().unwrap().1,
                rss.last().unwrap().2,
                common::status_kib(pid, "RssFile"),
                common::status_kib(pid, "Threads"),
                published.acked.lock().unwrap().len()
            );
            next_sample += sample_every;
        }
        if t >= next_kill {
            sidecar.kill();
            std::thread::sleep(Duration::from_secs(5));
            sidecar.restart();
            kills += 1;
            next_kill += kill_every;
        }
        if t >= next_broker {
            broker.restart();
            broker_restarts += 1;
            next_broker += broker_every;
        }
        if t >= next_reload {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.child.id() as i32), nix::sys::signal::Signal::SIGHUP)
                .unwrap();
            reloads += 1;
            next_reload += reload_every;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(publisher).unwrap();
    let frames_in = published.acked.lock().unwrap().clone();
    let attempted = published.next.load(Ordering::Relaxed);
    println!("soak: faults: daprd killed {kills}×, broker restarted {broker_restarts}×, reloads {reloads}");

    // Drain: every frame in must reach every sink.
    let file_frames = || -> BTreeSet<u64> {
        std::fs::read_to_string(&results)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| frame_of(&v))
            .collect()
    };
    let seen = |s: &Subscriber| -> BTreeSet<u64> { s.messages().iter().filter_map(frame_of).collect() };
    let until = Instant::now() + Duration::from_secs(120);
    let missing = loop {
        let missing: Vec<(&str, usize)> =
            [("dapr", seen(&via_dapr)), ("mqtt", seen(&via_mqtt)), ("file", file_frames())]
                .into_iter()
                .map(|(name, got)| (name, frames_in.difference(&got).count()))
                .collect();
        if missing.iter().all(|(_, n)| *n == 0) || Instant::now() > until {
            break missing;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let (dapr_n, mqtt_n, file_n) = (via_dapr.messages().len(), via_mqtt.messages().len(), file_frames().len());
    println!(
        "soak: {attempted} frames published, {} acknowledged by the broker (in); results: dapr {dapr_n}, mqtt {mqtt_n}, file {file_n} distinct frames",
        frames_in.len()
    );
    // Warm-up: the first fifth of the run (the first reloads replace the starting generation).
    // The anonymous part is what a leak grows; file-backed code pages come and go (each
    // reload lets go of what ran only to start).
    let steady: Vec<_> = rss.iter().filter(|(t, ..)| *t > secs / 5).collect();
    let spread = |what: &str, kib: Vec<u64>| {
        if let (Some(lo), Some(hi)) = (kib.iter().min(), kib.iter().max()) {
            let pct = (hi - lo) as f64 * 100.0 / *lo as f64;
            println!("soak: {what} after warm-up {lo}..{hi} KiB: spread {pct:.1} % (flat means within 5 %)");
        }
    };
    spread("rss", steady.iter().map(|s| s.1).collect());
    spread("anonymous", steady.iter().map(|s| s.2).collect());
    drop(sidecar);
    if missing.iter().any(|(_, n)| *n > 0) {
        eprintln!("soak: LOST frames (in, no result) per sink: {missing:?}\n{}", common::tail(&d.log(), 80));
        std::process::exit(1);
    }
    println!("soak: every frame in has a result in every sink");
}
