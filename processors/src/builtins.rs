//! The registry of built-in processors: their names, implementation versions and params.
//!
//! The engine asks this module whether a built-in exists and whether its params are valid when it
//! loads a Pipefile (so a typo fails before anything runs), and folds the implementation version
//! into every fingerprint (so changing a built-in's behaviour reruns the stages that use it).

use serde_json::{Map, Value};

use crate::sdk::{self, ChunkTransform, DataError, Emit, ProcessorError, Step};
use crate::upper::{Mode, Upper};

/// A built-in processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Builtin {
    pub name: &'static str,
    /// Bumped whenever the built-in's output for some input changes.
    pub implementation: &'static str,
    pub summary: &'static str,
}

/// Every built-in, by name.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "copy",
        implementation: "1",
        summary: "copy each input's bytes to the mirrored output path",
    },
    Builtin {
        name: "upper",
        implementation: "1",
        summary: "upper-case UTF-8 text (params: mode = \"unicode\" | \"ascii\")",
    },
];

/// Looks a built-in up by name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/// A bad param of a built-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub key: String,
    /// The key itself is unknown (rather than its value invalid).
    pub unknown_key: bool,
    pub message: String,
}

/// Checks a built-in's params.
pub fn validate_params(name: &str, params: &Map<String, Value>) -> Result<(), ParamError> {
    let allowed: &[&str] = match name {
        "upper" => &["mode"],
        _ => &[],
    };
    if let Some(key) = params.keys().find(|k| !allowed.contains(&k.as_str())) {
        let valid = if allowed.is_empty() {
            "it takes no params".to_string()
        } else {
            format!("valid keys: {}", allowed.join(", "))
        };
        return Err(ParamError {
            key: key.clone(),
            unknown_key: true,
            message: format!("built-in `{name}` has no param `{key}`: {valid}"),
        });
    }
    if let Some(mode) = params.get("mode") {
        if mode.as_str().and_then(Mode::parse).is_none() {
            return Err(ParamError {
                key: "mode".into(),
                unknown_key: false,
                message: format!("`mode` must be \"unicode\" or \"ascii\", found {mode}"),
            });
        }
    }
    Ok(())
}

/// Runs built-in `name` as this process's job (`pipe processor NAME`) and returns the exit code.
pub fn run(name: &str) -> i32 {
    match name {
        "copy" => sdk::main_with(|_| Ok(Copy)),
        "upper" => sdk::main_with(|ctx| {
            validate_params("upper", &ctx.params)
                .map_err(|err| ProcessorError::Usage(err.message))?;
            let mode = ctx
                .params
                .get("mode")
                .and_then(Value::as_str)
                .and_then(Mode::parse);
            Ok(Upper {
                mode: mode.unwrap_or(Mode::Unicode),
            })
        }),
        other => {
            let names: Vec<_> = BUILTINS.iter().map(|b| b.name).collect();
            eprintln!(
                "error: unknown built-in processor `{other}`; built-ins: {}",
                names.join(", ")
            );
            sdk::EXIT_USAGE
        }
    }
}

/// The `copy` transform: bytes through unchanged.
struct Copy;

impl ChunkTransform for Copy {
    fn apply(
        &mut self,
        chunk: &mut [u8],
        _eof: bool,
        _out: &mut Vec<u8>,
    ) -> Result<Step, DataError> {
        Ok(Step {
            consumed: chunk.len(),
            emit: Emit::Chunk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn params_are_checked_per_builtin() {
        assert!(validate_params("copy", &params(json!({}))).is_ok());
        assert_eq!(
            validate_params("copy", &params(json!({"mode": "ascii"})))
                .unwrap_err()
                .key,
            "mode"
        );
        assert!(validate_params("upper", &params(json!({"mode": "ascii"}))).is_ok());
        assert!(validate_params("upper", &params(json!({"mode": "shout"}))).is_err());
        assert!(validate_params("upper", &params(json!({"mode": 1}))).is_err());
        assert_eq!(
            validate_params("upper", &params(json!({"mood": "x"})))
                .unwrap_err()
                .key,
            "mood"
        );
    }

    #[test]
    fn builtins_are_found_by_name() {
        assert_eq!(find("upper").unwrap().name, "upper");
        assert!(find("lower").is_none());
        assert_eq!(run("lower"), sdk::EXIT_USAGE);
    }
}
