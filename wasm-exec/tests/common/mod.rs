//! Helpers shared by the integration tests: fixtures, a runtime, one-event runs.

#![allow(dead_code)]

use std::path::PathBuf;

use jobico_common::ExecEvent;
use serde_json::Value;
use wasm_exec::{Capabilities, EventOutcome, Limits, Module, Runtime, RuntimeConfig, VecSink};

/// Path of a fixture under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A runtime with the default configuration.
pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime")
}

/// Loads a fixture in a fresh runtime.
pub fn load(name: &str) -> Module {
    runtime().load_file(fixture(name)).expect("fixture loads")
}

/// An event.
pub fn event(id: &str, data: Value) -> ExecEvent {
    ExecEvent {
        id: id.to_owned(),
        data,
    }
}

/// Runs one event with `limits` and no capabilities.
pub fn run_with(module: &Module, data: Value, limits: &Limits) -> (EventOutcome, VecSink) {
    let mut sink = VecSink::new();
    let outcome = module.run(
        &event("e1", data),
        limits,
        &Capabilities::default(),
        &mut sink,
    );
    (outcome, sink)
}

/// Runs one event with default limits and no capabilities.
pub fn run(module: &Module, data: Value) -> (EventOutcome, VecSink) {
    run_with(module, data, &Limits::default())
}
