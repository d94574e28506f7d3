//! The outbox's redb file, opened again after an I/O error.
//!
//! After a failed write (a full disk, say) redb refuses every later transaction with
//! "Previous I/O error occurred" until the file is closed and opened again. A disk that filled
//! and then got room must not need a daemon restart, so every transaction goes through
//! [`Db::with`], which notices the failure and reopens the file before the next one.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use redb::{CommitError, Database, StorageError, TableError, TransactionError};

/// redb's page cache. Its default (1 GiB) kept a drained 120 MiB backlog resident: 280 MB of
/// RSS against 56 MB idle. The outbox reads each result once, in order, so a small cache costs
/// nothing in speed.
const CACHE_BYTES: usize = 16 << 20;

pub struct Db {
    path: PathBuf,
    /// `None` only between closing a broken file and opening it again.
    slot: RwLock<Option<Database>>,
    broken: AtomicBool,
}

impl Db {
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        let db = create(path).with_context(|| format!("opening outbox {}", path.display()))?;
        Ok(Db { path: path.to_path_buf(), slot: RwLock::new(Some(db)), broken: AtomicBool::new(false) })
    }

    /// Runs `f` on the database; a storage failure in it makes the next call reopen the file.
    pub fn with<T>(&self, f: impl FnOnce(&Database) -> anyhow::Result<T>) -> anyhow::Result<T> {
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
        let db = create(&self.path)
            .with_context(|| format!("reopening outbox {} after an I/O error", self.path.display()))?;
        *slot = Some(db);
        self.broken.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "outbox reopened after an I/O error");
        Ok(())
    }
}

fn create(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
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
