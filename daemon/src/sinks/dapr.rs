//! Dapr sink: publishes results through the sidecar's HTTP pub/sub API.
//!
//! One result goes to `POST /v1.0/publish/{pubsub}/{topic}`; several queued results go in one
//! bulk call (`/v1.0-alpha1/publish/bulk/...`), and only the entries the sidecar reports failed
//! are retried. Every result carries its stable id as `metadata.cloudevent.id` and as the
//! envelope's `id`, so a retry is recognisable upstream.
//!
//! Status handling follows the sidecar's contract: 204 published; 400/403/404 are permanent
//! (dead letters); 401 means our API token is wrong: retried, with an error that says so,
//! because dead-lettering on a config mistake would throw results away; 5xx and connection
//! failures are retried.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::Outcome;
use super::event::envelope;
use super::outbox::Pending;
use crate::metrics::Metrics;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The sidecar's HTTP API.
pub struct DaprClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    metrics: Arc<Metrics>,
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl DaprClient {
    /// `url` from config; `DAPR_HTTP_PORT` (set by `dapr run`) replaces its port.
    pub fn new(url: &str, metrics: Arc<Metrics>) -> anyhow::Result<DaprClient> {
        let mut base = url::Url::parse(url).map_err(|e| anyhow::anyhow!("dapr.url `{url}`: {e}"))?;
        if let Some(port) = std::env::var("DAPR_HTTP_PORT").ok().and_then(|p| p.parse::<u16>().ok()) {
            base.set_port(Some(port)).map_err(|_| anyhow::anyhow!("dapr.url `{url}` cannot take a port"))?;
        }
        Ok(DaprClient {
            base: base.as_str().trim_end_matches('/').to_string(),
            token: std::env::var("DAPR_API_TOKEN").ok().filter(|t| !t.is_empty()),
            http: Client::builder(TokioExecutor::new()).build_http(),
            metrics,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn call(&self, method: Method, path: &str, content_type: &str, body: Bytes) -> anyhow::Result<Reply> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if !body.is_empty() {
            req = req.header("content-type", content_type);
        }
        if let Some(t) = &self.token {
            req = req.header("dapr-api-token", t);
        }
        let req = req.body(Full::new(body))?;
        let exchange = async {
            let resp = self.http.request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok(Reply { status, body })
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no answer from the sidecar in {REQUEST_TIMEOUT:?}"))?;
        self.metrics.dapr_reachable.set(i64::from(reply.is_ok()));
        reply
    }

    /// Waits up to `wait` for `/v1.0/healthz/outbound` (components ready); false if it never was.
    pub async fn wait_outbound(&self, wait: Duration) -> bool {
        let until = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(r) = self.call(Method::GET, "/v1.0/healthz/outbound", "", Bytes::new()).await {
                if r.status.is_success() {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Names of the sidecar's pub/sub components, from `/v1.0/metadata`.
    pub async fn pubsubs(&self) -> anyhow::Result<Vec<String>> {
        let r = self.call(Method::GET, "/v1.0/metadata", "", Bytes::new()).await?;
        anyhow::ensure!(r.status.is_success(), "metadata answered {}", r.status);
        let v: Value = serde_json::from_slice(&r.body)?;
        Ok(v["components"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["type"].as_str().is_some_and(|t| t.starts_with("pubsub.")))
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect())
    }
}

pub struct DaprSink {
    client: Arc<DaprClient>,
    pub pubsub: String,
    pub topic: String,
}

impl DaprSink {
    pub fn new(client: Arc<DaprClient>, pubsub: &str, topic: &str) -> DaprSink {
        DaprSink { client, pubsub: pubsub.to_string(), topic: topic.to_string() }
    }

    pub async fn deliver(&self, batch: &[Pending]) -> Vec<Outcome> {
        match batch {
            [] => Vec::new(),
            [one] => vec![self.publish(one).await],
            many => self.bulk(many).await,
        }
    }

    async fn publish(&self, p: &Pending) -> Outcome {
        let path = format!(
            "/v1.0/publish/{}/{}?metadata.cloudevent.id={}",
            encode(&self.pubsub),
            encode(&self.topic),
            encode(&p.record.id)
        );
        let body = Bytes::from(envelope(&p.record, &p.payload).to_string());
        match self.client.call(Method::POST, &path, "application/cloudevents+json", body).await {
            Ok(r) if r.status.is_success() => Outcome::Delivered,
            Ok(r) => self.refused(r.status, &r.body),
            Err(e) => Outcome::Retry(format!("sidecar at {} unreachable: {e:#}", self.client.base())),
        }
    }

    async fn bulk(&self, batch: &[Pending]) -> Vec<Outcome> {
        let entries: Vec<Value> = batch
            .iter()
            .map(|p| {
                json!({
                    "entryId": p.record.id,
                    "event": envelope(&p.record, &p.payload),
                    "contentType": "application/cloudevents+json",
                    "metadata": { "cloudevent.id": p.record.id },
                })
            })
            .collect();
        let path = format!("/v1.0-alpha1/publish/bulk/{}/{}", encode(&self.pubsub), encode(&self.topic));
        let body = Bytes::from(Value::Array(entries).to_string());
        let reply = match self.client.call(Method::POST, &path, "application/json", body).await {
            Ok(r) => r,
            Err(e) => {
                let why = format!("sidecar at {} unreachable: {e:#}", self.client.base());
                return vec![Outcome::Retry(why); batch.len()];
            }
        };
        if reply.status.is_success() {
            return vec![Outcome::Delivered; batch.len()];
        }
        // A 500 names the entries that failed; the rest were published.
        let failed: Option<Vec<(String, String)>> = serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["failedEntries"].as_array().cloned())
            .map(|arr| {
                arr.iter()
                    .map(|e| {
                        let id = e["entryId"].as_str().unwrap_or_default().to_string();
                        (id, e["error"].as_str().unwrap_or("failed").to_string())
                    })
                    .collect()
            });
        match failed {
            Some(failed) if reply.status == StatusCode::INTERNAL_SERVER_ERROR => batch
                .iter()
                .map(|p| match failed.iter().find(|(id, _)| *id == p.record.id) {
                    Some((_, why)) => Outcome::Retry(format!("bulk entry failed: {why}")),
                    None => Outcome::Delivered,
                })
                .collect(),
            _ => vec![self.refused(reply.status, &reply.body); batch.len()],
        }
    }

    fn refused(&self, status: StatusCode, body: &[u8]) -> Outcome {
        let detail = serde_json::from_slice::<Value>(body)
            .ok()
            .map(|v| format!("{} {}", v["errorCode"].as_str().unwrap_or(""), v["message"].as_str().unwrap_or("")))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
        let why = format!("sidecar answered {status} for {}/{}: {}", self.pubsub, self.topic, detail.trim());
        match status {
            StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Outcome::Dead(why),
            StatusCode::UNAUTHORIZED => Outcome::Retry(format!(
                "{why}; the sidecar requires an API token: set DAPR_API_TOKEN to the sidecar's token"
            )),
            _ => Outcome::Retry(why),
        }
    }
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
