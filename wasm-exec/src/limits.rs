//! Per-event limits and the capabilities granted to guests.
//!
//! Guests get nothing by default: no preopened directories, no environment variables, no
//! network and no arguments beyond the program name. Each grant is explicit.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::Error;

/// Default memory per event: enough for typical TinyGo/Rust guests, small enough that a
/// pod running a batch stays within a modest memory request.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;
/// Default wall-clock deadline per event: event handlers are expected to be short.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// Default output cap per event (stdout, stderr, log lines and result together): keeps one
/// chatty event from flooding the pod's log.
pub const DEFAULT_OUTPUT_CAP_BYTES: u64 = 1 << 20;

/// Resource limits applied to each event's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory the guest may grow to, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock time the event may take, enforced by epoch interruption.
    pub deadline: Duration,
    /// Optional fuel (roughly, WebAssembly instructions) the event may consume.
    pub fuel: Option<u64>,
    /// Bytes of guest output kept per event; beyond it output is dropped and a marker line
    /// says so.
    pub output_cap_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            deadline: DEFAULT_DEADLINE,
            fuel: None,
            output_cap_bytes: DEFAULT_OUTPUT_CAP_BYTES,
        }
    }
}

/// What a guest may reach beyond its own memory. The default grants nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Host directories preopened for the guest.
    pub dirs: Vec<DirGrant>,
    /// Environment variables the guest sees.
    pub env: Vec<EnvVar>,
    /// Keep a WASI command's standard output (up to the output cap) as the event's result,
    /// what its routes hand on. Not a grant to the guest: what the host keeps of its run.
    pub stdout_result: bool,
}

/// A host directory made visible to the guest: `HOST::GUEST[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// Directory on the host.
    pub host: PathBuf,
    /// Path under which the guest sees it.
    pub guest: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

impl FromStr for DirGrant {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::Invalid {
            what: "directory grant",
            value: text.to_owned(),
            reason,
        };
        let (host, guest) = text
            .split_once("::")
            .ok_or_else(|| invalid("expected HOST::GUEST or HOST::GUEST:ro"))?;
        let (guest, read_only) = match guest.strip_suffix(":ro") {
            Some(guest) => (guest, true),
            None => (guest, false),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(invalid("host and guest paths must not be empty"));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_owned(),
            read_only,
        })
    }
}

/// An environment variable granted to the guest: `NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// Variable name.
    pub name: String,
    /// Variable value.
    pub value: String,
}

impl FromStr for EnvVar {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        match text.split_once('=') {
            Some((name, value)) if !name.is_empty() => Ok(Self {
                name: name.to_owned(),
                value: value.to_owned(),
            }),
            _ => Err(Error::Invalid {
                what: "environment variable",
                value: text.to_owned(),
                reason: "expected NAME=VALUE",
            }),
        }
    }
}

/// Parses a byte size: a plain number or one with a suffix `K`/`M`/`G` (powers of 1000) or
/// `Ki`/`Mi`/`Gi` (powers of 1024), as in Kubernetes quantities.
pub fn parse_bytes(text: &str) -> Result<u64, Error> {
    let invalid = |reason| Error::Invalid {
        what: "byte size",
        value: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    let number: u64 = digits.parse().map_err(|_| invalid("expected a number"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(invalid("unknown unit (use K, M, G, Ki, Mi or Gi)")),
    };
    number.checked_mul(unit).ok_or_else(|| invalid("too large"))
}

/// Parses a duration: a number with unit `ms`, `s` or `m` (`200ms`, `10s`, `1.5s`, `2m`).
pub fn parse_duration(text: &str) -> Result<Duration, Error> {
    let invalid = |reason| Error::Invalid {
        what: "duration",
        value: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| invalid("missing unit (ms, s or m)"))?;
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid("expected a number"))?;
    let seconds = match unit {
        "ms" => number / 1_000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(invalid("unknown unit (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_grants_parse() {
        let grant: DirGrant = "/tmp/in::/data:ro".parse().unwrap();
        assert_eq!(grant.host, PathBuf::from("/tmp/in"));
        assert_eq!(grant.guest, "/data");
        assert!(grant.read_only);
        let grant: DirGrant = "./x::/x".parse().unwrap();
        assert!(!grant.read_only);
        for bad in ["/tmp", "::/x", "/tmp::", "/tmp:/x"] {
            assert!(bad.parse::<DirGrant>().is_err(), "{bad}");
        }
    }

    #[test]
    fn env_vars_parse() {
        let var: EnvVar = "A=b=c".parse().unwrap();
        assert_eq!((var.name.as_str(), var.value.as_str()), ("A", "b=c"));
        assert_eq!("A=".parse::<EnvVar>().unwrap().value, "");
        assert!("=x".parse::<EnvVar>().is_err());
        assert!("novalue".parse::<EnvVar>().is_err());
    }

    #[test]
    fn sizes_parse() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1024", Some(1024)),
            ("64Mi", Some(64 << 20)),
            ("1Gi", Some(1 << 30)),
            ("2M", Some(2_000_000)),
            ("1k", Some(1000)),
            ("", None),
            ("Mi", None),
            ("5XB", None),
            ("99999999999999999999", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_bytes(text).ok(), *want, "{text}");
        }
    }

    #[test]
    fn durations_parse() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("200ms", Some(Duration::from_millis(200))),
            ("10s", Some(Duration::from_secs(10))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("2m", Some(Duration::from_secs(120))),
            ("10", None),
            ("s", None),
            ("3h", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).ok(), *want, "{text}");
        }
    }
}
