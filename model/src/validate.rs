//! Checks on a `Job` resource beyond what the CRD schema enforces.
//!
//! In a cluster the API server applies the CRD's OpenAPI schema; local mode has no API server and
//! the controller must not trust objects written before a schema change, so both run these checks.

use std::collections::HashSet;

use jobico_common::envelope::{MAX_ARG_STRLEN, MAX_EVENTS_BYTES};
use jobico_common::executor::MAX_GUEST_ENV_BYTES;

use crate::crd::{Job, MAX_BATCH_EVENTS, MAX_ENV_FROM, MAX_ENV_VARS, MAX_EVENTS_PER_JOB};
use crate::env::SourceKind;

/// Everything wrong with one `Job` resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Job {namespace}/{name}: {}", problems.join("; "))]
pub struct InvalidJob {
    /// Namespace of the resource.
    pub namespace: String,
    /// Name of the resource.
    pub name: String,
    /// One line per problem, naming the field.
    pub problems: Vec<String>,
}

fn is_event_name(name: &str) -> bool {
    (1..=10).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_module_file(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `name` can name a ConfigMap or Secret (a DNS subdomain).
fn is_object_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

/// Whether `key` can be a key of a ConfigMap or Secret.
fn is_data_key(key: &str) -> bool {
    is_module_file(key)
}

/// What is wrong with the `env` and `envFrom` of `event` (at `at`): each entry is one value or
/// one reference, to an object and key that can exist.
fn env_problems(at: &str, event: &crate::EventSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let mut selector = |field: String, name: &str, key: Option<&str>| {
        if !is_object_name(name) {
            problems.push(format!(
                "{field}.name: {name:?} is not a ConfigMap or Secret name (lowercase letters, digits, '-' and '.')"
            ));
        }
        if let Some(key) = key.filter(|k| !is_data_key(k)) {
            problems.push(format!(
                "{field}.key: {key:?} is not a valid key (letters, digits, '-', '.' and '_')"
            ));
        }
    };
    let mut shape = Vec::new();
    if event.env.len() > MAX_ENV_VARS {
        shape.push(format!(
            "{at}.env: at most {MAX_ENV_VARS} entries are allowed, found {}",
            event.env.len()
        ));
    }
    if event.env_from.len() > MAX_ENV_FROM {
        shape.push(format!(
            "{at}.envFrom: at most {MAX_ENV_FROM} entries are allowed, found {}",
            event.env_from.len()
        ));
    }
    for (j, var) in event.env.iter().enumerate() {
        let field = format!("{at}.env[{j}]");
        if !is_env_name(&var.name) {
            shape.push(format!(
                "{field}.name: {:?} is not a valid variable name",
                var.name
            ));
        }
        let Some(from) = &var.value_from else {
            continue;
        };
        if var.value.is_some() {
            shape.push(format!("{field}: value and valueFrom exclude each other"));
        }
        match from.selected() {
            Some((kind, r)) => {
                let which = match kind {
                    SourceKind::ConfigMap => "configMapKeyRef",
                    SourceKind::Secret => "secretKeyRef",
                };
                selector(format!("{field}.valueFrom.{which}"), &r.name, Some(&r.key));
            }
            None => shape.push(format!(
                "{field}.valueFrom: must name exactly one of configMapKeyRef and secretKeyRef"
            )),
        }
    }
    // Written-out values are known here: the same bounds as resolved ones (see
    // `env::resolve`), so a resource whose values cannot fit is refused wherever it is read.
    let mut written = 0;
    for (j, var) in event.env.iter().enumerate() {
        let Some(value) = var.value.as_deref() else {
            continue;
        };
        let bytes = crate::env::exec_bytes(&var.name, value);
        written += bytes;
        if bytes - 8 > MAX_ARG_STRLEN {
            shape.push(format!(
                "{at}.env[{j}].value: takes {} bytes as a variable, more than the {MAX_ARG_STRLEN} Linux takes in one",
                bytes - 8
            ));
        }
    }
    if written > MAX_GUEST_ENV_BYTES {
        shape.push(format!(
            "{at}.env: the values take {written} bytes as variables, more than the {MAX_GUEST_ENV_BYTES} a Job leaves the module's variables"
        ));
    }
    for (j, from) in event.env_from.iter().enumerate() {
        let field = format!("{at}.envFrom[{j}]");
        if let Some(prefix) = from.prefix.as_deref().filter(|p| !is_env_name(p)) {
            shape.push(format!(
                "{field}.prefix: {prefix:?} does not begin a valid variable name"
            ));
        }
        match from.selected() {
            Some((kind, r)) => {
                let which = match kind {
                    SourceKind::ConfigMap => "configMapRef",
                    SourceKind::Secret => "secretRef",
                };
                selector(format!("{field}.{which}"), &r.name, None);
            }
            None => shape.push(format!(
                "{field}: must name exactly one of configMapRef and secretRef"
            )),
        }
    }
    shape.extend(problems);
    shape
}

/// Longest resource name: the name is the value of the `jobico.coeux.dev/job` label on every
/// Kubernetes Job, and label values are at most 63 characters.
pub const MAX_NAME_LEN: usize = 63;

fn route_problems(at: &str, event: &crate::EventSpec) -> Vec<String> {
    let mut problems = Vec::new();
    if event.then.len() > crate::routes::MAX_ROUTES {
        problems.push(format!(
            "{at}.then: at most {} routes are allowed, found {}",
            crate::routes::MAX_ROUTES,
            event.then.len()
        ));
    }
    let mut seen = HashSet::new();
    for (j, route) in event.then.iter().enumerate() {
        if !is_event_name(&route.event) {
            problems.push(format!(
                "{at}.then[{j}].event: {:?} must be 1 to 10 ASCII letters or digits",
                route.event
            ));
        } else if !seen.insert((route.event.as_str(), route.when)) {
            problems.push(format!(
                "{at}.then[{j}]: a route to {:?} when {} is declared twice",
                route.event,
                serde_json::to_value(route.when).expect("a route condition serialises")
            ));
        }
    }
    problems
}

/// Checks one resource; returns every problem found, not just the first. The ingress, the
/// dispatcher and local mode all use this one check, so an event one of them refuses is never
/// accepted by another.
pub fn validate_job(job: &Job) -> Result<(), InvalidJob> {
    let mut problems = Vec::new();
    let name = job.metadata.name.as_deref().unwrap_or_default();
    if name.len() > MAX_NAME_LEN {
        problems.push(format!(
            "metadata.name: must be at most {MAX_NAME_LEN} characters (it labels the Kubernetes Jobs), found {}",
            name.len()
        ));
    }
    let events = &job.spec.events;
    if events.is_empty() {
        problems.push("spec.events: at least one event is required".to_string());
    }
    if events.len() > MAX_EVENTS_PER_JOB {
        problems.push(format!(
            "spec.events: at most {MAX_EVENTS_PER_JOB} events are allowed, found {}",
            events.len()
        ));
    }
    let mut seen = HashSet::new();
    for (i, event) in events.iter().enumerate() {
        let at = format!("spec.events[{i}]");
        if !is_event_name(&event.name) {
            problems.push(format!(
                "{at}.name: {:?} must be 1 to 10 ASCII letters or digits",
                event.name
            ));
        } else if !seen.insert(event.name.as_str()) {
            problems.push(format!("{at}.name: {:?} is declared twice", event.name));
        }
        if event.wasm.starts_with(crate::UPLOADED_MODULE_PREFIX) {
            if event.module_ref().is_none() {
                problems.push(format!(
                    "{at}.wasm: {:?} must be sha256: and 64 lowercase hex digits (an uploaded module)",
                    event.wasm
                ));
            }
        } else if !is_module_file(&event.wasm) {
            problems.push(format!(
                "{at}.wasm: {:?} must be a file name of letters, digits, '-', '.' and '_', or sha256:<digest> of an uploaded module",
                event.wasm
            ));
        }
        if event.schema.key.is_empty() {
            problems.push(format!("{at}.schema.key: must not be empty"));
        }
        if let Some(batch) = &event.batch
            && !(1..=MAX_BATCH_EVENTS).contains(&batch.max_events)
        {
            problems.push(format!(
                "{at}.batch.maxEvents: must be between 1 and {MAX_BATCH_EVENTS}, found {}",
                batch.max_events
            ));
        }
        // A batch travels in one Kubernetes Job, which carries at most MAX_EVENTS_BYTES of
        // events (the CRD schema says the same): a larger one could not start.
        if let Some(bytes) = event.batch.as_ref().and_then(|b| b.max_bytes)
            && !(1..=MAX_EVENTS_BYTES).contains(&(bytes as usize))
        {
            problems.push(format!(
                "{at}.batch.maxBytes: must be between 1 and {MAX_EVENTS_BYTES}, found {bytes}"
            ));
        }
        if event.concurrency == Some(0) {
            problems.push(format!("{at}.concurrency: must be at least 1"));
        }
        problems.extend(env_problems(&at, event));
        problems.extend(route_problems(&at, event));
        if let Some(sink) = &event.sink {
            problems.extend(
                sink.problems()
                    .into_iter()
                    .map(|problem| format!("{at}.sink.url: {problem}")),
            );
        }
    }
    // Cycles within this resource; those across resources of a namespace are found where
    // they meet (the catalog, the dispatcher's consumers) with the same `routes::cycles`.
    for cycle in crate::routes::cycles(events) {
        problems.push(format!(
            "spec.events[].then: routes form a cycle ({cycle}): an event would lead to itself"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(InvalidJob {
            namespace: job.metadata.namespace.clone().unwrap_or_default(),
            name: job.metadata.name.clone().unwrap_or_default(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BatchSpec, EnvVar, EventSpec, JobSpec, SchemaRef};

    fn event(name: &str) -> EventSpec {
        EventSpec {
            name: name.into(),
            wasm: "echo.wasm".into(),
            script: None,
            schema: SchemaRef {
                key: "schema-ev1".into(),
                name: None,
                optional: None,
            },
            batch: None,
            concurrency: None,
            limits: None,
            env: vec![],
            env_from: vec![],
            then: vec![],
            sink: None,
        }
    }

    fn job(events: Vec<EventSpec>) -> Job {
        let mut job = Job::new(
            "j",
            JobSpec {
                events,
                ..JobSpec::default()
            },
        );
        job.metadata.namespace = Some("default".into());
        job
    }

    #[test]
    fn a_good_job_passes() {
        assert_eq!(validate_job(&job(vec![event("ev1"), event("Ev2")])), Ok(()));
    }

    #[test]
    fn wasm_is_a_configmap_key_or_the_digest_of_an_uploaded_module() {
        let digest = "ab".repeat(32);
        let mut uploaded = event("up");
        uploaded.wasm = format!("sha256:{digest}");
        assert_eq!(validate_job(&job(vec![uploaded.clone()])), Ok(()));
        assert_eq!(
            uploaded.module_ref(),
            Some(crate::ModuleRef::Uploaded(
                jobico_common::executor::Sha256Digest::parse(&digest).unwrap()
            ))
        );
        assert_eq!(
            event("ev1").module_ref(),
            Some(crate::ModuleRef::ConfigMap("echo.wasm"))
        );
        for bad in [
            "sha256:",
            "sha256:AB",
            &format!("sha256:{}", "AB".repeat(32)),
        ] {
            let mut e = event("up");
            e.wasm = bad.into();
            let err = validate_job(&job(vec![e])).unwrap_err();
            assert!(
                err.to_string()
                    .contains("must be sha256: and 64 lowercase hex"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut bad_wasm = event("ok");
        bad_wasm.wasm = "../etc/passwd".into();
        let mut bad_batch = event("b");
        bad_batch.batch = Some(BatchSpec {
            max_events: 0,
            max_wait_millis: None,
            max_bytes: Some(2 << 20),
        });
        bad_batch.env = vec![EnvVar::value("1X", "")];
        let err = validate_job(&job(vec![
            event("ev1"),
            event("ev1"),
            event("toolongname1"),
            event("bad-name"),
            bad_wasm,
            bad_batch,
        ]))
        .unwrap_err();
        let expected = [
            "spec.events[1].name: \"ev1\" is declared twice",
            "spec.events[2].name: \"toolongname1\" must be",
            "spec.events[3].name: \"bad-name\" must be",
            "spec.events[4].wasm: \"../etc/passwd\"",
            "spec.events[5].batch.maxEvents",
            "spec.events[5].batch.maxBytes: must be between 1 and 1048576, found 2097152",
            "spec.events[5].env[0].name",
        ];
        assert_eq!(err.problems.len(), expected.len(), "{:?}", err.problems);
        for (problem, prefix) in err.problems.iter().zip(expected) {
            assert!(problem.starts_with(prefix), "{problem:?} vs {prefix:?}");
        }
        assert!(err.to_string().starts_with("invalid Job default/j: "));
    }

    #[test]
    fn env_entries_are_one_value_or_one_reference() {
        let mut e = event("ev1");
        e.env = serde_json::from_value(serde_json::json!([
            {"name": "OK", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            {"name": "BOTH", "value": "x", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "k"}}},
            {"name": "NONE", "valueFrom": {}},
            {"name": "BADREF", "valueFrom": {"configMapKeyRef": {"name": "Not_A_Name", "key": "a/b"}}},
        ]))
        .unwrap();
        e.env_from = serde_json::from_value(serde_json::json!([
            {"prefix": "DB_", "secretRef": {"name": "db"}},
            {"configMapRef": {"name": "m"}, "secretRef": {"name": "db"}},
            {"prefix": "1X", "configMapRef": {"name": "m"}},
        ]))
        .unwrap();
        let mut crowded = event("ev2");
        crowded.env = (0..65)
            .map(|i| EnvVar::value(&format!("V{i}"), ""))
            .collect();
        crowded.env_from = vec![Default::default(); 17];
        crowded.env_from.iter_mut().for_each(|f| {
            f.config_map_ref = Some(crate::env::SourceSelector {
                name: "m".into(),
                optional: None,
            })
        });
        let mut large = event("ev3");
        large.env = vec![
            EnvVar::value("BIG", &"x".repeat(MAX_ARG_STRLEN)),
            EnvVar::value("MORE", &"y".repeat(100_000)),
            EnvVar::value("EVEN", &"z".repeat(120_000)),
        ];
        let err = validate_job(&job(vec![e, crowded, large])).unwrap_err();
        let expected = [
            "spec.events[0].env[1]: value and valueFrom exclude each other",
            "spec.events[0].env[2].valueFrom: must name exactly one of configMapKeyRef and secretKeyRef",
            "spec.events[0].envFrom[1]: must name exactly one of configMapRef and secretRef",
            "spec.events[0].envFrom[2].prefix: \"1X\" does not begin a valid variable name",
            "spec.events[0].env[3].valueFrom.configMapKeyRef.name: \"Not_A_Name\" is not a ConfigMap or Secret name",
            "spec.events[0].env[3].valueFrom.configMapKeyRef.key: \"a/b\" is not a valid key",
            "spec.events[1].env: at most 64 entries are allowed, found 65",
            "spec.events[1].envFrom: at most 16 entries are allowed, found 17",
            "spec.events[2].env[0].value: takes 131090 bytes as a variable, more than the 131072",
            "spec.events[2].env: the values take 351152 bytes as variables, more than the 262144",
        ];
        assert_eq!(err.problems.len(), expected.len(), "{:?}", err.problems);
        for (problem, prefix) in err.problems.iter().zip(expected) {
            assert!(problem.starts_with(prefix), "{problem:?} vs {prefix:?}");
        }
    }

    #[test]
    fn sinks_are_checked_with_the_resource() {
        let mut ship = event("ship");
        ship.sink = Some(crate::Sink {
            url: "https://hooks.example.com/jobico".into(),
        });
        assert_eq!(validate_job(&job(vec![ship.clone()])), Ok(()));
        ship.sink = Some(crate::Sink {
            url: "gopher://example.com/".into(),
        });
        let problems = validate_job(&job(vec![ship])).unwrap_err().problems;
        assert_eq!(
            problems,
            [
                "spec.events[0].sink.url: \"gopher://example.com/\" must be an http:// or https:// URL, not gopher://"
            ]
        );
    }

    #[test]
    fn routes_name_events_and_form_no_cycle_within_the_resource() {
        use crate::{Route, RouteWhen};
        let route = |event: &str, when| Route {
            event: event.into(),
            when,
        };
        let mut order = event("order");
        order.then = vec![
            route("invoice", RouteWhen::Succeeded),
            route("alert", RouteWhen::Failed),
        ];
        let mut invoice = event("invoice");
        invoice.then = vec![route("archive", RouteWhen::Always)];
        assert_eq!(
            validate_job(&job(vec![order.clone(), invoice.clone()])),
            Ok(())
        );

        let mut bad = order.clone();
        bad.then = vec![
            route("not-a-name", RouteWhen::Succeeded),
            route("alert", RouteWhen::Failed),
            route("alert", RouteWhen::Failed),
        ];
        let problems = validate_job(&job(vec![bad])).unwrap_err().problems;
        assert_eq!(
            problems,
            [
                "spec.events[0].then[0].event: \"not-a-name\" must be 1 to 10 ASCII letters or digits",
                "spec.events[0].then[2]: a route to \"alert\" when \"failed\" is declared twice",
            ]
        );
        let mut many = order.clone();
        many.then = (0..9)
            .map(|i| route(&format!("e{i}"), RouteWhen::Always))
            .collect();
        let problems = validate_job(&job(vec![many])).unwrap_err().problems;
        assert_eq!(
            problems,
            ["spec.events[0].then: at most 8 routes are allowed, found 9"]
        );

        invoice.then.push(route("order", RouteWhen::Failed));
        let problems = validate_job(&job(vec![order, invoice]))
            .unwrap_err()
            .problems;
        assert_eq!(
            problems,
            [
                "spec.events[].then: routes form a cycle (invoice → order → invoice): an event would lead to itself"
            ]
        );
    }

    #[test]
    fn names_too_long_for_a_label_are_invalid() {
        let mut long = job(vec![event("ev1")]);
        long.metadata.name = Some("a".repeat(64));
        let err = validate_job(&long).unwrap_err();
        assert!(
            err.problems[0].starts_with("metadata.name: must be at most 63"),
            "{err}"
        );
        long.metadata.name = Some("a".repeat(63));
        assert_eq!(validate_job(&long), Ok(()));
    }

    #[test]
    fn an_empty_job_is_invalid() {
        assert!(validate_job(&job(vec![])).is_err());
    }
}
