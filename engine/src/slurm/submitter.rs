//! The Slurm submitter: the only process of a build that talks to Slurm.
//!
//! The engine denies itself every socket family but `AF_UNIX` (a seccomp filter every child
//! inherits), so neither it nor anything it starts later can reach `slurmctld`. When a build will
//! use Slurm, `main` therefore starts `pipe __slurm-submitter` *before* installing that filter,
//! connected by an `AF_UNIX` socket pair (its stdin and stdout), and from then on asks it for
//! work over that pair, one JSON line per request and per answer — privilege separation, as
//! OpenSSH does it. The submitter runs exactly four programs: `sbatch --parsable`, `squeue`,
//! `sacct` and `scancel`, with arguments it checks itself (job ids are digits; sbatch options
//! start with `-`; the script path is absolute). It reads nothing else and writes nothing; it ends
//! when the engine closes the pair or dies (parent-death signal). See docs/offline.md.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// The hidden subcommand.
pub const SUBCOMMAND: &str = "__slurm-submitter";

/// What the engine asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// `sbatch --parsable OPTIONS... SCRIPT`.
    Submit {
        options: Vec<String>,
        script: PathBuf,
    },
    /// `squeue --noheader --states=all --format=%i|%T|%r|%k --jobs=IDS`.
    Queue { jobs: Vec<String> },
    /// `sacct --noheader --parsable2 --allocations --format=JobID,State --jobs=IDS` (clusters with
    /// accounting; for jobs already gone from the queue).
    Accounting { jobs: Vec<String> },
    /// `scancel IDS`.
    Cancel { jobs: Vec<String> },
}

/// What the submitter answers: the command's exit code and output, or why it did not run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub error: Option<String>,
}

impl Response {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.code == Some(0)
    }

    /// A one-line account of a failure.
    pub fn problem(&self) -> String {
        match &self.error {
            Some(err) => err.clone(),
            None => {
                let text = self.stderr.trim();
                let text = if text.is_empty() {
                    self.stdout.trim()
                } else {
                    text
                };
                format!(
                    "exit code {}: {}",
                    self.code.map_or("none".into(), |c| c.to_string()),
                    text.lines().last().unwrap_or("")
                )
            }
        }
    }
}

/// The engine's end of the pair.
#[derive(Debug)]
pub struct Client {
    io: Mutex<(BufReader<File>, File)>,
    pub pid: u32,
}

static CLIENT: OnceLock<io::Result<Client>> = OnceLock::new();

/// Starts the submitter (once). Call before the engine filter is installed.
pub fn start(exe: &Path) -> &'static io::Result<Client> {
    CLIENT.get_or_init(|| spawn(exe))
}

/// The submitter started by [`start`], if any.
pub fn client() -> Option<&'static io::Result<Client>> {
    CLIENT.get()
}

fn spawn(exe: &Path) -> io::Result<Client> {
    let (ours, theirs) = crate::sandbox::channel::stream_pair()?;
    let theirs_out = theirs.try_clone()?;
    let mut command = Command::new(exe);
    command
        .arg(SUBCOMMAND)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::from(theirs_out))
        .stderr(Stdio::inherit());
    // SAFETY: runs between fork and exec and makes one async-signal-safe syscall (prctl).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    let pid = child.id();
    // Reaped by nobody: it exits when the engine does (end of stream or parent-death signal).
    std::mem::forget(child);
    let reader = File::from(ours.try_clone()?);
    Ok(Client {
        io: Mutex::new((BufReader::new(reader), File::from(ours))),
        pid,
    })
}

impl Client {
    /// Sends one request and waits for its answer (requests are serialised).
    pub fn call(&self, request: &Request) -> io::Result<Response> {
        let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut io = self.io.lock().map_err(|_| io::Error::other("poisoned"))?;
        io.1.write_all(&line)?;
        let mut answer = String::new();
        if io.0.read_line(&mut answer)? == 0 {
            return Err(io::Error::other("the Slurm submitter exited"));
        }
        serde_json::from_str(&answer).map_err(io::Error::other)
    }
}

/// `pipe __slurm-submitter`: answers requests from stdin on stdout until end of input.
pub fn main() -> u8 {
    let stdin = io::stdin();
    let mut stdout = io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => execute(&request),
            Err(err) => Response {
                error: Some(format!("bad request: {err}")),
                ..Response::default()
            },
        };
        let mut out = serde_json::to_vec(&response).expect("a response serialises");
        out.push(b'\n');
        if stdout
            .write_all(&out)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    0
}

/// The command line of `request`, or why it is refused.
pub fn command_of(request: &Request) -> Result<(&'static str, Vec<String>), String> {
    let ids = |jobs: &[String]| -> Result<String, String> {
        if jobs.is_empty() {
            return Err("no job ids".into());
        }
        for id in jobs {
            let valid = !id.is_empty()
                && id.split('_').count() <= 2
                && id
                    .split('_')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if !valid {
                return Err(format!("`{id}` is not a Slurm job id"));
            }
        }
        Ok(jobs.join(","))
    };
    match request {
        Request::Submit { options, script } => {
            if let Some(bad) = options.iter().find(|o| !o.starts_with('-')) {
                return Err(format!("`{bad}` is not an sbatch option"));
            }
            if !script.is_absolute() {
                return Err("the job script path must be absolute".into());
            }
            let mut args = vec!["--parsable".to_string()];
            args.extend(options.iter().cloned());
            args.push(script.to_string_lossy().into_owned());
            Ok(("sbatch", args))
        }
        Request::Queue { jobs } => Ok((
            "squeue",
            vec![
                "--noheader".into(),
                "--states=all".into(),
                "--format=%i|%T|%r|%k".into(),
                format!("--jobs={}", ids(jobs)?),
            ],
        )),
        Request::Accounting { jobs } => Ok((
            "sacct",
            vec![
                "--noheader".into(),
                "--parsable2".into(),
                "--allocations".into(),
                "--format=JobID,State".into(),
                format!("--jobs={}", ids(jobs)?),
            ],
        )),
        Request::Cancel { jobs } => Ok((
            "scancel",
            jobs.iter().try_fold(Vec::new(), |mut v, j| {
                ids(std::slice::from_ref(j))?;
                v.push(j.clone());
                Ok::<_, String>(v)
            })?,
        )),
    }
}

fn execute(request: &Request) -> Response {
    let (program, args) = match command_of(request) {
        Ok(c) => c,
        Err(err) => {
            return Response {
                error: Some(format!("refused: {err}")),
                ..Response::default()
            }
        }
    };
    match Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => Response {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            error: None,
        },
        Err(err) => Response {
            error: Some(format!("cannot run `{program}`: {err}")),
            ..Response::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_four_commands_with_checked_arguments() {
        let submit = Request::Submit {
            options: vec!["--job-name=pipe-a".into()],
            script: "/w/job.sh".into(),
        };
        assert_eq!(
            command_of(&submit).unwrap(),
            (
                "sbatch",
                vec![
                    "--parsable".into(),
                    "--job-name=pipe-a".into(),
                    "/w/job.sh".into()
                ]
            )
        );
        let bad = Request::Submit {
            options: vec!["rm".into()],
            script: "/w/job.sh".into(),
        };
        assert!(command_of(&bad).is_err());
        let relative = Request::Submit {
            options: vec![],
            script: "job.sh".into(),
        };
        assert!(command_of(&relative).is_err());
        assert!(command_of(&Request::Cancel {
            jobs: vec!["12;rm".into()]
        })
        .is_err());
        assert_eq!(
            command_of(&Request::Cancel {
                jobs: vec!["12".into(), "13_4".into()]
            })
            .unwrap(),
            ("scancel", vec!["12".into(), "13_4".into()])
        );
        assert!(command_of(&Request::Queue { jobs: vec![] }).is_err());
    }

    #[test]
    fn requests_are_one_json_line() {
        let r = Request::Queue {
            jobs: vec!["5".into()],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"queue","jobs":["5"]}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
    }
}
