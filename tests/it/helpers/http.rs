//! Talking to a worker's HTTP endpoint (`worker --listen`) as a probe or a
//! scraper would, over plain TCP: the address a running worker bound, a GET,
//! a request of any bytes, and one series read out of `/metrics`.

use super::bin::Running;
use super::wait::wait_until;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The address a worker started with `--listen 127.0.0.1:0` bound, read
/// from its log once it has said.
pub async fn endpoint_of(worker: &Running) -> SocketAddr {
    wait_until(
        "the worker to say where its endpoint is",
        Duration::from_secs(30),
        || {
            let log = worker.log();
            let addr = log
                .split("worker endpoint on http://")
                .nth(1)
                .and_then(|rest| {
                    rest.split_whitespace()
                        .next()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                });
            std::future::ready(addr)
        },
    )
    .await
}

/// Sends `raw` on a new connection and reads until the server closes it:
/// (status, body). `None`: nothing listens there, or the server closed it
/// without an answer (or did not answer within 20 s).
pub async fn request(addr: SocketAddr, raw: &[u8]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    // A server that refuses early may reset a connection still being written.
    s.write_all(raw).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// `GET path`: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("no answer to GET {path} from {addr}"))
}

/// `GET path`: (status, body); `None` while nothing listens there yet (or
/// nothing answers), for waiting on a process that is starting.
pub async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n");
    request(addr, raw.as_bytes()).await
}

/// The value of the series `series` (name and labels exactly as printed)
/// in a text exposition.
pub fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Every series a worker serves at `/metrics`, with its type: the worker
/// endpoint's test checks it serves exactly these, and the deployment test
/// checks the dashboard and alert rules against them.
pub const WORKER_SERIES: &[(&str, &str)] = &[
    ("archiver_worker_batches_in_flight", "gauge"),
    ("archiver_worker_batch_duration_seconds", "histogram"),
    ("archiver_worker_rows_total", "counter"),
    ("archiver_worker_bytes_total", "counter"),
    ("archiver_worker_retries_total", "counter"),
    ("archiver_worker_hand_backs_total", "counter"),
    ("archiver_worker_dead_letters_total", "counter"),
    ("archiver_worker_db_connections_in_use", "gauge"),
    ("archiver_worker_last_settled_timestamp_seconds", "gauge"),
    ("archiver_worker_throttled_seconds_total", "counter"),
    ("archiver_worker_throttle_waits_total", "counter"),
];
