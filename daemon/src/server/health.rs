//! The health loop: the watchdog ping and `STATUS=`, for the daemon's whole life.
//!
//! It outlives generations. A reload swaps the generation it watches ([`Health::watch`]) and
//! it keeps pinging through the swap, so a reload that takes longer than `WatchdogSec=` (a
//! slow compile, a sidecar that does not answer, a flush that waits out its grace) is not a
//! kill.
//!
//! The ping is withheld only when a camera worker is wedged: one attempt at a frame running
//! past what its chain's deadlines allow (see [`crate::pipeline::progress`]). A worker that
//! retries a passing failure (a full disk, a missing model) is degraded: `STATUS=` and
//! `/healthz` name the cause, and the pings go on, because a restart fixes neither.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ingress::http::Api;
use crate::ingress::status::Snapshot;
use crate::systemd;

pub struct Health {
    current: watch::Sender<Arc<Api>>,
    /// What the daemon is doing besides serving (a reload), shown first in `STATUS=`.
    phase: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl Health {
    /// Starts watching `api`; pings only if systemd asked for a watchdog.
    pub fn start(api: Arc<Api>) -> Health {
        let (interval, watchdog) = systemd::health_interval();
        let (current, rx) = watch::channel(api);
        let phase = Arc::new(Mutex::new(None));
        let task = tokio::spawn(run(rx, phase.clone(), interval, watchdog));
        Health { current, phase, task }
    }

    /// From now on, watch this generation.
    pub fn watch(&self, api: Arc<Api>) {
        self.current.send_replace(api);
    }

    /// Shown in `STATUS=` until cleared with `None`.
    pub fn phase(&self, what: Option<&str>) {
        *self.phase.lock().expect("phase lock") = what.map(str::to_string);
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn run(
    current: watch::Receiver<Arc<Api>>,
    phase: Arc<Mutex<Option<String>>>,
    interval: Duration,
    watchdog: bool,
) {
    let mut ticks = tokio::time::interval(interval);
    let stall = systemd::stall_requested();
    tokio::pin!(stall);
    let mut degraded: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut stall => std::future::pending::<()>().await,
        }
        let api = current.borrow().clone();
        let wedged = api.pipelines.as_ref().and_then(|p| p.progress().wedged());
        let now_degraded = api.pipelines.as_ref().map(|p| p.progress().degraded()).unwrap_or_default();
        if now_degraded != degraded {
            match now_degraded.is_empty() {
                true => tracing::info!("no longer degraded: every camera worker makes progress"),
                false => tracing::warn!("degraded, still pinging the watchdog: {}", now_degraded.join("; ")),
            }
            degraded = now_degraded;
        }
        api.runtime.metrics().wedged.set(wedged.is_some() as i64);
        if let Some(w) = wedged {
            tracing::error!(
                pipeline = %w.pipeline, camera = %w.camera,
                "a frame has been in its pipeline for {:?}, past the {:?} its functions' deadlines allow: withholding the watchdog ping",
                w.running, w.limit
            );
            systemd::status(&format!("wedged: pipeline {} camera {} stuck for {:?}", w.pipeline, w.camera, w.running));
            continue;
        }
        if watchdog {
            systemd::watchdog_ping();
        }
        let line = Snapshot::take(&api).line();
        match phase.lock().expect("phase lock").as_deref() {
            Some(p) => systemd::status(&format!("{p}; {line}")),
            None => systemd::status(&line),
        }
    }
}
