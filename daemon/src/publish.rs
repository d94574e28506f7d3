//! `edgefn publish`: a small camera simulator. It publishes image files round-robin to a topic
//! at a steady frame rate (QoS 1), and waits for the broker to acknowledge every frame.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;

use crate::config;
use crate::mqtt::{self, Event};

pub struct Options {
    pub topic: String,
    pub fps: f64,
    /// Frames to send; 0 sends forever.
    pub count: u64,
    pub images: Vec<PathBuf>,
}

pub async fn run(broker: &config::Mqtt, opts: Options) -> anyhow::Result<u64> {
    anyhow::ensure!(!opts.images.is_empty(), "no images given");
    let frames: Vec<Bytes> = opts
        .images
        .iter()
        .map(|p| std::fs::read(p).map(Bytes::from).with_context(|| format!("reading {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    let largest = frames.iter().map(|f| f.len()).max().unwrap_or(0);
    let suffix = format!("-publish-{}", std::process::id());
    let (client, mut conn) = mqtt::connect(broker, &suffix, largest + (1 << 16))?;

    let acked = Arc::new(AtomicU64::new(0));
    let (connected_tx, mut connected) = tokio::sync::watch::channel(false);
    let counter = acked.clone();
    let url = broker.url.clone();
    let poller: tokio::task::JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        let mut failures = 0;
        loop {
            match conn.poll().await {
                Ok(Event::Connected { .. }) => {
                    failures = 0;
                    let _ = connected_tx.send(true);
                }
                Ok(Event::Published) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    if failures >= 5 {
                        return Err(anyhow::anyhow!("broker {url}: {e}"));
                    }
                    tokio::time::sleep(mqtt::backoff(failures)).await;
                }
            }
        }
    });

    let mut poller = poller;
    tokio::select! {
        r = connected.wait_for(|c| *c) => { r.map_err(|_| anyhow::anyhow!("connection task ended"))?; }
        r = &mut poller => {
            return Err(match r {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("connection task ended"),
            });
        }
    }
    let mut ticker = (opts.fps > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.fps));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut sent = 0u64;
    while opts.count == 0 || sent < opts.count {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let frame = frames[(sent % frames.len() as u64) as usize].clone();
        client.publish(&opts.topic, frame).await?;
        sent += 1;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < sent {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline && !poller.is_finished(),
            "broker acknowledged {} of {sent} frames",
            acked.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    poller.abort();
    Ok(sent)
}
