//! What the camera workers are doing, for the watchdog: which are in a call, since when and
//! for how long they may be, and which are retrying a failure that passes.
//!
//! Two states the old health check could not tell apart:
//! - **degraded**: a worker retries a passing failure (a full disk, a model not loaded, a
//!   saturated function). Every attempt returns; the daemon is alive and says why it is not
//!   well, in the log, `STATUS=` and `/healthz`. A restart would not help, so the watchdog
//!   keeps being pinged.
//! - **wedged**: one attempt has run past what its chain's own deadlines allow. Each function
//!   in the chain may wait for a slot, wait for a model context and run, each up to its
//!   deadline, so the limit is three deadlines per function, plus [`COMMIT_ALLOWANCE`] for the
//!   outbox commit. Past that, something below the sandbox is stuck (a host call that no
//!   deadline interrupts, a hung disk); only then does the watchdog stop being pinged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The outbox commit of one result, beyond the chain's deadlines: fsyncs on a slow SD card.
pub const COMMIT_ALLOWANCE: Duration = Duration::from_secs(10);

/// How long one attempt of a chain may take before it counts as wedged.
pub fn wedge_limit(deadlines: impl IntoIterator<Item = Duration>) -> Duration {
    deadlines.into_iter().map(|d| d * 3).sum::<Duration>() + COMMIT_ALLOWANCE
}

#[derive(Default)]
pub struct Progress {
    workers: Mutex<HashMap<(String, String), Worker>>,
}

struct Worker {
    /// The attempt in progress: when it began and how long it may take.
    attempt: Option<(Instant, Duration)>,
    /// The passing failure the worker retries, if it does.
    retrying: Option<String>,
}

/// A worker that takes an attempt longer than its chain allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wedged {
    pub pipeline: String,
    pub camera: String,
    pub running: Duration,
    pub limit: Duration,
}

impl Progress {
    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Worker>> {
        self.workers.lock().expect("progress lock")
    }

    /// A worker begins an attempt at a frame that may take up to `limit`.
    pub fn attempt(&self, pipeline: &str, camera: &str, limit: Duration) {
        let mut w = self.workers();
        let worker =
            w.entry((pipeline.to_string(), camera.to_string())).or_insert(Worker { attempt: None, retrying: None });
        worker.attempt = Some((Instant::now(), limit));
    }

    /// The worker settled its oldest frame and has more under way: the clock starts again for
    /// the next, whose commit was submitted while the one before it committed.
    pub fn next(&self, pipeline: &str, camera: &str, limit: Duration) {
        if let Some(worker) = self.workers().get_mut(&(pipeline.to_string(), camera.to_string())) {
            worker.attempt = Some((Instant::now(), limit));
            worker.retrying = None;
        }
    }

    /// The attempt ended in a failure that passes; the worker will try again.
    pub fn retrying(&self, pipeline: &str, camera: &str, cause: String) {
        if let Some(worker) = self.workers().get_mut(&(pipeline.to_string(), camera.to_string())) {
            worker.attempt = None;
            worker.retrying = Some(cause);
        }
    }

    /// The worker is done with its frame, for better or worse.
    pub fn settled(&self, pipeline: &str, camera: &str) {
        self.workers().remove(&(pipeline.to_string(), camera.to_string()));
    }

    /// The first worker found past its limit, if any.
    pub fn wedged(&self) -> Option<Wedged> {
        self.workers().iter().find_map(|((pipeline, camera), w)| {
            let (started, limit) = w.attempt?;
            let running = started.elapsed();
            (running > limit).then(|| Wedged { pipeline: pipeline.clone(), camera: camera.clone(), running, limit })
        })
    }

    /// Why workers retry, one line per distinct cause and pipeline (a full disk is one line,
    /// however many cameras it stops).
    pub fn degraded(&self) -> Vec<String> {
        let mut causes: Vec<String> = self
            .workers()
            .iter()
            .filter_map(|((pipeline, _), w)| Some(format!("pipeline {pipeline} retrying: {}", w.retrying.as_ref()?)))
            .collect();
        causes.sort();
        causes.dedup();
        causes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrying_is_degraded_and_only_a_long_attempt_is_wedged() {
        let p = Progress::default();
        p.attempt("p", "cam", Duration::from_millis(30));
        assert_eq!(p.wedged(), None);
        p.retrying("p", "cam", "result not stored: disk full".into());
        std::thread::sleep(Duration::from_millis(50));
        // Between attempts, however long the retries go on: degraded, not wedged.
        assert_eq!(p.wedged(), None);
        assert_eq!(p.degraded(), ["pipeline p retrying: result not stored: disk full"]);
        p.attempt("p", "cam", Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(p.wedged().map(|w| w.camera), Some("cam".to_string()));
        p.settled("p", "cam");
        assert_eq!((p.wedged(), p.degraded().len()), (None, 0));
    }

    #[test]
    fn the_limit_is_three_deadlines_per_function_and_the_commit() {
        let limit = wedge_limit([Duration::from_secs(5), Duration::from_secs(1)]);
        assert_eq!(limit, Duration::from_secs(18) + COMMIT_ALLOWANCE);
    }
}
