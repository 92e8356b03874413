//! The `jobico` command: local mode (`jobico up`) and manifest tooling.

pub mod durable;
pub mod embedded;
pub mod local_backend;
pub mod local_exec;
pub mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use jobico_common::telemetry::{self, LogArgs};

/// Jobico: run WebAssembly modules for validated events, locally or as Kubernetes Jobs.
#[derive(Debug, Parser)]
#[command(name = "jobico", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Local mode: serve the HTTP API and run each accepted event's module on this machine.
    Up(up::UpArgs),
    /// Print the CustomResourceDefinition of the Job resource as YAML (the source of crds/job.yaml).
    Crd,
    /// Compile WebAssembly text (.wat) to a binary module (.wasm).
    Wat2wasm {
        /// The .wat file.
        input: PathBuf,
        /// Where to write the .wasm file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

impl Cli {
    /// Runs the command and maps the outcome to an exit code.
    pub fn run(self) -> ExitCode {
        telemetry::init(&self.log);
        let result = match self.command {
            Command::Up(args) => up::run(args),
            Command::Crd => {
                print!("{}", jobico_model::crd::crd_yaml());
                Ok(())
            }
            Command::Wat2wasm { input, output } => wat2wasm(&input, &output),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        }
    }
}

fn wat2wasm(input: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let wasm =
        wat::parse_file(input).with_context(|| format!("cannot compile {}", input.display()))?;
    std::fs::write(output, wasm).with_context(|| format!("cannot write {}", output.display()))
}
