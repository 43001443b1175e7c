//! `pipe clean`: removes what stages produced, never anything else.
//!
//! For each selected stage: the outputs its marker lists (and only those), the marker, the
//! staging folder and the progress file; folders left empty by that are removed too. A file in an
//! output folder that no marker lists (the user's own) is kept. `--state` also removes `state/`
//! records of runs and stages, `--cache` the `cache/` folder.

use std::io;

use crate::lock::{self, Holder, LockError, Wait};
use crate::marker::Marker;
use crate::publish::{is_relative_inside, remove_empty_dirs};
use crate::spec::Spec;
use crate::workspace::Workspace;
use crate::{atomic, state};

/// What `clean` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub files: Vec<String>,
    pub stages: Vec<String>,
    /// The audit log's head after recording this clean.
    pub audit_head: Option<crate::audit::Head>,
}

/// Why clean failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    #[error("unknown stage `{0}`")]
    UnknownStage(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Cleans `stages` (all when empty).
pub fn clean(
    spec: &Spec,
    stages: &[String],
    with_state: bool,
    with_cache: bool,
    wait: Wait,
    audit_key: Option<crate::audit::Key>,
) -> Result<Cleaned, CleanError> {
    let ws = Workspace::new(spec);
    let mut indices = Vec::new();
    for name in stages {
        indices.push(
            spec.stage_index(name)
                .ok_or_else(|| CleanError::UnknownStage(name.clone()))?,
        );
    }
    if indices.is_empty() {
        indices = (0..spec.stages.len()).collect();
    }
    let me = Holder {
        pid: std::process::id(),
        run_id: String::new(),
        command: "clean".into(),
        started_at: state::now_rfc3339(),
    };
    let _lock = lock::acquire(&ws, &me, wait, None, |_| {})?;
    let mut audit = crate::audit::Log::open(&ws, audit_key, &_lock, None)?;
    ws.sweep_temporaries(spec.stages.iter().map(|s| s.output_dir.as_str()))?;
    let mut cleaned = Cleaned::default();
    for i in indices {
        let stage = &spec.stages[i];
        let out_dir = ws.output_dir(&stage.output_dir);
        let marker_path = ws.marker_file(&stage.output_dir, &stage.name);
        if let Ok(Some(marker)) = Marker::read(&marker_path) {
            remove_outputs(&ws, &out_dir, &marker.outputs, &mut cleaned)?;
        }
        // An interrupted publish: its outputs were produced by the stage too.
        let journal_path = out_dir.join(crate::workspace::journal_name(&stage.name));
        if let Some(journal) = std::fs::read(&journal_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::publish::Journal>(&b).ok())
        {
            remove_outputs(&ws, &out_dir, &journal.marker.outputs, &mut cleaned)?;
        }
        if atomic::remove_if_exists(&journal_path)? {
            cleaned.files.push(ws.relative(&journal_path));
        }
        if atomic::remove_if_exists(&marker_path)? {
            cleaned.files.push(ws.relative(&marker_path));
        }
        let staging = ws.staging_dir(&stage.output_dir);
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
            cleaned.files.push(ws.relative(&staging) + "/");
        }
        if atomic::remove_if_exists(&ws.progress_file(&stage.name))? {
            cleaned
                .files
                .push(ws.relative(&ws.progress_file(&stage.name)));
        }
        if with_state && atomic::remove_if_exists(&ws.stage_file(&stage.name))? {
            cleaned.files.push(ws.relative(&ws.stage_file(&stage.name)));
        }
        let _ = std::fs::remove_dir(&out_dir); // only if now empty
        cleaned.stages.push(stage.name.clone());
    }
    if with_state {
        remove_run_records(&ws, &mut cleaned)?;
    }
    if with_cache && ws.cache_dir().exists() {
        std::fs::remove_dir_all(ws.cache_dir())?;
        cleaned.files.push("cache/".into());
    }
    audit.cleaned(&cleaned, with_state, with_cache)?;
    cleaned.audit_head = Some(audit.head().clone());
    Ok(cleaned)
}

/// Removes the listed outputs (only paths inside `out_dir`) and the folders they leave empty.
fn remove_outputs(
    ws: &Workspace,
    out_dir: &std::path::Path,
    outputs: &[crate::marker::OutputEntry],
    cleaned: &mut Cleaned,
) -> io::Result<()> {
    for output in outputs.iter().filter(|o| is_relative_inside(&o.path)) {
        let path = out_dir.join(&output.path);
        if atomic::remove_if_exists(&path)? {
            cleaned.files.push(ws.relative(&path));
            remove_empty_dirs(path.parent(), out_dir);
        }
    }
    Ok(())
}

/// Removes `state/run_*.json`, `state/metrics_*.json` and `state/logs/`.
fn remove_run_records(ws: &Workspace, cleaned: &mut Cleaned) -> io::Result<()> {
    let dir = ws.state_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.starts_with("run_") || name.starts_with("metrics_"))
            && (name.ends_with(".json") || name.ends_with(".prom"))
        {
            std::fs::remove_file(entry.path())?;
            cleaned.files.push(format!("state/{name}"));
        }
    }
    let logs = dir.join("logs");
    if logs.exists() {
        std::fs::remove_dir_all(&logs)?;
        cleaned.files.push("state/logs/".into());
    }
    Ok(())
}
