//! A batch of 100 events through one module: the 50th fails, the other 99 succeed.

mod common;

use common::{event, load};
use jobico_common::EventState;
use jobico_common::summary::final_states;
use serde_json::json;
use wasm_exec::{
    Capabilities, EXIT_GUEST_FAILED, ErrorKind, Limits, RunSummary, Status,
    TERMINATION_MESSAGE_LIMIT, TerminationMessage, VecSink,
};

#[test]
fn one_failure_in_a_hundred_is_isolated_and_summarised() {
    let module = load("wasi_modes.wat");
    let events: Vec<_> = (1..=100)
        .map(|i| {
            let data = if i == 50 {
                json!("unreachable")
            } else {
                json!({"n": i})
            };
            event(&format!("event-{i:03}"), data)
        })
        .collect();
    let mut sink = VecSink::new();
    let outcomes: Vec<_> = events
        .iter()
        .map(|e| module.run(e, &Limits::default(), &Capabilities::default(), &mut sink))
        .collect();

    for (i, outcome) in outcomes.iter().enumerate() {
        let n = i + 1;
        assert_eq!(outcome.id, format!("event-{n:03}"));
        if n == 50 {
            assert_eq!(outcome.status, Status::Failed);
            assert_eq!(outcome.error, Some(ErrorKind::Trap));
        } else {
            assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
            let want = format!(r#"{{"n":{n}}}"#);
            assert_eq!(outcome.output_bytes, want.len() as u64 + 1);
        }
    }
    // Each successful event printed exactly its own data, tagged with its id.
    assert_eq!(sink.lines.len(), 99);
    for line in &sink.lines {
        let n: usize = line.event_id["event-".len()..].parse().unwrap();
        assert_eq!(line.text, format!(r#"{{"n":{n}}}"#));
    }

    let summary = RunSummary::new(&outcomes);
    assert_eq!(
        (summary.events, summary.succeeded, summary.failed),
        (100, 99, 1)
    );
    assert_eq!(wasm_exec::run_exit_code(&summary), EXIT_GUEST_FAILED);
    let message = summary.termination_message().to_json();
    assert!(message.len() <= TERMINATION_MESSAGE_LIMIT);
    let cut: TerminationMessage = serde_json::from_str(&message).unwrap();
    assert_eq!((cut.events, cut.succeeded, cut.failed), (100, 99, 1));
    assert_eq!(cut.omitted + cut.outcomes.len(), 100);
    assert!(cut.outcomes.iter().any(|o| o.index == 49
        && o.outcome.id == "event-050"
        && o.outcome.error == Some(ErrorKind::Trap)));
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let finals = final_states(&ids, Some(EXIT_GUEST_FAILED.into()), Some(&message));
    for (i, decided) in finals.iter().enumerate() {
        let want = if i == 49 {
            EventState::Failed
        } else {
            EventState::Succeeded
        };
        assert_eq!(decided.as_ref().map(|d| d.state()), Some(want), "{i}");
    }
}
