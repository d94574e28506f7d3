//! The function runtime: every configured WebAssembly function, loaded once, invoked many times.
//!
//! `Runtime::load` finds the functions, compiles or maps their native code (see [`aot`]), links
//! them, and sizes the instance pool; `Runtime::invoke` runs one and records its metrics. A
//! function that cannot load is kept as a named failure, so callers get its cause instead of a
//! 404, and the rest keep serving.

pub mod aot;
mod engine;
mod error;
mod function;
pub mod nn;
mod pipe;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;

use self::engine::{EpochTicker, PoolSize};
pub use self::error::{InvokeError, panic_text};
pub use self::function::{Function, Grants, Output};

/// Runs `f`, which blocks its thread in a host call, so that the async workers go on serving:
/// on a multi-thread runtime tokio moves this worker's other tasks to another thread while
/// it blocks. (A current-thread runtime, as `edgefn invoke` uses, has nothing else to run.)
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
use crate::config::{self, Config, Limits};
use crate::metrics::{ErrorLabel, FunctionLabel, Metrics};

pub struct Runtime {
    functions: BTreeMap<String, Arc<Function>>,
    /// Functions that are configured but could not load, with the cause.
    failed: BTreeMap<String, String>,
    models: nn::Models,
    metrics: Arc<Metrics>,
    ticker: EpochTicker,
}

/// A function to load: where from, with which limits and grants.
struct Spec {
    name: String,
    path: PathBuf,
    limits: Limits,
    grants: Grants,
    models: Option<Vec<String>>,
}

/// Where each function with an `image` was fetched to (a verified module file), or why it was
/// not: the fleet fetches, the runtime only loads.
pub type Fetched = BTreeMap<String, Result<PathBuf, String>>;

impl Runtime {
    /// Loads every function the config names or `functions_dir` holds; with `only`, just that
    /// one. Functions with an `image` load from `fetched`.
    pub fn load(cfg: &Config, metrics: Arc<Metrics>, only: Option<&str>, fetched: &Fetched) -> anyhow::Result<Runtime> {
        let (mut specs, mut failed) = discover(cfg, fetched);
        if let Some(name) = only {
            specs.retain(|s| s.name == name);
            failed.retain(|n, _| n == name);
        }
        let pool = PoolSize {
            slots: specs.iter().map(|s| s.limits.max_instances).sum::<u32>().max(1),
            max_memory: specs.iter().map(|s| s.limits.memory.as_u64()).max().unwrap_or(1 << 20),
        };
        let engine = engine::host_engine(&pool)?;
        let models = nn::Models::load(cfg, &metrics);

        let mut functions = BTreeMap::new();
        for spec in specs {
            let loaded = aot::load(&engine, &spec.path, &cfg.runtime.cache_dir).and_then(|m| {
                match m.origin {
                    aot::Origin::Compiled => metrics.aot_compiles.inc(),
                    aot::Origin::Cached | aot::Origin::Precompiled => metrics.aot_loads.inc(),
                };
                Function::new(
                    &engine,
                    spec.name.clone(),
                    spec.path.clone(),
                    m,
                    spec.limits,
                    spec.grants,
                    &models,
                    spec.models.as_deref(),
                )
            });
            match loaded {
                Ok(f) => {
                    metrics.declare_function(&f.name, &InvokeError::KINDS);
                    tracing::info!(
                        function = %f.name, path = %f.path.display(), origin = ?f.origin,
                        sha256 = %&f.sha256[..16], "function loaded"
                    );
                    functions.insert(spec.name, Arc::new(f));
                }
                Err(e) => {
                    tracing::error!(function = %spec.name, "function not loaded: {e:#}");
                    failed.insert(spec.name, format!("{e:#}"));
                }
            }
        }
        let ticker = EpochTicker::start(engine.clone());
        Ok(Runtime { functions, failed, models, metrics, ticker })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Function>> {
        self.functions.get(name)
    }

    pub fn functions(&self) -> impl Iterator<Item = &Arc<Function>> {
        self.functions.values()
    }

    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    pub fn models(&self) -> &nn::Models {
        &self.models
    }

    /// Failed invocations of `name`, all kinds together.
    pub fn error_count(&self, name: &str) -> u64 {
        InvokeError::KINDS
            .iter()
            .map(|kind| {
                let label = ErrorLabel { function: name.to_string(), kind };
                self.metrics.errors.get_or_create(&label).get()
            })
            .sum()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs function `name` on `input`, with `env` added to what its config grants.
    pub async fn invoke(&self, name: &str, input: Bytes, env: &[(&str, &str)]) -> Result<Output, InvokeError> {
        let Some(function) = self.functions.get(name) else {
            return Err(match self.failed.get(name) {
                Some(cause) => InvokeError::Unavailable { function: name.into(), cause: cause.clone() },
                None => InvokeError::UnknownFunction { function: name.into() },
            });
        };
        let label = FunctionLabel { function: function.name.clone() };
        self.metrics.invocations.get_or_create(&label).inc();
        let started = std::time::Instant::now();
        // wasmtime-wasi-nn panics on some malformed guest arguments; one call fails, not the daemon.
        let result =
            AssertUnwindSafe(function.invoke(&self.ticker, input, env)).catch_unwind().await.unwrap_or_else(|panic| {
                Err(InvokeError::Trap {
                    function: function.name.clone(),
                    cause: format!("host panic: {}", error::panic_text(panic.as_ref())),
                })
            });
        let elapsed = started.elapsed();
        self.metrics.latency.get_or_create(&label).observe(elapsed.as_secs_f64());
        function.record(elapsed);
        if let Err(e) = &result {
            let label = ErrorLabel { function: function.name.clone(), kind: e.kind() };
            self.metrics.errors.get_or_create(&label).inc();
        }
        result
    }
}

/// Functions from `functions_dir` (by file stem, `.cwasm` preferred) and from `[functions]`.
fn discover(cfg: &Config, fetched: &Fetched) -> (Vec<Spec>, BTreeMap<String, String>) {
    let dir = &cfg.runtime.functions_dir;
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for path in entries.flatten().map(|e| e.path()) {
                let ext = path.extension().and_then(|e| e.to_str());
                let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                if !matches!(ext, Some("wasm" | "cwasm")) {
                    continue;
                }
                if !config::is_valid_name(stem) {
                    tracing::warn!(path = %path.display(), "skipping function: names are [a-z0-9_-]+");
                    continue;
                }
                let keep_existing = found.get(stem).is_some_and(|p| p.extension() == Some("cwasm".as_ref()));
                if !keep_existing {
                    found.insert(stem.to_string(), path);
                }
            }
        }
        Err(e) if cfg.functions.is_empty() => {
            tracing::warn!(dir = %dir.display(), "no functions: cannot read functions_dir: {e}")
        }
        Err(_) => {}
    }

    let mut failed = BTreeMap::new();
    let mut specs = Vec::new();
    for (name, path) in &found {
        if !cfg.functions.contains_key(name) {
            let grants = Grants::default();
            specs.push(Spec { name: name.clone(), path: path.clone(), limits: cfg.limits, grants, models: None });
        }
    }
    for (name, fc) in &cfg.functions {
        let path = match (&fc.path, found.get(name)) {
            _ if fc.image.is_some() => match fetched.get(name) {
                Some(Ok(p)) => p.clone(),
                Some(Err(cause)) => {
                    failed.insert(name.clone(), cause.clone());
                    continue;
                }
                None => {
                    failed.insert(name.clone(), "its image was not fetched".into());
                    continue;
                }
            },
            (Some(p), _) => resolve(dir, p),
            (None, Some(p)) => p.clone(),
            (None, None) => {
                let cause = format!("no {name}.wasm or {name}.cwasm in {} and no path set", dir.display());
                tracing::error!(function = %name, "function not loaded: {cause}");
                failed.insert(name.clone(), cause);
                continue;
            }
        };
        specs.push(Spec {
            name: name.clone(),
            path,
            limits: fc.limits(&cfg.limits),
            grants: fc.into(),
            models: fc.models.clone(),
        });
    }
    (specs, failed)
}

fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { dir.join(p) }
}
