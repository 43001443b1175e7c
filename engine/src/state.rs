//! The run, stage and metrics records in `state/`: what happened, for people and tools.
//!
//! Every record is versioned and written atomically through [`crate::atomic`], so a reader never
//! sees a torn file. Timing fields are measured, never estimated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the state record formats.
pub const STATE_VERSION: u32 = 1;

/// Status of a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Interrupted,
}

/// What happened to a stage in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Skipped,
    Running,
    Succeeded,
    Resumed,
    Restored,
    Failed,
    NotRun,
    Interrupted,
}

impl StageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Skipped => "skipped",
            StageStatus::Running => "running",
            StageStatus::Succeeded => "succeeded",
            StageStatus::Resumed => "resumed",
            StageStatus::Restored => "restored",
            StageStatus::Failed => "failed",
            StageStatus::NotRun => "not_run",
            StageStatus::Interrupted => "interrupted",
        }
    }
}

/// A stage's line in the run record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunStage {
    pub name: String,
    pub status: StageStatus,
    pub reason: String,
    pub attempts: u32,
    pub duration_ms: u64,
}

/// `state/run_<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub version: u32,
    pub run_id: String,
    pub pipeline: String,
    pub status: RunStatus,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub stages: Vec<RunStage>,
}

/// How an attempt ended, for retry decisions and the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Classification {
    Ok,
    Retryable,
    Fatal,
    Timeout,
    Signal,
    Interrupted,
    /// Over the stage's `memoryMb` cap: killed by the watchdog; not retried.
    Memory,
    /// The sandbox blocked a network access (even one the processor swallowed); not retried.
    Network,
}

/// One attempt of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    pub attempt: u32,
    pub started_at: String,
    pub duration_ms: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub classification: Classification,
    pub delay_before_ms: u64,
    /// The last lines the processor wrote to stderr.
    pub stderr_tail: String,
    /// Where the processor's whole stdout/stderr of this attempt is kept.
    pub log: String,
    /// The offline sandbox layers applied to this attempt (`None`: it never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<crate::sandbox::Layers>,
    /// Network accesses the sandbox blocked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<crate::sandbox::Violation>,
}

/// `state/stage_<name>.json`: the last time this stage ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageRecord {
    pub version: u32,
    pub name: String,
    pub status: StageStatus,
    pub fingerprint: String,
    pub last_run_id: String,
    pub reason: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub attempts: Vec<AttemptRecord>,
    pub resumed_from_line: Option<u64>,
    pub error: Option<String>,
}

/// Per-stage measurements of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageMetrics {
    pub wall_ms: u64,
    pub cpu_user_ms: u64,
    pub cpu_sys_ms: u64,
    pub max_rss_kb: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub lines: u64,
    pub attempts: u32,
}

/// Totals of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub stages: u32,
    pub ran: u32,
    pub skipped: u32,
    pub resumed: u32,
    pub restored: u32,
    pub failed: u32,
    pub retries: u32,
    pub wall_ms: u64,
}

/// `state/metrics_<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub version: u32,
    pub run_id: String,
    pub totals: Totals,
    pub stages: BTreeMap<String, StageMetrics>,
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339_millis(chrono::Utc::now())
}

/// `time` as RFC 3339 UTC with milliseconds. The text of the last millisecond asked for is kept
/// (per thread): a build stamps a log line per event, 20,000 for a no-op of 10,000 stages, most
/// within the same millisecond as the one before.
fn rfc3339_millis(time: chrono::DateTime<chrono::Utc>) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, u32, String)> =
            const { std::cell::RefCell::new((i64::MIN, 0, String::new())) };
    }
    let (seconds, millis) = (time.timestamp(), time.timestamp_subsec_millis());
    LAST.with_borrow_mut(|last| {
        if (last.0, last.1) != (seconds, millis) {
            *last = (
                seconds,
                millis,
                time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
        }
        last.2.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_kept_millisecond_gives_the_same_text_as_formatting_it() {
        let at = |s: i64, ns: u32| chrono::Utc.timestamp_opt(s, ns).unwrap();
        let times = [
            at(1_700_000_000, 0),
            at(1_700_000_000, 999_999),
            at(1_700_000_000, 1_000_000),
            at(1_700_000_000, 1_999_999),
            at(1_700_000_000, 999_999_999),
            at(1_700_000_001, 0),
            at(1_700_000_001, 999_999_999),
            at(1_700_000_000, 500_000_000),
            at(1_700_000_001, 1_000_000),
            // Same millisecond of another second.
            at(1_700_000_002, 1_000_000),
        ];
        for time in times {
            assert_eq!(
                rfc3339_millis(time),
                time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "{time:?}"
            );
        }
        assert!(now_rfc3339().ends_with('Z'));
    }
}
