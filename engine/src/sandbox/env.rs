//! The environment a processor starts with: an allowlist of the engine's environment plus the
//! `PIPELINE_*` protocol variables, never a proxy setting.
//!
//! Everything else the user's shell had is dropped, so neither a `HTTPS_PROXY` nor a cloud
//! credential nor an undeclared setting reaches a processor by accident.

use std::ffi::{OsStr, OsString};

/// Variables passed through by exact name.
pub const PASSED: &[&str] = &[
    // the basics every program expects
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "NO_COLOR",
    // test switches of the processor protocol (docs/protocol.md)
    "PIPE_FAULT",
    "PIPE_FAILPOINT",
    "PIPE_FAILPOINT_FIRED",
    "PIPE_LINE_TALLY",
    // Python behaviour that changes no result
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONHASHSEED",
    "PYTHONUNBUFFERED",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "PYTHONPATH",
    // thread pools (the engine sets OMP_NUM_THREADS and RAYON_NUM_THREADS itself)
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    // coverage builds of pipe itself write their profiles here
    "LLVM_PROFILE_FILE",
];

/// Variables passed through by prefix.
pub const PASSED_PREFIXES: &[&str] = &["LC_"];

/// Whether the engine passes variable `name` through to processors.
pub fn passed(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if is_proxy(OsStr::new(name)) {
        return false;
    }
    PASSED.contains(&name) || PASSED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether `name` is a proxy setting (`HTTPS_PROXY`, `no_proxy`, ...).
fn is_proxy(name: &OsStr) -> bool {
    name.to_string_lossy()
        .to_ascii_uppercase()
        .ends_with("_PROXY")
}

/// The processor's environment: the allowed part of `inherited` (the allowlist plus `extra`
/// names), then `set` (which wins).
pub fn environment(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    extra: &[String],
    set: &[(OsString, OsString)],
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = inherited
        .into_iter()
        .filter(|(k, _)| passed(k) || (extra.iter().any(|e| k == e.as_str()) && !is_proxy(k)))
        .filter(|(k, _)| !set.iter().any(|(s, _)| s == k))
        .collect();
    env.extend(set.iter().cloned());
    env.sort();
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn only_allowed_variables_pass_and_set_ones_win() {
        let inherited = os(&[
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("http_proxy", "http://proxy:3128"),
            ("no_proxy", "localhost"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("PIPELINE_RESUME", "{\"stale\": true}"),
            ("TMPDIR", "/tmp"),
            ("PIPE_FAULT", "crash-after-lines:3"),
        ]);
        let set = os(&[("PIPELINE_STAGE", "a"), ("TMPDIR", "/private")]);
        let env = environment(inherited.clone(), &[], &set);
        let names: Vec<_> = env.iter().map(|(k, _)| k.to_str().unwrap()).collect();
        assert_eq!(
            names,
            ["LC_ALL", "PATH", "PIPELINE_STAGE", "PIPE_FAULT", "TMPDIR"]
        );
        assert!(env.contains(&("TMPDIR".into(), "/private".into())));
        let extra = [
            "AWS_SECRET_ACCESS_KEY".to_string(),
            "HTTPS_PROXY".to_string(),
        ];
        let env = environment(inherited, &extra, &set);
        assert!(env.iter().any(|(k, _)| k == "AWS_SECRET_ACCESS_KEY"));
        assert!(
            !env.iter().any(|(k, _)| k == "HTTPS_PROXY"),
            "a proxy never passes"
        );
    }

    #[test]
    fn a_proxy_variable_never_passes_even_if_listed() {
        for name in [
            "HTTP_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "NO_PROXY",
            "LC_PROXY",
        ] {
            assert!(!passed(OsStr::new(name)), "{name}");
        }
        assert!(passed(OsStr::new("LC_CTYPE")));
    }
}
