//! A frame on its way through a pipeline, and the acknowledgement it owes its source.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

pub struct Frame {
    pub camera: String,
    pub topic: String,
    pub payload: Bytes,
    /// Settled when the frame's result is durable, or the frame was deliberately dropped.
    pub ack: Option<Ack>,
}

/// One pipeline's share of a source acknowledgement. A message that feeds several pipelines is
/// acknowledged once, when every share is `done`; a share dropped without `done` (outbox
/// failure, shutdown) withholds the ack, so the broker redelivers.
pub struct Ack {
    state: Arc<AckState>,
    settled: bool,
}

struct AckState {
    remaining: AtomicUsize,
    withheld: AtomicBool,
    send: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Ack {
    /// `shares` acks that together fire `send` once.
    pub fn split(shares: usize, send: impl FnOnce() + Send + 'static) -> Vec<Ack> {
        let state = Arc::new(AckState {
            remaining: AtomicUsize::new(shares),
            withheld: AtomicBool::new(false),
            send: Mutex::new(Some(Box::new(send))),
        });
        (0..shares).map(|_| Ack { state: state.clone(), settled: false }).collect()
    }

    pub fn done(mut self) {
        self.settle(true);
    }

    fn settle(&mut self, ok: bool) {
        self.settled = true;
        if !ok {
            self.state.withheld.store(true, Ordering::Release);
        }
        let last = self.state.remaining.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && !self.state.withheld.load(Ordering::Acquire) {
            if let Some(send) = self.state.send.lock().expect("ack lock").take() {
                send();
            }
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ack;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counter() -> (Arc<AtomicUsize>, impl FnOnce() + Send + 'static) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn fires_once_after_every_share() {
        let (n, send) = counter();
        let mut shares = Ack::split(3, send);
        shares.pop().unwrap().done();
        shares.pop().unwrap().done();
        assert_eq!(n.load(Ordering::SeqCst), 0);
        shares.pop().unwrap().done();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_dropped_share_withholds_the_ack() {
        let (n, send) = counter();
        let mut shares = Ack::split(2, send);
        drop(shares.pop());
        shares.pop().unwrap().done();
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }
}
