//! `deployment` events: each step of a rollout on this board, as a CloudEvent for upstream.
//!
//! The fleet builds the event whole (structured mode, `application/cloudevents+json`) and
//! hands it to a [`Reporter`]; the server sends it through the outbox to the `[fleet] events`
//! sinks, so a board offline when its gate decided still reports it later. The fleet knows
//! nothing of sinks: imports point fleet → runtime only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The media type of a whole CloudEvent; sinks pass such a payload on as it is.
pub const CLOUDEVENT: &str = "application/cloudevents+json";

/// The CloudEvent `type` of a deployment step.
pub const TYPE: &str = "io.edgefn.deployment";

/// One step of a rollout on one board: the event's `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub board: String,
    pub labels: BTreeMap<String, String>,
    pub function: String,
    /// The fleet rollout this step belongs to; None for `edgefn deploy`, a tag poll or a start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    pub image: String,
    pub digest: String,
    /// `trial`, `committed`, `rolled_back`, `refused`, `failed_to_load` or `skipped`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The version the step replaced (or went back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// Where the fleet's events go; the server decides (the outbox, or nowhere).
pub type Reporter = Arc<dyn Fn(Deployment) + Send + Sync>;

/// A reporter that only logs (no `[fleet] events` sinks).
pub fn nowhere() -> Reporter {
    Arc::new(
        |d: Deployment| tracing::debug!(function = %d.function, outcome = %d.outcome, "deployment event (no [fleet] events sinks)"),
    )
}

impl Deployment {
    /// The whole CloudEvent, as JSON, and its id. The id is unique on the board: the wall
    /// clock's milliseconds and a counter, so a restart in the same millisecond still differs.
    pub fn cloudevent(&self) -> (String, String) {
        static N: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now();
        let ms = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}/deployment/{ms}-{n}", self.board);
        let event = serde_json::json!({
            "specversion": "1.0",
            "id": id,
            "source": format!("edgefn/{}", self.board),
            "type": TYPE,
            "subject": self.function,
            "time": humantime::format_rfc3339_millis(now).to_string(),
            "datacontenttype": "application/json",
            "data": self,
        });
        (id, event.to_string())
    }

    /// The data of a deployment CloudEvent; None for any other event.
    pub fn from_cloudevent(bytes: &[u8]) -> Option<Deployment> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        (v["type"] == TYPE).then(|| serde_json::from_value(v["data"].clone()).ok()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_board_and_labels_and_reads_back() {
        let d = Deployment {
            board: "b-1".into(),
            labels: [("site".to_string(), "depot-3".to_string())].into(),
            function: "grayscale".into(),
            rollout: Some("r1".into()),
            image: "oci://127.0.0.1:5000/fn/g@sha256:ab".into(),
            digest: "sha256:ab".into(),
            outcome: "committed".into(),
            reason: None,
            previous: None,
        };
        let (id, text) = d.cloudevent();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["id"], id);
        assert_eq!((v["source"].as_str(), v["type"].as_str()), (Some("edgefn/b-1"), Some(TYPE)));
        assert_eq!(v["data"]["labels"]["site"], "depot-3");
        assert_ne!(v["id"], d.cloudevent().0);
        assert_eq!(Deployment::from_cloudevent(text.as_bytes()), Some(d));
        assert_eq!(Deployment::from_cloudevent(br#"{"type":"io.edgefn.result","data":{}}"#), None);
    }
}
