//! The web page and what it reads: `GET /` (one embedded HTML file, no CDN: the board may be
//! offline), `GET /v1/status` (everything the page shows, in one JSON document), the latest
//! result of a camera, and `GET /v1/events`, a server-sent events stream that pushes camera
//! results as they commit and the status every two seconds.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use crate::runtime::Runtime;
use tokio_stream::wrappers::{BroadcastStream, IntervalStream};

use super::http::{Api, Body, full};

const PAGE: &str = include_str!("web/index.html");

pub fn page() -> Response<Body> {
    let mut r = Response::new(full(PAGE));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

/// Everything the page shows.
pub fn status(api: &Api) -> Value {
    let rt = &api.runtime;
    let m = rt.metrics();
    let records = crate::fleet::rollout::Board::open(&api.fleet.cfg.runtime.state_dir).read();
    let functions: Vec<Value> = rt
        .functions()
        .iter()
        .map(|f| {
            let (p50, p99) = f.percentiles();
            let label = crate::metrics::FunctionLabel { function: f.name.clone() };
            json!({
                "name": f.name,
                "sha256": f.sha256,
                "invocations": m.invocations.get_or_create(&label).get(),
                "errors": rt.error_count(&f.name),
                "p50_ms": p50,
                "p99_ms": p99,
                "version": super::deploy::version(api, &records, &f.name),
            })
        })
        .collect();
    let snap = super::status::Snapshot::take(api);
    let (cameras, pipelines): (Vec<Value>, Vec<Value>) = match &api.pipelines {
        Some(ps) => {
            let mut flows = ps.board.flows();
            let sink = |key: &str| {
                let label = crate::metrics::SinkLabel { sink: key.to_string() };
                let pending = snap.sinks.iter().find(|s| s.sink == key).map_or(0, |s| s.depth);
                json!({
                    "sink": key,
                    "pending": pending,
                    "delivered": m.outbox_delivered.get_or_create(&label).get(),
                    "dead": m.outbox_dead.get_or_create(&label).get(),
                })
            };
            let pipelines = ps
                .iter()
                .map(|p| {
                    let sinks: Vec<Value> = p.sinks.iter().map(|s| sink(&s.key)).collect();
                    let flow = flows.remove(&p.name).unwrap_or(Value::Null);
                    json!({ "name": p.name, "functions": p.functions, "flow": flow, "sinks": sinks })
                })
                .collect();
            (ps.board.cameras(), pipelines)
        }
        None => (Vec::new(), Vec::new()),
    };
    let notice = (!snap.dapr_configured && api.pipelines.is_some())
        .then_some("No Dapr sidecar configured: results go to the file and MQTT sinks.");
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mqtt_connected": snap.mqtt_connected,
        "dapr": { "configured": snap.dapr_configured, "reachable": snap.dapr_reachable },
        "notice": notice,
        "operator_notice": api.notice.get(),
        "outbox": snap.outbox(),
        "functions": functions,
        "failed": rt.failed(),
        "models": models(rt),
        "pipelines": pipelines,
        "cameras": cameras,
    })
}

/// Each model: its contexts (all, idle), or why it did not load.
pub fn models(rt: &Runtime) -> Vec<Value> {
    let models = rt.models();
    models
        .loaded()
        .map(|m| json!({ "name": m.name, "contexts": m.contexts(), "idle": m.idle() }))
        .chain(models.failed().iter().map(|(name, cause)| json!({ "name": name, "error": cause })))
        .collect()
}

/// The latest result of `pipeline/camera`, as its own content type.
pub fn latest(api: &Api, pipeline: &str, camera: &str) -> Response<Body> {
    let found = api.pipelines.as_ref().and_then(|p| p.board.latest(pipeline, camera));
    camera_bytes(found, || format!("no result yet for {pipeline}/{camera}"))
}

/// The frame behind `pipeline/camera`'s latest result, kept when that result is a label.
/// `?id=` asks for the frame of that result (and 404 when the board no longer has it), not
/// the latest: the page must never put a label on another result's picture.
pub fn frame(api: &Api, pipeline: &str, camera: &str, id: Option<&str>) -> Response<Body> {
    let found = api.pipelines.as_ref().and_then(|p| p.board.frame(pipeline, camera, id));
    camera_bytes(found.map(|b| (b.clone(), crate::content_type::sniff(&b))), || match id {
        Some(id) => format!("no labelled frame of result {id} for {pipeline}/{camera} (only the last few are kept)"),
        None => format!("no labelled frame for {pipeline}/{camera}"),
    })
}

/// A camera's bytes as their own type, never cached; or 404 `no_result` saying what is missing.
fn camera_bytes(found: Option<(Bytes, &'static str)>, missing: impl FnOnce() -> String) -> Response<Body> {
    match found {
        Some((bytes, ct)) => {
            let mut r = Response::new(full(bytes));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        None => {
            let body = json!({ "error": missing(), "kind": "no_result" });
            let mut r = Response::new(full(body.to_string()));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    }
}

/// Event streams open at once at most: each one costs a connection and a status every 2 s.
pub const MAX_EVENT_STREAMS: usize = 32;

/// `text/event-stream`: `camera` events as results commit, `status` now and every 2 s.
/// The stream ends when its generation stops, so a reload never waits on an open page.
pub fn events(api: std::sync::Arc<Api>) -> Response<Body> {
    let Some(slot) = StreamSlot::take(&api.event_streams) else {
        let body =
            json!({ "error": format!("too many event streams open (at most {MAX_EVENT_STREAMS})"), "kind": "busy" });
        let mut r = Response::new(full(body.to_string()));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return r;
    };
    let mut closing = api.closing.clone();
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    let cameras = api.pipelines.as_ref().map(|p| BroadcastStream::new(p.board.subscribe()));
    let camera_events = futures_util::stream::iter(cameras).flatten().filter_map(|e| async move {
        // A lagging client skips missed events; the next status catches it up.
        e.ok().map(|v| sse("camera", &v["camera"]))
    });
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_secs(2)));
    let status_events = ticks.map(move |_| sse("status", &status(&api)));
    let stream = futures_util::stream::select(camera_events, status_events).take_until(closed).map(move |text| {
        let _held = &slot;
        Ok::<_, Infallible>(Frame::data(Bytes::from(text)))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// One of the [`MAX_EVENT_STREAMS`] places, given back when the stream ends.
struct StreamSlot(std::sync::Arc<AtomicUsize>);

impl StreamSlot {
    fn take(open: &std::sync::Arc<AtomicUsize>) -> Option<StreamSlot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_EVENT_STREAMS).then_some(n + 1))
            .ok()
            .map(|_| StreamSlot(open.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}
