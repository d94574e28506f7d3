//! File sink: results appended as JSON lines (one CloudEvent each). Handy for demos and for
//! boards that ship logs rather than events.
//!
//! A delivery only writes; [`FileSink::sync`] makes what was written durable, and the delivery
//! worker settles results only after it (at most once a [`super::delivery::SYNC_EVERY`]), so a
//! board's card sees one fsync a second, not one a frame. A crash before the sync leaves the
//! results in the outbox, to be written again; a line it tore is cut off at the next write,
//! so the file holds whole lines only.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::Outcome;
use super::event::envelope;
use super::outbox::Pending;

pub struct FileSink {
    pub path: PathBuf,
    /// The files written since the last sync: one, unless the file was moved away (rotated)
    /// in between, when the old one still needs its sync.
    unsynced: Mutex<Vec<File>>,
}

impl FileSink {
    pub fn new(path: PathBuf) -> FileSink {
        FileSink { path, unsynced: Mutex::new(Vec::new()) }
    }

    pub async fn deliver(&self, batch: &[Pending]) -> Vec<Outcome> {
        let mut text = Vec::new();
        for p in batch {
            text.extend_from_slice(envelope(&p.record, &p.payload).as_bytes());
            text.push(b'\n');
        }
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || append(&path, &text)).await;
        let outcome = match written {
            Ok(Ok(file)) => {
                let mut unsynced = self.unsynced.lock().expect("file sink lock");
                if !unsynced.iter().any(|f| same_file(f, &file)) {
                    unsynced.push(file);
                }
                Outcome::Delivered
            }
            Ok(Err(e)) => Outcome::Retry(format!("writing {}: {e}", self.path.display())),
            Err(e) => Outcome::Retry(format!("file sink task: {e}")),
        };
        vec![outcome; batch.len()]
    }

    /// Makes every line written so far durable. After a failure nothing written since the last
    /// sync can be trusted to be on disk (the kernel may have dropped the pages), so the
    /// caller writes those results again.
    pub async fn sync(&self) -> Result<(), String> {
        let files = std::mem::take(&mut *self.unsynced.lock().expect("file sink lock"));
        if files.is_empty() {
            return Ok(());
        }
        let synced = tokio::task::spawn_blocking(move || files.iter().try_for_each(|f| f.sync_data())).await;
        match synced {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("syncing {}: {e}", self.path.display())),
            Err(e) => Err(format!("file sink task: {e}")),
        }
    }
}

fn append(path: &Path, text: &[u8]) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).read(true).append(true).open(path)?;
    let end = whole_lines(&mut f)?;
    let written = f.write_all(text);
    if written.is_err() {
        // A write that failed partway (a full disk) would leave a torn line that every later
        // line follows: cut the file back to where this batch began.
        let _ = f.set_len(end);
    }
    written.map(|()| f)
}

/// Cuts off a torn last line (a crash between a write and its sync) and returns the length.
/// Its result was never settled, so it is written again whole.
fn whole_lines(f: &mut File) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    if len == 0 || last_byte(f, len)? == b'\n' {
        return Ok(len);
    }
    let mut end = len;
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    tracing::warn!(
        cut = len - end,
        "file sink: cut off a torn last line, left by a crash; its result is written again"
    );
    f.set_len(end)?;
    Ok(end)
}

fn last_byte(f: &mut File, len: u64) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut b)?;
    Ok(b[0])
}

fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_off_before_the_next_write() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("r.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        append(&path, b"{\"c\":3}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
        // A file of one torn line, longer than a read chunk, is emptied.
        std::fs::write(&path, vec![b'x'; 200 << 10]).unwrap();
        append(&path, b"{}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
    }
}
