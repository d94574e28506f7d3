//! The MQTT connection, 3.1.1 or 5, shared by camera ingress and MQTT sinks.
//!
//! rumqttc has one client per protocol version; this module hides the difference behind
//! [`Client`], [`Connection`] and [`Message`]. The session is persistent (clean session off,
//! a stable client id, and on MQTT 5 a session expiry), acknowledgements are manual, and TLS
//! uses rustls with the ring provider.
//!
//! [`Client::publish_acked`] tells when the broker has a publish (its PUBACK), not merely when
//! rumqttc queued it: rumqttc keeps unacknowledged publishes in memory only, and drops them
//! when a broker without persistence comes back without our session. See [`acks`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;
use rumqttc::{QoS, TlsConfiguration, Transport};
use tokio::sync::oneshot;

use self::acks::Acks;
use crate::config;

pub mod acks;
pub mod refusal;

/// Unacknowledged QoS 1 frames an MQTT 5 broker may send us at once (mosquitto's own window
/// for 3.1.1 clients is 20).
const RECEIVE_MAXIMUM: u16 = 16;

/// How long a broker keeps an MQTT 5 session (and its queued frames) while we are away.
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

#[derive(Clone)]
pub struct Client {
    inner: ClientInner,
    acks: Arc<Acks>,
    /// Between a CONNACK and the next connection error.
    connected: Arc<AtomicBool>,
}

#[derive(Clone)]
enum ClientInner {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub struct Connection {
    inner: ConnectionInner,
    acks: Arc<Acks>,
    connected: Arc<AtomicBool>,
}

enum ConnectionInner {
    V4(rumqttc::EventLoop),
    V5(rumqttc::v5::EventLoop),
}

/// A received PUBLISH, kept whole so it can be acknowledged later.
pub enum Message {
    V4(rumqttc::Publish),
    V5(v5b::Publish),
}

pub enum Event {
    Connected {
        session_present: bool,
    },
    Message(Message),
    /// The broker acknowledged one of our QoS 1 publishes.
    Published,
    Other,
}

impl Message {
    pub fn topic(&self) -> String {
        match self {
            Message::V4(p) => p.topic.clone(),
            Message::V5(p) => String::from_utf8_lossy(&p.topic).into_owned(),
        }
    }

    /// The broker sent this before on an earlier connection (the DUP flag).
    pub fn redelivered(&self) -> bool {
        match self {
            Message::V4(p) => p.dup,
            Message::V5(p) => p.dup,
        }
    }

    /// Sent at QoS 0: no acknowledgement, and no flow control either.
    pub fn qos0(&self) -> bool {
        match self {
            Message::V4(p) => p.qos == QoS::AtMostOnce,
            Message::V5(p) => p.qos == rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        }
    }

    pub fn payload(&self) -> &Bytes {
        match self {
            Message::V4(p) => &p.payload,
            Message::V5(p) => &p.payload,
        }
    }
}

/// Builds the client and its connection; nothing touches the network until the first poll.
/// `suffix` makes a distinct client id (e.g. for `edgefn publish`).
pub fn connect(cfg: &config::Mqtt, suffix: &str, max_packet: usize) -> anyhow::Result<(Client, Connection)> {
    let url = url::Url::parse(&cfg.url).with_context(|| format!("mqtt.url `{}`", cfg.url))?;
    let tls = url.scheme() == "mqtts";
    let host = url.host_str().ok_or_else(|| anyhow::anyhow!("mqtt.url `{}` has no host", cfg.url))?.to_string();
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let id = format!("{}{suffix}", cfg.client_id);
    let transport = if tls { Transport::tls_with_config(tls_config(cfg)?) } else { Transport::tcp() };
    let credentials = match (&cfg.username, &cfg.password) {
        (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
        (None, _) => None,
    };
    // Acks go through the request channel; it must hold a broker's whole in-flight window.
    let cap = 1024;
    let (acks, connected) = (Arc::new(Acks::default()), Arc::new(AtomicBool::new(false)));
    let (client, connection) = match cfg.version {
        5 => {
            let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
                .set_manual_acks(true)
                .set_max_packet_size(Some(max_packet as u32))
                // QoS 1 frames in flight to us at once: what the handoff may hold of them.
                .set_receive_maximum(Some(RECEIVE_MAXIMUM))
                .set_transport(transport);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            let (c, e) = rumqttc::v5::AsyncClient::new(o, cap);
            (ClientInner::V5(c), ConnectionInner::V5(e))
        }
        _ => {
            let mut o = rumqttc::MqttOptions::new(id, host, port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_max_packet_size(max_packet, max_packet)
                .set_transport(transport);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            let (c, e) = rumqttc::AsyncClient::new(o, cap);
            (ClientInner::V4(c), ConnectionInner::V4(e))
        }
    };
    Ok((
        Client { inner: client, acks: acks.clone(), connected: connected.clone() },
        Connection { inner: connection, acks, connected },
    ))
}

fn tls_config(cfg: &config::Mqtt) -> anyhow::Result<TlsConfiguration> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let mut roots = rustls::RootCertStore::empty();
    let ca = cfg.ca.as_ref().ok_or_else(|| anyhow::anyhow!("mqtts:// needs mqtt.ca (the broker's CA, PEM)"))?;
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("mqtt.ca {}", ca.display()))? {
        roots.add(cert.with_context(|| format!("mqtt.ca {}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("mqtt.cert {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("mqtt.cert {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("mqtt.key {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => anyhow::bail!("mqtt.cert and mqtt.key go together"),
    };
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

impl Client {
    pub async fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        match &self.inner {
            ClientInner::V4(c) => c.subscribe(filter, QoS::AtLeastOnce).await?,
            ClientInner::V5(c) => c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await?,
        }
        Ok(())
    }

    pub async fn unsubscribe(&self, filter: &str) -> anyhow::Result<()> {
        match &self.inner {
            ClientInner::V4(c) => c.unsubscribe(filter).await?,
            ClientInner::V5(c) => c.unsubscribe(filter).await?,
        }
        Ok(())
    }

    /// Hands a QoS 1 publish to the connection, which retransmits it until the broker acks.
    pub async fn publish(&self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        self.send(topic, payload, false).await
    }

    /// A retained QoS 1 publish: the broker keeps the last one per topic for whoever
    /// subscribes later (a board that was offline when the fleet's operator sent it).
    pub async fn publish_retained(&self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        self.send(topic, payload, true).await
    }

    async fn send(&self, topic: &str, payload: Bytes, retain: bool) -> anyhow::Result<()> {
        match &self.inner {
            ClientInner::V4(c) => c.publish_bytes(topic, QoS::AtLeastOnce, retain, payload).await?,
            ClientInner::V5(c) => {
                c.publish_bytes(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, retain, payload).await?
            }
        }
        Ok(())
    }

    /// Publishes at QoS 1; the receiver gets the broker's answer when its PUBACK arrives (on
    /// MQTT 5 possibly a refusal), and fails if the publish was lost with the session. Refused at once while the broker is offline, so
    /// retries do not pile up copies in rumqttc's queue.
    pub async fn publish_acked(&self, topic: &str, payload: Bytes) -> anyhow::Result<oneshot::Receiver<acks::Answer>> {
        anyhow::ensure!(self.connected.load(Ordering::Acquire), "not connected to the broker");
        // Publishes enter rumqttc's queue in the order their waiters are registered.
        let _order = self.acks.order.lock().await;
        let ack = self.acks.expect();
        if let Err(e) = self.publish(topic, payload).await {
            self.acks.unexpect();
            return Err(e);
        }
        Ok(ack)
    }

    /// Acknowledges a received message (a no-op for QoS 0).
    pub fn ack(&self, m: &Message) {
        let sent = match (&self.inner, m) {
            (ClientInner::V4(c), Message::V4(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            (ClientInner::V5(c), Message::V5(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            _ => Err("message from another protocol version".into()),
        };
        if let Err(e) = sent {
            // The broker redelivers an unacknowledged message; nothing is lost.
            tracing::warn!(topic = %m.topic(), "cannot acknowledge: {e}");
        }
    }

    pub async fn disconnect(&self) {
        let _ = match &self.inner {
            ClientInner::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            ClientInner::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

impl Connection {
    /// The next event; an error means the connection dropped (the next poll reconnects).
    pub async fn poll(&mut self) -> Result<Event, String> {
        use rumqttc::Outgoing;
        let acks = &self.acks;
        let event = match &mut self.inner {
            ConnectionInner::V4(e) => match e.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    Ok(Event::Connected { session_present: a.session_present })
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => Ok(Event::Message(Message::V4(p))),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a))) => {
                    acks.acked(a.pkid, Ok(()));
                    Ok(Event::Published)
                }
                Ok(rumqttc::Event::Outgoing(Outgoing::Publish(pkid))) => {
                    acks.sent(pkid);
                    Ok(Event::Other)
                }
                Ok(rumqttc::Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                    acks.collided(pkid);
                    Ok(Event::Other)
                }
                Ok(_) => Ok(Event::Other),
                Err(err) => {
                    let unsent = e.pending.iter().filter(|r| matches!(r, rumqttc::Request::Publish(p) if p.pkid == 0));
                    acks.disconnected(unsent.count());
                    Err(err.to_string())
                }
            },
            ConnectionInner::V5(e) => match e.poll().await {
                Ok(rumqttc::v5::Event::Incoming(v5b::Packet::ConnAck(a))) => {
                    Ok(Event::Connected { session_present: a.session_present })
                }
                Ok(rumqttc::v5::Event::Incoming(v5b::Packet::Publish(p))) => Ok(Event::Message(Message::V5(p))),
                Ok(rumqttc::v5::Event::Incoming(v5b::Packet::PubAck(a))) => {
                    acks.acked(a.pkid, refusal::of_puback(a.reason));
                    Ok(Event::Published)
                }
                Ok(rumqttc::v5::Event::Outgoing(Outgoing::Publish(pkid))) => {
                    acks.sent(pkid);
                    Ok(Event::Other)
                }
                Ok(rumqttc::v5::Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                    acks.collided(pkid);
                    Ok(Event::Other)
                }
                Ok(_) => Ok(Event::Other),
                Err(err) => {
                    let unsent =
                        e.pending.iter().filter(|r| matches!(r, rumqttc::v5::Request::Publish(p) if p.pkid == 0));
                    acks.disconnected(unsent.count());
                    Err(err.to_string())
                }
            },
        };
        match &event {
            Ok(Event::Connected { session_present }) => {
                if !session_present {
                    self.acks.session_lost();
                }
                self.connected.store(true, Ordering::Release);
            }
            Err(_) => self.connected.store(false, Ordering::Release),
            _ => {}
        }
        event
    }
}

/// A subscription filter's share group and the filter topics are matched against:
/// `$share/GROUP/cameras/+/frames` is `(Some("GROUP"), "cameras/+/frames")`. The broker hands
/// each message of a shared subscription to one subscriber of the group (MQTT 5 4.8.2, and
/// mosquitto for 3.1.1 too), which is how several boards split one feed.
pub fn split_share(filter: &str) -> (Option<&str>, &str) {
    match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, filter)) => (Some(group), filter),
            None => (Some(rest), ""),
        },
        None => (None, filter),
    }
}

/// Backoff between reconnect attempts: 0.5 s doubling to 30 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(30))
}
