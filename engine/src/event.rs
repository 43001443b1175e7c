//! Build events: what the engine tells the outside world while it works.
//!
//! The engine never prints. It emits [`Event`]s to a callback; the CLI renders them as human
//! lines on stderr or, with `--message-format json`, as one JSON object per line on stdout for
//! editors and tools.

use serde::Serialize;

use crate::plan::Decision;
use crate::state::{Classification, RunStatus, StageStatus, Totals};

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event {
    #[serde(rename_all = "camelCase")]
    RunStarted {
        run_id: String,
        pipeline: String,
        stages: usize,
    },
    #[serde(rename_all = "camelCase")]
    StagePlanned {
        stage: String,
        summary: String,
        #[serde(flatten)]
        decision: Decision,
    },
    #[serde(rename_all = "camelCase")]
    StageStarted { stage: String, attempt: u32 },
    #[serde(rename_all = "camelCase")]
    Checkpoint {
        stage: String,
        input_index: u64,
        line_offset: u64,
        byte_offset: u64,
    },
    #[serde(rename_all = "camelCase")]
    AttemptFailed {
        stage: String,
        attempt: u32,
        classification: Classification,
        message: String,
        retry_in_ms: Option<u64>,
    },
    /// A stage's outputs and then its marker were published (after a run or a cache restore).
    #[serde(rename_all = "camelCase")]
    StagePublished {
        stage: String,
        fingerprint: String,
        /// Output files the marker lists, and their total size.
        files: usize,
        bytes: u64,
    },
    #[serde(rename_all = "camelCase")]
    StageFinished {
        stage: String,
        status: StageStatus,
        duration_ms: u64,
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    Warning { message: String },
    /// The audit log's head after the run: write it down elsewhere (`pipe audit verify --head`).
    #[serde(rename_all = "camelCase")]
    AuditHead { seq: u64, hash: String },
    #[serde(rename_all = "camelCase")]
    RunFinished {
        run_id: String,
        status: RunStatus,
        duration_ms: u64,
        totals: Totals,
    },
}
