//! Subcommands that act on a running daemon through its HTTP API (`edgefn replay`, `deploy`): the
//! address and token come from the same config the daemon reads.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;

/// `POST path` on the daemon configured by `cfg`; the JSON answer, or an error naming the cause.
pub async fn post(cfg: &Config, path: &str) -> anyhow::Result<serde_json::Value> {
    post_json(cfg, path, Bytes::new()).await
}

/// `POST path` with `body` (JSON).
pub async fn post_json(cfg: &Config, path: &str, body: Bytes) -> anyhow::Result<serde_json::Value> {
    let mut addr = cfg.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut req = Request::builder().method(Method::POST).uri(format!("http://{addr}{path}"));
    if let Some(token) = cfg.server.token.as_deref().filter(|t| !t.is_empty()) {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = client
        .request(req.header("content-type", "application/json").body(Full::new(body))?)
        .await
        .with_context(|| format!("no edgefn daemon answering at {addr} (server.listen)"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&body).with_context(|| format!("{path} answered {status} with no JSON"))?;
    anyhow::ensure!(status.is_success(), "{path} answered {status}: {}", value["error"].as_str().unwrap_or(""));
    Ok(value)
}
