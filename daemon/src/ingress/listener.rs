//! The HTTP accept loop: how many connections the daemon holds, how long a client may take to
//! send a request, and how connections end when a generation stops.
//!
//! A board has a small open-file limit (systemd's default is 1,024) and slow clients are cheap
//! to make. So connections are capped at `server.max_connections`, held under half the
//! open-file limit, and a client gets [`HEADER_TIMEOUT`] to send its request head. Past the
//! cap, a new connection replaces the oldest one that has no request in progress (an idle
//! keep-alive or a half-sent head); only when every connection is busy is the new one closed.
//! `/healthz` therefore keeps answering while thousands of slow connections knock.
//!
//! On stop: no new connections here (the socket goes back to the caller at once, for the next
//! generation); open requests get the grace period; then every connection still open (an
//! event stream, a stalled upload) is cut, so nothing of the old generation outlives it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};

use super::http::{Api, Body};

/// Time a client has to send a request head, from the connection's first byte.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections of one generation, oldest first.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, Conn>,
}

struct Conn {
    /// Requests in progress, response bodies included (an event stream stays busy).
    busy: Arc<AtomicUsize>,
    abort: Option<AbortHandle>,
}

/// The connection cap: the configured one, held under half the soft open-file limit so the
/// outbox, the functions and the broker connection always have descriptors left.
pub fn connection_cap(configured: usize) -> usize {
    let files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft as usize)
        .unwrap_or(1024);
    configured.min(files / 2).max(1)
}

/// Serves one HTTP/1 connection over any byte stream, with the API's routes and the same
/// header timeout as the listener (the HTTP fuzz target drives it with arbitrary bytes).
pub async fn serve_connection<I>(api: Arc<Api>, io: I) -> hyper::Result<()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(super::http::route(&api, req).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await
}

/// Serves `listener` until `shutdown` resolves, and then at once hands it back through
/// `handback`, so a reload's next generation accepts on the same socket (and its backlog)
/// while this one's open requests get `grace` to finish; the rest are cut.
pub async fn serve(
    listener: TcpListener,
    handback: tokio::sync::oneshot::Sender<TcpListener>,
    api: Arc<Api>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    max_connections: usize,
) {
    let cap = connection_cap(max_connections);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Mutex::new(Open::default()));
    let mut tasks = JoinSet::new();
    let mut evicted = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let id = {
            let mut o = open.lock().expect("connections lock");
            if o.conns.len() >= cap {
                let idle = o.conns.iter().find(|(_, c)| c.busy.load(Ordering::Acquire) == 0).map(|(id, _)| *id);
                match idle {
                    Some(old) => {
                        if let Some(abort) = o.conns.remove(&old).and_then(|c| c.abort) {
                            abort.abort();
                        }
                        evicted += 1;
                        if evicted.is_power_of_two() {
                            tracing::warn!(cap, evicted, "connection cap reached: closing the oldest idle connections");
                        }
                    }
                    None => {
                        tracing::warn!(%peer, cap, "connection refused: every connection has a request in progress");
                        continue;
                    }
                }
            }
            let id = o.next;
            o.next += 1;
            o.conns.insert(id, Conn { busy: Arc::new(AtomicUsize::new(0)), abort: None });
            id
        };
        let busy = open.lock().expect("connections lock").conns[&id].busy.clone();
        let service = {
            let api = api.clone();
            service_fn(move |req: Request<Incoming>| {
                let (api, guard) = (api.clone(), Busy::enter(&busy));
                async move {
                    let resp = super::http::route(&api, req).await;
                    Ok::<_, Infallible>(resp.map(|body| Guarded { body, _guard: guard }))
                }
            })
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let open_for_task = open.clone();
        let abort = tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            open_for_task.lock().expect("connections lock").conns.remove(&id);
        });
        if let Some(c) = open.lock().expect("connections lock").conns.get_mut(&id) {
            c.abort = Some(abort);
        }
    }
    let _ = handback.send(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(open = tasks.len(), "shutdown grace of {grace:?} over; closing open connections");
    }
    tasks.shutdown().await;
}

/// Marks a connection busy from a request's start until its response body is done.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy while it is being sent.
struct Guarded {
    body: Body,
    _guard: Busy,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
