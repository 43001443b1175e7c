//! Publishing a stage's outputs: staging folder → output folder, marker last, crash-safe.
//!
//! **Architecture invariant:** a crash at any instant leaves either the previous complete outputs
//! with their marker, or no marker at all; and an interrupted publish is completed by the next
//! build (rolled forward) rather than redone.
//!
//! The order: hash the staged files into the marker-to-be; write it as a journal
//! (`<outputDir>/.<stage>.publishing`, atomically); forget the stage's progress (its work is done);
//! remove the old marker; move each staged file into place with a rename (same filesystem: the
//! staging folder lives inside the output folder); remove outputs of the old marker that the new
//! run did not produce; fsync the folders; remove the staging folder; write the marker; remove the
//! journal. [`recover`] finishes the same steps from the journal after a crash: every journal
//! output is either still staged or already in place with its recorded hash.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use pipe_processors::failpoint;
use serde::{Deserialize, Serialize};
use walkdir::WalkDir;

use crate::atomic;
use crate::fingerprint::Ingredients;
use crate::hashing::{hash_file, StatCache};
use crate::marker::{ItemEntry, Marker, OutputEntry, MARKER_VERSION};

/// Where one stage publishes.
#[derive(Debug, Clone)]
pub struct Target {
    pub stage: String,
    pub staging: PathBuf,
    pub output_dir: PathBuf,
    pub marker: PathBuf,
    pub journal: PathBuf,
    pub progress: PathBuf,
}

/// A publish in progress: the marker to write and the outputs of the marker it replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub marker: Marker,
    pub previous_outputs: Vec<String>,
}

/// Publishes the staged outputs and writes the marker. Returns the marker written. The marker
/// takes `ingredients` and `items` (a map stage's grow with its inputs: no copy of them is made);
/// if the journal could not be written they are handed back, so a retry can publish again.
pub fn publish(
    target: &Target,
    previous: Option<&Marker>,
    run_id: &str,
    fingerprint: &str,
    ingredients: &mut Ingredients,
    items: &mut BTreeMap<String, ItemEntry>,
    cache: &mut StatCache,
) -> io::Result<Marker> {
    let mut outputs = Vec::new();
    for (rel, abs) in staged_files(&target.staging)? {
        let size = std::fs::metadata(&abs)?.len();
        outputs.push(OutputEntry {
            path: rel,
            size,
            blake3: hash_file(&abs, size)?,
        });
    }
    let journal = Journal {
        marker: Marker {
            version: MARKER_VERSION,
            stage: target.stage.clone(),
            fingerprint: fingerprint.to_string(),
            run_id: run_id.to_string(),
            finished_at: crate::state::now_rfc3339(),
            outputs,
            ingredients: std::mem::replace(ingredients, ingredients.without_inputs()),
            items: std::mem::take(items),
        },
        previous_outputs: previous
            .map(|m| m.outputs.iter().map(|o| o.path.clone()).collect())
            .unwrap_or_default(),
    };
    if let Err(err) = atomic::write_json(&target.journal, &journal) {
        *ingredients = journal.marker.ingredients;
        *items = journal.marker.items;
        return Err(err);
    }
    failpoint::hit("publish.after-journal");
    complete(target, journal, cache)
}

/// What [`recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// No interrupted publish.
    Nothing,
    /// An interrupted publish was completed: the stage's marker is now written.
    Completed,
    /// An interrupted publish could not be completed (a staged or published file vanished or was
    /// changed): the journal and any marker were removed, so the stage runs again.
    Abandoned(String),
}

/// Completes a publish that a crash interrupted, if there is one.
pub fn recover(target: &Target, cache: &mut StatCache) -> io::Result<Recovery> {
    let bytes = match std::fs::read(&target.journal) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Recovery::Nothing),
        Err(err) => return Err(err),
    };
    let outcome = match serde_json::from_slice::<Journal>(&bytes) {
        Ok(journal) => match complete(target, journal, cache) {
            Ok(_) => return Ok(Recovery::Completed),
            Err(err) if err.kind() == io::ErrorKind::InvalidData => err.to_string(),
            Err(err) => return Err(err),
        },
        Err(err) => format!("unreadable publish journal: {err}"),
    };
    atomic::remove_if_exists(&target.marker)?;
    atomic::remove_if_exists(&target.journal)?;
    atomic::sync_dir(&target.output_dir)?;
    Ok(Recovery::Abandoned(outcome))
}

/// Steps after the journal: idempotent, so a crash anywhere in them can be followed by a rerun.
fn complete(target: &Target, journal: Journal, cache: &mut StatCache) -> io::Result<Marker> {
    let out = &target.output_dir;
    if atomic::remove_if_exists(&target.progress)? {
        failpoint::hit("publish.after-progress-removed");
    }
    if atomic::remove_if_exists(&target.marker)? {
        atomic::sync_dir(out)?;
        failpoint::hit("publish.after-old-marker-removed");
    }
    let mut touched: BTreeSet<PathBuf> = BTreeSet::from([out.to_path_buf()]);
    for entry in &journal.marker.outputs {
        if !is_relative_inside(&entry.path) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("journal names `{}` outside the output folder", entry.path),
            ));
        }
        let staged = target.staging.join(&entry.path);
        let dest = out.join(&entry.path);
        let parent = dest.parent().expect("an output has a folder");
        if staged.is_file() {
            std::fs::create_dir_all(parent)?;
            if dest.is_dir() {
                std::fs::remove_dir_all(&dest)?;
            }
            std::fs::rename(&staged, &dest)?;
            failpoint::check("publish.after-output-rename")?;
        } else {
            // Moved before the crash: it must be in place, unchanged.
            let intact = dest.is_file()
                && hash_file(&dest, std::fs::metadata(&dest)?.len())? == entry.blake3;
            if !intact {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "output `{}` is neither staged nor published intact",
                        entry.path
                    ),
                ));
            }
        }
        touched.insert(parent.to_path_buf());
        cache.remember(&dest, &entry.blake3)?;
    }
    let produced: BTreeSet<&str> = journal
        .marker
        .outputs
        .iter()
        .map(|o| o.path.as_str())
        .collect();
    for old in &journal.previous_outputs {
        if !produced.contains(old.as_str()) && is_relative_inside(old) {
            let path = out.join(old);
            if atomic::remove_if_exists(&path)? {
                touched.insert(path.parent().expect("has a folder").to_path_buf());
                remove_empty_dirs(path.parent(), out);
            }
        }
    }
    atomic::sync_dirs(touched.iter().filter(|d| d.is_dir()).map(PathBuf::as_path))?;
    failpoint::hit("publish.after-outputs-synced");
    match std::fs::remove_dir_all(&target.staging) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    failpoint::hit("publish.after-staging-removed");
    atomic::write_json(&target.marker, &journal.marker)?;
    failpoint::hit("publish.after-marker");
    // The journal's removal is not synced: if a power cut undoes it, the next build finds the
    // journal beside the marker it names and completes it again (the outputs are in place with
    // their recorded hashes), which is the state a kill right after the marker leaves (the crash
    // sweep's `publish.after-marker`). One folder sync fewer per stage.
    atomic::remove_if_exists(&target.journal)?;
    Ok(journal.marker)
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
