//! Runs one attempt of a processor as a child process and watches it.
//!
//! The child is `pipe __exec` (the re-exec helper, [`crate::sandbox::helper`]), which confines
//! itself as the attempt's [`Policy`] says and then executes the processor in place, so the
//! processor keeps the helper's pid. The child runs in its own process group (so the whole tree
//! can be signalled), gets a parent-death signal (so it dies with `pipe`, even on `kill -9`), has
//! stdin closed and stdout/stderr appended to a log file, an environment cut to an allowlist
//! ([`crate::sandbox::env`]), the write end of a progress pipe as fd 3 (`PIPELINE_PROGRESS_FD=3`)
//! and the report channel of the helper as fd 4 (close-on-exec in the helper, so the processor
//! never sees it). The helper is forked by the build's spawn server ([`crate::sandbox::zygote`]),
//! which reaps it and reports its end; without one it is started with `posix_spawn` and sets
//! these up itself (see [`crate::sandbox::helper`]): a fork of the engine would copy its page
//! tables, a cost that grows with the build.
//!
//! The calling thread watches the attempt with one `poll` over all its descriptors
//! ([`crate::watch`]): checkpoint lines from the progress pipe, the helper's report (which layers
//! it applied), the seccomp notifications of network attempts (the offender is killed, the
//! attempt recorded as a violation) and the processor's end (told by the spawn server's ends
//! reader, or, for a `posix_spawn`ed helper, by a thread of its own blocked in `wait4`). It
//! hands checkpoints to [`Checkpoints`] (persisted at once, or held for a grace period), enforces
//! the timeout and the memory cap and reacts to interruption: SIGTERM to the group, a grace
//! period, then SIGKILL. When the processor exits, whatever it left in its group is killed.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pipe_processors::checkpoint::Checkpoint;

use crate::procfs;
use crate::sandbox::helper;
use crate::sandbox::zygote::Exit;
use crate::sandbox::{self, channel, Layers, Policy, Violation};
use crate::watch::{Event, Watch};
use rustix::process::{Pid, Signal};

/// The fd number the progress pipe has in the child.
pub const PROGRESS_FD: i32 = helper::PROGRESS_FD;
/// The fd number the helper's report channel has in the child.
pub const REPORT_FD: i32 = helper::REPORT_FD;
/// Above this size the helper's spec goes to a file next to the log instead of the command line.
const MAX_SPEC_ARG: usize = 64 * 1024;
/// How long an interrupted processor gets between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// stdout and stderr of the attempt go here.
    pub log: PathBuf,
    pub timeout: Option<Duration>,
    /// Cores the processor is pinned to (`sched_setaffinity`); `None`: not pinned.
    pub cpu_set: Option<Vec<usize>>,
    /// Resident memory cap of the processor's whole process group, enforced by the watchdog.
    pub memory_limit_mb: Option<u64>,
    /// Address-space backstop (`RLIMIT_AS`), with `MALLOC_ARENA_MAX=2`.
    pub virtual_memory_mb: Option<u64>,
    /// How the attempt is confined. The default policy names no helper binary: the attempt
    /// fails to start rather than run unconfined.
    pub sandbox: Policy,
}

/// How often the memory watchdog samples the process group.
const MEMORY_SAMPLE: Duration = Duration::from_millis(100);
/// Longest wait for a message before the attempt's clocks (timeout, interrupt, memory sample,
/// checkpoint grace) are looked at again.
const POLL: Duration = Duration::from_millis(20);
/// How long after the processor's end its progress pipe may stay open (held by a leftover
/// process) before the attempt stops waiting for the pipe's last lines.
const EOF_WAIT: Duration = Duration::from_secs(2);

/// How long a checkpoint at the end of an input may be held instead of persisted at once (see
/// [`Checkpoints`]), counted from the attempt's start or its last persisted checkpoint.
///
/// The SDKs send a checkpoint at the end of every input, whatever cadence the stage asked for: a
/// stage of one small input sends one just before it exits, a stage of many small inputs one per
/// input. Persisted at once, each is a `state/progress_<stage>.json` (a new inode, two fsyncs);
/// for a small stage a publish removes it a moment later. Held, the ones that come within this
/// period of each other are coalesced, and the last is dropped when the attempt succeeds. Half a
/// second bounds the work a `kill -9` of `pipe` can cost (inputs completed since the last
/// persisted checkpoint, at most this long ago) while covering the run time of a small
/// processor, start-up included.
pub const PERSIST_GRACE: Duration = Duration::from_millis(500);

/// What an attempt does with the checkpoints its processor reports.
///
/// Each checkpoint read from the progress pipe (the newest of those waiting: they are cumulative)
/// is [`reported`](Checkpoints::reported) at once, and [`persist`](Checkpoints::persist)ed — made
/// the resume point of the next attempt or build — at once, unless the sink gives it a
/// [`grace`](Checkpoints::grace) period. Then it is held (a newer checkpoint replaces it) and
/// persisted when the period ends while the processor still runs, or when the attempt ends in
/// failure (so a retry resumes from it); it is dropped when the attempt succeeds (its stage
/// publishes, which voids any progress). A checkpoint with a grace period that comes after the
/// processor exited is held until the attempt's outcome is known.
///
/// Holding never weakens exactly-once resume: the processor's output up to a checkpoint is
/// durable before the checkpoint is sent, and whatever was persisted before stays valid, so a
/// `kill -9` of `pipe` while a checkpoint is held resumes from the previous persisted one (or from
/// zero) with the output truncated to it — as when it dies while waiting checkpoints are
/// coalesced.
pub trait Checkpoints {
    /// How long `cp` may be held, counted from the attempt's start or its last persisted
    /// checkpoint; zero: persist it at once.
    fn grace(&self, _cp: &Checkpoint) -> Duration {
        Duration::ZERO
    }
    /// The processor reported `cp` (count it, show it).
    fn reported(&mut self, _cp: Checkpoint) {}
    /// Makes `cp` the durable resume point; an error fails the attempt.
    fn persist(&mut self, cp: Checkpoint) -> io::Result<()>;
}

/// A function persisting each checkpoint at once.
impl<F: FnMut(Checkpoint) -> io::Result<()>> Checkpoints for F {
    fn persist(&mut self, cp: Checkpoint) -> io::Result<()> {
        self(cp)
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration: Duration,
    /// CPU time in microseconds (a short processor's is well below a millisecond; summed over
    /// many attempts or map items, milliseconds per attempt would round most of it away).
    pub user_us: u64,
    pub sys_us: u64,
    pub max_rss_kb: u64,
    pub timed_out: bool,
    pub interrupted: bool,
    /// A malformed checkpoint line or a failure to persist one: the attempt failed.
    pub protocol_error: Option<String>,
    /// The last checkpoint persisted.
    pub last_checkpoint: Option<Checkpoint>,
    /// Highest resident memory of the process group the watchdog saw, in KiB.
    pub peak_group_rss_kb: u64,
    /// The group went over `memory_limit_mb` and was killed.
    pub memory_exceeded: bool,
    /// Process id (= process group id) of the processor.
    pub pid: u32,
    /// What the sandbox applied (as the helper reported it); `None` if it never got that far.
    pub sandbox: Option<Layers>,
    /// The sandbox could not be set up: the processor never started.
    pub sandbox_error: Option<String>,
    /// Network accesses the sandbox blocked: the attempt failed, whatever the exit code.
    pub violations: Vec<Violation>,
    /// Line counts of inputs whose last checkpoint was superseded by a later input's before it
    /// could be persisted (input index → lines): only the newest waiting checkpoint is written.
    pub superseded_lines: std::collections::BTreeMap<u64, u64>,
    /// The executor lost the attempt (a Slurm node failure, preemption, a job gone from the
    /// queue without a status file): retryable.
    pub lost: bool,
    /// What the executor knows about the end beyond the exit status (e.g. the Slurm job state),
    /// shown instead of the generic message.
    pub executor_note: Option<String>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && self.protocol_error.is_none()
            && !self.timed_out
            && !self.interrupted
            && !self.memory_exceeded
            && self.sandbox_error.is_none()
            && self.violations.is_empty()
            && !self.lost
    }
}

/// The helper command line of an invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The whole environment (the child's is cleared first).
    pub env: Vec<(OsString, OsString)>,
    /// The spec file to write first, when the spec is too long for the command line.
    pub spec_file: Option<(PathBuf, String)>,
}

/// What `inv` executes: `pipe __exec --channel-stdin [--cpus LIST] [--address-space BYTES]
/// --spec-json SPEC -- ARGV...` and its environment (`run` adds `--parent-pid`).
pub fn prepare(inv: &Invocation) -> io::Result<Prepared> {
    let policy = &inv.sandbox;
    if policy.exe.as_os_str().is_empty() {
        return Err(io::Error::other(
            "no sandbox policy for this attempt (internal error): refusing to run the processor unconfined",
        ));
    }
    if inv.argv.is_empty() {
        return Err(io::Error::other("empty argv"));
    }
    let mut spec = policy.spec.clone();
    if let Some(read) = spec.landlock.as_mut().and_then(|r| r.read.as_mut()) {
        // A hermetic processor must still read the input list the engine wrote for it.
        if let Some((_, file)) = inv.env.iter().find(|(k, _)| k == "PIPELINE_INPUTS_FILE") {
            read.push(PathBuf::from(file));
        }
    }
    let json = serde_json::to_string(&spec).map_err(io::Error::other)?;
    let mut args: Vec<OsString> = vec![helper::SUBCOMMAND.into(), "--channel-stdin".into()];
    if let Some(cores) = &inv.cpu_set {
        let list: Vec<String> = cores.iter().map(ToString::to_string).collect();
        args.extend(["--cpus".into(), list.join(",").into()]);
    }
    if let Some(mb) = inv.virtual_memory_mb {
        let bytes = mb.saturating_mul(1024 * 1024);
        args.extend(["--address-space".into(), bytes.to_string().into()]);
    }
    let mut spec_file = None;
    if json.len() > MAX_SPEC_ARG {
        let path = inv.log.with_extension("sandbox.json");
        args.extend(["--spec-file".into(), path.clone().into()]);
        spec_file = Some((path, json));
    } else {
        args.extend(["--spec-json".into(), json.into()]);
    }
    args.push("--".into());
    args.extend(inv.argv.iter().cloned());
    let mut set = inv.env.clone();
    set.push((
        "PIPELINE_PROGRESS_FD".into(),
        PROGRESS_FD.to_string().into(),
    ));
    if let Some(tmp) = &policy.tmpdir {
        set.push(("TMPDIR".into(), tmp.clone().into()));
    }
    if inv.virtual_memory_mb.is_some() {
        set.push(("MALLOC_ARENA_MAX".into(), "2".into()));
    }
    Ok(Prepared {
        program: policy.exe.clone(),
        args,
        env: sandbox::env::environment(std::env::vars_os(), &policy.pass_env, &set),
        spec_file,
    })
}

/// The exact command an attempt runs, as a shell line a person can paste to reproduce it (fd 3,
/// the progress pipe, stands in as `3>/dev/null`; stdin is then no socket, so there is no report
/// channel and the helper kills a network attempt with SIGSYS instead of reporting it; the
/// engine's `--parent-pid` is left out).
pub fn command_line(inv: &Invocation) -> io::Result<String> {
    let prepared = prepare(inv)?;
    let mut words = vec!["cd".to_string(), quote(inv.cwd.as_os_str()), "&&".into()];
    words.extend(["env".into(), "-i".into()]);
    for (k, v) in &prepared.env {
        let mut pair = k.clone();
        pair.push("=");
        pair.push(v);
        words.push(quote(&pair));
    }
    words.push(quote(prepared.program.as_os_str()));
    words.extend(prepared.args.iter().map(|a| quote(a)));
    words.push("3>/dev/null".into());
    Ok(words.join(" "))
}

/// Single-quotes a word for a POSIX shell when it needs it.
fn quote(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Runs `inv` to completion. `interrupt` is polled; `on_spawn` learns the processor's pid (which
/// is also its process group); `checkpoints` takes the processor's checkpoints (an error
/// persisting one fails the attempt).
pub fn run(
    inv: &Invocation,
    interrupt: &AtomicBool,
    on_spawn: &mut dyn FnMut(u32),
    checkpoints: &mut dyn Checkpoints,
) -> io::Result<Outcome> {
    let prepared = prepare(inv)?;
    if let Some(dir) = inv.log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Some((path, json)) = &prepared.spec_file {
        std::fs::write(path, json)?;
    }
    if let Some(tmp) = &inv.sandbox.tmpdir {
        fresh_private_dir(tmp)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&inv.log)?;
    // The helper is started with posix_spawn (no hook between fork and exec, so no copy of
    // this process's page tables, whose size grows with the build): it gets the report channel
    // as stdin, and the progress pipe's write end in a message queued on the channel before it
    // starts. Setting up the rest (fd numbers, parent-death signal, affinity, address-space
    // limit) is the helper's first job.
    let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let (report, helper_end) = channel::pair()?;
    channel::send(
        report.as_fd(),
        helper::PROGRESS_MESSAGE,
        Some(writer.as_fd()),
    )?;
    drop(writer);
    let started = Instant::now();
    let mut watch = Watch::new(reader, report)?;
    // The spawn server forks the helper (see `sandbox::zygote`) and tells its end straight to
    // this attempt's watch; without a server, or if it fails, the helper is posix_spawned here.
    let forked = match sandbox::zygote::shared(&prepared.program) {
        Some(zygote) => {
            let sender = watch.exit_sender()?;
            zygote
                .spawn(
                    &prepared.args[1..],
                    &prepared.env,
                    &inv.cwd,
                    &helper_end,
                    &log,
                    // Untold (the server went away, taking its children along): killed, never
                    // a success.
                    Box::new(move |exit: Option<Exit>| sender.send(exit)),
                )
                .ok()
        }
        None => None,
    };
    let pid = match forked {
        Some(pid) => {
            drop(helper_end);
            pid
        }
        None => {
            let (subcommand, rest) = prepared.args.split_at(1);
            let child = Command::new(&prepared.program)
                .args(subcommand)
                .args(["--parent-pid".to_string(), std::process::id().to_string()])
                .args(rest)
                .env_clear()
                .envs(prepared.env.iter().map(|(k, v)| (k, v)))
                .current_dir(&inv.cwd)
                .process_group(0)
                .stdin(Stdio::from(helper_end))
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            let pid = child.id() as libc::pid_t;
            // Reaped with wait4, which also reports resource usage.
            drop(child);
            let sender = watch.exit_sender()?;
            let waiter = std::thread::Builder::new()
                .name("pipe-wait4".into())
                .spawn(move || {
                    // `wait4` fails only for a child never seen: that ends the attempt as
                    // killed, never as a success.
                    sender.send(Exit::wait(pid, true).map(|(_, exit)| exit));
                });
            if let Err(err) = waiter {
                // Nobody would learn its end: it must not run on unwatched.
                let _ = rustix::process::kill_process_group(
                    Pid::from_raw(pid).expect("child pid is positive"),
                    Signal::KILL,
                );
                let _ = Exit::wait(pid, true);
                return Err(err);
            }
            pid
        }
    };
    // The helper began as a vfork of this process (posix_spawn), so at its exec the kernel
    // folded this process's peak memory into the `ru_maxrss` wait4 will report: read after the
    // spawn returned (the child has exec'd by then), a `ru_maxrss` above it is the processor's.
    // A child of the server starts from the small server: nothing of this process's is in it.
    let inherited_kb = if forked.is_some() {
        Some(0)
    } else {
        crate::procfs::own_peak_rss_kb()
    };
    on_spawn(pid as u32);

    let group = Pid::from_raw(pid).expect("child pid is positive");
    let mut outcome = Outcome {
        pid: pid as u32,
        ..Outcome::default()
    };
    // The first memory sample is taken one period in: a sample scans all of /proc, which for a
    // processor that lives a millisecond would cost more than the processor.
    let mut next_sample = Instant::now() + MEMORY_SAMPLE;
    let mut exited: Option<Exit> = None;
    let mut kill_at: Option<Instant> = None;
    let mut reported_peak_kb: Option<u64> = None;
    let mut exit_seen_at: Option<Instant> = None;
    let mut grace = Grace::new(started);
    let mut events = Vec::new();
    loop {
        let now = Instant::now();
        let timeout = match exit_seen_at {
            None => grace.wait(now, false),
            // After the end: wait for the pipe's end (for at most 2 s: a leftover process may
            // hold it), then only take what is already pending.
            Some(seen) if watch.progress_open() => {
                (seen + EOF_WAIT).saturating_duration_since(now).min(POLL)
            }
            Some(_) => Duration::ZERO,
        };
        let ready = match watch.wait(timeout, &mut events) {
            Ok(ready) => ready,
            Err(err) => {
                // Nothing of the attempt can be watched any more: it must not run on unwatched.
                let _ = rustix::process::kill_process_group(group, Signal::KILL);
                return Err(err);
            }
        };
        // The lines of one wake-up come before its end, if it has one (see `watch`): they were
        // written while the processor ran unless it had ended before this wake-up.
        let ended = exited.is_some();
        let mut bad_line = None;
        // Checkpoints are cumulative: of those read in one wake-up, only the newest is handed on.
        let mut newest: Option<Checkpoint> = None;
        for event in events.drain(..) {
            match event {
                // After a bad line nothing more counts.
                Event::Line(Ok(_)) if bad_line.is_some() => {}
                Event::Line(Ok(cp)) => {
                    if let Some(older) = newest.replace(cp) {
                        // Persisting each (an fsynced write) while the processor reports faster
                        // than the disk syncs would let a backlog build up, and a stage of 10,000
                        // small files would pay 10,000 progress writes. The line count of an
                        // input whose last checkpoint is skipped is kept for the metrics.
                        if older.input_index != cp.input_index {
                            outcome
                                .superseded_lines
                                .insert(older.input_index, older.line_offset);
                        }
                    }
                }
                Event::Line(Err(err)) => {
                    bad_line.get_or_insert(err);
                }
                Event::Eof => {}
                Event::Report(report) => {
                    if let Some(mut layers) = report.layers {
                        layers.guard = inv.sandbox.guard;
                        outcome.sandbox = Some(layers);
                    }
                    if report.error.is_some() {
                        outcome.sandbox_error = report.error;
                    }
                    if let Some(kb) = report.peak_rss_kb {
                        reported_peak_kb = Some(kb);
                    }
                    if let Some(err) = report.exec_error {
                        outcome.protocol_error = Some(format!(
                            "cannot start the processor `{}`: {err}",
                            inv.argv[0].to_string_lossy()
                        ));
                    }
                }
                Event::Violation(v) => {
                    // The offender was killed; the rest of the attempt goes too.
                    let _ = rustix::process::kill_process_group(group, Signal::KILL);
                    outcome.violations.push(v);
                }
                Event::Exited(exit) => {
                    outcome.duration = started.elapsed();
                    // Anything the processor left behind in its group goes with it.
                    let _ = rustix::process::kill_process_group(group, Signal::KILL);
                    exited = Some(exit);
                    exit_seen_at = Some(Instant::now());
                }
            }
        }
        // The newest good checkpoint first (what came before a bad line counts), then the error.
        if let Some(cp) = newest {
            hand_on(checkpoints, &mut grace, cp, ended, &mut outcome, group);
        }
        if let Some(err) = bad_line {
            if outcome.protocol_error.is_none() {
                outcome.protocol_error = Some(err);
                let _ = rustix::process::kill_process_group(group, Signal::KILL);
            }
        }
        if exit_seen_at
            .is_some_and(|seen| !ready && (!watch.progress_open() || seen.elapsed() >= EOF_WAIT))
        {
            break;
        }
        if exited.is_none() {
            if let Some(cp) = grace.tick(Instant::now()) {
                persist(checkpoints, cp, &mut outcome, group);
            }
            if inv.timeout.is_some_and(|t| started.elapsed() >= t) && !outcome.timed_out {
                outcome.timed_out = true;
                let _ = rustix::process::kill_process_group(group, Signal::KILL);
            }
            if interrupt.load(Ordering::SeqCst) && !outcome.interrupted {
                outcome.interrupted = true;
                let _ = rustix::process::kill_process_group(group, Signal::TERM);
                kill_at = Some(Instant::now() + GRACE);
            }
            if kill_at.is_some_and(|t| Instant::now() >= t) {
                let _ = rustix::process::kill_process_group(group, Signal::KILL);
                kill_at = None;
            }
            if Instant::now() >= next_sample && !outcome.memory_exceeded {
                next_sample = Instant::now() + MEMORY_SAMPLE;
                let rss = procfs::group_rss_kb(pid);
                outcome.peak_group_rss_kb = outcome.peak_group_rss_kb.max(rss);
                if inv.memory_limit_mb.is_some_and(|mb| rss > mb * 1024) {
                    outcome.memory_exceeded = true;
                    let _ = rustix::process::kill_process_group(group, Signal::KILL);
                }
            }
        }
    }
    // Closing the listener (with the watch) makes any later network attempt of a leftover
    // process fail with `ENOSYS`.
    drop(watch);
    let exit = exited.expect("the loop ends only after the end");
    if libc::WIFEXITED(exit.status) {
        outcome.exit_code = Some(libc::WEXITSTATUS(exit.status));
    } else if libc::WIFSIGNALED(exit.status) {
        outcome.signal = Some(libc::WTERMSIG(exit.status));
    }
    outcome.user_us = exit.user_us;
    outcome.sys_us = exit.sys_us;
    outcome.max_rss_kb = processor_peak_kb(reported_peak_kb, exit.max_rss_kb, inherited_kb);
    if let Some(cp) = grace.end(outcome.succeeded()) {
        persist(checkpoints, cp, &mut outcome, group);
    }
    if let Some(tmp) = &inv.sandbox.tmpdir {
        // Mostly left empty: one `rmdir` then.
        if std::fs::remove_dir(tmp).is_err() {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
    explain(inv, &mut outcome);
    Ok(outcome)
}

/// The holding of checkpoints (see [`Checkpoints`]), apart from the clock and the pipe. Each
/// method returns the checkpoint to persist now, if any.
#[derive(Debug)]
struct Grace {
    /// The attempt's start, or when the last checkpoint was persisted.
    since: Instant,
    /// The newest checkpoint reported and not persisted, and when its grace period ends.
    pending: Option<(Checkpoint, Instant)>,
}

impl Grace {
    fn new(started: Instant) -> Grace {
        Grace {
            since: started,
            pending: None,
        }
    }

    /// `cp`, which may be held for `period`, was reported at `now` (after the processor
    /// `exited`, or while it runs).
    fn arrived(
        &mut self,
        cp: Checkpoint,
        period: Duration,
        now: Instant,
        exited: bool,
    ) -> Option<Checkpoint> {
        let ends = self.since + period;
        if !period.is_zero() && (exited || now < ends) {
            self.pending = Some((cp, ends));
            return None;
        }
        // It supersedes whatever was held.
        self.pending = None;
        self.since = now;
        Some(cp)
    }

    /// The clock says `now` while the processor runs: a grace period may have ended.
    fn tick(&mut self, now: Instant) -> Option<Checkpoint> {
        match self.pending {
            Some((cp, ends)) if now >= ends => {
                self.pending = None;
                self.since = now;
                Some(cp)
            }
            _ => None,
        }
    }

    /// The attempt ended: what it held is kept if it failed, dropped if it succeeded.
    fn end(&mut self, succeeded: bool) -> Option<Checkpoint> {
        self.pending.take().map(|(cp, _)| cp).filter(|_| !succeeded)
    }

    /// How long to wait for the next message at `now`: until a held checkpoint's grace period
    /// ends while the processor runs, and never longer than [`POLL`].
    fn wait(&self, now: Instant, exited: bool) -> Duration {
        match self.pending {
            Some((_, ends)) if !exited => ends.saturating_duration_since(now).min(POLL),
            _ => POLL,
        }
    }
}

/// A checkpoint read from the progress pipe (while the processor runs, or after it `exited`):
/// reported, then persisted at once or held (see [`Grace`]). After a protocol error, ignored.
fn hand_on(
    checkpoints: &mut dyn Checkpoints,
    grace: &mut Grace,
    cp: Checkpoint,
    exited: bool,
    outcome: &mut Outcome,
    group: Pid,
) {
    if outcome.protocol_error.is_some() {
        return;
    }
    checkpoints.reported(cp);
    let period = checkpoints.grace(&cp);
    if let Some(cp) = grace.arrived(cp, period, Instant::now(), exited) {
        persist(checkpoints, cp, outcome, group);
    }
}

/// Persists `cp`; a failure fails the attempt (a protocol error) and kills the processor's group.
fn persist(checkpoints: &mut dyn Checkpoints, cp: Checkpoint, outcome: &mut Outcome, group: Pid) {
    match checkpoints.persist(cp) {
        Ok(()) => outcome.last_checkpoint = Some(cp),
        Err(err) => {
            outcome.protocol_error = Some(format!("could not persist a checkpoint: {err}"));
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
        }
    }
}

/// Completes the outcome from what the sandbox saw and says it in the attempt's log: a SIGSYS
/// death under a killing filter is a network attempt; a hermetic stage that failed reading an
/// undeclared file is told which input to declare.
fn explain(inv: &Invocation, outcome: &mut Outcome) {
    let seccomp_kills = outcome
        .sandbox
        .as_ref()
        .is_some_and(|l| l.seccomp && l.violations.as_deref() == Some("kill"));
    if outcome.violations.is_empty() && seccomp_kills && outcome.signal == Some(libc::SIGSYS) {
        outcome.violations.push(Violation {
            call: "a network socket (killed with SIGSYS by the socket filter)".into(),
            pid: Some(outcome.pid),
            command: join_argv(&inv.argv),
        });
    }
    let mut notes: Vec<String> = outcome
        .violations
        .iter()
        .map(|v| format!("pipe: the sandbox blocked a network access: {v}"))
        .collect();
    if notes.is_empty() && !outcome.succeeded() && !outcome.interrupted {
        if let Some(hermetic) = &inv.sandbox.hermetic {
            if let Some(message) = sandbox::explain_denial(hermetic, &tail(&inv.log, 40)) {
                notes.push(format!("pipe: {message}"));
            }
        }
    }
    if notes.is_empty() {
        return;
    }
    if let Ok(mut log) = OpenOptions::new().append(true).open(&inv.log) {
        let _ = writeln!(log, "{}", notes.join("\n"));
    }
}

/// Creates `dir` empty and private (mode 0700), removing what an earlier attempt left.
fn fresh_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

pub(crate) fn join_argv(argv: &[OsString]) -> String {
    let text = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    text.chars().take(200).collect()
}

/// The processor's own peak resident memory, as far as it is known: what a built-in reported;
/// else `ru_maxrss` when it is above `inherited_kb`, the most of it that may come from the
/// spawning parent (0 for a child of the spawn server; the engine's own peak at the spawn for a
/// `posix_spawn`ed one, since the kernel folds the parent's peak into a vfork child's
/// `ru_maxrss`; `None`: unknown); else 0, and the memory watchdog's samples of the process group
/// are what is known (the caller takes the larger).
fn processor_peak_kb(reported: Option<u64>, ru_maxrss_kb: u64, inherited_kb: Option<u64>) -> u64 {
    match (reported, inherited_kb) {
        (Some(kb), _) => kb,
        (None, Some(inherited)) if ru_maxrss_kb > inherited => ru_maxrss_kb,
        _ => 0,
    }
}

/// The last `lines` lines (at most 4 KiB) of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    // Most logs are empty: one `stat` says so.
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    if len == 0 {
        return String::new();
    }
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let start = len.saturating_sub(4096);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(input_index: u64, line_offset: u64) -> Checkpoint {
        Checkpoint {
            input_index,
            line_offset,
            byte_offset: line_offset * 10,
            output_bytes: line_offset * 10,
        }
    }

    const MS: Duration = Duration::from_millis(1);
    const HOLD: Duration = Duration::from_millis(500);

    #[test]
    fn a_checkpoint_without_grace_is_persisted_at_once() {
        let t0 = Instant::now();
        let mut g = Grace::new(t0);
        assert_eq!(
            g.arrived(cp(0, 1), Duration::ZERO, t0, false),
            Some(cp(0, 1))
        );
        assert_eq!(
            g.arrived(cp(0, 2), Duration::ZERO, t0 + MS, true),
            Some(cp(0, 2))
        );
        assert_eq!(g.tick(t0 + 1000 * MS), None);
        assert_eq!(g.end(false), None);
        assert_eq!(g.wait(t0, false), POLL);
    }

    #[test]
    fn a_held_checkpoint_is_persisted_when_its_grace_ends_while_the_processor_runs() {
        let t0 = Instant::now();
        let mut g = Grace::new(t0);
        assert_eq!(g.wait(t0, false), POLL, "nothing held: the usual poll");
        assert_eq!(g.arrived(cp(0, 1), HOLD, t0 + 10 * MS, false), None);
        assert_eq!(g.arrived(cp(1, 2), HOLD, t0 + 20 * MS, false), None);
        assert_eq!(
            g.wait(t0 + 495 * MS, false),
            5 * MS,
            "woken when the grace ends"
        );
        assert_eq!(g.tick(t0 + 499 * MS), None);
        assert_eq!(g.tick(t0 + 500 * MS), Some(cp(1, 2)), "the newest");
        assert_eq!(g.tick(t0 + 600 * MS), None, "persisted once");
        // The next period counts from that persist.
        assert_eq!(g.arrived(cp(2, 3), HOLD, t0 + 700 * MS, false), None);
        assert_eq!(g.tick(t0 + 999 * MS), None);
        assert_eq!(g.tick(t0 + 1000 * MS), Some(cp(2, 3)));
        // Once a period has passed since the last persist, at once.
        assert_eq!(
            g.arrived(cp(3, 4), HOLD, t0 + 1600 * MS, false),
            Some(cp(3, 4))
        );
        assert_eq!(g.end(true), None);
    }

    #[test]
    fn a_checkpoint_without_grace_supersedes_a_held_one() {
        let t0 = Instant::now();
        let mut g = Grace::new(t0);
        assert_eq!(g.arrived(cp(0, 9), HOLD, t0 + MS, false), None);
        assert_eq!(
            g.arrived(cp(1, 5), Duration::ZERO, t0 + 2 * MS, false),
            Some(cp(1, 5))
        );
        assert_eq!(g.tick(t0 + 1000 * MS), None);
        assert_eq!(g.end(false), None);
    }

    #[test]
    fn a_checkpoint_held_to_the_end_is_kept_by_a_failure_and_dropped_by_a_success() {
        let t0 = Instant::now();
        let mut failed = Grace::new(t0);
        assert_eq!(failed.arrived(cp(2, 7), HOLD, t0 + MS, false), None);
        assert_eq!(failed.end(false), Some(cp(2, 7)), "a retry resumes from it");
        let mut succeeded = Grace::new(t0);
        assert_eq!(succeeded.arrived(cp(2, 7), HOLD, t0 + MS, false), None);
        assert_eq!(succeeded.end(true), None, "the stage publishes");
    }

    #[test]
    fn a_processor_peak_is_what_a_builtin_reported_or_a_maxrss_above_the_engines() {
        // A built-in's own report wins, whatever wait4 said.
        assert_eq!(processor_peak_kb(Some(8_000), 70_000, Some(70_000)), 8_000);
        // Above the engine's peak: the processor's own.
        assert_eq!(processor_peak_kb(None, 200_000, Some(70_000)), 200_000);
        // At or below it: it may be only the engine's (the watchdog's samples decide).
        assert_eq!(processor_peak_kb(None, 70_000, Some(70_000)), 0);
        assert_eq!(processor_peak_kb(None, 9_000, Some(70_000)), 0);
        assert_eq!(processor_peak_kb(None, 9_000, None), 0);
    }

    #[test]
    fn after_the_processor_exited_held_checkpoints_wait_for_the_outcome() {
        let t0 = Instant::now();
        let mut g = Grace::new(t0);
        assert_eq!(g.arrived(cp(0, 5), HOLD, t0 + 900 * MS, true), None);
        assert_eq!(g.wait(t0 + 900 * MS, true), POLL);
        assert_eq!(g.end(false), Some(cp(0, 5)));
    }
}
