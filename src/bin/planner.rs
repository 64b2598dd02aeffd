//! `planner`: see [`archiver::cli::PlannerCli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    archiver::cli::planner_main(archiver::cli::parse("planner")).await
}
