//! Logging setup shared by every binary.

use clap::{Args, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging flags, flattened into every binary's arguments.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter in `tracing` EnvFilter syntax (e.g. `info,jobico_apiserver=debug`).
    #[arg(long = "log", env = "JOBICO_LOG", default_value = "info")]
    pub filter: String,
    /// Log line format.
    #[arg(long = "log-format", env = "JOBICO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub format: LogFormat,
}

impl Default for LogArgs {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Plain,
        }
    }
}

/// Installs the global subscriber; logs go to stderr. Call once, early in `main`.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.filter).unwrap_or_else(|error| {
        eprintln!(
            "invalid log filter {:?} ({error}), using \"info\"",
            args.filter
        );
        EnvFilter::new("info")
    });
    // Colours only for a terminal: escape codes make captured logs unreadable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match args.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging was already initialised: {error}");
    }
}
