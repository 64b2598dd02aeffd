//! A TCP relay a test can cut and restore: the network between a process
//! and one of its servers failing, while the shared server itself stays up
//! for the other tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

/// A TCP relay on loopback to a server (SQS, RabbitMQ, PostgreSQL) that
/// can be cut and restored, as a network outage would; counts the
/// connections it accepted.
pub struct Relay {
    addr: std::net::Ipv4Addr,
    port: u16,
    target: String,
    task: Option<JoinHandle<()>>,
    accepted: Arc<AtomicUsize>,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    /// A relay to any `host:port` (the RabbitMQ server, say).
    pub async fn to(target: &str) -> Relay {
        Relay::on(std::net::Ipv4Addr::LOCALHOST, target).await
    }

    /// The same, listening on `addr` (a test host's link: `hosts`).
    pub async fn on(addr: std::net::Ipv4Addr, target: &str) -> Relay {
        let listener = tokio::net::TcpListener::bind((addr, 0)).await.unwrap();
        let mut relay = Relay {
            addr,
            port: listener.local_addr().unwrap().port(),
            target: target.to_string(),
            task: None,
            accepted: Arc::new(AtomicUsize::new(0)),
            frozen: Arc::new(AtomicBool::new(false)),
        };
        relay.serve(listener);
        relay
    }

    /// The relay as an HTTP endpoint (for an SQS client).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The relay's port on loopback.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (target, accepted) = (self.target.clone(), self.accepted.clone());
        let frozen = self.frozen.clone();
        self.task = Some(tokio::spawn(async move {
            // Dropping the set (when the task is aborted) cuts every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (target, frozen) = (target.clone(), frozen.clone());
                conns.spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(&target).await {
                        let (from_client, to_client) = inbound.into_split();
                        let (from_server, to_server) = outbound.into_split();
                        tokio::join!(
                            pump(from_client, to_server, frozen.clone()),
                            pump(from_server, to_client, frozen),
                        );
                    }
                });
            }
        }));
    }

    /// Stops passing bytes either way, closing nothing: the connections
    /// stay open and silent, as across a network partition, until
    /// [`Relay::thaw`] passes on what was held.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Passes bytes again, those held first.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Cuts every connection and refuses new ones.
    pub async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Accepts connections again, on the same port.
    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind((self.addr, self.port))
            .await
            .unwrap();
        self.serve(listener);
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`; holds what it
/// reads (and the end) while `frozen`.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            let _ = to.shutdown().await;
            return;
        }
    }
}
