//! A capped in-memory pipe for a function's stdout and stderr.
//!
//! stdout fails the write that crosses the cap, so a flooding function stops at once instead of
//! running to its deadline; stderr keeps the head and drops the rest, so a chatty function is
//! never turned into a failing one.
//!
//! The guest's writes land in the buffer directly ([`OutputStream`]): wasmtime's default
//! adapter for an `AsyncWrite` spawns a task per call and moves output in 8 KiB chunks
//! through it, which cost a 41 KB echo more than the instance itself.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

#[derive(Clone)]
pub struct CappedPipe {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    buf: BytesMut,
    cap: usize,
    overflowed: bool,
    fail_on_overflow: bool,
}

impl CappedPipe {
    /// Writes past `cap` fail with an I/O error.
    pub fn strict(cap: usize) -> CappedPipe {
        CappedPipe::new(cap, true)
    }

    /// Writes past `cap` succeed and are dropped.
    pub fn truncating(cap: usize) -> CappedPipe {
        CappedPipe::new(cap, false)
    }

    /// Sized up front for what a call is expected to write (a frame's size), so the buffer is
    /// not grown by doubling.
    pub fn with_capacity(self, expected: usize) -> CappedPipe {
        {
            let mut inner = self.inner.lock().expect("pipe lock");
            let want = expected.min(inner.cap);
            inner.buf.reserve(want);
        }
        self
    }

    fn new(cap: usize, fail_on_overflow: bool) -> CappedPipe {
        let inner = Inner { buf: BytesMut::new(), cap, overflowed: false, fail_on_overflow };
        CappedPipe { inner: Arc::new(Mutex::new(inner)) }
    }

    pub fn overflowed(&self) -> bool {
        self.inner.lock().expect("pipe lock").overflowed
    }

    /// Takes what was written so far.
    pub fn take(&self) -> Bytes {
        self.inner.lock().expect("pipe lock").buf.split().freeze()
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl Inner {
    /// Takes what fits; false if `data` crossed the cap.
    fn put(&mut self, data: &[u8]) -> bool {
        let room = self.cap - self.buf.len();
        if data.len() <= room {
            self.buf.extend_from_slice(data);
            return true;
        }
        self.overflowed = true;
        if !self.fail_on_overflow {
            self.buf.extend_from_slice(&data[..room]);
        }
        false
    }
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut inner = self.inner.lock().expect("pipe lock");
        if inner.put(&bytes) || !inner.fail_on_overflow {
            return Ok(());
        }
        Err(StreamError::LastOperationFailed(wasmtime::format_err!("output limit reached")))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Never "full": a write past the cap must fail (or be dropped), not wait for room that
        // never comes until the deadline.
        Ok(usize::MAX / 2)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedPipe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut inner = self.inner.lock().expect("pipe lock");
        if inner.put(data) || !inner.fail_on_overflow {
            return Poll::Ready(Ok(data.len()));
        }
        Poll::Ready(Err(io::Error::other("output limit reached")))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
