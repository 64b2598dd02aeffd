//! archiver: moves old rows out of an application's hot PostgreSQL tables
//! into month-partitioned archive tables, in keyset batches recorded in a
//! ledger and executed exactly once in effect by a fleet of workers.
//!
//! - [`vocabulary`]: kinds, job types, job and batch statuses.
//! - [`config`]: settings from flags and environment; policy ages.
//! - [`error`]: the error type; its class decides retry or dead-letter.
//! - [`db`]: connecting, and the embedded migrations.
//! - [`ledger`]: `archive_jobs` and `archive_batches`, the authority.
//! - [`partitions`]: monthly archive partitions, created ahead of batches.
//! - [`schema`]: the facts plan and execute share: tables, keys, reports root.
//! - [`plan`]: eligible rows → batches → ledger → messages; the dry run.
//! - [`execute`]: one batch, as chunks of one transaction each, per kind.
//! - [`governor`]: what a worker checks before each chunk: the window,
//!   replica lag, database load, WAL rate.
//! - [`objects`]: the object store for report files: S3 or a local directory.
//! - [`transport`]: the queue seam: inline (no broker), RabbitMQ and SQS.
//! - [`worker`]: the unit of work, the consuming loop, and the inline run.
//! - [`monitoring`]: Prometheus metrics read from the ledger (R9).
//! - [`query`]: a scenario's logs, live or with the archive (R10).
//! - [`retention`]: dropping what is past its retention period (R12).
//! - [`http`]: the bounded HTTP server of the metrics exporter and the worker.
//! - [`human`]: numbers, bytes and times as a person reads them.
//! - [`summary`]: what the planner prints.
//! - [`progress`]: progress for a person watching: the inline planner's bars
//!   and `planner status --watch`, read from the ledger.
//! - [`demo`]: realistic demo data for the README, tests and benchmark.
//! - [`lock`]: the planner lock, held and watched for a whole run.
//! - [`app`]: settings resolved once into pools, executor, store and queue.
//! - [`planner`]: the planner run: plan, then publish or run inline.
//! - [`ops`]: the operator commands: migrate, status, redrive, retention,
//!   metrics, lifecycle, restore (archived logs back, `plan::restore` and
//!   `execute::restore`), restore-report.
//! - [`check`]: `planner check` and `worker check`: every dependency
//!   reached, one line each.
//! - [`verify`]: `planner verify`: the archive holds what each batch
//!   recorded moving (row counts, digests, objects).
//! - [`serve`]: the worker process: consume until told to stop.
//!   - [`serve::http`]: its endpoint: `/healthz`, `/readyz`, `/metrics`.
//! - [`shutdown`]: SIGTERM and SIGINT as a cancellation token.
//! - [`cli`]: the `planner` and `worker` command lines, parsed and dispatched.
//! - [`telemetry`]: logging setup.

#![deny(missing_debug_implementations, unsafe_code)]
#![warn(missing_docs, unreachable_pub, unused_qualifications)]

pub mod app;
pub mod check;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod error;
pub mod execute;
pub mod governor;
pub mod http;
pub mod human;
pub mod ledger;
pub mod lock;
pub mod monitoring;
pub mod objects;
pub mod ops;
pub mod partitions;
pub mod plan;
pub mod planner;
pub mod progress;
pub mod query;
pub mod retention;
pub mod schema;
pub mod serve;
pub mod shutdown;
pub mod summary;
pub mod telemetry;
pub mod transport;
pub mod verify;
pub mod vocabulary;
pub mod worker;

pub use error::{Error, Result};
