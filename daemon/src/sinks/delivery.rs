//! Delivery workers: one per sink, draining its outbox queue in order.
//!
//! A worker takes the oldest results, hands them to the sink, and settles each outcome in one
//! transaction: delivered ones leave the outbox, dead ones move to the dead letters, and on any
//! retry the worker backs off exponentially (0.2 s doubling to 30 s) before trying again, so a
//! downed sidecar is polled gently and never skipped past.
//!
//! A result that keeps failing while the results around it are delivered is poison (a
//! message the upstream broker will never take): after [`MAX_ATTEMPTS`] such failures it moves
//! to the dead letters with its last error, so it cannot hold back the rest. Failures that hit
//! every result alike (sidecar down, broker down behind it) never count: an outage must not
//! empty the outbox into the dead letters.
//!
//! On shutdown a worker keeps delivering until its queue is empty, a retry is needed, or the
//! grace period ends; whatever is left stays on disk for the next start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::outbox::Outbox;
use super::{Outcome, Sink};
use crate::metrics::{Metrics, SinkLabel};

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Failures of one result, while others were delivered, before it is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 10;

pub async fn run(
    sink: Arc<Sink>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let key = sink.key.clone();
    let label = SinkLabel { sink: key.to_string() };
    let waker = outbox.waker(&key);
    let mut backoff = FIRST_BACKOFF;
    let mut attempts: HashMap<u64, u32> = HashMap::new();
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        if stop_at.is_none() && *shutdown.borrow() {
            stop_at = Some(tokio::time::Instant::now() + grace);
        }
        if stop_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
            break;
        }
        // redb reads and fsyncs on a blocking thread, never on an async worker.
        let peeked = {
            let (outbox, key, n) = (outbox.clone(), key.clone(), sink.batch());
            tokio::task::spawn_blocking(move || outbox.peek(&key, n, super::BATCH_BYTES))
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
        // Only results at the head of the queue are retried; a count kept for one that left it
        // otherwise (evicted by the caps) would stay for ever.
        attempts.retain(|k, _| batch.iter().any(|p| p.key == *k));
        if batch.is_empty() {
            if stop_at.is_some() {
                break;
            }
            tokio::select! {
                _ = waker.notified() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }

        let outcomes = sink.deliver(&batch).await;
        let some_delivered = outcomes.iter().any(|o| *o == Outcome::Delivered);
        let mut delivered = Vec::new();
        let mut dead = Vec::new();
        let mut retry: Option<String> = None;
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
                    let n = attempts.entry(p.key).or_default();
                    *n += 1;
                    if *n >= MAX_ATTEMPTS {
                        let why = format!("failed {n} times while other results were delivered; last: {why}");
                        tracing::error!(sink = %key, id = %p.record.id, "dead letter: {why}");
                        attempts.remove(&p.key);
                        dead.push((p.key, why));
                    } else {
                        retry.get_or_insert(why);
                    }
                }
                Outcome::Retry(why) => {
                    metrics.outbox_retried.get_or_create(&label).inc();
                    retry.get_or_insert(why);
                }
                Outcome::Busy(why) => {
                    metrics.outbox_retried.get_or_create(&label).inc();
                    busy = true;
                    retry.get_or_insert(why);
                }
            }
        }
        for k in delivered.iter().chain(dead.iter().map(|(k, _)| k)) {
            attempts.remove(k);
        }
        let settled = {
            let (outbox, key) = (outbox.clone(), key.clone());
            tokio::task::spawn_blocking(move || outbox.settle(&key, &delivered, &dead))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
        };
        if let Err(e) = settled {
            // Not settled means delivered again later: a duplicate with the same id, never a
            // loss. Back off as for a failed delivery, or each failed settle floods the
            // upstream with the whole batch again.
            tracing::error!(sink = %key, retry_in = ?backoff, "settling deliveries: {e:#}");
            if stop_at.is_some() || !pause(&mut backoff, &mut shutdown).await {
                break;
            }
            continue;
        }
        match retry {
            None => backoff = FIRST_BACKOFF,
            Some(why) => {
                if stop_at.is_some() {
                    break;
                }
                // The sink took part of the batch: it works, and what failed is the results'
                // own problem. Retry soon, so a poison result meets its attempt cap quickly;
                // unless the upstream said it is busy, which is what backoff is for.
                if some_delivered && !busy {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(sink = %key, retry_in = ?backoff, "delivery failed: {why}");
                pause(&mut backoff, &mut shutdown).await;
            }
        }
    }
    tracing::debug!(sink = %key, "delivery worker stopped");
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
