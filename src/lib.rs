//! archiver: moves old rows out of an application's hot PostgreSQL tables
//! into month-partitioned archive tables, in keyset batches recorded in a
//! ledger and executed exactly once in effect by a fleet of workers.
//!
//! - [`config`]: settings from flags and environment; policy ages.
//! - [`error`]: the error type; its class decides retry or dead-letter.
//! - [`db`]: connecting, and the embedded migrations.
//! - [`ledger`]: `archive_jobs` and `archive_batches`, the authority.
//! - [`partitions`]: monthly archive partitions, created ahead of batches.
//! - [`schema`]: the facts plan and execute share: tables, keys, reports root.
//! - [`plan`]: eligible rows → batches → ledger → messages; the dry run.
//! - [`execute`]: one batch, one transaction, per kind.
//! - [`objects`]: the object store for report files: S3 or a local directory.
//! - [`transport`]: the queue seam: inline (no broker), RabbitMQ and SQS.
//! - [`worker`]: the unit of work and the consuming loop.
//! - [`monitoring`]: Prometheus metrics read from the ledger (R9).
//! - [`query`]: a scenario's logs, live or with the archive (R10).
//! - [`retention`]: dropping what is past its retention period (R12).
//! - [`report`]: what the planner prints.
//! - [`demo`]: realistic demo data for the README, tests and benchmark.
//! - [`cli`]: the `planner` and `worker` command lines.
//! - [`telemetry`]: logging setup.

#![deny(missing_debug_implementations, unsafe_code)]
#![warn(missing_docs, unreachable_pub, unused_qualifications)]

pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod error;
pub mod execute;
pub mod ledger;
pub mod monitoring;
pub mod objects;
pub mod partitions;
pub mod plan;
pub mod query;
pub mod report;
pub mod retention;
pub mod schema;
pub mod telemetry;
pub mod transport;
pub mod worker;

pub use error::{Error, Result};
