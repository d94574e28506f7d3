//! Cameras → MQTT (a real mosquitto) → grayscale → outbox → Dapr (the contract fake).
//! Counts every frame: nothing is lost when the sidecar, the broker or the daemon itself goes away.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Daemon;
use common::broker::{Broker, Tls};
use common::fake_dapr::{FakeDapr, Mode};

const SINK: &str = "dapr:upstream/frames/gray";

/// A small camera frame, so counting tests spend their time on the plumbing.
fn small_jpeg(dir: &Path) -> PathBuf {
    let img = image::load_from_memory(&common::asset("chelsea.png")).unwrap().thumbnail(160, 120);
    let path = dir.join("frame.jpg");
    std::fs::write(&path, common::encode(&image::DynamicImage::ImageRgb8(img.to_rgb8()), image::ImageFormat::Jpeg))
        .unwrap();
    path
}

fn config(broker: &Broker, dapr: &FakeDapr, policy: &str, version: u8, extra_sinks: &str) -> String {
    format!(
        r#"
[mqtt]
url = "{}"
version = {version}
client_id = "edgefn-test-{}"
max_frame = "64 KiB"

[dapr]
url = "http://127.0.0.1:{}"
startup_wait = "2s"

[server]
shutdown_grace = "3s"

[[pipeline]]
name = "doorcam-gray"
source.mqtt = "cameras/+/frames"
functions = ["grayscale"]
sinks = [{{ dapr = {{ pubsub = "upstream", topic = "frames/gray" }} }}{extra_sinks}]
policy = "{policy}"
"#,
        broker.url(),
        broker.port,
        dapr.port
    )
}

fn publisher(broker: &Broker, camera: &str, frame: &Path, count: u32, fps: u32) -> Child {
    publisher_of(broker, camera, &[frame.to_path_buf()], count, fps)
}

/// `edgefn publish` sending `frames` round-robin.
fn publisher_of(broker: &Broker, camera: &str, frames: &[PathBuf], count: u32, fps: u32) -> Child {
    common::edgefn()
        .args(["publish", "--broker", &broker.url(), "--topic", &format!("cameras/{camera}/frames")])
        .args(["--fps", &fps.to_string(), "--count", &count.to_string()])
        .args(frames)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn finish(mut c: Child) {
    assert!(c.wait().unwrap().success(), "edgefn publish failed");
}

/// Sum of every sample of a metric family whose line starts with `prefix`.
fn metric_sum(d: &Daemon, prefix: &str) -> f64 {
    let text = String::from_utf8(d.get("/metrics").body).unwrap();
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// (camera → seqs) of the distinct event ids the sidecar got.
fn seqs_by_camera(dapr: &FakeDapr) -> BTreeMap<String, BTreeSet<u64>> {
    let mut out: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for id in dapr.ids() {
        let mut parts = id.rsplitn(3, '/');
        let seq: u64 = parts.next().unwrap().parse().unwrap();
        let camera = parts.next().unwrap().to_string();
        out.entry(camera).or_default().insert(seq);
    }
    out
}

fn distinct(dapr: &FakeDapr) -> usize {
    dapr.ids().into_iter().collect::<BTreeSet<_>>().len()
}

fn count_through(policy: &str) -> (usize, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    let d = Daemon::start_in(tmp.path(), &config(&broker, &dapr, policy, 4, ""));
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let frame = small_jpeg(tmp.path());
    let pubs: Vec<Child> = ["cam1", "cam2", "cam3"].iter().map(|c| publisher(&broker, c, &frame, 200, 0)).collect();
    pubs.into_iter().for_each(finish);

    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let drops = metric_sum(&d, "edgefn_frames_dropped_total");
        let delivered = distinct(&dapr);
        if delivered as f64 + drops >= 600.0 && d.metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}")) == 0.0 {
            break;
        }
        assert!(Instant::now() < until, "delivered {delivered} + dropped {drops} of 600:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let drops = metric_sum(&d, "edgefn_frames_dropped_total");
    let delivered = distinct(&dapr);
    assert_eq!(dapr.ids().len(), delivered, "a result was published twice in a fault-free run");
    assert_eq!(metric_sum(&d, "edgefn_pipeline_errors_total"), 0.0, "{}", d.log());
    assert_eq!(delivered as f64 + drops, 600.0, "published 600: delivered {delivered}, dropped {drops}");
    // The envelope is the contract's: our id, our subject, a PNG as base64.
    let ev = &dapr.events()[0].event;
    assert_eq!(ev["datacontenttype"], "image/png");
    assert_eq!(ev["topic"], "frames/gray");
    assert_eq!(ev["pubsubname"], "upstream");
    assert!(ev["id"].as_str().unwrap().starts_with(&format!("{}/doorcam-gray/cam", common::BOARD)));
    assert!(ev["data_base64"].as_str().unwrap().len() > 100);
    (delivered, drops)
}

#[test]
fn three_cameras_latest_frame_wins_accounts_for_every_frame() {
    let (delivered, drops) = count_through("latest");
    eprintln!("latest: delivered {delivered}, dropped {drops}");
}

#[test]
fn three_cameras_block_policy_delivers_every_frame() {
    let (delivered, drops) = count_through("block");
    assert_eq!((delivered, drops), (600, 0.0));
}

#[test]
fn sidecar_outage_delays_but_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Fail500);
    let d = Daemon::start_in(tmp.path(), &config(&broker, &dapr, "block", 4, ""));
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    finish(publisher(&broker, "cam1", &small_jpeg(tmp.path()), 60, 0));

    // Every result is committed while the sidecar fails; the outbox holds them.
    d.wait_metric("edgefn_results_total{pipeline=\"doorcam-gray\",camera=\"cam1\"}", 60, |v| v == 60.0);
    let depth = d.metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}"));
    assert!(depth >= 50.0, "outbox depth {depth} while the sidecar fails");
    assert!(d.metric(&format!("edgefn_outbox_retried_total{{sink=\"{SINK}\"}}")) > 0.0);
    assert_eq!(d.get("/healthz").json()["outbox"]["pending"], depth as u64);

    // Then unreachable altogether, then back.
    dapr.set_mode(Mode::Down);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(distinct(&dapr), 0);
    dapr.set_mode(Mode::FailEvery(7));
    dapr.wait_for(90, "60 distinct results", |_| distinct(&dapr) == 60);

    let seqs = seqs_by_camera(&dapr);
    assert_eq!(seqs["cam1"], (1..=60).collect::<BTreeSet<u64>>());
    assert!(dapr.events().iter().any(|e| e.bulk), "queued results go out in bulk");
    d.wait_metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}"), 10, |v| v == 0.0);
}

#[test]
fn sigkill_mid_stream_loses_no_result() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    let cfg = config(&broker, &dapr, "block", 4, "");
    let frame = small_jpeg(tmp.path());
    // The daemon must have subscribed once, so the broker queues frames for its session.
    let mut d = Daemon::start_in(tmp.path(), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let publishing = publisher(&broker, "cam1", &frame, 400, 100);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        d.kill();
        d = Daemon::start_in(tmp.path(), &cfg);
    }
    finish(publishing);

    // Settled: the broker has nothing left for us and the outbox is empty.
    let until = Instant::now() + Duration::from_secs(90);
    let mut last = (0, Instant::now());
    loop {
        let n = distinct(&dapr);
        let depth = d.metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}"));
        if n != last.0 {
            last = (n, Instant::now());
        } else if n >= 400 && depth == 0.0 && last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(Instant::now() < until, "{n} distinct results after the kills:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every committed result (seqs are contiguous per camera) reached the sidecar: no gaps.
    let seqs = &seqs_by_camera(&dapr)["cam1"];
    let max = *seqs.iter().max().unwrap();
    assert_eq!(
        seqs.len() as u64,
        max,
        "results produced (1..={max}) vs delivered {}: a gap is a lost result",
        seqs.len()
    );
    assert!(max >= 400, "400 frames published, {max} results: a frame was lost");
}

#[test]
fn permanent_refusals_go_to_dead_letters_while_401_and_a_missing_pubsub_are_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    let frame = small_jpeg(tmp.path());
    let d = Daemon::start_in(tmp.path(), &config(&broker, &dapr, "block", 4, ""));
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);

    dapr.set_mode(Mode::Status(403));
    finish(publisher(&broker, "cam1", &frame, 3, 0));
    d.wait_metric(&format!("edgefn_outbox_dead_total{{sink=\"{SINK}\"}}"), 30, |v| v == 3.0);
    assert_eq!(d.metric(&format!("edgefn_outbox_retried_total{{sink=\"{SINK}\"}}")), 0.0, "no endless retries");
    // daprd answers 404 ERR_PUBSUB_NOT_FOUND and 400 ERR_PUBSUB_NOT_CONFIGURED while its
    // components load: a sidecar problem, not the results'. Kept, retried loudly, then sent.
    for (status, camera) in [(404, "cam2"), (400, "cam4")] {
        let retried = format!("edgefn_outbox_retried_total{{sink=\"{SINK}\"}}");
        let before = d.metric(&retried);
        dapr.set_mode(Mode::Status(status));
        finish(publisher(&broker, camera, &frame, 2, 0));
        d.wait_metric(&retried, 30, |v| v >= before + 2.0);
        assert_eq!(d.metric(&format!("edgefn_outbox_dead_total{{sink=\"{SINK}\"}}")), 3.0, "{status} dead-lettered");
        assert!(d.log().contains("has no pub/sub `upstream`"), "{}", d.log());
        dapr.set_mode(Mode::Ok);
        dapr.wait_for(30, "both results after the pub/sub appeared", |_| {
            seqs_by_camera(&dapr).get(camera).is_some_and(|s| s.len() == 2)
        });
    }
    let dead = d.get("/v1/outbox/dead").json();
    let dead = dead["dead"].as_array().unwrap();
    assert_eq!(dead.len(), 3);
    assert_eq!(dead.iter().filter(|e| e["record"]["error"].as_str().unwrap().contains("403")).count(), 3);
    assert!(
        dead.iter()
            .all(|e| { e["sink"] == SINK && e["record"]["id"].as_str().unwrap().contains("/doorcam-gray/cam1/") })
    );
    drop(d);

    // A sidecar that wants a token we lack: kept and retried, with a clear error, never dead.
    let tmp = tempfile::tempdir().unwrap();
    let dapr = FakeDapr::start(&["upstream"], Some("s3cret"));
    let cfg = config(&broker, &dapr, "block", 4, "");
    let mut d = Daemon::start_in(tmp.path(), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    finish(publisher(&broker, "cam3", &frame, 2, 0));
    d.wait_metric(&format!("edgefn_outbox_retried_total{{sink=\"{SINK}\"}}"), 30, |v| v >= 2.0);
    assert_eq!(d.metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}")), 2.0);
    assert_eq!(d.metric(&format!("edgefn_outbox_dead_total{{sink=\"{SINK}\"}}")), 0.0);
    assert!(dapr.unauthorized() > 0);
    assert!(d.log().contains("set DAPR_API_TOKEN"), "{}", d.log());
    assert!(d.stop().success());
    let d = Daemon::start_env(tmp.path(), &cfg, &[("DAPR_API_TOKEN", "s3cret".into())]);
    dapr.wait_for(30, "2 results after the token is set", |_| distinct(&dapr) == 2);
    drop(d);
}

/// Frame `i` is a solid gray of shade `8 i + 4`, so a result tells which frame it came from.
fn shade_jpegs(dir: &Path, range: std::ops::Range<u8>) -> Vec<PathBuf> {
    range
        .map(|i| {
            let img = image::GrayImage::from_pixel(64, 48, image::Luma([8 * i + 4]));
            let path = dir.join(format!("shade-{i}.jpg"));
            std::fs::write(&path, common::encode(&image::DynamicImage::ImageLuma8(img), image::ImageFormat::Jpeg))
                .unwrap();
            path
        })
        .collect()
}

/// Which shaded frames have a result at the sidecar, and how many results each.
fn shades(dapr: &FakeDapr) -> BTreeMap<u8, usize> {
    use base64::Engine;
    let mut out = BTreeMap::new();
    for r in dapr.events() {
        let png = base64::engine::general_purpose::STANDARD.decode(r.event["data_base64"].as_str().unwrap()).unwrap();
        let img = common::assert_gray(&png);
        let mean = img.pixels().map(|p| p[0] as f64).sum::<f64>() / (img.width() * img.height()) as f64;
        *out.entry(((mean - 4.0) / 8.0).round() as u8).or_default() += 1;
    }
    out
}

fn covers(dapr: &FakeDapr, n: u8) -> bool {
    shades(dapr).keys().copied().eq(0..n)
}

/// At least once across broker restarts: every frame gets a result, and a frame whose ack
/// the broker lost may get a second one (with its own id), never more than it redelivered.
fn broker_restart_resumes_the_session(version: u8) {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    let cfg = config(&broker, &dapr, "block", version, "");
    let mut d = Daemon::start_in(tmp.path(), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    finish(publisher_of(&broker, "cam1", &shade_jpegs(tmp.path(), 0..10), 10, 0));
    dapr.wait_for(30, "frames 0..10", |_| covers(&dapr, 10));

    // Broker restarts under a running daemon: it reconnects and carries on.
    broker.restart();
    d.wait_metric("edgefn_mqtt_reconnects_total", 30, |v| v >= 1.0);
    d.wait_metric("edgefn_mqtt_connected", 30, |v| v == 1.0);
    finish(publisher_of(&broker, "cam1", &shade_jpegs(tmp.path(), 10..20), 10, 0));
    dapr.wait_for(30, "frames 0..20", |_| covers(&dapr, 20));
    let mut redelivered = d.metric("edgefn_mqtt_redelivered_total");

    // Daemon away, frames published, broker restarted: the persistent session kept them.
    assert!(d.stop().success());
    finish(publisher_of(&broker, "cam1", &shade_jpegs(tmp.path(), 20..30), 10, 0));
    broker.restart();
    let d = Daemon::start_in(tmp.path(), &cfg);
    dapr.wait_for(30, "frames 0..30 from the resumed session", |_| covers(&dapr, 30));

    let results = dapr.ids().into_iter().collect::<BTreeSet<_>>().len();
    redelivered += d.metric("edgefn_mqtt_redelivered_total");
    eprintln!("{results} results for 30 frames; the broker redelivered {redelivered}");
    let seqs = &seqs_by_camera(&dapr)["cam1"];
    assert_eq!(*seqs, (1..=results as u64).collect::<BTreeSet<u64>>(), "result ids have a gap");
    assert!(
        results - 30 <= redelivered as usize,
        "{results} results for 30 frames, but the broker redelivered only {redelivered}: {:?}",
        shades(&dapr)
    );
    drop(d);
}

#[test]
fn broker_restart_resumes_the_session_mqtt311() {
    broker_restart_resumes_the_session(4);
}

#[test]
fn broker_restart_resumes_the_session_mqtt5() {
    broker_restart_resumes_the_session(5);
}

#[test]
fn bad_payloads_are_refused_and_the_next_frame_flows() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    let mqtt_sink = r#", { mqtt = { topic = "results/{camera}/{pipeline}" } }"#;
    let mut d = Daemon::start_in(tmp.path(), &config(&broker, &dapr, "latest", 4, mqtt_sink));
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);

    let mut noise = vec![0u8; 5000];
    let mut x = 0x2545F491u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    broker.publish_raw("cameras/noisy/frames", &["-s"], Some(&noise));
    broker.publish_raw("cameras/silent/frames", &["-n"], None);
    let big = tmp.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 100 * 1024]).unwrap();
    broker.publish_raw("cameras/huge/frames", &["-f", big.to_str().unwrap()], None);
    broker.publish_raw("cameras/bad\"id/frames", &["-f", big.to_str().unwrap()], None);

    // The MQTT sink's result, read back from the broker.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-C", "1", "-W", "30"])
        .args(["-t", "results/good/doorcam-gray"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let frame = small_jpeg(tmp.path());
    broker.publish_raw("cameras/good/frames", &["-f", frame.to_str().unwrap()], None);

    dapr.wait_for(30, "the good frame", |_| distinct(&dapr) == 1);
    assert_eq!(dapr.ids(), [format!("{}/doorcam-gray/good/1", common::BOARD)]);
    let out = sub.wait_with_output().unwrap();
    assert!(out.stdout.starts_with(b"\x89PNG"), "mqtt sink result: {} bytes", out.stdout.len());

    let log = d.log();
    for needle in [
        "topic=cameras/silent/frames",
        "frame refused: empty payload",
        "topic=cameras/huge/frames",
        "over mqtt.max_frame",
        "camera id \"bad\\\"id\"",
        "topic=cameras/noisy/frames",
        "rejected its input",
    ] {
        assert!(log.contains(needle), "log lacks `{needle}`:\n{log}");
    }
    assert_eq!(d.metric("edgefn_pipeline_errors_total{pipeline=\"doorcam-gray\",kind=\"empty\"}"), 1.0);
    assert_eq!(d.metric("edgefn_pipeline_errors_total{pipeline=\"doorcam-gray\",kind=\"oversized\"}"), 1.0);
    assert_eq!(d.metric("edgefn_pipeline_errors_total{pipeline=\"doorcam-gray\",kind=\"rejected\"}"), 1.0);
    d.assert_alive();
}

#[test]
fn dapr_app_side_subscriptions_token_and_events() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let cfg = format!(
        r#"
[[pipeline]]
name = "cloud-gray"
source.dapr = {{ pubsub = "upstream", topic = "frames/in" }}
functions = ["grayscale"]
sinks = [{{ file = {{ path = {results:?} }} }}]
"#
    );
    let d = Daemon::start_env(tmp.path(), &cfg, &[("APP_API_TOKEN", "apptok".into())]);
    let token = ("dapr-api-token", "apptok");

    assert_eq!(d.get("/healthz").status, 200, "health stays open for probes");
    assert_eq!(d.get("/dapr/subscribe").status, 401);
    assert_eq!(d.post("/v1/functions/grayscale", b"x").status, 401);
    let subs = common::agent().get(&d.url("/dapr/subscribe")).header(token.0, token.1).call().unwrap();
    let subs: serde_json::Value = serde_json::from_reader(subs.into_body().into_reader()).unwrap();
    assert_eq!(
        subs,
        serde_json::json!([{"pubsubname": "upstream", "topic": "frames/in", "route": "/v1/dapr/events/cloud-gray"}])
    );

    use base64::Engine;
    let event = serde_json::json!({
        "specversion": "1.0", "id": "up-1", "source": "cloud", "type": "com.dapr.event.sent",
        "topic": "frames/in", "pubsubname": "upstream", "subject": "cloudcam",
        "datacontenttype": "image/png",
        "data_base64": base64::engine::general_purpose::STANDARD.encode(common::asset("chelsea.png")),
    });
    let post = |body: &serde_json::Value| {
        d.post_with("/v1/dapr/events/cloud-gray", token, body.to_string().as_bytes()).json()["status"].clone()
    };
    assert_eq!(post(&event), "SUCCESS");
    let mut garbage = event.clone();
    garbage["data_base64"] = serde_json::json!(base64::engine::general_purpose::STANDARD.encode(b"not an image"));
    assert_eq!(post(&garbage), "DROP");
    assert_eq!(d.post_with("/v1/dapr/events/cloud-gray", token, b"{not json").json()["status"], "DROP");

    // HTTP feeds the same pipeline; a camera id that could not travel in headers is refused.
    let resp = d.post_with("/v1/pipelines/cloud-gray?camera=a%0Ab", token, b"x");
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["kind"], "camera");
    let resp = d.post_with("/v1/pipelines/cloud-gray?camera=desk", token, &common::asset("coffee.png"));
    assert_eq!(resp.status, 200);
    common::assert_gray(&resp.body);

    let until = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        if text.lines().count() >= 2 || Instant::now() > until {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let events: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 2, "{lines}");
    assert_eq!(events[0]["id"], format!("{}/cloud-gray/cloudcam/1", common::BOARD));
    assert_eq!(events[1]["id"], format!("{}/cloud-gray/desk/1", common::BOARD));
    assert_eq!(events[1]["subject"], "desk");
    assert_eq!(events[0]["datacontenttype"], "image/png");
}

#[test]
fn tls_with_client_certificate_and_password() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = Tls::generate(&tmp.path().join("pki"));
    let broker = Broker::start_tls(&tmp.path().join("broker"), &tls, "cam-user", "cam-pass");
    let dapr = FakeDapr::start(&["upstream"], None);
    let cfg = |password: &str| {
        let section = format!(
            "url = \"mqtts://127.0.0.1:{}\"\nusername = \"cam-user\"\npassword = \"{password}\"\n\
             ca = {:?}\ncert = {:?}\nkey = {:?}\n",
            broker.port, tls.ca, tls.client_cert, tls.client_key
        );
        config(&broker, &dapr, "block", 4, "").replace(&format!("url = \"{}\"\n", broker.url()), &section)
    };

    // A wrong password never connects, and says why.
    let d = Daemon::start_in(&tmp.path().join("bad"), &cfg("wrong"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.metric("edgefn_mqtt_connected"), 0.0);
    assert!(d.log().contains("MQTT broker connection"), "{}", d.log());
    drop(d);

    let d = Daemon::start_in(&tmp.path().join("good"), &cfg("cam-pass"));
    d.wait_metric("edgefn_mqtt_connected", 15, |v| v == 1.0);
    // The camera side over TLS too: `edgefn publish` reads the same [mqtt] section.
    let frame = small_jpeg(tmp.path());
    let st = common::edgefn()
        .args(["--config", d.dir.join("edgefn.toml").to_str().unwrap(), "publish", "--topic", "cameras/tls/frames"])
        .args(["--fps", "0", "--count", "3", frame.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());
    dapr.wait_for(30, "3 results over TLS", |_| distinct(&dapr) == 3);
}

#[test]
fn a_missing_pubsub_is_named_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["something-else"], None);
    let d = Daemon::start_in(tmp.path(), &config(&broker, &dapr, "block", 4, ""));
    d.wait_metric("edgefn_dapr_reachable", 10, |v| v == 1.0);
    // The check runs beside the start, so it never delays it.
    let until = Instant::now() + Duration::from_secs(15);
    while !d.log().contains("has no pub/sub component named `upstream`") {
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("something-else"), "{}", d.log());
}

#[test]
fn outbox_caps_evict_the_oldest_and_count_them() {
    // Gray PNGs of about 16 KiB: 60 of them take twice what a 2 MiB cap leaves for results.
    const FRAMES: u32 = 60;
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Fail500);
    let cfg =
        format!("{}\n[outbox]\nmax_bytes = \"2 MiB\"\nmax_age = \"3s\"\n", config(&broker, &dapr, "block", 4, ""));
    let d = Daemon::start_in(tmp.path(), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let frame = small_jpeg(tmp.path());
    finish(publisher(&broker, "cam1", &frame, FRAMES, 0));
    d.wait_metric("edgefn_results_total{pipeline=\"doorcam-gray\",camera=\"cam1\"}", 60, |v| v == FRAMES as f64);

    // Over max_bytes: the oldest went, counted; what is left fits the cap.
    let evicted = d.metric(&format!("edgefn_outbox_evicted_total{{sink=\"{SINK}\"}}"));
    let depth = d.metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}"));
    assert!(evicted > 0.0 && depth > 0.0, "evicted {evicted}, depth {depth}");
    assert_eq!(evicted + depth, FRAMES as f64, "every result is either waiting or counted as evicted");
    let result_size = std::fs::metadata(&frame).unwrap().len(); // a gray PNG is about the JPEG's size
    assert!(depth * (result_size as f64) < 2.0 * 1024.0 * 1024.0, "{depth} results kept under a 2 MiB cap");

    // Past max_age: evicted instead of delivered, also counted.
    std::thread::sleep(Duration::from_secs(4));
    dapr.set_mode(Mode::Ok);
    d.wait_metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}"), 60, |v| v == 0.0);
    assert_eq!(d.metric(&format!("edgefn_outbox_evicted_total{{sink=\"{SINK}\"}}")), FRAMES as f64);
    assert_eq!(distinct(&dapr), 0, "expired results were delivered");
}

#[test]
fn a_full_disk_is_an_error_in_health_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Fail500);
    // The outbox lives on a 2 MiB tmpfs that frames fill up.
    let small = common::SmallDisk::mount(&tmp.path().join("small"), "2m");
    let state = ("EDGEFN__RUNTIME__STATE_DIR", small.dir.to_str().unwrap().to_string());
    let mut d = Daemon::start_env(tmp.path(), &config(&broker, &dapr, "block", 4, ""), &[state]);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let big = image::load_from_memory(&common::asset("coffee.png")).unwrap();
    // A JPEG under max_frame whose gray PNG is several times larger.
    let frame = tmp.path().join("big.jpg");
    let rgb = image::DynamicImage::ImageRgb8(big.thumbnail(400, 400).to_rgb8());
    std::fs::write(&frame, common::encode(&rgb, image::ImageFormat::Jpeg)).unwrap();
    assert!(std::fs::metadata(&frame).unwrap().len() < 64 * 1024);
    let mut publishing = publisher(&broker, "cam1", &frame, 300, 0);

    let until = Instant::now() + Duration::from_secs(60);
    let health = loop {
        let h = d.get("/healthz").json();
        if h["outbox"]["error"].is_string() {
            break h;
        }
        assert!(Instant::now() < until, "no outbox error in health after filling the disk:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["problems"][0].as_str().unwrap().contains("outbox"), "{health}");
    assert!(d.log().contains("outbox commit failed"), "{}", d.log());
    // Frames that could not be stored are tried again, not given up and left unacknowledged.
    // The worker says so just after the committer has: health can show the error first.
    d.wait_log("trying again: result not stored", 1, 10);
    d.assert_alive();
    let _ = publishing.kill();
    let _ = publishing.wait();
}

/// A `block` pipeline that stops taking frames must not stop the broker connection: with
/// the connection polled by the same task that waits on the pipeline, no PINGREQ went out and
/// the broker dropped us after 1.5 keep-alives.
#[test]
fn a_blocked_pipeline_keeps_the_broker_connection_alive() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let cfg = format!(
        "[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-blocked-{}\"\nkeep_alive = \"2s\"\n\n[functions.spin]\ndeadline = \"2s\"\n\
         max_instances = 1\n\n[[pipeline]]\nname = \"slow\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"spin\"]\n\
         queue = 1\npolicy = \"block\"\n",
        broker.url(),
        broker.port
    );
    let d = Daemon::start_in(tmp.path(), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    // Every frame spins to its 2 s deadline: eight frames keep the pipeline full for 16 s.
    finish(publisher(&broker, "cam1", &small_jpeg(tmp.path()), 8, 0));
    std::thread::sleep(Duration::from_secs(9));
    // The broker's side: a client silent for 1.5 keep-alives is dropped, and says so.
    let broker_log = std::fs::read_to_string(tmp.path().join("broker/mosquitto.log")).unwrap();
    assert!(!broker_log.contains("exceeded timeout"), "the broker dropped us: {}", common::tail(&broker_log, 10));
    assert_eq!(d.metric("edgefn_mqtt_reconnects_total"), 0.0, "{}", common::tail(&d.log(), 20));
    assert_eq!(d.metric("edgefn_mqtt_connected"), 1.0);
    assert!(d.metric("edgefn_pipeline_errors_total{pipeline=\"slow\",kind=\"deadline\"}") >= 3.0);
}

/// An MQTT 5 broker that refuses a publish says why in its PUBACK. Behind an ACL that denies
/// one camera's result topic, those results are dead letters naming the reason, never counted
/// delivered; the other camera's results arrive.
#[test]
fn a_publish_refused_by_the_broker_acl_is_a_dead_letter_mqtt5() {
    let tmp = tempfile::tempdir().unwrap();
    let acl = "topic readwrite cameras/#\ntopic readwrite results/allowed\n";
    let broker = Broker::start_with_acl(&tmp.path().join("broker"), acl);
    let sink = "mqtt:results/{camera}";
    let cfg = format!(
        "[mqtt]\nurl = \"{}\"\nversion = 5\nclient_id = \"edgefn-acl-{}\"\n\n[[pipeline]]\nname = \"acl\"\n\
         source.mqtt = \"cameras/+/frames\"\nfunctions = [\"echo\"]\nsinks = [{{ mqtt = {{ topic = \"results/{{camera}}\" }} }}]\n\
         policy = \"block\"\n",
        broker.url(),
        broker.port
    );
    let d = Daemon::start_in(tmp.path(), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let results = common::broker::Subscriber::start(&broker, "results/allowed");
    // Text frames: the subscriber reads lines.
    let frame = tmp.path().join("frame.json");
    std::fs::write(&frame, "{\"frame\": 1}").unwrap();
    finish(publisher(&broker, "allowed", &frame, 5, 0));
    finish(publisher(&broker, "denied", &frame, 5, 0));

    d.wait_metric(&format!("edgefn_outbox_depth{{sink=\"{sink}\"}}"), 30, |v| v == 0.0);
    d.wait_metric(&format!("edgefn_outbox_dead_total{{sink=\"{sink}\"}}"), 30, |v| v == 5.0);
    results.wait_until(30, "the allowed camera's 5 results", |m| m.len() == 5, &d.log());
    assert!(broker.log().contains("Denied PUBLISH"), "the broker never refused:\n{}", broker.log());
    assert_eq!(
        d.metric(&format!("edgefn_outbox_delivered_total{{sink=\"{sink}\"}}")),
        5.0,
        "refused ones counted delivered"
    );
    let dead = d.get("/v1/outbox/dead").json();
    let dead = dead["dead"].as_array().unwrap();
    assert_eq!(dead.len(), 5);
    for e in dead {
        assert_eq!(e["record"]["camera"], "denied", "{e}");
        let why = e["record"]["error"].as_str().unwrap();
        assert!(why.contains("not authorized") && why.contains("results/denied"), "{why}");
    }
}

/// Two boards split one feed through a shared subscription (`$share/GROUP/...`), one over
/// MQTT 5 and one over 3.1.1: each frame gets exactly one result across the two, both boards
/// take part, and their result ids, which each numbers on its own, never collide.
#[test]
fn two_daemons_on_one_shared_subscription_split_a_feed_of_200_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let board = |name: &str, version: u8| {
        let dir = tmp.path().join(name);
        let cfg = format!(
            "[board]\nid = \"{name}\"\n\n[mqtt]\nurl = \"{}\"\nversion = {version}\nclient_id = \"edgefn-{name}-{}\"\n\n\
             [[pipeline]]\nname = \"shared\"\nsource.mqtt = \"$share/edge/cameras/+/frames\"\nfunctions = [\"echo\"]\n\
             sinks = [{{ file = {{ path = {:?} }} }}]\npolicy = \"block\"\n",
            broker.url(),
            broker.port,
            dir.join("results.jsonl")
        );
        let d = Daemon::start_in(&dir, &cfg);
        d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
        d
    };
    let (a, b) = (board("board-a", 5), board("board-b", 4));
    std::thread::sleep(Duration::from_millis(500));
    let frames: Vec<PathBuf> = (0..200)
        .map(|i| {
            let path = tmp.path().join(format!("frame-{i:03}.json"));
            std::fs::write(&path, format!("{{\"frame\": {i}}}")).unwrap();
            path
        })
        .collect();
    finish(publisher_of(&broker, "cam1", &frames, 200, 0));

    let results = |d: &Daemon| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.dir.join("results.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let until = Instant::now() + Duration::from_secs(60);
    while results(&a).len() + results(&b).len() < 200 {
        assert!(Instant::now() < until, "{} + {} results of 200", results(&a).len(), results(&b).len());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (ra, rb) = (results(&a), results(&b));
    assert!(!ra.is_empty() && !rb.is_empty(), "the broker did not split the feed: {} and {}", ra.len(), rb.len());
    let all: Vec<&serde_json::Value> = ra.iter().chain(&rb).collect();
    assert_eq!(all.len(), 200, "a frame had more than one result");
    let frames_seen: BTreeSet<u64> = all.iter().map(|e| e["data"]["frame"].as_u64().unwrap()).collect();
    assert_eq!(frames_seen.len(), 200, "a frame had no result");
    let ids: BTreeSet<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 200, "result ids collided across the boards");
    for (events, name) in [(&ra, "board-a"), (&rb, "board-b")] {
        for e in events.iter() {
            assert!(e["id"].as_str().unwrap().starts_with(&format!("{name}/shared/cam1/")), "{e}");
            assert_eq!(e["source"], format!("edgefn/{name}/shared"), "{e}");
        }
    }
    eprintln!("split: board-a {} results, board-b {}", ra.len(), rb.len());
}

/// QoS 0 frames have no flow control: behind a `block` pipeline that stopped taking frames,
/// the handoff from the connection's poller held up to 1,024 frames of any size, then the
/// poller waited, no PINGREQ went out and the broker dropped us. Past its byte budget QoS 0
/// frames are dropped and counted now; the connection stays up.
#[test]
fn qos0_frames_past_the_handoff_budget_are_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let cfg = format!(
        "[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-shed-{}\"\nkeep_alive = \"2s\"\nmax_frame = \"2 MiB\"\n\n\
         [functions.spin]\ndeadline = \"3s\"\nmax_instances = 1\n\n[[pipeline]]\nname = \"slow\"\n\
         source.mqtt = \"cameras/+/frames\"\nfunctions = [\"spin\"]\nqueue = 1\npolicy = \"block\"\n",
        broker.url(),
        broker.port
    );
    let d = Daemon::start_in(tmp.path(), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    // 40 frames of 1 MiB at QoS 0: more than the 16 MiB the handoff holds of them.
    let frame = tmp.path().join("big.bin");
    std::fs::write(&frame, common::noise(1 << 20, 7)).unwrap();
    broker.publish_raw("cameras/cam1/frames", &["-q", "0", "-f", frame.to_str().unwrap(), "--repeat", "40"], None);
    let shed = d.wait_metric("edgefn_mqtt_shed_total", 30, |v| v > 0.0);
    assert!(d.log().contains("QoS 0 frame dropped"), "{}", common::tail(&d.log(), 20));
    // Keep-alives went on while the pipeline sat on its frames.
    std::thread::sleep(Duration::from_secs(5));
    assert!(!broker.log().contains("exceeded timeout"), "the broker dropped us: {}", common::tail(&broker.log(), 10));
    assert_eq!(d.metric("edgefn_mqtt_reconnects_total"), 0.0);
    let rss = common::status_kib(d.child.id(), "VmHWM");
    eprintln!("shed {shed} of 40 QoS 0 frames of 1 MiB; peak RSS {rss} KiB");
    assert!(rss < 200 * 1024, "peak RSS {rss} KiB with the handoff capped at 16 MiB");
}

/// The broker keeps a persistent session's subscriptions: a filter a reload removed went on
/// receiving (and queueing) frames, which were acknowledged unprocessed without a word. The
/// filters subscribed last are remembered, and those no longer configured unsubscribed.
#[test]
fn a_filter_a_reload_removes_is_unsubscribed() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let pipeline = |name: &str, filter: &str| {
        format!("[[pipeline]]\nname = \"{name}\"\nsource.mqtt = \"{filter}\"\nfunctions = [\"echo\"]\n\n")
    };
    let mqtt = format!("[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-unsub-{}\"\n\n", broker.url(), broker.port);
    let both = format!("{mqtt}{}{}", pipeline("a", "cameras/+/frames"), pipeline("b", "doors/+/frames"));
    let mut d = Daemon::start_in(tmp.path(), &both);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let file = d.dir.join("edgefn.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let doors = pipeline("b", "doors/+/frames");
    std::fs::write(&file, text.replace(&doors, "")).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.child.id() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !d.log().contains("unsubscribed: no pipeline takes this filter any more") {
        assert!(Instant::now() < until, "no unsubscribe after the reload:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(broker.log().contains("Received UNSUBSCRIBE"), "{}", common::tail(&broker.log(), 20));
    broker.publish_raw("doors/front/frames", &["-m", "frame"], None);
    broker.publish_raw("cameras/c/frames", &["-m", "frame"], None);
    d.wait_metric("edgefn_results_total{pipeline=\"a\",camera=\"c\"}", 10, |v| v == 1.0);
    assert_eq!(d.metric("edgefn_mqtt_unrouted_total"), 0.0, "the removed filter still receives");
    d.assert_alive();
}
