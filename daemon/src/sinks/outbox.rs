//! The durable outbox: every result is committed here before its frame is acknowledged, and
//! sits here until its sink has delivered it.
//!
//! One redb file under the state dir. Pending results are keyed `(sink, id)`, so each sink
//! drains its own queue in id order. Commits go through one committer thread that folds
//! whatever is waiting into a single transaction (group commit): one fsync covers many frames
//! when cameras are busy, and an idle board pays no batching delay.
//!
//! Caps keep the disk safe: past `max_bytes` the oldest results are evicted (and counted), and
//! results older than `max_age` are evicted instead of delivered.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::metrics::{Metrics, SinkLabel};

const PENDING: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead");
/// Last frame sequence per camera, so ids stay unique across restarts.
const SEQ: TableDefinition<&str, u64> = TableDefinition::new("seq");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// What is known of a result besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Stable id (`pipeline/camera/seq`): the CloudEvent id, the same on every retry.
    pub id: String,
    pub pipeline: String,
    pub camera: String,
    pub seq: u64,
    /// The sink's resolved destination (e.g. the MQTT topic).
    pub topic: String,
    pub content_type: String,
    pub created_ms: u64,
    /// Why it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A result waiting for one sink.
#[derive(Debug, Clone)]
pub struct Pending {
    pub key: u64,
    pub record: Record,
    pub payload: Bytes,
}

/// One result for one sink, to be committed.
pub struct Item {
    pub sink: Arc<str>,
    pub record: Record,
    pub payload: Bytes,
}

struct Commit {
    items: Vec<Item>,
    done: oneshot::Sender<Result<(), String>>,
}

pub struct Outbox {
    db: Arc<Database>,
    commits: mpsc::Sender<Commit>,
    seqs: Mutex<HashMap<String, u64>>,
    wakers: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
    state: Arc<State>,
    /// The running generation's metrics: a reload swaps in fresh ones.
    metrics: Arc<Mutex<Arc<Metrics>>>,
}

/// Shared with the committer thread.
struct State {
    next_id: AtomicU64,
    bytes: AtomicU64,
    max_bytes: AtomicU64,
    max_age_ms: AtomicU64,
    /// The last commit error, shown in health until a commit succeeds.
    error: Mutex<Option<String>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Outbox {
    pub fn open(path: &Path, cfg: &crate::config::Outbox, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Outbox>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let db = Database::create(path).with_context(|| format!("opening outbox {}", path.display()))?;
        let txn = db.begin_write()?;
        let (next_id, seqs, bytes) = {
            let pending = txn.open_table(PENDING)?;
            txn.open_table(DEAD)?;
            let seq = txn.open_table(SEQ)?;
            let meta = txn.open_table(META)?;
            let next_id = meta.get("next_id")?.map_or(1, |v| v.value());
            let seqs: HashMap<String, u64> =
                seq.iter()?.flatten().map(|(k, v)| (k.value().to_string(), v.value())).collect();
            let mut bytes = 0u64;
            let mut per_sink: BTreeMap<String, i64> = BTreeMap::new();
            for row in pending.iter()? {
                let (k, v) = row?;
                bytes += v.value().len() as u64;
                *per_sink.entry(k.value().0.to_string()).or_default() += 1;
            }
            for (sink, n) in per_sink {
                metrics.outbox_depth.get_or_create(&SinkLabel { sink }).set(n);
            }
            (next_id, seqs, bytes)
        };
        txn.commit()?;

        let db = Arc::new(db);
        let state = Arc::new(State {
            next_id: AtomicU64::new(next_id),
            bytes: AtomicU64::new(bytes),
            max_bytes: AtomicU64::new(cfg.max_bytes.as_u64()),
            max_age_ms: AtomicU64::new(cfg.max_age.as_millis() as u64),
            error: Mutex::new(None),
        });
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
            .spawn(move || committer(db, state, metrics, rx, weak))
            .context("spawning the outbox committer")?;
        Ok(outbox)
    }

    /// A reload's caps and metrics; results already stored stay.
    pub fn reconfigure(&self, cfg: &crate::config::Outbox, metrics: Arc<Metrics>) {
        self.state.max_bytes.store(cfg.max_bytes.as_u64(), Ordering::Relaxed);
        self.state.max_age_ms.store(cfg.max_age.as_millis() as u64, Ordering::Relaxed);
        *self.metrics.lock().expect("metrics lock") = metrics;
    }

    fn metrics(&self) -> Arc<Metrics> {
        self.metrics.lock().expect("metrics lock").clone()
    }

    /// The next frame sequence number for `camera`.
    pub fn next_seq(&self, camera: &str) -> u64 {
        let mut seqs = self.seqs.lock().expect("seq lock");
        let n = seqs.entry(camera.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    /// Commits `items` durably; returns once they are on disk.
    pub async fn commit(&self, items: Vec<Item>) -> anyhow::Result<()> {
        let (done, wait) = oneshot::channel();
        self.commits.send(Commit { items, done }).await.map_err(|_| anyhow::anyhow!("outbox closed"))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("outbox commit failed: {e}")),
            Err(_) => Err(anyhow::anyhow!("outbox closed")),
        }
    }

    /// Woken whenever `sink` gets new results.
    pub fn waker(&self, sink: &Arc<str>) -> Arc<Notify> {
        self.wakers.lock().expect("waker lock").entry(sink.clone()).or_default().clone()
    }

    /// Up to `max` of the oldest results for `sink`. Expired ones are evicted on the way.
    pub fn peek(&self, sink: &str, max: usize) -> anyhow::Result<Vec<Pending>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PENDING)?;
        let oldest_allowed = now_ms().saturating_sub(self.state.max_age_ms.load(Ordering::Relaxed));
        let mut out = Vec::new();
        let mut expired = Vec::new();
        for row in table.range((sink, 0)..=(sink, u64::MAX))? {
            let (k, v) = row?;
            let (record, payload) = decode(v.value())?;
            if record.created_ms < oldest_allowed {
                expired.push(k.value().1);
                continue;
            }
            out.push(Pending { key: k.value().1, record, payload });
            if out.len() >= max {
                break;
            }
        }
        drop(table);
        drop(txn);
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

    fn remove(&self, sink: &str, gone: &[u64], dead: &[(u64, String)], evicted: bool) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        let mut freed = 0u64;
        {
            let mut pending = txn.open_table(PENDING)?;
            let mut dead_table = txn.open_table(DEAD)?;
            for key in gone {
                if let Some(v) = pending.remove((sink, *key))? {
                    freed += v.value().len() as u64;
                }
            }
            for (key, why) in dead {
                if let Some(v) = pending.remove((sink, *key))? {
                    let bytes = v.value().to_vec();
                    drop(v);
                    freed += bytes.len() as u64;
                    let (mut record, payload) = decode(&bytes)?;
                    record.error = Some(why.clone());
                    dead_table.insert((sink, *key), encode(&record, &payload).as_slice())?;
                }
            }
        }
        txn.commit()?;
        self.state.bytes.fetch_sub(freed.min(self.state.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        let label = SinkLabel { sink: sink.to_string() };
        let n = (gone.len() + dead.len()) as i64;
        let metrics = self.metrics();
        metrics.outbox_depth.get_or_create(&label).dec_by(n);
        if evicted {
            metrics.outbox_evicted.get_or_create(&label).inc_by(gone.len() as u64);
        } else {
            metrics.outbox_delivered.get_or_create(&label).inc_by(gone.len() as u64);
            metrics.outbox_dead.get_or_create(&label).inc_by(dead.len() as u64);
        }
        Ok(())
    }

    /// Moves every dead letter back to its sink's queue, where it keeps its place (its key) and
    /// its id; returns how many. For after the cause was fixed (a scope, a component).
    pub fn replay_dead(&self) -> anyhow::Result<u64> {
        let txn = self.db.begin_write()?;
        let mut moved: Vec<(String, u64)> = Vec::new();
        let mut added = 0u64;
        {
            let mut dead = txn.open_table(DEAD)?;
            let mut pending = txn.open_table(PENDING)?;
            let rows: Vec<((String, u64), Vec<u8>)> = dead
                .iter()?
                .map(|row| row.map(|(k, v)| ((k.value().0.to_string(), k.value().1), v.value().to_vec())))
                .collect::<Result<_, _>>()?;
            for ((sink, key), bytes) in rows {
                let (mut record, payload) = decode(&bytes)?;
                record.error = None;
                let value = encode(&record, &payload);
                added += value.len() as u64;
                pending.insert((sink.as_str(), key), value.as_slice())?;
                dead.remove((sink.as_str(), key))?;
                moved.push((sink, key));
            }
        }
        txn.commit()?;
        self.state.bytes.fetch_add(added, Ordering::Relaxed);
        let metrics = self.metrics();
        let mut sinks: Vec<&str> = moved.iter().map(|(s, _)| s.as_str()).collect();
        sinks.dedup();
        for sink in sinks {
            metrics
                .outbox_depth
                .get_or_create(&SinkLabel { sink: sink.to_string() })
                .inc_by(moved.iter().filter(|(s, _)| s == sink).count() as i64);
            self.wake(&Arc::from(sink));
        }
        Ok(moved.len() as u64)
    }

    /// Dead letters, newest last, at most `max`.
    pub fn dead_letters(&self, max: usize) -> anyhow::Result<Vec<(String, Record)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEAD)?;
        let mut out = Vec::new();
        for row in table.iter()?.take(max) {
            let (k, v) = row?;
            out.push((k.value().0.to_string(), decode(v.value())?.0));
        }
        Ok(out)
    }

    /// Pending results for `sink` and the age of the oldest, in seconds.
    pub fn depth(&self, sink: &str) -> anyhow::Result<(u64, f64)> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PENDING)?;
        let mut range = table.range((sink, 0)..=(sink, u64::MAX))?;
        let oldest = match range.next() {
            Some(row) => decode(row?.1.value())?.0.created_ms,
            None => return Ok((0, 0.0)),
        };
        let n = 1 + range.count() as u64;
        Ok((n, now_ms().saturating_sub(oldest) as f64 / 1000.0))
    }

    /// Every sink with pending results, including ones no longer configured.
    pub fn sinks_with_pending(&self) -> anyhow::Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PENDING)?;
        let mut sinks: Vec<String> = Vec::new();
        for row in table.iter()? {
            let k = row?.0.value().0.to_string();
            if sinks.last() != Some(&k) {
                sinks.push(k);
            }
        }
        Ok(sinks)
    }

    /// Results in the dead letters.
    pub fn dead_count(&self) -> anyhow::Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(DEAD)?.len()?)
    }

    /// Pending results in all sinks.
    pub fn total(&self) -> anyhow::Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(PENDING)?.len()?)
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

/// The committer thread: one write transaction (one fsync) for everything waiting.
fn committer(
    db: Arc<Database>,
    state: Arc<State>,
    metrics: Arc<Mutex<Arc<Metrics>>>,
    mut rx: mpsc::Receiver<Commit>,
    outbox: std::sync::Weak<Outbox>,
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
            }
        }
    }
}

fn write_batch(db: &Database, state: &State, metrics: &Metrics, batch: &[Commit]) -> anyhow::Result<Vec<Arc<str>>> {
    let txn = db.begin_write()?;
    let mut touched: Vec<Arc<str>> = Vec::new();
    let mut added = 0u64;
    let mut evicted: Vec<(String, u64)> = Vec::new();
    let mut next_id = state.next_id.load(Ordering::Relaxed);
    {
        let mut pending = txn.open_table(PENDING)?;
        let mut seq = txn.open_table(SEQ)?;
        let mut meta = txn.open_table(META)?;
        for item in batch.iter().flat_map(|c| &c.items) {
            let value = encode(&item.record, &item.payload);
            added += value.len() as u64;
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

        // Over the byte cap: evict the oldest results, whichever sink holds them.
        let mut bytes = state.bytes.load(Ordering::Relaxed) + added;
        while bytes > state.max_bytes.load(Ordering::Relaxed) {
            let Some((sink, id, len)) = oldest(&pending)? else {
                break;
            };
            pending.remove((sink.as_str(), id))?;
            bytes -= len;
            evicted.push((sink, id));
        }
        state.bytes.store(bytes, Ordering::Relaxed);
    }
    txn.commit()?;
    state.next_id.store(next_id, Ordering::Relaxed);
    for item in batch.iter().flat_map(|c| &c.items) {
        metrics.outbox_depth.get_or_create(&SinkLabel { sink: item.sink.to_string() }).inc();
    }
    for (sink, _) in &evicted {
        let label = SinkLabel { sink: sink.clone() };
        metrics.outbox_depth.get_or_create(&label).dec();
        metrics.outbox_evicted.get_or_create(&label).inc();
    }
    if !evicted.is_empty() {
        tracing::warn!(count = evicted.len(), "outbox over max_bytes: evicted the oldest results");
    }
    Ok(touched)
}

/// The oldest pending result over all sinks: the smallest id among each sink's first entry.
fn oldest(table: &redb::Table<(&str, u64), &[u8]>) -> anyhow::Result<Option<(String, u64, u64)>> {
    let mut best: Option<(String, u64, u64)> = None;
    let mut from: String = String::new();
    loop {
        let mut range = table.range((from.as_str(), 0)..)?;
        let Some(row) = range.next() else { break };
        let (k, v) = row?;
        let (sink, id) = k.value();
        if best.as_ref().is_none_or(|b| id < b.1) {
            best = Some((sink.to_string(), id, v.value().len() as u64));
        }
        // Skip to the next sink name.
        from = format!("{sink}\u{0}");
    }
    Ok(best)
}

/// `[u32 header length][header JSON][payload]`: the payload stays raw bytes.
fn encode(record: &Record, payload: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(record).expect("record serialises");
    let mut out = Vec::with_capacity(4 + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

fn decode(bytes: &[u8]) -> anyhow::Result<(Record, Bytes)> {
    anyhow::ensure!(bytes.len() >= 4, "outbox entry too short");
    let n = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    anyhow::ensure!(bytes.len() >= 4 + n, "outbox entry truncated");
    let record = serde_json::from_slice(&bytes[4..4 + n]).context("outbox entry header")?;
    Ok((record, Bytes::copy_from_slice(&bytes[4 + n..])))
}
