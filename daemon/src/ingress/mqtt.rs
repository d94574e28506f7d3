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
}

/// Frames between the connection's poller and dispatch. Larger than a broker's in-flight
/// window for QoS 1 (mosquitto: 20), so the poller never waits on a busy pipeline.
const HANDOFF: usize = 1024;

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
        let (frames, mut incoming) = tokio::sync::mpsc::channel::<Message>(HANDOFF);
        let mut filters: Vec<String> = self.routes.iter().map(|r| r.filter.clone()).collect();
        filters.dedup();
        let poller =
            tokio::spawn(poll(conn, self.client.clone(), filters, self.metrics.clone(), frames, stop_connection));
        loop {
            tokio::select! {
                biased;
                _ = stop_intake.changed() => break,
                m = incoming.recv() => match m {
                    Some(m) => self.dispatch(m).await,
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
    filters: Vec<String>,
    metrics: Arc<Metrics>,
    frames: tokio::sync::mpsc::Sender<Message>,
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
                let (client, filters) = (client.clone(), filters.clone());
                tokio::spawn(async move {
                    for f in &filters {
                        if let Err(e) = client.subscribe(f).await {
                            tracing::error!(filter = %f, "cannot subscribe: {e:#}");
                        }
                    }
                });
            }
            // Once dispatch has stopped, frames are left unacknowledged for redelivery.
            Ok(Event::Message(m)) => {
                let _ = frames.send(m).await;
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

/// If `topic` matches `filter`, the topic level under the filter's first `+`.
pub fn camera_of<'t>(filter: &str, topic: &'t str) -> Option<&'t str> {
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
}
