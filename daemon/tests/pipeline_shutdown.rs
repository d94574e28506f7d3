//! The shutdown/submit race: a frame handed to a pipeline set while it shuts down (a reload
//! with frames arriving) must be handed back to the broker, not queued behind a new worker
//! that nothing will wait for or stop.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use edgefn::config::Config;
use edgefn::metrics::Metrics;
use edgefn::pipeline::Pipelines;
use edgefn::pipeline::frame::{Ack, Frame};
use edgefn::runtime::Runtime;
use edgefn::sinks::outbox::Outbox;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_submitted_after_shutdown_is_handed_back_not_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::parse(&format!(
        "[runtime]\nfunctions_dir = {:?}\ncache_dir = {:?}\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n\n[[pipeline]]\nname = \"echo\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"echo\"]\n",
        common::functions_dir(),
        tmp.path().join("cache")
    ))
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let runtime = Arc::new(Runtime::load(&cfg, metrics.clone(), None, &Default::default()).unwrap());
    let outbox = Outbox::open(&tmp.path().join("outbox.redb"), &cfg.outbox, metrics.clone()).unwrap();
    let pipelines = Pipelines::new(
        &cfg.pipelines,
        |_| unreachable!("no sinks"),
        runtime,
        outbox,
        metrics.clone(),
        Default::default(),
        "test-board",
    );
    let p = pipelines.get("echo").unwrap().clone();

    let frame = |camera: &str, acks: &Arc<AtomicUsize>| {
        let acks = acks.clone();
        let ack = Ack::split(1, move || {
            acks.fetch_add(1, Ordering::SeqCst);
        })
        .pop();
        Frame {
            camera: camera.into(),
            topic: format!("cameras/{camera}/frames"),
            payload: Bytes::from_static(b"x"),
            ack,
        }
    };
    // A frame before shutdown runs and is acknowledged: the set-up works.
    let before = Arc::new(AtomicUsize::new(0));
    pipelines.submit(&p, frame("a", &before)).await;
    for _ in 0..100 {
        if before.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(before.load(Ordering::SeqCst), 1, "the first frame was not acknowledged");

    pipelines.shutdown().await;
    let after = Arc::new(AtomicUsize::new(0));
    // A camera not seen before: its queue and worker would be made after shutdown took stock.
    pipelines.submit(&p, frame("b", &after)).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let ran = |camera: &str| {
        let label = edgefn::metrics::CameraLabel { pipeline: "echo".into(), camera: camera.into() };
        metrics.frames.get_or_create(&label).get()
    };
    assert_eq!((ran("a"), ran("b")), (1, 0), "a frame ran after shutdown");
    assert_eq!(pipelines.queued(), 0, "a frame waits in a queue nothing will ever close");
    assert_eq!(after.load(Ordering::SeqCst), 0, "a frame refused at shutdown must not be acknowledged");
}
