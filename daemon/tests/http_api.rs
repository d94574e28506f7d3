//! The HTTP API end to end against a real `edgefn run`: a photo round trip, the seed routes,
//! bad input with its documented statuses, listing, health and metrics.

mod common;

use common::{Daemon, agent, assert_gray, asset, camera_jpeg};
use std::io::Write;
use std::process::Stdio;

#[test]
fn photo_round_trip_is_gray_and_same_everywhere() {
    let d = Daemon::start("");
    let chelsea = asset("chelsea.png");
    let original = image::load_from_memory(&chelsea).unwrap();

    let resp = d.post("/v1/functions/grayscale", &chelsea);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.content_type, "image/png");
    let gray = assert_gray(&resp.body);
    assert_eq!(gray.dimensions(), (original.width(), original.height()));
    // Not a blank: the cat's picture has a spread of gray levels.
    let levels: std::collections::BTreeSet<u8> = gray.pixels().map(|p| p[0]).collect();
    assert!(levels.len() > 100, "only {} gray levels", levels.len());

    // The seed route gives the same bytes.
    let seed = d.post("/api/image", &chelsea);
    assert_eq!(seed.status, 200);
    assert_eq!(seed.body, resp.body);
    let hello = d.post_with("/api/hello", ("api", "rust"), &chelsea);
    assert_eq!(hello.body, resp.body);

    // `edgefn invoke` gives the same bytes too.
    let mut child = common::edgefn()
        .args(["--config", d.dir.join("edgefn.toml").to_str().unwrap(), "invoke", "grayscale"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&chelsea).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, resp.body);
}

#[test]
fn gif_in_gives_gif_out() {
    let d = Daemon::start("");
    let img = image::load_from_memory(&asset("coffee.png")).unwrap().thumbnail(64, 64);
    let gif = common::encode(&img, image::ImageFormat::Gif);
    let resp = d.post("/v1/functions/grayscale", &gif);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.content_type, "image/gif");
    assert_gray(&resp.body);
}

#[test]
fn classify_without_models_says_what_to_configure() {
    let d = Daemon::start("");
    let resp = d.post_with("/api/hello", ("api", "go"), &asset("chelsea.png"));
    assert_eq!(resp.status, 503);
    let j = resp.json();
    assert_eq!(j["function"], "classify");
    assert!(j["error"].as_str().unwrap().contains("no [models] are configured"), "{j}");
}

#[test]
fn bad_input_gets_its_status_and_json_error() {
    let mut d = Daemon::start("");
    let jpeg = camera_jpeg();
    let mut random = vec![0u8; 4096];
    let mut x: u32 = 0x9e3779b9;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("empty body", vec![], 422, "rejected"),
        ("truncated JPEG", jpeg[..jpeg.len() / 3].to_vec(), 422, "rejected"),
        ("random bytes", random, 422, "rejected"),
    ];
    for (what, body, status, kind) in cases {
        let resp = d.post("/v1/functions/grayscale", &body);
        assert_eq!(resp.status, status, "{what}: {}", String::from_utf8_lossy(&resp.body));
        let j = resp.json();
        assert_eq!(j["kind"], kind, "{what}");
        assert_eq!(j["function"], "grayscale", "{what}");
        assert!(j["error"].as_str().unwrap().contains("grayscale"), "{what}: {j}");
        d.assert_alive();
    }

    // Over the 16 MiB default, declared up front...
    let big = vec![0u8; 16 * 1024 * 1024 + 1];
    let resp = d.post("/v1/functions/grayscale", &big);
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["kind"], "body_too_large");
    // ...and streamed chunked, with no Content-Length to go on.
    let resp = agent()
        .post(&d.url("/v1/functions/grayscale"))
        .send(ureq::SendBody::from_reader(&mut std::io::Cursor::new(big)))
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);

    let resp = d.post("/v1/functions/nosuch", b"x");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.json()["function"], "nosuch");

    let resp = d.get("/v1/nothing-here");
    assert_eq!(resp.status, 404);
    resp.json();

    // Still serving real work.
    d.assert_alive();
    let ok = d.post("/v1/functions/grayscale", &jpeg);
    assert_eq!(ok.status, 200);
    assert_gray(&ok.body);
}

#[test]
fn listing_health_and_metrics() {
    let d = Daemon::start("[functions.grayscale]\ndeadline = \"3s\"\nmax_instances = 2\n");
    d.post("/v1/functions/grayscale", &asset("chelsea.png"));
    d.post("/v1/functions/grayscale", b"not an image");

    let list = d.get("/v1/functions").json();
    let gray = list["functions"].as_array().unwrap().iter().find(|f| f["name"] == "grayscale").unwrap();
    assert_eq!(gray["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(gray["limits"]["deadline_ms"], 3000);
    assert_eq!(gray["limits"]["max_instances"], 2);
    assert_eq!(gray["invocations"], 2);
    assert_eq!(gray["errors"], 1);

    let health = d.get("/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");

    let metrics = d.get("/metrics");
    assert!(metrics.content_type.contains("openmetrics"));
    assert_eq!(d.metric("edgefn_invocations_total{function=\"grayscale\"}"), 2.0);
    assert_eq!(d.metric("edgefn_errors_total{function=\"grayscale\",kind=\"rejected\"}"), 1.0);
    assert_eq!(d.metric("edgefn_invocation_duration_seconds_count{function=\"grayscale\"}"), 2.0);
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.contains("edgefn_invocation_duration_seconds_bucket{le=\""), "{text}");
}

#[test]
fn listens_on_loopback_by_default_and_stops_on_sigterm() {
    let out = common::edgefn().args(["--config", "/nonexistent/edgefn.toml", "check-config"]).output().unwrap();
    assert!(!out.status.success(), "an explicit missing config is an error");

    let tmp = tempfile::tempdir().unwrap();
    let out = common::edgefn().current_dir(tmp.path()).arg("check-config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:8080\""), "{text}");

    let mut d = Daemon::start("");
    let status = d.stop();
    assert!(status.success(), "SIGTERM exit: {status}");
}

/// A web page the user opens must not drive the loopback API: a cross-site POST (its
/// `Origin`) and DNS rebinding (a `Host` naming the attacker's domain) are refused with 403
/// on every route, while the daemon's own page, curl-like clients and allowed hosts pass.
#[test]
fn cross_site_requests_and_dns_rebinding_are_refused() {
    let d = Daemon::start("[server]\nallowed_hosts = [\"cam-gw.example\"]\n");
    let send = |path: &str, headers: &[(&str, &str)]| {
        let mut req = agent().post(&d.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send(&b"frame"[..]).unwrap();
        let status = r.status().as_u16();
        (status, r.into_body().read_to_string().unwrap_or_default())
    };
    let own = format!("http://{}", d.addr);
    assert_eq!(send("/v1/functions/echo", &[("origin", &own)]).0, 200, "the daemon's own page refused");
    assert_eq!(send("/v1/functions/echo", &[]).0, 200, "a client without Origin refused");
    for headers in [
        vec![("origin", "http://attacker.example")],
        vec![("origin", "null")],
        vec![("host", "attacker.example:8080")],
        vec![("host", "attacker.example:8080"), ("origin", "http://attacker.example:8080")],
    ] {
        for path in ["/v1/functions/echo", "/v1/outbox/dead/replay"] {
            let (status, body) = send(path, &headers);
            assert_eq!(status, 403, "{path} {headers:?}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["kind"], "origin", "{body}");
        }
        let page = agent().get(&d.url("/healthz"));
        let page = headers.iter().fold(page, |r, (k, v)| r.header(*k, *v)).call().unwrap();
        assert_eq!(page.status().as_u16(), 403, "/healthz {headers:?}");
    }
    let allowed = send("/v1/functions/echo", &[("host", "cam-gw.example:8080"), ("origin", "http://cam-gw.example")]);
    assert_eq!(allowed.0, 200, "{}", allowed.1);
    assert!(d.log().contains("refused: Host `attacker.example:8080`"), "{}", d.log());
}

/// `server.notice_file`: the page's status carries the file's first line, follows each change
/// without a reload, and drops it when the file goes.
#[test]
fn the_operator_notice_follows_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("notice");
    std::fs::write(&file, "Dapr sidecar: building, 12 of 900 packages\nignored\n").unwrap();
    let d = Daemon::start(&format!("[server]\nnotice_file = \"{}\"\n", file.display()));
    let notice = || d.get("/v1/status").json()["operator_notice"].clone();
    let wait_for = |want: serde_json::Value| {
        let t0 = std::time::Instant::now();
        while notice() != want {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "notice {} never became {want}", notice());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_for("Dapr sidecar: building, 12 of 900 packages".into());
    std::fs::write(&file, "Dapr sidecar: starting\n").unwrap();
    wait_for("Dapr sidecar: starting".into());
    std::fs::remove_file(&file).unwrap();
    wait_for(serde_json::Value::Null);
}
