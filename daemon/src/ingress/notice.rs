//! The operator's notice: the first line of `server.notice_file`, shown on the page beside the
//! daemon's own notes. Whoever runs the board writes it (a maintenance note; the demo's
//! progress while it builds the Dapr sidecar) and the page shows each change within seconds,
//! with no reload.
//!
//! A task re-reads the file every [`PERIOD`] until its generation closes, so a status request
//! never touches the disk: a slow disk or a FIFO at that path holds up one blocking-pool
//! thread, never a handler.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

const PERIOD: Duration = Duration::from_secs(1);
/// More than a line of the page holds; the rest of the file is ignored.
const MAX_BYTES: u64 = 512;

/// The notice as last read: `None` while the file is missing, empty or not a regular file.
#[derive(Clone, Default)]
pub struct Notice(Arc<Mutex<Option<String>>>);

impl Notice {
    pub fn get(&self) -> Option<String> {
        self.0.lock().expect("notice lock").clone()
    }

    /// Keeps the notice in step with `path` until `closing` turns true.
    pub fn watch(path: PathBuf, mut closing: watch::Receiver<bool>) -> Notice {
        let notice = Notice::default();
        let shared = notice.clone();
        tokio::spawn(async move {
            loop {
                *shared.0.lock().expect("notice lock") = first_line(&path).await;
                tokio::select! {
                    _ = tokio::time::sleep(PERIOD) => {}
                    _ = closing.wait_for(|c| *c) => return,
                }
            }
        });
        notice
    }
}

async fn first_line(path: &std::path::Path) -> Option<String> {
    if !tokio::fs::metadata(path).await.ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    tokio::fs::File::open(path).await.ok()?.take(MAX_BYTES).read_to_end(&mut bytes).await.ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.chars().filter(|c| !c.is_control()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_line_of_a_regular_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notice");
        assert_eq!(first_line(&path).await, None, "missing");
        std::fs::write(&path, "  building: 3 of 10\u{7}\nsecond line\n").unwrap();
        assert_eq!(first_line(&path).await.as_deref(), Some("building: 3 of 10"));
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(first_line(&path).await, None, "empty");
        std::fs::write(&path, "x".repeat(4096)).unwrap();
        assert_eq!(first_line(&path).await.map(|l| l.len()), Some(MAX_BYTES as usize));
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(first_line(&dir.path().join("fifo")).await, None, "a FIFO is never opened");
    }
}
