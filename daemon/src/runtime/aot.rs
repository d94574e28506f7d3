//! Ahead-of-time compilation: `.wasm` becomes native code once, on disk, and a restart only maps it.
//!
//! Native code runs outside the sandbox, so bytes from outside are never native code. Only two
//! kinds of file are ever mapped as such:
//! - the daemon's own AOT cache: entries it wrote itself, in a directory only it can write,
//!   named by the module's sha256 and wasmtime's engine compatibility hash (target, ISA flags,
//!   tunables, features and wasmtime's version), so a changed module, setting or upgrade never
//!   loads stale code;
//! - a packaged `.cwasm` whose sha256 a root-owned [`DIGEST_LIST`] beside it names: the .deb
//!   installs both, so the package vouches for its code as it does for the binary.
//!
//! Anything else that holds native code (a `.wasm` that is really a `.cwasm`, a `.cwasm` no
//! list names, a registry layer) is refused with a sentence; a cache others could write into is
//! not used at all. A `.cwasm` built for another architecture is named as such, not left to a
//! deserialization error.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use super::engine::compilation_config;

/// The digests packaged `.cwasm` files may have, in `sha256sum`'s format, beside them.
pub const DIGEST_LIST: &str = "SHA256SUMS";

/// How a module's native code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now from `.wasm` (a cache miss).
    Compiled,
    /// Mapped from the AOT cache.
    Cached,
    /// Mapped from a packaged `.cwasm`.
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
        built_for_this_host(path, &bytes)?;
        vouched_for(path, &sha256)?;
        let module = deserialize(engine, path, &bytes)?;
        return Ok(LoadedModule { module, sha256, origin: Origin::Precompiled });
    }

    let cached = match private_dir(cache_dir) {
        Ok(()) => Some(cache_path(engine, cache_dir, &sha256)),
        Err(why) => {
            tracing::warn!(cache_dir = %cache_dir.display(), "AOT cache not used, {path} compiles at every start: {why:#}", path = path.display());
            None
        }
    };
    if let Some(cached) = cached.as_deref().filter(|c| own_file(c)) {
        // SAFETY: the file is one this daemon wrote from a validated module, in a directory only
        // it can write, named by its sha256 and compatibility hash; wasmtime still checks the
        // header before mapping it.
        match unsafe { Module::deserialize_file(engine, cached) } {
            Ok(module) => {
                return Ok(LoadedModule { module, sha256, origin: Origin::Cached });
            }
            Err(e) => {
                tracing::warn!(path = %cached.display(), "discarding unusable AOT cache entry: {e}")
            }
        }
    }

    let native = compile(&bytes).with_context(|| format!("compiling {}", path.display()))?;
    let stored = cached.filter(|cached| match store(cached, &native) {
        Ok(()) => true,
        Err(e) => {
            // A read-only or full cache costs a compile at the next start, nothing more.
            tracing::warn!(path = %cached.display(), "cannot write AOT cache: {e:#}");
            false
        }
    });
    // From the cache file, the code is mapped from the page cache, as after a warm start,
    // rather than copied into the heap for the daemon's life.
    let module = match &stored {
        // SAFETY: the file was written a moment ago from `native`, in a directory only this
        // daemon can write; wasmtime still checks its header.
        Some(cached) => unsafe { Module::deserialize_file(engine, cached) },
        // SAFETY: `native` was produced by an engine with this one's settings a moment ago.
        None => unsafe { Module::deserialize(engine, &native) },
    }
    .map_err(|e| anyhow::anyhow!("loading compiled {}: {e}", path.display()))?;
    drop(native);
    crate::memory::trim();
    Ok(LoadedModule { module, sha256, origin: Origin::Compiled })
}

/// Whether the package vouches for the precompiled code at `path`: it is a `.cwasm`, and the
/// root-owned, not group- or world-writable [`DIGEST_LIST`] beside it names its sha256.
fn vouched_for(path: &Path, sha256: &str) -> anyhow::Result<()> {
    let shown = path.display();
    if path.extension().is_none_or(|e| e != "cwasm") {
        anyhow::bail!(
            "{shown} holds precompiled native code, not WebAssembly: edgefn maps native code only \
             from its own AOT cache or a packaged .cwasm listed in the {DIGEST_LIST} beside it; ship the .wasm"
        );
    }
    let list = path.with_file_name(DIGEST_LIST);
    let unlisted = || {
        format!(
            "{shown} is precompiled native code that no {} vouches for: ship the .wasm (compiled \
             and cached here), or list its sha256 there as the package does",
            list.display()
        )
    };
    let meta = std::fs::symlink_metadata(&list).map_err(|_| anyhow::anyhow!(unlisted()))?;
    anyhow::ensure!(meta.is_file(), unlisted());
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "{} is writable by others than root (owner uid {}, mode {:o}): a digest list that \
             vouches for native code must be root's alone, as the package installs it",
            list.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    let text = std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let listed = text
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .any(|(digest, file)| digest.eq_ignore_ascii_case(sha256) && file.trim_start().trim_start_matches('*') == name);
    anyhow::ensure!(
        listed,
        "{shown} (sha256 {sha256}) is not among the digests in {}: ship the .wasm, or the package's own .cwasm",
        list.display()
    );
    Ok(())
}

/// Makes `dir` (0700 when new) and checks that only this daemon can write into it: native code
/// found there is run as the daemon's own.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // Followed if a link: systemd's DynamicUser= makes CacheDirectory= a link into
    // /var/cache/private, and only root could swap a link in a root-owned parent.
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    anyhow::ensure!(meta.is_dir(), "{} is not a directory", dir.display());
    anyhow::ensure!(meta.uid() == euid, "it belongs to uid {}, not to this daemon (uid {euid})", meta.uid());
    anyhow::ensure!(
        meta.mode() & 0o022 == 0,
        "others may write into it (mode {:o}); make it 0700, as systemd's CacheDirectory= does",
        meta.mode() & 0o7777
    );
    Ok(())
}

/// A regular file of this daemon's user (not a link to somewhere else).
fn own_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.uid() == nix::unistd::geteuid().as_raw())
}

/// `edgefn compile`: precompiles `input` for `target` (a target triple; None for this host).
pub fn precompile(input: &Path, output: &Path, target: Option<&str>) -> anyhow::Result<()> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let engine = Engine::new(&compilation_config(target)?)
        .map_err(|e| anyhow::anyhow!("engine for {}: {e}", target.unwrap_or("host")))?;
    let native = engine.precompile_module(&bytes).map_err(|e| anyhow::anyhow!("compiling {}: {e}", input.display()))?;
    store(output, &native)
}

/// Compiles `bytes` for this host in an engine of its own, dropped after: Cranelift keeps its
/// compilation contexts (MBs each, one per thread that compiled) for as long as the engine
/// lives, and the daemon's engine lives as long as the daemon.
fn compile(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let compiler = Engine::new(&compilation_config(None)?).map_err(|e| anyhow::anyhow!("engine: {e}"))?;
    compiler.precompile_module(bytes).map_err(|e| anyhow::anyhow!("{e}"))
}

fn cache_path(engine: &Engine, cache_dir: &Path, sha256: &str) -> PathBuf {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    cache_dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()))
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

fn built_for_this_host(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let host = std::env::consts::ARCH;
    if let Some(arch) = elf_arch(bytes).filter(|a| *a != host) {
        anyhow::bail!(
            "{} was precompiled for {arch}, but this host is {host}; \
             precompile it for this board with `edgefn compile --target {host}-unknown-linux-gnu` \
             or ship the .wasm",
            path.display()
        );
    }
    Ok(())
}

fn deserialize(engine: &Engine, path: &Path, bytes: &[u8]) -> anyhow::Result<Module> {
    // SAFETY: the package vouches for this `.cwasm` ([`vouched_for`]) as it does for the daemon
    // binary itself; wasmtime checks its header, version and settings before mapping it.
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
