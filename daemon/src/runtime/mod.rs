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
use std::sync::{Arc, RwLock};

use anyhow::Context;

use bytes::Bytes;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;

pub use self::engine::compilation_config;
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
use crate::metrics::{ErrorLabel, FunctionLabel, Metrics, VersionLabel};

pub struct Runtime {
    /// The version each name serves. A new version is switched in whole: a call holds the
    /// `Arc` it started with, so calls in flight finish on the old version.
    functions: RwLock<BTreeMap<String, Arc<Function>>>,
    /// Functions that are configured but could not load, with the cause.
    failed: RwLock<BTreeMap<String, String>>,
    /// How a function from an image is built again, for its next version.
    versioned: BTreeMap<String, Spec>,
    engine: wasmtime::Engine,
    cache_dir: PathBuf,
    models: nn::Models,
    metrics: Arc<Metrics>,
    ticker: EpochTicker,
}

/// A function to load: where from, with which limits and grants.
#[derive(Clone)]
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
        // A function from an image may run two versions at once while one is switched in
        // (calls in flight on the old, new calls on the new): it gets room for both.
        let versioned: BTreeMap<String, Spec> = specs
            .iter()
            .filter(|s| cfg.functions.get(&s.name).is_some_and(|f| f.image.is_some()))
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let pool = PoolSize {
            slots: specs
                .iter()
                .map(|s| s.limits.max_instances * if versioned.contains_key(&s.name) { 2 } else { 1 })
                .sum::<u32>()
                .max(1),
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
        for f in functions.values() {
            metrics
                .function_version
                .get_or_create(&VersionLabel { function: f.name.clone(), sha256: f.sha256.clone() })
                .set(1);
        }
        Ok(Runtime {
            functions: RwLock::new(functions),
            failed: RwLock::new(failed),
            versioned,
            engine,
            cache_dir: cfg.runtime.cache_dir.clone(),
            models,
            metrics,
            ticker,
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.functions.read().expect("functions lock").get(name).cloned()
    }

    pub fn functions(&self) -> Vec<Arc<Function>> {
        self.functions.read().expect("functions lock").values().cloned().collect()
    }

    pub fn failed(&self) -> BTreeMap<String, String> {
        self.failed.read().expect("failed lock").clone()
    }

    /// Whether `name` comes from an image, so that new versions of it can be loaded.
    pub fn is_versioned(&self, name: &str) -> bool {
        self.versioned.contains_key(name)
    }

    /// Compiles (or maps from the AOT cache) another version of the image function `name` from
    /// the module file `path`, with the same limits and grants. It serves nothing until
    /// [`Runtime::switch`]. Blocks on compilation: call it off the async workers.
    pub fn load_version(&self, name: &str, path: &Path) -> anyhow::Result<Arc<Function>> {
        let spec = self.versioned.get(name).with_context(|| format!("{name} does not come from an image"))?;
        let m = aot::load(&self.engine, path, &self.cache_dir)?;
        match m.origin {
            aot::Origin::Compiled => self.metrics.aot_compiles.inc(),
            aot::Origin::Cached | aot::Origin::Precompiled => self.metrics.aot_loads.inc(),
        };
        let f = Function::new(
            &self.engine,
            name.to_string(),
            path.to_path_buf(),
            m,
            spec.limits,
            spec.grants.clone(),
            &self.models,
            spec.models.as_deref(),
        )?;
        Ok(Arc::new(f))
    }

    /// Serves `function` under its name from the next call on; returns the version it replaced.
    pub fn switch(&self, function: Arc<Function>) -> Option<Arc<Function>> {
        let name = function.name.clone();
        self.metrics.declare_function(&name, &InvokeError::KINDS);
        self.show_version(&function);
        self.failed.write().expect("failed lock").remove(&name);
        let old = self.functions.write().expect("functions lock").insert(name.clone(), function);
        if let Some(old) = &old {
            self.metrics.function_version.remove(&VersionLabel { function: name, sha256: old.sha256.clone() });
        }
        old
    }

    fn show_version(&self, f: &Function) {
        self.metrics
            .function_version
            .get_or_create(&VersionLabel { function: f.name.clone(), sha256: f.sha256.clone() })
            .set(1);
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
        let Some(function) = self.get(name) else {
            return Err(match self.failed.read().expect("failed lock").get(name) {
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
        function.record(elapsed, result.as_ref().err().map(InvokeError::kind));
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
