//! The committer thread: everything waiting to be committed goes into one write transaction,
//! one fsync (group commit), on a thread of its own so no async worker waits on the disk.
//! The byte cap is kept in the same transaction (see [`super::eviction`]). A caught-up file
//! sink's results go to its file instead, fsynced in place of the transaction
//! ([`super::direct`]).
//!
//! A batch stays open for up to `commit_window` after its first result while other cameras'
//! frames may still join it ([`super::window`]), so they share its fsync; with none on its
//! way, it closes at once. Each commit also persists the settles made without an fsync
//! before it; on an idle board the committer persists them itself, [`super::PERSIST_AFTER`]
//! later.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redb::{Database, ReadableTable};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::db::Db;
use super::eviction::{self, Evicted};
use super::record::{disk_cost, encode};
use super::window::Cameras;
use super::{Behind, DEAD, Item, META, Outbox, PENDING, SEQ, State, direct};
use crate::metrics::Metrics;

/// Frames committed in one transaction at most.
const MAX_BATCH: usize = 256;

pub struct Commit {
    pub items: Vec<Item>,
    pub done: oneshot::Sender<Result<(), String>>,
    pub behind: Behind,
    /// The frame's [`super::Coming`], let go once the commit is in a batch.
    pub coming: Option<super::Coming>,
}

impl Commit {
    /// In a batch: the frame is no longer on its way. Held until here, a batch waited its
    /// whole window for the frame it had (a lone HTTP camera at 100 frames/s: 80 a second).
    fn arrived(mut self) -> Commit {
        self.coming = None;
        self
    }

    /// What its results will take on disk, near enough (the header is left out).
    fn cost(&self) -> u64 {
        self.items.iter().map(|i| disk_cost(i.payload.len())).sum()
    }
}

pub fn run(
    db: Arc<Db>,
    state: Arc<State>,
    metrics: Arc<Mutex<Arc<Metrics>>>,
    rx: mpsc::Receiver<Commit>,
    outbox: Weak<Outbox>,
) {
    // A runtime of its own for the window's timer; the disk work blocks only this thread.
    let clock = tokio::runtime::Builder::new_current_thread().enable_time().build();
    match clock {
        Ok(clock) => clock.block_on(commit_loop(db, state, metrics, rx, outbox)),
        Err(e) => tracing::error!("outbox committer cannot start its timer: {e}"),
    }
}

async fn commit_loop(
    db: Arc<Db>,
    state: Arc<State>,
    metrics: Arc<Mutex<Arc<Metrics>>>,
    mut rx: mpsc::Receiver<Commit>,
    outbox: Weak<Outbox>,
) {
    let mut cameras = Cameras::default();
    // A commit that arrived too large for the batch before it opens the next one.
    let mut held: Option<Commit> = None;
    loop {
        let first = match held.take() {
            Some(c) => c,
            None => match next_commit(&db, &state, &mut rx).await {
                Some(c) => c.arrived(),
                None => break,
            },
        };
        let window = Duration::from_nanos(state.commit_window_ns.load(Ordering::Relaxed));
        let opened = Instant::now();
        let close = opened + window;
        // Always asked, with no window too: it forgets silent cameras, whose ids are outside input.
        let mut awaited = cameras.due_by(opened, close);
        cameras.joined(&first, opened, close, &mut awaited);
        // A batch is one transaction, and redb holds its pages twice until it commits (and
        // those it frees, until the next): kept well inside the byte budget, a long window
        // cannot push the file past max_bytes. Batches of two 256 KiB frames under a 4 MiB cap
        // took the file to 4.7 MiB (faults.rs::a_misnamed_pubsub_*); one at a time, 2.1 MiB.
        let max_cost = eviction::budget(&state) / 4;
        let mut cost = first.cost();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && cost < max_cost {
            let more_coming = state.coming.load(Ordering::Acquire) > 0 || !awaited.is_empty();
            let next = match rx.try_recv() {
                Ok(c) => Some(c.arrived()),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                // Nothing else is on its way: waiting would only delay this frame.
                Err(mpsc::error::TryRecvError::Empty) if window.is_zero() || !more_coming => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(close, rx.recv()).await.ok().flatten().map(Commit::arrived)
                }
            };
            match next {
                Some(c) if cost + c.cost() > max_cost => {
                    held = Some(c);
                    break;
                }
                Some(c) => {
                    cameras.joined(&c, Instant::now(), close, &mut awaited);
                    cost += c.cost();
                    batch.push(c);
                }
                None => break,
            }
        }
        let current = metrics.lock().expect("metrics lock").clone();
        let result = write_batch(&db, &state, &current, &batch);
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
                state.failed_now();
            }
        }
    }
}

/// The commit that opens the next batch. While none comes, a settle made without an fsync
/// is persisted [`super::PERSIST_AFTER`] after it, unless a frame's commit does it first.
async fn next_commit(db: &Db, state: &State, rx: &mut mpsc::Receiver<Commit>) -> Option<Commit> {
    loop {
        tokio::select! {
            c = rx.recv() => return c,
            _ = state.persist_soon.notified() => match tokio::time::timeout(super::PERSIST_AFTER, rx.recv()).await {
                Ok(c) => return c,
                Err(_) => {
                    if let Err(e) = db.with(|db| persist(db, state)) {
                        tracing::warn!("outbox: persisting settles: {e:#}");
                    }
                }
            },
        }
    }
}

/// One durable commit of nothing, if a settle waits to be persisted.
pub fn persist(db: &Database, state: &State) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    if !state.persisting() {
        return Ok(());
    }
    state.commit_durably(txn, true)?;
    Ok(())
}

/// Commits `batch`: what goes into the outbox, with the sequence reservations, in one
/// transaction first, then each caught-up file sink's results into its file. A failed
/// transaction so leaves no line behind in a file for its retry to write again; a file that
/// cannot be written has its results stored in a second transaction.
fn write_batch(db: &Db, state: &State, metrics: &Metrics, batch: &[Commit]) -> anyhow::Result<Vec<Arc<str>>> {
    let chosen = direct::caught_up(batch, &state.view);
    let reserve = direct::reservations(batch, &chosen, &state.reserved.lock().expect("reserved lock"));
    let items = || batch.iter().flat_map(|c| &c.items);
    let stored: Vec<&Item> = items().zip(&chosen).filter(|(_, c)| !**c).map(|(i, _)| i).collect();
    let mut touched = Vec::new();
    // Written to files alone, a batch needs no transaction, unless settles wait to be
    // persisted: under a steady load the idle persist never comes.
    if !stored.is_empty() || !reserve.is_empty() || state.unpersisted.load(Ordering::Acquire) {
        touched = db.with(|db| store(db, state, metrics, &stored, &reserve))?;
        let mut reserved = state.reserved.lock().expect("reserved lock");
        for (camera, mark) in reserve {
            reserved.insert(camera.to_string(), mark);
        }
    }
    let written = direct::write(batch, &chosen, metrics);
    let failed: Vec<&Item> =
        items().zip(chosen.iter().zip(&written)).filter(|(_, (c, w))| **c && !**w).map(|(i, _)| i).collect();
    if !failed.is_empty() {
        touched.extend(db.with(|db| store(db, state, metrics, &failed, &HashMap::new()))?);
    }
    Ok(touched)
}

/// One durable transaction: `stored` into the pending queues, the sequence reservations, and
/// the byte cap.
fn store(
    db: &Database,
    state: &State,
    metrics: &Metrics,
    stored: &[&Item],
    reserve: &HashMap<&str, u64>,
) -> anyhow::Result<Vec<Arc<str>>> {
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
        let mut raise = |camera: &str, to: u64| -> anyhow::Result<()> {
            let last = seq.get(camera)?.map_or(0, |v| v.value());
            if to > last {
                seq.insert(camera, to)?;
            }
            Ok(())
        };
        for item in stored {
            let value = encode(&item.record, &item.payload);
            added += disk_cost(value.len());
            pending.insert((&*item.sink, next_id), value.as_slice())?;
            next_id += 1;
            raise(&item.record.camera, item.record.seq)?;
            if !touched.contains(&item.sink) {
                touched.push(item.sink.clone());
            }
        }
        for (camera, mark) in reserve {
            raise(camera, *mark)?;
        }
        meta.insert("next_id", next_id)?;
        let excess = (state.bytes.load(Ordering::Relaxed) + added).saturating_sub(eviction::budget(state));
        evicted = eviction::over_cap(&mut pending, &mut dead, excess, first_id)?;
    }
    let persisting = state.persisting();
    state.commit_durably(txn, persisting)?;
    // Only now, with the transaction durable, do the in-memory figures move, and by deltas:
    // a delivery worker settling at the same time moves them too.
    state.bytes.fetch_add(added, Ordering::Relaxed);
    state.next_id.store(next_id, Ordering::Relaxed);
    for item in stored {
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
