//! One view of the daemon's state, taken in one place and read by everything that reports it:
//! `/healthz`, `/v1/status` (and the page's event stream), `/metrics`, and the health loop's
//! `STATUS=` line. They used to count the same things four ways, and disagreed on what a
//! problem was.
//!
//! Taking it costs the same with a backlog: the outbox's counts come from its in-memory view,
//! plus one indexed read per sink for the oldest age.

use serde_json::{Value, json};

use super::http::Api;
use crate::metrics::SinkLabel;
use crate::sinks::Kind;

/// One sink's queue in the outbox.
pub struct SinkDepth {
    pub sink: String,
    pub depth: u64,
    pub oldest_age_s: f64,
    /// False for a sink no longer in the config whose results still wait (until `max_age`).
    pub configured: bool,
}

pub struct Snapshot {
    /// Why the daemon is degraded; empty when it is not.
    pub problems: Vec<String>,
    pub functions: usize,
    pub functions_failed: usize,
    /// Each function that did not load, and why.
    pub failed: Value,
    pub models: usize,
    pub models_failed: usize,
    pub pipelines: usize,
    /// Whether this generation has pipelines (and so an outbox) at all.
    pub has_outbox: bool,
    pub queued_frames: usize,
    pub pending: u64,
    pub dead: u64,
    pub outbox_error: Option<String>,
    pub sinks: Vec<SinkDepth>,
    pub mqtt_connected: bool,
    pub dapr_configured: bool,
    pub dapr_reachable: bool,
}

impl Snapshot {
    pub fn take(api: &Api) -> Snapshot {
        let rt = &api.runtime;
        let metrics = rt.metrics();
        let models = rt.models();
        let mut problems: Vec<String> = api.daemon_problems.lock().expect("problems lock").clone();
        problems.extend(rt.failed().keys().map(|f| format!("function {f} not loaded")));
        problems.extend(models.failed().keys().map(|m| format!("model {m} not loaded")));
        let mut snap = Snapshot {
            problems,
            functions: rt.functions().len(),
            functions_failed: rt.failed().len(),
            failed: json!(rt.failed()),
            models: models.loaded().count(),
            models_failed: models.failed().len(),
            pipelines: 0,
            has_outbox: false,
            queued_frames: 0,
            pending: 0,
            dead: 0,
            outbox_error: None,
            sinks: Vec::new(),
            mqtt_connected: metrics.mqtt_connected.get() == 1,
            dapr_configured: false,
            dapr_reachable: metrics.dapr_reachable.get() == 1,
        };
        let Some(ps) = &api.pipelines else { return snap };
        let ob = ps.outbox();
        snap.pipelines = ps.iter().count();
        snap.has_outbox = true;
        snap.queued_frames = ps.queued();
        snap.pending = ob.total();
        snap.dead = ob.dead_count();
        snap.outbox_error = ob.error();
        if let Some(e) = &snap.outbox_error {
            snap.problems.push(format!("outbox: {e}"));
        }
        // Workers retrying a failure that passes: degraded, named, and not a restart.
        snap.problems.extend(ps.progress().degraded());
        snap.dapr_configured = ps.iter().flat_map(|p| &p.sinks).any(|s| matches!(s.kind, Kind::Dapr(_)));
        let mut configured: Vec<String> = ps.iter().flat_map(|p| p.sinks.iter().map(|s| s.key.to_string())).collect();
        configured.sort();
        configured.dedup();
        let stale: Vec<String> = ob.sinks_with_pending().into_iter().filter(|s| !configured.contains(s)).collect();
        for (sink, is_configured) in
            configured.into_iter().map(|s| (s, true)).chain(stale.into_iter().map(|s| (s, false)))
        {
            let (depth, oldest_age_s) = ob.depth(&sink).unwrap_or((0, 0.0));
            snap.sinks.push(SinkDepth { sink, depth, oldest_age_s, configured: is_configured });
        }
        snap
    }

    pub fn oldest_age_s(&self) -> f64 {
        self.sinks.iter().map(|s| s.oldest_age_s).fold(0.0, f64::max)
    }

    /// `/healthz`.
    pub fn health(&self) -> Value {
        json!({
            "status": if self.problems.is_empty() { "ok" } else { "degraded" },
            "problems": self.problems,
            "functions": self.functions,
            "failed": self.failed,
            "pipelines": self.pipelines,
            "queued_frames": self.queued_frames,
            "outbox": self.has_outbox.then(|| json!({ "pending": self.pending, "error": self.outbox_error })),
            "mqtt_connected": self.mqtt_connected,
            "dapr_reachable": self.dapr_reachable,
        })
    }

    /// The outbox part of `/v1/status`: the sinks in the config.
    pub fn outbox(&self) -> Value {
        let sinks: Vec<Value> = self
            .sinks
            .iter()
            .filter(|s| s.configured)
            .map(|s| json!({ "sink": s.sink, "depth": s.depth, "oldest_age_s": s.oldest_age_s }))
            .collect();
        json!({ "pending": self.pending, "oldest_age_s": self.oldest_age_s(), "dead": self.dead, "sinks": sinks })
    }

    /// Sets the outbox gauges of `/metrics`, for every sink that has or had results.
    pub fn set_gauges(&self, metrics: &crate::metrics::Metrics) {
        for s in &self.sinks {
            let label = SinkLabel { sink: s.sink.clone() };
            metrics.outbox_depth.get_or_create(&label).set(s.depth as i64);
            metrics.outbox_oldest_age.get_or_create(&label).set(s.oldest_age_s);
        }
    }

    /// The `STATUS=` line systemd shows.
    pub fn line(&self) -> String {
        let mut line: String = self.problems.iter().map(|p| format!("{p}; ")).collect();
        line += &format!("{} functions", self.functions);
        if self.functions_failed > 0 {
            line += &format!(" ({} failed)", self.functions_failed);
        }
        if self.models + self.models_failed > 0 {
            line += &format!(", {} models", self.models);
            if self.models_failed > 0 {
                line += &format!(" ({} failed)", self.models_failed);
            }
        }
        if self.has_outbox {
            line += &format!(
                ", {} pipelines, outbox {} pending, broker {}",
                self.pipelines,
                self.pending,
                if self.mqtt_connected { "connected" } else { "offline" }
            );
        }
        line
    }
}
