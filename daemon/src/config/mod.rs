//! The daemon's configuration: a TOML file plus `EDGEFN__SECTION__KEY` environment overrides.
//!
//! Every section rejects unknown keys, so a typo fails loudly with the key's name instead of
//! being silently ignored. Sizes are written like `"16 MiB"`, durations like `"5s"`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

mod fleet;
pub use self::fleet::{Channel, Fleet, Registries, Registry, Trust};

/// Where the packaged daemon looks for its configuration.
pub const DEFAULT_PATH: &str = "/etc/edgefn/edgefn.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This board's identity among the boards that share a feed.
    pub board: Board,
    pub server: Server,
    pub runtime: Runtime,
    /// Limits for every function that does not set its own.
    pub limits: Limits,
    /// Functions by name. Functions found in `runtime.functions_dir` need no entry here.
    pub functions: BTreeMap<String, FunctionConfig>,
    /// Inference models by name, loaded at start and reached from wasm through wasi-nn's
    /// `load_by_name`.
    pub models: BTreeMap<String, ModelConfig>,
    /// The broker cameras publish to; also where MQTT sinks publish.
    pub mqtt: Option<Mqtt>,
    pub dapr: Dapr,
    pub outbox: Outbox,
    /// Signing keys that functions from a registry must be signed with.
    pub trust: Trust,
    /// How functions are pulled from registries.
    pub fleet: Fleet,
    /// Per-registry TLS and credentials, by `HOST[:PORT]`.
    pub registries: Registries,
    #[serde(rename = "pipeline")]
    pub pipelines: Vec<PipelineConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Board {
    /// Names the board in every result id and CloudEvent `source`, so results of daemons that
    /// split one feed (an MQTT shared subscription) never collide. Unset: derived from
    /// `/etc/machine-id` (see [`crate::board`]).
    pub id: Option<String>,
    /// What the fleet knows the board by (`site = "depot-3"`): deploy messages select boards
    /// by them, and every `deployment` event names them.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    /// 4 (MQTT 3.1.1) or 5.
    pub version: u8,
    /// Stable, so the broker keeps our session (and queued frames) across restarts.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM files for TLS: the broker's CA, and our certificate and key for client auth.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Frames larger than this are refused with a warning naming the topic.
    pub max_frame: ByteSize,
}

impl Mqtt {
    /// What rumqttc would otherwise assert on (a panic at connect, so at start or reload) and
    /// what the protocol cannot carry.
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(matches!(self.version, 4 | 5), "mqtt.version must be 4 (3.1.1) or 5");
        anyhow::ensure!(
            self.url.starts_with("mqtt://") || self.url.starts_with("mqtts://"),
            "mqtt.url must start with mqtt:// or mqtts://"
        );
        // The session is kept across restarts, which needs a stable id of our own.
        anyhow::ensure!(
            !self.client_id.is_empty(),
            "mqtt.client_id must not be empty (the broker keeps our session by it)"
        );
        let secs = self.keep_alive.as_secs_f64();
        anyhow::ensure!(
            secs <= u16::MAX as f64,
            "mqtt.keep_alive must be at most {} s (MQTT carries it in 16 bits)",
            u16::MAX
        );
        match self.version {
            5 => anyhow::ensure!(secs >= 5.0, "mqtt.keep_alive must be at least 5 s with MQTT 5"),
            _ => anyhow::ensure!(
                self.keep_alive.is_zero() || secs >= 1.0,
                "mqtt.keep_alive must be 0 (off) or at least 1 s with MQTT 3.1.1"
            ),
        }
        anyhow::ensure!(self.max_frame.as_u64() > 0, "mqtt.max_frame must be positive");
        // The packet cap we ask for is 4 × max_frame, and MQTT 5 carries it in 32 bits.
        anyhow::ensure!(self.max_frame.as_u64() <= 256 << 20, "mqtt.max_frame must be at most 256 MiB");
        Ok(())
    }
}

/// What a new outbox file takes (redb starts it with 1 MiB of pages), with room to work: the
/// file may not grow past `max_bytes` (`sinks::outbox::capped`).
const MIN_OUTBOX_BYTES: u64 = 2 << 20;

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            url: "mqtt://127.0.0.1:1883".into(),
            version: 4,
            client_id: "edgefn".into(),
            username: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
            keep_alive: Duration::from_secs(30),
            max_frame: ByteSize::mib(8),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dapr {
    /// The sidecar's HTTP API. `DAPR_HTTP_PORT` (set by `dapr run`) overrides the port.
    pub url: String,
    /// How long to wait for the sidecar's outbound health at start before going on without it.
    #[serde(with = "humantime_serde")]
    pub startup_wait: Duration,
    /// The sidecar's request body limit (daprd's `--max-body-size`, 4 MiB by default). Bulk
    /// batches are cut to fit under it, and a result that can never fit is dead-lettered.
    pub max_request: ByteSize,
}

impl Default for Dapr {
    fn default() -> Self {
        Dapr {
            url: "http://127.0.0.1:3500".into(),
            startup_wait: Duration::from_secs(10),
            max_request: ByteSize::mib(4),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outbox {
    /// What the outbox file may take on disk, dead letters included; the oldest are evicted
    /// (and counted) to stay under it.
    pub max_bytes: ByteSize,
    /// Results and dead letters older than this are evicted (and counted), in every sink.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long a commit may wait for other cameras' frames due within it, to share its
    /// fsync. Its cost is up to that much more latency before a frame is acknowledged; a frame
    /// that nothing can join (one camera, a serial client, slow cameras) does not wait. 0
    /// commits what is waiting at once.
    #[serde(with = "humantime_serde")]
    pub commit_window: Duration,
}

/// A few milliseconds: at 100 frames/s over 4 cameras, 22 % fewer fsyncs for 0.1 ms more p50
/// (`cargo bench --bench frame_cost`). An SD-card board may trade more: 50 ms took a third.
pub const DEFAULT_COMMIT_WINDOW: Duration = Duration::from_millis(5);

/// The longest `commit_window` accepted: past it, acknowledgements would wait on the timer
/// longer than any camera's publish timeout allows for.
pub const MAX_COMMIT_WINDOW: Duration = Duration::from_secs(1);

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            max_bytes: ByteSize::mib(512),
            max_age: Duration::from_secs(7 * 24 * 3600),
            commit_window: DEFAULT_COMMIT_WINDOW,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub name: String,
    #[serde(default)]
    pub source: Source,
    /// A chain: each function's output is the next one's input.
    pub functions: Vec<String>,
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// Frames waiting per camera before the policy applies.
    #[serde(default = "default_queue")]
    pub queue: usize,
    #[serde(default)]
    pub policy: Policy,
    /// How long a silent camera keeps its place among the pipeline's 256.
    #[serde(default = "default_camera_idle", with = "humantime_serde")]
    pub camera_idle: Duration,
}

fn default_queue() -> usize {
    2
}

fn default_camera_idle() -> Duration {
    Duration::from_secs(600)
}

/// Where a pipeline's frames come from. HTTP can always feed a pipeline too.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// An MQTT topic filter; the camera id is the first wildcard level.
    pub mqtt: Option<String>,
    /// A Dapr pub/sub subscription (edgefn as a Dapr app).
    pub dapr: Option<DaprTopic>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaprTopic {
    pub pubsub: String,
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SinkConfig {
    Dapr(DaprTopic),
    /// Topic template with `{camera}` and `{pipeline}`.
    Mqtt {
        topic: String,
    },
    /// JSON lines appended to a file.
    File {
        path: PathBuf,
    },
}

/// What a full camera queue does with a new frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Drop the oldest waiting frame (counted): a live view wants the newest frame.
    #[default]
    Latest,
    /// Stop reading from the broker until there is room: nothing dropped here.
    Block,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Loopback by default: exposing the daemon is a deliberate act.
    pub listen: SocketAddr,
    /// Largest request body accepted.
    pub max_body: ByteSize,
    /// How long in-flight requests get to finish on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// When set, every route but the page itself and `/healthz` needs
    /// `Authorization: Bearer <token>` (or `?token=` for the page's live stream and images).
    /// Set it whenever `listen` is not loopback.
    pub token: Option<String>,
    /// Host names the API may be reached by, besides IP addresses, `localhost` and the
    /// board's own host name; web pages from other hosts are refused (DNS rebinding,
    /// cross-site requests).
    pub allowed_hosts: Vec<String>,
    /// A file whose first line the page shows as a notice, re-read every second: a note from
    /// whoever runs the board (the demo writes its sidecar build's progress there).
    pub notice_file: Option<PathBuf>,
    /// Open connections at most (also held under half the open-file limit). Past it, a new
    /// connection replaces the oldest one that has no request in progress.
    pub max_connections: usize,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            max_body: ByteSize::mib(16),
            shutdown_grace: Duration::from_secs(10),
            token: None,
            allowed_hosts: Vec::new(),
            notice_file: None,
            max_connections: 512,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Every `NAME.wasm` or `NAME.cwasm` here becomes function `NAME`; a `.cwasm` only if the
    /// root-owned `SHA256SUMS` beside it lists its digest (`runtime::aot`).
    pub functions_dir: PathBuf,
    /// Native code compiled from `.wasm` files, so a restart compiles nothing.
    pub cache_dir: PathBuf,
    /// Durable state: the outbox.
    pub state_dir: PathBuf,
    /// LiteRT's C library (`libLiteRt.so`), opened only when `[models]` are configured.
    pub litert: PathBuf,
}

impl Default for Runtime {
    fn default() -> Self {
        // systemd's CacheDirectory= exports CACHE_DIRECTORY; honour it when nothing is configured.
        let cache = std::env::var_os("CACHE_DIRECTORY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/edgefn"));
        let state =
            std::env::var_os("STATE_DIRECTORY").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/edgefn"));
        Runtime {
            functions_dir: PathBuf::from("/usr/lib/edgefn/functions"),
            cache_dir: cache.join("aot"),
            state_dir: state,
            litert: PathBuf::from("/usr/lib/edgefn/libLiteRt.so"),
        }
    }
}

/// Resource limits of one function. Each broken limit has its own error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Cap on the function's linear memory.
    pub memory: ByteSize,
    /// Wall-clock time one invocation may take.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Cap on what the function writes to stdout.
    pub max_output: ByteSize,
    /// Instances of this function that may run at once; further calls wait up to the deadline.
    pub max_instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: ByteSize::mib(256),
            deadline: Duration::from_secs(5),
            max_output: ByteSize::mib(16),
            max_instances: 4,
        }
    }
}

/// One function's entry. Unset limits fall back to the `[limits]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionConfig {
    /// A `.wasm` (compiled and cached) or `.cwasm` (precompiled); relative to `functions_dir`.
    pub path: Option<PathBuf>,
    /// An OCI artifact instead of a file: `oci://HOST[:PORT]/REPO:TAG` or `...@sha256:DIGEST`.
    pub image: Option<String>,
    pub memory: Option<ByteSize>,
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
    pub max_output: Option<ByteSize>,
    pub max_instances: Option<u32>,
    /// Environment variables granted to the function. The host's own are never passed.
    pub env: BTreeMap<String, String>,
    /// Arguments after argv[0] (which is the function's name).
    pub args: Vec<String>,
    /// Host directories the function may open: guest path → host path, read-only.
    pub dirs: BTreeMap<String, PathBuf>,
    /// Models the function may load through wasi-nn. Unset: all of `[models]`, if the
    /// function imports wasi-nn at all.
    pub models: Option<Vec<String>>,
}

/// One inference model, shared by every function granted it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub encoding: Encoding,
    /// CPU threads one inference uses.
    #[serde(default = "one")]
    pub threads: u32,
    /// Compiled copies of the model; at most this many inferences run at once.
    #[serde(default = "one")]
    pub contexts: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Tflite,
}

impl FunctionConfig {
    pub fn limits(&self, defaults: &Limits) -> Limits {
        Limits {
            memory: self.memory.unwrap_or(defaults.memory),
            deadline: self.deadline.unwrap_or(defaults.deadline),
            max_output: self.max_output.unwrap_or(defaults.max_output),
            max_instances: self.max_instances.unwrap_or(defaults.max_instances),
        }
    }
}

impl Config {
    /// Loads `path` (it must exist when `required`) and applies `EDGEFN__*` overrides.
    pub fn load(path: &Path, required: bool) -> anyhow::Result<Config> {
        let builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml).required(required))
            .add_source(
                config::Environment::with_prefix("EDGEFN").prefix_separator("__").separator("__").try_parsing(true),
            );
        Config::build(builder, &path.display().to_string())
    }

    /// TOML text alone, without environment overrides, checked as [`Config::load`] checks a file.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let builder = config::Config::builder().add_source(config::File::from_str(text, config::FileFormat::Toml));
        Config::build(builder, "text")
    }

    fn build(builder: config::ConfigBuilder<config::builder::DefaultState>, origin: &str) -> anyhow::Result<Config> {
        let built = builder.build().with_context(|| format!("reading config {origin}"))?;
        let cfg: Config = built.try_deserialize().with_context(|| format!("invalid config {origin}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let check = |name: &str, l: &Limits| -> anyhow::Result<()> {
            anyhow::ensure!(l.max_instances > 0, "{name}: max_instances must be at least 1");
            anyhow::ensure!(!l.deadline.is_zero(), "{name}: deadline must be positive");
            anyhow::ensure!(l.memory.as_u64() >= 65536, "{name}: memory must be at least 64 KiB");
            Ok(())
        };
        check("limits", &self.limits)?;
        if let Some(id) = &self.board.id {
            anyhow::ensure!(crate::board::valid_id(id), "board.id `{id}` must be 1 to 64 of [A-Za-z0-9._-]");
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.pipelines {
            let at = format!("pipeline `{}`", p.name);
            anyhow::ensure!(is_valid_name(&p.name), "{at}: names are [a-z0-9_-]+");
            anyhow::ensure!(names.insert(&p.name), "{at}: defined twice");
            anyhow::ensure!(!p.functions.is_empty(), "{at}: `functions` is empty");
            anyhow::ensure!(p.queue > 0, "{at}: `queue` must be at least 1");
            if let Some(filter) = &p.source.mqtt {
                anyhow::ensure!(self.mqtt.is_some(), "{at}: source.mqtt needs an [mqtt] section");
                let (group, camera_filter) = crate::mqtt::split_share(filter);
                if let Some(group) = group {
                    anyhow::ensure!(
                        !group.is_empty() && !group.contains(['+', '#']),
                        "{at}: source.mqtt `{filter}`: a shared subscription is `$share/GROUP/FILTER`, GROUP without wildcards"
                    );
                }
                anyhow::ensure!(
                    camera_filter.split('/').any(|l| l == "+"),
                    "{at}: source.mqtt `{filter}` needs a `+` level for the camera id"
                );
            }
            self.check_sinks(&at, &p.sinks)?;
        }
        self.check_fleet()?;
        if let Some(m) = &self.mqtt {
            m.validate()?;
        }
        anyhow::ensure!(
            self.outbox.max_bytes.as_u64() >= MIN_OUTBOX_BYTES,
            "outbox.max_bytes must be at least 2 MiB: the outbox file takes 1 MiB from the start"
        );
        anyhow::ensure!(!self.outbox.max_age.is_zero(), "outbox.max_age must be positive");
        anyhow::ensure!(
            self.outbox.commit_window <= MAX_COMMIT_WINDOW,
            "outbox.commit_window must be at most {}",
            humantime::format_duration(MAX_COMMIT_WINDOW)
        );
        anyhow::ensure!(self.dapr.max_request.as_u64() >= 1024, "dapr.max_request must be at least 1 KiB");
        anyhow::ensure!(!self.fleet.pull_timeout.is_zero(), "fleet.pull_timeout must be positive");
        anyhow::ensure!(!self.fleet.stall_timeout.is_zero(), "fleet.stall_timeout must be positive");
        anyhow::ensure!(self.fleet.max_module.as_u64() >= 1024, "fleet.max_module must be at least 1 KiB");
        let f = &self.fleet;
        anyhow::ensure!(
            f.gate_min_calls >= 1 && f.gate_calls >= f.gate_min_calls,
            "fleet.gate_calls must be at least fleet.gate_min_calls, itself at least 1"
        );
        anyhow::ensure!(!f.gate_time.is_zero(), "fleet.gate_time must be positive");
        anyhow::ensure!((0.0..=1.0).contains(&f.gate_max_faults), "fleet.gate_max_faults is a share, 0 to 1");
        anyhow::ensure!(
            f.gate_p99_ratio >= 1.0 && f.gate_p99_ratio.is_finite(),
            "fleet.gate_p99_ratio must be at least 1"
        );
        for (host, r) in &self.registries {
            anyhow::ensure!(
                r.token.is_none() || (r.username.is_none() && r.password.is_none()),
                "registries.\"{host}\": set `token` or `username` and `password`, not both"
            );
            anyhow::ensure!(
                r.username.is_some() == r.password.is_some(),
                "registries.\"{host}\": `username` and `password` go together"
            );
        }
        for (name, f) in &self.functions {
            anyhow::ensure!(is_valid_name(name), "functions.{name}: names are [a-z0-9_-]+");
            if let Some(image) = &f.image {
                anyhow::ensure!(f.path.is_none(), "functions.{name}: set `path` or `image`, not both");
                crate::fleet::ImageRef::parse(image).map_err(|e| anyhow::anyhow!("functions.{name}.image: {e}"))?;
            }
            check(&format!("functions.{name}"), &f.limits(&self.limits))?;
            for m in f.models.iter().flatten() {
                anyhow::ensure!(self.models.contains_key(m), "functions.{name}.models: no [models.{m}]");
            }
        }
        for (name, m) in &self.models {
            anyhow::ensure!(is_valid_name(name), "models.{name}: names are [a-z0-9_-]+");
            anyhow::ensure!((1..=64).contains(&m.threads), "models.{name}.threads must be 1..=64");
            anyhow::ensure!((1..=64).contains(&m.contexts), "models.{name}.contexts must be 1..=64");
        }
        Ok(())
    }

    fn check_sinks(&self, at: &str, sinks: &[SinkConfig]) -> anyhow::Result<()> {
        for s in sinks {
            if let SinkConfig::Mqtt { topic } = s {
                anyhow::ensure!(self.mqtt.is_some(), "{at}: an mqtt sink needs an [mqtt] section");
                // A broker refuses every publish to such a topic, and the sink would jam.
                anyhow::ensure!(
                    !topic.is_empty() && !topic.contains(['+', '#', '\0']),
                    "{at}: mqtt sink topic `{topic}` must be a topic name, without `+`, `#` or NUL"
                );
            }
        }
        Ok(())
    }

    fn check_fleet(&self) -> anyhow::Result<()> {
        for (k, v) in &self.board.labels {
            anyhow::ensure!(
                crate::board::valid_id(k) && !v.is_empty() && v.len() <= 128,
                "board.labels: `{k}` must be 1 to 64 of [A-Za-z0-9._-], with a value of 1 to 128 characters"
            );
        }
        self.check_sinks("fleet.events", &self.fleet.events)?;
        anyhow::ensure!(
            self.fleet.events.is_empty() || !self.pipelines.is_empty(),
            "fleet.events: deployment events go through the outbox, which needs at least one [[pipeline]]"
        );
        if let Some(poll) = self.fleet.poll {
            anyhow::ensure!(poll >= Duration::from_secs(1), "fleet.poll must be at least 1 s");
        }
        if let Some(c) = &self.fleet.channel {
            anyhow::ensure!(
                c.mqtt.is_some() != c.dapr.is_some(),
                "fleet.channel: set `mqtt` (a topic filter) or `dapr` (a pub/sub topic), one of them"
            );
            anyhow::ensure!(
                c.mqtt.is_none() || self.mqtt.is_some(),
                "fleet.channel.mqtt needs an [mqtt] section (the broker)"
            );
            if let Some(filter) = &c.mqtt {
                anyhow::ensure!(!filter.is_empty(), "fleet.channel.mqtt must not be empty");
            }
            // Deploy messages are signed; with nothing to check them against, none is taken.
            anyhow::ensure!(
                !self.trust.keys.is_empty(),
                "fleet.channel: deploy messages must be signed, and [trust] keys is empty"
            );
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `edgefn check-config`.
    /// Secrets are masked: the output goes to terminals, tickets and chat.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        let mask = |s: &mut Option<String>| {
            if s.is_some() {
                *s = Some("********".into());
            }
        };
        mask(&mut shown.server.token);
        if let Some(m) = &mut shown.mqtt {
            mask(&mut m.password);
        }
        for r in shown.registries.values_mut() {
            mask(&mut r.password);
            mask(&mut r.token);
        }
        toml::to_string_pretty(&shown).expect("config serialises")
    }
}

/// Function names appear in URLs, metric labels and file names.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod parse_tests {
    use super::Config;

    #[test]
    fn text_is_checked_as_a_file_is() {
        let cfg = Config::parse("[[pipeline]]\nname = \"p\"\nfunctions = [\"echo\"]\ncamera_idle = \"2m\"\n").unwrap();
        assert_eq!(cfg.pipelines[0].camera_idle, std::time::Duration::from_secs(120));
        let err = Config::parse("[server]\nlisten_typo = 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("listen_typo"), "{err:#}");
        assert!(Config::parse("[[pipeline]]\nname = \"Bad Name\"\nfunctions = [\"x\"]\n").is_err());
    }

    /// Each of these passed `check-config` once, then panicked rumqttc at connect (so at start,
    /// or at a SIGHUP) or jammed a sink; each is refused naming its key.
    #[test]
    fn what_rumqttc_asserts_and_what_jams_a_sink_is_refused_naming_the_key() {
        let mqtt = |v: u8, extra: &str| format!("[mqtt]\nversion = {v}\n{extra}\n");
        let pipeline = |sink: &str| {
            format!(
                "{}[[pipeline]]\nname = \"p\"\nfunctions = [\"echo\"]\nsinks = [{{ mqtt = {{ topic = \"{sink}\" }} }}]\n",
                mqtt(4, "")
            )
        };
        let refused = [
            (mqtt(5, "keep_alive = \"2s\""), "mqtt.keep_alive"),
            (mqtt(4, "keep_alive = \"500ms\""), "mqtt.keep_alive"),
            (mqtt(4, "keep_alive = \"1day\""), "mqtt.keep_alive"),
            (mqtt(5, "client_id = \"\""), "mqtt.client_id"),
            (mqtt(4, "client_id = \"\""), "mqtt.client_id"),
            (mqtt(4, "max_frame = \"0 B\""), "mqtt.max_frame"),
            ("[outbox]\nmax_bytes = \"0 B\"\n".into(), "outbox.max_bytes"),
            ("[outbox]\nmax_age = \"0s\"\n".into(), "outbox.max_age"),
            ("[outbox]\ncommit_window = \"2s\"\n".into(), "outbox.commit_window"),
            ("[dapr]\nmax_request = \"0 B\"\n".into(), "dapr.max_request"),
            (pipeline("results/+/{camera}"), "mqtt sink topic"),
            (pipeline("results/#"), "mqtt sink topic"),
            (pipeline(""), "mqtt sink topic"),
        ];
        for (text, key) in refused {
            let err = Config::parse(&text).map(|_| ()).unwrap_err();
            assert!(format!("{err:#}").contains(key), "{text:?}: {err:#}");
        }
        assert!(Config::parse(&mqtt(5, "keep_alive = \"5s\"")).is_ok());
        assert!(Config::parse(&mqtt(4, "keep_alive = \"0s\"")).is_ok());
        assert!(Config::parse(&pipeline("results/{camera}/{pipeline}")).is_ok());
    }

    /// The fleet channel takes only signed messages, over something that exists.
    #[test]
    fn a_fleet_channel_needs_trust_keys_and_one_transport() {
        let keys = "[trust]\nkeys = [\"/etc/edgefn/cosign.pub\"]\n";
        let refused = [
            (format!("[mqtt]\n[fleet]\nchannel = {{ mqtt = \"t\" }}\n"), "[trust] keys is empty"),
            (format!("{keys}[fleet]\nchannel = {{ mqtt = \"t\" }}\n"), "needs an [mqtt] section"),
            (format!("{keys}[mqtt]\n[fleet]\nchannel = {{}}\n"), "one of them"),
            (format!("{keys}[fleet]\nevents = [{{ file = {{ path = \"/tmp/e\" }} }}]\n"), "at least one [[pipeline]]"),
            ("[board]\nlabels = { \"a/b\" = \"x\" }\n".into(), "board.labels"),
            ("[fleet]\npoll = \"10ms\"\n".into(), "fleet.poll"),
        ];
        for (text, why) in refused {
            let err = Config::parse(&text).map(|_| ()).unwrap_err();
            assert!(format!("{err:#}").contains(why), "{text:?}: {err:#}");
        }
        let ok = format!(
            "{keys}[mqtt]\n[board]\nlabels = {{ site = \"depot-3\" }}\n[fleet]\nchannel = {{ mqtt = \"edgefn/fleet/deploy\" }}\n"
        );
        assert_eq!(Config::parse(&ok).unwrap().board.labels["site"], "depot-3");
    }

    /// Every config `check-config` accepts builds its MQTT options without a panic (the config
    /// fuzz target runs this on every input it makes).
    #[test]
    fn accepted_mqtt_settings_build_their_options() {
        for text in [
            "[mqtt]\nversion = 5\nkeep_alive = \"5s\"\n",
            "[mqtt]\nkeep_alive = \"0s\"\n",
            "[mqtt]\nkeep_alive = \"1s\"\n",
        ] {
            let cfg = Config::parse(text).unwrap();
            crate::mqtt::connect(cfg.mqtt.as_ref().unwrap(), "", 1 << 20).unwrap();
        }
    }
}
