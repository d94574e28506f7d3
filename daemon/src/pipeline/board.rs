//! The camera board: what the page shows of each camera and pipeline. Per camera: the latest
//! result (and, behind a label, the frame it labels), counts, and ten minutes of history for the
//! sparklines. Per pipeline: the flow, from frames in through each function to results, with
//! where frames were dropped or failed.
//!
//! One board outlives the daemon's generations (a reload keeps the history); each generation
//! tells it which pipelines exist. Updated by pipelines as frames arrive, fail and commit; every
//! camera update is also broadcast (as a small JSON event) to live subscribers such as the
//! page's server-sent events stream.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::history::{BUCKET_S, History};
use crate::sinks::outbox::now_ms;

/// Results larger than this are not kept for the page (the tile shows the id instead).
const MAX_KEPT: usize = 2 << 20;

/// Labelled frames kept per camera: a page that asks for a label's frame a few results late
/// still gets that frame (at 4 frames/s, a second's worth).
const LABELLED_FRAMES: usize = 4;

/// What the board keeps of all results and frames together; past it, the tiles updated longest
/// ago lose their images first.
const MAX_BOARD_BYTES: usize = 64 << 20;

pub struct Board {
    tiles: Mutex<Tiles>,
    events: broadcast::Sender<Value>,
    /// Where the history's buckets count from.
    epoch: Instant,
}

#[derive(Default)]
struct Tiles {
    by_camera: BTreeMap<(String, String), Camera>,
    flows: BTreeMap<String, Flow>,
    /// Bytes of every kept output and frame together, at most [`MAX_BOARD_BYTES`].
    kept: usize,
    /// Counts updates, so the tile updated longest ago is known even within a millisecond.
    clock: u64,
}

impl Tiles {
    /// Lets go of the images updated longest ago until `kept` is within the cap.
    fn trim(&mut self) {
        while self.kept > MAX_BOARD_BYTES {
            let oldest = self.by_camera.values_mut().filter(|c| c.kept() > 0).min_by_key(|c| c.updated);
            let Some(cam) = oldest else { break };
            self.kept -= cam.kept();
            cam.output = None;
            cam.frames.clear();
        }
    }
}

/// A pipeline's frames, stage by stage, since it was configured as it is.
#[derive(Default)]
struct Flow {
    functions: Vec<String>,
    /// Frames that entered the pipeline (a retried frame counts again).
    received: u64,
    /// Frames displaced from a full queue (latest-frame-wins), before any function.
    dropped: u64,
    /// Frames that failed at each function.
    failed: Vec<u64>,
    /// Results committed to the outbox.
    results: u64,
    /// Results made but not committed (the outbox refused them; the frame is tried again).
    store_failed: u64,
}

#[derive(Default)]
struct Camera {
    results: u64,
    drops: u64,
    errors: u64,
    last_id: String,
    last_seen_ms: u64,
    content_type: &'static str,
    output: Option<Bytes>,
    /// The frames behind the latest results that are not images (labels), newest last, each
    /// with its result's id: the page asks for a label's own frame, never just the latest.
    frames: VecDeque<(String, Bytes)>,
    /// Frames per second, smoothed over the last few frames.
    fps: f64,
    last_at: Option<Instant>,
    /// The board's clock at this tile's last update.
    updated: u64,
    history: History,
}

impl Camera {
    fn kept(&self) -> usize {
        self.output.as_ref().map_or(0, |b| b.len()) + self.frames.iter().map(|(_, f)| f.len()).sum::<usize>()
    }
}

impl Default for Board {
    fn default() -> Self {
        Board { tiles: Mutex::new(Tiles::default()), events: broadcast::channel(256).0, epoch: Instant::now() }
    }
}

impl Board {
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    /// A generation's pipelines and their functions: the tiles and flows of pipelines no longer
    /// configured go; a pipeline whose functions changed starts its flow again.
    pub fn configure<'a>(&self, pipelines: impl IntoIterator<Item = (&'a str, &'a [String])>) {
        let mut tiles = self.tiles.lock().expect("board lock");
        let pipelines: BTreeMap<&str, &[String]> = pipelines.into_iter().collect();
        tiles.flows.retain(|name, flow| pipelines.get(name.as_str()).is_some_and(|f| *f == flow.functions));
        for (name, functions) in &pipelines {
            tiles.flows.entry(name.to_string()).or_insert_with(|| Flow {
                functions: functions.to_vec(),
                failed: vec![0; functions.len()],
                ..Flow::default()
            });
        }
        let gone: Vec<(String, String)> =
            tiles.by_camera.keys().filter(|(p, _)| !pipelines.contains_key(p.as_str())).cloned().collect();
        for key in gone {
            let cam = tiles.by_camera.remove(&key).expect("listed above");
            tiles.kept -= cam.kept();
        }
    }

    fn flow(&self, pipeline: &str, f: impl FnOnce(&mut Flow)) {
        if let Some(flow) = self.tiles.lock().expect("board lock").flows.get_mut(pipeline) {
            f(flow);
        }
    }

    fn update(&self, pipeline: &str, camera: &str, f: impl FnOnce(&mut Camera, &mut Flow)) {
        let mut guard = self.tiles.lock().expect("board lock");
        let tiles = &mut *guard;
        tiles.clock += 1;
        let mut spare = Flow::default();
        let flow = tiles.flows.get_mut(pipeline).unwrap_or(&mut spare);
        let cam = tiles.by_camera.entry((pipeline.to_string(), camera.to_string())).or_default();
        let before = cam.kept();
        f(cam, flow);
        cam.last_seen_ms = now_ms();
        cam.updated = tiles.clock;
        let after = cam.kept();
        let event = json!({ "type": "camera", "camera": view(pipeline, camera, cam, None) });
        tiles.kept = tiles.kept + after - before;
        tiles.trim();
        drop(guard);
        // No subscribers is fine.
        let _ = self.events.send(event);
    }

    /// A frame entered `pipeline`.
    pub fn received(&self, pipeline: &str) {
        self.flow(pipeline, |f| f.received += 1);
    }

    /// A result committed: `output` made from `frame` in `latency`, from intake to commit.
    pub fn result(&self, pipeline: &str, camera: &str, result: Shown<'_>) {
        let epoch = self.epoch;
        self.update(pipeline, camera, |c, flow| {
            let now = Instant::now();
            if let Some(prev) = c.last_at {
                let inst = 1.0 / now.duration_since(prev).as_secs_f64().max(1e-3);
                c.fps = if c.fps == 0.0 { inst } else { 0.8 * c.fps + 0.2 * inst };
            }
            c.last_at = Some(now);
            c.history.record(epoch, now, result.latency.as_secs_f64() * 1000.0);
            c.results += 1;
            flow.results += 1;
            c.last_id = result.id.to_string();
            c.content_type = result.content_type;
            c.output = (result.output.len() <= MAX_KEPT).then(|| result.output.clone());
            let labels = !result.content_type.starts_with("image/");
            if !labels {
                c.frames.clear();
            } else if result.frame.len() <= MAX_KEPT {
                if c.frames.len() == LABELLED_FRAMES {
                    c.frames.pop_front();
                }
                c.frames.push_back((result.id.to_string(), result.frame.clone()));
            }
        });
    }

    pub fn drop_frame(&self, pipeline: &str, camera: &str) {
        self.update(pipeline, camera, |c, flow| {
            c.drops += 1;
            flow.dropped += 1;
        });
    }

    /// A frame failed at the pipeline's function number `function`.
    pub fn error(&self, pipeline: &str, camera: &str, function: usize) {
        self.update(pipeline, camera, |c, flow| {
            c.errors += 1;
            if let Some(n) = flow.failed.get_mut(function) {
                *n += 1;
            }
        });
    }

    /// A result the outbox did not take.
    pub fn store_failed(&self, pipeline: &str) {
        self.flow(pipeline, |f| f.store_failed += 1);
    }

    /// A camera that gave its place up (see `cameras`).
    pub fn forget(&self, pipeline: &str, camera: &str) {
        let mut tiles = self.tiles.lock().expect("board lock");
        if let Some(cam) = tiles.by_camera.remove(&(pipeline.to_string(), camera.to_string())) {
            tiles.kept -= cam.kept();
        }
    }

    /// Every camera, with its history.
    pub fn cameras(&self) -> Vec<Value> {
        let tiles = self.tiles.lock().expect("board lock");
        let now = Instant::now();
        tiles.by_camera.iter().map(|((p, c), cam)| view(p, c, cam, Some((self.epoch, now)))).collect()
    }

    /// Each pipeline's flow, by name.
    pub fn flows(&self) -> BTreeMap<String, Value> {
        let tiles = self.tiles.lock().expect("board lock");
        let flows = tiles.flows.iter().map(|(name, f)| {
            let functions: Vec<Value> = f
                .functions
                .iter()
                .zip(&f.failed)
                .map(|(name, failed)| json!({ "name": name, "failed": failed }))
                .collect();
            let flow = json!({
                "received": f.received,
                "dropped": f.dropped,
                "functions": functions,
                "results": f.results,
                "store_failed": f.store_failed,
            });
            (name.clone(), flow)
        });
        flows.collect()
    }

    /// The cameras of `pipeline` on the board, and how long since each was heard from.
    pub fn seen(&self, pipeline: &str) -> Vec<(String, Duration)> {
        let now = now_ms();
        let tiles = self.tiles.lock().expect("board lock");
        tiles
            .by_camera
            .iter()
            .filter(|((p, _), _)| p == pipeline)
            .map(|((_, c), cam)| (c.clone(), Duration::from_millis(now.saturating_sub(cam.last_seen_ms))))
            .collect()
    }

    /// The latest result of a camera and its content type.
    pub fn latest(&self, pipeline: &str, camera: &str) -> Option<(Bytes, &'static str)> {
        let tiles = self.tiles.lock().expect("board lock");
        let cam = tiles.by_camera.get(&(pipeline.to_string(), camera.to_string()))?;
        Some((cam.output.clone()?, cam.content_type))
    }

    /// The frame behind result `id` of a camera (its latest result's without one), when that
    /// result is not an image and is among the last few; never another result's frame.
    pub fn frame(&self, pipeline: &str, camera: &str, id: Option<&str>) -> Option<Bytes> {
        let tiles = self.tiles.lock().expect("board lock");
        let frames = &tiles.by_camera.get(&(pipeline.to_string(), camera.to_string()))?.frames;
        match id {
            Some(id) => frames.iter().find(|(i, _)| i == id).map(|(_, f)| f.clone()),
            None => frames.back().map(|(_, f)| f.clone()),
        }
    }
}

/// A committed result as the board shows it.
pub struct Shown<'a> {
    pub id: &'a str,
    pub content_type: &'static str,
    pub output: &'a Bytes,
    pub frame: &'a Bytes,
    pub latency: Duration,
}

fn view(pipeline: &str, camera: &str, c: &Camera, history: Option<(Instant, Instant)>) -> Value {
    // Text and JSON results travel inline, so a label tile needs no second request.
    let inline = match (&c.output, c.content_type) {
        (Some(b), ct) if b.len() <= 4096 && (ct.starts_with("text/") || ct == "application/json") => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        _ => None,
    };
    let stale = c.last_at.is_none_or(|t| t.elapsed().as_secs_f64() > 5.0);
    let mut v = json!({
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
        "frame": !c.frames.is_empty(),
    });
    // Only in the status: a camera event per result stays small.
    if let Some((epoch, now)) = history {
        let s = c.history.series(epoch, now);
        v["history"] = json!({ "bucket_s": BUCKET_S, "fps": s.fps, "latency_ms": s.latency_ms });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::{Board, MAX_BOARD_BYTES, MAX_KEPT, Shown};
    use bytes::Bytes;
    use std::time::Duration;

    fn shown<'a>(output: &'a Bytes, frame: &'a Bytes, content_type: &'static str) -> Shown<'a> {
        Shown { id: "id", content_type, output, frame, latency: Duration::from_millis(3) }
    }

    /// 256 cameras in each of several pipelines, each with a result just under the per-tile
    /// limit, would keep gigabytes for the page: the board as a whole is capped, and the
    /// tiles that lose their image are the ones updated longest ago.
    #[test]
    fn the_board_keeps_a_bounded_total_of_result_bytes() {
        let board = Board::default();
        board.configure([("p", &[][..])]);
        let output = Bytes::from(vec![7u8; MAX_KEPT]);
        for i in 0..200 {
            board.result("p", &format!("cam{i}"), shown(&output, &output, "image/png"));
        }
        let kept: usize = (0..200).filter_map(|i| board.latest("p", &format!("cam{i}"))).map(|(b, _)| b.len()).sum();
        assert!(kept <= MAX_BOARD_BYTES, "the board keeps {kept} bytes, over {MAX_BOARD_BYTES}");
        assert!(board.latest("p", "cam199").is_some(), "the newest result must be kept");
        assert!(board.latest("p", "cam0").is_none(), "the oldest result should have gone first");
        // Every camera is still on the board, with its counts.
        assert_eq!(board.cameras().len(), 200);
    }

    /// A label tile keeps the frame it labels; an image tile does not need it.
    #[test]
    fn a_label_keeps_its_frame_and_an_image_does_not() {
        let board = Board::default();
        board.configure([("p", &["classify".to_string()][..])]);
        let (frame, label) = (Bytes::from_static(b"\x89PNG frame"), Bytes::from_static(b"{\"label\":\"cat\"}"));
        board.result("p", "labels", shown(&label, &frame, "application/json"));
        board.result("p", "images", shown(&frame, &frame, "image/png"));
        assert_eq!(board.frame("p", "labels", None), Some(frame));
        assert_eq!(board.frame("p", "images", None), None);
    }

    /// The page asked for `/frame?id=X` and got whatever frame was latest: a label shown on
    /// the wrong picture. A label's own frame comes back, or nothing.
    #[test]
    fn a_label_gets_its_own_frame_or_none() {
        let board = Board::default();
        board.configure([("p", &["classify".to_string()][..])]);
        let label = Bytes::from_static(b"{\"label\":\"cat\"}");
        let frames: Vec<Bytes> = (0..6).map(|i| Bytes::from(format!("frame {i}"))).collect();
        for (i, f) in frames.iter().enumerate() {
            let shown = Shown { id: &format!("p/cam/{i}"), ..shown(&label, f, "application/json") };
            board.result("p", "cam", shown);
        }
        assert_eq!(board.frame("p", "cam", Some("p/cam/5")), Some(frames[5].clone()));
        assert_eq!(board.frame("p", "cam", Some("p/cam/3")), Some(frames[3].clone()));
        assert_eq!(board.frame("p", "cam", Some("p/cam/0")), None, "an old label's frame is gone, not replaced");
        assert_eq!(board.frame("p", "cam", Some("p/other/5")), None);
    }

    /// The flow counts each stage, and a reload that changes a pipeline's functions restarts
    /// its flow while one that keeps them keeps its counts and its cameras' history.
    #[test]
    fn the_flow_counts_each_stage_and_survives_a_reload_that_keeps_the_pipeline() {
        let board = Board::default();
        let fns = ["grayscale".to_string(), "classify".to_string()];
        board.configure([("p", &fns[..]), ("q", &fns[..1])]);
        let out = Bytes::from_static(b"x");
        for _ in 0..5 {
            board.received("p");
        }
        board.error("p", "cam", 1);
        board.drop_frame("p", "cam");
        for _ in 0..3 {
            board.result("p", "cam", shown(&out, &out, "text/plain"));
        }
        board.result("q", "cam", shown(&out, &out, "text/plain"));
        let flow = &board.flows()["p"];
        assert_eq!(
            (flow["received"].as_u64(), flow["dropped"].as_u64(), flow["results"].as_u64()),
            (Some(5), Some(1), Some(3))
        );
        assert_eq!(flow["functions"][1], serde_json::json!({ "name": "classify", "failed": 1 }));

        // p unchanged, q gone, r new.
        board.configure([("p", &fns[..]), ("r", &fns[..1])]);
        assert_eq!(board.flows()["p"]["results"], 3);
        assert!(!board.flows().contains_key("q"));
        let cameras = board.cameras();
        assert_eq!(cameras.len(), 1, "q's camera goes with q");
        assert_eq!(cameras[0]["history"]["fps"].as_array().unwrap().len(), super::super::history::BUCKETS);
        // p with other functions starts again.
        board.configure([("p", &fns[..1])]);
        assert_eq!(board.flows()["p"]["results"], 0);
    }
}
