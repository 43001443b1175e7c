//! The offline guard: nothing in a `pipe` build talks to a network, not by mistake, not through a
//! library, not through a child process. It works in layers (see `docs/offline.md`):
//!
//! 1. The engine has no networking crate and uses no socket API of the standard library (a test
//!    over `Cargo.lock` and the source enforces it) and, once `cli::main` has parsed its
//!    arguments, a seccomp filter on itself that denies every socket family but `AF_UNIX`
//!    ([`seccomp::install_self_filter`]).
//! 2. A static scan of Python processors ([`scan`]) reports network imports before anything runs.
//! 3. Every processor attempt starts through the re-exec helper ([`helper`], `pipe __exec`): a
//!    fresh network namespace ([`netns`]), Landlock ([`filesystem`]: writes only into the staging
//!    and temp folders; hermetic stages read only what they declare; TCP denied), an environment
//!    cut to an allowlist ([`mod@env`]), and last a seccomp filter whose network denials are reported
//!    to the engine through a user-notification listener: the offender and its process group are
//!    killed and the attempt is classified `network`, even when the processor swallows the error.
//!
//! The engine probes once per build which runtime layers the kernel offers ([`Probe::run`]); with
//! `--offline-guard=strict` (the default) a build on a machine offering none fails before anything
//! runs. Each attempt's helper reports what it actually applied ([`Layers`]), and the engine records
//! it in `state/stage_<name>.json`.

pub mod canary;
pub mod channel;
pub mod env;
pub mod filesystem;
pub mod helper;
pub mod netns;
pub mod pytokens;
pub mod scan;
pub mod seccomp;
pub mod zygote;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::spec::{Input, Processor, Spec, Stage};
use crate::workspace::Workspace;

pub use filesystem::FsRules;

static ENGINE_FILTER: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs the engine's own socket filter on every thread of this process (once); says whether
/// that worked.
pub fn install_engine_filter() -> &'static Result<(), String> {
    ENGINE_FILTER.get_or_init(|| seccomp::install_self_filter().map_err(|e| e.to_string()))
}

/// Whether the engine's own filter is installed (`None`: not tried yet).
pub fn engine_filter() -> Option<&'static Result<(), String>> {
    ENGINE_FILTER.get()
}

/// The whole of the `pipe-spawn` binary: `pipe-spawn __zygote ARGS` is `pipe __zygote ARGS` (see
/// [`zygote`]); anything else is refused with exit 2.
pub fn spawn_server_main() -> u8 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.split_first() {
        Some((first, rest)) if first == zygote::SUBCOMMAND => {
            // As `pipe __zygote`: its children inherit the engine filter.
            let _ = install_engine_filter();
            zygote::main(rest)
        }
        _ => {
            eprintln!(
                "{}: the spawn server of `pipe build`, started by it; not run by hand",
                zygote::SPAWN_BINARY
            );
            2
        }
    }
}

/// Runs the hidden subcommands that must not go through argument parsing: `pipe __exec ...` (the
/// re-exec helper) and `pipe __connect ...` (the canary's network attempt). `None` for any other
/// command line.
pub fn hidden_command() -> Option<u8> {
    let mut args = std::env::args_os().skip(1);
    let first = args.next()?;
    let rest: Vec<OsString> = args.collect();
    match first.to_str()? {
        helper::SUBCOMMAND => {
            let _ = install_engine_filter();
            Some(helper::main(&rest))
        }
        zygote::SUBCOMMAND => {
            // Its children inherit the engine filter, as a `pipe __exec` installs it first thing.
            let _ = install_engine_filter();
            Some(zygote::main(&rest))
        }
        crate::slurm::submitter::SUBCOMMAND => {
            // Not filtered: this process is the one that may reach Slurm (docs/offline.md).
            Some(crate::slurm::submitter::main())
        }
        crate::slurm::job::SUBCOMMAND => {
            let _ = install_engine_filter();
            Some(crate::slurm::job::main(&rest))
        }
        canary::CONNECT_SUBCOMMAND => {
            let _ = install_engine_filter();
            Some(canary::connect_main(&rest))
        }
        _ => None,
    }
}

/// `--offline-guard`: which layers a build insists on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Guard {
    /// The static scan and every runtime layer the kernel offers; at least one network layer is
    /// required.
    #[default]
    Strict,
    /// The static scan only: processors run without namespace, Landlock or seccomp (the
    /// environment allowlist still applies).
    Static,
}

/// One runtime layer as the probe found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProbe {
    pub ok: bool,
    /// How it works here, or why it does not.
    pub detail: String,
}

/// The runtime layers this machine offers, found by running the helper in probe mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub netns: LayerProbe,
    pub seccomp: LayerProbe,
    /// Whether seccomp user notification works (else a network attempt kills with SIGSYS).
    pub notify: bool,
    pub landlock: LayerProbe,
    pub landlock_abi: Option<i32>,
}

impl Probe {
    /// Whether at least one layer keeps processors off the network.
    pub fn any_network_layer(&self) -> bool {
        self.netns.ok || self.seccomp.ok || (self.landlock.ok && self.landlock_abi >= Some(4))
    }

    /// Why no layer is available, one line per layer.
    pub fn explain(&self) -> String {
        let line = |name: &str, p: &LayerProbe| {
            format!(
                "  {name}: {}",
                if p.detail.is_empty() { "?" } else { &p.detail }
            )
        };
        [
            line("network namespace", &self.netns),
            line("seccomp", &self.seccomp),
            line("Landlock", &self.landlock),
        ]
        .join("\n")
    }

    /// Starts [`Probe::run`] on a thread of its own, so that the probe process runs while the
    /// Pipefile is read and validated (it is a fresh `pipe` process: ~2 ms, a tenth of a no-op
    /// build of 1,000 stages, spent waiting).
    pub fn start(exe: std::path::PathBuf) -> ProbeRun {
        match std::thread::Builder::new()
            .name("pipe-probe".into())
            .spawn(move || Probe::run(&exe))
        {
            Ok(running) => ProbeRun(Ok(running)),
            Err(err) => ProbeRun(Err(format!("cannot start the sandbox probe: {err}"))),
        }
    }

    /// Runs `exe __exec --probe` and reads its report.
    pub fn run(exe: &Path) -> Result<Probe, String> {
        let out = std::process::Command::new(exe)
            .args([helper::SUBCOMMAND, "--probe"])
            .env_clear()
            // A coverage build of pipe must keep writing its profile where it was told to.
            .envs(std::env::vars_os().filter(|(k, _)| k == "LLVM_PROFILE_FILE"))
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run `{} {}`: {e}", exe.display(), helper::SUBCOMMAND))?;
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "the sandbox probe answered nonsense ({e}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }
}

/// A probe started by [`Probe::start`].
pub struct ProbeRun(Result<std::thread::JoinHandle<Result<Probe, String>>, String>);

impl ProbeRun {
    /// The probe's report (waits for it).
    pub fn wait(self) -> Result<Probe, String> {
        self.0?
            .join()
            .unwrap_or_else(|_| Err("the sandbox probe panicked".into()))
    }
}

/// The sandbox settings of one build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub guard: Guard,
    /// `--sandbox-debug`: report the exact re-exec command of every attempt.
    pub debug: bool,
    /// What this machine offers.
    pub probe: Probe,
    /// Static-scan findings the stages allowed (`offline.allowStaticFindings`): recorded.
    pub allowed_findings: Vec<scan::Finding>,
}

impl Options {
    /// The `run.offline` audit record's data: the guard, the layers processors run under, and the
    /// static findings the Pipefile allowed.
    pub fn audit_data(&self) -> serde_json::Value {
        let strict = self.guard == Guard::Strict;
        serde_json::json!({
            "guard": self.guard,
            "netns": strict && self.probe.netns.ok,
            "seccomp": strict && self.probe.seccomp.ok,
            "landlock": strict && self.probe.landlock.ok,
            "landlockAbi": self.probe.landlock_abi,
            "allowedStaticFindings": self.allowed_findings,
        })
    }
}

/// What the re-exec helper applies before it executes the processor (its `--spec-json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelperSpec {
    /// Enter a new network namespace.
    pub netns: bool,
    /// Install the processor socket filter.
    pub seccomp: bool,
    /// Landlock rules.
    pub landlock: Option<FsRules>,
    /// Refuse to run unless at least one network layer applied (`--offline-guard=strict`).
    pub require: bool,
}

/// How one attempt is confined: everything the executor needs besides the argv.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// The `pipe` binary, which runs the helper (`pipe __exec`).
    pub exe: PathBuf,
    pub guard: Guard,
    pub spec: HelperSpec,
    /// The attempt's private temp folder (`TMPDIR`), emptied before and removed after.
    pub tmpdir: Option<PathBuf>,
    /// `--sandbox-debug`.
    pub debug: bool,
    /// For hermetic stages: what to say when the processor failed reading an undeclared file.
    pub hermetic: Option<Hermetic>,
    /// Environment variables passed through besides the allowlist (`sandbox.passEnv`).
    pub pass_env: Vec<String>,
}

/// What a hermetic stage may read, to explain a denial.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hermetic {
    pub stage: String,
    pub root: PathBuf,
    /// Every path the stage may read or write below.
    pub allowed: Vec<PathBuf>,
}

impl Policy {
    /// No layer at all (the helper still clears the environment): for tests of the executor.
    pub fn unconfined(exe: impl Into<PathBuf>) -> Policy {
        Policy {
            exe: exe.into(),
            guard: Guard::Static,
            ..Policy::default()
        }
    }
}

/// What the helper applied to one attempt, as recorded in the stage state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layers {
    pub guard: Guard,
    /// In a fresh network namespace (no interface up).
    pub netns: bool,
    /// Under the socket filter.
    pub seccomp: bool,
    /// Under Landlock.
    pub landlock: bool,
    /// Landlock limited reads to the declared inputs (a hermetic stage).
    pub hermetic: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_abi: Option<i32>,
    /// Landlock also denies TCP bind/connect.
    #[serde(default)]
    pub landlock_tcp: bool,
    /// How a network attempt reaches the engine: `notify` (any process of the attempt) or `kill`
    /// (SIGSYS; seen only when it kills the processor itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violations: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A network access the sandbox blocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    /// The system call, e.g. `socket(AF_INET, SOCK_STREAM)`.
    pub call: String,
    pub pid: Option<u32>,
    /// The offender's command line, as far as it could be read.
    pub command: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.call)?;
        if !self.command.is_empty() {
            write!(f, " by `{}`", self.command)?;
        }
        if let Some(pid) = self.pid {
            write!(f, " (pid {pid})")?;
        }
        Ok(())
    }
}

/// Locations every hermetic processor may read: interpreters, libraries, configuration, devices.
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc",
    "/opt",
    "/nix/store",
    "/proc",
    "/sys",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Locations every processor may write: the null devices and POSIX shared memory.
pub const SYSTEM_WRITE: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/shm"];

/// The private temp folder of a stage's attempts.
pub fn tmpdir(ws: &Workspace, stage: &str) -> PathBuf {
    ws.state_dir().join("tmp").join(stage)
}

/// The confinement of `stage`'s attempts. `inputs` are the stage's resolved input files; `exe`
/// the `pipe` binary (`argv` is what the helper will execute).
pub fn stage_policy(
    opts: &Options,
    spec: &Spec,
    ws: &Workspace,
    stage: &Stage,
    inputs: &crate::inputs::ResolvedInputs,
    exe: &Path,
) -> Policy {
    let tmp = tmpdir(ws, &stage.name);
    let mut policy = Policy {
        exe: exe.to_path_buf(),
        guard: opts.guard,
        tmpdir: Some(tmp.clone()),
        debug: opts.debug,
        pass_env: stage.sandbox.pass_env.clone(),
        ..Policy::default()
    };
    if opts.guard == Guard::Static {
        return policy;
    }
    let probe = &opts.probe;
    policy.spec.require = true;
    policy.spec.netns = probe.netns.ok;
    policy.spec.seccomp = probe.seccomp.ok;
    if !probe.landlock.ok {
        return policy;
    }
    let mut rules = FsRules {
        deny_tcp: true,
        ..FsRules::default()
    };
    rules.write.push(ws.staging_dir(&stage.output_dir));
    rules.write.push(tmp);
    rules.write.extend(SYSTEM_WRITE.iter().map(PathBuf::from));
    rules.write.extend(stage.sandbox.writable.iter().cloned());
    rules.write.extend(test_switch_dirs());
    if stage.hermetic {
        let mut read: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
        let mut list = vec![spec.path(&inputs.root)];
        for input in &stage.inputs {
            match input {
                Input::Path(rel) => read.push(spec.path(rel)),
                Input::Glob { base, .. } => list.push(spec.path(base)),
            }
        }
        let globbed = stage.inputs.iter().any(|i| matches!(i, Input::Glob { .. }));
        if globbed {
            for path in inputs.files.values() {
                if !read.iter().any(|r| path.starts_with(r)) {
                    read.push(path.clone());
                    list.extend(path.parent().map(Path::to_path_buf));
                }
            }
        }
        match &stage.processor {
            Processor::Builtin { .. } => read.push(exe.to_path_buf()),
            Processor::Command { argv, files, .. } => {
                for file in files {
                    let path = spec.path(file);
                    list.extend(path.parent().map(Path::to_path_buf));
                    read.push(path);
                }
                if let Some(program) = argv.first() {
                    read.extend(program_prefixes(program, &spec.root));
                }
            }
        }
        read.extend(stage.sandbox.readable.iter().cloned());
        list.sort();
        list.dedup();
        policy.hermetic = Some(Hermetic {
            stage: stage.name.clone(),
            root: spec.root.clone(),
            allowed: read.iter().chain(&rules.write).cloned().collect(),
        });
        rules.read = Some(read);
        rules.list = list;
    }
    policy.spec.landlock = Some(rules);
    policy
}

/// Folders the protocol's test switches append to (`PIPE_LINE_TALLY`, `PIPE_FAILPOINT_FIRED`)
/// and where a coverage build writes its profiles: writable when set.
fn test_switch_dirs() -> Vec<PathBuf> {
    [
        "PIPE_LINE_TALLY",
        "PIPE_FAILPOINT_FIRED",
        "LLVM_PROFILE_FILE",
    ]
    .iter()
    .filter_map(std::env::var_os)
    .filter_map(|v| {
        let path = PathBuf::from(v);
        let path = std::path::absolute(&path).ok()?;
        path.parent().map(Path::to_path_buf)
    })
    .collect()
}

/// The installation a processor program belongs to, for hermetic reads: for
/// `/opt/venv/bin/python3` both `/opt/venv` and, through symlinks, the real interpreter's prefix.
/// Never `/`, nor the project or a folder containing it.
fn program_prefixes(program: &str, root: &Path) -> Vec<PathBuf> {
    let resolved = if program.contains('/') {
        Some(root.join(program))
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    };
    let Some(resolved) = resolved else {
        return Vec::new();
    };
    let mut prefixes = vec![resolved.clone()];
    let mut candidates = vec![resolved.clone()];
    if let Ok(real) = resolved.canonicalize() {
        prefixes.push(real.clone());
        candidates.push(real);
    }
    for path in candidates {
        if let Some(prefix) = path.parent().and_then(Path::parent) {
            if prefix.parent().is_some() && !root.starts_with(prefix) {
                prefixes.push(prefix.to_path_buf());
            }
        }
    }
    prefixes
}

/// For a hermetic stage whose processor failed: the undeclared file the log says it could not
/// read, as a message naming the stage and the input to declare.
pub fn explain_denial(hermetic: &Hermetic, log_tail: &str) -> Option<String> {
    let denied = ["Permission denied", "EACCES", "os error 13"];
    if !denied.iter().any(|d| log_tail.contains(d)) {
        return None;
    }
    let separators = |c: char| {
        c.is_whitespace() || matches!(c, '\'' | '"' | '`' | ',' | ';' | '(' | ')' | '[' | ']')
    };
    for word in log_tail.split(separators) {
        let word = word.trim_end_matches([':', '.']);
        if word.is_empty() || word.len() > 4096 {
            continue;
        }
        let path = if word.starts_with('/') {
            PathBuf::from(word)
        } else if word.contains('/') || word.contains('.') {
            hermetic.root.join(word)
        } else {
            continue;
        };
        let Ok(path) = std::path::absolute(&path) else {
            continue;
        };
        if !path.exists() || hermetic.allowed.iter().any(|a| path.starts_with(a)) {
            continue;
        }
        let stage = &hermetic.stage;
        return Some(match path.strip_prefix(&hermetic.root) {
            Ok(rel) => {
                let rel = rel.display();
                format!(
                    "stage `{stage}` is hermetic: the sandbox denied reading `{rel}`, which is not a declared input; add \"{rel}\" to the stage's `inputs` (or to `processor.files` if it is part of the processor)"
                )
            }
            Err(_) => format!(
                "stage `{stage}` is hermetic: the sandbox denied reading `{}`, which is outside the project; add it to the stage's `sandbox.readablePaths` if the stage may depend on it",
                path.display()
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_in_the_log_names_the_undeclared_file() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("secret.txt"), "x").unwrap();
        std::fs::create_dir(root.path().join("input")).unwrap();
        std::fs::write(root.path().join("input/a.txt"), "x").unwrap();
        let hermetic = Hermetic {
            stage: "s".into(),
            root: root.path().to_path_buf(),
            allowed: vec![root.path().join("input")],
        };
        let tail = "Traceback (most recent call last):\n  File \"proc.py\", line 3\nPermissionError: [Errno 13] Permission denied: 'secret.txt'";
        let message = explain_denial(&hermetic, tail).unwrap();
        assert!(message.contains("stage `s` is hermetic"), "{message}");
        assert!(
            message.contains("add \"secret.txt\" to the stage's `inputs`"),
            "{message}"
        );
        // a declared input, or no denial at all, explains nothing
        assert_eq!(
            explain_denial(&hermetic, "Permission denied: input/a.txt"),
            None
        );
        assert_eq!(explain_denial(&hermetic, "No such file: secret.txt"), None);
    }

    #[test]
    fn program_prefixes_never_expose_the_project_or_the_root() {
        let root = Path::new("/home/u/proj");
        assert!(program_prefixes("/bin/true", root)
            .iter()
            .all(|p| p != Path::new("/")));
        let prefixes = program_prefixes("tools/run.sh", root);
        assert!(
            !prefixes.iter().any(|p| root.starts_with(p)),
            "{prefixes:?}"
        );
    }
}
