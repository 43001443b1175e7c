//! Publishing a stage's outputs: staging folder → output folder, marker last, crash-safe.
//!
//! **Architecture invariant:** a crash at any instant leaves either the previous complete outputs
//! with their marker, or no marker at all; and an interrupted publish is completed by the next
//! build (rolled forward) rather than redone.
//!
//! The order: hash the staged files into the marker-to-be and make them durable (fdatasync, or
//! one `syncfs` for many: a processor need not have synced them); write it as a journal
//! (`<outputDir>/.<stage>.publishing`, atomically); forget the stage's progress (its work is done);
//! remove the old marker; move each staged file into place with a rename (same filesystem: the
//! staging folder lives inside the output folder); remove outputs of the old marker that the new
//! run did not produce; fsync the folders; remove the staging folder; write the marker; remove the
//! journal. When the journal names no old output to remove, its bytes are the marker's, and the
//! last two steps are one: the journal is renamed onto the marker (see [`Journal`]). [`recover`]
//! finishes the same steps from the journal after a crash: every journal output is either still
//! staged or already in place with its recorded hash.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use pipe_processors::failpoint;
use serde::{Deserialize, Serialize};
use walkdir::WalkDir;

use crate::atomic;
use crate::fingerprint::Ingredients;
use crate::hashing::{hash_file, hash_open_file, StatCache};
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

/// A publish in progress: the marker to write and the outputs of the marker it replaces that it
/// does not produce again (they are removed).
///
/// On disk the journal is the marker's own fields plus `previousOutputs` when that list is not
/// empty; so a publish that replaces no outputs (a stage's first, or one whose previous marker
/// listed only paths it produces again) has a journal whose bytes are exactly the marker's, and it ends by renaming the
/// journal onto the marker: no second file, no second fsync. Journals written before 2026-11-30
/// (`{"marker": {...}, "previousOutputs": [...]}`) are still read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "JournalFile")]
pub struct Journal {
    pub marker: Marker,
    pub previous_outputs: Vec<String>,
}

/// The journal as written ([`JournalFlatRef`]): the marker flattened, and the previous outputs
/// when there are any.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JournalFlat {
    #[serde(flatten)]
    marker: Marker,
    #[serde(default)]
    previous_outputs: Vec<String>,
}

/// The journal as earlier versions wrote it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JournalNested {
    marker: Marker,
    previous_outputs: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JournalFile {
    Nested(JournalNested),
    Flat(JournalFlat),
}

impl From<JournalFile> for Journal {
    fn from(file: JournalFile) -> Journal {
        match file {
            JournalFile::Nested(j) => Journal {
                marker: j.marker,
                previous_outputs: j.previous_outputs,
            },
            JournalFile::Flat(j) => Journal {
                marker: j.marker,
                previous_outputs: j.previous_outputs,
            },
        }
    }
}

/// [`JournalFlat`] borrowed: what a journal is written as, without a copy of its marker (a map
/// stage's lists every item).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JournalFlatRef<'a> {
    #[serde(flatten)]
    marker: &'a Marker,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    previous_outputs: &'a [String],
}

impl Serialize for Journal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        JournalFlatRef {
            marker: &self.marker,
            previous_outputs: &self.previous_outputs,
        }
        .serialize(serializer)
    }
}

/// The blake3 of the bytes [`atomic::write_json`] writes for `value`, streamed (no copy of a big
/// marker in memory).
fn json_digest<T: Serialize>(value: &T) -> io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    serde_json::to_writer_pretty(&mut hasher, value).map_err(atomic::json_error)?;
    hasher.update(b"\n");
    Ok(hasher.finalize())
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
    let staged = staged_files(&target.staging)?;
    // The marker will vouch for these bytes, so they must survive a power cut before anything
    // names them: a processor without an SDK (a shell command, say) never syncs what it wrote.
    // An SDK's processor synced them with its last checkpoint, and then this costs next to
    // nothing. A few files are synced each as it is hashed (one open for both); many, with one
    // `syncfs` after.
    let sync_each = !atomic::syncs_filesystem(staged.len());
    let outputs = hash_staged(&staged, sync_each)?;
    if !sync_each {
        atomic::sync_files(staged.iter().map(|(_, abs)| abs.as_path()))?;
    }
    // Only the old outputs this publish does not produce again need naming (they are removed):
    // without them the journal's bytes are the marker's (see [`Journal`]).
    let previous_outputs = previous
        .map(|m| {
            let produced = produced_paths(&outputs);
            m.outputs
                .iter()
                .filter(|o| !produced.contains(o.path.as_str()))
                .map(|o| o.path.clone())
                .collect()
        })
        .unwrap_or_default();
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
        previous_outputs,
    };
    if let Err(err) = atomic::write_json(&target.journal, &journal) {
        *ingredients = journal.marker.ingredients;
        *items = journal.marker.items;
        return Err(err);
    }
    // Written flat: with no previous outputs its bytes are the marker's by construction (pinned
    // by `a_journal_without_previous_outputs_is_the_marker_byte_for_byte`; checked on every
    // publish of a debug build).
    let is_marker = journal.previous_outputs.is_empty();
    debug_assert!(
        !is_marker || json_digest(&journal)? == json_digest(&journal.marker)?,
        "a journal without previous outputs must serialise as its marker"
    );
    failpoint::hit("publish.after-journal");
    complete(target, journal, is_marker, Staged::JustListed, cache)
}

/// The paths of `outputs`.
fn produced_paths(outputs: &[OutputEntry]) -> BTreeSet<&str> {
    outputs.iter().map(|o| o.path.as_str()).collect()
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
        Ok(journal) => {
            // Renamed onto the marker only if its bytes are exactly the marker's (a journal of the
            // earlier nested format, or an edited one, is not).
            let is_marker = json_digest(&journal.marker)? == blake3::hash(&bytes);
            match complete(target, journal, is_marker, Staged::AsFound, cache) {
                Ok(_) => return Ok(Recovery::Completed),
                Err(err) if err.kind() == io::ErrorKind::InvalidData => err.to_string(),
                Err(err) => return Err(err),
            }
        }
        Err(err) => format!("unreadable publish journal: {err}"),
    };
    atomic::remove_if_exists(&target.marker)?;
    atomic::remove_if_exists(&target.journal)?;
    atomic::sync_dir(&target.output_dir)?;
    Ok(Recovery::Abandoned(outcome))
}

/// What [`complete`] may assume about the staging folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staged {
    /// [`publish`] listed it a moment ago under the workspace lock: every journal output is a
    /// regular file there, so each is renamed first and asked about only if that fails.
    JustListed,
    /// [`recover`] after a crash: any output may be staged or already moved, so each is looked at
    /// before it is moved.
    AsFound,
}

/// Steps after the journal (`journal_is_marker`: the journal file's bytes are the marker's, so it
/// is renamed onto it): idempotent, so a crash anywhere in them can be followed by a rerun.
fn complete(
    target: &Target,
    journal: Journal,
    journal_is_marker: bool,
    staged_state: Staged,
    cache: &mut StatCache,
) -> io::Result<Marker> {
    let out = &target.output_dir;
    if atomic::remove_if_exists(&target.progress)? {
        failpoint::hit("publish.after-progress-removed");
    }
    if atomic::remove_if_exists(&target.marker)? {
        atomic::sync_dir(out)?;
        failpoint::hit("publish.after-old-marker-removed");
    }
    // Hash sets: ordering 10,000 paths in a B-tree compares them component by component (a
    // fan-in's publish spent more time there than in its renames).
    let mut touched: HashSet<PathBuf> = HashSet::from([out.to_path_buf()]);
    if let Some(entry) = journal
        .marker
        .outputs
        .iter()
        .find(|e| !is_relative_inside(&e.path))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("journal names `{}` outside the output folder", entry.path),
        ));
    }
    let moved_whole = move_new_folders(target, &journal.marker.outputs)?;
    let renamed = rename_many(target, &journal.marker.outputs, &moved_whole, staged_state);
    // The staging folders the moves below empty (removed after the outputs are synced).
    let mut emptied: HashSet<PathBuf> = HashSet::new();
    for (i, entry) in journal.marker.outputs.iter().enumerate() {
        let staged = target.staging.join(&entry.path);
        let dest = out.join(&entry.path);
        let parent = dest.parent().expect("an output has a folder");
        if moved_whole.contains(top_folder(&entry.path)) {
            // Moved with its folder just now.
        } else if let Some(Some(meta)) = renamed.get(i) {
            // Renamed by `rename_many`, and stat'ed there after its move.
            failpoint::check("publish.after-output-rename")?;
            emptied.insert(staged.parent().expect("below staging").to_path_buf());
            touched.insert(parent.to_path_buf());
            cache.remember_stat(&dest, meta, &entry.blake3);
            continue;
        } else if move_output(&staged, &dest, staged_state)? {
            failpoint::check("publish.after-output-rename")?;
            emptied.insert(staged.parent().expect("below staging").to_path_buf());
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
    // A journal of the earlier format lists every old output, those produced again included.
    // The folders an output was moved into exist; those an old output was removed from may have
    // been removed with it (when it left them empty).
    let produced = produced_paths(&journal.marker.outputs);
    let mut pruned: HashSet<PathBuf> = HashSet::new();
    for old in &journal.previous_outputs {
        if !produced.contains(old.as_str()) && is_relative_inside(old) {
            let path = out.join(old);
            if atomic::remove_if_exists(&path)? {
                pruned.insert(path.parent().expect("has a folder").to_path_buf());
                remove_empty_dirs(path.parent(), out);
            }
        }
    }
    pruned.retain(|d| !touched.contains(d) && d.is_dir());
    atomic::sync_dirs(touched.iter().chain(&pruned).map(PathBuf::as_path))?;
    failpoint::hit("publish.after-outputs-synced");
    remove_staging(&target.staging, emptied)?;
    failpoint::hit("publish.after-staging-removed");
    if journal_is_marker {
        // The journal, written durably (fsynced) before any output moved, is the marker byte for
        // byte: one rename makes it the marker and retires the journal at once, atomically. A
        // power cut that undoes the rename leaves the journal and no marker, which the next build
        // completes again.
        std::fs::rename(&target.journal, &target.marker)?;
        atomic::sync_dir(out)?;
        failpoint::hit("publish.after-marker");
        return Ok(journal.marker);
    }
    atomic::write_json(&target.marker, &journal.marker)?;
    failpoint::hit("publish.after-marker");
    // The journal's removal is not synced: if a power cut undoes it, the next build finds the
    // journal beside the marker it names and completes it again (the outputs are in place with
    // their recorded hashes), which is the state a kill right after the marker leaves (the crash
    // sweep's `publish.after-marker`). One folder sync fewer per stage.
    atomic::remove_if_exists(&target.journal)?;
    Ok(journal.marker)
}

/// The first component of an output's relative path.
fn top_folder(path: &str) -> &str {
    path.split('/').next().expect("a path has a component")
}

/// How many outputs a publish has before [`rename_many`] renames them on all cores.
const RENAME_IN_PARALLEL_FROM: usize = 512;

/// For a publish of many outputs just listed ([`Staged::JustListed`]): renames each staged output
/// (not moved with its folder) into place on all cores and stats it there, as the loop in
/// [`complete`] would one after the other; `Some(stat)` for each output so moved. An output whose
/// rename failed (its folder missing, a folder in its way) is `None`, and the loop moves it the
/// careful way. Empty for fewer outputs, or after a crash, when what is staged is not known.
///
/// Cross-folder renames take one lock per filesystem, but looking up both paths and freeing the
/// inode a rename replaces happen outside it: a fan-in of 10,000 outputs spent ~115 ms in its
/// renames one after the other, a third of it freeing the outputs they replaced.
fn rename_many(
    target: &Target,
    outputs: &[OutputEntry],
    moved_whole: &BTreeSet<String>,
    staged_state: Staged,
) -> Vec<Option<std::fs::Metadata>> {
    use rayon::prelude::*;
    if staged_state != Staged::JustListed || outputs.len() < RENAME_IN_PARALLEL_FROM {
        return Vec::new();
    }
    outputs
        .par_iter()
        .with_min_len(256)
        .map(|entry| {
            if moved_whole.contains(top_folder(&entry.path)) {
                return None;
            }
            let dest = target.output_dir.join(&entry.path);
            std::fs::rename(target.staging.join(&entry.path), &dest).ok()?;
            // Renamed but not stat'ed, it is `None` too: the loop finds it in place, not staged,
            // and checks it by its hash (which stats it again and reports what fails).
            std::fs::metadata(&dest).ok()
        })
        .collect()
}

/// Moves the staged output `staged` to `dest`, creating `dest`'s folder and replacing a folder
/// in its place. `Ok(false)` if `staged` is not a regular file (so not staged any more).
///
/// A publish's outputs were all regular files when it listed them, so it renames first, which
/// for the usual output (its folder there, no folder in its way) is the only system call; only a
/// failed rename is looked into. Recovery looks first: what a crash left is not known.
fn move_output(staged: &Path, dest: &Path, staged_state: Staged) -> io::Result<bool> {
    if staged_state == Staged::JustListed && std::fs::rename(staged, dest).is_ok() {
        return Ok(true);
    }
    if !staged.is_file() {
        return Ok(false);
    }
    std::fs::create_dir_all(dest.parent().expect("an output has a folder"))?;
    if dest.is_dir() {
        std::fs::remove_dir_all(dest)?;
    }
    std::fs::rename(staged, dest)?;
    Ok(true)
}

/// Removes the staging folder once its outputs are moved out: the folders those moves emptied,
/// deepest first, then the staging folder itself, one `rmdir` each (where removing the whole tree
/// would open and read every folder first). Anything else left in it (an empty folder the
/// processor made, say) makes an `rmdir` fail, and then the rest of the tree is removed whole.
fn remove_staging(staging: &Path, emptied: HashSet<PathBuf>) -> io::Result<()> {
    let mut folders = emptied.clone();
    for dir in &emptied {
        folders.extend(
            dir.ancestors()
                .skip(1)
                .take_while(|a| a.starts_with(staging))
                .map(Path::to_path_buf),
        );
    }
    folders.insert(staging.to_path_buf());
    // A folder's path is a prefix of everything below it, so in descending byte order every
    // folder comes after its contents.
    let mut folders: Vec<PathBuf> = folders.into_iter().collect();
    folders.sort_unstable_by(|a, b| {
        b.as_os_str()
            .as_encoded_bytes()
            .cmp(a.as_os_str().as_encoded_bytes())
    });
    for dir in &folders {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(_) => break,
        }
    }
    match std::fs::remove_dir_all(staging) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Moves each staged top-level folder that does not exist in the output folder yet with one
/// rename, instead of creating it there and moving its files one by one (and removing it from the
/// staging folder after): only when it holds exactly the journal's outputs below it, as regular
/// files, and no empty folder, so the published tree is the same either way. Returns the folders
/// moved. A crash after any of these renames is completed like one after a file's: the outputs
/// are then in place with their recorded hashes.
fn move_new_folders(target: &Target, outputs: &[OutputEntry]) -> io::Result<BTreeSet<String>> {
    // Each top-level folder's outputs, gathered in one pass (looking them up among all outputs
    // per folder made a fan-in of 10,000 folders quadratic).
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for entry in outputs {
        if let Some((top, _)) = entry.path.split_once('/') {
            groups.entry(top).or_default().push(&entry.path);
        }
    }
    let mut moved = BTreeSet::new();
    for (top, listed) in groups {
        let staged = target.staging.join(top);
        let dest = target.output_dir.join(top);
        // The destination first: on a rerun it exists, and that settles it with one stat.
        if std::fs::symlink_metadata(&dest).is_ok()
            || !std::fs::symlink_metadata(&staged).is_ok_and(|m| m.is_dir())
        {
            continue;
        }
        if !holds_only_files(&staged, &listed)? {
            continue;
        }
        std::fs::rename(&staged, &dest)?;
        failpoint::check("publish.after-folder-rename")?;
        moved.insert(top.to_string());
    }
    Ok(moved)
}

/// Whether the staged top-level folder `dir` holds exactly the regular files `listed` (the
/// journal's outputs under it, staging-relative), and no empty folder and nothing else.
fn holds_only_files(dir: &Path, listed: &[&str]) -> io::Result<bool> {
    let mut files = 0usize;
    let mut dirs_seen = 0usize;
    let mut parents_of_entries: BTreeSet<PathBuf> = BTreeSet::new();
    for entry in WalkDir::new(dir) {
        let entry = entry.map_err(io::Error::other)?;
        let kind = entry.file_type();
        if kind.is_dir() {
            dirs_seen += 1;
        } else if kind.is_file() {
            files += 1;
        } else {
            return Ok(false);
        }
        if entry.depth() > 0 {
            if let Some(parent) = entry.path().parent() {
                parents_of_entries.insert(parent.to_path_buf());
            }
        }
    }
    if files != listed.len() || parents_of_entries.len() != dirs_seen {
        return Ok(false);
    }
    let staging = dir.parent().expect("below the staging folder");
    Ok(listed.iter().all(|path| staging.join(path).is_file()))
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

/// The marker entries of the staged files, in their order. Many small files (a fan-in's) are
/// hashed on all cores: opening and reading each is most of the cost, and the cores are free
/// while a stage publishes (its processor has ended). A big file is hashed on all cores anyway.
///
/// With `sync_each`, each file's data is also made durable (`fdatasync`) once it is hashed.
fn hash_staged(staged: &[(String, PathBuf)], sync_each: bool) -> io::Result<Vec<OutputEntry>> {
    use rayon::prelude::*;
    let entry = |(rel, abs): &(String, PathBuf)| -> io::Result<OutputEntry> {
        let mut file = std::fs::File::open(abs)?;
        let size = file.metadata()?.len();
        let blake3 = hash_open_file(&mut file, size)?;
        if sync_each {
            file.sync_data()?;
        }
        Ok(OutputEntry {
            path: rel.clone(),
            size,
            blake3,
        })
    };
    if staged.len() < HASH_IN_PARALLEL_FROM {
        staged.iter().map(entry).collect()
    } else {
        staged.par_iter().with_min_len(16).map(entry).collect()
    }
}

/// See [`hash_staged`]: below this many files, handing them to the pool costs more than it saves.
const HASH_IN_PARALLEL_FROM: usize = 64;

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

    /// The bytes [`atomic::write_json`] writes for `value`.
    fn json_bytes<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    #[test]
    fn many_staged_files_are_hashed_on_all_cores_into_the_same_entries_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..HASH_IN_PARALLEL_FROM * 3 {
            let sub = dir.path().join(format!("d{:03}", i % 7));
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(
                sub.join(format!("f{i:04}.txt")),
                format!("line {i}\n").repeat(i),
            )
            .unwrap();
        }
        let staged = staged_files(dir.path()).unwrap();
        assert!(staged.len() >= HASH_IN_PARALLEL_FROM);
        let entries = hash_staged(&staged, false).unwrap();
        // Syncing each file as it is hashed changes nothing in what is recorded.
        assert_eq!(hash_staged(&staged, true).unwrap(), entries);
        assert_eq!(entries.len(), staged.len());
        for ((rel, abs), entry) in staged.iter().zip(&entries) {
            let bytes = std::fs::read(abs).unwrap();
            assert_eq!(&entry.path, rel);
            assert_eq!(entry.size, bytes.len() as u64);
            assert_eq!(entry.blake3, blake3::hash(&bytes).to_hex().to_string());
        }
        // Sorted as the staging walk yields them (the marker's order).
        let mut sorted = entries.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        sorted.sort();
        assert_eq!(
            sorted,
            entries.iter().map(|e| e.path.clone()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_digest_is_that_of_the_file_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.publishing");
        for previous_outputs in [vec![], vec!["old.txt".to_string()]] {
            let journal = Journal {
                marker: marker(),
                previous_outputs,
            };
            atomic::write_json(&path, &journal).unwrap();
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(json_digest(&journal).unwrap(), blake3::hash(&on_disk));
            assert_eq!(on_disk, json_bytes(&journal).unwrap());
        }
    }

    fn marker() -> Marker {
        let mut items = BTreeMap::new();
        items.insert(
            "a.txt".to_string(),
            ItemEntry {
                fingerprint: "f1".into(),
                outputs: vec!["a.txt".into()],
            },
        );
        Marker {
            version: MARKER_VERSION,
            stage: "s".into(),
            fingerprint: "abc".into(),
            run_id: "r1".into(),
            finished_at: "2026-11-30T09:00:00Z".into(),
            outputs: vec![OutputEntry {
                path: "a.txt".into(),
                size: u64::MAX,
                blake3: "00ff".into(),
            }],
            ingredients: Ingredients {
                schema: 1,
                stage: "s".into(),
                processor: crate::fingerprint::ProcessorIdentity {
                    command: vec!["builtin:upper@1".into()],
                    version: "1".into(),
                    files: BTreeMap::from([("p.py".to_string(), "aa".to_string())]),
                },
                params: serde_json::json!({"mode": "ascii", "n": -3, "x": 1.5, "deep": {"b": [1, null]}}),
                inputs: BTreeMap::from([("in/a.txt".to_string(), "bb".to_string())]),
            },
            items,
        }
    }

    #[test]
    fn a_journal_without_previous_outputs_is_the_marker_byte_for_byte() {
        let journal = Journal {
            marker: marker(),
            previous_outputs: Vec::new(),
        };
        let bytes = json_bytes(&journal).unwrap();
        assert_eq!(bytes, json_bytes(&journal.marker).unwrap());
        let back: Journal = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, journal);
        // And what was renamed into place reads as the marker.
        let read: Marker = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(read, journal.marker);
    }

    #[test]
    fn a_journal_with_previous_outputs_round_trips_and_is_not_a_marker() {
        let journal = Journal {
            marker: marker(),
            previous_outputs: vec!["old.txt".into()],
        };
        let bytes = json_bytes(&journal).unwrap();
        assert_ne!(bytes, json_bytes(&journal.marker).unwrap());
        let back: Journal = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, journal);
    }

    #[test]
    fn a_journal_of_the_earlier_nested_format_is_still_read() {
        let m = marker();
        let old = serde_json::json!({"marker": m, "previousOutputs": ["old.txt"]});
        let back: Journal = serde_json::from_slice(old.to_string().as_bytes()).unwrap();
        assert_eq!(back.marker, m);
        assert_eq!(back.previous_outputs, vec!["old.txt".to_string()]);
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut found: Vec<String> = WalkDir::new(root)
            .min_depth(1)
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if e.file_type().is_dir() {
                    format!("{rel}/")
                } else {
                    format!("{rel}={}", std::fs::read_to_string(e.path()).unwrap())
                }
            })
            .collect();
        found.sort();
        found
    }

    /// Stage `s` publishing into `dir/out`: the output folder and the target.
    fn target_in(dir: &Path) -> (PathBuf, Target) {
        let out = dir.join("out");
        let target = Target {
            stage: "s".into(),
            staging: out.join(".pipe-staging"),
            output_dir: out.clone(),
            marker: out.join(".s.done"),
            journal: out.join(".s.publishing"),
            progress: dir.join("progress_s.json"),
        };
        (out, target)
    }

    #[test]
    fn new_folders_move_whole_and_the_published_tree_is_the_same_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let (out, target) = target_in(dir.path());
        let put = |rel: &str, text: &str| {
            let path = target.staging.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        put("top.txt", "t");
        put("new/x.txt", "x");
        put("new/deep/y.txt", "y");
        put("has-empty/z.txt", "z"); // holds an empty folder: moved file by file
        std::fs::create_dir_all(target.staging.join("has-empty/empty")).unwrap();
        put("old/w.txt", "w"); // exists in the output folder already: moved file by file
        std::fs::create_dir_all(out.join("old")).unwrap();
        std::fs::write(out.join("old/keep.txt"), "k").unwrap();
        use std::os::unix::fs::MetadataExt;
        let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
        let (new_ino, has_empty_ino) = (
            ino(target.staging.join("new")),
            ino(target.staging.join("has-empty")),
        );
        let mut ingredients = marker().ingredients;
        let mut cache = StatCache::default();
        let m = publish(
            &target,
            None,
            "r",
            "f",
            &mut ingredients,
            &mut BTreeMap::new(),
            &mut cache,
        )
        .unwrap();
        assert_eq!(m.outputs.len(), 5);
        assert_eq!(
            tree(&out),
            vec![
                ".s.done=".to_string() + &String::from_utf8(json_bytes(&m).unwrap()).unwrap(),
                "has-empty/".into(),
                "has-empty/z.txt=z".into(),
                "new/".into(),
                "new/deep/".into(),
                "new/deep/y.txt=y".into(),
                "new/x.txt=x".into(),
                "old/".into(),
                "old/keep.txt=k".into(),
                "old/w.txt=w".into(),
                "top.txt=t".into(),
            ]
        );
        assert_eq!(ino(out.join("new")), new_ino, "`new` was moved whole");
        assert_ne!(ino(out.join("has-empty")), has_empty_ino);
        assert!(!target.staging.exists() && !target.journal.exists());
        // The stat cache learnt every published file, moved whole or not.
        for o in &m.outputs {
            assert!(cache.remember(&out.join(&o.path), &o.blake3).is_ok());
        }
    }

    #[test]
    fn a_rerun_replaces_outputs_makes_missing_folders_removes_old_ones_and_the_staging() {
        rerun_case(0);
    }

    #[test]
    fn a_rerun_of_many_outputs_renamed_on_all_cores_publishes_the_same_tree() {
        rerun_case(RENAME_IN_PARALLEL_FROM);
    }

    /// A rerun publishing the outputs below, plus `many` more in `many/` (which exists in the
    /// output folder, so they are renamed file by file, not moved with their folder).
    fn rerun_case(many: usize) {
        let dir = tempfile::tempdir().unwrap();
        let (out, target) = target_in(dir.path());
        let put = |root: &Path, rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        // The previous run's outputs, and a folder where this run publishes a file.
        for (rel, text) in [
            ("a/1.txt", "old1"),
            ("b/2.txt", "old2"),
            ("gone/x/old.txt", "o"),
        ] {
            put(&out, rel, text);
        }
        put(&out, "c.txt/junk", "j");
        let many_files: Vec<(String, String)> = (0..many)
            .map(|i| (format!("many/{i:05}.txt"), format!("m{i}")))
            .collect();
        if many > 0 {
            put(&out, "many/00000.txt", "old m0");
        }
        let mut previous = marker();
        previous.outputs = ["a/1.txt", "b/2.txt", "gone/x/old.txt"]
            .iter()
            .map(|p| OutputEntry {
                path: p.to_string(),
                size: 1,
                blake3: "00".into(),
            })
            .collect();
        for (rel, text) in [
            ("a/1.txt", "new1"),
            ("a/sub/deeper/4.txt", "four"),
            ("b/2.txt", "new2"),
            ("c.txt", "c"),
            ("top.txt", "t"),
        ] {
            put(&target.staging, rel, text);
        }
        for (rel, text) in &many_files {
            put(&target.staging, rel, text);
        }
        let mut cache = StatCache::default();
        let m = publish(
            &target,
            Some(&previous),
            "r2",
            "f2",
            &mut marker().ingredients,
            &mut BTreeMap::new(),
            &mut cache,
        )
        .unwrap();
        let mut expected = vec![
            "a/".to_string(),
            "a/1.txt=new1".into(),
            "a/sub/".into(),
            "a/sub/deeper/".into(),
            "a/sub/deeper/4.txt=four".into(),
            "b/".into(),
            "b/2.txt=new2".into(),
            "c.txt=c".into(),
            "top.txt=t".into(),
        ];
        if many > 0 {
            expected.push("many/".into());
            expected.extend(many_files.iter().map(|(rel, text)| format!("{rel}={text}")));
        }
        expected
            .push(".s.done=".to_string() + &String::from_utf8(json_bytes(&m).unwrap()).unwrap());
        expected.sort();
        assert_eq!(tree(&out), expected);
        assert!(!target.staging.exists() && !target.journal.exists());
        assert_eq!(m.outputs.len(), 5 + many);
        // Every output's stat is recorded as it is now, in place (not as it was staged).
        for o in &m.outputs {
            let now = crate::hashing::StatKey::of(&std::fs::metadata(out.join(&o.path)).unwrap());
            assert_eq!(
                cache.recorded_stat(&out.join(&o.path)),
                Some(now),
                "{}",
                o.path
            );
        }
    }

    #[test]
    fn marker_paths_must_stay_inside() {
        assert!(is_relative_inside("a/b.txt"));
        assert!(!is_relative_inside("../b.txt"));
        assert!(!is_relative_inside("/etc/passwd"));
        assert!(!is_relative_inside("a//b"));
        assert!(!is_relative_inside(""));
    }
}
