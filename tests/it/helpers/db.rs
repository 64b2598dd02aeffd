//! A PostgreSQL database of its own per test (migrated, or not), removed
//! when the test ends, also when it panics; the ledger and log-table
//! questions tests ask of it.

use super::wait::wait_until;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool, Row};
use std::time::Duration;
use uuid::Uuid;

pub const LOG_COLUMNS: &str = "id, scenario_id, received_at, message_hash, message_preview, source, size_bytes, has_pii, token_count, sqs_blocks";

pub fn admin_url() -> String {
    std::env::var("ARCHIVER_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs one statement as the administrator (ALTER DATABASE, terminating
/// sessions: what an operator or a failover does).
pub async fn admin_exec(sql: String) {
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Drops database `name`, ending its sessions; errors are ignored (it is
/// cleanup, and the database may already be gone).
async fn drop_database(admin: &str, name: &str) {
    if let Ok(mut admin) = PgConnection::connect(admin).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
    }
}

/// A database of its own. Dropped when this value is: by `cleanup`, or by
/// `Drop` when the test panicked (or did not call `cleanup`).
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
    admin: String,
    dropped: bool,
}

impl TestDb {
    /// A fresh database with the schema applied.
    pub async fn new() -> TestDb {
        let db = TestDb::unmigrated().await;
        archiver::db::migrate(&db.pool).await.unwrap();
        db
    }

    /// A fresh database with no migration applied.
    pub async fn unmigrated() -> TestDb {
        TestDb::unmigrated_at(&admin_url()).await
    }

    /// A fresh database with the schema applied, on the server of the
    /// administrator's URL `admin` (a private cluster's).
    pub async fn new_at(admin: &str) -> TestDb {
        let db = TestDb::unmigrated_at(admin).await;
        archiver::db::migrate(&db.pool).await.unwrap();
        db
    }

    async fn unmigrated_at(admin_url: &str) -> TestDb {
        let name = format!("archiver_t_{}", Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url)
            .await
            .expect("admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let mut url = url::Url::parse(admin_url).unwrap();
        url.set_path(&name);
        let url = url.to_string();
        // From here on `Drop` removes the database, whatever happens next.
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_lazy(&url)
            .unwrap();
        let db = TestDb {
            pool,
            url,
            name,
            admin: admin_url.to_string(),
            dropped: false,
        };
        db.pool.acquire().await.unwrap();
        db
    }

    /// Closes the pool and drops the database; `Drop` then has nothing to do.
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        drop_database(&self.admin, &self.name).await;
        self.dropped = true;
    }

    /// Loads `n` log rows over three years, none within a day of the
    /// 365-day cut-off (so which side a row is on cannot change mid-test).
    pub async fn load_logs(&self, n: i64) {
        archiver::demo::load_logs(&self.pool, n, 50, 3 * 365)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE scenario_logs SET received_at = received_at - interval '3 days'
             WHERE received_at BETWEEN now() - interval '367 days' AND now() - interval '363 days'",
        )
        .execute(&self.pool)
        .await
        .unwrap();
        sqlx::query("VACUUM ANALYZE scenario_logs")
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// The one number a query returns (a count, most often).
    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// (count, md5 over every column of every row, in id order) of a query
    /// that selects the log columns.
    pub async fn hash(&self, from_where: &str) -> (i64, String) {
        let sql = format!(
            "SELECT count(*), COALESCE(md5(string_agg(t::text, '|' ORDER BY t.id)), '')
             FROM (SELECT {LOG_COLUMNS} {from_where}) t"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Hashes of the rows that must end up archived and those that stay.
    pub async fn split_hashes(&self) -> ((i64, String), (i64, String)) {
        (
            self.hash("FROM scenario_logs WHERE received_at < now() - interval '365 days'")
                .await,
            self.hash("FROM scenario_logs WHERE received_at >= now() - interval '365 days'")
                .await,
        )
    }

    /// Asserts the logs invariant: every old row archived exactly once with
    /// every column equal, every young row live and untouched.
    pub async fn assert_logs_invariant(&self, old: &(i64, String), young: &(i64, String)) {
        assert!(
            old.0 > 0 && young.0 > 0,
            "test data must have rows on both sides"
        );
        assert_eq!(
            &self.hash("FROM scenario_logs_archive").await,
            old,
            "archive = old rows, every column"
        );
        assert_eq!(
            &self.hash("FROM scenario_logs").await,
            young,
            "live = young rows, every column"
        );
        let dup: i64 =
            sqlx::query_scalar("SELECT count(*) - count(DISTINCT id) FROM scenario_logs_archive")
                .fetch_one(&self.pool)
                .await
                .unwrap();
        assert_eq!(dup, 0, "no row archived twice");
        let unstamped: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM scenario_logs_archive a
             WHERE a.archived_at IS NULL OR NOT EXISTS
                 (SELECT 1 FROM archive_batches b WHERE b.id = a.archive_batch_id AND b.status = 'done')",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(unstamped, 0, "every archived row names a done batch");
    }

    /// Asserts the job's counters equal what was archived: counted once.
    pub async fn assert_job_counted_once(&self, job: Uuid, rows: i64) {
        let r = sqlx::query(
            "SELECT status, records_processed, records_archived, records_deleted, batches_planned, batches_done,
                    bytes_archived,
                    (SELECT COALESCE(sum(a.size_bytes), 0) FROM scenario_logs_archive a
                     JOIN archive_batches b ON b.id = a.archive_batch_id WHERE b.job_id = $1)::bigint AS bytes,
                    (SELECT count(*) FROM scenario_logs_archive a
                     JOIN archive_batches b ON b.id = a.archive_batch_id WHERE b.job_id = $1) AS stamped
             FROM archive_jobs WHERE id = $1",
        )
        .bind(job)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(r.get::<String, _>("status"), "completed");
        assert_eq!(r.get::<i64, _>("records_archived"), rows);
        assert_eq!(r.get::<i64, _>("records_deleted"), rows);
        assert_eq!(r.get::<i64, _>("records_processed"), rows);
        assert_eq!(
            r.get::<i64, _>("stamped"),
            rows,
            "archive rows stamped with this job's batches"
        );
        assert_eq!(r.get::<i64, _>("bytes_archived"), r.get::<i64, _>("bytes"));
        assert_eq!(
            r.get::<i32, _>("batches_done"),
            r.get::<i32, _>("batches_planned")
        );
        let ledger_rows: i64 = sqlx::query_scalar(
            "SELECT sum(rows_archived)::bigint FROM archive_batches WHERE job_id = $1",
        )
        .bind(job)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(ledger_rows, rows);
    }

    /// A job's status.
    pub async fn job_status(&self, job: Uuid) -> String {
        sqlx::query_scalar("SELECT status FROM archive_jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits (bounded) until a job leaves `running`; returns its status.
    pub async fn wait_job(&self, job: Uuid) -> String {
        wait_until(
            &format!("job {job} to leave running"),
            Duration::from_secs(120),
            || async {
                let status = self.job_status(job).await;
                (status != "running" && status != "pending").then_some(status)
            },
        )
        .await
    }

    /// The batches of a job, in order.
    pub async fn batches_of(&self, job: Uuid) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT id FROM archive_batches WHERE job_id = $1 ORDER BY seq")
            .bind(job)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// (status, attempts) of a batch.
    pub async fn batch_state(&self, id: Uuid) -> (String, i32) {
        sqlx::query_as("SELECT status, attempts FROM archive_batches WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits (bounded) until a batch has status `want`.
    pub async fn wait_batch(&self, id: Uuid, want: &str) {
        wait_until(
            &format!("batch {id} to become {want}"),
            Duration::from_secs(20),
            || async { self.batch_state(id).await.0 == want },
        )
        .await;
    }

    /// Sessions of this database waiting for a lock.
    pub async fn lock_waiters(&self) -> i64 {
        self.scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
    }

    /// Holds a row lock on one row of `batch` for `hold`, as the
    /// application might.
    pub async fn hold_a_row_of(&self, batch: Uuid, hold: Duration) -> tokio::task::JoinHandle<()> {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(
            "SELECT 1 FROM scenario_logs l, archive_batches b WHERE b.id = $1
               AND (l.received_at, l.id) > (b.lo_ts, b.lo_id) AND (l.received_at, l.id) <= (b.hi_ts, b.hi_id)
             LIMIT 1 FOR UPDATE OF l",
        )
        .bind(batch)
        .execute(&mut *tx)
        .await
        .unwrap();
        tokio::spawn(async move {
            // Holding the lock for this long is the scenario.
            tokio::time::sleep(hold).await;
            tx.rollback().await.unwrap();
        })
    }
}

impl TestDb {
    /// Locks one row of every batch of `job` until the returned transaction
    /// ends (rolled back when dropped), as the application might: whichever
    /// batch a worker takes waits on it.
    pub async fn lock_a_row_of_each_batch(
        &self,
        job: Uuid,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.pool.begin().await.unwrap();
        let locked: i64 = sqlx::query_scalar(
            "WITH l AS (
               SELECT DISTINCT ON (b.id) l.id FROM scenario_logs l, archive_batches b
               WHERE b.job_id = $1
                 AND (l.received_at, l.id) > (b.lo_ts, b.lo_id) AND (l.received_at, l.id) <= (b.hi_ts, b.hi_id)
               ORDER BY b.id, l.received_at, l.id)
             SELECT count(*) FROM (SELECT 1 FROM scenario_logs s JOIN l ON l.id = s.id FOR UPDATE OF s) t",
        )
        .bind(job)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let batches = self.batches_of(job).await.len() as i64;
        assert_eq!(locked, batches, "one row locked per batch");
        tx
    }
}

impl Drop for TestDb {
    /// Drops the database when `cleanup` did not: a test that panicked or
    /// returned early. `Drop` cannot await, and the test's runtime may be
    /// unwinding, so a thread of its own with a small runtime does it.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let name = self.name.clone();
        let admin = self.admin.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(drop_database(&admin, &name)))
        })
        .join();
    }
}

/// The helper's own guarantee, checked: a test that panics leaves no
/// database behind.
#[tokio::test]
async fn a_test_database_is_dropped_even_when_its_test_panics() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let db = TestDb::new().await;
        tx.send(db.name.clone()).unwrap();
        panic!("a failing test (on purpose: its database must still go)");
    });
    assert!(test.await.unwrap_err().is_panic());
    let name = rx.await.unwrap();
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(!left, "database {name} is left behind");
}
