//! Runs one attempt of a processor as a child process and watches it.
//!
//! The child runs in its own process group (so the whole tree can be signalled), gets a
//! parent-death signal (so it dies with `pipe`, even on `kill -9`), has stdin closed and
//! stdout/stderr appended to a log file, and receives the write end of a progress pipe as fd 3
//! (`PIPELINE_PROGRESS_FD=3`). A reader thread turns checkpoint lines into calls of
//! `on_checkpoint`; a waiter thread reaps the child with `wait4` to get its resource usage. The
//! calling thread enforces the timeout and reacts to interruption: SIGTERM to the group, a grace
//! period, then SIGKILL. When the processor exits, whatever it left in its group is killed.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pipe_processors::checkpoint::Checkpoint;

use crate::procfs;
use rustix::process::{Pid, Signal};

/// The fd number the progress pipe has in the child.
pub const PROGRESS_FD: i32 = 3;
/// How long an interrupted processor gets between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);
/// Longest checkpoint line accepted.
const MAX_LINE: usize = 4096;

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
}

/// How often the memory watchdog samples the process group.
const MEMORY_SAMPLE: Duration = Duration::from_millis(100);

/// How an attempt ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration: Duration,
    pub user_ms: u64,
    pub sys_ms: u64,
    pub max_rss_kb: u64,
    pub timed_out: bool,
    pub interrupted: bool,
    /// A malformed checkpoint line or a failure to persist one: the attempt failed.
    pub protocol_error: Option<String>,
    pub last_checkpoint: Option<Checkpoint>,
    /// Highest resident memory of the process group the watchdog saw, in KiB.
    pub peak_group_rss_kb: u64,
    /// The group went over `memory_limit_mb` and was killed.
    pub memory_exceeded: bool,
    /// Process id (= process group id) of the processor.
    pub pid: u32,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && self.protocol_error.is_none()
            && !self.timed_out
            && !self.interrupted
            && !self.memory_exceeded
    }
}

enum Message {
    Line(Result<Checkpoint, String>),
    Eof,
    Exited { status: i32, usage: libc::rusage },
}

/// Runs `inv` to completion. `interrupt` is polled; `on_spawn` learns the processor's pid (which
/// is also its process group) and start time; `on_checkpoint` persists each checkpoint and its
/// error fails the attempt.
pub fn run(
    inv: &Invocation,
    interrupt: &AtomicBool,
    on_spawn: &mut dyn FnMut(u32),
    on_checkpoint: &mut dyn FnMut(Checkpoint) -> io::Result<()>,
) -> io::Result<Outcome> {
    if let Some(dir) = inv.log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&inv.log)?;
    let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let program = inv
        .argv
        .first()
        .ok_or_else(|| io::Error::other("empty argv"))?;
    let mut command = Command::new(program);
    command
        .args(&inv.argv[1..])
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .env("PIPELINE_PROGRESS_FD", PROGRESS_FD.to_string())
        .current_dir(&inv.cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    if inv.virtual_memory_mb.is_some() {
        command.env("MALLOC_ARENA_MAX", "2");
    }
    let parent = std::process::id() as libc::pid_t;
    let progress_fd = writer.as_raw_fd();
    // Prepared before fork: the child may only make syscalls on ready-made values.
    let affinity = inv.cpu_set.as_ref().map(|cores| cpu_set_of(cores));
    let address_space = inv.virtual_memory_mb.map(|mb| libc::rlimit {
        rlim_cur: mb.saturating_mul(1024 * 1024),
        rlim_max: mb.saturating_mul(1024 * 1024),
    });
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe syscalls
    // (prctl, getppid, dup2, fcntl, sched_setaffinity, setrlimit) on values prepared before the
    // fork; it allocates nothing and takes no locks.
    unsafe {
        command.pre_exec(move || {
            if let Some(set) = &affinity {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(limit) = &address_space {
                if libc::setrlimit(libc::RLIMIT_AS, limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("pipe exited before the processor started"));
            }
            let ok = if progress_fd == PROGRESS_FD {
                libc::fcntl(PROGRESS_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(progress_fd, PROGRESS_FD)
            };
            if ok < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let child = command.spawn()?;
    drop(writer);
    let pid = child.id() as libc::pid_t;
    drop(child); // reaped below with wait4, which also reports resource usage
    on_spawn(pid as u32);

    let (tx, rx) = mpsc::channel();
    let lines_tx = tx.clone();
    std::thread::spawn(move || read_checkpoints(File::from(reader), lines_tx));
    std::thread::spawn(move || {
        let (status, usage) = wait4(pid);
        let _ = tx.send(Message::Exited { status, usage });
    });

    let group = Pid::from_raw(pid).expect("child pid is positive");
    let mut outcome = Outcome {
        pid: pid as u32,
        ..Outcome::default()
    };
    let mut next_sample = Instant::now();
    let mut exited = None;
    let mut eof = false;
    let mut kill_at: Option<Instant> = None;
    let mut exit_seen_at: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Message::Line(Ok(cp))) => {
                if outcome.protocol_error.is_none() {
                    match on_checkpoint(cp) {
                        Ok(()) => outcome.last_checkpoint = Some(cp),
                        Err(err) => {
                            outcome.protocol_error =
                                Some(format!("could not persist a checkpoint: {err}"));
                            let _ = rustix::process::kill_process_group(group, Signal::KILL);
                        }
                    }
                }
            }
            Ok(Message::Line(Err(err))) => {
                if outcome.protocol_error.is_none() {
                    outcome.protocol_error = Some(err);
                    let _ = rustix::process::kill_process_group(group, Signal::KILL);
                }
            }
            Ok(Message::Eof) => eof = true,
            Ok(Message::Exited { status, usage }) => {
                outcome.duration = started.elapsed();
                // Anything the processor left behind in its group goes with it.
                let _ = rustix::process::kill_process_group(group, Signal::KILL);
                exited = Some((status, usage));
                exit_seen_at = Some(Instant::now());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if exited.is_some()
            && (eof || exit_seen_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)))
        {
            break;
        }
        if exited.is_none() {
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
    let (status, usage) = exited.ok_or_else(|| io::Error::other("lost track of the processor"))?;
    if libc::WIFEXITED(status) {
        outcome.exit_code = Some(libc::WEXITSTATUS(status));
    } else if libc::WIFSIGNALED(status) {
        outcome.signal = Some(libc::WTERMSIG(status));
    }
    outcome.user_ms = timeval_ms(usage.ru_utime);
    outcome.sys_ms = timeval_ms(usage.ru_stime);
    outcome.max_rss_kb = usage.ru_maxrss.max(0) as u64;
    Ok(outcome)
}

fn read_checkpoints(pipe: File, tx: mpsc::Sender<Message>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => break,
            Ok(_) if line.len() > MAX_LINE => {
                let _ = tx.send(Message::Line(Err(format!(
                    "checkpoint line longer than {MAX_LINE} bytes"
                ))));
                // Drain so the processor is not blocked on a full pipe until it is killed.
                let _ = io::copy(&mut reader, &mut io::sink());
                break;
            }
            Ok(_) if line.last() != Some(&b'\n') => {
                let _ = tx.send(Message::Line(Err(
                    "checkpoint line cut short (no final newline)".into(),
                )));
                break;
            }
            Ok(_) => {
                let parsed = std::str::from_utf8(&line)
                    .map_err(|_| "checkpoint line is not UTF-8".to_string())
                    .and_then(|text| {
                        Checkpoint::parse(text).map_err(|err| {
                            format!("malformed checkpoint line {:?}: {err}", text.trim_end())
                        })
                    });
                if tx.send(Message::Line(parsed)).is_err() {
                    break;
                }
            }
            Err(err) => {
                let _ = tx.send(Message::Line(Err(format!(
                    "reading the progress pipe: {err}"
                ))));
                break;
            }
        }
    }
    let _ = tx.send(Message::Eof);
}

fn wait4(pid: libc::pid_t) -> (i32, libc::rusage) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes only into the two pointers, which point to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return (status, usage);
        }
    }
}

/// A `cpu_set_t` holding `cores`.
fn cpu_set_of(cores: &[usize]) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &core in cores.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `core` is below CPU_SETSIZE, so the bit lies inside `set`.
        unsafe { libc::CPU_SET(core, &mut set) };
    }
    set
}

fn timeval_ms(tv: libc::timeval) -> u64 {
    (tv.tv_sec.max(0) as u64) * 1000 + (tv.tv_usec.max(0) as u64) / 1000
}

/// The last `lines` lines (at most 4 KiB) of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
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
