//! Hostile functions are contained with the right error, and the next good call still works.
//! Runs the runtime in-process, so each limit is checked without HTTP in the way; the HTTP
//! mapping of the same errors is checked at the end against a real daemon.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, asset, runtime};
use edgefn::runtime::{InvokeError, Runtime};

const HOSTILE: &str = r#"
[functions.spin]
deadline = "1s"
[functions.membomb]
memory = "64 MiB"
[functions.flood]
max_output = "1 MiB"
[functions.printenv]
env = { GRANTED = "by-config" }
args = ["--mode", "test"]
"#;

async fn good_call_works(rt: &Runtime) {
    let out = rt.invoke("grayscale", asset("chelsea.png").into(), &[]).await.expect("good call after a hostile one");
    common::assert_gray(&out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostile_function_is_contained() {
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("EDGEFN_HOST_SECRET", "must-not-leak") };
    let (rt, _tmp) = runtime(HOSTILE);

    let started = Instant::now();
    let err = rt.invoke("spin", "".into(), &[]).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, InvokeError::DeadlineExceeded { .. }), "{err}");
    assert!(err.to_string().contains("deadline exceeded"));
    assert!(took >= Duration::from_millis(1000), "stopped early: {took:?}");
    assert!(took <= Duration::from_millis(1100), "stopped late: {took:?} > deadline + 10%");
    good_call_works(&rt).await;

    let err = rt.invoke("membomb", "".into(), &[]).await.unwrap_err();
    assert!(matches!(err, InvokeError::MemoryLimit { limit: 67108864, .. }), "{err}");
    assert!(err.to_string().contains("memory limit"));
    good_call_works(&rt).await;

    let err = rt.invoke("flood", "".into(), &[]).await.unwrap_err();
    assert!(matches!(err, InvokeError::OutputTooLarge { limit: 1048576, .. }), "{err}");
    assert!(err.to_string().contains("output too large"));
    good_call_works(&rt).await;

    let err = rt.invoke("trap", "".into(), &[]).await.unwrap_err();
    assert!(matches!(err, InvokeError::Trap { .. }), "{err}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    good_call_works(&rt).await;

    // No preopened directory: the host's files do not exist for the function.
    let err = rt.invoke("readfile", "".into(), &[]).await.unwrap_err();
    let InvokeError::Rejected { code: 2, reason, .. } = &err else { panic!("{err}") };
    assert!(reason.contains("denied"), "{reason}");
    good_call_works(&rt).await;

    // The environment and arguments are exactly what config grants, plus per-call variables.
    let out = rt.invoke("printenv", "".into(), &[("EDGEFN_CAMERA", "door")]).await.unwrap();
    let text = String::from_utf8(out.stdout.to_vec()).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    assert_eq!(lines, ["EDGEFN_CAMERA=door", "GRANTED=by-config", "arg:--mode", "arg:printenv", "arg:test"], "{text}");
    assert!(!text.contains("must-not-leak"));
    good_call_works(&rt).await;
}

#[tokio::test]
async fn a_granted_directory_is_readable_and_nothing_else() {
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("passwd"), "granted:x:1:1\n").unwrap();
    let extra = format!("[functions.readfile]\ndirs = {{ \"/etc\" = {:?} }}\n", secret.path());
    let (rt, _tmp) = runtime(&extra);
    let out = rt.invoke("readfile", "".into(), &[]).await.unwrap();
    assert_eq!(out.stdout, "LEAKED:granted:x:1:1\n", "it sees the granted file, not the host's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_is_a_distinct_error() {
    let (rt, _tmp) = runtime("[functions.spin]\ndeadline = \"1s\"\nmax_instances = 1\n");
    let rt = Arc::new(rt);
    let call = |delay: u64| {
        let rt = rt.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            rt.invoke("spin", "".into(), &[]).await.unwrap_err()
        })
    };
    // A holds the only slot for 1 s; B waits and takes it at ~1 s; C, still queued when its
    // own 1 s wait ends at ~1.1 s, gives up.
    let (a, b, c) = (call(0), call(100), call(100));
    let mut kinds = vec![a.await.unwrap().kind(), b.await.unwrap().kind(), c.await.unwrap().kind()];
    kinds.sort();
    assert_eq!(kinds, ["deadline", "deadline", "saturated"]);
}

#[test]
fn hostile_functions_map_to_http_statuses() {
    let mut d = Daemon::start(HOSTILE);
    for (name, status, kind) in [
        ("spin", 504, "deadline"),
        ("membomb", 500, "memory_limit"),
        ("flood", 500, "output_too_large"),
        ("trap", 500, "trap"),
        ("readfile", 422, "rejected"),
    ] {
        let resp = d.post(&format!("/v1/functions/{name}"), b"");
        assert_eq!(resp.status, status, "{name}: {}", String::from_utf8_lossy(&resp.body));
        let j = resp.json();
        assert_eq!(j["kind"], kind, "{name}");
        assert_eq!(j["function"], name);
        d.assert_alive();
        assert_eq!(d.post("/v1/functions/grayscale", &asset("chelsea.png")).status, 200);
    }
    let text = String::from_utf8(d.get("/metrics").body).unwrap();
    assert!(text.contains("edgefn_errors_total{function=\"spin\",kind=\"deadline\"} 1"), "{text}");
}
