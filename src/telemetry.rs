//! Logging: one subscriber, to stderr, so that stdout carries only reports.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` wins over `verbose`.
pub fn init(verbose: bool) {
    init_with(if verbose {
        "archiver=debug,info"
    } else {
        "archiver=info,warn"
    });
}

/// Installs the global subscriber with `default` as its filter unless
/// `RUST_LOG` is set (the benchmarks keep the library quiet this way).
pub fn init_with(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
