//! Publishing a stage's outputs: staging folder → output folder, marker last.
//!
//! **Architecture invariant:** a crash at any instant leaves either the previous complete outputs
//! with their marker, or no marker at all (and then the stage reruns). The order that guarantees
//! it: hash the staged files; remove the old marker (durably); move each staged file into place
//! with a rename (same filesystem: the staging folder lives inside the output folder); remove
//! outputs of the old marker that the new run did not produce; fsync the folders; write the new
//! marker atomically.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use pipe_processors::failpoint;
use walkdir::WalkDir;

use crate::atomic;
use crate::fingerprint::Ingredients;
use crate::hashing::{hash_file, StatCache};
use crate::marker::{Marker, OutputEntry, MARKER_VERSION};

/// What a publish needs to know.
pub struct Publication<'a> {
    pub stage: &'a str,
    pub staging: &'a Path,
    pub output_dir: &'a Path,
    pub marker_path: &'a Path,
    pub previous: Option<&'a Marker>,
    pub run_id: &'a str,
    pub fingerprint: &'a str,
    pub ingredients: &'a Ingredients,
}

/// Publishes the staged outputs and writes the marker. Returns the marker written.
pub fn publish(p: &Publication<'_>, cache: &mut StatCache) -> io::Result<Marker> {
    let staged = staged_files(p.staging)?;
    let mut outputs = Vec::with_capacity(staged.len());
    for (rel, abs) in &staged {
        let size = std::fs::metadata(abs)?.len();
        outputs.push(OutputEntry {
            path: rel.clone(),
            size,
            blake3: hash_file(abs, size)?,
        });
    }
    if atomic::remove_if_exists(p.marker_path)? {
        atomic::sync_dir(p.output_dir)?;
        failpoint::hit("publish.after-old-marker-removed");
    }
    let mut touched_dirs: BTreeSet<PathBuf> = BTreeSet::from([p.output_dir.to_path_buf()]);
    for ((rel, abs), entry) in staged.iter().zip(&outputs) {
        let dest = p.output_dir.join(rel);
        let parent = dest.parent().expect("an output has a folder");
        std::fs::create_dir_all(parent)?;
        if dest.is_dir() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::rename(abs, &dest)?;
        failpoint::hit("publish.after-output-rename");
        touched_dirs.insert(parent.to_path_buf());
        cache.remember(&dest, &entry.blake3)?;
    }
    let produced: BTreeSet<&str> = outputs.iter().map(|o| o.path.as_str()).collect();
    for old in p.previous.map(|m| m.outputs.as_slice()).unwrap_or_default() {
        if !produced.contains(old.path.as_str()) && is_relative_inside(&old.path) {
            let path = p.output_dir.join(&old.path);
            if atomic::remove_if_exists(&path)? {
                touched_dirs.insert(path.parent().expect("has a folder").to_path_buf());
                remove_empty_dirs(path.parent(), p.output_dir);
            }
        }
    }
    for dir in touched_dirs.iter().filter(|d| d.is_dir()) {
        atomic::sync_dir(dir)?;
    }
    failpoint::hit("publish.after-outputs-synced");
    std::fs::remove_dir_all(p.staging)?;
    failpoint::hit("publish.after-staging-removed");
    let marker = Marker {
        version: MARKER_VERSION,
        stage: p.stage.to_string(),
        fingerprint: p.fingerprint.to_string(),
        run_id: p.run_id.to_string(),
        finished_at: crate::state::now_rfc3339(),
        outputs,
        ingredients: p.ingredients.clone(),
    };
    atomic::write_json(p.marker_path, &marker)?;
    failpoint::hit("publish.after-marker");
    Ok(marker)
}

/// Every regular file under `staging`, relative and `/`-separated, sorted.
fn staged_files(staging: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for entry in WalkDir::new(staging).sort_by_file_name() {
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_file() {
            let rel = entry.path().strip_prefix(staging).expect("under staging");
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            files.push((rel, entry.into_path()));
        }
    }
    Ok(files)
}

/// A marker path must stay inside its output folder (a tampered marker must not make `pipe`
/// delete files elsewhere).
pub fn is_relative_inside(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Removes `dir` and its parents while they are empty, stopping at `stop`.
pub fn remove_empty_dirs(mut dir: Option<&Path>, stop: &Path) {
    while let Some(d) = dir {
        if d == stop || !d.starts_with(stop) || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_paths_must_stay_inside() {
        assert!(is_relative_inside("a/b.txt"));
        assert!(!is_relative_inside("../b.txt"));
        assert!(!is_relative_inside("/etc/passwd"));
        assert!(!is_relative_inside("a//b"));
        assert!(!is_relative_inside(""));
    }
}
