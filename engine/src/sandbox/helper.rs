//! The re-exec helper, `pipe __exec`: the engine starts every processor attempt as
//!
//! ```text
//! pipe __exec --channel-stdin --parent-pid PID [--cpus 0,1] [--address-space BYTES] \
//!     --spec-json '{...}' -- ARGV...
//! ```
//!
//! and this ordinary, single-threaded process (no async-signal-safety limits, unlike a `pre_exec`
//! hook in the multi-threaded engine) confines itself and then *becomes* the processor with
//! `execve`: same pid, same process group (set by the engine), same stdio and progress pipe (fd 3).
//!
//! Normally the build's spawn server ([`super::zygote`]) forks the helper and this code runs in
//! the forked child, set up by the server as `posix_spawn` would have. Otherwise the engine
//! starts the helper with `posix_spawn` (no hook between fork and exec), which costs the same
//! whatever the engine's size: a `fork` copies the engine's page tables, and a map stage of
//! 20,000 items spent a third of its time there. Either way everything a hook used to do is done
//! here, first thing (the "parent" below is the server for a forked child, else the engine): the
//! report channel arrives as stdin and the engine's first message on it carries the progress pipe, which goes to fd 3 (the channel to fd 4, stdin back to `/dev/null`);
//! then the parent-death signal is armed and the engine checked to be still there; then CPU
//! affinity and the address-space limit are set.
//!
//! Then, in order: close every inherited descriptor above 4; enter a new network namespace;
//! re-arm the parent-death signal (a user namespace clears it) and check the engine is still
//! there; restrict itself with Landlock; install the socket
//! filter (with a user-notification listener when the engine gave it a report channel); send the
//! engine a report of what was applied, with the listener attached; `execve` the processor. Any
//! failure before `execve` is reported and the processor never starts (exit 126); a failing
//! `execve` exits 127.
//!
//! `--probe` applies each layer to itself in turn and prints what works as JSON (the engine's
//! [`super::Probe`]). Run by hand (as `--sandbox-debug` prints it), stdin is no socket, so there
//! is no channel: the filter kills a network attempt with SIGSYS instead of notifying.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use serde::{Deserialize, Serialize};

use super::{channel, filesystem, netns, seccomp, HelperSpec, LayerProbe, Layers, Probe};

/// The hidden subcommand.
pub const SUBCOMMAND: &str = "__exec";
/// The descriptor the progress pipe has in the helper and the processor.
pub const PROGRESS_FD: i32 = 3;
/// The descriptor the report channel has in the helper (close-on-exec: the processor never has it).
pub const REPORT_FD: i32 = 4;
/// What the engine's one message to the helper says; the progress pipe rides along with it.
pub const PROGRESS_MESSAGE: &[u8] = b"progress";
/// Exit code when the sandbox could not be set up (the processor never started).
pub const EXIT_SETUP_FAILED: u8 = 126;
/// Exit code when the processor could not be executed.
pub const EXIT_EXEC_FAILED: u8 = 127;
/// The flag the spawn server gives the helpers it forks (see [`Args`]).
pub const MEASURED_FLAG: &str = "--measured-by-parent";

/// What the helper tells the engine (one message each).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Layers>,
    /// The sandbox could not be set up: the processor did not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `execve` of the processor failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_error: Option<String>,
    /// A built-in processor ended: its peak resident memory in KiB (sent just before it exits,
    /// only by a helper the engine `posix_spawn`ed). Such a (vfork) helper cannot be measured by
    /// `wait4`: at its `exec` the kernel folded the engine's own peak into the `ru_maxrss` the
    /// engine would read. A child of the spawn server is measured by the server's `wait4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_kb: Option<u64>,
}

/// Parsed arguments.
struct Args {
    /// The report channel is stdin, and brings the progress pipe.
    channel_stdin: bool,
    /// The engine: the helper dies with it, and refuses to start without it.
    parent: Option<i32>,
    /// Cores to pin to.
    cpus: Option<Vec<usize>>,
    /// `RLIMIT_AS`, bytes.
    address_space: Option<u64>,
    spec: Option<String>,
    probe: bool,
    /// This process is already in a network namespace of its own build's making (the spawn
    /// server's, see `sandbox::zygote`): a built-in processor stays in it.
    shared_netns: bool,
    /// The parent that reaps this process reads its own `ru_maxrss` (a fork of the spawn server,
    /// not a vfork of the engine): a built-in sends no peak-memory report.
    measured: bool,
    argv: Vec<OsString>,
}

fn parse(args: &[OsString]) -> Result<Args, String> {
    let mut parsed = Args {
        channel_stdin: false,
        parent: None,
        cpus: None,
        address_space: None,
        spec: None,
        probe: false,
        shared_netns: false,
        measured: false,
        argv: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.to_str())
                .map(str::to_string)
                .ok_or_else(|| format!("`{name}` needs a value"))
        };
        match arg.to_str() {
            Some("--channel-stdin") => parsed.channel_stdin = true,
            Some("--parent-pid") => {
                let v = value("--parent-pid")?;
                parsed.parent = Some(v.parse().map_err(|_| format!("bad --parent-pid `{v}`"))?);
            }
            Some("--cpus") => {
                let v = value("--cpus")?;
                let cores: Result<Vec<usize>, _> = v.split(',').map(str::parse).collect();
                parsed.cpus = Some(cores.map_err(|_| format!("bad --cpus `{v}`"))?);
            }
            Some("--address-space") => {
                let v = value("--address-space")?;
                parsed.address_space = Some(
                    v.parse()
                        .map_err(|_| format!("bad --address-space `{v}`"))?,
                );
            }
            Some("--spec-json") => parsed.spec = Some(value("--spec-json")?),
            Some("--spec-file") => {
                let path = value("--spec-file")?;
                parsed.spec = Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("cannot read `{path}`: {e}"))?,
                );
            }
            Some("--probe") => parsed.probe = true,
            Some("--shared-netns") => parsed.shared_netns = true,
            Some(MEASURED_FLAG) => parsed.measured = true,
            Some("--") => {
                parsed.argv = it.cloned().collect();
                break;
            }
            _ => return Err(format!("unexpected argument `{}`", arg.to_string_lossy())),
        }
    }
    Ok(parsed)
}

/// `pipe __exec ARGS`: returns only when the processor could not be started.
pub fn main(args: &[OsString]) -> u8 {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "pipe {SUBCOMMAND}: {e}\nusage: pipe {SUBCOMMAND} [--channel-stdin] [--parent-pid PID] [--cpus LIST] [--address-space BYTES] (--spec-json JSON | --spec-file FILE) -- PROGRAM [ARGS...] | pipe {SUBCOMMAND} --probe"
            );
            return 2;
        }
    };
    if args.probe {
        let probe = probe();
        println!(
            "{}",
            serde_json::to_string(&probe).expect("the probe serialises")
        );
        return 0;
    }
    let channel = match args.channel_stdin.then(take_channel).flatten() {
        Some(Ok(channel)) => Some(channel),
        Some(Err(message)) => {
            eprintln!("pipe: the offline sandbox could not be set up: {message}");
            return EXIT_SETUP_FAILED;
        }
        None => None,
    };
    close_inherited_descriptors();
    let send = |report: &Report, fd: Option<&OwnedFd>| {
        if let Some(ch) = &channel {
            let bytes = serde_json::to_vec(report).expect("the report serialises");
            let _ = channel::send(ch.as_fd(), &bytes, fd.map(|f| f.as_fd()));
        }
    };
    let fail = |message: String| {
        eprintln!("pipe: the offline sandbox could not be set up: {message}");
        send(
            &Report {
                error: Some(message),
                ..Report::default()
            },
            None,
        );
        EXIT_SETUP_FAILED
    };
    if let Err(message) = start_as_the_engine_asked(&args) {
        return fail(message);
    }
    let Some(program) = args.argv.first() else {
        return fail("no processor to run (nothing after `--`)".into());
    };
    let spec: HelperSpec = match args.spec.as_deref().map(serde_json::from_str) {
        Some(Ok(spec)) => spec,
        Some(Err(e)) => return fail(format!("bad sandbox spec: {e}")),
        None => return fail("no sandbox spec (`--spec-json` or `--spec-file`)".into()),
    };
    let builtin = builtin_of(&args.argv);
    // Only a built-in (this binary's own code, which opens no socket) may share the namespace
    // with the build's other built-ins; any other processor gets one of its own.
    let shared_netns = args.shared_netns && builtin.is_some();
    let listener = match apply(&spec, channel.is_some(), shared_netns) {
        Ok((layers, listener)) => {
            send(
                &Report {
                    layers: Some(layers),
                    ..Report::default()
                },
                listener.as_ref(),
            );
            listener
        }
        Err(message) => return fail(message),
    };
    drop(listener);
    if let Some(name) = builtin {
        // A built-in processor is this very binary: run it here, confined exactly as an exec'd
        // one would be (same process, same environment), and spare a second exec of `pipe`.
        // The report channel stays open (the built-in never uses it) for the one thing a
        // `posix_spawn`ing engine cannot measure itself: the processor's peak memory.
        let code = pipe_processors::builtins::run(&name);
        if !args.measured {
            send(
                &Report {
                    peak_rss_kb: crate::procfs::own_peak_rss_kb(),
                    ..Report::default()
                },
                None,
            );
        }
        drop(channel);
        exit_now(code);
    }
    let err = std::process::Command::new(program)
        .args(&args.argv[1..])
        .exec();
    eprintln!(
        "pipe: cannot start the processor `{}`: {err}",
        program.to_string_lossy()
    );
    send(
        &Report {
            exec_error: Some(err.to_string()),
            ..Report::default()
        },
        None,
    );
    EXIT_EXEC_FAILED
}

/// Ends this process now with `code`, once what is buffered for stdout is written: no exit
/// handlers, no teardown of the runtime (a forked helper would otherwise fault in the pages of
/// the C library's and the loader's exit paths just to run them). Except under a coverage
/// profile (`LLVM_PROFILE_FILE` set, as `cargo llvm-cov` and the tests' environment have it): the
/// profile's counters are written by an exit handler, so the process exits normally then.
pub fn exit_now(code: i32) -> ! {
    if std::env::var_os("LLVM_PROFILE_FILE").is_some() {
        std::process::exit(code);
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // SAFETY: _exit ends the process at once; nothing of this process is needed after it, and
    // stdout was flushed (stderr is unbuffered; no C stdio stream is used).
    unsafe { libc::_exit(code) }
}

/// The `pipe` binary whose `processor NAME` argv runs in-process: set by the spawn server (which
/// may be `pipe-spawn`) before it forks any helper, else this binary's path, read once.
static PIPE_BINARY: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// See [`PIPE_BINARY`]: the spawn server names the engine's binary here.
pub fn set_pipe_binary(path: std::path::PathBuf) {
    let _ = PIPE_BINARY.set(Some(path));
}

/// See [`PIPE_BINARY`].
pub fn pipe_binary() -> Option<&'static std::path::Path> {
    PIPE_BINARY
        .get_or_init(|| std::env::current_exe().ok())
        .as_deref()
}

/// The built-in's name when `argv` is `PIPE processor NAME`, `PIPE` being [`pipe_binary`].
fn builtin_of(argv: &[OsString]) -> Option<String> {
    let [program, sub, name] = argv else {
        return None;
    };
    if sub != "processor" {
        return None;
    }
    (std::path::Path::new(program) == pipe_binary()?).then(|| name.to_string_lossy().into_owned())
}

/// Takes the report channel from stdin (`None`: stdin is no socket, as when a person runs the
/// helper by hand) and the progress pipe from the engine's message on it: the pipe goes to
/// [`PROGRESS_FD`], the channel to [`REPORT_FD`] (close-on-exec), stdin back to `/dev/null`.
fn take_channel() -> Option<Result<OwnedFd, String>> {
    if !channel::is_socket(0) {
        return None;
    }
    Some((|| {
        let stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        // The engine sent this before it spawned the helper: it is already queued.
        let progress = match channel::recv(stdin.as_fd(), &mut buf) {
            Ok(Some((n, Some(fd)))) if &buf[..n] == PROGRESS_MESSAGE => fd,
            Ok(_) => return Err("the engine's channel brought no progress pipe".to_string()),
            Err(e) => return Err(format!("cannot read the engine's channel: {e}")),
        };
        let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        // Each source is first copied above every target, so that no move can overwrite a
        // source still to be moved (the pipe may well have arrived as fd 3, /dev/null as fd 4).
        let high = |fd: BorrowedFd<'_>| {
            rustix::io::fcntl_dupfd_cloexec(fd, REPORT_FD + 1)
                .map_err(|e| format!("cannot move the engine's descriptors: {e}"))
        };
        let (progress_high, channel, null_high) = (
            high(progress.as_fd())?,
            high(stdin.as_fd())?,
            high(null.as_fd())?,
        );
        // Closed now: dropped after the moves, they would close what was moved onto them.
        drop((progress, null));
        let (progress, null) = (progress_high, null_high);
        // SAFETY: dup2 only duplicates descriptors. The targets are the numbers the protocol
        // gives the pipe, the channel and stdin; the sources are all above them, and nothing in
        // this single-threaded process uses fds 0, 3 or 4 meanwhile.
        let moved = unsafe {
            libc::dup2(progress.as_raw_fd(), PROGRESS_FD) >= 0
                && libc::dup2(channel.as_raw_fd(), REPORT_FD) >= 0
                && libc::dup2(null.as_raw_fd(), 0) >= 0
        };
        if !moved {
            return Err(format!(
                "cannot move the engine's descriptors: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: REPORT_FD was just made a duplicate of the channel; nothing else owns it.
        let channel = unsafe { OwnedFd::from_raw_fd(REPORT_FD) };
        rustix::io::fcntl_setfd(&channel, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| format!("cannot mark the channel close-on-exec: {e}"))?;
        Ok(channel)
    })())
}

/// What a hook between fork and exec would have done: die with the engine (and refuse to start
/// when it is already gone), pin to the stage's cores, cap the address space.
fn start_as_the_engine_asked(args: &Args) -> Result<(), String> {
    if let Some(parent) = args.parent {
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
        if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(parent) {
            return Err("pipe exited before the processor started".into());
        }
    }
    if let Some(cores) = &args.cpus {
        let mut set = rustix::thread::CpuSet::new();
        for &core in cores
            .iter()
            .filter(|&&c| c < rustix::thread::CpuSet::MAX_CPU)
        {
            set.set(core);
        }
        rustix::thread::sched_setaffinity(None, &set)
            .map_err(|e| format!("cannot pin to cores {cores:?}: {e}"))?;
    }
    if let Some(bytes) = args.address_space {
        let limit = rustix::process::Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        };
        rustix::process::setrlimit(rustix::process::Resource::As, limit)
            .map_err(|e| format!("cannot limit the address space to {bytes} bytes: {e}"))?;
    }
    Ok(())
}

/// Closes every descriptor above the report channel: nothing the engine's parent leaked (a
/// socket, say) reaches the processor.
fn close_inherited_descriptors() {
    // SAFETY: close_range only closes descriptors; nothing in this single-threaded process owns
    // one above REPORT_FD at this point.
    unsafe {
        libc::close_range(REPORT_FD as u32 + 1, u32::MAX, 0);
    }
}

/// Applies `spec` to this process; returns what was applied and the seccomp listener.
fn apply(
    spec: &HelperSpec,
    notify: bool,
    shared_netns: bool,
) -> Result<(Layers, Option<OwnedFd>), String> {
    let mut layers = Layers::default();
    let parent = rustix::process::getppid();
    let death_signal = rustix::process::parent_process_death_signal()
        .ok()
        .flatten();
    if spec.netns && shared_netns {
        layers.netns = true;
        layers.notes.push(
            "network namespace shared with the build's other built-in processors (made once by the spawn server)"
                .into(),
        );
    } else if spec.netns {
        match netns::enter() {
            Ok(how) => {
                layers.netns = true;
                if how == netns::Entered::WithUserNamespace {
                    layers
                        .notes
                        .push("network namespace inside a user namespace".into());
                }
            }
            Err(e) => return Err(format!("cannot enter a new network namespace: {e}")),
        }
    }
    if let Some(signal) = death_signal {
        // A new user namespace clears the parent-death signal: re-arm it, then make sure the
        // engine did not die in between.
        rustix::process::set_parent_process_death_signal(Some(signal))
            .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
        if rustix::process::getppid() != parent {
            return Err("pipe exited before the processor started".into());
        }
    }
    if let Some(rules) = &spec.landlock {
        let applied = filesystem::restrict(rules)?;
        layers.landlock = true;
        layers.landlock_abi = Some(applied.abi);
        layers.landlock_tcp = applied.tcp;
        layers.hermetic = rules.read.is_some();
        for path in applied.missing {
            layers
                .notes
                .push(format!("Landlock: `{}` does not exist", path.display()));
        }
    }
    let mut listener = None;
    if spec.seccomp {
        let program =
            |on| seccomp::program(on).ok_or("seccomp: this architecture is not supported");
        rustix::thread::set_no_new_privs(true).map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
        let notified = if notify {
            // Only one filter of a process's chain may have a listener: under a pipe that runs
            // in a processor of another pipe this fails with EBUSY, and killing is what is left.
            match seccomp::install(&program(seccomp::OnNetwork::Notify)?, false, true) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    layers.notes.push(format!(
                        "no seccomp user notification ({e}): a network attempt kills with SIGSYS"
                    ));
                    None
                }
            }
        } else {
            None
        };
        match notified {
            Some(fd) => {
                listener = fd;
                layers.violations = Some("notify".into());
            }
            None => {
                seccomp::install(&program(seccomp::OnNetwork::Kill)?, false, false)
                    .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
                layers.violations = Some("kill".into());
            }
        }
        layers.seccomp = true;
    }
    if spec.require && !(layers.netns || layers.seccomp || layers.landlock_tcp) {
        return Err("no runtime offline layer could be applied (network namespace, seccomp, Landlock TCP rules); pass `--offline-guard=static` to run with the static scan only".into());
    }
    Ok((layers, listener))
}

/// Tries each runtime layer on this (throw-away) process.
fn probe() -> Probe {
    let mut probe = Probe::default();
    probe.netns = match netns::enter() {
        Ok(netns::Entered::Privileged) => ok("unshare(CLONE_NEWNET)"),
        Ok(netns::Entered::WithUserNamespace) => ok("unshare(CLONE_NEWUSER | CLONE_NEWNET)"),
        Err(e) => failed(format!("cannot create a network namespace: {e}")),
    };
    probe.landlock_abi = filesystem::abi();
    probe.landlock = match probe.landlock_abi {
        None => failed("Landlock is not available in this kernel (Linux 5.13+ with `landlock` in the LSM list)".into()),
        Some(abi) => match filesystem::restrict(&filesystem::FsRules {
            deny_tcp: true,
            ..filesystem::FsRules::default()
        }) {
            Ok(applied) => ok(&format!(
                "ABI {abi}: filesystem rules{}{}",
                if applied.tcp { ", TCP bind/connect denied" } else { ", no TCP rules (ABI < 4)" },
                if applied.scoped { ", scoped signals and abstract sockets" } else { "" }
            )),
            Err(e) => failed(e),
        },
    };
    probe.seccomp = match seccomp::program(seccomp::OnNetwork::Kill) {
        None => failed("seccomp: this architecture is not supported".into()),
        Some(program) => {
            let _ = rustix::thread::set_no_new_privs(true);
            let notify = seccomp::install(&program, false, true);
            probe.notify = notify.is_ok();
            match notify {
                Ok(_) => ok("socket filter with user notification"),
                Err(_) => match seccomp::install(&program, false, false) {
                    Ok(_) => ok(
                        "socket filter (no user notification: a network attempt kills with SIGSYS)",
                    ),
                    Err(e) => failed(format!("cannot install a seccomp filter: {e}")),
                },
            }
        }
    };
    probe
}

fn ok(detail: &str) -> LayerProbe {
    LayerProbe {
        ok: true,
        detail: detail.to_string(),
    }
}

fn failed(detail: String) -> LayerProbe {
    LayerProbe { ok: false, detail }
}
