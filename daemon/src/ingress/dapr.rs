//! edgefn as a Dapr app: the sidecar asks which topics we subscribe to, then delivers events.
//!
//! `GET /dapr/subscribe` lists each pipeline with a `source.dapr`; its events arrive at
//! `POST /v1/dapr/events/{pipeline}` as CloudEvents. The reply tells the sidecar what to do,
//! per the contract: `SUCCESS` once the result is durable in the outbox, `DROP` for an event
//! no retry can fix (undecodable, too large, the function rejected it, or the pipeline names a
//! function that does not exist), `RETRY` for a passing problem (saturated, not loaded yet,
//! the outbox failing). The fleet channel's deploy messages, when they come through the sidecar,
//! arrive at `POST /v1/dapr/fleet` ([`crate::fleet::listen`]).

use base64::Engine;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::config::DaprTopic;
use crate::pipeline::Pipelines;

pub fn route(pipeline: &str) -> String {
    format!("/v1/dapr/events/{pipeline}")
}

/// The pipelines' subscriptions, and the fleet channel's when it comes through the sidecar.
pub fn subscriptions(pipelines: Option<&Pipelines>, fleet: Option<&DaprTopic>) -> Value {
    let subs: Vec<Value> = pipelines
        .into_iter()
        .flat_map(|ps| ps.iter())
        .filter_map(|p| {
            p.source.dapr.as_ref().map(|d| json!({ "pubsubname": d.pubsub, "topic": d.topic, "route": route(&p.name) }))
        })
        .chain(fleet.map(|d| json!({ "pubsubname": d.pubsub, "topic": d.topic, "route": FLEET_ROUTE })))
        .collect();
    Value::Array(subs)
}

/// Where the sidecar delivers deploy messages of the fleet channel.
pub const FLEET_ROUTE: &str = "/v1/dapr/fleet";

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
        Err(e) if e.is_final() => {
            tracing::warn!(pipeline = name, camera = %camera, topic = %topic, "event dropped: {e}");
            "DROP"
        }
        Err(e) => {
            tracing::warn!(pipeline = name, camera = %camera, topic = %topic, "event to retry: {e}");
            "RETRY"
        }
    }
}

/// The fields of a CloudEvent we read, borrowed from the body: its `data` is never parsed into
/// a tree (16 MiB of JSON would take 16 times that as a `serde_json::Value`).
#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(borrow, default)]
    subject: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data_base64: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// A field as a string, if it is one.
fn text(raw: Option<&RawValue>) -> Option<String> {
    serde_json::from_str::<String>(raw?.get()).ok()
}

/// (camera, topic, data) from a CloudEvent: `data_base64` decoded, a string `data` as its
/// bytes, other JSON `data` as it was sent. The camera is the event's `subject`, else `dapr`.
pub fn unwrap_event(body: &[u8]) -> Result<(String, String, Bytes), String> {
    let v: Event = serde_json::from_slice(body).map_err(|e| format!("not a JSON event: {e}"))?;
    let camera = match text(v.subject).as_deref() {
        None | Some("") => "dapr".to_string(),
        Some(s) if crate::pipeline::valid_camera(s) => s.to_string(),
        Some(s) => return Err(format!("subject {s:?} is not a camera id (1 to 128 of [A-Za-z0-9._-])")),
    };
    let topic = text(v.topic).unwrap_or_default();
    let data = if let Some(b64) = text(v.data_base64) {
        base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("data_base64: {e}"))?.into()
    } else {
        match v.data.map(RawValue::get) {
            None | Some("null") => return Err("no data".into()),
            Some(raw) if raw.starts_with('"') => Bytes::from(text(v.data).unwrap_or_default()),
            Some(raw) => Bytes::copy_from_slice(raw.as_bytes()),
        }
    };
    Ok((camera, topic, data))
}

#[cfg(test)]
mod tests {
    use super::unwrap_event;

    #[test]
    fn data_comes_out_as_sent_and_bad_events_are_errors() {
        let (camera, topic, data) = unwrap_event(br#"{"subject":"door","topic":"t","data":{"a": [1, 2]}}"#).unwrap();
        assert_eq!((camera.as_str(), topic.as_str(), &data[..]), ("door", "t", &br#"{"a": [1, 2]}"#[..]));
        assert_eq!(&unwrap_event(br#"{"data":"hi"}"#).unwrap().2[..], b"hi");
        assert_eq!(&unwrap_event(br#"{"data_base64":"aGk="}"#).unwrap().2[..], b"hi");
        assert_eq!(unwrap_event(br#"{"data":"x"}"#).unwrap().0, "dapr");
        assert!(unwrap_event(br#"{"data":null}"#).is_err());
        assert!(unwrap_event(br#"{"subject":"a/b","data":1}"#).is_err());
        assert!(unwrap_event(b"[1]").is_err());
    }
}
