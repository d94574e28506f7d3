//! The frames between the MQTT connection's poller and dispatch, bounded in bytes.
//!
//! The poller must never wait on a pipeline: while it waits, no PINGREQ goes out and no PUBACK
//! is read, and the broker drops the connection. So handing a frame over never blocks.
//! QoS 1 frames are bounded by the broker's in-flight window (the receive maximum we set on
//! MQTT 5, the broker's own on 3.1.1): each waits for our acknowledgement, which comes only
//! after its pipeline took it. QoS 0 frames have no such bound, so past [`Handoff`]'s budget
//! they are dropped and counted: a camera at QoS 0 has said it can lose frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::mqtt::Message;

pub struct Handoff {
    tx: mpsc::UnboundedSender<(Message, Held)>,
    held: Arc<AtomicUsize>,
    budget: usize,
}

pub struct Taker {
    rx: mpsc::UnboundedReceiver<(Message, Held)>,
}

/// A frame's bytes, counted against the budget until dispatch has handed it to its pipelines.
pub struct Held {
    bytes: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A handoff that holds at most `budget` bytes of QoS 0 frames.
pub fn handoff(budget: usize) -> (Handoff, Taker) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Handoff { tx, held: Arc::new(AtomicUsize::new(0)), budget }, Taker { rx })
}

impl Handoff {
    /// Hands `m` over, at once; gives a QoS 0 frame back when the budget is spent.
    pub fn offer(&self, m: Message) -> Result<(), Message> {
        let bytes = m.payload().len();
        let before = self.held.fetch_add(bytes, Ordering::AcqRel);
        if m.qos0() && before + bytes > self.budget {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
            return Err(m);
        }
        let held = Held { bytes, held: self.held.clone() };
        // A closed receiver means dispatch has stopped: the frame stays unacknowledged.
        let _ = self.tx.send((m, held));
        Ok(())
    }

    /// Bytes handed over and not yet dispatched.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Taker {
    pub async fn take(&mut self) -> Option<(Message, Held)> {
        self.rx.recv().await
    }
}
