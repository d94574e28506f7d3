//! `edgefn run`: builds every component from the config, serves, reloads, and shuts down in order.
//!
//! The components built from one config form a [`generation::Generation`] (how one starts and
//! stops in order is there). The [`health`] loop lives beside the generations, for the whole
//! run: it watches whichever one serves, and pings the watchdog through a reload.
//!
//! SIGHUP reads the config again and prepares a new generation while the old one serves. Only
//! when that worked does the switch happen: the old one stops intake and hands the listening
//! socket straight to the new one, which serves HTTP at once; the old one then drains (bounded
//! by its grace period), and the new one's delivery workers and MQTT ingress start after it.
//! An invalid config is refused; a valid one that cannot apply (a port taken, a TLS file
//! unreadable, a panic while preparing) is reported in the log, `STATUS=` and `/healthz`, and
//! the old generation keeps serving. SIGTERM and SIGINT stop the daemon.

mod generation;
mod health;

use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use self::generation::{Shared, prepare};
use self::health::Health;
use crate::config::{self, Config};
use crate::systemd;

/// Where `edgefn run` reads its config, again on SIGHUP.
pub struct ConfigSource {
    pub path: PathBuf,
    pub required: bool,
}

impl ConfigSource {
    pub fn load(&self) -> anyhow::Result<Config> {
        Config::load(&self.path, self.required)
    }
}

pub async fn run(source: ConfigSource, mut cfg: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let listener = bind(&cfg).await?;
    let shared = Shared::default();
    let mut generation = prepare(&cfg, &shared, None).await?.serve(listener);
    generation.start_workers();
    let health = Health::start(generation.api.clone());
    let idle = tokio::spawn(crate::memory::release_when_idle());

    loop {
        crate::memory::release_code();
        systemd::ready(&generation.status_line());
        let reload = loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break None; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break None; }
                _ = hup.recv() => {
                    systemd::reloading();
                    match source.load() {
                        Ok(new) => break Some(new),
                        Err(e) => {
                            tracing::error!("reload refused, keeping the running config: {e:#}");
                            systemd::ready(&format!("reload refused: {e:#}"));
                        }
                    }
                }
            }
        };
        let Some(new) = reload else {
            systemd::stopping();
            health.phase(Some("stopping: flushing the outbox"));
            generation.stop().await;
            health.stop();
            idle.abort();
            tracing::info!("edgefn stopped");
            return Ok(());
        };
        tracing::info!("SIGHUP: reloading configuration");
        health.phase(Some("reloading configuration"));
        // Everything that can fail happens while the running generation still serves.
        let prepared = async {
            let listener = if new.server.listen != cfg.server.listen { Some(bind(&new).await?) } else { None };
            prepare(&new, &shared, listener).await
        };
        match prepared.await {
            Ok(prepared) => {
                shared.problems.lock().expect("problems lock").clear();
                let listener = generation.close_intake().await;
                let next = prepared.serve(listener);
                // Watched until drained: a frame in hand that never finishes is a wedge.
                std::mem::replace(&mut generation, next).drain().await;
                generation.start_workers();
                health.watch(generation.api.clone());
                cfg = new;
            }
            Err(e) => {
                let problem = format!("reload failed, still running the previous config: {e:#}");
                tracing::error!("{problem}");
                *shared.problems.lock().expect("problems lock") = vec![problem];
            }
        }
        health.phase(None);
    }
}

async fn bind(cfg: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(cfg.server.listen).await.with_context(|| format!("binding {}", cfg.server.listen))
}

/// The default config path, used when `--config` is not given.
pub fn default_source(path: Option<PathBuf>) -> ConfigSource {
    match path {
        Some(path) => ConfigSource { path, required: true },
        None => ConfigSource { path: config::DEFAULT_PATH.into(), required: false },
    }
}
