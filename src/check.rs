//! `planner check` and `worker check`: reach every dependency the process
//! would use, with the settings resolved exactly as its run resolves them
//! (the same [`App`]), and print one line per dependency with what was
//! found — `database`, `queue`, `object store`, `reports root` — each
//! `<name>: ok, …`, `<name>: failed, …`, or a line saying why it is not
//! used. Every check runs, whatever failed before it (they are
//! independent), each bounded in time. Nothing here names a backend: the
//! queue is checked through [`transport::check`], the store through
//! [`crate::objects::ObjectStore::check`].
//!
//! Side effects, on purpose the ones the process itself has at start: the
//! RabbitMQ topology is declared as the publisher declares it (that declare
//! is the argument check), the local archive directory is created if
//! missing, and a test object is written and deleted under
//! `archived-reports/.archiver-check/`. Nothing else is written.
//!
//! The outcome is an error naming the setting behind the first failure
//! (`DATABASE_URL`, `QUEUE_URL`, `REPORTS_ARCHIVE_BUCKET`, …) as a
//! configuration error: a failed check means a setting leads to something
//! that does not work, so the command exits 2 like any bad setting.
//! Secrets never appear: no check prints a URL's password, and every line
//! is also searched for the database and broker URLs, their passwords and
//! the AWS secret (those of four characters or more), which are replaced;
//! control characters are escaped, so a line stays one line.

use crate::app::App;
use crate::db;
use crate::error::{Error, Result};
use crate::schema::reports_root;
use crate::transport;
use crate::vocabulary::Kind;
use percent_encoding::percent_decode_str;
use secrecy::ExposeSecret;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an unreachable database is retried: a check reports, it does
/// not wait for the fleet to come up.
const DATABASE_PATIENCE: Duration = Duration::from_secs(5);
/// Shorter passwords are not searched for alone in the lines (they are
/// still redacted inside a URL's user-info).
const MIN_SECRET: usize = 4;
/// Entries of `REPORTS_ROOT` counted at most (a listing proves it is
/// readable; a huge directory need not be walked).
const LIST_AT_MOST: usize = 10_000;

/// What checking one dependency found.
#[derive(Debug)]
enum Outcome {
    /// Reached, and as expected: what was found.
    Ok(String),
    /// Not used by this process: why (not a failure).
    Unused(String),
    /// The setting to fix, and why.
    Failed(&'static str, String),
}

/// One dependency's line.
#[derive(Debug)]
struct Line {
    name: &'static str,
    outcome: Outcome,
}

/// Checks what `planner` would use: the database (migrated), the broker
/// (or none: inline), and, when reports are configured (`REPORTS_ROOT` or a
/// bucket), the object store and `REPORTS_ROOT`.
pub async fn planner(app: &App) -> Result<()> {
    let mut report = Report::new(app);
    report.database(app, false).await;
    let queue = bounded("QUEUE_URL", transport::check(&app.queue)).await;
    report.print(
        "queue",
        match queue {
            Ok(Some(found)) => Outcome::Ok(found),
            Ok(None) => Outcome::Unused("none (inline: the planner runs batches itself)".into()),
            Err(e) => failed("QUEUE_URL", e),
        },
    );
    let s = app.settings();
    let bucket = s.reports_bucket.as_deref().is_some_and(|b| !b.is_empty());
    match &s.reports_root {
        Some(root) => report.reports_root(root).await,
        None => report.print(
            "reports root",
            Outcome::Unused("not set (the planner skips reports)".into()),
        ),
    }
    if s.reports_root.is_some() || bucket {
        report.object_store(app).await;
    } else {
        report.print(
            "object store",
            Outcome::Unused("not checked (no REPORTS_ROOT: reports are not archived)".into()),
        );
    }
    report.finish()
}

/// Checks what `worker --kinds …` would use: the database (migrated, with
/// the batch sessions' settings), the broker (required), and, when it
/// serves reports, `REPORTS_ROOT` and the object store.
pub async fn worker(app: &App, kinds: &[Kind]) -> Result<()> {
    let mut report = Report::new(app);
    report.database(app, true).await;
    // A worker needs a broker: with none, `broker()` is the failure.
    let queue = match app.queue.broker() {
        Ok(broker) => bounded("QUEUE_URL", transport::check(broker))
            .await
            .map(Option::unwrap_or_default),
        Err(e) => Err(e),
    };
    report.print(
        "queue",
        queue.map_or_else(|e| failed("QUEUE_URL", e), Outcome::Ok),
    );
    let serves_reports = kinds.is_empty() || kinds.contains(&Kind::Reports);
    if !serves_reports {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        let why = format!(
            "not checked (this worker does not serve reports: --kinds {})",
            names.join(",")
        );
        report.print("reports root", Outcome::Unused(why.clone()));
        report.print("object store", Outcome::Unused(why));
        return report.finish();
    }
    // The worker's own rule for what it serves (it refuses to start
    // serving reports without REPORTS_ROOT).
    match (app.served(kinds), &app.settings().reports_root) {
        (Err(e), _) => report.print("reports root", failed("REPORTS_ROOT", e)),
        (Ok(_), Some(root)) => report.reports_root(root).await,
        // `served` refuses reports without REPORTS_ROOT; kept total anyway.
        (Ok(_), None) => report.print(
            "reports root",
            Outcome::Failed("REPORTS_ROOT", "REPORTS_ROOT: not set".into()),
        ),
    }
    report.object_store(app).await;
    report.finish()
}

/// The lines printed so far, and what to take out of them.
struct Report {
    lines: Vec<Line>,
    /// (text, shown instead, replaced however short it is).
    secrets: Vec<(String, &'static str, bool)>,
}

impl Report {
    fn new(app: &App) -> Report {
        let s = app.settings();
        let mut secrets = Vec::new();
        for (url, shown) in [
            (&s.database_url, "<DATABASE_URL>"),
            (&s.queue_url, "<QUEUE_URL>"),
        ] {
            let Some(url) = url.as_ref().map(|u| u.expose_secret()) else {
                continue;
            };
            // The whole URL first, then its password alone, as written and
            // decoded (user names stay: they say who logged in).
            secrets.push((url.to_string(), shown, true));
            if let Some(password) = password_of(url) {
                // In its user-info, a password of any length is unambiguous.
                secrets.push((format!(":{password}@"), ":<password>@", true));
                let decoded = percent_decode_str(&password)
                    .decode_utf8_lossy()
                    .into_owned();
                secrets.push((password, "<password>", false));
                secrets.push((decoded, "<password>", false));
            }
        }
        // The SDKs never print them, but a line must not be the first to.
        for var in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] {
            if let Ok(v) = std::env::var(var)
                && !v.is_empty()
            {
                secrets.push((v, "<redacted>", false));
            }
        }
        Report {
            lines: Vec::new(),
            secrets,
        }
    }

    /// Prints a dependency's line (redacted, on one line) and keeps it.
    fn print(&mut self, name: &'static str, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Ok(t) => Outcome::Ok(self.clean(&t)),
            Outcome::Unused(t) => Outcome::Unused(self.clean(&t)),
            Outcome::Failed(setting, t) => Outcome::Failed(setting, self.clean(&t)),
        };
        match &outcome {
            Outcome::Ok(found) => println!("{name}: ok, {found}"),
            Outcome::Unused(why) => println!("{name}: {why}"),
            Outcome::Failed(_, why) => println!("{name}: failed, {why}"),
        }
        self.lines.push(Line { name, outcome });
    }

    fn clean(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (secret, shown, always) in &self.secrets {
            // Alone, a secret of a few characters ("t" for a test server)
            // would turn every line to mush.
            if *always || secret.chars().count() >= MIN_SECRET {
                text = text.replace(secret.as_str(), shown);
            }
        }
        one_line(&text)
    }

    async fn database(&mut self, app: &App, batch_sessions: bool) {
        let found = bounded("DATABASE_URL", database(app, batch_sessions)).await;
        self.print(
            "database",
            found.map_or_else(|e| failed("DATABASE_URL", e), Outcome::Ok),
        );
    }

    async fn reports_root(&mut self, root: &Path) {
        let root = root.to_path_buf();
        // Off the runtime: a hung mount must not keep the timeout from firing.
        let listed = bounded("REPORTS_ROOT", async move {
            tokio::task::spawn_blocking(move || list_root(&root))
                .await
                .map_err(|e| Error::config("REPORTS_ROOT", e.to_string()))?
        })
        .await;
        self.print(
            "reports root",
            listed.map_or_else(|e| failed("REPORTS_ROOT", e), Outcome::Ok),
        );
    }

    async fn object_store(&mut self, app: &App) {
        let s = app.settings();
        let setting = if s.reports_bucket.as_deref().is_some_and(|b| !b.is_empty()) {
            "REPORTS_ARCHIVE_BUCKET"
        } else {
            "REPORTS_ARCHIVE_DIR"
        };
        let checked = bounded(setting, async { app.object_store().await?.check().await }).await;
        self.print(
            "object store",
            checked.map_or_else(|e| failed(setting, e), Outcome::Ok),
        );
    }

    /// `Err` naming the first failure's setting and dependency, once every
    /// line is out.
    fn finish(self) -> Result<()> {
        let failures: Vec<(&str, &str)> = self
            .lines
            .iter()
            .filter_map(|l| match l.outcome {
                Outcome::Failed(setting, _) => Some((l.name, setting)),
                _ => None,
            })
            .collect();
        let Some(&(name, setting)) = failures.first() else {
            return Ok(());
        };
        let all: Vec<&str> = failures.iter().map(|(n, _)| *n).collect();
        Err(Error::config(
            setting,
            format!(
                "the {name} check failed (its line above says why); {} of {} checks failed: {}",
                failures.len(),
                self.lines.len(),
                all.join(", ")
            ),
        ))
    }
}

/// A failure line's outcome from an error: a configuration error names its
/// own setting, anything else the dependency's.
fn failed(setting: &'static str, e: Error) -> Outcome {
    match e {
        Error::Config { name, .. } => Outcome::Failed(name, e.to_string()),
        e => Outcome::Failed(setting, e.to_string()),
    }
}

/// `check` bounded by [`CHECK_TIMEOUT`]; running out is a failure of
/// `setting`.
async fn bounded<T>(setting: &'static str, check: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| {
            Err(Error::config(
                setting,
                format!("no answer within {}s", CHECK_TIMEOUT.as_secs()),
            ))
        })
}

/// Connects as the process does (the worker with its batch sessions'
/// settings), reads the server's version and checks the schema.
async fn database(app: &App, batch_sessions: bool) -> Result<String> {
    let pool = if batch_sessions {
        app.batch_pool(1, DATABASE_PATIENCE).await?
    } else {
        db::connect(&app.database, 1, DATABASE_PATIENCE).await?
    };
    let server = crate::config::describe(&app.database);
    let version: Result<String> = sqlx::query_scalar("SELECT current_setting('server_version')")
        .fetch_one(&pool)
        .await
        .map_err(Error::from);
    let migrated = match version {
        Ok(version) => {
            // "16.4 (Debian 16.4-1.pgdg120+1)": the number is enough.
            let version = version.split_whitespace().next().unwrap_or("?").to_string();
            let found = format!("{server}, PostgreSQL {version}");
            match db::check_migrated(&pool).await {
                Ok(()) => {
                    let newest = db::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
                    Ok(format!("{found}, schema migrated to {newest}"))
                }
                Err(Error::Config { name, reason }) => {
                    Err(Error::config(name, format!("{found}, {reason}")))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    pool.close().await;
    migrated
}

/// `REPORTS_ROOT` as the worker's executor requires it (a directory, not
/// the filesystem's root: [`reports_root::check`]), and readable: listed.
fn list_root(root: &Path) -> Result<String> {
    let bad = |reason: String| Error::config("REPORTS_ROOT", reason);
    let meta = std::fs::metadata(root).map_err(|e| bad(format!("{root:?}: {e}")))?;
    if !meta.is_dir() {
        return Err(bad(format!("{root:?} is not a directory")));
    }
    let canon: PathBuf = reports_root::check(root).map_err(bad)?;
    let mut entries = 0;
    let listing = std::fs::read_dir(&canon).map_err(|e| bad(format!("{canon:?}: {e}")))?;
    for entry in listing.take(LIST_AT_MOST) {
        entry.map_err(|e| bad(format!("{canon:?}: {e}")))?;
        entries += 1;
    }
    let more = if entries == LIST_AT_MOST {
        "at least "
    } else {
        ""
    };
    Ok(format!(
        "{canon:?}: a readable directory ({more}{entries} entries)"
    ))
}

/// The password in a URL's user-info, as written (percent-encoded);
/// `None` without one.
fn password_of(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    parsed.password().map(str::to_owned)
}

/// Text on one line: control characters (a newline in a hostile path or
/// an error) escaped.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_urls() {
        assert_eq!(
            password_of("postgresql://app:hunter2@db:5432/app").as_deref(),
            Some("hunter2")
        );
        assert_eq!(
            password_of("amqp://u:p%40ss@h/%2f").as_deref(),
            Some("p%40ss")
        );
        assert_eq!(password_of("postgresql://postgres@db/app"), None);
        assert_eq!(password_of("postgresql://db/a@b"), None);
        assert_eq!(password_of("sqs://queue"), None);
    }

    #[test]
    fn passwords_never_reach_a_line_however_short() {
        let settings = crate::app::Settings {
            database_url: Some("postgresql://app:pw@db:5432/app".into()),
            queue_url: Some("amqp://guest:p%40ssword@rabbit:5672/%2f".into()),
            queue: "q".into(),
            delivery_limit: 5,
            concurrency: 1,
            rest_ratio: 0.0,
            reports_root: None,
            reports_bucket: None,
            reports_archive_dir: "reports-archive".into(),
            compression: crate::objects::Compression::Zstd,
            batch_timeouts: Default::default(),
            governor: Default::default(),
            replica_urls: Vec::new(),
        };
        let app = App::new(settings, "t").unwrap();
        let report = Report::new(&app);
        let said = report.clean(
            "connect postgresql://app:pw@db:5432/app failed; as app:pw@db; amqp://guest:p@ssword@rabbit",
        );
        assert!(
            !said.contains(":pw@") && !said.contains("p@ssword"),
            "{said}"
        );
        assert!(
            said.contains("app:<password>@db"),
            "the user name stays: {said}"
        );
    }

    #[test]
    fn lines_stay_on_one_line() {
        assert_eq!(one_line("a\nb\r\u{1b}[31m"), "a\\nb\\r\\u{1b}[31m");
        assert_eq!(one_line("plain: ok, é"), "plain: ok, é");
    }

    #[test]
    fn failures_name_the_setting_behind_them() {
        let e = Error::config("ARCHIVER_QUEUE", "queue q exists with other arguments");
        match failed("QUEUE_URL", e) {
            Outcome::Failed(setting, why) => {
                assert_eq!(setting, "ARCHIVER_QUEUE");
                assert!(why.starts_with("ARCHIVER_QUEUE: "), "{why}");
            }
            other => panic!("{other:?}"),
        }
        match failed("QUEUE_URL", Error::Broker("connect: refused".into())) {
            Outcome::Failed(setting, _) => assert_eq!(setting, "QUEUE_URL"),
            other => panic!("{other:?}"),
        }
    }
}
