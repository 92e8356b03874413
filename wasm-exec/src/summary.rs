//! Event outcomes, the run summary, the termination message and the exit-code contract.
//!
//! The summary is one JSON object:
//! `{"events":N,"succeeded":S,"failed":F,"output_bytes":B,"duration_ms":D,"omitted":O,"outcomes":[...]}`
//! plus `"error"` when the run could not start. It is printed in full as the last stdout line
//! and written, cut to [`TERMINATION_MESSAGE_LIMIT`], to the termination-message file.

use std::path::Path;
use std::time::Duration;

use jobico_common::state::exit;
use serde::{Deserialize, Serialize};

// The contract itself lives in `jobico_common::state::exit` (the dispatcher's pod failure
// policy reads it); these are the same values as process exit codes.

/// Exit code: every event succeeded.
pub const EXIT_OK: u8 = exit::OK as u8;
/// Exit code: the executor worked, but at least one event failed in the guest (non-zero exit,
/// trap, deadline, memory or fuel limit, jobicolet error code, ABI violation). Retrying the
/// same events would fail the same way.
pub const EXIT_GUEST_FAILED: u8 = exit::GUEST_FAILED as u8;
/// Exit code: host or configuration error (bad flags, unreadable events, a module that cannot
/// be loaded or fits no ABI, or an event that failed for a host reason). Also what clap uses
/// for usage errors. Worth a retry once the cause is fixed.
pub const EXIT_HOST_ERROR: u8 = exit::HOST_ERROR as u8;

/// Kubernetes reads at most 4096 bytes of a container's termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Longest `message` or `result` kept per outcome in the termination message, so that one
/// verbose failure cannot crowd out the others.
const TERMINATION_TEXT_LIMIT: usize = 256;

/// Whether an event succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The guest finished normally (exit code 0, jobicolet error code 0).
    Succeeded,
    /// The event failed; `error` says why.
    Failed,
}

/// Why an event failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// A WASI guest exited with a non-zero code.
    Exit,
    /// The guest trapped (`unreachable`, out-of-bounds access, stack overflow, ...).
    Trap,
    /// The wall-clock deadline passed.
    Deadline,
    /// The guest needed more memory than its limit.
    Memory,
    /// The guest ran out of fuel.
    Fuel,
    /// A jobicolet guest returned a non-zero error code.
    GuestError,
    /// The guest broke the jobicolet ABI (bad pointers, missing memory).
    Abi,
    /// The host failed (a granted directory could not be opened, instantiation failed).
    Host,
}

impl ErrorKind {
    /// The kind's name as it appears in JSON (`trap`, `guest-error`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exit => "exit",
            Self::Trap => "trap",
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Fuel => "fuel",
            Self::GuestError => "guest-error",
            Self::Abi => "abi",
            Self::Host => "host",
        }
    }

    /// Whether this failure is the host's rather than the guest's.
    pub fn is_host(self) -> bool {
        matches!(self, Self::Host)
    }
}

/// The outcome of one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventOutcome {
    /// The event's id.
    pub id: String,
    /// Succeeded or failed.
    pub status: Status,
    /// WASI exit code, or the jobicolet error code, when the guest produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Why the event failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
    /// Human-readable detail of the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Wall time of the event, including instantiation.
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: Duration,
    /// Bytes of output the guest produced (kept or dropped by the cap).
    pub output_bytes: u64,
    /// Whether output was dropped because of the cap.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
    /// The jobicolet result string (cut at the output cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

impl EventOutcome {
    /// Whether the event succeeded.
    pub fn succeeded(&self) -> bool {
        self.status == Status::Succeeded
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        // Microsecond precision is plenty and keeps the numbers short.
        let micros = duration.as_micros() as f64;
        s.serialize_f64(micros / 1000.0)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let millis = f64::deserialize(d)?;
        Ok(Duration::from_secs_f64(millis.max(0.0) / 1000.0))
    }
}

/// The summary of a whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Number of events given.
    pub events: usize,
    /// Events that succeeded.
    pub succeeded: usize,
    /// Events that failed.
    pub failed: usize,
    /// Total guest output in bytes.
    pub output_bytes: u64,
    /// Total wall time of the events.
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: Duration,
    /// Why the run could not start (module or events unusable), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Outcomes left out of `outcomes` to respect a size limit.
    pub omitted: usize,
    /// Per-event outcomes, in event order.
    pub outcomes: Vec<EventOutcome>,
}

impl RunSummary {
    /// Summarises outcomes (all of them, none omitted).
    pub fn new(outcomes: &[EventOutcome]) -> Self {
        let succeeded = outcomes.iter().filter(|o| o.succeeded()).count();
        Self {
            events: outcomes.len(),
            succeeded,
            failed: outcomes.len() - succeeded,
            output_bytes: outcomes.iter().map(|o| o.output_bytes).sum(),
            duration: outcomes.iter().map(|o| o.duration).sum(),
            error: None,
            omitted: 0,
            outcomes: outcomes.to_vec(),
        }
    }

    /// A summary for a run that could not start: `events` events, none run.
    pub fn host_error(events: usize, error: &str) -> Self {
        let mut summary = Self::new(&[]);
        summary.events = events;
        summary.omitted = 0;
        summary.error = Some(cut(error, TERMINATION_TEXT_LIMIT * 4));
        summary
    }

    /// The summary as one JSON line (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("summary serialises")
    }

    /// The summary cut to at most `limit` bytes of JSON: counts are always kept; messages and
    /// results are shortened; outcomes are dropped, successes before failures, and counted
    /// in `omitted`. Included outcomes keep event order.
    pub fn to_json_limited(&self, limit: usize) -> String {
        let full = self.to_json();
        if full.len() <= limit {
            return full;
        }
        let mut base = self.clone();
        base.outcomes.clear();
        base.error = base.error.map(|e| cut(&e, TERMINATION_TEXT_LIMIT));
        // Reserve room for the largest possible `omitted` value.
        base.omitted = self.outcomes.len();
        let mut used = base.to_json().len();
        let shortened: Vec<EventOutcome> = self.outcomes.iter().map(shorten).collect();
        let sizes: Vec<usize> = shortened
            .iter()
            .map(|o| serde_json::to_string(o).expect("outcome serialises").len() + 1)
            .collect();
        let mut keep = vec![false; shortened.len()];
        let failures_first = (0..shortened.len())
            .filter(|&i| !shortened[i].succeeded())
            .chain((0..shortened.len()).filter(|&i| shortened[i].succeeded()));
        for index in failures_first {
            if used + sizes[index] <= limit {
                used += sizes[index];
                keep[index] = true;
            }
        }
        base.outcomes = shortened
            .into_iter()
            .zip(&keep)
            .filter_map(|(outcome, &kept)| kept.then_some(outcome))
            .collect();
        base.omitted = self.outcomes.len() - base.outcomes.len();
        base.to_json()
    }

    /// The process exit code for this run, per the documented contract.
    pub fn exit_code(&self) -> u8 {
        if self.error.is_some() {
            EXIT_HOST_ERROR
        } else {
            exit_code(&self.outcomes)
        }
    }
}

/// The process exit code for these outcomes: [`EXIT_HOST_ERROR`] if any event failed for a
/// host reason, else [`EXIT_GUEST_FAILED`] if any failed, else [`EXIT_OK`].
pub fn exit_code(outcomes: &[EventOutcome]) -> u8 {
    if outcomes
        .iter()
        .any(|o| o.error.is_some_and(ErrorKind::is_host))
    {
        EXIT_HOST_ERROR
    } else if outcomes.iter().any(|o| !o.succeeded()) {
        EXIT_GUEST_FAILED
    } else {
        EXIT_OK
    }
}

/// Writes the summary, cut to [`TERMINATION_MESSAGE_LIMIT`] bytes, to `path` (Kubernetes'
/// `/dev/termination-log`).
pub fn write_termination_message(path: &Path, summary: &RunSummary) -> std::io::Result<()> {
    std::fs::write(path, summary.to_json_limited(TERMINATION_MESSAGE_LIMIT))
}

fn shorten(outcome: &EventOutcome) -> EventOutcome {
    let mut outcome = outcome.clone();
    outcome.message = outcome.message.map(|m| cut(&m, TERMINATION_TEXT_LIMIT));
    outcome.result = outcome.result.map(|r| cut(&r, TERMINATION_TEXT_LIMIT));
    outcome
}

/// `text` cut to at most `limit` bytes (on a character boundary), marked with `…` when cut.
fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(id: usize, ok: bool) -> EventOutcome {
        EventOutcome {
            id: format!("event-{id:04}"),
            status: if ok {
                Status::Succeeded
            } else {
                Status::Failed
            },
            exit_code: (!ok).then_some(3),
            error: (!ok).then_some(ErrorKind::Trap),
            message: (!ok).then(|| "x".repeat(1000)),
            duration: Duration::from_micros(1500),
            output_bytes: 10,
            output_truncated: false,
            result: None,
        }
    }

    #[test]
    fn small_summaries_are_complete() {
        let outcomes = vec![outcome(0, true), outcome(1, false)];
        let summary = RunSummary::new(&outcomes);
        let text = summary.to_json_limited(TERMINATION_MESSAGE_LIMIT);
        let back: RunSummary = serde_json::from_str(&text).unwrap();
        assert_eq!((back.events, back.succeeded, back.failed), (2, 1, 1));
        assert_eq!(back.omitted, 0);
        assert_eq!(
            back.outcomes[1].message.as_deref().map(str::len),
            Some(1000)
        );
        assert_eq!(back.duration, Duration::from_micros(3000));
        assert_eq!(summary.exit_code(), EXIT_GUEST_FAILED);
    }

    #[test]
    fn large_summaries_fit_keep_counts_and_prefer_failures() {
        let outcomes: Vec<_> = (0..500).map(|i| outcome(i, i % 100 != 49)).collect();
        let summary = RunSummary::new(&outcomes);
        assert!(summary.to_json().len() > TERMINATION_MESSAGE_LIMIT);
        let text = summary.to_json_limited(TERMINATION_MESSAGE_LIMIT);
        assert!(text.len() <= TERMINATION_MESSAGE_LIMIT, "{}", text.len());
        let back: RunSummary = serde_json::from_str(&text).unwrap();
        assert_eq!((back.events, back.succeeded, back.failed), (500, 495, 5));
        assert_eq!(back.omitted + back.outcomes.len(), 500);
        assert!(back.omitted > 0);
        let failed: Vec<_> = back.outcomes.iter().filter(|o| !o.succeeded()).collect();
        assert_eq!(failed.len(), 5, "every failure is kept");
        assert!(
            failed
                .iter()
                .all(|o| o.message.as_ref().unwrap().len() <= 256)
        );
        let ids: Vec<_> = back.outcomes.iter().map(|o| o.id.clone()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "event order is kept");
    }

    #[test]
    fn host_errors_and_exit_codes() {
        let summary = RunSummary::host_error(3, "cannot read module m.wasm");
        assert_eq!(summary.exit_code(), EXIT_HOST_ERROR);
        assert_eq!(summary.events, 3);
        assert_eq!(exit_code(&[outcome(0, true)]), EXIT_OK);
        let mut host = outcome(1, false);
        host.error = Some(ErrorKind::Host);
        assert_eq!(exit_code(&[outcome(0, false), host]), EXIT_HOST_ERROR);
        assert_eq!(exit_code(&[]), EXIT_OK);
    }

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("short", 10), "short");
        let cutted = cut(&"é".repeat(100), 11);
        assert!(cutted.len() <= 11 && cutted.ends_with('…'), "{cutted}");
    }

    #[test]
    fn exit_codes_match_the_shared_contract() {
        assert_eq!(i32::from(EXIT_OK), exit::OK);
        assert_eq!(i32::from(EXIT_GUEST_FAILED), exit::GUEST_FAILED);
        assert_eq!(i32::from(EXIT_HOST_ERROR), exit::HOST_ERROR);
    }

    #[test]
    fn kind_names_match_json() {
        for kind in [
            ErrorKind::Exit,
            ErrorKind::GuestError,
            ErrorKind::Host,
            ErrorKind::Abi,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn outcome_json_shape() {
        let value = serde_json::to_value(outcome(7, false)).unwrap();
        assert_eq!(value["status"], "failed");
        assert_eq!(value["error"], "trap");
        assert_eq!(value["duration_ms"], 1.5);
        assert!(value.get("result").is_none());
        assert!(value.get("output_truncated").is_none());
    }
}
