//! MQTT camera ingress: frames published by cameras become pipeline frames.
//!
//! Each pipeline's `source.mqtt` filter is subscribed at QoS 1 on every (re)connect; the camera
//! id is the topic level under the filter's first `+`. A message is acknowledged only when
//! every pipeline it feeds has made its result durable or deliberately dropped it, so a crash
//! before that means the broker redelivers it to our persistent session.
//!
//! Bad frames (empty, over `mqtt.max_frame`) are refused with a warning naming the topic, and
//! acknowledged: the same bytes would be refused again.

use std::sync::Arc;

use tokio::sync::watch;

use super::handoff;
use crate::metrics::{Metrics, PipelineError as ErrorLabel};
use crate::mqtt::{self, Client, Connection, Event, Message};
use crate::pipeline::frame::{Ack, Frame};
use crate::pipeline::{Pipeline, Pipelines};

/// A subscription feeding a pipeline.
pub struct Route {
    pub filter: String,
    pub pipeline: Arc<Pipeline>,
}

pub struct Ingress {
    pub client: Client,
    pub routes: Vec<Route>,
    pub pipelines: Arc<Pipelines>,
    pub metrics: Arc<Metrics>,
    pub max_frame: usize,
    /// Where the filters subscribed last are kept, so those a reload or a restart removed
    /// are unsubscribed: the broker keeps a persistent session's subscriptions, and would
    /// go on sending (and queueing) for them.
    pub subscriptions: std::path::PathBuf,
}

/// Bytes of QoS 0 frames between the connection's poller and dispatch ([`handoff`]), at
/// least this much, or two of the largest frames.
const HANDOFF_BYTES: usize = 16 << 20;

impl Ingress {
    /// Polls the connection until `stop_connection`; stops taking frames at `stop_intake`
    /// (later frames stay unacknowledged for redelivery), while results can still be published.
    ///
    /// The connection is polled in a task of its own, and nothing in that task waits on a
    /// pipeline or the client's request queue: a `block` pipeline that stops taking frames must
    /// not stop PINGREQs, acknowledgements, or the PUBACKs the MQTT sink waits for.
    pub async fn run(
        self,
        conn: Connection,
        mut stop_intake: watch::Receiver<bool>,
        stop_connection: watch::Receiver<bool>,
    ) {
        let (frames, mut incoming) = handoff::handoff(HANDOFF_BYTES.max(2 * self.max_frame));
        let mut filters: Vec<String> = self.routes.iter().map(|r| r.filter.clone()).collect();
        filters.dedup();
        let subscribe = Subscribe { filters, kept: self.subscriptions.clone() };
        let poller =
            tokio::spawn(poll(conn, self.client.clone(), subscribe, self.metrics.clone(), frames, stop_connection));
        loop {
            tokio::select! {
                biased;
                _ = stop_intake.changed() => break,
                m = incoming.take() => match m {
                    // The frame's bytes count until its pipelines have it.
                    Some((m, _held)) => self.dispatch(m).await,
                    None => break,
                },
            }
        }
        // Frames not taken stay unacknowledged: the broker sends them again.
        drop(incoming);
        let _ = poller.await;
    }

    async fn dispatch(&self, m: Message) {
        let topic = m.topic();
        let targets: Vec<(&Arc<Pipeline>, String)> = self
            .routes
            .iter()
            .filter_map(|r| camera_of(&r.filter, &topic).map(|c| (&r.pipeline, c.to_string())))
            .collect();
        let size = m.payload().len();
        if m.redelivered() {
            self.metrics.mqtt_redelivered.inc();
        }
        let refused = if let Some((_, bad)) = targets.iter().find(|(_, c)| !crate::pipeline::valid_camera(c)) {
            Some(("camera", format!("frame refused: camera id {bad:?} is not 1 to 128 of [A-Za-z0-9._-]")))
        } else if size == 0 {
            Some(("empty", "frame refused: empty payload".to_string()))
        } else if size > self.max_frame {
            Some((
                "oversized",
                format!("frame refused: {size} bytes is over mqtt.max_frame ({} bytes)", self.max_frame),
            ))
        } else {
            None
        };
        if let Some((kind, why)) = refused {
            tracing::warn!(topic = %topic, "{why}");
            for (p, _) in &targets {
                self.metrics.pipeline_errors.get_or_create(&ErrorLabel { pipeline: p.name.clone(), kind }).inc();
            }
            self.client.ack(&m);
            return;
        }
        if targets.is_empty() {
            // A filter a reload removed, still in the broker's copy of our session until the
            // unsubscribe lands, or a broker delivering what we never asked for. Settled, and
            // said: frames must never vanish without a word.
            self.metrics.mqtt_unrouted.inc();
            let n = self.metrics.mqtt_unrouted.get();
            if n.is_power_of_two() {
                tracing::warn!(topic = %topic, unrouted = n, "frame acknowledged unprocessed: no pipeline's source.mqtt matches its topic");
            }
            self.client.ack(&m);
            return;
        }
        let payload = m.payload().clone();
        let client = self.client.clone();
        let acks = Ack::split(targets.len(), move || client.ack(&m));
        for ((p, camera), ack) in targets.into_iter().zip(acks) {
            let frame = Frame { camera, topic: topic.clone(), payload: payload.clone(), ack: Some(ack) };
            self.pipelines.submit(p, frame).await;
        }
    }
}

/// The connection's poller: (re)connects, subscribes, hands frames to dispatch, and keeps
/// acknowledgements and PUBACKs flowing, until `stop_connection`.
async fn poll(
    mut conn: Connection,
    client: Client,
    subscribe: Subscribe,
    metrics: Arc<Metrics>,
    frames: handoff::Handoff,
    mut stop_connection: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        let event = tokio::select! {
            biased;
            _ = stop_connection.changed() => break,
            e = conn.poll() => e,
        };
        match event {
            Ok(Event::Connected { session_present }) => {
                attempt = 0;
                metrics.mqtt_connected.set(1);
                tracing::info!(session_present, "connected to the MQTT broker");
                // Subscribing queues requests on the client, which only this task drains:
                // never await that here.
                tokio::spawn(subscribe.clone().run(client.clone()));
            }
            // Once dispatch has stopped, frames are left unacknowledged for redelivery.
            Ok(Event::Message(m)) => {
                if let Err(m) = frames.offer(m) {
                    metrics.mqtt_shed.inc();
                    let shed = metrics.mqtt_shed.get();
                    if shed.is_power_of_two() {
                        tracing::warn!(topic = %m.topic(), shed, held = frames.held(),
                            "QoS 0 frame dropped: the pipelines are behind and the handoff is full");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if metrics.mqtt_connected.get() == 1 {
                    metrics.mqtt_reconnects.inc();
                }
                metrics.mqtt_connected.set(0);
                let wait = mqtt::backoff(attempt);
                attempt += 1;
                tracing::warn!(retry_in = ?wait, "MQTT broker connection: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop_connection.changed() => break,
                }
            }
        }
    }
    client.disconnect().await;
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), conn.poll()).await;
    metrics.mqtt_connected.set(0);
}

/// The filters to subscribe on each connect, and the file that remembers them.
#[derive(Clone)]
struct Subscribe {
    filters: Vec<String>,
    kept: std::path::PathBuf,
}

impl Subscribe {
    /// Unsubscribes what was subscribed before and is no longer configured, subscribes what
    /// is, and remembers it.
    async fn run(self, client: Client) {
        let before: Vec<String> =
            std::fs::read(&self.kept).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        for f in before.iter().filter(|f| !self.filters.contains(f)) {
            match client.unsubscribe(f).await {
                Ok(()) => tracing::info!(filter = %f, "unsubscribed: no pipeline takes this filter any more"),
                Err(e) => tracing::warn!(filter = %f, "cannot unsubscribe: {e:#}"),
            }
        }
        for f in &self.filters {
            if let Err(e) = client.subscribe(f).await {
                tracing::error!(filter = %f, "cannot subscribe: {e:#}");
            }
        }
        if before != self.filters {
            let text = serde_json::to_vec(&self.filters).expect("filters serialise");
            let tmp = self.kept.with_extension("tmp");
            if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.kept)) {
                tracing::warn!(file = %self.kept.display(), "cannot remember the subscribed filters: {e}");
            }
        }
    }
}

/// If `topic` matches `filter`, the topic level under the filter's first `+`. A shared
/// subscription's `$share/GROUP/` is not part of the topics it matches.
pub fn camera_of<'t>(filter: &str, topic: &'t str) -> Option<&'t str> {
    let filter = mqtt::split_share(filter).1;
    let mut camera = None;
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return camera.or(Some(""));
        }
        let level = levels.next()?;
        match f {
            "+" => {
                camera.get_or_insert(level);
            }
            _ if f == level => {}
            _ => return None,
        }
    }
    if levels.next().is_some() { None } else { camera }
}

#[cfg(test)]
mod tests {
    use super::camera_of;

    #[test]
    fn camera_is_the_first_wildcard_level() {
        assert_eq!(camera_of("cameras/+/frames", "cameras/door/frames"), Some("door"));
        assert_eq!(camera_of("cameras/+/frames", "cameras/door/frames/x"), None);
        assert_eq!(camera_of("cameras/+/frames", "cameras/door"), None);
        assert_eq!(camera_of("cameras/+/frames", "other/door/frames"), None);
        assert_eq!(camera_of("site/+/+/jpeg", "site/north/gate/jpeg"), Some("north"));
        assert_eq!(camera_of("cams/+/#", "cams/yard/a/b"), Some("yard"));
    }

    #[test]
    fn a_shared_subscription_matches_the_topics_after_its_group() {
        assert_eq!(camera_of("$share/edge/cameras/+/frames", "cameras/door/frames"), Some("door"));
        assert_eq!(camera_of("$share/edge/cameras/+/frames", "edge/cameras/door/frames"), None);
        assert_eq!(camera_of("$share/g/+/jpeg", "yard/jpeg"), Some("yard"));
    }
}
