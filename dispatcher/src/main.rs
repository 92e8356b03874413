//! `jobico-dispatcher`: parse arguments, set up logging, run, map errors to the exit code.

use clap::Parser;
use jobico_dispatcher::app::{Args, run};

/// mimalloc instead of glibc's malloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    jobico_common::telemetry::init(&args.log);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
