//! Inference for wasm functions: wasi-nn (`wasi_ephemeral_nn`, the API WasmEdge implements too)
//! on a native LiteRT backend, with every model loaded once at start.
//!
//! A function reaches a model by name (`load_by_name`); it never hands the host model bytes.
//! Each model keeps a fixed pool of compiled contexts, created at start. A call takes a permit
//! for each model it may use *before* its instance starts, asynchronously, so a context is
//! always free when the guest asks for one, and a waiting call never blocks a worker thread.

mod backend;
pub mod litert;
mod mapped;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::backend::ContextPool;
use crate::config::{Config, ModelConfig};
use crate::metrics::{Metrics, ModelLabel};

/// The configured models: loaded ones, and the cause for each that failed.
#[derive(Default)]
pub struct Models {
    loaded: BTreeMap<String, Arc<Model>>,
    failed: BTreeMap<String, String>,
}

/// One loaded model and its pool of compiled contexts.
pub struct Model {
    pub name: String,
    pool: Arc<ContextPool>,
    graph: wasmtime_wasi_nn::Graph,
    permits: Arc<Semaphore>,
}

impl Models {
    /// Loads every `[models]` entry. Failures are logged with the config key to fix and kept,
    /// so functions that need the model get that cause and everything else keeps working.
    pub fn load(cfg: &Config, metrics: &Metrics) -> Models {
        let mut models = Models::default();
        if cfg.models.is_empty() {
            return models;
        }
        let lib = match litert::Library::open(&cfg.runtime.litert) {
            Ok(lib) => lib,
            Err(e) => {
                let cause = format!("LiteRT unavailable (runtime.litert): {e}");
                for name in cfg.models.keys() {
                    tracing::warn!(model = %name, "model not loaded: {cause}");
                    models.failed.insert(name.clone(), cause.clone());
                }
                return models;
            }
        };
        for (name, mc) in &cfg.models {
            match Model::load(&lib, name, mc, metrics) {
                Ok(model) => {
                    models.loaded.insert(name.clone(), Arc::new(model));
                }
                Err(e) => {
                    let cause = format!("models.{name}.path = {}: {e:#}", mc.path.display());
                    tracing::warn!(model = %name, "model not loaded: {cause}");
                    models.failed.insert(name.clone(), cause);
                }
            }
        }
        models
    }

    /// What a function may use: the named models, or all of them. A name that failed to
    /// load makes the grant unusable, with that cause.
    pub fn grant(&self, names: Option<&[String]>) -> Grant {
        let all: Vec<String> = self.loaded.keys().chain(self.failed.keys()).cloned().collect();
        let mut grant = Grant::default();
        for name in names.unwrap_or(&all) {
            if let Some(m) = self.loaded.get(name) {
                grant.models.push(m.clone());
            } else if let Some(cause) = self.failed.get(name) {
                grant.unavailable.get_or_insert_with(|| format!("model {name} not loaded: {cause}"));
            }
        }
        // One order for every function, so two calls never hold each other's next permit.
        grant.models.sort_by(|a, b| a.name.cmp(&b.name));
        grant.models.dedup_by(|a, b| a.name == b.name);
        grant
    }

    pub fn loaded(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.loaded.values()
    }

    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }
}

impl Model {
    fn load(lib: &Arc<litert::Library>, name: &str, mc: &ModelConfig, metrics: &Metrics) -> anyhow::Result<Model> {
        anyhow::ensure!(Path::new(&mc.path).is_file(), "no such file");
        let model = litert::Model::load(lib, &mc.path)?;
        let label = ModelLabel { model: name.to_string() };
        metrics.model_loads.get_or_create(&label).inc();
        let timing = metrics.inference.get_or_create(&label).clone();
        let pool = ContextPool::new(name, &model, mc.threads, mc.contexts, timing)?;
        // XNNPACK has its own packed copy of the weights now.
        model.release_file_pages();
        metrics.model_contexts.get_or_create(&label).set(pool.size() as i64);
        tracing::info!(
            model = %name, path = %mc.path.display(), threads = mc.threads, contexts = mc.contexts,
            input = ?model.inputs[0].dims, output = ?model.outputs.first().map(|t| &t.dims), "model loaded"
        );
        let graph = backend::graph(pool.clone());
        Ok(Model { name: name.to_string(), pool, graph, permits: Arc::new(Semaphore::new(mc.contexts as usize)) })
    }

    /// The model as wasi-nn hands it to a guest (the wasi-nn fuzz target drives it directly).
    pub fn graph(&self) -> &wasmtime_wasi_nn::Graph {
        &self.graph
    }

    /// Compiled contexts that exist (all created at start).
    pub fn contexts(&self) -> usize {
        self.pool.size()
    }

    /// Contexts idle now.
    pub fn idle(&self) -> usize {
        self.pool.idle()
    }
}

/// The models one function may use. `unavailable` names the first granted model that failed.
#[derive(Default, Clone)]
pub struct Grant {
    models: Vec<Arc<Model>>,
    pub unavailable: Option<String>,
}

impl Grant {
    pub fn is_empty(&self) -> bool {
        self.models.is_empty() && self.unavailable.is_none()
    }

    /// Waits until each granted model has a free context, and reserves them for one call.
    pub async fn reserve(&self) -> Reservation {
        let mut permits = Vec::with_capacity(self.models.len());
        for m in &self.models {
            permits.push(m.permits.clone().acquire_owned().await.expect("model permits are never closed"));
        }
        Reservation { _permits: permits }
    }

    /// The per-call wasi-nn state: these models by name, and no way to load others.
    pub fn context(&self) -> wasmtime_wasi_nn::witx::WasiNnCtx {
        let graphs = self.models.iter().map(|m| (m.name.clone(), m.graph.clone())).collect();
        wasmtime_wasi_nn::witx::WasiNnCtx::new(
            Vec::<wasmtime_wasi_nn::Backend>::new(),
            backend::Registry::new(graphs).into(),
        )
    }
}

/// Held for the length of a call: its contexts stay reserved until the store is gone.
pub struct Reservation {
    _permits: Vec<OwnedSemaphorePermit>,
}
