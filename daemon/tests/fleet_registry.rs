//! Functions as signed OCI artifacts, against a real registry (Debian's docker-registry 2.8)
//! and the real cosign and oras: push and pull both ways, signatures both ways, an offline
//! start from the board's store, TLS with htpasswd, and every refusal the fleet promises.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::registry::{CuttingProxy, Registry, tool, tool_ok};
use common::{Daemon, edgefn, wasm};

/// A registry, a state dir, our cosign key pair and another key, and a config that trusts ours.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    registry: Registry,
    config: PathBuf,
}

const NO_PASSWORD: [(&str, &str); 1] = [("COSIGN_PASSWORD", "")];

impl Fixture {
    fn new(extra: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let registry = Registry::start(&dir.join("registry"));
        tool_ok("cosign", &dir, &["generate-key-pair"], &NO_PASSWORD);
        openssl(&dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "other.key"]);
        openssl(&dir, &["ec", "-in", "other.key", "-pubout", "-out", "other.pub"]);
        let config = dir.join("cli.toml");
        std::fs::write(
            &config,
            format!(
                "[runtime]\nstate_dir = {:?}\n\n[trust]\nkeys = [{:?}]\n{extra}\n",
                dir.join("state"),
                dir.join("cosign.pub")
            ),
        )
        .unwrap();
        Fixture { _tmp: tmp, dir, registry, config }
    }

    /// `edgefn ARGS` with this fixture's config.
    fn edgefn(&self, args: &[&str]) -> Output {
        edgefn().arg("--config").arg(&self.config).args(args).envs(NO_PASSWORD).output().unwrap()
    }

    fn push(&self, module: &Path, image: &str) -> String {
        let out = self.edgefn(&["push", module.to_str().unwrap(), image]);
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
        let pinned = String::from_utf8(out.stdout).unwrap().trim().to_string();
        pinned.rsplit_once('@').unwrap().1.to_string()
    }

    fn sign(&self, image: &str, key: &str) {
        let key = self.dir.join(key);
        let out = self.edgefn(&["sign", image, "--key", key.to_str().unwrap()]);
        assert!(out.status.success(), "sign: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `edgefn pull IMAGE`, which must fail; its one-line cause.
    fn refused(&self, image: &str) -> String {
        let out = self.edgefn(&["pull", image]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{image} was pulled: {err}");
        eprintln!("refused: {}", err.trim());
        err
    }

    fn pulled(&self, image: &str) -> String {
        let out = self.edgefn(&["pull", image]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{image}: {err}");
        err
    }

    /// What the store says `image` resolves to.
    fn stored(&self, image: &str) -> Option<String> {
        let refs = std::fs::read(self.dir.join("state/fleet/refs.json")).ok()?;
        let refs: serde_json::Value = serde_json::from_slice(&refs).unwrap();
        refs[image]["manifest"].as_str().map(str::to_string)
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn host_ref(image: &str) -> &str {
    image.strip_prefix("oci://").unwrap()
}

#[test]
fn what_edgefn_pushes_oras_pulls_and_what_oras_pushes_a_daemon_serves() {
    let fx = Fixture::new("");
    let image = fx.registry.image("edge/echo:v1");
    let first = fx.push(&wasm("echo"), &image);
    assert_eq!(fx.push(&wasm("echo"), &image), first, "the same file pushed twice has one digest");

    let out = fx.dir.join("oras-out");
    tool_ok("oras", &fx.dir, &["pull", "--plain-http", host_ref(&image), "-o", out.to_str().unwrap()], &[]);
    assert_eq!(std::fs::read(out.join("echo.wasm")).unwrap(), std::fs::read(wasm("echo")).unwrap());

    // oras pushes the CNCF layout by hand: a wasm config and one application/wasm layer.
    let gray = std::fs::read(wasm("grayscale")).unwrap();
    std::fs::write(fx.dir.join("grayscale.wasm"), &gray).unwrap();
    let config = serde_json::json!({
        "created": "2026-12-01T00:00:00Z", "architecture": "wasm", "os": "wasip1",
        "layerDigests": [edgefn::fleet::artifact::digest(&gray)],
    });
    std::fs::write(fx.dir.join("config.json"), config.to_string()).unwrap();
    let oras_image = fx.registry.image("edge/gray:oras");
    let config_arg = "config.json:application/vnd.wasm.config.v0+json";
    tool_ok(
        "oras",
        &fx.dir,
        &["push", "--plain-http", host_ref(&oras_image), "--config", config_arg, "grayscale.wasm:application/wasm"],
        &[],
    );

    // No [trust] keys: both load, with a warning.
    let dir = fx.dir.join("daemon");
    let mut daemon = Daemon::start_in(
        &dir,
        &format!("[functions.echo-oci]\nimage = {image:?}\n\n[functions.gray-oci]\nimage = {oras_image:?}\n"),
    );
    let r = daemon.post("/v1/functions/echo-oci", b"hello from a registry");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello from a registry"[..]), "{}", daemon.log());
    let r = daemon.post("/v1/functions/gray-oci", &common::camera_jpeg());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let out = image::load_from_memory(&r.body).unwrap();
    assert_eq!(out.color(), image::ColorType::L8);
    assert!(daemon.log().contains("functions from registries load unverified"), "{}", daemon.log());
    daemon.stop();
}

#[test]
fn a_cosign_signed_image_loads_under_trust_and_an_offline_board_starts_from_its_store() {
    let fx = Fixture::new("");
    let image = fx.registry.image("edge/echo:v1");
    let digest = fx.push(&wasm("echo"), &image);
    let pinned = format!("{}@{digest}", host_ref(&image).rsplit_once(':').unwrap().0);
    tool_ok(
        "cosign",
        &fx.dir,
        &["sign", "--key", "cosign.key", "--tlog-upload=false", "--allow-http-registry", "-y", &pinned],
        &NO_PASSWORD,
    );

    let dir = fx.dir.join("daemon");
    let extra = format!(
        "[trust]\nkeys = [{:?}]\n\n[fleet]\nstall_timeout = \"30s\"\n\n[functions.echo-oci]\nimage = {image:?}\n",
        fx.dir.join("cosign.pub")
    );
    let mut daemon = Daemon::start_in(&dir, &extra);
    let r = daemon.post("/v1/functions/echo-oci", b"signed");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"signed"[..]), "{}", daemon.log());
    assert!(daemon.log().contains(&digest) && daemon.log().contains("cosign.pub"), "{}", daemon.log());
    daemon.stop();

    // Offline: the registry's port now accepts and never answers. A start that asked it
    // would wait out stall_timeout; the store answers instead, and nothing connects.
    let port = fx.registry.port;
    let mut registry = fx.registry;
    registry.stop();
    let silent = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    silent.set_nonblocking(true).unwrap();
    let mut daemon = Daemon::start_in(&dir, &extra);
    let r = daemon.post("/v1/functions/echo-oci", b"offline");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"offline"[..]), "{}", daemon.log());
    assert!(silent.accept().is_err(), "the offline start connected to the registry");
    daemon.stop();
}

#[test]
fn what_edgefn_signs_cosign_verifies_and_a_key_it_did_not_sign_with_fails() {
    let fx = Fixture::new("");
    let image = fx.registry.image("edge/echo:v1");
    let digest = fx.push(&wasm("echo"), &image);
    let pinned = format!("{}@{digest}", host_ref(&image).rsplit_once(':').unwrap().0);
    // cosign's own sealed key, and a plain PKCS#8 key from openssl.
    fx.sign(&image, "cosign.key");
    fx.sign(&image, "other.key");
    let verify = |key: &str| {
        tool(
            "cosign",
            &fx.dir,
            &["verify", "--key", key, "--insecure-ignore-tlog=true", "--allow-http-registry", &pinned],
            &[],
        )
    };
    for key in ["cosign.pub", "other.pub"] {
        let out = verify(key);
        assert!(out.status.success(), "cosign verify --key {key}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&digest));
    }
    openssl(&fx.dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "third.key"]);
    openssl(&fx.dir, &["ec", "-in", "third.key", "-pubout", "-out", "third.pub"]);
    assert!(!verify("third.pub").status.success(), "cosign accepted a key that signed nothing");
    // And the board accepts both signatures it wrote beside each other.
    fx.pulled(&image);
}

/// Each refusal names its cause, and the store keeps what the tag resolved to before.
#[test]
fn unsigned_foreign_copied_tampered_malformed_oversized_and_cut_off_artifacts_are_refused() {
    let fx = Fixture::new("[fleet]\nmax_module = \"256 KiB\"\nstall_timeout = \"2s\"\n");
    let good = fx.registry.image("edge/echo:v1");
    let good_digest = fx.push(&wasm("echo"), &good);
    fx.sign(&good, "cosign.key");
    fx.pulled(&good);
    assert_eq!(fx.stored(&good).as_deref(), Some(good_digest.as_str()));

    // Unsigned: the tag moves to a version nobody signed.
    fx.push(&wasm("trap"), &good);
    assert!(fx.refused(&good).contains("is not signed"), "{}", fx.refused(&good));
    assert_eq!(fx.stored(&good).as_deref(), Some(good_digest.as_str()), "a refused pull changed the store");

    // Signed by a key the board does not trust.
    let foreign = fx.registry.image("edge/echo:foreign");
    fx.push(&wasm("printenv"), &foreign);
    fx.sign(&foreign, "other.key");
    assert!(fx.refused(&foreign).contains("none by a key in [trust] keys"));

    // A valid signature copied from another digest.
    let copied = fx.registry.image("edge/echo:copied");
    let copied_digest = fx.push(&wasm("spin"), &copied);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use edgefn::fleet::{ImageRef, artifact, registry, trust};
        let cfg = edgefn::config::Config::load(&fx.config, true).unwrap();
        let reg = registry::Registry::new(&cfg);
        let base = ImageRef::parse(&good).unwrap();
        let from = base.with_tag(&trust::signature_tag(&good_digest));
        let (sig, _) = reg.manifest(&from, &[artifact::MANIFEST]).await.unwrap().unwrap();
        reg.push_manifest(&base.with_tag(&trust::signature_tag(&copied_digest)), &sig).await.unwrap();
    });
    assert!(fx.refused(&copied).contains("belongs to another artifact"), "{}", fx.refused(&copied));

    // A tampered module blob: signed, but its bytes no longer match the digest.
    let tampered = fx.registry.image("edge/echo:tampered");
    let tampered_digest = fx.push(&wasm("readfile"), &tampered);
    fx.sign(&tampered, "cosign.key");
    let layer = module_digest(&fx, &tampered_digest);
    let file = fx.registry.blob_file(&layer);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    assert!(fx.refused(&tampered).contains("tampered with or damaged"), "{}", fx.refused(&tampered));

    // A manifest whose digest is not the pinned one: the registry's copy was altered.
    let pinned_image = fx.registry.image("edge/echo:pinned");
    let pinned_digest = fx.push(&wasm("flood"), &pinned_image);
    let manifest_file = fx.registry.blob_file(&pinned_digest);
    let altered =
        String::from_utf8(std::fs::read(&manifest_file).unwrap()).unwrap().replacen("flood.wasm", "flood.wasn", 1);
    std::fs::write(&manifest_file, altered).unwrap();
    let by_digest = format!("{}@{pinned_digest}", pinned_image.rsplit_once(':').unwrap().0);
    let err = fx.refused(&by_digest);
    assert!(err.contains("not the pinned"), "{err}");

    // Not the wasm layout: another layer media type, and two layers.
    std::fs::copy(wasm("echo"), fx.dir.join("echo.wasm")).unwrap();
    std::fs::copy(wasm("trap"), fx.dir.join("trap.wasm")).unwrap();
    let config_arg = "config.json:application/vnd.wasm.config.v0+json";
    std::fs::write(fx.dir.join("config.json"), "{}").unwrap();
    let wrong_type = fx.registry.image("edge/echo:octet");
    tool_ok(
        "oras",
        &fx.dir,
        &["push", "--plain-http", host_ref(&wrong_type), "--config", config_arg, "echo.wasm:application/octet-stream"],
        &[],
    );
    assert!(
        fx.refused(&wrong_type).contains("its layer's media type is application/octet-stream"),
        "{}",
        fx.refused(&wrong_type)
    );
    let no_config = fx.registry.image("edge/echo:noconfig");
    tool_ok("oras", &fx.dir, &["push", "--plain-http", host_ref(&no_config), "echo.wasm:application/wasm"], &[]);
    assert!(fx.refused(&no_config).contains("not a wasm artifact"), "{}", fx.refused(&no_config));
    let two = fx.registry.image("edge/echo:two");
    tool_ok(
        "oras",
        &fx.dir,
        &[
            "push",
            "--plain-http",
            host_ref(&two),
            "--config",
            config_arg,
            "echo.wasm:application/wasm",
            "trap.wasm:application/wasm",
        ],
        &[],
    );
    assert!(fx.refused(&two).contains("has 2 layers"), "{}", fx.refused(&two));

    // Over fleet.max_module (256 KiB): grayscale is larger, and is refused before it downloads.
    let big = fx.registry.image("edge/gray:big");
    fx.push(&wasm("grayscale"), &big);
    fx.sign(&big, "cosign.key");
    assert!(fx.refused(&big).contains("over fleet.max_module"), "{}", fx.refused(&big));

    // A registry that dies mid-pull, and one that stalls: the module's download breaks off.
    let cut = fx.registry.image("edge/echo:cut");
    let cut_digest = fx.push(&wasm("frameinfo"), &cut);
    fx.sign(&cut, "cosign.key");
    let layer = module_digest(&fx, &cut_digest);
    for hang in [false, true] {
        let proxy = CuttingProxy::start(fx.registry.port, &layer, 2000, hang);
        let through = cut.replace(&fx.registry.port.to_string(), &proxy.port.to_string());
        let err = fx.refused(&through);
        let why = if hang { "timed out" } else { "end of file" };
        assert!(err.contains(&layer) && err.contains(why), "{err}");
    }
    assert_eq!(fx.stored(&good).as_deref(), Some(good_digest.as_str()));
}

/// The module layer's digest of the manifest `digest`, from the registry's storage.
fn module_digest(fx: &Fixture, digest: &str) -> String {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(fx.registry.blob_file(digest)).unwrap()).unwrap();
    m["layers"][0]["digest"].as_str().unwrap().to_string()
}

#[test]
fn a_registry_behind_tls_and_htpasswd_takes_the_configured_ca_and_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = common::broker::Tls::generate(&tmp.path().join("tls"));
    let mut registry =
        Registry::start_tls(&tmp.path().join("registry"), &tls.server_cert, &tls.server_key, "edge", "s3cret");
    let host = registry.host();
    let image = format!("oci://{host}/edge/echo:v1");
    let config = |extra: &str| {
        let path = tmp.path().join("cli.toml");
        std::fs::write(&path, format!("[runtime]\nstate_dir = {:?}\n\n{extra}\n", tmp.path().join("state"))).unwrap();
        path
    };
    let run = |cfg: &Path, args: &[&str]| edgefn().arg("--config").arg(cfg).args(args).output().unwrap();
    let echo = wasm("echo");
    let echo = echo.to_str().unwrap();

    let full = format!(
        "[registries.\"{host}\"]\ninsecure = false\nca = {:?}\nusername = \"edge\"\npassword = \"s3cret\"\n",
        tls.ca
    );
    let out = run(&config(&full), &["push", echo, &image]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), registry.log());
    let out = run(&config(&full), &["pull", &image]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Without the password the registry refuses; without the CA the TLS handshake does.
    let no_auth = format!("[registries.\"{host}\"]\ninsecure = false\nca = {:?}\n", tls.ca);
    let err = String::from_utf8_lossy(&run(&config(&no_auth), &["pull", &image]).stderr).to_lowercase();
    assert!(err.contains("not authorized"), "{err}");
    let no_ca = "[registries.\"127.0.0.1\"]\n".to_string()
        + &format!("[registries.\"{host}\"]\ninsecure = false\nusername = \"edge\"\npassword = \"s3cret\"\n");
    let err = String::from_utf8_lossy(&run(&config(&no_ca), &["pull", &image]).stderr).to_lowercase();
    assert!(err.contains("certificate") || err.contains("unknownissuer") || err.contains("invalid peer"), "{err}");
    registry.stop();
}

/// Nothing unsigned runs under trust: not an unsigned pull at start, and not a stored version
/// whose key has since left `[trust]` (checked again offline, at every start). The functions
/// from files keep serving meanwhile.
#[test]
fn under_trust_an_unsigned_image_never_runs_nor_a_stored_one_whose_key_was_removed() {
    let fx = Fixture::new("");
    let unsigned = fx.registry.image("edge/echo:unsigned");
    fx.push(&wasm("echo"), &unsigned);
    let signed = fx.registry.image("edge/echo:signed");
    fx.push(&wasm("printenv"), &signed);
    fx.sign(&signed, "cosign.key");

    let dir = fx.dir.join("daemon");
    let functions = format!("[functions.unsigned]\nimage = {unsigned:?}\n\n[functions.signed]\nimage = {signed:?}\n");
    let trusting = |key: &str| format!("[trust]\nkeys = [{:?}]\n\n{functions}", fx.dir.join(key));
    let mut daemon = Daemon::start_in(&dir, &trusting("cosign.pub"));
    let r = daemon.post("/v1/functions/unsigned", b"x");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("is not signed"), "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(daemon.post("/v1/functions/signed", b"").status, 200, "{}", daemon.log());
    assert_eq!(daemon.post("/v1/functions/echo", b"file").body, b"file");
    daemon.stop();

    // Offline, with the signer's key replaced by another: the stored version is refused too.
    let mut registry = fx.registry;
    registry.stop();
    let mut daemon = Daemon::start_in(&dir, &trusting("other.pub"));
    let r = daemon.post("/v1/functions/signed", b"");
    assert_eq!(r.status, 503, "{}", daemon.log());
    assert!(daemon.log().contains("none by a key in [trust] keys"), "{}", daemon.log());
    assert_eq!(daemon.post("/v1/functions/echo", b"file").body, b"file");
    daemon.stop();
}
