//! The CloudEvent envelope a result travels in (to Dapr and to file sinks).
//!
//! We build the envelope ourselves so binary results keep their real type: JSON output goes in
//! `data` as JSON, text as a string, images as `data_base64` with `datacontenttype: image/png`.
//! Dapr keeps an app's own envelope and only fills in routing fields.
//!
//! A JSON output is checked and copied as it is, never parsed into a tree: 16 MiB of `[0,0,…]`
//! as a `serde_json::Value` would take over 256 MiB.

use base64::Engine;
use serde::Serialize;
use serde_json::value::RawValue;

use super::outbox::Record;

#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: &'a str,
    source: String,
    #[serde(rename = "type")]
    kind: &'static str,
    subject: &'a str,
    time: String,
    datacontenttype: &'a str,
    edgefnseq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Json(&'a RawValue),
    Text(&'a str),
}

/// Base64 with AVX2 or NEON where the CPU has them: scalar, a 41 KB frame's encoding was the
/// largest user-space item of the daemon's own CPU for a file sink's line (perf: 4 %).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
static BASE64: std::sync::LazyLock<base64::engine::Simd> =
    std::sync::LazyLock::new(|| base64::engine::Simd::standard(base64::engine::general_purpose::PAD));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
static BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A payload that is a whole CloudEvent already (the fleet's `deployment` events).
const CLOUDEVENT: &str = "application/cloudevents+json";

/// The envelope of `record` with `payload` as its data, as JSON text; a payload that is a
/// CloudEvent already is its own envelope.
pub fn envelope(record: &Record, payload: &[u8]) -> String {
    let mut out = String::new();
    append_envelope(&mut out, record, payload);
    out
}

/// [`envelope`], appended to `out`: the file sink builds its batch of lines in place, so a
/// 41 KB image is base64-encoded straight into the batch and never copied after.
pub fn append_envelope(out: &mut String, record: &Record, payload: &[u8]) {
    if record.content_type == CLOUDEVENT
        && let Ok(event) = std::str::from_utf8(payload)
    {
        out.push_str(event);
        return;
    }
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(record.created_ms))
            .to_string();
    let source = match record.board.as_str() {
        "" => format!("edgefn/{}", record.pipeline),
        board => format!("edgefn/{board}/{}", record.pipeline),
    };
    let mut event = Envelope {
        specversion: "1.0",
        id: &record.id,
        source,
        kind: "io.edgefn.result",
        subject: &record.camera,
        time,
        datacontenttype: &record.content_type,
        edgefnseq: record.seq,
        data: None,
    };
    let json = (record.content_type == "application/json")
        .then(|| serde_json::from_slice::<&RawValue>(payload).ok())
        .flatten();
    let text = record.content_type.starts_with("text/").then(|| std::str::from_utf8(payload).ok()).flatten();
    event.data = match (json, text) {
        (Some(raw), _) => Some(Data::Json(raw)),
        (None, Some(s)) => Some(Data::Text(s)),
        (None, None) => None,
    };
    let head = serde_json::to_string(&event).expect("an envelope serialises");
    if event.data.is_some() {
        out.push_str(&head);
        return;
    }
    // Base64 never needs escaping: written straight in, not through serde's escaper, which
    // was the costliest step of a 41 KB frame's envelope.
    out.reserve(head.len() + payload.len().div_ceil(3) * 4 + 18);
    out.push_str(&head[..head.len() - 1]);
    out.push_str(r#","data_base64":""#);
    BASE64.encode_string(payload, out);
    out.push_str(r#""}"#);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content_type: &str) -> Record {
        Record {
            id: "b/p/cam/1".into(),
            board: "b".into(),
            pipeline: "p".into(),
            camera: "cam".into(),
            seq: 1,
            topic: "t".into(),
            content_type: content_type.into(),
            created_ms: 0,
            boot: None,
            error: None,
        }
    }

    #[test]
    fn json_is_embedded_text_is_a_string_and_the_rest_is_base64() {
        let v: serde_json::Value =
            serde_json::from_str(&envelope(&record("application/json"), b"{\"a\": [1, 2]}")).unwrap();
        assert_eq!((v["data"]["a"][1].as_u64(), v["source"].as_str()), (Some(2), Some("edgefn/b/p")));
        let v: serde_json::Value = serde_json::from_str(&envelope(&record("text/plain"), b"hi")).unwrap();
        assert_eq!(v["data"], "hi");
        let v: serde_json::Value = serde_json::from_str(&envelope(&record("application/json"), b"{broken")).unwrap();
        assert_eq!(v["data_base64"], "e2Jyb2tlbg==");
        assert!(v.get("data").is_none());
        let v: serde_json::Value = serde_json::from_str(&envelope(&record("image/png"), &[0xff, 0, 1])).unwrap();
        assert_eq!((v["data_base64"].as_str(), v["datacontenttype"].as_str()), (Some("/wAB"), Some("image/png")));
        let whole = r#"{"specversion":"1.0","type":"io.edgefn.deployment","id":"x"}"#;
        assert_eq!(envelope(&record(CLOUDEVENT), whole.as_bytes()), whole);
    }

    /// The SIMD engine writes what the scalar one does, padding included, at every length
    /// around its vector and chunk sizes and at a camera frame's.
    #[test]
    fn image_payloads_are_standard_padded_base64() {
        let bytes: Vec<u8> = (0..41_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for len in (0..=200).chain([767, 768, 769, 1024, 3071, 41_000]) {
            let v: serde_json::Value = serde_json::from_str(&envelope(&record("image/jpeg"), &bytes[..len])).unwrap();
            let expected = base64::engine::general_purpose::STANDARD.encode(&bytes[..len]);
            assert_eq!(v["data_base64"].as_str(), Some(expected.as_str()), "{len} bytes");
        }
    }
}
