//! Rollouts on one board, against a real registry: a version switched in on trial under
//! load, committed by its gate or rolled back by itself, and the board's record across a
//! restart and a crash.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::registry::Registry;
use common::{Daemon, edgefn, wasm};

struct Board {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    registry: Registry,
    cli: PathBuf,
}

impl Board {
    fn new() -> Board {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let registry = Registry::start(&dir.join("registry"));
        for args in [
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ops.key"][..],
            &["ec", "-in", "ops.key", "-pubout", "-out", "ops.pub"][..],
        ] {
            assert!(std::process::Command::new("openssl").args(args).current_dir(&dir).status().unwrap().success());
        }
        let cli = dir.join("cli.toml");
        std::fs::write(&cli, "").unwrap();
        Board { _tmp: tmp, dir, registry, cli }
    }

    /// Pushes and signs `module` at `tag`; its manifest digest.
    fn release(&self, module: &Path, tag: &str) -> String {
        let image = self.registry.image(&format!("edge/f:{tag}"));
        let out =
            edgefn().arg("--config").arg(&self.cli).args(["push", module.to_str().unwrap(), &image]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let key = self.dir.join("ops.key");
        let signed = edgefn()
            .arg("--config")
            .arg(&self.cli)
            .args(["sign", &image, "--key", key.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
        String::from_utf8(out.stdout).unwrap().trim().rsplit_once('@').unwrap().1.to_string()
    }

    fn config(&self, gate: &str) -> String {
        format!(
            "[trust]\nkeys = [{:?}]\n\n[fleet]\n{gate}\n\n[functions.f]\nimage = {:?}\n",
            self.dir.join("ops.pub"),
            self.registry.image("edge/f:v1")
        )
    }
}

/// `edgefn deploy f IMAGE` against `daemon`.
fn deploy(daemon: &Daemon, image: &str) -> std::process::Output {
    edgefn()
        .arg("--config")
        .arg(daemon.dir.join("edgefn.toml"))
        .env("EDGEFN__SERVER__LISTEN", daemon.addr.to_string())
        .args(["deploy", "f", image])
        .output()
        .unwrap()
}

fn function(daemon: &Daemon) -> serde_json::Value {
    let all = daemon.get("/v1/functions").json();
    all["functions"].as_array().unwrap().iter().find(|f| f["name"] == "f").cloned().unwrap_or_default()
}

/// Clients calling `f` until stopped: every call must be answered, by one version or another.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(daemon: &Daemon, clients: usize) -> Load {
        let (stop, ok, faults) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, faults, url) = (stop.clone(), ok.clone(), faults.clone(), daemon.url("/v1/functions/f"));
                std::thread::spawn(move || {
                    let mut odd = Vec::new();
                    let agent = common::agent();
                    while !stop.load(Ordering::Relaxed) {
                        match agent.post(&url).send(&b"ping"[..]) {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(r) if r.status() == 500 => faults.fetch_add(1, Ordering::Relaxed),
                            Ok(r) => {
                                odd.push(format!("status {}", r.status()));
                                0
                            }
                            Err(e) => {
                                odd.push(e.to_string());
                                0
                            }
                        };
                    }
                    odd
                })
            })
            .collect();
        Load { stop, ok, faults, threads }
    }

    /// Stops; every answer that was neither a result nor the bad version's fault.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    }
}

fn wait_for(daemon: &Daemon, what: &str, secs: u64, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let f = function(daemon);
        if pred(&f) {
            return f;
        }
        assert!(std::time::Instant::now() < until, "{what}: {f}\n{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_good_version_is_committed_and_one_that_traps_rolls_back_by_itself_under_load() {
    let board = Board::new();
    let v1 = board.release(&wasm("echo"), "v1");
    let v2 = board.release(&wasm("printenv"), "v2");
    let v3 = board.release(&wasm("trap"), "v3");
    let dir = board.dir.join("daemon");
    let mut daemon = Daemon::start_in(&dir, &board.config("gate_calls = 40"));
    assert_eq!(daemon.post("/v1/functions/f", b"ping").body, b"ping", "v1 is echo");

    let load = Load::start(&daemon, 2);
    let out = deploy(&daemon, &board.registry.image("edge/f:v2"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let f = wait_for(&daemon, "v2 committed", 60, |f| f["state"] == "committed" && f["digest"] == v2.as_str());
    assert_eq!(f["last_rollout"], "committed");

    let faults_before = load.faults.load(Ordering::Relaxed);
    let out = deploy(&daemon, &board.registry.image("edge/f:v3"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let f = wait_for(&daemon, "v3 rolled back", 60, |f| {
        f["rolled_back"].as_array().is_some_and(|r| r.iter().any(|d| d == v3.as_str()))
    });
    assert_eq!((f["state"].as_str(), f["digest"].as_str()), (Some("committed"), Some(v2.as_str())), "{f}");
    assert!(f["last_rollout"].as_str().unwrap().starts_with("rolled_back"), "{f}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (ok, faults) = (load.ok.load(Ordering::Relaxed), load.faults.load(Ordering::Relaxed) - faults_before);
    let odd = load.stop();
    assert!(odd.is_empty(), "calls not answered by a version: {odd:?}");
    assert!(faults >= 10 && faults < 50, "{faults} calls met the trapping version before it rolled back");
    assert!(ok > 100, "{ok} calls");
    eprintln!("rollout: {ok} calls answered, {faults} met v3 before its rollback");
    assert_eq!(daemon.post("/v1/functions/f", b"ping").status, 200);
    assert_ne!(daemon.post("/v1/functions/f", b"ping").body, b"ping", "v2 (printenv) serves again, not v1");
    let m = daemon.get("/metrics").body;
    let m = String::from_utf8_lossy(&m);
    for outcome in ["committed", "rolled_back"] {
        assert!(m.contains(&format!("edgefn_deployments_total{{function=\"f\",outcome=\"{outcome}\"}} 1")), "{m}");
    }
    let serving =
        format!("edgefn_function_version_info{{function=\"f\",sha256=\"{}\"}} 1", f["sha256"].as_str().unwrap());
    assert!(m.contains(&serving) && m.matches("edgefn_function_version_info{function=\"f\"").count() == 1, "{m}");
    daemon.stop();

    // A restart starts on the committed version, not the configured tag.
    let mut daemon = Daemon::start_in(&dir, &board.config("gate_calls = 40"));
    assert_ne!(daemon.post("/v1/functions/f", b"ping").body, b"ping", "started on v1, not the committed v2");
    assert_eq!(function(&daemon)["digest"], v2.as_str());
    let _ = v1;
    daemon.stop();
}

#[test]
fn a_crash_on_trial_counts_against_the_version_and_a_refused_one_is_never_switched_in() {
    let board = Board::new();
    board.release(&wasm("echo"), "v1");
    let v2 = board.release(&wasm("printenv"), "v2");
    let dir = board.dir.join("daemon");
    let gate = "gate_calls = 100000\ngate_min_calls = 100000\ngate_time = \"1h\"";
    let mut daemon = Daemon::start_in(&dir, &board.config(gate));

    // Unsigned: refused, and v1 keeps serving.
    let unsigned = board.registry.image("edge/f:unsigned");
    let out = edgefn()
        .arg("--config")
        .arg(&board.cli)
        .args(["push", wasm("trap").to_str().unwrap(), &unsigned])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = deploy(&daemon, &unsigned);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not signed"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(daemon.post("/v1/functions/f", b"ping").body, b"ping");

    // On trial, then SIGKILL: the next start serves v1 and counts v2 as rolled back.
    let out = deploy(&daemon, &board.registry.image("edge/f:v2"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(function(&daemon)["state"], "trial");
    assert_ne!(daemon.post("/v1/functions/f", b"ping").body, b"ping", "v2 serves on trial");
    daemon.kill();
    let mut daemon = Daemon::start_in(&dir, &board.config(gate));
    assert_eq!(daemon.post("/v1/functions/f", b"ping").body, b"ping", "v1 again after the crash");
    let f = function(&daemon);
    assert!(f["rolled_back"].as_array().unwrap().iter().any(|d| d == v2.as_str()), "{f}");
    assert!(daemon.log().contains("stopped while this version was on trial"), "{}", daemon.log());
    daemon.stop();
}

#[test]
fn a_polled_tag_that_moves_is_deployed_and_a_digest_rolled_back_is_not_tried_again() {
    let board = Board::new();
    board.release(&wasm("echo"), "v1");
    let dir = board.dir.join("daemon");
    let mut daemon = Daemon::start_in(&dir, &board.config("poll = \"1s\"\ngate_calls = 20\ngate_min_calls = 10"));
    let load = Load::start(&daemon, 1);
    // The tag moves to a good version: deployed on trial, then committed.
    let v2 = board.release(&wasm("printenv"), "v1");
    wait_for(&daemon, "the moved tag committed", 60, |f| f["state"] == "committed" && f["digest"] == v2.as_str());
    // It moves again, to a version that traps: rolled back, and left alone at every poll since.
    let v3 = board.release(&wasm("trap"), "v1");
    wait_for(&daemon, "v3 rolled back", 60, |f| {
        f["rolled_back"].as_array().is_some_and(|r| r.iter().any(|d| d == v3.as_str()))
    });
    let started = daemon.metric("edgefn_deployments_total{function=\"f\",outcome=\"started\"}");
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(daemon.metric("edgefn_deployments_total{function=\"f\",outcome=\"started\"}"), started);
    assert_eq!(started, 2.0, "v2 and v3, once each");
    let f = function(&daemon);
    assert_eq!((f["digest"].as_str(), f["state"].as_str()), (Some(v2.as_str()), Some("committed")), "{f}");
    assert!(load.stop().is_empty());
    assert!(daemon.log().contains("tag poll: a new version"), "{}", daemon.log());
    daemon.stop();
}
