//! Connecting to PostgreSQL and applying the embedded migrations.

use crate::config::describe;
use crate::error::{Class, Error, Result};
use backon::{ExponentialBuilder, Retryable};
use sqlx::migrate::{Migrate, MigrateError, Migration, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The schema, embedded in every binary (`migrations/`).
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Opens a pool of at most `max` connections, retrying while the server is
/// unreachable for up to `patience`. The error names the server, not the
/// password.
pub async fn connect(opts: &PgConnectOptions, max: u32, patience: Duration) -> Result<PgPool> {
    let attempt = || async {
        PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            // A connection opened before a session said it is read-only
            // (a demoted primary after a failover) is closed, not reused:
            // the next one goes to wherever the primary is now.
            .before_acquire(|_, meta| Box::pin(async move { Ok(!is_stale(meta.age)) }))
            .connect_with(opts.clone())
            .await
            .map_err(Error::from)
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_jitter()
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(patience))
                .without_max_times(),
        )
        .when(|e: &Error| e.class() == Class::Unavailable)
        .notify(|e, d| {
            tracing::warn!(
                "database at {} unreachable ({e}); retrying in {d:?}",
                describe(opts)
            )
        })
        .await
        .map_err(|e| match e {
            Error::Db(inner) => Error::config(
                "DATABASE_URL",
                format!("cannot connect to {}: {inner}", describe(opts)),
            ),
            other => other,
        })
}

/// Runs `work` on a session of `pool`, giving the session up as lost when
/// the database has not answered within `deadline` (`None`: as long as the
/// network lets it).
///
/// A database cut off by the network answers nothing, and says nothing
/// either: the socket waits on the kernel's retransmissions, about 15
/// minutes, and sqlx sets no keepalive or user timeout of its own. The
/// server bounds its side (its keepalives and `tcp_user_timeout` end the
/// session, rolling back its transaction: `config::database_options`); this
/// bounds ours: past the deadline the work is dropped and its session
/// closed at once without a word (returned to the pool, it would be pinged
/// first, and hang), with an I/O error ([`Class::Unavailable`]: wait for the
/// database as when it is down) that names `what` and the deadline.
pub async fn on_session<T>(
    pool: &PgPool,
    deadline: Option<Duration>,
    what: &str,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    let mut session = pool.acquire().await?;
    let Some(deadline) = deadline else {
        return work(&mut session).await;
    };
    match tokio::time::timeout(deadline, work(&mut session)).await {
        Ok(result) => result,
        Err(_) => {
            drop(session.detach());
            tracing::warn!(
                "the database did not answer {what} within {deadline:?}; its session is given up as lost"
            );
            Err(Error::Db(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to {what} within {deadline:?}"),
            ))))
        }
    }
}

/// When (milliseconds after [`EPOCH`], plus one) a session of this process
/// last said it is read-only; 0: never.
static READ_ONLY_SEEN: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn millis_now() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Call with every failure of a batch: a `25006` (read-only transaction:
/// the session is on a standby, or on a primary demoted by a failover)
/// makes the pools of [`connect`] close every connection opened until now
/// instead of reusing it, so that retries reach the new primary (or a
/// database whose `default_transaction_read_only` was turned off again)
/// rather than the same read-only session forever.
pub fn discard_stale(e: &Error) {
    if crate::error::sqlstate(e).as_deref() == Some("25006") {
        READ_ONLY_SEEN.fetch_max(millis_now(), Ordering::Relaxed);
    }
}

/// Whether a connection opened `age` ago predates the last read-only error.
fn is_stale(age: Duration) -> bool {
    let seen = READ_ONLY_SEEN.load(Ordering::Relaxed);
    if seen == 0 {
        return false;
    }
    let opened = millis_now().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    opened <= seen
}

/// How `planner migrate` builds indexes.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateOptions {
    /// How long an index build (`CREATE`/`DROP INDEX CONCURRENTLY`) may wait
    /// for transactions older than it; `None`: as long as it takes.
    pub index_wait: Option<Duration>,
}

/// Applies every migration not yet applied, waiting as long as it takes for
/// index builds. Safe to run concurrently: migrators are serialized with an
/// advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    migrate_with(pool, MigrateOptions::default()).await
}

/// Applies every migration not yet applied, and leaves only valid indexes.
///
/// A migration that builds an index `CONCURRENTLY` runs with no lock timeout
/// (or `opts.index_wait`): such a build waits for every transaction older
/// than it (a nightly `pg_dump` holds one for the whole dump) but blocks
/// nobody while it waits; what it waits for is logged. A build that fails
/// leaves an INVALID index behind: it is dropped, and the migration is not
/// recorded. An INVALID index of ours found later (left by an older version)
/// is rebuilt before any further migration runs, so that no migration drops
/// an index while its replacement is invalid. Transactional migrations keep
/// the connection's `lock_timeout`: they take locks that would queue the
/// application's queries behind them.
pub async fn migrate_with(pool: &PgPool, opts: MigrateOptions) -> Result<()> {
    let mut conn = pool.acquire().await?;
    // This session's settings change below: never hand it back to the pool.
    conn.close_on_drop();
    // An index build over a big table takes as long as it takes.
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    conn.lock().await?;
    let done = migrate_locked(pool, &mut conn, opts).await;
    if done.is_ok() {
        conn.unlock().await?;
    }
    done
}

const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

async fn migrate_locked(
    pool: &PgPool,
    conn: &mut PgConnection,
    opts: MigrateOptions,
) -> Result<()> {
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    if let Some(v) = conn.dirty_version(MIGRATIONS_TABLE).await? {
        return Err(MigrateError::Dirty(v).into());
    }
    let applied: HashMap<i64, Vec<u8>> = conn
        .list_applied_migrations(MIGRATIONS_TABLE)
        .await?
        .into_iter()
        .map(|m| (m.version, m.checksum.into_owned()))
        .collect();
    for (&version, checksum) in &applied {
        match MIGRATOR.iter().find(|m| m.version == version) {
            None => return Err(MigrateError::VersionMissing(version).into()),
            Some(m) if *m.checksum != checksum[..] => {
                return Err(MigrateError::VersionMismatch(version).into());
            }
            Some(_) => {}
        }
    }
    let indexes = OurIndexes::from_migrations();
    for m in MIGRATOR.iter() {
        if m.migration_type.is_down_migration() || applied.contains_key(&m.version) {
            continue;
        }
        // Before each migration: every index of ours is valid, so none is
        // dropped while the index replacing it is invalid.
        repair_invalid(pool, conn, &indexes, opts).await?;
        if m.no_tx {
            apply_index_migration(pool, conn, m, opts).await?;
        } else {
            conn.apply(MIGRATIONS_TABLE, m).await?;
        }
        tracing::info!("applied migration {} ({})", m.version, m.description);
    }
    repair_invalid(pool, conn, &indexes, opts).await
}

/// Index names the embedded migrations create CONCURRENTLY (the only kind
/// of build that can leave an INVALID index), and those a later migration
/// drops again.
struct OurIndexes {
    built: Vec<(String, i64)>,
    dropped: Vec<(String, i64)>,
}

impl OurIndexes {
    fn from_migrations() -> Self {
        let (mut built, mut dropped) = (Vec::new(), Vec::new());
        for m in MIGRATOR.iter().filter(|m| m.no_tx) {
            let (b, d) = index_names(m.sql.as_str());
            built.extend(b.into_iter().map(|n| (n, m.version)));
            dropped.extend(d.into_iter().map(|n| (n, m.version)));
        }
        OurIndexes { built, dropped }
    }

    /// Whether a later migration drops `name` (built by `version`).
    fn dropped_later(&self, name: &str, version: i64) -> bool {
        self.dropped.iter().any(|(n, v)| n == name && *v > version)
    }
}

/// The index names a migration creates and drops (`CREATE [UNIQUE] INDEX
/// [CONCURRENTLY] [IF NOT EXISTS] name`, `DROP INDEX [CONCURRENTLY] [IF
/// EXISTS] name`), lower-cased, comments ignored.
fn index_names(sql: &str) -> (Vec<String>, Vec<String>) {
    let text: String = sql
        .lines()
        .map(|l| l.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ';' || c == '(')
        .filter(|w| !w.is_empty())
        .collect();
    let (mut built, mut dropped) = (Vec::new(), Vec::new());
    for (i, w) in words.iter().enumerate() {
        if *w != "index" || i == 0 {
            continue;
        }
        let into = match words[i - 1] {
            "create" | "unique" => &mut built,
            "drop" => &mut dropped,
            _ => continue,
        };
        let name = words[i + 1..]
            .iter()
            .find(|w| !matches!(**w, "concurrently" | "if" | "not" | "exists"));
        if let Some(name) = name {
            let name = name.rsplit('.').next().unwrap_or(name).trim_matches('"');
            into.push(name.to_string());
        }
    }
    (built, dropped)
}

/// An index of ours in the current schema that is INVALID: its oid and
/// definition.
async fn invalid_index(conn: &mut PgConnection, name: &str) -> Result<Option<(u32, String)>> {
    Ok(sqlx::query_as::<_, (sqlx::postgres::types::Oid, String)>(
        "SELECT c.oid, pg_get_indexdef(c.oid) FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
         WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace AND NOT i.indisvalid",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?
    .map(|(oid, def)| (oid.0, def)))
}

/// Rebuilds (or, when a later migration drops it anyway, drops) every
/// INVALID index of ours.
async fn repair_invalid(
    pool: &PgPool,
    conn: &mut PgConnection,
    ours: &OurIndexes,
    opts: MigrateOptions,
) -> Result<()> {
    for (name, version) in &ours.built {
        let Some((_, def)) = invalid_index(conn, name).await? else {
            continue;
        };
        if ours.dropped_later(name, *version) {
            tracing::warn!(
                "index {name} is INVALID (an index build that failed); dropping it (a later migration replaces it)"
            );
            drop_index(pool, conn, name, opts).await?;
            continue;
        }
        tracing::warn!(
            "index {name} (migration {version}) is INVALID: an index build that failed \
             (e.g. a lock timeout behind a long transaction) left it unused by every query; rebuilding it"
        );
        let build = concurrently(&def);
        drop_index(pool, conn, name, opts).await?;
        if let Err(e) = run_index_ddl(pool, conn, &build, opts, name).await {
            drop_invalid(conn, name).await;
            return Err(e);
        }
        tracing::info!("index {name} rebuilt and valid");
    }
    Ok(())
}

/// `CREATE [UNIQUE] INDEX name …` (as `pg_get_indexdef` writes it) built
/// CONCURRENTLY.
fn concurrently(def: &str) -> String {
    for head in ["CREATE UNIQUE INDEX ", "CREATE INDEX "] {
        if let Some(rest) = def.strip_prefix(head) {
            return format!("{head}CONCURRENTLY {rest}");
        }
    }
    def.to_string()
}

/// Drops what a failed build left behind; best effort (the next `migrate`
/// finds and rebuilds it otherwise).
async fn drop_invalid(conn: &mut PgConnection, name: &str) {
    if let Ok(Some(_)) = invalid_index(conn, name).await {
        // Bounded: a dump holding the table makes the drop wait too.
        let _ = sqlx::query("SET lock_timeout = '10s'")
            .execute(&mut *conn)
            .await;
        let sql = format!("DROP INDEX CONCURRENTLY IF EXISTS {name}");
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
        {
            tracing::warn!(
                "could not drop the INVALID index {name} a failed build left: {e}; the next `planner migrate` rebuilds it"
            );
        }
    }
}

/// Applies a `-- no-transaction` migration (index builds): INVALID leftovers
/// of the indexes it names are dropped first (or `IF NOT EXISTS` would skip
/// them), it runs with no lock timeout (or `opts.index_wait`), and it is
/// recorded only once every index it builds is valid.
async fn apply_index_migration(
    pool: &PgPool,
    conn: &mut PgConnection,
    m: &Migration,
    opts: MigrateOptions,
) -> Result<()> {
    let (built, _) = index_names(m.sql.as_str());
    for name in &built {
        if invalid_index(conn, name).await?.is_some() {
            tracing::warn!(
                "index {name} is INVALID (an earlier build failed); dropping it to build it again"
            );
            drop_index(pool, conn, name, opts).await?;
        }
    }
    let what = format!("migration {} ({})", m.version, m.description);
    let started = Instant::now();
    if let Err(e) = run_index_ddl(pool, conn, m.sql.as_str(), opts, &what).await {
        for name in &built {
            drop_invalid(conn, name).await;
        }
        return Err(e);
    }
    for name in &built {
        if invalid_index(conn, name).await?.is_some() {
            drop_invalid(conn, name).await;
            return Err(Error::Schema(format!(
                "{what}: index {name} is INVALID after its build; not recording the migration (run `planner migrate` again)"
            )));
        }
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {MIGRATIONS_TABLE} (version, description, success, checksum, execution_time)
         VALUES ($1, $2, TRUE, $3, $4)"
    )))
    .bind(m.version)
    .bind(&*m.description)
    .bind(&*m.checksum)
    .bind(i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Drops one of our indexes concurrently, waiting as an index build does.
async fn drop_index(
    pool: &PgPool,
    conn: &mut PgConnection,
    name: &str,
    opts: MigrateOptions,
) -> Result<()> {
    let sql = format!("DROP INDEX CONCURRENTLY IF EXISTS {name}");
    run_index_ddl(pool, conn, &sql, opts, name).await
}

/// Runs one index statement (CREATE or DROP INDEX CONCURRENTLY) with no
/// lock timeout (or `opts.index_wait`), saying every so often which
/// transactions it is waiting for.
async fn run_index_ddl(
    pool: &PgPool,
    conn: &mut PgConnection,
    sql: &str,
    opts: MigrateOptions,
    what: &str,
) -> Result<()> {
    let wait_ms = opts.index_wait.map_or(0, |d| d.as_millis().max(1));
    sqlx::query(sqlx::AssertSqlSafe(format!("SET lock_timeout = {wait_ms}")))
        .execute(&mut *conn)
        .await?;
    match opts.index_wait {
        None => tracing::info!(
            "{what}: runs concurrently with no lock timeout: it waits for transactions older than it, and blocks no one meanwhile"
        ),
        Some(d) => tracing::info!(
            "{what}: runs concurrently; it gives up after waiting {d:?} for older transactions"
        ),
    }
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let reporter = tokio::spawn(report_waits(
        pool.clone(),
        pid,
        what.to_string(),
        stop.clone(),
    ));
    let run = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut *conn)
        .await;
    stop.cancel();
    let blockers = reporter.await.unwrap_or_default();
    if let Err(e) = run {
        let waited = if blockers.is_empty() {
            String::new()
        } else {
            format!(" (it was waiting for {blockers})")
        };
        return Err(Error::Schema(format!(
            "{what}: {e}{waited}; nothing is recorded: run `planner migrate` again once they end"
        )));
    }
    sqlx::query("RESET lock_timeout")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Until `stop`, logs every 10 s (first after 3 s) the sessions the
/// migrator's backend `pid` waits for; returns the last description.
async fn report_waits(
    pool: PgPool,
    pid: i32,
    what: String,
    stop: tokio_util::sync::CancellationToken,
) -> String {
    let mut last = String::new();
    let mut pause = Duration::from_secs(3);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return last,
        }
        pause = Duration::from_secs(10);
        let rows: Vec<(i32, String, String, Option<chrono::DateTime<chrono::Utc>>)> = match sqlx::query_as(
            "SELECT a.pid, COALESCE(NULLIF(a.application_name, ''), '?'), COALESCE(a.state, '?'), a.xact_start
             FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids($1)) ORDER BY a.xact_start",
        )
        .bind(pid)
        .fetch_all(&pool)
        .await
        {
            Ok(r) => r,
            Err(_) => continue,
        };
        if rows.is_empty() {
            continue;
        }
        last = rows
            .iter()
            .map(|(p, app, state, since)| {
                let since = since.map_or("?".into(), |t| {
                    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
                });
                format!("pid {p} ({app}, {state}, transaction open since {since})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            "{what}: waiting for {last} to end (pg_dump holds a transaction for the whole dump)"
        );
    }
}

/// Fails with a clear message when the schema is older than this binary.
pub async fn check_migrated(pool: &PgPool) -> Result<()> {
    let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> = sqlx::query_scalar(
        "SELECT max(version) FROM _sqlx_migrations WHERE success
         AND EXISTS (SELECT 1 FROM pg_tables WHERE tablename = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(None);
    if applied.unwrap_or(0) < newest {
        return Err(Error::config(
            "DATABASE_URL",
            format!(
                "schema is not up to date (have {}, need {newest}): run `planner migrate`",
                applied.unwrap_or(0)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_are_read_from_migrations() {
        let (b, d) = index_names(
            "-- no-transaction\n-- CREATE INDEX not_this ON t (x);\n\
             CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx\n ON t (x);",
        );
        assert_eq!((b, d), (vec!["a_idx".to_string()], vec![]));
        let (b, d) = index_names("DROP INDEX CONCURRENTLY IF EXISTS public.\"b_idx\";");
        assert_eq!((b, d), (vec![], vec!["b_idx".to_string()]));
        let (b, _) = index_names("create unique index c_idx on t(x)");
        assert_eq!(b, vec!["c_idx".to_string()]);
        // Every embedded no-transaction migration names what it builds.
        let ours = OurIndexes::from_migrations();
        assert!(
            ours.built
                .contains(&("scenario_logs_received_at_id_idx".into(), 2))
        );
        assert!(ours.dropped_later("scenario_metrics_day_scenario_idx", 4));
        assert!(!ours.dropped_later("scenario_metrics_day_scenario_ts_idx", 9));
    }

    #[test]
    fn index_definitions_are_rebuilt_concurrently() {
        assert_eq!(
            concurrently("CREATE INDEX a ON public.t USING btree (x)"),
            "CREATE INDEX CONCURRENTLY a ON public.t USING btree (x)"
        );
        assert_eq!(
            concurrently("CREATE UNIQUE INDEX a ON public.t USING btree (x)"),
            "CREATE UNIQUE INDEX CONCURRENTLY a ON public.t USING btree (x)"
        );
    }

    #[test]
    fn connections_older_than_a_read_only_error_are_stale() {
        assert!(!is_stale(Duration::from_secs(3600)), "none seen yet");
        READ_ONLY_SEEN.store(millis_now(), Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        assert!(is_stale(Duration::from_secs(1)), "opened before");
        assert!(!is_stale(Duration::ZERO), "opened after");
    }
}
