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

pub struct Board {
    cameras: Mutex<BTreeMap<(String, String), Camera>>,
    events: broadcast::Sender<Value>,
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
}

impl Default for Board {
    fn default() -> Self {
        Board { cameras: Mutex::new(BTreeMap::new()), events: broadcast::channel(256).0 }
    }
}

impl Board {
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    fn update(&self, pipeline: &str, camera: &str, f: impl FnOnce(&mut Camera)) {
        let mut cams = self.cameras.lock().expect("board lock");
        let cam = cams.entry((pipeline.to_string(), camera.to_string())).or_insert_with(|| Camera {
            results: 0,
            drops: 0,
            errors: 0,
            last_id: String::new(),
            last_seen_ms: 0,
            content_type: "",
            output: None,
            fps: 0.0,
            last_at: None,
        });
        f(cam);
        cam.last_seen_ms = now_ms();
        let event = json!({ "type": "camera", "camera": view(pipeline, camera, cam) });
        drop(cams);
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
        self.cameras.lock().expect("board lock").remove(&(pipeline.to_string(), camera.to_string()));
    }

    pub fn cameras(&self) -> Vec<Value> {
        let cams = self.cameras.lock().expect("board lock");
        cams.iter().map(|((p, c), cam)| view(p, c, cam)).collect()
    }

    /// The latest result of a camera and its content type.
    pub fn latest(&self, pipeline: &str, camera: &str) -> Option<(Bytes, &'static str)> {
        let cams = self.cameras.lock().expect("board lock");
        let cam = cams.get(&(pipeline.to_string(), camera.to_string()))?;
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
