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
        config.target(triple).map_err(|e| anyhow::anyhow!("target {triple}: {e}"))?;
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
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .max_memory_size(usize::try_from(pool.max_memory)?);
    if kernel_at_least(6, 7) {
        // Reset a slot by memset-ing only its dirty pages (found with PAGEMAP_SCAN) instead of
        // madvise + page faults + TLB shootdowns: a no-op call drops from ~21 µs to ~8 µs.
        // Without PAGEMAP_SCAN, keep-resident memsets the whole range and is slower than madvise.
        pooling
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            .async_stack_keep_resident(64 << 10);
    }
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config).map_err(|e| anyhow::anyhow!("creating the wasm engine: {e}"))
}

/// Advances the engine's epoch every [`TICK`] while invocations run, and parks after a second
/// without any, so an idle board is not woken 500 times a second. A call only pays a wake-up
/// (a syscall) when the ticker is parked, not on every invocation.
pub struct EpochTicker {
    shared: Arc<Shared>,
    thread: thread::Thread,
}

struct Shared {
    running: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
}

/// Idle ticks before the ticker parks.
const IDLE_TICKS: u32 = 500;

impl EpochTicker {
    pub fn start(engine: Engine) -> EpochTicker {
        let shared = Arc::new(Shared {
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let handle = thread::Builder::new()
            .name("edgefn-epoch".into())
            .spawn(move || {
                let mut idle = 0;
                while !s.stop.load(Ordering::Acquire) {
                    if s.running.load(Ordering::Acquire) > 0 {
                        idle = 0;
                    } else if idle >= IDLE_TICKS {
                        s.parked.store(true, Ordering::Release);
                        // Re-check after announcing: an `enter` in between saw `parked` and unparks us.
                        if s.running.load(Ordering::Acquire) == 0 {
                            thread::park();
                        }
                        s.parked.store(false, Ordering::Release);
                        idle = 0;
                        continue;
                    } else {
                        idle += 1;
                    }
                    thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { shared, thread: handle.thread().clone() }
    }

    /// Keeps the ticker running until the guard drops.
    pub fn enter(&self) -> TickGuard<'_> {
        self.shared.running.fetch_add(1, Ordering::AcqRel);
        if self.shared.parked.load(Ordering::Acquire) {
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

/// Whether the running Linux kernel is at least `major.minor`. From uname(2): under systemd's
/// `ProcSubset=pid`, /proc/sys is not there to read.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(uts) = nix::sys::utsname::uname() else { return false };
    let release = uts.release().to_string_lossy();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}
