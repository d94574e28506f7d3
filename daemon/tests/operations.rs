//! What an operator installs beside the daemon: the Grafana dashboard and the Prometheus alert
//! rules under `packaging/`. Every metric they name must be one `/metrics` exports (a renamed
//! metric would leave a panel empty and an alert silent), and the rules must pass promtool's
//! check and its unit tests (`edgefn-alerts.test.yml`).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::{Daemon, asset};

fn packaging(path: &str) -> PathBuf {
    common::repo().join("packaging").join(path)
}

/// Every `edgefn_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("edgefn_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The series names `/metrics` exports: each family's samples, by its type's suffixes.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next() {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_the_alert_rules_use_is_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    // A model too, for the inference panel.
    let model = common::assets_dir().join("efficientnet_lite0.tflite");
    let d = Daemon::start_env(
        &tmp.path().join("d"),
        &format!(
            "[models.efficientnet-lite0]\npath = {model:?}\n\n[[pipeline]]\nname = \"gray\"\nfunctions = [\"grayscale\"]\n\
             sinks = [{{ file = {{ path = {results:?} }} }}]\n"
        ),
        &[("EDGEFN__RUNTIME__LITERT", common::litert_lib().display().to_string())],
    );
    assert_eq!(d.post("/v1/pipelines/gray?camera=front", &asset("chelsea.png")).status, 200);
    let metrics = String::from_utf8(d.get("/metrics").body).unwrap();
    let exported = exported(&metrics);
    for file in ["grafana/edgefn-dashboard.json", "prometheus/edgefn-alerts.yml", "prometheus/edgefn-alerts.test.yml"] {
        let text = std::fs::read_to_string(packaging(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 5, "{file} names only {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(missing.is_empty(), "{file} uses metrics /metrics does not export: {missing:?}\n{metrics}");
    }
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_in_every_panel() {
    let text = std::fs::read_to_string(packaging("grafana/edgefn-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {p}"));
        assert!(targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| e.contains("edgefn_"))), "{p}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "every panel follows the dashboard's data source");
    }
}

#[test]
fn promtool_checks_the_alert_rules_and_runs_their_unit_tests() {
    let dir = packaging("prometheus");
    for args in [&["check", "rules", "edgefn-alerts.yml"][..], &["test", "rules", "edgefn-alerts.test.yml"][..]] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian's prometheus package; scripts/setup.sh installs it)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}
