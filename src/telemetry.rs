//! Logging: one subscriber, to stderr, so that stdout carries only reports.
//! Text for people (coloured only on a terminal, so cron's log file holds
//! no escape codes) or JSON for log shippers: one object per line, with the
//! batch's `archive_batch_id` and `kind` among the fields of its lines.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Installs the global subscriber. `RUST_LOG` wins over `verbose`.
pub fn init(verbose: bool, format: LogFormat) {
    install(
        if verbose {
            "archiver=debug,info"
        } else {
            "archiver=info,warn"
        },
        format,
    );
}

fn install(default: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Prints the one line a command ends with on failure: plain text, or in
/// JSON mode a JSON object like every other line.
pub fn fatal(format: LogFormat, program: &str, message: &str, exit: u8) {
    if format == LogFormat::Json {
        let line = serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339(),
            "level": "ERROR",
            "program": program,
            "message": message,
            "exit": exit,
        });
        eprintln!("{line}");
    } else {
        eprintln!("{program}: {message}");
    }
}
