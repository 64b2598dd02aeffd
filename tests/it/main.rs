//! Integration tests against real PostgreSQL, RabbitMQ and an S3-protocol
//! server (moto), brought up by
//! `scripts/services.sh`. Each test has its own database, queues and bucket.

mod check;
mod chunks;
mod cli;
mod cluster;
mod database;
mod deploy;
mod failures;
mod fleet_amqp;
mod fleet_sqs;
mod governor;
mod hardening;
mod helpers;
mod hosts;
mod logs;
mod metrics;
mod monitoring;
mod objects;
mod planning;
mod progress;
mod report_safety;
mod reports;
mod restore;
mod retention;
mod spec_queries;
mod sqs_stuck;
mod verify;
mod window;
mod worker_endpoint;
