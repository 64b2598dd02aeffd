//! `worker`: see [`archiver::cli::WorkerCli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    archiver::cli::worker_main(archiver::cli::parse("worker")).await
}
