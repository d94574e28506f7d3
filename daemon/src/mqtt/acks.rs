//! Which of our QoS 1 publishes the broker has acknowledged.
//!
//! rumqttc reports a publish only by its packet id: `Outgoing::Publish(pkid)` when it first
//! writes it (and again on each retransmission), `PubAck(pkid)` when the broker has it. It
//! assigns ids as it takes publishes from its queue, in queue order. So a waiter registered in
//! queue order (under [`Acks::order`]) is matched to the next *new* packet id written, and
//! fires on that id's PUBACK.
//!
//! What rumqttc does on a lost connection decides the rest. It moves every unacknowledged
//! publish, and every publish still queued, into its pending list, and sends them again on the
//! next connection, unless the broker lost our session: then it drops them all, silently.
//! Those waiters fail here, so the results they stand for stay in the outbox and are sent
//! again. A waiter never fires for a publish that did not reach the broker.
//!
//! A waiter gets the broker's answer, which on MQTT 5 may be a refusal ([`Refused`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::refusal::Refused;

/// The broker's answer to one publish.
pub type Answer = Result<(), Refused>;

#[derive(Default)]
pub struct Acks {
    /// Held while a publish is registered and queued, so both happen in the same order.
    pub order: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Waiters of publishes not written yet, in queue order.
    unsent: VecDeque<oneshot::Sender<Answer>>,
    /// Waiters of publishes written, by packet id.
    sent: HashMap<u16, oneshot::Sender<Answer>>,
    /// A publish rumqttc holds back because its packet id is still in flight (a broker that
    /// acknowledges out of order); it goes out under that id after the id's PUBACK.
    collided: Option<(u16, oneshot::Sender<Answer>)>,
    /// At the last lost connection: how many of `unsent` rumqttc had moved to its pending list
    /// (the front of the queue). The rest were queued after, and survive a lost session.
    unsent_pending: usize,
}

impl Acks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("acks lock")
    }

    /// Registers the waiter of the publish about to be queued (call under [`Acks::order`]).
    pub fn expect(&self) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.state().unsent.push_back(tx);
        rx
    }

    /// The publish registered last was not queued after all.
    pub fn unexpect(&self) {
        self.state().unsent.pop_back();
    }

    /// rumqttc wrote a publish with `pkid`: a retransmission if the id is known, else the next
    /// queued publish.
    pub fn sent(&self, pkid: u16) {
        let mut s = self.state();
        if pkid == 0 || s.sent.contains_key(&pkid) {
            return;
        }
        if let Some(waiter) = s.unsent.pop_front() {
            s.unsent_pending = s.unsent_pending.saturating_sub(1);
            s.sent.insert(pkid, waiter);
        }
    }

    /// The next queued publish waits for `pkid`, still in flight, to be acknowledged.
    pub fn collided(&self, pkid: u16) {
        let mut s = self.state();
        if let Some(waiter) = s.unsent.pop_front() {
            s.unsent_pending = s.unsent_pending.saturating_sub(1);
            s.collided = Some((pkid, waiter));
        }
    }

    /// The broker acknowledged `pkid` with `answer`.
    pub fn acked(&self, pkid: u16, answer: Answer) {
        let mut s = self.state();
        if let Some(waiter) = s.sent.remove(&pkid) {
            let _ = waiter.send(answer);
        }
        if s.collided.as_ref().is_some_and(|(id, _)| *id == pkid) {
            let (id, waiter) = s.collided.take().expect("checked");
            s.sent.insert(id, waiter);
        }
    }

    /// The connection dropped; `unsent_pending` queued publishes are now in rumqttc's pending list.
    pub fn disconnected(&self, unsent_pending: usize) {
        let mut s = self.state();
        s.unsent_pending = unsent_pending.min(s.unsent.len());
    }

    /// Connected without our old session: rumqttc dropped everything it had pending.
    pub fn session_lost(&self) {
        let mut s = self.state();
        s.sent.clear();
        s.collided = None;
        let lost = s.unsent_pending;
        s.unsent.drain(..lost);
        s.unsent_pending = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::Acks;
    use tokio::sync::oneshot::error::TryRecvError;

    #[test]
    fn waiters_fire_on_their_own_puback() {
        let acks = Acks::default();
        let (mut a, mut b) = (acks.expect(), acks.expect());
        acks.sent(1);
        acks.sent(2);
        acks.sent(1); // a retransmission
        acks.acked(2, Ok(()));
        assert_eq!(b.try_recv(), Ok(Ok(())));
        assert_eq!(a.try_recv(), Err(TryRecvError::Empty));
        acks.acked(1, Ok(()));
        assert_eq!(a.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn a_lost_session_fails_what_rumqttc_dropped_and_keeps_what_it_still_has() {
        let acks = Acks::default();
        let (mut inflight, mut pending, mut queued) = (acks.expect(), acks.expect(), acks.expect());
        acks.sent(1);
        // Lost connection: the second publish had been moved to rumqttc's pending list; the
        // third was queued after.
        acks.disconnected(1);
        acks.session_lost();
        assert_eq!(inflight.try_recv(), Err(TryRecvError::Closed));
        assert_eq!(pending.try_recv(), Err(TryRecvError::Closed));
        acks.sent(1);
        acks.acked(1, Ok(()));
        assert_eq!(queued.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn a_collided_publish_waits_for_its_own_ack() {
        let acks = Acks::default();
        let (mut a, mut b) = (acks.expect(), acks.expect());
        acks.sent(3);
        acks.collided(3);
        acks.acked(3, Ok(()));
        assert_eq!(a.try_recv(), Ok(Ok(())));
        assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
        acks.sent(3); // v5 reports the collided publish going out
        acks.acked(3, Ok(()));
        assert_eq!(b.try_recv(), Ok(Ok(())));
    }
}
