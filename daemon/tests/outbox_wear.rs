//! What a frame costs a board's storage, guarded by counts that do not depend on the machine's
//! load: the daemon's fsyncs (strace) and the bytes it writes (`/proc/PID/io`), through an
//! echo pipeline with a file sink. `cargo bench --bench frame_cost` prints the same figures
//! at several rates.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Daemon;

const FRAMES: usize = 100;

fn config(results: &Path) -> String {
    format!("[[pipeline]]\nname = \"echo\"\nfunctions = [\"echo\"]\nsinks = [{{ file = {{ path = {results:?} }} }}]\n")
}

/// fsync-family calls in the strace log so far (a call split by another thread's line counts
/// once: its "resumed" half does not name the call with a parenthesis).
fn syncs(trace: &Path) -> usize {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    text.lines()
        .filter(|l| ["fsync(", "fdatasync(", "sync_file_range(", "msync("].iter().any(|c| l.contains(c)))
        .count()
}

/// The result ids in the file sink, and its line count; every line must be whole JSON.
fn ids(results: &Path) -> (BTreeSet<String>, usize) {
    let text = std::fs::read_to_string(results).unwrap_or_default();
    let mut ids = BTreeSet::new();
    let mut lines = 0;
    for line in text.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("a torn line in the file sink ({e}): {line:.80}"));
        ids.insert(event["id"].as_str().unwrap().to_string());
        lines += 1;
    }
    (ids, lines)
}

fn wait_for_ids(results: &Path, n: usize) {
    let until = Instant::now() + Duration::from_secs(30);
    while ids(results).0.len() < n {
        assert!(Instant::now() < until, "{} of {n} results in the file sink", ids(results).0.len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

fn post_frames(d: &Daemon, frame: &[u8], n: usize) {
    for _ in 0..n {
        let r = d.post("/v1/pipelines/echo?camera=cam0", frame);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

/// Each answered frame's result was durable before its answer, so the daemon makes at least
/// one fsync a frame (its commit, here the file's). A frame that took three (commit, sync,
/// settle) fails this, and so does one whose result reaches the disk twice. A crash right
/// after the answers loses none of them.
#[test]
fn a_serial_frame_costs_at_least_one_fsync_and_at_most_one_and_a_half_and_a_crash_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (results, trace) = (dir.join("results.jsonl"), dir.join("strace.log"));
    let mut d = Daemon::start_full(
        dir,
        &common::functions_dir(),
        &config(&results),
        &[("EDGEFN_TEST_STRACE", trace.display().to_string())],
        common::aot_cache(dir.join("cache")),
    );
    let daemon = common::only_child(d.child.id());
    // Killing strace (as Daemon's drop does on a failed assertion) would leave its tracee running.
    let _reaper = Reaper(daemon);
    let frame = common::camera_jpeg();

    post_frames(&d, &frame, 20);
    wait_for_ids(&results, 20);
    // Past the warm-up's last settle, so its fsyncs are not counted below.
    std::thread::sleep(Duration::from_secs(1));
    let (syncs0, written0) = (syncs(&trace), common::write_bytes(daemon));
    assert!(syncs0 >= 20, "strace saw {syncs0} fsyncs for 20 frames: is it tracing the daemon?");

    post_frames(&d, &frame, FRAMES);
    wait_for_ids(&results, 20 + FRAMES);
    let (during, written) = (syncs(&trace) - syncs0, common::write_bytes(daemon) - written0);
    let per_frame = during as f64 / FRAMES as f64;
    let per_byte = written as f64 / (FRAMES * frame.len()) as f64;
    eprintln!("{during} fsyncs for {FRAMES} frames ({per_frame:.2} each); {per_byte:.2} bytes written per result byte");
    assert!(during >= FRAMES, "{during} fsyncs for {FRAMES} answered frames: some answer came before its commit");
    assert!(per_frame <= 1.5, "{per_frame:.2} fsyncs a frame");
    // The file holds the result as base64 JSON (1.37×) and, caught up, is its only copy.
    // Kept in the outbox as well, in redb's pages rounded up to a power of two, it took 4.1
    // to 4.5 here.
    assert!(per_byte <= 2.5, "{per_byte:.2} bytes written per result byte");

    // Killed at once after the last answer: some results may not be delivered yet.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = d.child.wait();
    let d = Daemon::start_with_functions(dir, &common::functions_dir(), &config(&results));
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (ids, lines) = ids(&results);
        if ids.len() == 20 + FRAMES {
            break;
        }
        assert!(
            Instant::now() < until,
            "after the restart: {} results of {}, in {lines} lines",
            ids.len(),
            20 + FRAMES
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(d);
}

/// Settles commit without an fsync: losing one in a crash repeats deliveries, never loses
/// a result. They must still reach the disk soon, by the next frame's commit or, on an idle
/// board, by the outbox's own within two seconds; and a clean stop leaves none behind. Without
/// that, a board that drained a backlog and then lost power would deliver it all again.
#[test]
fn delivered_results_are_not_delivered_again_after_an_idle_crash_or_a_clean_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let results = dir.join("results.jsonl");
    let frame = common::camera_jpeg();
    // A restarted daemon delivers what its outbox holds at once: a second is plenty for it.
    let lines_after_restart = |d: &Daemon| {
        assert_eq!(d.get("/healthz").status, 200);
        std::thread::sleep(Duration::from_secs(1));
        ids(&results).1
    };

    let mut d = Daemon::start_with_functions(dir, &common::functions_dir(), &config(&results));
    post_frames(&d, &frame, 20);
    wait_for_ids(&results, 20);
    // The last settle (half a second after the last delivery) and the idle persist
    // after it (two seconds).
    std::thread::sleep(Duration::from_millis(3500));
    d.kill();
    let mut d = Daemon::start_with_functions(dir, &common::functions_dir(), &config(&results));
    assert_eq!(lines_after_restart(&d), 20, "after an idle crash, a result was delivered again");

    post_frames(&d, &frame, 10);
    wait_for_ids(&results, 30);
    assert!(d.stop().success());
    let d = Daemon::start_with_functions(dir, &common::functions_dir(), &config(&results));
    assert_eq!(lines_after_restart(&d), 30, "after a clean stop, a result was delivered again");
}

/// Four cameras out of phase, 25 frames/s each, over HTTP: each camera waits for its own
/// commit, so only other cameras' frames can share it, and only if the commit waits for them.
/// With a 50 ms `commit_window` a commit takes about one frame per camera: 0.34 fsyncs a
/// frame in `frame_cost`, against 1.09 with no window. Over 0.6, the window gathers nothing.
#[test]
fn cameras_out_of_phase_share_an_fsync_within_the_commit_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (results, trace) = (dir.join("results.jsonl"), dir.join("strace.log"));
    let cfg = format!("[outbox]\ncommit_window = \"50ms\"\n\n{}", config(&results));
    let d = Daemon::start_full(
        dir,
        &common::functions_dir(),
        &cfg,
        &[("EDGEFN_TEST_STRACE", trace.display().to_string())],
        common::aot_cache(dir.join("cache")),
    );
    let _reaper = Reaper(common::only_child(d.child.id()));
    let frame = common::camera_jpeg();
    post_frames(&d, &frame, 5);
    wait_for_ids(&results, 5);
    std::thread::sleep(Duration::from_millis(500));
    let before = syncs(&trace);

    const PER_CAMERA: u32 = 75;
    let gap = Duration::from_millis(40);
    let start = Instant::now();
    std::thread::scope(|s| {
        for (c, phase) in [0.0, 0.37, 0.58, 0.91].into_iter().enumerate() {
            let (url, frame) = (d.url(&format!("/v1/pipelines/echo?camera=cam{c}")), &frame);
            s.spawn(move || {
                let agent = common::agent();
                for i in 0..PER_CAMERA {
                    let due = start + gap.mul_f64(phase) + gap * i;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let mut resp = agent.post(&url).send(&frame[..]).unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.body_mut().read_to_vec().unwrap();
                }
            });
        }
    });
    let frames = 4 * PER_CAMERA as usize;
    wait_for_ids(&results, 5 + frames);
    let per_frame = (syncs(&trace) - before) as f64 / frames as f64;
    eprintln!("{frames} frames from 4 cameras in {:?}: {per_frame:.2} fsyncs each", start.elapsed());
    // At most four frames (one per camera) share a commit: fewer fsyncs than that means some
    // frame was answered before its commit.
    assert!(per_frame >= 0.25, "{per_frame:.2} fsyncs a frame");
    assert!(per_frame <= 0.6, "{per_frame:.2} fsyncs a frame: the commit window did not gather the cameras");
}

/// Cameras on MQTT do not wait for their answers: while a frame commits, its camera's worker
/// makes and submits the next, so a 50 ms window gathers more frames than there are cameras.
/// Four cameras out of phase at 25 frames/s each (100 frames/s): when each worker waited for
/// its own commit, a commit held at most one frame per camera, 0.25 fsyncs a frame at best
/// (0.34 in `frame_cost`). Under 0.05, strace is not watching the daemon.
#[test]
fn mqtt_cameras_share_an_fsync_with_their_own_next_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let broker = common::broker::Broker::start(&dir.join("broker"));
    let (results, trace, frame) = (dir.join("results.jsonl"), dir.join("strace.log"), dir.join("frame.jpg"));
    std::fs::write(&frame, common::camera_jpeg()).unwrap();
    let cfg = format!(
        "[mqtt]\nurl = \"{}\"\nclient_id = \"edgefn-wear\"\nmax_frame = \"256 KiB\"\n\n\
         [outbox]\ncommit_window = \"50ms\"\n\n\
         [[pipeline]]\nname = \"echo\"\nsource.mqtt = \"cameras/+/frames\"\nfunctions = [\"echo\"]\n\
         sinks = [{{ file = {{ path = {results:?} }} }}]\n",
        broker.url()
    );
    let d = Daemon::start_full(
        dir,
        &common::functions_dir(),
        &cfg,
        &[("EDGEFN_TEST_STRACE", trace.display().to_string())],
        common::aot_cache(dir.join("cache")),
    );
    let _reaper = Reaper(common::only_child(d.child.id()));
    let publish = |camera: &str, count: u32, fps: u32| {
        common::edgefn()
            .args(["publish", "--broker", &broker.url(), "--topic", &format!("cameras/{camera}/frames")])
            .args(["--fps", &fps.to_string(), "--count", &count.to_string()])
            .arg(&frame)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // The subscription is in place once a frame comes through.
    let until = Instant::now() + Duration::from_secs(20);
    while ids(&results).0.is_empty() {
        assert!(Instant::now() < until, "no frame came through MQTT:\n{}", d.log());
        assert!(publish("warmup", 1, 0).wait().unwrap().success());
        std::thread::sleep(Duration::from_millis(300));
    }
    let warm = ids(&results).0.len();
    std::thread::sleep(Duration::from_millis(500));
    let before = syncs(&trace);

    const PER_CAMERA: u32 = 75;
    let start = Instant::now();
    let mut cameras = Vec::new();
    for (c, phase) in [0.0, 0.37, 0.58, 0.91].into_iter().enumerate() {
        let due = start + Duration::from_millis(40).mul_f64(phase);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        cameras.push(publish(&format!("cam{c}"), PER_CAMERA, 25));
    }
    for mut c in cameras {
        assert!(c.wait().unwrap().success(), "edgefn publish failed");
    }
    let frames = 4 * PER_CAMERA as usize;
    wait_for_ids(&results, warm + frames);
    let per_frame = (syncs(&trace) - before) as f64 / frames as f64;
    eprintln!("{frames} frames from 4 MQTT cameras in {:?}: {per_frame:.3} fsyncs each", start.elapsed());
    // Each camera's results were committed in the order its frames came: the file, which the
    // sink writes in commit order, has each camera's sequence numbers rising.
    let text = std::fs::read_to_string(&results).unwrap();
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (camera, seq) = (v["subject"].as_str().unwrap().to_string(), v["edgefnseq"].as_u64().unwrap());
        let before = last.insert(camera.clone(), seq).unwrap_or(0);
        assert!(seq > before, "{camera}: result {seq} committed after {before}");
    }
    assert!(per_frame >= 0.05, "{per_frame:.3} fsyncs a frame: is strace tracing the daemon?");
    assert!(per_frame < 0.25, "{per_frame:.3} fsyncs a frame: a commit held no more than one frame per camera");
}

/// A commit waits in its window for frames still being made, and the frame it already has is
/// not one of them. Counted until after its commit was queued, a lone serial client's frame
/// could hold its commit open for the whole window (a race with the committer): at 100
/// frames/s and a 60 ms window, 80 a second got through. Under a 1 s window, any frame held
/// takes this past 0.9 s; 60 echo frames take under a tenth of that.
#[test]
fn a_lone_serial_client_is_not_held_for_the_commit_window() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.jsonl");
    let cfg = format!("[outbox]\ncommit_window = \"1s\"\n\n{}", config(&results));
    let d = Daemon::start_with_functions(tmp.path(), &common::functions_dir(), &cfg);
    let frame = common::camera_jpeg();
    post_frames(&d, &frame, 2);
    let start = Instant::now();
    post_frames(&d, &frame, 60);
    let took = start.elapsed();
    eprintln!("60 serial frames in {took:?}");
    assert!(took < Duration::from_millis(900), "60 serial frames took {took:?} under a 1 s commit_window");
}

/// The `edgefnseq` of each line in the file sink, in file order.
fn seqs(results: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(results).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["edgefnseq"].as_u64().unwrap()).collect()
}

/// A caught-up file sink's results go straight to its file within their commit. When the
/// file's disk is full they are kept in the outbox instead (the frames are still answered),
/// and so is every result after them until the backlog is drained: the file ends up with
/// every result once, in order, and new ones go straight to it again.
#[test]
fn a_file_sink_on_a_full_disk_falls_back_to_the_outbox_and_keeps_its_lines_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let small = common::SmallDisk::mount(&tmp.path().join("small"), "1m");
    let results = small.dir.join("results.jsonl");
    let depth = format!("edgefn_outbox_depth{{sink=\"file:{}\"}}", results.display());
    let d = Daemon::start_with_functions(&tmp.path().join("d"), &common::functions_dir(), &config(&results));
    // Lines of 11 KB: a line never fits in what is left of the file's last page.
    let post = |n: usize| {
        for i in 0..n {
            let r = d.post("/v1/pipelines/echo?camera=cam0", &common::noise(8 << 10, i as u64));
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
    };

    post(3);
    assert_eq!(seqs(&results), [1, 2, 3], "answered results were not in the file at once");
    assert_eq!(d.metric(&depth), 0.0, "the outbox kept a copy of results the file holds");

    let filler = small.fill();
    post(3);
    assert!(d.metric(&depth) >= 1.0, "with the file's disk full, no result waited in the outbox");
    assert!(d.log().contains("No space left on device"), "{}", common::tail(&d.log(), 20));
    std::fs::remove_file(filler).unwrap();
    // Behind a backlog, these wait their turn in the outbox.
    post(3);
    d.wait_metric(&depth, 60, |v| v == 0.0);
    post(3);
    assert_eq!(seqs(&results), (1..=12).collect::<Vec<u64>>(), "the file's lines are not each result once, in order");
    assert_eq!(d.metric(&depth), 0.0);
}

/// Results written straight to a file store no sequence number with them: the outbox
/// reserves numbers ahead, so a camera's ids after a crash are new ones.
#[test]
fn a_camera_written_only_to_a_file_reuses_no_id_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let results = dir.join("results.jsonl");
    let mut d = Daemon::start_with_functions(dir, &common::functions_dir(), &config(&results));
    post_frames(&d, b"before", 5);
    wait_for_ids(&results, 5);
    d.kill();
    let d = Daemon::start_with_functions(dir, &common::functions_dir(), &config(&results));
    post_frames(&d, b"after", 5);
    wait_for_ids(&results, 10);
    let (ids, lines) = ids(&results);
    assert_eq!((ids.len(), lines), (10, 10), "{ids:?}");
    let seqs = seqs(&results);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence numbers went back after the crash: {seqs:?}");
}
