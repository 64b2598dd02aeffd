//! Signals: SIGTERM or SIGINT cancels a token, and whoever holds it (the
//! worker loop, the metrics server) finishes what is in flight and returns.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    signalled().await;
    tracing::info!("shutting down: finishing in-flight batches");
    token.cancel();
}

/// Returns on SIGTERM or SIGINT.
async fn signalled() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(cancel_on_signal(token.clone()));
    token
}

/// A token cancelled on SIGTERM or SIGINT, saying nothing (for a command
/// that has no batches in flight, such as `planner status --watch`).
pub fn on_signal_quietly() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signalled().await;
        cancel.cancel();
    });
    token
}
