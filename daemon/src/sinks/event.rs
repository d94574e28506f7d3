//! The CloudEvent envelope a result travels in (to Dapr and to file sinks).
//!
//! We build the envelope ourselves so binary results keep their real type: JSON output goes in
//! `data` as JSON, text as a string, images as `data_base64` with `datacontenttype: image/png`.
//! Dapr keeps an app's own envelope and only fills in routing fields.

use base64::Engine;
use serde_json::{Value, json};

use super::outbox::Record;

pub fn envelope(record: &Record, payload: &[u8]) -> Value {
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(record.created_ms))
            .to_string();
    let mut event = json!({
        "specversion": "1.0",
        "id": record.id,
        "source": format!("edgefn/{}", record.pipeline),
        "type": "io.edgefn.result",
        "subject": record.camera,
        "time": time,
        "datacontenttype": record.content_type,
        "edgefnseq": record.seq,
    });
    match data(&record.content_type, payload) {
        Data::Json(v) => event["data"] = v,
        Data::Text(s) => event["data"] = Value::String(s),
        Data::Binary(b) => event["data_base64"] = Value::String(b),
    }
    event
}

enum Data {
    Json(Value),
    Text(String),
    Binary(String),
}

fn data(content_type: &str, payload: &[u8]) -> Data {
    if content_type == "application/json" {
        if let Ok(v) = serde_json::from_slice(payload) {
            return Data::Json(v);
        }
    }
    if content_type.starts_with("text/") {
        if let Ok(s) = std::str::from_utf8(payload) {
            return Data::Text(s.to_string());
        }
    }
    Data::Binary(base64::engine::general_purpose::STANDARD.encode(payload))
}
