//! classify: ImageNet classification in wasm through wasi-nn, on the native LiteRT backend.
//! The same bytes also run natively here (the `classify` crate's preparation and ranking plus
//! direct LiteRT calls), and the two answers must be identical.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Daemon;
use common::broker::Broker;
use common::fake_dapr::FakeDapr;
use edgefn::runtime::nn::litert;

const THREADS: u32 = 2;
const MODEL: &str = "efficientnet-lite0";

fn model_file() -> PathBuf {
    common::assets_dir().join("efficientnet_lite0.tflite")
}

fn models_toml(contexts: u32) -> String {
    format!(
        r#"
[models.{MODEL}]
path = {:?}
encoding = "tflite"
threads = {THREADS}
contexts = {contexts}

[functions.classify]
dirs = {{ "/models" = {:?} }}
deadline = "30s"
"#,
        model_file(),
        common::assets_dir()
    )
}

fn start(dir: &std::path::Path, extra: &str, lib: PathBuf) -> Daemon {
    Daemon::start_env(dir, extra, &[("EDGEFN__RUNTIME__LITERT", lib.display().to_string())])
}

/// The reference: the same preparation and ranking, with LiteRT called directly.
fn native(image: &[u8]) -> String {
    static MODEL_ONCE: std::sync::OnceLock<std::sync::Mutex<litert::Compiled>> = std::sync::OnceLock::new();
    let compiled = MODEL_ONCE.get_or_init(|| {
        let lib = litert::Library::open(&common::litert_lib()).unwrap();
        let model = litert::Model::load(&lib, &model_file()).unwrap();
        std::sync::Mutex::new(model.compile(THREADS).unwrap())
    });
    let labels = classify::labels_from_model(std::fs::File::open(model_file()).unwrap()).unwrap();
    let mut ctx = compiled.lock().unwrap();
    ctx.write_input(0, &classify::preprocess(image).unwrap()).unwrap();
    ctx.run().unwrap();
    let top = classify::rank(&ctx.read_output(0).unwrap(), &labels).unwrap();
    classify::to_json(&top, MODEL)
}

#[test]
fn chelsea_and_coffee_match_the_reference_and_native_exactly() {
    let d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(1), common::litert_lib());
    for (file, label, reference) in [("chelsea.png", "Egyptian cat", 0.816), ("coffee.png", "espresso", 0.879)] {
        let image = common::asset(file);
        let r = d.post("/v1/functions/classify", &image);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.content_type, "application/json");
        let got = r.json();
        assert_eq!(got["label"], label, "{got}");
        let score = got["score"].as_f64().unwrap();
        assert!((score - reference).abs() <= 0.03, "{file}: score {score}, reference {reference}");
        assert_eq!(got["model"], MODEL);
        let top = got["top"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        assert_eq!(top[0]["label"], label);
        assert!(top.windows(2).all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()), "{got}");

        assert_eq!(String::from_utf8(r.body).unwrap(), native(&image), "{file}: wasm and native differ");
    }

    // The seed's route and sentence.
    let r = d.post_with("/api/hello", ("api", "go"), &common::asset("chelsea.png"));
    assert_eq!(r.status, 200);
    assert_eq!(String::from_utf8(r.body).unwrap(), "It is very likely a Egyptian cat in the picture");
}

#[test]
fn the_model_loads_once_and_contexts_stay_pooled() {
    let d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(2), common::litert_lib());
    let label = format!("{{model=\"{MODEL}\"}}");
    assert_eq!(d.metric(&format!("edgefn_model_loads_total{label}")), 1.0);
    let frame = common::camera_jpeg();
    // Four clients at once against two contexts: calls wait for a context, none fails.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..25 {
                    let r = d.post("/v1/functions/classify", &frame);
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    assert_eq!(r.json()["label"], "Egyptian cat");
                }
            });
        }
    });
    assert_eq!(d.metric("edgefn_invocations_total{function=\"classify\"}"), 100.0);
    assert_eq!(d.metric(&format!("edgefn_model_loads_total{label}")), 1.0, "a request reloaded the model");
    assert_eq!(d.metric(&format!("edgefn_model_contexts{label}")), 2.0);
    let models = d.get("/v1/functions").json()["models"].clone();
    assert_eq!(models[0]["name"], MODEL);
    assert_eq!(models[0]["contexts"], 2);
    assert_eq!(models[0]["idle"], 2, "every context went back to the pool: {models}");
}

/// XNNPACK packs the weights into buffers of its own, so the model file's pages need not stay
/// resident beside them: not after the start, nor after inferences.
#[test]
fn the_model_file_is_not_kept_resident_beside_its_packed_weights() {
    let d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(1), common::litert_lib());
    let pid = d.child.id();
    let file_kib = std::fs::metadata(model_file()).unwrap().len() / 1024;
    let (size, rss) = common::mapped_kib(pid, "efficientnet_lite0.tflite");
    // Were it read into the heap instead, there would be nothing here to measure.
    assert!(size >= file_kib, "the model file is not mapped ({size} KiB of {file_kib})");
    assert!(rss <= size / 20, "{rss} of the model file's {size} KiB resident after the start");
    for _ in 0..3 {
        let r = d.post("/v1/functions/classify", &common::asset("chelsea.png"));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["label"], "Egyptian cat");
    }
    let (_, rss) = common::mapped_kib(pid, "efficientnet_lite0.tflite");
    assert!(rss <= size / 20, "{rss} of the model file's {size} KiB resident after 3 inferences");
}

/// What ran only to start (config, module loading, the model's preparation) is let go of once
/// the daemon is ready, at the start and after a reload: before, 24 MB of the 32 MB idle
/// were file-backed. What runs again comes back, and still runs.
#[test]
fn code_that_ran_only_at_the_start_is_not_kept_resident() {
    let d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(1), common::litert_lib());
    let pid = d.child.id();
    let idle = || {
        std::thread::sleep(Duration::from_secs(1));
        (common::file_kib(pid), common::rss_kib(pid))
    };
    let (file, rss) = idle();
    assert!(file <= 12 * 1024, "{file} KiB file-backed ({rss} KiB resident) idle after the start");
    for _ in 0..3 {
        let r = d.post("/v1/functions/classify", &common::asset("chelsea.png"));
        assert_eq!(r.json()["label"], "Egyptian cat");
        assert_eq!(d.post("/v1/functions/grayscale", &common::camera_jpeg()).status, 200);
    }
    let served = common::file_kib(pid);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    d.wait_log("edgefn ready", 2, 30);
    let (file, rss) = idle();
    assert!(file < served, "{file} KiB file-backed after a reload, {served} KiB while serving ({rss} KiB resident)");
    assert_eq!(d.post("/v1/functions/classify", &common::asset("chelsea.png")).json()["label"], "Egyptian cat");
}

/// What served frames is let go of too, once they stop coming for 30 s: idle again after
/// serving, the daemon held 18.6 MB file-backed against 7.5 MB idle after its start.
#[test]
fn code_that_served_frames_is_let_go_of_when_they_stop() {
    let d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(1), common::litert_lib());
    let pid = d.child.id();
    let cat = common::asset("chelsea.png");
    for _ in 0..5 {
        assert_eq!(d.post("/v1/functions/classify", &cat).json()["label"], "Egyptian cat");
        for _ in 0..10 {
            assert_eq!(d.post("/v1/functions/grayscale", &common::camera_jpeg()).status, 200);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let served = common::file_kib(pid);
    assert!(served > 12 * 1024, "only {served} KiB file-backed just after serving: nothing to let go of");
    let until = std::time::Instant::now() + Duration::from_secs(50);
    let idle = loop {
        let file = common::file_kib(pid);
        if file <= 12 * 1024 || std::time::Instant::now() > until {
            break file;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(idle <= 12 * 1024, "{idle} KiB file-backed 50 s after the last frame, {served} KiB just after serving");
    assert_eq!(d.post("/v1/functions/classify", &cat).json()["label"], "Egyptian cat");
    assert_eq!(d.post("/v1/functions/grayscale", &common::camera_jpeg()).status, 200);
}

#[test]
fn a_reload_loads_the_model_again_and_classify_keeps_working() {
    let mut d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(1), common::litert_lib());
    let loads = format!("edgefn_model_loads_total{{model=\"{MODEL}\"}}");
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    for generation in 2..=3 {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while d.log().matches("edgefn ready").count() < generation {
            assert!(std::time::Instant::now() < until, "no reload:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // Metrics start afresh with each generation, which loads its models once.
        assert_eq!(d.metric(&loads), 1.0);
        let r = d.post("/v1/functions/classify", &common::asset("chelsea.png"));
        assert_eq!(r.json()["label"], "Egyptian cat");
    }
    d.assert_alive();
}

#[test]
fn bad_frames_get_a_clear_error_or_a_low_confidence_answer() {
    let mut d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(1), common::litert_lib());
    for (what, body) in [("garbage", b"\x00\x01garbage, not an image".to_vec()), ("empty", vec![])] {
        let r = d.post("/v1/functions/classify", &body);
        assert_eq!(r.status, 422, "{what}");
        let j = r.json();
        assert_eq!(j["kind"], "rejected", "{what}: {j}");
        let msg = j["error"].as_str().unwrap();
        assert!(msg.contains("classify:") && !msg.contains('\n'), "{what}: {msg}");
    }
    let mut truncated = common::camera_jpeg();
    truncated.truncate(truncated.len() / 2);
    let r = d.post("/v1/functions/classify", &truncated);
    assert_eq!(r.status, 422);
    assert!(r.json()["error"].as_str().unwrap().contains("truncated JPEG"));

    // One pixel is still a picture: a valid answer, with little confidence.
    let pixel = common::encode(
        &image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(1, 1, image::Rgb([200, 30, 30]))),
        image::ImageFormat::Png,
    );
    let r = d.post("/v1/functions/classify", &pixel);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let score = r.json()["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    d.assert_alive();
}

#[test]
fn without_the_library_startup_succeeds_and_classify_says_why() {
    let missing = PathBuf::from("/nonexistent/libLiteRt.so");
    let mut d = start(&tempfile::tempdir().unwrap().keep(), &models_toml(1), missing);
    assert!(d.log().contains("runtime.litert"), "no startup warning naming the key:\n{}", d.log());
    let r = d.post("/v1/functions/grayscale", &common::asset("chelsea.png"));
    assert_eq!(r.status, 200);
    let r = d.post("/v1/functions/classify", &common::asset("chelsea.png"));
    assert_eq!(r.status, 503);
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(msg.contains("runtime.litert") && msg.contains("/nonexistent/libLiteRt.so"), "{msg}");
    assert!(d.get("/v1/functions").json()["models"][0]["error"].is_string());
    let health = d.get("/healthz").json();
    assert_eq!(health["status"], "degraded");
    assert!(health["problems"].to_string().contains(&format!("model {MODEL} not loaded")), "{health}");
    assert!(d.get("/v1/status").json()["models"][0]["error"].as_str().unwrap().contains("runtime.litert"));
    d.assert_alive();
}

#[test]
fn a_missing_model_file_is_named_by_its_config_key() {
    let toml = models_toml(1).replace(&format!("{:?}", model_file()), "\"/nonexistent/model.tflite\"");
    let mut d = start(&tempfile::tempdir().unwrap().keep(), &toml, common::litert_lib());
    assert!(d.log().contains(&format!("models.{MODEL}.path")), "{}", d.log());
    let r = d.post("/v1/functions/classify", &common::asset("chelsea.png"));
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].as_str().unwrap().contains("/nonexistent/model.tflite"));
    assert_eq!(d.post("/v1/functions/grayscale", &common::asset("coffee.png")).status, 200);
    d.assert_alive();
}

#[test]
fn misusing_wasi_nn_gets_an_error_and_leaves_the_pool_whole() {
    let toml = format!("{}\n[functions.nnprobe]\ndeadline = \"30s\"\n", models_toml(1));
    let mut d = start(&tempfile::tempdir().unwrap().keep(), &toml, common::litert_lib());
    // Warm the context with a real result, which the probe must not be able to read back.
    assert_eq!(d.post("/v1/functions/classify", &common::asset("chelsea.png")).status, 200);
    // `no-input` computes on the input buffer the last call (classify, above) left behind.
    for mode in ["unknown-model", "wrong-shape", "two-contexts", "no-compute", "no-input"] {
        let r = d.post("/v1/functions/nnprobe", mode.as_bytes());
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, 200, "{mode}: {body}");
        let errno: u32 = body.strip_prefix("errno ").and_then(|n| n.parse().ok()).expect(&body);
        assert_ne!(errno, 0, "{mode}: the host accepted it");
    }
    // Each load_by_name takes a slot in the call's graph table: capped per call.
    let r = d.post("/v1/functions/nnprobe", b"load-loop");
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, 200, "load-loop: {body}");
    let loaded: u32 = body.strip_prefix("loaded ").and_then(|b| b.split(' ').next()?.parse().ok()).expect(&body);
    assert!(loaded <= 64, "the host allowed {loaded} loads in one call");
    // Out-of-bounds pointers make wasmtime-wasi-nn panic inside the host call: one failed call.
    let r = d.post("/v1/functions/nnprobe", b"bad-pointer");
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["kind"], "trap");
    d.assert_alive();
    let models = d.get("/v1/functions").json()["models"].clone();
    assert_eq!(models[0]["idle"], 1, "a context leaked: {models}");
    let r = d.post("/v1/functions/classify", &common::asset("coffee.png"));
    assert_eq!(r.json()["label"], "espresso");
}

#[test]
fn classify_imports_only_wasi_and_wasi_nn() {
    let engine = wasmtime::Engine::default();
    let module = wasmtime::Module::from_file(&engine, common::wasm("classify")).unwrap();
    let mut modules: Vec<String> = module.imports().map(|i| i.module().to_string()).collect();
    modules.sort();
    modules.dedup();
    assert_eq!(modules, ["wasi_ephemeral_nn", "wasi_snapshot_preview1"]);
    let nn: Vec<String> =
        module.imports().filter(|i| i.module() == "wasi_ephemeral_nn").map(|i| i.name().to_string()).collect();
    eprintln!("classify.wasm imports from wasi_ephemeral_nn: {nn:?}");
    for name in &nn {
        assert!(
            ["load_by_name", "init_execution_context", "set_input", "compute", "get_output"].contains(&name.as_str()),
            "unexpected wasi-nn import {name}"
        );
    }
}

#[test]
fn classify_as_a_pipeline_stage_sends_json_to_dapr() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let dapr = FakeDapr::start(&["upstream"], None);
    let config = format!(
        r#"
[mqtt]
url = "{}"
client_id = "edgefn-classify-{}"

[dapr]
url = "http://127.0.0.1:{}"
startup_wait = "2s"

[[pipeline]]
name = "doorcam-classify"
source.mqtt = "cameras/+/frames"
functions = ["classify"]
sinks = [{{ dapr = {{ pubsub = "upstream", topic = "frames/classified" }} }}]
policy = "block"
{}"#,
        broker.url(),
        broker.port,
        dapr.port,
        models_toml(1)
    );
    let d = start(tmp.path(), &config, common::litert_lib());
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    let frame = tmp.path().join("frame.jpg");
    std::fs::write(&frame, common::camera_jpeg()).unwrap();
    let status = common::edgefn()
        .args(["publish", "--broker", &broker.url(), "--topic", "cameras/door/frames", "--count", "3"])
        .arg(&frame)
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    dapr.wait_for(60, "3 classifications", |events| events.len() >= 3);
    for e in dapr.events() {
        assert_eq!(e.topic, "frames/classified");
        assert_eq!(e.event["datacontenttype"], "application/json", "{}", e.event);
        assert_eq!(e.event["data"]["label"], "Egyptian cat", "{}", e.event);
    }
    std::thread::sleep(Duration::from_millis(100));
}

/// `unavailable` (a model that did not load) passes once the config is fixed, like
/// `saturated`: Dapr answers RETRY for both, and an MQTT frame must not be settled either.
/// The frame that arrived while the model was missing is classified after the reload.
#[test]
fn an_mqtt_frame_that_meets_a_missing_model_is_classified_once_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = common::broker::Broker::start(&tmp.path().join("broker"));
    let results = tmp.path().join("results.jsonl");
    let cfg = |models: &str| {
        format!(
            "{models}\n[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-nn-{}\"\n\n[[pipeline]]\nname = \"labels\"\n\
             source.mqtt = \"cameras/+/frames\"\nfunctions = [\"classify\"]\nsinks = [{{ file = {{ path = {:?} }} }}]\n",
            broker.url(),
            broker.port,
            results.to_str().unwrap()
        )
    };
    let good = models_toml(1);
    let missing = good.replace(model_file().to_str().unwrap(), "/nonexistent/model.tflite");
    assert_ne!(good, missing);
    let d = start(&tmp.path().join("d"), &cfg(&missing), common::litert_lib());
    d.wait_metric("edgefn_mqtt_connected", 10, |v| v == 1.0);
    broker.publish_raw("cameras/door/frames", &["-s"], Some(&common::asset("chelsea.png")));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !d.log().contains("cannot run") {
        assert!(std::time::Instant::now() < until, "the frame never met the missing model:\n{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let config = d.dir.join("edgefn.toml");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("/nonexistent/model.tflite", model_file().to_str().unwrap());
    std::fs::write(&config, text).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.child.id() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&results).unwrap_or_default().contains("Egyptian cat") {
        assert!(std::time::Instant::now() < until, "no result for the frame after the model came back:\n{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Inference runs off the async workers (`runtime::blocking`), so with every model context
/// busy, more contexts than the daemon has workers, `/healthz` still answers at once. Checks
/// that the scenario happened: the pool was seen with no idle context while `/healthz` was
/// asked.
#[test]
fn healthz_answers_while_every_model_context_is_busy() {
    const CONTEXTS: u32 = 4;
    // Enough instances that every context can be taken at once.
    let toml = models_toml(CONTEXTS).replace("deadline = \"30s\"", "deadline = \"30s\"\nmax_instances = 8");
    let d = start(&tempfile::tempdir().unwrap().keep(), &toml, common::litert_lib());
    let frame = common::camera_jpeg();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut slowest, mut asked, mut all_busy) = (Duration::ZERO, 0, 0);
    std::thread::scope(|s| {
        for _ in 0..3 * CONTEXTS {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = d.post("/v1/functions/classify", &frame);
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                }
            });
        }
        // Sampling goes on until the full pool has been seen often enough, within a bound: a
        // busy CI machine fills it less often, but a daemon that serialised inference never
        // would.
        let until = std::time::Instant::now() + Duration::from_secs(45);
        while all_busy < 10 && std::time::Instant::now() < until {
            let t0 = std::time::Instant::now();
            let health = d.get("/healthz");
            let took = t0.elapsed();
            assert_eq!(health.status, 200);
            slowest = slowest.max(took);
            asked += 1;
            let models = d.get("/v1/functions").json()["models"].clone();
            if models[0]["idle"] == 0 {
                all_busy += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    println!("/healthz asked {asked} times, {all_busy} of them with all {CONTEXTS} contexts busy; slowest {slowest:?}");
    // The guest's own JPEG decoding shares the two cores with inference, so the pool is not
    // full all the time; ten samples show it was, again and again.
    assert!(all_busy >= 10, "the contexts were not kept busy ({all_busy} of {asked} samples)");
    assert!(slowest < Duration::from_secs(1), "/healthz took {slowest:?} with every context busy");
}
