//! The executor's command-line contract with the Jobs that start it.
//!
//! A Job's arguments are written by its template, and a resource's template is written by the
//! tenant. So the flags that only the operator may pass (they decide whether native code is
//! loaded) are listed here, refused in every rendered Job by the dispatcher's pod policy and
//! defined by `wasm-exec` under these names (its tests check both: that each is a real flag
//! and that clap infers no abbreviation of it).

/// `wasm-exec` flags a Job may not pass: `--trust-precompiled` loads a `.cwasm` file as
/// native code, unchecked.
pub const OPERATOR_ONLY_FLAGS: &[&str] = &["--trust-precompiled"];

/// The operator-only flag `arg` passes, if any (`--flag` or `--flag=value`). Arguments after a
/// `--` are values, never flags: pass only those before it.
pub fn operator_only_flag(arg: &str) -> Option<&'static str> {
    OPERATOR_ONLY_FLAGS.iter().copied().find(|flag| {
        arg.strip_prefix(flag)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_found_alone_or_with_a_value() {
        assert_eq!(
            operator_only_flag("--trust-precompiled"),
            Some("--trust-precompiled")
        );
        assert_eq!(
            operator_only_flag("--trust-precompiled=true"),
            Some("--trust-precompiled")
        );
        assert_eq!(operator_only_flag("--trust-precompiledx"), None);
        assert_eq!(operator_only_flag("--dir"), None);
        assert_eq!(operator_only_flag("run"), None);
    }
}
