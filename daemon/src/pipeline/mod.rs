//! Pipelines: a frame runs through a chain of functions, and the result is committed to the
//! outbox for each of the pipeline's sinks before the frame is acknowledged.
//!
//! Frames from MQTT go through a bounded queue per camera ([`queue`]) with one worker each, so
//! a camera's frames stay in order and a flood from one camera costs bounded memory. HTTP and
//! Dapr events call [`Pipelines::run`] directly and get the result back.

pub mod board;
pub mod cameras;
pub mod frame;
pub mod history;
pub mod queue;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::task::JoinSet;

use self::board::{Board, Shown};
use self::cameras::{Cameras, MAX_CAMERAS};
use self::frame::Frame;
use self::queue::{CameraQueue, Pushed};
use crate::config::{PipelineConfig, Policy, Source};
use crate::content_type;
use crate::metrics::{CameraLabel, Metrics, PipelineError as ErrorLabel};
use crate::runtime::{InvokeError, Runtime};
use crate::sinks::Sink;
use crate::sinks::outbox::{Boot, Item, Outbox, Record, now_ms};

/// The failures a pipeline counts beside its functions' own kinds.
const OUTBOX_REFUSED: &str = "outbox";
const TOO_MANY_CAMERAS: &str = "too_many_cameras";
const OWN_ERROR_KINDS: [&str; 2] = [OUTBOX_REFUSED, TOO_MANY_CAMERAS];

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
}

/// A frame's result, with what the outbox must store for it.
#[derive(Clone)]
struct Made {
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
    /// Shutting down.
    #[error("shutting down")]
    Closed,
}

impl PipelineError {
    pub fn kind(&self) -> &'static str {
        match self {
            PipelineError::Function(e) => e.kind(),
            PipelineError::Outbox(_) => "outbox",
            PipelineError::Closed => "closed",
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
    /// Frames settled by camera workers; the watchdog checks that it moves.
    settled: std::sync::atomic::AtomicU64,
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
                };
                (c.name.clone(), Arc::new(p))
            })
            .collect();
        for p in list.values() {
            metrics.declare_pipeline(&p.name, InvokeError::KINDS.into_iter().chain(OWN_ERROR_KINDS));
            p.sinks.iter().for_each(|s| metrics.declare_sink(&s.key));
        }
        Arc::new(Pipelines {
            list,
            runtime,
            outbox,
            metrics,
            queues: Mutex::new(HashMap::new()),
            cameras: Cameras::default(),
            workers: Mutex::new(JoinSet::new()),
            board,
            settled: Default::default(),
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
        let made = self.make(p, camera, topic, payload).await?;
        self.store(p, made).await
    }

    /// Runs `payload` through `p`'s functions: the result and its outbox items, not yet stored.
    async fn make(&self, p: &Pipeline, camera: &str, topic: &str, payload: Bytes) -> Result<Made, PipelineError> {
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
        let id = format!("{}/{camera}/{seq}", p.name);
        let created_ms = now_ms();
        let boot = Boot::now();
        let items: Vec<Item> = p
            .sinks
            .iter()
            .map(|s| Item {
                sink: s.key.clone(),
                record: Record {
                    id: id.clone(),
                    pipeline: p.name.clone(),
                    camera: camera.to_string(),
                    seq,
                    topic: s.destination(&p.name, camera),
                    content_type: content_type.to_string(),
                    created_ms,
                    boot: boot.clone(),
                    error: None,
                },
                payload: data.clone(),
            })
            .collect();
        let processed = Processed { id, seq, output: data, content_type };
        Ok(Made { processed, camera: camera.to_string(), items, frame: payload, started })
    }

    /// Commits a made result for every sink; only then does it count and show on the board.
    async fn store(&self, p: &Pipeline, made: Made) -> Result<Processed, PipelineError> {
        if !made.items.is_empty() {
            if let Err(e) = self.outbox.commit(made.items).await {
                self.count_error(p, OUTBOX_REFUSED);
                self.board.store_failed(&p.name);
                return Err(PipelineError::Outbox(format!("{e:#}")));
            }
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

    fn count_error(&self, p: &Pipeline, kind: &'static str) {
        self.metrics.pipeline_errors.get_or_create(&ErrorLabel { pipeline: p.name.clone(), kind }).inc();
    }

    /// Lets a frame from `camera` into `p`, every ingress alike: false when the pipeline
    /// already tracks [`MAX_CAMERAS`] cameras heard from within `camera_idle` (logged with
    /// `topic`, counted). Cameras that gave their place up are forgotten here.
    pub fn admit(&self, p: &Pipeline, camera: &str, topic: &str) -> bool {
        let busy = |c: &str| {
            let queues = self.queues.lock().expect("queues lock");
            queues.get(&(p.name.clone(), c.to_string())).is_some_and(|q| q.len() > 0)
        };
        let Some(pruned) = self.cameras.admit(&p.name, camera, p.camera_idle, busy) else {
            tracing::warn!(pipeline = %p.name, camera, topic,
                "frame refused: the pipeline tracks {MAX_CAMERAS} cameras, none idle for {:?}", p.camera_idle);
            self.count_error(p, TOO_MANY_CAMERAS);
            return false;
        };
        for c in pruned {
            if let Some(q) = self.queues.lock().expect("queues lock").remove(&(p.name.clone(), c.clone())) {
                q.close();
            }
            self.board.forget(&p.name, &c);
            let label = CameraLabel { pipeline: p.name.clone(), camera: c };
            self.metrics.frames.remove(&label);
            self.metrics.drops.remove(&label);
            self.metrics.results.remove(&label);
        }
        true
    }

    /// Queues an MQTT frame for its camera; waits only under the `block` policy when full.
    pub async fn submit(self: &Arc<Self>, p: &Arc<Pipeline>, frame: Frame) {
        if !self.admit(p, &frame.camera, &frame.topic) {
            // The same camera will be refused until one goes idle: settle the frame.
            if let Some(ack) = frame.ack {
                ack.done();
            }
            return;
        }
        let key = (p.name.clone(), frame.camera.clone());
        let queue = {
            let mut queues = self.queues.lock().expect("queues lock");
            if self.closing.load(std::sync::atomic::Ordering::Relaxed) {
                // Not acknowledged: the broker redelivers it to the next generation.
                return;
            }
            match queues.get(&key) {
                Some(q) => q.clone(),
                None => {
                    let q = Arc::new(CameraQueue::new(p.queue, p.policy));
                    queues.insert(key, q.clone());
                    let (this, p, camera, q2) = (self.clone(), p.clone(), frame.camera.clone(), q.clone());
                    let mut workers = self.workers.lock().expect("workers lock");
                    // Reap the workers of cameras that gave their place up.
                    while workers.try_join_next().is_some() {}
                    workers.spawn(async move {
                        this.camera_worker(p, camera, q2).await;
                    });
                    q
                }
            }
        };
        match queue.push(frame).await {
            Pushed::Queued => {}
            Pushed::Displaced(old) => {
                let label = CameraLabel { pipeline: p.name.clone(), camera: old.camera.clone() };
                self.metrics.drops.get_or_create(&label).inc();
                self.board.drop_frame(&p.name, &old.camera);
                // A deliberate, counted drop is settled: acknowledge it.
                if let Some(ack) = old.ack {
                    ack.done();
                }
            }
            // Not acknowledged: the broker redelivers it after the restart.
            Pushed::Closed(_) => {}
        }
    }

    async fn camera_worker(self: Arc<Self>, p: Arc<Pipeline>, camera: String, queue: Arc<CameraQueue>) {
        while let Some(frame) = queue.pop().await {
            let outcome = self.run_until_settled(&p, &camera, &frame, &queue).await;
            self.settled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match outcome {
                Ok(_) => {
                    if let Some(ack) = frame.ack {
                        ack.done();
                    }
                }
                Err(PipelineError::Function(e)) if !e.passes() => {
                    tracing::warn!(pipeline = %p.name, camera = %camera, topic = %frame.topic, "frame failed: {e}");
                    // Retrying the same bytes gives the same failure: settle the frame.
                    if let Some(ack) = frame.ack {
                        ack.done();
                    }
                }
                Err(e) => {
                    tracing::warn!(pipeline = %p.name, camera = %camera, topic = %frame.topic,
                        "frame not acknowledged, the broker will redeliver it: {e}");
                }
            }
        }
    }

    /// Runs a camera frame and stores its result, trying again while the failure is one that
    /// passes: a full disk, no free instance, a model not loaded. Giving up would withhold the
    /// frame's ack, and past the broker's in-flight window (mosquitto: 20) the broker sends
    /// nothing more; settling it would lose it. Only a closing queue (shutdown, reload) ends
    /// the wait, leaving the frame for the broker to redeliver.
    async fn run_until_settled(
        &self,
        p: &Pipeline,
        camera: &str,
        frame: &Frame,
        queue: &CameraQueue,
    ) -> Result<Processed, PipelineError> {
        let mut wait = std::time::Duration::from_millis(250);
        let mut made = None;
        loop {
            let outcome = match made.take() {
                Some(m) => self.store(p, m).await,
                None => match self.make(p, camera, &frame.topic, frame.payload.clone()).await {
                    Ok(m) => {
                        made = Some(m.clone());
                        self.store(p, m).await.inspect(|_| made = None)
                    }
                    Err(e) => Err(e),
                },
            };
            let passes = match &outcome {
                Err(PipelineError::Outbox(_)) => true,
                Err(PipelineError::Function(e)) => e.passes(),
                _ => false,
            };
            if !passes || queue.is_closed() {
                return outcome;
            }
            if let Err(e) = &outcome {
                tracing::warn!(pipeline = %p.name, camera, topic = %frame.topic, retry_in = ?wait, "trying again: {e}");
            }
            let until = tokio::time::Instant::now() + wait;
            while tokio::time::Instant::now() < until && !queue.is_closed() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
        }
    }

    /// Frames the camera workers have finished with, successfully or not.
    pub fn settled(&self) -> u64 {
        self.settled.load(std::sync::atomic::Ordering::Relaxed)
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
