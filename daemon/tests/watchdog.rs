//! The watchdog as systemd runs it: `WATCHDOG_USEC` and `WATCHDOG_PID` set, a datagram socket
//! for `NOTIFY_SOCKET`, and a camera publishing at 2 frames/s the whole time.
//!
//! A failure that passes (a model that is not there, a full disk) makes the daemon degraded:
//! it says so in `/healthz` and `STATUS=`, and the pings go on, because a restart fixes
//! neither. Only a frame stuck past what its functions' deadlines allow (here: a guest reading
//! a FIFO that nobody writes, a host call no deadline can interrupt) withholds them.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use common::broker::Broker;

/// The watchdog period given to the daemon; it pings every third of it.
const WATCHDOG: Duration = Duration::from_secs(3);

/// What the daemon sent to NOTIFY_SOCKET, each datagram with when it came.
struct Notify {
    path: std::path::PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = sock.recv(&mut buf) {
                into.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        });
        Notify { path, seen }
    }

    fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NOTIFY_SOCKET", self.path.to_str().unwrap().to_string()),
            ("WATCHDOG_USEC", WATCHDOG.as_micros().to_string()),
        ]
    }

    /// When each `WATCHDOG=1` came, since `from`.
    fn pings_since(&self, from: Instant) -> Vec<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(at, m)| *at >= from && m.lines().any(|l| l == "WATCHDOG=1")).map(|(at, _)| *at).collect()
    }

    /// The longest time without a ping between `from` and now.
    fn longest_silence(&self, from: Instant) -> Duration {
        let mut last = from;
        let mut longest = Duration::ZERO;
        for at in self.pings_since(from).into_iter().chain([Instant::now()]) {
            longest = longest.max(at - last);
            last = at;
        }
        longest
    }

    fn statuses(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen.iter().flat_map(|(_, m)| m.lines().filter_map(|l| l.strip_prefix("STATUS=")).map(str::to_string)).collect()
    }
}

fn camera_at_2_fps(broker: &Broker, frame: &Path, secs: u32) -> Child {
    common::edgefn()
        .args(["publish", "--broker", &broker.url(), "--topic", "cameras/cam1/frames", "--fps", "2"])
        .args(["--count", &(secs * 2).to_string()])
        .arg(frame)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn mqtt_pipeline(broker: &Broker, function: &str, extra: &str) -> String {
    format!(
        "[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-watchdog-{}\"\n\n[limits]\ndeadline = \"1s\"\n\n{extra}\n\n\
         [[pipeline]]\nname = \"watched\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"{function}\"]\n\
         sinks = [{{ file = {{ path = {:?} }} }}]\n",
        broker.url(),
        broker.port,
        broker.dir.join("../results.jsonl")
    )
}

fn small_jpeg(dir: &Path) -> std::path::PathBuf {
    let img = image::load_from_memory(&common::asset("chelsea.png")).unwrap().thumbnail(160, 120);
    let path = dir.join("frame.jpg");
    std::fs::write(&path, common::encode(&image::DynamicImage::ImageRgb8(img.to_rgb8()), image::ImageFormat::Jpeg))
        .unwrap();
    path
}

/// Waits until the camera worker retries (the scenario is on), then watches for `secs`: the
/// pings must keep coming at their period the whole time, while frames keep arriving and the
/// failure persists; `/healthz` and `STATUS=` must name `cause`.
fn pings_go_on_while_degraded(d: &Daemon, notify: &Notify, cause: &str, secs: u64) {
    let until = Instant::now() + Duration::from_secs(60);
    while !d.log().contains("trying again") {
        assert!(Instant::now() < until, "the frames were never retried:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let from = Instant::now();
    // Past what the old check allowed (2 × the 1 s deadline + 10 s with frames waiting).
    std::thread::sleep(Duration::from_secs(secs));
    let silence = notify.longest_silence(from);
    assert!(
        silence < WATCHDOG,
        "no ping for {silence:?} (systemd kills at {WATCHDOG:?}) while the worker retried:\n{}",
        common::tail(&d.log(), 30)
    );
    assert_eq!(d.metric("edgefn_wedged"), 0.0);
    let h = d.get("/healthz").json();
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["problems"].to_string().contains(cause), "/healthz does not name {cause}: {h}");
    assert!(h["queued_frames"].as_u64().unwrap() > 0, "no frame waited, the camera stopped: {h}");
    assert!(
        notify.statuses().iter().any(|s| s.contains(cause)),
        "STATUS= never named {cause}: {:?}",
        notify.statuses()
    );
}

#[test]
fn a_missing_model_is_degraded_and_the_watchdog_is_still_pinged() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let notify = Notify::bind(tmp.path());
    let models = format!(
        "[models.efficientnet-lite0]\npath = \"/nonexistent/model.tflite\"\n\n[functions.classify]\ndirs = {{ \"/models\" = {:?} }}\n",
        common::assets_dir()
    );
    let mut envs = notify.envs();
    envs.push(("EDGEFN__RUNTIME__LITERT", common::litert_lib().to_str().unwrap().to_string()));
    let d = Daemon::start_env(tmp.path(), &mqtt_pipeline(&broker, "classify", &models), &envs);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let mut camera = camera_at_2_fps(&broker, &small_jpeg(tmp.path()), 40);
    pings_go_on_while_degraded(&d, &notify, "pipeline watched retrying", 18);
    let h = d.get("/healthz").json();
    assert!(h["problems"].to_string().contains("model efficientnet-lite0 not loaded"), "{h}");
    let _ = camera.kill();
}

#[test]
fn a_full_disk_is_degraded_and_the_watchdog_is_still_pinged() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let notify = Notify::bind(tmp.path());
    let small = common::SmallDisk::mount(&tmp.path().join("small"), "2m");
    let mut envs = notify.envs();
    envs.push(("EDGEFN__RUNTIME__STATE_DIR", small.dir.to_str().unwrap().to_string()));
    let d = Daemon::start_env(tmp.path(), &mqtt_pipeline(&broker, "echo", ""), &envs);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    small.fill();
    let mut camera = camera_at_2_fps(&broker, &small_jpeg(tmp.path()), 40);
    pings_go_on_while_degraded(&d, &notify, "pipeline watched retrying: result not stored", 18);
    assert!(d.log().contains("outbox commit failed"), "the disk was not full:\n{}", d.log());
    let _ = camera.kill();
}

/// A guest that opens a FIFO nobody writes to blocks in a host call, where no deadline reaches:
/// a real wedge. Its chain allows 3 × 1 s + 10 s; past that the pings stop, and say why.
#[test]
fn a_frame_stuck_past_its_chains_deadlines_withholds_the_watchdog() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let notify = Notify::bind(tmp.path());
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    nix::unistd::mkfifo(&etc.join("passwd"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let grant = format!("[functions.readfile]\ndirs = {{ \"/etc\" = {etc:?} }}\n");
    let d = Daemon::start_env(tmp.path(), &mqtt_pipeline(&broker, "readfile", &grant), &notify.envs());
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let started = Instant::now();
    let mut camera = camera_at_2_fps(&broker, &small_jpeg(tmp.path()), 40);
    d.wait_metric("edgefn_wedged", 40, |v| v == 1.0);
    let wedged_after = started.elapsed();
    assert!(wedged_after >= Duration::from_secs(13), "wedged after {wedged_after:?}, before the chain's 13 s");
    std::thread::sleep(WATCHDOG * 2);
    let silence = notify.longest_silence(started);
    assert!(silence >= WATCHDOG, "still pinged while wedged (longest silence {silence:?})");
    assert!(
        notify.statuses().iter().any(|s| s.starts_with("wedged: pipeline watched camera cam1")),
        "{:?}",
        notify.statuses()
    );
    assert!(d.log().contains("withholding the watchdog ping"), "{}", d.log());
    // Still serving while it waits to be restarted.
    assert_eq!(d.get("/healthz").status, 200);
    let _ = camera.kill();
    // Open the FIFO's other end, so the stuck call can end and the daemon can stop.
    let _ = std::fs::OpenOptions::new().write(true).open(etc.join("passwd"));
}

/// A reload under the field's `WatchdogSec=20s`, with the sidecar stuck (it takes requests and
/// never answers), a delivery waiting on it and a slow upload in flight. The old daemon stopped
/// pinging at SIGHUP, waited for the sidecar, then for the upload's grace, then for the stuck
/// delivery, one after another: more than 20 s of silence, and systemd's kill. The pings go on,
/// `/healthz` answers throughout the switch, and the old generation's stop ends within its grace.
#[test]
fn a_reload_with_the_sidecar_stuck_and_an_upload_in_flight_keeps_pinging() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let notify = Notify::bind(tmp.path());
    let dapr = common::fake_dapr::FakeDapr::start(&["upstream"], None);
    dapr.set_mode(common::fake_dapr::Mode::Hang);
    let cfg = format!(
        "[dapr]\nurl = \"http://127.0.0.1:{}\"\n\n[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\n\
         sinks = [{{ dapr = {{ pubsub = \"upstream\", topic = \"t\" }} }}]\n",
        dapr.port
    );
    let mut envs = notify.envs();
    envs[1].1 = Duration::from_secs(20).as_micros().to_string();
    let mut d = Daemon::start_env(tmp.path(), &cfg, &envs);
    for _ in 0..3 {
        assert_eq!(d.post("/v1/pipelines/echo", b"frame").status, 200);
    }
    let until = Instant::now() + Duration::from_secs(30);
    while dapr.hung() == 0 {
        assert!(Instant::now() < until, "no delivery reached the stuck sidecar:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // An upload that sends 10 bytes a second of its 100 kB.
    let mut upload = std::net::TcpStream::connect(d.addr).unwrap();
    write!(upload, "POST /v1/functions/echo HTTP/1.1\r\nhost: {}\r\ncontent-length: 100000\r\n\r\n", d.addr).unwrap();
    let uploading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still = uploading.clone();
    let uploader = std::thread::spawn(move || {
        while still.load(std::sync::atomic::Ordering::Relaxed) {
            if upload.write_all(b"0123456789").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        false
    });
    std::thread::sleep(Duration::from_secs(2));

    let cfg_path = d.dir.join("edgefn.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, format!("{text}\n[limits]\ndeadline = \"4s\"\n")).unwrap();
    let hup = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.child.id() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    // /healthz answers all through the switch.
    let mut slowest = Duration::ZERO;
    let reloaded = loop {
        let asked = Instant::now();
        assert_eq!(d.get("/healthz").status, 200);
        slowest = slowest.max(asked.elapsed());
        let seen = notify.seen.lock().unwrap().clone();
        let after: Vec<&String> = seen.iter().filter(|(at, _)| *at >= hup).map(|(_, m)| m).collect();
        let reloading = after.iter().position(|m| m.contains("RELOADING=1"));
        if reloading.is_some_and(|i| after[i + 1..].iter().any(|m| m.lines().any(|l| l == "READY=1"))) {
            break hup.elapsed();
        }
        assert!(hup.elapsed() < Duration::from_secs(60), "the reload never finished:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(dapr.hung() > 0 && uploading.load(std::sync::atomic::Ordering::Relaxed), "the scenario did not happen");
    let silence = notify.longest_silence(hup);
    eprintln!("reload: READY=1 after {reloaded:?}, longest watchdog silence {silence:?}, slowest /healthz {slowest:?}");
    assert!(silence < Duration::from_secs(20), "no ping for {silence:?} around the reload:\n{}", d.log());
    // Drained within its 10 s grace, the upload's and the stuck delivery's side by side.
    assert!(reloaded < Duration::from_secs(16), "the reload took {reloaded:?}:\n{}", d.log());
    assert!(slowest < Duration::from_secs(2), "/healthz took {slowest:?} during the switch");
    std::thread::sleep(Duration::from_secs(3));
    uploading.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(uploader.join().unwrap(), "the old generation's upload outlived its grace");
    assert!(d.log().contains("delivery still in progress after the 10s grace"), "{}", d.log());
    // What was not delivered is still there for the new generation.
    assert_eq!(d.get("/v1/status").json()["outbox"]["pending"], 3);
    d.assert_alive();
}
