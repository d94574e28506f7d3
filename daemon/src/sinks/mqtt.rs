//! MQTT sink: results published (QoS 1) to a topic built from a template with `{camera}` and
//! `{pipeline}`, over the daemon's broker connection.
//!
//! Delivered means the broker acknowledged it (PUBACK), not that rumqttc queued it: queued
//! publishes live only in memory, and a daemon restart or a broker that lost our session
//! drops them. So a result stays in the outbox until its PUBACK, and while the broker is
//! offline nothing is queued at all. An MQTT 5 broker may refuse in its PUBACK; the reason
//! decides between a dead letter and a retry ([`crate::mqtt::refusal`]).

use std::time::Duration;

use crate::mqtt::Client;
use crate::mqtt::refusal::Verdict;

use super::Outcome;
use super::outbox::Pending;

pub type Publisher = Client;

/// How long a batch waits for its PUBACKs before it is retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

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
        let mut waits = Vec::with_capacity(batch.len());
        for p in batch {
            waits.push(self.client.publish_acked(&p.record.topic, p.payload.clone()).await);
        }
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        let mut out = Vec::with_capacity(batch.len());
        for (p, wait) in batch.iter().zip(waits) {
            let topic = &p.record.topic;
            out.push(match wait {
                Err(e) => Outcome::Retry(format!("mqtt publish to {topic}: {e:#}")),
                Ok(ack) => match tokio::time::timeout_at(deadline, ack).await {
                    Ok(Ok(Ok(()))) => Outcome::Delivered,
                    Ok(Ok(Err(refused))) => {
                        let why = format!("mqtt publish to {topic}: the broker refused it: {}", refused.reason);
                        match refused.verdict {
                            Verdict::Permanent => Outcome::Dead(why),
                            Verdict::Busy => Outcome::Busy(why),
                            Verdict::Retry | Verdict::Accepted => Outcome::Retry(why),
                        }
                    }
                    Ok(Err(_)) => Outcome::Retry(format!("mqtt publish to {topic}: lost with the broker session")),
                    Err(_) => Outcome::Retry(format!("mqtt publish to {topic}: no PUBACK within {ACK_TIMEOUT:?}")),
                },
            });
        }
        out
    }
}
