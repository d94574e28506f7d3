//! What the status routes read, kept in memory: results pending per sink, and dead letters.
//!
//! `/metrics`, `/v1/status`, the event stream and the health loop all read this instead of
//! counting the outbox table, so their cost does not grow with a backlog (a sidecar down for
//! a day). It is counted once at open, then moved by exactly the rows each transaction
//! inserted or removed, after that transaction committed.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct View {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    pending: BTreeMap<String, u64>,
    dead: u64,
}

impl View {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().expect("view lock")
    }

    pub fn set(&self, pending: BTreeMap<String, u64>, dead: u64) {
        *self.counts() = Counts { pending, dead };
    }

    pub fn add(&self, sink: &str, n: u64) {
        if n > 0 {
            *self.counts().pending.entry(sink.to_string()).or_default() += n;
        }
    }

    /// `n` results left `sink`'s queue; `dead` of them for the dead letters.
    pub fn remove(&self, sink: &str, n: u64, dead: u64) {
        let mut c = self.counts();
        if let Some(p) = c.pending.get_mut(sink) {
            *p = p.saturating_sub(n);
            if *p == 0 {
                c.pending.remove(sink);
            }
        }
        c.dead += dead;
    }

    /// `n` dead letters were evicted.
    pub fn bury_gone(&self, n: u64) {
        let mut c = self.counts();
        c.dead = c.dead.saturating_sub(n);
    }

    /// Dead letters went back to their queues.
    pub fn revive(&self, per_sink: &BTreeMap<String, u64>) {
        let mut c = self.counts();
        for (sink, n) in per_sink {
            *c.pending.entry(sink.clone()).or_default() += n;
            c.dead = c.dead.saturating_sub(*n);
        }
    }

    pub fn pending(&self, sink: &str) -> u64 {
        self.counts().pending.get(sink).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.counts().pending.values().sum()
    }

    pub fn dead(&self) -> u64 {
        self.counts().dead
    }

    /// Sinks with results waiting, configured or not.
    pub fn sinks(&self) -> Vec<String> {
        self.counts().pending.keys().cloned().collect()
    }
}
