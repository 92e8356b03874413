//! The `jobico` command: local mode (`jobico up`), manifest tooling, and the cluster user's
//! day (`module push`, `send`, `status`, `logs`).

pub mod durable;
pub mod embedded;
pub mod kube_client;
pub mod local_backend;
pub mod local_exec;
pub mod local_sinks;
pub mod logs;
pub mod push;
pub mod send;
pub mod up;
pub mod upload;

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
    /// Send one event to the cluster's ingress (PUT /execute/NAMESPACE/EVENT) with a token
    /// the cluster issues for a ServiceAccount (or --token); prints the ids.
    Send(send::SendArgs),
    /// Print an event's recorded state (GET /events/NAMESPACE/ID).
    Status(send::StatusArgs),
    /// Print the module output of one event, from the pod of the Job that ran it.
    Logs(logs::LogsArgs),
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
    /// Put modules into the ConfigMap a Job resource reads them from (its `spec.modules`, or
    /// `<resource>-modules`), creating or updating it in the cluster; other modules in it are
    /// kept. Refused when the ConfigMap would exceed Kubernetes' 1 MiB.
    Push(push::PushArgs),
    /// Upload modules too large for a ConfigMap (up to 64 MiB) into the namespace's module
    /// store, through the ingress (authorised as a change of the Job resource RESOURCE); a
    /// resource runs one with `wasm: sha256:<digest>`, which this prints.
    Upload(upload::UploadArgs),
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
            Command::Module {
                command: ModuleCommand::Push(args),
            } => args.run(),
            Command::Module {
                command: ModuleCommand::Upload(args),
            } => args.run(),
            Command::Send(args) => block_on(send::send(&args)).map(|answer| println!("{answer}")),
            Command::Status(args) => block_on(send::status(&args)).map(|state| {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&state).unwrap_or_default()
                )
            }),
            Command::Logs(args) => args.run(),
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

/// Runs `future` on a runtime of its own (the cluster commands are one request or a few).
pub fn block_on<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

/// Kubernetes refuses ConfigMaps over 1 MiB (all keys and values together).
pub const MAX_CONFIG_MAP_BYTES: usize = 1 << 20;

/// The modules in `files` by the key a module ConfigMap holds them under: `.wasm` files as
/// they are, `.wat` compiled and keyed by the `.wasm` name. Anything else (a precompiled
/// `.cwasm`, an ELF file, text) is refused.
pub fn module_entries(
    files: &[PathBuf],
) -> anyhow::Result<std::collections::BTreeMap<String, k8s_openapi::ByteString>> {
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
        binary.insert(key, k8s_openapi::ByteString(wasm));
    }
    Ok(binary)
}

/// Bytes a ConfigMap's keys and values take, as Kubernetes counts them against its 1 MiB.
pub fn config_map_bytes(map: &k8s_openapi::api::core::v1::ConfigMap) -> usize {
    let binary: usize = map
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.0.len())
        .sum();
    let text: usize = map
        .data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    binary + text
}

/// Refuses a ConfigMap Kubernetes would refuse for its size, saying what to do.
pub fn check_config_map_size(map: &k8s_openapi::api::core::v1::ConfigMap) -> anyhow::Result<()> {
    let size = config_map_bytes(map);
    if size > MAX_CONFIG_MAP_BYTES {
        anyhow::bail!(
            "the modules take {size} bytes, more than the {MAX_CONFIG_MAP_BYTES} a ConfigMap may hold: shrink the module (wasm-opt -Oz, strip its custom sections) or split the modules over resources with their own `spec.modules` ConfigMap"
        );
    }
    Ok(())
}

/// The YAML of ConfigMap `namespace/name` holding `files` as modules (`.wat` compiled to
/// `.wasm` and stored under the `.wasm` name).
pub fn module_config_map(name: &str, namespace: &str, files: &[PathBuf]) -> anyhow::Result<String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let map = ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        binary_data: Some(module_entries(files)?),
        ..Default::default()
    };
    check_config_map_size(&map)?;
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
