//! Guest ABI detection from a module's exports.
//!
//! A module that exports `event`, `malloc` and `init` is a jobicolet module whatever else it
//! exports (TinyGo always adds `_start`, which is then not called). Otherwise a module that
//! exports `_start` is a WASI preview1 command. Anything else is refused with a message naming
//! what is missing.

use std::fmt;

use serde::{Deserialize, Serialize};
use wasmtime::{ExternType, FuncType, ValType};

/// The calling convention a module follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Abi {
    /// WASI preview1 command: event JSON on stdin, stdout is the output, exit code the status.
    Wasi,
    /// JobicoK8S's jobicolet ABI (`malloc`, `free`, `init`, `event`, optional `ver`, `env.log`).
    Jobicolet,
}

impl fmt::Display for Abi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wasi => "wasi",
            Self::Jobicolet => "jobicolet",
        })
    }
}

/// How a jobicolet module's optional parts look, decided at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JobicoletShape {
    /// `free(ptr, size)` rather than `free(ptr)`.
    pub(crate) free_takes_size: bool,
    /// Whether `ver()` is exported (and so called first).
    pub(crate) has_ver: bool,
}

/// The detected ABI plus the jobicolet details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Detected {
    pub(crate) abi: Abi,
    pub(crate) shape: Option<JobicoletShape>,
}

const JOBICOLET_MARKERS: [&str; 3] = ["event", "malloc", "init"];

/// Detects the ABI of `module`, or explains why it fits neither.
pub(crate) fn detect(module: &wasmtime::Module) -> Result<Detected, String> {
    let func = |name: &str| match module.get_export(name) {
        Some(ExternType::Func(ty)) => Some(ty),
        _ => None,
    };
    let has_memory = matches!(module.get_export("memory"), Some(ExternType::Memory(_)));
    let markers: Vec<&str> = JOBICOLET_MARKERS
        .into_iter()
        .filter(|name| func(name).is_none())
        .collect();
    if markers.is_empty() {
        return jobicolet(&func, has_memory).map(|shape| Detected {
            abi: Abi::Jobicolet,
            shape: Some(shape),
        });
    }
    if let Some(start) = func("_start") {
        if start.params().len() != 0 || start.results().len() != 0 {
            return Err("WASI export `_start` must take and return nothing".into());
        }
        return Ok(Detected {
            abi: Abi::Wasi,
            shape: None,
        });
    }
    Err(format!(
        "a WASI command must export function `_start` (missing); a jobicolet module must export \
         functions `event`, `malloc`, `init`, `free` and memory `memory` (missing: {})",
        markers.join(", ")
    ))
}

fn jobicolet(
    func: &dyn Fn(&str) -> Option<FuncType>,
    has_memory: bool,
) -> Result<JobicoletShape, String> {
    let mut problems = Vec::new();
    if !has_memory {
        problems.push("memory `memory` is missing".to_owned());
    }
    let expect = |problems: &mut Vec<String>,
                  name: &str,
                  params: &[&[ValType]],
                  results: &[ValType],
                  shown: &str| {
        if let Some(ty) = func(name) {
            let params_ok = params.iter().any(|want| same(ty.params(), want));
            if !params_ok || !same(ty.results(), results) {
                problems.push(format!("`{name}` must be `{shown}`"));
            }
        }
    };
    expect(
        &mut problems,
        "malloc",
        &[&[ValType::I32]],
        &[ValType::I32],
        "malloc(i32) -> i32",
    );
    expect(&mut problems, "init", &[&[]], &[], "init()");
    expect(
        &mut problems,
        "event",
        &[&[ValType::I32, ValType::I32, ValType::I32]],
        &[],
        "event(retptr: i32, ptr: i32, len: i32)",
    );
    let free = func("free");
    match &free {
        None => problems.push("function `free` is missing".to_owned()),
        Some(_) => expect(
            &mut problems,
            "free",
            &[&[ValType::I32], &[ValType::I32, ValType::I32]],
            &[],
            "free(i32) or free(i32, i32)",
        ),
    }
    if func("ver").is_some() {
        expect(
            &mut problems,
            "ver",
            &[&[]],
            &[ValType::I32],
            "ver() -> i32",
        );
    }
    if !problems.is_empty() {
        return Err(format!("jobicolet module: {}", problems.join("; ")));
    }
    Ok(JobicoletShape {
        free_takes_size: free.is_some_and(|ty| ty.params().len() == 2),
        has_ver: func("ver").is_some(),
    })
}

fn same(actual: impl ExactSizeIterator<Item = ValType>, want: &[ValType]) -> bool {
    actual.len() == want.len() && actual.zip(want).all(|(a, b)| ValType::eq(&a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_wat(wat: &str) -> Result<Detected, String> {
        let engine = wasmtime::Engine::default();
        detect(&wasmtime::Module::new(&engine, wat).unwrap())
    }

    const JOBICOLET_EXPORTS: &str = r#"
        (memory (export "memory") 1)
        (func (export "malloc") (param i32) (result i32) i32.const 0)
        (func (export "init"))
        (func (export "event") (param i32 i32 i32))"#;

    #[test]
    fn wasi_command() {
        let detected = detect_wat(r#"(module (func (export "_start")))"#).unwrap();
        assert_eq!(detected.abi, Abi::Wasi);
    }

    #[test]
    fn jobicolet_wins_over_start() {
        let wat = format!(
            r#"(module {JOBICOLET_EXPORTS}
                (func (export "free") (param i32 i32))
                (func (export "ver") (result i32) i32.const 1)
                (func (export "_start")))"#
        );
        let detected = detect_wat(&wat).unwrap();
        assert_eq!(detected.abi, Abi::Jobicolet);
        let shape = detected.shape.unwrap();
        assert!(shape.free_takes_size && shape.has_ver);
    }

    #[test]
    fn refusals_name_what_is_missing() {
        let cases = [
            (
                r#"(module (func (export "event") (param i32 i32 i32)))"#,
                "missing: malloc, init",
            ),
            (
                r#"(module (func (export "_start") (param i32)))"#,
                "`_start` must take",
            ),
            (
                &*format!("(module {JOBICOLET_EXPORTS})"),
                "function `free` is missing",
            ),
            (
                r#"(module (func (export "malloc") (param i32) (result i32) i32.const 0)
                    (func (export "init")) (func (export "event") (param i32))
                    (func (export "free") (param i32)))"#,
                "memory `memory` is missing; `event` must be",
            ),
        ];
        for (wat, want) in cases {
            let error = detect_wat(wat).unwrap_err();
            assert!(error.contains(want), "{error}");
        }
    }
}
