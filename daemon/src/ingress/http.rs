//! The HTTP API (hyper 1, HTTP/1.1): invoke functions, list them, health and metrics, and the
//! seed demo's routes so its web page and `dapr invoke ... /api/image` keep working.
//!
//! Every error is JSON `{"error", "function", "kind"}` with a status that says whose fault it
//! is: 404 unknown function, 413 body too large, 422 the function rejected the input, 503
//! saturated or unavailable, 504 deadline, 500 the function broke (trap, memory, output cap).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;

use super::content_type;
use crate::metrics::FunctionLabel;
use crate::runtime::{InvokeError, Runtime};

type Body = Full<Bytes>;

/// What the HTTP handlers share.
pub struct Api {
    pub runtime: Arc<Runtime>,
    pub max_body: usize,
}

/// Serves `listener` until `shutdown` resolves, then gives open requests `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    api: Arc<Api>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let api = api.clone();
                let service = service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(route(&api, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace of {grace:?} over; closing open connections");
    }
}

async fn route(api: &Api, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => health(api),
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::from(api.runtime.metrics().encode()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (&Method::GET, "/v1/functions") => list_functions(api),
        (&Method::POST, "/api/image") => invoke(api, "grayscale", req).await,
        (&Method::POST, "/api/hello") => {
            // The seed's page picks the function with an `api` header: `go` meant classify.
            let name = match req.headers().get("api").map(|v| v.as_bytes()) {
                Some(b"go") => "classify",
                _ => "grayscale",
            };
            invoke(api, name, req).await
        }
        (&Method::POST, p) if p.starts_with("/v1/functions/") => {
            let name = p["/v1/functions/".len()..].to_owned();
            invoke(api, &name, req).await
        }
        (_, "/healthz" | "/metrics" | "/v1/functions" | "/api/image" | "/api/hello") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed on {path}"),
            None,
            "method",
        ),
        (_, p) if p.starts_with("/v1/functions/") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed on {path}"),
            None,
            "method",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
            None,
            "route",
        ),
    }
}

async fn invoke(api: &Api, name: &str, req: Request<Incoming>) -> Response<Body> {
    let input = match read_body(req, api.max_body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    match api.runtime.invoke(name, input, &[]).await {
        Ok(out) => {
            let mut resp = Response::new(Full::from(out.stdout.clone()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(content_type::sniff(&out.stdout)),
            );
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
        InvokeError::Saturated { .. } | InvokeError::Unavailable { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        InvokeError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
        InvokeError::MemoryLimit { .. }
        | InvokeError::OutputTooLarge { .. }
        | InvokeError::Trap { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Reads the whole body, refusing more than `max` bytes with a 413.
///
/// An oversized body is still read and discarded (up to [`DRAIN_CAP`] and [`DRAIN_TIME`]), so a
/// client that sends before it listens gets the 413 instead of a broken pipe. A client that
/// sends `Expect: 100-continue` (curl does, for large bodies) gets the 413 before sending.
async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        let msg = format!("request body over the limit of {max} bytes");
        error(StatusCode::PAYLOAD_TOO_LARGE, msg, None, "body_too_large")
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = req.headers().contains_key(hyper::header::EXPECT);
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > max as u64) {
        if !expects_continue {
            drain(body).await;
        }
        return Err(too_large());
    }
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}"),
                None,
                "body",
            )
        })?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > max {
                drain(body).await;
                return Err(too_large());
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}

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
    let rt = &api.runtime;
    let status = if rt.failed().is_empty() {
        "ok"
    } else {
        "degraded"
    };
    json_response(
        StatusCode::OK,
        &json!({
            "status": status,
            "functions": rt.functions().count(),
            "failed": rt.failed(),
        }),
    )
}

fn list_functions(api: &Api) -> Response<Body> {
    let rt = &api.runtime;
    let metrics = rt.metrics();
    let loaded: Vec<_> = rt
        .functions()
        .map(|f| {
            let label = FunctionLabel {
                function: f.name.clone(),
            };
            json!({
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
            })
        })
        .collect();
    let failed: Vec<_> = rt
        .failed()
        .iter()
        .map(|(n, c)| json!({"name": n, "error": c}))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({ "functions": loaded, "failed": failed }),
    )
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::from(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(
    status: StatusCode,
    message: String,
    function: Option<&str>,
    kind: &str,
) -> Response<Body> {
    json_response(
        status,
        &json!({ "error": message, "function": function, "kind": kind }),
    )
}
