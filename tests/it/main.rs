//! Integration tests against real PostgreSQL and RabbitMQ (see
//! `scripts/services.sh`). Each test has its own database and queue names.

mod cli;
mod fleet;
mod helpers;
mod logs;
mod metrics;
mod objects;
mod reports;
mod spec_queries;
