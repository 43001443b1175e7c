//! What Slurm says about a job, and how a job that ended without a status file is classified.
//!
//! Completion is decided by the unit's status file ([`super::job::Status`]), never by a Slurm
//! state alone (`sbatch --wait` returns 0 even for a job cancelled because a dependency failed).
//! Only when the job has left the running states and no status file appeared does the Slurm
//! state say what happened.

use std::collections::BTreeMap;

/// A job's state as `squeue --format=%i|%T|%r|%k` (or `sacct`) reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobState {
    pub state: String,
    pub reason: String,
    /// The job's comment (`pipe run <run id>` for pipe's jobs; empty from sacct).
    pub comment: String,
}

/// The state given to a job that is in neither the queue nor the accounting records.
pub const GONE: &str = "GONE";

/// Parses `squeue --noheader --format=%i|%T|%r|%k` output.
pub fn parse_queue(stdout: &str) -> BTreeMap<String, JobState> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut parts = line.trim().splitn(4, '|');
            let id = parts.next()?.trim();
            let state = parts.next()?.trim();
            let reason = parts.next().unwrap_or("").trim();
            let comment = parts.next().unwrap_or("").trim();
            (!id.is_empty() && !state.is_empty()).then(|| {
                (
                    id.to_string(),
                    JobState {
                        state: state.to_string(),
                        reason: reason.to_string(),
                        comment: comment.to_string(),
                    },
                )
            })
        })
        .collect()
}

/// Parses `sacct --noheader --parsable2 --allocations --format=JobID,State` output (a state may
/// read `CANCELLED by 0`).
pub fn parse_accounting(stdout: &str) -> BTreeMap<String, JobState> {
    stdout
        .lines()
        .filter_map(|line| {
            let (id, state) = line.trim().split_once('|')?;
            let state = state.split_whitespace().next()?;
            Some((
                id.to_string(),
                JobState {
                    state: state.to_string(),
                    ..JobState::default()
                },
            ))
        })
        .collect()
}

/// Whether the job will run no more of its units (COMPLETING is not: its processes are still
/// being cleaned up and a status file may yet appear).
pub fn is_finished(state: &str) -> bool {
    !matches!(
        state,
        "PENDING"
            | "CONFIGURING"
            | "RUNNING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_FED"
            | "REQUEUE_HOLD"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "STOPPED"
            | "RESV_DEL_HOLD"
            | "SPECIAL_EXIT"
    )
}

/// Whether `sbatch`'s refusal is the controller being unreachable or busy (retryable), rather than
/// the job being unacceptable (a limit, an unknown partition: fatal).
pub fn is_transient_refusal(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    [
        "unable to contact slurm controller",
        "socket timed out",
        "temporarily unavailable",
        "slurm temporarily unable",
        "the slurm submitter failed",
    ]
    .iter()
    .any(|t| lower.contains(t))
}

/// How a unit whose job ended without writing its status file is classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Slurm killed it for exceeding its memory (OUT_OF_MEMORY, or the step's "exceeded memory
    /// limit" message of `jobacct_gather` with `OverMemoryKill`): `memory`.
    Memory(String),
    /// TIMEOUT / DEADLINE: `timeout`.
    Timeout(String),
    /// Cancelled (`scancel`, or by Slurm for an unsatisfiable dependency): not retried; the
    /// stage keeps its checkpoint, so the next build resumes.
    Cancelled(String),
    /// Node failure, preemption, boot failure, launch failure, or vanished: retryable.
    Lost(String),
}

/// Classifies a job that ended in `state` without a status file; `output` is the end of the
/// job's Slurm output file (where slurmstepd reports a memory kill).
pub fn classify(job: &str, state: &JobState, output: &str) -> End {
    let lower = output.to_ascii_lowercase();
    let said_memory = lower.contains("exceeded memory limit")
        || lower.contains("exceeded job memory limit")
        || lower.contains("oom-kill")
        || lower.contains("out of memory");
    let why = if state.reason.is_empty() || state.reason == "None" {
        String::new()
    } else {
        format!(", reason {}", state.reason)
    };
    let what = format!("Slurm job {job} ended {}{why}", state.state);
    match state.state.as_str() {
        "OUT_OF_MEMORY" => End::Memory(format!("{what}: over its memory limit")),
        _ if said_memory => End::Memory(format!(
            "{what}: Slurm killed it for exceeding its memory limit"
        )),
        "TIMEOUT" | "DEADLINE" => End::Timeout(format!("{what}: over its time limit")),
        "CANCELLED" => End::Cancelled(format!(
            "{what} before the attempt finished (scancel?); its checkpoint is kept"
        )),
        GONE => End::Lost(format!(
            "Slurm job {job} left the queue without a status file (node failure or purged); retryable"
        )),
        _ => End::Lost(format!(
            "{what} without a status file (node failure, preemption or launch failure); retryable"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(state: &str) -> JobState {
        JobState {
            state: state.into(),
            reason: "None".into(),
            comment: String::new(),
        }
    }

    #[test]
    fn parses_squeue_and_sacct_lines() {
        let q = parse_queue("12|RUNNING|None|\n13|FAILED|JobLaunchFailure|pipe run r1\n\n");
        assert_eq!(q["12"], st("RUNNING"));
        assert_eq!(q["13"].comment, "pipe run r1");
        assert_eq!(q["13"].reason, "JobLaunchFailure");
        let a = parse_accounting("14|CANCELLED by 0\n15|OUT_OF_MEMORY\n");
        assert_eq!(a["14"].state, "CANCELLED");
        assert_eq!(a["15"].state, "OUT_OF_MEMORY");
    }

    #[test]
    fn only_ended_states_are_finished() {
        for s in ["PENDING", "RUNNING", "COMPLETING", "CONFIGURING"] {
            assert!(!is_finished(s), "{s}");
        }
        for s in [
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "OUT_OF_MEMORY",
            "NODE_FAIL",
            "PREEMPTED",
            GONE,
        ] {
            assert!(is_finished(s), "{s}");
        }
    }

    #[test]
    fn an_unreachable_controller_is_retryable_a_bad_job_is_not() {
        assert!(is_transient_refusal(
            "sbatch: exit code 1: sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"
        ));
        assert!(!is_transient_refusal(
            "sbatch: exit code 1: sbatch: error: Batch job submission failed: Invalid partition name specified"
        ));
    }

    #[test]
    fn classification_of_jobs_without_a_status_file() {
        assert!(matches!(
            classify("1", &st("OUT_OF_MEMORY"), ""),
            End::Memory(_)
        ));
        let killed = "slurmstepd-vm: error: StepId=24.batch exceeded memory limit (146333696 > 104857600), being killed";
        assert!(matches!(
            classify("1", &st("FAILED"), killed),
            End::Memory(_)
        ));
        assert!(matches!(classify("1", &st("TIMEOUT"), ""), End::Timeout(_)));
        assert!(matches!(
            classify("1", &st("CANCELLED"), ""),
            End::Cancelled(_)
        ));
        for s in [
            "NODE_FAIL",
            "PREEMPTED",
            "BOOT_FAIL",
            "FAILED",
            "COMPLETED",
            GONE,
        ] {
            assert!(matches!(classify("1", &st(s), ""), End::Lost(_)), "{s}");
        }
    }
}
