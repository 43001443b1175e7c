//! The spawn server, `pipe __zygote`: a small single-threaded process started once per build,
//! which forks every processor attempt's helper instead of the engine `posix_spawn`ing a fresh
//! `pipe __exec` each time.
//!
//! Why: in a build of many short stages most of the CPU went to starting processes — executing
//! the 7 MB `pipe` binary, the dynamic loader, the C and Rust runtimes' CPU-feature probes (slow
//! under a hypervisor) — once per attempt. A fork of this already-started process skips all of
//! that, and the child then does exactly what `pipe __exec` does (the same [`helper::main`]):
//! the same sandbox layers, a network namespace of its own included, applied to itself before the
//! processor runs. A second gain: the child's `ru_maxrss` starts from this small process, not from
//! the engine (a `posix_spawn` child inherits the engine's peak, see `executor::processor_peak_kb`).
//!
//! The protocol, on two `AF_UNIX` `SOCK_SEQPACKET` pairs:
//! - the control channel (the server's end is its stdin): engine → server, per attempt, two
//!   messages: the [`Request`] (JSON) with the helper's report channel attached (the child's
//!   stdin), then `log` with the attempt log attached (the child's stdout and stderr); server →
//!   engine, per request, in order, [`Reply::Spawned`] (the pid, which is also the child's process
//!   group) or [`Reply::Failed`], read by the requesting thread itself;
//! - the ends channel (the server's end is its stdout): whenever a child ends, [`Reply::Exited`]
//!   with its wait status and resource usage (the server is the parent that reaps it), read by
//!   one thread of the engine. Apart, a spawn's answer wakes only the thread that asked, not a
//!   reader that would then wake it.
//!
//! The server runs in a process group of its own (a Ctrl-C in the terminal reaches the engine,
//! which stops processors the usual way), never has more than one thread (so forking it is
//! sound), and exits when the engine's end closes — also when the engine is killed. Its children
//! arm their parent-death signal against it, as they did against the engine, so a killed engine
//! still takes its processors along. If it cannot be started or goes away, the engine falls back
//! to `posix_spawn`ing `pipe __exec` (`executor::run`).
//!
//! The server is the `pipe-spawn` binary beside `pipe` when there is one, else `pipe __zygote`.
//! They run the same code; `pipe-spawn` is built with the system allocator, `pipe` with jemalloc.
//! jemalloc makes the engine's many small allocations cheaper (a no-op build of 10,000 stages
//! took 0.89x the time), but a process that forks once per stage pays for it: at each fork its
//! handlers lock and reinitialise every arena's mutexes, and parent and child then copy each page
//! they touch (a full build of 1,000 one-line stages made 1.8x the page faults and took 1.13x the
//! time with a jemalloc server; with this one, 0.92x the time of the build before jemalloc). The server is started with the engine's
//! path and build id ([`BUILD_ID`]) and refuses an engine of other sources (a `pipe-spawn` left
//! from another install), without a word: the engine then starts `pipe __zygote`, which is never
//! of other sources. Until the server says it is ready the engine waits at most
//! [`READY_TIMEOUT`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use super::{channel, helper};

/// The hidden subcommand.
pub const SUBCOMMAND: &str = "__zygote";
/// The server binary looked for beside `pipe`.
pub const SPAWN_BINARY: &str = "pipe-spawn";
/// What the sources of this binary hash to (see `engine/build.rs`): the server refuses an engine
/// whose id differs.
pub const BUILD_ID: &str = env!("PIPE_BUILD_ID");
/// The server's first message once it has accepted the engine.
const READY_MESSAGE: &[u8] = b"ready";
/// The server's arguments after [`SUBCOMMAND`]: the engine binary, whose `processor NAME` argv
/// the server's children run in-process, and the engine's [`BUILD_ID`].
const ENGINE_ARG: &str = "--engine";
const BUILD_ID_ARG: &str = "--build-id";
/// How long the engine waits for a starting server to say it is ready before it gives up on it.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The second message of a request, which carries the attempt log.
const LOG_MESSAGE: &[u8] = b"log";
/// Where the server keeps its end of the control channel (above the descriptors a child sets up).
const CONTROL_FD: RawFd = 10;
/// Where the server keeps its end of the ends channel.
const ENDS_FD: RawFd = 11;

/// One helper to start: what `pipe __exec` would have been given.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    /// The helper's arguments after `__exec`, without `--parent-pid` (the server adds its own).
    args: Vec<Word>,
    /// The whole environment.
    env: Vec<(Word, Word)>,
    /// The working directory.
    cwd: Word,
}

/// An `OsString` in JSON: a string when it is UTF-8 (nearly always), else its bytes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Word {
    Text(String),
    Bytes(Vec<u8>),
}

impl From<&std::ffi::OsStr> for Word {
    fn from(word: &std::ffi::OsStr) -> Word {
        match word.to_str() {
            Some(text) => Word::Text(text.to_string()),
            None => Word::Bytes(word.as_bytes().to_vec()),
        }
    }
}

impl From<&Word> for OsString {
    fn from(word: &Word) -> OsString {
        match word {
            Word::Text(text) => OsString::from(text),
            Word::Bytes(bytes) => OsString::from_vec(bytes.clone()),
        }
    }
}

/// What the server says.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Reply {
    Spawned { pid: i32 },
    Failed { error: String },
    Exited { pid: i32, exit: Exit },
}

/// How a child ended: its wait status and what its `rusage` says (the same whether the engine
/// reaped it or this server did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exit {
    pub status: i32,
    /// CPU time in microseconds.
    pub user_us: u64,
    pub sys_us: u64,
    /// `ru_maxrss`, KiB.
    pub max_rss_kb: u64,
}

impl Exit {
    /// Killed by `SIGKILL`, nothing measured: a child of a server that went away (its
    /// parent-death signal took it along), whose end nobody can tell any more.
    pub fn killed() -> Exit {
        Exit {
            status: libc::SIGKILL,
            user_us: 0,
            sys_us: 0,
            max_rss_kb: 0,
        }
    }

    /// `wait4(pid)`: the end of child `pid` (-1: any child), with its pid; `None` if no child
    /// has ended and `block` is false, or if there is no such child.
    pub fn wait(pid: libc::pid_t, block: bool) -> Option<(libc::pid_t, Exit)> {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if block { 0 } else { libc::WNOHANG };
        loop {
            // SAFETY: wait4 writes only into the two pointers, which point to live locals.
            let r = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
            if r > 0 {
                let us = |tv: libc::timeval| {
                    tv.tv_sec.max(0) as u64 * 1_000_000 + tv.tv_usec.max(0) as u64
                };
                let exit = Exit {
                    status,
                    user_us: us(usage.ru_utime),
                    sys_us: us(usage.ru_stime),
                    max_rss_kb: usage.ru_maxrss.max(0) as u64,
                };
                return Some((r, exit));
            }
            if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return None;
            }
        }
    }
}

// ------------------------------------------------------------------------------- engine side

/// The engine's handle on its spawn server.
pub struct Zygote {
    /// The server process, reaped by [`shutdown`].
    server: Mutex<Option<std::process::Child>>,
    /// The control channel; its lock is held for a request and its reply.
    control: Mutex<OwnedFd>,
    /// For [`shutdown`], which must not wait for the lock.
    control_raw: RawFd,
    exits: Arc<Mutex<Exits>>,
}

/// What to do with a child's end: called once, with the end, or with `None` when the server went
/// away first (taking its children along, untold).
pub type OnExit = Box<dyn FnOnce(Option<Exit>) + Send>;

#[derive(Default)]
struct Exits {
    /// Children whose end someone waits for.
    waiting: HashMap<i32, OnExit>,
    /// Ends read before their spawn's answer was (the two come on different channels).
    early: HashMap<i32, Exit>,
    /// The server went away: nobody learns of an end any more.
    gone: bool,
}

static SHARED: OnceLock<Option<Zygote>> = OnceLock::new();

/// The environment variable that turns the spawn server off (`off`): every attempt is then
/// `posix_spawn`ed, as when the server cannot be started. For a machine where forking the server
/// misbehaves, and for the tests of that path.
pub const SWITCH_ENV: &str = "PIPE_SPAWN_SERVER";

/// This process's spawn server (started on first use with `exe`); `None` if it cannot be started
/// or [`SWITCH_ENV`] turns it off.
pub fn shared(exe: &Path) -> Option<&'static Zygote> {
    SHARED
        .get_or_init(|| {
            if !wanted(std::env::var_os(SWITCH_ENV).as_deref()) {
                return None;
            }
            Zygote::start(exe).ok()
        })
        .as_ref()
}

/// Whether [`SWITCH_ENV`]'s value asks for the server: unset, empty or `on` do, `off` does not.
/// Anything else keeps it on, with a warning (once per build: the answer is kept).
fn wanted(value: Option<&std::ffi::OsStr>) -> bool {
    match value.map(|v| v.to_str()) {
        None | Some(Some("" | "on")) => true,
        Some(Some("off")) => false,
        Some(other) => {
            eprintln!(
                "pipe: warning: {SWITCH_ENV}={} is neither `on` nor `off`; using the spawn server",
                other.unwrap_or("<not UTF-8>")
            );
            true
        }
    }
}

impl Zygote {
    /// Starts the server for engine binary `exe`: `pipe-spawn` beside it if that one accepts this
    /// engine, else `exe __zygote`.
    fn start(exe: &Path) -> io::Result<Zygote> {
        let beside = exe.with_file_name(SPAWN_BINARY);
        if beside.is_file() {
            if let Ok(zygote) = Zygote::start_server(&beside, exe) {
                return Ok(zygote);
            }
        }
        Zygote::start_server(exe, exe)
    }

    /// Starts `server __zygote --engine EXE --build-id ID` and waits until it is ready.
    fn start_server(server: &Path, exe: &Path) -> io::Result<Zygote> {
        let (control, server_control) = channel::pair()?;
        let (ends, server_ends) = channel::pair()?;
        let mut command = Command::new(server);
        command
            .arg(SUBCOMMAND)
            .arg(ENGINE_ARG)
            .arg(exe)
            .arg(BUILD_ID_ARG)
            .arg(BUILD_ID)
            .env_clear()
            // A coverage build of pipe must keep writing its profile where it was told to (each
            // child then has the variable again from its request's environment).
            .envs(std::env::vars_os().filter(|(k, _)| k == "LLVM_PROFILE_FILE"))
            .stdin(Stdio::from(server_control))
            .stdout(Stdio::from(server_ends))
            .process_group(0);
        let mut server = command.spawn()?;
        drop(command);
        if let Err(err) = wait_ready(&control) {
            let _ = server.kill();
            let _ = server.wait();
            return Err(err);
        }
        Zygote::over(Some(server), control, ends)
    }

    /// The engine's side of a server reached through `control` and `ends`.
    fn over(
        server: Option<std::process::Child>,
        control: OwnedFd,
        ends: OwnedFd,
    ) -> io::Result<Zygote> {
        let exits = Arc::new(Mutex::new(Exits::default()));
        let reader_exits = Arc::clone(&exits);
        std::thread::Builder::new()
            .name("pipe-zygote".into())
            .spawn(move || read_ends(ends, reader_exits))?;
        Ok(Zygote {
            server: Mutex::new(server),
            control_raw: control.as_raw_fd(),
            control: Mutex::new(control),
            exits,
        })
    }

    /// Starts `pipe __exec ARGS` (`args` without the subcommand and `--parent-pid`) with `env`
    /// in `cwd`, the report channel `stdin` as its stdin and `log` as its stdout and stderr, in a
    /// process group of its own. Returns its pid; `on_exit` is called with its end, on the thread
    /// that reads the server's ends or (when the end came first) on this one (it must not block),
    /// or with `None` if the server goes away first. If the start fails, `on_exit` is dropped
    /// uncalled.
    pub fn spawn(
        &self,
        args: &[OsString],
        env: &[(OsString, OsString)],
        cwd: &Path,
        stdin: &OwnedFd,
        log: &File,
        on_exit: OnExit,
    ) -> io::Result<i32> {
        let request = Request {
            args: args.iter().map(|a| Word::from(a.as_os_str())).collect(),
            env: env
                .iter()
                .map(|(k, v)| (Word::from(k.as_os_str()), Word::from(v.as_os_str())))
                .collect(),
            cwd: Word::from(cwd.as_os_str()),
        };
        let bytes = serde_json::to_vec(&request).map_err(io::Error::other)?;
        if bytes.len() > channel::MAX_MESSAGE {
            return Err(io::Error::other(
                "the request is too long for the spawn server",
            ));
        }
        let control = self.control.lock().expect("not poisoned");
        if self.exits.lock().expect("not poisoned").gone {
            return Err(io::Error::other("the spawn server went away"));
        }
        channel::send(control.as_fd(), &bytes, Some(stdin.as_fd()))?;
        channel::send(control.as_fd(), LOG_MESSAGE, Some(log.as_fd()))?;
        let mut buf = [0u8; 512];
        let pid = match channel::recv(control.as_fd(), &mut buf) {
            Ok(Some((n, _))) => match serde_json::from_slice::<Reply>(&buf[..n]) {
                Ok(Reply::Spawned { pid }) => pid,
                Ok(Reply::Failed { error }) => return Err(io::Error::other(error)),
                _ => return Err(io::Error::other("the spawn server answered out of order")),
            },
            Ok(None) => return Err(io::Error::other("the spawn server went away")),
            Err(err) => return Err(err),
        };
        drop(control);
        let mut exits = self.exits.lock().expect("not poisoned");
        if let Some(exit) = exits.early.remove(&pid) {
            drop(exits);
            on_exit(Some(exit));
        } else if exits.gone {
            drop(exits);
            on_exit(None);
        } else {
            exits.waiting.insert(pid, on_exit);
        }
        Ok(pid)
    }
}

/// Ends this process's spawn server, if one was started, and reaps it: its end of the channel
/// closes, and it exits (any child still running follows by its parent-death signal). Later
/// attempts fall back to `posix_spawn`.
pub fn shutdown() {
    let Some(Some(zygote)) = SHARED.get() else {
        return;
    };
    // SAFETY: shutdown only changes the state of this socket, which `zygote` owns.
    unsafe { libc::shutdown(zygote.control_raw, libc::SHUT_RDWR) };
    if let Some(mut server) = zygote.server.lock().expect("not poisoned").take() {
        let _ = server.wait();
    }
}

/// Waits for a starting server's [`READY_MESSAGE`] on `control` (at most [`READY_TIMEOUT`]): an
/// error if the server ended (it refused this engine, or is no spawn server) or said anything else.
fn wait_ready(control: &OwnedFd) -> io::Result<()> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = rustix::event::Timespec::try_from(left).map_err(io::Error::other)?;
        let mut fds = [rustix::event::PollFd::new(
            control,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => return Err(io::Error::other("the spawn server did not start in time")),
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    let mut buf = [0u8; 64];
    match channel::recv(control.as_fd(), &mut buf)? {
        Some((n, None)) if &buf[..n] == READY_MESSAGE => Ok(()),
        Some(_) => Err(io::Error::other("the spawn server answered nonsense")),
        None => Err(io::Error::other("the spawn server refused this engine")),
    }
}

/// The engine's reader of the server's ends channel: each end goes to whoever waits for that
/// child, or is kept until its spawn's answer is read (a fast child can end before that).
fn read_ends(ends: OwnedFd, exits: Arc<Mutex<Exits>>) {
    let mut buf = [0u8; 512];
    while let Ok(Some((n, _))) = channel::recv(ends.as_fd(), &mut buf) {
        let Ok(Reply::Exited { pid, exit }) = serde_json::from_slice::<Reply>(&buf[..n]) else {
            break;
        };
        let mut waiting = exits.lock().expect("not poisoned");
        match waiting.waiting.remove(&pid) {
            Some(on_exit) => {
                drop(waiting);
                on_exit(Some(exit));
            }
            None => {
                waiting.early.insert(pid, exit);
            }
        }
    }
    let mut gone = exits.lock().expect("not poisoned");
    gone.gone = true;
    let untold: Vec<OnExit> = gone.waiting.drain().map(|(_, f)| f).collect();
    drop(gone);
    for on_exit in untold {
        on_exit(None); // no end will be told: the server took its children along
    }
}

// ------------------------------------------------------------------------------- server side

/// `pipe __zygote --engine EXE --build-id ID` (or `pipe-spawn __zygote ...`): serves requests
/// until the engine's end closes. Exits 3, saying nothing and never ready, when `ID` is not this
/// binary's [`BUILD_ID`] (the engine then starts another server).
pub fn main(args: &[OsString]) -> u8 {
    let (engine, build_id) = match args {
        [engine_arg, engine, id_arg, id] if engine_arg == ENGINE_ARG && id_arg == BUILD_ID_ARG => {
            (std::path::PathBuf::from(engine), id)
        }
        _ => {
            eprintln!(
                "pipe {SUBCOMMAND}: usage: {SUBCOMMAND} {ENGINE_ARG} PIPE {BUILD_ID_ARG} ID (started by `pipe build`, not by hand)"
            );
            return 2;
        }
    };
    if build_id != BUILD_ID {
        return 3;
    }
    match serve(engine) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("pipe {SUBCOMMAND}: {err}");
            1
        }
    }
}

fn serve(engine: std::path::PathBuf) -> io::Result<()> {
    if !channel::is_socket(0) {
        return Err(io::Error::other(
            "stdin must be the engine's channel (this is started by `pipe build`, not by hand)",
        ));
    }
    // SAFETY: dup2/open/close only manage descriptors of this single-threaded process: the
    // control channel moves from stdin to CONTROL_FD and the ends channel from stdout to ENDS_FD
    // (both close-on-exec), stdin and stdout become /dev/null.
    let (control, ends) = unsafe {
        if libc::dup2(0, CONTROL_FD) < 0 || libc::dup2(1, ENDS_FD) < 0 {
            return Err(io::Error::last_os_error());
        }
        (
            OwnedFd::from_raw_fd(CONTROL_FD),
            OwnedFd::from_raw_fd(ENDS_FD),
        )
    };
    rustix::io::fcntl_setfd(&control, rustix::io::FdFlags::CLOEXEC)?;
    rustix::io::fcntl_setfd(&ends, rustix::io::FdFlags::CLOEXEC)?;
    let null = File::open("/dev/null")?;
    // SAFETY: as above; /dev/null onto stdin and stdout.
    if unsafe { libc::dup2(null.as_raw_fd(), 0) < 0 || libc::dup2(null.as_raw_fd(), 1) < 0 } {
        return Err(io::Error::last_os_error());
    }
    drop(null);
    let (wake, woken) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )?;
    // A handler that writes a byte to `woken`'s pipe: no thread.
    signal_hook::low_level::pipe::register(libc::SIGCHLD, File::from(woken))?;
    // One empty network namespace for the whole build's built-in processors, made here once
    // instead of by each of them (creating and tearing one down was the largest remaining cost
    // of a short built-in). Only where it needs no user namespace (as root): elsewhere every
    // processor makes its own, as before.
    let shared_netns = super::netns::enter_privileged();
    // Set here, before any fork: the children run the engine's `processor NAME` in-process.
    helper::set_pipe_binary(engine);
    // The runtime's CPU-feature probe (`cpuid`, slow under a hypervisor) runs once here and its
    // result is inherited by every fork, instead of running again in each child.
    #[cfg(target_arch = "x86_64")]
    let _ = std::arch::is_x86_feature_detected!("avx2");
    channel::send(control.as_fd(), READY_MESSAGE, None)?;
    let mut buf = vec![0u8; channel::MAX_MESSAGE];
    let mut pending: Option<(Request, OwnedFd)> = None;
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&control, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&wake, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
        let (control_ready, wake_ready) =
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if wake_ready {
            let mut drain = [0u8; 64];
            while matches!(rustix::io::read(&wake, &mut drain), Ok(n) if n > 0) {}
            reap(&ends);
        }
        if !control_ready {
            continue;
        }
        let (n, fd) = match channel::recv(control.as_fd(), &mut buf) {
            Ok(Some(message)) => message,
            // The engine is gone: so are we (the children's parent-death signal follows).
            Ok(None) | Err(_) => return Ok(()),
        };
        let reply = match (pending.take(), fd) {
            (None, Some(stdin)) => match serde_json::from_slice::<Request>(&buf[..n]) {
                Ok(request) => {
                    pending = Some((request, stdin));
                    continue;
                }
                Err(err) => Reply::Failed {
                    error: format!("bad request: {err}"),
                },
            },
            (Some((request, stdin)), Some(log)) if &buf[..n] == LOG_MESSAGE => {
                match fork_helper(&request, &stdin, &log, shared_netns) {
                    Ok(pid) => Reply::Spawned { pid },
                    Err(err) => Reply::Failed {
                        error: format!("cannot fork: {err}"),
                    },
                }
            }
            _ => Reply::Failed {
                error: "a request out of order".into(),
            },
        };
        send(&control, &reply)?;
    }
}

fn send(control: &OwnedFd, reply: &Reply) -> io::Result<()> {
    let bytes = serde_json::to_vec(reply).map_err(io::Error::other)?;
    channel::send(control.as_fd(), &bytes, None)
}

/// Reaps every child that ended and tells the engine, on the ends channel.
fn reap(ends: &OwnedFd) {
    while let Some((pid, exit)) = Exit::wait(-1, false) {
        let _ = send(ends, &Reply::Exited { pid, exit });
    }
}

/// Forks the child that becomes `pipe __exec ARGS`; returns its pid.
fn fork_helper(
    request: &Request,
    stdin: &OwnedFd,
    log: &OwnedFd,
    shared_netns: bool,
) -> io::Result<i32> {
    let parent = std::process::id();
    // SAFETY: this process has one thread, so the child is a complete copy of it; the child
    // only sets itself up and then runs the helper, never returning here.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        helper::exit_now(i32::from(become_helper(
            request,
            stdin,
            log,
            parent,
            shared_netns,
        )));
    }
    // Also from this side, so the group exists before the engine may signal it (the child sets
    // it too; whichever runs first wins, the other's call is harmless).
    // SAFETY: setpgid only changes the child's process group.
    unsafe { libc::setpgid(pid, pid) };
    Ok(pid)
}

/// In the forked child: the process state `pipe __exec` would have had, then the helper itself.
fn become_helper(
    request: &Request,
    stdin: &OwnedFd,
    log: &OwnedFd,
    parent: u32,
    shared_netns: bool,
) -> u8 {
    // SAFETY: this single-threaded child only resets its own signal handling, process group and
    // descriptors before running the helper: SIGCHLD back to default (the server's handler wrote
    // to the server's pipe), every signal unblocked, a process group of its own, the report
    // channel on stdin and the log on stdout and stderr, the server's channels closed.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::setpgid(0, 0);
        if libc::dup2(stdin.as_raw_fd(), 0) < 0
            || libc::dup2(log.as_raw_fd(), 1) < 0
            || libc::dup2(log.as_raw_fd(), 2) < 0
        {
            return helper::EXIT_SETUP_FAILED;
        }
        libc::close(CONTROL_FD);
        libc::close(ENDS_FD);
    }
    // Single-threaded: nothing else reads or writes the environment meanwhile.
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    for (key, value) in &request.env {
        std::env::set_var(OsString::from(key), OsString::from(value));
    }
    if let Err(err) = std::env::set_current_dir(OsString::from(&request.cwd)) {
        eprintln!("pipe: cannot enter the processor's working directory: {err}");
        return helper::EXIT_SETUP_FAILED;
    }
    let mut args: Vec<OsString> = vec!["--parent-pid".into(), parent.to_string().into()];
    if shared_netns {
        args.push("--shared-netns".into());
    }
    // This server reaps the child: its `ru_maxrss` is the child's own.
    args.push(helper::MEASURED_FLAG.into());
    args.extend(request.args.iter().map(OsString::from));
    helper::main(&args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn only_off_turns_the_server_off() {
        use std::ffi::OsStr;
        assert!(wanted(None));
        assert!(wanted(Some(OsStr::new(""))));
        assert!(wanted(Some(OsStr::new("on"))));
        assert!(!wanted(Some(OsStr::new("off"))));
        // A misspelling keeps the default (and warns), rather than silently changing the path.
        assert!(wanted(Some(OsStr::new("0ff"))));
        assert!(wanted(Some(std::os::unix::ffi::OsStrExt::from_bytes(
            b"\xff"
        ))));
    }

    #[test]
    fn a_childs_end_is_its_wait_status_and_rusage_and_crosses_the_channel_unchanged() {
        let child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        drop(child); // reaped by `Exit::wait`
        let (reaped, exit) = Exit::wait(pid, true).unwrap();
        assert_eq!(reaped, pid);
        assert!(libc::WIFEXITED(exit.status) && libc::WEXITSTATUS(exit.status) == 3);
        assert!(exit.max_rss_kb > 0, "{exit:?}");
        assert!(Exit::wait(pid, true).is_none(), "reaped once");
        let killed = Exit::killed();
        assert!(libc::WIFSIGNALED(killed.status) && libc::WTERMSIG(killed.status) == libc::SIGKILL);
        let json = serde_json::to_vec(&Reply::Exited { pid, exit }).unwrap();
        match serde_json::from_slice::<Reply>(&json).unwrap() {
            Reply::Exited {
                pid: back,
                exit: same,
            } => assert_eq!((back, same), (pid, exit)),
            other => panic!("{other:?}"),
        }
    }

    /// Waits until the engine's side of the test server has `pid` filed as `early` or `waiting`.
    fn wait_filed(exits: &Mutex<Exits>, pid: i32, early: bool) {
        for _ in 0..10_000 {
            let exits = exits.lock().unwrap();
            let filed = if early {
                exits.early.contains_key(&pid)
            } else {
                exits.waiting.contains_key(&pid)
            };
            if filed {
                return;
            }
            drop(exits);
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("pid {pid} was never filed");
    }

    /// Plays the server for one request: reads it, then sends its end and its answer, in the
    /// order asked, each once the engine's side has taken in the one before.
    fn answer(control: &OwnedFd, ends: &OwnedFd, exits: &Mutex<Exits>, pid: i32, end_first: bool) {
        let mut buf = vec![0u8; channel::MAX_MESSAGE];
        let (_, stdin) = channel::recv(control.as_fd(), &mut buf).unwrap().unwrap();
        let (n, log) = channel::recv(control.as_fd(), &mut buf).unwrap().unwrap();
        assert!(stdin.is_some() && log.is_some() && &buf[..n] == LOG_MESSAGE);
        let exit = Exit {
            status: 7 << 8,
            user_us: 1,
            sys_us: 2,
            max_rss_kb: 3,
        };
        if end_first {
            send(ends, &Reply::Exited { pid, exit }).unwrap();
            wait_filed(exits, pid, true);
            send(control, &Reply::Spawned { pid }).unwrap();
        } else {
            send(control, &Reply::Spawned { pid }).unwrap();
            wait_filed(exits, pid, false);
            send(ends, &Reply::Exited { pid, exit }).unwrap();
        }
    }

    #[test]
    fn an_end_reaches_its_spawn_whichever_channel_is_read_first_and_none_once_the_server_is_gone() {
        let (control, server_control) = channel::pair().unwrap();
        let (ends, server_ends) = channel::pair().unwrap();
        let zygote = Zygote::over(None, control, ends).unwrap();
        let exits = Arc::clone(&zygote.exits);
        let server = std::thread::spawn(move || {
            answer(&server_control, &server_ends, &exits, 41, true);
            answer(&server_control, &server_ends, &exits, 42, false);
            // A third child is spawned, then the server goes away without telling its end.
            let mut buf = vec![0u8; channel::MAX_MESSAGE];
            channel::recv(server_control.as_fd(), &mut buf).unwrap();
            channel::recv(server_control.as_fd(), &mut buf).unwrap();
            send(&server_control, &Reply::Spawned { pid: 43 }).unwrap();
            wait_filed(&exits, 43, false);
        });
        let dir = tempfile::tempdir().unwrap();
        let log = File::create(dir.path().join("log")).unwrap();
        let (told, ends_told) = mpsc::channel();
        for expected in [41, 42, 43] {
            let (_, stdin) = channel::pair().unwrap();
            let told = told.clone();
            let on_exit: OnExit = Box::new(move |exit| told.send((expected, exit)).unwrap());
            let pid = zygote
                .spawn(&[], &[], dir.path(), &stdin, &log, on_exit)
                .unwrap();
            assert_eq!(pid, expected);
        }
        server.join().unwrap();
        let mut got: Vec<(i32, Option<i32>)> = (0..3)
            .map(|_| {
                let (pid, exit) = ends_told.recv_timeout(Duration::from_secs(10)).unwrap();
                (pid, exit.map(|e| e.status))
            })
            .collect();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![(41, Some(7 << 8)), (42, Some(7 << 8)), (43, None)]
        );
        // Gone: a later spawn fails at once, and its callback is dropped uncalled.
        let (_, stdin) = channel::pair().unwrap();
        let later = zygote.spawn(&[], &[], dir.path(), &stdin, &log, Box::new(|_| panic!()));
        assert!(later.is_err());
    }

    #[test]
    fn words_cross_the_channel_as_text_or_as_bytes_and_come_back_the_same() {
        let words = [
            OsString::from("PATH=/usr/bin"),
            OsString::from("naïve ✓"),
            OsString::from_vec(vec![b'a', 0xff, 0xfe, b'z']),
            OsString::new(),
        ];
        let request = Request {
            args: words.iter().map(|w| Word::from(w.as_os_str())).collect(),
            env: vec![(
                Word::from(words[0].as_os_str()),
                Word::from(words[2].as_os_str()),
            )],
            cwd: Word::from(words[1].as_os_str()),
        };
        let json = serde_json::to_string(&request).unwrap();
        assert!(
            json.contains(r#""PATH=/usr/bin""#),
            "UTF-8 goes as text: {json}"
        );
        let back: Request = serde_json::from_str(&json).unwrap();
        let args: Vec<OsString> = back.args.iter().map(OsString::from).collect();
        assert_eq!(args, words);
        assert_eq!(OsString::from(&back.env[0].1), words[2]);
        assert_eq!(OsString::from(&back.cwd), words[1]);
    }
}
