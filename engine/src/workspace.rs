//! Where `pipe` keeps things inside a project: one place that knows every path.
//!
//! `state/` (run, stage, metrics, progress JSON and logs), `cache/` (stat cache), `locks/` (the
//! workspace lock), and per stage a marker `<outputDir>/.<stage>.done` and a staging folder
//! `<outputDir>/.pipe-staging/` on the same filesystem as the outputs, so publishing is a rename.

use std::path::{Path, PathBuf};

use crate::spec::Spec;

/// Name of the staging folder inside each output folder.
pub const STAGING_DIR: &str = ".pipe-staging";

/// The paths of one project.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
}

impl Workspace {
    pub fn new(spec: &Spec) -> Workspace {
        Workspace {
            root: spec.root.clone(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    pub fn logs_dir(&self, run_id: &str) -> PathBuf {
        self.state_dir().join("logs").join(run_id)
    }

    pub fn run_file(&self, run_id: &str) -> PathBuf {
        self.state_dir().join(format!("run_{run_id}.json"))
    }

    pub fn metrics_file(&self, run_id: &str) -> PathBuf {
        self.state_dir().join(format!("metrics_{run_id}.json"))
    }

    /// The run's metrics in the Prometheus text format, beside the JSON.
    pub fn metrics_prom_file(&self, run_id: &str) -> PathBuf {
        self.state_dir().join(format!("metrics_{run_id}.prom"))
    }

    /// The structured event log of a run (JSON lines).
    pub fn run_log_file(&self, run_id: &str) -> PathBuf {
        self.state_dir()
            .join("logs")
            .join(format!("run_{run_id}.jsonl"))
    }

    pub fn stage_file(&self, stage: &str) -> PathBuf {
        self.state_dir().join(format!("stage_{stage}.json"))
    }

    pub fn progress_file(&self, stage: &str) -> PathBuf {
        self.state_dir().join(format!("progress_{stage}.json"))
    }

    /// The Slurm jobs of the running build (job id → run id).
    pub fn slurm_jobs_file(&self) -> PathBuf {
        self.state_dir().join("slurm_jobs.json")
    }

    /// Processors started and ended by the running build (append-only, see [`crate::processes`]).
    pub fn processes_log_file(&self) -> PathBuf {
        self.state_dir().join("processes.jsonl")
    }

    /// The whole-file process map of earlier versions: read (and removed) by the next build.
    pub fn processes_file(&self) -> PathBuf {
        self.state_dir().join("processes.json")
    }

    pub fn stat_cache_file(&self) -> PathBuf {
        self.cache_dir().join("stat-v2.bin")
    }

    /// The stat cache's earlier form (JSON): read when there is no `stat-v2.bin` yet.
    pub fn legacy_stat_cache_file(&self) -> PathBuf {
        self.cache_dir().join("stat-v1.json")
    }

    /// The workspace's stat cache (from its earlier form when that is all there is).
    pub fn load_stat_cache(&self) -> crate::hashing::StatCache {
        crate::hashing::StatCache::load_or_migrate(
            &self.stat_cache_file(),
            &self.legacy_stat_cache_file(),
        )
    }

    /// Verdicts of unchanged stages and the stats they rest on (see [`crate::memo`]).
    pub fn skip_memo_file(&self) -> PathBuf {
        self.cache_dir().join("skip-v1.json")
    }

    pub fn output_dir(&self, output_dir: &str) -> PathBuf {
        self.root.join(output_dir)
    }

    pub fn marker_file(&self, output_dir: &str, stage: &str) -> PathBuf {
        self.output_dir(output_dir).join(marker_name(stage))
    }

    pub fn staging_dir(&self, output_dir: &str) -> PathBuf {
        self.output_dir(output_dir).join(STAGING_DIR)
    }

    /// Where `stage` publishes (staging, output folder, marker, journal, progress).
    pub fn publish_target(&self, stage: &crate::spec::Stage) -> crate::publish::Target {
        crate::publish::Target {
            stage: stage.name.clone(),
            staging: self.staging_dir(&stage.output_dir),
            output_dir: self.output_dir(&stage.output_dir),
            marker: self.marker_file(&stage.output_dir, &stage.name),
            journal: self
                .output_dir(&stage.output_dir)
                .join(journal_name(&stage.name)),
            progress: self.progress_file(&stage.name),
        }
    }

    /// `path` relative to the root, `/`-separated (paths outside the root are returned whole).
    pub fn relative(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// The marker's file name for `stage`.
pub fn marker_name(stage: &str) -> String {
    format!(".{stage}.done")
}

/// The publish journal's file name for `stage`.
pub fn journal_name(stage: &str) -> String {
    format!(".{stage}.publishing")
}

/// Whether a file name is one of pipe's own (a marker, a publish journal, a staging folder, or a
/// temporary file of an atomic write): never an input.
pub fn is_pipe_internal(name: &str) -> bool {
    let hidden_with = |suffix: &str| {
        name.starts_with('.') && name.ends_with(suffix) && name.len() > suffix.len() + 1
    };
    name == STAGING_DIR
        || hidden_with(".done")
        || hidden_with(".publishing")
        || crate::atomic::is_temporary(name)
}

impl Workspace {
    /// Removes the temporaries of atomic writes interrupted by a crash (in `state/`, `locks/`,
    /// `cache/` and the given output folders). Only under the workspace lock.
    pub fn sweep_temporaries<'a>(
        &self,
        output_dirs: impl IntoIterator<Item = &'a str>,
    ) -> std::io::Result<usize> {
        let mut removed = crate::atomic::sweep_temporaries(&self.state_dir(), true)?;
        removed += crate::atomic::sweep_temporaries(&self.locks_dir(), false)?;
        removed += crate::atomic::sweep_temporaries(&self.cache_dir(), false)?;
        for dir in crate::store::Store::new(&self.cache_dir()).temporary_dirs() {
            removed += crate::atomic::sweep_temporaries(dir, false)?;
        }
        for dir in output_dirs {
            removed += crate::atomic::sweep_temporaries(&self.output_dir(dir), false)?;
        }
        Ok(removed)
    }
}
