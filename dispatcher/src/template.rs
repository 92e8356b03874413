//! Job templates under bounds.
//!
//! A template is a tenant's handlebars source, rendered inside the dispatcher that serves
//! every namespace, so rendering it must not crash, stall or exhaust the process whatever it
//! says. [`BoundedTemplate::compile`] refuses, before anything is rendered:
//!
//! - sources over [`MAX_TEMPLATE_BYTES`], and nesting over [`MAX_BLOCK_DEPTH`] blocks or
//!   [`MAX_EXPRESSION_DEPTH`] subexpressions (checked on the text first, so the parser never
//!   recurses deeply either);
//! - partials, inline partials and decorators (the only way to recursion: `{{#*inline "r"}}{{>
//!   r}}{{/inline}}{{> r}}` overflows the stack), raw output `{{{x}}}` (it bypasses the
//!   escaping that keeps values from injecting YAML), and every helper not in [`HELPERS`];
//! - `json` inside a subexpression, where its output would not pass through the capped
//!   writer.
//!
//! What is left is a loop-free program except for `each`, whose iterations are at most the
//! longest list or map in the values; [`BoundedTemplate::render`] refuses a template whose
//! worst case exceeds [`MAX_RENDER_STEPS`] for the values at hand, and writes through an
//! [`Output`] that fails past [`MAX_OUTPUT_BYTES`]. Time is bounded by those two: no wall
//! clock is involved, so a template renders or is refused the same way on every machine.

use std::fmt;

use handlebars::template::{Parameter, TemplateElement};
use handlebars::{Context, Handlebars, Output, RenderContext, Renderable, Template};
use jobico_common::envelope::MAX_EVENTS_BYTES;
use serde_json::Value;

/// Largest template source: the default template is about 3 KiB.
pub const MAX_TEMPLATE_BYTES: usize = 64 << 10;
/// Deepest nesting of block helpers (`if`, `each`, ...): the default template nests 1.
pub const MAX_BLOCK_DEPTH: usize = 8;
/// Deepest nesting of subexpressions (`(eq (lookup a b) c)`).
pub const MAX_EXPRESSION_DEPTH: usize = 4;
/// Most template elements one render may evaluate, counting each `each` iteration: the
/// default template takes about 50; a loop of 10 elements over 100 ids takes 1,000. Each
/// step costs at most a comparison or a copy of one value (1 MiB at most), so this caps a
/// render at a fraction of a second.
pub const MAX_RENDER_STEPS: u64 = 20_000;
/// Largest rendered text: twice the events (escaping as a YAML string can double them) and
/// 2 MiB for everything else. That is more than the API server's 3 MiB request limit, so
/// the cap stops only Jobs that could not be created anyway, and the checks after parsing
/// (`policy`) say precisely what is too large in the others.
pub const MAX_OUTPUT_BYTES: usize = 2 * MAX_EVENTS_BYTES + (2 << 20);
/// The helpers a template may call: handlebars' built-in logic and lookups, and `json`.
pub const HELPERS: [&str; 16] = [
    "if", "unless", "each", "with", "lookup", "eq", "ne", "gt", "gte", "lt", "lte", "and", "or",
    "not", "len", "json",
];
/// The helpers that may open a block.
const BLOCK_HELPERS: [&str; 4] = ["if", "unless", "each", "with"];

/// Why a template is refused or its rendering stopped.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The source is too long.
    #[error("the template is {0} bytes, more than {MAX_TEMPLATE_BYTES}")]
    TooLong(usize),
    /// Blocks or subexpressions nest too deeply.
    #[error("{what} nest more than {limit} deep")]
    TooDeep {
        /// Blocks or subexpressions.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// The source does not parse.
    #[error("{0}")]
    Syntax(#[source] Box<handlebars::TemplateError>),
    /// A construct templates may not use.
    #[error("{0} are not allowed in Job templates")]
    Refused(&'static str),
    /// A helper not in [`HELPERS`] (or not allowed where it is used).
    #[error("helper {0:?} is not allowed here (allowed: {allowed})", allowed = HELPERS.join(", "))]
    Helper(String),
    /// Rendering could take too many steps.
    #[error(
        "the template could take {0} steps to render, more than {MAX_RENDER_STEPS} (loops inside loops?)"
    )]
    TooCostly(u64),
    /// Rendering produced too much text.
    #[error("the template renders more than {MAX_OUTPUT_BYTES} bytes")]
    OutputTooLarge,
    /// Rendering failed (strict mode: a missing variable is an error).
    #[error("{0}")]
    Render(#[source] Box<handlebars::RenderError>),
}

/// A template that passed [`BoundedTemplate::compile`].
#[derive(Debug, Clone)]
pub struct BoundedTemplate {
    template: Template,
    /// `elements[k]`: elements inside `k` nested `each` blocks; a render takes at most
    /// `Σ elements[k] × fanout^k` steps.
    elements: Vec<u64>,
}

impl BoundedTemplate {
    /// Parses and checks `source` (module docs).
    pub fn compile(source: &str) -> Result<Self, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::TooLong(source.len()));
        }
        check_nesting(source)?;
        let template = Template::compile(source).map_err(|e| TemplateError::Syntax(Box::new(e)))?;
        let mut elements = Vec::new();
        walk(&template, 0, 0, &mut elements)?;
        Ok(Self { template, elements })
    }

    /// The most steps a render can take when no list or map in the values is longer than
    /// `fanout`.
    pub fn steps(&self, fanout: usize) -> u64 {
        let fanout = fanout.max(1) as u64;
        let mut total: u64 = 0;
        let mut factor: u64 = 1;
        for count in &self.elements {
            total = total.saturating_add(count.saturating_mul(factor));
            factor = factor.saturating_mul(fanout);
        }
        total
    }

    /// Renders the template with `registry`'s helpers, escaping and strict mode.
    pub fn render(&self, registry: &Handlebars<'_>, data: &Value) -> Result<String, TemplateError> {
        let steps = self.steps(fanout(data));
        if steps > MAX_RENDER_STEPS {
            return Err(TemplateError::TooCostly(steps));
        }
        let context = Context::wraps(data).map_err(|e| TemplateError::Render(Box::new(e)))?;
        let mut out = CappedOutput::default();
        let mut rc = RenderContext::new(None);
        match self.template.render(registry, &context, &mut rc, &mut out) {
            Ok(()) => Ok(out.text),
            Err(_) if out.overflowed => Err(TemplateError::OutputTooLarge),
            Err(error) => Err(TemplateError::Render(Box::new(error))),
        }
    }
}

/// The longest list or map anywhere in `value`: the most iterations one `each` can make.
pub fn fanout(value: &Value) -> usize {
    match value {
        Value::Array(items) => items.iter().map(fanout).fold(items.len(), usize::max),
        Value::Object(fields) => fields.values().map(fanout).fold(fields.len(), usize::max),
        _ => 0,
    }
}

/// Refuses deep nesting on the text, before the parser sees it (its output nests as deep,
/// and is rendered and dropped recursively). Counts `{{#`/`{{^` openings, each `{{else X}}`
/// chained to them, against `{{/` closings, and parentheses inside mustaches; comments are
/// skipped. It can only over-count (a `(` inside a string literal, an escaped `\{{#`), never
/// miss a level the parser would see.
fn check_nesting(source: &str) -> Result<(), TemplateError> {
    let too_deep = |what, limit| Err(TemplateError::TooDeep { what, limit });
    let bytes = source.as_bytes();
    // Per open block: the levels it takes (1, plus one per chained `else if`).
    let mut open: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"{{!--") {
            i = source[i..]
                .find("--}}")
                .map_or(bytes.len(), |end| i + end + 4);
            continue;
        }
        if !bytes[i..].starts_with(b"{{") {
            i += 1;
            continue;
        }
        let end = source[i..].find("}}").map_or(bytes.len(), |end| i + end);
        let inner = source[i + 2..end].trim_start_matches(['{', '~', ' ']);
        let bare = inner.trim_end_matches(['~', ' ', '}']);
        if inner.starts_with('!') {
            // A short comment: nothing inside counts.
            i = end + 2;
            continue;
        } else if bare == "^" || bare == "else" {
            // An inverse section of the open block, not a new level.
        } else if inner.starts_with('#') || inner.starts_with('^') {
            open.push(1);
        } else if let Some(top) = open.last_mut()
            && (inner.starts_with("else ") || inner.starts_with("^ "))
        {
            *top += 1;
        } else if inner.starts_with('/') {
            open.pop();
        }
        if open.iter().sum::<usize>() > MAX_BLOCK_DEPTH {
            return too_deep("blocks", MAX_BLOCK_DEPTH);
        }
        let mut parens = 0usize;
        for b in inner.bytes() {
            match b {
                b'(' => parens += 1,
                b')' => parens = parens.saturating_sub(1),
                _ => {}
            }
            if parens > MAX_EXPRESSION_DEPTH {
                return too_deep("subexpressions", MAX_EXPRESSION_DEPTH);
            }
        }
        i = end + 2;
    }
    Ok(())
}

fn walk(
    template: &Template,
    depth: usize,
    loops: usize,
    elements: &mut Vec<u64>,
) -> Result<(), TemplateError> {
    if depth > MAX_BLOCK_DEPTH {
        return Err(TemplateError::TooDeep {
            what: "blocks",
            limit: MAX_BLOCK_DEPTH,
        });
    }
    if elements.len() <= loops {
        elements.resize(loops + 1, 0);
    }
    for element in &template.elements {
        elements[loops] += 1;
        match element {
            TemplateElement::RawString(_) | TemplateElement::Comment(_) => {}
            TemplateElement::Expression(helper) => {
                let name = helper_name(&helper.name)?;
                let call = !helper.params.is_empty() || !helper.hash.is_empty();
                if call && (!HELPERS.contains(&name) || BLOCK_HELPERS.contains(&name)) {
                    return Err(TemplateError::Helper(name.to_owned()));
                }
                params(helper.params.iter().chain(helper.hash.values()), 1)?;
            }
            TemplateElement::HelperBlock(helper) => {
                let name = helper_name(&helper.name)?;
                if !BLOCK_HELPERS.contains(&name) {
                    return Err(TemplateError::Helper(name.to_owned()));
                }
                params(helper.params.iter().chain(helper.hash.values()), 1)?;
                let inner = if name == "each" { loops + 1 } else { loops };
                if inner > loops {
                    // Every iteration is a step, even of an empty body.
                    if elements.len() <= inner {
                        elements.resize(inner + 1, 0);
                    }
                    elements[inner] += 1;
                }
                if let Some(body) = &helper.template {
                    walk(body, depth + 1, inner, elements)?;
                }
                if let Some(inverse) = &helper.inverse {
                    walk(inverse, depth + 1, loops, elements)?;
                }
            }
            TemplateElement::HtmlExpression(_) => {
                return Err(TemplateError::Refused("raw outputs {{{...}}}"));
            }
            TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_) => {
                return Err(TemplateError::Refused("partials"));
            }
            TemplateElement::DecoratorExpression(_) | TemplateElement::DecoratorBlock(_) => {
                return Err(TemplateError::Refused("decorators and inline partials"));
            }
            // A construct of a later handlebars version is refused until it is understood.
            _ => return Err(TemplateError::Refused("unknown template constructs")),
        }
    }
    Ok(())
}

/// A helper's or variable's name; a computed name (a subexpression) is refused.
fn helper_name(name: &Parameter) -> Result<&str, TemplateError> {
    name.as_name()
        .ok_or(TemplateError::Refused("computed helper names"))
}

/// Checks the subexpressions among helper parameters.
fn params<'a>(
    params: impl Iterator<Item = &'a Parameter>,
    depth: usize,
) -> Result<(), TemplateError> {
    for param in params {
        let Parameter::Subexpression(sub) = param else {
            continue;
        };
        if depth > MAX_EXPRESSION_DEPTH {
            return Err(TemplateError::TooDeep {
                what: "subexpressions",
                limit: MAX_EXPRESSION_DEPTH,
            });
        }
        let TemplateElement::Expression(helper) = sub.element.as_ref() else {
            return Err(TemplateError::Refused(
                "subexpressions other than helper calls",
            ));
        };
        let name = helper_name(&helper.name)?;
        if !HELPERS.contains(&name) || BLOCK_HELPERS.contains(&name) || name == "json" {
            return Err(TemplateError::Helper(name.to_owned()));
        }
        self::params(helper.params.iter().chain(helper.hash.values()), depth + 1)?;
    }
    Ok(())
}

/// Collects rendered text and fails once it would exceed [`MAX_OUTPUT_BYTES`].
#[derive(Default)]
struct CappedOutput {
    text: String,
    overflowed: bool,
}

impl Output for CappedOutput {
    fn write(&mut self, seg: &str) -> Result<(), std::io::Error> {
        if self.text.len() + seg.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other(OutputFull));
        }
        self.text.push_str(seg);
        Ok(())
    }
}

#[derive(Debug)]
struct OutputFull;

impl fmt::Display for OutputFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rendered text over {MAX_OUTPUT_BYTES} bytes")
    }
}

impl std::error::Error for OutputFull {}
