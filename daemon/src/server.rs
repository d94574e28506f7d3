//! `edgefn run`: builds every component from the config, serves, reloads, and shuts down in order.
//!
//! The components built from one config form a [`Generation`]. Start: functions load
//! (compiling only what the AOT cache lacks), the outbox opens, sinks and their delivery workers
//! start, pipelines and MQTT ingress start, then HTTP serves on the already-bound listener, and
//! systemd hears READY=1.
//!
//! Stopping a generation, in this order so no accepted result is lost:
//! 1. stop intake: HTTP stops accepting, MQTT stops taking frames (later ones stay
//!    unacknowledged for the broker to redeliver);
//! 2. pipelines finish the frames in hand and commit their results; queued frames go back to
//!    the broker unacknowledged;
//! 3. delivery workers flush what they can within the grace period; the rest stays on disk;
//! 4. the broker connection closes.
//!
//! SIGHUP reads the config again. If it is valid, the running generation stops as above and a
//! new one starts on the same listening socket; if not, the old one keeps running and the error
//! is logged. SIGTERM and SIGINT stop the daemon.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{self, Config, SinkConfig};
use crate::ingress::http::{self, Api};
use crate::ingress::mqtt::{Ingress, Route};
use crate::metrics::Metrics;
use crate::pipeline::Pipelines;
use crate::runtime::Runtime;
use crate::sinks::dapr::DaprClient;
use crate::sinks::outbox::Outbox;
use crate::sinks::{Kind, Sink, delivery};
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
    let mut listener = bind(&cfg).await?;
    let (interval, watchdog) = systemd::health_interval();

    loop {
        let generation = Generation::start(&cfg, listener).await?;
        systemd::ready(&generation.status_line());
        let health = tokio::spawn(health_loop(generation.api.clone(), interval, watchdog, cfg.limits.deadline));
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
        health.abort();
        match reload {
            None => {
                systemd::stopping();
                generation.stop().await;
                tracing::info!("edgefn stopped");
                return Ok(());
            }
            Some(new) => {
                tracing::info!("SIGHUP: reloading configuration");
                listener = generation.stop().await;
                if new.server.listen != cfg.server.listen {
                    listener = bind(&new).await?;
                }
                cfg = new;
            }
        }
    }
}

async fn bind(cfg: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(cfg.server.listen).await.with_context(|| format!("binding {}", cfg.server.listen))
}

/// Pings the watchdog while the daemon makes progress, and keeps STATUS= current.
///
/// Wedged means: frames wait in camera queues, yet no camera worker has settled one for
/// longer than a function could possibly run. Then the pings stop and systemd restarts us.
async fn health_loop(api: Arc<Api>, interval: Duration, watchdog: bool, deadline: Duration) {
    let stall_limit = deadline * 2 + Duration::from_secs(10);
    let mut last = (0u64, Instant::now());
    let mut ticks = tokio::time::interval(interval);
    let stall = systemd::stall_requested();
    tokio::pin!(stall);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut stall => std::future::pending::<()>().await,
        }
        let wedged = api.pipelines.as_ref().is_some_and(|p| {
            let settled = p.settled();
            if settled != last.0 || p.queued() == 0 {
                last = (settled, Instant::now());
            }
            last.1.elapsed() > stall_limit
        });
        if wedged {
            tracing::error!(
                "pipelines made no progress for {stall_limit:?} with frames waiting: withholding the watchdog ping"
            );
            systemd::status("wedged: no pipeline progress");
            continue;
        }
        if watchdog {
            systemd::watchdog_ping();
        }
        systemd::status(&status_line(&api));
    }
}

fn status_line(api: &Api) -> String {
    let rt = &api.runtime;
    let mut line = format!("{} functions", rt.functions().count());
    if !rt.failed().is_empty() {
        line += &format!(" ({} failed)", rt.failed().len());
    }
    let models = rt.models();
    if models.loaded().count() + models.failed().len() > 0 {
        line += &format!(", {} models", models.loaded().count());
        if !models.failed().is_empty() {
            line += &format!(" ({} failed)", models.failed().len());
        }
    }
    if let Some(p) = &api.pipelines {
        let m = rt.metrics();
        line += &format!(
            ", {} pipelines, outbox {} pending, broker {}",
            p.iter().count(),
            p.outbox().total().unwrap_or(0),
            if m.mqtt_connected.get() == 1 { "connected" } else { "offline" }
        );
    }
    line
}

/// Everything built from one config.
struct Generation {
    api: Arc<Api>,
    stop_intake: watch::Sender<bool>,
    stop_delivery: watch::Sender<bool>,
    stop_connection: watch::Sender<bool>,
    http: JoinHandle<TcpListener>,
    deliveries: tokio::task::JoinSet<()>,
    ingress: Option<JoinHandle<()>>,
}

impl Generation {
    async fn start(cfg: &Config, listener: TcpListener) -> anyhow::Result<Generation> {
        let metrics = Arc::new(Metrics::new());
        let runtime = {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            // Compiling is CPU work; keep it off the async workers.
            Arc::new(tokio::task::spawn_blocking(move || Runtime::load(&cfg, metrics, None)).await??)
        };

        let (stop_intake, intake_rx) = watch::channel(false);
        let (stop_delivery, delivery_rx) = watch::channel(false);
        let (stop_connection, connection_rx) = watch::channel(false);
        let mut deliveries = tokio::task::JoinSet::new();
        let mut ingress = None;

        let pipelines = if cfg.pipelines.is_empty() {
            None
        } else {
            let outbox = Outbox::open(&cfg.runtime.state_dir.join("outbox.redb"), &cfg.outbox, metrics.clone())?;
            let dapr = Arc::new(DaprClient::new(&cfg.dapr.url, metrics.clone())?);
            let max_frame = cfg.mqtt.as_ref().map_or(0, |m| m.max_frame.as_u64() as usize);
            let mqtt = match &cfg.mqtt {
                // Room above max_frame, so an oversized frame is received and refused, not a
                // protocol error that would redeliver it forever.
                Some(m) => Some(crate::mqtt::connect(m, "", (max_frame * 4).max(16 << 20))?),
                None => None,
            };

            let mut sinks: BTreeMap<Arc<str>, Arc<Sink>> = BTreeMap::new();
            for sc in cfg.pipelines.iter().flat_map(|p| &p.sinks) {
                let sink = Sink::new(sc, &dapr, mqtt.as_ref().map(|(c, _)| c))?;
                sinks.entry(sink.key.clone()).or_insert_with(|| Arc::new(sink));
            }
            for stale in outbox.sinks_with_pending()? {
                if !sinks.contains_key(stale.as_str()) {
                    tracing::warn!(sink = %stale, "results wait for a sink that is no longer configured");
                }
            }
            if sinks.values().any(|s| matches!(s.kind, Kind::Dapr(_))) {
                check_sidecar(cfg, &dapr).await;
            }
            for sink in sinks.values() {
                let (sink, outbox, metrics) = (sink.clone(), outbox.clone(), metrics.clone());
                deliveries.spawn(delivery::run(sink, outbox, metrics, delivery_rx.clone(), cfg.server.shutdown_grace));
            }
            let resolve = |sc: &SinkConfig| sinks[&crate::sinks::key(sc)].clone();
            let pipelines = Pipelines::new(&cfg.pipelines, resolve, runtime.clone(), outbox, metrics.clone());

            if let Some((client, conn)) = mqtt {
                let routes: Vec<Route> = pipelines
                    .iter()
                    .filter_map(|p| p.source.mqtt.clone().map(|filter| Route { filter, pipeline: p.clone() }))
                    .collect();
                let i = Ingress { client, routes, pipelines: pipelines.clone(), metrics: metrics.clone(), max_frame };
                ingress = Some(tokio::spawn(i.run(conn, intake_rx.clone(), connection_rx)));
            }
            Some(pipelines)
        };

        let api = Arc::new(Api {
            runtime: runtime.clone(),
            pipelines,
            max_body: cfg.server.max_body.as_u64() as usize,
            app_token: std::env::var("APP_API_TOKEN").ok().filter(|t| !t.is_empty()),
            token: cfg.server.token.clone().filter(|t| !t.is_empty()),
        });
        if api.token.is_none() && !cfg.server.listen.ip().is_loopback() {
            tracing::warn!(listen = %cfg.server.listen, "listening beyond loopback without server.token: anyone on the network can use the API");
        }
        tracing::info!(
            listen = %listener.local_addr()?,
            functions = runtime.functions().count(),
            failed = runtime.failed().len(),
            models = runtime.models().loaded().count(),
            pipelines = cfg.pipelines.len(),
            version = env!("CARGO_PKG_VERSION"),
            "edgefn ready"
        );
        let mut intake_closed = intake_rx.clone();
        let closed = async move {
            let _ = intake_closed.changed().await;
        };
        let http = tokio::spawn(http::serve(listener, api.clone(), closed, cfg.server.shutdown_grace));
        Ok(Generation { api, stop_intake, stop_delivery, stop_connection, http, deliveries, ingress })
    }

    fn status_line(&self) -> String {
        status_line(&self.api)
    }

    /// Stops in the documented order and hands back the listening socket.
    async fn stop(mut self) -> TcpListener {
        let _ = self.stop_intake.send(true);
        let listener = self.http.await.expect("the HTTP task does not panic");
        if let Some(p) = &self.api.pipelines {
            p.shutdown().await;
        }
        let _ = self.stop_delivery.send(true);
        while self.deliveries.join_next().await.is_some() {}
        let _ = self.stop_connection.send(true);
        if let Some(t) = self.ingress.take() {
            let _ = t.await;
        }
        if let Some(p) = &self.api.pipelines {
            tracing::info!(undelivered = p.outbox().total().unwrap_or(0), "pipelines stopped");
        }
        listener
    }
}

/// Waits (bounded) for the sidecar's components, then checks the configured pub/subs exist.
async fn check_sidecar(cfg: &Config, dapr: &DaprClient) {
    if !dapr.wait_outbound(cfg.dapr.startup_wait).await {
        tracing::warn!(
            sidecar = dapr.base(),
            "Dapr sidecar not ready after {:?}; results wait in the outbox until it is",
            cfg.dapr.startup_wait
        );
        return;
    }
    let wanted: Vec<&str> = cfg
        .pipelines
        .iter()
        .flat_map(|p| &p.sinks)
        .filter_map(|s| match s {
            SinkConfig::Dapr(t) => Some(t.pubsub.as_str()),
            _ => None,
        })
        .collect();
    match dapr.pubsubs().await {
        Ok(have) => {
            for w in wanted {
                if !have.iter().any(|h| h == w) {
                    tracing::warn!(pubsub = w, available = ?have, "the Dapr sidecar has no pub/sub component named `{w}`");
                }
            }
        }
        Err(e) => tracing::warn!("cannot read the sidecar's metadata: {e:#}"),
    }
}

/// The default config path, used when `--config` is not given.
pub fn default_source(path: Option<PathBuf>) -> ConfigSource {
    match path {
        Some(path) => ConfigSource { path, required: true },
        None => ConfigSource { path: config::DEFAULT_PATH.into(), required: false },
    }
}
