//! Delivery workers: one per sink, draining its outbox queue in order.
//!
//! A worker takes the oldest results, hands them to the sink, and goes on with the next ones
//! at once; their outcomes are settled in one transaction at most every [`SETTLE_EVERY`]
//! (at once for a dead letter, or while the outbox is short of disk; sooner on a retry, a
//! shutdown, or [`MAX_UNSETTLED`] waiting): delivered ones leave the
//! outbox, dead ones move to the dead letters. Before a settle the sink makes its deliveries
//! durable (the file sink's one fsync for all of them), so a result leaves the outbox only
//! once its delivery would survive a power cut, and a crash in between means a duplicate
//! with the same id, never a loss. The settle itself takes no fsync of its own: the next
//! frame's commit persists it, or the outbox does within two seconds (a crash before that, too,
//! only delivers again). On any retry the worker backs off exponentially (0.2 s
//! doubling to 30 s) before trying again, so a downed sidecar is polled gently and never
//! skipped past.
//!
//! A result that keeps failing while the results around it are delivered is poison (a
//! message the upstream broker will never take): after [`MAX_ATTEMPTS`] such failures it moves
//! to the dead letters with its last error, so it cannot hold back the rest. Failures that hit
//! every result alike (sidecar down, broker down behind it) never count: an outage must not
//! empty the outbox into the dead letters.
//!
//! On shutdown a worker keeps delivering until its queue is empty, a retry is needed, or the
//! grace period ends, and settles what it delivered; whatever is left stays on disk for the
//! next start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::outbox::{Outbox, Pending};
use super::{Outcome, Sink};
use crate::metrics::{Metrics, SinkLabel};

/// What a worker needs of the outbox: its sink's queue. Blocking calls; the worker runs them
/// on the blocking pool.
pub trait Queue: Send + Sync + 'static {
    /// The oldest results from key `from` on.
    fn peek(&self, sink: &str, from: u64, max: usize, max_bytes: usize) -> anyhow::Result<Vec<Pending>>;
    fn settle(&self, sink: &str, delivered: &[u64], dead: &[(u64, String)]) -> anyhow::Result<()>;
    /// Notified when the sink's queue gains results.
    fn waker(&self, sink: &Arc<str>) -> Arc<Notify>;
    /// Whether deliveries are to be settled one by one, to free room as soon as possible.
    fn short_of_disk(&self) -> bool {
        false
    }
}

impl Queue for Outbox {
    fn peek(&self, sink: &str, from: u64, max: usize, max_bytes: usize) -> anyhow::Result<Vec<Pending>> {
        Outbox::peek_from(self, sink, from, max, max_bytes)
    }
    fn settle(&self, sink: &str, delivered: &[u64], dead: &[(u64, String)]) -> anyhow::Result<()> {
        Outbox::settle(self, sink, delivered, dead)
    }
    fn waker(&self, sink: &Arc<str>) -> Arc<Notify> {
        Outbox::waker(self, sink)
    }
    fn short_of_disk(&self) -> bool {
        Outbox::short_of_disk(self)
    }
}

/// How often each result at the head of the queue has failed while others were delivered.
/// Only the head is ever retried, so a count whose result left it (delivered, dead, or
/// evicted by the caps) is dropped at the next batch, never kept for ever.
#[derive(Default)]
struct Attempts(HashMap<u64, u32>);

impl Attempts {
    fn keep_only(&mut self, batch: &[Pending]) {
        self.0.retain(|k, _| batch.iter().any(|p| p.key == *k));
    }
    /// Counts one more failure; the count so far.
    fn failed(&mut self, key: u64) -> u32 {
        let n = self.0.entry(key).or_default();
        *n += 1;
        *n
    }
    fn forget(&mut self, key: u64) {
        self.0.remove(&key);
    }
}

/// Settles (a transaction each, and the file sink's fsync) happen at most this often per sink while
/// results keep coming; an idle worker settles this long after its last delivery. At 100 ms,
/// the file sink's fsyncs alone were 0.1 a frame at 100 frames/s, half of the goal for the
/// whole daemon; what a longer wait costs is results held on disk that long, and delivered
/// again after a crash.
pub const SETTLE_EVERY: Duration = Duration::from_millis(500);
/// Delivered results a worker holds unsettled at most.
const MAX_UNSETTLED: usize = 1024;

/// Outcomes delivered but not yet settled, oldest first.
#[derive(Default)]
struct Unsettled {
    delivered: Vec<u64>,
    dead: Vec<(u64, String)>,
    /// When the oldest of them was delivered.
    since: Option<tokio::time::Instant>,
    /// To be settled at once (the outbox is short of disk).
    hurry: bool,
}

impl Unsettled {
    fn is_empty(&self) -> bool {
        self.delivered.is_empty() && self.dead.is_empty()
    }
    fn add(&mut self, delivered: Vec<u64>, dead: Vec<(u64, String)>) {
        if self.is_empty() && !(delivered.is_empty() && dead.is_empty()) {
            self.since = Some(tokio::time::Instant::now());
        }
        self.delivered.extend(delivered);
        self.dead.extend(dead);
    }
    /// When they are to be settled, if there are any.
    fn due(&self) -> Option<tokio::time::Instant> {
        // A dead letter is settled at once: its settle copies the whole result into the dead
        // letters, and a tenth of a second of refusals at full rate was megabytes in one
        // transaction, which redb's copy on write doubled the file for.
        if !self.dead.is_empty() || (!self.is_empty() && (self.hurry || self.delivered.len() >= MAX_UNSETTLED)) {
            return Some(tokio::time::Instant::now());
        }
        self.since.filter(|_| !self.is_empty()).map(|t| t + SETTLE_EVERY)
    }
    fn clear(&mut self) {
        *self = Unsettled::default();
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Failures of one result, while others were delivered, before it is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 10;

pub async fn run<Q: Queue>(
    sink: Arc<Sink>,
    outbox: Arc<Q>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let key = sink.key.clone();
    let label = SinkLabel { sink: key.to_string() };
    let waker = outbox.waker(&key);
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = Attempts::default();
    let mut stop_at: Option<tokio::time::Instant> = None;
    let mut unsettled = Unsettled::default();
    // The first key not yet handed to the sink: what was delivered and waits for its settle
    // is not peeked again.
    let mut cursor = 0u64;
    loop {
        if stop_at.is_none() && *shutdown.borrow() {
            stop_at = Some(tokio::time::Instant::now() + grace);
        }
        if stop_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
            break;
        }
        if unsettled.due().is_some_and(|t| t <= tokio::time::Instant::now())
            && !settle(&sink, &outbox, &mut unsettled, &mut cursor).await
        {
            if stop_at.is_some() || !pause(&mut backoff, &mut shutdown).await {
                break;
            }
            continue;
        }
        // The cursor only skips what waits for its settle: with nothing waiting, it starts at
        // the head again, where a replay puts dead letters back under their old keys.
        if unsettled.is_empty() {
            cursor = 0;
        }
        // redb reads and fsyncs on a blocking thread, never on an async worker.
        let peeked = {
            let (outbox, key, n) = (outbox.clone(), key.clone(), sink.batch());
            tokio::task::spawn_blocking(move || outbox.peek(&key, cursor, n, super::BATCH_BYTES))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
        };
        let batch = match peeked {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(sink = %key, retry_in = ?backoff, "reading the outbox: {e:#}");
                if stop_at.is_some() || !pause(&mut backoff, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        attempts.keep_only(&batch);
        if batch.is_empty() {
            if stop_at.is_some() {
                break;
            }
            let due = unsettled.due();
            tokio::select! {
                _ = waker.notified() => {}
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
            }
            continue;
        }

        let outcomes = sink.deliver(&batch).await;
        let some_delivered = outcomes.iter().any(|o| *o == Outcome::Delivered);
        let mut delivered = Vec::new();
        let mut dead = Vec::new();
        let mut retry: Option<String> = None;
        let mut first_retried: Option<u64> = None;
        let mut busy = false;
        for (p, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Outcome::Delivered => delivered.push(p.key),
                Outcome::Dead(why) => {
                    tracing::error!(sink = %key, id = %p.record.id, "dead letter: {why}");
                    dead.push((p.key, why));
                }
                Outcome::Retry(why) if some_delivered => {
                    metrics.outbox_retried.get_or_create(&label).inc();
                    let n = attempts.failed(p.key);
                    if n >= MAX_ATTEMPTS {
                        let why = format!("failed {n} times while other results were delivered; last: {why}");
                        tracing::error!(sink = %key, id = %p.record.id, "dead letter: {why}");
                        dead.push((p.key, why));
                    } else {
                        first_retried.get_or_insert(p.key);
                        retry.get_or_insert(why);
                    }
                }
                Outcome::Retry(why) => {
                    metrics.outbox_retried.get_or_create(&label).inc();
                    first_retried.get_or_insert(p.key);
                    retry.get_or_insert(why);
                }
                Outcome::Busy(why) => {
                    metrics.outbox_retried.get_or_create(&label).inc();
                    busy = true;
                    first_retried.get_or_insert(p.key);
                    retry.get_or_insert(why);
                }
            }
        }
        for k in delivered.iter().chain(dead.iter().map(|(k, _)| k)) {
            attempts.forget(*k);
        }
        unsettled.add(delivered, dead);
        unsettled.hurry = outbox.short_of_disk();
        let (Some(why), Some(from)) = (retry, first_retried) else {
            cursor = batch.last().map_or(cursor, |p| p.key + 1);
            backoff = FIRST_BACKOFF;
            continue;
        };
        // The next attempt starts at what failed; what was delivered is settled first, so it
        // is not delivered again.
        cursor = from;
        if !settle(&sink, &outbox, &mut unsettled, &mut cursor).await {
            if stop_at.is_some() || !pause(&mut backoff, &mut shutdown).await {
                break;
            }
            continue;
        }
        if stop_at.is_some() {
            break;
        }
        // The sink took part of the batch: it works, and what failed is the results' own
        // problem. Retry soon, so a poison result meets its attempt cap quickly; unless the
        // upstream said it is busy, which is what backoff is for.
        if some_delivered && !busy {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(sink = %key, retry_in = ?backoff, "delivery failed: {why}");
        pause(&mut backoff, &mut shutdown).await;
    }
    if !settle(&sink, &outbox, &mut unsettled, &mut cursor).await {
        tracing::warn!(sink = %key, "stopped with deliveries unsettled: they will be delivered again at the next start");
    }
    tracing::debug!(sink = %key, "delivery worker stopped");
}

/// Makes the sink's deliveries durable, then settles them in one transaction; false if either
/// failed. Deliveries the sink could not make durable are forgotten and the cursor goes back
/// to the head, so they are delivered again; a failed settle keeps them, to settle later.
async fn settle<Q: Queue>(sink: &Arc<Sink>, outbox: &Arc<Q>, unsettled: &mut Unsettled, cursor: &mut u64) -> bool {
    if unsettled.is_empty() {
        return true;
    }
    if let Err(why) = sink.sync().await {
        tracing::error!(sink = %sink.key, "deliveries not durable, delivering them again: {why}");
        unsettled.clear();
        *cursor = 0;
        return false;
    }
    let settled = {
        let (outbox, key) = (outbox.clone(), sink.key.clone());
        let (delivered, dead) = (unsettled.delivered.clone(), unsettled.dead.clone());
        tokio::task::spawn_blocking(move || outbox.settle(&key, &delivered, &dead))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
    };
    match settled {
        Ok(()) => {
            unsettled.clear();
            true
        }
        Err(e) => {
            // Not settled: settled again after a backoff, or delivered again after a restart.
            tracing::error!(sink = %sink.key, "settling deliveries: {e:#}");
            false
        }
    }
}

/// Sleeps `backoff`, or less if shutdown begins, and doubles it; false if shutdown began.
async fn pause(backoff: &mut Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let stopping = tokio::select! {
        _ = tokio::time::sleep(*backoff) => false,
        _ = shutdown.changed() => true,
    };
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    !stopping && !*shutdown.borrow()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::config::SinkConfig;
    use crate::sinks::outbox::{Boot, Record, now_ms};

    fn pending(key: u64) -> Pending {
        let record = Record {
            id: format!("b/p/cam/{key}"),
            board: "b".into(),
            pipeline: "p".into(),
            camera: "cam".into(),
            seq: key,
            topic: "t".into(),
            content_type: "text/plain".into(),
            created_ms: now_ms(),
            boot: Boot::now(),
            error: None,
        };
        Pending { key, record, payload: Bytes::from_static(b"result") }
    }

    /// A queue of three results whose reads fail while `fail_peek` is set and whose settles
    /// fail while `fail_settle` is: the outbox's disk failing under a working sink.
    #[derive(Default)]
    struct Failing {
        fail_peek: std::sync::atomic::AtomicBool,
        fail_settle: std::sync::atomic::AtomicBool,
        peeks: AtomicUsize,
        settled: Mutex<Vec<u64>>,
        waker: Arc<Notify>,
    }

    impl Queue for Failing {
        fn peek(&self, _: &str, from: u64, _: usize, _: usize) -> anyhow::Result<Vec<Pending>> {
            self.peeks.fetch_add(1, Ordering::Relaxed);
            anyhow::ensure!(!self.fail_peek.load(Ordering::Relaxed), "injected read error");
            let settled = self.settled.lock().unwrap();
            Ok((from.max(1)..=3).filter(|k| !settled.contains(k)).map(pending).collect())
        }
        fn settle(&self, _: &str, delivered: &[u64], _: &[(u64, String)]) -> anyhow::Result<()> {
            anyhow::ensure!(!self.fail_settle.load(Ordering::Relaxed), "injected write error");
            self.settled.lock().unwrap().extend_from_slice(delivered);
            Ok(())
        }
        fn waker(&self, _: &Arc<str>) -> Arc<Notify> {
            self.waker.clone()
        }
    }

    fn file_sink(dir: &std::path::Path) -> (Arc<Sink>, std::path::PathBuf) {
        let path = dir.join("results.jsonl");
        let cfg = SinkConfig::File { path: path.clone() };
        let sink = Sink {
            key: crate::sinks::key(&cfg),
            kind: crate::sinks::Kind::File(Arc::new(crate::sinks::file::FileSink::new(path.clone()))),
        };
        (Arc::new(sink), path)
    }

    /// A worker delivering `queue` to a file sink in `dir`: the file, the stop, the task.
    fn start(
        dir: &std::path::Path,
        queue: &Arc<Failing>,
        grace: Duration,
    ) -> (std::path::PathBuf, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let (sink, path) = file_sink(dir);
        let (stop, shutdown) = watch::channel(false);
        let worker = tokio::spawn(run(sink, queue.clone(), Arc::new(Metrics::new()), shutdown, grace));
        (path, stop, worker)
    }

    fn lines(path: &std::path::Path) -> usize {
        std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
    }

    /// A settle that failed reset the backoff, and the worker delivered the same batch again at
    /// once, for as long as the settle kept failing: a flood of duplicates upstream.
    #[tokio::test]
    async fn a_failing_settle_backs_off_instead_of_redelivering_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let queue = Arc::new(Failing::default());
        queue.fail_settle.store(true, Ordering::Relaxed);
        let (path, stop, worker) = start(tmp.path(), &queue, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Backoff 0.2, 0.4, 0.8, 1.6 s: at most four attempts in three seconds (fewer on a
        // slow machine), each writing the batch of 3. Without it, thousands.
        let attempts = lines(&path) / 3;
        assert!((1..=5).contains(&attempts), "{attempts} deliveries of the same batch in 3 s");
        queue.fail_settle.store(false, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        while queue.settled.lock().unwrap().len() < 3 {
            assert!(t0.elapsed() < Duration::from_secs(10), "not settled once the disk works again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*queue.settled.lock().unwrap(), [1, 2, 3]);
        stop.send(true).unwrap();
        worker.await.unwrap();
    }

    /// A read error slept 30 s whatever the shutdown: a stop waited it out, past any grace.
    /// Now it backs off like a delivery and a shutdown ends the wait.
    #[tokio::test]
    async fn a_read_error_backs_off_and_a_shutdown_ends_the_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let queue = Arc::new(Failing::default());
        queue.fail_peek.store(true, Ordering::Relaxed);
        let (_, stop, worker) = start(tmp.path(), &queue, Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let peeks = queue.peeks.load(Ordering::Relaxed);
        assert!((1..=5).contains(&peeks), "{peeks} reads in 3 s");
        let t0 = tokio::time::Instant::now();
        stop.send(true).unwrap();
        worker.await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(1), "the stop waited {:?}", t0.elapsed());
    }

    #[test]
    fn attempts_keep_only_the_results_at_the_head() {
        let mut attempts = Attempts::default();
        assert_eq!((attempts.failed(1), attempts.failed(1), attempts.failed(2)), (1, 2, 1));
        // Result 1 left the queue without being settled here (evicted by the caps).
        attempts.keep_only(&[pending(2), pending(3)]);
        assert_eq!(attempts.0.keys().copied().collect::<Vec<_>>(), [2]);
        assert_eq!(attempts.failed(1), 1, "a result that comes back starts again");
    }
}
