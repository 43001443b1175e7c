//! Decides, for each stage, whether it runs, resumes or is skipped, and why.
//!
//! A stage is skipped only when its marker's fingerprint equals the current one and every output
//! the marker lists is intact. It resumes when interrupted progress for exactly the current
//! fingerprint exists. Otherwise it runs, with reasons naming what changed since its last success.
//! A stage downstream of one that will run cannot know its inputs yet: the dry-run plan shows it
//! as pending; a real build decides it only after the upstream stage has published (so identical
//! upstream output skips it: early cutoff).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pipe_processors::checkpoint::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::fingerprint::{self, Ingredients, ProcessorIdentity, Reason};
use crate::hashing::StatCache;
use crate::inputs::{self, InputError, ResolvedInputs};
use crate::marker::Marker;
use crate::memo::SkipMemo;
use crate::spec::{Processor, Spec, Stage};
use crate::store::Store;
use crate::workspace::Workspace;
use crate::FINGERPRINT_SCHEMA;

/// What will happen to a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "camelCase")]
pub enum Decision {
    Skip,
    Run {
        reasons: Vec<Reason>,
    },
    #[serde(rename_all = "camelCase")]
    Resume {
        from_line: u64,
        checkpoint: Checkpoint,
    },
    /// The output cache holds what this fingerprint produced before: restore it, run nothing.
    #[serde(rename_all = "camelCase")]
    Restore {
        from_run: String,
        reasons: Vec<Reason>,
    },
    /// A map stage with work to do: each input file decided on its own.
    #[serde(rename_all = "camelCase")]
    Map {
        total: usize,
        /// Items that run, with why (the first few; `runCount` has them all).
        run: Vec<String>,
        run_count: usize,
        restore_count: usize,
        keep_count: usize,
        /// Inputs gone since the last success: their outputs are removed.
        removed: Vec<String>,
        #[serde(skip)]
        items: Vec<ItemPlan>,
    },
    /// Dry run only: an upstream stage runs first, so this stage's inputs are not known yet.
    Pending {
        upstream: String,
    },
}

impl Decision {
    /// A map stage's item plans, taken out (the decision keeps its summary). They are the one
    /// part of a plan that grows with the stage's inputs: they go to the job, not into copies.
    pub fn take_items(&mut self) -> Option<Vec<ItemPlan>> {
        match self {
            Decision::Map { items, .. } => Some(std::mem::take(items)),
            _ => None,
        }
    }

    /// Whether the stage's processor will run.
    pub fn runs(&self) -> bool {
        !matches!(self, Decision::Skip)
    }

    /// One line for humans: `run (input x changed)`.
    pub fn describe(&self) -> String {
        match self {
            Decision::Skip => "skip (unchanged)".to_string(),
            Decision::Run { reasons } => {
                let shown: Vec<String> = reasons.iter().take(3).map(ToString::to_string).collect();
                let more = if reasons.len() > 3 {
                    format!(", and {} more", reasons.len() - 3)
                } else {
                    String::new()
                };
                format!("run ({}{more})", shown.join(", "))
            }
            Decision::Resume { from_line, .. } => format!("resume from line {from_line}"),
            Decision::Restore { from_run, reasons } => {
                let why: Vec<String> = reasons.iter().take(2).map(ToString::to_string).collect();
                format!(
                    "restore from cache (outputs of run {from_run}; {})",
                    why.join(", ")
                )
            }
            Decision::Pending { upstream } => format!("pending (upstream {upstream} runs)"),
            Decision::Map {
                total,
                run,
                run_count,
                restore_count,
                keep_count,
                removed,
                ..
            } => {
                let mut text = format!("map: {run_count} of {total} items would run");
                if !run.is_empty() {
                    let more = if *run_count > run.len() {
                        format!(", and {} more", run_count - run.len())
                    } else {
                        String::new()
                    };
                    text += &format!(": {}{more}", run.join(", "));
                }
                if *restore_count > 0 {
                    text += &format!("; {restore_count} restored from cache");
                }
                text += &format!("; {keep_count} unchanged");
                if !removed.is_empty() {
                    text += &format!("; {} removed", removed.len());
                }
                text
            }
        }
    }
}

/// What happens to one input file of a map stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemPlan {
    /// Root-relative input path.
    pub input: String,
    pub fingerprint: String,
    pub action: ItemAction,
}

/// The decision for one map item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemAction {
    /// Unchanged, outputs intact: kept as they are.
    Keep(Vec<String>),
    /// In the output cache: restored.
    Restore,
    /// Runs, for this reason.
    Run(String),
}

/// The ingredients of one item of a map stage: the stage's, with only that input.
pub fn item_ingredients(stage: &Ingredients, input: &str) -> Ingredients {
    Ingredients {
        schema: stage.schema,
        stage: stage.stage.clone(),
        processor: stage.processor.clone(),
        params: stage.params.clone(),
        // Only this item's input: copying the stage's whole input map per item would make
        // planning a map stage quadratic (100,000 items: 10^10 entries copied).
        inputs: stage
            .inputs
            .get_key_value(input)
            .map(|(p, h)| (p.clone(), h.clone()))
            .into_iter()
            .collect(),
    }
}

/// Decides every item of a map stage that has work to do.
fn map_decision(
    ws: &Workspace,
    stage: &Stage,
    ingredients: &Ingredients,
    marker: Option<&Marker>,
    cache: &mut StatCache,
) -> Decision {
    let store = Store::new(&ws.cache_dir());
    let out_dir = ws.output_dir(&stage.output_dir);
    let recorded: BTreeMap<&str, &str> = marker
        .map(|m| {
            m.outputs
                .iter()
                .map(|o| (o.path.as_str(), o.blake3.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let intact = |paths: &[String], cache: &mut StatCache| {
        paths.iter().all(|p| {
            recorded.get(p.as_str()).is_some_and(|want| {
                cache
                    .hash(&out_dir.join(p))
                    .is_ok_and(|h| h.blake3 == *want)
            })
        })
    };
    let mut items = Vec::new();
    for input in ingredients.inputs.keys() {
        let fingerprint = item_ingredients(ingredients, input).key();
        let previous = marker.and_then(|m| m.items.get(input));
        let action = match previous {
            Some(entry) if entry.fingerprint == fingerprint && intact(&entry.outputs, cache) => {
                ItemAction::Keep(entry.outputs.clone())
            }
            _ if matches!(store.verified_action(&fingerprint, cache), Ok(Some(_))) => {
                ItemAction::Restore
            }
            Some(entry) if entry.fingerprint == fingerprint => {
                ItemAction::Run(format!("{input}: output missing or modified"))
            }
            Some(_) => ItemAction::Run(format!("{input} changed")),
            None => ItemAction::Run(format!("{input} is new")),
        };
        items.push(ItemPlan {
            input: input.clone(),
            fingerprint,
            action,
        });
    }
    let removed: Vec<String> = marker
        .map(|m| {
            m.items
                .keys()
                .filter(|k| !ingredients.inputs.contains_key(*k))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let run: Vec<&ItemPlan> = items
        .iter()
        .filter(|i| matches!(i.action, ItemAction::Run(_)))
        .collect();
    Decision::Map {
        total: items.len(),
        run: run
            .iter()
            .take(3)
            .map(|i| match &i.action {
                ItemAction::Run(why) => why.clone(),
                _ => unreachable!(),
            })
            .collect(),
        run_count: run.len(),
        restore_count: items
            .iter()
            .filter(|i| i.action == ItemAction::Restore)
            .count(),
        keep_count: items
            .iter()
            .filter(|i| matches!(i.action, ItemAction::Keep(_)))
            .count(),
        removed,
        items,
    }
}

/// The progress of an interrupted stage (`state/progress_<stage>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Progress {
    pub stage: String,
    pub fingerprint: String,
    pub input_index: u64,
    pub line_offset: u64,
    pub byte_offset: u64,
    pub output_bytes: u64,
    pub updated_at: String,
}

impl Progress {
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            input_index: self.input_index,
            line_offset: self.line_offset,
            byte_offset: self.byte_offset,
            output_bytes: self.output_bytes,
        }
    }
}

/// A stage's decision with everything needed to act on it.
#[derive(Debug, Clone)]
pub struct StagePlan {
    pub stage: usize,
    pub decision: Decision,
    pub ingredients: Option<Ingredients>,
    pub fingerprint: Option<String>,
    pub inputs: Option<ResolvedInputs>,
    pub marker: Option<Marker>,
    /// Things the user should know that do not change the decision (e.g. unreadable progress).
    pub warnings: Vec<String>,
}

impl StagePlan {
    /// A plan with `decision` and nothing the full decision finds (inputs, fingerprint, marker).
    fn undecided(stage: usize, decision: Decision) -> StagePlan {
        StagePlan {
            stage,
            decision,
            ingredients: None,
            fingerprint: None,
            inputs: None,
            marker: None,
            warnings: Vec::new(),
        }
    }
}

/// Whether stage `i`'s output folder holds a publish journal (a publish that did not finish).
fn publish_journal_exists(spec: &Spec, ws: &Workspace, i: usize) -> bool {
    let stage = &spec.stages[i];
    ws.output_dir(&stage.output_dir)
        .join(crate::workspace::journal_name(&stage.name))
        .exists()
}

/// Why a stage cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("cannot read processor file `{path}`: {source}")]
    ProcessorFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Computes the fingerprint ingredients of `stage` over `inputs`.
pub fn ingredients(
    spec: &Spec,
    stage: &Stage,
    inputs: &ResolvedInputs,
    cache: &mut StatCache,
) -> Result<Ingredients, PlanError> {
    let processor = match &stage.processor {
        Processor::Builtin {
            name,
            implementation,
            version,
        } => ProcessorIdentity {
            command: vec![format!("builtin:{name}@{implementation}")],
            version: version.clone(),
            files: BTreeMap::new(),
        },
        Processor::Command {
            argv,
            version,
            files,
        } => {
            let mut hashed = BTreeMap::new();
            for file in files {
                for (rel, abs) in expand(spec, file) {
                    let hash = cache
                        .hash(&abs)
                        .map_err(|source| PlanError::ProcessorFile {
                            path: rel.clone(),
                            source,
                        })?;
                    hashed.insert(rel, hash.blake3);
                }
            }
            ProcessorIdentity {
                command: argv.clone(),
                version: version.clone(),
                files: hashed,
            }
        }
    };
    let paths: Vec<&Path> = inputs.files.values().map(PathBuf::as_path).collect();
    let mut hashed_inputs = BTreeMap::new();
    for ((rel, _), hash) in inputs.files.iter().zip(cache.hash_all(&paths)) {
        let hash = hash.map_err(|source| InputError::Unreadable {
            path: rel.clone(),
            source,
        })?;
        hashed_inputs.insert(rel.clone(), hash.blake3);
    }
    Ok(Ingredients {
        schema: FINGERPRINT_SCHEMA,
        stage: stage.name.clone(),
        processor,
        params: serde_json::Value::Object((*stage.params).clone()),
        inputs: hashed_inputs,
    })
}

/// A processor file, or every file below a processor folder.
fn expand(spec: &Spec, rel: &str) -> Vec<(String, PathBuf)> {
    let abs = spec.path(rel);
    if !abs.is_dir() {
        return vec![(rel.to_string(), abs)];
    }
    walkdir::WalkDir::new(&abs)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let below = e.path().strip_prefix(&abs).expect("walked below abs");
            let below = below
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            (format!("{rel}/{below}"), e.into_path())
        })
        .collect()
}

/// Decides `stage` now, from the files as they are.
///
/// `recovered`: the caller has just completed or abandoned any publish journal of the stage (a
/// build's recovery, under the workspace lock), so none is looked for again.
pub fn decide(
    spec: &Spec,
    ws: &Workspace,
    index: usize,
    cache: &mut StatCache,
    recovered: bool,
) -> Result<StagePlan, PlanError> {
    let stage = &spec.stages[index];
    let inputs = inputs::resolve(spec, stage)?;
    let ingredients = ingredients(spec, stage, &inputs, cache)?;
    let fingerprint = ingredients.key();
    let mut warnings = Vec::new();
    let marker = Marker::read(&ws.marker_file(&stage.output_dir, &stage.name));
    let mut reasons = match &marker {
        Ok(None) => vec![Reason::FirstRun],
        Err(error) => vec![Reason::MarkerUnreadable {
            error: error.clone(),
        }],
        Ok(Some(m)) if m.fingerprint == fingerprint => output_problems(ws, stage, m, cache),
        Ok(Some(m)) => {
            let mut r = fingerprint::diff(&m.ingredients, &ingredients);
            if r.is_empty() {
                // Same ingredients, different key: only possible if the marker was edited.
                r.push(Reason::MarkerUnreadable {
                    error: "fingerprint does not match its ingredients".into(),
                });
            }
            r
        }
    };
    if !recovered && publish_journal_exists(spec, ws, index) {
        reasons = vec![Reason::PublishInterrupted];
    }
    let cached = if reasons.is_empty() || stage.map || reasons.contains(&Reason::PublishInterrupted)
    {
        None
    } else {
        match Store::new(&ws.cache_dir()).verified_action(&fingerprint, cache) {
            Ok(entry) => entry,
            Err(why) => {
                warnings.push(format!(
                    "cannot restore `{}` from the cache ({why}); it runs instead",
                    stage.name
                ));
                None
            }
        }
    };
    let decision = if reasons.is_empty() {
        Decision::Skip
    } else if stage.map && !reasons.contains(&Reason::PublishInterrupted) {
        map_decision(
            ws,
            stage,
            &ingredients,
            marker.as_ref().ok().and_then(|m| m.as_ref()),
            cache,
        )
    } else if let Some(entry) = cached {
        Decision::Restore {
            from_run: entry.run_id,
            reasons,
        }
    } else {
        match read_progress(ws, &stage.name) {
            Ok(Some(p))
                if p.fingerprint == fingerprint && ws.staging_dir(&stage.output_dir).is_dir() =>
            {
                Decision::Resume {
                    from_line: p.line_offset,
                    checkpoint: p.checkpoint(),
                }
            }
            Ok(Some(_)) => {
                reasons.push(Reason::StaleProgress);
                Decision::Run { reasons }
            }
            Ok(None) => Decision::Run { reasons },
            Err(err) => {
                warnings.push(format!(
                    "ignoring unreadable progress file of `{}` ({err}); restarting from zero",
                    stage.name
                ));
                Decision::Run { reasons }
            }
        }
    };
    Ok(StagePlan {
        stage: index,
        decision,
        ingredients: Some(ingredients),
        fingerprint: Some(fingerprint),
        inputs: Some(inputs),
        marker: marker.ok().flatten(),
        warnings,
    })
}

/// Outputs the marker lists that are missing or no longer have their recorded content.
fn output_problems(
    ws: &Workspace,
    stage: &Stage,
    marker: &Marker,
    cache: &mut StatCache,
) -> Vec<Reason> {
    let out_dir = ws.output_dir(&stage.output_dir);
    let paths: Vec<PathBuf> = marker
        .outputs
        .iter()
        .map(|o| out_dir.join(&o.path))
        .collect();
    let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let mut reasons = Vec::new();
    for (output, hash) in marker.outputs.iter().zip(cache.hash_all(&paths)) {
        let path = format!("{}/{}", stage.output_dir, output.path);
        match hash {
            Ok(h) if h.blake3 == output.blake3 => {}
            Ok(_) => reasons.push(Reason::OutputModified { path }),
            Err(_) => reasons.push(Reason::OutputMissing { path }),
        }
    }
    reasons
}

/// Reads `state/progress_<stage>.json`: `Ok(None)` when absent, `Err` when unreadable or torn.
pub fn read_progress(ws: &Workspace, stage: &str) -> Result<Option<Progress>, String> {
    match std::fs::read(ws.progress_file(stage)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// The whole plan as `--dry-run` shows it: stages downstream of a running stage are pending.
///
/// A stage the skip memo vouches for is a skip without deciding it the full way, as in a build,
/// unless a publish journal is in its output folder: a build recovers that publish before it looks
/// at any verdict (when the build that wrote the journal died, the memo it read is still on disk
/// and can match), a dry run recovers nothing, so the full decision reports it.
///
/// Stages are decided level by level (a stage's level is one more than its deepest upstream
/// stage's), and the stages of a level that need the full decision are decided together on all
/// cores: a dry run, which writes no memo, decides every stage that ran in the last build in full.
pub fn plan_all(
    spec: &Spec,
    ws: &Workspace,
    order: &[usize],
    upstream: impl Fn(usize) -> Vec<usize>,
    memo: &mut SkipMemo,
) -> Vec<Result<StagePlan, (usize, PlanError)>> {
    // Loaded when a stage is first decided the full way (a no-op dry run never needs it).
    let mut cache: Option<StatCache> = None;
    let position: std::collections::HashMap<usize, usize> =
        order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
    // Upstream stages by position in `order` (an upstream stage not planned never runs).
    let upstream: Vec<Vec<usize>> = order
        .iter()
        .map(|&i| {
            upstream(i)
                .iter()
                .filter_map(|u| position.get(u).copied())
                .collect()
        })
        .collect();
    let mut levels: Vec<Vec<usize>> = Vec::new();
    let mut level = vec![0; order.len()];
    for p in 0..order.len() {
        level[p] = upstream[p].iter().map(|&q| level[q] + 1).max().unwrap_or(0);
        if levels.len() <= level[p] {
            levels.resize_with(level[p] + 1, Vec::new);
        }
        levels[level[p]].push(p);
    }
    let mut plans: Vec<Option<Result<StagePlan, (usize, PlanError)>>> =
        order.iter().map(|_| None).collect();
    let mut runs = vec![false; order.len()];
    for stages in levels {
        let mut full = Vec::new();
        for &p in &stages {
            let i = order[p];
            plans[p] = match upstream[p].iter().find(|&&q| runs[q]) {
                Some(&q) => Some(Ok(StagePlan::undecided(
                    i,
                    Decision::Pending {
                        upstream: spec.stages[order[q]].name.clone(),
                    },
                ))),
                None if memo.unchanged(spec, i).is_some()
                    && !publish_journal_exists(spec, ws, i) =>
                {
                    Some(Ok(StagePlan::undecided(i, Decision::Skip)))
                }
                None => {
                    full.push(p);
                    None
                }
            };
        }
        if !full.is_empty() {
            let cache = cache.get_or_insert_with(|| ws.load_stat_cache());
            let decided =
                cache.par_map(&full, |&p, cache| decide(spec, ws, order[p], cache, false));
            for (p, plan) in full.into_iter().zip(decided) {
                plans[p] = Some(plan.map_err(|e| (order[p], e)));
            }
        }
        for p in stages {
            runs[p] = !matches!(&plans[p], Some(Ok(plan)) if !plan.decision.runs());
        }
    }
    plans
        .into_iter()
        .map(|plan| plan.expect("every level decided"))
        .collect()
}
