//! A model file mapped read-only: the flatbuffer LiteRT reads, in pages the kernel can drop.
//!
//! Once XNNPACK has packed a model's weights into its own buffers, inference no longer reads
//! the flatbuffer's (paged out after loading, two EfficientNet-Lite0 inferences faulted in
//! none of its 5.3 MB). The mapping is ours, so the daemon can hand those pages back rather
//! than keep a second copy of the weights resident for as long as it runs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

/// A read-only private mapping of a whole file, unmapped on drop.
pub struct Mapped {
    addr: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the pages are never written (PROT_READ), so any thread may read them.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl Mapped {
    pub fn open(path: &Path) -> std::io::Result<Mapped> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        if len == 0 {
            return Err(std::io::Error::other("empty file"));
        }
        // SAFETY: a fresh read-only mapping of `len` bytes of an open file; the kernel keeps
        // the file referenced after `file` closes.
        let addr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = NonNull::new(addr).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Mapped { addr, len })
    }

    pub fn as_ptr(&self) -> *const libc::c_void {
        self.addr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Drops the resident pages. Any read afterwards faults them back in from the file, so
    /// this costs time only if something still reads them, never correctness.
    pub fn release(&self) {
        // SAFETY: our own mapping, never written: MADV_DONTNEED discards nothing but clean
        // page-cache references.
        let rc = unsafe { libc::madvise(self.addr.as_ptr(), self.len, libc::MADV_DONTNEED) };
        if rc != 0 {
            tracing::debug!("madvise on a model mapping: {}", std::io::Error::last_os_error());
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: mapped in `open` with this length; whoever read it (a LiteRT model) is gone.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}
