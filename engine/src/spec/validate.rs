//! Turns a parsed [`RawPipefile`] into a checked [`Spec`], collecting every problem it finds.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pipe_processors::builtins;
use pipe_processors::checkpoint::Cadence;

use super::locate::{offset_of, Locator};
use super::raw::{
    RawCheckpoint, RawExecutor, RawJitter, RawPipefile, RawProcessor, RawRetry, RawSlurm, RawStage,
};
use super::{
    overlaps, Executor, Input, LoadError, PathIndex, Processor, Quotas, Resources, RetryPolicy,
    SlurmSettings, Spec, SpecError, Stage,
};

mod offline;

/// Folders `pipe` keeps its own files in; no stage may read or own them.
pub const RESERVED_DIRS: &[&str] = &["state", "cache", "locks"];

/// Validates `text` (the Pipefile `file`, whose folder is `root`).
pub fn validate(file: String, root: PathBuf, text: Arc<String>) -> Result<Spec, LoadError> {
    let mut raw: RawPipefile = match serde_json::from_str(&text) {
        Ok(raw) => raw,
        Err(err) => {
            return Err(LoadError::Invalid {
                errors: vec![serde_error(&file, &text, &err)],
            })
        }
    };
    let locator = Locator::new(text.clone());
    let on_disk = OnDisk::prefetch(&root, &raw.stages);
    let mut v = Validator {
        errors: Vec::new(),
        file: &file,
        locator: &locator,
        text: &text,
        on_disk: &on_disk,
        root: &root,
    };
    if raw.version != 1 {
        v.error(
            "/version",
            format!("unsupported Pipefile version {}", raw.version),
            "only version 1 exists",
            None,
        );
    }
    let quotas = v.quotas(&raw);
    let executor = match raw.settings.executor {
        Some(RawExecutor::Slurm) => Executor::Slurm,
        _ => Executor::Local,
    };
    let slurm = v.slurm(raw.settings.slurm.as_ref());
    let settings_cadence = raw
        .settings
        .checkpoint
        .as_ref()
        .map(|c| v.cadence(c, "/settings/checkpoint"));
    let settings_retry = raw.settings.retry.clone().unwrap_or_default();
    if let Some(retry) = &raw.settings.retry {
        v.retry(&merge_retry(retry, &RawRetry::default()), "/settings/retry");
    }
    // Each stage on its own, on all cores; its errors are reported in stage order, as if the
    // stages were checked one after the other.
    use rayon::prelude::*;
    // Fields the checked stage keeps (name, params, after, description) are moved out of the
    // raw stage, not copied: at 10,000 stages the params maps alone are 6 MB.
    let (mut stages, errors): (Vec<Stage>, Vec<Vec<SpecError>>) = raw
        .stages
        .par_iter_mut()
        .enumerate()
        .with_min_len(256)
        .map(|(i, stage)| {
            let mut one = Validator {
                errors: Vec::new(),
                ..v
            };
            let mut validated = one.stage(
                i,
                stage,
                &quotas,
                &settings_retry,
                settings_cadence.unwrap_or_default(),
            );
            one.offline_fields(i, stage, &raw.settings, &mut validated);
            (validated, one.errors)
        })
        .unzip();
    v.errors.extend(errors.into_iter().flatten());
    share_params(&mut stages);
    let outputs = PathIndex::new(
        stages
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.output_dir.as_str())),
    );
    v.stage_relations(&stages, &outputs);
    if raw.stages.is_empty() {
        v.error(
            "/stages",
            "the pipeline has no stages",
            "empty",
            Some("add at least one stage".into()),
        );
    }
    if !v.errors.is_empty() {
        return Err(LoadError::Invalid { errors: v.errors });
    }
    drop(v);
    Ok(Spec {
        file,
        root,
        quotas,
        stages,
        executor,
        slurm,
        text,
        locator,
        outputs,
    })
}

/// Makes stages with equal params share one map (their serialisation is canonical: a map's keys
/// are sorted, so equal maps serialise alike and different maps differently).
fn share_params(stages: &mut [Stage]) {
    let mut shared: HashMap<String, Arc<serde_json::Map<String, serde_json::Value>>> =
        HashMap::new();
    let mut previous: Option<Arc<serde_json::Map<String, serde_json::Value>>> = None;
    for stage in stages {
        // Neighbours usually agree: one comparison instead of a serialisation.
        if let Some(previous) = previous.as_ref().filter(|p| **p == stage.params) {
            stage.params = previous.clone();
            continue;
        }
        let key = serde_json::to_string(&*stage.params).expect("a JSON map serialises");
        stage.params = shared
            .entry(key)
            .or_insert_with(|| stage.params.clone())
            .clone();
        previous = Some(stage.params.clone());
    }
}

/// A serde error, located where serde_json detected it.
fn serde_error(file: &str, text: &Arc<String>, err: &serde_json::Error) -> SpecError {
    let offset = offset_of(text, err.line(), err.column());
    let full = err.to_string();
    let message = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m)
        .to_string();
    let (label, help) = match err.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => (
            "not valid JSON here",
            Some("a Pipefile is strict JSON: no comments, no trailing commas".to_string()),
        ),
        _ => (
            "here",
            Some("see `pipe schema` for every field and its type".to_string()),
        ),
    };
    let start = offset.saturating_sub(1).min(text.len());
    let mut range = (start, offset.max(start));
    // serde_json reports an unknown field after its key: point at the key itself.
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next())
    {
        let quoted = format!("\"{field}\"");
        if let Some(at) = text[..(offset + 2).min(text.len())].rfind(&quoted) {
            range = (at, at + quoted.len());
        }
    }
    SpecError::new(file, text, range, message, label, help)
}

struct Validator<'a> {
    errors: Vec<SpecError>,
    file: &'a str,
    text: &'a Arc<String>,
    locator: &'a Locator,
    root: &'a std::path::Path,
    on_disk: &'a OnDisk,
}

/// What exists at the output folders and input paths a Pipefile names (a 10,000-stage Pipefile
/// names 20,000 of them), found up front: root-relative path → `Some(is_dir)`, or `None` when
/// nothing is there.
#[derive(Default)]
struct OnDisk(HashMap<String, Option<bool>>);

/// A folder holding at least this many of the paths is listed once rather than each path in it
/// stat'ed (a `stat` walks the path; a listing costs about as much as a few stats).
const LIST_AT_LEAST: usize = 32;

impl OnDisk {
    fn prefetch(root: &std::path::Path, stages: &[RawStage]) -> OnDisk {
        let mut paths: Vec<String> = Vec::new();
        for stage in stages {
            paths.extend(normalize(&stage.output_dir).ok());
            paths.extend(
                stage
                    .inputs
                    .iter()
                    .filter_map(|i| parse_input(i).ok())
                    .map(|i| i.base().to_string()),
            );
        }
        OnDisk::of(root, paths)
    }

    /// The kinds of `paths` (root-relative): what the listing of a folder holding many of them
    /// shows, and a `stat` on all cores for the rest.
    fn of(root: &std::path::Path, mut paths: Vec<String>) -> OnDisk {
        use rayon::prelude::*;
        use rustix::fs::{AtFlags, FileType, Mode, OFlags};
        paths.retain(|p| !p.is_empty());
        paths.sort_unstable();
        paths.dedup();
        // Relative to the project folder, opened once: no walk over its ancestors per path.
        let dir = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok();
        let mut found = match &dir {
            Some(dir) => listed(dir, &paths),
            None => HashMap::new(),
        };
        paths.retain(|p| !found.contains_key(p));
        found.par_extend(paths.into_par_iter().with_min_len(256).map(|rel| {
            let kind = match &dir {
                Some(dir) => rustix::fs::statat(dir, rel.as_str(), AtFlags::empty())
                    .ok()
                    .map(|st| FileType::from_raw_mode(st.st_mode).is_dir()),
                None => std::fs::metadata(root.join(&rel)).ok().map(|m| m.is_dir()),
            };
            (rel, kind)
        }));
        OnDisk(found)
    }

    /// `Some(is_dir)` when something exists at `rel` (following symlinks).
    fn kind(&self, root: &std::path::Path, rel: &str) -> Option<bool> {
        match self.0.get(rel) {
            Some(kind) => *kind,
            None => std::fs::metadata(root.join(rel)).ok().map(|m| m.is_dir()),
        }
    }
}

/// The kinds of those of `paths` (root-relative, under the folder `root`) that the listing of
/// their parent folder answers exactly as a `stat` would: only folders holding at least
/// [`LIST_AT_LEAST`] of them are listed, and only entries the listing gives a type for that is
/// not a symlink count. A name not listed (absent, or spelled otherwise on a case-insensitive
/// folder), a symlink, an unknown type, a folder that cannot be searched or read: left to `stat`.
fn listed(root: &std::os::fd::OwnedFd, paths: &[String]) -> HashMap<String, Option<bool>> {
    use rayon::prelude::*;
    let mut by_parent: HashMap<&str, Vec<&str>> = HashMap::new();
    for path in paths {
        let parent = path.rsplit_once('/').map_or("", |(parent, _)| parent);
        by_parent.entry(parent).or_default().push(path);
    }
    by_parent
        .into_par_iter()
        .filter(|(_, paths)| paths.len() >= LIST_AT_LEAST)
        .flat_map_iter(|(parent, paths)| list_folder(root, parent, &paths))
        .collect()
}

/// [`listed`] for the `paths` in folder `parent`.
fn list_folder(
    root: &std::os::fd::OwnedFd,
    parent: &str,
    paths: &[&str],
) -> Vec<(String, Option<bool>)> {
    use rustix::fs::{Access, AtFlags, Dir, FileType, Mode, OFlags};
    let mut found = Vec::new();
    let rel = if parent.is_empty() { "." } else { parent };
    // A stat below the folder needs search permission on it (a listing needs read).
    if rustix::fs::accessat(root, rel, Access::EXEC_OK, AtFlags::EACCESS).is_err() {
        return found;
    }
    let Ok(fd) = rustix::fs::openat(
        root,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return found;
    };
    let Ok(entries) = Dir::new(fd) else {
        return found;
    };
    let names: HashMap<&[u8], &str> = paths
        .iter()
        .map(|path| {
            let name = path.rsplit_once('/').map_or(*path, |(_, name)| name);
            (name.as_bytes(), *path)
        })
        .collect();
    // A folder far larger than what is asked of it is not read to the end: the names not seen
    // by then are stat'ed.
    for entry in entries.take(4 * names.len() + 256) {
        let Ok(entry) = entry else { break };
        let Some(&path) = names.get(entry.file_name().to_bytes()) else {
            continue;
        };
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Symlink | FileType::Unknown => continue,
            _ => false,
        };
        found.push((path.to_string(), Some(is_dir)));
    }
    found
}

impl Validator<'_> {
    fn error(
        &mut self,
        pointer: &str,
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
    ) {
        let range = self.locator.value(pointer);
        self.errors.push(SpecError::new(
            self.file, self.text, range, message, label, help,
        ));
    }

    fn key_error(
        &mut self,
        pointer: &str,
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
    ) {
        let range = self.locator.key(pointer);
        self.errors.push(SpecError::new(
            self.file, self.text, range, message, label, help,
        ));
    }

    fn quotas(&mut self, raw: &RawPipefile) -> Quotas {
        let machine_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let q = raw.settings.quotas.clone().unwrap_or_default();
        let cpus = q.cpus.unwrap_or(machine_cpus);
        if cpus == 0 || cpus > machine_cpus {
            self.error(
                "/settings/quotas/cpus",
                format!("CPU quota {cpus} does not fit this machine"),
                format!("must be between 1 and {machine_cpus}"),
                Some(format!(
                    "this machine has {machine_cpus} CPU cores; omit `cpus` to use all of them"
                )),
            );
        }
        if let Some(memory) = q.memory_mb {
            let machine = machine_memory_mb();
            if memory == 0 || machine.is_some_and(|m| memory > m) {
                self.error(
                    "/settings/quotas/memoryMb",
                    format!("memory quota {memory} MiB does not fit this machine"),
                    match machine {
                        Some(m) => format!("must be between 1 and {m}"),
                        None => "must be at least 1".to_string(),
                    },
                    Some("omit `memoryMb` for no memory quota".into()),
                );
            }
        }
        let io = q.io.unwrap_or(2);
        if io == 0 {
            self.error(
                "/settings/quotas/io",
                "IO quota 0 would never admit an IO stage",
                "must be at least 1",
                None,
            );
        }
        Quotas {
            cpus: cpus.max(1),
            memory_mb: q.memory_mb,
            io: io.max(1),
        }
    }

    fn slurm(&mut self, raw: Option<&RawSlurm>) -> SlurmSettings {
        let mut settings = SlurmSettings::default();
        let Some(raw) = raw else {
            return settings;
        };
        for (field, value) in [("partition", &raw.partition), ("account", &raw.account)] {
            if let Some(value) = value {
                if value.is_empty() || value.starts_with('-') || value.contains(char::is_whitespace)
                {
                    self.error(
                        &format!("/settings/slurm/{field}"),
                        format!("`{field}` `{value}` is not a Slurm {field} name"),
                        "a name without spaces, not starting with `-`",
                        None,
                    );
                }
            }
        }
        for (i, arg) in raw.extra_args.iter().enumerate() {
            if !arg.starts_with('-') {
                self.error(
                    &format!("/settings/slurm/extraArgs/{i}"),
                    format!("`{arg}` is not an sbatch option"),
                    "each element is one option, starting with `-`",
                    Some("write an option and its value as one element: \"--qos=normal\"".into()),
                );
            }
        }
        if let Some(ms) = raw.poll_interval_ms {
            if ms < 100 {
                self.error(
                    "/settings/slurm/pollIntervalMs",
                    format!("poll interval {ms} ms is too short"),
                    "must be at least 100",
                    Some("polling the Slurm controller faster only loads it".into()),
                );
            }
            settings.poll_interval_ms = ms.max(100);
        }
        if let Some(n) = raw.max_jobs_in_flight {
            if n == 0 {
                self.error(
                    "/settings/slurm/maxJobsInFlight",
                    "`maxJobsInFlight` 0 would never submit a job",
                    "must be at least 1",
                    None,
                );
            }
            settings.max_jobs_in_flight = n.max(1);
        }
        if let Some(n) = raw.items_per_job {
            if n == 0 {
                self.error(
                    "/settings/slurm/itemsPerJob",
                    "`itemsPerJob` must be at least 1",
                    "0",
                    None,
                );
            }
            settings.items_per_job = Some(n.max(1));
        }
        settings.partition = raw.partition.clone();
        settings.account = raw.account.clone();
        settings.extra_args = raw.extra_args.clone();
        settings
    }

    fn cadence(&mut self, raw: &RawCheckpoint, pointer: &str) -> Cadence {
        if raw.every_lines == Some(0) {
            self.error(
                &format!("{pointer}/everyLines"),
                "`everyLines` must be at least 1",
                "0",
                None,
            );
        }
        if raw.every_bytes == Some(0) {
            self.error(
                &format!("{pointer}/everyBytes"),
                "`everyBytes` must be at least 1",
                "0",
                None,
            );
        }
        if let Some(s) = raw.every_seconds {
            if !(s.is_finite() && s > 0.0) {
                self.error(
                    &format!("{pointer}/everySeconds"),
                    "`everySeconds` must be a positive number",
                    "here",
                    None,
                );
            }
        }
        if raw.every_lines.is_none() && raw.every_bytes.is_none() && raw.every_seconds.is_none() {
            return Cadence::default();
        }
        Cadence {
            every_lines: raw.every_lines,
            every_bytes: raw.every_bytes,
            every_seconds: raw.every_seconds,
        }
    }

    fn retry(&mut self, r: &RetryPolicy, pointer: &str) {
        if r.max_attempts == 0 {
            self.error(
                &format!("{pointer}/maxAttempts"),
                "`maxAttempts` must be at least 1 (the first attempt counts)",
                "0",
                None,
            );
        }
        if r.base_delay_ms > r.max_delay_ms {
            self.error(
                &format!("{pointer}/baseDelayMs"),
                format!(
                    "`baseDelayMs` ({}) is larger than `maxDelayMs` ({})",
                    r.base_delay_ms, r.max_delay_ms
                ),
                "larger than maxDelayMs",
                None,
            );
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            self.error(
                &format!("{pointer}/multiplier"),
                "`multiplier` must be a number ≥ 1",
                "here",
                None,
            );
        }
        if let Some(t) = r.timeout {
            if t.is_zero() {
                self.error(
                    &format!("{pointer}/timeoutSec"),
                    "`timeoutSec` must be positive",
                    "here",
                    None,
                );
            }
        }
    }

    fn stage(
        &mut self,
        i: usize,
        raw: &mut RawStage,
        quotas: &Quotas,
        settings_retry: &RawRetry,
        settings_cadence: Cadence,
    ) -> Stage {
        let at = |field: &str| format!("/stages/{i}/{field}");
        if !valid_stage_name(&raw.name) {
            self.error(
                &at("name"),
                if raw.name.is_empty() { "a stage name must not be empty".to_string() } else { format!("stage name `{}` cannot be used as a file name", raw.name) },
                "invalid stage name",
                Some("use 1 to 100 letters, digits, `_`, `-` or `.`, starting with a letter or digit".into()),
            );
        }
        let processor = self.processor(i, &raw.processor);
        let params = raw.params.take().unwrap_or_default();
        if let Processor::Builtin { name, .. } = &processor {
            if let Err(err) = builtins::validate_params(name, &params) {
                let pointer = at(&format!("params/{}", err.key));
                if err.unknown_key {
                    self.key_error(&pointer, err.message, "unknown param", None);
                } else {
                    self.error(&pointer, err.message, "invalid value", None);
                }
            }
        }
        let output_dir = match normalize(&raw.output_dir) {
            Ok(p) if p.is_empty() => {
                self.error(
                    &at("outputDir"),
                    "the output folder cannot be the project folder itself",
                    "project root",
                    Some("use a sub-folder such as `output`".into()),
                );
                p
            }
            Ok(p) => {
                if self.on_disk.kind(self.root, &p) == Some(false) {
                    self.error(
                        &at("outputDir"),
                        format!("the output folder `{p}` exists and is not a folder"),
                        "not a folder",
                        Some("move the file away or choose another output folder; pipe never overwrites it".into()),
                    );
                }
                if let Some(r) = RESERVED_DIRS.iter().find(|r| overlaps(&p, r)) {
                    self.error(
                        &at("outputDir"),
                        format!(
                            "the output folder overlaps `{r}/`, which pipe keeps its own files in"
                        ),
                        "reserved folder",
                        None,
                    );
                }
                p
            }
            Err(why) => {
                self.error(
                    &at("outputDir"),
                    format!("invalid output folder `{}`: {why}", raw.output_dir),
                    "here",
                    None,
                );
                String::new()
            }
        };
        let mut inputs = Vec::new();
        if raw.inputs.is_empty() {
            self.error(
                &at("inputs"),
                format!("stage `{}` has no inputs", raw.name),
                "empty",
                Some("list at least one file, folder or glob".into()),
            );
        }
        for (j, input) in raw.inputs.iter().enumerate() {
            match parse_input(input) {
                Ok(parsed) => {
                    if parsed.base().is_empty() && matches!(parsed, Input::Path(_)) {
                        self.error(
                            &at(&format!("inputs/{j}")),
                            "an input cannot be the whole project folder",
                            "project root",
                            Some("name the folders the stage reads".into()),
                        );
                    } else if let Some(r) =
                        RESERVED_DIRS.iter().find(|r| overlaps(parsed.base(), r))
                    {
                        self.error(
                            &at(&format!("inputs/{j}")),
                            format!(
                                "an input cannot read `{r}/`, which pipe keeps its own files in"
                            ),
                            "reserved folder",
                            None,
                        );
                    }
                    inputs.push(parsed);
                }
                Err(why) => self.error(
                    &at(&format!("inputs/{j}")),
                    format!("invalid input `{input}`: {why}"),
                    "here",
                    None,
                ),
            }
        }
        let retry = merge_retry(
            raw.retry.as_deref().unwrap_or(&RawRetry::default()),
            settings_retry,
        );
        if raw.retry.is_some() {
            self.retry(&retry, &at("retry"));
        }
        let cadence = match &raw.checkpoint {
            Some(c) => self.cadence(c, &at("checkpoint")),
            None => settings_cadence,
        };
        let r = raw.resources.clone().unwrap_or_default();
        let resources = Resources {
            cpus: r.cpus.unwrap_or(1),
            memory_mb: r.memory_mb,
            virtual_memory_mb: r.virtual_memory_mb,
            io: r.io.unwrap_or(0),
        };
        if resources.cpus == 0 || resources.cpus > quotas.cpus {
            self.error(
                &at("resources/cpus"),
                format!(
                    "stage needs {} CPUs but the quota is {}: it could never run",
                    resources.cpus, quotas.cpus
                ),
                format!("must be between 1 and {}", quotas.cpus),
                None,
            );
        }
        if let (Some(need), Some(have)) = (resources.memory_mb, quotas.memory_mb) {
            if need > have {
                self.error(&at("resources/memoryMb"), format!("stage needs {need} MiB but the memory quota is {have} MiB: it could never run"), "larger than the quota", None);
            }
        }
        if resources.io > quotas.io {
            self.error(
                &at("resources/io"),
                format!(
                    "stage needs {} IO slots but the quota is {}: it could never run",
                    resources.io, quotas.io
                ),
                "larger than the quota",
                None,
            );
        }
        Stage {
            name: std::mem::take(&mut raw.name),
            processor,
            inputs,
            output_dir,
            params: Arc::new(params),
            after: std::mem::take(&mut raw.after),
            retry,
            resources,
            cadence,
            description: raw.description.take(),
            map: raw.foreach.is_some(),
            hermetic: false,
            offline: Default::default(),
            sandbox: Default::default(),
        }
    }

    fn processor(&mut self, i: usize, raw: &RawProcessor) -> Processor {
        let at = |field: &str| format!("/stages/{i}/processor{field}");
        if raw.version.trim().is_empty() {
            self.error(
                &at("/version"),
                "`processor.version` must not be empty",
                "empty",
                Some("any text; change it when the processor's behaviour changes".into()),
            );
        }
        match (&raw.builtin, &raw.command) {
            (Some(name), None) => {
                if !raw.files.is_empty() {
                    self.key_error(&at("/files"), "`files` is for external commands; a built-in is fingerprinted by its name and version", "not allowed with `builtin`", None);
                }
                match builtins::find(name) {
                    Some(b) => Processor::Builtin {
                        name: name.clone(),
                        implementation: b.implementation.to_string(),
                        version: raw.version.clone(),
                    },
                    None => {
                        let names: Vec<_> = builtins::BUILTINS
                            .iter()
                            .map(|b| format!("`{}`", b.name))
                            .collect();
                        self.error(
                            &at("/builtin"),
                            format!("unknown built-in processor `{name}`"),
                            "no such built-in",
                            Some(format!("built-ins: {}", names.join(", "))),
                        );
                        Processor::Builtin {
                            name: name.clone(),
                            implementation: String::new(),
                            version: raw.version.clone(),
                        }
                    }
                }
            }
            (None, Some(argv)) => {
                if argv.is_empty() || argv[0].is_empty() {
                    self.error(
                        &at("/command"),
                        "`command` must name a program",
                        "empty",
                        Some(
                            "for example [\"python3\", \"processors/python/stage_upper.py\"]"
                                .into(),
                        ),
                    );
                }
                let mut files = BTreeSet::new();
                for (j, arg) in argv.iter().enumerate() {
                    let names_file = j == 0 && arg.contains('/');
                    match processor_path(arg) {
                        Some(rel) if self.root.join(&rel).is_file() => {
                            files.insert(rel);
                        }
                        _ if names_file => self.error(
                            &at(&format!("/command/{j}")),
                            format!("processor program `{arg}` does not exist"),
                            "no such file",
                            Some("paths are relative to the Pipefile's folder".into()),
                        ),
                        _ => {}
                    }
                }
                for (j, file) in raw.files.iter().enumerate() {
                    match processor_path(file) {
                        Some(rel) if self.root.join(&rel).exists() => {
                            files.insert(rel);
                        }
                        _ => self.error(
                            &at(&format!("/files/{j}")),
                            format!("processor file `{file}` does not exist"),
                            "no such file",
                            Some("paths are relative to the Pipefile's folder".into()),
                        ),
                    }
                }
                Processor::Command {
                    argv: argv.clone(),
                    version: raw.version.clone(),
                    files: files.into_iter().collect(),
                }
            }
            (Some(_), Some(_)) => {
                self.error(
                    &at(""),
                    "a processor is either `builtin` or `command`, not both",
                    "both given",
                    None,
                );
                Processor::Builtin {
                    name: String::new(),
                    implementation: String::new(),
                    version: raw.version.clone(),
                }
            }
            (None, None) => {
                self.error(
                    &at(""),
                    "a processor needs `builtin` (a built-in's name) or `command` (an argv)",
                    "neither given",
                    Some("for example {\"builtin\": \"upper\", \"version\": \"1\"}".into()),
                );
                Processor::Builtin {
                    name: String::new(),
                    implementation: String::new(),
                    version: raw.version.clone(),
                }
            }
        }
    }

    /// Checks what involves several stages: unique names, disjoint outputs, `after` targets,
    /// inputs that exist or are produced.
    fn stage_relations(&mut self, stages: &[Stage], outputs: &PathIndex) {
        let mut first_by_name: HashMap<&str, usize> = HashMap::new();
        for (i, s) in stages.iter().enumerate() {
            if let Some(&j) = first_by_name.get(s.name.as_str()) {
                self.error(
                    &format!("/stages/{i}/name"),
                    format!("duplicate stage name `{}`", s.name),
                    "used again here",
                    Some(format!(
                        "stage {j} already has this name; names must be unique"
                    )),
                );
            } else {
                first_by_name.insert(&s.name, i);
            }
        }
        // Then each stage against the others, on all cores; errors in stage order.
        use rayon::prelude::*;
        let errors: Vec<Vec<SpecError>> = stages
            .par_iter()
            .enumerate()
            .with_min_len(256)
            .map(|(i, s)| {
                let mut one = Validator {
                    errors: Vec::new(),
                    ..*self
                };
                one.stage_against_others(i, s, stages, outputs, &first_by_name);
                one.errors
            })
            .collect();
        self.errors.extend(errors.into_iter().flatten());
    }

    /// Stage `i`'s output folder against the others', its `after` targets, and whether its
    /// inputs exist or are produced.
    fn stage_against_others(
        &mut self,
        i: usize,
        s: &Stage,
        stages: &[Stage],
        outputs: &PathIndex,
        first_by_name: &HashMap<&str, usize>,
    ) {
        let earlier = if s.output_dir.is_empty() {
            Vec::new()
        } else {
            outputs.overlapping(&s.output_dir)
        };
        for other in earlier
            .into_iter()
            .take_while(|&j| j < i)
            .map(|j| &stages[j])
        {
            if s.output_dir == other.output_dir {
                self.error(
                    &format!("/stages/{i}/outputDir"),
                    format!(
                        "stages `{}` and `{}` both own the output folder `{}`",
                        other.name, s.name, s.output_dir
                    ),
                    "owned by another stage",
                    Some("each stage needs an output folder of its own".into()),
                );
            } else {
                self.error(
                    &format!("/stages/{i}/outputDir"),
                    format!(
                        "output folder `{}` of `{}` overlaps `{}` of `{}`",
                        s.output_dir, s.name, other.output_dir, other.name
                    ),
                    "nested output folders",
                    Some("output folders must not contain one another".into()),
                );
            }
        }
        for (k, target) in stages[i].after.iter().enumerate() {
            if !first_by_name.contains_key(target.as_str()) {
                let names: Vec<_> = stages.iter().map(|s| format!("`{}`", s.name)).collect();
                self.error(
                    &format!("/stages/{i}/after/{k}"),
                    format!("`after` names unknown stage `{target}`"),
                    "no such stage",
                    Some(format!("stages: {}", names.join(", "))),
                );
            }
        }
        for (k, input) in s.inputs.iter().enumerate() {
            let base = input.base();
            if base.is_empty() {
                continue;
            }
            let produced = !outputs.overlapping(base).is_empty();
            if !produced && self.on_disk.kind(self.root, base).is_none() {
                self.error(
                    &format!("/stages/{i}/inputs/{k}"),
                    format!("input `{base}` does not exist and no stage produces it"),
                    "not found",
                    Some("paths are relative to the Pipefile's folder".into()),
                );
            }
        }
    }
}

/// Stage names become file names (`state/stage_<name>.json`): keep them portable.
pub fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 100
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Normalises a Pipefile path: relative, `/`-separated, no `.`, `..` resolved and never leaving
/// the project. The project folder itself normalises to "".
pub fn normalize(path: &str) -> Result<String, &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.starts_with('/') || path.contains('\\') && path.chars().nth(1) == Some(':') {
        return Err("paths must be relative to the Pipefile's folder");
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("the path leaves the project folder");
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Normalises a processor file path lexically. Unlike data paths, processor files may live outside
/// the project (a shared script folder, an absolute path): they are fingerprinted by content under
/// the path as written, so moving the project does not change their key. `None` for an empty path.
pub fn processor_path(path: &str) -> Option<String> {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            ".." if absolute => {}
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return None;
    }
    let joined = parts.join("/");
    Some(if absolute {
        format!("/{joined}")
    } else {
        joined
    })
}

/// Parses an input: a glob if it has glob syntax, else a path.
fn parse_input(input: &str) -> Result<Input, String> {
    if !input.contains(['*', '?', '[', '{']) {
        return normalize(input).map(Input::Path).map_err(String::from);
    }
    let pattern = normalize(input).map_err(String::from)?;
    globset::Glob::new(&pattern).map_err(|e| format!("bad glob: {}", e.kind()))?;
    let base: Vec<&str> = pattern
        .split('/')
        .take_while(|part| !part.contains(['*', '?', '[', '{']))
        .collect();
    Ok(Input::Glob {
        base: base.join("/"),
        pattern,
    })
}

fn merge_retry(stage: &RawRetry, settings: &RawRetry) -> RetryPolicy {
    RetryPolicy {
        max_attempts: stage.max_attempts.or(settings.max_attempts).unwrap_or(1),
        base_delay_ms: stage
            .base_delay_ms
            .or(settings.base_delay_ms)
            .unwrap_or(200),
        max_delay_ms: stage.max_delay_ms.or(settings.max_delay_ms).unwrap_or(5000),
        multiplier: stage.multiplier.or(settings.multiplier).unwrap_or(2.0),
        jitter: stage.jitter.or(settings.jitter).unwrap_or(RawJitter::Full),
        retryable_exit_codes: stage
            .retryable_exit_codes
            .clone()
            .or_else(|| settings.retryable_exit_codes.clone())
            .unwrap_or_else(|| vec![75]),
        retry_on_timeout: stage
            .retry_on_timeout
            .or(settings.retry_on_timeout)
            .unwrap_or(false),
        timeout: stage
            .timeout_sec
            .or(settings.timeout_sec)
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 1e9))),
    }
}

/// Total memory of the machine in MiB, from `/proc/meminfo`.
fn machine_memory_mb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::is_within;

    #[test]
    fn normalize_keeps_paths_inside_the_project() {
        assert_eq!(normalize("input").unwrap(), "input");
        assert_eq!(normalize("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize("a/../b").unwrap(), "b");
        assert_eq!(normalize(".").unwrap(), "");
        assert!(normalize("../x").is_err());
        assert!(normalize("/etc").is_err());
        assert!(normalize("").is_err());
    }

    #[test]
    fn processor_paths_may_leave_the_project() {
        assert_eq!(
            processor_path("./tools/p.py").as_deref(),
            Some("tools/p.py")
        );
        assert_eq!(
            processor_path("../../processors/python/p.py").as_deref(),
            Some("../../processors/python/p.py")
        );
        assert_eq!(processor_path("a/../../b").as_deref(), Some("../b"));
        assert_eq!(
            processor_path("/opt/x/../y.py").as_deref(),
            Some("/opt/y.py")
        );
        assert_eq!(processor_path("."), None);
    }

    #[test]
    fn stage_names_must_be_portable_file_names() {
        for ok in ["copy", "a", "Stage_2.v-1"] {
            assert!(valid_stage_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"x".repeat(101)] {
            assert!(!valid_stage_name(bad), "{bad}");
        }
    }

    #[test]
    fn globs_have_a_literal_base() {
        assert_eq!(
            parse_input("data/*.txt").unwrap(),
            Input::Glob {
                pattern: "data/*.txt".into(),
                base: "data".into()
            }
        );
        assert_eq!(
            parse_input("data/2024/**/x?.csv").unwrap(),
            Input::Glob {
                pattern: "data/2024/**/x?.csv".into(),
                base: "data/2024".into()
            }
        );
        assert_eq!(parse_input("work").unwrap(), Input::Path("work".into()));
        assert!(parse_input("data/[").is_err());
    }

    #[test]
    fn what_is_on_disk_is_what_stat_says_whether_listed_or_stat_ed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut paths = Vec::new();
        // `big` holds enough asked-for names to be listed; `small` does not.
        for folder in ["big", "small", "big/nested"] {
            std::fs::create_dir_all(root.join(folder)).unwrap();
        }
        for i in 0..LIST_AT_LEAST + 8 {
            std::fs::write(root.join(format!("big/f{i}.txt")), "x").unwrap();
            paths.push(format!("big/f{i}.txt"));
            paths.push(format!("big/missing{i}.txt"));
        }
        std::fs::create_dir(root.join("big/sub")).unwrap();
        symlink(root.join("big/sub"), root.join("big/to-dir")).unwrap();
        symlink(root.join("big/f0.txt"), root.join("big/to-file")).unwrap();
        symlink(root.join("nowhere"), root.join("big/dangling")).unwrap();
        symlink(root.join("big"), root.join("linked")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("big/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        std::fs::write(root.join("small/a.txt"), "x").unwrap();
        for extra in [
            "big/sub",
            "big/to-dir",
            "big/to-file",
            "big/dangling",
            "big/fifo",
            "big/nested",
            "big/F0.TXT",
            "big/f0.txt/below",
            "small/a.txt",
            "small/none",
            "big",
            "nowhere",
            "linked/f1.txt",
            "linked/to-dir",
        ] {
            paths.push(extra.to_string());
        }
        // Listed through a symlinked folder too.
        for i in 0..LIST_AT_LEAST {
            paths.push(format!("linked/f{i}.txt"));
        }
        let on_disk = OnDisk::of(root, paths.clone());
        let mut listed_some = false;
        let dirfd = rustix::fs::open(
            root,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let from_listing = listed(&dirfd, &paths);
        for path in &paths {
            let stat = std::fs::metadata(root.join(path)).ok().map(|m| m.is_dir());
            assert_eq!(on_disk.0.get(path.as_str()), Some(&stat), "{path}");
            assert_eq!(on_disk.kind(root, path), stat, "{path}");
            if let Some(kind) = from_listing.get(path.as_str()) {
                assert_eq!(*kind, stat, "{path} (listed)");
                listed_some = true;
            }
        }
        assert!(listed_some, "the big folder was listed");
        for unlisted in [
            "big/to-dir",
            "big/to-file",
            "big/dangling",
            "small/a.txt",
            "big/F0.TXT",
        ] {
            assert!(!from_listing.contains_key(unlisted), "{unlisted}");
        }
        assert_eq!(from_listing.get("big/fifo"), Some(&Some(false)));
        assert_eq!(from_listing.get("big/sub"), Some(&Some(true)));
    }

    #[test]
    fn stages_with_equal_params_share_one_map_and_keep_their_own_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::write(dir.path().join("in/a.txt"), "a").unwrap();
        // Equal neighbours, an equal map spelled in another key order and far from its twin,
        // a map that differs only in a value's type, and stages without params.
        let params = [
            serde_json::json!({"mode": "ascii", "n": 1}),
            serde_json::json!({"mode": "ascii", "n": 1}),
            serde_json::json!({"mode": "unicode"}),
            serde_json::json!({"mode": "ascii", "n": 1.0}),
            serde_json::Value::Null,
            serde_json::json!({}),
        ];
        let mut stages: Vec<serde_json::Value> = params
            .iter()
            .enumerate()
            .map(|(i, params)| {
                let mut stage = serde_json::json!({
                    "name": format!("s{i}"),
                    "processor": {"command": ["cat"], "version": "1"},
                    "inputs": ["in/a.txt"],
                    "outputDir": format!("out/{i}"),
                });
                if !params.is_null() {
                    stage["params"] = params.clone();
                }
                stage
            })
            .collect();
        // The last stage's params, spelled {"n": 1, "mode": "ascii"} in the file.
        stages.push(serde_json::json!({
            "name": "s6",
            "processor": {"command": ["cat"], "version": "1"},
            "inputs": ["in/a.txt"],
            "outputDir": "out/6",
            "params": {"__first": 0},
        }));
        let text = serde_json::json!({"version": 1, "stages": stages})
            .to_string()
            .replace(r#"{"__first":0}"#, r#"{"n":1,"mode":"ascii"}"#);
        let spec = validate("P.json".into(), dir.path().to_path_buf(), Arc::new(text)).unwrap();
        let p: Vec<&Arc<serde_json::Map<String, serde_json::Value>>> =
            spec.stages.iter().map(|s| &s.params).collect();
        assert!(Arc::ptr_eq(p[0], p[1]));
        assert!(Arc::ptr_eq(p[0], p[6]), "equal maps far apart share too");
        assert!(!Arc::ptr_eq(p[0], p[2]) && !Arc::ptr_eq(p[0], p[3]));
        assert!(Arc::ptr_eq(p[4], p[5]), "no params is the empty map");
        assert_eq!(**p[0], *params[0].as_object().unwrap());
        assert_eq!(
            p[3]["n"],
            serde_json::json!(1.0),
            "1.0 stays a float, not 1"
        );
        assert_eq!(**p[2], *params[2].as_object().unwrap());
        assert!(p[4].is_empty());
    }

    #[test]
    fn errors_of_many_stages_come_in_stage_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::write(dir.path().join("in/a.txt"), "a").unwrap();
        let bad = [3usize, 255, 256, 700, 1199];
        let stages: Vec<serde_json::Value> = (0..1200)
            .map(|i| {
                let mut stage = serde_json::json!({
                    "name": format!("s{i}"),
                    "processor": {"builtin": "copy", "version": "1"},
                    "inputs": ["in/a.txt"],
                    "outputDir": format!("out/{i}"),
                });
                if bad.contains(&i) {
                    // Two errors in one stage, and one found across stages.
                    stage["name"] = format!("-s{i}").into();
                    stage["inputs"] = serde_json::json!([format!("in/missing{i}.txt")]);
                    stage["offline"] = serde_json::json!({"allowStaticFindings": ["nope"]});
                }
                if i == 900 {
                    stage["outputDir"] = "out/100".into();
                }
                if i == 1000 {
                    stage["name"] = "s10".into();
                }
                stage
            })
            .collect();
        let text = serde_json::json!({"version": 1, "stages": stages}).to_string();
        let Err(LoadError::Invalid { errors }) =
            validate("P.json".into(), dir.path().to_path_buf(), Arc::new(text))
        else {
            panic!("invalid stages were accepted");
        };
        let got: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
        let mut expected = Vec::new();
        for i in bad {
            expected.push(format!("stage name `-s{i}` cannot be used as a file name"));
            expected.push("unknown static-scan rule `nope`".to_string());
        }
        expected.push("duplicate stage name `s10`".to_string());
        for i in bad {
            if i == 1199 {
                expected.push(
                    "stages `s100` and `s900` both own the output folder `out/100`".to_string(),
                );
            }
            expected.push(format!(
                "input `in/missing{i}.txt` does not exist and no stage produces it"
            ));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn within_and_overlap_respect_path_components() {
        assert!(is_within("work/a", "work"));
        assert!(is_within("work", "work"));
        assert!(!is_within("workshop", "work"));
        assert!(overlaps("work", "work/a"));
        assert!(!overlaps("out1", "out2"));
    }
}
