//! The `jobico` command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    jobico::Cli::parse().run()
}
