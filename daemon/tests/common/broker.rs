//! A real mosquitto (Debian's), started on a free loopback port with on-disk persistence so a
//! restart keeps persistent sessions and their queued messages. Optionally TLS-only, with a
//! client certificate and a password required.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    /// Listener settings (auth, TLS) for the config file.
    listener: String,
    /// Sessions and queued messages survive a restart.
    persistent: bool,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    pub fn generate(dir: &Path) -> Tls {
        std::fs::create_dir_all(dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ca = ["-subj", "/CN=edgefn test CA", "-keyout", "ca.key", "-out", "ca.pem"];
        run(&[&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"][..], &ca[..]].concat());
        // Extensions make v3 certificates; webpki refuses v1.
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, cn) in [("server", "127.0.0.1"), ("client", "edgefn")] {
            let (subj, key, csr, pem, ext) = (
                format!("/CN={cn}"),
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            run(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", &subj, "-keyout", &key, "-out", &csr]);
            let mut sign = vec!["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key"];
            sign.extend(["-CAcreateserial", "-days", "2", "-out", &pem, "-extfile", &ext]);
            run(&sign);
        }
        Tls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::with_listener(dir, "allow_anonymous true\n".into())
    }

    /// A broker that forgets every session when it restarts.
    pub fn start_without_persistence(dir: &Path) -> Broker {
        let mut b = Broker {
            port: super::free_port(),
            dir: dir.to_path_buf(),
            child: None,
            listener: "allow_anonymous true\n".into(),
            persistent: false,
        };
        b.spawn();
        b
    }

    /// A broker whose anonymous clients may use only the topics `acl` grants (mosquitto's
    /// acl_file syntax): a publish elsewhere is refused, over MQTT 5 with a reason code.
    pub fn start_with_acl(dir: &Path, acl: &str) -> Broker {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("acl");
        std::fs::write(&file, acl).unwrap();
        Broker::with_listener(dir, format!("allow_anonymous true\nacl_file {}\n", file.display()))
    }

    /// What mosquitto logged so far (`log_type all`), to check that a scenario really happened.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// A TLS-only broker that wants a client certificate signed by the test CA and a password.
    pub fn start_tls(dir: &Path, tls: &Tls, user: &str, password: &str) -> Broker {
        std::fs::create_dir_all(dir).unwrap();
        let pwfile = dir.join("passwd");
        std::fs::write(&pwfile, "").unwrap();
        let st = Command::new("mosquitto_passwd").args(["-b", pwfile.to_str().unwrap(), user, password]).status();
        assert!(st.unwrap().success());
        let listener = format!(
            "allow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pwfile.display(),
            tls.ca.display(),
            tls.server_cert.display(),
            tls.server_key.display()
        );
        Broker::with_listener(dir, listener)
    }

    fn with_listener(dir: &Path, listener: String) -> Broker {
        let mut b =
            Broker { port: super::free_port(), dir: dir.to_path_buf(), child: None, listener, persistent: true };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let conf = self.dir.join("mosquitto.conf");
        // `user root`: as root, mosquitto would drop to its own user and lose write access to
        // the test's persistence dir, and with it the sessions a restart must keep.
        let text = format!(
            "listener {} 127.0.0.1\n{}user root\npersistence {}\npersistence_location {}/\n\
             max_queued_messages 100000\nmax_inflight_messages 20\nlog_type all\nlog_dest file {}/mosquitto.log\n",
            self.port,
            self.listener,
            self.persistent,
            self.dir.display(),
            self.dir.display()
        );
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("mosquitto")
            .args(["-c", conf.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt install mosquitto; scripts/setup.sh does)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "mosquitto did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Sends `sig` to the broker (SIGSTOP: it hangs; SIGKILL: it dies without saving).
    pub fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &mut self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
            if sig == nix::sys::signal::Signal::SIGKILL {
                let _ = c.wait();
                self.child = None;
            }
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// `mosquitto_pub` with `args` (e.g. `-f file`, `-n`, `-s` with stdin).
    pub fn publish_raw(&self, topic: &str, args: &[&str], stdin: Option<&[u8]>) {
        use std::io::Write;
        let mut c = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1", "-t", topic])
            .args(args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(data) = stdin {
            c.stdin.take().unwrap().write_all(data).unwrap();
        }
        drop(c.stdin.take());
        assert!(c.wait().unwrap().success(), "mosquitto_pub failed");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
            eprintln!("---- mosquitto log ----\n{}", super::tail(&log, 200));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every message on `topic` at a broker, collected in the background by mosquitto_sub (QoS 1,
/// one line each: a JSON document, or `{"not_json": line}`).
pub struct Subscriber {
    child: Child,
    messages: Arc<Mutex<Vec<Value>>>,
}

impl Subscriber {
    pub fn start(broker: &Broker, topic: &str) -> Subscriber {
        Subscriber::spawn(broker, topic, &[])
    }

    /// A subscriber with a persistent session (`client_id`): across a broker restart the broker
    /// keeps what was published for it, so nothing is missed while it reconnects.
    pub fn start_persistent(broker: &Broker, topic: &str, client_id: &str) -> Subscriber {
        Subscriber::spawn(broker, topic, &["-c", "-i", client_id])
    }

    fn spawn(broker: &Broker, topic: &str, extra: &[&str]) -> Subscriber {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-t", topic])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "not_json": line }));
                sink.lock().unwrap().push(v);
            }
        });
        // Subscribed before anything is published.
        std::thread::sleep(Duration::from_millis(300));
        Subscriber { child, messages }
    }

    pub fn messages(&self) -> Vec<Value> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits up to `secs` until `pred(messages)` holds; `log` goes in the failure report.
    pub fn wait_until(&self, secs: u64, what: &str, pred: impl Fn(&[Value]) -> bool, log: &str) {
        let until = Instant::now() + Duration::from_secs(secs);
        while !pred(&self.messages()) {
            assert!(
                Instant::now() < until,
                "after {secs} s, still waiting for {what}; the subscriber has {} messages: {:?}\n{}",
                self.messages().len(),
                self.messages().iter().take(50).collect::<Vec<_>>(),
                super::tail(log, 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wall-clock milliseconds, as results carry them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Publishes `per_camera` frames (QoS 1) on each of `cameras` cameras `prefix0..`, `gap` apart over all of
/// them (zero: all at once); when each was published, by (camera, seq).
pub async fn publish_frames(
    port: u16,
    cameras: usize,
    prefix: &str,
    frame: &[u8],
    per_camera: usize,
    gap: Duration,
) -> HashMap<(String, u64), u64> {
    let mut opts = rumqttc::MqttOptions::new(format!("camera-{prefix}-{port}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 1024);
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let start = tokio::time::Instant::now();
    let mut sent = HashMap::new();
    for i in 0..per_camera * cameras {
        if !gap.is_zero() {
            tokio::time::sleep_until(start + gap * i as u32).await;
        }
        let camera = format!("{prefix}{}", i % cameras);
        client
            .publish(format!("cameras/{camera}/frames"), rumqttc::QoS::AtLeastOnce, false, frame.to_vec())
            .await
            .unwrap();
        // The daemon numbers each camera's frames from 1, in the order they arrive.
        sent.insert((camera, (i / cameras) as u64 + 1), now_ms());
    }
    // Let the last ones reach the broker before the client goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    poller.abort();
    sent
}
