//! `jobico-apiserver`: parse flags, start logging, serve.

use clap::Parser;
use jobico_apiserver::args::Args;

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
