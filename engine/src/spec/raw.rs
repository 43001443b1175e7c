//! The Pipefile as written: serde types that mirror the JSON one to one.
//!
//! Nothing outside [`crate::spec`] sees these types: [`super::validate`] turns them into the
//! checked [`super::Spec`]. They also generate the JSON Schema (`pipe schema`), so the schema and
//! the parser can never disagree.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A `Pipefile.json`: stages that turn input files into output folders.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "pipe Pipefile (version 1)")]
pub struct RawPipefile {
    /// Reference to the JSON Schema, for editors. Ignored by pipe.
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    /// Format version: always 1.
    pub version: u32,
    /// Settings that apply to every stage unless the stage overrides them.
    #[serde(default)]
    pub settings: RawSettings,
    /// The stages, in the order that breaks ties between independent stages.
    pub stages: Vec<RawStage>,
}

/// Pipeline-wide settings.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSettings {
    /// Resources the whole build may use at once.
    #[serde(default)]
    pub quotas: Option<RawQuotas>,
    /// Default retry policy of every stage.
    #[serde(default)]
    pub retry: Option<RawRetry>,
    /// Default checkpoint cadence of every stage.
    #[serde(default)]
    pub checkpoint: Option<RawCheckpoint>,
    /// Default of every stage's `hermetic` (false).
    #[serde(default)]
    pub hermetic: Option<bool>,
    /// Paths every stage's sandbox may read or write (added to each stage's own).
    #[serde(default)]
    pub sandbox: Option<RawSandbox>,
    /// Where stages and map items run: "local" (default) or "slurm" (`--executor` overrides).
    #[serde(default)]
    pub executor: Option<RawExecutor>,
    /// Options of the Slurm executor (used when the executor is "slurm"); see docs/slurm.md.
    #[serde(default)]
    pub slurm: Option<RawSlurm>,
}

/// Where stages and map items run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawExecutor {
    /// Child processes of `pipe` on this machine.
    Local,
    /// One Slurm batch job per stage attempt (map items batched into jobs).
    Slurm,
}

/// Options of the Slurm executor.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSlurm {
    /// `sbatch --partition` (default: the cluster's default partition).
    pub partition: Option<String>,
    /// `sbatch --account` (default: the user's default account).
    pub account: Option<String>,
    /// More `sbatch` options, one argument each (e.g. ["--qos=normal"]); each must start with `-`.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// How often the job queue is polled, in milliseconds (default 1000, at least 100).
    pub poll_interval_ms: Option<u64>,
    /// Jobs of this build submitted and not finished at once (default 8).
    pub max_jobs_in_flight: Option<u32>,
    /// Map items run one after another in one job, at most this many (default: the items to run
    /// spread evenly over `maxJobsInFlight` jobs, at most 64 per job).
    pub items_per_job: Option<u32>,
}

/// Paths a processor's sandbox may use beyond its own (relative to the Pipefile's folder, or
/// absolute). Each must exist.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSandbox {
    /// Folders or files a hermetic processor may also read (e.g. a reference data set outside
    /// the project, a user site-packages).
    #[serde(default)]
    pub readable_paths: Vec<String>,
    /// Folders or files the processor may also write (besides its staging and temp folders).
    #[serde(default)]
    pub writable_paths: Vec<String>,
    /// Environment variables passed through to the processor besides the built-in allowlist
    /// (never a `*_PROXY`).
    #[serde(default)]
    pub pass_env: Vec<String>,
}

/// The offline guard's settings of a stage.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawOffline {
    /// Static-scan rule ids (e.g. "socket", "urllib") this stage may match without failing the
    /// build; each allowed finding is still reported and recorded.
    #[serde(default)]
    pub allow_static_findings: Vec<String>,
}

/// Resources available to the whole build.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawQuotas {
    /// CPU cores (default: all of the machine's).
    pub cpus: Option<u32>,
    /// Memory in MiB (default: unlimited).
    pub memory_mb: Option<u64>,
    /// Concurrent IO-heavy stages (default 2).
    pub io: Option<u32>,
}

/// One stage's resource needs.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawResources {
    /// CPU cores (default 1).
    pub cpus: Option<u32>,
    /// Resident memory cap in MiB of the processor and everything it starts: over it, the
    /// attempt is killed and classified `memory` (not retried).
    pub memory_mb: Option<u64>,
    /// Optional address-space limit in MiB (`RLIMIT_AS`), a backstop for runaway allocation.
    pub virtual_memory_mb: Option<u64>,
    /// IO slots (default 0).
    pub io: Option<u32>,
}

/// How failed attempts are retried. A stage's fields override the settings' field by field.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRetry {
    /// Attempts in all, including the first (default 1: no retry).
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt, in milliseconds (default 200).
    pub base_delay_ms: Option<u64>,
    /// Upper bound of any delay, in milliseconds (default 5000).
    pub max_delay_ms: Option<u64>,
    /// Growth of the delay from one attempt to the next (default 2.0).
    pub multiplier: Option<f64>,
    /// Randomisation of each delay (default "full").
    pub jitter: Option<RawJitter>,
    /// Exit codes that mean "try again" (default [75], EX_TEMPFAIL).
    pub retryable_exit_codes: Option<Vec<i32>>,
    /// Whether an attempt killed at `timeoutSec` is retried (default false).
    pub retry_on_timeout: Option<bool>,
    /// Time limit of one attempt, in seconds (default: none).
    pub timeout_sec: Option<f64>,
}

/// Jitter applied to retry delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawJitter {
    None,
    Full,
    Equal,
}

/// How often processors take a durable checkpoint (any threshold reached triggers one).
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCheckpoint {
    pub every_lines: Option<u64>,
    pub every_bytes: Option<u64>,
    pub every_seconds: Option<f64>,
}

/// One stage: a processor applied to inputs, producing the files of one output folder.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawStage {
    /// Unique name; also names the stage's state files, so letters, digits, `_`, `-`, `.` only.
    pub name: String,
    /// What does the work.
    pub processor: RawProcessor,
    /// Files, folders (every file below) or globs, relative to the Pipefile's folder.
    pub inputs: Vec<String>,
    /// The folder this stage owns and publishes its outputs into.
    pub output_dir: String,
    /// Free-form parameters handed to the processor as `PIPELINE_PARAMS`.
    #[serde(default)]
    pub params: Option<Map<String, Value>>,
    /// Stages that must finish first even though no input says so.
    #[serde(default)]
    pub after: Vec<String>,
    // Boxed, like the other fields a stage seldom sets: absent, it costs a pointer rather than its
    // whole struct (a parsed stage was 552 bytes; a Pipefile of 100,000 stages is parsed whole).
    /// Retry policy (overrides `settings.retry` field by field).
    #[serde(default)]
    pub retry: Option<Box<RawRetry>>,
    /// Resources this stage needs while it runs.
    #[serde(default)]
    pub resources: Option<Box<RawResources>>,
    /// Checkpoint cadence (overrides `settings.checkpoint`).
    #[serde(default)]
    pub checkpoint: Option<Box<RawCheckpoint>>,
    /// Human description, shown by `pipe graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// `"file"`: a map stage, running its processor once per input file, each with its own
    /// fingerprint and cache entry, so editing one file of many reruns only that one.
    #[serde(default)]
    pub foreach: Option<RawForeach>,
    /// Let the processor read only its declared inputs, processor files and system locations
    /// (overrides `settings.hermetic`; needs Landlock).
    #[serde(default)]
    pub hermetic: Option<bool>,
    /// The offline guard's settings of this stage.
    #[serde(default)]
    pub offline: Option<Box<RawOffline>>,
    /// Extra paths this stage's sandbox may read or write.
    #[serde(default)]
    pub sandbox: Option<Box<RawSandbox>>,
}

/// What a map stage maps over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawForeach {
    /// One processor run per input file.
    File,
}

/// A built-in processor (`builtin` + `version`) or an external command (`command` + `version`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawProcessor {
    /// Name of a built-in processor: `copy` or `upper`.
    pub builtin: Option<String>,
    /// argv of an external processor; elements naming files in the project are fingerprinted.
    pub command: Option<Vec<String>>,
    /// Your version of the processor's behaviour: changing it reruns the stage.
    pub version: String,
    /// More files the processor depends on (modules, configs), fingerprinted by content.
    #[serde(default)]
    pub files: Vec<String>,
}

/// The JSON Schema of the Pipefile, pretty-printed.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(RawPipefile);
    serde_json::to_string_pretty(&schema).expect("the schema serialises") + "\n"
}
