//! `jobico-apiserver`: parse flags, start logging, serve.

use clap::Parser;
use jobico_apiserver::args::Args;

/// mimalloc instead of glibc's malloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    jobico_common::telemetry::init(&args.log);
    match args.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
