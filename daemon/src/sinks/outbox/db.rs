//! The outbox's redb file, opened again after an I/O error.
//!
//! After a failed write (a full disk, say) redb refuses every later transaction with
//! "Previous I/O error occurred" until the file is closed and opened again. A disk that filled
//! and then got room must not need a daemon restart, so every transaction goes through
//! [`Db::with`], which notices the failure and reopens the file before the next one. A file
//! refused growth past `max_bytes` ([`super::capped`]) is reopened at once, which frees the
//! pages redb could not reuse yet, and the transaction runs once more.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use redb::backends::FileBackend;
use redb::{CommitError, Database, StorageError, TableError, TransactionError};

use super::capped::Capped;

/// redb's page cache. Its default (1 GiB) kept a drained 120 MiB backlog resident: 280 MB of
/// RSS against 56 MB idle. The outbox reads each result once, in order, so a small cache costs
/// nothing in speed.
const CACHE_BYTES: usize = 16 << 20;

pub struct Db {
    path: PathBuf,
    /// `None` only between closing a broken file and opening it again.
    slot: RwLock<Option<Database>>,
    broken: AtomicBool,
    /// The file's size cap: `outbox.max_bytes`.
    cap: Arc<AtomicU64>,
    /// How often the file was refused growth past its cap.
    refused: Arc<AtomicU64>,
}

impl Db {
    pub fn open(path: &Path, cap: Arc<AtomicU64>) -> anyhow::Result<Db> {
        let refused = Arc::new(AtomicU64::new(0));
        let db = create(path, &cap, &refused).with_context(|| format!("opening outbox {}", path.display()))?;
        Ok(Db { path: path.to_path_buf(), slot: RwLock::new(Some(db)), broken: AtomicBool::new(false), cap, refused })
    }

    /// Runs `f` on the database; a storage failure in it makes the next call reopen the file.
    /// Refused growth past the cap, `f` runs once more in the file reopened, after a commit of
    /// nothing: redb reuses freed pages only from a commit on, never in the transaction that
    /// needs them.
    pub fn with<T>(&self, f: impl Fn(&Database) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let refused = self.refusals();
        match self.once(&f) {
            Err(e) if self.refusals() > refused => {
                tracing::warn!("{e:#}: reopening the outbox to reuse the pages it freed");
                self.once(&|db| Ok(db.begin_write()?.commit()?))?;
                self.once(&f)
            }
            result => result,
        }
    }

    /// How often the file was refused growth past `max_bytes`.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    fn once<T>(&self, f: &impl Fn(&Database) -> anyhow::Result<T>) -> anyhow::Result<T> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let slot = self.slot.read().expect("outbox db lock");
        let db = slot.as_ref().context("outbox closed after an I/O error")?;
        let result = f(db);
        if let Err(e) = &result {
            if storage_failed(e) {
                self.broken.store(true, Ordering::Release);
            }
        }
        result
    }

    fn reopen(&self) -> anyhow::Result<()> {
        // The write lock waits for transactions in flight: redb's file lock goes with the last.
        let mut slot = self.slot.write().expect("outbox db lock");
        if !self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        drop(slot.take());
        let db = create(&self.path, &self.cap, &self.refused)
            .with_context(|| format!("reopening outbox {} after an I/O error", self.path.display()))?;
        *slot = Some(db);
        self.broken.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "outbox reopened after an I/O error");
        Ok(())
    }
}

fn create(path: &Path, cap: &Arc<AtomicU64>, refused: &Arc<AtomicU64>) -> Result<Database, redb::DatabaseError> {
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    let backend = Capped::new(FileBackend::new(file)?, cap.clone(), refused.clone());
    Database::builder().set_cache_size(CACHE_BYTES).create_with_backend(backend)
}

/// Whether `e` is redb failing to read or write its file, as opposed to a bad record.
fn storage_failed(e: &anyhow::Error) -> bool {
    let io = |s: &StorageError| matches!(s, StorageError::Io(_) | StorageError::PreviousIo);
    e.chain().any(|c| {
        c.downcast_ref::<StorageError>().is_some_and(io)
            || c.downcast_ref::<TransactionError>().is_some_and(|t| matches!(t, TransactionError::Storage(s) if io(s)))
            || c.downcast_ref::<CommitError>().is_some_and(|t| matches!(t, CommitError::Storage(s) if io(s)))
            || c.downcast_ref::<TableError>().is_some_and(|t| matches!(t, TableError::Storage(s) if io(s)))
            || c.downcast_ref::<redb::Error>()
                .is_some_and(|t| matches!(t, redb::Error::Io(_) | redb::Error::PreviousIo))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    /// A reader that stays open keeps every page freed after it from reuse, so a writer that
    /// replaces its rows grows the file whatever it keeps live. Past the cap the growth is
    /// refused, the reader finishes, and the write succeeds in the file reopened.
    #[test]
    fn a_file_refused_growth_past_its_cap_is_reopened_and_the_write_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let cap = 2u64 << 20;
        let db = Arc::new(Db::open(&path, Arc::new(AtomicU64::new(cap))).unwrap());
        let value = vec![7u8; 100 * 1024];
        let write = |key: u64| {
            db.with(|db| {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(T)?;
                    t.insert(key, value.as_slice())?;
                    if key >= 3 {
                        t.remove(key - 3)?;
                    }
                }
                txn.commit()?;
                Ok(())
            })
        };
        write(0).unwrap();
        let (started, reader_db) = (Arc::new(AtomicBool::new(false)), db.clone());
        let reader = {
            let started = started.clone();
            std::thread::spawn(move || {
                reader_db.with(|db| {
                    let _pin = db.begin_read()?;
                    started.store(true, Ordering::Release);
                    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    while reader_db.refusals() == 0 && std::time::Instant::now() < until {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Ok(())
                })
            })
        };
        while !started.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let mut largest = 0;
        for key in 1..60 {
            write(key).unwrap_or_else(|e| panic!("write {key}: {e:#}"));
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        reader.join().unwrap().unwrap();
        assert!(db.refusals() > 0, "the file never asked to grow past the cap: the scenario did not happen");
        assert!(largest <= cap, "the file reached {largest} bytes, over its cap of {cap}");
        let kept: Vec<u64> =
            db.with(|db| Ok(db.begin_read()?.open_table(T)?.iter()?.map(|r| r.unwrap().0.value()).collect())).unwrap();
        assert_eq!(kept, vec![57, 58, 59]);
    }
}
