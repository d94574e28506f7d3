//! The real daprd (built from github.com/dapr/dapr's Go module by scripts/build-daprd.sh),
//! started on free loopback ports with its components written into a temp resources dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daprd binary: `DAPRD_BIN`, else the set-up script's cached build (built if missing).
pub fn bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("DAPRD_BIN") {
            return PathBuf::from(p);
        }
        let script = super::repo().join("scripts/build-daprd.sh");
        let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/build-daprd.sh");
        assert!(out.status.success(), "scripts/build-daprd.sh failed: no daprd to test against");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// A pub/sub component named `name` on mosquitto at `port`.
pub fn mqtt3(name: &str, port: u16) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: pubsub.mqtt3\n  version: v1\n  metadata:\n\
         \x20   - name: url\n      value: \"tcp://127.0.0.1:{port}\"\n    - name: qos\n      value: \"1\"\n\
         \x20   - name: cleanSession\n      value: \"false\"\n    - name: consumerID\n      value: \"edgefn-{port}\"\n"
    )
}

/// A pub/sub component named `name` on redis-server at `port`.
pub fn redis(name: &str, port: u16) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n\
         \x20   - name: redisHost\n      value: \"127.0.0.1:{port}\"\n    - name: redisPassword\n      value: \"\"\n"
    )
}

pub struct Daprd {
    pub child: Child,
    pub http_port: u16,
    pub grpc_port: u16,
    pub app_port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    pub started: Duration,
}

impl Daprd {
    /// Starts daprd for app `edgefn` on `app_port`, its HTTP API on `http_port`, with
    /// `components` (file name, YAML) in `dir/resources`, and waits until its components are up
    /// (`/v1.0/healthz/outbound`).
    pub fn start_on(
        dir: &Path,
        http_port: u16,
        app_port: u16,
        components: &[(&str, String)],
        envs: &[(&str, &str)],
    ) -> Daprd {
        let resources = dir.join("resources");
        std::fs::create_dir_all(&resources).unwrap();
        for (name, yaml) in components {
            std::fs::write(resources.join(name), yaml).unwrap();
        }
        let grpc_port = super::free_port();
        let args: Vec<String> = [
            "--app-id",
            "edgefn",
            "--app-port",
            &app_port.to_string(),
            "--app-protocol",
            "http",
            "--dapr-http-port",
            &http_port.to_string(),
            "--dapr-grpc-port",
            &grpc_port.to_string(),
            "--dapr-internal-grpc-port",
            &super::free_port().to_string(),
            "--metrics-port",
            &super::free_port().to_string(),
            "--resources-path",
            resources.to_str().unwrap(),
            "--log-level",
            "info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let envs: Vec<(String, String)> = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = Daprd {
            child: spawn(dir, &args, &envs),
            http_port,
            grpc_port,
            app_port,
            dir: dir.to_path_buf(),
            args,
            envs,
            started: Duration::ZERO,
        };
        d.wait_outbound();
        d
    }

    fn wait_outbound(&mut self) {
        let t = Instant::now();
        let until = t + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daprd exited early ({status}):\n{}", super::tail(&self.log(), 40));
            }
            let r = super::agent().get(&self.url("/v1.0/healthz/outbound")).call();
            if r.is_ok_and(|r| r.status().as_u16() == 204) {
                self.started = t.elapsed();
                return;
            }
            assert!(Instant::now() < until, "daprd not healthy after 60 s:\n{}", super::tail(&self.log(), 40));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daprd.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again with the same ports and components.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.dir, &self.args, &self.envs);
        self.wait_outbound();
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        super::rss_kib(self.child.id())
    }
}

fn spawn(dir: &Path, args: &[String], envs: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daprd.log")).unwrap();
    Command::new(bin())
        .args(args)
        .env_remove("DAPR_API_TOKEN")
        .env_remove("APP_API_TOKEN")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn daprd")
}

impl Drop for Daprd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- daprd log ({}) ----\n{}", self.dir.display(), super::tail(&self.log(), 60));
        }
    }
}
