//! The checkpoint record shared by processors and the engine.
//!
//! One JSON line per durable checkpoint on the progress pipe, and the same fields in
//! `PIPELINE_RESUME`. Keeping the type in one place means the SDK and the engine can never disagree
//! about field names or meaning.

use serde::{Deserialize, Serialize};

/// A durable position inside a stage's work: every input before `input_index` is complete, and
/// `byte_offset` bytes (`line_offset` lines) of input `input_index` are reflected in the first
/// `output_bytes` bytes of its output file, which were flushed and fsynced before this was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    pub input_index: u64,
    pub line_offset: u64,
    pub byte_offset: u64,
    pub output_bytes: u64,
}

impl Checkpoint {
    /// The position of a fresh start.
    pub const START: Checkpoint = Checkpoint {
        input_index: 0,
        line_offset: 0,
        byte_offset: 0,
        output_bytes: 0,
    };

    /// Parses one checkpoint line (surrounding whitespace allowed).
    pub fn parse(line: &str) -> Result<Checkpoint, serde_json::Error> {
        serde_json::from_str(line.trim())
    }

    /// The wire form: one compact JSON object followed by a newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a checkpoint always serialises");
        line.push('\n');
        line
    }
}

/// How often the SDK takes a checkpoint: when any of the given thresholds is reached.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cadence {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_lines: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_seconds: Option<f64>,
}

impl Default for Cadence {
    /// 64 MiB or 5 seconds, whichever comes first: a few fsyncs per GiB, so the cost stays small,
    /// and at most a few seconds of work lost on a slow stage.
    fn default() -> Self {
        Cadence {
            every_lines: None,
            every_bytes: Some(64 * 1024 * 1024),
            every_seconds: Some(5.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_through_its_wire_form() {
        let cp = Checkpoint {
            input_index: 2,
            line_offset: 10,
            byte_offset: 300,
            output_bytes: 310,
        };
        let line = cp.to_line();
        assert_eq!(
            line,
            "{\"inputIndex\":2,\"lineOffset\":10,\"byteOffset\":300,\"outputBytes\":310}\n"
        );
        assert_eq!(Checkpoint::parse(&line).unwrap(), cp);
    }

    #[test]
    fn checkpoint_rejects_unknown_or_missing_fields() {
        assert!(Checkpoint::parse(r#"{"inputIndex":0,"lineOffset":0,"byteOffset":0}"#).is_err());
        assert!(Checkpoint::parse(
            r#"{"inputIndex":0,"lineOffset":0,"byteOffset":0,"outputBytes":0,"x":1}"#
        )
        .is_err());
        assert!(Checkpoint::parse(
            r#"{"inputIndex":-1,"lineOffset":0,"byteOffset":0,"outputBytes":0}"#
        )
        .is_err());
    }
}
