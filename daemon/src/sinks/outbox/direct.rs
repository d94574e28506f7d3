//! Results for a caught-up file sink, written to its file within their commit.
//!
//! A file sink's file is on the board's own storage, as the outbox is: kept in both, every
//! result reached the SD card twice, once as a redb run of pages rounded up to a power of
//! two, once as a base64 line (4 bytes written per result byte, against 1.4 for the line
//! alone). So while no result of a file sink waits in the outbox, the committer appends the
//! batch's results to the file and fsyncs it in place of a redb commit, and the frame is
//! acknowledged after that fsync, as after any commit.
//!
//! Whatever cannot be written so (the disk full, the file's directory gone) is stored in the
//! outbox as before, and from then on so is everything else for that sink, until its delivery
//! worker has drained and settled it: lines stay in order.
//!
//! A frame written only to files commits nothing to redb, so its camera's sequence number is
//! not stored with it. The committer reserves numbers ahead instead ([`SEQ_RESERVE`]), one
//! small transaction per that many frames, before it writes the files, and a restart starts
//! the camera past them: ids stay unique, with a gap after a restart.

use std::collections::HashMap;
use std::sync::Arc;

use super::committer::Commit;
use super::view::View;
use crate::metrics::{Metrics, SinkLabel};
use crate::sinks::event::append_envelope;
use crate::sinks::file::FileSink;

/// Sequence numbers reserved ahead of a camera's last frame written straight to a file.
pub const SEQ_RESERVE: u64 = 1024;

/// One flag per item of `batch`, in order: true if it is for a file sink with nothing waiting
/// in the outbox, which may be written within the commit.
pub fn caught_up(batch: &[Commit], view: &View) -> Vec<bool> {
    let mut pending: HashMap<&str, bool> = HashMap::new();
    batch
        .iter()
        .flat_map(|c| &c.items)
        .map(|i| i.file.is_some() && !*pending.entry(&i.sink).or_insert_with(|| view.pending(&i.sink) > 0))
        .collect()
}

/// Writes the items `chosen` to their files, durably, a file at a time. One flag per item:
/// true if it is done and needs no place in the outbox.
pub fn write(batch: &[Commit], chosen: &[bool], metrics: &Metrics) -> Vec<bool> {
    let items: Vec<_> = batch.iter().flat_map(|c| &c.items).collect();
    let mut written = vec![false; items.len()];
    let mut files: Vec<(&Arc<FileSink>, &Arc<str>, Vec<usize>)> = Vec::new();
    for (n, item) in items.iter().enumerate().filter(|(n, _)| chosen[*n]) {
        let Some(file) = &item.file else { continue };
        match files.iter_mut().find(|(_, sink, _)| **sink == item.sink) {
            Some((_, _, of)) => of.push(n),
            None => files.push((file, &item.sink, vec![n])),
        }
    }
    for (file, sink, of) in files {
        let mut lines = String::new();
        for &n in &of {
            append_envelope(&mut lines, &items[n].record, &items[n].payload);
            lines.push('\n');
        }
        match file.write_durably(&lines) {
            Ok(()) => {
                of.iter().for_each(|&n| written[n] = true);
                let label = SinkLabel { sink: sink.to_string() };
                metrics.outbox_delivered.get_or_create(&label).inc_by(of.len() as u64);
            }
            Err(e) => tracing::warn!(
                sink = %sink,
                results = of.len(),
                "writing to {}: {e}; the results wait in the outbox",
                file.path.display()
            ),
        }
    }
    written
}

/// The reservations the `chosen` items of `batch` need, by camera, beyond those in
/// `reserved`. Stored before the files are written: a crash between the two must not leave a
/// line whose number a restart hands out again.
pub fn reservations<'a>(
    batch: &'a [Commit],
    chosen: &[bool],
    reserved: &HashMap<String, u64>,
) -> HashMap<&'a str, u64> {
    let mut wanted: HashMap<&str, u64> = HashMap::new();
    let items = batch.iter().flat_map(|c| &c.items).zip(chosen).filter(|(_, w)| **w).map(|(i, _)| &i.record);
    // Results without a camera's sequence (the fleet's events, seq 0) reserve nothing.
    for r in items.filter(|r| r.seq > 0) {
        if reserved.get(&r.camera).is_none_or(|&mark| r.seq > mark) {
            let mark = wanted.entry(&r.camera).or_default();
            *mark = (*mark).max(r.seq + SEQ_RESERVE);
        }
    }
    wanted
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::sinks::outbox::{Behind, Item, Record};

    fn item(sink: &str, camera: &str, seq: u64) -> Item {
        let record = Record {
            id: format!("b/p/{camera}/{seq}"),
            board: "b".into(),
            pipeline: "p".into(),
            camera: camera.into(),
            seq,
            topic: "t".into(),
            content_type: "text/plain".into(),
            created_ms: 0,
            boot: None,
            error: None,
        };
        let file = sink.starts_with("file:").then(|| Arc::new(FileSink::new(sink[5..].into())));
        Item { sink: sink.into(), record, payload: Bytes::from_static(b"x"), file }
    }

    #[test]
    fn only_caught_up_file_sinks_are_chosen_and_only_new_ground_is_reserved() {
        let items = vec![
            item("file:a", "cam", 1),
            item("file:b", "cam", 1),
            item("dapr:x", "cam", 1),
            item("file:a", "old", 2),
            item("file:a", "fleet", 0),
        ];
        let batch = [Commit { items, done: tokio::sync::oneshot::channel().0, behind: Behind::Answer, coming: None }];
        let view = View::default();
        view.add("file:b", 1);
        let chosen = caught_up(&batch, &view);
        assert_eq!(chosen, [true, false, false, true, true]);
        let reserved = HashMap::from([("old".to_string(), 5)]);
        let wanted = reservations(&batch, &chosen, &reserved);
        assert_eq!(wanted, HashMap::from([("cam", 1 + SEQ_RESERVE)]));
    }
}
