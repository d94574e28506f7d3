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

/// Where the packaged daemon looks for its configuration.
pub const DEFAULT_PATH: &str = "/etc/edgefn/edgefn.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub runtime: Runtime,
    /// Limits for every function that does not set its own.
    pub limits: Limits,
    /// Functions by name. Functions found in `runtime.functions_dir` need no entry here.
    pub functions: BTreeMap<String, FunctionConfig>,
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
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            max_body: ByteSize::mib(16),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Every `NAME.wasm` or `NAME.cwasm` here becomes function `NAME`.
    pub functions_dir: PathBuf,
    /// Native code compiled from `.wasm` files, so a restart compiles nothing.
    pub cache_dir: PathBuf,
}

impl Default for Runtime {
    fn default() -> Self {
        // systemd's CacheDirectory= exports CACHE_DIRECTORY; honour it when nothing is configured.
        let cache = std::env::var_os("CACHE_DIRECTORY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/edgefn"));
        Runtime {
            functions_dir: PathBuf::from("/usr/lib/edgefn/functions"),
            cache_dir: cache.join("aot"),
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
        let built = config::Config::builder()
            .add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(required),
            )
            .add_source(
                config::Environment::with_prefix("EDGEFN")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .with_context(|| format!("reading config {}", path.display()))?;
        let cfg: Config = built
            .try_deserialize()
            .with_context(|| format!("invalid config {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let check = |name: &str, l: &Limits| -> anyhow::Result<()> {
            anyhow::ensure!(
                l.max_instances > 0,
                "{name}: max_instances must be at least 1"
            );
            anyhow::ensure!(!l.deadline.is_zero(), "{name}: deadline must be positive");
            anyhow::ensure!(
                l.memory.as_u64() >= 65536,
                "{name}: memory must be at least 64 KiB"
            );
            Ok(())
        };
        check("limits", &self.limits)?;
        for (name, f) in &self.functions {
            anyhow::ensure!(
                is_valid_name(name),
                "functions.{name}: names are [a-z0-9_-]+"
            );
            check(&format!("functions.{name}"), &f.limits(&self.limits))?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `edgefn check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Function names appear in URLs, metric labels and file names.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
