//! MQTT sink: results published (QoS 1) to a topic built from a template with `{camera}` and
//! `{pipeline}`, over the daemon's broker connection.
//!
//! Delivered means handed to the connection, which retransmits until the broker acknowledges
//! and, with a persistent session, across reconnects.

use crate::mqtt::Client;

use super::Outcome;
use super::outbox::Pending;

pub type Publisher = Client;

pub struct MqttSink {
    client: Client,
    template: String,
}

impl MqttSink {
    pub fn new(client: Client, template: &str) -> MqttSink {
        MqttSink { client, template: template.to_string() }
    }

    pub fn topic_for(&self, pipeline: &str, camera: &str) -> String {
        self.template.replace("{camera}", camera).replace("{pipeline}", pipeline)
    }

    pub async fn deliver(&self, batch: &[Pending]) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(batch.len());
        for p in batch {
            out.push(match self.client.publish(&p.record.topic, p.payload.clone()).await {
                Ok(()) => Outcome::Delivered,
                Err(e) => Outcome::Retry(format!("mqtt publish to {}: {e:#}", p.record.topic)),
            });
        }
        out
    }
}
