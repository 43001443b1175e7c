//! One `pipe build`: lock, recover, then run ready stages in parallel under quotas, and record.
//!
//! The calling thread is the coordinator and the only writer of shared state (run and stage
//! records, metrics, the stat cache, console output). It asks the [`Scheduler`] which stages may
//! start, decides each one only when all its upstream stages have published (so it sees their real
//! outputs: early cutoff), and hands stages that must run to a bounded pool of worker threads as
//! [`StageJob`]s. Workers report back over a channel. A failure stops admitting new stages
//! (running ones finish and are recorded) unless `--keep-going`, which still runs every stage not
//! downstream of a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use crate::event::Event;
use crate::graph::Graph;
use crate::hashing::StatCache;
use crate::lock::{self, Holder, LockError, Wait};
use crate::memo::SkipMemo;
use crate::plan::{self, Decision, PlanError, StagePlan};
use crate::processes::{self, ProcessLog, RunningProcess};
use crate::procfs;
use crate::publish::{self, Recovery};
use crate::runlog::RunLog;
use crate::scheduler::{Capacity, Need, Phase, Scheduler, PUBLISHING_PER_JOB};
use crate::spec::Spec;
use crate::stage_job::{JobMessage, JobResult, StageJob};
use crate::state::{
    self, Metrics, RunRecord, RunStage, RunStatus, StageMetrics, StageRecord, StageStatus, Totals,
};
use crate::workers::Workers;
use crate::workspace::Workspace;
use crate::{atomic, audit, runid};

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub run_id: Option<String>,
    /// Stages to build (with what they need); empty: all.
    pub targets: Vec<String>,
    pub keep_going: bool,
    /// Stages running at once; `None`: the CPU quota.
    pub jobs: Option<u32>,
    pub wait_lock: Wait,
    /// The `pipe` binary, which runs built-in processors (`pipe processor NAME`).
    pub exe: PathBuf,
    /// Set by SIGINT/SIGTERM: stop the running processors, keep their checkpoints, exit 130.
    pub interrupt: Arc<AtomicBool>,
    /// The offline guard: which sandbox layers processors run under.
    pub sandbox: crate::sandbox::Options,
    /// Authenticates the audit records with HMAC-SHA256 (`--audit-key`).
    pub audit_key: Option<audit::Key>,
    /// Where stage attempts run (`--executor`, `settings.executor`).
    pub executor: crate::stage_job::Executor,
    /// The skip memo file, read ahead (used only if unchanged once the lock is held).
    pub memo: Option<crate::memo::Reading>,
    /// The workspace lock, if it was taken before the Pipefile was validated (then `memo` started
    /// taking its stats at once).
    pub early_lock: Option<crate::lock::EarlyLock>,
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
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
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
    // Every event of the run also goes to its log, `state/logs/run_<id>.jsonl` (buffered until
    // the run id is known to be new).
    let log = RunLog::new(ws.run_log_file(&run_id), &run_id);
    let outer = report;
    let report: &mut dyn FnMut(&Event) = &mut |event: &Event| {
        if let Some(warning) = log.record(event) {
            outer(&warning);
        }
        outer(event)
    };
    let me = Holder {
        pid: std::process::id(),
        run_id: run_id.clone(),
        command: "build".into(),
        started_at: state::now_rfc3339(),
    };
    let _lock = lock::acquire(
        &ws,
        &me,
        opts.wait_lock,
        opts.early_lock.as_ref(),
        |holder| {
            report(&Event::Warning {
                message: format!("waiting for the workspace lock held by {holder}"),
            })
        },
    )?;
    if ws.run_file(&run_id).exists() {
        return Err(BuildError::RunIdUsed(run_id));
    }
    log.open()?;
    let mut audit = audit::Log::open(&ws, opts.audit_key.clone(), &_lock, Some(&run_id))?;
    audit.run_started(spec, &selected)?;
    audit.append("run.offline", None, opts.sandbox.audit_data())?;
    stop_orphans(&ws, &mut audit, report)?;
    stop_orphan_jobs(&ws, &opts.executor, report)?;
    // Temporaries of pipe's own atomic writes, and publish journals, exist only if a holder died
    // mid-write: a clean previous exit spares the walks over `state/` (every run's logs), the
    // output cache (one file per fingerprint) and every output folder (10,000 stages: 10,000
    // folders). Interrupted publishes are completed below when the previous holder died, and
    // otherwise when their stage is decided in full (a publish that failed with an I/O error
    // leaves its journal behind a clean exit).
    let died = _lock.previous_holder_died();
    if died {
        ws.sweep_temporaries(spec.stages.iter().map(|s| s.output_dir.as_str()))?;
    } else {
        // A holder killed while writing its own holder file leaves no sign of dying but that
        // file's temporary.
        crate::atomic::sweep_temporaries(&ws.locks_dir(), false)?;
    }
    let mut b = Coordinator {
        spec,
        ws: ws.clone(),
        opts,
        cache: None,
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
        statuses: BTreeMap::new(),
        processes: ProcessLog::new(ws.processes_log_file()),
        audit,
        run_saved: Instant::now(),
        memo: match &opts.memo {
            Some(reading) => SkipMemo::load_read(reading, &ws.skip_memo_file(), spec),
            None => SkipMemo::load(&ws.skip_memo_file(), spec),
        },
        recovered: vec![false; spec.stages.len()],
        ahead: Lookahead::new(),
    };
    if died {
        // What the dead holder left is swept and completed: the stats taken before are stale.
        b.memo.drop_early_stats();
        for i in 0..spec.stages.len() {
            b.recover_publish(i, report)?;
        }
    }
    b.memo.prefetch(spec, |i| selected.contains(&i));
    b.save_run()?;
    report(&Event::RunStarted {
        run_id: run_id.clone(),
        pipeline: spec.file.clone(),
        stages: selected.len(),
    });
    let scheduled = b.schedule(graph, &selected, report);
    if scheduled.is_err() {
        // The records of stages that ended before the error are still appended.
        let _ = b.audit.flush();
    }
    scheduled?;
    let done = b.finish(report);
    if let Err(err) = log.close() {
        report(&Event::Warning {
            message: format!("cannot sync the run log: {err}"),
        });
    }
    done
}

/// The coordinator's state for one build.
struct Coordinator<'a> {
    spec: &'a Spec,
    ws: Workspace,
    opts: &'a BuildOptions,
    /// Loaded when first needed: a build that only re-verifies memoised stages never reads it.
    cache: Option<StatCache>,
    started: Instant,
    run: RunRecord,
    metrics: BTreeMap<String, StageMetrics>,
    totals: Totals,
    statuses: BTreeMap<usize, StageStatus>,
    /// The processors this build started and saw ending (`state/processes.jsonl`), so that a
    /// later build can stop what a killed one left behind.
    processes: ProcessLog,
    /// The audit log, appended to by this thread only, under the workspace lock.
    audit: audit::Log,
    /// When the run record was last written (it is rewritten at most every [`RUN_SAVE_EVERY`]
    /// while stages finish, and always at the end: rewriting it per stage is quadratic).
    run_saved: Instant,
    /// Verdicts of earlier builds that a `stat` per watched path re-verifies.
    memo: SkipMemo,
    /// Stages whose interrupted publish (if any) was already looked for.
    recovered: Vec<bool>,
    /// Stages decided ahead of their turn, several at once ([`Coordinator::decide_ahead`]).
    ahead: Lookahead,
}

/// A stage's full decision and, for a skip, its verdict for the memo.
struct FullDecision {
    decided: Result<StagePlan, PlanError>,
    verdict: Option<crate::memo::Verdict>,
}

/// [`plan::decide`] of stage `i` (whose publish journal, if any, was recovered), and a skip's memo
/// verdict, taken on the same thread from the stats the decision took before reading each file.
fn decide_in_full(spec: &Spec, ws: &Workspace, i: usize, cache: &mut StatCache) -> FullDecision {
    cache.observe();
    let decided = plan::decide(spec, ws, i, cache, true);
    let observed = cache.take_observed();
    let verdict = match &decided {
        Ok(plan) if plan.decision == Decision::Skip => {
            crate::memo::verdict(spec, ws, plan, &observed)
        }
        _ => None,
    };
    FullDecision { decided, verdict }
}

/// The decisions taken ahead of their stage's turn, and where the next look for stages to decide
/// ahead starts.
struct Lookahead {
    taken: std::collections::HashMap<usize, FullDecision>,
    /// How many stages the next look takes at most.
    batch: usize,
    /// A stage of this build was started: no stage is decided ahead of its turn any more.
    stopped: bool,
    /// The stages the memo has no verdict for, in order (listed when first needed); those before
    /// `cursor` are decided.
    wanted: Option<Vec<usize>>,
    cursor: usize,
    /// After a look finds no stage to decide ahead, that many of the next are not taken
    /// (`backoff`, doubling while none are found): a chain of stages, each ready only once the one
    /// before it is decided, would otherwise be scanned once per stage.
    idle: usize,
    backoff: usize,
}

impl Lookahead {
    fn new() -> Lookahead {
        Lookahead {
            taken: std::collections::HashMap::new(),
            batch: AHEAD_FIRST,
            stopped: false,
            wanted: None,
            cursor: 0,
            idle: 0,
            backoff: 1,
        }
    }

    /// A stage starts: what it changes is not what the decisions taken ahead saw.
    fn stop(&mut self) {
        self.stopped = true;
        self.taken.clear();
    }
}

/// The first [`Coordinator::decide_ahead`] takes this many stages, each next one twice as many, up
/// to [`AHEAD_MOST`]: a build whose first decided stage runs wastes few decisions, a build that
/// decides thousands (the first no-op after they ran) decides most of them in large batches.
const AHEAD_FIRST: usize = 32;
const AHEAD_MOST: usize = 2048;

/// How many of the stages waiting for the full decision one look for ready ones goes through.
const AHEAD_SCAN: usize = 4 * AHEAD_MOST;

/// How often the run record is rewritten while stages finish.
const RUN_SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Stops the processors a previous build recorded as started and not as ended
/// (`state/processes.jsonl`, or the `state/processes.json` of an earlier version) and that are
/// still alive: that build died (it held the lock we now hold). A pid whose start time differs
/// belongs to an unrelated process and is left alone; a vanished group leader's group is signalled
/// anyway, since its group id cannot be reused while members remain.
fn stop_orphans(
    ws: &Workspace,
    audit: &mut audit::Log,
    report: &mut dyn FnMut(&Event),
) -> io::Result<()> {
    let (log, legacy) = (ws.processes_log_file(), ws.processes_file());
    for (stage, p) in processes::orphans(&log, &legacy).into_values() {
        let same_process = match procfs::stat(p.pid as i32) {
            Some(now) => now.start_time == p.start_time,
            None => true,
        };
        let Some(group) = rustix::process::Pid::from_raw(p.pid as i32).filter(|_| same_process)
        else {
            continue;
        };
        if rustix::process::kill_process_group(group, rustix::process::Signal::KILL).is_ok() {
            audit.lock_takeover(&stage, p.pid, &p.run_id)?;
            report(&Event::Warning {
                message: format!(
                    "stopped processor pid {} of stage `{stage}` left running by run {}",
                    p.pid, p.run_id
                ),
            });
        }
    }
    atomic::remove_if_exists(&legacy)?;
    atomic::remove_if_exists(&log)?;
    Ok(())
}

/// Cancels the Slurm jobs a build that died left running (recorded in `state/slurm_jobs.json`);
/// a local build only warns about them, since it has no way to reach Slurm.
fn stop_orphan_jobs(
    ws: &Workspace,
    executor: &crate::stage_job::Executor,
    report: &mut dyn FnMut(&Event),
) -> io::Result<()> {
    match executor {
        crate::stage_job::Executor::Slurm(cluster) => {
            for (job, run) in cluster.stop_orphans()? {
                report(&Event::Warning {
                    message: format!("cancelled Slurm job {job} left running by run {run}"),
                });
            }
        }
        crate::stage_job::Executor::Local => {
            if ws.slurm_jobs_file().exists() {
                report(&Event::Warning {
                    message: format!(
                        "a build that died may have left Slurm jobs running (listed in {}); a Slurm build cancels them, or use scancel",
                        ws.relative(&ws.slurm_jobs_file())
                    ),
                });
            }
        }
    }
    Ok(())
}

impl Coordinator<'_> {
    fn save_run(&mut self) -> io::Result<()> {
        self.run_saved = Instant::now();
        atomic::write_json(&self.ws.run_file(&self.run.run_id), &self.run)
    }

    /// Saves the run record if the last save is older than [`RUN_SAVE_EVERY`].
    fn save_run_lazily(&mut self) -> io::Result<()> {
        if self.run_saved.elapsed() >= RUN_SAVE_EVERY {
            self.save_run()?;
        }
        Ok(())
    }

    fn stat_cache(&mut self) -> &mut StatCache {
        let ws = &self.ws;
        self.cache.get_or_insert_with(|| ws.load_stat_cache())
    }

    /// Completes or abandons an interrupted publish of stage `i` (once per build).
    fn recover_publish(&mut self, i: usize, report: &mut dyn FnMut(&Event)) -> io::Result<()> {
        if std::mem::replace(&mut self.recovered[i], true) {
            return Ok(());
        }
        let stage = &self.spec.stages[i];
        let target = self.ws.publish_target(stage);
        let recovery = publish::recover(&target, self.stat_cache())?;
        self.audit.publish_recovered(&self.ws, stage, &recovery)?;
        match recovery {
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
        Ok(())
    }

    fn interrupted(&self) -> bool {
        self.opts.interrupt.load(Ordering::SeqCst)
    }

    /// Admits, runs and records every selected stage.
    fn schedule(
        &mut self,
        graph: &Graph,
        selected: &BTreeSet<usize>,
        report: &mut dyn FnMut(&Event),
    ) -> Result<(), BuildError> {
        let spec = self.spec;
        let quotas = &spec.quotas;
        let jobs = self.opts.jobs.unwrap_or(quotas.cpus).max(1);
        let capacity = Capacity {
            cpus: quotas.cpus,
            memory_mb: quotas.memory_mb,
            io: quotas.io,
            jobs,
        };
        let needs = spec
            .stages
            .iter()
            .map(|s| Need {
                cpus: s.resources.cpus,
                memory_mb: s.resources.memory_mb.unwrap_or(0),
                io: s.resources.io,
            })
            .collect();
        let order: Vec<usize> = graph
            .order()
            .iter()
            .copied()
            .filter(|i| selected.contains(i))
            .collect();
        let upstream = (0..spec.stages.len()).map(|i| graph.upstream(i)).collect();
        let machine_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut sched = Scheduler::new(order.clone(), upstream, needs, capacity, machine_cores);
        // Long-lived worker threads (see `workers`), built when the first stage runs: a no-op
        // build starts none. Up to `jobs` stages run their processors while up to
        // `PUBLISHING_PER_JOB` × `jobs` more publish (`Scheduler::release`): one thread each, so a
        // stage that starts always finds one.
        let mut pool: Option<Workers> = None;
        let (tx, rx) = mpsc::channel::<JobMessage>();
        let mut stop = false;
        loop {
            while !stop && !self.interrupted() {
                let Some(i) = sched.next() else { break };
                // A stage downstream of one that published in this build reads files that were
                // just replaced (a publish moves new files in: new inodes, new ctimes), so its
                // memoised verdict cannot match: checking it would only stat every path it
                // watches (a fan-in of 10,000: 30,000 stats, one at a time on this thread).
                let upstream_published = graph.upstream(i).into_iter().any(|u| {
                    matches!(
                        self.statuses.get(&u),
                        Some(StageStatus::Succeeded | StageStatus::Resumed | StageStatus::Restored)
                    )
                });
                match self.plan_stage(i, !upstream_published, &sched, &order, report)? {
                    Planned::Skip(produced) => {
                        sched.skip(i);
                        let stage = &spec.stages[i].name;
                        self.audit
                            .stage_skipped(stage, "unchanged", produced.as_ref())?;
                        self.record(i, StageStatus::Skipped, "unchanged".into(), 0, 0, report)?;
                    }
                    Planned::Failed(reason) => {
                        sched.start(i);
                        sched.finish(i, false);
                        self.record(i, StageStatus::Failed, reason, 0, 0, report)?;
                        stop |= !self.opts.keep_going;
                    }
                    Planned::Run(mut job) => {
                        self.ahead.stop();
                        let cores = sched.start(i);
                        if (spec.stages[i].resources.cpus as usize) < machine_cores {
                            job.cores = cores;
                        }
                        // The "running" record is superseded within the stage's run by a durable
                        // one; a power cut may lose it (never the marker or the audit record).
                        let mut bytes =
                            serde_json::to_vec_pretty(&job.record).map_err(io::Error::other)?;
                        bytes.push(b'\n');
                        atomic::replace_volatile(
                            &self.ws.stage_file(&spec.stages[i].name),
                            &bytes,
                        )?;
                        let tx = tx.clone();
                        let workers = match pool.take() {
                            Some(workers) => workers,
                            None => Workers::new(
                                (1 + PUBLISHING_PER_JOB) * jobs as usize,
                                "pipe-worker",
                            )?,
                        };
                        workers.spawn(move || job.run(&tx));
                        pool = Some(workers);
                    }
                }
            }
            for (i, u) in sched.blocked() {
                let reason = format!(
                    "upstream {} {}",
                    spec.stages[u].name,
                    self.statuses.get(&u).map_or("not_run", |s| s.as_str())
                );
                self.record(i, StageStatus::NotRun, reason, 0, 0, report)?;
            }
            if sched.unfinished() == 0 {
                if stop || self.interrupted() || sched.next().is_none() {
                    for i in sched.abandon_waiting() {
                        self.record(
                            i,
                            StageStatus::NotRun,
                            "the build stopped before this stage".into(),
                            0,
                            0,
                            report,
                        )?;
                    }
                }
                if sched.done() {
                    return Ok(());
                }
                continue;
            }
            let message = match rx.try_recv() {
                Ok(message) => message,
                Err(_) => {
                    // Nothing to do until a running stage reports: have the queued audit records
                    // made durable meanwhile, by the log's writer thread, so that this thread is
                    // free to start the next stage as soon as one reports. Stages that end while
                    // a batch is written queue theirs for the next one, so the records of many
                    // short stages share one append (group commit) instead of costing five syncs
                    // each.
                    self.audit.flush_in_background()?;
                    rx.recv().expect("a running stage holds a sender")
                }
            };
            match message {
                JobMessage::Event(event) => report(&event),
                JobMessage::Spawned {
                    stage,
                    pid,
                    start_time,
                } => {
                    let p = RunningProcess {
                        pid,
                        start_time,
                        run_id: self.run.run_id.clone(),
                    };
                    self.processes.spawned(&stage, &p)?;
                }
                JobMessage::Exited {
                    pid, start_time, ..
                } => self.processes.exited(pid, start_time)?,
                JobMessage::RecordFailed(err) => return Err(err.into()),
                JobMessage::Released(i) => {
                    sched.release(i);
                }
                JobMessage::Done(i, result) => {
                    let JobResult {
                        status,
                        reason,
                        attempts,
                        duration_ms,
                        retries,
                        metrics,
                        hashes,
                    } = *result;
                    self.stat_cache().absorb(hashes);
                    self.memo.files_changed();
                    self.totals.retries += retries;
                    self.metrics.insert(spec.stages[i].name.clone(), metrics);
                    let ok = matches!(
                        status,
                        StageStatus::Succeeded | StageStatus::Resumed | StageStatus::Restored
                    );
                    sched.finish(i, ok);
                    if !ok && !self.opts.keep_going {
                        stop = true;
                    }
                    self.record(i, status, reason, attempts, duration_ms, report)?;
                }
            }
        }
    }

    /// Decides stage `i` now that its upstream stages have published; `ask_memo`: whether the
    /// skip memo is asked first (not when an upstream stage published in this build).
    fn plan_stage(
        &mut self,
        i: usize,
        ask_memo: bool,
        sched: &Scheduler,
        order: &[usize],
        report: &mut dyn FnMut(&Event),
    ) -> Result<Planned, BuildError> {
        let stage = &self.spec.stages[i];
        // Recovery is only needed on the full path. Journals of a build that died were completed
        // before any verdict (`died` above). Any other journal is left by a publish that failed:
        // its stage ran, so a verdict memoised before matches only if what made it run was
        // undone, and only while no output has moved and the marker is the old one (both are
        // watched), so the skip is still true; the journal is met when the stage is next decided
        // in full.
        if let Some(produced) = ask_memo
            .then(|| self.memo.unchanged(self.spec, i))
            .flatten()
        {
            report(&Event::StagePlanned {
                stage: stage.name.clone(),
                summary: Decision::Skip.describe(),
                decision: Decision::Skip,
            });
            return Ok(Planned::Skip(Some(produced)));
        }
        if !self.ahead.stopped && !self.ahead.taken.contains_key(&i) {
            self.decide_ahead(i, sched, order);
        }
        let FullDecision { decided, verdict } = match self.ahead.taken.remove(&i) {
            Some(full) => {
                // Its decision found no publish journal to recover.
                self.recovered[i] = true;
                full
            }
            None => {
                self.recover_publish(i, report)?;
                let (spec, ws) = (self.spec, self.ws.clone());
                decide_in_full(spec, &ws, i, self.stat_cache())
            }
        };
        let mut plan = match decided {
            Ok(plan) => plan,
            Err(err) => {
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
                    duration_ms: Some(0),
                    attempts: Vec::new(),
                    resumed_from_line: None,
                    error: Some(err.to_string()),
                };
                atomic::write_json(&self.ws.stage_file(&stage.name), &record)?;
                return Ok(Planned::Failed(err.to_string()));
            }
        };
        for warning in &plan.warnings {
            report(&Event::Warning {
                message: warning.clone(),
            });
        }
        // Out before the event clones the decision: with 100,000 items, every copy counts.
        let map_items = plan.decision.take_items();
        report(&Event::StagePlanned {
            stage: stage.name.clone(),
            summary: plan.decision.describe(),
            decision: plan.decision.clone(),
        });
        if plan.decision == Decision::Skip {
            self.memo.keep(i, verdict);
            let produced = plan.marker.map(|m| (m.fingerprint, m.run_id));
            return Ok(Planned::Skip(produced));
        }
        self.memo.forget(i);
        let reason = plan.decision.describe();
        let mut job = StageJob::new(
            self.spec,
            &self.ws,
            i,
            plan,
            map_items,
            &self.run.run_id,
            &self.opts.exe,
            &self.opts.interrupt,
            reason,
        );
        job.executor = self.opts.executor.clone();
        job.sandbox = crate::sandbox::stage_policy(
            &self.opts.sandbox,
            self.spec,
            &self.ws,
            stage,
            &job.inputs,
            &self.opts.exe,
        );
        Ok(Planned::Run(Box::new(job)))
    }

    /// Decides stage `i` and other stages that are ready and need the full decision (the skip memo
    /// has no verdict of theirs to check) ahead of their turn, on all cores, `Lookahead::batch` at
    /// most. The first no-op build after a build that ran many stages decides each of them the
    /// full way: one at a time, that took 12 times ninja's no-op.
    ///
    /// Only while this build has started no stage, so nothing it did can have changed a file a
    /// decision read: a decision taken ahead is the one its turn would take. A stage whose output
    /// folder holds a publish journal is left to its turn (the journal is recovered first).
    fn decide_ahead(&mut self, i: usize, sched: &Scheduler, order: &[usize]) {
        let ahead = &mut self.ahead;
        if ahead.idle > 0 {
            ahead.idle -= 1;
            return;
        }
        let memo = &self.memo;
        let wanted = ahead.wanted.get_or_insert_with(|| {
            order
                .iter()
                .copied()
                .filter(|&j| memo.needs_full(j))
                .collect()
        });
        let taken = &ahead.taken;
        let decided = |j: usize| sched.phase(j) != Phase::Waiting || taken.contains_key(&j);
        while ahead.cursor < wanted.len() && decided(wanted[ahead.cursor]) {
            ahead.cursor += 1;
        }
        let candidates: Vec<(usize, bool)> = std::iter::once(i)
            .chain(
                wanted[ahead.cursor..]
                    .iter()
                    .take(AHEAD_SCAN)
                    .copied()
                    .filter(|&j| j != i && sched.ready(j) && !decided(j)),
            )
            .take(ahead.batch)
            .map(|j| (j, self.recovered[j]))
            .collect();
        if candidates.len() < 2 {
            ahead.idle = ahead.backoff;
            ahead.backoff = (ahead.backoff * 2).min(AHEAD_MOST);
            return;
        }
        ahead.backoff = 1;
        ahead.batch = (ahead.batch * 2).min(AHEAD_MOST);
        let (spec, ws) = (self.spec, self.ws.clone());
        let decided = self
            .stat_cache()
            .par_map(&candidates, |&(j, recovered), cache| {
                if !recovered {
                    let journal = ws.publish_target(&spec.stages[j]).journal;
                    match std::fs::symlink_metadata(&journal) {
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        _ => return None,
                    }
                }
                Some((j, decide_in_full(spec, &ws, j, cache)))
            });
        self.ahead.taken.extend(decided.into_iter().flatten());
    }

    /// Records a stage's end in the run record, the totals and the console.
    fn record(
        &mut self,
        i: usize,
        status: StageStatus,
        reason: String,
        attempts: u32,
        duration_ms: u64,
        report: &mut dyn FnMut(&Event),
    ) -> io::Result<()> {
        let name = self.spec.stages[i].name.clone();
        self.statuses.insert(i, status);
        self.metrics.entry(name.clone()).or_default();
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
        report(&Event::StageFinished {
            stage: name.clone(),
            status,
            duration_ms,
            reason: reason.clone(),
        });
        if status != StageStatus::Skipped {
            self.audit
                .stage_finished(&self.ws, &self.spec.stages[i], status, &reason, attempts)?;
        }
        self.run.stages.push(RunStage {
            name,
            status,
            reason,
            attempts,
            duration_ms,
        });
        self.save_run_lazily()
    }

    /// Writes the run's metrics (JSON and Prometheus, side by side: for 10,000 stages they are
    /// 2 and 6 MB, each streamed into its file and synced) and then its final run record.
    fn save_metrics_and_run(&mut self, metrics: &Metrics) -> io::Result<()> {
        let json = self.ws.metrics_file(&self.run.run_id);
        let prom = self.ws.metrics_prom_file(&self.run.run_id);
        let (json, prom) = std::thread::scope(|scope| {
            let prom = scope
                .spawn(|| atomic::write_with(&prom, |out| crate::prometheus::write(metrics, out)));
            let json = atomic::write_json(&json, metrics);
            (
                json,
                prom.join().expect("rendering the metrics does not panic"),
            )
        });
        json?;
        prom?;
        self.save_run()
    }

    /// Closes the run: final records, metrics, stat cache.
    fn finish(mut self, report: &mut dyn FnMut(&Event)) -> Result<BuildReport, BuildError> {
        // Stages not decided (a failure stopped the build) need no stats: free the pool.
        self.memo.stop_prefetch();
        let interrupted = self
            .statuses
            .values()
            .any(|s| *s == StageStatus::Interrupted)
            || self.interrupted();
        let failed = self.statuses.values().any(|s| *s == StageStatus::Failed);
        self.run.status = if interrupted {
            RunStatus::Interrupted
        } else if failed {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
        let wall = self.started.elapsed().as_millis() as u64;
        self.run.finished_at = Some(state::now_rfc3339());
        self.run.duration_ms = Some(wall);
        self.totals.stages = self.run.stages.len() as u32;
        self.totals.wall_ms = wall;
        let metrics = Metrics {
            version: state::STATE_VERSION,
            run_id: self.run.run_id.clone(),
            totals: self.totals.clone(),
            stages: std::mem::take(&mut self.metrics),
        };
        if let Err(err) = self.save_metrics_and_run(&metrics) {
            // The stage records still queued for the audit log are appended all the same.
            let _ = self.audit.flush();
            return Err(err.into());
        }
        // Pruning stats every entry this build did not look up: only worth it when the cache
        // changed (a build that only re-verified memoised stages looked nothing up).
        if let Some(cache) = self.cache.as_mut().filter(|c| c.is_dirty()) {
            cache.prune_missing();
            if let Err(err) = cache.save(&self.ws.stat_cache_file()) {
                report(&Event::Warning {
                    message: format!("could not save the stat cache (next build rehashes): {err}"),
                });
            }
        }
        if let Err(err) = self.memo.save(&self.ws.skip_memo_file(), self.spec) {
            report(&Event::Warning {
                message: format!(
                    "could not save the skip memo (next build decides every stage in full): {err}"
                ),
            });
        }
        self.audit.run_finished(&self.run, &self.totals)?;
        let head = self.audit.head().clone();
        report(&Event::AuditHead {
            seq: head.seq,
            hash: head.hash,
        });
        report(&Event::RunFinished {
            run_id: self.run.run_id.clone(),
            status: self.run.status,
            duration_ms: wall,
            totals: self.totals.clone(),
        });
        Ok(BuildReport {
            run: self.run,
            metrics,
        })
    }
}

/// What the planner decided for a ready stage.
enum Planned {
    /// Unchanged: the fingerprint and run id of its marker.
    Skip(Option<(String, String)>),
    Failed(String),
    Run(Box<StageJob>),
}
