//! The camera board: the latest result and the rates of each camera, for the web page.
//!
//! Updated by pipelines as results commit and frames drop; every update is also broadcast
//! (as a small JSON event) to live subscribers such as the page's server-sent events stream.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::sinks::outbox::now_ms;

/// Results larger than this are not kept for the page (the tile shows the id instead).
const MAX_KEPT: usize = 2 << 20;

/// What the board keeps of all results together; past it, the images updated longest ago go.
const MAX_BOARD_BYTES: usize = 64 << 20;

pub struct Board {
    cameras: Mutex<Tiles>,
    events: broadcast::Sender<Value>,
}

#[derive(Default)]
struct Tiles {
    by_camera: BTreeMap<(String, String), Camera>,
    /// Bytes of every kept output together, at most [`MAX_BOARD_BYTES`].
    kept: usize,
    /// Counts updates, so the tile updated longest ago is known even within a millisecond.
    clock: u64,
}

impl Tiles {
    /// Lets go of the outputs updated longest ago until `kept` is within the cap.
    fn trim(&mut self) {
        while self.kept > MAX_BOARD_BYTES {
            let Some(cam) = self.by_camera.values_mut().filter(|c| c.output.is_some()).min_by_key(|c| c.updated) else {
                break;
            };
            self.kept -= cam.output.take().map_or(0, |b| b.len());
        }
    }
}

struct Camera {
    results: u64,
    drops: u64,
    errors: u64,
    last_id: String,
    last_seen_ms: u64,
    content_type: &'static str,
    output: Option<Bytes>,
    /// Frames per second, smoothed over the last few frames.
    fps: f64,
    last_at: Option<Instant>,
    /// The board's clock at this tile's last update.
    updated: u64,
}

impl Default for Board {
    fn default() -> Self {
        Board { cameras: Mutex::new(Tiles::default()), events: broadcast::channel(256).0 }
    }
}

impl Board {
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    fn update(&self, pipeline: &str, camera: &str, f: impl FnOnce(&mut Camera)) {
        let mut guard = self.cameras.lock().expect("board lock");
        let tiles = &mut *guard;
        tiles.clock += 1;
        let cam = tiles.by_camera.entry((pipeline.to_string(), camera.to_string())).or_insert_with(|| Camera {
            results: 0,
            drops: 0,
            errors: 0,
            last_id: String::new(),
            last_seen_ms: 0,
            content_type: "",
            output: None,
            fps: 0.0,
            last_at: None,
            updated: 0,
        });
        let before = cam.output.as_ref().map_or(0, |b| b.len());
        f(cam);
        cam.last_seen_ms = now_ms();
        cam.updated = tiles.clock;
        let after = cam.output.as_ref().map_or(0, |b| b.len());
        let event = json!({ "type": "camera", "camera": view(pipeline, camera, cam) });
        tiles.kept = tiles.kept + after - before;
        tiles.trim();
        drop(guard);
        // No subscribers is fine.
        let _ = self.events.send(event);
    }

    pub fn result(&self, pipeline: &str, camera: &str, id: &str, content_type: &'static str, output: &Bytes) {
        self.update(pipeline, camera, |c| {
            let now = Instant::now();
            if let Some(prev) = c.last_at {
                let inst = 1.0 / now.duration_since(prev).as_secs_f64().max(1e-3);
                c.fps = if c.fps == 0.0 { inst } else { 0.8 * c.fps + 0.2 * inst };
            }
            c.last_at = Some(now);
            c.results += 1;
            c.last_id = id.to_string();
            c.content_type = content_type;
            c.output = (output.len() <= MAX_KEPT).then(|| output.clone());
        });
    }

    pub fn drop_frame(&self, pipeline: &str, camera: &str) {
        self.update(pipeline, camera, |c| c.drops += 1);
    }

    pub fn error(&self, pipeline: &str, camera: &str) {
        self.update(pipeline, camera, |c| c.errors += 1);
    }

    /// A camera that gave its place up (see `cameras`).
    pub fn forget(&self, pipeline: &str, camera: &str) {
        let mut tiles = self.cameras.lock().expect("board lock");
        if let Some(cam) = tiles.by_camera.remove(&(pipeline.to_string(), camera.to_string())) {
            tiles.kept -= cam.output.map_or(0, |b| b.len());
        }
    }

    pub fn cameras(&self) -> Vec<Value> {
        let tiles = self.cameras.lock().expect("board lock");
        tiles.by_camera.iter().map(|((p, c), cam)| view(p, c, cam)).collect()
    }

    /// The latest result of a camera and its content type.
    pub fn latest(&self, pipeline: &str, camera: &str) -> Option<(Bytes, &'static str)> {
        let tiles = self.cameras.lock().expect("board lock");
        let cam = tiles.by_camera.get(&(pipeline.to_string(), camera.to_string()))?;
        Some((cam.output.clone()?, cam.content_type))
    }
}

fn view(pipeline: &str, camera: &str, c: &Camera) -> Value {
    // Text and JSON results travel inline, so a label tile needs no second request.
    let inline = match (&c.output, c.content_type) {
        (Some(b), ct) if b.len() <= 4096 && (ct.starts_with("text/") || ct == "application/json") => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        _ => None,
    };
    let stale = c.last_at.is_none_or(|t| t.elapsed().as_secs_f64() > 5.0);
    json!({
        "pipeline": pipeline,
        "camera": camera,
        "results": c.results,
        "drops": c.drops,
        "errors": c.errors,
        "fps": if stale { 0.0 } else { (c.fps * 10.0).round() / 10.0 },
        "last_id": c.last_id,
        "last_seen_ms": c.last_seen_ms,
        "content_type": c.content_type,
        "inline": inline,
    })
}

#[cfg(test)]
mod tests {
    use super::{Board, MAX_BOARD_BYTES, MAX_KEPT};
    use bytes::Bytes;

    /// 256 cameras in each of several pipelines, each with a result just under the per-tile
    /// limit, would keep gigabytes for the page: the board as a whole is capped, and the
    /// tiles that lose their image are the ones updated longest ago.
    #[test]
    fn the_board_keeps_a_bounded_total_of_result_bytes() {
        let board = Board::default();
        let output = Bytes::from(vec![7u8; MAX_KEPT]);
        for i in 0..200 {
            board.result("p", &format!("cam{i}"), "id", "image/png", &output);
        }
        let kept: usize = (0..200).filter_map(|i| board.latest("p", &format!("cam{i}"))).map(|(b, _)| b.len()).sum();
        assert!(kept <= MAX_BOARD_BYTES, "the board keeps {kept} bytes, over {MAX_BOARD_BYTES}");
        assert!(board.latest("p", "cam199").is_some(), "the newest result must be kept");
        assert!(board.latest("p", "cam0").is_none(), "the oldest result should have gone first");
        // Every camera is still on the board, with its counts.
        assert_eq!(board.cameras().len(), 200);
    }
}
