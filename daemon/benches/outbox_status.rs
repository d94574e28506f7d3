//! How long the status routes take with a large outbox (run: `cargo bench --bench
//! outbox_status`): 100 000 results wait for a sidecar that is down, and `/metrics`,
//! `/v1/status` and `/healthz` are each fetched 30 times. Prints medians and p90s.
//!
//! The outbox is filled through the library (`Outbox::commit`), then the daemon starts on it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Daemon;
use edgefn::metrics::Metrics;
use edgefn::sinks::outbox::{Item, Outbox, Record};

const PENDING: u64 = 100_000;
const SINK: &str = "dapr:upstream/frames";

fn fill(state: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cfg = edgefn::config::Outbox { max_bytes: bytesize::ByteSize::gib(4), ..Default::default() };
    let outbox = Outbox::open(&state.join("outbox.redb"), &cfg, Arc::new(Metrics::new())).unwrap();
    let payload = Bytes::from(vec![7u8; 200]);
    let sink: Arc<str> = SINK.into();
    rt.block_on(async {
        for chunk in 0..PENDING / 1000 {
            let items = (0..1000)
                .map(|i| {
                    let seq = chunk * 1000 + i + 1;
                    Item {
                        sink: sink.clone(),
                        record: Record {
                            id: format!("bench/gray/cam/{seq}"),
                            board: "bench".into(),
                            pipeline: "gray".into(),
                            camera: "cam".into(),
                            seq,
                            topic: "frames".into(),
                            content_type: "application/octet-stream".into(),
                            created_ms: edgefn::sinks::outbox::now_ms(),
                            boot: edgefn::sinks::outbox::Boot::now(),
                            error: None,
                        },
                        payload: payload.clone(),
                        file: None,
                    }
                })
                .collect();
            outbox.commit(items).await.unwrap();
        }
    });
    drop(outbox);
    // The committer thread closes the file once its queue is dropped.
    std::thread::sleep(Duration::from_secs(1));
}

fn time(d: &Daemon, path: &str) -> (f64, f64) {
    let agent = common::agent();
    let mut ms: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            let mut r = agent.get(&d.url(path)).call().unwrap();
            let _ = r.body_mut().read_to_vec();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (ms[15], ms[27])
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let t = Instant::now();
    fill(&dir.join("state"));
    eprintln!("filled {PENDING} results in {:.1} s", t.elapsed().as_secs_f64());
    let cfg = "[dapr]\nurl = \"http://127.0.0.1:1\"\nstartup_wait = \"0s\"\n\n[outbox]\nmax_bytes = \"4 GiB\"\n\n\
               [[pipeline]]\nname = \"gray\"\nfunctions = [\"grayscale\"]\n\
               sinks = [{ dapr = { pubsub = \"upstream\", topic = \"frames\" } }]\n";
    let d = Daemon::start_in(&dir, cfg);
    assert_eq!(d.metric(&format!("edgefn_outbox_depth{{sink=\"{SINK}\"}}")), PENDING as f64);
    println!("status routes with {PENDING} pending results (median / p90 of 30):");
    for path in ["/metrics", "/v1/status", "/healthz"] {
        let (p50, p90) = time(&d, path);
        println!("  {path:<11} {p50:8.2} ms / {p90:8.2} ms");
    }
}
