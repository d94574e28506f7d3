//! The sidecar's footprint beside edgefn's, on this machine (run: `cargo bench --bench
//! footprint`). Users ask what daprd costs on a board; this answers with the real daprd built
//! by scripts/build-daprd.sh, in one run, side by side:
//!
//! - start to healthy: edgefn until `/healthz` answers (functions and the model loaded, warm
//!   AOT cache), daprd until `/v1.0/healthz/outbound` answers (components up);
//! - idle RSS 5 s after that; edgefn's split into anonymous and file-backed (code, libraries
//!   and the model file, pages the kernel can drop and read again); and edgefn's again, idle
//!   after 100 grayscale and 10 classify calls: 2 s after the last (what serving brought
//!   back in) and 35 s after (once the daemon let go of the code that served).
//!
//! Each is started 5 times, alternately; medians are printed with their ratio.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use common::broker::Broker;
use common::daprd::{self, Daprd};

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    // The packaged configuration's shape: classify with its model, one pipeline to the sidecar.
    let cfg = format!(
        r#"
[models.efficientnet-lite0]
path = {:?}

[functions.classify]
dirs = {{ "/models" = {:?} }}

[dapr]
url = "http://127.0.0.1:1"
startup_wait = "0s"

[[pipeline]]
name = "gray"
functions = ["grayscale"]
sinks = [{{ dapr = {{ pubsub = "upstream", topic = "frames/gray" }} }}]
"#,
        common::assets_dir().join("efficientnet_lite0.tflite"),
        common::assets_dir()
    );
    let envs = [("EDGEFN__RUNTIME__LITERT", common::litert_lib().display().to_string())];
    let edgefn_dir = tmp.path().join("edgefn");
    // Warm the AOT cache once, so every measured start maps precompiled code.
    drop(Daemon::start_env(&edgefn_dir, &cfg, &envs));

    let (mut e_start, mut e_rss, mut d_start, mut d_rss) = (vec![], vec![], vec![], vec![]);
    let (mut e_anon, mut e_model, mut e_served, mut e_served_anon) = (vec![], vec![], vec![], vec![]);
    let (mut e_quiet, mut e_quiet_anon) = (vec![], vec![]);
    for i in 0..RUNS {
        let t = Instant::now();
        let d = Daemon::start_env(&edgefn_dir, &cfg, &envs);
        e_start.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_secs(5));
        let pid = d.child.id();
        e_rss.push(common::rss_kib(pid) as f64 / 1024.0);
        e_anon.push(common::anon_kib(pid) as f64 / 1024.0);
        e_model.push(common::mapped_kib(pid, "efficientnet_lite0.tflite").1 as f64 / 1024.0);
        // And idle again after work: what serving frames brings back in and keeps.
        let (frame, cat) = (common::camera_jpeg(), common::asset("chelsea.png"));
        for _ in 0..10 {
            assert_eq!(d.post("/v1/functions/classify", &cat).status, 200);
            for _ in 0..10 {
                assert_eq!(d.post("/v1/functions/grayscale", &frame).status, 200);
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        e_served.push(common::rss_kib(pid) as f64 / 1024.0);
        e_served_anon.push(common::anon_kib(pid) as f64 / 1024.0);
        std::thread::sleep(Duration::from_secs(33));
        e_quiet.push(common::rss_kib(pid) as f64 / 1024.0);
        e_quiet_anon.push(common::anon_kib(pid) as f64 / 1024.0);
        drop(d);

        let dir = tmp.path().join(format!("daprd-{i}"));
        let sidecar = Daprd::start_on(
            &dir,
            common::free_port(),
            common::free_port(),
            &[("pubsub.yaml", daprd::mqtt3("upstream", broker.port))],
            &[],
        );
        d_start.push(sidecar.started.as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_secs(5));
        d_rss.push(sidecar.rss_kib() as f64 / 1024.0);
    }
    let (es, er, ds, dr) = (median(e_start), median(e_rss), median(d_start), median(d_rss));
    println!("footprint, medians of {RUNS} alternate starts (daprd {})", daprd::bin().display());
    println!("  start to healthy: edgefn {es:.0} ms, daprd {ds:.0} ms  (daprd / edgefn = {:.2})", ds / es);
    println!("  idle RSS:         edgefn {er:.1} MiB, daprd {dr:.1} MiB  (daprd / edgefn = {:.2})", dr / er);
    let (anon, model) = (median(e_anon), median(e_model));
    println!(
        "  edgefn's RSS:     {anon:.1} MiB anonymous, {:.1} MiB file-backed ({model:.1} MiB of it the model file)",
        er - anon
    );
    let (served, served_anon) = (median(e_served), median(e_served_anon));
    println!(
        "  edgefn idle after 100 grayscale and 10 classify calls: {served:.1} MiB ({served_anon:.1} anonymous, {:.1} file-backed)",
        served - served_anon
    );
    let (quiet, quiet_anon) = (median(e_quiet), median(e_quiet_anon));
    println!(
        "  and 35 s after the last call:                           {quiet:.1} MiB ({quiet_anon:.1} anonymous, {:.1} file-backed)",
        quiet - quiet_anon
    );
}
