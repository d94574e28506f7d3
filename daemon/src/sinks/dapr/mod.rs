//! Dapr sink: publishes results through the sidecar's HTTP pub/sub API.
//!
//! One result goes to `POST /v1.0/publish/{pubsub}/{topic}`; several queued results go in bulk
//! calls (`/v1.0/publish/bulk/...`, or `/v1.0-alpha1/...` on a sidecar older than Dapr 1.17),
//! each cut to fit under the sidecar's body limit, and only the entries the sidecar reports
//! failed are retried. Every result carries its stable id as `metadata.cloudevent.id` and as
//! the envelope's `id`, so a retry is recognisable upstream.
//!
//! The HTTP client is [`client`]; what each refusal means is the table in [`status`]. A
//! request over the body limit is split, and a single result over it is a dead letter.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::Value;

mod client;
mod status;

use self::client::{ALPHA_BULK, STABLE_BULK};
pub use self::client::{DaprClient, Reply};
use self::status::Meaning;
use super::Outcome;
use super::event::envelope;
use super::outbox::Pending;
use crate::metrics::DaprRequestLabel;

pub struct DaprSink {
    client: Arc<DaprClient>,
    pub pubsub: String,
    pub topic: String,
}

/// How the sidecar answered one request.
enum Answer {
    Outcomes(Vec<Outcome>),
    /// The request was over the sidecar's body limit.
    TooLarge(String),
}

impl DaprSink {
    pub fn new(client: Arc<DaprClient>, pubsub: &str, topic: &str) -> DaprSink {
        DaprSink { client, pubsub: pubsub.to_string(), topic: topic.to_string() }
    }

    /// Sends `batch` in as few requests as fit under the sidecar's body limit: consecutive
    /// results are packed into bulk requests of at most half of `dapr.max_request`.
    pub async fn deliver(&self, batch: &[Pending]) -> Vec<Outcome> {
        let entries: Vec<Entry> = batch.iter().map(Entry::new).collect();
        let budget = self.client.max_request / 2;
        let mut out = Vec::with_capacity(batch.len());
        let mut rest = &entries[..];
        while !rest.is_empty() {
            let mut size = 2;
            let n = rest.iter().take_while(|e| {
                size += e.bulk.len() + 1;
                size <= budget
            });
            let n = n.count().max(1);
            out.extend(self.send(&rest[..n]).await);
            rest = &rest[n..];
        }
        out
    }

    /// One request for `chunk`; a refusal for size splits it in halves, down to single results.
    fn send<'a>(&'a self, chunk: &'a [Entry]) -> futures_util::future::BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let answer = match chunk {
                [one] if one.event.len() > self.client.max_request => {
                    let why = format!(
                        "result {} needs a {} byte request, over the sidecar's body limit (dapr.max_request, {} bytes; daprd's --max-body-size): it can never be published",
                        one.id,
                        one.event.len(),
                        self.client.max_request
                    );
                    return vec![Outcome::Dead(why)];
                }
                [one] => self.publish(one).await,
                many => self.bulk(many).await,
            };
            match answer {
                Answer::Outcomes(o) => o,
                Answer::TooLarge(why) if chunk.len() == 1 => {
                    vec![Outcome::Dead(format!(
                        "{why}; a single result over the sidecar's body limit can never be published"
                    ))]
                }
                Answer::TooLarge(why) => {
                    tracing::warn!(pubsub = %self.pubsub, topic = %self.topic, results = chunk.len(), "{why}: splitting the batch");
                    let (a, b) = chunk.split_at(chunk.len() / 2);
                    let mut out = self.send(a).await;
                    out.extend(self.send(b).await);
                    out
                }
            }
        })
    }

    async fn publish(&self, e: &Entry) -> Answer {
        let path = format!(
            "/v1.0/publish/{}/{}?metadata.cloudevent.id={}",
            encode(&self.pubsub),
            encode(&self.topic),
            encode(&e.id)
        );
        let body = Bytes::from(e.event.clone());
        self.client.metrics.dapr_requests.get_or_create(&DaprRequestLabel { kind: "publish" }).inc();
        match self.client.call(Method::POST, &path, "application/cloudevents+json", body).await {
            Ok(r) if r.status.is_success() => Answer::Outcomes(vec![Outcome::Delivered]),
            Ok(r) => self.refused(r.status, &r.body, 1),
            Err(e) => {
                Answer::Outcomes(vec![Outcome::Retry(format!("sidecar at {} unreachable: {e:#}", self.client.base()))])
            }
        }
    }

    async fn bulk(&self, chunk: &[Entry]) -> Answer {
        let mut body = String::with_capacity(chunk.iter().map(|e| e.bulk.len() + 1).sum::<usize>() + 2);
        body.push('[');
        for (i, e) in chunk.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&e.bulk);
        }
        body.push(']');
        let body = Bytes::from(body);
        let reply = loop {
            let route = self.client.bulk_route();
            let path = format!("{route}/{}/{}", encode(&self.pubsub), encode(&self.topic));
            self.client.metrics.dapr_requests.get_or_create(&DaprRequestLabel { kind: "bulk" }).inc();
            match self.client.call(Method::POST, &path, "application/json", body.clone()).await {
                Ok(r) if route == STABLE_BULK && self.lacks_stable_bulk(r.status, &r.body) => {
                    tracing::info!(sidecar = self.client.base(), "no stable bulk publish route: using {ALPHA_BULK}");
                    self.client.use_alpha_bulk();
                }
                Ok(r) => break r,
                Err(e) => {
                    let why = format!("sidecar at {} unreachable: {e:#}", self.client.base());
                    return Answer::Outcomes(vec![Outcome::Retry(why); chunk.len()]);
                }
            }
        };
        if reply.status.is_success() {
            return Answer::Outcomes(vec![Outcome::Delivered; chunk.len()]);
        }
        // A 500 names the entries that failed; the rest were published.
        match failed_entries(&reply.body) {
            Some(failed) if reply.status == StatusCode::INTERNAL_SERVER_ERROR => Answer::Outcomes(
                chunk
                    .iter()
                    .map(|e| match failed.iter().find(|(id, _)| *id == e.id) {
                        Some((_, why)) => Outcome::Retry(format!("bulk entry failed: {why}")),
                        None => Outcome::Delivered,
                    })
                    .collect(),
            ),
            _ => self.refused(reply.status, &reply.body, chunk.len()),
        }
    }

    /// A sidecar before Dapr 1.17 has only the alpha1 bulk route. It reads
    /// `/v1.0/publish/bulk/P/T` as a publish to a pub/sub named `bulk` and answers 404
    /// `ERR_PUBSUB_NOT_FOUND` ("pubsub bulk is not found"); any other 404 without a pub/sub
    /// error code is a missing route too.
    fn lacks_stable_bulk(&self, status: StatusCode, body: &[u8]) -> bool {
        if status != StatusCode::NOT_FOUND || self.pubsub == "bulk" {
            return false;
        }
        let text = String::from_utf8_lossy(body);
        text.contains("pubsub bulk is not found") || error_code(body).is_none_or(|c| !c.starts_with("ERR_PUBSUB"))
    }

    /// What a refusal means for the `n` results of the request.
    fn refused(&self, status: StatusCode, body: &[u8], n: usize) -> Answer {
        let detail = serde_json::from_slice::<Value>(body)
            .ok()
            .map(|v| format!("{} {}", v["errorCode"].as_str().unwrap_or(""), v["message"].as_str().unwrap_or("")))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
        let why = format!("sidecar answered {status} for {}/{}: {}", self.pubsub, self.topic, detail.trim());
        // daprd reads bodies through a reader capped at --max-body-size and reports the cap as
        // a read error ("stream too large"): 500 on publish, 400 on bulk. Others answer 413.
        if status == StatusCode::PAYLOAD_TOO_LARGE || detail.contains("stream too large") {
            return Answer::TooLarge(why);
        }
        let outcome = match status::meaning(status, error_code(body).as_deref()) {
            Meaning::NoPubsub => Outcome::Retry(format!(
                "{why}; the sidecar has no pub/sub `{}` (still loading its components, or misnamed): results are kept and retried",
                self.pubsub
            )),
            Meaning::NeedsToken => Outcome::Retry(format!(
                "{why}; the sidecar requires an API token: set DAPR_API_TOKEN to the sidecar's token"
            )),
            Meaning::Busy => Outcome::Busy(why),
            Meaning::Refused => Outcome::Dead(why),
            Meaning::Passing => Outcome::Retry(why),
        };
        Answer::Outcomes(vec![outcome; n])
    }
}

/// A result encoded once: as a publish body and as a bulk entry.
struct Entry {
    id: String,
    event: String,
    bulk: String,
}

impl Entry {
    fn new(p: &Pending) -> Entry {
        let event = envelope(&p.record, &p.payload);
        // The event goes in as it is, never parsed back into a tree.
        let id = serde_json::to_string(&p.record.id).expect("a string serialises");
        let bulk = format!(
            "{{\"entryId\":{id},\"event\":{event},\"contentType\":\"application/cloudevents+json\",\"metadata\":{{\"cloudevent.id\":{id}}}}}"
        );
        Entry { id: p.record.id.clone(), event, bulk }
    }
}

/// The `(entryId, error)` pairs of a bulk publish reply's `failedEntries`, if it has them.
pub fn failed_entries(body: &[u8]) -> Option<Vec<(String, String)>> {
    let v = serde_json::from_slice::<Value>(body).ok()?;
    let entries = v["failedEntries"].as_array()?;
    Some(
        entries
            .iter()
            .map(|e| {
                let id = e["entryId"].as_str().unwrap_or_default().to_string();
                (id, e["error"].as_str().unwrap_or("failed").to_string())
            })
            .collect(),
    )
}

/// The `errorCode` of a sidecar's error body.
pub fn error_code(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(body).ok()?["errorCode"].as_str().map(str::to_string)
}

/// Percent-encodes a path segment or query value; `/` is kept, Dapr topics may contain it.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
