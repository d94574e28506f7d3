//! File sink: results appended as JSON lines (one CloudEvent each), synced to disk per batch;
//! a batch that fails partway is cut off again, so the file holds whole lines only.
//! Handy for demos and for boards that ship logs rather than events.

use std::io::Write;
use std::path::PathBuf;

use super::Outcome;
use super::event::envelope;
use super::outbox::Pending;

pub struct FileSink {
    pub path: PathBuf,
}

impl FileSink {
    pub fn new(path: PathBuf) -> FileSink {
        FileSink { path }
    }

    pub async fn deliver(&self, batch: &[Pending]) -> Vec<Outcome> {
        let mut text = Vec::new();
        for p in batch {
            text.extend_from_slice(envelope(&p.record, &p.payload).as_bytes());
            text.push(b'\n');
        }
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            let end = f.metadata()?.len();
            let written = f.write_all(&text).and_then(|()| f.sync_data());
            if written.is_err() {
                // A write that failed partway (a full disk) would leave a torn line that every
                // later line follows: cut the file back to where this batch began.
                let _ = f.set_len(end).and_then(|()| f.sync_data());
            }
            written
        })
        .await;
        let outcome = match written {
            Ok(Ok(())) => Outcome::Delivered,
            Ok(Err(e)) => Outcome::Retry(format!("writing {}: {e}", self.path.display())),
            Err(e) => Outcome::Retry(format!("file sink task: {e}")),
        };
        vec![outcome; batch.len()]
    }
}
