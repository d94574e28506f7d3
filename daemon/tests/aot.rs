//! Ahead-of-time compilation: a restart compiles nothing, a precompiled `.cwasm` loads, and one
//! built for another architecture is refused with a sentence that says so.

mod common;

use std::process::Stdio;

use common::{Daemon, asset, wasm};

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
