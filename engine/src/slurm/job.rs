//! What one Slurm job runs: the job file the engine writes, the batch script it submits, and
//! `pipe __slurm-job JOB.json`, the wrapper the script executes on the compute node.
//!
//! The wrapper runs each unit of the job (one stage attempt, or a batch of map-item attempts) one
//! after another through [`crate::executor::run`] — the very code the local executor uses: the
//! `pipe __exec` re-exec helper, the same sandbox layers, the seccomp notifications, the timeout
//! and the memory watchdog. What differs is where the results go: each checkpoint line is
//! appended (and fsynced) to the unit's progress file, and the unit's end is written atomically
//! (tmp, fsync, rename) to its status file, both on the shared filesystem, where the engine reads
//! them. A unit without a status file did not finish; what Slurm says about its job decides the
//! classification ([`super::queue`]).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use pipe_processors::checkpoint::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::executor::{self, Invocation, Outcome};
use crate::sandbox::{Guard, HelperSpec, Hermetic, Layers, Policy, Violation};

/// The hidden subcommand the batch script executes.
pub const SUBCOMMAND: &str = "__slurm-job";

/// The job file: the environment every unit starts from and the units, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobFile {
    /// The engine's environment after the sandbox allowlist: the wrapper replaces its own with
    /// it, so the processor sees what it would see under the local executor.
    pub environ: Vec<(String, String)>,
    pub units: Vec<Unit>,
}

/// One attempt, as the engine's [`Invocation`] describes it, plus where its results go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Unit {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub log: PathBuf,
    pub timeout_ms: Option<u64>,
    pub memory_limit_mb: Option<u64>,
    pub virtual_memory_mb: Option<u64>,
    pub exe: PathBuf,
    pub guard: Guard,
    pub spec: HelperSpec,
    pub tmpdir: Option<PathBuf>,
    pub hermetic: Option<Hermetic>,
    pub pass_env: Vec<String>,
    /// Checkpoint lines, appended.
    pub progress: PathBuf,
    /// The unit's [`Status`], written last.
    pub status: PathBuf,
}

/// How a unit ended: the serialisable part of an [`Outcome`], plus where it ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub user_ms: u64,
    pub sys_ms: u64,
    pub max_rss_kb: u64,
    pub timed_out: bool,
    pub memory_exceeded: bool,
    pub peak_group_rss_kb: u64,
    pub protocol_error: Option<String>,
    pub sandbox: Option<Layers>,
    pub sandbox_error: Option<String>,
    #[serde(default)]
    pub violations: Vec<Violation>,
    /// `SLURM_JOB_ID` and the host the unit ran on.
    pub job_id: Option<String>,
    pub host: Option<String>,
}

impl Unit {
    /// The unit of `inv`, whose checkpoints go to `progress` and end to `status`.
    pub fn of(inv: &Invocation, progress: PathBuf, status: PathBuf) -> io::Result<Unit> {
        let text = |s: &std::ffi::OsStr| {
            s.to_str().map(str::to_string).ok_or_else(|| {
                io::Error::other(format!(
                    "the Slurm executor passes only UTF-8 arguments and paths (`{}`)",
                    s.to_string_lossy()
                ))
            })
        };
        Ok(Unit {
            argv: inv
                .argv
                .iter()
                .map(|a| text(a))
                .collect::<io::Result<_>>()?,
            env: inv
                .env
                .iter()
                .map(|(k, v)| Ok((text(k)?, text(v)?)))
                .collect::<io::Result<_>>()?,
            cwd: inv.cwd.clone(),
            log: inv.log.clone(),
            timeout_ms: inv.timeout.map(|t| t.as_millis() as u64),
            memory_limit_mb: inv.memory_limit_mb,
            virtual_memory_mb: inv.virtual_memory_mb,
            exe: inv.sandbox.exe.clone(),
            guard: inv.sandbox.guard,
            spec: inv.sandbox.spec.clone(),
            tmpdir: inv.sandbox.tmpdir.clone(),
            hermetic: inv.sandbox.hermetic.clone(),
            pass_env: inv.sandbox.pass_env.clone(),
            progress,
            status,
        })
    }

    fn invocation(&self) -> Invocation {
        Invocation {
            argv: self.argv.iter().map(Into::into).collect(),
            env: self.env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
            cwd: self.cwd.clone(),
            log: self.log.clone(),
            timeout: self.timeout_ms.map(Duration::from_millis),
            // Slurm allocated the cores; the job's cpuset (if any) is inherited.
            cpu_set: None,
            memory_limit_mb: self.memory_limit_mb,
            virtual_memory_mb: self.virtual_memory_mb,
            sandbox: Policy {
                exe: self.exe.clone(),
                guard: self.guard,
                spec: self.spec.clone(),
                tmpdir: self.tmpdir.clone(),
                debug: false,
                hermetic: self.hermetic.clone(),
                pass_env: self.pass_env.clone(),
            },
        }
    }
}

impl Status {
    fn of(outcome: &Outcome) -> Status {
        Status {
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            duration_ms: outcome.duration.as_millis() as u64,
            user_ms: outcome.user_us / 1000,
            sys_ms: outcome.sys_us / 1000,
            max_rss_kb: outcome.max_rss_kb,
            timed_out: outcome.timed_out,
            memory_exceeded: outcome.memory_exceeded,
            peak_group_rss_kb: outcome.peak_group_rss_kb,
            protocol_error: outcome.protocol_error.clone(),
            sandbox: outcome.sandbox.clone(),
            sandbox_error: outcome.sandbox_error.clone(),
            violations: outcome.violations.clone(),
            job_id: std::env::var("SLURM_JOB_ID").ok(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string()),
        }
    }

    /// The engine's view of this end.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            exit_code: self.exit_code,
            signal: self.signal,
            duration: Duration::from_millis(self.duration_ms),
            user_us: self.user_ms * 1000,
            sys_us: self.sys_ms * 1000,
            max_rss_kb: self.max_rss_kb,
            timed_out: self.timed_out,
            memory_exceeded: self.memory_exceeded,
            peak_group_rss_kb: self.peak_group_rss_kb,
            protocol_error: self.protocol_error.clone(),
            sandbox: self.sandbox.clone(),
            sandbox_error: self.sandbox_error.clone(),
            violations: self.violations.clone(),
            ..Outcome::default()
        }
    }
}

/// The batch script of a job: it only executes the wrapper on the job file (the script's path
/// and the `pipe` binary's path must be the same on every node). `profile` is the engine's
/// `LLVM_PROFILE_FILE` (coverage builds of pipe): the wrapper reads its environment from the job
/// file only after it started, too late for the profiling runtime.
pub fn script(exe: &Path, job_file: &Path, profile: Option<&str>) -> String {
    let env = match profile {
        Some(p) => format!("env LLVM_PROFILE_FILE={} ", shell_quote(p)),
        None => String::new(),
    };
    format!(
        "#!/bin/sh\n# Written by pipe: one Slurm job of a build (see docs/slurm.md).\nexec {env}{} {SUBCOMMAND} {}\n",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&job_file.to_string_lossy())
    )
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// `pipe __slurm-job JOB.json`: runs the units, writes their status files; exit 0 unless the job
/// file could not be read.
pub fn main(args: &[std::ffi::OsString]) -> u8 {
    let [path] = args else {
        eprintln!("usage: pipe {SUBCOMMAND} JOB.json");
        return 2;
    };
    let job: JobFile = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(job) => job,
        Err(err) => {
            eprintln!(
                "pipe {SUBCOMMAND}: cannot read `{}`: {err}",
                path.to_string_lossy()
            );
            return 2;
        }
    };
    // Still single-threaded: the processor's environment starts from the engine's, not from what
    // Slurm gave this job.
    let slurm_job = std::env::var("SLURM_JOB_ID").ok();
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    for (key, value) in &job.environ {
        std::env::set_var(key, value);
    }
    if let Some(id) = slurm_job {
        std::env::set_var("SLURM_JOB_ID", id);
    }
    let never = AtomicBool::new(false);
    for unit in &job.units {
        let status = match run_unit(unit, &never) {
            Ok(outcome) => Status::of(&outcome),
            Err(err) => Status {
                protocol_error: Some(format!("cannot start the processor on the node: {err}")),
                ..Status::of(&Outcome::default())
            },
        };
        if let Err(err) = crate::atomic::write_json(&unit.status, &status) {
            eprintln!(
                "pipe {SUBCOMMAND}: cannot write `{}`: {err}",
                unit.status.display()
            );
        }
    }
    0
}

fn run_unit(unit: &Unit, never: &AtomicBool) -> io::Result<Outcome> {
    let mut progress = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&unit.progress)?;
    let inv = unit.invocation();
    executor::run(&inv, never, &mut |_| {}, &mut |cp: Checkpoint| {
        let mut line = serde_json::to_vec(&cp).map_err(io::Error::other)?;
        line.push(b'\n');
        progress.write_all(&line)?;
        progress.sync_data()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_only_executes_the_wrapper_with_quoted_paths() {
        let s = script(
            Path::new("/opt/pipe it/pipe"),
            Path::new("/w/job's.json"),
            None,
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.ends_with("exec '/opt/pipe it/pipe' __slurm-job '/w/job'\\''s.json'\n"));
        let s = script(Path::new("/p"), Path::new("/j"), Some("/c/%p.profraw"));
        assert!(s.ends_with("exec env LLVM_PROFILE_FILE='/c/%p.profraw' '/p' __slurm-job '/j'\n"));
    }

    #[test]
    fn a_status_round_trips_into_the_same_outcome() {
        let outcome = Outcome {
            exit_code: Some(3),
            duration: Duration::from_millis(1500),
            user_us: 7_000,
            memory_exceeded: true,
            ..Outcome::default()
        };
        let json = serde_json::to_string(&Status::of(&outcome)).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back.outcome(), outcome);
    }
}
