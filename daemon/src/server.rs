//! `edgefn run`: builds every component from the config, serves, and shuts down in order.
//!
//! Start: functions load (compiling only what the AOT cache lacks), the outbox opens, sinks and
//! their delivery workers start, pipelines and MQTT ingress start, then the HTTP listener binds.
//!
//! Shutdown (SIGTERM or SIGINT), in this order so no accepted result is lost:
//! 1. stop intake: HTTP stops accepting, MQTT stops taking frames (later ones stay
//!    unacknowledged for the broker to redeliver);
//! 2. pipelines finish the frames in hand and commit their results; queued frames go back to
//!    the broker unacknowledged;
//! 3. delivery workers flush what they can within the grace period; the rest stays on disk;
//! 4. the broker connection closes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::{Config, SinkConfig};
use crate::ingress::http::{self, Api};
use crate::ingress::mqtt::{Ingress, Route};
use crate::metrics::Metrics;
use crate::pipeline::Pipelines;
use crate::runtime::Runtime;
use crate::sinks::dapr::DaprClient;
use crate::sinks::outbox::Outbox;
use crate::sinks::{Kind, Sink, delivery};

pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
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
    let mut ingress_task = None;

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
        let uses_dapr = sinks.values().any(|s| matches!(s.kind, Kind::Dapr(_)));
        if uses_dapr {
            check_sidecar(&cfg, &dapr).await;
        }
        for sink in sinks.values() {
            deliveries.spawn(delivery::run(
                sink.clone(),
                outbox.clone(),
                metrics.clone(),
                delivery_rx.clone(),
                cfg.server.shutdown_grace,
            ));
        }
        let resolve = |sc: &SinkConfig| sinks[&crate::sinks::key(sc)].clone();
        let pipelines = Pipelines::new(&cfg.pipelines, resolve, runtime.clone(), outbox, metrics.clone());

        if let Some((client, conn)) = mqtt {
            let routes: Vec<Route> = pipelines
                .iter()
                .filter_map(|p| p.source.mqtt.clone().map(|filter| Route { filter, pipeline: p.clone() }))
                .collect();
            let ingress = Ingress { client, routes, pipelines: pipelines.clone(), metrics: metrics.clone(), max_frame };
            ingress_task = Some(tokio::spawn(ingress.run(conn, intake_rx.clone(), connection_rx)));
        }
        Some(pipelines)
    };

    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        functions = runtime.functions().count(),
        failed = runtime.failed().len(),
        pipelines = cfg.pipelines.len(),
        version = env!("CARGO_PKG_VERSION"),
        "edgefn ready"
    );
    let api = Arc::new(Api {
        runtime: runtime.clone(),
        pipelines: pipelines.clone(),
        max_body: cfg.server.max_body.as_u64() as usize,
        app_token: std::env::var("APP_API_TOKEN").ok().filter(|t| !t.is_empty()),
        token: cfg.server.token.clone().filter(|t| !t.is_empty()),
    });
    if api.token.is_none() && !cfg.server.listen.ip().is_loopback() {
        tracing::warn!(listen = %cfg.server.listen, "listening beyond loopback without server.token: anyone on the network can use the API");
    }
    let mut intake_closed = intake_rx.clone();
    let http = tokio::spawn(http::serve(
        listener,
        api,
        async move {
            let _ = intake_closed.changed().await;
        },
        cfg.server.shutdown_grace,
    ));

    shutdown.await;
    let _ = stop_intake.send(true);
    let _ = http.await;
    if let Some(p) = &pipelines {
        p.shutdown().await;
    }
    let _ = stop_delivery.send(true);
    while deliveries.join_next().await.is_some() {}
    let _ = stop_connection.send(true);
    if let Some(t) = ingress_task {
        let _ = t.await;
    }
    if let Some(p) = &pipelines {
        let left = p.outbox().total().unwrap_or(0);
        tracing::info!(undelivered = left, "edgefn stopped");
    } else {
        tracing::info!("edgefn stopped");
    }
    Ok(())
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
