//! The durable outbox: every result is committed here before its frame is acknowledged, and
//! sits here until its sink has delivered it; but a result for a file sink with nothing
//! waiting here goes straight to its file within the commit ([`direct`]).
//!
//! One redb file under the state dir. Pending results are keyed `(sink, id)`, so each sink
//! drains its own queue in id order. Commits go through the [`committer`] thread, one fsync
//! for whatever is waiting; settles take none of their own (see [`State::commit_lazily`]).
//! Delivery workers read and settle their queue here, on blocking threads (their callers use
//! `spawn_blocking`). The status routes read the in-memory [`view`], never the tables.
//!
//! Caps keep the disk safe ([`eviction`]): `max_bytes` bounds pending results and dead letters
//! together, and whatever is older than `max_age` is evicted, in every sink, configured or not.

mod capped;
mod committer;
mod db;
mod direct;
mod eviction;
mod record;
mod view;
mod window;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{Notify, mpsc, oneshot};

use self::committer::Commit;
use self::db::Db;
use self::record::disk_cost;

/// Dead letters moved back per transaction by [`Outbox::replay_dead`].
const REPLAY_BATCH: usize = 256;
pub use self::record::{Boot, Record, decode, encode, now_ms};
use self::view::View;
use crate::metrics::{Metrics, SinkLabel};
use crate::sinks::file::FileSink;

const PENDING: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead");
/// Last frame sequence per camera, so ids stay unique across restarts.
const SEQ: TableDefinition<&str, u64> = TableDefinition::new("seq");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The highest sequence number of any camera whose state was forgotten.
const SEQ_FLOOR: &str = "seq_floor";

/// Each camera's last sequence number, and where a camera not among them starts.
struct Seqs {
    by_camera: HashMap<String, u64>,
    floor: u64,
}

/// A result waiting for one sink.
#[derive(Debug, Clone)]
pub struct Pending {
    pub key: u64,
    pub record: Record,
    pub payload: Bytes,
}

/// One result for one sink, to be committed.
#[derive(Clone)]
pub struct Item {
    pub sink: Arc<str>,
    pub record: Record,
    pub payload: Bytes,
    /// The sink's file, for a file sink: written within the commit while it is caught up.
    pub file: Option<Arc<FileSink>>,
}

pub struct Outbox {
    db: Arc<Db>,
    commits: mpsc::Sender<Commit>,
    seqs: Mutex<Seqs>,
    wakers: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
    state: Arc<State>,
    /// The running generation's metrics: a reload swaps in fresh ones.
    metrics: Arc<Mutex<Arc<Metrics>>>,
}

/// Shared with the committer thread.
struct State {
    next_id: AtomicU64,
    bytes: AtomicU64,
    /// Shared with the file, which may not grow past it.
    max_bytes: Arc<AtomicU64>,
    max_age_ms: AtomicU64,
    /// The last commit error, shown in health until a commit succeeds.
    error: Mutex<Option<String>>,
    /// When a write last failed (a full disk, most likely): see [`Outbox::short_of_disk`].
    failed_at: Mutex<Option<std::time::Instant>>,
    view: View,
    commit_window_ns: AtomicU64,
    /// Frames being made now, whose results will be committed soon.
    coming: AtomicU64,
    /// A settle was committed without an fsync since the last commit that had one.
    unpersisted: AtomicBool,
    /// Wakes an idle committer to persist such a settle.
    persist_soon: Notify,
    /// Each camera's sequence number stored ahead of its results written straight to files
    /// ([`direct`]), as far as this run has stored one.
    reserved: Mutex<HashMap<String, u64>>,
}

/// How long after a failed write the outbox counts as short of disk.
const SHORT_OF_DISK_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a settle may stay off the disk on an idle board before the committer persists it.
/// Past a second, so a camera sending one frame a second persists them with its commits.
const PERSIST_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

impl State {
    fn failed_now(&self) {
        *self.failed_at.lock().expect("failed_at lock") = Some(std::time::Instant::now());
    }

    /// Makes `txn`, a settle, commit without an fsync. Losing it in a crash delivers its
    /// results again, with their ids, and loses none; the next frame's commit persists it
    /// with its own fsync, or [`PERSIST_AFTER`] the committer does. Marked while `txn` holds
    /// redb's one write lock, so a durable commit that clears the mark cannot miss it.
    fn commit_lazily(&self, txn: &mut redb::WriteTransaction) -> anyhow::Result<()> {
        txn.set_durability(redb::Durability::None)?;
        if !self.unpersisted.swap(true, Ordering::AcqRel) {
            self.persist_soon.notify_one();
        }
        Ok(())
    }

    /// Called by a durable transaction holding the write lock: its commit persists every
    /// settle before it. True if there was one; restored if that commit fails.
    fn persisting(&self) -> bool {
        self.unpersisted.swap(false, Ordering::AcqRel)
    }

    /// Commits `txn`, a durable transaction that took [`State::persisting`]'s answer. If the
    /// commit fails, the settles it would have persisted are still waiting: the mark returns.
    fn commit_durably(&self, txn: redb::WriteTransaction, persisting: bool) -> Result<(), redb::CommitError> {
        txn.commit().inspect_err(|_| {
            if persisting {
                self.unpersisted.store(true, Ordering::Release);
            }
        })
    }
}

/// What the camera behind a commit does while it waits: tells a commit window whether the
/// camera's next frame can still join it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behind {
    /// An HTTP client or an event: nothing more comes from it until this commit answers.
    Answer,
    /// A camera worker, which makes and submits its next frame meanwhile.
    NextFrame,
}

/// A submitted commit ([`Outbox::submit`]), until its results are durable or it failed.
pub struct Committing(oneshot::Receiver<Result<(), String>>);

impl Committing {
    /// Waits until the results are on disk. Cancel-safe; call until it returns, not after.
    pub async fn durable(&mut self) -> anyhow::Result<()> {
        match (&mut self.0).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("outbox commit failed: {e}")),
            Err(_) => Err(anyhow::anyhow!("outbox closed")),
        }
    }
}

/// A frame on its way to a commit, counted while it lives (see [`Outbox::coming`]).
pub struct Coming(Arc<State>);

impl Drop for Coming {
    fn drop(&mut self) {
        self.0.coming.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Outbox {
    pub fn open(path: &Path, cfg: &crate::config::Outbox, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Outbox>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let max_bytes = Arc::new(AtomicU64::new(cfg.max_bytes.as_u64()));
        let db = Db::open(path, max_bytes.clone())?;
        let (next_id, seqs, bytes, per_sink, dead) = db.with(|db| {
            let txn = db.begin_write()?;
            let pending = txn.open_table(PENDING)?;
            let seq = txn.open_table(SEQ)?;
            let meta = txn.open_table(META)?;
            let next_id = meta.get("next_id")?.map_or(1, |v| v.value());
            let floor = meta.get(SEQ_FLOOR)?.map_or(0, |v| v.value());
            let seqs: HashMap<String, u64> =
                seq.iter()?.flatten().map(|(k, v)| (k.value().to_string(), v.value())).collect();
            let seqs = Seqs { by_camera: seqs, floor };
            // The one full count, at open; from here on the view moves with each transaction.
            let mut bytes = 0u64;
            let mut per_sink: BTreeMap<String, u64> = BTreeMap::new();
            for row in pending.iter()? {
                let (k, v) = row?;
                bytes += disk_cost(v.value().len());
                *per_sink.entry(k.value().0.to_string()).or_default() += 1;
            }
            // Dead letters count against max_bytes too.
            let mut dead = 0u64;
            for row in txn.open_table(DEAD)?.iter()? {
                bytes += disk_cost(row?.1.value().len());
                dead += 1;
            }
            drop((pending, seq, meta));
            txn.commit()?;
            Ok((next_id, seqs, bytes, per_sink, dead))
        })?;

        let db = Arc::new(db);
        let state = Arc::new(State {
            next_id: AtomicU64::new(next_id),
            bytes: AtomicU64::new(bytes),
            max_bytes,
            max_age_ms: AtomicU64::new(cfg.max_age.as_millis() as u64),
            error: Mutex::new(None),
            failed_at: Mutex::new(None),
            view: View::default(),
            commit_window_ns: AtomicU64::new(cfg.commit_window.as_nanos() as u64),
            coming: AtomicU64::new(0),
            unpersisted: AtomicBool::new(false),
            persist_soon: Notify::new(),
            reserved: Default::default(),
        });
        state.view.set(per_sink, dead);
        // A full queue makes committers wait (async) for the disk, never blocks a worker thread.
        let (tx, rx) = mpsc::channel::<Commit>(1024);
        let metrics = Arc::new(Mutex::new(metrics));
        let outbox = Arc::new(Outbox {
            db: db.clone(),
            commits: tx,
            seqs: Mutex::new(seqs),
            wakers: Mutex::new(HashMap::new()),
            state: state.clone(),
            metrics: metrics.clone(),
        });
        let weak = Arc::downgrade(&outbox);
        std::thread::Builder::new()
            .name("edgefn-outbox".into())
            .spawn(move || committer::run(db, state, metrics, rx, weak))
            .context("spawning the outbox committer")?;
        let weak = Arc::downgrade(&outbox);
        std::thread::Builder::new()
            .name("edgefn-outbox-sweep".into())
            .spawn(move || eviction::sweep_thread(weak))
            .context("spawning the outbox sweep")?;
        Ok(outbox)
    }

    /// A reload's caps and metrics; results already stored stay.
    pub fn reconfigure(&self, cfg: &crate::config::Outbox, metrics: Arc<Metrics>) {
        self.state.max_bytes.store(cfg.max_bytes.as_u64(), Ordering::Relaxed);
        self.state.max_age_ms.store(cfg.max_age.as_millis() as u64, Ordering::Relaxed);
        self.state.commit_window_ns.store(cfg.commit_window.as_nanos() as u64, Ordering::Relaxed);
        *self.metrics.lock().expect("metrics lock") = metrics;
    }

    fn metrics(&self) -> Arc<Metrics> {
        self.metrics.lock().expect("metrics lock").clone()
    }

    /// Counts a frame whose result will be committed soon, until the guard drops: a commit
    /// waits up to `commit_window` for such frames to share its fsync, and not at all when
    /// none is coming (a lone camera, a serial client).
    pub fn coming(&self) -> Coming {
        self.state.coming.fetch_add(1, Ordering::AcqRel);
        Coming(self.state.clone())
    }

    /// The next frame sequence number for `camera`.
    pub fn next_seq(&self, camera: &str) -> u64 {
        let mut seqs = self.seqs.lock().expect("seq lock");
        let floor = seqs.floor;
        let n = seqs.by_camera.entry(camera.to_string()).or_insert(floor);
        *n += 1;
        *n
    }

    /// Lets go of the sequence state of cameras gone idle (a camera id is outside input: kept
    /// for ever, it would grow without bound). Their numbers are not reused: a camera seen
    /// after this starts above every number ever forgotten, so no result id comes twice.
    pub fn forget_cameras(&self, cameras: &[String]) -> anyhow::Result<()> {
        if cameras.is_empty() {
            return Ok(());
        }
        let mut seqs = self.seqs.lock().expect("seq lock");
        let floor = cameras.iter().filter_map(|c| seqs.by_camera.get(c)).copied().fold(seqs.floor, u64::max);
        self.db.with(|db| {
            let txn = db.begin_write()?;
            {
                let mut seq = txn.open_table(SEQ)?;
                let mut meta = txn.open_table(META)?;
                meta.insert(SEQ_FLOOR, floor)?;
                for c in cameras {
                    seq.remove(c.as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })?;
        seqs.floor = floor;
        let mut reserved = self.state.reserved.lock().expect("reserved lock");
        for c in cameras {
            seqs.by_camera.remove(c);
            // Its row is gone: a frame it sends again reserves again.
            reserved.remove(c);
        }
        Ok(())
    }

    /// Why `item` could never be stored: alone it takes more than `max_bytes` allows.
    pub fn too_large(&self, item: &Item) -> Option<String> {
        let cost = disk_cost(record::encoded_len(&item.record, item.payload.len()));
        let budget = eviction::budget(&self.state);
        (cost > budget).then(|| {
            format!(
                "a {} byte result takes {cost} bytes in the outbox, over the {budget} that outbox.max_bytes ({} bytes) leaves for results",
                item.payload.len(),
                self.state.max_bytes.load(Ordering::Relaxed)
            )
        })
    }

    /// Commits `items` durably; returns once they are on disk.
    pub async fn commit(&self, items: Vec<Item>) -> anyhow::Result<()> {
        self.submit(items, Behind::Answer, self.coming()).await.durable().await
    }

    /// Queues `items` for the committer and returns at once. Commits are made in the order
    /// they were submitted, so a camera that submits its next frame before this one is durable
    /// has them stored in order, and they may share an fsync. `coming` counted the frame while
    /// it was made; the committer lets it go once the commit is in its batch, so the batch
    /// does not wait for the frame it already has.
    pub async fn submit(&self, items: Vec<Item>, behind: Behind, coming: Coming) -> Committing {
        let (done, wait) = oneshot::channel();
        if items.is_empty() {
            // A pipeline without sinks: nothing to make durable, and no fsync for it.
            let _ = done.send(Ok(()));
            return Committing(wait);
        }
        // A closed committer drops the sender with the commit: the wait then says so.
        let _ = self.commits.send(Commit { items, done, behind, coming: Some(coming) }).await;
        Committing(wait)
    }

    /// Persists the settles committed without an fsync (one fsync, none if there are none):
    /// at a stop, so a clean restart delivers nothing twice. Blocking.
    pub fn persist(&self) -> anyhow::Result<()> {
        self.db.with(|db| committer::persist(db, &self.state))
    }

    /// Woken whenever `sink` gets new results.
    pub fn waker(&self, sink: &Arc<str>) -> Arc<Notify> {
        self.wakers.lock().expect("waker lock").entry(sink.clone()).or_default().clone()
    }

    /// Up to `max` of the oldest results for `sink`, and no more than `max_bytes` of payload
    /// unless one result alone is larger. Expired ones are evicted on the way.
    pub fn peek(&self, sink: &str, max: usize, max_bytes: usize) -> anyhow::Result<Vec<Pending>> {
        self.peek_from(sink, 0, max, max_bytes)
    }

    /// [`Outbox::peek`] from key `from` on: past what a worker delivered and has yet to settle.
    pub fn peek_from(&self, sink: &str, from: u64, max: usize, max_bytes: usize) -> anyhow::Result<Vec<Pending>> {
        let max_age_ms = self.state.max_age_ms.load(Ordering::Relaxed);
        let now = Boot::now();
        let (out, expired) = self.db.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PENDING)?;
            let mut out = Vec::new();
            let mut expired = Vec::new();
            let mut bytes = 0usize;
            for row in table.range((sink, from)..=(sink, u64::MAX))? {
                let (k, v) = row?;
                if !out.is_empty() && bytes + v.value().len() > max_bytes {
                    break;
                }
                let (record, payload) = decode(v.value())?;
                if record.age_ms(&now) > max_age_ms {
                    expired.push(k.value().1);
                    continue;
                }
                bytes += v.value().len();
                out.push(Pending { key: k.value().1, record, payload });
                if out.len() >= max {
                    break;
                }
            }
            Ok((out, expired))
        })?;
        if !expired.is_empty() {
            tracing::warn!(sink, count = expired.len(), "evicting results older than outbox.max_age");
            self.remove(sink, &expired, &[], true)?;
        }
        Ok(out)
    }

    /// Removes delivered results and moves dead ones (with their reason) to the dead letters.
    pub fn settle(&self, sink: &str, delivered: &[u64], dead: &[(u64, String)]) -> anyhow::Result<()> {
        self.remove(sink, delivered, dead, false)
    }

    /// Whether a write failed in the last minute. Delivery workers then settle each delivery
    /// at once instead of in batches: results held for a shared settle take room in the file,
    /// and a full disk lets redb neither take another result nor free a page, so what can be
    /// freed is freed as soon as it can be.
    pub fn short_of_disk(&self) -> bool {
        self.state.failed_at.lock().expect("failed_at lock").is_some_and(|t| t.elapsed() < SHORT_OF_DISK_FOR)
    }

    fn remove(&self, sink: &str, gone: &[u64], dead: &[(u64, String)], evicted: bool) -> anyhow::Result<()> {
        // redb frees the pages a transaction replaces only in a durable commit. A dead letter
        // copies its whole result, and with those moves lazy, a sink refusing everything at
        // full rate took the file past max_bytes (faults.rs::a_misnamed_pubsub_*); short of
        // disk, every page must be freed now.
        let lazy = dead.is_empty() && !self.short_of_disk();
        let (freed, buried_bytes, removed, buried) = self
            .db
            .with(|db| {
                let mut txn = db.begin_write()?;
                if lazy {
                    self.state.commit_lazily(&mut txn)?;
                }
                let (mut freed, mut buried_bytes, mut removed, mut buried) = (0u64, 0u64, 0u64, 0u64);
                let mut pending = txn.open_table(PENDING)?;
                let mut dead_table = txn.open_table(DEAD)?;
                for key in gone {
                    if let Some(v) = pending.remove((sink, *key))? {
                        freed += disk_cost(v.value().len());
                        removed += 1;
                    }
                }
                for (key, why) in dead {
                    if let Some(v) = pending.remove((sink, *key))? {
                        let bytes = v.value().to_vec();
                        drop(v);
                        freed += disk_cost(bytes.len());
                        let (mut record, payload) = decode(&bytes)?;
                        record.error = Some(why.clone());
                        let value = encode(&record, &payload);
                        buried_bytes += disk_cost(value.len());
                        dead_table.insert((sink, *key), value.as_slice())?;
                        buried += 1;
                    }
                }
                drop((pending, dead_table));
                txn.commit()?;
                Ok((freed, buried_bytes, removed, buried))
            })
            .inspect_err(|_| self.state.failed_now())?;
        // Counted by what this transaction removed: an eviction may have taken some already.
        self.state.bytes.fetch_add(buried_bytes, Ordering::Relaxed);
        self.state.bytes.fetch_sub(freed.min(self.state.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        self.state.view.remove(sink, removed + buried, buried);
        let label = SinkLabel { sink: sink.to_string() };
        let metrics = self.metrics();
        if evicted {
            metrics.outbox_evicted.get_or_create(&label).inc_by(removed);
        } else {
            metrics.outbox_delivered.get_or_create(&label).inc_by(removed);
            metrics.outbox_dead.get_or_create(&label).inc_by(buried);
        }
        Ok(())
    }

    /// Moves every dead letter back to its sink's queue, where it keeps its place (its key) and
    /// its id; returns how many. For after the cause was fixed (a scope, a component). Runs in
    /// transactions of [`REPLAY_BATCH`], so a large backlog is never held in memory at once;
    /// a row that cannot be decoded stays where it is, with a warning, and the rest move.
    pub fn replay_dead(&self) -> anyhow::Result<u64> {
        let mut total = 0u64;
        let mut from: (String, u64) = (String::new(), 0);
        loop {
            let (moved, added, freed, next) = self.db.with(|db| {
                let txn = db.begin_write()?;
                let mut moved: Vec<(String, u64)> = Vec::new();
                let (mut added, mut freed) = (0u64, 0u64);
                let mut dead = txn.open_table(DEAD)?;
                let mut pending = txn.open_table(PENDING)?;
                let rows: Vec<((String, u64), Vec<u8>)> = dead
                    .range((from.0.as_str(), from.1)..)?
                    .take(REPLAY_BATCH)
                    .map(|row| row.map(|(k, v)| ((k.value().0.to_string(), k.value().1), v.value().to_vec())))
                    .collect::<Result<_, _>>()?;
                let next = rows.last().map(|((sink, key), _)| (sink.clone(), key + 1));
                for ((sink, key), bytes) in rows {
                    let (mut record, payload) = match decode(&bytes) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(sink = %sink, key, "dead letter left in place, it cannot be read: {e:#}");
                            continue;
                        }
                    };
                    record.error = None;
                    let value = encode(&record, &payload);
                    added += disk_cost(value.len());
                    freed += disk_cost(bytes.len());
                    pending.insert((sink.as_str(), key), value.as_slice())?;
                    dead.remove((sink.as_str(), key))?;
                    moved.push((sink, key));
                }
                drop((dead, pending));
                txn.commit()?;
                Ok((moved, added, freed, next))
            })?;
            self.state.bytes.fetch_add(added, Ordering::Relaxed);
            self.state.bytes.fetch_sub(freed.min(self.state.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
            let mut per_sink: BTreeMap<String, u64> = BTreeMap::new();
            for (sink, _) in &moved {
                *per_sink.entry(sink.clone()).or_default() += 1;
            }
            self.state.view.revive(&per_sink);
            for sink in per_sink.keys() {
                self.wake(&Arc::from(sink.as_str()));
            }
            total += moved.len() as u64;
            match next {
                Some(n) => from = n,
                None => return Ok(total),
            }
        }
    }

    /// The newest dead letters over every sink, at most `max`, newest last.
    pub fn dead_letters(&self, max: usize) -> anyhow::Result<Vec<(String, Record)>> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(DEAD)?;
            // Keys are (sink, id) and ids grow over every sink: the newest `max` are among
            // each sink's last `max`.
            let mut newest: Vec<(u64, String, Record)> = Vec::new();
            for sink in eviction::sinks(&table)? {
                for row in table.range((sink.as_str(), 0)..=(sink.as_str(), u64::MAX))?.rev().take(max) {
                    let (k, v) = row?;
                    match record::header(v.value()) {
                        Ok(r) => newest.push((k.value().1, sink.clone(), r)),
                        Err(e) => {
                            tracing::warn!(sink = %sink, key = k.value().1, "unreadable dead letter skipped: {e:#}")
                        }
                    }
                }
            }
            newest.sort_by_key(|(id, ..)| *id);
            let skip = newest.len().saturating_sub(max);
            Ok(newest.into_iter().skip(skip).map(|(_, sink, r)| (sink, r)).collect())
        })
    }

    /// Pending results for `sink` (from the view) and the age of the oldest, in seconds (one
    /// indexed read of the sink's first entry).
    pub fn depth(&self, sink: &str) -> anyhow::Result<(u64, f64)> {
        let n = self.state.view.pending(sink);
        if n == 0 {
            return Ok((0, 0.0));
        }
        let oldest = self.db.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PENDING)?;
            Ok(match table.range((sink, 0)..=(sink, u64::MAX))?.next() {
                Some(row) => Some(record::header(row?.1.value())?.age_ms(&Boot::now())),
                None => None,
            })
        })?;
        let Some(age_ms) = oldest else { return Ok((0, 0.0)) };
        Ok((n, age_ms as f64 / 1000.0))
    }

    /// Every sink with pending results, including ones no longer configured.
    pub fn sinks_with_pending(&self) -> Vec<String> {
        self.state.view.sinks()
    }

    /// Results in the dead letters.
    pub fn dead_count(&self) -> u64 {
        self.state.view.dead()
    }

    /// Pending results in all sinks.
    pub fn total(&self) -> u64 {
        self.state.view.total()
    }

    /// The last commit error, if the last commit failed.
    pub fn error(&self) -> Option<String> {
        self.state.error.lock().expect("error lock").clone()
    }

    fn wake(&self, sink: &Arc<str>) {
        if let Some(n) = self.wakers.lock().expect("waker lock").get(sink) {
            n.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64) -> Item {
        Item {
            sink: "s".into(),
            record: Record {
                id: format!("b/p/cam/{seq}"),
                board: "b".into(),
                pipeline: "p".into(),
                camera: "cam".into(),
                seq,
                topic: "t".into(),
                content_type: "text/plain".into(),
                created_ms: now_ms(),
                boot: Boot::now(),
                error: None,
            },
            payload: Bytes::from_static(b"result"),
            file: None,
        }
    }

    /// One undecodable dead letter aborted the whole replay (one transaction, `decode()?`),
    /// so no dead letter could be replayed at all. Now it stays, named, and the rest move.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undecodable_dead_letter_stays_and_the_rest_are_replayed() {
        let tmp = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&tmp.path().join("o.redb"), &Default::default(), Arc::new(Metrics::new())).unwrap();
        outbox.commit((1..=3).map(item).collect()).await.unwrap();
        let keys: Vec<u64> = outbox.peek("s", 10, usize::MAX).unwrap().iter().map(|p| p.key).collect();
        let dead: Vec<(u64, String)> = keys.iter().map(|k| (*k, "refused".to_string())).collect();
        outbox.settle("s", &[], &dead).unwrap();
        // A torn row, as a bad sector or an older format would leave it.
        outbox
            .db
            .with(|db| {
                let txn = db.begin_write()?;
                txn.open_table(DEAD)?.insert(("s", keys[1]), &b"\x00garbage"[..])?;
                txn.commit()?;
                Ok(())
            })
            .unwrap();
        assert_eq!(outbox.replay_dead().unwrap(), 2);
        let back: Vec<u64> = outbox.peek("s", 10, usize::MAX).unwrap().iter().map(|p| p.record.seq).collect();
        assert_eq!(back, [1, 3]);
        let left =
            outbox.db.with(|db| Ok(redb::ReadableTableMetadata::len(&db.begin_read()?.open_table(DEAD)?)?)).unwrap();
        assert_eq!(left, 1, "the unreadable row stays where it was");
        assert!(outbox.dead_letters(10).unwrap().is_empty(), "the page lists no unreadable row");
    }
}
