//! The executor's run summary, its termination message, and how an event's final state is
//! decided from them.
//!
//! `wasm-exec` prints the full [`RunSummary`] (every [`EventOutcome`]) as the last stdout line
//! and writes a [`TerminationMessage`] of at most [`TERMINATION_MESSAGE_LIMIT`] bytes to the
//! container's termination message, which is all the dispatcher sees of a run:
//!
//! ```json
//! {"events":3,"succeeded":2,"failed":1,"output_bytes":21,"duration_ms":1.2,
//!  "batch":"5d1c0e9f2a7b3c48","states":"sts","omitted":2,
//!  "outcomes":[{"index":1,"id":"b","status":"failed","error":"trap","message":"...",
//!               "duration_ms":0.1,"output_bytes":0}]}
//! ```
//!
//! The invariant: the message never loses what decides an event's final state. `states` holds
//! one character per event in batch order (`s` succeeded, else the failure's kind, see
//! [`Ending`]), and `batch` a digest of the batch's ids in order, so the dispatcher can map the
//! characters to its own ids and knows when it may not. Only the per-event details
//! (`outcomes`, each naming its `index` in the batch) are cut to fit: failures first, then
//! successes, in event order. [`final_states`] is the one reading of the message, used by the
//! dispatcher's tracker and by local mode alike.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::state::{EventState, exit};

/// Kubernetes reads at most 4096 bytes of a container's termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Longest `message` or `result` kept per outcome in the termination message, so that one
/// verbose failure cannot crowd out the others.
const TERMINATION_TEXT_LIMIT: usize = 256;

/// Longest run-level `error` in a summary: room for a module path and a compiler's reason.
const ERROR_TEXT_LIMIT: usize = TERMINATION_TEXT_LIMIT * 4;

/// Hex digits of the batch digest: 64 bits tell two id lists apart far beyond any chance
/// collision, in 16 bytes of the message.
const BATCH_DIGEST_HEX: usize = 16;

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
    /// The Kubernetes Job failed (its deadline, every pod retry a host failure, an evicted or
    /// killed pod) before the executor reported the event: final, reported by the dispatcher.
    Job,
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ErrorKind; 9] = [
        Self::Exit,
        Self::Trap,
        Self::Deadline,
        Self::Memory,
        Self::Fuel,
        Self::GuestError,
        Self::Abi,
        Self::Host,
        Self::Job,
    ];

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
            Self::Job => "job",
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
    /// Something the host tolerated without failing the event (a jobicolet `free` that
    /// trapped after the result was written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
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

    /// How the event ended, in one of [`TerminationMessage::states`]' characters.
    pub fn ending(&self) -> Ending {
        match self.status {
            Status::Succeeded => Ending::Succeeded,
            // A failure without a kind is not produced by wasm-exec; call it the guest's.
            Status::Failed => Ending::Failed(self.error.unwrap_or(ErrorKind::Trap)),
        }
    }

    /// The outcome with `message`, `warning` and `result` cut to `limit` bytes.
    fn shortened(&self, limit: usize) -> Self {
        let mut outcome = self.clone();
        outcome.message = outcome.message.map(|m| cut(&m, limit));
        outcome.warning = outcome.warning.map(|w| cut(&w, limit));
        outcome.result = outcome.result.map(|r| cut(&r, limit));
        outcome
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
        Ok(Duration::try_from_secs_f64(millis.max(0.0) / 1000.0).unwrap_or(Duration::MAX))
    }
}

/// The summary of a whole run: what `wasm-exec` prints as its last stdout line.
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
    /// Outcomes left out of `outcomes` (always 0 in the full summary).
    pub omitted: usize,
    /// Per-event outcomes, in event order.
    pub outcomes: Vec<EventOutcome>,
    /// How the module was made ready to run, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleLoad>,
}

/// Where the executor's compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleSource {
    /// The dispatcher's artifact, fetched and verified.
    Artifact,
    /// The executor's own verified cache directory.
    Cache,
    /// Compiled from the WebAssembly in this process.
    Compiled,
    /// An operator's `--trust-precompiled` file.
    Precompiled,
}

/// How the module was made ready: from where, how long it took, and why not from the
/// artifact when the Job named one that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleLoad {
    /// Where the code came from.
    pub source: ModuleSource,
    /// Milliseconds from reading the module to having it ready.
    pub millis: u64,
    /// Why the artifact the Job named was not used, if it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_refused: Option<String>,
}

impl ModuleLoad {
    /// A load from `source` that began at `started` and has just ended.
    pub fn since(source: ModuleSource, started: std::time::Instant) -> Self {
        Self {
            source,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            artifact_refused: None,
        }
    }
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
            module: None,
        }
    }

    /// A summary for a run that could not start: `events` events, none run.
    pub fn host_error(events: usize, error: &str) -> Self {
        let mut summary = Self::new(&[]);
        summary.events = events;
        summary.error = Some(cut(error, ERROR_TEXT_LIMIT));
        summary
    }

    /// The summary as one JSON line (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a summary serialises")
    }

    /// The executor's exit code for this run (see [`exit`]).
    pub fn exit_code(&self) -> i32 {
        if self.error.is_some() {
            exit::HOST_ERROR
        } else {
            exit_code(&self.outcomes)
        }
    }

    /// The termination message for this run, at most [`TERMINATION_MESSAGE_LIMIT`] bytes.
    pub fn termination_message(&self) -> TerminationMessage {
        TerminationMessage::fitted(self, TERMINATION_MESSAGE_LIMIT)
    }
}

/// The executor's exit code for these outcomes: [`exit::HOST_ERROR`] if any event failed for a
/// host reason, else [`exit::GUEST_FAILED`] if any failed, else [`exit::OK`].
pub fn exit_code(outcomes: &[EventOutcome]) -> i32 {
    if outcomes
        .iter()
        .any(|o| o.error.is_some_and(ErrorKind::is_host))
    {
        exit::HOST_ERROR
    } else if outcomes.iter().any(|o| !o.succeeded()) {
        exit::GUEST_FAILED
    } else {
        exit::OK
    }
}

/// How one event ended: one character of [`TerminationMessage::states`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `s`.
    Succeeded,
    /// The kind's letter: `x` exit, `t` trap, `d` deadline, `m` memory, `f` fuel,
    /// `g` guest-error, `a` abi, `h` host, `j` job.
    Failed(ErrorKind),
}

impl Ending {
    /// The character standing for this ending.
    pub fn code(self) -> char {
        match self {
            Self::Succeeded => 's',
            Self::Failed(kind) => match kind {
                ErrorKind::Exit => 'x',
                ErrorKind::Trap => 't',
                ErrorKind::Deadline => 'd',
                ErrorKind::Memory => 'm',
                ErrorKind::Fuel => 'f',
                ErrorKind::GuestError => 'g',
                ErrorKind::Abi => 'a',
                ErrorKind::Host => 'h',
                ErrorKind::Job => 'j',
            },
        }
    }

    /// The ending a character stands for.
    pub fn from_code(code: char) -> Option<Self> {
        if code == 's' {
            return Some(Self::Succeeded);
        }
        ErrorKind::ALL
            .into_iter()
            .map(Self::Failed)
            .find(|ending| ending.code() == code)
    }
}

/// Every event's [`Ending`] in batch order, written as a string of their characters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct States(pub Vec<Ending>);

impl Serialize for States {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.iter().map(|e| e.code()).collect::<String>())
    }
}

impl<'de> Deserialize<'de> for States {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.chars()
            .map(|c| {
                Ending::from_code(c)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown event state {c:?}")))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// An outcome kept in the termination message, with the event's position in the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedOutcome {
    /// The event's index in the batch (the order of the executor's input); `usize::MAX` in
    /// messages of older executors, which did not say.
    #[serde(default = "unknown_index")]
    pub index: usize,
    /// The outcome, `message` and `result` possibly shortened.
    #[serde(flatten)]
    pub outcome: EventOutcome,
}

fn unknown_index() -> usize {
    usize::MAX
}

/// What `wasm-exec` writes as the container's termination message: the run's counts, every
/// event's ending, and as many outcomes as fit in [`TERMINATION_MESSAGE_LIMIT`] bytes.
///
/// It parses as a [`RunSummary`] too (`outcomes` then lacks the omitted ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminationMessage {
    /// Number of events given.
    #[serde(default)]
    pub events: usize,
    /// Events that succeeded.
    #[serde(default)]
    pub succeeded: usize,
    /// Events that failed.
    #[serde(default)]
    pub failed: usize,
    /// Total guest output in bytes.
    #[serde(default)]
    pub output_bytes: u64,
    /// Total wall time of the events.
    #[serde(default, rename = "duration_ms", with = "millis")]
    pub duration: Duration,
    /// Why the run could not start, if so (then neither `batch` nor `states` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// [`batch_digest`] of the ids the run was given, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Every event's ending, in batch order. Left out only when even one character per event
    /// does not fit (about 3,900 events; a Jobico batch has at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub states: Option<States>,
    /// Outcomes not listed in `outcomes`.
    #[serde(default)]
    pub omitted: usize,
    /// Outcomes that fit, in event order: failures are kept before successes.
    #[serde(default)]
    pub outcomes: Vec<ListedOutcome>,
    /// How the module was made ready to run, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleLoad>,
}

/// The digest of a batch's ids, in order: the first 16 hex digits of SHA-256 over each id's
/// length (8 bytes, little endian) and bytes.
pub fn batch_digest<S: AsRef<str>>(ids: &[S]) -> String {
    let mut hasher = Sha256::new();
    for id in ids {
        let id = id.as_ref().as_bytes();
        hasher.update((id.len() as u64).to_le_bytes());
        hasher.update(id);
    }
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(BATCH_DIGEST_HEX);
    for byte in &digest[..BATCH_DIGEST_HEX / 2] {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

impl TerminationMessage {
    /// The message for `summary` in at most `limit` bytes of JSON (given `limit` ≥ about 200):
    /// counts always; `batch` and `states` whenever events ran and they fit; then the
    /// outcomes, whole if all fit, else shortened and chosen failures first.
    pub fn fitted(summary: &RunSummary, limit: usize) -> Self {
        let ran = summary.error.is_none();
        let mut message = Self {
            events: summary.events,
            succeeded: summary.succeeded,
            failed: summary.failed,
            output_bytes: summary.output_bytes,
            duration: summary.duration,
            error: summary.error.clone(),
            batch: ran.then(|| {
                let ids: Vec<&str> = summary.outcomes.iter().map(|o| o.id.as_str()).collect();
                batch_digest(&ids)
            }),
            states: ran.then(|| States(summary.outcomes.iter().map(|o| o.ending()).collect())),
            omitted: summary.outcomes.len(),
            outcomes: Vec::new(),
            module: summary.module.clone(),
        };
        let listed: Vec<ListedOutcome> = summary
            .outcomes
            .iter()
            .enumerate()
            .map(|(index, outcome)| ListedOutcome {
                index,
                outcome: outcome.clone(),
            })
            .collect();
        let mut whole = message.clone();
        whole.outcomes = listed.clone();
        whole.omitted = 0;
        if whole.len() <= limit {
            return whole;
        }
        message.error = message.error.map(|e| cut(&e, TERMINATION_TEXT_LIMIT));
        if message.len() > limit {
            message.batch = None;
            message.states = None;
        }
        let shortened: Vec<ListedOutcome> = listed
            .into_iter()
            .map(|l| ListedOutcome {
                index: l.index,
                outcome: l.outcome.shortened(TERMINATION_TEXT_LIMIT),
            })
            .collect();
        // Each listed outcome adds its JSON and a comma.
        let mut used = message.len();
        let mut keep = vec![false; shortened.len()];
        let failures_first = (0..shortened.len())
            .filter(|&i| !shortened[i].outcome.succeeded())
            .chain((0..shortened.len()).filter(|&i| shortened[i].outcome.succeeded()));
        for index in failures_first {
            let size = serde_json::to_string(&shortened[index])
                .expect("an outcome serialises")
                .len()
                + 1;
            if used + size <= limit {
                used += size;
                keep[index] = true;
            }
        }
        message.outcomes = shortened
            .into_iter()
            .zip(&keep)
            .filter_map(|(outcome, &kept)| kept.then_some(outcome))
            .collect();
        message.omitted = summary.outcomes.len() - message.outcomes.len();
        message
    }

    /// The message as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a termination message serialises")
    }

    /// Bytes of JSON, counting `omitted` at its widest (the number of outcomes could only
    /// shrink it).
    fn len(&self) -> usize {
        let mut widest = self.clone();
        widest.omitted = widest.omitted.max(widest.events).max(self.outcomes.len());
        widest.to_json().len()
    }
}

/// An event's final state as the executor reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalState {
    /// Succeeded or failed.
    pub status: Status,
    /// Why it failed.
    pub error: Option<ErrorKind>,
    /// The event's outcome, when the message kept it.
    pub outcome: Option<EventOutcome>,
}

impl FinalState {
    /// The event state to record.
    pub fn state(&self) -> EventState {
        match self.status {
            Status::Succeeded => EventState::Succeeded,
            Status::Failed => EventState::Failed,
        }
    }

    /// Why the event failed: the outcome's message, else the failure's kind.
    pub fn reason(&self) -> Option<String> {
        if self.status == Status::Succeeded {
            return None;
        }
        self.outcome
            .as_ref()
            .and_then(|o| o.message.clone())
            .or_else(|| self.error.map(|k| k.as_str().to_owned()))
    }

    fn from_outcome(outcome: &EventOutcome) -> Self {
        Self {
            status: outcome.status,
            error: outcome.error,
            outcome: Some(outcome.clone()),
        }
    }
}

/// The final state of each event of a batch from how its executor ended: `ids` in batch
/// order, the executor's exit code and termination message when it terminated. `None` for an
/// event means this run does not say (no usable message, a host error the Job may retry, a
/// message about another batch): leave it to the Job's own end.
///
/// In order: a message with `states` for exactly these `ids` decides every event; without
/// them, outcomes listed under an event's id decide it; otherwise exit code 0 means every
/// event succeeded, and any other code decides nothing.
pub fn final_states(
    ids: &[&str],
    exit_code: Option<i32>,
    termination_message: Option<&str>,
) -> Vec<Option<FinalState>> {
    let message: Option<TerminationMessage> =
        termination_message.and_then(|text| serde_json::from_str(text).ok());
    // A run that ended in a host error (it could not start, or its outcomes could not be
    // handed on for their routes) decides nothing, whatever it lists: the Job runs it again.
    if message.as_ref().is_some_and(|m| m.error.is_some()) {
        return vec![None; ids.len()];
    }
    let states = message.as_ref().and_then(|m| {
        let states = m.states.as_ref()?;
        (states.0.len() == ids.len() && m.batch.as_deref() == Some(&*batch_digest(ids)))
            .then_some(states)
    });
    let by_index = |index: usize| {
        message.as_ref().and_then(|m| {
            m.outcomes
                .iter()
                .find(|l| l.index == index && l.outcome.id == ids[index])
        })
    };
    let by_id = |id: &str| {
        message
            .as_ref()
            .and_then(|m| m.outcomes.iter().find(|l| l.outcome.id == id))
    };
    (0..ids.len())
        .map(|index| {
            if let Some(states) = states {
                let (status, error) = match states.0[index] {
                    Ending::Succeeded => (Status::Succeeded, None),
                    Ending::Failed(kind) => (Status::Failed, Some(kind)),
                };
                return Some(FinalState {
                    status,
                    error,
                    outcome: by_index(index).map(|l| l.outcome.clone()),
                });
            }
            if let Some(listed) = by_id(ids[index]) {
                return Some(FinalState::from_outcome(&listed.outcome));
            }
            (exit_code == Some(exit::OK)).then_some(FinalState {
                status: Status::Succeeded,
                error: None,
                outcome: None,
            })
        })
        .collect()
}

/// `text` cut to at most `limit` bytes (on a character boundary), marked with `…` when cut.
pub fn cut(text: &str, limit: usize) -> String {
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

    fn outcome(id: &str, ok: bool) -> EventOutcome {
        EventOutcome {
            id: id.to_owned(),
            status: if ok {
                Status::Succeeded
            } else {
                Status::Failed
            },
            exit_code: (!ok).then_some(3),
            error: (!ok).then_some(ErrorKind::Trap),
            message: (!ok).then(|| "x".repeat(1000)),
            warning: None,
            duration: Duration::from_micros(1500),
            output_bytes: 10,
            output_truncated: false,
            result: ok.then(|| "r".repeat(300)),
        }
    }

    /// An id of the longest length allowed, unique per index.
    fn long_id(index: usize) -> String {
        format!("{index:03}-{}", "i".repeat(59))
    }

    fn ids(outcomes: &[EventOutcome]) -> Vec<&str> {
        outcomes.iter().map(|o| o.id.as_str()).collect()
    }

    fn states_of(finals: &[Option<FinalState>]) -> Vec<Option<EventState>> {
        finals
            .iter()
            .map(|f| f.as_ref().map(FinalState::state))
            .collect()
    }

    #[test]
    fn small_runs_keep_every_outcome_whole() {
        let outcomes = vec![outcome("a", true), outcome("b", false)];
        let summary = RunSummary::new(&outcomes);
        let text = summary.termination_message().to_json();
        let back: TerminationMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (back.events, back.succeeded, back.failed, back.omitted),
            (2, 1, 1, 0)
        );
        assert_eq!(back.outcomes[1].outcome, outcomes[1]);
        assert_eq!(
            back.states.unwrap().0,
            [Ending::Succeeded, Ending::Failed(ErrorKind::Trap)]
        );
        assert_eq!(summary.exit_code(), exit::GUEST_FAILED);
        // Readers of the old shape still parse it.
        let old: RunSummary = serde_json::from_str(&text).unwrap();
        assert_eq!(old.outcomes, outcomes);
    }

    #[test]
    fn a_full_batch_with_long_ids_fits_and_decides_every_event() {
        // 100 events (the largest batch), 63-character ids, every other one failing with a
        // long message: far over 4 KiB in full.
        let outcomes: Vec<_> = (0..100).map(|i| outcome(&long_id(i), i % 2 == 0)).collect();
        let summary = RunSummary::new(&outcomes);
        assert!(summary.to_json().len() > 10 * TERMINATION_MESSAGE_LIMIT);
        let text = summary.termination_message().to_json();
        assert!(text.len() <= TERMINATION_MESSAGE_LIMIT, "{}", text.len());
        let finals = final_states(&ids(&outcomes), Some(exit::GUEST_FAILED), Some(&text));
        let want: Vec<_> = (0..100)
            .map(|i| {
                Some(if i % 2 == 0 {
                    EventState::Succeeded
                } else {
                    EventState::Failed
                })
            })
            .collect();
        assert_eq!(states_of(&finals), want);
        // Failures are listed first, shortened, with their index.
        let back: TerminationMessage = serde_json::from_str(&text).unwrap();
        assert!(!back.outcomes.is_empty());
        assert!(back.outcomes.iter().all(|l| !l.outcome.succeeded()
            && l.outcome.message.as_ref().unwrap().len() <= TERMINATION_TEXT_LIMIT
            && l.outcome.id == long_id(l.index)));
        assert_eq!(back.omitted + back.outcomes.len(), 100);
        // Unlisted failures still carry their kind, as the reason.
        assert!(finals.iter().all(|f| {
            let f = f.as_ref().unwrap();
            f.status == Status::Succeeded || f.reason().is_some()
        }));
    }

    #[test]
    fn one_failure_in_a_hundred_leaves_ninety_nine_succeeded() {
        let outcomes: Vec<_> = (0..100).map(|i| outcome(&long_id(i), i != 42)).collect();
        let text = RunSummary::new(&outcomes).termination_message().to_json();
        assert!(text.len() <= TERMINATION_MESSAGE_LIMIT);
        let finals = final_states(&ids(&outcomes), Some(exit::GUEST_FAILED), Some(&text));
        let states = states_of(&finals);
        assert_eq!(
            states
                .iter()
                .filter(|s| **s == Some(EventState::Succeeded))
                .count(),
            99
        );
        assert_eq!(states[42], Some(EventState::Failed));
        let failed = finals[42].as_ref().unwrap();
        assert_eq!(
            failed.outcome.as_ref().unwrap().id,
            long_id(42),
            "the failure is listed"
        );
        assert!(failed.reason().unwrap().starts_with("xxx"));
    }

    #[test]
    fn the_index_mapping_is_used_only_for_the_same_batch() {
        let outcomes = vec![outcome("a", true), outcome("b", false), outcome("c", true)];
        let mut text = RunSummary::new(&outcomes).termination_message();
        // Force the compact form: no outcome listed.
        text.outcomes.clear();
        text.omitted = 3;
        let text = text.to_json();
        let same = final_states(&["a", "b", "c"], Some(1), Some(&text));
        assert_eq!(
            states_of(&same),
            [
                Some(EventState::Succeeded),
                Some(EventState::Failed),
                Some(EventState::Succeeded)
            ]
        );
        assert_eq!(same[1].as_ref().unwrap().reason().as_deref(), Some("trap"));
        // Another order, or other ids: the characters cannot be attributed.
        for other in [["b", "a", "c"], ["a", "b", "d"]] {
            assert_eq!(
                states_of(&final_states(&other, Some(1), Some(&text))),
                [None, None, None]
            );
        }
    }

    #[test]
    fn without_states_listed_outcomes_and_exit_zero_decide() {
        // The shape of older executors: a cut RunSummary (here without its totals).
        let old = r#"{"events":3,"succeeded":1,"failed":1,"omitted":1,
            "outcomes":[{"id":"a1","status":"succeeded","duration_ms":1.0,"output_bytes":3},
            {"id":"b2","status":"failed","error":"trap","message":"unreachable","duration_ms":1.0,"output_bytes":0}]}"#;
        let ids = ["a1", "b2", "c3"];
        let finals = final_states(&ids, Some(exit::GUEST_FAILED), Some(old));
        assert_eq!(
            states_of(&finals),
            [Some(EventState::Succeeded), Some(EventState::Failed), None]
        );
        assert_eq!(
            finals[1].as_ref().unwrap().reason().as_deref(),
            Some("unreachable")
        );
        let cases: [(Option<i32>, Option<&str>, Option<EventState>); 6] = [
            (Some(exit::OK), None, Some(EventState::Succeeded)),
            (
                Some(exit::OK),
                Some("not json"),
                Some(EventState::Succeeded),
            ),
            (Some(exit::GUEST_FAILED), None, None),
            (
                Some(exit::HOST_ERROR),
                Some(r#"{"error":"cannot load"}"#),
                None,
            ),
            (Some(137), None, None),
            (None, None, None),
        ];
        for (code, message, want) in cases {
            assert_eq!(
                states_of(&final_states(&ids, code, message)),
                [want; 3],
                "{code:?} {message:?}"
            );
        }
    }

    #[test]
    fn a_run_that_could_not_start_decides_nothing() {
        let summary = RunSummary::host_error(2, "cannot load module m.wasm");
        let text = summary.termination_message().to_json();
        let back: TerminationMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.error.as_deref(),
            Some("cannot load module m.wasm"),
            "kept whole"
        );
        let summary = RunSummary::host_error(2, &"e".repeat(5000));
        assert_eq!(summary.exit_code(), exit::HOST_ERROR);
        let text = summary.termination_message().to_json();
        assert!(text.len() <= TERMINATION_MESSAGE_LIMIT);
        let back: TerminationMessage = serde_json::from_str(&text).unwrap();
        assert!(back.states.is_none() && back.batch.is_none());
        assert!(back.error.unwrap().len() <= ERROR_TEXT_LIMIT);
        assert_eq!(
            states_of(&final_states(&["a", "b"], Some(2), Some(&text))),
            [None, None]
        );
    }

    #[test]
    fn very_large_runs_drop_the_states_but_stay_within_the_limit() {
        let outcomes: Vec<_> = (0..5000).map(|i| outcome(&format!("e{i}"), true)).collect();
        let message = RunSummary::new(&outcomes).termination_message();
        assert!(message.to_json().len() <= TERMINATION_MESSAGE_LIMIT);
        assert!(message.states.is_none());
        let ids = ids(&outcomes);
        // Exit code 0 still decides them all.
        let finals = final_states(&ids, Some(exit::OK), Some(&message.to_json()));
        assert!(
            finals
                .iter()
                .all(|f| f.as_ref().map(FinalState::state) == Some(EventState::Succeeded))
        );
    }

    #[test]
    fn endings_round_trip_and_unknown_codes_are_refused() {
        let all: Vec<Ending> = std::iter::once(Ending::Succeeded)
            .chain(ErrorKind::ALL.into_iter().map(Ending::Failed))
            .collect();
        let text = serde_json::to_string(&States(all.clone())).unwrap();
        assert_eq!(text, "\"sxtdmfgahj\"");
        assert_eq!(serde_json::from_str::<States>(&text).unwrap().0, all);
        assert!(serde_json::from_str::<States>("\"sz\"").is_err());
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(exit_code(&[outcome("a", true)]), exit::OK);
        let mut host = outcome("h", false);
        host.error = Some(ErrorKind::Host);
        assert_eq!(exit_code(&[outcome("a", false), host]), exit::HOST_ERROR);
        assert_eq!(exit_code(&[]), exit::OK);
    }

    #[test]
    fn kind_names_match_json() {
        for kind in ErrorKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn outcome_json_shape() {
        let value = serde_json::to_value(outcome("e", false)).unwrap();
        assert_eq!(value["status"], "failed");
        assert_eq!(value["error"], "trap");
        assert_eq!(value["duration_ms"], 1.5);
        assert!(value.get("result").is_none());
        assert!(value.get("warning").is_none());
        assert!(value.get("output_truncated").is_none());
    }

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("short", 10), "short");
        let cutted = cut(&"é".repeat(100), 11);
        assert!(cutted.len() <= 11 && cutted.ends_with('…'), "{cutted}");
    }
}
