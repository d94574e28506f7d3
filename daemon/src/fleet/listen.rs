//! The board on the fleet channel: deploy messages from an MQTT topic (its own connection to
//! the `[mqtt]` broker) or from a Dapr subscription ([`crate::ingress::dapr`]), judged by the
//! [`Inbox`] and acted on one at a time, in the order they came.
//!
//! A message is settled (acknowledged, or `SUCCESS`/`DROP` to the sidecar) once judged; what
//! comes of it (a pull, a trial, a refusal) is reported as `deployment` events, not by
//! redelivery. Its sequence is recorded only when the board acts on it: one judged but not
//! acted on before a reload is taken again from the retained copy the broker sends when the
//! next generation subscribes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::Context;
use super::channel::{Action, Inbox, Judged, Refusal};
use super::rollout::{self, Origin};
use super::trust::Trust;

/// Orders taken but not yet acted on, at most (the operator sends a few per rollout).
const BACKLOG: usize = 64;

pub struct Listener {
    inbox: Arc<Inbox>,
    orders: mpsc::Sender<Judged>,
}

impl Listener {
    /// The listener and its worker, which ends when the generation closes.
    pub fn start(ctx: Arc<Context>) -> anyhow::Result<Arc<Listener>> {
        let inbox = Arc::new(Inbox::new(Trust::load(&ctx.cfg.trust)?, &ctx.cfg.runtime.state_dir));
        let (orders, rx) = mpsc::channel(BACKLOG);
        tokio::spawn(act(ctx, inbox.clone(), rx));
        Ok(Arc::new(Listener { inbox, orders }))
    }

    /// Judges one received envelope; true if it should be settled for good (always, but for
    /// a full backlog, which a redelivery can retry).
    pub fn receive(&self, envelope: &[u8], from: &str) -> bool {
        match self.inbox.judge(envelope) {
            Err(Refusal::Again) => {
                tracing::debug!(channel = from, "deploy message already taken");
                true
            }
            Err(Refusal::Refused(why)) => {
                tracing::warn!(channel = from, "deploy message refused: {why}");
                true
            }
            Ok(judged) => {
                let order = &judged.order;
                tracing::info!(channel = from, rollout = %order.rollout, seq = order.seq, function = %order.function, action = ?order.action, "deploy message taken");
                self.orders.try_send(judged).map_or_else(
                    |e| {
                        tracing::warn!(channel = from, "deploy message not acted on: {e}");
                        false
                    },
                    |_| true,
                )
            }
        }
    }

    /// Receives from the MQTT topic filter `filter` until `closing`.
    pub async fn run_mqtt(
        self: Arc<Self>,
        cfg: crate::config::Mqtt,
        filter: String,
        mut closing: watch::Receiver<bool>,
    ) {
        let (client, mut conn) = match crate::mqtt::connect(&cfg, "-fleet", 1 << 20) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(channel = %filter, "the fleet channel cannot connect: {e:#}");
                return;
            }
        };
        let mut attempt = 0;
        loop {
            let event = tokio::select! {
                e = conn.poll() => e,
                _ = closing.wait_for(|c| *c) => break,
            };
            match event {
                Ok(crate::mqtt::Event::Connected { .. }) => {
                    attempt = 0;
                    if let Err(e) = client.subscribe(&filter).await {
                        tracing::warn!(channel = %filter, "cannot subscribe to the fleet channel: {e:#}");
                    }
                }
                Ok(crate::mqtt::Event::Message(m)) => {
                    if self.receive(m.payload(), &m.topic()) {
                        client.ack(&m);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(channel = %filter, "fleet channel connection: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(crate::mqtt::backoff(attempt)) => {}
                        _ = closing.wait_for(|c| *c) => break,
                    }
                    attempt += 1;
                }
            }
        }
        client.disconnect().await;
        // The DISCONNECT goes out on the next poll.
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.poll()).await;
    }
}

/// Acts on taken orders in turn, recording each one's sequence first.
async fn act(ctx: Arc<Context>, inbox: Arc<Inbox>, mut orders: mpsc::Receiver<Judged>) {
    let mut closing = ctx.closing.clone();
    loop {
        let judged = tokio::select! {
            o = orders.recv() => match o { Some(o) => o, None => return },
            _ = closing.wait_for(|c| *c) => return,
        };
        match inbox.record(&judged) {
            Ok(()) => {}
            Err(Refusal::Again) => continue,
            Err(Refusal::Refused(why)) => {
                tracing::warn!("deploy message refused: {why}");
                continue;
            }
        }
        let order = judged.order;
        let (name, id) = (order.function.as_str(), order.rollout.as_str());
        if !order.selects(&ctx.board, &ctx.cfg.board.labels) {
            tracing::info!(function = %name, rollout = %id, percent = order.percent, "not in this wave of the rollout");
            continue;
        }
        if !ctx.runtime.is_versioned(name) {
            tracing::info!(function = %name, rollout = %id, "the rollout is for a function this board does not take from an image");
            continue;
        }
        match order.action {
            Action::Deploy => match rollout::deploy(&ctx, name, &order.image, Origin::Rollout(id)).await {
                Ok(s) => {
                    tracing::info!(function = %name, rollout = %id, digest = %s.digest, state = s.state, "rollout taken")
                }
                Err(e) => tracing::warn!(function = %name, rollout = %id, "rollout not taken: {e:#}"),
            },
            Action::Rollback => match rollout::roll_back(&ctx, name, id).await {
                Ok(Some(v)) => tracing::info!(function = %name, rollout = %id, back_to = %v.digest, "rollout undone"),
                Ok(None) => tracing::info!(function = %name, rollout = %id, "nothing of the rollout to undo here"),
                Err(e) => tracing::error!(function = %name, rollout = %id, "cannot undo the rollout: {e:#}"),
            },
        }
    }
}
