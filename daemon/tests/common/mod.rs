//! Helpers shared by the integration tests: the built functions, the test images, and a real
//! `edgefn run` process on a free loopback port.
#![allow(dead_code)]

pub mod broker;
pub mod daprd;
pub mod fake_dapr;
pub mod registry;

use std::io::Cursor;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_edgefn");

/// The board id every test daemon runs as (`EDGEFN__BOARD__ID`), unless its config names one:
/// result ids are `BOARD/pipeline/camera/seq`.
pub const BOARD: &str = "tb";

/// The checkout under test: `CARGO_MANIFEST_DIR/..` as cargo sets it when it runs the test, not
/// as it was when the test was compiled. One target dir serves every clone (`.cargo/config.toml`),
/// and cargo keeps a test binary built in another clone fresh, so a path baked in at compile time
/// can name a clone that is gone.
pub fn repo() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent().expect("the daemon crate sits in the repo").to_path_buf()
}

/// A command running the built `edgefn`. With `EDGEFN_TEST_RUNNER` set (e.g. `qemu-aarch64 -L /`
/// for the aarch64 build, where binfmt is not mounted), it runs under that runner.
pub fn edgefn() -> Command {
    match std::env::var("EDGEFN_TEST_RUNNER").ok().filter(|r| !r.trim().is_empty()) {
        Some(runner) => {
            let mut parts = runner.split_whitespace();
            let mut c = Command::new(parts.next().unwrap());
            c.args(parts).arg(BIN);
            c
        }
        None => Command::new(BIN),
    }
}

/// The functions and the test fixtures from functions/build.sh, side by side in one directory
/// (links into `functions/out` and `functions/out/fixtures`), made once per test process.
pub fn functions_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out =
            std::env::var_os("EDGEFN_FUNCTIONS_OUT").map(PathBuf::from).unwrap_or_else(|| repo().join("functions/out"));
        let out = out.canonicalize().unwrap_or(out);
        assert!(
            out.join("grayscale.wasm").exists() && out.join("fixtures/spin.wasm").exists(),
            "{} lacks the functions or fixtures: run functions/build.sh first (tests/run.sh does)",
            out.display()
        );
        // A test process cannot clean up after a static, so each one sweeps the dirs of those
        // that have exited.
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix("edgefn-test-functions-"));
            if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let merged = tmp.join(format!("edgefn-test-functions-{}", std::process::id()));
        std::fs::create_dir_all(&merged).unwrap();
        for dir in [out.clone(), out.join("fixtures")] {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "wasm") {
                    let link = merged.join(path.file_name().unwrap());
                    let _ = std::fs::remove_file(&link);
                    std::os::unix::fs::symlink(&path, &link).unwrap();
                }
            }
        }
        merged
    })
    .clone()
}

/// The runtime in-process, over `functions_dir()` with `extra` config, and its scratch dir.
/// The AOT cache for a test that does not test the cache itself: `EDGEFN_TEST_AOT_CACHE`,
/// one directory for the whole run, when the harness sets it, else `own`. Under qemu
/// (tests/system/aarch64.sh) each start would otherwise compile every function at emulated
/// speed, about a minute each; the AOT tests keep their own caches, so compiling under
/// emulation is still tested.
pub fn aot_cache(own: PathBuf) -> PathBuf {
    std::env::var_os("EDGEFN_TEST_AOT_CACHE").filter(|p| !p.is_empty()).map(PathBuf::from).unwrap_or(own)
}

pub fn runtime(extra: &str) -> (edgefn::runtime::Runtime, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "[runtime]\nfunctions_dir = {:?}\ncache_dir = {:?}\n{extra}",
        functions_dir(),
        aot_cache(tmp.path().join("cache"))
    );
    let path = tmp.path().join("edgefn.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = edgefn::config::Config::load(&path, true).unwrap();
    let metrics = std::sync::Arc::new(edgefn::metrics::Metrics::new());
    (edgefn::runtime::Runtime::load(&cfg, metrics, None, &Default::default()).unwrap(), tmp)
}

pub fn wasm(name: &str) -> PathBuf {
    functions_dir().join(format!("{name}.wasm"))
}

/// Where scripts/setup.sh puts the test images and the model.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("EDGEFN_ASSETS").map(PathBuf::from).unwrap_or("/var/cache/edgefn/assets".into())
}

/// libLiteRt.so for the architecture the tests were built for (scripts/setup.sh fetches both).
pub fn litert_lib() -> PathBuf {
    let arch = if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" };
    let dir = std::env::var_os("EDGEFN_LITERT_DIR").map(PathBuf::from).unwrap_or("/var/cache/edgefn/litert".into());
    dir.join(arch).join("libLiteRt.so")
}

/// A CC0 test image fetched by scripts/setup.sh from the scikit-image wheel.
pub fn asset(name: &str) -> Vec<u8> {
    let path = assets_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", path.display()))
}

pub fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).expect("encode");
    out
}

/// chelsea.png as a 640×480 JPEG, like a camera frame.
pub fn camera_jpeg() -> Vec<u8> {
    let img = image::load_from_memory(&asset("chelsea.png")).unwrap();
    let img = img.resize_exact(640, 480, image::imageops::FilterType::Triangle).to_rgb8();
    encode(&image::DynamicImage::ImageRgb8(img), image::ImageFormat::Jpeg)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An HTTP agent that returns 4xx/5xx responses instead of erroring on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A running `edgefn run` with its own config, cache and state in a temp dir.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts with `functions_dir` set to the built functions, plus `extra` TOML.
    pub fn start(extra: &str) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut d = Daemon::start_full(&dir, &functions_dir(), extra, &[], aot_cache(dir.join("cache")));
        d._tmp = Some(tmp);
        d
    }

    /// Starts in `dir` (kept by the caller, so a restart finds the same cache: its own,
    /// never [`aot_cache`]'s).
    pub fn start_in(dir: &Path, extra: &str) -> Daemon {
        Daemon::start_with_functions(dir, &functions_dir(), extra)
    }

    /// Starts in `dir` serving the functions in `functions`, with its own AOT cache.
    pub fn start_with_functions(dir: &Path, functions: &Path, extra: &str) -> Daemon {
        Daemon::start_full(dir, functions, extra, &[], dir.join("cache"))
    }

    /// Starts in `dir` with `envs` set (e.g. DAPR_HTTP_PORT, tokens).
    pub fn start_env(dir: &Path, extra: &str, envs: &[(&str, String)]) -> Daemon {
        Daemon::start_full(dir, &functions_dir(), extra, envs, aot_cache(dir.join("cache")))
    }

    pub fn start_full(dir: &Path, functions: &Path, extra: &str, envs: &[(&str, String)], cache: PathBuf) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let config = format!(
            "[runtime]\nfunctions_dir = {functions:?}\ncache_dir = {cache:?}\nstate_dir = {:?}\n\n{extra}\n",
            dir.join("state"),
        );
        let config_path = dir.join("edgefn.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log")).unwrap();
        // systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid.
        // EDGEFN_TEST_NOFILE runs the daemon under that open-file limit, as systemd's default.
        let nofile = envs.iter().find(|(k, _)| *k == "EDGEFN_TEST_NOFILE").map(|(_, v)| v.clone());
        // EDGEFN_TEST_STRACE=FILE runs the daemon under strace, logging its fsync-family calls.
        let strace = envs.iter().find(|(k, _)| *k == "EDGEFN_TEST_STRACE").map(|(_, v)| v.clone());
        // EDGEFN_TEST_TASKSET=CPUS pins the daemon to those cores (tokio sizes its workers from that).
        let taskset = envs.iter().find(|(k, _)| *k == "EDGEFN_TEST_TASKSET").map(|(_, v)| v.clone());
        let mut cmd = if let Some(cpus) = taskset {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpus, BIN]);
            c
        } else if let Some(log) = strace {
            let mut c = Command::new("strace");
            c.args(["-f", "-qq", "-e", "trace=fsync,fdatasync,sync_file_range,msync", "-o", &log, BIN]);
            c
        } else if envs.iter().any(|(k, _)| *k == "WATCHDOG_USEC") || nofile.is_some() {
            let mut c = Command::new("/bin/sh");
            let ulimit = nofile.map(|n| format!("ulimit -n {n} && ")).unwrap_or_default();
            c.args(["-c", &format!("{ulimit}WATCHDOG_PID=$$ exec \"$0\" \"$@\""), BIN]);
            c
        } else {
            edgefn()
        };
        let child = cmd
            .args(["--config", config_path.to_str().unwrap(), "run"])
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .env_remove("DAPR_HTTP_PORT")
            .env_remove("DAPR_API_TOKEN")
            .env_remove("APP_API_TOKEN")
            // The port is per start; the file may carry its own [server] section.
            .env(
                "EDGEFN__SERVER__LISTEN",
                format!(
                    "{}:{port}",
                    if envs.iter().any(|(k, _)| *k == "EDGEFN_TEST_LISTEN_ALL") { "0.0.0.0" } else { "127.0.0.1" }
                ),
            )
            .envs((!extra.contains("[board]")).then_some(("EDGEFN__BOARD__ID", BOARD)))
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edgefn");
        let mut d = Daemon { child, addr: ([127, 0, 0, 1], port).into(), dir: dir.to_path_buf(), _tmp: None };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        // Under qemu (EDGEFN_TEST_RUNNER) the functions compile at emulated speed.
        let emulated = std::env::var("EDGEFN_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty());
        let wait = Duration::from_secs(if emulated { 300 } else { 60 });
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("edgefn exited early ({status}):\n{}", self.log());
            }
            // The socket is bound before the functions load; an answer means they have.
            if std::net::TcpStream::connect(self.addr).is_ok() && agent().get(&self.url("/healthz")).call().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("edgefn not listening after {wait:?}:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str) -> Response {
        read(agent().get(&self.url(path)).call().expect("GET"))
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Response {
        read(agent().post(&self.url(path)).send(body).expect("POST"))
    }

    pub fn post_with(&self, path: &str, header: (&str, &str), body: &[u8]) -> Response {
        read(agent().post(&self.url(path)).header(header.0, header.1).send(body).expect("POST"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The value of one un-labelled or fully labelled sample in /metrics, 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = String::from_utf8(self.get("/metrics").body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    pub fn assert_alive(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "daemon died:\n{}", self.log());
        assert_eq!(self.get("/healthz").status, 200);
    }

    /// SIGKILL: no chance to flush or acknowledge anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until the log says `what` `n` times, up to `secs`.
    pub fn wait_log(&self, what: &str, n: usize, secs: u64) {
        let until = Instant::now() + Duration::from_secs(secs);
        while self.log().matches(what).count() < n {
            assert!(Instant::now() < until, "no {n}× `{what}` in {secs} s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `metric` until `pred` holds, up to `secs`.
    pub fn wait_metric(&self, series: &str, secs: u64, pred: impl Fn(f64) -> bool) -> f64 {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.metric(series);
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < until, "{series} = {v} after {secs} s\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- daemon log ({}) ----\n{}", self.dir.display(), tail(&self.log(), 80));
        }
    }
}

/// The last `n` lines of `text`, for failure reports.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read(mut resp: ureq::http::Response<ureq::Body>) -> Response {
    let status = resp.status().as_u16();
    let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = resp.body_mut().with_config().limit(64 << 20).read_to_vec().expect("body");
    Response { status, content_type, body }
}

/// Decodes an image and asserts every pixel has R = G = B.
pub fn assert_gray(bytes: &[u8]) -> image::RgbImage {
    let img = image::load_from_memory(bytes).expect("output decodes").to_rgb8();
    for p in img.pixels() {
        assert!(p[0] == p[1] && p[1] == p[2], "pixel {p:?} is not gray");
    }
    img
}

/// Resident memory of process `pid` in KiB (`VmRSS` in /proc).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// Its anonymous part (`RssAnon`): the heap, stacks, copies; what the kernel cannot drop.
pub fn anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon")
}

/// Its file-backed part (`RssFile`): code and mapped files, which the kernel can drop and read again.
pub fn file_kib(pid: u32) -> u64 {
    status_kib(pid, "RssFile")
}

/// Over the mappings of process `pid` whose path ends with `file`: their size and what of
/// them is resident, in KiB (`/proc/PID/smaps`).
pub fn mapped_kib(pid: u32, file: &str) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut size, mut rss, mut ours) = (0, 0, false);
    for line in smaps.lines() {
        let field =
            |name: &str| line.strip_prefix(name).and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok());
        if line.split_whitespace().next().is_some_and(|range| range.contains('-') && !range.ends_with(':')) {
            ours = line.ends_with(file);
        } else if let Some(kib) = field("Size:").filter(|_| ours) {
            size += kib;
        } else if let Some(kib) = field("Rss:").filter(|_| ours) {
            rss += kib;
        }
    }
    (size, rss)
}

/// Bytes process `pid` has caused to be written to storage (`write_bytes` in /proc/PID/io).
/// The CPU time `pid` has used, user and system, in seconds (`/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised name: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as f64
}

/// The `p`th percentile of `v` (sorted in place).
pub fn percentile<T: Ord + Copy>(v: &mut [T], p: usize) -> T {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

pub fn write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// The one child of `pid` (the daemon under a wrapper such as strace).
pub fn only_child(pid: u32) -> u32 {
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    kids.split_whitespace().next().and_then(|k| k.parse().ok()).unwrap_or_else(|| panic!("{pid} has no child"))
}

/// One `kB` field of `/proc/<pid>/status` (`RssAnon`, `RssFile`, `Threads` is a count).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A redis-server (Debian's) on a free loopback port, without persistence.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub fn start(dir: &Path) -> Redis {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup.sh installs it)");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server not listening on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { port, child }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Random bytes: incompressible, so a result's size is what is sent.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tmpfs of `size` mounted at `dir` for one test: a disk that really fills.
pub struct SmallDisk {
    pub dir: std::path::PathBuf,
}

impl SmallDisk {
    pub fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mounting a tmpfs at {} (the test needs root)", dir.display());
        SmallDisk { dir: dir.to_path_buf() }
    }

    /// Writes a filler file until the disk refuses (ENOSPC).
    pub fn fill(&self) -> std::path::PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        loop {
            match std::io::Write::write_all(&mut f, &chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
