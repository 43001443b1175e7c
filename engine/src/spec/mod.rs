//! The Pipefile: loading, validation, and the checked [`Spec`] the rest of the engine uses.
//!
//! Two stages, as in ripgrep's argument handling: [`raw`] types mirror the JSON, and
//! [`validate`] turns them into a [`Spec`] whose values are all known good (names usable as file
//! names, paths normalised and inside the project, processors that exist, quotas that fit the
//! machine). Nothing downstream ever sees an unvalidated value. Every error points at the
//! offending JSON value (see [`error::SpecError`]); loading writes nothing.

pub mod error;
pub mod locate;
pub mod raw;
pub mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pipe_processors::checkpoint::Cadence;
use serde_json::{Map, Value};

pub use error::{LoadError, SpecError};

/// A validated pipeline.
#[derive(Debug)]
pub struct Spec {
    /// The Pipefile path as the user gave it (for messages).
    pub file: String,
    /// Absolute folder of the Pipefile: every path in the spec is relative to it.
    pub root: PathBuf,
    pub quotas: Quotas,
    pub stages: Vec<Stage>,
    /// `settings.executor`: where stages run unless `--executor` says otherwise.
    pub executor: Executor,
    /// `settings.slurm`.
    pub slurm: SlurmSettings,
    text: Arc<String>,
    locator: locate::Locator,
    /// The stages' output folders, indexed (validation builds it; the graph's edges use it).
    outputs: PathIndex,
}

/// Where stages and map items run.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// Child processes of `pipe` on this machine.
    #[default]
    Local,
    /// Slurm batch jobs (see docs/slurm.md).
    Slurm,
}

/// Validated `settings.slurm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub extra_args: Vec<String>,
    pub poll_interval_ms: u64,
    pub max_jobs_in_flight: u32,
    pub items_per_job: Option<u32>,
}

impl Default for SlurmSettings {
    fn default() -> Self {
        SlurmSettings {
            partition: None,
            account: None,
            extra_args: Vec::new(),
            poll_interval_ms: 1000,
            max_jobs_in_flight: 8,
            items_per_job: None,
        }
    }
}

/// Resources of the whole build.
#[derive(Debug, Clone, PartialEq)]
pub struct Quotas {
    pub cpus: u32,
    pub memory_mb: Option<u64>,
    pub io: u32,
}

/// One validated stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub processor: Processor,
    pub inputs: Vec<Input>,
    /// Normalised path of the output folder, relative to the root, `/`-separated.
    pub output_dir: String,
    /// Shared by every stage whose params are the same (a generated Pipefile of 100,000 stages
    /// often has one set of params: 63 MB as separate maps).
    pub params: Arc<Map<String, Value>>,
    pub after: Vec<String>,
    pub retry: RetryPolicy,
    pub resources: Resources,
    pub cadence: Cadence,
    pub description: Option<String>,
    /// A map stage (`"foreach": "file"`): one processor run per input file.
    pub map: bool,
    /// The processor may read only its declared inputs, processor files and system locations.
    pub hermetic: bool,
    /// Opt-outs of the offline guard's static scan.
    pub offline: Offline,
    /// Extra paths the sandbox lets the processor read or write (absolute).
    pub sandbox: SandboxPaths,
}

/// `offline` of a stage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offline {
    /// Static-scan rule ids this stage is allowed to match (recorded, not an error).
    pub allow_static_findings: Vec<String>,
}

/// `sandbox` of a stage (merged with the settings').
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxPaths {
    pub readable: Vec<PathBuf>,
    pub writable: Vec<PathBuf>,
    /// Variables passed through besides the allowlist.
    pub pass_env: Vec<String>,
}

/// What runs a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Processor {
    Builtin {
        name: String,
        /// The built-in's own implementation version.
        implementation: String,
        version: String,
    },
    Command {
        argv: Vec<String>,
        version: String,
        /// Project files the processor depends on (argv elements that name files, plus
        /// `processor.files`), normalised relative paths, sorted.
        files: Vec<String>,
    },
}

/// One declared input.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A file or a folder (every regular file below it), normalised relative path.
    Path(String),
    /// A glob; `base` is its longest literal folder prefix.
    Glob { pattern: String, base: String },
}

impl Input {
    /// The folder (or file) this input reads from, relative to the root.
    pub fn base(&self) -> &str {
        match self {
            Input::Path(p) => p,
            Input::Glob { base, .. } => base,
        }
    }
}

/// How failed attempts are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    pub multiplier: f64,
    pub jitter: raw::RawJitter,
    pub retryable_exit_codes: Vec<i32>,
    pub retry_on_timeout: bool,
    pub timeout: Option<Duration>,
}

/// A stage's resource needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub cpus: u32,
    pub memory_mb: Option<u64>,
    pub virtual_memory_mb: Option<u64>,
    pub io: u32,
}

impl Spec {
    /// Reads and validates the Pipefile at `file`.
    pub fn load(file: &Path) -> Result<Spec, LoadError> {
        Spec::load_read(file, std::fs::read(file))
    }

    /// [`Spec::load`] of what reading `file` gave (read earlier by the caller).
    pub fn load_read(file: &Path, read: std::io::Result<Vec<u8>>) -> Result<Spec, LoadError> {
        let shown = file.display().to_string();
        let text = read
            .and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "stream did not contain valid UTF-8",
                    )
                })
            })
            .map_err(|source| LoadError::Read {
                path: shown.clone(),
                source,
            })?;
        let absolute = std::path::absolute(file).map_err(|source| LoadError::Read {
            path: shown.clone(),
            source,
        })?;
        let root = absolute
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        validate::validate(shown, root, Arc::new(text))
    }

    /// Builds a located error for the value at JSON `pointer`.
    pub fn error_at(
        &self,
        pointer: &str,
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
    ) -> SpecError {
        SpecError::new(
            &self.file,
            &self.text,
            self.locator.value(pointer),
            message,
            label,
            help,
        )
    }

    /// The index of the stage called `name`.
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Absolute path of a root-relative path.
    pub fn path(&self, relative: &str) -> PathBuf {
        if relative.is_empty() {
            self.root.clone()
        } else {
            self.root.join(relative)
        }
    }

    /// The stages' output folders, indexed by stage index for overlap queries.
    pub fn output_index(&self) -> &PathIndex {
        &self.outputs
    }

    /// The stages' output folders, by stage index.
    pub fn output_dirs(&self) -> BTreeMap<usize, &str> {
        self.stages
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.output_dir.as_str()))
            .collect()
    }
}

/// Whether root-relative path `inner` is `outer` or lies below it.
pub fn is_within(inner: &str, outer: &str) -> bool {
    outer.is_empty()
        || inner == outer
        || (inner.starts_with(outer) && inner.as_bytes().get(outer.len()) == Some(&b'/'))
}

/// Whether two root-relative paths overlap (one is within the other).
pub fn overlaps(a: &str, b: &str) -> bool {
    is_within(a, b) || is_within(b, a)
}

/// Root-relative paths (stages' output folders) indexed for "which of them overlap this path?"
/// in O(depth) hash lookups, so that validation and graph compilation stay linear in the number
/// of stages instead of comparing every pair (10,000 stages: 10⁸ comparisons).
#[derive(Debug, Default)]
pub struct PathIndex {
    by_path: HashMap<String, Vec<usize>>,
    /// Every proper ancestor (at `/` boundaries) of an indexed path: only a path listed here can
    /// have indexed paths below it, so only then is [`PathIndex::sorted`] searched.
    parents: HashSet<String>,
    /// The indexed paths, sorted (byte order), for the range of paths below a parent.
    sorted: Vec<String>,
}

impl PathIndex {
    /// Indexes `paths` (id, path); empty paths are left out.
    pub fn new<'a>(paths: impl IntoIterator<Item = (usize, &'a str)>) -> PathIndex {
        let mut by_path: HashMap<String, Vec<usize>> = HashMap::new();
        let mut parents = HashSet::new();
        for (id, path) in paths {
            if path.is_empty() {
                continue;
            }
            match by_path.get_mut(path) {
                Some(ids) => ids.push(id),
                None => {
                    by_path.insert(path.to_string(), vec![id]);
                    for (end, _) in path.match_indices('/') {
                        if !parents.contains(&path[..end]) {
                            parents.insert(path[..end].to_string());
                        }
                    }
                }
            }
        }
        let mut sorted: Vec<String> = by_path.keys().cloned().collect();
        sorted.sort_unstable();
        PathIndex {
            by_path,
            parents,
            sorted,
        }
    }

    /// The ids of the indexed paths that [`overlaps`] `path`, ascending. An empty `path` (the
    /// project folder) overlaps every indexed path.
    pub fn overlapping(&self, path: &str) -> Vec<usize> {
        let mut ids = Vec::new();
        if path.is_empty() {
            ids.extend(self.by_path.values().flatten().copied());
        } else {
            // Indexed paths that contain `path` (or equal it): its ancestors at `/` boundaries.
            for (end, _) in path.match_indices('/') {
                if let Some(found) = self.by_path.get(&path[..end]) {
                    ids.extend(found);
                }
            }
            if let Some(found) = self.by_path.get(path) {
                ids.extend(found);
            }
            // Indexed paths below `path`: the sorted keys in [path + "/", path + "0"), since `0`
            // follows `/` in byte order.
            if self.parents.contains(path) {
                let (low, high) = (format!("{path}/"), format!("{path}0"));
                let start = self.sorted.partition_point(|k| *k < low);
                let end = self.sorted.partition_point(|k| *k < high);
                for key in &self.sorted[start..end] {
                    ids.extend(&self.by_path[key]);
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Paths over a tiny alphabet, so that prefixes, equal paths and near-misses (`a` vs `a0`,
    /// `a` vs `a.b`) are common.
    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "a0", "a.b", "a-"]),
            0..4,
        )
        .prop_map(|parts| parts.join("/"))
    }

    proptest! {
        #[test]
        fn path_index_finds_exactly_the_overlapping_paths(
            indexed in prop::collection::vec(path(), 0..12),
            query in path(),
        ) {
            let index = PathIndex::new(indexed.iter().enumerate().map(|(i, p)| (i, p.as_str())));
            let expected: Vec<usize> = indexed
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.is_empty() && overlaps(&query, p))
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(index.overlapping(&query), expected);
        }
    }
}
