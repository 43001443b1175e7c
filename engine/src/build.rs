//! One `pipe build`: lock, decide each stage in topological order, run, publish, record.
//!
//! Stages run one after another in topological order here; the decision for a stage is made only
//! when all its upstream stages have published, so it sees their real outputs (early cutoff).
//! A failure stops the build unless `--keep-going`, which still runs every stage not downstream
//! of a failure. Every state write goes through [`crate::atomic`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipe_processors::checkpoint::Checkpoint;

use crate::event::Event;
use crate::executor::{self, Invocation, Outcome};
use crate::graph::Graph;
use crate::hashing::StatCache;
use crate::lock::{self, Holder, LockError, Wait};
use crate::plan::{self, Decision, Progress, StagePlan};
use crate::publish::{self, Recovery};
use crate::spec::{Processor, Spec, Stage};
use crate::state::{
    self, AttemptRecord, Classification, Metrics, RunRecord, RunStage, RunStatus, StageMetrics,
    StageRecord, StageStatus, Totals,
};
use crate::workspace::Workspace;
use crate::{atomic, retry, runid};

/// Above this size the input list goes to a file (`PIPELINE_INPUTS_FILE`).
const MAX_INPUTS_ENV: usize = 64 * 1024;

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub run_id: Option<String>,
    /// Stages to build (with what they need); empty: all.
    pub targets: Vec<String>,
    pub keep_going: bool,
    pub wait_lock: Wait,
    /// The `pipe` binary, which runs built-in processors (`pipe processor NAME`).
    pub exe: PathBuf,
    /// Set by SIGINT/SIGTERM: stop the running processor, keep its checkpoint, exit 130.
    pub interrupt: Arc<AtomicBool>,
}

/// Why a build could not start (as opposed to a stage failing).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid run id `{0}`: use 1 to 100 letters, digits, `_`, `-` or `.`")]
    BadRunId(String),
    #[error(
        "run id `{0}` was already used (state/run_{0}.json exists): a run id names one run forever"
    )]
    RunIdUsed(String),
    #[error("unknown stage `{0}`")]
    UnknownStage(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot write state: {0}")]
    State(#[from] io::Error),
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildReport {
    pub run: RunRecord,
    pub metrics: Metrics,
}

/// Stage indices `targets` name, with everything they need; all stages when `targets` is empty.
pub fn selection(
    spec: &Spec,
    graph: &Graph,
    targets: &[String],
) -> Result<BTreeSet<usize>, String> {
    if targets.is_empty() {
        return Ok((0..spec.stages.len()).collect());
    }
    let mut indices = Vec::new();
    for t in targets {
        indices.push(spec.stage_index(t).ok_or_else(|| t.clone())?);
    }
    Ok(graph.with_dependencies(&indices))
}

/// Runs a build.
pub fn build(
    spec: &Spec,
    graph: &Graph,
    opts: &BuildOptions,
    report: &mut dyn FnMut(&Event),
) -> Result<BuildReport, BuildError> {
    let ws = Workspace::new(spec);
    let run_id = match &opts.run_id {
        Some(id) if !runid::valid(id) => return Err(BuildError::BadRunId(id.clone())),
        Some(id) => id.clone(),
        None => runid::generate(),
    };
    let selected = selection(spec, graph, &opts.targets).map_err(BuildError::UnknownStage)?;
    let me = Holder {
        pid: std::process::id(),
        run_id: run_id.clone(),
        command: "build".into(),
        started_at: state::now_rfc3339(),
    };
    let _lock = lock::acquire(&ws, &me, opts.wait_lock, |holder| {
        report(&Event::Warning {
            message: format!("waiting for the workspace lock held by {holder}"),
        })
    })?;
    if ws.run_file(&run_id).exists() {
        return Err(BuildError::RunIdUsed(run_id));
    }
    ws.sweep_temporaries(spec.stages.iter().map(|s| s.output_dir.as_str()))?;
    let mut recovery_cache = StatCache::load(&ws.stat_cache_file());
    for stage in &spec.stages {
        match publish::recover(&ws.publish_target(stage), &mut recovery_cache)? {
            Recovery::Nothing => {}
            Recovery::Completed => report(&Event::Warning {
                message: format!("completed the interrupted publish of `{}`", stage.name),
            }),
            Recovery::Abandoned(why) => report(&Event::Warning {
                message: format!(
                    "could not complete the interrupted publish of `{}` ({why}); it runs again",
                    stage.name
                ),
            }),
        }
    }
    let mut b = Builder {
        spec,
        ws: ws.clone(),
        opts,
        cache: recovery_cache,
        started: Instant::now(),
        run: RunRecord {
            version: state::STATE_VERSION,
            run_id: run_id.clone(),
            pipeline: spec.file.clone(),
            status: RunStatus::Running,
            started_at: state::now_rfc3339(),
            finished_at: None,
            duration_ms: None,
            stages: Vec::new(),
        },
        metrics: BTreeMap::new(),
        totals: Totals::default(),
    };
    b.save_run()?;
    report(&Event::RunStarted {
        run_id: run_id.clone(),
        pipeline: spec.file.clone(),
        stages: selected.len(),
    });
    let mut statuses: BTreeMap<usize, StageStatus> = BTreeMap::new();
    let mut stop = false;
    for &i in graph.order().iter().filter(|i| selected.contains(i)) {
        let stage = &spec.stages[i];
        let blocked = graph
            .upstream(i)
            .into_iter()
            .filter(|u| selected.contains(u))
            .find(|u| {
                !matches!(
                    statuses.get(u),
                    Some(
                        StageStatus::Skipped
                            | StageStatus::Succeeded
                            | StageStatus::Resumed
                            | StageStatus::Restored
                    )
                )
            });
        let (status, reason, attempts, duration) = if stop || opts.interrupt.load(Ordering::SeqCst)
        {
            (
                StageStatus::NotRun,
                "the build stopped before this stage".to_string(),
                0,
                0,
            )
        } else if let Some(u) = blocked {
            (
                StageStatus::NotRun,
                format!("upstream {} {}", spec.stages[u].name, statuses[&u].as_str()),
                0,
                0,
            )
        } else {
            // An error of pipe's own (a state write, the staging folder) fails this stage, and the
            // build stops with its records closed, rather than leaving them `running`.
            b.run_stage(i, report)
                .unwrap_or_else(|err| (StageStatus::Failed, err.to_string(), 0, 0))
        };
        match status {
            StageStatus::Failed if !opts.keep_going => stop = true,
            StageStatus::Interrupted => stop = true,
            _ => {}
        }
        statuses.insert(i, status);
        report(&Event::StageFinished {
            stage: stage.name.clone(),
            status,
            duration_ms: duration,
            reason: reason.clone(),
        });
        b.run.stages.push(RunStage {
            name: stage.name.clone(),
            status,
            reason,
            attempts,
            duration_ms: duration,
        });
        b.count(status);
        b.save_run()?;
    }
    let interrupted = statuses.values().any(|s| *s == StageStatus::Interrupted)
        || opts.interrupt.load(Ordering::SeqCst);
    let failed = statuses.values().any(|s| *s == StageStatus::Failed);
    b.run.status = if interrupted {
        RunStatus::Interrupted
    } else if failed {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    let wall = b.started.elapsed().as_millis() as u64;
    b.run.finished_at = Some(state::now_rfc3339());
    b.run.duration_ms = Some(wall);
    b.totals.stages = b.run.stages.len() as u32;
    b.totals.wall_ms = wall;
    let metrics = Metrics {
        version: state::STATE_VERSION,
        run_id: run_id.clone(),
        totals: b.totals.clone(),
        stages: std::mem::take(&mut b.metrics),
    };
    atomic::write_json(&ws.metrics_file(&run_id), &metrics)?;
    b.save_run()?;
    b.cache.prune_missing();
    if let Err(err) = b.cache.save(&ws.stat_cache_file()) {
        report(&Event::Warning {
            message: format!("could not save the stat cache (next build rehashes): {err}"),
        });
    }
    report(&Event::RunFinished {
        run_id,
        status: b.run.status,
        duration_ms: wall,
        totals: b.totals.clone(),
    });
    Ok(BuildReport {
        run: b.run,
        metrics,
    })
}

struct Builder<'a> {
    spec: &'a Spec,
    ws: Workspace,
    opts: &'a BuildOptions,
    cache: StatCache,
    started: Instant,
    run: RunRecord,
    metrics: BTreeMap<String, StageMetrics>,
    totals: Totals,
}

/// Status, reason, attempts, duration of one stage in this run.
type StageOutcome = (StageStatus, String, u32, u64);

impl Builder<'_> {
    fn save_run(&self) -> io::Result<()> {
        atomic::write_json(&self.ws.run_file(&self.run.run_id), &self.run)
    }

    fn count(&mut self, status: StageStatus) {
        let t = &mut self.totals;
        match status {
            StageStatus::Skipped => t.skipped += 1,
            StageStatus::Succeeded => t.ran += 1,
            StageStatus::Resumed => {
                t.ran += 1;
                t.resumed += 1
            }
            StageStatus::Restored => t.restored += 1,
            StageStatus::Failed => t.failed += 1,
            _ => {}
        }
    }

    /// Decides and, if needed, runs stage `i`.
    fn run_stage(
        &mut self,
        i: usize,
        report: &mut dyn FnMut(&Event),
    ) -> Result<StageOutcome, BuildError> {
        let stage = &self.spec.stages[i];
        let started = Instant::now();
        let plan = match plan::decide(self.spec, &self.ws, i, &mut self.cache) {
            Ok(plan) => plan,
            Err(err) => {
                let duration = started.elapsed().as_millis() as u64;
                let now = state::now_rfc3339();
                let record = StageRecord {
                    version: state::STATE_VERSION,
                    name: stage.name.clone(),
                    status: StageStatus::Failed,
                    fingerprint: String::new(),
                    last_run_id: self.run.run_id.clone(),
                    reason: "cannot be planned".into(),
                    started_at: now.clone(),
                    finished_at: Some(now),
                    duration_ms: Some(duration),
                    attempts: Vec::new(),
                    resumed_from_line: None,
                    error: Some(err.to_string()),
                };
                atomic::write_json(&self.ws.stage_file(&stage.name), &record)?;
                return Ok((StageStatus::Failed, err.to_string(), 0, duration));
            }
        };
        for warning in &plan.warnings {
            report(&Event::Warning {
                message: warning.clone(),
            });
        }
        report(&Event::StagePlanned {
            stage: stage.name.clone(),
            summary: plan.decision.describe(),
            decision: plan.decision.clone(),
        });
        if plan.decision == Decision::Skip {
            self.metrics
                .insert(stage.name.clone(), StageMetrics::default());
            return Ok((
                StageStatus::Skipped,
                "unchanged".into(),
                0,
                started.elapsed().as_millis() as u64,
            ));
        }
        let reason = plan.decision.describe();
        self.execute(stage, &plan, reason, report)
    }

    /// Runs a stage's processor (with retries) and publishes its outputs.
    fn execute(
        &mut self,
        stage: &Stage,
        plan: &StagePlan,
        reason: String,
        report: &mut dyn FnMut(&Event),
    ) -> Result<StageOutcome, BuildError> {
        let started = Instant::now();
        let fingerprint = plan
            .fingerprint
            .clone()
            .expect("a decided stage has a fingerprint");
        let inputs = plan.inputs.as_ref().expect("a decided stage has inputs");
        let staging = self.ws.staging_dir(&stage.output_dir);
        let mut resume = match &plan.decision {
            Decision::Resume { checkpoint, .. } => Some(*checkpoint),
            _ => {
                reset_staging(&staging, &self.ws.progress_file(&stage.name))?;
                None
            }
        };
        let resumed_from_line = resume.map(|c| c.line_offset);
        let mut record = StageRecord {
            version: state::STATE_VERSION,
            name: stage.name.clone(),
            status: StageStatus::Running,
            fingerprint: fingerprint.clone(),
            last_run_id: self.run.run_id.clone(),
            reason: reason.clone(),
            started_at: state::now_rfc3339(),
            finished_at: None,
            duration_ms: None,
            attempts: Vec::new(),
            resumed_from_line,
            error: None,
        };
        atomic::write_json(&self.ws.stage_file(&stage.name), &record)?;
        let mut metrics = StageMetrics {
            input_bytes: inputs
                .files
                .values()
                .filter_map(|p| p.metadata().ok())
                .map(|m| m.len())
                .sum(),
            ..StageMetrics::default()
        };
        let base_env = self.environment(stage, inputs)?;
        let mut lines_by_input: BTreeMap<u64, u64> = BTreeMap::new();
        let policy = &stage.retry;
        let mut attempt = 0;
        let mut delay = 0;
        let final_status = loop {
            attempt += 1;
            if attempt > 1 {
                delay = retry::delay_ms(policy, &self.run.run_id, &stage.name, attempt);
                if !sleep_unless_interrupted(Duration::from_millis(delay), &self.opts.interrupt) {
                    break StageStatus::Interrupted;
                }
            }
            report(&Event::StageStarted {
                stage: stage.name.clone(),
                attempt,
            });
            let log = self
                .ws
                .logs_dir(&self.run.run_id)
                .join(format!("{}.attempt{attempt}.log", stage.name));
            let mut env = base_env.clone();
            env.push(("PIPELINE_ATTEMPT".into(), attempt.to_string().into()));
            if let Some(cp) = resume {
                env.push((
                    "PIPELINE_RESUME".into(),
                    serde_json::to_string(&cp)
                        .expect("checkpoint serialises")
                        .into(),
                ));
            }
            let inv = Invocation {
                argv: self.argv(stage),
                env,
                cwd: self.spec.root.clone(),
                log: log.clone(),
                timeout: policy.timeout,
            };
            let attempt_started = state::now_rfc3339();
            let progress_path = self.ws.progress_file(&stage.name);
            let stage_name = stage.name.clone();
            let fp = fingerprint.clone();
            let mut on_checkpoint = |cp: Checkpoint| -> io::Result<()> {
                let progress = Progress {
                    stage: stage_name.clone(),
                    fingerprint: fp.clone(),
                    input_index: cp.input_index,
                    line_offset: cp.line_offset,
                    byte_offset: cp.byte_offset,
                    output_bytes: cp.output_bytes,
                    updated_at: state::now_rfc3339(),
                };
                atomic::write_json(&progress_path, &progress)?;
                lines_by_input.insert(cp.input_index, cp.line_offset);
                report(&Event::Checkpoint {
                    stage: stage_name.clone(),
                    input_index: cp.input_index,
                    line_offset: cp.line_offset,
                    byte_offset: cp.byte_offset,
                });
                Ok(())
            };
            let outcome = executor::run(&inv, &self.opts.interrupt, &mut on_checkpoint)
                .unwrap_or_else(|err| Outcome {
                    protocol_error: Some(format!(
                        "cannot start the processor `{}`: {err}",
                        inv.argv[0].to_string_lossy()
                    )),
                    ..Outcome::default()
                });
            metrics.cpu_user_ms += outcome.user_ms;
            metrics.cpu_sys_ms += outcome.sys_ms;
            metrics.max_rss_kb = metrics.max_rss_kb.max(outcome.max_rss_kb);
            let classification = classify(&outcome, policy);
            let tail = executor::tail(&log, 20);
            record.attempts.push(AttemptRecord {
                attempt,
                started_at: attempt_started,
                duration_ms: outcome.duration.as_millis() as u64,
                exit_code: outcome.exit_code,
                signal: outcome.signal,
                classification,
                delay_before_ms: delay,
                stderr_tail: tail.clone(),
                log: self.ws.relative(&log),
            });
            if classification == Classification::Ok {
                break StageStatus::Succeeded;
            }
            let message = failure_message(&outcome, classification, &tail);
            record.error = Some(message.clone());
            if classification == Classification::Interrupted {
                break StageStatus::Interrupted;
            }
            let retryable = classification == Classification::Retryable
                || (classification == Classification::Timeout && policy.retry_on_timeout);
            let more = retryable && attempt < policy.max_attempts;
            let retry_in_ms =
                more.then(|| retry::delay_ms(policy, &self.run.run_id, &stage.name, attempt + 1));
            report(&Event::AttemptFailed {
                stage: stage.name.clone(),
                attempt,
                classification,
                message,
                retry_in_ms,
            });
            atomic::write_json(&self.ws.stage_file(&stage.name), &record)?;
            if !more {
                break StageStatus::Failed;
            }
            self.totals.retries += 1;
            // A retry resumes from the last durable checkpoint of this fingerprint.
            resume = match plan::read_progress(&self.ws, &stage.name) {
                Ok(Some(p)) if p.fingerprint == fingerprint => Some(p.checkpoint()),
                _ => {
                    reset_staging(&staging, &self.ws.progress_file(&stage.name))?;
                    None
                }
            };
        };
        let mut status = final_status;
        if status == StageStatus::Succeeded {
            let target = self.ws.publish_target(stage);
            let ingredients = plan.ingredients.as_ref().expect("decided");
            match publish::publish(
                &target,
                plan.marker.as_ref(),
                &self.run.run_id,
                &fingerprint,
                ingredients,
                &mut self.cache,
            ) {
                Ok(marker) => {
                    metrics.output_bytes = marker.outputs.iter().map(|o| o.size).sum();
                    record.error = None;
                    if resumed_from_line.is_some() {
                        status = StageStatus::Resumed;
                    }
                }
                Err(err) => {
                    record.error = Some(format!("publishing outputs failed: {err}"));
                    status = StageStatus::Failed;
                }
            }
        }
        let duration = started.elapsed().as_millis() as u64;
        record.status = status;
        record.finished_at = Some(state::now_rfc3339());
        record.duration_ms = Some(duration);
        atomic::write_json(&self.ws.stage_file(&stage.name), &record)?;
        metrics.wall_ms = duration;
        metrics.attempts = attempt;
        metrics.lines = lines_by_input.values().sum();
        self.metrics.insert(stage.name.clone(), metrics);
        let reason = match (&record.error, status) {
            (Some(err), StageStatus::Failed | StageStatus::Interrupted) => err.clone(),
            _ => reason,
        };
        Ok((status, reason, attempt, duration))
    }

    fn argv(&self, stage: &Stage) -> Vec<OsString> {
        match &stage.processor {
            Processor::Builtin { name, .. } => vec![
                self.opts.exe.clone().into(),
                "processor".into(),
                name.into(),
            ],
            Processor::Command { argv, .. } => argv.iter().map(OsString::from).collect(),
        }
    }

    /// The `PIPELINE_*` environment of a stage (without the per-attempt variables).
    fn environment(
        &self,
        stage: &Stage,
        inputs: &crate::inputs::ResolvedInputs,
    ) -> io::Result<Vec<(OsString, OsString)>> {
        let staging = self.ws.staging_dir(&stage.output_dir);
        let paths: Vec<&PathBuf> = inputs.files.values().collect();
        let list = serde_json::to_string(&paths).map_err(io::Error::other)?;
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PIPELINE_RUN_ID".into(), self.run.run_id.clone().into()),
            ("PIPELINE_STAGE".into(), stage.name.clone().into()),
            (
                "PIPELINE_INPUT_ROOT".into(),
                self.spec.path(&inputs.root).into(),
            ),
            ("PIPELINE_OUTPUT_DIR".into(), staging.into()),
            (
                "PIPELINE_PARAMS".into(),
                serde_json::Value::Object(stage.params.clone())
                    .to_string()
                    .into(),
            ),
            (
                "PIPELINE_CHECKPOINT".into(),
                serde_json::to_string(&stage.cadence)
                    .map_err(io::Error::other)?
                    .into(),
            ),
            (
                "PIPELINE_CPUS".into(),
                stage.resources.cpus.to_string().into(),
            ),
            (
                "OMP_NUM_THREADS".into(),
                stage.resources.cpus.to_string().into(),
            ),
            (
                "RAYON_NUM_THREADS".into(),
                stage.resources.cpus.to_string().into(),
            ),
        ];
        if let Some(mb) = stage.resources.memory_mb {
            env.push(("PIPELINE_MEMORY_MB".into(), mb.to_string().into()));
        }
        if list.len() > MAX_INPUTS_ENV {
            let file = self
                .ws
                .logs_dir(&self.run.run_id)
                .join(format!("{}.inputs.json", stage.name));
            atomic::write(&file, list.as_bytes())?;
            env.push(("PIPELINE_INPUTS_FILE".into(), file.into()));
        } else {
            env.push(("PIPELINE_INPUTS".into(), list.into()));
        }
        Ok(env)
    }
}

/// Empties the staging folder and forgets stale progress: a fresh start.
fn reset_staging(staging: &std::path::Path, progress: &std::path::Path) -> io::Result<()> {
    atomic::remove_if_exists(progress)?;
    match std::fs::remove_dir_all(staging) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    std::fs::create_dir_all(staging)
}

/// How an attempt ended, in retry-policy terms.
pub fn classify(outcome: &Outcome, policy: &crate::spec::RetryPolicy) -> Classification {
    if outcome.interrupted {
        Classification::Interrupted
    } else if outcome.timed_out {
        Classification::Timeout
    } else if outcome.protocol_error.is_some() {
        Classification::Fatal
    } else if outcome.signal.is_some() {
        Classification::Signal
    } else {
        match outcome.exit_code {
            Some(0) => Classification::Ok,
            Some(code) if policy.retryable_exit_codes.contains(&code) => Classification::Retryable,
            _ => Classification::Fatal,
        }
    }
}

fn failure_message(outcome: &Outcome, classification: Classification, tail: &str) -> String {
    let what = if let Some(err) = &outcome.protocol_error {
        format!("protocol error: {err}")
    } else {
        match classification {
            Classification::Timeout => format!(
                "timed out after {} ms and was killed",
                outcome.duration.as_millis()
            ),
            Classification::Interrupted => "interrupted".to_string(),
            _ => match (outcome.exit_code, outcome.signal) {
                (Some(code), _) => format!("processor exited with code {code}"),
                (_, Some(sig)) => format!("processor was killed by signal {sig}"),
                _ => "processor ended abnormally".to_string(),
            },
        }
    };
    let last = tail.lines().rev().find(|l| !l.trim().is_empty());
    match last {
        Some(line) => format!("{what}: {}", line.trim()),
        None => what,
    }
}

/// Sleeps `total` unless interrupted first; returns false when interrupted.
fn sleep_unless_interrupted(total: Duration, interrupt: &AtomicBool) -> bool {
    let end = Instant::now() + total;
    loop {
        if interrupt.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}
