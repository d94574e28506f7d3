//! Functions written in C (`brightness`) and AssemblyScript (`frameinfo`) run under the same
//! runtime and the same limits as the Rust ones: their results are right, bad frames get a
//! clean rejection, and a hostile one in each language (an endless loop) meets its deadline.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, asset, camera_jpeg, encode, runtime};
use edgefn::runtime::InvokeError;
use serde_json::Value;

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// A PNG of one gray level: a lens in the dark, or behind tape.
fn flat_png(level: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(320, 240, image::Luma([level]));
    encode(&image::DynamicImage::ImageLuma8(img), image::ImageFormat::Png)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brightness_in_c_tells_a_scene_from_a_covered_lens() {
    let (rt, _tmp) = runtime("");
    let scene = json(&rt.invoke("brightness", asset("chelsea.png").into(), &[]).await.unwrap().stdout);
    assert_eq!(scene["covered"], false, "{scene}");
    assert_eq!((scene["width"].as_u64(), scene["height"].as_u64()), (Some(451), Some(300)));
    let mean = scene["mean_luma"].as_f64().unwrap();
    assert!((60.0..200.0).contains(&mean), "{scene}");

    // The same scene as a camera's JPEG: the same mean, within JPEG's loss.
    let jpeg = json(&rt.invoke("brightness", camera_jpeg().into(), &[]).await.unwrap().stdout);
    assert!((jpeg["mean_luma"].as_f64().unwrap() - mean).abs() < 3.0, "{jpeg} vs {scene}");

    for (level, why) in [(4, "dark"), (128, "even: mid-gray tape")] {
        let out = json(&rt.invoke("brightness", flat_png(level).into(), &[]).await.unwrap().stdout);
        assert_eq!(out["covered"], true, "{why}: {out}");
        assert_eq!(out["mean_luma"].as_f64(), Some(level as f64), "{out}");
    }

    let err = rt.invoke("brightness", b"not a frame".to_vec().into(), &[]).await.unwrap_err();
    assert!(matches!(err, InvokeError::Rejected { code: 1, .. }), "{err}");
    assert!(err.to_string().contains("not a JPEG or PNG frame"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brightness_thresholds_come_from_the_functions_env() {
    // The scene's mean luma is about 119: a site that calls anything under 130 dark says covered.
    let (rt, _tmp) = runtime("[functions.brightness]\nenv = { COVERED_BELOW = \"130\" }\n");
    let out = json(&rt.invoke("brightness", asset("chelsea.png").into(), &[]).await.unwrap().stdout);
    assert_eq!(out["covered"], true, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frameinfo_in_assemblyscript_reads_png_and_jpeg_headers() {
    let (rt, _tmp) = runtime("");
    let png = asset("coffee.png");
    let out = json(&rt.invoke("frameinfo", png.clone().into(), &[]).await.unwrap().stdout);
    assert_eq!(
        out,
        serde_json::json!({"format": "png", "width": 600, "height": 400, "channels": 3, "bytes": png.len()})
    );
    let jpeg = camera_jpeg();
    let out = json(&rt.invoke("frameinfo", jpeg.clone().into(), &[]).await.unwrap().stdout);
    assert_eq!(
        out,
        serde_json::json!({"format": "jpeg", "width": 640, "height": 480, "channels": 3, "bytes": jpeg.len()})
    );
    let gray = flat_png(9);
    let out = json(&rt.invoke("frameinfo", gray.into(), &[]).await.unwrap().stdout);
    assert_eq!((out["width"].as_u64(), out["channels"].as_u64()), (Some(320), Some(1)), "{out}");

    // A truncated JPEG (start of image, then nothing useful) is rejected, not guessed at.
    let err = rt.invoke("frameinfo", jpeg[..3].to_vec().into(), &[]).await.unwrap_err();
    assert!(matches!(err, InvokeError::Rejected { code: 1, .. }), "{err}");
    assert!(err.to_string().contains("not a PNG or JPEG frame"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_in_c_or_assemblyscript_meets_its_deadline() {
    let (rt, _tmp) = runtime("[functions.spin_c]\ndeadline = \"1s\"\n[functions.spin_as]\ndeadline = \"1s\"\n");
    for name in ["spin_c", "spin_as"] {
        let started = Instant::now();
        let err = rt.invoke(name, Vec::new().into(), &[]).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, InvokeError::DeadlineExceeded { .. }), "{name}: {err}");
        assert!(took >= Duration::from_millis(1000) && took <= Duration::from_millis(1100), "{name}: {took:?}");
        // The runtime is whole afterwards: the other languages' functions still answer.
        let out = rt.invoke("frameinfo", asset("chelsea.png").into(), &[]).await.unwrap();
        assert_eq!(json(&out.stdout)["width"], 451);
    }
}

#[test]
fn c_and_assemblyscript_functions_serve_over_http_and_in_a_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let mut d = Daemon::start(&format!(
        "[functions.spin_c]\ndeadline = \"1s\"\n\n[[pipeline]]\nname = \"tamper\"\nfunctions = [\"brightness\"]\n\
         sinks = [{{ file = {{ path = {results:?} }} }}]\n"
    ));
    let resp = d.post("/v1/functions/frameinfo", &asset("chelsea.png"));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["format"], "png");
    let resp = d.post("/v1/functions/spin_c", b"");
    assert_eq!((resp.status, resp.json()["kind"].as_str()), (504, Some("deadline")));
    d.assert_alive();
    let resp = d.post("/v1/pipelines/tamper?camera=porch", &flat_png(2));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["covered"], true);
}
