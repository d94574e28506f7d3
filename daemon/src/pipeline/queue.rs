//! A bounded queue of frames for one camera in one pipeline, with its backpressure policy.
//!
//! Memory stays bounded whatever the publish rate: at most `capacity` frames wait. When full,
//! `latest` drops the oldest waiting frame (acknowledged and counted: a live view wants the
//! newest frame), and `block` makes the producer wait, which stops reading from the broker.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::frame::Frame;
use crate::config::Policy;

pub struct CameraQueue {
    frames: Mutex<Inner>,
    capacity: usize,
    policy: Policy,
    /// Wakes the worker when a frame arrives or the queue closes.
    arrived: Notify,
    /// Wakes a blocked producer when a frame leaves.
    left: Notify,
}

struct Inner {
    queue: VecDeque<Frame>,
    closed: bool,
}

/// What `push` did.
pub enum Pushed {
    Queued,
    /// Queued, and this older frame was dropped to make room.
    Displaced(Frame),
    /// The queue is closed (shutting down); the frame is handed back.
    Closed(Frame),
}

impl CameraQueue {
    pub fn new(capacity: usize, policy: Policy) -> CameraQueue {
        CameraQueue {
            frames: Mutex::new(Inner { queue: VecDeque::with_capacity(capacity), closed: false }),
            capacity,
            policy,
            arrived: Notify::new(),
            left: Notify::new(),
        }
    }

    pub async fn push(&self, frame: Frame) -> Pushed {
        let mut frame = Some(frame);
        loop {
            // Register for a wake-up before looking, so a pop or close in between is not missed.
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            {
                let mut inner = self.frames.lock().expect("queue lock");
                if inner.closed {
                    return Pushed::Closed(frame.take().expect("frame"));
                }
                if inner.queue.len() < self.capacity {
                    inner.queue.push_back(frame.take().expect("frame"));
                    drop(inner);
                    self.arrived.notify_one();
                    return Pushed::Queued;
                }
                if self.policy == Policy::Latest {
                    let oldest = inner.queue.pop_front().expect("full queue has a front");
                    inner.queue.push_back(frame.take().expect("frame"));
                    drop(inner);
                    self.arrived.notify_one();
                    return Pushed::Displaced(oldest);
                }
            }
            left.await;
        }
    }

    /// The next frame, or None once closed and empty.
    pub async fn pop(&self) -> Option<Frame> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut inner = self.frames.lock().expect("queue lock");
                if let Some(f) = inner.queue.pop_front() {
                    drop(inner);
                    self.left.notify_one();
                    return Some(f);
                }
                if inner.closed {
                    return None;
                }
            }
            arrived.await;
        }
    }

    /// Refuses new frames and hands back the waiting ones (unacknowledged: the broker redelivers).
    pub fn close(&self) -> Vec<Frame> {
        let mut inner = self.frames.lock().expect("queue lock");
        inner.closed = true;
        let left: Vec<Frame> = inner.queue.drain(..).collect();
        drop(inner);
        self.arrived.notify_waiters();
        self.left.notify_waiters();
        left
    }

    /// Closed for shutdown (or because its camera gave its place up).
    pub fn is_closed(&self) -> bool {
        self.frames.lock().expect("queue lock").closed
    }

    pub fn len(&self) -> usize {
        self.frames.lock().expect("queue lock").queue.len()
    }
}
