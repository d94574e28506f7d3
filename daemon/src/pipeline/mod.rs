//! Pipelines: a frame runs through a chain of functions, and the result is committed to the
//! outbox for each of the pipeline's sinks before the frame is acknowledged.
//!
//! This file is the chain runner: it makes a result from a frame and stores it. Frames from
//! MQTT go through a bounded queue per camera ([`queue`]) with one worker each ([`worker`]:
//! admission, the queue, the retries), so a camera's frames stay in order and a flood from one
//! camera costs bounded memory. HTTP and Dapr events call [`Pipelines::run`] directly and get
//! the result back. What the workers are doing is in [`progress`], for the watchdog.

pub mod board;
pub mod cameras;
pub mod frame;
pub mod history;
pub mod progress;
pub mod queue;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::task::JoinSet;

use self::board::{Board, Shown};
use self::cameras::Cameras;
use self::progress::Progress;
use self::queue::CameraQueue;
use crate::config::{PipelineConfig, Policy, Source};
use crate::content_type;
use crate::metrics::{CameraLabel, Metrics, PipelineError as ErrorLabel};
use crate::runtime::{InvokeError, Runtime};
use crate::sinks::Sink;
use crate::sinks::outbox::{Behind, Boot, Coming, Committing, Item, Outbox, Record, now_ms};

/// The failures a pipeline counts beside its functions' own kinds.
const OUTBOX_REFUSED: &str = "outbox";
const TOO_MANY_CAMERAS: &str = "too_many_cameras";
const RESULT_TOO_LARGE: &str = "result_too_large";
const OWN_ERROR_KINDS: [&str; 3] = [OUTBOX_REFUSED, TOO_MANY_CAMERAS, RESULT_TOO_LARGE];

/// Camera ids end up in result ids, HTTP headers, file names and metric labels: 1 to 128 of
/// `[A-Za-z0-9._-]`. Every ingress checks this before a frame enters a pipeline.
pub fn valid_camera(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

pub struct Pipeline {
    pub name: String,
    pub source: Source,
    pub functions: Vec<String>,
    pub sinks: Vec<Arc<Sink>>,
    pub queue: usize,
    pub policy: Policy,
    pub camera_idle: std::time::Duration,
    /// How long one attempt at a frame may take before the worker counts as wedged.
    pub wedge_limit: std::time::Duration,
}

/// A frame's result, with what the outbox must store for it.
#[derive(Clone)]
pub(super) struct Made {
    processed: Processed,
    camera: String,
    items: Vec<Item>,
    /// The frame it was made from, for the board (a label's tile shows its frame).
    frame: Bytes,
    /// When the frame entered the pipeline: the board's latency runs from here to the commit.
    started: std::time::Instant,
}

/// A frame's result, committed.
#[derive(Clone)]
pub struct Processed {
    pub id: String,
    pub seq: u64,
    pub output: Bytes,
    pub content_type: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Function(InvokeError),
    /// The result could not be made durable; the frame must not be acknowledged.
    #[error("result not stored: {0}")]
    Outbox(String),
    /// The result alone is larger than the outbox may hold (`outbox.max_bytes`): refused
    /// rather than committed and evicted at once.
    #[error("result not stored: {0}")]
    TooLarge(String),
    /// Shutting down.
    #[error("shutting down")]
    Closed,
}

impl PipelineError {
    pub fn kind(&self) -> &'static str {
        match self {
            PipelineError::Function(e) => e.kind(),
            PipelineError::Outbox(_) => OUTBOX_REFUSED,
            PipelineError::TooLarge(_) => RESULT_TOO_LARGE,
            PipelineError::Closed => "closed",
        }
    }

    /// The same frame would fail the same way again: settle it (acknowledge, drop the event)
    /// instead of having it redelivered for ever.
    pub fn is_final(&self) -> bool {
        match self {
            PipelineError::Function(e) => !e.passes(),
            PipelineError::TooLarge(_) => true,
            PipelineError::Outbox(_) | PipelineError::Closed => false,
        }
    }
}

pub struct Pipelines {
    list: BTreeMap<String, Arc<Pipeline>>,
    runtime: Arc<Runtime>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    queues: Mutex<HashMap<(String, String), Arc<CameraQueue>>>,
    cameras: Cameras,
    workers: Mutex<JoinSet<()>>,
    /// Shared with the generations before and after this one (see `board`).
    pub board: Arc<Board>,
    /// This board's id, first in every result id ([`crate::board`]).
    board_id: Arc<str>,
    /// What the camera workers are doing: degraded or wedged, for the watchdog.
    progress: Progress,
    /// Set by `shutdown` under the queues lock: no queue or worker is made after it took stock.
    closing: std::sync::atomic::AtomicBool,
}

impl Pipelines {
    pub fn new(
        configs: &[PipelineConfig],
        sink: impl Fn(&crate::config::SinkConfig) -> Arc<Sink>,
        runtime: Arc<Runtime>,
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
        board: Arc<Board>,
        board_id: &str,
    ) -> Arc<Pipelines> {
        board.configure(configs.iter().map(|c| (c.name.as_str(), c.functions.as_slice())));
        let list: BTreeMap<String, Arc<Pipeline>> = configs
            .iter()
            .map(|c| {
                for f in &c.functions {
                    if runtime.get(f).is_none() {
                        tracing::warn!(pipeline = %c.name, function = %f, "pipeline uses a function that is not loaded");
                    }
                }
                let p = Pipeline {
                    name: c.name.clone(),
                    source: c.source.clone(),
                    functions: c.functions.clone(),
                    sinks: c.sinks.iter().map(&sink).collect(),
                    queue: c.queue,
                    policy: c.policy,
                    camera_idle: c.camera_idle,
                    // A function that is not loaded fails at once: it adds nothing.
                    wedge_limit: progress::wedge_limit(
                        c.functions.iter().filter_map(|f| runtime.get(f)).map(|f| f.limits.deadline),
                    ),
                };
                (c.name.clone(), Arc::new(p))
            })
            .collect();
        for p in list.values() {
            metrics.declare_pipeline(&p.name, InvokeError::KINDS.into_iter().chain(OWN_ERROR_KINDS));
            p.sinks.iter().for_each(|s| metrics.declare_sink(&s.key));
        }
        let cameras = Cameras::default();
        for p in list.values() {
            cameras.seed(&p.name, board.seen(&p.name));
        }
        Arc::new(Pipelines {
            list,
            runtime,
            outbox,
            metrics,
            queues: Mutex::new(HashMap::new()),
            cameras,
            workers: Mutex::new(JoinSet::new()),
            board,
            board_id: board_id.into(),
            progress: Progress::default(),
            closing: Default::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pipeline>> {
        self.list.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pipeline>> {
        self.list.values()
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Runs `payload` through `p` and commits the result for every sink.
    pub async fn run(
        &self,
        p: &Pipeline,
        camera: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<Processed, PipelineError> {
        let coming = self.outbox.coming();
        let made = self.make(p, camera, topic, payload).await?;
        let mut commit = self.submit_commit(p, &made, Behind::Answer, coming).await?;
        self.stored(p, made, commit.durable().await)
    }

    /// Runs `payload` through `p`'s functions: the result and its outbox items, not yet stored.
    /// Callers take [`Outbox::coming`] first and hand it to the commit: the outbox holds a
    /// commit open for a frame still on its way.
    pub(super) async fn make(
        &self,
        p: &Pipeline,
        camera: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<Made, PipelineError> {
        let seq = self.outbox.next_seq(camera);
        let seq_text = seq.to_string();
        let env = [
            ("EDGEFN_PIPELINE", p.name.as_str()),
            ("EDGEFN_TOPIC", topic),
            ("EDGEFN_CAMERA", camera),
            ("EDGEFN_SEQ", seq_text.as_str()),
        ];
        let started = std::time::Instant::now();
        let label = CameraLabel { pipeline: p.name.clone(), camera: camera.to_string() };
        self.metrics.declare_camera(&label);
        self.metrics.frames.get_or_create(&label).inc();
        self.board.received(&p.name);
        let mut data = payload.clone();
        for (i, f) in p.functions.iter().enumerate() {
            match self.runtime.invoke(f, data, &env).await {
                Ok(out) => data = out.stdout,
                Err(e) => {
                    self.count_error(p, e.kind());
                    self.board.error(&p.name, camera, i);
                    return Err(PipelineError::Function(e));
                }
            }
        }
        let content_type = content_type::sniff(&data);
        let id = format!("{}/{}/{camera}/{seq}", self.board_id, p.name);
        let created_ms = now_ms();
        let boot = Boot::now();
        let items: Vec<Item> = p
            .sinks
            .iter()
            .map(|s| {
                let record = Record {
                    id: id.clone(),
                    board: self.board_id.to_string(),
                    pipeline: p.name.clone(),
                    camera: camera.to_string(),
                    seq,
                    topic: s.destination(&p.name, camera),
                    content_type: content_type.to_string(),
                    created_ms,
                    boot: boot.clone(),
                    error: None,
                };
                s.item(record, data.clone())
            })
            .collect();
        let processed = Processed { id, seq, output: data, content_type };
        Ok(Made { processed, camera: camera.to_string(), items, frame: payload, started })
    }

    /// Commits a made result for every sink; only then does it count and show on the board.
    pub(super) async fn store(&self, p: &Pipeline, made: Made) -> Result<Processed, PipelineError> {
        let mut commit = self.submit_commit(p, &made, Behind::Answer, self.outbox.coming()).await?;
        self.stored(p, made, commit.durable().await)
    }

    /// Queues a made result's commit without waiting for it: refused if it could never fit.
    pub(super) async fn submit_commit(
        &self,
        p: &Pipeline,
        made: &Made,
        behind: Behind,
        coming: Coming,
    ) -> Result<Committing, PipelineError> {
        if let Some(cap) = made.items.iter().find_map(|i| self.outbox.too_large(i)) {
            self.count_error(p, RESULT_TOO_LARGE);
            return Err(PipelineError::TooLarge(cap));
        }
        Ok(self.outbox.submit(made.items.clone(), behind, coming).await)
    }

    /// Counts a commit's outcome, and shows a durable result on the board.
    pub(super) fn stored(
        &self,
        p: &Pipeline,
        made: Made,
        durable: anyhow::Result<()>,
    ) -> Result<Processed, PipelineError> {
        if let Err(e) = durable {
            self.count_error(p, OUTBOX_REFUSED);
            self.board.store_failed(&p.name);
            return Err(PipelineError::Outbox(format!("{e:#}")));
        }
        let r = made.processed;
        let label = CameraLabel { pipeline: p.name.clone(), camera: made.camera.clone() };
        self.metrics.results.get_or_create(&label).inc();
        let shown = Shown {
            id: &r.id,
            content_type: r.content_type,
            output: &r.output,
            frame: &made.frame,
            latency: made.started.elapsed(),
        };
        self.board.result(&p.name, &made.camera, shown);
        Ok(r)
    }

    pub(super) fn count_error(&self, p: &Pipeline, kind: &'static str) {
        self.metrics.pipeline_errors.get_or_create(&ErrorLabel { pipeline: p.name.clone(), kind }).inc();
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Frames waiting in camera queues.
    pub fn queued(&self) -> usize {
        self.queues.lock().expect("queues lock").values().map(|q| q.len()).sum()
    }

    /// Stops taking frames, lets each worker finish the frame in hand, and waits for them.
    /// Waiting frames are left unacknowledged for the broker to redeliver.
    pub async fn shutdown(&self) {
        let queues: Vec<Arc<CameraQueue>> = {
            let queues = self.queues.lock().expect("queues lock");
            self.closing.store(true, std::sync::atomic::Ordering::Relaxed);
            queues.values().cloned().collect()
        };
        let mut returned = 0;
        for q in queues {
            returned += q.close().len();
        }
        if returned > 0 {
            tracing::info!(frames = returned, "returned queued frames to the broker (unacknowledged)");
        }
        let mut workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        while workers.join_next().await.is_some() {}
    }
}
