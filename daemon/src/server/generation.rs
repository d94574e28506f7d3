//! One generation: every component built from one config, and how it starts and stops.
//!
//! A generation is first [`Prepared`]: functions load (compiling only what the AOT cache
//! lacks), the outbox is opened (once per daemon: generations share it), TLS files are read and
//! sinks built. Everything that can fail happens there, while the previous generation serves.
//! Then it starts in two steps: HTTP on the listening socket at once ([`Prepared::serve`]),
//! and the delivery workers and MQTT ingress once the previous generation has let go of the
//! outbox queues and the broker session ([`Generation::start_workers`]).
//!
//! Stopping a generation, in this order so no accepted result is lost:
//! 1. stop intake ([`Generation::close_intake`]): HTTP stops accepting and hands the socket
//!    back (a reload's next generation takes it at once), event streams end, MQTT stops taking
//!    frames (later ones stay unacknowledged for the broker to redeliver);
//! 2. ([`Generation::drain`]) requests in progress get the grace period, then their
//!    connections are cut; pipelines finish the frames in hand and commit their results,
//!    queued frames go back to the broker unacknowledged;
//! 3. delivery workers flush what they can within the grace period, and are cut when it ends,
//!    mid-request if need be: what they had not settled stays on disk;
//! 4. the broker connection closes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{self, Config, SinkConfig};
use crate::fleet::Context;
use crate::fleet::events::{Deployment, Reporter};
use crate::fleet::listen::Listener;
use crate::fleet::rollout::Interrupted;
use crate::ingress::http::Api;
use crate::ingress::listener;
use crate::ingress::mqtt::{Ingress, Route};
use crate::ingress::notice::Notice;
use crate::metrics::Metrics;
use crate::pipeline::Pipelines;
use crate::runtime::Runtime;
use crate::sinks::dapr::DaprClient;
use crate::sinks::outbox::{Outbox, Record};
use crate::sinks::{Kind, Sink, delivery};

/// How long the broker connection gets to close once nothing else runs.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// What outlives a generation: the outbox (one redb file, locked while open, so a reload must
/// reuse it rather than open it again), the page's board, and the daemon's own problems.
#[derive(Default)]
pub struct Shared {
    outbox: std::sync::Mutex<Option<(PathBuf, Arc<Outbox>)>>,
    /// The page's board, so a reload keeps the cameras' history.
    board: Arc<crate::pipeline::board::Board>,
    pub problems: Arc<std::sync::Mutex<Vec<String>>>,
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
pub struct Prepared {
    cfg: Config,
    runtime: Arc<Runtime>,
    pipelines: Option<Arc<Pipelines>>,
    sinks: Vec<Arc<Sink>>,
    /// The broker connection and the routes of MQTT-fed pipelines.
    mqtt: Option<(crate::mqtt::Client, crate::mqtt::Connection, Vec<Route>)>,
    listener: Option<TcpListener>,
    problems: Arc<std::sync::Mutex<Vec<String>>>,
    /// Where this generation's `deployment` events go.
    events: Reporter,
    /// Trials the last stop ended, to report once the generation runs.
    interrupted: Vec<Interrupted>,
}

/// Prepares a generation; a panic anywhere in it (a library's assertion on a setting) is an
/// error like any other, so a reload keeps the running generation and a start exits with a
/// one-line cause.
pub async fn prepare(cfg: &Config, shared: &Shared, listener: Option<TcpListener>) -> anyhow::Result<Prepared> {
    match std::panic::AssertUnwindSafe(Prepared::new(cfg, shared, listener)).catch_unwind().await {
        Ok(prepared) => prepared,
        Err(panic) => {
            anyhow::bail!("preparing the configuration panicked: {}", crate::runtime::panic_text(panic.as_ref()))
        }
    }
}

impl Prepared {
    async fn new(cfg: &Config, shared: &Shared, listener: Option<TcpListener>) -> anyhow::Result<Prepared> {
        let metrics = Arc::new(Metrics::new());
        let (committed, interrupted) = crate::fleet::rollout::Board::open(&cfg.runtime.state_dir).start();
        let fetched = crate::fleet::images::fetch_configured(cfg, None, &committed).await;
        let runtime = {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            // Compiling is CPU work; keep it off the async workers.
            Arc::new(tokio::task::spawn_blocking(move || Runtime::load(&cfg, metrics, None, &fetched)).await??)
        };
        let mut prepared = Prepared {
            cfg: cfg.clone(),
            runtime: runtime.clone(),
            pipelines: None,
            sinks: Vec::new(),
            mqtt: None,
            listener,
            problems: shared.problems.clone(),
            events: crate::fleet::events::nowhere(),
            interrupted,
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
        for sc in cfg.pipelines.iter().flat_map(|p| &p.sinks).chain(&cfg.fleet.events) {
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
            // Advice only (the outbox waits for the sidecar either way), so it delays nothing.
            tokio::spawn(check_sidecar(cfg.clone(), dapr.clone()));
        }
        let resolve = |sc: &SinkConfig| sinks[&crate::sinks::key(sc)].clone();
        prepared.events = events_to_outbox(cfg.fleet.events.iter().map(resolve).collect(), outbox.clone());
        let board_id = crate::board::id(&cfg.board);
        let pipelines =
            Pipelines::new(&cfg.pipelines, resolve, runtime, outbox, metrics, shared.board.clone(), &board_id);
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

    /// Serves HTTP on `listener` (unless this generation bound its own) at once; the rest
    /// waits for [`Generation::start_workers`].
    pub fn serve(self, listener: TcpListener) -> Generation {
        let cfg = &self.cfg;
        let listener = self.listener.unwrap_or(listener);
        let (stop_intake, intake_rx) = watch::channel(false);
        let fleet = Context::new(Arc::new(cfg.clone()), self.runtime.clone(), self.events, intake_rx.clone());
        for i in &self.interrupted {
            i.report(&fleet);
        }
        let channel = cfg.fleet.channel.as_ref().and_then(|_| match Listener::start(fleet.clone()) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!("the fleet channel is off: {e:#}");
                None
            }
        });
        let api = Arc::new(Api {
            runtime: self.runtime.clone(),
            fleet,
            channel,
            pipelines: self.pipelines,
            max_body: cfg.server.max_body.as_u64() as usize,
            bodies: crate::ingress::http::bodies_in_flight(cfg.server.max_body.as_u64() as usize),
            app_token: std::env::var("APP_API_TOKEN").ok().filter(|t| !t.is_empty()),
            token: cfg.server.token.clone().filter(|t| !t.is_empty()),
            allowed_hosts: cfg.server.allowed_hosts.clone(),
            notice: match &cfg.server.notice_file {
                Some(path) => Notice::watch(path.clone(), intake_rx.clone()),
                None => Notice::default(),
            },
            closing: intake_rx.clone(),
            event_streams: Default::default(),
            daemon_problems: self.problems,
        });
        if api.token.is_none() && !cfg.server.listen.ip().is_loopback() {
            tracing::warn!(listen = %cfg.server.listen, "listening beyond loopback without server.token: anyone on the network can use the API");
        }
        tracing::info!(
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            functions = self.runtime.functions().len(),
            failed = self.runtime.failed().len(),
            models = self.runtime.models().loaded().count(),
            pipelines = cfg.pipelines.len(),
            version = env!("CARGO_PKG_VERSION"),
            "edgefn ready"
        );
        let mut intake_closed = intake_rx.clone();
        let closed = async move {
            let _ = intake_closed.changed().await;
        };
        let (handback, listener_back) = oneshot::channel();
        let (grace, max_connections) = (cfg.server.shutdown_grace, cfg.server.max_connections);
        let http = tokio::spawn(listener::serve(listener, handback, api.clone(), closed, grace, max_connections));
        let (stop_delivery, _) = watch::channel(false);
        let (stop_connection, _) = watch::channel(false);
        Generation {
            api,
            grace,
            stop_intake,
            stop_delivery,
            stop_connection,
            listener_back: Some(listener_back),
            http,
            deliveries: tokio::task::JoinSet::new(),
            ingress: None,
            workers: Some(Workers { cfg: self.cfg, sinks: self.sinks, mqtt: self.mqtt }),
        }
    }
}

/// What a generation starts once the one before it has stopped delivering.
struct Workers {
    cfg: Config,
    sinks: Vec<Arc<Sink>>,
    mqtt: Option<(crate::mqtt::Client, crate::mqtt::Connection, Vec<Route>)>,
}

/// Everything running for one config.
pub struct Generation {
    pub api: Arc<Api>,
    grace: Duration,
    stop_intake: watch::Sender<bool>,
    stop_delivery: watch::Sender<bool>,
    stop_connection: watch::Sender<bool>,
    listener_back: Option<oneshot::Receiver<TcpListener>>,
    /// The accept loop, then the drain of its connections.
    http: JoinHandle<()>,
    deliveries: tokio::task::JoinSet<()>,
    ingress: Option<JoinHandle<()>>,
    workers: Option<Workers>,
}

impl Generation {
    pub fn status_line(&self) -> String {
        crate::ingress::status::Snapshot::take(&self.api).line()
    }

    /// The tag poll and the fleet channel; delivery workers, then MQTT ingress.
    pub fn start_workers(&mut self) {
        let Some(w) = self.workers.take() else { return };
        tokio::spawn(crate::fleet::poll::run(self.api.fleet.clone()));
        let channel = w.cfg.fleet.channel.as_ref().and_then(|c| c.mqtt.clone());
        if let (Some(listener), Some(filter), Some(mqtt)) = (&self.api.channel, channel, &w.cfg.mqtt) {
            tokio::spawn(listener.clone().run_mqtt(mqtt.clone(), filter, self.stop_intake.subscribe()));
        }
        let Some(pipelines) = &self.api.pipelines else { return };
        let metrics = self.api.runtime.metrics().clone();
        pipelines.outbox().reconfigure(&w.cfg.outbox, metrics.clone());
        let (intake_rx, delivery_rx, connection_rx) =
            (self.stop_intake.subscribe(), self.stop_delivery.subscribe(), self.stop_connection.subscribe());
        for sink in w.sinks {
            let (outbox, metrics) = (pipelines.outbox().clone(), metrics.clone());
            self.deliveries.spawn(delivery::run(sink, outbox, metrics, delivery_rx.clone(), self.grace));
        }
        if let Some((client, conn, routes)) = w.mqtt {
            let max_frame = w.cfg.mqtt.as_ref().map_or(0, |m| m.max_frame.as_u64() as usize);
            let subscriptions = w.cfg.runtime.state_dir.join("mqtt-subscriptions.json");
            let i = Ingress { client, routes, pipelines: pipelines.clone(), metrics, max_frame, subscriptions };
            self.ingress = Some(tokio::spawn(i.run(conn, intake_rx, connection_rx)));
        }
    }

    /// Stops intake and hands the listening socket back at once; requests in progress go on
    /// until [`Generation::drain`].
    pub async fn close_intake(&mut self) -> TcpListener {
        let _ = self.stop_intake.send(true);
        let back = self.listener_back.take().expect("close_intake runs once");
        back.await.expect("the accept loop hands the listener back")
    }

    /// The rest of the stop, each step bounded by the grace period but the frames in hand (a
    /// frame that does not finish is a wedge, which the health loop reports).
    pub async fn drain(mut self) {
        // Open requests finish (or are cut at the grace) beside the rest of the stop.
        let http = std::mem::replace(&mut self.http, tokio::spawn(async {}));
        if let Some(p) = &self.api.pipelines {
            p.shutdown().await;
        }
        let _ = self.stop_delivery.send(true);
        let flushed = tokio::time::timeout(self.grace + Duration::from_millis(500), async {
            while self.deliveries.join_next().await.is_some() {}
        });
        if flushed.await.is_err() {
            tracing::warn!(
                "delivery still in progress after the {:?} grace: cut, the undelivered results stay in the outbox",
                self.grace
            );
            self.deliveries.shutdown().await;
        }
        // The workers' last settles were committed without an fsync: a clean stop must not
        // leave them to be delivered again.
        if let Some(p) = &self.api.pipelines {
            let outbox = p.outbox().clone();
            match tokio::task::spawn_blocking(move || outbox.persist()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("persisting the last settles: {e:#}"),
                Err(e) => tracing::warn!("persisting the last settles: {e}"),
            }
        }
        let _ = self.stop_connection.send(true);
        if let Some(t) = self.ingress.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(DISCONNECT_GRACE, t).await.is_err() {
                abort.abort();
            }
        }
        if http.await.is_err() {
            tracing::error!("the HTTP task panicked");
        }
        if let Some(p) = &self.api.pipelines {
            tracing::info!(undelivered = p.outbox().total(), "pipelines stopped");
        }
    }

    /// The whole stop, for SIGTERM.
    pub async fn stop(mut self) {
        drop(self.close_intake().await);
        self.drain().await;
    }
}

/// A reporter that commits each event to the outbox, for every `[fleet] events` sink, in the
/// order reported.
fn events_to_outbox(sinks: Vec<Arc<Sink>>, outbox: Arc<Outbox>) -> Reporter {
    if sinks.is_empty() {
        return crate::fleet::events::nowhere();
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Deployment>();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let (id, event) = d.cloudevent();
            let payload = bytes::Bytes::from(event);
            let (created_ms, boot) = (crate::sinks::outbox::now_ms(), crate::sinks::outbox::Boot::now());
            let items = sinks
                .iter()
                .map(|s| {
                    let record = Record {
                        id: id.clone(),
                        board: d.board.clone(),
                        pipeline: "fleet".into(),
                        camera: d.function.clone(),
                        seq: 0,
                        topic: s.destination("fleet", &d.function),
                        content_type: crate::fleet::events::CLOUDEVENT.into(),
                        created_ms,
                        boot: boot.clone(),
                        error: None,
                    };
                    s.item(record, payload.clone())
                })
                .collect();
            if let Err(e) = outbox.commit(items).await {
                tracing::error!(function = %d.function, outcome = %d.outcome, "deployment event lost: {e:#}");
            }
        }
    });
    Arc::new(move |d| {
        let _ = tx.send(d);
    })
}

/// Waits (bounded) for the sidecar's components, then checks the configured pub/subs exist.
async fn check_sidecar(cfg: Config, dapr: Arc<DaprClient>) {
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
