//! A capped in-memory pipe for a function's stdout and stderr.
//!
//! stdout fails the write that crosses the cap, so a flooding function stops at once instead of
//! running to its deadline; stderr keeps the head and drops the rest, so a chatty function is
//! never turned into a failing one.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

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
}

impl AsyncWrite for CappedPipe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut inner = self.inner.lock().expect("pipe lock");
        let room = inner.cap - inner.buf.len();
        if data.len() <= room {
            inner.buf.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        inner.overflowed = true;
        if inner.fail_on_overflow {
            return Poll::Ready(Err(io::Error::other("output limit reached")));
        }
        inner.buf.extend_from_slice(&data[..room]);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
