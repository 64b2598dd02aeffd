//! `worker`: see [`archiver::cli::WorkerCli`].
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    archiver::cli::worker_main(archiver::cli::WorkerCli::parse()).await
}
