//! Dapr sink: publishes results through the sidecar's HTTP pub/sub API.
//!
//! One result goes to `POST /v1.0/publish/{pubsub}/{topic}`; several queued results go in bulk
//! calls (`/v1.0/publish/bulk/...`, or `/v1.0-alpha1/...` on a sidecar older than Dapr 1.17),
//! each cut to fit under the sidecar's body limit, and only the entries the sidecar reports
//! failed are retried. Every result carries its stable id as `metadata.cloudevent.id` and as
//! the envelope's `id`, so a retry is recognisable upstream.
//!
//! Status handling follows daprd: 204 published. A request over the body limit is split, and
//! a single result over it is a dead letter. Other 400s and 403 are permanent (dead letters),
//! except `ERR_PUBSUB_NOT_CONFIGURED`, which, like 404 `ERR_PUBSUB_NOT_FOUND`, means the
//! sidecar's components are still loading or misnamed: retried, loudly. 401 means our API
//! token is wrong: retried, with an error that says so, because dead-lettering on a config
//! mistake would throw results away. 5xx, any other 404 and connection failures are retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::metrics::{DaprRequestLabel, Metrics};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The sidecar's HTTP API.
pub struct DaprClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    metrics: Arc<Metrics>,
    /// The sidecar's request body limit (`dapr.max_request`).
    max_request: usize,
    /// Set once the sidecar turned out to predate the stable bulk route.
    alpha_bulk: AtomicBool,
}

const STABLE_BULK: &str = "/v1.0/publish/bulk";
const ALPHA_BULK: &str = "/v1.0-alpha1/publish/bulk";

pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl DaprClient {
    /// `url` from config; `DAPR_HTTP_PORT` (set by `dapr run`) replaces its port.
    pub fn new(cfg: &crate::config::Dapr, metrics: Arc<Metrics>) -> anyhow::Result<DaprClient> {
        let url = cfg.url.as_str();
        let mut base = url::Url::parse(url).map_err(|e| anyhow::anyhow!("dapr.url `{url}`: {e}"))?;
        if let Some(port) = std::env::var("DAPR_HTTP_PORT").ok().and_then(|p| p.parse::<u16>().ok()) {
            base.set_port(Some(port)).map_err(|_| anyhow::anyhow!("dapr.url `{url}` cannot take a port"))?;
        }
        Ok(DaprClient {
            base: base.as_str().trim_end_matches('/').to_string(),
            token: std::env::var("DAPR_API_TOKEN").ok().filter(|t| !t.is_empty()),
            http: Client::builder(TokioExecutor::new()).build_http(),
            metrics,
            max_request: cfg.max_request.as_u64() as usize,
            alpha_bulk: AtomicBool::new(false),
        })
    }

    fn bulk_route(&self) -> &'static str {
        if self.alpha_bulk.load(Ordering::Relaxed) { ALPHA_BULK } else { STABLE_BULK }
    }

    fn use_alpha_bulk(&self) {
        self.alpha_bulk.store(true, Ordering::Relaxed);
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
        let outcome = match (status, error_code(body).as_deref()) {
            // The sidecar is up but its pub/sub is not (yet): components still loading, or a
            // misnamed component. A config problem, not the results': keep them.
            (StatusCode::BAD_REQUEST, Some("ERR_PUBSUB_NOT_CONFIGURED"))
            | (StatusCode::NOT_FOUND, Some("ERR_PUBSUB_NOT_FOUND")) => Outcome::Retry(format!(
                "{why}; the sidecar has no pub/sub `{}` (still loading its components, or misnamed): results are kept and retried",
                self.pubsub
            )),
            (StatusCode::UNAUTHORIZED, _) => Outcome::Retry(format!(
                "{why}; the sidecar requires an API token: set DAPR_API_TOKEN to the sidecar's token"
            )),
            (StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN, _) => Outcome::Dead(why),
            // Any other 404 is a route the sidecar lacks, never the results' fault.
            _ => Outcome::Retry(why),
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
        let bulk = json!({
            "entryId": p.record.id,
            "event": event,
            "contentType": "application/cloudevents+json",
            "metadata": { "cloudevent.id": p.record.id },
        })
        .to_string();
        Entry { id: p.record.id.clone(), event: event.to_string(), bulk }
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
