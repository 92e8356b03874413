//! Chaining: an event's `then` routes its outcome to other events of the same namespace.
//!
//! Each route names a target event and when it applies ([`RouteWhen`]). The routed event's
//! data is the producing event's result parsed as JSON (or, for a failure, an object
//! describing it), validated against the target's schema like any request; its id is derived
//! from the parent and the route ([`jobico_common::EventId::routed`]). Routes never form a
//! cycle: [`cycles`] finds them across every resource of a namespace, and the shared
//! validation refuses those within one resource.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::EventSpec;

/// Most routes of one event: each may publish an event per run.
pub const MAX_ROUTES: usize = 8;

/// When a route applies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteWhen {
    /// The producing event succeeded (the default).
    #[default]
    Succeeded,
    /// The producing event failed in its module (not a host failure the run is retried for).
    Failed,
    /// Either.
    Always,
}

impl RouteWhen {
    /// Whether the route applies to an event that succeeded (`true`) or failed.
    pub fn applies(self, succeeded: bool) -> bool {
        match self {
            Self::Succeeded => succeeded,
            Self::Failed => !succeeded,
            Self::Always => true,
        }
    }
}

/// One route of an event's `then`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The event of the same namespace that receives the outcome.
    #[schemars(regex(pattern = "^[A-Za-z0-9]{1,10}$"))]
    pub event: String,
    /// When the route applies: `succeeded` (default), `failed` or `always`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub when: RouteWhen,
}

fn is_default(when: &RouteWhen) -> bool {
    *when == RouteWhen::Succeeded
}

/// The routes of `events` (one namespace's) that lie on a cycle, as readable paths
/// (`a → b → a`), one per cycle found, each starting at its smallest event name. Routes to
/// events not among `events` lead nowhere and close no cycle.
pub fn cycles<'a>(events: impl IntoIterator<Item = &'a EventSpec>) -> Vec<String> {
    let graph: BTreeMap<&str, BTreeSet<&str>> = events
        .into_iter()
        .map(|e| {
            (
                e.name.as_str(),
                e.then.iter().map(|r| r.event.as_str()).collect(),
            )
        })
        .collect();
    // Depth-first search with colours; a grey target closes a cycle, reported from the
    // target's position on the path.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<&str, Colour> = graph.keys().map(|&k| (k, Colour::White)).collect();
    let mut found = BTreeSet::new();
    for &start in graph.keys() {
        if colour[start] != Colour::White {
            continue;
        }
        let mut path: Vec<&str> = vec![start];
        let mut stack: Vec<std::collections::btree_set::Iter<'_, &str>> = vec![graph[start].iter()];
        colour.insert(start, Colour::Grey);
        while let Some(next) = stack.last_mut().map(Iterator::next) {
            match next {
                Some(&target) => match colour.get(target).copied() {
                    None | Some(Colour::Black) => {}
                    Some(Colour::Grey) => {
                        let at = path
                            .iter()
                            .position(|&n| n == target)
                            .expect("grey is on the path");
                        let mut cycle: Vec<&str> = path[at..].to_vec();
                        let first = (0..cycle.len())
                            .min_by_key(|&i| cycle[i])
                            .expect("a cycle has an event");
                        cycle.rotate_left(first);
                        let text = cycle
                            .iter()
                            .chain(std::iter::once(&cycle[0]))
                            .copied()
                            .collect::<Vec<_>>()
                            .join(" → ");
                        found.insert(text);
                    }
                    Some(Colour::White) => {
                        colour.insert(target, Colour::Grey);
                        path.push(target);
                        stack.push(graph[target].iter());
                    }
                },
                None => {
                    stack.pop();
                    if let Some(done) = path.pop() {
                        colour.insert(done, Colour::Black);
                    }
                }
            }
        }
    }
    found.into_iter().collect()
}

/// Whether `event` is on one of the `cycles` [`cycles`] reported.
pub fn on_cycle(cycle: &str, event: &str) -> bool {
    cycle.split(" → ").any(|name| name == event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SchemaRef;

    fn event(name: &str, then: &[(&str, RouteWhen)]) -> EventSpec {
        let mut spec: EventSpec = serde_json::from_value(serde_json::json!({
            "name": name, "wasm": "m.wasm", "schema": {"key": "s"}
        }))
        .unwrap();
        spec.schema = SchemaRef {
            key: "s".into(),
            name: None,
            optional: Some(true),
        };
        spec.then = then
            .iter()
            .map(|&(event, when)| Route {
                event: event.into(),
                when,
            })
            .collect();
        spec
    }

    #[test]
    fn routes_read_with_succeeded_as_the_default() {
        let spec: EventSpec = serde_json::from_value(serde_json::json!({
            "name": "order", "wasm": "m.wasm", "schema": {"key": "s"},
            "then": [{"event": "invoice"}, {"event": "alert", "when": "failed"}]
        }))
        .unwrap();
        assert_eq!(spec.then[0].when, RouteWhen::Succeeded);
        assert_eq!(spec.then[1].when, RouteWhen::Failed);
        assert!(RouteWhen::Always.applies(true) && RouteWhen::Always.applies(false));
        assert!(!RouteWhen::Failed.applies(true) && !RouteWhen::Succeeded.applies(false));
        let back = serde_json::to_value(&spec.then).unwrap();
        assert_eq!(
            back,
            serde_json::json!([{"event": "invoice"}, {"event": "alert", "when": "failed"}])
        );
    }

    #[test]
    fn chains_and_diamonds_have_no_cycle_but_loops_do() {
        use RouteWhen::*;
        let chain = [
            event("a", &[("b", Succeeded), ("c", Failed)]),
            event("b", &[("c", Always)]),
            event("c", &[("elsewhere", Succeeded)]),
        ];
        assert!(cycles(&chain).is_empty());
        let looped = [
            event("order", &[("invoice", Succeeded)]),
            event("invoice", &[("alert", Failed)]),
            event("alert", &[("order", Always)]),
            event("self", &[("self", Succeeded)]),
            event("free", &[("order", Succeeded)]),
        ];
        let found = cycles(&looped);
        assert_eq!(found, ["alert → order → invoice → alert", "self → self"]);
        assert!(on_cycle(&found[0], "invoice") && !on_cycle(&found[0], "free"));
    }
}
