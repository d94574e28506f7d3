//! The web page in a real browser: Debian's headless Chromium driven by playwright-core
//! (tests/web/page.test.mjs), against a daemon fed by three simulated MQTT cameras (two through
//! grayscale, one through classify), with token auth on and the daemon bound beyond loopback.
//! The grayscale pipeline also publishes to a sidecar topic that refuses everything (the
//! fault-injecting fake sidecar, 403), so the page has dead letters to show and replay.
//! Screenshots at phone and desktop widths land in tests/artifacts/.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::Daemon;
use common::broker::Broker;
use common::fake_dapr::{FakeDapr, Mode};

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn page_uploads_shows_cameras_and_errors_with_token_auth() {
    let web = common::repo().join("tests/web");
    assert!(
        web.join("node_modules/playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "needs playwright-core in tests/web and Debian's chromium: run scripts/setup.sh"
    );
    let artifacts = common::repo().join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let assets = common::assets_dir().display().to_string();
    let dapr = FakeDapr::start(&["upstream"], None);
    dapr.set_mode(Mode::Status(403));
    let cfg = format!(
        "[server]\ntoken = \"page-secret\"\n\n[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-web\"\n\n\
         [dapr]\nurl = \"http://127.0.0.1:{}\"\nstartup_wait = \"0s\"\n\n[[pipeline]]\n\
         name = \"demo-gray\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"grayscale\"]\n\
         sinks = [{{ file = {{ path = {:?} }} }}, {{ dapr = {{ pubsub = \"upstream\", topic = \"refused\" }} }}]\n\n\
         [[pipeline]]\nname = \"demo-classify\"\n\
         source.mqtt = \"labels/+/frames\"\nfunctions = [\"classify\"]\n\n\
         [models.efficientnet-lite0]\npath = \"{assets}/efficientnet_lite0.tflite\"\nthreads = 2\n\n\
         [functions.classify]\ndirs = {{ \"/models\" = \"{assets}\" }}\n",
        broker.url(),
        dapr.port,
        tmp.path().join("results.jsonl")
    );
    let litert = common::litert_lib().display().to_string();
    let d = Daemon::start_env(
        tmp.path(),
        &cfg,
        &[("EDGEFN_TEST_LISTEN_ALL", "1".into()), ("EDGEFN__RUNTIME__LITERT", litert)],
    );
    let (chelsea, coffee) = (format!("{assets}/chelsea.png"), format!("{assets}/coffee.png"));
    let camera = |topic: &str, images: [&str; 2]| {
        Killed(
            common::edgefn()
                .args(["publish", "--broker", &broker.url(), "--topic", topic])
                .args(["--fps", "3", "--count", "0", images[0], images[1]])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _front = camera("cameras/front-door/frames", [&chelsea, &coffee]);
    let _kitchen = camera("cameras/kitchen/frames", [&coffee, &chelsea]);
    let _porch = camera("labels/porch/frames", [&chelsea, &coffee]);

    // Without the token the API is closed, the page itself is not.
    assert_eq!(d.get("/v1/status").status, 401);
    assert_eq!(d.get("/").status, 200);

    let out = Command::new("node")
        .current_dir(&web)
        .args(["page.test.mjs", &d.url("/"), "page-secret", artifacts.to_str().unwrap(), &chelsea])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser test failed:\n{stdout}\n{stderr}\ndaemon log:\n{}", d.log());
    assert!(stdout.contains("page test: ok"));
    for shot in ["page-phone.png", "page-desktop.png"] {
        assert!(artifacts.join(shot).exists(), "no {shot}");
    }
}
