//! `planner`: see [`archiver::cli::PlannerCli`].
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    archiver::cli::planner_main(archiver::cli::PlannerCli::parse()).await
}
