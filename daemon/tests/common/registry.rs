//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port,
//! optionally with TLS and htpasswd auth; the real cosign and oras (built from their Go
//! modules by scripts/build-tools.sh); and a proxy that breaks a pull off midway.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    config: PathBuf,
}

/// Where the registry answers: `127.0.0.1:PORT`.
impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Registry::start_with(dir, "")
    }

    /// With TLS from `tls` (cert, key) and an htpasswd user.
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path, user: &str, password: &str) -> Registry {
        let htpasswd = dir.join("htpasswd");
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().expect("htpasswd (apache2-utils)");
        assert!(out.status.success());
        std::fs::write(&htpasswd, out.stdout).unwrap();
        let extra = format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: edgefn-test\n    path: {}\n",
            cert.display(),
            key.display(),
            htpasswd.display()
        );
        Registry::start_with(dir, &extra)
    }

    fn start_with(dir: &Path, extra: &str) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let port = super::free_port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut r = Registry { port, dir: dir.to_path_buf(), child: None, config };
        r.restart();
        r
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .args(["serve", self.config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt install docker-registry)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "registry not listening:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `oci://127.0.0.1:PORT/REPO`
    pub fn image(&self, repo_tag: &str) -> String {
        format!("oci://{}/{repo_tag}", self.host())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// The file the registry keeps blob `digest` in, to tamper with.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The directory holding cosign and oras, built once per machine (cached outside the clone).
pub fn tools() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = super::repo().join("scripts/build-tools.sh");
        let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/build-tools.sh");
        assert!(out.status.success(), "scripts/build-tools.sh failed: no cosign and oras to test with");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// Runs a tool (`cosign`, `oras`) in `dir`; the output, success or not.
pub fn tool(name: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(tools().join(name))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("HOME", dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Like [`tool`], but it must succeed.
pub fn tool_ok(name: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tool(name, dir, args, env);
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loopback proxy in front of a registry that forwards everything, except that the response
/// to a request whose first line contains `cut` stops after `after` bytes: closed, or (with
/// `hang`) left open and silent.
pub struct CuttingProxy {
    pub port: u16,
}

impl CuttingProxy {
    pub fn start(upstream: u16, cut: &str, after: usize, hang: bool) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = cut.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let cut = cut.clone();
                std::thread::spawn(move || serve(client, upstream, &cut, after, hang));
            }
        });
        CuttingProxy { port }
    }
}

fn serve(mut client: TcpStream, upstream: u16, cut: &str, after: usize, hang: bool) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    // One request per connection: ask for Connection: close by reading the head ourselves.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let first = text.lines().next().unwrap_or_default().to_string();
    let rewritten: String = text
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
    if server.write_all(rewritten.as_bytes()).is_err() {
        return;
    }
    let mut to_server = client.try_clone().unwrap();
    let mut server_w = server.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut to_server, &mut server_w);
    });
    let limit = if first.contains(cut) { after } else { usize::MAX };
    let mut sent = 0;
    let mut buf = [0u8; 8192];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = n.min(limit - sent);
        if client.write_all(&buf[..n]).is_err() {
            return;
        }
        sent += n;
        if sent >= limit {
            if hang {
                std::thread::sleep(Duration::from_secs(120));
            }
            // The copying thread holds a clone: only a shutdown closes the connection.
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = server.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}
