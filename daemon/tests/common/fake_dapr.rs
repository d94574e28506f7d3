//! A fake Dapr sidecar for fault injection (failures, outages, refusals on demand). The real
//! daprd is tested in `real_daprd.rs`; this fake must refuse what daprd refuses, and
//! `real_daprd.rs` checks that it does, request by request:
//! publish and bulk publish (the stable route and alpha1) with their status codes and error
//! bodies, the CloudEvent envelope rules, `metadata.*` query handling, health, metadata, the
//! API token, and daprd's request body limit (`--max-body-size`, 4 MiB by default), answered as
//! daprd answers it: 500 on a publish, 400 `ERR_PUBSUB_EVENTS_SER` on a bulk publish, both
//! saying "stream too large".
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

/// How the fake answers publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Ok,
    /// 500 ERR_PUBSUB_PUBLISH_MESSAGE (a broker failure).
    Fail500,
    /// Connections are closed at once: the sidecar is unreachable.
    Down,
    /// Answer this status with the contract's errorCode.
    Status(u16),
    /// Every n-th event fails (500); in bulk calls, as failedEntries.
    FailEvery(u64),
    /// Requests are read and never answered: a sidecar that is stuck, not gone.
    Hang,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub pubsub: String,
    pub topic: String,
    pub event: Value,
    pub at: Instant,
    pub bulk: bool,
}

struct State {
    mode: Mode,
    token: Option<String>,
    pubsubs: Vec<String>,
    events: Vec<Received>,
    seen: u64,
    unauthorized: u64,
    max_body: usize,
    too_large: u64,
    /// Requests held unanswered in `Mode::Hang`.
    hung: u64,
    /// Acts as daprd before 1.17: no stable bulk route.
    before_1_17: bool,
    /// This event id always fails (a message the broker behind the sidecar will not take).
    poison: Option<String>,
}

/// daprd's default `--max-body-size`.
pub const DAPRD_MAX_BODY: usize = 4 << 20;

pub struct FakeDapr {
    pub port: u16,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeDapr {
    /// Serves on a free port; `pubsubs` are the component names it knows.
    pub fn start(pubsubs: &[&str], token: Option<&str>) -> FakeDapr {
        let port = super::free_port();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Ok,
            token: token.map(str::to_string),
            pubsubs: pubsubs.iter().map(|s| s.to_string()).collect(),
            events: Vec::new(),
            seen: 0,
            unauthorized: 0,
            max_body: DAPRD_MAX_BODY,
            too_large: 0,
            hung: 0,
            before_1_17: false,
            poison: None,
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))).unwrap();
        let st = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if st.lock().unwrap().mode == Mode::Down {
                    drop(stream);
                    continue;
                }
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move {
                            // Down: kill kept-alive connections too, as a dead sidecar would.
                            if st.lock().unwrap().mode == Mode::Down {
                                return Err(std::io::Error::other("sidecar down"));
                            }
                            if st.lock().unwrap().mode == Mode::Hang {
                                st.lock().unwrap().hung += 1;
                                std::future::pending::<()>().await;
                            }
                            Ok(handle(&st, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeDapr { port, state, _runtime: runtime }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn events(&self) -> Vec<Received> {
        self.state.lock().unwrap().events.clone()
    }

    /// Event ids received (duplicates included).
    pub fn ids(&self) -> Vec<String> {
        self.events().iter().map(|e| e.event["id"].as_str().unwrap_or_default().to_string()).collect()
    }

    /// Requests that `Mode::Hang` left unanswered.
    pub fn hung(&self) -> u64 {
        self.state.lock().unwrap().hung
    }

    pub fn unauthorized(&self) -> u64 {
        self.state.lock().unwrap().unauthorized
    }

    /// Answers as daprd 1.10 to 1.16 does: bulk publish only on the alpha1 route.
    pub fn set_before_1_17(&self, yes: bool) {
        self.state.lock().unwrap().before_1_17 = yes;
    }

    /// Publishing event `id` fails every time, in bulk as a failed entry.
    pub fn set_poison(&self, id: &str) {
        self.state.lock().unwrap().poison = Some(id.to_string());
    }

    /// Requests refused for a body over the limit.
    pub fn refused_too_large(&self) -> u64 {
        self.state.lock().unwrap().too_large
    }

    /// Waits until `pred(events)` holds, up to `secs`.
    pub fn wait_for(&self, secs: u64, what: &str, pred: impl Fn(&[Received]) -> bool) {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let events = self.events();
            if pred(&events) {
                return;
            }
            assert!(
                Instant::now() < until,
                "timed out after {secs} s waiting for {what}; received {} events, ids {:?}",
                events.len(),
                self.ids()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(if body.is_null() { String::new() } else { body.to_string() })));
    *r.status_mut() = status;
    if !body.is_null() {
        r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    }
    r
}

fn err(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(StatusCode::from_u16(status).unwrap(), json!({ "errorCode": code, "message": message }))
}

fn status_error(status: u16) -> Response<Full<Bytes>> {
    match status {
        400 => err(400, "ERR_PUBSUB_NOT_CONFIGURED", "no pubsub is configured"),
        403 => err(403, "ERR_PUBSUB_FORBIDDEN", "topic is not allowed for app id edgefn"),
        404 => err(404, "ERR_PUBSUB_NOT_FOUND", "pubsub is not found"),
        s => err(s, "ERR_PUBSUB_PUBLISH_MESSAGE", "error when publishing"),
    }
}

async fn handle(st: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type =
        req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("text/plain").to_string();
    let token = req.headers().get("dapr-api-token").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let too_large = {
        let mut s = st.lock().unwrap();
        let over = body.len() > s.max_body;
        s.too_large += u64::from(over);
        over
    };

    // Outbound health (components loaded) is all the fake has; daprd's own health also waits
    // for the app channel, and the fake has no app.
    if path == "/v1.0/healthz/outbound" {
        return reply(StatusCode::NO_CONTENT, Value::Null);
    }
    if path == "/v1.0/healthz" {
        return err(500, "ERR_HEALTH_NOT_READY", "dapr is not ready");
    }
    {
        let mut s = st.lock().unwrap();
        if s.token.is_some() && token != s.token {
            s.unauthorized += 1;
            // daprd answers with Go's http.Error: plain text, no errorCode.
            let mut r = Response::new(Full::new(Bytes::from_static(b"invalid api token\n")));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r.headers_mut().insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
            return r;
        }
    }
    if path == "/v1.0/metadata" {
        let s = st.lock().unwrap();
        let components: Vec<Value> = s
            .pubsubs
            .iter()
            .map(|n| json!({"name": n, "type": "pubsub.mqtt3", "version": "v1", "capabilities": []}))
            .collect();
        return reply(
            StatusCode::OK,
            json!({"id": "edgefn", "runtimeVersion": "1.16.0-fake", "components": components, "subscriptions": []}),
        );
    }
    // daprd reads the body through a reader capped at --max-body-size; the handler sees
    // "stream too large" as a read error (publish) or a JSON decode error (bulk).
    let stable = if st.lock().unwrap().before_1_17 { None } else { path.strip_prefix("/v1.0/publish/bulk/") };
    let bulk_route = stable.or_else(|| path.strip_prefix("/v1.0-alpha1/publish/bulk/"));
    if let Some(rest) = bulk_route {
        return bulk(st, rest, &body, too_large);
    }
    if let Some(rest) = path.strip_prefix("/v1.0/publish/") {
        return publish(st, rest, &query, &content_type, &body, too_large);
    }
    err(404, "ERR_DIRECT_INVOKE", &format!("no route {path}"))
}

fn split_target(rest: &str) -> (String, String) {
    let (pubsub, topic) = rest.split_once('/').unwrap_or((rest, ""));
    (percent_decode(pubsub), percent_decode(topic))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The envelope daprd would build for a payload of `content_type`.
fn cloudevent(
    pubsub: &str,
    topic: &str,
    content_type: &str,
    body: &[u8],
    meta: &BTreeMap<String, String>,
) -> Result<Value, String> {
    let mut ev = if content_type.starts_with("application/cloudevents+json") {
        let mut v: Value = serde_json::from_slice(body).map_err(|e| format!("cloudevent: {e}"))?;
        for (k, d) in [("source", "edgefn"), ("type", "com.dapr.event.sent"), ("specversion", "1.0")] {
            if v.get(k).is_none() {
                v[k] = json!(d);
            }
        }
        if v.get("time").is_none() {
            v["time"] = json!("2026-01-01T00:00:00Z");
        }
        v
    } else {
        let mut v = json!({"specversion": "1.0", "id": "generated", "source": "edgefn", "type": "com.dapr.event.sent",
                           "datacontenttype": content_type});
        if content_type.starts_with("application/json") {
            v["data"] = serde_json::from_slice(body).map_err(|e| format!("data: {e}"))?;
        } else if content_type.starts_with("application/octet-stream") {
            use base64::Engine;
            v["data_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(body));
        } else {
            v["data"] = json!(String::from_utf8_lossy(body));
        }
        v
    };
    ev["topic"] = json!(topic);
    ev["pubsubname"] = json!(pubsub);
    for (k, v) in meta {
        if let Some(field) = k.strip_prefix("cloudevent.") {
            ev[field] = json!(v);
        }
    }
    Ok(ev)
}

/// daprd 1.18 answers an unknown pub/sub with 404 even when it has no pub/sub at all
/// (`ERR_PUBSUB_NOT_CONFIGURED` is kept for `Mode::Status(400)`).
fn check_target(s: &State, pubsub: &str, topic: &str) -> Option<Response<Full<Bytes>>> {
    if pubsub.is_empty() || topic.is_empty() || !s.pubsubs.iter().any(|p| p == pubsub) {
        return Some(err(404, "ERR_PUBSUB_NOT_FOUND", &format!("pubsub {pubsub} is not found")));
    }
    None
}

fn publish(
    st: &Arc<Mutex<State>>,
    rest: &str,
    query: &str,
    content_type: &str,
    body: &[u8],
    too_large: bool,
) -> Response<Full<Bytes>> {
    let (pubsub, topic) = split_target(rest);
    let meta: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .filter_map(|(k, v)| k.strip_prefix("metadata.").map(|k| (k.to_string(), v.into_owned())))
        .collect();
    if let Some(raw) = meta.get("rawPayload") {
        if raw.parse::<bool>().is_err() {
            return err(400, "ERR_PUBSUB_REQUEST_METADATA", "rawPayload must be a boolean");
        }
    }
    let mut s = st.lock().unwrap();
    // daprd checks the target before it reads the body.
    if let Some(resp) = check_target(&s, &pubsub, &topic) {
        return resp;
    }
    if too_large {
        let msg = format!("error when publishing to topic {topic} in pubsub {pubsub}: stream too large");
        return err(500, "ERR_PUBSUB_PUBLISH_MESSAGE", &msg);
    }
    if s.poison.is_some() && meta.get("cloudevent.id") == s.poison.as_ref() {
        return err(500, "ERR_PUBSUB_PUBLISH_MESSAGE", "the broker refused the message");
    }
    s.seen += 1;
    match s.mode {
        Mode::Ok => {}
        Mode::Down | Mode::Hang => unreachable!("connections are dropped or held"),
        Mode::Fail500 => return err(500, "ERR_PUBSUB_PUBLISH_MESSAGE", "broker unavailable"),
        Mode::Status(code) => return status_error(code),
        Mode::FailEvery(n) => {
            if s.seen % n == 0 {
                return err(500, "ERR_PUBSUB_PUBLISH_MESSAGE", "broker hiccup");
            }
        }
    }
    match cloudevent(&pubsub, &topic, content_type, body, &meta) {
        Ok(event) => {
            s.events.push(Received { pubsub, topic, event, at: Instant::now(), bulk: false });
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        Err(e) => err(500, "ERR_PUBSUB_CLOUD_EVENTS_SER", &e),
    }
}

fn bulk(st: &Arc<Mutex<State>>, rest: &str, body: &[u8], too_large: bool) -> Response<Full<Bytes>> {
    let (pubsub, topic) = split_target(rest);
    if let Some(resp) = check_target(&st.lock().unwrap(), &pubsub, &topic) {
        return resp;
    }
    if too_large {
        let msg = format!("error when unmarshaling the request for topic {topic} pubsub {pubsub}: stream too large");
        return err(400, "ERR_PUBSUB_EVENTS_SER", &msg);
    }
    let Ok(Value::Array(entries)) = serde_json::from_slice::<Value>(body) else {
        return err(400, "ERR_PUBSUB_EVENTS_SER", "body is not a JSON array");
    };
    let mut ids = std::collections::BTreeSet::new();
    for e in &entries {
        let id = e["entryId"].as_str().unwrap_or_default();
        if id.is_empty() || !ids.insert(id.to_string()) {
            return err(400, "ERR_PUBSUB_EVENTS_SER", "entryId is empty or duplicated");
        }
    }
    let mut s = st.lock().unwrap();
    if let Some(resp) = check_target(&s, &pubsub, &topic) {
        return resp;
    }
    match s.mode {
        Mode::Fail500 => {
            let failed: Vec<Value> =
                entries.iter().map(|e| json!({"entryId": e["entryId"], "error": "broker unavailable"})).collect();
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"failedEntries": failed, "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE"}),
            );
        }
        Mode::Status(code) => return status_error(code),
        _ => {}
    }
    let mut failed = Vec::new();
    for e in entries {
        if s.poison.is_some() && e["entryId"].as_str() == s.poison.as_deref() {
            failed.push(json!({"entryId": e["entryId"], "error": "the broker refused the message"}));
            continue;
        }
        s.seen += 1;
        if let Mode::FailEvery(n) = s.mode {
            if s.seen % n == 0 {
                failed.push(json!({"entryId": e["entryId"], "error": "broker hiccup"}));
                continue;
            }
        }
        let ct = e["contentType"].as_str().unwrap_or("application/json").to_string();
        let payload = match &e["event"] {
            Value::String(text) if !ct.contains("json") => text.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        let meta: BTreeMap<String, String> = e["metadata"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
            .unwrap_or_default();
        match cloudevent(&pubsub, &topic, &ct, &payload, &meta) {
            Ok(event) => s.events.push(Received {
                pubsub: pubsub.clone(),
                topic: topic.clone(),
                event,
                at: Instant::now(),
                bulk: true,
            }),
            Err(why) => failed.push(json!({"entryId": e["entryId"], "error": why})),
        }
    }
    if failed.is_empty() {
        reply(StatusCode::NO_CONTENT, Value::Null)
    } else {
        reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"failedEntries": failed, "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE"}),
        )
    }
}
