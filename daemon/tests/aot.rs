//! Ahead-of-time compilation: a restart compiles nothing, a packaged `.cwasm` loads, one built
//! for another architecture is refused with a sentence that says so, no other native code
//! is ever mapped, and the Rust functions arrive built for simd128.

mod common;

use std::process::Stdio;

use common::{Daemon, asset, wasm};

/// grayscale's JPEG decode and PNG encode and classify's resize and unfilter have simd128
/// kernels. A `RUSTFLAGS` in the environment silently replaces `.cargo/config.toml`'s flags,
/// `+simd128` with them, and the functions would still build and pass, only slower; so an
/// engine that refuses SIMD must refuse them.
#[test]
fn the_rust_functions_are_built_for_simd128() {
    let mut scalar = wasmtime::Config::new();
    scalar.wasm_simd(false).wasm_relaxed_simd(false);
    let scalar = wasmtime::Engine::new(&scalar).unwrap();
    for name in ["grayscale", "classify"] {
        let module = std::fs::read(common::functions_dir().join(format!("{name}.wasm"))).unwrap();
        wasmtime::Module::validate(&wasmtime::Engine::default(), &module).unwrap();
        let refused = wasmtime::Module::validate(&scalar, &module).expect_err(&format!("{name} has no SIMD code"));
        assert!(format!("{refused:#}").contains("SIMD"), "{name}: {refused:#}");
    }
}

#[test]
fn second_start_compiles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Daemon::start_in(dir.path(), "");
    let n = first.get("/v1/functions").json()["functions"].as_array().unwrap().len() as f64;
    assert!(n >= 2.0);
    assert_eq!(first.metric("edgefn_aot_compiles_total"), n, "a cold cache compiles every function");
    assert_eq!(first.metric("edgefn_aot_loads_total"), 0.0);
    assert!(first.stop().success());

    let mut second = Daemon::start_in(dir.path(), "");
    assert_eq!(second.metric("edgefn_aot_compiles_total"), 0.0, "the warm start compiled:\n{}", second.log());
    assert_eq!(second.metric("edgefn_aot_loads_total"), n);
    let list = second.get("/v1/functions").json();
    assert!(list["functions"].as_array().unwrap().iter().all(|f| f["origin"] == "cached"), "{list}");
    assert_eq!(second.post("/v1/functions/grayscale", &asset("chelsea.png")).status, 200);
    second.assert_alive();
}

/// Compiling frees what it took, and the code it made is mapped from the cache file: a start
/// that compiled every function settles where a start from the cache does. Before, the
/// compiler's contexts and heap copies of the code kept 25 MB more for the daemon's life.
#[test]
fn a_start_that_compiled_keeps_no_more_memory_than_one_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let idle_anon = |d: &Daemon| {
        std::thread::sleep(std::time::Duration::from_millis(500));
        common::anon_kib(d.child.id())
    };
    let mut cold = Daemon::start_in(dir.path(), "");
    assert!(cold.metric("edgefn_aot_compiles_total") >= 2.0, "the cold start compiled nothing");
    let cold_kib = idle_anon(&cold);
    assert!(cold.stop().success());
    let mut warm = Daemon::start_in(dir.path(), "");
    assert_eq!(warm.metric("edgefn_aot_compiles_total"), 0.0);
    let warm_kib = idle_anon(&warm);
    assert!(warm.stop().success());
    eprintln!("anonymous RSS idle: {cold_kib} KiB after compiling, {warm_kib} KiB from the cache");
    assert!(
        cold_kib <= warm_kib + 8 * 1024,
        "a start that compiled keeps {cold_kib} KiB anonymous, one from the cache {warm_kib} KiB"
    );
}

#[test]
fn a_changed_module_is_recompiled_not_served_stale() {
    let dir = tempfile::tempdir().unwrap();
    let funcs = dir.path().join("funcs");
    std::fs::create_dir(&funcs).unwrap();
    std::fs::copy(wasm("echo"), funcs.join("f.wasm")).unwrap();

    let d = Daemon::start_with_functions(dir.path(), &funcs, "");
    assert_eq!(d.metric("edgefn_aot_compiles_total"), 1.0);
    assert_eq!(d.post("/v1/functions/f", b"ping").body, b"ping");
    drop(d);

    // The same name with other content: the cache is keyed by content, so this compiles.
    std::fs::copy(wasm("printenv"), funcs.join("f.wasm")).unwrap();
    let d = Daemon::start_with_functions(dir.path(), &funcs, "");
    assert_eq!(d.metric("edgefn_aot_compiles_total"), 1.0, "stale native code served");
    assert_eq!(d.post("/v1/functions/f", b"ping").body, b"arg:f\n");
}

#[test]
fn precompiled_cwasm_loads_and_foreign_arch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let funcs = dir.path().join("funcs");
    std::fs::create_dir(&funcs).unwrap();

    // Host .cwasm from `edgefn compile`, served without compiling.
    let compile = |target: Option<&str>, out: &std::path::Path| {
        let mut cmd = common::edgefn();
        cmd.args(["compile", wasm("grayscale").to_str().unwrap(), "-o", out.to_str().unwrap()]);
        if let Some(t) = target {
            cmd.args(["--target", t]);
        }
        let st = cmd.status().unwrap();
        assert!(st.success(), "edgefn compile {target:?}");
    };
    let host_target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    compile(Some(&host_target), &funcs.join("grayscale.cwasm"));
    // Vouched for as the package does: a root-owned digest list beside it (tests run as root).
    let sums = std::process::Command::new("sha256sum").arg("grayscale.cwasm").current_dir(&funcs).output().unwrap();
    std::fs::write(funcs.join("SHA256SUMS"), &sums.stdout).unwrap();
    assert!(nix::unistd::geteuid().is_root(), "the packaged-code tests need root, as CI has");
    let d = Daemon::start_with_functions(dir.path(), &funcs, "");
    let list = d.get("/v1/functions").json();
    assert_eq!(list["functions"][0]["origin"], "precompiled", "{list}");
    assert_eq!(d.metric("edgefn_aot_compiles_total"), 0.0);
    common::assert_gray(&d.post("/v1/functions/grayscale", &asset("chelsea.png")).body);
    drop(d);

    // aarch64 .cwasm on this x86_64 host: a clear error from invoke, and a named failure in the daemon.
    let foreign = if std::env::consts::ARCH == "aarch64" { "x86_64" } else { "aarch64" };
    let foreign_cwasm = funcs.join("grayscale.cwasm");
    compile(Some(&format!("{foreign}-unknown-linux-gnu")), &foreign_cwasm);
    let out = common::edgefn()
        .args(["--config", dir.path().join("edgefn.toml").to_str().unwrap(), "invoke", "grayscale"])
        .stdin(Stdio::null())
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&format!("precompiled for {foreign}")) && stderr.contains(std::env::consts::ARCH),
        "{stderr}"
    );

    let mut d = Daemon::start_with_functions(dir.path(), &funcs, "");
    let health = d.get("/healthz").json();
    assert_eq!(health["status"], "degraded");
    assert!(health["failed"]["grayscale"].as_str().unwrap().contains(&format!("precompiled for {foreign}")));
    let resp = d.post("/v1/functions/grayscale", &asset("chelsea.png"));
    assert_eq!(resp.status, 503);
    assert!(resp.json()["error"].as_str().unwrap().contains(foreign));
    d.assert_alive();
}

/// Native code runs outside the sandbox, so only two kinds of file are ever mapped as native
/// code: the daemon's own AOT cache (in a directory no one else can write) and a packaged
/// `.cwasm` whose digest a root-owned `SHA256SUMS` beside it lists. A `.wasm` holding native
/// code, a `.cwasm` nothing vouches for, and a cache others can write into are all refused;
/// the old loader deserialized each of them.
#[test]
fn native_code_is_mapped_only_from_the_own_cache_or_a_listed_cwasm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let funcs = dir.path().join("funcs");
    std::fs::create_dir(&funcs).unwrap();
    let compile = |name: &str, out: &std::path::Path| {
        let st = common::edgefn()
            .args(["compile", wasm(name).to_str().unwrap(), "-o", out.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "edgefn compile {name}");
    };
    compile("printenv", &funcs.join("evil.wasm"));
    compile("grayscale", &funcs.join("gray.cwasm"));
    std::fs::copy(wasm("grayscale"), funcs.join("grayscale.wasm")).unwrap();
    let failed = |d: &Daemon, name: &str| d.get("/healthz").json()["failed"][name].as_str().map(str::to_string);

    // A .wasm that is native code: refused, never run.
    let d = Daemon::start_with_functions(dir.path(), &funcs, "");
    let why = failed(&d, "evil").unwrap_or_else(|| panic!("evil.wasm was loaded:\n{}", d.log()));
    assert!(why.contains("precompiled native code"), "{why}");
    assert_eq!(d.post("/v1/functions/evil", b"x").status, 503);
    // A .cwasm with no digest list beside it.
    let why = failed(&d, "gray").expect("an unlisted .cwasm was loaded");
    assert!(why.contains("SHA256SUMS"), "{why}");
    drop(d);

    // Listed, but in a list anyone may edit: still refused. Root-owned 0644, as dpkg installs
    // it: loaded.
    let sums = funcs.join("SHA256SUMS");
    let out = std::process::Command::new("sha256sum").arg("gray.cwasm").current_dir(&funcs).output().unwrap();
    std::fs::write(&sums, &out.stdout).unwrap();
    std::fs::set_permissions(&sums, std::fs::Permissions::from_mode(0o666)).unwrap();
    let d = Daemon::start_with_functions(dir.path(), &funcs, "");
    assert!(failed(&d, "gray").is_some_and(|w| w.contains("writable")), "{:?}", failed(&d, "gray"));
    drop(d);
    std::fs::set_permissions(&sums, std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = Daemon::start_with_functions(dir.path(), &funcs, "");
    assert_eq!(failed(&d, "gray"), None, "a listed .cwasm was refused:\n{}", d.log());
    common::assert_gray(&d.post("/v1/functions/gray", &asset("chelsea.png")).body);
    drop(d);

    // The cache: a planted entry in a directory others can write is never mapped; the module
    // is compiled from its .wasm instead, and the right function answers.
    let cache = dir.path().join("cache");
    // grayscale.wasm is the one module here that is compiled, so its entry is the only one.
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    let [entry] = entries.as_slice() else { panic!("cache entries: {entries:?}") };
    compile("printenv", entry);
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = Daemon::start_with_functions(dir.path(), &funcs, "");
    common::assert_gray(&d.post("/v1/functions/grayscale", &asset("chelsea.png")).body);
    assert!(d.log().contains("AOT cache not used"), "no warning about the cache:\n{}", d.log());
}
