//! The commit window: which frames an open batch waits for, and for how long at most.
//!
//! A batch waits, up to `commit_window` after its first frame, only while it can still gain
//! one: while frames are being made ([`super::Outbox::coming`]), or while a camera is due to
//! commit again before the window closes (its last commit plus the gap before it, and not a
//! gap overdue already). A camera whose client waits for the answer (HTTP) can only be due if
//! it has no frame in the batch yet; a camera worker makes its next frame while this one
//! commits, so it can be due again. That is what lets independent cameras, out of phase,
//! share an fsync, and spares a frame the wait when none can join: a lone serial client,
//! cameras slower than the window.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::Behind;
use super::committer::Commit;

/// A camera silent for this long is not waited for, whatever its last gap.
const SILENT: Duration = Duration::from_secs(1);

/// A camera in a pipeline: the unit whose frames come one commit at a time.
type Stream = (String, String);

/// Each camera's last commit, and the gap before it.
#[derive(Default)]
pub struct Cameras {
    last: HashMap<Stream, (Instant, Option<Duration>)>,
}

impl Cameras {
    /// The cameras due to commit again by `close`, for a batch opened `now`.
    pub fn due_by(&mut self, now: Instant, close: Instant) -> HashSet<Stream> {
        self.last.retain(|_, (t, _)| now.duration_since(*t) < SILENT);
        // More than a gap overdue, a camera has likely stopped: not worth the wait.
        let due = |(t, gap): &(Instant, Option<Duration>)| gap.is_some_and(|g| *t + g <= close && *t + g * 2 >= now);
        self.last.iter().filter(|(_, v)| due(v)).map(|(c, _)| c.clone()).collect()
    }

    /// Notes the cameras of `commit` (one frame's results, one per sink), joining a batch at
    /// `now` that closes at `close`. A camera is waited for no more, unless it makes its next
    /// frame while this one commits ([`Behind::NextFrame`]) and that frame is due by `close`.
    pub fn joined(&mut self, commit: &Commit, now: Instant, close: Instant, awaited: &mut HashSet<Stream>) {
        let mut seen: Vec<(&str, &str)> = Vec::with_capacity(1);
        for item in &commit.items {
            let key = (item.record.pipeline.as_str(), item.record.camera.as_str());
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let stream = (key.0.to_string(), key.1.to_string());
            let (_, gap) = *self
                .last
                .entry(stream.clone())
                .and_modify(|(t, gap)| (*t, *gap) = (now, Some(now.duration_since(*t))))
                .or_insert((now, None));
            if commit.behind == Behind::NextFrame && gap.is_some_and(|g| now + g <= close) {
                awaited.insert(stream);
            } else {
                awaited.remove(&stream);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::sinks::outbox::{Boot, Item, Record};

    fn frame(camera: &str, sinks: usize, behind: Behind) -> Commit {
        let record = Record {
            id: format!("b/p/{camera}/1"),
            board: "b".into(),
            pipeline: "p".into(),
            camera: camera.into(),
            seq: 1,
            topic: "t".into(),
            content_type: "text/plain".into(),
            created_ms: 0,
            boot: Boot::now(),
            error: None,
        };
        let items = (0..sinks)
            .map(|s| Item { sink: format!("s{s}").into(), record: record.clone(), payload: Bytes::new(), file: None })
            .collect();
        Commit { items, done: tokio::sync::oneshot::channel().0, behind, coming: None }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A 25 frames/s camera is waited for by a 50 ms window and not by a 5 ms one; a camera
    /// every 400 ms, one heard from once, and one that stopped are never waited for; nor is one
    /// once it is in the batch, unless a camera worker's next frame is due before the close;
    /// and a second of silence forgets them all.
    #[test]
    fn a_batch_waits_only_for_cameras_due_before_it_closes() {
        let t0 = Instant::now();
        let mut cams = Cameras::default();
        let mut none = HashSet::new();
        let frames =
            [("fast", 360), ("fast", 400), ("slow", 0), ("slow", 400), ("once", 400), ("gone", 0), ("gone", 10)];
        for (camera, at) in frames {
            // Two sinks: one frame, so one gap, not a gap of zero between its two results.
            cams.joined(&frame(camera, 2, Behind::Answer), t0 + ms(at), t0 + ms(at), &mut none);
        }
        let now = t0 + ms(410);
        let due = |cams: &mut Cameras, window: u64| {
            let mut v: Vec<String> = cams.due_by(now, now + ms(window)).into_iter().map(|(_, c)| c).collect();
            v.sort();
            v
        };
        assert_eq!(due(&mut cams, 50), ["fast"]);
        assert!(due(&mut cams, 5).is_empty());
        let close = now + ms(50);
        let mut awaited = cams.due_by(now, close);
        cams.joined(&frame("fast", 1, Behind::Answer), now, close, &mut awaited);
        assert!(awaited.is_empty(), "{awaited:?}");
        // A camera worker's next frame can join the batch its last one is in: waited for while
        // it is due before the batch closes (10 ms after its last), and then no more.
        cams.joined(&frame("fast", 1, Behind::NextFrame), now + ms(10), close, &mut awaited);
        assert_eq!(awaited.len(), 1, "a camera worker's next frame is not waited for");
        cams.joined(&frame("fast", 1, Behind::NextFrame), now + ms(45), close, &mut awaited);
        assert!(awaited.is_empty(), "due after the close, and still waited for: {awaited:?}");
        // Camera ids are outside input: a silent one is forgotten, not kept for ever.
        let later = now + ms(45) + SILENT;
        assert!(cams.due_by(later, later).is_empty());
        assert!(cams.last.is_empty(), "{} cameras still tracked", cams.last.len());
    }
}
