//! The command line: help that stands on its own, config validation that names the bad key,
//! environment overrides, and `invoke` failing with one line and a non-zero exit.

mod common;

use std::io::Write;
use std::process::{Output, Stdio};

use common::{asset, functions_dir};

fn edgefn(args: &[&str], envs: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut child = common::edgefn()
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn write_config(body: &str) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("edgefn.toml");
    let text =
        format!("[runtime]\nfunctions_dir = {:?}\ncache_dir = {:?}\n{body}", functions_dir(), tmp.path().join("cache"));
    std::fs::write(&path, text).unwrap();
    (tmp, path.to_str().unwrap().to_string())
}

#[test]
fn help_names_every_command() {
    let out = edgefn(&["--help"], &[], b"");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["run", "invoke", "compile", "check-config", "--config", "EDGEFN__SECTION__KEY"] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
    let out = edgefn(&["compile", "--help"], &[], b"");
    assert!(String::from_utf8(out.stdout).unwrap().contains("aarch64-unknown-linux-gnu"));
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    for (body, key) in [
        ("[server]\nlisten = \"127.0.0.1:1\"\nlisen_typo = 1\n", "lisen_typo"),
        ("[limits]\nmemroy = \"1 MiB\"\n", "memroy"),
        ("[functions.grayscale]\ndeadlin = \"1s\"\n", "deadlin"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection"),
    ] {
        let (_tmp, path) = write_config(body);
        let out = edgefn(&["--config", &path, "check-config"], &[], b"");
        assert!(!out.status.success(), "{key} accepted");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(key), "error does not name `{key}`: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let (_tmp, path) = write_config("[limits]\nmax_instances = 0\n");
    let out = edgefn(&["--config", &path, "check-config"], &[], b"");
    assert!(String::from_utf8(out.stderr).unwrap().contains("max_instances"));
}

#[test]
fn check_config_prints_effective_values_with_env_overrides() {
    let (_tmp, path) = write_config("[functions.grayscale]\ndeadline = \"750ms\"\n");
    let out = edgefn(
        &["--config", &path, "check-config"],
        &[("EDGEFN__SERVER__LISTEN", "127.0.0.1:9999"), ("EDGEFN__LIMITS__MAX_INSTANCES", "7")],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(parsed["server"]["listen"].as_str(), Some("127.0.0.1:9999"));
    assert_eq!(parsed["limits"]["max_instances"].as_integer(), Some(7));
    assert_eq!(parsed["functions"]["grayscale"]["deadline"].as_str(), Some("750ms"));
    assert_eq!(parsed["server"]["max_body"].as_str(), Some("16.0 MiB"));
}

#[test]
fn check_config_masks_secrets() {
    let (_tmp, path) = write_config(concat!(
        "[server]\ntoken = \"tok-s3cret\"\n\n[mqtt]\nusername = \"cam\"\npassword = \"pw-s3cret\"\n\n",
        "[registries.\"registry.example.org\"]\nusername = \"ci\"\npassword = \"reg-s3cret\"\n\n",
        "[registries.\"other.example.org\"]\ntoken = \"bearer-s3cret\"\n",
    ));
    let out = edgefn(&["--config", &path, "check-config"], &[], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("s3cret"), "a secret in clear text:\n{text}");
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(parsed["server"]["token"].as_str(), Some("********"));
    assert_eq!(parsed["mqtt"]["password"].as_str(), Some("********"));
    assert_eq!(parsed["mqtt"]["username"].as_str(), Some("cam"));
    assert_eq!(parsed["registries"]["registry.example.org"]["password"].as_str(), Some("********"));
    assert_eq!(parsed["registries"]["other.example.org"]["token"].as_str(), Some("********"));
}

/// These passed check-config and then panicked rumqttc at start (a crash loop) or at a SIGHUP.
#[test]
fn check_config_refuses_what_the_broker_client_would_panic_on() {
    for (body, key) in [
        ("[mqtt]\nversion = 5\nkeep_alive = \"2s\"\n", "mqtt.keep_alive"),
        ("[mqtt]\nkeep_alive = \"300ms\"\n", "mqtt.keep_alive"),
        ("[mqtt]\nclient_id = \"\"\n", "mqtt.client_id"),
    ] {
        let (_tmp, path) = write_config(body);
        let out = edgefn(&["--config", &path, "check-config"], &[], b"");
        assert!(!out.status.success(), "{body:?} accepted");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(key) && err.lines().count() == 1, "{err}");
    }
}

#[test]
fn invoke_runs_locally_and_fails_in_one_line() {
    let (_tmp, path) = write_config("");
    let out = edgefn(&["--config", &path, "invoke", "grayscale"], &[], &asset("coffee.png"));
    assert!(out.status.success());
    common::assert_gray(&out.stdout);

    let out = edgefn(&["--config", &path, "invoke", "grayscale"], &[], b"definitely not an image");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("edgefn: function `grayscale` rejected its input"), "{err}");

    let out = edgefn(&["--config", &path, "invoke", "nosuch"], &[], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("unknown function `nosuch`"));

    let out = edgefn(&["--config", &path, "invoke", "printenv", "-e", "A=b"], &[], b"");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "A=b\narg:printenv\n");
}
