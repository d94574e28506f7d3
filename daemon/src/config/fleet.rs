//! The fleet's part of the configuration: where functions come from (`[registries]`, `[fleet]`)
//! and whom their signatures must come from (`[trust]`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Keys an artifact from a registry must be signed with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trust {
    /// PEM files of ECDSA P-256 public keys, as `cosign generate-key-pair` writes `cosign.pub`.
    /// Set: a function from a registry loads only if one of them signed it. Empty: it loads
    /// with a warning.
    pub keys: Vec<PathBuf>,
}

/// How functions are pulled.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fleet {
    /// One pull (manifest, signatures, config and module) must finish in this time.
    #[serde(with = "humantime_serde")]
    pub pull_timeout: Duration,
    /// A registry that sends nothing for this long is given up on.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// A module layer larger than this is refused before it is downloaded.
    pub max_module: ByteSize,
    /// A new version is on trial for its first `gate_calls` calls, or `gate_time`, whichever
    /// ends first; then it is committed.
    pub gate_calls: u64,
    #[serde(with = "humantime_serde")]
    pub gate_time: Duration,
    /// From this many calls on, the gate judges the version's faults and latency.
    pub gate_min_calls: u64,
    /// The share of calls (0 to 1) that may fault (trap, deadline, memory, output) on trial.
    pub gate_max_faults: f64,
    /// The version's p99 may be at most this many times the previous version's.
    pub gate_p99_ratio: f64,
    /// How often to ask the registry what a function's tag (`image = "oci://…:TAG"`) points
    /// at, and deploy a new digest on trial. Unset: never; the tag is read at start only.
    #[serde(with = "humantime_serde")]
    pub poll: Option<Duration>,
    /// Where signed deploy messages come from: the fleet's operator (`edgefn fleet`).
    pub channel: Option<Channel>,
    /// Where `deployment` events go upstream (CloudEvents, through the outbox like results):
    /// sinks written as a pipeline's are.
    pub events: Vec<super::SinkConfig>,
}

/// The fleet channel: one MQTT topic filter on the `[mqtt]` broker, or one Dapr subscription.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub mqtt: Option<String>,
    pub dapr: Option<super::DaprTopic>,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            pull_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(15),
            max_module: ByteSize::mib(64),
            gate_calls: 100,
            gate_time: Duration::from_secs(600),
            gate_min_calls: 10,
            gate_max_faults: 0.2,
            gate_p99_ratio: 3.0,
            poll: None,
            channel: None,
            events: Vec::new(),
        }
    }
}

/// One registry, by `HOST[:PORT]` as image references name it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registry {
    /// Plain HTTP when true, HTTPS when false. Unset: plain HTTP for loopback hosts only.
    pub insecure: Option<bool>,
    /// PEM file of the CA that signed the registry's certificate, trusted besides the system's.
    pub ca: Option<PathBuf>,
    /// HTTP basic auth (the registry may trade it for a bearer token).
    pub username: Option<String>,
    pub password: Option<String>,
    /// A bearer token, instead of a username and password.
    pub token: Option<String>,
}

pub type Registries = BTreeMap<String, Registry>;
