//! The `wasm-exec` binary: parse arguments, set up logging, run, exit with the documented code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = wasm_exec::cli::Cli::parse();
    jobico_common::telemetry::init(cli.log_args());
    ExitCode::from(wasm_exec::cli::execute(cli))
}
