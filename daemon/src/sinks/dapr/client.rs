//! The sidecar's HTTP API: requests with the API token and a timeout, its health and its
//! components, and which bulk route it has.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::metrics::Metrics;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The sidecar's HTTP API.
pub struct DaprClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    pub(super) metrics: Arc<Metrics>,
    /// The sidecar's request body limit (`dapr.max_request`).
    pub(super) max_request: usize,
    /// Set once the sidecar turned out to predate the stable bulk route.
    alpha_bulk: AtomicBool,
}

pub(super) const STABLE_BULK: &str = "/v1.0/publish/bulk";
pub(super) const ALPHA_BULK: &str = "/v1.0-alpha1/publish/bulk";

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

    pub(super) fn bulk_route(&self) -> &'static str {
        if self.alpha_bulk.load(Ordering::Relaxed) { ALPHA_BULK } else { STABLE_BULK }
    }

    pub(super) fn use_alpha_bulk(&self) {
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
            // A probe of a sidecar that hangs is cut at the wait's end, not the request timeout.
            let probe = self.call(Method::GET, "/v1.0/healthz/outbound", "", Bytes::new());
            if let Ok(Ok(r)) = tokio::time::timeout_at(until, probe).await {
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
