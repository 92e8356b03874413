//! The exit-code contract as process exit codes, and the termination-message file.
//!
//! The outcome and summary types, and the termination message's shape, are the shared
//! contract in [`jobico_common::summary`] (re-exported here); the dispatcher reads them
//! through [`jobico_common::summary::final_states`].

use std::path::Path;

use jobico_common::state::exit;
pub use jobico_common::summary::{
    ErrorKind, EventOutcome, RunSummary, Status, TERMINATION_MESSAGE_LIMIT, TerminationMessage,
};

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

/// The process exit code for these outcomes: [`EXIT_HOST_ERROR`] if any event failed for a
/// host reason, else [`EXIT_GUEST_FAILED`] if any failed, else [`EXIT_OK`].
pub fn exit_code(outcomes: &[EventOutcome]) -> u8 {
    process_code(jobico_common::summary::exit_code(outcomes))
}

/// The process exit code of a whole run.
pub fn run_exit_code(summary: &RunSummary) -> u8 {
    process_code(summary.exit_code())
}

fn process_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(EXIT_HOST_ERROR)
}

/// Writes the run's [`TerminationMessage`] (at most [`TERMINATION_MESSAGE_LIMIT`] bytes) to
/// `path` (Kubernetes' `/dev/termination-log`).
pub fn write_termination_message(path: &Path, summary: &RunSummary) -> std::io::Result<()> {
    std::fs::write(path, summary.termination_message().to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_the_shared_contract() {
        assert_eq!(i32::from(EXIT_OK), exit::OK);
        assert_eq!(i32::from(EXIT_GUEST_FAILED), exit::GUEST_FAILED);
        assert_eq!(i32::from(EXIT_HOST_ERROR), exit::HOST_ERROR);
        assert_eq!(exit_code(&[]), EXIT_OK);
    }
}
