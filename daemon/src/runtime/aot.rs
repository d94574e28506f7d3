//! Ahead-of-time compilation: `.wasm` becomes native code once, on disk, and a restart only maps it.
//!
//! The cache key is the module's sha256 plus wasmtime's engine compatibility hash (target, ISA
//! flags, tunables, features and wasmtime's own version), so a changed module, setting or
//! upgrade never loads stale code. Precompiled `.cwasm` files are checked for the host's
//! architecture first, so a file built for another board fails with a sentence, not a
//! deserialization error.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use super::engine::compilation_config;

/// How a module's native code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now from `.wasm` (a cache miss).
    Compiled,
    /// Mapped from the AOT cache.
    Cached,
    /// Mapped from a `.cwasm` file shipped precompiled.
    Precompiled,
}

pub struct LoadedModule {
    pub module: Module,
    /// sha256 of the file as given (`.wasm` or `.cwasm`), hex.
    pub sha256: String,
    pub origin: Origin,
}

/// Loads `path` into `engine`, through the cache in `cache_dir` for `.wasm` files.
pub fn load(engine: &Engine, path: &Path, cache_dir: &Path) -> anyhow::Result<LoadedModule> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sha256 = hex(&Sha256::digest(&bytes));

    if Engine::detect_precompiled(&bytes).is_some() {
        let module = deserialize(engine, path, &bytes)?;
        return Ok(LoadedModule { module, sha256, origin: Origin::Precompiled });
    }

    let cached = cache_path(engine, cache_dir, &sha256);
    if cached.exists() {
        // SAFETY: the file is one this daemon wrote from a validated module, named by its
        // compatibility hash; wasmtime still checks the header before mapping it.
        match unsafe { Module::deserialize_file(engine, &cached) } {
            Ok(module) => {
                return Ok(LoadedModule { module, sha256, origin: Origin::Cached });
            }
            Err(e) => {
                tracing::warn!(path = %cached.display(), "discarding unusable AOT cache entry: {e}")
            }
        }
    }

    let native = engine.precompile_module(&bytes).map_err(|e| anyhow::anyhow!("compiling {}: {e}", path.display()))?;
    if let Err(e) = store(&cached, &native) {
        // A read-only or full cache costs a compile at the next start, nothing more.
        tracing::warn!(path = %cached.display(), "cannot write AOT cache: {e:#}");
    }
    // SAFETY: `native` was produced by this engine a moment ago.
    let module = unsafe { Module::deserialize(engine, &native) }
        .map_err(|e| anyhow::anyhow!("loading compiled {}: {e}", path.display()))?;
    Ok(LoadedModule { module, sha256, origin: Origin::Compiled })
}

/// `edgefn compile`: precompiles `input` for `target` (a target triple; None for this host).
pub fn precompile(input: &Path, output: &Path, target: Option<&str>) -> anyhow::Result<()> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let engine = Engine::new(&compilation_config(target)?)
        .map_err(|e| anyhow::anyhow!("engine for {}: {e}", target.unwrap_or("host")))?;
    let native = engine.precompile_module(&bytes).map_err(|e| anyhow::anyhow!("compiling {}: {e}", input.display()))?;
    store(output, &native)
}

fn cache_path(engine: &Engine, cache_dir: &Path, sha256: &str) -> PathBuf {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    cache_dir.join(format!("{}-{:016x}.cwasm", &sha256[..32], h.finish()))
}

/// Writes atomically and durably: the bytes reach the disk before the file takes its final
/// name, and the name before we return. Native code is mapped and run as it is; a power cut
/// must never leave a torn file under a name the next start trusts.
fn store(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Unique per writer, not just per process: two generations (a reload) or two runtimes in
    // one process may store the same module at once.
    static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let writer = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}.{writer}", std::process::id()));
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

fn deserialize(engine: &Engine, path: &Path, bytes: &[u8]) -> anyhow::Result<Module> {
    let host = std::env::consts::ARCH;
    if let Some(arch) = elf_arch(bytes).filter(|a| *a != host) {
        anyhow::bail!(
            "{} was precompiled for {arch}, but this host is {host}; \
             precompile it for this board with `edgefn compile --target {host}-unknown-linux-gnu` \
             or ship the .wasm",
            path.display()
        );
    }
    // SAFETY: a `.cwasm` is trusted like the daemon binary itself (it comes from the package or
    // the operator); wasmtime checks its header, version and settings before mapping it.
    unsafe { Module::deserialize(engine, bytes) }.map_err(|e| {
        anyhow::anyhow!(
            "{} was precompiled by an incompatible engine (another edgefn version or settings): \
             {e}; recompile it with this edgefn's `edgefn compile`",
            path.display()
        )
    })
}

/// The architecture named in an ELF header's e_machine field.
fn elf_arch(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return None;
    }
    Some(match u16::from_le_bytes([bytes[18], bytes[19]]) {
        0x3e => "x86_64",
        0xb7 => "aarch64",
        0xf3 => "riscv64",
        0x16 => "s390x",
        _ => "an unknown architecture",
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
