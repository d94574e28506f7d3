//! The outbox in-process, at its edges: a result that cannot fit the cap, the dead letters a
//! page is shown, and a replay larger than one transaction should hold.

use std::sync::Arc;

use bytes::Bytes;
use edgefn::config::Outbox as OutboxConfig;
use edgefn::metrics::Metrics;
use edgefn::sinks::outbox::{Boot, Item, Outbox, Record, now_ms};

fn item(sink: &str, seq: u64, payload: usize) -> Item {
    Item {
        sink: sink.into(),
        record: Record {
            id: format!("test/p/cam/{seq}"),
            board: "test".into(),
            pipeline: "p".into(),
            camera: "cam".into(),
            seq,
            topic: "t".into(),
            content_type: "application/octet-stream".into(),
            created_ms: now_ms(),
            boot: Boot::now(),
            error: None,
        },
        payload: Bytes::from(vec![1u8; payload]),
        file: None,
    }
}

fn open(dir: &std::path::Path, max_bytes: u64) -> Arc<Outbox> {
    let cfg = OutboxConfig { max_bytes: bytesize::ByteSize::b(max_bytes), ..Default::default() };
    Outbox::open(&dir.join("outbox.redb"), &cfg, Arc::new(Metrics::new())).unwrap()
}

/// Dead-letters every pending result of `sink`.
fn bury(outbox: &Outbox, sink: &str) {
    let pending = outbox.peek(sink, 10_000, usize::MAX).unwrap();
    let dead: Vec<(u64, String)> = pending.iter().map(|p| (p.key, "refused".to_string())).collect();
    outbox.settle(sink, &[], &dead).unwrap();
}

/// A result larger than the cap allows was committed, evicted by its own commit, and
/// reported stored: the frame was acknowledged with its result already gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_cap_is_refused_not_evicted_by_its_own_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), 2 << 20);
    let small = item("s", 1, 1000);
    assert!(outbox.too_large(&small).is_none());
    outbox.commit(vec![small]).await.unwrap();
    let big = item("s", 2, 500 << 10);
    let why = outbox.too_large(&big).expect("a 500 KiB result fits a 2 MiB outbox's budget?");
    assert!(why.contains("outbox.max_bytes"), "{why}");
    let err = outbox.commit(vec![big]).await.expect_err("committed a result the cap evicts at once");
    assert!(format!("{err:#}").contains("do not fit outbox.max_bytes"), "{err:#}");
    // The older result made room where it could, and nothing committed is missing.
    let left: Vec<u64> = outbox.peek("s", 10, usize::MAX).unwrap().iter().map(|p| p.record.seq).collect();
    assert!(left.is_empty() || left == [1], "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letters_shown_are_the_newest_over_every_sink() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), 64 << 20);
    for (sink, seqs) in [("a", 1..4), ("b", 4..7)] {
        outbox.commit(seqs.map(|s| item(sink, s, 10)).collect()).await.unwrap();
        bury(&outbox, sink);
    }
    let newest: Vec<(String, u64)> = outbox.dead_letters(2).unwrap().into_iter().map(|(s, r)| (s, r.seq)).collect();
    assert_eq!(newest, [("b".to_string(), 5), ("b".to_string(), 6)]);
    assert_eq!(outbox.dead_letters(100).unwrap().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_larger_than_one_transaction_moves_every_dead_letter() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), 64 << 20);
    for chunk in 0..6u64 {
        outbox.commit((0..100).map(|i| item("s", chunk * 100 + i + 1, 10)).collect()).await.unwrap();
    }
    bury(&outbox, "s");
    assert_eq!(outbox.dead_count(), 600);
    assert_eq!(outbox.replay_dead().unwrap(), 600);
    assert_eq!((outbox.dead_count(), outbox.peek("s", 1000, usize::MAX).unwrap().len()), (0, 600));
}

/// A delivery attempt took 64 results whatever their size: at 16 MiB each, a gigabyte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_batch_is_capped_in_bytes_but_always_takes_one() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), 1 << 30);
    outbox.commit((1..=8).map(|s| item("s", s, 3 << 20)).collect()).await.unwrap();
    let batch = outbox.peek("s", 64, edgefn::sinks::BATCH_BYTES).unwrap();
    let bytes: usize = batch.iter().map(|p| p.payload.len()).sum();
    assert!(!batch.is_empty() && bytes <= edgefn::sinks::BATCH_BYTES, "{} results, {bytes} bytes", batch.len());
    assert_eq!(outbox.peek("s", 64, 1).unwrap().len(), 1, "a result larger than the cap must still go");
}

/// Sequence state was kept for every camera ever seen, on disk and in memory. Forgotten
/// cameras free it, and a camera seen again never reuses a number, across a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_cameras_free_their_sequence_state_and_never_reuse_an_id() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), 64 << 20);
    let numbered = |outbox: &Outbox, camera: &str, n: usize| -> Vec<Item> {
        (0..n)
            .map(|_| {
                let mut i = item("s", outbox.next_seq(camera), 10);
                i.record.camera = camera.into();
                i
            })
            .collect()
    };
    outbox.commit(numbered(&outbox, "gone", 3)).await.unwrap();
    outbox.commit(numbered(&outbox, "kept", 2)).await.unwrap();
    outbox.forget_cameras(&["gone".to_string()]).unwrap();
    assert_eq!(outbox.next_seq("gone"), 4, "a forgotten camera's numbers came back");
    drop(outbox);
    // The committer thread lets go of the file once it sees the outbox gone.
    let cfg = OutboxConfig { max_bytes: bytesize::ByteSize::mib(64), ..Default::default() };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let outbox = loop {
        match Outbox::open(&tmp.path().join("outbox.redb"), &cfg, Arc::new(Metrics::new())) {
            Ok(o) => break o,
            Err(e) if std::time::Instant::now() < until => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("reopening the outbox: {e:#}"),
        }
    };
    assert!(outbox.next_seq("gone") > 3, "the floor did not survive a restart");
    assert_eq!(outbox.next_seq("kept"), 3, "a remembered camera lost its own count");
}
