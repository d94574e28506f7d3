//! One loaded function and its invocation: a fresh, sandboxed instance per call.
//!
//! Instantiation is the hot path. The module is compiled once and linked once (`InstancePre`);
//! each call only takes a pooled slot, builds a WASI context that holds exactly what config
//! grants, runs `_start`, and drops the store.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use wasmtime::{Engine, InstancePre, Linker, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use super::aot::{LoadedModule, Origin};
use super::engine::EpochTicker;
use super::error::InvokeError;
use super::nn;
use super::pipe::CappedPipe;
use crate::config::{FunctionConfig, Limits};

/// What a function may see of the host: only what its config entry grants.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    pub dirs: Vec<(String, PathBuf)>,
}

impl From<&FunctionConfig> for Grants {
    fn from(c: &FunctionConfig) -> Grants {
        Grants {
            env: c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            args: c.args.clone(),
            dirs: c.dirs.iter().map(|(g, h)| (g.clone(), h.clone())).collect(),
        }
    }
}

/// Kept per call: enough of stderr to explain a failure and to log.
const STDERR_CAP: usize = 16 * 1024;

pub struct Function {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub origin: Origin,
    pub limits: Limits,
    grants: Grants,
    /// Models it may load through wasi-nn; empty unless the module imports wasi-nn.
    models: nn::Grant,
    pre: InstancePre<Host>,
    slots: Semaphore,
    /// Latencies of the last calls (µs), for p50/p99 on the page and a rollout's gate.
    recent: std::sync::Mutex<std::collections::VecDeque<u32>>,
    calls: std::sync::atomic::AtomicU64,
    faults: std::sync::atomic::AtomicU64,
    /// Woken at each call's end, so a rollout's gate judges every call, not every tick.
    recorded: tokio::sync::Notify,
}

/// Calls kept for the latency percentiles.
const RECENT: usize = 512;

/// The per-call store state.
pub struct Host {
    wasi: WasiP1Ctx,
    nn: wasmtime_wasi_nn::witx::WasiNnCtx,
    memory: MemoryCap,
}

struct MemoryCap {
    limit: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        // Refuse rather than trap: a function may handle a failed grow; if it doesn't, the
        // flag still names the cause.
        self.hit |= desired > self.limit;
        Ok(desired <= self.limit)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Output of a successful invocation.
#[derive(Debug)]
pub struct Output {
    pub stdout: Bytes,
}

impl Function {
    pub(super) fn new(
        engine: &Engine,
        name: String,
        path: PathBuf,
        loaded: LoadedModule,
        limits: Limits,
        grants: Grants,
        models: &nn::Models,
        model_names: Option<&[String]>,
    ) -> anyhow::Result<Function> {
        let mut linker: Linker<Host> = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |h: &mut Host| &mut h.wasi)
            .map_err(|e| anyhow::anyhow!("linking WASI: {e}"))?;
        wasmtime_wasi_nn::witx::add_to_linker(&mut linker, |h: &mut Host| &mut h.nn)
            .map_err(|e| anyhow::anyhow!("linking wasi-nn: {e}"))?;
        let uses_nn = loaded.module.imports().any(|i| i.module() == "wasi_ephemeral_nn");
        let mut models = if uses_nn { models.grant(model_names) } else { nn::Grant::default() };
        if uses_nn && models.is_empty() {
            tracing::warn!(function = %name, "imports wasi-nn but no [models] are configured");
            models.unavailable = Some("it needs a model (wasi-nn) and no [models] are configured".into());
        }
        let pre = linker
            .instantiate_pre(&loaded.module)
            .map_err(|e| anyhow::anyhow!("{}: imports not satisfiable: {e}", path.display()))?;
        anyhow::ensure!(
            loaded.module.get_export("_start").is_some(),
            "{}: not a WASI command (no `_start` export)",
            path.display()
        );
        let slots = Semaphore::new(limits.max_instances as usize);
        let recent = Default::default();
        Ok(Function {
            name,
            path,
            sha256: loaded.sha256,
            origin: loaded.origin,
            limits,
            grants,
            models,
            pre,
            slots,
            recent,
            calls: Default::default(),
            faults: Default::default(),
            recorded: Default::default(),
        })
    }

    /// Runs the function once on `input`. `env` adds per-call variables (e.g. the camera id).
    pub(super) async fn invoke(
        &self,
        ticker: &EpochTicker,
        input: Bytes,
        env: &[(&str, &str)],
    ) -> Result<Output, InvokeError> {
        // The uncontended case skips arming a timer.
        let _slot = match self.slots.try_acquire() {
            Ok(permit) => permit,
            Err(_) => tokio::time::timeout(self.limits.deadline, self.slots.acquire())
                .await
                .map_err(|_| InvokeError::Saturated { function: self.name.clone() })?
                .expect("slots are never closed"),
        };
        if let Some(cause) = &self.models.unavailable {
            return Err(InvokeError::Unavailable { function: self.name.clone(), cause: cause.clone() });
        }
        // Before the store exists, so the reservation outlives the contexts the store borrows.
        let _models = match tokio::time::timeout(self.limits.deadline, self.models.reserve()).await {
            Ok(reservation) => reservation,
            Err(_) => return Err(InvokeError::Saturated { function: self.name.clone() }),
        };
        let _ticking = ticker.enter();

        let stdout = CappedPipe::strict(self.limits.max_output.as_u64() as usize).with_capacity(input.len());
        let stderr = CappedPipe::truncating(STDERR_CAP);
        let mut store = self.store(input, env, &stdout, &stderr)?;

        let deadline = Instant::now() + self.limits.deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(DeadlineHit.into())
            } else {
                // Yield each tick so a long call never starves the other tasks on its thread.
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let run = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        };
        let result = run.await;
        let errlog = stderr.take();
        self.forward_stderr(&errlog);
        self.classify(result, &store, &stdout, &errlog)?;
        Ok(Output { stdout: stdout.take() })
    }

    fn store(
        &self,
        input: Bytes,
        env: &[(&str, &str)],
        stdout: &CappedPipe,
        stderr: &CappedPipe,
    ) -> Result<Store<Host>, InvokeError> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdin(MemoryInputPipe::new(input))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg(&self.name)
            .args(&self.grants.args)
            .envs(&self.grants.env)
            .envs(env)
            // A granted file may block (a FIFO, a slow disk), and no deadline interrupts a host
            // call: reads go through the blocking pool, so the async workers keep serving.
            .allow_blocking_current_thread(false);
        for (guest, host) in &self.grants.dirs {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly).map_err(|e| InvokeError::Unavailable {
                function: self.name.clone(),
                cause: format!("granted dir {}: {e}", host.display()),
            })?;
        }
        let limit = self.limits.memory.as_u64() as usize;
        let host = Host { wasi: wasi.build_p1(), nn: self.models.context(), memory: MemoryCap { limit, hit: false } };
        let mut store = Store::new(self.pre.module().engine(), host);
        store.limiter(|h| &mut h.memory);
        Ok(store)
    }

    /// Turns the outcome into an error of the right kind; broken limits take precedence,
    /// because a function that hit one usually fails in some secondary way too.
    fn classify(
        &self,
        result: wasmtime::Result<()>,
        store: &Store<Host>,
        stdout: &CappedPipe,
        errlog: &[u8],
    ) -> Result<(), InvokeError> {
        let function = self.name.clone();
        if stdout.overflowed() {
            return Err(InvokeError::OutputTooLarge { function, limit: self.limits.max_output.as_u64() });
        }
        let Err(err) = result else { return Ok(()) };
        if err.downcast_ref::<DeadlineHit>().is_some() {
            return Err(InvokeError::DeadlineExceeded { function, deadline_ms: self.limits.deadline.as_millis() });
        }
        if store.data().memory.hit {
            return Err(InvokeError::MemoryLimit { function, limit: self.limits.memory.as_u64() });
        }
        if let Some(exit) = err.downcast_ref::<I32Exit>() {
            if exit.0 == 0 {
                return Ok(());
            }
            return Err(InvokeError::Rejected { function, code: exit.0, reason: last_line(errlog) });
        }
        let mut cause = match err.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => format!("{err}"),
        };
        let tail = last_line(errlog);
        if !tail.is_empty() {
            cause = format!("{cause} (stderr: {tail})");
        }
        Err(InvokeError::Trap { function, cause })
    }

    fn forward_stderr(&self, errlog: &[u8]) {
        for line in String::from_utf8_lossy(errlog).lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(function = %self.name, "stderr: {line}");
        }
    }

    pub(super) fn record(&self, elapsed: Duration, failed: Option<&str>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        crate::memory::called();
        // What the version itself broke counts against it; a busy pool, a missing model or a
        // frame it rightly rejected does not.
        if failed.is_some_and(|k| matches!(k, "trap" | "deadline" | "memory_limit" | "output_too_large")) {
            self.faults.fetch_add(1, Relaxed);
        }
        {
            let mut r = self.recent.lock().expect("recent lock");
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(elapsed.as_micros().min(u32::MAX as u128) as u32);
        }
        self.recorded.notify_one();
    }

    /// Returns after the next call ends (or at once if one ended since the last wait).
    pub async fn call_ended(&self) {
        self.recorded.notified().await
    }

    /// (p50, p99) in milliseconds over the last calls; zeros before the first.
    pub fn percentiles(&self) -> (f64, f64) {
        let mut v: Vec<u32> = self.recent.lock().expect("recent lock").iter().copied().collect();
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_unstable();
        let at = |p: usize| v[(v.len() * p / 100).min(v.len() - 1)] as f64 / 1000.0;
        (at(50), at(99))
    }

    /// Calls of this version so far, and those that broke a limit or trapped.
    pub fn calls_and_faults(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.calls.load(Relaxed), self.faults.load(Relaxed))
    }

    /// Instances running now.
    pub fn busy(&self) -> u32 {
        self.limits.max_instances - self.slots.available_permits() as u32
    }
}

/// Raised from the epoch callback; its type tells a deadline from any other trap.
#[derive(Debug, thiserror::Error)]
#[error("deadline exceeded")]
struct DeadlineHit;

fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .rev()
        // Rust's panic hook ends with a hint about RUST_BACKTRACE; the line before says what happened.
        .find(|l| !l.trim().is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .unwrap_or("");
    line.chars().take(300).collect()
}
