//! The Slurm executor: stage attempts and map items run as Slurm batch jobs.
//!
//! The engine stays the planner and the single writer of state. A [`Cluster`] takes units of
//! work (one attempt's [`Invocation`]) from the stage jobs' threads, groups map items of one
//! stage into jobs (at most `itemsPerJob` each), submits at most `maxJobsInFlight` jobs at once
//! through the submitter ([`submitter`]: the only process that can reach Slurm), and polls the
//! queue every `pollIntervalMs`. Each caller waits for its own unit: it reads the unit's progress
//! file (checkpoint lines) and its status file on the shared filesystem ([`job`]); the status
//! file decides how the attempt ended; without one, the job's Slurm state does ([`queue`]).
//!
//! Files of a run: `state/logs/<run>/slurm/job-<n>/{job.json,job.sh,slurm.out}` per job and
//! `state/logs/<run>/slurm/unit-<n>/{progress.jsonl,status.json}` per unit.

pub mod job;
pub mod queue;
pub mod submitter;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use pipe_processors::checkpoint::Checkpoint;

use crate::executor::{Invocation, Outcome};
use crate::spec::SlurmSettings;
use queue::{End, JobState};
use submitter::{Client, Request};

/// How long the first unit of a batch waits for more units of its stage before its job is
/// submitted anyway.
const GATHER: Duration = Duration::from_millis(300);
/// Memory `sbatch --mem` adds to a stage's `memoryMb` for the wrapper and the helper, so the
/// engine's own watchdog (which classifies `memory`) normally fires before Slurm's kill.
pub const MEMORY_HEADROOM_MB: u64 = 64;
/// The start of the line an attempt's log gets when its job is submitted (not a processor
/// message: failure messages skip it).
pub const LOG_LINE: &str = "pipe: running as Slurm job";
/// How long a cancelled unit waits for its job to end before it is reported interrupted.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// One unit of work, as a stage job hands it over.
#[derive(Debug)]
pub struct Work<'a> {
    pub inv: &'a Invocation,
    /// Slurm job name: `pipe-<stage>` or `pipe-<stage>-<item>`.
    pub name: String,
    /// Units with the same key may share a job (the stage's name for map items).
    pub key: String,
    /// At most this many units per job (1: a job of its own).
    pub batch: u32,
    /// `--cpus-per-task`.
    pub cpus: u32,
}

struct Pending {
    id: u64,
    key: String,
    batch: u32,
    name: String,
    cpus: u32,
    unit: job::Unit,
    since: Instant,
}

#[derive(Debug)]
struct Job {
    units: usize,
    done: usize,
    state: Option<JobState>,
    output: PathBuf,
}

#[derive(Debug, Clone)]
enum Placement {
    Waiting,
    Submitted(String),
    Refused(String),
}

#[derive(Default)]
struct Shared {
    pending: VecDeque<Pending>,
    jobs: BTreeMap<String, Job>,
    placement: HashMap<u64, Placement>,
    submitting: usize,
    next_poll: Option<Instant>,
}

/// The Slurm executor of one build.
pub struct Cluster {
    settings: SlurmSettings,
    client: &'static Client,
    run_id: String,
    dir: PathBuf,
    /// `state/slurm_jobs.json`: the jobs of this build not finished yet (job id → run id), so a
    /// build that died is cleaned up after by the next ([`Cluster::stop_orphans`]).
    jobs_file: PathBuf,
    shared: Mutex<Shared>,
    wake: Condvar,
    next_id: AtomicU64,
    /// Jobs submitted by this build.
    pub submitted: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("settings", &self.settings)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The executor for run `run_id`, keeping its files in `dir`; starts its driver thread (which
    /// ends when the last handle is dropped).
    pub fn start(
        settings: SlurmSettings,
        client: &'static Client,
        run_id: &str,
        ws: &crate::workspace::Workspace,
    ) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster {
            settings,
            client,
            run_id: run_id.to_string(),
            dir: ws.logs_dir(run_id).join("slurm"),
            jobs_file: ws.slurm_jobs_file(),
            shared: Mutex::new(Shared::default()),
            wake: Condvar::new(),
            next_id: AtomicU64::new(1),
            submitted: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&cluster);
        std::thread::spawn(move || drive(weak));
        cluster
    }

    /// Items per job for a map stage running `items` items.
    pub fn batch_size(&self, items: usize) -> u32 {
        match self.settings.items_per_job {
            Some(n) => n,
            None => {
                let jobs = self.settings.max_jobs_in_flight.max(1) as usize;
                items.div_ceil(jobs).clamp(1, 64) as u32
            }
        }
    }

    /// How many units may wait at once (map stages start this many item threads at most).
    pub fn capacity(&self, batch: u32) -> usize {
        (self.settings.max_jobs_in_flight as usize * batch as usize).clamp(1, 512)
    }

    /// Runs one unit on the cluster and waits for its end; checkpoints reach `on_checkpoint` as
    /// the progress file grows.
    pub fn run(
        &self,
        work: Work<'_>,
        interrupt: &AtomicBool,
        on_checkpoint: &mut dyn FnMut(Checkpoint) -> io::Result<()>,
    ) -> Outcome {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let dir = self.dir.join(format!("unit-{id}"));
        let progress = dir.join("progress.jsonl");
        let status = dir.join("status.json");
        let unit = std::fs::create_dir_all(&dir)
            .and_then(|()| job::Unit::of(work.inv, progress.clone(), status.clone()));
        let unit = match unit {
            Ok(unit) => unit,
            Err(err) => {
                return Outcome {
                    protocol_error: Some(format!("cannot prepare the Slurm job: {err}")),
                    ..Outcome::default()
                }
            }
        };
        {
            let mut shared = self.shared.lock().expect("cluster lock");
            shared.placement.insert(id, Placement::Waiting);
            shared.pending.push_back(Pending {
                id,
                key: work.key,
                batch: work.batch.max(1),
                name: work.name,
                cpus: work.cpus.max(1),
                unit,
                since: Instant::now(),
            });
        }
        self.wake.notify_all();
        let started = Instant::now();
        let tick = Duration::from_millis(self.settings.poll_interval_ms.min(200));
        let grace =
            Duration::from_millis(self.settings.poll_interval_ms * 2) + Duration::from_secs(1);
        let mut reader = ProgressReader::new(progress);
        let mut protocol_error = None;
        let mut cancelled_at: Option<Instant> = None;
        let mut finished_since: Option<Instant> = None;
        loop {
            if protocol_error.is_none() {
                if let Err(err) = reader.drain(on_checkpoint) {
                    protocol_error = Some(err);
                    self.cancel_unit(id);
                }
            }
            if let Some(end) = read_status(&status) {
                let _ = reader.drain(on_checkpoint);
                self.finish_unit(id);
                let mut outcome = end.outcome();
                outcome.interrupted = cancelled_at.is_some();
                outcome.protocol_error = protocol_error.or(outcome.protocol_error);
                return outcome;
            }
            match self.placement(id) {
                Some(Placement::Refused(why)) => {
                    self.finish_unit(id);
                    if queue::is_transient_refusal(&why) {
                        return Outcome {
                            lost: true,
                            executor_note: Some(format!(
                                "Slurm did not take the job ({why}); retryable"
                            )),
                            duration: started.elapsed(),
                            ..Outcome::default()
                        };
                    }
                    return Outcome {
                        protocol_error: Some(format!("Slurm refused the job: {why}")),
                        duration: started.elapsed(),
                        ..Outcome::default()
                    };
                }
                Some(Placement::Waiting) | None => {
                    let mut shared = self.shared.lock().expect("cluster lock");
                    // Not pending any more: the driver is submitting it right now; once it is
                    // submitted, it is cancelled like any other.
                    let pending = shared.pending.iter().any(|p| p.id == id);
                    if pending && (interrupt.load(Ordering::SeqCst) || protocol_error.is_some()) {
                        shared.pending.retain(|p| p.id != id);
                        shared.placement.remove(&id);
                        return Outcome {
                            interrupted: protocol_error.is_none(),
                            protocol_error,
                            duration: started.elapsed(),
                            ..Outcome::default()
                        };
                    }
                }
                Some(Placement::Submitted(job)) => {
                    if interrupt.load(Ordering::SeqCst) && cancelled_at.is_none() {
                        self.cancel(&job);
                        cancelled_at = Some(Instant::now());
                    }
                    let (state, output) = {
                        let shared = self.shared.lock().expect("cluster lock");
                        let j = shared.jobs.get(&job);
                        (j.and_then(|j| j.state.clone()), j.map(|j| j.output.clone()))
                    };
                    let finished = state.as_ref().is_some_and(|s| queue::is_finished(&s.state));
                    if finished {
                        let since = *finished_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= grace {
                            let _ = reader.drain(on_checkpoint);
                            if read_status(&status).is_some() {
                                continue;
                            }
                            self.finish_unit(id);
                            let output = output.map(|p| crate::executor::tail(&p, 20));
                            let state = state.expect("finished");
                            let mut outcome = Outcome {
                                duration: started.elapsed(),
                                interrupted: cancelled_at.is_some(),
                                protocol_error,
                                ..Outcome::default()
                            };
                            let end =
                                queue::classify(&job, &state, output.as_deref().unwrap_or(""));
                            apply_end(&mut outcome, end);
                            return outcome;
                        }
                    }
                    if cancelled_at.is_some_and(|t| t.elapsed() > CANCEL_WAIT) {
                        self.finish_unit(id);
                        return Outcome {
                            interrupted: true,
                            duration: started.elapsed(),
                            ..Outcome::default()
                        };
                    }
                }
            }
            std::thread::sleep(tick);
        }
    }

    /// Records the jobs in flight (under the cluster lock, so writes are ordered); a failure only
    /// costs the clean-up after a crash, so it is ignored.
    fn save_jobs(&self, shared: &Shared) {
        let jobs: BTreeMap<&String, &String> =
            shared.jobs.keys().map(|id| (id, &self.run_id)).collect();
        if jobs.is_empty() {
            let _ = crate::atomic::remove_if_exists(&self.jobs_file);
        } else {
            let _ = crate::atomic::write_json(&self.jobs_file, &jobs);
        }
    }

    /// Cancels the jobs a previous build recorded as in flight and that still run: that build
    /// died (its lock is ours now). Only jobs whose comment names that build's run are touched.
    /// Returns what was cancelled, as (job id, run id).
    pub fn stop_orphans(&self) -> io::Result<Vec<(String, String)>> {
        let Ok(bytes) = std::fs::read(&self.jobs_file) else {
            return Ok(Vec::new());
        };
        let recorded: BTreeMap<String, String> = serde_json::from_slice(&bytes).unwrap_or_default();
        let mut stopped = Vec::new();
        if !recorded.is_empty() {
            let ids: Vec<String> = recorded.keys().cloned().collect();
            let states = self.query(&ids).ok_or_else(|| {
                io::Error::other("cannot ask Slurm about the jobs a previous build left running")
            })?;
            for (id, run) in recorded {
                let alive = states.get(&id).is_some_and(|s| {
                    !queue::is_finished(&s.state) && s.comment == format!("pipe run {run}")
                });
                if alive {
                    self.cancel(&id);
                    stopped.push((id, run));
                }
            }
        }
        crate::atomic::remove_if_exists(&self.jobs_file)?;
        Ok(stopped)
    }

    /// Where unit `id` stands with Slurm (submitted as a job, refused, or not yet).
    fn placement(&self, id: u64) -> Option<Placement> {
        self.shared
            .lock()
            .expect("cluster lock")
            .placement
            .get(&id)
            .cloned()
    }

    fn cancel_unit(&self, id: u64) {
        if let Some(Placement::Submitted(job)) = self.placement(id) {
            self.cancel(&job);
        }
    }

    fn cancel(&self, job: &str) {
        let _ = self.client.call(&Request::Cancel {
            jobs: vec![job.to_string()],
        });
    }

    /// The unit is decided: its job counts one unit fewer.
    fn finish_unit(&self, id: u64) {
        let mut shared = self.shared.lock().expect("cluster lock");
        if let Some(Placement::Submitted(job)) = shared.placement.remove(&id) {
            let done = match shared.jobs.get_mut(&job) {
                Some(j) => {
                    j.done += 1;
                    j.done >= j.units
                }
                None => false,
            };
            if done {
                shared.jobs.remove(&job);
                self.save_jobs(&shared);
            }
        }
        drop(shared);
        self.wake.notify_all();
    }

    /// Writes the job file and script of `units` and submits them; the job id or why not.
    fn submit(&self, units: &[Pending]) -> Result<(String, PathBuf), String> {
        let first = &units[0];
        let dir = self.dir.join(format!("job-{}", first.id));
        let file = dir.join("job.json");
        let script = dir.join("job.sh");
        let output = dir.join("slurm.out");
        let environ =
            crate::sandbox::env::environment(std::env::vars_os(), &first.unit.pass_env, &[])
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        v.to_string_lossy().into_owned(),
                    )
                })
                .collect();
        let job = job::JobFile {
            environ,
            units: units.iter().map(|p| p.unit.clone()).collect(),
        };
        let exe = &first.unit.exe;
        std::fs::create_dir_all(&dir)
            .and_then(|()| crate::atomic::write_json(&file, &job))
            .and_then(|()| {
                let profile = std::env::var("LLVM_PROFILE_FILE").ok();
                crate::atomic::write(
                    &script,
                    job::script(exe, &file, profile.as_deref()).as_bytes(),
                )
            })
            .map_err(|e| format!("cannot write the job files in {}: {e}", dir.display()))?;
        let name = if units.len() == 1 {
            first.name.clone()
        } else {
            format!("{}+{}", first.name, units.len() - 1)
        };
        let options = self.options(units, &name, &output);
        let response = self
            .client
            .call(&Request::Submit {
                options,
                script: script.clone(),
            })
            .map_err(|e| format!("the Slurm submitter failed: {e}"))?;
        if !response.ok() {
            return Err(format!("sbatch: {}", response.problem()));
        }
        let id = response
            .stdout
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
            return Err(format!("sbatch printed no job id: {:?}", response.stdout));
        }
        self.submitted.fetch_add(1, Ordering::SeqCst);
        for p in units {
            if let Ok(mut log) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p.unit.log)
            {
                let _ = writeln!(
                    log,
                    "{LOG_LINE} {id} ({name}); Slurm output: {}",
                    output.display()
                );
            }
        }
        Ok((id, output))
    }

    /// The `sbatch` options of a job running `units` one after another.
    fn options(&self, units: &[Pending], name: &str, output: &Path) -> Vec<String> {
        let first = &units[0];
        let mut options = vec![
            format!("--job-name={name}"),
            format!("--output={}", output.display()),
            format!("--chdir={}", first.unit.cwd.display()),
            "--export=NONE".into(),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            format!("--cpus-per-task={}", first.cpus),
            format!("--comment=pipe run {}", self.run_id),
        ];
        if let Some(mb) = units.iter().filter_map(|u| u.unit.memory_limit_mb).max() {
            options.push(format!("--mem={}", mb + MEMORY_HEADROOM_MB));
        }
        let timeouts: Vec<Option<u64>> = units.iter().map(|u| u.unit.timeout_ms).collect();
        if timeouts.iter().all(Option::is_some) {
            // Slurm counts minutes; the wrapper enforces each unit's own timeout exactly.
            let total_ms: u64 = timeouts.iter().flatten().sum();
            let minutes = total_ms.div_ceil(60_000) + 1;
            options.push(format!("--time={minutes}"));
        }
        if let Some(p) = &self.settings.partition {
            options.push(format!("--partition={p}"));
        }
        if let Some(a) = &self.settings.account {
            options.push(format!("--account={a}"));
        }
        options.extend(self.settings.extra_args.iter().cloned());
        options
    }

    /// One round of the driver: submit what fits, poll the queue when due. Returns how long it
    /// may sleep.
    fn step(&self) -> Duration {
        loop {
            let batch = {
                let mut shared = self.shared.lock().expect("cluster lock");
                let in_flight = shared.jobs.len() + shared.submitting;
                if in_flight >= self.settings.max_jobs_in_flight as usize {
                    break;
                }
                let Some(front) = shared.pending.front() else {
                    break;
                };
                let (key, size) = (front.key.clone(), front.batch as usize);
                let same = shared.pending.iter().filter(|p| p.key == key).count();
                if same < size && front.since.elapsed() < GATHER {
                    break;
                }
                let mut taken = Vec::new();
                let mut rest = VecDeque::new();
                while let Some(p) = shared.pending.pop_front() {
                    if p.key == key && taken.len() < size {
                        taken.push(p);
                    } else {
                        rest.push_back(p);
                    }
                }
                shared.pending = rest;
                shared.submitting += 1;
                taken
            };
            let result = self.submit(&batch);
            let mut shared = self.shared.lock().expect("cluster lock");
            shared.submitting -= 1;
            match result {
                Ok((id, output)) => {
                    shared.jobs.insert(
                        id.clone(),
                        Job {
                            units: batch.len(),
                            done: 0,
                            state: None,
                            output,
                        },
                    );
                    for p in &batch {
                        shared
                            .placement
                            .insert(p.id, Placement::Submitted(id.clone()));
                    }
                    self.save_jobs(&shared);
                    shared.next_poll.get_or_insert_with(Instant::now);
                }
                Err(why) => {
                    for p in &batch {
                        shared
                            .placement
                            .insert(p.id, Placement::Refused(why.clone()));
                    }
                }
            }
            drop(shared);
            self.wake.notify_all();
        }
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let due = {
            let shared = self.shared.lock().expect("cluster lock");
            match shared.next_poll {
                Some(t) if Instant::now() >= t && !shared.jobs.is_empty() => {
                    Some(shared.jobs.keys().cloned().collect::<Vec<_>>())
                }
                _ => None,
            }
        };
        if let Some(ids) = due {
            let states = self.query(&ids);
            let mut shared = self.shared.lock().expect("cluster lock");
            if let Some(states) = states {
                for (id, state) in states {
                    if let Some(job) = shared.jobs.get_mut(&id) {
                        job.state = Some(state);
                    }
                }
            }
            shared.next_poll = Some(Instant::now() + poll);
        }
        Duration::from_millis(100).min(poll)
    }

    /// The states of `ids`: from the queue, else from accounting, else [`queue::GONE`]. `None`
    /// when the queue could not be read at all (the controller is unreachable: try again later).
    fn query(&self, ids: &[String]) -> Option<BTreeMap<String, JobState>> {
        let response = self
            .client
            .call(&Request::Queue { jobs: ids.to_vec() })
            .ok()?;
        let mut states = if response.ok() {
            queue::parse_queue(&response.stdout)
        } else if response.stderr.contains("Invalid job id") {
            BTreeMap::new()
        } else {
            return None;
        };
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !states.contains_key(*id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let accounted = self
                .client
                .call(&Request::Accounting {
                    jobs: missing.clone(),
                })
                .ok()
                .filter(|r| r.ok())
                .map(|r| queue::parse_accounting(&r.stdout))
                .unwrap_or_default();
            for id in missing {
                let state = accounted.get(&id).cloned().unwrap_or(JobState {
                    state: queue::GONE.into(),
                    ..JobState::default()
                });
                states.insert(id, state);
            }
        }
        Some(states)
    }
}

fn drive(cluster: Weak<Cluster>) {
    loop {
        let Some(c) = cluster.upgrade() else {
            return;
        };
        let sleep = c.step();
        let shared = c.shared.lock().expect("cluster lock");
        let _ = c.wake.wait_timeout(shared, sleep);
    }
}

/// Sets the outcome of a unit whose job ended without a status file.
fn apply_end(outcome: &mut Outcome, end: End) {
    match end {
        End::Memory(why) => {
            outcome.memory_exceeded = true;
            outcome.executor_note = Some(why);
        }
        End::Timeout(why) => {
            outcome.timed_out = true;
            outcome.executor_note = Some(why);
        }
        End::Cancelled(why) => {
            outcome.signal = Some(libc::SIGTERM);
            outcome.executor_note = Some(why);
        }
        End::Lost(why) => {
            outcome.lost = true;
            outcome.executor_note = Some(why);
        }
    }
}

/// The unit's status, once its file is there (written by rename, so never torn).
fn read_status(path: &Path) -> Option<job::Status> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Reads the checkpoint lines appended to a progress file since the last call.
struct ProgressReader {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl ProgressReader {
    fn new(path: PathBuf) -> ProgressReader {
        ProgressReader {
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Hands every complete new line to `on_checkpoint`; a malformed line or a failure to persist
    /// one is the attempt's protocol error. The file is opened afresh each time (close-to-open
    /// consistency on NFS).
    fn drain(
        &mut self,
        on_checkpoint: &mut dyn FnMut(Checkpoint) -> io::Result<()>,
    ) -> Result<(), String> {
        let Ok(mut file) = File::open(&self.path) else {
            return Ok(());
        };
        let mut bytes = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut bytes).is_err()
        {
            return Ok(());
        }
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = std::str::from_utf8(&line).map_err(|_| "checkpoint line is not UTF-8")?;
            let cp = Checkpoint::parse(text)
                .map_err(|e| format!("malformed checkpoint line {:?}: {e}", text.trim_end()))?;
            on_checkpoint(cp).map_err(|e| format!("could not persist a checkpoint: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_reader_hands_over_complete_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let mut reader = ProgressReader::new(path.clone());
        let mut seen = Vec::new();
        reader
            .drain(&mut |cp| {
                seen.push(cp);
                Ok(())
            })
            .unwrap();
        assert!(seen.is_empty(), "no file yet");
        let line = r#"{"inputIndex":0,"lineOffset":10,"byteOffset":55,"outputBytes":55}"#;
        std::fs::write(&path, format!("{line}\n{}", &line[..20])).unwrap();
        reader
            .drain(&mut |cp| {
                seen.push(cp);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].line_offset, 10);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(format!("{}\n", &line[20..]).as_bytes())
            .unwrap();
        reader
            .drain(&mut |cp| {
                seen.push(cp);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen.len(), 2, "the cut line completed");
        std::fs::write(dir.path().join("bad"), "nonsense\n").unwrap();
        let mut bad = ProgressReader::new(dir.path().join("bad"));
        assert!(bad.drain(&mut |_| Ok(())).is_err());
    }
}
