//! How the daemon's heap gives memory back. Results are large (a frame, its PNG, a base64
//! batch of them) and short-lived; glibc's malloc raises its mmap threshold each time such a
//! block is freed, until they all come from heaps it never returns. A drained 120 MiB backlog
//! then stayed resident (188 MB against 60 MB idle). A fixed threshold keeps large blocks
//! mmapped, so freeing them returns them at once. And code is let go of when it stops
//! running: what ran only at the start once the daemon is ready, what served frames once
//! they stop coming.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Blocks from this size up are mmapped and unmapped when freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Called once, first thing in `main`.
pub fn init() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Hands the heap's free pages back to the kernel. Compiling a function (a cold AOT cache,
/// a deploy) frees tens of MB that glibc keeps in its arenas for good: a daemon that compiled
/// its functions at start sat at 27.7 MB anonymous RSS idle, against 2.1 MB from the cache.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops the program's, its shared libraries' and the functions' code pages from this
/// process's page tables. Called once ready: the code that parsed the config, loaded the
/// functions and prepared the model ran once, yet stayed resident (with the pages the kernel
/// maps around each fault): 24 of the 32 MB of an idle daemon with classify's model were
/// file-backed. And called once frames stop coming ([`release_when_idle`]): serving brought
/// 11 MB of code back in. The pages stay in the page cache, so what runs again comes back
/// with a minor fault, and only what runs.
pub fn release_code() {
    let (Ok(smaps), Ok(exe)) = (std::fs::read_to_string("/proc/self/smaps"), std::fs::read_link("/proc/self/exe"))
    else {
        return;
    };
    for (start, end) in releasable(&smaps, &exe.to_string_lossy()) {
        // SAFETY: read-only private mappings of the program, a library or a compiled function
        // (each replaced by a rename, never rewritten in place), none of whose pages was ever
        // written (no private copy): the next touch reads the same bytes from the file.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// Function calls so far: what tells a serving daemon from an idle one.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Counts a function call.
pub fn called() {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

/// How long without a call before the code that served is let go of. A camera sends several
/// frames a second; one that stopped for this long has gone quiet.
const IDLE_AFTER: Duration = Duration::from_secs(30);

/// Releases code ([`release_code`]) each time calls stop for [`IDLE_AFTER`], once per quiet
/// spell; runs until aborted.
pub async fn release_when_idle() {
    let mut ticks = tokio::time::interval(IDLE_AFTER / 6);
    let (mut seen, mut last_call, mut released) = (CALLS.load(Ordering::Relaxed), Instant::now(), true);
    loop {
        ticks.tick().await;
        let calls = CALLS.load(Ordering::Relaxed);
        if calls != seen {
            (seen, last_call, released) = (calls, Instant::now(), false);
        } else if !released && last_call.elapsed() >= IDLE_AFTER {
            released = true;
            // Reading smaps takes a few milliseconds: not on an async worker.
            let _ = tokio::task::spawn_blocking(release_code).await;
            tracing::debug!("idle for {IDLE_AFTER:?}: code released");
        }
    }
}

/// The address ranges in `smaps` that [`release_code`] may drop: mapped read-only from `exe`,
/// a shared library or a compiled function (`.cwasm`, which wasmtime maps from the AOT cache),
/// with pages resident and none a private copy (relocated data). Under qemu-user, smaps
/// is made up: nothing resident and no private copies, even of relocated data, whose
/// release crashed the daemon; so nothing counts as resident there.
fn releasable(smaps: &str, exe: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    // The candidate being read: its range, and whether some of it is resident.
    let mut current: Option<((usize, usize), bool)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let range = fields.next().and_then(|r| r.split_once('-'));
        if let Some((start, end)) = range
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            let perms = fields.next().unwrap_or_default();
            let path = fields.nth(3).unwrap_or_default();
            let program = path == exe || path.ends_with(".so") || path.contains(".so.") || path.ends_with(".cwasm");
            current = ((perms == "r-xp" || perms == "r--p") && program).then_some(((start, end), false));
        } else if let Some(kib) = line.strip_prefix("Rss:")
            && let Some((_, resident)) = current.as_mut()
        {
            *resident = kib.trim() != "0 kB";
        } else if let Some(kib) = line.strip_prefix("Anonymous:")
            && let Some((range, true)) = current.take()
            && kib.trim() == "0 kB"
        {
            found.push(range);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_unwritten_read_only_mappings_of_the_program_its_libraries_and_functions_are_released() {
        let smaps = "\
1000-2000 r--p 00000000 fe:01 11 /usr/bin/edgefn
Anonymous:             0 kB
2000-5000 r-xp 00001000 fe:01 11 /usr/bin/edgefn
Anonymous:             0 kB
5000-6000 r--p 00004000 fe:01 11 /usr/bin/edgefn
Anonymous:             4 kB
6000-7000 rw-p 00005000 fe:01 11 /usr/bin/edgefn
Anonymous:             4 kB
7000-8000 rw-p 00000000 00:00 0
Anonymous:             4 kB
8000-9000 r-xp 00000000 fe:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
9000-a000 r-xp 00000000 fe:01 13 /usr/lib/edgefn/libLiteRt.so
Anonymous:             0 kB
a000-b000 r-xp 00000000 fe:01 14 /var/cache/edgefn/aot/abc.cwasm
Anonymous:             0 kB
b000-c000 r--p 00000000 fe:01 15 /usr/share/edgefn/models/m.tflite
Anonymous:             0 kB
c000-d000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
";
        let with_rss = smaps.replace("Anonymous:", "Rss: 4 kB\nAnonymous:");
        let found = super::releasable(&with_rss, "/usr/bin/edgefn");
        assert_eq!(found, [(0x1000, 0x2000), (0x2000, 0x5000), (0x8000, 0x9000), (0x9000, 0xa000), (0xa000, 0xb000)]);
        // Nothing resident (qemu-user's smaps, which also shows relocated data as clean).
        assert_eq!(super::releasable(&smaps.replace("Anonymous:", "Rss: 0 kB\nAnonymous:"), "/usr/bin/edgefn"), []);
        assert_eq!(super::releasable(smaps, "/usr/bin/edgefn"), [], "no Rss line: not known to be resident");
    }
}
