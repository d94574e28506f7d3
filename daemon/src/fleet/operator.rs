//! `edgefn fleet`, the operator's side of the channel: it writes deploy messages, signs and
//! publishes them (a retained MQTT message, or through daprd's publish API), watches the
//! boards' `deployment` events, and drives a rollout wave by wave.
//!
//! A wave is done when every board that reported on it has a final outcome and none has
//! reported for `settle`: no board list is needed, since the boards outside a wave never
//! speak. More than `max_failed` % of a wave's boards failing (a gate rolled it back, or it
//! would not pull, verify or load) stops the rollout and orders the rest back, as
//! Greengrass's abort config does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::channel::{Action, Order, Signed};
use super::events::Deployment;
use super::signer::Signer;
use crate::mqtt::{self, Event};

/// Where deploy messages go.
pub enum Transport {
    Mqtt {
        broker: Box<Broker>,
        topic: String,
    },
    /// daprd's HTTP API, its pub/sub component and topic.
    Dapr {
        url: String,
        pubsub: String,
        topic: String,
    },
}

/// The operator's broker connection: deploy messages out, deployment events in.
pub struct Broker {
    client: mqtt::Client,
    events: mpsc::UnboundedReceiver<Bytes>,
    published: Arc<AtomicU64>,
    sent: u64,
    poller: tokio::task::JoinHandle<()>,
}

impl Broker {
    /// Connects, subscribed to `events` (a topic filter) if given.
    pub async fn connect(cfg: &crate::config::Mqtt, events: Option<String>) -> anyhow::Result<Broker> {
        // One connection sends and one watches: each needs its own client id.
        let role = if events.is_some() { "watch" } else { "send" };
        let suffix = format!("-fleet-{role}-{}", std::process::id());
        let (client, mut conn) = mqtt::connect(cfg, &suffix, 1 << 20)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let published = Arc::new(AtomicU64::new(0));
        let (up, mut connected) = tokio::sync::watch::channel(false);
        let (c, count, url) = (client.clone(), published.clone(), cfg.url.clone());
        let poller = tokio::spawn(async move {
            let mut failures = 0;
            loop {
                match conn.poll().await {
                    Ok(Event::Connected { .. }) => {
                        failures = 0;
                        if let Some(filter) = &events
                            && let Err(e) = c.subscribe(filter).await
                        {
                            eprintln!("edgefn: cannot subscribe to {filter}: {e:#}");
                        }
                        let _ = up.send(true);
                    }
                    Ok(Event::Message(m)) => {
                        let _ = tx.send(m.payload().clone());
                        c.ack(&m);
                    }
                    Ok(Event::Published) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Other) => {}
                    Err(e) => {
                        failures += 1;
                        if failures == 5 {
                            eprintln!("edgefn: broker {url}: {e}");
                        }
                        tokio::time::sleep(mqtt::backoff(failures)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), connected.wait_for(|c| *c))
            .await
            .map_err(|_| anyhow::anyhow!("broker {} did not answer within 30 s", cfg.url))?
            .map_err(|_| anyhow::anyhow!("broker {}: connection task ended", cfg.url))?;
        // The SUBACK comes before any event that matters; give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Broker { client, events: rx, published, sent: 0, poller })
    }

    /// Publishes retained, and returns once the broker has it.
    async fn publish(&mut self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        self.client.publish_retained(topic, payload).await?;
        self.sent += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.published.load(Ordering::Relaxed) < self.sent {
            anyhow::ensure!(Instant::now() < deadline, "the broker did not acknowledge the deploy message in 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The next deployment event, waiting at most `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Option<Deployment> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let bytes = tokio::time::timeout_at(deadline, self.events.recv()).await.ok()??;
            if let Some(d) = Deployment::from_cloudevent(&bytes) {
                return Some(d);
            }
        }
    }

    pub async fn close(self) {
        self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.poller.abort();
    }
}

impl Transport {
    /// Sends one signed envelope.
    pub async fn send(&mut self, envelope: &[u8]) -> anyhow::Result<()> {
        match self {
            Transport::Mqtt { broker, topic } => broker.publish(topic, Bytes::copy_from_slice(envelope)).await,
            Transport::Dapr { url, pubsub, topic } => dapr_publish(url, pubsub, topic, envelope).await,
        }
    }
}

async fn dapr_publish(url: &str, pubsub: &str, topic: &str, envelope: &[u8]) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Full};
    let uri = format!("{}/v1.0/publish/{pubsub}/{topic}", url.trim_end_matches('/'));
    let req = hyper::Request::post(&uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(envelope)))?;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = client.request(req).await.with_context(|| format!("no Dapr sidecar answering at {url}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "daprd answered {status}: {}", String::from_utf8_lossy(&body));
    Ok(())
}

/// A deploy message's bytes, as they are signed and sent.
pub fn message(order: &Order) -> Vec<u8> {
    serde_json::to_vec(order).expect("an order serialises")
}

/// The envelope of `message` signed by `signer`.
pub fn seal(message: &[u8], signer: &Signer) -> Vec<u8> {
    serde_json::to_vec(&Signed::new(message, &signer.sign(message))).expect("an envelope serialises")
}

/// An expiry `valid` from now, as deploy messages carry it.
pub fn expires_in(valid: Duration) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + valid).to_string()
}

/// A sequence above every earlier one the operator sent: its clock, in milliseconds.
pub fn next_seq() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a rollout does, wave by wave.
pub struct Plan {
    pub function: String,
    pub image: String,
    pub rollout: String,
    pub selector: BTreeMap<String, String>,
    /// Percentages, rising.
    pub waves: Vec<f64>,
    /// Stop and roll back when more than this share (0 to 100) of a wave's boards fail.
    pub max_failed: f64,
    /// A wave is done when no board has reported for this long and none is still on trial.
    pub settle: Duration,
    /// A wave that takes longer than this is judged on what has been reported.
    pub wave_timeout: Duration,
    pub valid: Duration,
}

/// How a rollout ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Each board's last outcome.
    pub boards: BTreeMap<String, String>,
    /// The wave at which it stopped, if it did.
    pub stopped_at: Option<f64>,
}

/// Outcomes after which a board does nothing more for the rollout.
fn is_final(outcome: &str) -> bool {
    outcome != "trial"
}

fn is_failure(outcome: &str) -> bool {
    matches!(outcome, "rolled_back" | "refused" | "failed_to_load")
}

/// Runs `plan`: each wave's message, then its boards' reports, until the last wave is done
/// or one fails.
pub async fn roll_out(
    plan: &Plan,
    signer: &Signer,
    transport: &mut Transport,
    broker: &mut Broker,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let order = |action, percent| Order {
        action,
        rollout: plan.rollout.clone(),
        function: plan.function.clone(),
        image: plan.image.clone(),
        selector: plan.selector.clone(),
        percent,
        seq: next_seq(),
        expires: expires_in(plan.valid),
    };
    for &percent in &plan.waves {
        let sent = order(Action::Deploy, percent);
        transport.send(&seal(&message(&sent), signer)).await?;
        eprintln!("edgefn: rollout {}: wave {percent} % sent (seq {})", plan.rollout, sent.seq);
        let started = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let pending = out.boards.values().any(|o| !is_final(o));
            if !pending && last_report.elapsed() >= plan.settle {
                break;
            }
            if started.elapsed() >= plan.wave_timeout {
                eprintln!("edgefn: rollout {}: wave {percent} % timed out; judged on the reports so far", plan.rollout);
                break;
            }
            if let Some(d) = broker.next_event(Duration::from_millis(200)).await {
                if d.rollout.as_deref() != Some(&plan.rollout) {
                    continue;
                }
                eprintln!(
                    "edgefn: {} {} {}{}",
                    d.board,
                    d.function,
                    d.outcome,
                    d.reason.map(|r| format!(": {r}")).unwrap_or_default()
                );
                out.boards.insert(d.board, d.outcome);
                last_report = Instant::now();
            }
        }
        let failed = out.boards.values().filter(|o| is_failure(o)).count();
        let total = out.boards.len();
        eprintln!("edgefn: rollout {}: wave {percent} %: {total} board(s) reported, {failed} failed", plan.rollout);
        if total > 0 && failed as f64 * 100.0 / total as f64 > plan.max_failed {
            let back = order(Action::Rollback, percent);
            transport.send(&seal(&message(&back), signer)).await?;
            eprintln!(
                "edgefn: rollout {}: stopped at {percent} %: {failed} of {total} boards failed (over {} %); rollback ordered",
                plan.rollout, plan.max_failed
            );
            out.stopped_at = Some(percent);
            return Ok(out);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_trial_is_pending_and_only_a_fault_fails() {
        assert!(!super::is_final("trial"));
        assert!(["committed", "skipped", "rolled_back"].iter().all(|o| super::is_final(o)));
        assert!(super::is_failure("rolled_back") && super::is_failure("refused") && !super::is_failure("skipped"));
    }
}
