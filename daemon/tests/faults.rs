//! Fault paths that ARCHITECTURE.md's promises must survive: a reload while the page is open,
//! a reload that cannot apply, results larger than the sidecar's body limit, and slow clients
//! holding connections open. Each test reproduced a fault before its fix.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Daemon;
use common::fake_dapr::{FakeDapr, Mode};

fn sighup(d: &Daemon) {
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
}

/// An open `/v1/events` stream, as the page holds it; returns once the first status arrived.
fn open_event_stream(d: &Daemon) -> TcpStream {
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: status") {
        let n = s.read(&mut buf).expect("the event stream sends a status");
        assert!(n > 0, "event stream closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

const FILE_PIPELINE: &str = r#"
[server]
shutdown_grace = "1s"

[[pipeline]]
name = "echo"
functions = ["echo"]
sinks = [{ file = { path = "RESULTS" } }]
"#;

#[test]
fn a_reload_with_the_page_open_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let cfg = FILE_PIPELINE.replace("RESULTS", results.to_str().unwrap());
    let mut d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    assert_eq!(d.post("/v1/pipelines/echo?camera=a", b"before").status, 200);
    let mut page = open_event_stream(&d);

    sighup(&d);
    d.wait_log("edgefn ready", 2, 30);
    d.assert_alive();
    assert_eq!(d.post("/v1/pipelines/echo?camera=a", b"after").status, 200);
    let r = d.post("/v1/pipelines/echo?camera=a", b"again");
    assert_eq!(r.status, 200);
    // Sequence numbers carry on across the reload: one outbox, ids never reused.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        if text.lines().count() == 3 {
            for (i, line) in text.lines().enumerate() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["id"], format!("{}/echo/a/{}", common::BOARD, i + 1), "{text}");
            }
            break;
        }
        assert!(Instant::now() < until, "results: {text}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    // The old generation's stream was ended by the reload, not left holding it.
    page.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let ended = page.read_to_end(&mut rest);
    assert!(ended.is_ok(), "the old event stream was not closed within 10 s: {ended:?}");
    d.assert_alive();
}

#[test]
fn a_reload_that_cannot_apply_keeps_the_old_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let cfg = FILE_PIPELINE.replace("RESULTS", results.to_str().unwrap());
    let mut d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    assert_eq!(d.post("/v1/pipelines/echo?camera=a", b"one").status, 200);

    // Valid TOML and keys, but its TLS CA file cannot be read: the new generation cannot start.
    let config = d.dir.join("edgefn.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    let missing = tmp.path().join("no-such-ca.pem");
    std::fs::write(
        &config,
        format!("{good}\n[mqtt]\nurl = \"mqtts://127.0.0.1:1\"\nca = {:?}\n", missing.to_str().unwrap()),
    )
    .unwrap();
    sighup(&d);
    d.wait_log("reload failed", 1, 30);
    d.assert_alive();
    let health = d.get("/healthz").json();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["problems"].to_string().contains("reload failed"), "{health}");
    assert_eq!(d.post("/v1/pipelines/echo?camera=a", b"two").status, 200, "the old generation stopped serving");

    // A good config again: the reload applies and the failure is cleared.
    std::fs::write(&config, good).unwrap();
    sighup(&d);
    d.wait_log("edgefn ready", 2, 30);
    let health = d.get("/healthz").json();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(d.post("/v1/pipelines/echo?camera=a", b"three").status, 200);
    d.assert_alive();
}

/// 45 results of 360 KB and one of 5 MiB, made while the sidecar is away; then it comes back
/// with daprd's 4 MiB body limit. `max_request` is what edgefn believes that limit to be.
fn results_over_the_sidecar_body_limit(max_request: &str) -> FakeDapr {
    let tmp = tempfile::tempdir().unwrap();
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Down);
    let cfg = format!(
        r#"
[dapr]
url = "http://127.0.0.1:{}"
startup_wait = "1s"
max_request = "{max_request}"

[[pipeline]]
name = "echo"
functions = ["echo"]
sinks = [{{ dapr = {{ pubsub = "upstream", topic = "frames" }} }}]
"#,
        dapr.port
    );
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    // 40 results of 360 KB while the sidecar is away: any 12 of them are over its 4 MiB limit.
    for i in 0..40 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=cam", &common::noise(360 << 10, i)).status, 200);
    }
    // And one result that can never fit in a request.
    assert_eq!(d.post("/v1/pipelines/echo?camera=huge", &common::noise(5 << 20, 99)).status, 200);
    for i in 40..45 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=cam", &common::noise(360 << 10, i)).status, 200);
    }

    dapr.set_mode(Mode::Ok);
    dapr.wait_for(120, "45 results", |events| {
        events
            .iter()
            .map(|e| e.event["id"].as_str().unwrap_or_default().to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 45
    });
    let ids: std::collections::BTreeSet<String> = dapr.ids().into_iter().collect();
    let want: std::collections::BTreeSet<String> =
        (1..=45).map(|i| format!("{}/echo/cam/{i}", common::BOARD)).collect();
    assert_eq!(ids, want, "every result that fits arrived, and the huge one did not");

    // The sidecar has the last result a moment before its batch is settled.
    d.wait_metric("edgefn_outbox_dead_total{sink=\"dapr:upstream/frames\"}", 10, |v| v == 1.0);
    let dead = d.get("/v1/outbox/dead").json();
    let dead = dead["dead"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["record"]["id"], format!("{}/echo/huge/1", common::BOARD));
    let why = dead[0]["record"]["error"].as_str().unwrap();
    assert!(why.contains("body limit") || why.contains("too large"), "{why}");
    d.wait_metric("edgefn_outbox_depth{sink=\"dapr:upstream/frames\"}", 10, |v| v == 0.0);
    dapr
}

#[test]
fn results_over_the_sidecar_body_limit_are_sent_in_batches_that_fit() {
    let dapr = results_over_the_sidecar_body_limit("4 MiB");
    assert_eq!(dapr.refused_too_large(), 0, "edgefn sent a request over dapr.max_request");
}

#[test]
fn batches_the_sidecar_refuses_as_too_large_are_split() {
    // edgefn believes the limit is 12 MiB: the sidecar's refusals must split its batches.
    let dapr = results_over_the_sidecar_body_limit("12 MiB");
    assert!(dapr.refused_too_large() > 0, "the fake sidecar never refused a request");
}

/// Raises this process's open-file limit, since it holds thousands of sockets itself.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
fn two_thousand_slow_connections_do_not_starve_healthz() {
    raise_nofile();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_env(&tmp.path().join("d"), "", &[("EDGEFN_TEST_NOFILE", "1024".into())]);

    // Each sends half a request header and then waits, as a slowloris client does.
    let addr = d.addr;
    let threads: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for _ in 0..100 {
                    if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n");
                        held.push(s);
                    }
                }
                held
            })
        })
        .collect();
    let held: Vec<TcpStream> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(held.len() > 1024, "only {} slow connections opened", held.len());

    let quick =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(1))).build();
    let quick: ureq::Agent = quick.into();
    for _ in 0..3 {
        let started = Instant::now();
        let r = quick.get(&d.url("/healthz")).call();
        assert!(r.is_ok(), "/healthz did not answer within 1 s with {} slow connections: {r:?}", held.len());
        assert_eq!(r.unwrap().status(), 200);
        eprintln!("/healthz answered in {:?} with {} slow connections open", started.elapsed(), held.len());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!d.log().contains("Too many open files"), "{}", common::tail(&d.log(), 20));
    drop(held);
}

#[test]
fn a_sidecar_before_dapr_1_17_gets_bulk_publishes_on_alpha1_and_nothing_is_dead() {
    let tmp = tempfile::tempdir().unwrap();
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_before_1_17(true);
    dapr.set_mode(Mode::Down);
    let cfg = format!(
        "[dapr]\nurl = \"http://127.0.0.1:{}\"\nstartup_wait = \"1s\"\n\n[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\n\
         sinks = [{{ dapr = {{ pubsub = \"upstream\", topic = \"frames\" }} }}]\n",
        dapr.port
    );
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    for i in 0..10 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=old", format!("r{i}").as_bytes()).status, 200);
    }
    dapr.set_mode(Mode::Ok);
    dapr.wait_for(60, "10 results", |events| events.len() >= 10);
    assert!(dapr.events().iter().all(|e| e.bulk), "the queued results did not go out in bulk");
    assert_eq!(d.get("/v1/outbox/dead").json()["dead"].as_array().unwrap().len(), 0);
    assert!(d.log().contains("no stable bulk publish route"), "{}", d.log());
}

/// An `echo` pipeline fed over HTTP with an MQTT sink on `broker` (`results/{camera}`).
fn mqtt_sink_config(broker: &common::broker::Broker, extra_mqtt: &str) -> String {
    format!(
        "[server]\nshutdown_grace = \"2s\"\n\n[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-sink-{}\"\n{extra_mqtt}\n\n[[pipeline]]\n\
         name = \"echo\"\nfunctions = [\"echo\"]\nsinks = [{{ mqtt = {{ topic = \"results/{{camera}}\" }} }}]\n",
        broker.url(),
        broker.port
    )
}

/// Results for an MQTT sink made while the broker is down, then the daemon restarts before
/// the broker is back: every one still reaches the broker.
#[test]
fn mqtt_sink_results_survive_a_broker_outage_and_a_daemon_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = common::broker::Broker::start(&tmp.path().join("broker"));
    let cfg = mqtt_sink_config(&broker, "");
    let mut d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    broker.stop();
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 0.0);
    for i in 0..20 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=cam", format!("r{i}").as_bytes()).status, 200);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(d.stop().success());

    broker.restart();
    let upstream = common::broker::Subscriber::start(&broker, "results/#");
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    let want: std::collections::BTreeSet<String> = (0..20).map(|i| format!("r{i}")).collect();
    let got = |m: &[serde_json::Value]| -> std::collections::BTreeSet<String> {
        m.iter().filter_map(|v| v["not_json"].as_str().map(str::to_string)).collect()
    };
    upstream.wait_until(30, "20 results", |m| got(m) == want, &d.log());
}

/// A broker without persistence stops acknowledging with results in flight, dies, and comes
/// back without our session: rumqttc drops what it had queued, and the outbox must still have
/// every result that the broker never acknowledged.
#[test]
fn mqtt_sink_results_in_flight_survive_a_broker_that_forgets_the_session() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = common::broker::Broker::start_without_persistence(&tmp.path().join("broker"));
    // A keep-alive longer than the hang, so the connection is lost only when the broker dies.
    let cfg = mqtt_sink_config(&broker, "keep_alive = \"30s\"");
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let depth = "edgefn_outbox_depth{sink=\"mqtt:results/{camera}\"}";

    // The broker hangs: publishes are written but never acknowledged.
    broker.signal(nix::sys::signal::Signal::SIGSTOP);
    for i in 0..30 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=cam", format!("r{i}").as_bytes()).status, 200);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.metric(depth), 30.0, "results left the outbox without a PUBACK");

    // It dies and comes back empty.
    broker.signal(nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    let upstream = common::broker::Subscriber::start(&broker, "results/#");
    d.wait_metric(depth, 60, |v| v == 0.0);
    let want: std::collections::BTreeSet<String> = (0..30).map(|i| format!("r{i}")).collect();
    let got = |m: &[serde_json::Value]| -> std::collections::BTreeSet<String> {
        m.iter().filter_map(|v| v["not_json"].as_str().map(str::to_string)).collect()
    };
    upstream.wait_until(30, "all 30 results", |m| got(m) == want, &d.log());
}

/// daprd retries every answer but SUCCESS and DROP: an event that can never succeed must be
/// dropped (and logged), or the sidecar sends it for ever.
#[test]
fn dapr_events_that_can_never_succeed_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let cfg = format!(
        "[server]\nmax_body = \"64 KiB\"\n\n[[pipeline]]\nname = \"gray\"\nsource.dapr = {{ pubsub = \"up\", topic = \"in\" }}\n\
         functions = [\"grayscale\"]\nsinks = [{{ file = {{ path = {results:?} }} }}]\n\n[[pipeline]]\nname = \"typo\"\n\
         source.dapr = {{ pubsub = \"up\", topic = \"typo\" }}\nfunctions = [\"no-such-function\"]\n\
         sinks = [{{ file = {{ path = {results:?} }} }}]\n"
    );
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    use base64::Engine;
    let event = |bytes: &[u8]| {
        serde_json::json!({"specversion": "1.0", "id": "e", "source": "s", "type": "t",
            "data_base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
        .to_string()
    };
    let too_large = d.post("/v1/dapr/events/gray", event(&common::noise(100 << 10, 1)).as_bytes());
    assert_eq!((too_large.status, too_large.json()["status"].clone()), (200, "DROP".into()));
    let unknown = d.post("/v1/dapr/events/typo", event(&common::asset("coffee.png")).as_bytes());
    assert_eq!((unknown.status, unknown.json()["status"].clone()), (200, "DROP".into()));
    let log = d.log();
    assert!(log.contains("event over server.max_body"), "{log}");
    assert!(log.contains("no-such-function"), "{log}");
}

/// Reported: the delivery backoff would not wake on shutdown. A worker 25 s into its backoff
/// must still let the daemon stop within the grace period.
#[test]
fn a_delivery_worker_in_backoff_stops_with_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Fail500);
    let cfg = format!(
        "[server]\nshutdown_grace = \"2s\"\n\n[dapr]\nurl = \"http://127.0.0.1:{}\"\nstartup_wait = \"0s\"\n\n[[pipeline]]\n\
         name = \"echo\"\nfunctions = [\"echo\"]\nsinks = [{{ dapr = {{ pubsub = \"upstream\", topic = \"t\" }} }}]\n",
        dapr.port
    );
    let mut d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    assert_eq!(d.post("/v1/pipelines/echo?camera=c", b"x").status, 200);
    // 0.2 + 0.4 + ... + 6.4 s: the next wait is 12.8 s.
    d.wait_metric("edgefn_outbox_retried_total{sink=\"dapr:upstream/t\"}", 30, |v| v >= 7.0);
    let asked = Instant::now();
    assert!(d.stop().success());
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(6), "stopping took {took:?} with a worker in backoff");
    assert_eq!(dapr.ids().len(), 0);
}

/// `?camera=` (and a Dapr event's subject) come from outside: a client minting ids must not
/// grow memory without bound, and a camera that went quiet must give its place up.
#[test]
fn http_cameras_are_capped_per_pipeline_and_idle_ones_give_their_place_up() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let cfg = format!(
        "[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\nsinks = [{{ file = {{ path = {results:?} }} }}]\ncamera_idle = \"3s\"\n"
    );
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    let agent = common::agent();
    let started = Instant::now();
    for i in 0..256 {
        assert_eq!(d.post(&format!("/v1/pipelines/echo?camera=c{i}"), b"x").status, 200);
    }
    let refused = d.post("/v1/pipelines/echo?camera=minted", b"x");
    assert!(started.elapsed() < Duration::from_secs(3), "too slow to test the cap");
    assert_eq!(refused.status, 429, "{}", String::from_utf8_lossy(&refused.body));
    assert_eq!(refused.json()["kind"], "too_many_cameras");
    assert_eq!(d.post("/v1/pipelines/echo?camera=c7", b"x").status, 200, "a known camera was refused");
    assert!(d.get("/v1/cameras").json()["cameras"].as_array().unwrap().len() <= 256);
    drop(agent);

    // Quiet for camera_idle: the new camera takes a place.
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(d.post("/v1/pipelines/echo?camera=minted", b"x").status, 200);
    let cams = d.get("/v1/cameras").json();
    let cams = cams["cameras"].as_array().unwrap();
    assert!(cams.len() <= 256, "{}", cams.len());
    assert!(cams.iter().any(|c| c["camera"] == "minted"));
    let metrics = String::from_utf8(d.get("/metrics").body).unwrap();
    let labelled = metrics.lines().filter(|l| l.starts_with("edgefn_frames_total{")).count();
    assert!(labelled <= 256, "{labelled} camera label sets in /metrics");
}

/// One result the upstream broker will never take must not hold back those behind it: after
/// its attempt cap (while others were delivered) it becomes a dead letter.
#[test]
fn a_poison_result_is_dead_lettered_and_the_rest_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_poison(&format!("{}/echo/bad/1", common::BOARD));
    let cfg = format!(
        "[dapr]\nurl = \"http://127.0.0.1:{}\"\nstartup_wait = \"0s\"\n\n[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\n\
         sinks = [{{ dapr = {{ pubsub = \"upstream\", topic = \"t\" }} }}]\n",
        dapr.port
    );
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    assert_eq!(d.post("/v1/pipelines/echo?camera=bad", b"poison").status, 200);
    let dead = "edgefn_outbox_dead_total{sink=\"dapr:upstream/t\"}";
    let mut sent = 0;
    let until = Instant::now() + Duration::from_secs(60);
    while d.metric(dead) < 1.0 {
        assert!(Instant::now() < until, "the poison result was never dead-lettered:\n{}", common::tail(&d.log(), 20));
        sent += 1;
        assert_eq!(d.post("/v1/pipelines/echo?camera=good", format!("g{sent}").as_bytes()).status, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    dapr.wait_for(30, "every good result", |_| {
        (1..=sent).all(|i| dapr.ids().contains(&format!("{}/echo/good/{i}", common::BOARD)))
    });
    let letters = d.get("/v1/outbox/dead").json();
    let letters = letters["dead"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["record"]["id"], format!("{}/echo/bad/1", common::BOARD));
    assert!(letters[0]["record"]["error"].as_str().unwrap().contains("while other results were delivered"));
}

/// The outbox's disk fills: frames cannot be committed and their acks are withheld, past the
/// broker's in-flight window (mosquitto: 20). Once space is freed, frames flow again without a
/// restart, and every frame published has its result. Each result goes to an MQTT sink, which
/// only the outbox can hold, and to a file on another disk, which the result reaches only
/// after the outbox took the MQTT one.
#[test]
fn frames_flow_again_once_the_outbox_disk_has_room() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = common::broker::Broker::start(&tmp.path().join("broker"));
    let results = tmp.path().join("results.jsonl");
    let disk = common::SmallDisk::mount(&tmp.path().join("d/state"), "2m");
    let cfg = format!(
        "[server]\nshutdown_grace = \"1s\"\n\n[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-disk-{}\"\nmax_frame = \"64 KiB\"\n\n\
         [[pipeline]]\nname = \"echo\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"echo\"]\npolicy = \"block\"\n\
         sinks = [{{ file = {{ path = {:?} }} }}, {{ mqtt = {{ topic = \"results/{{camera}}\" }} }}]\n",
        broker.url(),
        broker.port,
        results.to_str().unwrap()
    );
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let frame = |i: usize| {
        let mut f = format!("frame-{i:03}|").into_bytes();
        f.resize(40 * 1024, b'.');
        f
    };
    let seen = |n: usize| {
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        (0..n).filter(|i| text.contains(&format!("frame-{i:03}|"))).count()
    };
    broker.publish_raw("cameras/a/frames", &["-s"], Some(&frame(0)));
    let until = Instant::now() + Duration::from_secs(20);
    while seen(1) < 1 {
        assert!(Instant::now() < until, "the first frame has no result:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    let filler = disk.fill();
    for i in 1..41 {
        broker.publish_raw("cameras/a/frames", &["-s"], Some(&frame(i)));
    }
    d.wait_log("outbox commit failed", 1, 30);
    std::fs::remove_file(filler).unwrap();
    for i in 41..61 {
        broker.publish_raw("cameras/a/frames", &["-s"], Some(&frame(i)));
    }
    let until = Instant::now() + Duration::from_secs(60);
    while seen(61) < 61 {
        assert!(
            Instant::now() < until,
            "{} of 61 frames have a result a minute after the disk had room:\n{}",
            seen(61),
            common::tail(&d.log(), 60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(d.log().contains("outbox reopened after an I/O error"), "{}", d.log());
    assert_eq!(d.get("/healthz").status, 200, "health stays degraded after the disk had room");
}

/// An `echo` pipeline to `sinks` beside the fake sidecar, with one `[outbox]` setting.
fn echo_to_sidecar(dapr: &FakeDapr, outbox: &str, sinks: &str) -> String {
    format!(
        "[dapr]\nurl = \"http://127.0.0.1:{}\"\nstartup_wait = \"0s\"\n\n[outbox]\n{outbox}\n\n\
         [[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\nsinks = [{sinks}]\n",
        dapr.port
    )
}

/// Bytes the state dir takes on disk (the larger of length and allocated blocks per file),
/// and what each file took, to say which one grew.
fn disk_usage(dir: &std::path::Path) -> (u64, String) {
    use std::os::unix::fs::MetadataExt;
    let files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), e.metadata().ok()?)))
                .map(|(name, m)| (name, m.len().max(m.blocks() * 512)))
                .collect()
        })
        .unwrap_or_default();
    let listing = files.iter().map(|(name, bytes)| format!("{name} {bytes}")).collect::<Vec<_>>().join(", ");
    (files.iter().map(|(_, bytes)| bytes).sum(), listing)
}

/// Two sinks that never deliver: a misnamed pub/sub (retried for ever, 404) and a topic the
/// sidecar refuses (403, dead letters). Frames posted as fast as the daemon takes them must
/// not take the state dir past `outbox.max_bytes`, pending and dead letters together.
#[test]
fn a_misnamed_pubsub_at_full_rate_keeps_the_state_dir_under_max_bytes() {
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Status(403));
    let cfg = echo_to_sidecar(
        &dapr,
        r#"max_bytes = "4 MiB""#,
        r#"{ dapr = { pubsub = "upstram", topic = "t" } }, { dapr = { pubsub = "upstream", topic = "refused" } }"#,
    );
    let d = Daemon::start(&cfg);
    let state = d.dir.join("state");
    let max = 4u64 << 20;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let posters: Vec<_> = (0..2)
        .map(|t| {
            let (addr, stop) = (d.addr, stop.clone());
            std::thread::spawn(move || {
                let agent = common::agent();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = common::noise(100 * 1024, t * 1_000_000 + n);
                    let r = agent.post(&format!("http://{addr}/v1/pipelines/echo?camera=c{t}")).send(&body[..]);
                    assert!(r.is_ok(), "post {n} failed: {r:?}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let (mut peak, mut at_peak, until) = (0u64, String::new(), Instant::now() + Duration::from_secs(15));
    let mut measure = || {
        let (bytes, listing) = disk_usage(&state);
        if bytes > peak {
            (peak, at_peak) = (bytes, listing);
        }
    };
    while Instant::now() < until {
        measure();
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let frames: u64 = posters.into_iter().map(|p| p.join().unwrap()).sum();
    measure();
    let status = d.get("/v1/status").json();
    eprintln!("{frames} frames of 100 KiB; state dir peak {peak} bytes ({at_peak}); outbox {}", status["outbox"]);
    assert!(frames * 100 * 1024 > 4 * max, "only {frames} frames: the test did not fill the cap");
    // Dead letters are the first to go over the cap, so count those made, not those left.
    let made = d.metric("edgefn_outbox_dead_total{sink=\"dapr:upstream/refused\"}");
    assert!(made > 0.0, "no dead letters were made: {status}");
    assert!(
        peak <= max,
        "the state dir reached {peak} bytes ({at_peak}), over max_bytes ({max}), after {frames} frames"
    );
}

/// Results for a sink no longer configured have no worker to read them, and dead letters are
/// never read at all: both must still go once older than `outbox.max_age`.
#[test]
fn results_for_a_removed_sink_and_dead_letters_expire_with_max_age() {
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Status(403));
    let tmp = tempfile::tempdir().unwrap();
    let sinks =
        "{ dapr = { pubsub = \"upstram\", topic = \"t\" } }, { dapr = { pubsub = \"upstream\", topic = \"refused\" } }";
    let cfg = |sinks: &str| echo_to_sidecar(&dapr, r#"max_age = "4s""#, sinks);
    let mut d = Daemon::start_in(tmp.path(), &cfg(sinks));
    for i in 0..5 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=a", format!("r{i}").as_bytes()).status, 200);
    }
    let outbox = |d: &Daemon| d.get("/v1/status").json()["outbox"].clone();
    let until = Instant::now() + Duration::from_secs(10);
    while outbox(&d)["dead"] != 5 {
        assert!(Instant::now() < until, "5 dead letters expected: {}", outbox(&d));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(outbox(&d)["pending"], 5, "{}", outbox(&d));
    assert!(d.stop().success());

    // The misnamed sink is gone from the config; its results and the dead letters stay behind.
    let d = Daemon::start_in(tmp.path(), &cfg(""));
    assert_eq!(outbox(&d)["pending"], 5, "{}", outbox(&d));
    let until = Instant::now() + Duration::from_secs(15);
    while outbox(&d)["pending"] != 0 || outbox(&d)["dead"] != 0 {
        assert!(Instant::now() < until, "nothing expired 15 s after max_age (4 s): {}", outbox(&d));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(d.metric("edgefn_outbox_evicted_total{sink=\"dapr:upstram/t\"}"), 5.0);
    assert_eq!(d.metric("edgefn_outbox_evicted_total{sink=\"dapr:upstream/refused\"}"), 5.0);
}

/// A board without a real-time clock boots with a stale clock (here a year behind), makes
/// results while the sidecar is away, then NTP moves the clock forward a year. Measured by the
/// wall clock those results are a year old, past `max_age`; they are minutes old, and must be
/// delivered. The daemon runs under libfaketime (Debian's `faketime`), monotonic clocks real.
#[test]
fn results_survive_the_wall_clock_jumping_forward_at_ntp_sync() {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(std::path::Path::new(lib).exists(), "{lib} missing: scripts/setup.sh installs faketime");
    let tmp = tempfile::tempdir().unwrap();
    let offset = tmp.path().join("faketime");
    std::fs::write(&offset, "-365d\n").unwrap();
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Down);
    let cfg = echo_to_sidecar(&dapr, r#"max_age = "1h""#, r#"{ dapr = { pubsub = "upstream", topic = "t" } }"#);
    let envs = [
        ("LD_PRELOAD", lib.to_string()),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap().to_string()),
        ("FAKETIME_CACHE_DURATION", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ];
    let d = Daemon::start_env(&tmp.path().join("d"), &cfg, &envs);
    for i in 0..5 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=a", format!("r{i}").as_bytes()).status, 200);
    }
    let last_seen = d.get("/v1/status").json()["cameras"][0]["last_seen_ms"].as_u64().unwrap();
    let real_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(real_now - last_seen > 300 * 24 * 3600 * 1000, "the daemon's clock is not a year behind");

    // NTP syncs: the clock jumps forward a year.
    std::fs::write(&offset, "+0d\n").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    dapr.set_mode(Mode::Ok);
    dapr.wait_for(60, "the 5 results made before the clock jumped", |e| e.len() >= 5);
    assert_eq!(d.metric("edgefn_outbox_evicted_total{sink=\"dapr:upstream/t\"}"), 0.0, "{}", d.log());
}

/// A backlog read back after an outage must not stay in memory: redb caches the pages it
/// reads and writes, 1 GiB by default, which on a board is most of its RAM.
#[test]
fn a_drained_backlog_does_not_stay_in_memory() {
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Down);
    let cfg = echo_to_sidecar(&dapr, r#"max_bytes = "2 GiB""#, r#"{ dapr = { pubsub = "upstream", topic = "t" } }"#);
    let d = Daemon::start(&cfg);
    let idle = common::rss_kib(d.child.id());
    for i in 0..120 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=a", &common::noise(1 << 20, i)).status, 200);
    }
    dapr.set_mode(Mode::Ok);
    dapr.wait_for(120, "the 120 results of 1 MiB", |e| e.len() >= 120);
    std::thread::sleep(Duration::from_secs(2));
    let after = common::rss_kib(d.child.id());
    eprintln!("rss idle {idle} KiB, after 120 MiB through the outbox {after} KiB");
    assert!(after < idle + 64 * 1024, "RSS grew from {idle} KiB to {after} KiB and stayed");
}

/// Memory followed counts, not bytes: a file sink's delivery took 64 results whatever their
/// size, and each JSON result was parsed into a tree (16 MiB of `[0,0,…]` is over 256 MiB as a
/// `serde_json::Value`). 64 such results backlogged behind a file sink that cannot write,
/// retried the whole time, must keep the daemon's peak RSS under 400 MiB (the figure is in
/// the test's output).
#[test]
fn sixty_four_json_results_of_16_mib_backlogged_keep_the_peak_rss_bounded() {
    const RESULTS: usize = 64;
    const BOUND_KIB: u64 = 400 * 1024;
    // 64 results of 16 MiB each take 32 MiB of disk cost: a cap that evicts none of them. The
    // sink's directory cannot be made (/dev/null is no directory): every delivery fails.
    let cfg = "[outbox]\nmax_bytes = \"10 GiB\"\n\n[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\n\
               sinks = [{ file = { path = \"/dev/null/results.jsonl\" } }]\n";
    let d = Daemon::start(cfg);
    let mut zeros = Vec::with_capacity(16 << 20);
    zeros.push(b'[');
    while zeros.len() < (16 << 20) - 4096 {
        zeros.extend_from_slice(b"0,");
    }
    zeros.extend_from_slice(b"0]");
    for i in 0..RESULTS {
        let r = d.post(&format!("/v1/pipelines/echo?camera=c{}", i % 4), &zeros);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body[..r.body.len().min(300)]));
        assert_eq!(r.content_type, "application/json");
    }
    // Delivered over and over, failing every time, with all 64 waiting.
    let sink = "file:/dev/null/results.jsonl";
    let retried = format!("edgefn_outbox_retried_total{{sink=\"{sink}\"}}");
    let before = d.metric(&retried);
    d.wait_metric(&retried, 120, |v| v >= before + 2.0);
    assert_eq!(d.get("/v1/status").json()["outbox"]["pending"], RESULTS as u64, "the backlog is not all there");
    assert!(
        d.log().contains("delivery failed: writing /dev/null/results.jsonl"),
        "the sink did not fail as meant:\n{}",
        common::tail(&d.log(), 20)
    );
    let hwm = common::status_kib(d.child.id(), "VmHWM");
    eprintln!(
        "peak RSS with {RESULTS} JSON results of 16 MiB backlogged and retried: {hwm} KiB (bound {BOUND_KIB} KiB)"
    );
    assert!(hwm < BOUND_KIB, "peak RSS {hwm} KiB, over {BOUND_KIB} KiB");
}

/// A guest's read of a granted file ran inline on a tokio worker, where no deadline reaches
/// it. A FIFO nobody writes to (or a hung disk) held the worker; as many such calls as
/// workers and `/healthz`, the API and the MQTT poller starved. Reads go through the blocking
/// pool now: with more blocked calls than the machine has cores, `/healthz` still answers.
#[test]
fn guests_blocked_in_file_reads_do_not_starve_healthz() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let fifo = etc.join("passwd");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let blocked = std::thread::available_parallelism().map_or(2, |n| n.get()) + 2;
    let cfg = format!(
        "[functions.readfile]\ndirs = {{ \"/etc\" = {etc:?} }}\nmax_instances = {blocked}\ndeadline = \"60s\"\n"
    );
    let d = Daemon::start_in(tmp.path(), &cfg);
    let calls: Vec<_> = (0..blocked)
        .map(|_| {
            let url = d.url("/v1/functions/readfile");
            std::thread::spawn(move || common::agent().post(&url).send(&b""[..]).map(|r| r.status().as_u16()))
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(20);
    let busy = |d: &Daemon| {
        let fs = d.get("/v1/functions").json();
        fs["functions"].as_array().unwrap().iter().find(|f| f["name"] == "readfile").unwrap()["busy"].as_u64().unwrap()
    };
    while busy(&d) < blocked as u64 {
        assert!(Instant::now() < until, "only {} of {blocked} calls got in", busy(&d));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let quick: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3))).build().into();
    for _ in 0..5 {
        let asked = Instant::now();
        let r = quick.get(&d.url("/healthz")).call();
        assert!(r.is_ok(), "/healthz did not answer with {blocked} guests blocked in file reads: {r:?}");
        assert!(asked.elapsed() < Duration::from_secs(1), "/healthz took {:?}", asked.elapsed());
    }
    assert_eq!(busy(&d), blocked as u64, "the calls were not blocked all along");
    // A writer opens the FIFO and closes it: every blocked open returns, and reads end.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    for c in calls {
        let _ = c.join().unwrap();
    }
}

/// Each connection could hold a whole `max_body` at once, 512 of them 8 GiB at the default
/// 16 MiB. The bodies in flight are capped at four `max_body`s: past it a request gets 503
/// `busy` with `Retry-After` at once, and the uploads already in get through.
#[test]
fn request_bodies_in_flight_are_capped_in_bytes() {
    let d = Daemon::start("[server]\nmax_body = \"1 MiB\"\n");
    let head = |n: usize| format!("POST /v1/functions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: {n}\r\n\r\n");
    // Four uploads of 1 MiB, each with half its body sent: the whole budget, held.
    let mut uploads: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(d.addr).unwrap();
            s.write_all(head(1 << 20).as_bytes()).unwrap();
            s.write_all(&vec![b'x'; 1 << 19]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let r = common::agent().post(&d.url("/v1/functions/echo")).send(&vec![b'y'; 600 << 10][..]).unwrap();
    assert_eq!(r.status().as_u16(), 503, "a fifth body was taken past the cap");
    assert_eq!(r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()).as_deref(), Some("1"));
    assert!(r.into_body().read_to_string().unwrap().contains("\"busy\""));
    assert_eq!(d.get("/healthz").status, 200);
    for s in &mut uploads {
        s.write_all(&vec![b'x'; 1 << 19]).unwrap();
    }
    for mut s in uploads {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = [0u8; 12];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200", "an upload within the cap failed");
    }
    // With the budget back, the same request goes through.
    assert_eq!(d.post("/v1/functions/echo", &vec![b'y'; 600 << 10]).status, 200);
}

/// A file sink's write that failed partway (the disk full) left a torn line, and every line
/// after it followed the torn one. The batch is cut off again: the file holds whole lines.
#[test]
fn a_file_sink_on_a_full_disk_keeps_whole_lines_only() {
    let tmp = tempfile::tempdir().unwrap();
    let small = common::SmallDisk::mount(&tmp.path().join("small"), "1m");
    let results = small.dir.join("results.jsonl");
    let sink = format!("file:{}", results.display());
    let cfg = format!(
        "[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\nsinks = [{{ file = {{ path = {results:?} }} }}]\n"
    );
    let d = Daemon::start_in(&tmp.path().join("d"), &cfg);
    let (delivered, retried) = (
        format!("edgefn_outbox_delivered_total{{sink=\"{sink}\"}}"),
        format!("edgefn_outbox_retried_total{{sink=\"{sink}\"}}"),
    );
    // One result at a time, each about 270 KB as a base64 line, until the 1 MiB disk refuses.
    let mut sent = 0;
    while d.metric(&retried) == 0.0 {
        assert!(sent < 8, "1 MiB took 8 lines of 270 KB: the disk was never full");
        assert_eq!(d.post("/v1/pipelines/echo?camera=a", &common::noise(200 << 10, sent)).status, 200);
        sent += 1;
        d.wait_metric(&delivered, 20, |v| v == sent as f64 || d.metric(&retried) > 0.0);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(d.log().contains("No space left on device"), "{}", common::tail(&d.log(), 20));
    let text = std::fs::read(&results).unwrap();
    assert!(text.is_empty() || text.ends_with(b"\n"), "the file ends in a torn line");
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len() as f64, d.metric(&delivered), "lines in the file against results delivered");
    for l in lines {
        assert!(serde_json::from_slice::<serde_json::Value>(l).is_ok(), "a line that is not JSON");
    }
}
