//! The fleet channel against real parts: boards on one mosquitto broker and one
//! docker-registry, `edgefn fleet` driving waves over MQTT, deploy messages signed by edgefn
//! and by the real cosign (`sign-blob`), and every deploy message a board must refuse.
//!
//! [`Fleet`] is also the fleet simulation: `three_boards…` runs in the test command, and
//! `fleet_simulation` (ignored; `scripts/fleet-sim.sh` runs it) does the same with
//! `EDGEFN_SIM_BOARDS` boards, 20 by default, and prints the figures.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::registry::{Registry, tool_ok};
use common::{Daemon, edgefn, wasm};

const NO_PASSWORD: [(&str, &str); 1] = [("COSIGN_PASSWORD", "")];
const DEPLOY: &str = "edgefn/fleet/deploy";
const EVENTS: &str = "edgefn/fleet/events";

/// Boards, each with its own state dir, port, broker session and camera feed; one registry,
/// one broker as the channel, one operator key.
struct Fleet {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    registry: Registry,
    broker: Broker,
    boards: Vec<Daemon>,
    /// The operator's config: only the broker.
    cli: PathBuf,
}

impl Fleet {
    /// `n` boards serving v1 (echo) of `f`, released and signed first, on the MQTT channel.
    fn start(n: usize, gate: &str) -> (Fleet, String) {
        Fleet::start_on(n, gate, &format!("{{ mqtt = \"{DEPLOY}\" }}"))
    }

    /// The same with `channel` as `[fleet] channel`.
    fn start_on(n: usize, gate: &str, channel: &str) -> (Fleet, String) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let registry = Registry::start(&dir.join("registry"));
        let broker = Broker::start(&dir.join("broker"));
        tool_ok("cosign", &dir, &["generate-key-pair"], &NO_PASSWORD);
        let cli = dir.join("operator.toml");
        std::fs::write(&cli, format!("[mqtt]\nurl = {:?}\nclient_id = \"operator\"\n", broker.url())).unwrap();
        let mut fleet = Fleet { _tmp: tmp, dir, registry, broker, boards: Vec::new(), cli };
        let v1 = fleet.release(&wasm("echo"), "v1");
        // Only `f`, from the registry: nothing else to compile on twenty boards.
        let none = fleet.dir.join("no-functions");
        std::fs::create_dir_all(&none).unwrap();
        for i in 0..n {
            let config = fleet.config(i, gate, channel);
            let board = Daemon::start_with_functions(&fleet.dir.join(format!("b{i}")), &none, &config);
            fleet.boards.push(board);
        }
        (fleet, v1)
    }

    fn config(&self, i: usize, gate: &str, channel: &str) -> String {
        format!(
            r#"[board]
id = "b{i}"
labels = {{ site = "depot-3", row = "r{row}" }}

[mqtt]
url = {url:?}
client_id = "edgefn-b{i}"

[trust]
keys = [{key:?}]

[fleet]
{gate}
channel = {channel}
events = [{{ mqtt = {{ topic = "{EVENTS}" }} }}, {{ file = {{ path = {events:?} }} }}]

[functions.f]
image = {image:?}

[[pipeline]]
name = "p"
functions = ["f"]
sinks = [{{ file = {{ path = {results:?} }} }}]
"#,
            row = i % 2,
            url = self.broker.url(),
            key = self.dir.join("cosign.pub"),
            events = self.dir.join(format!("b{i}/events.jsonl")),
            image = self.registry.image("edge/f:v1"),
            results = self.dir.join(format!("b{i}/results.jsonl")),
        )
    }

    fn edgefn(&self, args: &[&str]) -> Output {
        edgefn().arg("--config").arg(&self.cli).args(args).envs(NO_PASSWORD).current_dir(&self.dir).output().unwrap()
    }

    /// Pushes and signs `module` at `tag`; the reference pinned by digest.
    fn release(&self, module: &Path, tag: &str) -> String {
        let image = self.registry.image(&format!("edge/f:{tag}"));
        let out = self.edgefn(&["push", module.to_str().unwrap(), &image]);
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
        let key = self.dir.join("cosign.key");
        let signed = self.edgefn(&["sign", &image, "--key", key.to_str().unwrap()]);
        assert!(signed.status.success(), "sign: {}", String::from_utf8_lossy(&signed.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// `edgefn fleet rollout f IMAGE` with `args`, against this broker.
    fn rollout(&self, image: &str, id: &str, args: &[&str]) -> Output {
        let key = self.dir.join("cosign.key");
        let mut all = vec!["fleet", "rollout", "f", image, "--rollout", id, "--key", key.to_str().unwrap()];
        all.extend_from_slice(&["--settle", "6s", "--wave-timeout", "2m"]);
        all.extend_from_slice(args);
        self.edgefn(&all)
    }
}

fn digest(pinned: &str) -> &str {
    pinned.rsplit_once('@').unwrap().1
}

fn function(board: &Daemon) -> serde_json::Value {
    let all = board.get("/v1/functions").json();
    all["functions"].as_array().unwrap().iter().find(|f| f["name"] == "f").cloned().unwrap_or_default()
}

/// Whether `board` serves `digest` for `f` in `state`, from one read: two reads could see the
/// old version committed and then the new one on trial.
fn serves(board: &Daemon, digest: &str, state: &str) -> bool {
    let f = function(board);
    f["digest"] == digest && f["state"] == state
}

/// Whether the board's store holds the manifest `digest` (it pulled that version).
fn stored(board: &Daemon, digest: &str) -> bool {
    board.dir.join("state/fleet/blobs/sha256").join(digest.trim_start_matches("sha256:")).exists()
}

/// Camera feeds: a thread per board posting frames through its pipeline until stopped; the
/// result id of every frame answered, and the count of each other answer.
struct Feeds {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(BTreeSet<String>, BTreeMap<String, u64>)>>,
}

impl Feeds {
    fn start(boards: &[Daemon]) -> Feeds {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = boards
            .iter()
            .map(|b| {
                let (stop, url) = (stop.clone(), b.url("/v1/pipelines/p?camera=cam"));
                std::thread::spawn(move || {
                    let (mut ids, mut other) = (BTreeSet::new(), BTreeMap::new());
                    let agent = common::agent();
                    while !stop.load(Ordering::Relaxed) {
                        match agent.post(&url).send(&b"frame"[..]) {
                            Ok(r) if r.status() == 200 => {
                                let id = r.headers().get("x-edgefn-id").unwrap().to_str().unwrap().to_string();
                                assert!(ids.insert(id), "a result id came twice");
                            }
                            Ok(r) => *other.entry(format!("status {}", r.status().as_u16())).or_default() += 1,
                            Err(e) => *other.entry(e.to_string()).or_default() += 1,
                        }
                        std::thread::sleep(Duration::from_millis(40));
                    }
                    (ids, other)
                })
            })
            .collect();
        Feeds { stop, threads }
    }

    fn stop(self) -> Vec<(BTreeSet<String>, BTreeMap<String, u64>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().map(|t| t.join().unwrap()).collect()
    }
}

/// The ids in a file sink's JSON lines.
fn ids_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect()
}

/// Records when each board first serves `digest`, until all do or `secs` pass.
fn watch_convergence(boards: &[Daemon], digest: &str, secs: u64) -> Arc<Mutex<BTreeMap<usize, Instant>>> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let urls: Vec<String> = boards.iter().map(|b| b.url("/v1/functions")).collect();
    let (s, digest) = (seen.clone(), digest.to_string());
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(secs);
        let agent = common::agent();
        while Instant::now() < until && s.lock().unwrap().len() < urls.len() {
            for (i, url) in urls.iter().enumerate() {
                let Ok(mut r) = agent.get(url).call() else { continue };
                let text = r.body_mut().read_to_string().unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let serving = v["functions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|f| f["name"] == "f" && f["digest"] == digest.as_str());
                if serving {
                    s.lock().unwrap().entry(i).or_insert_with(Instant::now);
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    seen
}

/// A rollout id whose `percent` % wave holds exactly `want` of these boards.
fn rollout_id_with_wave(n: usize, percent: f64, want: usize) -> String {
    (0..10_000)
        .map(|k| format!("bad-{k}"))
        .find(|id| (0..n).filter(|i| edgefn::fleet::channel::in_wave(&format!("b{i}"), id, percent)).count() == want)
        .unwrap()
}

/// What a simulation measured.
struct Figures {
    convergence: Vec<Duration>,
    rollback: Duration,
    frames_in: usize,
    results_out: usize,
    faults: u64,
}

/// The simulation: a good version to every board in waves, then a bad one (it traps on half
/// its calls) at 10 %, with frames flowing throughout.
fn simulate(n: usize) -> Figures {
    let gate = "gate_calls = 40\ngate_min_calls = 10\ngate_time = \"30s\"";
    let (fleet, _v1) = Fleet::start(n, gate);
    let feeds = Feeds::start(&fleet.boards);

    // A good version, from the push on, in waves of 10, 50 and 100 %.
    let t0 = Instant::now();
    let v2 = fleet.release(&wasm("printenv"), "v2");
    let seen = watch_convergence(&fleet.boards, digest(&v2), 300);
    eprintln!("released in {:?}", t0.elapsed());
    let out = fleet.rollout(&v2, "good", &["--waves", "10,50,100"]);
    eprintln!("rolled out in {:?}", t0.elapsed());
    assert!(out.status.success(), "good rollout: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), n, "boards serving v2: {seen:?}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut convergence: Vec<Duration> = seen.values().map(|t| *t - t0).collect();
    convergence.sort();
    assert_eq!(report["boards"].as_object().unwrap().len(), n, "{report}");
    assert!(report["boards"].as_object().unwrap().values().all(|o| o == "committed"), "{report}");

    // A bad version at 10 %: its boards roll back by themselves, the operator stops, and the
    // others never pull it.
    let id = rollout_id_with_wave(n, 10.0, n.div_ceil(10).max(1));
    let bad = fleet.release(&wasm("flaky"), "bad");
    let t1 = Instant::now();
    let out = fleet.rollout(&bad, &id, &["--waves", "10,50,100", "--max-failed", "20"]);
    let rollback = t1.elapsed();
    assert_eq!(out.status.code(), Some(3), "the bad rollout was not stopped: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopped at 10 %") && stderr.contains("rollback ordered"), "{stderr}");
    let in_wave: Vec<usize> = (0..n).filter(|i| edgefn::fleet::channel::in_wave(&format!("b{i}"), &id, 10.0)).collect();
    for (i, b) in fleet.boards.iter().enumerate() {
        let f = function(b);
        assert_eq!(f["digest"], digest(&v2), "board b{i} serves v2 after the stopped rollout: {f}");
        if in_wave.contains(&i) {
            assert!(f["rolled_back"].as_array().unwrap().iter().any(|d| d == digest(&bad)), "b{i}: {f}");
            assert!(b.log().contains("rolled back:"), "b{i}");
        } else {
            assert!(!stored(b, digest(&bad)), "board b{i}, outside the wave, pulled the bad version");
            assert!(b.log().contains("not in this wave"), "b{i}:\n{}", b.log());
        }
    }

    // Every frame answered is in its board's results, once; the rest met the bad version.
    std::thread::sleep(Duration::from_millis(300));
    let fed = feeds.stop();
    let (mut frames_in, mut results_out, mut faults) = (0, 0, 0);
    for (i, ((ids, other), b)) in fed.iter().zip(&fleet.boards).enumerate() {
        let path = b.dir.join("results.jsonl");
        let until = Instant::now() + Duration::from_secs(20);
        while ids_in(&path).len() < ids.len() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let written = ids_in(&path);
        assert_eq!(written.len(), written.iter().collect::<BTreeSet<_>>().len(), "b{i}: a result was written twice");
        assert_eq!(written.into_iter().collect::<BTreeSet<_>>(), *ids, "b{i}: results written ≠ frames answered");
        let bad_answers: u64 = other.iter().filter(|(k, _)| k.as_str() == "status 500").map(|(_, v)| v).sum();
        assert_eq!(other.values().sum::<u64>(), bad_answers, "b{i}: answers that were neither: {other:?}");
        assert!(bad_answers == 0 || in_wave.contains(&i), "b{i} outside the wave met the bad version");
        frames_in += ids.len() + bad_answers as usize;
        results_out += ids.len();
        faults += bad_answers;
    }

    // Each board reported its steps upstream, naming itself and its labels.
    for (i, b) in fleet.boards.iter().enumerate() {
        let text = std::fs::read_to_string(b.dir.join("events.jsonl")).unwrap_or_default();
        let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let committed = events.iter().find(|e| e["data"]["outcome"] == "committed" && e["data"]["rollout"] == "good");
        let e = committed.unwrap_or_else(|| panic!("b{i} reported no commit: {text}"));
        assert_eq!(
            (e["type"].as_str(), e["source"].as_str()),
            (Some("io.edgefn.deployment"), Some(&*format!("edgefn/b{i}")))
        );
        assert_eq!(e["data"]["labels"]["site"], "depot-3");
    }
    Figures { convergence, rollback, frames_in, results_out, faults }
}

#[test]
fn three_boards_take_a_rollout_in_waves_and_a_bad_one_stops_at_its_wave() {
    let f = simulate(3);
    eprintln!(
        "3 boards: converged in {:?} (median) / {:?} (max); bad rollout stopped in {:?}; {} frames in, {} results out, {} met the bad version",
        f.convergence[f.convergence.len() / 2],
        f.convergence.last().unwrap(),
        f.rollback,
        f.frames_in,
        f.results_out,
        f.faults
    );
    assert!(f.frames_in > 100 && f.results_out + f.faults as usize == f.frames_in);
}

/// The fleet simulation (`scripts/fleet-sim.sh`): `EDGEFN_SIM_BOARDS` boards, 20 by default.
#[test]
#[ignore = "a bench: scripts/fleet-sim.sh runs it"]
fn fleet_simulation() {
    let n = std::env::var("EDGEFN_SIM_BOARDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let f = simulate(n);
    let ms = |d: &Duration| d.as_millis();
    println!(
        "{{\"boards\": {n}, \"convergence_median_ms\": {}, \"convergence_max_ms\": {}, \"bad_rollout_stopped_ms\": {}, \"frames_in\": {}, \"results_out\": {}, \"frames_on_bad_version\": {}}}",
        ms(&f.convergence[f.convergence.len() / 2]),
        ms(f.convergence.last().unwrap()),
        ms(&f.rollback),
        f.frames_in,
        f.results_out,
        f.faults
    );
}

/// Publishes `envelope` as it is (what an attacker on the broker could send).
fn publish_raw(fleet: &Fleet, envelope: &[u8]) {
    fleet.broker.publish_raw(DEPLOY, &["-s"], Some(envelope));
}

#[test]
fn messages_signed_by_cosign_are_taken_and_replayed_expired_tampered_or_unsigned_ones_change_nothing() {
    let gate = "gate_calls = 20\ngate_min_calls = 10\ngate_time = \"2s\"";
    let (fleet, v1) = Fleet::start(1, gate);
    let board = &fleet.boards[0];
    let v2 = fleet.release(&wasm("printenv"), "v2");
    let v3 = fleet.release(&wasm("echo"), "v2-echo");
    let _ = v3;

    // A message written by edgefn, signed by the real cosign, published by edgefn.
    let message = |args: &[&str]| {
        let mut all = vec!["fleet", "message", "f"];
        all.extend_from_slice(args);
        let out = fleet.edgefn(&all);
        assert!(out.status.success(), "fleet message: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let m1 = message(&[&v2, "--rollout", "r1"]);
    std::fs::write(fleet.dir.join("m1.json"), &m1).unwrap();
    tool_ok(
        "cosign",
        &fleet.dir,
        &["sign-blob", "--key", "cosign.key", "--tlog-upload=false", "--output-signature", "m1.sig", "-y", "m1.json"],
        &NO_PASSWORD,
    );
    let out = fleet.edgefn(&["fleet", "publish", "m1.json", "--signature", "m1.sig"]);
    assert!(out.status.success(), "fleet publish: {}", String::from_utf8_lossy(&out.stderr));
    let until = Instant::now() + Duration::from_secs(30);
    while !serves(board, digest(&v2), "committed") {
        assert!(Instant::now() < until, "v2 not committed: {}\n{}", function(board), board.log());
        let _ = board.post("/v1/functions/f", b"ping");
    }
    let serving = function(board);
    // The page reads the same version from /v1/status.
    let status = board.get("/v1/status").json();
    let shown = status["functions"].as_array().unwrap().iter().find(|f| f["name"] == "f").unwrap()["version"].clone();
    assert_eq!((shown["digest"].as_str(), shown["state"].as_str()), (Some(digest(&v2)), Some("committed")), "{shown}");
    assert_eq!(shown["rollout"], "r1");
    let deployments = |b: &Daemon| {
        String::from_utf8_lossy(&b.get("/metrics").body)
            .lines()
            .filter(|l| l.starts_with("edgefn_deployments_total{"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let counted = deployments(board);
    let sig1 = std::fs::read_to_string(fleet.dir.join("m1.sig")).unwrap();
    let envelope = |m: &[u8], sig: &str| serde_json::to_vec(&edgefn::fleet::channel::Signed::new(m, sig)).unwrap();
    let sign = |m: &[u8], key: &str| {
        let p = fleet.dir.join("tmp-message");
        std::fs::write(&p, m).unwrap();
        tool_ok(
            "cosign",
            &fleet.dir,
            &["sign-blob", "--key", key, "--tlog-upload=false", "-y", "tmp-message"],
            &NO_PASSWORD,
        )
    };

    // A newer message moves the board's sequence on; the old one, sent again, is a replay.
    let m2 = message(&[&v2, "--rollout", "r2", "--percent", "0"]);
    publish_raw(&fleet, &envelope(&m2, &sign(&m2, "cosign.key")));
    board.wait_log("not in this wave", 1, 20);
    publish_raw(&fleet, &envelope(&m1, &sig1));
    board.wait_log("deploy message refused: replayed", 1, 20);

    // Expired: valid for a second, sent after two.
    let m3 = message(&[&v1, "--rollout", "r3", "--expires", "1s"]);
    let s3 = sign(&m3, "cosign.key");
    std::thread::sleep(Duration::from_secs(2));
    publish_raw(&fleet, &envelope(&m3, &s3));
    board.wait_log("deploy message refused: expired", 1, 20);

    // Tampered: a fresh message's signature over other bytes (the image swapped for v1).
    let m4 = message(&[&v2, "--rollout", "r4"]);
    let s4 = sign(&m4, "cosign.key");
    let swapped = String::from_utf8(m4.clone()).unwrap().replace(digest(&v2), digest(&v1));
    publish_raw(&fleet, &envelope(swapped.as_bytes(), &s4));
    board.wait_log("deploy message refused: bad signature", 1, 20);

    // Unsigned, and signed by a key the board does not trust.
    let m5 = message(&[&v1, "--rollout", "r5"]);
    publish_raw(&fleet, &envelope(&m5, ""));
    board.wait_log("deploy message refused: unsigned", 1, 20);
    tool_ok("cosign", &fleet.dir, &["generate-key-pair", "--output-key-prefix", "other"], &NO_PASSWORD);
    publish_raw(&fleet, &envelope(&m5, &sign(&m5, "other.key")));
    board.wait_log("deploy message refused: bad signature", 2, 20);
    publish_raw(&fleet, b"{\"image\": \"oci://evil/x:latest\"}");
    board.wait_log("deploy message refused: not a signed deploy message", 1, 20);

    // None of them changed what serves, or counted a deployment.
    std::thread::sleep(Duration::from_millis(500));
    let now = function(board);
    assert_eq!(
        (now["digest"].as_str(), now["state"].as_str()),
        (serving["digest"].as_str(), Some("committed")),
        "{now}"
    );
    assert_eq!(deployments(board), counted);
    assert!(
        !board.log().contains("rollout taken") || board.log().matches("rollout taken").count() == 1,
        "{}",
        board.log()
    );

    // An ordered rollback of r1 takes the board back to v1, which it still has.
    let back = message(&[&v2, "--rollout", "r1", "--rollback"]);
    publish_raw(&fleet, &envelope(&back, &sign(&back, "cosign.key")));
    board.wait_log("rollout undone", 1, 20);
    let f = function(board);
    assert_eq!(f["digest"], digest(&v1), "{f}");
    assert!(f["rolled_back"].as_array().unwrap().iter().any(|d| d == digest(&v2)), "{f}");
    assert_eq!(board.post("/v1/functions/f", b"ping").body, b"ping", "v1 (echo) serves again");
}

#[test]
fn a_deploy_message_through_daprd_reaches_a_board_subscribed_by_its_sidecar() {
    let tmp = tempfile::tempdir().unwrap();
    let redis = common::Redis::start(&tmp.path().join("redis"));
    let channel = r#"{ dapr = { pubsub = "fleet", topic = "deploy" } }"#;
    let (fleet, _v1) = Fleet::start_on(1, "gate_time = \"1s\"", channel);
    let board = &fleet.boards[0];
    let subscribed = board.get("/dapr/subscribe").json();
    assert!(
        subscribed.as_array().unwrap().iter().any(|s| s["route"] == "/v1/dapr/fleet" && s["topic"] == "deploy"),
        "{subscribed}"
    );
    let port = common::free_port();
    let sidecar = common::daprd::Daprd::start_on(
        &tmp.path().join("daprd"),
        port,
        board.addr.port(),
        &[("fleet.yaml", common::daprd::redis("fleet", redis.port))],
        &[],
    );
    let v2 = fleet.release(&wasm("printenv"), "v2");
    let out = fleet.edgefn(&["fleet", "message", "f", &v2, "--rollout", "through-dapr"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(fleet.dir.join("m.json"), &out.stdout).unwrap();
    let dapr = format!("http://127.0.0.1:{port}");
    let publish = |file: &str, key: &str| {
        let key = fleet.dir.join(key);
        fleet.edgefn(&[
            "fleet",
            "publish",
            file,
            "--key",
            key.to_str().unwrap(),
            "--dapr",
            &dapr,
            "--pubsub",
            "fleet",
            "--topic",
            "deploy",
        ])
    };
    let out = publish("m.json", "cosign.key");
    assert!(out.status.success(), "publish through daprd: {}", String::from_utf8_lossy(&out.stderr));
    let until = Instant::now() + Duration::from_secs(60);
    while !serves(board, digest(&v2), "committed") {
        assert!(
            Instant::now() < until,
            "v2 never served: {}\n{}\n{}",
            function(board),
            board.log(),
            common::tail(&sidecar.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(board.log().contains("channel=\"dapr\"") || board.log().contains("channel=dapr"), "{}", board.log());
    // The same message signed by a key the board does not trust: refused, through daprd too.
    tool_ok("cosign", &fleet.dir, &["generate-key-pair", "--output-key-prefix", "other"], &NO_PASSWORD);
    let out = fleet.edgefn(&["fleet", "message", "f", &v2, "--rollout", "through-dapr-2"]);
    std::fs::write(fleet.dir.join("m2.json"), &out.stdout).unwrap();
    assert!(publish("m2.json", "other.key").status.success());
    board.wait_log("deploy message refused: bad signature", 1, 20);
}
