//! Camera workers: admission of a camera into a pipeline, its bounded queue, and the worker
//! that takes its frames in order and retries the failures that pass, until each frame is
//! settled (its result stored, or its failure final) and only then acknowledged.

use std::sync::Arc;

use super::cameras::MAX_CAMERAS;
use super::frame::Frame;
use super::queue::{CameraQueue, Pushed};
use super::{Pipeline, PipelineError, Pipelines, Processed, TOO_MANY_CAMERAS};
use crate::metrics::CameraLabel;

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

    pub(super) async fn camera_worker(self: Arc<Self>, p: Arc<Pipeline>, camera: String, queue: Arc<CameraQueue>) {
        while let Some(frame) = queue.pop().await {
            let outcome = self.run_until_settled(&p, &camera, &frame, &queue).await;
            self.progress.settled(&p.name, &camera);
            match outcome {
                Ok(_) => {
                    if let Some(ack) = frame.ack {
                        ack.done();
                    }
                }
                Err(e) if e.is_final() => {
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
            self.progress.attempt(&p.name, camera, p.wedge_limit);
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
