//! The outbox file's storage: redb's own file backend, refusing to grow past `max_bytes`.
//!
//! Eviction keeps what is live well inside `max_bytes`, but the file also holds pages that
//! transactions freed and redb cannot reuse yet (a read still sees them, or the commit that
//! freed them was not durable), and redb grows a file by doubling it. A scheduler that let
//! readers linger took a 4 MiB outbox to 4 MiB + 20 KiB in CI. Only the file's own growth can
//! be refused for sure: the transaction then fails as on a full disk, and [`super::db::Db`]
//! reopens the file, which frees those pages, and tries once more.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::StorageBackend;
use redb::backends::FileBackend;

#[derive(Debug)]
pub struct Capped {
    file: FileBackend,
    /// `outbox.max_bytes`, which a reload may change.
    cap: Arc<AtomicU64>,
    /// Growths refused, for [`super::db::Db`] to see that its transaction was one.
    refused: Arc<AtomicU64>,
}

impl Capped {
    pub fn new(file: FileBackend, cap: Arc<AtomicU64>, refused: Arc<AtomicU64>) -> Capped {
        Capped { file, cap, refused }
    }
}

impl StorageBackend for Capped {
    fn len(&self) -> Result<u64, io::Error> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let cap = self.cap.load(Ordering::Relaxed);
        // Shrinking always may; a new file's first 1 MiB fits the smallest cap (2 MiB).
        if len > cap && len > self.file.len()? {
            self.refused.fetch_add(1, Ordering::AcqRel);
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("the outbox file may not grow to {len} bytes, past outbox.max_bytes ({cap} bytes)"),
            ));
        }
        self.file.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.file.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.file.close()
    }
}
