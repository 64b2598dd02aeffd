//! Logging: one subscriber, to stderr, so that stdout carries only reports.
//! Text for people (coloured only on a terminal, so cron's log file holds
//! no escape codes) or JSON for log shippers: one object per line, with the
//! batch's `archive_batch_id` and `kind` among the fields of its lines.
//! While progress bars are shown on the terminal ([`show_bars`]), log lines
//! and what [`above_bars`] prints go above them instead of tearing them.

use std::io::{IsTerminal, Write};
use std::sync::RwLock;
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
        .with_writer(|| BarSafeStderr)
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

/// The progress bars shown now, if any.
static BARS: RwLock<Option<indicatif::MultiProgress>> = RwLock::new(None);

/// Shows log lines above `bars` from now on (`None`: bars are gone; lines
/// go straight to stderr again).
pub fn show_bars(bars: Option<indicatif::MultiProgress>) {
    *BARS.write().unwrap_or_else(|e| e.into_inner()) = bars;
}

/// Runs `print` with the progress bars (if any are shown) cleared away, and
/// draws them again below what it printed.
pub fn above_bars<R>(print: impl FnOnce() -> R) -> R {
    let bars = BARS.read().unwrap_or_else(|e| e.into_inner()).clone();
    match bars {
        Some(bars) => bars.suspend(print),
        None => print(),
    }
}

/// Stderr, written above the progress bars while they are shown. The fmt
/// layer writes each event with one `write_all` of its whole text.
struct BarSafeStderr;

impl Write for BarSafeStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        above_bars(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
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
