//! A new version of a function from a registry: pulled, verified and compiled, switched in
//! on trial, and committed or rolled back by its gate.
//!
//! The previous version stays loaded until the gate decides: the new one's first
//! `gate_calls` calls (or `gate_time`, whichever comes first) must keep their faults (trap,
//! deadline, memory, output) under `gate_max_faults`, and their p99 under `gate_p99_ratio` ×
//! the previous version's. A failed gate switches the previous version back. Calls in flight
//! finish on the version they started on; new calls go to whichever serves, so no frame is
//! lost or run twice.
//!
//! The board's record (`state_dir/fleet/rollouts.json`) says which version each function last
//! committed, which one is on trial, and which digests were rolled back. A start takes the
//! committed version; a version still on trial at a start had the daemon die under it, and
//! counts as rolled back, as Mender treats an uncommitted update.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::images::Images;
use super::reference::ImageRef;
use crate::config::Config;
use crate::runtime::{Function, Runtime};

/// One version, by the reference it was deployed as and its manifest digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub image: String,
    pub digest: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub committed: Option<Version>,
    pub trial: Option<Version>,
    /// The version the trial replaced, shown while it is on trial.
    pub previous: Option<Version>,
    pub rolled_back: BTreeSet<String>,
    /// The last rollout's outcome, for `/v1/functions`.
    pub last: Option<String>,
    /// The config's `image` when the version was deployed: a config that names another
    /// image since wins over the committed version.
    pub configured: Option<String>,
}

pub type Records = BTreeMap<String, Record>;

/// The board's record of rollouts, one file for every generation of the daemon.
pub struct Board {
    path: PathBuf,
}

/// Whoever reads or writes the record holds this: a reload's generation and the one it
/// replaces share the file.
static RECORD: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Board {
    pub fn open(state_dir: &Path) -> Board {
        Board { path: state_dir.join("fleet/rollouts.json") }
    }

    pub fn read(&self) -> Records {
        let _held = RECORD.lock().expect("record lock");
        self.load()
    }

    fn load(&self) -> Records {
        std::fs::read(&self.path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Changes `name`'s record durably.
    pub fn update<R>(&self, name: &str, change: impl FnOnce(&mut Record) -> R) -> anyhow::Result<R> {
        let _held = RECORD.lock().expect("record lock");
        let mut all = self.load();
        let out = change(all.entry(name.to_string()).or_default());
        super::blobs::write_durably(&self.path, &serde_json::to_vec_pretty(&all)?)?;
        Ok(out)
    }

    /// The record as it is, for `edgefn invoke` beside a running daemon.
    pub fn committed(&self) -> Records {
        self.read()
    }

    /// At a start or a reload: a version still on trial had the daemon die or reload under
    /// it; it counts against that version. Returns what each function should start on.
    pub fn start(&self) -> Records {
        let _held = RECORD.lock().expect("record lock");
        let mut all = self.load();
        let mut crashed = false;
        for (name, r) in all.iter_mut() {
            if let Some(t) = r.trial.take() {
                tracing::warn!(function = %name, image = %t.image, digest = %t.digest, "rolled back: the daemon stopped while this version was on trial");
                r.rolled_back.insert(t.digest);
                r.previous = None;
                r.last = Some("rolled_back: the daemon stopped during its trial".into());
                crashed = true;
            }
        }
        if crashed
            && let Err(e) = serde_json::to_vec_pretty(&all)
                .map_err(anyhow::Error::from)
                .and_then(|b| super::blobs::write_durably(&self.path, &b))
        {
            tracing::error!("cannot record the rollback: {e:#}");
        }
        all
    }
}

/// The gate a version on trial must pass.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub calls: u64,
    pub time: Duration,
    pub min_calls: u64,
    pub max_faults: f64,
    pub p99_ratio: f64,
}

impl Gate {
    pub fn from(cfg: &Config) -> Gate {
        let f = &cfg.fleet;
        Gate {
            calls: f.gate_calls,
            time: f.gate_time,
            min_calls: f.gate_min_calls,
            max_faults: f.gate_max_faults,
            p99_ratio: f.gate_p99_ratio,
        }
    }

    /// Some(Ok) to commit, Some(Err(why)) to roll back, None to wait.
    fn judge(&self, new: &Function, old: Option<&Function>, elapsed: Duration) -> Option<Result<(), String>> {
        let (calls, faults) = new.calls_and_faults();
        if calls >= self.min_calls {
            let share = faults as f64 / calls as f64;
            if share > self.max_faults {
                return Some(Err(format!(
                    "{faults} of its first {calls} calls failed (over {:.0} %)",
                    self.max_faults * 100.0
                )));
            }
            if let Some(old) = old.filter(|o| o.calls_and_faults().0 >= self.min_calls) {
                let (p99_new, p99_old) = (new.percentiles().1, old.percentiles().1);
                if p99_old > 0.0 && p99_new > self.p99_ratio * p99_old {
                    return Some(Err(format!(
                        "its p99 is {p99_new:.1} ms, over {} × the previous version's {p99_old:.1} ms",
                        self.p99_ratio
                    )));
                }
            }
        }
        (calls >= self.calls || elapsed >= self.time).then_some(Ok(()))
    }
}

/// What a deploy did before its gate.
#[derive(Debug, Serialize)]
pub struct Started {
    pub function: String,
    pub image: String,
    pub digest: String,
    pub state: &'static str,
}

/// Pulls, verifies and compiles `image` for `name`, switches it in on trial, and leaves its
/// gate running. An error means nothing was switched.
/// The gate ends unjudged when `closing` turns true: a reload or a stop ended the generation
/// (and the next start counts the trial as rolled back).
pub async fn deploy(
    cfg: &Config,
    runtime: Arc<Runtime>,
    name: &str,
    image: &str,
    mut closing: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Started> {
    anyhow::ensure!(
        runtime.is_versioned(name),
        "function {name} does not come from an image ([functions.{name}] image)"
    );
    let image = ImageRef::parse(image).map_err(anyhow::Error::msg)?;
    let board = Board::open(&cfg.runtime.state_dir);
    let metrics = runtime.metrics().clone();
    let outcome = |o: &str| {
        metrics
            .deployments
            .get_or_create(&crate::metrics::DeploymentLabel { function: name.into(), outcome: o.to_string() })
            .inc()
    };
    let pulled = match Images::new(cfg)?.pull(&image).await {
        Ok(p) => p,
        Err(e) => {
            outcome("refused");
            board.update(name, |r| r.last = Some(format!("refused: {e:#}")))?;
            return Err(e);
        }
    };
    let version = Version { image: image.to_string(), digest: pulled.manifest.clone() };
    let current = runtime.get(name);
    if current.as_ref().is_some_and(|c| format!("sha256:{}", c.sha256) == module_digest(&pulled.module)) {
        return Ok(Started { function: name.into(), image: version.image, digest: version.digest, state: "serving" });
    }
    let (rt, n, path) = (runtime.clone(), name.to_string(), pulled.module.clone());
    let new = match tokio::task::spawn_blocking(move || rt.load_version(&n, &path)).await? {
        Ok(f) => f,
        Err(e) => {
            outcome("failed_to_load");
            board.update(name, |r| r.last = Some(format!("failed to load: {e:#}")))?;
            return Err(e.context(format!("{image} does not load")));
        }
    };
    // Recorded before the switch: a crash from here on counts against the new version.
    let configured = cfg.functions.get(name).and_then(|f| f.image.clone());
    let previous = board.update(name, |r| {
        r.trial = Some(version.clone());
        r.configured = configured;
        r.previous = r.committed.clone();
        r.rolled_back.remove(&version.digest);
        r.last = Some("on trial".into());
        r.previous.clone()
    })?;
    let old = runtime.switch(new.clone());
    tracing::info!(function = %name, image = %version.image, digest = %version.digest, previous = ?previous.as_ref().map(|p| &p.digest), "on trial");
    outcome("started");
    let gate = Gate::from(cfg);
    let (name_owned, version_owned) = (name.to_string(), version.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        let verdict = loop {
            // Each call's end wakes the gate; the tick covers gate_time with no calls.
            tokio::select! {
                _ = new.call_ended() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            if !runtime.get(&name_owned).is_some_and(|f| Arc::ptr_eq(&f, &new)) {
                return; // replaced by another deploy, or by a reload
            }
            if let Some(v) = gate.judge(&new, old.as_deref(), started.elapsed()) {
                break v;
            }
        };
        let metrics = runtime.metrics().clone();
        let count = |o: &str| {
            metrics
                .deployments
                .get_or_create(&crate::metrics::DeploymentLabel {
                    function: name_owned.clone(),
                    outcome: o.to_string(),
                })
                .inc()
        };
        let recorded = match verdict {
            Ok(()) => {
                count("committed");
                tracing::info!(function = %name_owned, digest = %version_owned.digest, "committed: passed its gate");
                // A start or reload since ended this trial (and counted it as rolled back).
                board.update(&name_owned, |r| {
                    if r.trial.as_ref() == Some(&version_owned) {
                        r.committed = r.trial.take();
                        r.previous = None;
                        r.last = Some("committed".into());
                    }
                })
            }
            Err(why) => {
                if let Some(old) = old {
                    runtime.switch(old);
                }
                count("rolled_back");
                tracing::warn!(function = %name_owned, digest = %version_owned.digest, "rolled back: {why}");
                board.update(&name_owned, |r| {
                    r.trial = None;
                    r.previous = None;
                    r.rolled_back.insert(version_owned.digest.clone());
                    r.last = Some(format!("rolled_back: {why}"));
                })
            }
        };
        if let Err(e) = recorded {
            tracing::error!(function = %name_owned, "cannot record the rollout's outcome: {e:#}");
        }
    });
    Ok(Started { function: name.into(), image: version.image, digest: version.digest, state: "trial" })
}

fn module_digest(path: &Path) -> String {
    // The store names a module file by its digest.
    format!("sha256:{}", path.file_name().and_then(|n| n.to_str()).unwrap_or_default())
}

/// The version `name` should start on: its committed one, while the config still names the
/// image it was deployed under; else the configured reference.
pub fn start_reference(records: &Records, name: &str, configured: &str) -> Result<ImageRef, String> {
    let image = ImageRef::parse(configured)?;
    Ok(match records.get(name) {
        Some(Record { committed: Some(v), configured: Some(c), .. }) if c == configured => {
            ImageRef::parse(&v.image).map(|r| r.with_digest(&v.digest)).unwrap_or(image)
        }
        _ => image,
    })
}
