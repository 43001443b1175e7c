//! `pipe gc`: frees cache space without ever breaking what the workspace needs now.
//!
//! Objects referenced by a current marker are always kept (a build after `gc` with nothing
//! changed still skips, and `clean` + build still restores). Action entries are kept when they
//! belong to one of the last `--keep-runs` runs (all when not given) or to a current marker;
//! objects that no kept entry or marker references are removed. `--max-size` then drops the oldest
//! remaining entries (never a current marker's) until the objects fit.

use std::collections::BTreeSet;
use std::io;

use crate::lock::{self, Holder, LockError, Wait};
use crate::marker::Marker;
use crate::spec::Spec;
use crate::state::{self, RunRecord};
use crate::store::Store;
use crate::workspace::Workspace;

/// What to collect.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    pub keep_runs: Option<usize>,
    pub max_size: Option<u64>,
    pub dry_run: bool,
}

/// What `gc` removed (or would remove) and kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub actions_removed: usize,
    pub objects_removed: usize,
    pub bytes_freed: u64,
    pub objects_kept: usize,
    pub bytes_kept: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Parses a size like `500M`, `2G`, `1.5GiB` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid size `{text}`: expected e.g. 500M or 2G"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "invalid size unit `{other}` in `{text}`: use K, M, G or T"
            ))
        }
    };
    Ok((value * factor as f64) as u64)
}

/// Collects garbage in the cache of `spec`'s workspace.
pub fn gc(spec: &Spec, opts: &GcOptions, wait: Wait) -> Result<GcReport, GcError> {
    let ws = Workspace::new(spec);
    let me = Holder {
        pid: std::process::id(),
        run_id: String::new(),
        command: "gc".into(),
        started_at: state::now_rfc3339(),
    };
    let _lock = if opts.dry_run {
        None
    } else {
        Some(lock::acquire(&ws, &me, wait, None, |_| {})?)
    };
    let store = Store::new(&ws.cache_dir());
    let mut live_objects = BTreeSet::new();
    let mut live_fingerprints = BTreeSet::new();
    for stage in &spec.stages {
        if let Ok(Some(marker)) = Marker::read(&ws.marker_file(&stage.output_dir, &stage.name)) {
            live_fingerprints.insert(marker.fingerprint.clone());
            live_objects.extend(marker.outputs.iter().map(|o| o.blake3.clone()));
        }
    }
    let recent: Option<BTreeSet<String>> = opts.keep_runs.map(|n| recent_runs(&ws, n));
    let mut kept = Vec::new();
    let mut report = GcReport::default();
    for (path, entry) in store.actions() {
        let keep = live_fingerprints.contains(&entry.fingerprint)
            || recent.as_ref().is_none_or(|r| r.contains(&entry.run_id));
        if keep {
            kept.push((path, entry));
        } else {
            report.actions_removed += 1;
            if !opts.dry_run {
                std::fs::remove_file(&path)?;
            }
        }
    }
    let objects = store.objects();
    let referenced =
        |kept: &[(std::path::PathBuf, crate::store::ActionEntry)]| -> BTreeSet<String> {
            let mut set = live_objects.clone();
            for (_, e) in kept {
                set.extend(e.outputs.iter().map(|o| o.blake3.clone()));
            }
            set
        };
    let mut wanted = referenced(&kept);
    if let Some(max) = opts.max_size {
        // Oldest first (`actions()` is sorted by finish time); current markers' entries stay.
        while objects
            .iter()
            .filter(|(h, _, _)| wanted.contains(h))
            .map(|(_, _, s)| s)
            .sum::<u64>()
            > max
        {
            let Some(pos) = kept
                .iter()
                .position(|(_, e)| !live_fingerprints.contains(&e.fingerprint))
            else {
                break;
            };
            let (path, _) = kept.remove(pos);
            report.actions_removed += 1;
            if !opts.dry_run {
                std::fs::remove_file(&path)?;
            }
            wanted = referenced(&kept);
        }
    }
    for (hash, path, size) in objects {
        if wanted.contains(&hash) {
            report.objects_kept += 1;
            report.bytes_kept += size;
        } else {
            report.objects_removed += 1;
            report.bytes_freed += size;
            if !opts.dry_run {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(report)
}

/// Ids of the `n` most recent runs, by start time.
fn recent_runs(ws: &Workspace, n: usize) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(ws.state_dir()) else {
        return BTreeSet::new();
    };
    let mut runs: Vec<RunRecord> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("run_"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    runs.sort_by(|a, b| b.started_at.cmp(&a.started_at));
    runs.into_iter().take(n).map(|r| r.run_id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5X").is_err());
    }
}
