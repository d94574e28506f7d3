//! edgefn against the real daprd (built from github.com/dapr/dapr's Go module by
//! scripts/build-daprd.sh), with real pub/subs behind it: mosquitto (`pubsub.mqtt3`) and
//! redis-server (`pubsub.redis`), each started by the test on free loopback ports.
//!
//! Both directions are covered: edgefn → daprd (publish, bulk publish, body limits, sidecar
//! faults, dead letters and their replay) and daprd → edgefn (subscriptions, events, the seed's
//! service invocation), with and without every token set. The last test sends the same
//! requests to daprd and to the fake sidecar and compares the answers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::Daemon;
use common::broker::{Broker, Subscriber};
use common::daprd::{self, Daprd};
use common::fake_dapr::FakeDapr;
use serde_json::{Value, json};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Waits until every id in `want` reached the upstream broker.
fn wait_ids(upstream: &Subscriber, secs: u64, want: &BTreeSet<String>, daemon: &Daemon) {
    upstream.wait_until(secs, "result ids", |m| want.is_subset(&ids_of(m)), &daemon.log());
}

fn ids_of(messages: &[Value]) -> BTreeSet<String> {
    messages.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect()
}

fn ids(prefix: &str, range: std::ops::RangeInclusive<u64>) -> BTreeSet<String> {
    range.map(|i| format!("{}/{prefix}/{i}", common::BOARD)).collect()
}

fn sink_toml(daprd_port: u16, pubsub: &str, extra: &str) -> String {
    format!(
        r#"
[dapr]
url = "http://127.0.0.1:{daprd_port}"
startup_wait = "1s"
{extra}

[[pipeline]]
name = "gray"
functions = ["grayscale"]
sinks = [{{ dapr = {{ pubsub = "{pubsub}", topic = "frames/gray" }} }}]

[[pipeline]]
name = "echo"
functions = ["echo"]
sinks = [{{ dapr = {{ pubsub = "{pubsub}", topic = "frames/echo" }} }}]
"#
    )
}

fn metric_sum(d: &Daemon, prefix: &str) -> f64 {
    let text = String::from_utf8(d.get("/metrics").body).unwrap();
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// mosquitto as the upstream broker with a subscriber on `topic`, edgefn with the Dapr sinks of
/// [`sink_toml`], and its daprd with a `pubsub.mqtt3` named `upstream` on that broker.
fn mqtt_upstream(tmp: &std::path::Path, topic: &str) -> (Broker, Subscriber, Daemon, Daprd) {
    let broker = Broker::start(&tmp.join("broker"));
    let upstream = Subscriber::start(&broker, topic);
    let port = common::free_port();
    let d = Daemon::start_in(&tmp.join("edgefn"), &sink_toml(port, "upstream", ""));
    let components = [("pubsub.yaml", daprd::mqtt3("upstream", broker.port))];
    let sidecar = Daprd::start_on(&tmp.join("daprd"), port, d.addr.port(), &components, &[]);
    (broker, upstream, d, sidecar)
}

#[test]
fn publish_and_bulk_publish_reach_the_upstream_broker_as_cloudevents() {
    let tmp = tempfile::tempdir().unwrap();
    let (_broker, upstream, d, mut sidecar) = mqtt_upstream(tmp.path(), "frames/gray");

    // One result: a single publish.
    let png = common::asset("chelsea.png");
    let one = d.post("/v1/pipelines/gray?camera=one", &png);
    assert_eq!(one.status, 200);
    wait_ids(&upstream, 30, &ids("gray/one", 1..=1), &d);

    // Twelve results queued while the sidecar is away: bulk publishes when it is back.
    sidecar.kill();
    let mut sent = BTreeMap::new();
    for i in 1..=12u64 {
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, i as u8 * 20]));
        let r = d.post("/v1/pipelines/gray?camera=bulk", &common::encode(&img.into(), image::ImageFormat::Png));
        assert_eq!(r.status, 200);
        sent.insert(format!("{}/gray/bulk/{i}", common::BOARD), r.body);
    }
    sidecar.restart();
    wait_ids(&upstream, 60, &ids("gray/bulk", 1..=12), &d);
    assert!(metric_sum(&d, "edgefn_dapr_requests_total{kind=\"bulk\"}") >= 1.0, "no bulk publish was made");

    sent.insert(format!("{}/gray/one/1", common::BOARD), one.body);
    for m in upstream.messages() {
        let id = m["id"].as_str().unwrap();
        assert_eq!(m["type"], "io.edgefn.result", "{m}");
        assert_eq!(m["source"], format!("edgefn/{}/gray", common::BOARD), "{m}");
        assert_eq!(m["datacontenttype"], "image/png", "{m}");
        assert_eq!(m["topic"], "frames/gray");
        assert_eq!(m["pubsubname"], "upstream");
        let data = B64.decode(m["data_base64"].as_str().expect("data_base64")).unwrap();
        assert_eq!(&data, &sent[id], "{id}: the PNG bytes changed on the way");
    }
}

#[test]
fn batches_over_daprd_body_limit_drain_and_a_result_that_never_fits_is_dead_lettered() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let upstream = Subscriber::start(&broker, "frames/echo");
    let port = common::free_port();
    // dapr.max_request above daprd's real 4 MiB: edgefn packs batches daprd refuses, and must
    // split them on daprd's own answer.
    let d = Daemon::start_in(&tmp.path().join("edgefn"), &sink_toml(port, "upstream", "max_request = \"12 MiB\""));
    for i in 0..30 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=cam", &common::noise(360 << 10, i)).status, 200);
    }
    assert_eq!(d.post("/v1/pipelines/echo?camera=huge", &common::noise(5 << 20, 99)).status, 200);
    for i in 30..34 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=cam", &common::noise(360 << 10, i)).status, 200);
    }
    let _sidecar = Daprd::start_on(
        &tmp.path().join("daprd"),
        port,
        d.addr.port(),
        &[("pubsub.yaml", daprd::mqtt3("upstream", broker.port))],
        &[],
    );
    wait_ids(&upstream, 120, &ids("echo/cam", 1..=34), &d);
    assert!(!ids_of(&upstream.messages()).contains(&format!("{}/echo/huge/1", common::BOARD)));
    // The broker has the last result a moment before its batch is settled.
    d.wait_metric("edgefn_outbox_dead_total{sink=\"dapr:upstream/frames/echo\"}", 10, |v| v == 1.0);
    let dead = d.get("/v1/outbox/dead").json();
    let dead = dead["dead"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["record"]["id"], format!("{}/echo/huge/1", common::BOARD));
    assert!(dead[0]["record"]["error"].as_str().unwrap().contains("stream too large"), "{dead:?}");
    assert!(d.log().contains("splitting the batch"), "daprd never refused a batch:\n{}", d.log());
}

#[test]
fn pubsub_redis_gets_every_result() {
    let tmp = tempfile::tempdir().unwrap();
    let redis = common::Redis::start(&tmp.path().join("redis"));
    let port = common::free_port();
    let d = Daemon::start_in(&tmp.path().join("edgefn"), &sink_toml(port, "upstream-redis", ""));
    let _sidecar = Daprd::start_on(
        &tmp.path().join("daprd"),
        port,
        d.addr.port(),
        &[("redis.yaml", daprd::redis("upstream-redis", redis.port))],
        &[],
    );
    for _ in 0..5 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=r", b"hello redis").status, 200);
    }
    // pubsub.redis writes each event to a Redis stream named after the topic.
    let until = Instant::now() + Duration::from_secs(30);
    let events: Vec<Value> = loop {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "--json", "XRANGE", "frames/echo", "-", "+"])
            .output()
            .unwrap();
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
        let events: Vec<Value> = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| {
                let fields = row[1].as_array()?;
                let i = fields.iter().position(|f| f == "data")?;
                serde_json::from_str(fields.get(i + 1)?.as_str()?).ok()
            })
            .collect();
        if events.len() >= 5 {
            break events;
        }
        assert!(Instant::now() < until, "redis stream has {} events:\n{}", events.len(), common::tail(&d.log(), 20));
        std::thread::sleep(Duration::from_millis(100));
    };
    let got: BTreeSet<String> = events.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, ids("echo/r", 1..=5));
    assert!(
        events.iter().all(|e| e["data"] == "hello redis"
            && e["datacontenttype"].as_str().is_some_and(|t| t.starts_with("text/plain"))),
        "{events:?}"
    );
}

/// The seed's flow and the app side, through a real daprd: service invocation and a
/// subscription, with every token set or none.
fn app_side(tokens: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let upstream = Subscriber::start(&broker, "frames/out");
    let port = common::free_port();
    let lib = common::litert_lib().display().to_string();
    let (dapr_token, app_token, bearer) = ("dapr-secret", "app-secret", "bearer-secret");
    let mut envs = vec![("EDGEFN__RUNTIME__LITERT", lib)];
    if tokens {
        envs.push(("DAPR_API_TOKEN", dapr_token.into()));
        envs.push(("APP_API_TOKEN", app_token.into()));
        envs.push(("EDGEFN__SERVER__TOKEN", bearer.into()));
    }
    let cfg = format!(
        r#"
[dapr]
url = "http://127.0.0.1:{port}"
startup_wait = "1s"

[models.efficientnet-lite0]
path = {:?}
threads = 2

[functions.classify]
dirs = {{ "/models" = {:?} }}
deadline = "30s"

[[pipeline]]
name = "cloud-gray"
source.dapr = {{ pubsub = "upstream", topic = "frames/in" }}
functions = ["grayscale"]
sinks = [{{ dapr = {{ pubsub = "upstream", topic = "frames/out" }} }}]
"#,
        common::assets_dir().join("efficientnet_lite0.tflite"),
        common::assets_dir()
    );
    let d = Daemon::start_env(&tmp.path().join("edgefn"), &cfg, &envs);
    let sidecar_envs: Vec<(&str, &str)> =
        if tokens { vec![("DAPR_API_TOKEN", dapr_token), ("APP_API_TOKEN", app_token)] } else { vec![] };
    let sidecar = Daprd::start_on(
        &tmp.path().join("daprd"),
        port,
        d.addr.port(),
        &[("pubsub.yaml", daprd::mqtt3("upstream", broker.port))],
        &sidecar_envs,
    );
    let call = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        let mut req = common::agent().post(&sidecar.url(path));
        if tokens {
            req = req.header("dapr-api-token", dapr_token);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = req.send(body).unwrap();
        (resp.status().as_u16(), resp.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap())
    };
    if tokens {
        assert_eq!(d.get("/v1/functions").status, 401, "the API is open without a token");
        let refused =
            common::agent().post(&sidecar.url("/v1.0/invoke/edgefn/method/api/image")).send(&b"x"[..]).unwrap();
        assert_eq!(refused.status().as_u16(), 401, "daprd took a call without DAPR_API_TOKEN");
    }

    // The seed's web page called the grayscale service through its sidecar.
    let png = common::asset("chelsea.png");
    let (status, gray) = call("/v1.0/invoke/edgefn/method/api/image", &[], &png);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&gray));
    common::assert_gray(&gray);
    let (status, sentence) = call("/v1.0/invoke/edgefn/method/api/hello", &[("api", "go")], &png);
    assert_eq!(status, 200);
    let sentence = String::from_utf8(sentence).unwrap();
    assert!(sentence.contains("tabby") || sentence.contains("Egyptian cat"), "{sentence}");
    let (status, label) = call("/v1.0/invoke/edgefn/method/v1/functions/classify", &[], &png);
    assert_eq!(status, 200);
    let label: Value = serde_json::from_slice(&label).unwrap();
    assert_eq!(label["label"], "Egyptian cat", "{label}");

    // A message published upstream reaches the pipeline; its result comes back upstream.
    let (status, body) = call(
        "/v1.0/publish/upstream/frames/in?metadata.cloudevent.subject=cloudcam",
        &[("content-type", "application/octet-stream")],
        &png,
    );
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&body));
    wait_ids(&upstream, 60, &ids("cloud-gray/cloudcam", 1..=1), &d);
    let result = upstream
        .messages()
        .into_iter()
        .find(|m| m["id"] == format!("{}/cloud-gray/cloudcam/1", common::BOARD).as_str())
        .unwrap();
    assert_eq!(B64.decode(result["data_base64"].as_str().unwrap()).unwrap(), gray, "the pipeline's result differs");
    assert!(!sidecar.log().contains("level=error") || !sidecar.log().contains("subscribe"), "{}", sidecar.log());
}

#[test]
fn service_invocation_and_subscriptions_through_daprd() {
    app_side(false);
}

#[test]
fn service_invocation_and_subscriptions_with_every_token_set() {
    app_side(true);
}

#[test]
fn a_sidecar_killed_for_a_minute_loses_nothing_and_ids_stay_unique() {
    let tmp = tempfile::tempdir().unwrap();
    let (_broker, upstream, d, mut sidecar) = mqtt_upstream(tmp.path(), "frames/echo");
    let mut n = 0u64;
    let mut post = |d: &Daemon| {
        n += 1;
        assert_eq!(d.post("/v1/pipelines/echo?camera=steady", format!("result {n}").as_bytes()).status, 200);
    };
    for _ in 0..10 {
        post(&d);
    }
    wait_ids(&upstream, 30, &ids("echo/steady", 1..=10), &d);
    sidecar.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(60) {
        post(&d);
        std::thread::sleep(Duration::from_millis(500));
    }
    let pending = d.get("/healthz").json()["outbox"]["pending"].as_u64().unwrap();
    assert!(pending > 100, "only {pending} results waited during the outage");
    sidecar.restart();
    for _ in 0..10 {
        post(&d);
    }
    let total = n;
    wait_ids(&upstream, 120, &ids("echo/steady", 1..=total), &d);
    // Unique ids: a redelivered result carries its own id and its own payload, never another's.
    for m in upstream.messages() {
        let seq: u64 = m["id"].as_str().unwrap().rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(m["data"], format!("result {seq}"), "{m}");
    }
    d.wait_metric("edgefn_outbox_depth{sink=\"dapr:upstream/frames/echo\"}", 30, |v| v == 0.0);
}

#[test]
fn a_pubsub_not_ready_is_retried_and_dead_letters_can_be_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let upstream = Subscriber::start(&broker, "frames/echo");
    let port = common::free_port();
    let d = Daemon::start_in(&tmp.path().join("edgefn"), &sink_toml(port, "upstream", ""));

    // daprd without its pub/sub component yet: it answers with a configuration error.
    let mut sidecar = Daprd::start_on(&tmp.path().join("daprd"), port, d.addr.port(), &[], &[]);
    for _ in 0..3 {
        assert_eq!(d.post("/v1/pipelines/echo?camera=early", b"early").status, 200);
    }
    d.wait_metric("edgefn_outbox_retried_total{sink=\"dapr:upstream/frames/echo\"}", 30, |v| v >= 3.0);
    assert!(d.log().contains("has no pub/sub `upstream`"), "{}", common::tail(&d.log(), 20));
    assert_eq!(
        d.get("/v1/outbox/dead").json()["dead"].as_array().unwrap().len(),
        0,
        "a config error was dead-lettered"
    );

    // The component appears, but scoped so edgefn may not publish to this topic: 403, dead.
    let scoped =
        daprd::mqtt3("upstream", broker.port) + "    - name: publishingScopes\n      value: \"edgefn=frames/other\"\n";
    std::fs::write(sidecar.dir.join("resources/pubsub.yaml"), &scoped).unwrap();
    sidecar.restart();
    d.wait_metric("edgefn_outbox_dead_total{sink=\"dapr:upstream/frames/echo\"}", 60, |v| v == 3.0);
    let dead = d.get("/v1/outbox/dead").json();
    assert!(dead.to_string().contains("ERR_PUBSUB_FORBIDDEN"), "{dead}");

    // Fixed, then replayed with the subcommand: every result goes out, with its own id.
    std::fs::write(sidecar.dir.join("resources/pubsub.yaml"), daprd::mqtt3("upstream", broker.port)).unwrap();
    sidecar.restart();
    let out = common::edgefn()
        .args(["--config", d.dir.join("edgefn.toml").to_str().unwrap(), "replay"])
        .env("EDGEFN__SERVER__LISTEN", d.addr.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed 3 dead letters"), "{out:?}");
    wait_ids(&upstream, 60, &ids("echo/early", 1..=3), &d);
    assert_eq!(d.get("/v1/outbox/dead").json()["dead"].as_array().unwrap().len(), 0);
    // The HTTP route does the same; nothing is left to replay.
    assert_eq!(d.post("/v1/outbox/dead/replay", b"").json()["replayed"], 0);
}

/// One request to a sidecar: (status, errorCode).
fn ask(port: u16, method: &str, path: &str, content_type: &str, body: &[u8], token: Option<&str>) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let agent = common::agent();
    let mut req = match method {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(t) = token {
                r = r.header("dapr-api-token", t);
            }
            let mut resp = r.call().unwrap();
            let body = resp.body_mut().read_to_vec().unwrap_or_default();
            let code =
                serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["errorCode"].as_str().map(str::to_string));
            return (resp.status().as_u16(), code.unwrap_or_default());
        }
        _ => agent.post(&url),
    };
    req = req.header("content-type", content_type);
    if let Some(t) = token {
        req = req.header("dapr-api-token", t);
    }
    match req.send(body) {
        Ok(mut resp) => {
            let body = resp.body_mut().read_to_vec().unwrap_or_default();
            let code =
                serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["errorCode"].as_str().map(str::to_string));
            (resp.status().as_u16(), code.unwrap_or_default())
        }
        Err(e) => (0, format!("transport: {e}")),
    }
}

#[test]
fn the_fake_sidecar_refuses_what_daprd_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let entry = |id: &str| json!({"entryId": id, "event": {"a": 1}, "contentType": "application/json"});
    let bulk = |entries: Vec<Value>| Value::Array(entries).to_string().into_bytes();
    let big = vec![b'x'; (4 << 20) + 1024];
    let big_bulk = bulk(vec![
        json!({"entryId": "1", "event": String::from_utf8(big.clone()).unwrap(), "contentType": "text/plain"}),
    ]);
    type Case = (&'static str, &'static str, String, &'static str, Vec<u8>);
    let cases: Vec<Case> = vec![
        ("publish", "POST", "/v1.0/publish/upstream/t".into(), "application/json", br#"{"a":1}"#.to_vec()),
        ("publish text", "POST", "/v1.0/publish/upstream/a/b".into(), "text/plain", b"hi".to_vec()),
        ("unknown pubsub", "POST", "/v1.0/publish/nope/t".into(), "application/json", b"{}".to_vec()),
        (
            "bad rawPayload",
            "POST",
            "/v1.0/publish/upstream/t?metadata.rawPayload=maybe".into(),
            "text/plain",
            b"x".to_vec(),
        ),
        ("publish over 4 MiB", "POST", "/v1.0/publish/upstream/t".into(), "text/plain", big.clone()),
        (
            "bulk stable",
            "POST",
            "/v1.0/publish/bulk/upstream/t".into(),
            "application/json",
            bulk(vec![entry("1"), entry("2")]),
        ),
        (
            "bulk alpha1",
            "POST",
            "/v1.0-alpha1/publish/bulk/upstream/t".into(),
            "application/json",
            bulk(vec![entry("1")]),
        ),
        (
            "bulk duplicate ids",
            "POST",
            "/v1.0/publish/bulk/upstream/t".into(),
            "application/json",
            bulk(vec![entry("1"), entry("1")]),
        ),
        ("bulk empty id", "POST", "/v1.0/publish/bulk/upstream/t".into(), "application/json", bulk(vec![entry("")])),
        ("bulk unknown pubsub", "POST", "/v1.0/publish/bulk/nope/t".into(), "application/json", bulk(vec![entry("1")])),
        ("bulk over 4 MiB", "POST", "/v1.0/publish/bulk/upstream/t".into(), "application/json", big_bulk),
        ("health", "GET", "/v1.0/healthz".into(), "", vec![]),
        ("outbound health", "GET", "/v1.0/healthz/outbound".into(), "", vec![]),
        ("metadata", "GET", "/v1.0/metadata".into(), "", vec![]),
    ];
    let app_port = common::free_port();
    let compare = |label: &str, daprd_port: u16, fake_port: u16, token: Option<&str>, cases: &[Case]| {
        let mut differ = Vec::new();
        for (name, method, path, ct, body) in cases {
            let real = ask(daprd_port, method, path, ct, body, token);
            let fake = ask(fake_port, method, path, ct, body, token);
            eprintln!("{label} {name}: daprd {real:?}, fake {fake:?}");
            if real != fake {
                differ.push(format!("{name}: daprd {real:?}, fake {fake:?}"));
            }
        }
        assert!(differ.is_empty(), "{label}: the fake answers differently from daprd:\n{}", differ.join("\n"));
    };

    let sidecar = Daprd::start_on(
        &tmp.path().join("a"),
        common::free_port(),
        app_port,
        &[("pubsub.yaml", daprd::mqtt3("upstream", broker.port))],
        &[],
    );
    let fake = FakeDapr::start(&["upstream"], None);
    compare("components", sidecar.http_port, fake.port, None, &cases);
    drop(sidecar);

    // No pub/sub at all.
    let sidecar = Daprd::start_on(&tmp.path().join("b"), common::free_port(), app_port, &[], &[]);
    let fake = FakeDapr::start(&[], None);
    compare("no components", sidecar.http_port, fake.port, None, &cases[..1]);
    drop(sidecar);

    // An API token: refused without it, served with it; health stays open.
    let sidecar = Daprd::start_on(
        &tmp.path().join("c"),
        common::free_port(),
        app_port,
        &[("pubsub.yaml", daprd::mqtt3("upstream", broker.port))],
        &[("DAPR_API_TOKEN", "tok")],
    );
    let fake = FakeDapr::start(&["upstream"], Some("tok"));
    compare("token, none sent", sidecar.http_port, fake.port, None, &[cases[0].clone(), cases[11].clone()]);
    compare("token sent", sidecar.http_port, fake.port, Some("tok"), &[cases[0].clone()]);
}
