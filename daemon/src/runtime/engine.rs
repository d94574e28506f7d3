//! The wasmtime engine: one configuration for compiling and running, and the epoch ticker that
//! gives every invocation a wall-clock deadline.
//!
//! Native code is only loadable by an engine with the same compilation settings, so
//! `compilation_config` is the single place they are set: the daemon, `edgefn compile` and the
//! AOT cache key all derive from it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

/// Epoch tick. Deadlines are checked, and long calls yield to the scheduler, once per tick.
pub const TICK: Duration = Duration::from_millis(2);

/// Settings that shape the native code. `target` is None for the host.
pub fn compilation_config(target: Option<&str>) -> anyhow::Result<Config> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.cranelift_opt_level(OptLevel::Speed);
    if let Some(triple) = target {
        config
            .target(triple)
            .map_err(|e| anyhow::anyhow!("target {triple}: {e}"))?;
    }
    Ok(config)
}

/// Sizing of the instance pool, from the configured functions.
pub struct PoolSize {
    /// Instances that may run at once, over all functions.
    pub slots: u32,
    /// The largest linear memory any function may have.
    pub max_memory: u64,
}

/// The engine that runs functions on this host, with pre-reserved instance slots.
pub fn host_engine(pool: &PoolSize) -> anyhow::Result<Engine> {
    let mut config = compilation_config(None)?;
    let mut pooling = PoolingAllocationConfig::new();
    // Slots are reserved address space, not memory: a slot per permitted instance, no more,
    // so 39-bit-VA boards (Raspberry Pi kernels) are not exhausted.
    pooling
        .total_core_instances(pool.slots)
        .total_memories(pool.slots)
        .total_tables(pool.slots)
        .total_stacks(pool.slots)
        .total_component_instances(0)
        .total_gc_heaps(0)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .max_memory_size(usize::try_from(pool.max_memory)?);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config).map_err(|e| anyhow::anyhow!("creating the wasm engine: {e}"))
}

/// Advances the engine's epoch every [`TICK`] while at least one invocation runs, and sleeps
/// otherwise, so an idle board is not woken 500 times a second.
pub struct EpochTicker {
    shared: Arc<Shared>,
    thread: thread::Thread,
}

struct Shared {
    running: AtomicUsize,
    stop: AtomicBool,
}

impl EpochTicker {
    pub fn start(engine: Engine) -> EpochTicker {
        let shared = Arc::new(Shared {
            running: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let ticker_shared = shared.clone();
        let handle = thread::Builder::new()
            .name("edgefn-epoch".into())
            .spawn(move || {
                while !ticker_shared.stop.load(Ordering::Acquire) {
                    if ticker_shared.running.load(Ordering::Acquire) == 0 {
                        thread::park();
                        continue;
                    }
                    thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker {
            shared,
            thread: handle.thread().clone(),
        }
    }

    /// Keeps the ticker running until the guard drops.
    pub fn enter(&self) -> TickGuard<'_> {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        TickGuard(self)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

pub struct TickGuard<'a>(&'a EpochTicker);

impl Drop for TickGuard<'_> {
    fn drop(&mut self) {
        self.0.shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}
