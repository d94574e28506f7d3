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

use super::context::{Context, Step};
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
    /// The fleet rollout the trial or committed version came with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// A fleet rollout as a board took it: its id, and the version it replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    /// What the rollout deployed.
    pub version: Version,
    pub before: Option<Version>,
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
    /// Also returns the versions so rolled back, with their rollouts, to report.
    pub fn start(&self) -> (Records, Vec<Interrupted>) {
        let _held = RECORD.lock().expect("record lock");
        let mut all = self.load();
        let mut crashed = Vec::new();
        for (name, r) in all.iter_mut() {
            if let Some(t) = r.trial.take() {
                tracing::warn!(function = %name, image = %t.image, digest = %t.digest, "rolled back: the daemon stopped while this version was on trial");
                r.rolled_back.insert(t.digest.clone());
                r.last = Some(format!("rolled_back: {INTERRUPTED}"));
                let rollout = r.rollout.as_ref().filter(|o| o.version == t).map(|o| o.id.clone());
                crashed.push(Interrupted { function: name.clone(), version: t, rollout, previous: r.previous.take() });
            }
        }
        if !crashed.is_empty()
            && let Err(e) = serde_json::to_vec_pretty(&all)
                .map_err(anyhow::Error::from)
                .and_then(|b| super::blobs::write_durably(&self.path, &b))
        {
            tracing::error!("cannot record the rollback: {e:#}");
        }
        (all, crashed)
    }
}

const INTERRUPTED: &str = "the daemon stopped during its trial";

/// A trial a stop or a crash ended: it counts as rolled back.
pub struct Interrupted {
    pub function: String,
    pub version: Version,
    pub rollout: Option<String>,
    pub previous: Option<Version>,
}

impl Interrupted {
    pub fn report(&self, ctx: &Context) {
        ctx.report(Step {
            function: &self.function,
            rollout: self.rollout.as_deref(),
            version: &self.version,
            outcome: "rolled_back",
            reason: Some(INTERRUPTED.into()),
            previous: self.previous.as_ref(),
        });
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

/// Where a version comes from, which decides what a digest rolled back here means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Origin<'a> {
    /// `edgefn deploy`: an operator asked for this version by name, so it is tried even if it
    /// was rolled back before.
    Explicit,
    /// A tag poll: a digest rolled back here is not tried again.
    Poll,
    /// A fleet rollout, by its id: as a poll, and the record keeps the rollout's id and the
    /// version before it, for a rollback the operator orders.
    Rollout(&'a str),
}

impl Origin<'_> {
    fn rollout(&self) -> Option<&str> {
        match self {
            Origin::Rollout(id) => Some(id),
            _ => None,
        }
    }
}

/// Pulls, verifies and compiles `image` for `name`, switches it in on trial, and leaves its
/// gate running. An error means nothing was switched.
/// The gate ends unjudged when the generation closes (and the next start counts the trial as
/// rolled back).
pub async fn deploy(ctx: &Arc<Context>, name: &str, image: &str, origin: Origin<'_>) -> anyhow::Result<Started> {
    let runtime = &ctx.runtime;
    anyhow::ensure!(
        runtime.is_versioned(name),
        "function {name} does not come from an image ([functions.{name}] image)"
    );
    let image = ImageRef::parse(image).map_err(anyhow::Error::msg)?;
    let board = Board::open(&ctx.cfg.runtime.state_dir);
    let rollout = origin.rollout();
    let unpulled = Version { image: image.to_string(), digest: image.digest().unwrap_or_default().to_string() };
    let refuse = |v: &Version, outcome: &str, why: String| -> anyhow::Result<()> {
        count(runtime, name, outcome);
        board.update(name, |r| r.last = Some(format!("{outcome}: {why}")))?;
        ctx.report(Step { function: name, rollout, version: v, outcome, reason: Some(why), previous: None });
        Ok(())
    };
    if origin != Origin::Explicit && !unpulled.digest.is_empty() {
        if board.read().get(name).is_some_and(|r| r.rolled_back.contains(&unpulled.digest)) {
            let why = "this digest was rolled back on this board; only `edgefn deploy` tries it again".to_string();
            refuse(&unpulled, "skipped", why.clone())?;
            anyhow::bail!("{image}: {why}");
        }
    }
    let pulled = match Images::new(&ctx.cfg)?.pull(&image).await {
        Ok(p) => p,
        Err(e) => {
            refuse(&unpulled, "refused", format!("{e:#}"))?;
            return Err(e);
        }
    };
    let version = Version { image: image.to_string(), digest: pulled.manifest.clone() };
    let current = runtime.get(name);
    if current.as_ref().is_some_and(|c| format!("sha256:{}", c.sha256) == module_digest(&pulled.module)) {
        return Ok(Started { function: name.into(), image: version.image, digest: version.digest, state: "serving" });
    }
    if origin != Origin::Explicit && board.read().get(name).is_some_and(|r| r.rolled_back.contains(&version.digest)) {
        let why = "this digest was rolled back on this board; only `edgefn deploy` tries it again".to_string();
        refuse(&version, "skipped", why.clone())?;
        anyhow::bail!("{image}: {why}");
    }
    let (rt, n, path) = (runtime.clone(), name.to_string(), pulled.module.clone());
    let new = match tokio::task::spawn_blocking(move || rt.load_version(&n, &path)).await? {
        Ok(f) => f,
        Err(e) => {
            refuse(&version, "failed_to_load", format!("{e:#}"))?;
            return Err(e.context(format!("{image} does not load")));
        }
    };
    // Recorded before the switch: a crash from here on counts against the new version.
    let configured = ctx.cfg.functions.get(name).and_then(|f| f.image.clone());
    let serving = serving_version(ctx, name);
    let previous = board.update(name, |r| {
        r.trial = Some(version.clone());
        r.configured = configured;
        r.previous = r.committed.clone().or(serving);
        if origin == Origin::Explicit {
            r.rolled_back.remove(&version.digest);
        }
        r.rollout =
            rollout.map(|id| Rollout { id: id.to_string(), version: version.clone(), before: r.previous.clone() });
        r.last = Some("on trial".into());
        r.previous.clone()
    })?;
    let old = runtime.switch(new.clone());
    tracing::info!(function = %name, image = %version.image, digest = %version.digest, previous = ?previous.as_ref().map(|p| &p.digest), rollout = ?rollout, "on trial");
    count(runtime, name, "started");
    let step = |outcome, reason| Step {
        function: name,
        rollout,
        version: &version,
        outcome,
        reason,
        previous: previous.as_ref(),
    };
    ctx.report(step("trial", None));
    let gate = Gate::from(&ctx.cfg);
    let (ctx, function, rollout) = (ctx.clone(), name.to_string(), rollout.map(str::to_string));
    let mut closing = ctx.closing.clone();
    let trial = version.clone();
    tokio::spawn(async move {
        let name = function;
        let started = Instant::now();
        let verdict = loop {
            // Each call's end wakes the gate; the tick covers gate_time with no calls.
            tokio::select! {
                _ = new.call_ended() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            if !ctx.runtime.get(&name).is_some_and(|f| Arc::ptr_eq(&f, &new)) {
                return; // replaced by another deploy, an ordered rollback, or a reload
            }
            if let Some(v) = gate.judge(&new, old.as_deref(), started.elapsed()) {
                break v;
            }
        };
        let (outcome, reason) = match &verdict {
            Ok(()) => ("committed", None),
            Err(why) => ("rolled_back", Some(why.clone())),
        };
        // Counted before the state shows it: whoever sees "committed" in /v1/status then finds
        // it counted in /metrics (fleet_channel.rs read the two between the steps, and failed).
        count(&ctx.runtime, &name, outcome);
        let recorded = match verdict {
            Ok(()) => {
                tracing::info!(function = %name, digest = %trial.digest, "committed: passed its gate");
                // A start or reload since ended this trial (and counted it as rolled back).
                board.update(&name, |r| {
                    if r.trial.as_ref() == Some(&trial) {
                        r.committed = r.trial.take();
                        r.previous = None;
                        r.last = Some("committed".into());
                    }
                })
            }
            Err(why) => {
                if let Some(old) = old {
                    ctx.runtime.switch(old);
                }
                tracing::warn!(function = %name, digest = %trial.digest, "rolled back: {why}");
                board.update(&name, |r| {
                    r.trial = None;
                    r.previous = None;
                    r.rolled_back.insert(trial.digest.clone());
                    r.last = Some(format!("rolled_back: {why}"));
                })
            }
        };
        if let Err(e) = recorded {
            tracing::error!(function = %name, "cannot record the rollout's outcome: {e:#}");
        }
        ctx.report(Step {
            function: &name,
            rollout: rollout.as_deref(),
            version: &trial,
            outcome,
            reason,
            previous: previous.as_ref(),
        });
    });
    Ok(Started { function: name.into(), image: version.image, digest: version.digest, state: "trial" })
}

/// Rollout `id` ordered back (by `edgefn fleet`, as its boards failed): a board that took
/// that rollout for `name` and still serves it goes back to the version it served before,
/// from the store, and the rollout's digest counts as rolled back here. Ok(None): this board
/// has nothing to undo.
pub async fn roll_back(ctx: &Arc<Context>, name: &str, id: &str) -> anyhow::Result<Option<Version>> {
    let board = Board::open(&ctx.cfg.runtime.state_dir);
    let record = board.read().remove(name).unwrap_or_default();
    let Some(Rollout { version: undone, before, .. }) = record.rollout.filter(|r| r.id == id) else { return Ok(None) };
    let serving = [&record.trial, &record.committed].into_iter().flatten().any(|v| v == &undone);
    if !serving || record.rolled_back.contains(&undone.digest) {
        return Ok(None);
    }
    let why = format!("ordered back with rollout {id}");
    let step = |outcome, reason| Step {
        function: name,
        rollout: Some(id),
        version: &undone,
        outcome,
        reason,
        previous: before.as_ref(),
    };
    if let Some(before) = &before {
        let image = ImageRef::parse(&before.image).map_err(anyhow::Error::msg)?.with_digest(&before.digest);
        let pulled = Images::new(&ctx.cfg)?.fetch(&image).await?;
        let (rt, n) = (ctx.runtime.clone(), name.to_string());
        let old = tokio::task::spawn_blocking(move || rt.load_version(&n, &pulled.module)).await??;
        ctx.runtime.switch(old);
    }
    count(&ctx.runtime, name, "rolled_back"); // before the state shows it, as above
    board.update(name, |r| {
        r.trial = None;
        r.previous = None;
        r.committed = before.clone();
        r.rolled_back.insert(undone.digest.clone());
        r.last = Some(format!("rolled_back: {why}"));
    })?;
    tracing::warn!(function = %name, digest = %undone.digest, back_to = ?before.as_ref().map(|b| &b.digest), "rolled back: {why}");
    ctx.report(step("rolled_back", Some(why)));
    Ok(before)
}

/// The version `name` serves from its configured image, when the board has committed none:
/// what a rollback from the first rollout goes back to.
fn serving_version(ctx: &Context, name: &str) -> Option<Version> {
    let image = ctx.cfg.functions.get(name)?.image.clone()?;
    let resolved = super::blobs::Blobs::open(&ctx.cfg.runtime.state_dir).resolved(&image)?;
    Some(Version { image, digest: resolved.manifest })
}

fn count(runtime: &Runtime, function: &str, outcome: &str) {
    runtime
        .metrics()
        .deployments
        .get_or_create(&crate::metrics::DeploymentLabel { function: function.into(), outcome: outcome.into() })
        .inc();
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
