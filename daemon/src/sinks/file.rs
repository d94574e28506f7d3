//! File sink: results appended as JSON lines (one CloudEvent each). A delivery only writes;
//! [`FileSink::sync`] makes every write since the last one durable with one fsync, which the
//! delivery worker calls before it settles them, so many deliveries share it. A write that
//! fails partway is cut off again, and so is everything after the last sync when a sync fails,
//! so the file holds whole lines only and those results are delivered again.
//! Handy for demos and for boards that ship logs rather than events.
//!
//! While no result waits for it in the outbox, the outbox's committer writes results here
//! itself ([`FileSink::write_durably`]), so a result reaches the card once, not twice. The
//! two writers never overlap: the committer only writes while the delivery worker has
//! nothing of this sink's, delivered or not, left to settle.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::Outcome;
use super::event::append_envelope;
use super::outbox::Pending;

pub struct FileSink {
    pub path: PathBuf,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    current: Option<Open>,
    /// Files written since their last sync and then moved away from the path (log rotation):
    /// synced with the next sync, which is what their results wait for.
    retired: Vec<File>,
}

/// The file at the path, as last written.
struct Open {
    file: File,
    /// Its length at the last sync: what a failed sync cuts it back to.
    synced: u64,
    dirty: bool,
}

impl FileSink {
    pub fn new(path: PathBuf) -> FileSink {
        FileSink { path, state: Default::default() }
    }

    pub async fn deliver(&self, batch: &[Pending]) -> Vec<Outcome> {
        let mut text = String::new();
        for p in batch {
            append_envelope(&mut text, &p.record, &p.payload);
            text.push('\n');
        }
        let (path, state) = (self.path.clone(), self.state.clone());
        let written =
            tokio::task::spawn_blocking(move || append(&path, &mut state.lock().expect("file sink lock"), &text)).await;
        let outcome = match written {
            Ok(Ok(())) => Outcome::Delivered,
            Ok(Err(e)) => Outcome::Retry(format!("writing {}: {e}", self.path.display())),
            Err(e) => Outcome::Retry(format!("file sink task: {e}")),
        };
        vec![outcome; batch.len()]
    }

    /// Appends `lines` and makes them durable, on the calling thread (the outbox's committer,
    /// which writes a caught-up file's results within their commit).
    pub fn write_durably(&self, lines: &str) -> std::io::Result<()> {
        let mut state = self.state.lock().expect("file sink lock");
        append(&self.path, &mut state, lines)?;
        sync(&mut state)
    }

    /// Makes every line written since the last call durable.
    pub async fn sync(&self) -> Result<(), String> {
        let state = self.state.clone();
        let synced = tokio::task::spawn_blocking(move || sync(&mut state.lock().expect("file sink lock"))).await;
        match synced {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("syncing {}: {e}", self.path.display())),
            Err(e) => Err(format!("file sink task: {e}")),
        }
    }
}

fn append(path: &Path, state: &mut State, text: &str) -> std::io::Result<()> {
    if let Some(open) = state.current.take_if(|o| !is_at(&o.file, path)) {
        if open.dirty {
            state.retired.push(open.file);
        }
    }
    let open = match &mut state.current {
        Some(open) => open,
        slot => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            let synced = file.metadata()?.len();
            slot.insert(Open { file, synced, dirty: false })
        }
    };
    let end = open.file.metadata()?.len();
    if let Err(e) = open.file.write_all(text.as_bytes()) {
        // A write that failed partway (a full disk) would leave a torn line that every later
        // line follows: cut the file back to where this batch began.
        let _ = open.file.set_len(end);
        return Err(e);
    }
    open.dirty = true;
    Ok(())
}

fn sync(state: &mut State) -> std::io::Result<()> {
    for file in std::mem::take(&mut state.retired) {
        file.sync_data()?;
    }
    let Some(open) = state.current.as_mut().filter(|o| o.dirty) else { return Ok(()) };
    open.dirty = false;
    match open.file.sync_data() {
        Ok(()) => {
            open.synced = open.file.metadata()?.len();
            Ok(())
        }
        Err(e) => {
            // What the kernel failed to write may be gone from its cache too: cut the file
            // back to what is known durable, and let those results be delivered again.
            let _ = open.file.set_len(open.synced).and_then(|()| open.file.sync_data());
            Err(e)
        }
    }
}

/// Whether `file` is still the one at `path` (not moved away or deleted).
fn is_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}
