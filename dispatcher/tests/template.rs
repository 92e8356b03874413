//! Rendering is bounded: templates that recurse, loop without bound, write without bound or
//! reach past the escaping are refused, and the process survives every one of them.

mod support;

use jobico_dispatcher::DispatchError;
use jobico_dispatcher::kubernetes::render_failure;
use jobico_dispatcher::render::{DEFAULT_TEMPLATE, RenderError, Renderer, check_template};
use jobico_dispatcher::template::{
    BoundedTemplate, MAX_BLOCK_DEPTH, MAX_TEMPLATE_BYTES, TemplateError,
};
use support::{batch, sample};

const IMAGE: &str = "ghcr.io/coeux/wasm-exec:0.1.0";

fn refusal(source: &str) -> TemplateError {
    match BoundedTemplate::compile(source) {
        Err(error) => error,
        Ok(_) => panic!("{source:?} was accepted"),
    }
}

#[test]
fn recursive_partials_are_refused_without_rendering() {
    let recursive = r#"{{#*inline "r"}}{{> r}}{{/inline}}{{> r}}"#;
    assert!(matches!(refusal(recursive), TemplateError::Refused(_)));
    // Through the renderer and the dispatch path: held, not dead-lettered, process alive.
    let owner = sample("ev1.yaml");
    let error = Renderer::new(IMAGE)
        .render(&batch(&owner, &["e1"]), Some(recursive))
        .unwrap_err();
    assert!(matches!(error, RenderError::Template(_)), "{error}");
    assert!(matches!(render_failure(error), DispatchError::Held { .. }));
    let message = check_template(&Renderer::new(IMAGE), &owner, Some(recursive)).unwrap_err();
    assert!(
        message.contains("decorators and inline partials"),
        "{message}"
    );
}

#[test]
fn nested_loops_are_refused_by_their_worst_case() {
    let owner = sample("ev1.yaml");
    let ids: Vec<String> = (0..100).map(|i| format!("e{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let b = batch(&owner, &ids);
    let nested = "{{#each ids}}{{#each ../ids}}{{#each ../../ids}}{{json ../../../env}}{{/each}}{{/each}}{{/each}}";
    let error = Renderer::new(IMAGE).render(&b, Some(nested)).unwrap_err();
    assert!(
        matches!(error, RenderError::Template(TemplateError::TooCostly(_))),
        "{error}"
    );
    // Loops writing nothing are just as refused: time, not only output, is bounded.
    let silent = "{{#each ids}}{{#each ../ids}}{{#each ../../ids}}{{/each}}{{/each}}{{/each}}";
    let error = Renderer::new(IMAGE).render(&b, Some(silent)).unwrap_err();
    assert!(
        matches!(error, RenderError::Template(TemplateError::TooCostly(_))),
        "{error}"
    );
    // One loop over the ids is fine.
    let template = BoundedTemplate::compile("{{#each ids}}{{this}}{{/each}}").unwrap();
    assert_eq!(template.steps(100), 201);
}

#[test]
fn output_is_capped() {
    // Few steps, each writing the whole events: the cap stops it.
    let owner = sample("ev1.yaml");
    let mut b = batch(&owner, &["e1", "e2", "e3", "e4"]);
    for event in &mut b.events {
        event.data = serde_json::json!("\"".repeat(120_000));
    }
    let copies = "{{#each ids}}{{json ../env}}{{json ../env}}{{/each}}";
    let error = Renderer::new(IMAGE).render(&b, Some(copies)).unwrap_err();
    assert!(
        matches!(error, RenderError::Template(TemplateError::OutputTooLarge)),
        "{error}"
    );
}

#[test]
fn constructs_outside_the_allowed_set_are_refused() {
    let deep_blocks =
        "{{#if name}}".repeat(MAX_BLOCK_DEPTH + 1) + &"{{/if}}".repeat(MAX_BLOCK_DEPTH + 1);
    let deep_parens = format!(
        "{{{{json {}name{}}}}}",
        "(lookup ".repeat(6),
        " \"x\")".repeat(6)
    );
    // Enough nesting to overflow a parser, renderer or drop that recursed on it.
    let abusive = "{{#if a}}".repeat(20_000);
    let chained = format!("{{{{#if a}}}}{}{{{{/if}}}}", "{{else if a}}x".repeat(4_000));
    for (what, source) in [
        ("raw output", "name: {{{name}}}".to_owned()),
        ("a partial", "{{> other}}".to_owned()),
        ("a partial block", "{{#> other}}x{{/other}}".to_owned()),
        (
            "an inline partial",
            "{{#*inline \"x\"}}y{{/inline}}".to_owned(),
        ),
        ("a decorator", "{{*inline \"x\"}}".to_owned()),
        ("the log helper", "{{log \"spam\"}}".to_owned()),
        ("the raw helper", "{{{{raw}}}}{{x}}{{{{/raw}}}}".to_owned()),
        ("an unknown helper", "{{shout name}}".to_owned()),
        (
            "an unknown block helper",
            "{{#repeat 10}}x{{/repeat}}".to_owned(),
        ),
        (
            "json in a subexpression",
            "{{#if (json env)}}x{{/if}}".to_owned(),
        ),
        (
            "a computed helper name",
            "{{(lookup this \"json\") env}}".to_owned(),
        ),
        ("deep blocks", deep_blocks),
        ("deep subexpressions", deep_parens),
        ("abusive nesting", abusive),
        ("a long else-if chain", chained),
        ("a huge template", "x".repeat(MAX_TEMPLATE_BYTES + 1)),
    ] {
        let error = BoundedTemplate::compile(&source);
        assert!(error.is_err(), "{what} was accepted");
    }
}

#[test]
fn the_default_template_is_well_inside_the_bounds() {
    let template = BoundedTemplate::compile(DEFAULT_TEMPLATE).unwrap();
    assert!(template.steps(100) < 200, "{}", template.steps(100));
    // A short else-if chain, `{{^}}` and comments do not count as nesting.
    BoundedTemplate::compile(
        "{{!-- {{#if}} ( ( ( ( ( --}}{{! {{#x}} }}{{#if a}}1{{else if b}}2{{else if c}}3{{^}}4{{/if}}",
    )
    .unwrap();
    // Allowed helpers still work in custom templates.
    let owner = sample("ev1.yaml");
    let helpers = DEFAULT_TEMPLATE.replacen(
        "  backoffLimit: {{json backoffLimit}}",
        "  backoffLimit: {{#if (and (eq event \"ev1\") (gt (len ids) 0))}}{{json backoffLimit}}{{else}}0{{/if}}",
        1,
    );
    let job = Renderer::new(IMAGE)
        .render(&batch(&owner, &["e1"]), Some(&helpers))
        .unwrap();
    assert_eq!(job.spec.unwrap().backoff_limit, Some(2));
}
