//! LiteRT as a wasmtime-wasi-nn backend: a graph is a pool of compiled contexts, and an
//! execution context is one of them, borrowed for a call and returned when the call's store
//! is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;

use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, BackendGraph, Id, NamedTensor};
use wasmtime_wasi_nn::wit::TensorType as WitType;
use wasmtime_wasi_nn::{ExecutionContext, Graph, GraphRegistry, Tensor};

use super::litert::{self, Compiled, ELEMENT_F32, ELEMENT_U8};

/// A model's compiled contexts. All are created up front, so a call never compiles.
pub(super) struct ContextPool {
    name: String,
    idle: Mutex<Vec<Compiled>>,
    size: usize,
    timing: Histogram,
}

impl ContextPool {
    pub(super) fn new(
        name: &str,
        model: &Arc<litert::Model>,
        threads: u32,
        contexts: u32,
        timing: Histogram,
    ) -> Result<Arc<ContextPool>, litert::Error> {
        let idle = (0..contexts).map(|_| model.compile(threads)).collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(ContextPool { name: name.to_string(), size: idle.len(), idle: Mutex::new(idle), timing }))
    }

    pub(super) fn size(&self) -> usize {
        self.size
    }

    pub(super) fn idle(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

pub(super) fn graph(pool: Arc<ContextPool>) -> Graph {
    let boxed: Box<dyn BackendGraph> = Box::new(PooledGraph(pool));
    boxed.into()
}

struct PooledGraph(Arc<ContextPool>);

impl BackendGraph for PooledGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        // The caller reserved a context before it started, so this only fails for a guest that
        // opens a second context on the same model within one call.
        let ctx = self
            .0
            .idle
            .lock()
            .expect("pool lock")
            .pop()
            .ok_or_else(|| backend_error(format!("model {}: one execution context per call", self.0.name)))?;
        let inputs = vec![false; ctx.model().inputs.len()];
        let boxed: Box<dyn BackendExecutionContext> =
            Box::new(Borrowed { ctx: Some(ctx), pool: self.0.clone(), computed: false, inputs });
        Ok(boxed.into())
    }
}

/// A context on loan to one call.
struct Borrowed {
    ctx: Option<Compiled>,
    pool: Arc<ContextPool>,
    /// Outputs are readable only after this call's own compute, and compute runs only once
    /// this call has set every input: a context comes back to the pool cleared, but a guest
    /// must never be able to compute on, or read, what another call left in it.
    computed: bool,
    /// Which inputs this call has set.
    inputs: Vec<bool>,
}

impl Borrowed {
    fn ctx(&mut self) -> &mut Compiled {
        self.ctx.as_mut().expect("present until drop")
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if let Some(mut ctx) = self.ctx.take() {
            if let Err(e) = ctx.clear() {
                tracing::warn!(model = %self.pool.name, "clearing a context's buffers: {e}");
            }
            self.pool.idle.lock().expect("pool lock").push(ctx);
        }
    }
}

impl BackendExecutionContext for Borrowed {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let index = index(&id)?;
        let ctx = self.ctx();
        let Some(want) = ctx.model().inputs.get(index) else {
            return Err(backend_error(format!("the model has no input {index}")));
        };
        // WasmEdge's wasi-nn (and the older witx) numbers u8 as 2, which this witx calls f64;
        // a function written for both sends 2. The byte length still has to match exactly.
        let ty = match (tensor.ty, want.element) {
            (WitType::Fp64, ELEMENT_U8) => ELEMENT_U8,
            (other, _) => element(other)?,
        };
        if ty != want.element || tensor.dimensions != want.dims {
            return Err(backend_error(format!(
                "input {index} must be {} {:?}, got {} {:?}",
                type_name(want.element),
                want.dims,
                type_name(ty),
                tensor.dimensions
            )));
        }
        ctx.write_input(index, &tensor.data).map_err(into_backend)?;
        self.inputs[index] = true;
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        let index = index(&id)?;
        if !self.computed {
            return Err(backend_error("get_output before compute".to_string()));
        }
        let ctx = self.ctx();
        let Some(ty) = ctx.model().outputs.get(index).cloned() else {
            return Err(backend_error(format!("the model has no output {index}")));
        };
        let data = ctx.read_output(index).map_err(into_backend)?;
        let wit = if ty.element == ELEMENT_F32 { WitType::Fp32 } else { WitType::U8 };
        Ok(Tensor::new(ty.dims, wit, data))
    }

    fn compute(&mut self, inputs: Option<Vec<NamedTensor>>) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        if inputs.is_some() {
            // Named tensors belong to the component-model API, which we do not link.
            return Err(backend_error("named-tensor compute is not supported".to_string()));
        }
        if let Some(missing) = self.inputs.iter().position(|set| !set) {
            return Err(backend_error(format!("compute before set_input for input {missing}")));
        }
        let started = Instant::now();
        // Inference blocks its thread and no deadline interrupts it: tokio hands this worker's
        // other tasks (`/healthz`, the MQTT poller) to another thread meanwhile.
        let ctx = self.ctx();
        crate::runtime::blocking(|| ctx.run()).map_err(into_backend)?;
        self.pool.timing.observe(started.elapsed().as_secs_f64());
        self.computed = true;
        Ok(None)
    }
}

fn index(id: &Id) -> Result<usize, BackendError> {
    id.index().map(|i| i as usize).ok_or_else(|| backend_error("tensors are addressed by index".to_string()))
}

fn element(ty: WitType) -> Result<i32, BackendError> {
    match ty {
        WitType::U8 => Ok(ELEMENT_U8),
        WitType::Fp32 => Ok(ELEMENT_F32),
        other => Err(BackendError::UnsupportedTensorType(format!("{other:?}"))),
    }
}

fn type_name(element: i32) -> &'static str {
    if element == ELEMENT_F32 { "f32" } else { "u8" }
}

/// wasi-nn errors so far, for [`backend_error`]'s rate limit.
static ERRORS: AtomicUsize = AtomicUsize::new(0);

fn backend_error(msg: String) -> BackendError {
    // Logged here because wasi-nn hands the guest only an error code; at the 1st, 2nd, 4th,
    // 8th... error only, as model loads are, so a guest looping on errors cannot flood the
    // journal.
    let n = ERRORS.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(errors = n, "wasi-nn: {msg}");
    }
    BackendError::BackendAccess(wasmtime::Error::msg(msg))
}

fn into_backend(e: litert::Error) -> BackendError {
    backend_error(e.to_string())
}

/// Loads one call may make: each takes a slot in the call's graph table that lives as long as
/// the call, so a guest looping on `load_by_name` would grow host memory without bound.
pub(super) const MAX_LOADS: usize = 16;

/// The graphs one call may load by name, at most [`MAX_LOADS`] times.
pub(super) struct Registry {
    graphs: HashMap<String, Graph>,
    loads: AtomicUsize,
}

impl Registry {
    pub(super) fn new(graphs: HashMap<String, Graph>) -> Registry {
        Registry { graphs, loads: AtomicUsize::new(0) }
    }
}

impl Registry {
    fn admit(&self) -> bool {
        let n = self.loads.fetch_add(1, Ordering::Relaxed);
        if n == MAX_LOADS {
            // Once per call: a guest in a loop must not flood the journal either.
            tracing::warn!("wasi-nn: more than {MAX_LOADS} load_by_name calls in one call, refused");
        }
        n < MAX_LOADS
    }
}

// wasmtime-wasi-nn's `load_by_name` asks through `get_mut`; both count.
impl GraphRegistry for Registry {
    fn get(&self, name: &str) -> Option<&Graph> {
        if self.admit() { self.graphs.get(name) } else { None }
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        if self.admit() { self.graphs.get_mut(name) } else { None }
    }
}
