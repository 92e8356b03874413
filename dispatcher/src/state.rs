//! Event states as the dispatcher uses them: the shared [`jobico_store`] records (re-exported
//! here) and the per-resource counters folded into each resource's status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jobico_common::EventState;
pub use jobico_store::{
    Advanced, BucketSettings, Claim, StateError, StateStore, age, now, rank, status,
};

/// Counts of state transitions per resource (`namespace`, `name`) not yet written to its
/// status; the controller folds them into `status.dispatched/succeeded/failed`.
#[derive(Debug, Clone, Default)]
pub struct Counters(Arc<Mutex<HashMap<(String, String), Deltas>>>);

/// Transitions counted for one resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deltas {
    /// Events newly dispatched.
    pub dispatched: u64,
    /// Events newly succeeded.
    pub succeeded: u64,
    /// Events newly failed or dead-lettered.
    pub failed: u64,
}

impl Counters {
    /// Counts one transition of an event of resource `namespace/owner` into `state`.
    pub fn add(&self, namespace: &str, owner: &str, state: EventState) {
        let mut map = self.0.lock().expect("counters lock");
        let deltas = map
            .entry((namespace.to_owned(), owner.to_owned()))
            .or_default();
        match state {
            EventState::Dispatched => deltas.dispatched += 1,
            EventState::Succeeded => deltas.succeeded += 1,
            EventState::Failed | EventState::DeadLettered => deltas.failed += 1,
            EventState::Accepted | EventState::Held | EventState::Running => {}
        }
    }

    /// Takes every pending count, leaving none.
    pub fn take(&self) -> HashMap<(String, String), Deltas> {
        std::mem::take(&mut *self.0.lock().expect("counters lock"))
    }

    /// Puts back counts that could not be written.
    pub fn restore(&self, key: (String, String), deltas: Deltas) {
        let mut map = self.0.lock().expect("counters lock");
        let entry = map.entry(key).or_default();
        entry.dispatched += deltas.dispatched;
        entry.succeeded += deltas.succeeded;
        entry.failed += deltas.failed;
    }
}
