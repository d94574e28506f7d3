//! Sinks: where results go upstream. Results reach a sink only through the durable
//! [`outbox`]; a [`delivery`] worker per sink drains it in order. A file sink that is caught
//! up is the exception: its file is durable storage already, so the outbox writes its results
//! there within their commit instead of keeping a second copy ([`outbox`], `direct`).
//!
//! A sink answers each result with an [`Outcome`]: delivered, retry later, busy (the upstream
//! sheds load), or dead (a permanent refusal that no retry can fix, kept in the dead letters).

pub mod dapr;
pub mod delivery;
pub mod event;
pub mod file;
pub mod mqtt;
pub mod outbox;

use std::sync::Arc;

use bytes::Bytes;

use self::outbox::{Item, Pending, Record};
use crate::config::SinkConfig;

/// The payload bytes one delivery attempt holds at most: 64 results of the default 16 MiB
/// `max_output` would be a gigabyte, held several times over as base64 JSON.
pub const BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Worth retrying: the sink or the network is down, or overloaded.
    Retry(String),
    /// The upstream is shedding load (MQTT 5 "quota exceeded", HTTP 429): retry after a
    /// backoff, never counted against the result, so a busy upstream makes no dead letters.
    Busy(String),
    /// Permanently refused.
    Dead(String),
}

pub enum Kind {
    Dapr(dapr::DaprSink),
    Mqtt(mqtt::MqttSink),
    /// Shared with the outbox, which writes a caught-up file's results within their commit.
    File(Arc<file::FileSink>),
}

/// A configured sink: its outbox key and its transport.
pub struct Sink {
    /// The outbox queue name, stable across restarts and config reordering.
    pub key: Arc<str>,
    pub kind: Kind,
}

/// The outbox queue name of a sink: stable across restarts and config reordering.
pub fn key(cfg: &SinkConfig) -> Arc<str> {
    match cfg {
        SinkConfig::Dapr(t) => format!("dapr:{}/{}", t.pubsub, t.topic).into(),
        SinkConfig::Mqtt { topic } => format!("mqtt:{topic}").into(),
        SinkConfig::File { path } => format!("file:{}", path.display()).into(),
    }
}

impl Sink {
    pub fn new(cfg: &SinkConfig, dapr: &Arc<dapr::DaprClient>, mqtt: Option<&mqtt::Publisher>) -> anyhow::Result<Sink> {
        let kind = match cfg {
            SinkConfig::Dapr(t) => Kind::Dapr(dapr::DaprSink::new(dapr.clone(), &t.pubsub, &t.topic)),
            SinkConfig::Mqtt { topic } => {
                let client = mqtt.ok_or_else(|| anyhow::anyhow!("an mqtt sink needs an [mqtt] section"))?;
                Kind::Mqtt(mqtt::MqttSink::new(client.clone(), topic))
            }
            SinkConfig::File { path } => Kind::File(Arc::new(file::FileSink::new(path.clone()))),
        };
        Ok(Sink { key: key(cfg), kind })
    }

    /// `record`'s result as this sink's outbox item.
    pub fn item(&self, record: Record, payload: Bytes) -> Item {
        let file = match &self.kind {
            Kind::File(f) => Some(f.clone()),
            Kind::Dapr(_) | Kind::Mqtt(_) => None,
        };
        Item { sink: self.key.clone(), record, payload, file }
    }

    /// Where a result of `pipeline` from `camera` goes (recorded with it in the outbox).
    pub fn destination(&self, pipeline: &str, camera: &str) -> String {
        match &self.kind {
            Kind::Dapr(d) => d.topic.clone(),
            Kind::Mqtt(m) => m.topic_for(pipeline, camera),
            Kind::File(f) => f.path.display().to_string(),
        }
    }

    /// How many results one delivery attempt takes, at most; [`BATCH_BYTES`] caps their
    /// payloads too (but one result always goes, whatever its size).
    pub fn batch(&self) -> usize {
        match &self.kind {
            Kind::Dapr(_) => 32,
            Kind::Mqtt(_) => 16,
            Kind::File(_) => 64,
        }
    }

    /// Makes what was delivered since the last call durable (the file sink's fsync; the
    /// others' upstream acknowledged each delivery already).
    pub async fn sync(&self) -> Result<(), String> {
        match &self.kind {
            Kind::File(f) => f.sync().await,
            Kind::Dapr(_) | Kind::Mqtt(_) => Ok(()),
        }
    }

    /// Delivers `batch`; one outcome per result, in order.
    pub async fn deliver(&self, batch: &[Pending]) -> Vec<Outcome> {
        match &self.kind {
            Kind::Dapr(d) => d.deliver(batch).await,
            Kind::Mqtt(m) => m.deliver(batch).await,
            Kind::File(f) => f.deliver(batch).await,
        }
    }
}
