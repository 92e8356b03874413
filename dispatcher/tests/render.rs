//! Job rendering against golden files, one per sample, plus escaping and custom templates.

mod support;

use jobico_common::envelope::{MAX_EVENTS_BYTES, join_events};
use jobico_dispatcher::render::{DEFAULT_TEMPLATE, RenderError, Renderer};
use jobico_model::{BatchSpec, EnvVar, EventLimits};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use serde_json::json;
use support::{batch, golden, record, sample};

const IMAGE: &str = "ghcr.io/coeux/wasm-exec:0.1.0";

fn yaml(job: &BatchJob) -> String {
    serde_yaml::to_string(job).unwrap()
}

#[test]
fn samples_render_to_their_golden_jobs() {
    let renderer = Renderer::new(IMAGE);
    for (file, golden_name) in [("ev1.yaml", "ev1.yaml"), ("ev2.yaml", "ev2.yaml")] {
        let owner = sample(file);
        let job = renderer
            .render(
                &batch(&owner, &["0190c5a1-7b7e-7c3e-9f00-000000000001"]),
                None,
            )
            .unwrap();
        golden(golden_name, &yaml(&job));
    }
}

#[test]
fn a_batch_with_env_fuel_and_overrides_renders_to_its_golden_job() {
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.metadata.namespace = Some("team-a".into());
    owner.spec.modules = Some("shared-modules".into());
    owner.spec.backoff_limit = Some(0);
    owner.spec.active_deadline_seconds = Some(60);
    owner.spec.ttl_seconds_after_finished = Some(120);
    owner.spec.resources =
        Some(serde_json::from_value(json!({"limits": {"cpu": "1", "memory": "256Mi"}})).unwrap());
    let event = &mut owner.spec.events[0];
    event.batch = Some(BatchSpec {
        max_events: 10,
        max_wait_millis: None,
        max_bytes: None,
    });
    event.limits = Some(EventLimits {
        memory_mib: Some(32),
        timeout_millis: Some(500),
        fuel: Some(1_000_000),
    });
    event.env = vec![EnvVar::value("GREETING", "hello world")];
    let owner = std::sync::Arc::new(owner);
    let job = Renderer::new(IMAGE)
        .render(&batch(&owner, &["a1", "b2", "c3"]), None)
        .unwrap();
    golden("ev1-batch.yaml", &yaml(&job));
    // A batch carries no single event-id label, but the ids annotation.
    let labels = job.metadata.labels.as_ref().unwrap();
    assert!(!labels.contains_key("jobico.coeux.dev/event-id"));
    assert_eq!(
        job.metadata.annotations.as_ref().unwrap()["jobico.coeux.dev/event-ids"],
        "a1,b2,c3"
    );
}

#[test]
fn variables_from_configmaps_and_secrets_render_as_references() {
    // The Job names the ConfigMap and Secret keys; the kubelet resolves them. No value of a
    // Secret can appear in the Job: the renderer never has one.
    let mut owner = (*sample("ev1.yaml")).clone();
    let event = &mut owner.spec.events[0];
    event.env = serde_json::from_value(json!([
        {"name": "GREETING", "value": "hello"},
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level", "optional": true}}},
    ]))
    .unwrap();
    event.env_from = serde_json::from_value(json!([
        {"configMapRef": {"name": "settings"}},
        {"prefix": "API_", "secretRef": {"name": "api", "optional": true}},
    ]))
    .unwrap();
    let owner = std::sync::Arc::new(owner);
    let job = Renderer::new(IMAGE)
        .render(
            &batch(&owner, &["0190c5a1-7b7e-7c3e-9f00-000000000001"]),
            None,
        )
        .unwrap();
    golden("ev1-env-refs.yaml", &yaml(&job));
    let container = &job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(container.args.as_deref(), Some(&["run".to_owned()][..]));
}

#[test]
fn payloads_cannot_inject_yaml() {
    let owner = sample("ev1.yaml");
    let mut b = batch(&owner, &["x1"]);
    let nasty = json!({
        "firstName": "\"\n  evil: true\nspec: {}\n#",
        "lastName": "{{name}} }} ]] ' \\ \u{2028} \t",
        "unicode": "ünïcode ✓ \u{0000}",
    });
    b.events = vec![record("default", "ev1", "x1", nasty.clone())];
    let job = Renderer::new(IMAGE).render(&b, None).unwrap();
    let container = &job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let events = container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "JOBICO_EVENTS")
        .unwrap();
    let parsed: serde_json::Value = serde_json::from_str(events.value.as_deref().unwrap()).unwrap();
    assert_eq!(parsed, json!([{"id": "x1", "data": nasty}]));
    assert_eq!(job.metadata.name.as_deref(), Some(b.job_name().as_str()));
    assert!(job.spec.as_ref().unwrap().backoff_limit == Some(2));
}

#[test]
fn custom_templates_are_strict_and_keep_the_identity_fields() {
    let owner = sample("ev1.yaml");
    let b = batch(&owner, &["e1"]);
    let renderer = Renderer::new(IMAGE);
    let missing = renderer
        .render(&b, Some("metadata:\n  name: {{nope}}\n"))
        .unwrap_err();
    assert!(matches!(missing, RenderError::Template(_)), "{missing}");
    // A template leaving out the labels and annotations gets them.
    let bare = DEFAULT_TEMPLATE
        .replace("labels: {{json labels}}", "")
        .replace("annotations: {{json annotations}}", "");
    let job = renderer.render(&b, Some(&bare)).unwrap();
    for meta in [
        &job.metadata,
        job.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap(),
    ] {
        assert_eq!(
            meta.labels.as_ref().unwrap()["jobico.coeux.dev/event-id"],
            "e1"
        );
        assert_eq!(meta.labels.as_ref().unwrap()["event"], "ev1");
        assert_eq!(
            meta.annotations.as_ref().unwrap()["jobico.coeux.dev/event-ids"],
            "e1"
        );
    }
    let renamed = DEFAULT_TEMPLATE.replacen("name: {{name}}", "name: other", 1);
    assert!(matches!(
        renderer.render(&b, Some(&renamed)).unwrap_err(),
        RenderError::Identity { .. }
    ));
    let broken = renderer.render(&b, Some("{{#if}")).unwrap_err();
    assert!(matches!(broken, RenderError::Template(_)), "{broken}");
    // A minimal Job is valid Kubernetes but not a Job the dispatcher creates.
    let minimal = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {{name}}\n  namespace: {{namespace}}\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: x, image: {{image}}}]\n";
    let refused = renderer.render(&b, Some(minimal)).unwrap_err();
    assert!(matches!(refused, RenderError::Policy(_)), "{refused}");
    assert!(refused.is_template_fault());
}

#[test]
fn events_over_one_variable_are_split_and_the_parts_join_back() {
    let owner = sample("ev1.yaml");
    let mut b = batch(&owner, &["big-1"]);
    let data = json!({"firstName": "Ada", "lastName": "é".repeat(150_000)});
    b.events = vec![record("default", "ev1", "big-1", data.clone())];
    let job = Renderer::new(IMAGE).render(&b, None).unwrap();
    let env: Vec<_> = job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap();
    let joined = join_events(|name| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .map(Into::into)
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&joined).unwrap(),
        json!([{"id": "big-1", "data": data}])
    );
    // The shape, with each part's value replaced by its length.
    let mut shown = job.clone();
    let container = &mut shown
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0];
    for var in container.env.as_mut().unwrap() {
        if var.name.starts_with("JOBICO_EVENTS_") && var.name != "JOBICO_EVENTS_PARTS" {
            let bytes = var.value.as_ref().unwrap().len();
            var.value = Some(format!("<{bytes} bytes>"));
        }
    }
    golden("ev1-parts.yaml", &yaml(&shown));
}

#[test]
fn events_over_what_a_job_carries_are_refused() {
    let owner = sample("ev1.yaml");
    let mut b = batch(&owner, &["huge-1"]);
    b.events = vec![record(
        "default",
        "ev1",
        "huge-1",
        json!("x".repeat(MAX_EVENTS_BYTES)),
    )];
    let error = Renderer::new(IMAGE).render(&b, None).unwrap_err();
    assert!(matches!(error, RenderError::EventsTooLarge(_)), "{error}");
    assert!(!error.is_template_fault(), "the events, not the template");
}

#[test]
fn an_event_no_longer_declared_or_without_uid_is_an_error() {
    let owner = sample("ev1.yaml");
    let mut b = batch(&owner, &["e1"]);
    b.event = "gone".into();
    assert!(matches!(
        Renderer::new(IMAGE).render(&b, None).unwrap_err(),
        RenderError::UnknownEvent(_)
    ));
    let mut no_uid = (*owner).clone();
    no_uid.metadata.uid = None;
    let b = batch(&std::sync::Arc::new(no_uid), &["e1"]);
    assert!(matches!(
        Renderer::new(IMAGE).render(&b, None).unwrap_err(),
        RenderError::NoUid(_)
    ));
}

#[test]
fn yaml_line_breaks_and_controls_survive_the_round_trip() {
    use jobico_dispatcher::render::to_yaml_safe_json;
    for text in [
        "a\u{2028}b",
        "\u{85} \u{2029} \u{feff}x",
        "\u{7f}\u{9f}",
        "plain",
        "ü ✓ 😀",
    ] {
        let json = to_yaml_safe_json(text);
        let via_yaml: String = serde_yaml::from_str(&json).unwrap();
        let via_json: String = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (via_yaml.as_str(), via_json.as_str()),
            (text, text),
            "{json}"
        );
    }
}

#[test]
fn the_direct_default_job_is_exactly_what_the_default_template_renders() {
    let renderer = Renderer::new(IMAGE);
    let mut owners = vec![sample("ev1.yaml"), sample("ev2.yaml")];
    let mut custom = (*sample("ev1.yaml")).clone();
    custom.metadata.namespace = Some("team-a".into());
    custom.spec.modules = Some("shared-modules".into());
    custom.spec.backoff_limit = Some(0);
    custom.spec.active_deadline_seconds = Some(60);
    custom.spec.ttl_seconds_after_finished = Some(120);
    custom.spec.resources =
        Some(serde_json::from_value(json!({"limits": {"cpu": "1", "memory": "256Mi"}})).unwrap());
    custom.spec.events[0].limits = Some(EventLimits {
        memory_mib: Some(32),
        timeout_millis: Some(500),
        fuel: Some(7),
    });
    custom.spec.events[0].env = vec![EnvVar::value("QUOTE", "\"}\n- evil: yes")];
    owners.push(std::sync::Arc::new(custom));
    for owner in &owners {
        let mut batches = vec![
            batch(owner, &["0190c5a1-7b7e-7c3e-9f00-000000000001"]),
            batch(owner, &["a1", "b2", "c3"]),
        ];
        let mut big = batch(owner, &["big-1"]);
        big.events = vec![record(
            owner.metadata.namespace.as_deref().unwrap(),
            &owner.spec.events[0].name,
            "big-1",
            json!({"firstName": "\"}\n{{x}}", "lastName": "é".repeat(150_000)}),
        )];
        batches.push(big);
        for b in &batches {
            let direct = renderer.render(b, None).unwrap();
            let templated = renderer.render(b, Some(DEFAULT_TEMPLATE)).unwrap();
            assert_eq!(
                serde_json::to_value(&direct).unwrap(),
                serde_json::to_value(&templated).unwrap(),
                "{:?}",
                b.ids()
            );
        }
    }
}

#[test]
fn an_event_with_routes_tells_its_executor_where_to_post_with_a_token_for_its_batch() {
    use jobico_common::chain::{RESULTS_TOKEN_VAR, RESULTS_URL_VAR, results_token};
    use jobico_dispatcher::render::ResultsConfig;
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.events[0].then = serde_json::from_value(json!([{"event": "ev2"}])).unwrap();
    let owner = std::sync::Arc::new(owner);
    let ids = ["a1", "b2"];
    // Without a results configuration the events are held: they would run and their routes
    // never be followed.
    let unconfigured = Renderer::new(IMAGE).render(&batch(&owner, &ids), None);
    let error = unconfigured.unwrap_err();
    assert!(
        matches!(error, RenderError::OutcomesNeedResults(_)),
        "{error}"
    );
    assert!(error.is_template_fault());

    let key = b"a results key of at least 32 bytes!".to_vec();
    let renderer = Renderer::new(IMAGE).with_results(ResultsConfig {
        base_url: "http://jobico-apiserver.jobico-system.svc:8080".into(),
        key: key.clone(),
    });
    // A template's own results variables are replaced, never kept.
    let forged = DEFAULT_TEMPLATE.replace(
        "          env: {{json env}}\n",
        "          env:\n{{#each env}}\n            - {{json this}}\n{{/each}}\n            - {name: JOBICO_RESULTS_URL, value: \"http://evil\"}\n            - {name: JOBICO_RESULTS_TOKEN, value: \"forged\"}\n",
    );
    let text = renderer
        .render_text(&batch(&owner, &ids), Some(&forged))
        .unwrap();
    assert!(text.contains("value: \"http://evil\""), "{text}");
    for template in [None, Some(forged.as_str())] {
        let job = renderer.render(&batch(&owner, &ids), template).unwrap();
        let env = job.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let values = |name: &str| -> Vec<String> {
            env.iter()
                .filter(|v| v.name == name)
                .map(|v| v.value.clone().unwrap())
                .collect()
        };
        assert_eq!(
            values(RESULTS_URL_VAR),
            ["http://jobico-apiserver.jobico-system.svc:8080/results/default/ev1"]
        );
        assert_eq!(
            values(RESULTS_TOKEN_VAR),
            [results_token(&key, "default", "ev1", &ids)]
        );
    }
    // An event without routes gets neither.
    let plain = renderer
        .render(&batch(&sample("ev1.yaml"), &ids), None)
        .unwrap();
    let env = plain.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(env.iter().all(|v| !v.name.starts_with("JOBICO_RESULTS_")));
    // An event with a sink and no routes posts its outcomes too (the ingress keeps them for
    // the sink), and is held without a results configuration.
    let mut sinking = (*sample("ev1.yaml")).clone();
    sinking.spec.events[0].sink = Some(jobico_model::Sink {
        url: "http://receiver.apps.svc/events".into(),
    });
    let sinking = std::sync::Arc::new(sinking);
    assert!(matches!(
        Renderer::new(IMAGE).render(&batch(&sinking, &ids), None),
        Err(RenderError::OutcomesNeedResults(_))
    ));
    let job = renderer.render(&batch(&sinking, &ids), None).unwrap();
    let env = job.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(env.iter().any(|v| v.name == RESULTS_URL_VAR));
    assert!(env.iter().any(|v| v.name == RESULTS_TOKEN_VAR));
}
