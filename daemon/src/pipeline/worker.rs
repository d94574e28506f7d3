//! Camera workers: admission of a camera into a pipeline, its bounded queue, and the worker
//! that takes its frames in order and retries the failures that pass, until each frame is
//! settled (its result stored, or its failure final) and only then acknowledged.

use std::collections::VecDeque;
use std::sync::Arc;

use super::cameras::MAX_CAMERAS;
use super::frame::Frame;
use super::queue::{CameraQueue, Pushed};
use super::{Made, Pipeline, PipelineError, Pipelines, Processed, TOO_MANY_CAMERAS};
use crate::metrics::CameraLabel;
use crate::sinks::outbox::{Behind, Committing};

impl Pipelines {
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
        if let Err(e) = crate::runtime::blocking(|| self.outbox.forget_cameras(&pruned)) {
            // Kept, then: a little memory, and nothing lost.
            tracing::warn!(pipeline = %p.name, "cannot forget idle cameras' sequence numbers: {e:#}");
        }
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

    /// Takes the camera's frames in order. While one frame's commit waits for its fsync, the
    /// next is made and submitted: the committer stores them in submission order, and a
    /// commit window can then gather several frames of one camera, not just one per camera.
    /// Frames are acknowledged in that same order, as MQTT has PUBACKs go.
    pub(super) async fn camera_worker(self: Arc<Self>, p: Arc<Pipeline>, camera: String, queue: Arc<CameraQueue>) {
        let mut flight: VecDeque<InFlight> = VecDeque::with_capacity(IN_FLIGHT);
        loop {
            let room = flight.len() < IN_FLIGHT;
            let next = match flight.front_mut() {
                Some(front) if room => tokio::select! {
                    biased;
                    outcome = front.outcome(&self, &p) => Err(outcome),
                    frame = queue.pop() => Ok(frame),
                },
                Some(front) => Err(front.outcome(&self, &p).await),
                None => Ok(queue.pop().await),
            };
            match next {
                Err(outcome) => {
                    let front = flight.pop_front().expect("the front settled");
                    self.settle(&p, &camera, front, outcome, &queue).await;
                    self.progress_after_settle(&p, &camera, &flight);
                }
                Ok(Some(frame)) => {
                    let stage = self.make_and_submit(&p, &camera, &frame, &queue).await;
                    flight.push_back(InFlight { frame, stage });
                }
                // Closed and empty: what was submitted still settles (and is acknowledged).
                Ok(None) => break,
            }
        }
        while let Some(mut front) = flight.pop_front() {
            let outcome = front.outcome(&self, &p).await;
            self.settle(&p, &camera, front, outcome, &queue).await;
        }
        self.progress.settled(&p.name, &camera);
    }

    /// The watchdog's clock follows the oldest frame not yet settled.
    fn progress_after_settle(&self, p: &Pipeline, camera: &str, flight: &VecDeque<InFlight>) {
        if flight.is_empty() {
            self.progress.settled(&p.name, camera);
        } else {
            self.progress.next(&p.name, camera, p.wedge_limit);
        }
    }

    /// Makes a frame's result, trying again while the failure passes, and submits its commit.
    async fn make_and_submit(&self, p: &Pipeline, camera: &str, frame: &Frame, queue: &CameraQueue) -> Stage {
        let coming = self.outbox.coming();
        let made = self.retrying(p, camera, frame, queue, || self.make(p, camera, &frame.topic, frame.payload.clone()));
        let made = match made.await {
            Ok(m) => m,
            Err(e) => return Stage::Done(Err(e)),
        };
        match self.submit_commit(p, &made, Behind::NextFrame, coming).await {
            Ok(commit) => Stage::Committing(made, commit),
            Err(e) => Stage::Done(Err(e)),
        }
    }

    /// Ends a frame: a commit that failed is tried again (the frames behind it wait, so acks
    /// stay in order), then the frame is acknowledged, or left for the broker to redeliver.
    async fn settle(
        &self,
        p: &Pipeline,
        camera: &str,
        front: InFlight,
        outcome: Result<Processed, PipelineError>,
        queue: &CameraQueue,
    ) {
        let InFlight { frame, stage } = front;
        let outcome = match (outcome, stage) {
            (Err(PipelineError::Outbox(_)), Stage::Committing(made, _)) if !queue.is_closed() => {
                self.retrying(p, camera, &frame, queue, || self.store(p, made.clone())).await
            }
            (outcome, _) => outcome,
        };
        match outcome {
            Ok(_) => {
                if let Some(ack) = frame.ack {
                    ack.done();
                }
            }
            Err(e) if e.is_final() => {
                tracing::warn!(pipeline = %p.name, camera, topic = %frame.topic, "frame failed: {e}");
                // Retrying the same bytes gives the same failure: settle the frame.
                if let Some(ack) = frame.ack {
                    ack.done();
                }
            }
            Err(e) => {
                tracing::warn!(pipeline = %p.name, camera, topic = %frame.topic,
                    "frame not acknowledged, the broker will redeliver it: {e}");
            }
        }
    }

    /// Runs `attempt` until it succeeds or fails in a way that does not pass: a full disk, no
    /// free instance, a model not loaded all pass. Giving up would withhold the frame's ack,
    /// and past the broker's in-flight window (mosquitto: 20) the broker sends nothing more;
    /// settling it would lose it. Only a closing queue (shutdown, reload) ends the wait,
    /// leaving the frame for the broker to redeliver.
    async fn retrying<T, F>(
        &self,
        p: &Pipeline,
        camera: &str,
        frame: &Frame,
        queue: &CameraQueue,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, PipelineError>
    where
        F: std::future::Future<Output = Result<T, PipelineError>>,
    {
        let mut wait = FIRST_RETRY;
        loop {
            self.progress.attempt(&p.name, camera, p.wedge_limit);
            let outcome = attempt().await;
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
                self.progress.retrying(&p.name, camera, e.to_string());
            }
            let until = tokio::time::Instant::now() + wait;
            while tokio::time::Instant::now() < until && !queue.is_closed() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
        }
    }
}

/// Frames of one camera made and not yet settled, at most. Four cover a camera publishing at
/// a few times the fsync rate; each holds a frame and its result in memory.
const IN_FLIGHT: usize = 4;

/// The first wait before a passing failure is tried again; it doubles up to two seconds.
const FIRST_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// A frame between its queue and its ack.
struct InFlight {
    frame: Frame,
    stage: Stage,
}

enum Stage {
    /// Made, its commit submitted.
    Committing(Made, Committing),
    /// Settled without a commit (it failed); acknowledged in its turn.
    Done(Result<Processed, PipelineError>),
}

impl InFlight {
    /// The frame's outcome once its commit is durable or failed. Cancel-safe.
    async fn outcome(&mut self, pipelines: &Pipelines, p: &Pipeline) -> Result<Processed, PipelineError> {
        match &mut self.stage {
            Stage::Committing(made, commit) => {
                let durable = commit.durable().await;
                pipelines.stored(p, made.clone(), durable)
            }
            Stage::Done(outcome) => std::mem::replace(outcome, Err(PipelineError::Closed)),
        }
    }
}
