//! The `wasm-exec` command line: arguments and what each subcommand does.
//!
//! Kept in the library so tests reach it; `main.rs` only parses, sets up logging and exits
//! with the code [`execute`] returns (see the constants in [`crate::summary`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use jobico_common::ExecEvent;
use jobico_common::envelope::{EVENTS_PARTS_VAR, EVENTS_VAR, join_events};
use jobico_common::executor::{ArtifactRef, MODULE_URL_VAR, UploadedModuleRef, guest_env, set_var};
use jobico_common::summary::{ModuleLoad, ModuleSource};
use jobico_common::telemetry::LogArgs;

use crate::limits::{parse_bytes, parse_duration};
use crate::results::ResultsTarget;
use crate::{
    Capabilities, DirGrant, EXIT_HOST_ERROR, EXIT_OK, EnvVar, Limits, RunSummary, Runtime,
    RuntimeConfig, StdoutSink, run_exit_code, write_termination_message,
};

/// Runs a WebAssembly module once per event, each in a fresh instance under limits.
///
/// Without a subcommand, behaves like `run`. Exit codes: 0 every event succeeded, 1 some
/// event failed in the guest, 2 host or configuration error.
#[derive(Debug, Parser)]
#[command(
    name = "wasm-exec",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Arguments of the default `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a module once per event (the default).
    Run(RunArgs),
    /// Precompile a module to a `.cwasm` file for this wasm-exec build and this CPU.
    Compile(CompileArgs),
}

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Module to run: `.wasm` or `.wat` (recognised by content). A precompiled `.cwasm` is
    /// refused unless --trust-precompiled is given. Not given when the Job names an uploaded
    /// module (JOBICO_MODULE_URL, JOBICO_MODULE_DIGEST, JOBICO_MODULE_TOKEN), which is
    /// fetched from the dispatcher instead.
    #[arg(env = "JOBICO_MODULE", value_name = "MODULE")]
    pub module: Option<PathBuf>,
    /// File of events (a JSON array of {"id":...,"data":...} or one such object); `-` for stdin.
    /// Without it and without --events-json, events are read from the environment
    /// (JOBICO_EVENTS, or JOBICO_EVENTS_PARTS=N and JOBICO_EVENTS_0 .. JOBICO_EVENTS_<N-1>,
    /// whose values are joined: how a Kubernetes Job carries more than one variable holds),
    /// else from stdin.
    #[arg(long, env = "JOBICO_EVENTS_FILE", value_name = "PATH")]
    pub events: Option<PathBuf>,
    /// Events as inline JSON, in the same shape as --events.
    #[arg(long, value_name = "JSON", conflicts_with = "events")]
    pub events_json: Option<String>,
    /// Memory limit per event, in bytes or with a K/M/G/Ki/Mi/Gi suffix.
    #[arg(long, env = "JOBICO_MEMORY", default_value = "64Mi", value_parser = parse_bytes)]
    pub memory: u64,
    /// Wall-clock deadline per event (e.g. 200ms, 10s, 1m).
    #[arg(long, env = "JOBICO_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Fuel per event (about one unit per WebAssembly instruction); unlimited if not given.
    #[arg(long, env = "JOBICO_FUEL")]
    pub fuel: Option<u64>,
    /// Guest output kept per event (stdout, stderr, log lines and result together).
    #[arg(long, env = "JOBICO_OUTPUT_CAP", default_value = "1Mi", value_parser = parse_bytes)]
    pub output_cap: u64,
    /// Preopen a host directory for the guest: HOST::GUEST, or HOST::GUEST:ro for read-only.
    /// Repeatable. Grants have no environment fallback: any delimiter to split one variable
    /// into several values would corrupt values containing it.
    #[arg(long = "dir", value_name = "HOST::GUEST[:ro]")]
    pub dirs: Vec<DirGrant>,
    /// Give the guest an environment variable NAME=VALUE (the value may contain anything,
    /// commas included). Repeatable; no environment fallback, as for `--dir`. The guest also
    /// gets each `JOBICO_GUEST_<NAME>` variable of this process as `<NAME>` (how a Kubernetes
    /// Job grants them); `--env` replaces one of the same name.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<EnvVar>,
    /// Where to write the size-limited JSON summary (Kubernetes' termination message).
    #[arg(
        long,
        env = "JOBICO_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// Directory caching compiled modules by module digest and engine settings (only entries
    /// it can verify are used; see the README).
    #[arg(long, env = "JOBICO_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Load a precompiled MODULE (`wasm-exec compile` output) as native code, unchecked.
    /// Operator-only: a crafted file runs arbitrary code in the executor. A flag without an
    /// environment variable, so that nothing but the command line can set it.
    #[arg(long)]
    pub trust_precompiled: bool,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Arguments of `compile`.
#[derive(Debug, Args)]
pub struct CompileArgs {
    /// Module to compile: `.wasm` or `.wat`.
    #[arg(value_name = "MODULE")]
    pub input: PathBuf,
    /// Output file (default: the input with extension `.cwasm`).
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl Cli {
    /// The logging flags of whichever subcommand runs.
    pub fn log_args(&self) -> &LogArgs {
        match &self.command {
            Some(Command::Run(args)) => &args.log,
            Some(Command::Compile(args)) => &args.log,
            None => &self.run.log,
        }
    }
}

/// Runs the parsed command line and returns the process exit code.
pub fn execute(cli: Cli) -> u8 {
    match cli.command {
        Some(Command::Compile(args)) => match compile(&args) {
            Ok(()) => EXIT_OK,
            Err(error) => {
                tracing::error!("{error:#}");
                EXIT_HOST_ERROR
            }
        },
        Some(Command::Run(args)) => run(&args),
        None => run(&cli.run),
    }
}

/// `run`: every event through the module, output on stdout, summary last, exit code by the
/// contract.
pub fn run(args: &RunArgs) -> u8 {
    let events = match read_events(args) {
        Ok(events) => events,
        Err(error) => return fail(args, 0, &error),
    };
    let results = match ResultsTarget::from_env(|name| std::env::var(name).ok()) {
        Ok(results) => results,
        Err(error) => {
            return fail(
                args,
                events.len(),
                &anyhow::anyhow!("the Job's results: {error}"),
            );
        }
    };
    let (module, load) = match load(args) {
        Ok(loaded) => loaded,
        Err(error) => return fail(args, events.len(), &error),
    };
    let limits = Limits {
        memory_bytes: args.memory,
        deadline: args.deadline,
        fuel: args.fuel,
        output_cap_bytes: args.output_cap,
    };
    let capabilities = Capabilities {
        dirs: args.dirs.clone(),
        env: granted_env(std::env::vars_os(), &args.env),
        // The routes hand on a WASI command's standard output.
        stdout_result: results.is_some(),
    };
    tracing::debug!(module = module.name(), abi = %module.abi(), events = events.len(), "running");
    let mut sink = StdoutSink::new();
    let outcomes: Vec<_> = events
        .iter()
        .map(|event| module.run(event, &limits, &capabilities, &mut sink))
        .collect();
    let mut summary = RunSummary::new(&outcomes);
    summary.module = Some(load);
    if let Some(target) = &results
        && let Err(error) = crate::results::post(target, &outcomes)
    {
        // Run again rather than lose the routes: the routed events' ids are derived, so
        // nothing is published twice.
        tracing::error!(%error, "the outcomes' routes could not be followed");
        summary.error = Some(format!(
            "the events ran, but their outcomes could not be posted for their routes: {error}"
        ));
    }
    finish(args, &summary)
}

/// The guest's variables: this process's `JOBICO_GUEST_*` (see
/// [`jobico_common::executor::guest_env`]), then the `--env` flags, a later name replacing an
/// earlier one.
fn granted_env(
    process: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    flags: &[EnvVar],
) -> Vec<EnvVar> {
    let mut env = guest_env(process);
    for flag in flags {
        set_var(&mut env, flag.name.clone(), flag.value.clone());
    }
    env.into_iter()
        .map(|(name, value)| EnvVar { name, value })
        .collect()
}

/// The module, from the dispatcher's artifact when the Job names one that verifies (see
/// [`crate::artifact`]), else from the cache or compiled; and how it was loaded.
fn load(args: &RunArgs) -> anyhow::Result<(crate::Module, ModuleLoad)> {
    for dir in &args.dirs {
        if !dir.host.is_dir() {
            bail!(
                "granted directory {} does not exist or is not a directory",
                dir.host.display()
            );
        }
    }
    let runtime = Runtime::new(RuntimeConfig {
        // The binary runs events one after another.
        max_concurrent_instances: 1,
        cache_dir: args.cache_dir.clone(),
        ..RuntimeConfig::default()
    })?;
    let artifact = ArtifactRef::from_env(|name| std::env::var(name).ok())
        .map_err(|e| anyhow::anyhow!("the Job's artifact: {e}"))?;
    let uploaded = UploadedModuleRef::from_env(|name| std::env::var(name).ok())
        .map_err(|e| anyhow::anyhow!("the Job's uploaded module: {e}"))?;
    // An uploaded module comes from the dispatcher, by digest; no file is mounted.
    if let Some(uploaded) = uploaded {
        if let Some(path) = &args.module {
            bail!(
                "the Job names an uploaded module ({MODULE_URL_VAR}) and a module file ({}); it may name one",
                path.display()
            );
        }
        return Ok(runtime.load_uploaded(&uploaded, artifact.as_ref())?);
    }
    let path = args
        .module
        .as_deref()
        .context("no module given (a MODULE argument, or JOBICO_MODULE)")?;
    let started = std::time::Instant::now();
    let loaded = if args.trust_precompiled {
        runtime.load_trusted_precompiled_file(path).map(|module| {
            (
                module,
                ModuleLoad::since(ModuleSource::Precompiled, started),
            )
        })
    } else {
        runtime.load_file_with_artifact(path, artifact.as_ref())
    };
    loaded
        .map_err(|error| match error {
            crate::Error::Precompiled { .. } => anyhow::anyhow!(
                "{error}; an operator who trusts this file may pass --trust-precompiled"
            ),
            other => other.into(),
        })
        .with_context(|| format!("cannot load module {}", path.display()))
}

fn read_events(args: &RunArgs) -> anyhow::Result<Vec<ExecEvent>> {
    let from_env = join_events(|name| std::env::var_os(name))
        .context("cannot read events from the environment")?;
    let (bytes, source) = match (&args.events, &args.events_json, from_env) {
        (Some(_), Some(_), _) => {
            bail!("give events with --events or with --events-json, not both")
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => bail!(
            "events are given in the environment ({EVENTS_VAR} or {EVENTS_PARTS_VAR}) and by --events or --events-json; give them one way"
        ),
        (None, Some(json), None) => (json.as_bytes().to_vec(), "--events-json".to_owned()),
        (None, None, Some(text)) => (text.into_bytes(), "the environment".to_owned()),
        (Some(path), None, None) if path != Path::new("-") => (
            std::fs::read(path)
                .with_context(|| format!("cannot read events file {}", path.display()))?,
            path.display().to_string(),
        ),
        _ => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read events from stdin")?;
            (bytes, "stdin".to_owned())
        }
    };
    ExecEvent::parse_many(&bytes).with_context(|| format!("cannot parse events from {source}"))
}

/// Reports a run that could not start and returns the host-error exit code.
fn fail(args: &RunArgs, events: usize, error: &anyhow::Error) -> u8 {
    tracing::error!("{error:#}");
    finish(args, &RunSummary::host_error(events, &format!("{error:#}")))
}

/// Prints the summary as the last stdout line, writes the termination message, returns the
/// exit code.
fn finish(args: &RunArgs, summary: &RunSummary) -> u8 {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", summary.to_json());
    let _ = stdout.flush();
    if let Err(error) = write_termination_message(&args.termination_log, summary) {
        // Outside Kubernetes the default path usually cannot be written; the summary is on
        // stdout anyway.
        tracing::warn!(path = %args.termination_log.display(), %error, "cannot write termination message");
    }
    run_exit_code(summary)
}

fn compile(args: &CompileArgs) -> anyhow::Result<()> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.input.with_extension("cwasm"));
    let bytes = std::fs::read(&args.input)
        .with_context(|| format!("cannot read module {}", args.input.display()))?;
    let name = args
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let runtime = Runtime::new(RuntimeConfig {
        max_concurrent_instances: 1,
        ..RuntimeConfig::default()
    })?;
    let compiled = runtime
        .precompile(&name, &bytes)
        .with_context(|| format!("cannot compile {}", args.input.display()))?;
    std::fs::write(&output, &compiled)
        .with_context(|| format!("cannot write {}", output.display()))?;
    tracing::info!(input = %args.input.display(), output = %output.display(), bytes = compiled.len(), "compiled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use jobico_common::executor::OPERATOR_ONLY_FLAGS;

    /// The dispatcher's pod policy refuses these flags by name in a Job's arguments: each must
    /// be a real flag here, settable from the command line only, and never by an abbreviation.
    #[test]
    fn operator_only_flags_exist_have_no_env_and_no_abbreviation() {
        let command = Cli::command();
        let run = command.find_subcommand("run").expect("run").clone();
        for scope in [&command, &run] {
            for flag in OPERATOR_ONLY_FLAGS {
                let long = flag.trim_start_matches("--");
                let arg = scope
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .unwrap_or_else(|| panic!("{flag} is a flag of {}", scope.get_name()));
                assert!(arg.get_env().is_none(), "{flag} has no env fallback");
            }
        }
        for flag in OPERATOR_ONLY_FLAGS {
            let prefix = &flag[..flag.len() - 2];
            assert!(
                Cli::try_parse_from(["wasm-exec", "run", prefix, "m.wasm"]).is_err(),
                "{prefix} must not stand for {flag}"
            );
            assert!(Cli::try_parse_from(["wasm-exec", "run", flag, "m.wasm"]).is_ok());
        }
    }

    #[test]
    fn guest_env_values_keep_their_commas() {
        let cli = Cli::try_parse_from([
            "wasm-exec",
            "m.wasm",
            "--env",
            "LIST=a,b,c",
            "--env",
            "EMPTY=",
        ])
        .unwrap();
        let env: Vec<_> = cli
            .run
            .env
            .iter()
            .map(|v| (v.name.as_str(), v.value.as_str()))
            .collect();
        assert_eq!(env, [("LIST", "a,b,c"), ("EMPTY", "")]);
    }

    #[test]
    fn the_guest_gets_its_process_variables_then_the_flags() {
        let process = [
            ("JOBICO_GUEST_TOKEN", "from the pod"),
            ("JOBICO_GUEST_MODE", "pod"),
            ("JOBICO_EVENTS", "[]"),
            ("HOME", "/"),
        ]
        .map(|(n, v)| (n.into(), v.into()));
        let flags = [EnvVar {
            name: "MODE".into(),
            value: "flag".into(),
        }];
        let env: Vec<_> = granted_env(process, &flags)
            .into_iter()
            .map(|v| format!("{}={}", v.name, v.value))
            .collect();
        assert_eq!(env, ["TOKEN=from the pod", "MODE=flag"]);
    }
}
