//! `pipe check --sandbox`: shows on this machine, with real network attempts, that a processor
//! cannot reach a loopback listener `pipe` starts itself.
//!
//! The listener has to live outside the engine's own socket filter, which every descendant of the
//! engine inherits. So `cli::main` forks it ([`Listener::start`]) *before* installing that filter,
//! while the process is still single-threaded. The listener binds TCP and UDP on 127.0.0.1 (and
//! TCP on ::1 when the machine has IPv6) on ports the kernel picks, and runs one canary per
//! runtime layer on request, each in a child of its own that applies exactly that layer and then
//! tries to connect. The engine then runs a last canary exactly like a processor, through the
//! re-exec helper with every layer, from a child process whose failure its parent ignores (the
//! "swallowed error" case). Every attempt must fail, the full-stack one must be reported as a
//! violation, and the listener must have received nothing.
//!
//! Only loopback addresses can be expressed here ([`Target`]), so no canary can ever be aimed
//! anywhere else.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use super::{filesystem, netns, seccomp, FsRules, Guard, HelperSpec, Policy, Probe};

/// The hidden subcommand a full-stack canary runs: `pipe __connect [--child] TARGET...`.
pub const CONNECT_SUBCOMMAND: &str = "__connect";

static LISTENER: std::sync::Mutex<Option<io::Result<Listener>>> = std::sync::Mutex::new(None);

/// Forks the listener for a later [`run_check`] (see [`Listener::start`] for when to call it).
pub fn start_listener() {
    let started = Listener::start();
    *LISTENER.lock().unwrap_or_else(|e| e.into_inner()) = Some(started);
}

/// The listener [`start_listener`] forked.
pub fn take_listener() -> io::Result<Listener> {
    LISTENER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_else(|| Err(io::Error::other("no canary listener was started")))
}

/// A loopback endpoint. Nothing else can be named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// TCP to 127.0.0.1.
    Tcp4(u16),
    /// UDP to 127.0.0.1.
    Udp4(u16),
    /// TCP to ::1.
    Tcp6(u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp4(p) => write!(f, "tcp:127.0.0.1:{p}"),
            Target::Udp4(p) => write!(f, "udp:127.0.0.1:{p}"),
            Target::Tcp6(p) => write!(f, "tcp:[::1]:{p}"),
        }
    }
}

impl Target {
    /// Parses what [`Display`](std::fmt::Display) writes; anything else (any other address) is
    /// refused.
    pub fn parse(text: &str) -> Option<Target> {
        let port = |rest: &str| rest.parse::<u16>().ok().filter(|p| *p != 0);
        if let Some(rest) = text.strip_prefix("tcp:127.0.0.1:") {
            return port(rest).map(Target::Tcp4);
        }
        if let Some(rest) = text.strip_prefix("udp:127.0.0.1:") {
            return port(rest).map(Target::Udp4);
        }
        if let Some(rest) = text.strip_prefix("tcp:[::1]:") {
            return port(rest).map(Target::Tcp6);
        }
        None
    }

    fn is_tcp(self) -> bool {
        !matches!(self, Target::Udp4(_))
    }
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn new_socket(family: libc::c_int, kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers.
    let fd = check(unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn addr4(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn addr6(port: u16) -> libc::sockaddr_in6 {
    let mut loopback = [0u8; 16];
    loopback[15] = 1;
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: loopback },
        sin6_scope_id: 0,
    }
}

/// Tries to reach `target`: `Ok` means it got through (a connection, or a datagram sent).
pub fn attempt(target: Target) -> io::Result<()> {
    match target {
        Target::Tcp4(port) => {
            let fd = new_socket(libc::AF_INET, libc::SOCK_STREAM)?;
            let a = addr4(port);
            // SAFETY: `a` is a valid sockaddr_in of the size given.
            check(unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    &a as *const _ as *const libc::sockaddr,
                    std::mem::size_of_val(&a) as libc::socklen_t,
                )
            })
            .map(drop)
        }
        Target::Udp4(port) => {
            let fd = new_socket(libc::AF_INET, libc::SOCK_DGRAM)?;
            let a = addr4(port);
            // SAFETY: the buffer and `a` are valid for the sizes given.
            let r = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    b"canary".as_ptr() as *const libc::c_void,
                    6,
                    0,
                    &a as *const _ as *const libc::sockaddr,
                    std::mem::size_of_val(&a) as libc::socklen_t,
                )
            };
            check(r as libc::c_int).map(drop)
        }
        Target::Tcp6(port) => {
            let fd = new_socket(libc::AF_INET6, libc::SOCK_STREAM)?;
            let a = addr6(port);
            // SAFETY: `a` is a valid sockaddr_in6 of the size given.
            check(unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    &a as *const _ as *const libc::sockaddr,
                    std::mem::size_of_val(&a) as libc::socklen_t,
                )
            })
            .map(drop)
        }
    }
}

/// `pipe __connect [--child] TARGET...`: tries every target (with `--child`, from a child
/// process whose result it ignores). Exits 0 if nothing got through, 1 if something did.
pub fn connect_main(args: &[OsString]) -> u8 {
    let mut via_child = false;
    let mut targets = Vec::new();
    for arg in args {
        match arg.to_str() {
            Some("--child") => via_child = true,
            Some(t) => match Target::parse(t) {
                Some(t) => targets.push(t),
                None => {
                    eprintln!("pipe {CONNECT_SUBCOMMAND}: `{t}` is not a loopback target");
                    return 2;
                }
            },
            None => return 2,
        }
    }
    if via_child {
        let child = std::env::current_exe().and_then(|exe| {
            std::process::Command::new(exe)
                .arg(CONNECT_SUBCOMMAND)
                .args(targets.iter().map(ToString::to_string))
                .status()
        });
        // Swallow whatever happened to the child, as a careless processor would.
        eprintln!("pipe {CONNECT_SUBCOMMAND}: child ended: {child:?}");
        return 0;
    }
    let mut reached = false;
    for t in targets {
        match attempt(t) {
            Ok(()) => {
                eprintln!("pipe {CONNECT_SUBCOMMAND}: REACHED {t}");
                reached = true;
            }
            Err(e) => eprintln!("pipe {CONNECT_SUBCOMMAND}: {t}: {e}"),
        }
    }
    u8::from(reached)
}

/// The listener process and the pipes to talk to it.
pub struct Listener {
    pid: libc::pid_t,
    control: File,
    results: BufReader<File>,
    pub targets: Vec<Target>,
}

/// A runtime layer a per-layer canary applies alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Netns,
    Seccomp,
    Landlock,
}

impl Layer {
    fn word(self) -> &'static str {
        match self {
            Layer::Netns => "netns",
            Layer::Seccomp => "seccomp",
            Layer::Landlock => "landlock",
        }
    }
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

impl Listener {
    /// Forks the listener. Call only while the process is single-threaded and before the
    /// engine's socket filter is installed.
    pub fn start() -> io::Result<Listener> {
        if threads() != 1 {
            return Err(io::Error::other(
                "the canary listener must be started while pipe is single-threaded",
            ));
        }
        let (control_r, control_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (results_r, results_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let parent = rustix::process::getpid();
        // SAFETY: the process is single-threaded (checked above), so the child is a complete copy
        // in which any code may run; it leaves with _exit and never returns here.
        let pid = check(unsafe { libc::fork() })?;
        if pid == 0 {
            drop(control_w);
            drop(results_r);
            let _ = rustix::process::set_parent_process_death_signal(Some(
                rustix::process::Signal::KILL,
            ));
            let code = if rustix::process::getppid() == Some(parent) {
                serve(File::from(control_r), File::from(results_w))
            } else {
                1
            };
            // SAFETY: _exit ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        drop(control_r);
        drop(results_w);
        let mut listener = Listener {
            pid,
            control: File::from(control_w),
            results: BufReader::new(File::from(results_r)),
            targets: Vec::new(),
        };
        let line = listener.read_line()?;
        let ports: Vec<u16> = line
            .strip_prefix("ports ")
            .ok_or_else(|| io::Error::other(format!("listener: {line}")))?
            .split(' ')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        let (tcp4, udp4, tcp6) = (ports[0], ports.get(1).copied(), ports.get(2).copied());
        listener.targets.push(Target::Tcp4(tcp4));
        listener
            .targets
            .extend(udp4.filter(|p| *p != 0).map(Target::Udp4));
        listener
            .targets
            .extend(tcp6.filter(|p| *p != 0).map(Target::Tcp6));
        Ok(listener)
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.results.read_line(&mut line)? == 0 {
            return Err(io::Error::other("the canary listener died"));
        }
        Ok(line.trim_end().to_string())
    }

    fn ask(&mut self, command: &str) -> io::Result<String> {
        writeln!(self.control, "{command}")?;
        self.read_line()
    }

    /// Runs the canary of one layer: what each attempt did.
    pub fn canary(&mut self, layer: Layer) -> io::Result<String> {
        self.ask(layer.word())
    }

    /// Connections and datagrams the listener has received so far.
    pub fn received(&mut self) -> io::Result<u32> {
        let line = self.ask("count")?;
        line.parse()
            .map_err(|_| io::Error::other(format!("listener: {line}")))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = writeln!(self.control, "quit");
        let mut status = 0;
        // SAFETY: waitpid writes one int; the pid is our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The listener's loop (in the forked child).
fn serve(control: File, mut results: File) -> i32 {
    let (tcp4, p4, udp4, q4) = match bind(Target::Tcp4(0))
        .and_then(|(t, p)| bind(Target::Udp4(0)).map(|(u, q)| (t, p, u, q)))
    {
        Ok(b) => b,
        Err(e) => {
            let _ = writeln!(results, "cannot listen on 127.0.0.1: {e}");
            return 1;
        }
    };
    // IPv6 may be missing on this machine: then only IPv4 is tried.
    let tcp6 = bind(Target::Tcp6(0)).ok();
    let p6 = tcp6.as_ref().map_or(0, |t| t.1);
    let _ = writeln!(results, "ports {p4} {q4} {p6}");
    let mut targets = vec![Target::Tcp4(p4), Target::Udp4(q4)];
    if p6 != 0 {
        targets.push(Target::Tcp6(p6));
    }
    let mut received = 0u32;
    let drain = |received: &mut u32| {
        for fd in [Some(&tcp4), tcp6.as_ref().map(|t| &t.0)]
            .into_iter()
            .flatten()
        {
            // SAFETY: accept4 with null address pointers only returns a new descriptor.
            while let Ok(conn) = check(unsafe {
                libc::accept4(
                    fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            }) {
                // SAFETY: a fresh descriptor owned by nothing else.
                drop(unsafe { OwnedFd::from_raw_fd(conn) });
                *received += 1;
            }
        }
        let mut buf = [0u8; 64];
        // SAFETY: recv writes at most buf.len() bytes into buf.
        while unsafe {
            libc::recv(
                udp4.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } >= 0
        {
            *received += 1;
        }
    };
    for line in BufReader::new(control).lines() {
        let Ok(line) = line else { break };
        let answer = match line.as_str() {
            "netns" => layer_canary(Layer::Netns, &targets),
            "seccomp" => layer_canary(Layer::Seccomp, &targets),
            "landlock" => layer_canary(Layer::Landlock, &targets),
            "count" => {
                drain(&mut received);
                received.to_string()
            }
            _ => break,
        };
        if writeln!(results, "{answer}").is_err() {
            break;
        }
    }
    0
}

/// A non-blocking listening socket on `target`'s loopback address with a kernel-chosen port.
fn bind(target: Target) -> io::Result<(OwnedFd, u16)> {
    let (fd, port) = match target {
        Target::Tcp4(_) | Target::Udp4(_) => {
            let kind = if target.is_tcp() {
                libc::SOCK_STREAM
            } else {
                libc::SOCK_DGRAM
            };
            let fd = new_socket(libc::AF_INET, kind | libc::SOCK_NONBLOCK)?;
            let mut a = addr4(0);
            let mut len = std::mem::size_of_val(&a) as libc::socklen_t;
            // SAFETY: `a` is a valid sockaddr_in; getsockname writes at most `len` bytes into it.
            unsafe {
                check(libc::bind(
                    fd.as_raw_fd(),
                    &a as *const _ as *const libc::sockaddr,
                    len,
                ))?;
                check(libc::getsockname(
                    fd.as_raw_fd(),
                    &mut a as *mut _ as *mut libc::sockaddr,
                    &mut len,
                ))?;
            }
            (fd, u16::from_be(a.sin_port))
        }
        Target::Tcp6(_) => {
            let fd = new_socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_NONBLOCK)?;
            let mut a = addr6(0);
            let mut len = std::mem::size_of_val(&a) as libc::socklen_t;
            // SAFETY: `a` is a valid sockaddr_in6; getsockname writes at most `len` bytes into it.
            unsafe {
                check(libc::bind(
                    fd.as_raw_fd(),
                    &a as *const _ as *const libc::sockaddr,
                    len,
                ))?;
                check(libc::getsockname(
                    fd.as_raw_fd(),
                    &mut a as *mut _ as *mut libc::sockaddr,
                    &mut len,
                ))?;
            }
            (fd, u16::from_be(a.sin6_port))
        }
    };
    if target.is_tcp() {
        // SAFETY: listen takes plain integers.
        check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    }
    Ok((fd, port))
}

/// In a child of the listener: apply `layer` alone, try every target, report one line.
fn layer_canary(layer: Layer, targets: &[Target]) -> String {
    let Ok((reader, writer)) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) else {
        return "error: no pipe".into();
    };
    // SAFETY: the listener process is single-threaded; the child leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return format!("error: fork: {}", io::Error::last_os_error());
    }
    if pid == 0 {
        drop(reader);
        let mut out = File::from(writer);
        // SAFETY: alarm only arms a timer: a stuck attempt cannot hang the check.
        unsafe { libc::alarm(10) };
        let applied: Result<(), String> = match layer {
            Layer::Netns => netns::enter().map(drop).map_err(|e| e.to_string()),
            Layer::Landlock => filesystem::restrict(&FsRules {
                deny_tcp: true,
                ..FsRules::default()
            })
            .and_then(|a| {
                if a.tcp {
                    Ok(())
                } else {
                    Err("this Landlock ABI has no TCP rules".into())
                }
            }),
            Layer::Seccomp => match seccomp::program(seccomp::OnNetwork::Kill) {
                None => Err("unsupported architecture".into()),
                Some(p) => {
                    let _ = rustix::thread::set_no_new_privs(true);
                    seccomp::install(&p, false, false)
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            },
        };
        match applied {
            Err(e) => {
                let _ = write!(out, "unavailable: {e}");
            }
            Ok(()) => {
                for &t in targets {
                    // Landlock below ABI 10 covers TCP only; UDP is the namespace's job.
                    if layer == Layer::Landlock && !t.is_tcp() {
                        continue;
                    }
                    let result = match attempt(t) {
                        Ok(()) => format!("REACHED {t}"),
                        Err(e) => format!("{t} blocked ({e})"),
                    };
                    // Written at once (unbuffered), so what happened before a kill is known.
                    let _ = write!(out, "{result}; ");
                }
            }
        }
        drop(out);
        // SAFETY: _exit ends the forked child without running the parent's destructors.
        unsafe { libc::_exit(0) }
    }
    drop(writer);
    let mut text = String::new();
    let _ = File::from(reader).read_to_string(&mut text);
    let mut status = 0;
    // SAFETY: waitpid writes one int; the pid is our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut text = text.trim_end_matches([';', ' ']).to_string();
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let what = if sig == libc::SIGSYS {
            "killed by SIGSYS at its first network socket".to_string()
        } else {
            format!("killed by signal {sig}")
        };
        text = if text.is_empty() {
            what
        } else {
            format!("{text}; {what}")
        };
    }
    text
}

/// One line of the check's report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Line {
    pub layer: &'static str,
    /// `ok`, `unavailable`, or `FAILED` (something got through).
    pub status: &'static str,
    pub detail: String,
}

/// Runs the whole check; returns its lines and the exit code (0 every available layer held and
/// at least one is available; 1 something got through or could not be tested; 2 no runtime
/// layer at all).
pub fn run_check(
    exe: &Path,
    listener: io::Result<Listener>,
    self_filter: &Result<(), String>,
) -> (Vec<Line>, u8) {
    let mut lines = Vec::new();
    let mut failed = false;
    let line = |lines: &mut Vec<Line>, layer, status, detail: String| {
        lines.push(Line {
            layer,
            status,
            detail,
        })
    };
    // 1. pipe itself
    match self_filter {
        Err(e) => {
            failed = true;
            line(
                &mut lines,
                "engine",
                "FAILED",
                format!("pipe could not filter its own sockets: {e}"),
            );
        }
        Ok(()) => match new_socket(libc::AF_INET, libc::SOCK_STREAM) {
            Ok(_) => {
                failed = true;
                line(
                    &mut lines,
                    "engine",
                    "FAILED",
                    "pipe itself could open an AF_INET socket".into(),
                );
            }
            Err(e) => line(
                &mut lines,
                "engine",
                "ok",
                format!("socket(AF_INET) in pipe itself fails: {e}"),
            ),
        },
    }
    let probe = match Probe::run(exe) {
        Ok(p) => p,
        Err(e) => {
            line(&mut lines, "probe", "FAILED", e);
            return (lines, 1);
        }
    };
    let mut listener = match listener {
        Ok(l) => l,
        Err(e) => {
            line(
                &mut lines,
                "listener",
                "FAILED",
                format!("cannot start the loopback listener: {e}"),
            );
            return (lines, 1);
        }
    };
    let targets: Vec<String> = listener.targets.iter().map(ToString::to_string).collect();
    line(
        &mut lines,
        "listener",
        "ok",
        format!("listening on {}", targets.join(", ")),
    );
    // 2. each layer alone
    for (layer, name, probed) in [
        (Layer::Netns, "netns", &probe.netns),
        (Layer::Seccomp, "seccomp", &probe.seccomp),
        (Layer::Landlock, "landlock", &probe.landlock),
    ] {
        if !probed.ok {
            line(&mut lines, name, "unavailable", probed.detail.clone());
            continue;
        }
        match listener.canary(layer) {
            Ok(result) if result.contains("REACHED") => {
                failed = true;
                line(
                    &mut lines,
                    name,
                    "FAILED",
                    format!("{}: {result}", probed.detail),
                );
            }
            Ok(result) if result.starts_with("unavailable") => {
                line(&mut lines, name, "unavailable", result)
            }
            Ok(result) => line(
                &mut lines,
                name,
                "ok",
                format!("{}; canary: {result}", probed.detail),
            ),
            Err(e) => {
                failed = true;
                line(&mut lines, name, "FAILED", format!("canary: {e}"));
            }
        }
    }
    if !probe.any_network_layer() {
        line(
            &mut lines,
            "all",
            "unavailable",
            "no runtime layer: builds need `--offline-guard=static`".into(),
        );
        return (lines, 2);
    }
    // 3. everything together, as a processor whose child tries and whose error is swallowed
    let policy = Policy {
        exe: exe.to_path_buf(),
        guard: Guard::Strict,
        spec: HelperSpec {
            netns: probe.netns.ok,
            seccomp: probe.seccomp.ok,
            landlock: probe.landlock.ok.then(|| FsRules {
                deny_tcp: true,
                write: super::SYSTEM_WRITE.iter().map(Into::into).collect(),
                ..FsRules::default()
            }),
            require: true,
        },
        ..Policy::default()
    };
    let mut argv: Vec<OsString> = vec![exe.into(), CONNECT_SUBCOMMAND.into(), "--child".into()];
    argv.extend(targets.iter().map(OsString::from));
    let inv = crate::executor::Invocation {
        argv,
        env: Vec::new(),
        cwd: std::path::PathBuf::from("/"),
        log: std::path::PathBuf::from("/dev/null"),
        timeout: Some(std::time::Duration::from_secs(30)),
        cpu_set: None,
        memory_limit_mb: None,
        virtual_memory_mb: None,
        sandbox: policy,
    };
    let never = AtomicBool::new(false);
    match crate::executor::run(&inv, &never, &mut |_| {}, &mut |_| Ok(())) {
        Ok(outcome) if !outcome.violations.is_empty() => {
            let layers = outcome
                .sandbox
                .map(|l| {
                    format!(
                        "netns {}, seccomp {}, landlock {}",
                        l.netns, l.seccomp, l.landlock
                    )
                })
                .unwrap_or_default();
            let blocked: Vec<String> = outcome.violations.iter().map(ToString::to_string).collect();
            line(&mut lines, "all", "ok", format!("{layers}: a processor's child was stopped and the attempt classified `network`: {}", blocked.join("; ")));
        }
        Ok(outcome) => {
            failed = true;
            line(&mut lines, "all", "FAILED", format!("the canary processor's network attempt was not reported (exit {:?}, signal {:?}, sandbox error {:?})", outcome.exit_code, outcome.signal, outcome.sandbox_error));
        }
        Err(e) => {
            failed = true;
            line(
                &mut lines,
                "all",
                "FAILED",
                format!("cannot run the canary processor: {e}"),
            );
        }
    }
    // 4. the listener heard nothing
    match listener.received() {
        Ok(0) => line(
            &mut lines,
            "listener",
            "ok",
            "received no connection and no datagram".into(),
        ),
        Ok(n) => {
            failed = true;
            line(
                &mut lines,
                "listener",
                "FAILED",
                format!("received {n} connection(s) or datagram(s)"),
            );
        }
        Err(e) => {
            failed = true;
            line(&mut lines, "listener", "FAILED", e.to_string());
        }
    }
    (lines, u8::from(failed))
}
