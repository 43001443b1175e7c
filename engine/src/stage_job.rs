//! One stage's run on a worker thread: attempts with retries and backoff, then publishing.
//!
//! A [`StageJob`] owns everything it needs (no borrows of the build), so the scheduler can hand it
//! to a pool thread. It writes only the files that belong to its stage and that nobody else
//! writes while it runs: the staging folder, `state/progress_<stage>.json`, its stage record
//! `state/stage_<stage>.json` (the coordinator writes the record only before the job starts), the
//! attempt logs and (through [`crate::publish`]) its outputs and marker. Everything else — the run
//! record, audit log, metrics, console output, the stat cache — goes to the coordinator as
//! [`JobMessage`]s, which is the single writer of shared state. Writing the stage record here
//! keeps its two fsyncs off the coordinator, which every stage's end passes through.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipe_processors::checkpoint::Checkpoint;

use crate::event::Event;
use crate::executor::{self, Invocation, Outcome};
use crate::hashing::StatCache;
use crate::inputs::ResolvedInputs;
use crate::marker::{ItemEntry, Marker};
use crate::plan::{self, ItemAction, ItemPlan, Progress};
use crate::publish;
use crate::spec::{Processor, RetryPolicy, Spec, Stage};
use crate::state::{self, AttemptRecord, Classification, StageMetrics, StageRecord, StageStatus};
use crate::store::{ActionEntry, Store};
use crate::workspace::Workspace;
use crate::{atomic, retry};

/// Above this size the input list goes to a file (`PIPELINE_INPUTS_FILE`).
const MAX_INPUTS_ENV: usize = 64 * 1024;

/// Where attempts run: child processes on this machine, or Slurm jobs.
#[derive(Debug, Clone, Default)]
pub enum Executor {
    /// [`executor::run`]: a child process through the sandbox helper.
    #[default]
    Local,
    /// [`crate::slurm::Cluster::run`]: a Slurm job running the same helper on a node.
    Slurm(Arc<crate::slurm::Cluster>),
}

/// Which unit of a stage an attempt is: the stage itself, or map item `index` (with `batch`
/// items at most per Slurm job).
#[derive(Debug, Clone, Copy)]
enum Unit {
    Stage,
    Item { index: usize, batch: u32 },
}

/// What a worker tells the coordinator.
#[derive(Debug)]
pub enum JobMessage {
    /// Something to show the user.
    Event(Event),
    /// The job could not write its stage record: the build stops with this error.
    RecordFailed(io::Error),
    /// A processor started (its pid is also its process group; with its start time, from
    /// `/proc`, it names the process across time).
    Spawned {
        stage: String,
        pid: u32,
        start_time: u64,
    },
    /// A processor [`JobMessage::Spawned`] announced ended, and its process group was stopped.
    Exited {
        stage: String,
        pid: u32,
        start_time: u64,
    },
    /// The stage's processor is done and succeeded: what is left is publishing (moving the outputs
    /// into place, syncing, the marker, the cache, the stage record), which needs none of the
    /// stage's resources. The coordinator may hand them to the next stage meanwhile.
    Released(usize),
    /// The stage is done.
    Done(usize, Box<JobResult>),
}

/// How a stage's run ended.
#[derive(Debug)]
pub struct JobResult {
    pub status: StageStatus,
    pub reason: String,
    pub attempts: u32,
    pub duration_ms: u64,
    pub retries: u32,
    pub metrics: StageMetrics,
    /// Hashes of the files this job published, for the coordinator's stat cache.
    pub hashes: StatCache,
}

/// Everything one stage's run needs, owned.
#[derive(Debug)]
pub struct StageJob {
    pub index: usize,
    pub stage: Stage,
    pub root: PathBuf,
    pub ws: Workspace,
    pub run_id: String,
    pub exe: PathBuf,
    pub interrupt: Arc<AtomicBool>,
    pub fingerprint: String,
    pub ingredients: crate::fingerprint::Ingredients,
    pub inputs: ResolvedInputs,
    pub previous: Option<Marker>,
    pub resume: Option<Checkpoint>,
    /// The run whose cached outputs this job restores, if the planner chose to restore.
    pub restore_from: Option<String>,
    pub record: StageRecord,
    /// Cores the processor may be pinned to (empty: no pinning).
    pub cores: Vec<usize>,
    /// How the attempts are confined (set by the coordinator; the default refuses to run).
    pub sandbox: crate::sandbox::Policy,
    /// Map stages: the item entries of the marker this job will write.
    pub items: BTreeMap<String, ItemEntry>,
    /// Map stages: what the planner decided for each input file.
    pub map_items: Option<Vec<ItemPlan>>,
    /// Where the attempts run (set by the coordinator).
    pub executor: Executor,
}

impl StageJob {
    /// Builds the job for a stage the planner decided to run or resume (a map stage's item plans
    /// are `map_items`, taken out of the plan's decision).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: &Spec,
        ws: &Workspace,
        index: usize,
        plan: plan::StagePlan,
        map_items: Option<Vec<ItemPlan>>,
        run_id: &str,
        exe: &Path,
        interrupt: &Arc<AtomicBool>,
        reason: String,
    ) -> StageJob {
        let stage = spec.stages[index].clone();
        let fingerprint = plan.fingerprint.expect("a decided stage has a fingerprint");
        let resume = match &plan.decision {
            plan::Decision::Resume { checkpoint, .. } => Some(*checkpoint),
            _ => None,
        };
        let record = StageRecord {
            version: state::STATE_VERSION,
            name: stage.name.clone(),
            status: StageStatus::Running,
            fingerprint: fingerprint.clone(),
            last_run_id: run_id.to_string(),
            reason,
            started_at: state::now_rfc3339(),
            finished_at: None,
            duration_ms: None,
            attempts: Vec::new(),
            resumed_from_line: resume.map(|c| c.line_offset),
            error: None,
        };
        StageJob {
            index,
            stage,
            root: spec.root.clone(),
            ws: ws.clone(),
            run_id: run_id.to_string(),
            exe: exe.to_path_buf(),
            interrupt: Arc::clone(interrupt),
            fingerprint,
            ingredients: plan.ingredients.expect("decided"),
            inputs: plan.inputs.expect("decided"),
            previous: plan.marker,
            resume,
            restore_from: match &plan.decision {
                plan::Decision::Restore { from_run, .. } => Some(from_run.clone()),
                _ => None,
            },
            record,
            cores: Vec::new(),
            sandbox: crate::sandbox::Policy::default(),
            items: BTreeMap::new(),
            map_items,
            executor: Executor::Local,
        }
    }

    /// Writes the stage record durably (`state/stage_<stage>.json`); a failure goes to the
    /// coordinator, which stops the build with it.
    fn save_record(&self, tx: &Sender<JobMessage>) {
        if let Err(err) = atomic::write_json(&self.ws.stage_file(&self.record.name), &self.record) {
            let _ = tx.send(JobMessage::RecordFailed(err));
        }
    }

    /// Runs the stage to its end and reports it; never panics on I/O errors (they fail the stage).
    pub fn run(mut self, tx: &Sender<JobMessage>) {
        let started = Instant::now();
        let mut hashes = StatCache::default();
        // Sizes of the inputs in `PIPELINE_INPUTS` order (`None`: unreadable).
        let input_sizes: Vec<Option<u64>> = self
            .inputs
            .files
            .values()
            .map(|p| p.metadata().ok().map(|m| m.len()))
            .collect();
        let mut metrics = StageMetrics {
            input_bytes: input_sizes.iter().flatten().sum(),
            ..StageMetrics::default()
        };
        if self.map_items.is_some() {
            // A map stage's items carry their own inputs; the stage's list (one entry per
            // item) is not needed again.
            self.inputs.files = BTreeMap::new();
        }
        let attempted = self.attempts(tx, &mut metrics, &mut hashes, &input_sizes);
        let (status, attempts, retries) = match attempted {
            Ok(done) => done,
            Err(err) => {
                self.record.error = Some(format!("pipe could not run the stage: {err}"));
                (StageStatus::Failed, self.record.attempts.len() as u32, 0)
            }
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        self.record.status = status;
        self.record.finished_at = Some(state::now_rfc3339());
        self.record.duration_ms = Some(duration_ms);
        metrics.wall_ms = duration_ms;
        metrics.attempts = attempts;
        let reason = match (&self.record.error, status) {
            (Some(err), StageStatus::Failed | StageStatus::Interrupted) => err.clone(),
            _ => self.record.reason.clone(),
        };
        self.save_record(tx);
        let result = JobResult {
            status,
            reason,
            attempts,
            duration_ms,
            retries,
            metrics,
            hashes,
        };
        let _ = tx.send(JobMessage::Done(self.index, Box::new(result)));
    }

    /// The attempt loop and the publish; returns (status, attempts, retries).
    fn attempts(
        &mut self,
        tx: &Sender<JobMessage>,
        metrics: &mut StageMetrics,
        hashes: &mut StatCache,
        input_sizes: &[Option<u64>],
    ) -> io::Result<(StageStatus, u32, u32)> {
        let target = self.ws.publish_target(&self.stage);
        if self.resume.is_none() {
            reset_staging(&target.staging, &target.progress)?;
        }
        // A map stage's items each get an environment of their own (`run_item`).
        let base_env = match self.map_items {
            Some(_) => Vec::new(),
            None => self.environment()?,
        };
        let policy = self.stage.retry.clone();
        let name = self.stage.name.clone();
        let mut lines_by_input: BTreeMap<u64, u64> = BTreeMap::new();
        let (mut attempt, mut retries, mut delay) = (0u32, 0u32, 0u64);
        let restored = self.restore_from.is_some() && self.restore(tx, &target)?;
        let map_items = self.map_items.take();
        let is_map = map_items.is_some();
        let status = if let Some(items) = map_items {
            let (status, runs, map_retries) = self.run_map(tx, metrics, &target, items)?;
            attempt = runs;
            retries = map_retries;
            status
        } else if restored {
            StageStatus::Restored
        } else {
            // CPU of the attempts (user, system), microseconds: summed before rounding.
            let mut cpu_us = (0u64, 0u64);
            loop {
                attempt += 1;
                if attempt > 1 {
                    delay = retry::delay_ms(&policy, &self.run_id, &name, attempt);
                    if !sleep_unless_interrupted(Duration::from_millis(delay), &self.interrupt) {
                        break StageStatus::Interrupted;
                    }
                }
                let _ = tx.send(JobMessage::Event(Event::StageStarted {
                    stage: name.clone(),
                    attempt,
                }));
                let log = self
                    .ws
                    .logs_dir(&self.run_id)
                    .join(format!("{name}.attempt{attempt}.log"));
                let mut env = base_env.clone();
                env.push(("PIPELINE_ATTEMPT".into(), attempt.to_string().into()));
                if let Some(cp) = self.resume {
                    env.push((
                        "PIPELINE_RESUME".into(),
                        serde_json::to_string(&cp)
                            .expect("checkpoint serialises")
                            .into(),
                    ));
                }
                let inv = self.invocation(env, log.clone(), self.sandbox.clone());
                if inv.sandbox.debug {
                    let command = executor::command_line(&inv)
                        .unwrap_or_else(|err| format!("(no command: {err})"));
                    let _ = tx.send(JobMessage::Event(Event::Warning {
                        message: format!(
                            "sandbox-debug: `{name}` attempt {attempt} runs: {command}"
                        ),
                    }));
                }
                let attempt_started = state::now_rfc3339();
                let mut checkpoints = StageCheckpoints {
                    stage: &name,
                    fingerprint: &self.fingerprint,
                    progress: &target.progress,
                    input_sizes,
                    lines_by_input: &mut lines_by_input,
                    tx,
                };
                let outcome = self.execute(&inv, Unit::Stage, tx, &mut checkpoints);
                for (&input, &lines) in &outcome.superseded_lines {
                    let seen = lines_by_input.entry(input).or_default();
                    *seen = (*seen).max(lines);
                }
                add_cpu(metrics, &mut cpu_us, outcome.user_us, outcome.sys_us);
                metrics.max_rss_kb = metrics
                    .max_rss_kb
                    .max(outcome.max_rss_kb)
                    .max(outcome.peak_group_rss_kb);
                metrics.lines = lines_by_input.values().sum();
                let classification = classify(&outcome, &policy);
                let tail = executor::tail(&log, 20);
                self.record.attempts.push(AttemptRecord {
                    attempt,
                    started_at: attempt_started,
                    duration_ms: outcome.duration.as_millis() as u64,
                    exit_code: outcome.exit_code,
                    signal: outcome.signal,
                    classification,
                    delay_before_ms: delay,
                    stderr_tail: tail.clone(),
                    log: self.ws.relative(&log),
                    sandbox: outcome.sandbox.clone(),
                    violations: outcome.violations.clone(),
                });
                if classification == Classification::Ok {
                    break StageStatus::Succeeded;
                }
                let message = failure_message(
                    &outcome,
                    classification,
                    &tail,
                    self.stage.resources.memory_mb,
                );
                self.record.error = Some(message.clone());
                if classification == Classification::Interrupted {
                    break StageStatus::Interrupted;
                }
                let retryable = classification == Classification::Retryable
                    || (classification == Classification::Timeout && policy.retry_on_timeout);
                let more = retryable && attempt < policy.max_attempts;
                let retry_in_ms =
                    more.then(|| retry::delay_ms(&policy, &self.run_id, &name, attempt + 1));
                let _ = tx.send(JobMessage::Event(Event::AttemptFailed {
                    stage: name.clone(),
                    attempt,
                    classification,
                    message,
                    retry_in_ms,
                }));
                self.save_record(tx);
                if !more {
                    break StageStatus::Failed;
                }
                retries += 1;
                // A retry resumes from the last durable checkpoint of this fingerprint.
                self.resume = match plan::read_progress(&self.ws, &name) {
                    Ok(Some(p)) if p.fingerprint == self.fingerprint => Some(p.checkpoint()),
                    _ => {
                        reset_staging(&target.staging, &target.progress)?;
                        None
                    }
                };
            }
        };
        if !matches!(status, StageStatus::Succeeded | StageStatus::Restored) {
            return Ok((status, attempt, retries));
        }
        let _ = tx.send(JobMessage::Released(self.index));
        let marker = self.publish_retrying(tx, &target, &policy, hashes)?;
        metrics.output_bytes = marker.outputs.iter().map(|o| o.size).sum();
        let _ = tx.send(JobMessage::Event(Event::StagePublished {
            stage: self.stage.name.clone(),
            fingerprint: self.fingerprint.clone(),
            files: marker.outputs.len(),
            bytes: metrics.output_bytes,
        }));
        self.record.error = None;
        // A map stage's items were cached one by one; a whole-stage entry would only duplicate them.
        self.cache_outputs(tx, &target, &marker, hashes, !restored && !is_map);
        let status = if restored {
            StageStatus::Restored
        } else if self.record.resumed_from_line.is_some() {
            StageStatus::Resumed
        } else {
            StageStatus::Succeeded
        };
        Ok((status, attempt, retries))
    }

    /// Runs a map stage's items: unchanged ones are linked into the staging folder from the
    /// published outputs, cached ones restored, the rest run (up to the stage's `cpus` at once),
    /// each in a folder of its own inside the staging folder, then moved beside the others and
    /// stored in the cache under the item's fingerprint, so a later build restores every item
    /// that completed, even if others failed or the build was killed. Returns (status, processor
    /// runs, retries).
    fn run_map(
        &mut self,
        tx: &Sender<JobMessage>,
        metrics: &mut StageMetrics,
        target: &publish::Target,
        items: Vec<ItemPlan>,
    ) -> io::Result<(StageStatus, u32, u32)> {
        let store = Store::new(&self.ws.cache_dir());
        let mut entries = BTreeMap::new();
        let mut to_run = Vec::new();
        // Each item's strings move into its entry: no copy per item.
        for item in items {
            match item.action {
                ItemAction::Keep(outputs) => {
                    for path in &outputs {
                        link_or_copy(&target.output_dir.join(path), &target.staging.join(path))?;
                    }
                    entries.insert(
                        item.input,
                        ItemEntry {
                            fingerprint: item.fingerprint,
                            outputs,
                        },
                    );
                }
                ItemAction::Restore => {
                    match restore_item(&store, &item.fingerprint, &target.staging) {
                        Ok(outputs) => {
                            entries.insert(
                                item.input,
                                ItemEntry {
                                    fingerprint: item.fingerprint,
                                    outputs,
                                },
                            );
                        }
                        Err(why) => {
                            let message = format!("cannot restore item `{}` of `{}` from the cache ({why}); running it", item.input, self.stage.name);
                            let _ = tx.send(JobMessage::Event(Event::Warning { message }));
                            to_run.push(item);
                        }
                    }
                }
                ItemAction::Run(_) => to_run.push(item),
            }
        }
        // Locally, items share the stage's cores; on Slurm, each waits for its own job (grouped
        // `batch` to a job), so as many wait at once as the jobs in flight can take.
        let (workers, batch) = match &self.executor {
            Executor::Local => (self.stage.resources.cpus as usize, 1),
            Executor::Slurm(cluster) => {
                let batch = cluster.batch_size(to_run.len());
                (cluster.capacity(batch), batch)
            }
        };
        let workers = workers.clamp(1, to_run.len().max(1));
        let queue = std::sync::Mutex::new(
            to_run
                .into_iter()
                .enumerate()
                .collect::<std::collections::VecDeque<_>>(),
        );
        let results = std::sync::Mutex::new(Vec::new());
        let this = &*self;
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let next = queue.lock().expect("queue lock").pop_front();
                    let Some((n, item)) = next else { break };
                    if this.interrupt.load(Ordering::SeqCst) {
                        break;
                    }
                    let outcome = this.run_item(tx, n, batch, &item, target, &store);
                    results.lock().expect("results lock").push((item, outcome));
                });
            }
        });
        let (mut runs, mut retries, mut failures, mut interrupted) =
            (0u32, 0u32, Vec::new(), false);
        // CPU of every item's attempts (user, system), microseconds: summed before rounding.
        let mut cpu_us = (0u64, 0u64);
        for (item, outcome) in results.into_inner().expect("results") {
            runs += outcome.attempts;
            retries += outcome.attempts.saturating_sub(1);
            add_cpu(metrics, &mut cpu_us, outcome.user_us, outcome.sys_us);
            metrics.max_rss_kb = metrics.max_rss_kb.max(outcome.max_rss_kb);
            match outcome.result {
                Ok(outputs) => {
                    entries.insert(
                        item.input,
                        ItemEntry {
                            fingerprint: item.fingerprint,
                            outputs,
                        },
                    );
                }
                Err(ItemFailure::Interrupted) => interrupted = true,
                Err(ItemFailure::Failed(why)) => failures.push(format!("{}: {why}", item.input)),
            }
        }
        if interrupted || self.interrupt.load(Ordering::SeqCst) {
            self.record.error = Some("interrupted; completed items are kept in the cache".into());
            return Ok((StageStatus::Interrupted, runs, retries));
        }
        if !failures.is_empty() {
            let more = if failures.len() > 3 {
                format!(" (and {} more)", failures.len() - 3)
            } else {
                String::new()
            };
            self.record.error = Some(format!(
                "{} item(s) failed: {}{more}",
                failures.len(),
                failures[..failures.len().min(3)].join("; ")
            ));
            return Ok((StageStatus::Failed, runs, retries));
        }
        self.items = entries;
        Ok((StageStatus::Succeeded, runs, retries))
    }

    /// Runs one map item with the stage's retry policy into its own folder, then moves its outputs
    /// into the staging folder and caches them under the item's fingerprint.
    fn run_item(
        &self,
        tx: &Sender<JobMessage>,
        n: usize,
        batch: u32,
        item: &ItemPlan,
        target: &publish::Target,
        store: &Store,
    ) -> ItemOutcome {
        let mut outcome = ItemOutcome {
            attempts: 0,
            user_us: 0,
            sys_us: 0,
            max_rss_kb: 0,
            result: Err(ItemFailure::Interrupted),
        };
        let dir = target.staging.join(format!(".item-{n}"));
        let input = self.root.join(&item.input);
        let prepared = (|| -> io::Result<Vec<(OsString, OsString)>> {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            self.environment_with(&[&input], &dir, 1, &format!("{}.item{n}", self.stage.name))
        })();
        let base_env = match prepared {
            Ok(env) => env,
            Err(err) => {
                outcome.result = Err(ItemFailure::Failed(err.to_string()));
                return outcome;
            }
        };
        let policy = &self.stage.retry;
        // Items run side by side: each needs a private temp folder of its own (inside the stage's,
        // which the sandbox lets it write).
        let mut item_sandbox = self.sandbox.clone();
        if let Some(tmp) = &mut item_sandbox.tmpdir {
            *tmp = tmp.join(format!("item-{n}"));
        }
        loop {
            outcome.attempts += 1;
            let attempt = outcome.attempts;
            if attempt > 1 {
                let delay = retry::delay_ms(policy, &self.run_id, &item.input, attempt);
                if !sleep_unless_interrupted(Duration::from_millis(delay), &self.interrupt) {
                    return outcome;
                }
            }
            let mut env = base_env.clone();
            env.push(("PIPELINE_ATTEMPT".into(), attempt.to_string().into()));
            let log = self
                .ws
                .logs_dir(&self.run_id)
                .join(format!("{}.item{n}.attempt{attempt}.log", self.stage.name));
            let inv = self.invocation(env, log.clone(), item_sandbox.clone());
            let unit = Unit::Item { index: n, batch };
            let run = self.execute(&inv, unit, tx, &mut |_: Checkpoint| Ok(()));
            outcome.user_us += run.user_us;
            outcome.sys_us += run.sys_us;
            outcome.max_rss_kb = outcome
                .max_rss_kb
                .max(run.max_rss_kb)
                .max(run.peak_group_rss_kb);
            let classification = classify(&run, policy);
            match classification {
                Classification::Ok => break,
                Classification::Interrupted => return outcome,
                _ => {
                    let retryable = classification == Classification::Retryable
                        || (classification == Classification::Timeout && policy.retry_on_timeout);
                    if !(retryable && attempt < policy.max_attempts) {
                        let tail = executor::tail(&log, 20);
                        outcome.result = Err(ItemFailure::Failed(failure_message(
                            &run,
                            classification,
                            &tail,
                            self.stage.resources.memory_mb,
                        )));
                        return outcome;
                    }
                }
            }
        }
        outcome.result = adopt_item_outputs(
            &dir,
            &target.staging,
            store,
            &item.fingerprint,
            &self.stage.name,
            &self.run_id,
        )
        .map_err(|err| ItemFailure::Failed(err.to_string()));
        outcome
    }

    /// Publishes the staged outputs. A transient local error (EAGAIN, EBUSY, ETXTBSY, EINTR: a busy
    /// file, a lock held for a moment) is retried under the stage's retry policy; after the journal
    /// is written, a retry completes that journal rather than starting over.
    fn publish_retrying(
        &mut self,
        tx: &Sender<JobMessage>,
        target: &publish::Target,
        policy: &RetryPolicy,
        hashes: &mut StatCache,
    ) -> io::Result<Marker> {
        let mut attempt = 1;
        loop {
            // A journal left by an earlier try is completed; without one (`Nothing`) this publishes.
            let result = publish::recover(target, hashes).and_then(|recovery| match recovery {
                publish::Recovery::Completed => Marker::read(&target.marker)
                    .map_err(io::Error::other)?
                    .ok_or_else(|| io::Error::other("the completed publish left no marker")),
                publish::Recovery::Nothing => publish::publish(
                    target,
                    self.previous.as_ref(),
                    &self.run_id,
                    &self.fingerprint,
                    &mut self.ingredients,
                    &mut self.items,
                    hashes,
                ),
                publish::Recovery::Abandoned(why) => Err(io::Error::other(why)),
            });
            match result {
                Ok(marker) => return Ok(marker),
                Err(err) if is_transient(&err) && attempt < policy.max_attempts => {
                    attempt += 1;
                    let delay = retry::delay_ms(policy, &self.run_id, &self.stage.name, attempt);
                    let message = format!(
                        "publishing `{}` hit a transient error ({err}); retrying in {delay} ms",
                        self.stage.name
                    );
                    let _ = tx.send(JobMessage::Event(Event::Warning { message }));
                    if !sleep_unless_interrupted(Duration::from_millis(delay), &self.interrupt) {
                        return Err(io::Error::new(
                            io::ErrorKind::Interrupted,
                            "interrupted while publishing",
                        ));
                    }
                }
                Err(err) => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!("publishing outputs failed: {err}"),
                    ))
                }
            }
        }
    }

    /// Materialises the cached outputs of this fingerprint into the staging folder. A missing or
    /// corrupt object is a warning and `false`: the stage then runs, never a wrong output.
    fn restore(&mut self, tx: &Sender<JobMessage>, target: &publish::Target) -> io::Result<bool> {
        reset_staging(&target.staging, &target.progress)?;
        let store = Store::new(&self.ws.cache_dir());
        let problem = match store.usable_action(&self.fingerprint) {
            None => Some("the cache entry is gone".to_string()),
            Some(entry) => entry.outputs.iter().find_map(|o| {
                let dest = target.staging.join(&o.path);
                match publish::is_relative_inside(&o.path) {
                    false => Some(format!(
                        "cache entry names `{}` outside the output folder",
                        o.path
                    )),
                    true => store
                        .restore(&o.blake3, &dest)
                        .err()
                        .map(|e| format!("{}: {e}", o.path)),
                }
            }),
        };
        match problem {
            None => Ok(true),
            Some(why) => {
                let message = format!(
                    "cannot restore `{}` from the cache ({why}); running it instead",
                    self.stage.name
                );
                let _ = tx.send(JobMessage::Event(Event::Warning { message }));
                self.record.reason = format!("{} (cache unusable: running)", self.record.reason);
                reset_staging(&target.staging, &target.progress)?;
                Ok(false)
            }
        }
    }

    /// Stores the published outputs in the object store and records the action entry; a failure
    /// only costs a future restore, so it is a warning, and so is a power cut losing them: they
    /// are written without fsync (the marker, written durably before, is what counts).
    fn cache_outputs(
        &self,
        tx: &Sender<JobMessage>,
        target: &publish::Target,
        marker: &Marker,
        hashes: &mut StatCache,
        record_action: bool,
    ) {
        let store = Store::new(&self.ws.cache_dir()).volatile();
        let result = (|| -> io::Result<()> {
            for output in &marker.outputs {
                let path = target.output_dir.join(&output.path);
                // Linking changes the file's ctime: then its new stat is recorded, so the next
                // build does not read the file again. Not linked, it has the stat publishing
                // recorded (a restored output is recorded here in any case).
                if store.put(&path, &output.blake3)? || !record_action {
                    hashes.remember(&path, &output.blake3)?;
                }
            }
            if !record_action {
                // Restored: the entry already names the run that produced these outputs.
                return Ok(());
            }
            store.put_action(&ActionEntry {
                version: 1,
                stage: self.stage.name.clone(),
                fingerprint: self.fingerprint.clone(),
                run_id: self.run_id.clone(),
                finished_at: marker.finished_at.clone(),
                outputs: marker.outputs.clone(),
            })
        })();
        if let Err(err) = result {
            let message = format!(
                "could not store the outputs of `{}` in the cache: {err}",
                self.stage.name
            );
            let _ = tx.send(JobMessage::Event(Event::Warning { message }));
        }
    }

    /// Runs one attempt, telling the coordinator its pid; a processor that cannot be started is an
    /// attempt that failed with a protocol error, not an error of the build.
    fn execute(
        &self,
        inv: &Invocation,
        unit: Unit,
        tx: &Sender<JobMessage>,
        checkpoints: &mut dyn executor::Checkpoints,
    ) -> Outcome {
        let stage = &self.stage.name;
        if let Executor::Slurm(cluster) = &self.executor {
            let (name, batch, cpus) = match unit {
                Unit::Stage => (format!("pipe-{stage}"), 1, self.stage.resources.cpus),
                Unit::Item { index, batch } => (format!("pipe-{stage}-{index}"), batch, 1),
            };
            let work = crate::slurm::Work {
                inv,
                name,
                key: stage.clone(),
                batch,
                cpus,
            };
            // The unit's progress file on the shared filesystem is what the engine reads: each
            // checkpoint is persisted as it comes, without grace.
            return cluster.run(work, &self.interrupt, &mut |cp| {
                checkpoints.persist(cp)?;
                checkpoints.reported(cp);
                Ok(())
            });
        }
        let mut spawned = None;
        let outcome = executor::run(
            inv,
            &self.interrupt,
            &mut |pid| {
                // The child cannot have been reaped yet, so this pid is still its own.
                let start_time = crate::procfs::stat(pid as i32).map_or(0, |s| s.start_time);
                spawned = Some((pid, start_time));
                let _ = tx.send(JobMessage::Spawned {
                    stage: stage.clone(),
                    pid,
                    start_time,
                });
            },
            checkpoints,
        );
        if let Some((pid, start_time)) = spawned {
            let _ = tx.send(JobMessage::Exited {
                stage: stage.clone(),
                pid,
                start_time,
            });
        }
        outcome.unwrap_or_else(|err| Outcome {
            protocol_error: Some(format!(
                "cannot start the processor `{}`: {err}",
                inv.argv[0].to_string_lossy()
            )),
            ..Outcome::default()
        })
    }

    /// One attempt of this stage's processor: its argv, limits and confinement with `env`.
    fn invocation(
        &self,
        env: Vec<(OsString, OsString)>,
        log: PathBuf,
        sandbox: crate::sandbox::Policy,
    ) -> Invocation {
        Invocation {
            argv: self.argv(),
            env,
            cwd: self.root.clone(),
            log,
            timeout: self.stage.retry.timeout,
            cpu_set: (!self.cores.is_empty()).then(|| self.cores.clone()),
            memory_limit_mb: self.stage.resources.memory_mb,
            virtual_memory_mb: self.stage.resources.virtual_memory_mb,
            sandbox,
        }
    }

    fn argv(&self) -> Vec<OsString> {
        match &self.stage.processor {
            Processor::Builtin { name, .. } => {
                vec![self.exe.clone().into(), "processor".into(), name.into()]
            }
            Processor::Command { argv, .. } => argv.iter().map(OsString::from).collect(),
        }
    }

    /// The `PIPELINE_*` environment of the stage (without the per-attempt variables).
    fn environment(&self) -> io::Result<Vec<(OsString, OsString)>> {
        let paths: Vec<&PathBuf> = self.inputs.files.values().collect();
        let staging = self.ws.staging_dir(&self.stage.output_dir);
        self.environment_with(
            &paths,
            &staging,
            self.stage.resources.cpus,
            &self.stage.name,
        )
    }

    /// The environment for `inputs` writing into `output_dir` with `cpus` cores; a long input
    /// list goes to `state/logs/<run>/<list_name>.inputs.json`.
    fn environment_with(
        &self,
        paths: &[&PathBuf],
        output_dir: &Path,
        cpus: u32,
        list_name: &str,
    ) -> io::Result<Vec<(OsString, OsString)>> {
        let stage = &self.stage;
        let staging = output_dir.to_path_buf();
        let list = serde_json::to_string(&paths).map_err(io::Error::other)?;
        let cpus = cpus.to_string();
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PIPELINE_RUN_ID".into(), self.run_id.clone().into()),
            ("PIPELINE_STAGE".into(), stage.name.clone().into()),
            (
                "PIPELINE_INPUT_ROOT".into(),
                root_join(&self.root, &self.inputs.root).into(),
            ),
            ("PIPELINE_OUTPUT_DIR".into(), staging.into()),
            (
                "PIPELINE_PARAMS".into(),
                serde_json::Value::Object((*stage.params).clone())
                    .to_string()
                    .into(),
            ),
            (
                "PIPELINE_CHECKPOINT".into(),
                serde_json::to_string(&stage.cadence)
                    .map_err(io::Error::other)?
                    .into(),
            ),
        ];
        for var in [
            "PIPELINE_CPUS",
            "OMP_NUM_THREADS",
            "RAYON_NUM_THREADS",
            "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
        ] {
            env.push((var.into(), cpus.clone().into()));
        }
        if let Some(mb) = stage.resources.memory_mb {
            env.push(("PIPELINE_MEMORY_MB".into(), mb.to_string().into()));
        }
        if list.len() > MAX_INPUTS_ENV {
            let file = self
                .ws
                .logs_dir(&self.run_id)
                .join(format!("{list_name}.inputs.json"));
            atomic::write(&file, list.as_bytes())?;
            env.push(("PIPELINE_INPUTS_FILE".into(), file.into()));
        } else {
            env.push(("PIPELINE_INPUTS".into(), list.into()));
        }
        Ok(env)
    }
}

/// The checkpoints of one attempt of a whole stage: each is counted and shown as it is reported,
/// and persisted in `state/progress_<stage>.json`: at once in the middle of an input (the
/// processor sends those at the cadence the stage asked for), after a grace period at the end of
/// an input ([`executor::PERSIST_GRACE`]; see [`executor::Checkpoints`]).
struct StageCheckpoints<'a> {
    stage: &'a str,
    fingerprint: &'a str,
    progress: &'a Path,
    /// Sizes of the inputs, in `PIPELINE_INPUTS` order.
    input_sizes: &'a [Option<u64>],
    /// Input index → lines: the last line count reported per input (for the metrics).
    lines_by_input: &'a mut BTreeMap<u64, u64>,
    tx: &'a Sender<JobMessage>,
}

impl executor::Checkpoints for StageCheckpoints<'_> {
    fn grace(&self, cp: &Checkpoint) -> Duration {
        let index = usize::try_from(cp.input_index).unwrap_or(usize::MAX);
        let ends_input = self.input_sizes.get(index) == Some(&Some(cp.byte_offset));
        if ends_input {
            executor::PERSIST_GRACE
        } else {
            Duration::ZERO
        }
    }

    fn reported(&mut self, cp: Checkpoint) {
        self.lines_by_input.insert(cp.input_index, cp.line_offset);
        let _ = self.tx.send(JobMessage::Event(Event::Checkpoint {
            stage: self.stage.to_string(),
            input_index: cp.input_index,
            line_offset: cp.line_offset,
            byte_offset: cp.byte_offset,
        }));
    }

    fn persist(&mut self, cp: Checkpoint) -> io::Result<()> {
        let progress = Progress {
            stage: self.stage.to_string(),
            fingerprint: self.fingerprint.to_string(),
            input_index: cp.input_index,
            line_offset: cp.line_offset,
            byte_offset: cp.byte_offset,
            output_bytes: cp.output_bytes,
            updated_at: state::now_rfc3339(),
        };
        atomic::write_json(self.progress, &progress)
    }
}

fn root_join(root: &Path, relative: &str) -> PathBuf {
    if relative.is_empty() {
        root.to_path_buf()
    } else {
        root.join(relative)
    }
}

/// Adds an attempt's (or a map item's) CPU time, in microseconds, to `total_us` (user, system)
/// and sets the stage's metrics from the sum: rounding each attempt to milliseconds first would
/// drop most of a stage of many short attempts (a map stage's items are a fraction of a
/// millisecond each when forked by the spawn server).
fn add_cpu(metrics: &mut StageMetrics, total_us: &mut (u64, u64), user_us: u64, sys_us: u64) {
    total_us.0 += user_us;
    total_us.1 += sys_us;
    metrics.cpu_user_ms = total_us.0 / 1000;
    metrics.cpu_sys_ms = total_us.1 / 1000;
}

/// How one map item went.
struct ItemOutcome {
    attempts: u32,
    /// CPU time of its attempts, microseconds.
    user_us: u64,
    sys_us: u64,
    max_rss_kb: u64,
    /// The item's output paths (relative to the output folder).
    result: Result<Vec<String>, ItemFailure>,
}

enum ItemFailure {
    Interrupted,
    Failed(String),
}

/// Moves an item's outputs from its own folder into the staging folder (two items writing the
/// same path is an error, not a silent overwrite), and stores them in the cache.
fn adopt_item_outputs(
    dir: &Path,
    staging: &Path,
    store: &Store,
    fingerprint: &str,
    stage: &str,
    run_id: &str,
) -> io::Result<Vec<String>> {
    let mut outputs = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).expect("walked below dir");
        let rel = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let dest = staging.join(&rel);
        if dest.exists() {
            return Err(io::Error::other(format!(
                "output `{rel}` is produced by two items: each item must write its own paths"
            )));
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(entry.path(), &dest)?;
        let size = std::fs::metadata(&dest)?.len();
        let blake3 = crate::hashing::hash_file(&dest, size)?;
        let _ = store.put(&dest, &blake3)?;
        outputs.push(crate::marker::OutputEntry {
            path: rel,
            size,
            blake3,
        });
    }
    std::fs::remove_dir_all(dir)?;
    store.put_action(&ActionEntry {
        version: 1,
        stage: stage.to_string(),
        fingerprint: fingerprint.to_string(),
        run_id: run_id.to_string(),
        finished_at: state::now_rfc3339(),
        outputs: outputs.clone(),
    })?;
    // Not collected in place: that would keep the entries' allocation (four of them, for one
    // output) for the lifetime of the item's marker entry.
    let mut paths = Vec::with_capacity(outputs.len());
    paths.extend(outputs.into_iter().map(|o| o.path));
    Ok(paths)
}

/// Restores a cached item into the staging folder; its output paths on success.
fn restore_item(store: &Store, fingerprint: &str, staging: &Path) -> Result<Vec<String>, String> {
    let entry = store
        .usable_action(fingerprint)
        .ok_or("the cache entry is gone")?;
    let mut outputs = Vec::with_capacity(entry.outputs.len());
    for o in &entry.outputs {
        if !publish::is_relative_inside(&o.path) {
            return Err(format!(
                "cache entry names `{}` outside the output folder",
                o.path
            ));
        }
        let dest = staging.join(&o.path);
        if dest.exists() {
            return Err(format!("output `{}` is produced by two items", o.path));
        }
        store
            .restore(&o.blake3, &dest)
            .map_err(|e| format!("{}: {e}", o.path))?;
        outputs.push(o.path.clone());
    }
    Ok(outputs)
}

/// A hard link (same filesystem, instant), or a copy.
fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
    }
    Ok(())
}

/// Errors a retry can cure: the resource was busy, not broken.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAGAIN | libc::EBUSY | libc::ETXTBSY | libc::EINTR)
    )
}

/// Empties the staging folder and forgets stale progress: a fresh start.
fn reset_staging(staging: &Path, progress: &Path) -> io::Result<()> {
    atomic::remove_if_exists(progress)?;
    match std::fs::remove_dir_all(staging) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    std::fs::create_dir_all(staging)
}

/// How an attempt ended, in retry-policy terms.
pub fn classify(outcome: &Outcome, policy: &RetryPolicy) -> Classification {
    if !outcome.violations.is_empty() {
        Classification::Network
    } else if outcome.sandbox_error.is_some() {
        Classification::Fatal
    } else if outcome.interrupted {
        Classification::Interrupted
    } else if outcome.memory_exceeded {
        Classification::Memory
    } else if outcome.timed_out {
        Classification::Timeout
    } else if outcome.protocol_error.is_some() {
        Classification::Fatal
    } else if outcome.lost {
        Classification::Retryable
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

fn failure_message(
    outcome: &Outcome,
    classification: Classification,
    tail: &str,
    memory_mb: Option<u64>,
) -> String {
    if let Some(first) = outcome.violations.first() {
        let more = match outcome.violations.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        return format!("the sandbox blocked a network access: {first}{more}");
    }
    if let Some(err) = &outcome.sandbox_error {
        return format!("the offline sandbox could not be set up: {err}");
    }
    let what = if let Some(err) = &outcome.protocol_error {
        format!("protocol error: {err}")
    } else if let Some(note) = &outcome.executor_note {
        note.clone()
    } else {
        match classification {
            Classification::Timeout => format!(
                "timed out after {} ms and was killed",
                outcome.duration.as_millis()
            ),
            Classification::Interrupted => "interrupted".to_string(),
            Classification::Memory => format!(
                "exceeded its memory cap of {} MiB (peak seen {} MiB) and was killed",
                memory_mb.unwrap_or(0),
                outcome.peak_group_rss_kb / 1024
            ),
            _ => match (outcome.exit_code, outcome.signal) {
                (Some(code), _) => format!("processor exited with code {code}"),
                (_, Some(sig)) => format!("processor was killed by signal {sig}"),
                _ => "processor ended abnormally".to_string(),
            },
        }
    };
    let said = |l: &&str| !l.trim().is_empty() && !l.starts_with(crate::slurm::LOG_LINE);
    match tail.lines().rev().find(said) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_many_short_attempts_is_summed_before_it_is_rounded() {
        let mut metrics = StageMetrics::default();
        let mut total = (0, 0);
        for _ in 0..5 {
            add_cpu(&mut metrics, &mut total, 400, 300);
        }
        assert_eq!((metrics.cpu_user_ms, metrics.cpu_sys_ms), (2, 1));
        add_cpu(&mut metrics, &mut total, 1_000_000, 0);
        assert_eq!((metrics.cpu_user_ms, metrics.cpu_sys_ms), (1002, 1));
    }
}
