//! The committer thread: everything waiting to be committed goes into one write transaction,
//! one fsync (group commit), on a thread of its own so no async worker waits on the disk.
//! The byte cap is kept in the same transaction (see [`super::eviction`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use redb::{Database, ReadableTable};

use super::db::Db;
use tokio::sync::{mpsc, oneshot};

use super::eviction::{self, Evicted};
use super::record::{disk_cost, encode};
use super::{DEAD, Item, META, Outbox, PENDING, SEQ, State};
use crate::metrics::Metrics;

pub struct Commit {
    pub items: Vec<Item>,
    pub done: oneshot::Sender<Result<(), String>>,
}

pub fn run(
    db: Arc<Db>,
    state: Arc<State>,
    metrics: Arc<Mutex<Arc<Metrics>>>,
    mut rx: mpsc::Receiver<Commit>,
    outbox: Weak<Outbox>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let current = metrics.lock().expect("metrics lock").clone();
        let result = db.with(|db| write_batch(db, &state, &current, &batch));
        let frames = batch.len();
        // Frames are acknowledged before delivery starts: an ack still in flight when the
        // result is already upstream is what makes a broker restart redeliver a frame.
        for c in batch {
            let _ = c.done.send(result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
        }
        match &result {
            Ok(touched) => {
                *state.error.lock().expect("error lock") = None;
                if let Some(outbox) = outbox.upgrade() {
                    for sink in touched {
                        outbox.wake(sink);
                    }
                }
            }
            Err(e) => {
                tracing::error!("outbox commit failed ({frames} frames not acknowledged): {e:#}");
                *state.error.lock().expect("error lock") = Some(format!("{e:#}"));
            }
        }
    }
}

fn write_batch(db: &Database, state: &State, metrics: &Metrics, batch: &[Commit]) -> anyhow::Result<Vec<Arc<str>>> {
    let txn = db.begin_write()?;
    let mut touched: Vec<Arc<str>> = Vec::new();
    let mut added = 0u64;
    let first_id = state.next_id.load(Ordering::Relaxed);
    let mut next_id = first_id;
    let evicted: Evicted;
    {
        let mut pending = txn.open_table(PENDING)?;
        let mut dead = txn.open_table(DEAD)?;
        let mut seq = txn.open_table(SEQ)?;
        let mut meta = txn.open_table(META)?;
        for item in batch.iter().flat_map(|c| &c.items) {
            let value = encode(&item.record, &item.payload);
            added += disk_cost(value.len());
            pending.insert((&*item.sink, next_id), value.as_slice())?;
            next_id += 1;
            let last = seq.get(item.record.camera.as_str())?.map_or(0, |v| v.value());
            if item.record.seq > last {
                seq.insert(item.record.camera.as_str(), item.record.seq)?;
            }
            if !touched.contains(&item.sink) {
                touched.push(item.sink.clone());
            }
        }
        meta.insert("next_id", next_id)?;
        let excess = (state.bytes.load(Ordering::Relaxed) + added).saturating_sub(eviction::budget(state));
        evicted = eviction::over_cap(&mut pending, &mut dead, excess, first_id)?;
    }
    txn.commit()?;
    // Only now, with the transaction durable, do the in-memory figures move, and by deltas:
    // a delivery worker settling at the same time moves them too.
    state.bytes.fetch_add(added, Ordering::Relaxed);
    state.next_id.store(next_id, Ordering::Relaxed);
    for item in batch.iter().flat_map(|c| &c.items) {
        state.view.add(&item.sink, 1);
    }
    evicted.apply(state, metrics);
    if !evicted.is_empty() {
        tracing::warn!(
            pending = evicted.pending.len(),
            dead_letters = evicted.dead.len(),
            "outbox over max_bytes: evicted the oldest"
        );
    }
    Ok(touched)
}
