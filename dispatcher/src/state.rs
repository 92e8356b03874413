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
        self.add_many(namespace, owner, state, 1);
    }

    /// Counts `events` transitions of events of resource `namespace/owner` into `state`.
    pub fn add_many(&self, namespace: &str, owner: &str, state: EventState, events: u64) {
        let mut map = self.0.lock().expect("counters lock");
        let deltas = map
            .entry((namespace.to_owned(), owner.to_owned()))
            .or_default();
        match state {
            EventState::Dispatched => deltas.dispatched += events,
            EventState::Succeeded => deltas.succeeded += events,
            EventState::Failed | EventState::DeadLettered => deltas.failed += events,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_resource_and_state_and_are_taken_once() {
        let counters = Counters::default();
        counters.add_many("ns", "job", EventState::Dispatched, 100);
        counters.add("ns", "job", EventState::Dispatched);
        counters.add("ns", "job", EventState::DeadLettered);
        counters.add("ns", "other", EventState::Succeeded);
        counters.add("ns", "job", EventState::Running);
        let taken = counters.take();
        assert_eq!(
            taken[&("ns".to_owned(), "job".to_owned())],
            Deltas {
                dispatched: 101,
                succeeded: 0,
                failed: 1
            }
        );
        assert_eq!(
            taken[&("ns".to_owned(), "other".to_owned())],
            Deltas {
                dispatched: 0,
                succeeded: 1,
                failed: 0
            }
        );
        assert!(counters.take().is_empty());
    }
}
