//! `edgefn run`: builds every component from the config, serves, reloads, and shuts down in order.
//!
//! The components built from one config form a [`Generation`]. It is first [`Prepared`]:
//! functions load (compiling only what the AOT cache lacks), the outbox is opened (once per
//! daemon: generations share it), TLS files are read and sinks built. Then it starts: delivery
//! workers, pipelines and MQTT ingress, then HTTP on the already-bound listener, and systemd
//! hears READY=1.
//!
//! Stopping a generation, in this order so no accepted result is lost:
//! 1. stop intake: HTTP stops accepting and event streams end, MQTT stops taking frames (later
//!    ones stay unacknowledged for the broker to redeliver); requests in progress get the
//!    grace period, then their connections are cut;
//! 2. pipelines finish the frames in hand and commit their results; queued frames go back to
//!    the broker unacknowledged;
//! 3. delivery workers flush what they can within the grace period; the rest stays on disk;
//! 4. the broker connection closes.
//!
//! SIGHUP reads the config again and prepares a new generation while the old one serves. Only
//! when that worked does the old one stop and the new one start on the same listening socket.
//! An invalid config is refused; a valid one that cannot apply (a port taken, a TLS file
//! unreadable) is reported in the log, `STATUS=` and `/healthz`, and the old generation keeps
//! serving. SIGTERM and SIGINT stop the daemon.

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
use crate::ingress::http::Api;
use crate::ingress::listener;
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
    let listener = bind(&cfg).await?;
    let (interval, watchdog) = systemd::health_interval();
    let shared = Shared::default();
    let mut generation = Prepared::new(&cfg, &shared, None).await?.start(listener);

    loop {
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
        let Some(new) = reload else {
            systemd::stopping();
            generation.stop().await;
            tracing::info!("edgefn stopped");
            return Ok(());
        };
        tracing::info!("SIGHUP: reloading configuration");
        // Everything that can fail happens while the running generation still serves.
        let prepared = async {
            let listener = if new.server.listen != cfg.server.listen { Some(bind(&new).await?) } else { None };
            Prepared::new(&new, &shared, listener).await
        };
        match prepared.await {
            Ok(prepared) => {
                shared.problems.lock().expect("problems lock").clear();
                let old_listener = generation.stop().await;
                generation = prepared.start(old_listener);
                cfg = new;
            }
            Err(e) => {
                let problem = format!("reload failed, still running the previous config: {e:#}");
                tracing::error!("{problem}");
                *shared.problems.lock().expect("problems lock") = vec![problem];
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
        api.runtime.metrics().wedged.set(wedged as i64);
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
        systemd::status(&crate::ingress::status::Snapshot::take(&api).line());
    }
}

/// What outlives a generation: the outbox (one redb file, locked while open, so a reload must
/// reuse it rather than open it again), the page's board, and the daemon's own problems.
#[derive(Default)]
struct Shared {
    outbox: std::sync::Mutex<Option<(PathBuf, Arc<Outbox>)>>,
    /// The page's board, so a reload keeps the cameras' history.
    board: Arc<crate::pipeline::board::Board>,
    problems: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Shared {
    /// The outbox at `path`, opened on first use; a reload that moves `state_dir` opens the new
    /// one (the old one closes when its last generation stops). Its caps and metrics change
    /// only when the new generation starts.
    fn outbox(
        &self,
        path: &std::path::Path,
        cfg: &config::Outbox,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Arc<Outbox>> {
        let mut slot = self.outbox.lock().expect("outbox slot lock");
        if let Some((open, outbox)) = slot.as_ref() {
            if open == path {
                return Ok(outbox.clone());
            }
        }
        let outbox = Outbox::open(path, cfg, metrics.clone())?;
        *slot = Some((path.to_path_buf(), outbox.clone()));
        Ok(outbox)
    }
}

/// A generation built and checked, not yet running: everything in it that can fail has been
/// done (functions loaded, TLS files read, a new listen address bound), and nothing in it has
/// touched the broker or taken a request yet.
struct Prepared {
    cfg: Config,
    runtime: Arc<Runtime>,
    pipelines: Option<Arc<Pipelines>>,
    sinks: Vec<Arc<Sink>>,
    /// The broker connection and the routes of MQTT-fed pipelines.
    mqtt: Option<(crate::mqtt::Client, crate::mqtt::Connection, Vec<Route>)>,
    listener: Option<TcpListener>,
    problems: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Prepared {
    async fn new(cfg: &Config, shared: &Shared, listener: Option<TcpListener>) -> anyhow::Result<Prepared> {
        let metrics = Arc::new(Metrics::new());
        let runtime = {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            // Compiling is CPU work; keep it off the async workers.
            Arc::new(tokio::task::spawn_blocking(move || Runtime::load(&cfg, metrics, None)).await??)
        };
        let mut prepared = Prepared {
            cfg: cfg.clone(),
            runtime: runtime.clone(),
            pipelines: None,
            sinks: Vec::new(),
            mqtt: None,
            listener,
            problems: shared.problems.clone(),
        };
        if cfg.pipelines.is_empty() {
            return Ok(prepared);
        }
        let dapr = Arc::new(DaprClient::new(&cfg.dapr, metrics.clone())?);
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
        let outbox = shared.outbox(&cfg.runtime.state_dir.join("outbox.redb"), &cfg.outbox, &metrics)?;
        for stale in outbox.sinks_with_pending() {
            if !sinks.contains_key(stale.as_str()) {
                tracing::warn!(sink = %stale, "results wait for a sink that is no longer configured");
            }
        }
        if sinks.values().any(|s| matches!(s.kind, Kind::Dapr(_))) {
            check_sidecar(cfg, &dapr).await;
        }
        let resolve = |sc: &SinkConfig| sinks[&crate::sinks::key(sc)].clone();
        let pipelines = Pipelines::new(&cfg.pipelines, resolve, runtime, outbox, metrics, shared.board.clone());
        prepared.mqtt = mqtt.map(|(client, conn)| {
            let routes = pipelines
                .iter()
                .filter_map(|p| p.source.mqtt.clone().map(|filter| Route { filter, pipeline: p.clone() }))
                .collect();
            (client, conn, routes)
        });
        prepared.sinks = sinks.into_values().collect();
        prepared.pipelines = Some(pipelines);
        Ok(prepared)
    }

    /// Starts every task: delivery workers, MQTT ingress, then HTTP on `listener` (unless this
    /// generation bound its own).
    fn start(self, listener: TcpListener) -> Generation {
        let cfg = &self.cfg;
        let listener = self.listener.unwrap_or(listener);
        let (stop_intake, intake_rx) = watch::channel(false);
        let (stop_delivery, delivery_rx) = watch::channel(false);
        let (stop_connection, connection_rx) = watch::channel(false);
        let mut deliveries = tokio::task::JoinSet::new();
        let mut ingress = None;
        if let Some(pipelines) = &self.pipelines {
            pipelines.outbox().reconfigure(&cfg.outbox, self.runtime.metrics().clone());
            for sink in self.sinks {
                let (outbox, metrics) = (pipelines.outbox().clone(), self.runtime.metrics().clone());
                deliveries.spawn(delivery::run(sink, outbox, metrics, delivery_rx.clone(), cfg.server.shutdown_grace));
            }
            if let Some((client, conn, routes)) = self.mqtt {
                let max_frame = cfg.mqtt.as_ref().map_or(0, |m| m.max_frame.as_u64() as usize);
                let metrics = self.runtime.metrics().clone();
                let i = Ingress { client, routes, pipelines: pipelines.clone(), metrics, max_frame };
                ingress = Some(tokio::spawn(i.run(conn, intake_rx.clone(), connection_rx)));
            }
        }
        let api = Arc::new(Api {
            runtime: self.runtime.clone(),
            pipelines: self.pipelines,
            max_body: cfg.server.max_body.as_u64() as usize,
            app_token: std::env::var("APP_API_TOKEN").ok().filter(|t| !t.is_empty()),
            token: cfg.server.token.clone().filter(|t| !t.is_empty()),
            closing: intake_rx.clone(),
            event_streams: Default::default(),
            daemon_problems: self.problems,
        });
        if api.token.is_none() && !cfg.server.listen.ip().is_loopback() {
            tracing::warn!(listen = %cfg.server.listen, "listening beyond loopback without server.token: anyone on the network can use the API");
        }
        tracing::info!(
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            functions = self.runtime.functions().count(),
            failed = self.runtime.failed().len(),
            models = self.runtime.models().loaded().count(),
            pipelines = cfg.pipelines.len(),
            version = env!("CARGO_PKG_VERSION"),
            "edgefn ready"
        );
        let mut intake_closed = intake_rx;
        let closed = async move {
            let _ = intake_closed.changed().await;
        };
        let (grace, max_connections) = (cfg.server.shutdown_grace, cfg.server.max_connections);
        let http = tokio::spawn(listener::serve(listener, api.clone(), closed, grace, max_connections));
        Generation { api, stop_intake, stop_delivery, stop_connection, http, deliveries, ingress }
    }
}

/// Everything running for one config.
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
    fn status_line(&self) -> String {
        crate::ingress::status::Snapshot::take(&self.api).line()
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
            tracing::info!(undelivered = p.outbox().total(), "pipelines stopped");
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
