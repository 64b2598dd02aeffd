//! The one small HTTP server the archiver runs, for `planner metrics
//! --listen` and `worker --listen`: bounded, so that a slow or flooding
//! client cannot starve the process serving it. It holds at most
//! [`MAX_CONNECTIONS`] connections (one beyond is closed at once, not left
//! in the backlog), drops a client that has not sent its request headers
//! within [`HEADER_TIMEOUT`] (idle keep-alive connections too), and ends
//! any connection after [`CONNECTION_LIFETIME`].

use crate::error::{Error, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections served at once; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest any one connection stays open.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// A response with a body held in memory.
pub type Reply = std::result::Result<Response<Full<Bytes>>, hyper::http::Error>;

/// A reply with `body`, never cached (each is read fresh: a scrape, a probe).
pub fn reply(status: hyper::StatusCode, content_type: &str, body: String) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body)))
}

/// Binds `addr` (a failure is a bad `--listen`: exit 2).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::config("--listen", format!("{addr}: {e}")))
}

/// Serves `respond` on `listener` until `stop` is cancelled; `name` tells
/// the log lines apart.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    name: &'static str,
    respond: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: do not spin.
                    tracing::warn!("{name}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Full: close it now, rather than let it wait in the backlog.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "{name}: {MAX_CONNECTIONS} connections open; closing one more");
            drop(stream);
            continue;
        };
        let (respond, stop) = (respond.clone(), stop.clone());
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service_fn(respond));
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    tracing::debug!(%peer, "{name}: connection open too long; closed");
                }
                served = conn => if let Err(e) = served {
                    tracing::debug!(%peer, "{name} connection: {e}");
                },
            }
            drop(slot);
        });
    }
}
