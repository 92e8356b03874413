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
    Up(Box<up::UpArgs>),
    /// Print the CustomResourceDefinition of the Job resource as YAML (the source of crds/job.yaml).
    Crd,
    /// Print a module ConfigMap holding WebAssembly files (for `| kubectl apply -f -`). Only
    /// WebAssembly is accepted: precompiled or other files are refused.
    #[command(name = "module")]
    Module {
        #[command(subcommand)]
        command: ModuleCommand,
    },
    /// Compile WebAssembly text (.wat) to a binary module (.wasm).
    Wat2wasm {
        /// The .wat file.
        input: PathBuf,
        /// Where to write the .wasm file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ModuleCommand {
    /// Print a ConfigMap named NAME whose `binaryData` holds FILE... under their file names.
    Configmap {
        /// ConfigMap name: the resource's `spec.modules`, or `<resource name>-modules`.
        name: String,
        /// The `.wasm` (or `.wat`, compiled first) files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Namespace of the ConfigMap.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

impl Cli {
    /// Runs the command and maps the outcome to an exit code.
    pub fn run(self) -> ExitCode {
        telemetry::init(&self.log);
        let result = match self.command {
            Command::Up(args) => up::run(*args),
            Command::Crd => {
                print!("{}", jobico_model::crd::crd_yaml());
                Ok(())
            }
            Command::Wat2wasm { input, output } => wat2wasm(&input, &output),
            Command::Module {
                command:
                    ModuleCommand::Configmap {
                        name,
                        files,
                        namespace,
                    },
            } => module_config_map(&name, &namespace, &files).map(|yaml| print!("{yaml}")),
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

/// Kubernetes refuses ConfigMaps over 1 MiB (all keys and values together).
const MAX_CONFIG_MAP_BYTES: usize = 1 << 20;

/// The YAML of ConfigMap `namespace/name` holding `files` as modules (`.wat` compiled to
/// `.wasm` and stored under the `.wasm` name).
pub fn module_config_map(name: &str, namespace: &str, files: &[PathBuf]) -> anyhow::Result<String> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut binary = std::collections::BTreeMap::new();
    for file in files {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let (key, wasm) = if bytes.starts_with(b"\0asm") {
            let key = file.file_name().map(|n| n.to_string_lossy().into_owned());
            (key, bytes)
        } else if file.extension().is_some_and(|e| e == "wat") {
            let wasm = wat::parse_bytes(&bytes)
                .with_context(|| format!("cannot compile {}", file.display()))?
                .into_owned();
            let key = file
                .with_extension("wasm")
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            (key, wasm)
        } else {
            anyhow::bail!(
                "{} is not a WebAssembly module (no \\0asm header, not .wat); precompiled modules are never accepted",
                file.display()
            );
        };
        let key = key.with_context(|| format!("{} has no file name", file.display()))?;
        binary.insert(key, ByteString(wasm));
    }
    let size: usize = binary.iter().map(|(k, v)| k.len() + v.0.len()).sum();
    if size > MAX_CONFIG_MAP_BYTES {
        anyhow::bail!(
            "the modules take {size} bytes, more than the {MAX_CONFIG_MAP_BYTES} a ConfigMap may hold"
        );
    }
    let map = ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        binary_data: Some(binary),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&map).context("serialising the ConfigMap")?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "ConfigMap".into();
    serde_yaml::to_string(&value).context("serialising the ConfigMap")
}

fn wat2wasm(input: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let wasm =
        wat::parse_file(input).with_context(|| format!("cannot compile {}", input.display()))?;
    std::fs::write(output, wasm).with_context(|| format!("cannot write {}", output.display()))
}
