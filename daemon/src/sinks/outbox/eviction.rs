//! Eviction: what keeps the outbox inside its caps, inside the transaction that needs it.
//!
//! `max_bytes` bounds pending results and dead letters together (a sink that refuses
//! everything fills the dead letters as fast as frames arrive). Over it, the oldest dead
//! letters go first, as they already failed, then the oldest pending results of any sink.
//! `max_age` applies to both, and to sinks no longer configured, which no worker ever reads:
//! the sweep thread looks at every sink.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redb::{ReadableTable, Table};

use super::record::{Boot, disk_cost, header};
use super::{DEAD, Outbox, PENDING, State};
use crate::metrics::{Metrics, SinkLabel};

type Rows<'t> = Table<'t, (&'static str, u64), &'static [u8]>;

/// What a transaction evicted; applied to the in-memory view once it has committed.
#[derive(Default)]
pub struct Evicted {
    pub bytes: u64,
    /// The sink of each evicted pending result.
    pub pending: Vec<String>,
    /// The sink of each evicted dead letter.
    pub dead: Vec<String>,
}

impl Evicted {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.dead.is_empty()
    }

    /// Moves the view, the byte count and the metrics by what was evicted.
    pub fn apply(&self, state: &State, metrics: &Metrics) {
        state.bytes.fetch_sub(self.bytes.min(state.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        for sink in &self.pending {
            state.view.remove(sink, 1, 0);
        }
        state.view.bury_gone(self.dead.len() as u64);
        for sink in self.pending.iter().chain(&self.dead) {
            metrics.outbox_evicted.get_or_create(&SinkLabel { sink: sink.clone() }).inc();
        }
    }
}

/// What pending results and dead letters may cost together, of `max_bytes`: a little under a
/// quarter. redb copies on write (until a transaction commits, the pages it frees cannot be
/// reused: up to twice what is live) and grows its file by doubling, which the file may not do
/// past `max_bytes` ([`super::capped`]). With this margin a refused growth, and the reopening
/// it costs, is rare: with a 4 MiB cap, counting to half took the file there every time.
pub fn budget(state: &State) -> u64 {
    budget_of(state.max_bytes.load(Ordering::Relaxed))
}

/// What live rows may take under a cap of `max_bytes`.
pub fn budget_of(max_bytes: u64) -> u64 {
    max_bytes / 32 * 7
}

/// Evicts the oldest rows until at least `excess` bytes are freed: dead letters first. Rows
/// from `keep_from` on are the ones being committed: rather than evict those (and report a
/// commit whose results are already gone), the commit fails.
pub fn over_cap<'t>(
    pending: &mut Rows<'t>,
    dead: &mut Rows<'t>,
    excess: u64,
    keep_from: u64,
) -> anyhow::Result<Evicted> {
    let mut out = Evicted::default();
    while out.bytes < excess {
        let (sink, len, was_dead) = if let Some((sink, id, len)) = oldest(dead)? {
            dead.remove((sink.as_str(), id))?;
            (sink, len, true)
        } else if let Some((sink, id, len)) = oldest(pending)?.filter(|(_, id, _)| *id < keep_from) {
            pending.remove((sink.as_str(), id))?;
            (sink, len, false)
        } else {
            anyhow::bail!(
                "these results do not fit outbox.max_bytes even with every older one evicted ({} bytes short)",
                excess - out.bytes
            );
        };
        out.bytes += len;
        if was_dead { out.dead.push(sink) } else { out.pending.push(sink) }
    }
    Ok(out)
}

/// Evicts every row older than `max_age_ms`, in every sink.
pub fn expired<'t>(pending: &mut Rows<'t>, dead: &mut Rows<'t>, max_age_ms: u64) -> anyhow::Result<Evicted> {
    let mut out = Evicted::default();
    let now = Boot::now();
    for (table, is_dead) in [(pending, false), (dead, true)] {
        for sink in sinks(table)? {
            // Keys grow with creation, so a sink's expired rows are its first ones.
            let mut old: Vec<(u64, u64)> = Vec::new();
            for row in table.range((sink.as_str(), 0)..=(sink.as_str(), u64::MAX))? {
                let (k, v) = row?;
                match header(v.value()) {
                    Ok(r) if r.age_ms(&now) <= max_age_ms => break,
                    // An unreadable row can never be delivered either.
                    _ => old.push((k.value().1, disk_cost(v.value().len()))),
                }
            }
            for (id, len) in old {
                table.remove((sink.as_str(), id))?;
                out.bytes += len;
                if is_dead { out.dead.push(sink.clone()) } else { out.pending.push(sink.clone()) }
            }
        }
    }
    Ok(out)
}

/// The distinct sink names in `table`, one indexed read each.
pub fn sinks(table: &impl ReadableTable<(&'static str, u64), &'static [u8]>) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    let mut from = String::new();
    while let Some(row) = table.range((from.as_str(), 0)..)?.next() {
        let sink = row?.0.value().0.to_string();
        from = format!("{sink}\u{0}");
        out.push(sink);
    }
    Ok(out)
}

/// The oldest row over all sinks: the smallest id among each sink's first entry.
fn oldest(table: &Rows) -> anyhow::Result<Option<(String, u64, u64)>> {
    let mut best: Option<(String, u64, u64)> = None;
    for sink in sinks(table)? {
        if let Some(row) = table.range((sink.as_str(), 0)..=(sink.as_str(), u64::MAX))?.next() {
            let (k, v) = row?;
            let id = k.value().1;
            if best.as_ref().is_none_or(|b| id < b.1) {
                best = Some((sink, id, disk_cost(v.value().len())));
            }
        }
    }
    Ok(best)
}

/// Sweeps expired rows every quarter of `max_age` (1 s to 1 min) until the outbox is gone.
pub fn sweep_thread(outbox: Weak<Outbox>) {
    loop {
        let Some(outbox) = outbox.upgrade() else { return };
        let max_age = Duration::from_millis(outbox.state.max_age_ms.load(Ordering::Relaxed));
        if let Err(e) = outbox.sweep() {
            tracing::warn!("outbox age sweep failed: {e:#}");
        }
        drop(outbox);
        std::thread::sleep((max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    }
}

impl Outbox {
    /// Evicts results and dead letters older than `max_age`, in every sink.
    pub fn sweep(self: &Arc<Self>) -> anyhow::Result<()> {
        let max_age_ms = self.state.max_age_ms.load(Ordering::Relaxed);
        let evicted = self.db.with(|db| {
            let txn = db.begin_write()?;
            let evicted = {
                let mut pending = txn.open_table(PENDING)?;
                let mut dead = txn.open_table(DEAD)?;
                expired(&mut pending, &mut dead, max_age_ms)?
            };
            if evicted.is_empty() {
                txn.abort()?;
            } else {
                txn.commit()?;
            }
            Ok(evicted)
        })?;
        if !evicted.is_empty() {
            evicted.apply(&self.state, &self.metrics());
            tracing::warn!(
                pending = evicted.pending.len(),
                dead_letters = evicted.dead.len(),
                "evicted results older than outbox.max_age"
            );
        }
        Ok(())
    }
}
