//! edgefn as a Dapr app: the sidecar asks which topics we subscribe to, then delivers events.
//!
//! `GET /dapr/subscribe` lists each pipeline with a `source.dapr`; its events arrive at
//! `POST /v1/dapr/events/{pipeline}` as CloudEvents. The reply tells the sidecar what to do,
//! per the contract: `SUCCESS` once the result is durable in the outbox, `DROP` for an event
//! no retry can fix (undecodable, too large, the function rejected it, or the pipeline names a
//! function that does not exist), `RETRY` for a passing problem (saturated, not loaded yet,
//! the outbox failing).

use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::pipeline::{PipelineError, Pipelines};

pub fn route(pipeline: &str) -> String {
    format!("/v1/dapr/events/{pipeline}")
}

pub fn subscriptions(pipelines: Option<&Pipelines>) -> Value {
    let subs: Vec<Value> = pipelines
        .into_iter()
        .flat_map(|ps| ps.iter())
        .filter_map(|p| {
            p.source.dapr.as_ref().map(|d| json!({ "pubsubname": d.pubsub, "topic": d.topic, "route": route(&p.name) }))
        })
        .collect();
    Value::Array(subs)
}

/// Handles one delivered event; the answer is the `status` for the sidecar.
pub async fn event(pipelines: &Pipelines, name: &str, body: &[u8]) -> &'static str {
    let Some(p) = pipelines.get(name) else {
        tracing::warn!(pipeline = name, "event for an unknown pipeline: dropped");
        return "DROP";
    };
    let (camera, topic, data) = match unwrap_event(body) {
        Ok(parts) => parts,
        Err(why) => {
            tracing::warn!(pipeline = name, "undecodable event dropped: {why}");
            return "DROP";
        }
    };
    if !pipelines.admit(p, &camera, &topic) {
        return "DROP";
    }
    match pipelines.run(p, &camera, &topic, data).await {
        Ok(_) => "SUCCESS",
        Err(PipelineError::Function(e)) if e.passes() => {
            tracing::warn!(pipeline = name, camera = %camera, topic = %topic, "event to retry: {e}");
            "RETRY"
        }
        Err(PipelineError::Function(e)) => {
            tracing::warn!(pipeline = name, camera = %camera, topic = %topic, "event dropped: {e}");
            "DROP"
        }
        Err(e) => {
            tracing::warn!(pipeline = name, camera = %camera, topic = %topic, "event to retry: {e}");
            "RETRY"
        }
    }
}

/// (camera, topic, data) from a CloudEvent: `data_base64` decoded, a string `data` as its
/// bytes, other JSON `data` re-serialised. The camera is the event's `subject`, else `dapr`.
pub fn unwrap_event(body: &[u8]) -> Result<(String, String, Bytes), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let camera = match v["subject"].as_str() {
        None | Some("") => "dapr".to_string(),
        Some(s) if crate::pipeline::valid_camera(s) => s.to_string(),
        Some(s) => return Err(format!("subject {s:?} is not a camera id (1 to 128 of [A-Za-z0-9._-])")),
    };
    let topic = v["topic"].as_str().unwrap_or_default().to_string();
    let data = if let Some(b64) = v["data_base64"].as_str() {
        base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("data_base64: {e}"))?.into()
    } else {
        match &v["data"] {
            Value::Null => return Err("no data".into()),
            Value::String(s) => Bytes::from(s.clone()),
            other => Bytes::from(other.to_string()),
        }
    };
    Ok((camera, topic, data))
}
