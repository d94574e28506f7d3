//! The sd_notify protocol without a systemd: a datagram socket stands in for NOTIFY_SOCKET and
//! records what the daemon says (READY=1 once bound, watchdog pings, STATUS, and RELOADING=1 then
//! READY=1 around a SIGHUP that applies a config change). The real systemd run is in
//! tests/system/deb-in-nspawn.sh.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::Daemon;

fn recv_until(sock: &UnixDatagram, secs: u64, want: &str, seen: &mut Vec<String>) {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no `{want}` from the daemon in {secs} s; got {seen:?}");
}

#[test]
fn ready_watchdog_status_and_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let envs = [("NOTIFY_SOCKET", path.to_str().unwrap().to_string()), ("WATCHDOG_USEC", "600000".to_string())];
    let mut d = Daemon::start_env(&tmp.path().join("d"), "[functions.grayscale]\ndeadline = \"2s\"\n", &envs);
    let mut seen = Vec::new();
    recv_until(&sock, 10, "READY=1", &mut seen);
    assert!(seen.iter().any(|m| m.contains("STATUS=") && m.contains("functions")), "{seen:?}");
    recv_until(&sock, 5, "WATCHDOG=1", &mut seen);

    // A config change, then SIGHUP: RELOADING=1, READY=1, and the change is live.
    let cfg = d.dir.join("edgefn.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("deadline = \"2s\"", "deadline = \"3s\"");
    std::fs::write(&cfg, text).unwrap();
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    seen.clear();
    recv_until(&sock, 10, "RELOADING=1", &mut seen);
    recv_until(&sock, 10, "READY=1", &mut seen);
    let gray = d.get("/v1/functions").json()["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "grayscale")
        .cloned()
        .unwrap();
    assert_eq!(gray["limits"]["deadline_ms"], 3000, "reload did not apply");
    assert_eq!(d.post("/v1/functions/grayscale", &common::asset("chelsea.png")).status, 200);

    // A broken config on reload is refused; the daemon keeps serving the old one.
    std::fs::write(&cfg, "[limits]\nnot_a_key = 1\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    seen.clear();
    recv_until(&sock, 10, "READY=1", &mut seen);
    assert!(seen.iter().any(|m| m.contains("reload refused")), "{seen:?}");
    d.assert_alive();
    assert!(d.log().contains("not_a_key"));

    seen.clear();
    assert!(d.stop().success());
    recv_until(&sock, 5, "STOPPING=1", &mut seen);
}

/// A SIGHUP to an MQTT 5 config with a 2 s keep-alive once reached rumqttc's assertion inside
/// the reload and took the daemon down (and a restart then crash-looped). Now the reload is
/// refused, naming the key, and the daemon goes on serving.
#[test]
fn a_reload_to_settings_the_broker_client_asserts_on_is_refused_and_the_daemon_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let broker = common::broker::Broker::start(&tmp.path().join("broker"));
    let cfg = format!(
        "[mqtt]\nurl = \"{}\"\nversion = 5\nclient_id = \"edgefn-hup-{}\"\n\n[[pipeline]]\nname = \"p\"\n\
         source.mqtt = \"cameras/+/frames\"\nfunctions = [\"echo\"]\n",
        broker.url(),
        broker.port
    );
    let envs = [("NOTIFY_SOCKET", path.to_str().unwrap().to_string())];
    let mut d = Daemon::start_env(&tmp.path().join("d"), &cfg, &envs);
    let mut seen = Vec::new();
    recv_until(&sock, 10, "READY=1", &mut seen);
    let file = d.dir.join("edgefn.toml");
    let text = std::fs::read_to_string(&file).unwrap().replace("version = 5", "version = 5\nkeep_alive = \"2s\"");
    std::fs::write(&file, text).unwrap();
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    seen.clear();
    recv_until(&sock, 10, "READY=1", &mut seen);
    assert!(seen.iter().any(|m| m.contains("reload refused") && m.contains("mqtt.keep_alive")), "{seen:?}");
    std::thread::sleep(Duration::from_millis(500));
    d.assert_alive();
}
