//! The HTTP API (hyper 1, HTTP/1.1): invoke functions, list them, health and metrics, and the
//! seed demo's routes so its web page and `dapr invoke ... /api/image` keep working.
//!
//! Every error is JSON `{"error", "function", "kind"}` with a status that says whose fault it
//! is: 404 unknown function, 413 body too large, 422 the function rejected the input, 503
//! saturated or unavailable, 504 deadline, 500 the function broke (trap, memory, output cap).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::watch;

use super::routes::{self, Endpoint, Resolved};
use super::{dapr, openapi, web};
use crate::content_type;
use crate::metrics::FunctionLabel;
use crate::pipeline::{PipelineError, Pipelines};
use crate::runtime::{InvokeError, Runtime};

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// What the HTTP handlers share.
pub struct Api {
    pub runtime: Arc<Runtime>,
    /// The generation's fleet side: the config a deploy pulls and verifies with, and where
    /// its events go.
    pub fleet: Arc<crate::fleet::Context>,
    /// The fleet channel, when `[fleet] channel` is set (its Dapr subscription lands here).
    pub channel: Option<Arc<crate::fleet::listen::Listener>>,
    pub pipelines: Option<Arc<Pipelines>>,
    pub max_body: usize,
    /// Request bodies held at once, in KiB ([`bodies_in_flight`]): each connection may send
    /// `max_body`, and 512 connections of 16 MiB would be 8 GiB.
    pub bodies: Arc<tokio::sync::Semaphore>,
    /// `APP_API_TOKEN`: when set, every call but `/healthz` must carry it as `dapr-api-token`.
    pub app_token: Option<String>,
    /// `server.token`: when set, every call but the page and `/healthz` needs it as a bearer token.
    pub token: Option<String>,
    /// `server.allowed_hosts`: names besides IP addresses and localhost that requests may be
    /// sent to, and web pages they may come from ([`super::origin`]).
    pub allowed_hosts: Vec<String>,
    /// `server.notice_file`'s first line, for the page.
    pub notice: super::notice::Notice,
    /// Turns true when this generation stops: event streams end then.
    pub closing: watch::Receiver<bool>,
    /// Open event streams, capped at [`web::MAX_EVENT_STREAMS`].
    pub event_streams: Arc<AtomicUsize>,
    /// Problems of the daemon rather than of a generation (a reload that could not apply).
    pub daemon_problems: Arc<std::sync::Mutex<Vec<String>>>,
}

pub(super) async fn route(api: &Arc<Api>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if let Some(why) = super::origin::refusal(&req, &api.allowed_hosts) {
        tracing::warn!(%method, %path, "refused: {why}");
        return error(StatusCode::FORBIDDEN, why, None, "origin");
    }
    if !matches!(path.as_str(), "/" | "/healthz" | "/openapi.json") && !authorized(api, &req) {
        let wanted = match (&api.token, &api.app_token) {
            (Some(_), Some(_)) => "a bearer token (server.token) or dapr-api-token (APP_API_TOKEN)",
            (Some(_), None) => "a bearer token (server.token)",
            _ => "dapr-api-token (APP_API_TOKEN)",
        };
        tracing::warn!(%method, %path, "refused: missing or wrong credentials");
        return error(
            StatusCode::UNAUTHORIZED,
            format!("missing or wrong credentials: send {wanted}"),
            None,
            "unauthorized",
        );
    }
    let (endpoint, params) = match routes::resolve(&method, &path) {
        Resolved::Found(endpoint, params) => (endpoint, params.into_iter().map(str::to_owned).collect::<Vec<_>>()),
        Resolved::WrongMethod(allowed) => {
            let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            let mut r =
                error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} not allowed on {path}"), None, "method");
            r.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_str(&allow.join(", ")).expect("method names"));
            return r;
        }
        Resolved::NotFound => {
            return error(StatusCode::NOT_FOUND, format!("no route for {method} {path}"), None, "route");
        }
    };
    let param = |i: usize| params[i].as_str();
    match endpoint {
        Endpoint::Page => web::page(),
        Endpoint::OpenApi => openapi::document(),
        Endpoint::Status => json_response(StatusCode::OK, &web::status(api)),
        Endpoint::Events => web::events(api.clone()),
        Endpoint::Cameras => {
            let cameras = api.pipelines.as_ref().map(|p| p.board.cameras()).unwrap_or_default();
            json_response(StatusCode::OK, &json!({ "cameras": cameras }))
        }
        Endpoint::Latest => web::latest(api, param(0), param(1)),
        Endpoint::LatestFrame => {
            let id = query_value(&req, "id");
            web::frame(api, param(0), param(1), id.as_deref())
        }
        Endpoint::Health => health(api),
        Endpoint::Metrics => {
            super::status::Snapshot::take(api).set_gauges(api.runtime.metrics());
            let mut resp = Response::new(full(api.runtime.metrics().encode()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            resp
        }
        Endpoint::Functions => list_functions(api),
        Endpoint::Invoke => invoke(api, param(0), req, &[]).await,
        Endpoint::Deploy => super::deploy::deploy(api, param(0), req).await,
        Endpoint::Pipelines => list_pipelines(api),
        Endpoint::RunPipeline => run_pipeline(api, param(0), req).await,
        Endpoint::DeadLetters => dead_letters(api),
        Endpoint::ReplayDeadLetters => replay_dead_letters(api).await,
        Endpoint::DaprSubscribe => {
            let fleet = api.channel.as_ref().and_then(|_| api.fleet.cfg.fleet.channel.as_ref()?.dapr.as_ref());
            json_response(StatusCode::OK, &dapr::subscriptions(api.pipelines.as_deref(), fleet))
        }
        Endpoint::DaprEvent => dapr_event(api, param(0), req).await,
        Endpoint::DaprFleet => dapr_fleet(api, req).await,
        Endpoint::SeedImage => invoke(api, "grayscale", req, &[]).await,
        // The seed's page picks the function with an `api` header: `go` meant classify, which
        // answered with a sentence.
        Endpoint::SeedHello => match req.headers().get("api").map(|v| v.as_bytes()) {
            Some(b"go") => invoke(api, "classify", req, &[("EDGEFN_FORMAT", "text")]).await,
            _ => invoke(api, "grayscale", req, &[]).await,
        },
    }
}

/// `POST /v1/pipelines/{name}?camera=ID`: runs the pipeline, commits the result for its sinks,
/// and returns the output with its id.
async fn run_pipeline(api: &Api, name: &str, req: Request<Incoming>) -> Response<Body> {
    let Some(pipelines) = &api.pipelines else {
        return error(StatusCode::NOT_FOUND, format!("unknown pipeline `{name}`"), None, "unknown_pipeline");
    };
    let Some(p) = pipelines.get(name).cloned() else {
        return error(StatusCode::NOT_FOUND, format!("unknown pipeline `{name}`"), None, "unknown_pipeline");
    };
    let camera = query_value(&req, "camera").unwrap_or_else(|| "http".to_string());
    if !crate::pipeline::valid_camera(&camera) {
        let msg = format!("bad camera id {camera:?}: use 1 to 128 of [A-Za-z0-9._-]");
        return error(StatusCode::BAD_REQUEST, msg, None, "camera");
    }
    let topic = format!("http/{camera}");
    if !pipelines.admit(&p, &camera, &topic) {
        let msg = format!("pipeline `{name}` already tracks its most cameras, none idle: camera {camera:?} refused");
        return error(StatusCode::TOO_MANY_REQUESTS, msg, None, "too_many_cameras");
    }
    let (input, _held) = match read_body(req, api).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    match pipelines.run(&p, &camera, &topic, input).await {
        Ok(done) => {
            let mut resp = Response::new(full(done.output));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(done.content_type));
            h.insert("x-edgefn-id", HeaderValue::from_str(&done.id).expect("ids are ASCII"));
            h.insert("x-edgefn-seq", HeaderValue::from(done.seq));
            resp
        }
        Err(PipelineError::Function(e)) => {
            tracing::warn!(pipeline = name, camera = %camera, "{e}");
            error(status_of(&e), e.to_string(), Some(e.function()), e.kind())
        }
        Err(e @ PipelineError::TooLarge(_)) => {
            tracing::warn!(pipeline = name, camera = %camera, "{e}");
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string(), None, e.kind())
        }
        Err(e) => {
            tracing::error!(pipeline = name, camera = %camera, "{e}");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None, e.kind())
        }
    }
}

async fn dapr_event(api: &Api, name: &str, req: Request<Incoming>) -> Response<Body> {
    let (body, _held) = match read_body(req, api).await {
        Ok(b) => b,
        // The sidecar retries anything but SUCCESS and DROP, and the same event will be too
        // large every time: drop it, and say so.
        Err(resp) if resp.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            tracing::warn!(pipeline = name, "event over server.max_body ({} bytes) dropped", api.max_body);
            return json_response(StatusCode::OK, &json!({ "status": "DROP" }));
        }
        Err(resp) => return resp,
    };
    let status = match &api.pipelines {
        Some(p) => dapr::event(p, name, &body).await,
        None => "DROP",
    };
    json_response(StatusCode::OK, &json!({ "status": status }))
}

/// A deploy message through the sidecar: `SUCCESS` once judged (a refusal is final, and
/// logged), `RETRY` while the board cannot take more.
async fn dapr_fleet(api: &Api, req: Request<Incoming>) -> Response<Body> {
    let (body, _held) = match read_body(req, api).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let status = match (&api.channel, dapr::unwrap_event(&body)) {
        (None, _) => {
            tracing::warn!("deploy message through the sidecar, but [fleet] channel is not set: dropped");
            "DROP"
        }
        (Some(_), Err(why)) => {
            tracing::warn!(channel = "dapr", "deploy message refused: {why}");
            "DROP"
        }
        (Some(l), Ok((_, _, data))) => match l.receive(&data, "dapr") {
            true => "SUCCESS",
            false => "RETRY",
        },
    };
    json_response(StatusCode::OK, &json!({ "status": status }))
}

fn list_pipelines(api: &Api) -> Response<Body> {
    let list: Vec<_> = api
        .pipelines
        .iter()
        .flat_map(|ps| ps.iter())
        .map(|p| {
            json!({
                "name": p.name,
                "source": p.source,
                "functions": p.functions,
                "sinks": p.sinks.iter().map(|s| s.key.to_string()).collect::<Vec<_>>(),
                "queue": p.queue,
                "policy": p.policy,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "pipelines": list }))
}

fn dead_letters(api: &Api) -> Response<Body> {
    let Some(p) = &api.pipelines else {
        return json_response(StatusCode::OK, &json!({ "dead": [] }));
    };
    match p.outbox().dead_letters(1000) {
        Ok(list) => {
            let dead: Vec<_> = list.into_iter().map(|(sink, r)| json!({ "sink": sink, "record": r })).collect();
            json_response(StatusCode::OK, &json!({ "dead": dead }))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("reading dead letters: {e:#}"), None, "outbox"),
    }
}

/// `POST /v1/outbox/dead/replay`: every dead letter goes back to its sink's queue.
async fn replay_dead_letters(api: &Api) -> Response<Body> {
    let Some(p) = &api.pipelines else {
        return json_response(StatusCode::OK, &json!({ "replayed": 0 }));
    };
    let outbox = p.outbox().clone();
    match tokio::task::spawn_blocking(move || outbox.replay_dead()).await {
        Ok(Ok(n)) => {
            tracing::info!(results = n, "dead letters replayed");
            json_response(StatusCode::OK, &json!({ "replayed": n }))
        }
        Ok(Err(e)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, format!("replaying dead letters: {e:#}"), None, "outbox")
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("replaying dead letters: {e}"), None, "outbox"),
    }
}

async fn invoke(api: &Api, name: &str, req: Request<Incoming>, env: &[(&str, &str)]) -> Response<Body> {
    let (input, _held) = match read_body(req, api).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    match api.runtime.invoke(name, input, env).await {
        Ok(out) => {
            let mut resp = Response::new(full(out.stdout.clone()));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type::sniff(&out.stdout)));
            resp
        }
        Err(e) => {
            match &e {
                InvokeError::Rejected { .. } | InvokeError::UnknownFunction { .. } => {
                    tracing::debug!(function = %e.function(), "{e}")
                }
                _ => tracing::warn!(function = %e.function(), kind = e.kind(), "{e}"),
            }
            error(status_of(&e), e.to_string(), Some(e.function()), e.kind())
        }
    }
}

fn status_of(e: &InvokeError) -> StatusCode {
    match e {
        InvokeError::UnknownFunction { .. } => StatusCode::NOT_FOUND,
        InvokeError::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        InvokeError::Saturated { .. } | InvokeError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        InvokeError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
        InvokeError::MemoryLimit { .. } | InvokeError::OutputTooLarge { .. } | InvokeError::Trap { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The request-body budget for `max_body`: four bodies of the largest size at once.
pub fn bodies_in_flight(max_body: usize) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new((4 * max_body).div_ceil(1024).min(u32::MAX as usize)))
}

/// Reads the whole body, refusing more than `max_body` bytes with a 413, and holds its share
/// of the budget of bodies in flight until the handler drops the permit (503 `busy` with
/// `Retry-After` when the budget is spent: the board's memory, not the client, decides).
///
/// An oversized body is still read and discarded (up to [`DRAIN_CAP`] and [`DRAIN_TIME`]), so a
/// client that sends before it listens gets the 413 instead of a broken pipe. A client that
/// sends `Expect: 100-continue` (curl does, for large bodies) gets the 413 before sending.
pub(super) async fn read_body(
    req: Request<Incoming>,
    api: &Api,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), Response<Body>> {
    let max = api.max_body;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    // Without a length, the body may be as large as the limit.
    let kib = (declared.unwrap_or(max as u64).min(max as u64) as usize).div_ceil(1024).max(1) as u32;
    let Ok(held) = api.bodies.clone().try_acquire_many_owned(kib) else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: too many request bytes in flight, try again".to_string(),
            None,
            "busy",
        );
        r.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        drain(req.into_body()).await;
        return Err(r);
    };
    read_body_capped(req, max).await.map(|b| (b, held))
}

async fn read_body_capped(req: Request<Incoming>, max: usize) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        let msg = format!("request body over the limit of {max} bytes");
        error(StatusCode::PAYLOAD_TOO_LARGE, msg, None, "body_too_large")
    };
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let expects_continue = req.headers().contains_key(hyper::header::EXPECT);
    let body = req.into_body();
    if declared.is_some_and(|n| n > max as u64) {
        if !expects_continue {
            drain(body).await;
        }
        return Err(too_large());
    }
    let read = async move {
        let mut body = body;
        let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading request body: {e}"), None, "body"))?;
            if let Some(data) = frame.data_ref() {
                if buf.len() + data.len() > max {
                    drain(body).await;
                    return Err(too_large());
                }
                buf.extend_from_slice(data);
            }
        }
        Ok(buf.freeze())
    };
    // A client that stops sending mid-body would otherwise hold its connection for ever.
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => {
            let msg = format!("request body not received within {BODY_TIMEOUT:?}");
            Err(error(StatusCode::REQUEST_TIMEOUT, msg, None, "body_timeout"))
        }
    }
}

/// Time a client has to send a whole request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

const DRAIN_CAP: usize = 256 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

async fn drain(mut body: Incoming) {
    let discard = async {
        let mut seen = 0;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_CAP {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}

fn health(api: &Api) -> Response<Body> {
    json_response(StatusCode::OK, &super::status::Snapshot::take(api).health())
}

fn list_functions(api: &Api) -> Response<Body> {
    let rt = &api.runtime;
    let metrics = rt.metrics();
    let rollouts = crate::fleet::rollout::Board::open(&api.fleet.cfg.runtime.state_dir).read();
    let loaded: Vec<_> = rt
        .functions()
        .iter()
        .map(|f| {
            let label = FunctionLabel { function: f.name.clone() };
            let mut entry = json!({
                "name": f.name,
                "sha256": f.sha256,
                "path": f.path,
                "origin": format!("{:?}", f.origin).to_lowercase(),
                "limits": {
                    "memory": f.limits.memory.as_u64(),
                    "deadline_ms": f.limits.deadline.as_millis() as u64,
                    "max_output": f.limits.max_output.as_u64(),
                    "max_instances": f.limits.max_instances,
                },
                "invocations": metrics.invocations.get_or_create(&label).get(),
                "errors": rt.error_count(&f.name),
                "busy": f.busy(),
            });
            if let Some(serde_json::Value::Object(v)) = super::deploy::version(api, &rollouts, &f.name) {
                entry.as_object_mut().expect("an object").extend(v);
            }
            entry
        })
        .collect();
    let failed: Vec<_> = rt.failed().iter().map(|(n, c)| json!({"name": n, "error": c})).collect();
    json_response(StatusCode::OK, &json!({ "functions": loaded, "failed": failed, "models": web::models(rt) }))
}

/// With no token configured every route is open. Otherwise a request needs one of the
/// configured credentials: the bearer token (`server.token`) from people and scripts, or the
/// sidecar's `dapr-api-token` (`APP_API_TOKEN`), which daprd sends on every call it makes,
/// subscriptions, events and service invocation alike (daprd never sends `Authorization`).
fn authorized(api: &Api, req: &Request<Incoming>) -> bool {
    if api.token.is_none() && api.app_token.is_none() {
        return true;
    }
    let sidecar = api.app_token.as_deref().is_some_and(|t| {
        req.headers().get("dapr-api-token").is_some_and(|given| same_secret(given.as_bytes(), t.as_bytes()))
    });
    sidecar || api.token.as_deref().is_some_and(|t| bearer_ok(req, t))
}

/// `Authorization: Bearer <token>`, or `?token=` on the routes a browser cannot send headers to
/// (EventSource, `<img>`): the event stream and the camera images.
fn bearer_ok(req: &Request<Incoming>, token: &str) -> bool {
    let header = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if header
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes()))
    {
        return true;
    }
    let browser_route = match routes::resolve(req.method(), req.uri().path()) {
        Resolved::Found(endpoint, _) => endpoint.takes_query_token(),
        _ => false,
    };
    browser_route
        && req.uri().query().is_some_and(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .any(|(k, v)| k == "token" && same_secret(v.as_bytes(), token.as_bytes()))
        })
}

/// Compares secrets in time that depends on their lengths only, not on where they differ.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    given.len() == secret.len() && given.iter().zip(secret).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

pub(super) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The first `key=` of the query string, decoded.
fn query_value(req: &Request<Incoming>, key: &str) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

pub(super) fn error(status: StatusCode, message: String, function: Option<&str>, kind: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message, "function": function, "kind": kind }))
}
