//! The skip memo (`cache/skip-v1.json`): which stages a build found unchanged, and the `stat` of
//! every file and folder that verdict rested on.
//!
//! Deciding that a stage is unchanged the full way ([`crate::plan::decide`]) lists its inputs,
//! fingerprints them (through the stat cache), reads and parses its marker and checks every
//! output the marker lists. At 10,000 stages that is most of a no-op build. The memo lets the next
//! build re-verify such a stage with one `stat` per path instead: if the stage's definition is the
//! same and every watched path has the same (size, mtime, ctime, inode) — or is still absent — the
//! verdict still holds, and the stage is skipped with the fingerprint and run id its marker had.
//!
//! What is watched: every input file and every folder the input listing walked (a file added to
//! or removed from a folder changes the folder's mtime), each input's base path (also when absent:
//! a glob over a missing folder), the processor's files, the marker and every output the marker
//! lists. ctime cannot be set from user space and changes with every write, rename, link or
//! chmod, so an edit that restores the old mtime still invalidates the verdict.
//!
//! The output folder itself is not watched: what else appears in it does not change a verdict,
//! except a publish journal, and a journal exists only if a build ran the stage (and so dropped
//! its entry) or died while publishing it (then the next build completes the publish up front,
//! which rewrites or removes the marker, before any verdict is looked at).
//!
//! Like the stat cache, a verdict is only remembered when everything it rests on is clearly older
//! than the moment it was checked (git's "racy clean" problem: a write in the same timestamp tick
//! could leave the stat unchanged), so a stage that just ran is verified the full way once more
//! before it is memoised. The memo is an accelerator: a missing, torn or foreign file is an empty
//! memo, it is written without fsync, and an entry whose stats no longer match is simply not used.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hashing::{now_ns, StatKey, RACY_WINDOW_NS};
use crate::plan::StagePlan;
use crate::spec::{Processor, Spec, Stage};
use crate::workspace::Workspace;

/// Version of the memo format and of what it watches; bumping it discards every entry.
const MEMO_VERSION: u32 = 2;

/// One stage found unchanged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    /// [`definition_key`] of the stage when it was checked.
    key: String,
    /// The marker's fingerprint and run id (recorded in the audit log when the stage is skipped).
    fingerprint: String,
    run_id: String,
    /// Watched paths, as indices into [`Stored::paths`].
    watch: Vec<u32>,
    /// [`digest`] of the watched paths' stats, in order.
    stats: String,
    /// The key was found equal to the stage's current one by this build.
    #[serde(skip)]
    current: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// The engine version that wrote the memo: another version decides the full way once.
    engine: String,
    /// Every watched path once (root-relative when inside the root): a fan-in watches what its
    /// upstream stages watch, and a path id makes this build's stat of it shareable without
    /// hashing strings.
    paths: Vec<String>,
    stages: HashMap<String, Entry>,
}

/// The memo of one build.
#[derive(Debug)]
pub struct SkipMemo {
    stored: Stored,
    dirty: bool,
    /// Stats taken by this build, by path id, shared between stages; only those taken in the
    /// current generation count (a stage that publishes starts a new one: O(1), not O(paths)).
    seen: Vec<(u32, Option<StatKey>)>,
    generation: u32,
    /// Path → id, built when the first new entry is remembered.
    ids: Option<HashMap<String, u32>>,
    /// The project folder, opened once: stats relative to it skip the walk over its ancestors.
    root: Option<Root>,
}

impl SkipMemo {
    /// Loads the memo; anything unreadable gives an empty one.
    pub fn load(path: &Path) -> SkipMemo {
        let stored = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Stored>(&bytes).ok())
            .filter(|s| s.version == MEMO_VERSION && s.engine == env!("CARGO_PKG_VERSION"))
            .filter(|s| {
                let n = s.paths.len();
                s.stages
                    .values()
                    .all(|e| e.watch.iter().all(|&id| (id as usize) < n))
            })
            .unwrap_or_default();
        SkipMemo {
            seen: vec![(0, None); stored.paths.len()],
            generation: 1,
            stored,
            dirty: false,
            ids: None,
            root: None,
        }
    }

    /// Writes the memo (atomically, without fsync) if it changed, keeping only stages of `spec`
    /// and the paths they watch.
    pub fn save(&mut self, path: &Path, spec: &Spec) -> io::Result<()> {
        let before = self.stored.stages.len();
        let names: std::collections::HashSet<&str> =
            spec.stages.iter().map(|s| s.name.as_str()).collect();
        self.stored
            .stages
            .retain(|name, _| names.contains(name.as_str()));
        if !self.dirty && self.stored.stages.len() == before {
            return Ok(());
        }
        // Renumber the paths still watched, in first-use order.
        let mut renumbered: Vec<Option<u32>> = vec![None; self.stored.paths.len()];
        let mut paths = Vec::new();
        let mut stages: Vec<(&String, &mut Entry)> = self.stored.stages.iter_mut().collect();
        stages.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (_, entry) in stages {
            for id in &mut entry.watch {
                let new = *renumbered[*id as usize].get_or_insert_with(|| {
                    paths.push(std::mem::take(&mut self.stored.paths[*id as usize]));
                    (paths.len() - 1) as u32
                });
                *id = new;
            }
        }
        self.stored.paths = paths;
        self.seen = vec![(0, None); self.stored.paths.len()];
        self.ids = None;
        self.stored.version = MEMO_VERSION;
        self.stored.engine = env!("CARGO_PKG_VERSION").to_string();
        let bytes = serde_json::to_vec(&self.stored).map_err(io::Error::other)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::atomic::replace_volatile(path, &bytes)?;
        self.dirty = false;
        Ok(())
    }

    /// Stats, on all cores, every path watched by a remembered stage whose definition is
    /// unchanged (a no-op build of 10,000 stages: ~40,000 `stat` calls, mostly path lookup).
    pub fn prefetch(&mut self, spec: &Spec) {
        let mut wanted = vec![false; self.stored.paths.len()];
        for stage in &spec.stages {
            if let Some(entry) = self.stored.stages.get_mut(&stage.name) {
                entry.current = entry.key == definition_key(spec, stage);
                if entry.current {
                    for &id in &entry.watch {
                        wanted[id as usize] = true;
                    }
                }
            }
        }
        use rayon::prelude::*;
        let root = Root::open(spec);
        let paths = &self.stored.paths;
        let generation = self.generation;
        self.seen = wanted
            .par_iter()
            .enumerate()
            .with_min_len(1024)
            .map(
                |(id, &wanted)| match wanted.then(|| root.stat(spec, &paths[id])) {
                    Some(Ok(stat)) => (generation, stat),
                    _ => (0, None),
                },
            )
            .collect();
        self.root = Some(root);
    }

    /// If `stage` was found unchanged before and nothing it rests on changed since: the
    /// fingerprint and run id of its marker.
    pub fn unchanged(&mut self, spec: &Spec, stage: &Stage) -> Option<(String, String)> {
        let entry = self.stored.stages.get(&stage.name)?;
        if !entry.current && entry.key != definition_key(spec, stage) {
            return None;
        }
        let root = self.root.get_or_insert_with(|| Root::open(spec));
        let mut stats = Vec::with_capacity(entry.watch.len());
        for &id in &entry.watch {
            let slot = &mut self.seen[id as usize];
            if slot.0 != self.generation {
                *slot = (
                    self.generation,
                    root.stat(spec, &self.stored.paths[id as usize]).ok()?,
                );
            }
            stats.push(slot.1);
        }
        (digest(&stats) == entry.stats).then(|| (entry.fingerprint.clone(), entry.run_id.clone()))
    }

    /// The id of `path` (root-relative or absolute), added to the table if new.
    fn id_of(&mut self, path: String) -> u32 {
        let ids = self.ids.get_or_insert_with(|| {
            self.stored
                .paths
                .iter()
                .enumerate()
                .map(|(id, p)| (p.clone(), id as u32))
                .collect()
        });
        *ids.entry(path).or_insert_with_key(|path| {
            self.stored.paths.push(path.clone());
            self.seen.push((0, None));
            (self.stored.paths.len() - 1) as u32
        })
    }

    /// Remembers that `plan` (a full decision) found its stage unchanged, if everything the verdict
    /// rests on is old enough to be trusted; otherwise forgets the stage.
    pub fn remember(&mut self, spec: &Spec, ws: &Workspace, plan: &StagePlan) {
        let stage = &spec.stages[plan.stage];
        let (Some(inputs), Some(marker)) = (&plan.inputs, &plan.marker) else {
            self.forget(&stage.name);
            return;
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        paths.extend(stage.inputs.iter().map(|i| spec.path(i.base())));
        paths.extend(inputs.dirs.iter().cloned());
        paths.extend(inputs.files.values().cloned());
        if let Processor::Command { files, .. } = &stage.processor {
            for file in files {
                paths.extend(
                    walkdir::WalkDir::new(spec.path(file))
                        .sort_by_file_name()
                        .into_iter()
                        .filter_map(Result::ok)
                        .map(walkdir::DirEntry::into_path),
                );
            }
        }
        paths.push(ws.marker_file(&stage.output_dir, &stage.name));
        let out_dir = ws.output_dir(&stage.output_dir);
        paths.extend(marker.outputs.iter().map(|o| out_dir.join(&o.path)));

        let trusted_before = now_ns() - RACY_WINDOW_NS;
        let mut stats = Vec::with_capacity(paths.len());
        for path in &paths {
            match stat_of(path) {
                Ok(Some(s)) if s.mtime_ns.max(s.ctime_ns) >= trusted_before => {
                    return self.forget(&stage.name);
                }
                Ok(stat) => stats.push(stat),
                Err(_) => return self.forget(&stage.name),
            }
        }
        let watch = paths
            .iter()
            .map(|p| self.id_of(relative(spec, p)))
            .collect();
        let entry = Entry {
            key: definition_key(spec, stage),
            fingerprint: marker.fingerprint.clone(),
            run_id: marker.run_id.clone(),
            watch,
            stats: digest(&stats),
            current: true,
        };
        self.stored.stages.insert(stage.name.clone(), entry);
        self.dirty = true;
    }

    /// Drops what is remembered about `stage` (it runs, failed, or cannot be memoised).
    pub fn forget(&mut self, stage: &str) {
        self.dirty |= self.stored.stages.remove(stage).is_some();
    }

    /// Forgets the stats taken so far: a stage published, so they may be out of date.
    pub fn files_changed(&mut self) {
        self.generation += 1;
    }
}

/// What a stage's verdict depends on in the Pipefile: its name, processor, inputs, output folder,
/// params and kind, the project folder, and the engine version (whose planning rules may differ).
fn definition_key(spec: &Spec, stage: &Stage) -> String {
    let mut hasher = blake3::Hasher::new();
    let params = serde_json::to_string(&stage.params).unwrap_or_default();
    // Debug formatting of validated values: deterministic within one engine version (the memo is
    // discarded when the version changes, and a formatting change only costs one full decision).
    let text = format!(
        "{MEMO_VERSION}\0{}\0{}\0{}\0{:?}\0{:?}\0{}\0{params}\0{}",
        env!("CARGO_PKG_VERSION"),
        spec.root.display(),
        stage.name,
        stage.processor,
        stage.inputs,
        stage.output_dir,
        stage.map,
    );
    hasher.update(text.as_bytes());
    hasher.finalize().to_hex()[..32].to_string()
}

/// The stat of `path` (following symlinks, as input listing does); `None` when it does not exist.
fn stat_of(path: &Path) -> io::Result<Option<StatKey>> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(StatKey::of(&meta))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// The project folder as a descriptor (`None` if it cannot be opened: stats use whole paths).
#[derive(Debug)]
struct Root(Option<std::os::fd::OwnedFd>);

impl Root {
    fn open(spec: &Spec) -> Root {
        use rustix::fs::{Mode, OFlags};
        Root(
            rustix::fs::open(
                &spec.root,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok(),
        )
    }

    /// The same as [`stat_of`] on [`absolute`]`(spec, stored)`, cheaper for root-relative paths.
    fn stat(&self, spec: &Spec, stored: &str) -> io::Result<Option<StatKey>> {
        let Some(fd) = self.0.as_ref().filter(|_| !stored.starts_with('/')) else {
            return stat_of(&absolute(spec, stored));
        };
        let rel = if stored.is_empty() { "." } else { stored };
        match rustix::fs::statat(fd, rel, rustix::fs::AtFlags::empty()) {
            Ok(st) => Ok(Some(StatKey {
                size: st.st_size as u64,
                mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
                ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
                inode: st.st_ino,
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}

/// A short hash of stats (absent paths included).
fn digest(stats: &[Option<StatKey>]) -> String {
    let mut hasher = blake3::Hasher::new();
    for stat in stats {
        match stat {
            None => hasher.update(&[0]),
            Some(s) => hasher
                .update(&[1])
                .update(&s.size.to_le_bytes())
                .update(&s.mtime_ns.to_le_bytes())
                .update(&s.ctime_ns.to_le_bytes())
                .update(&s.inode.to_le_bytes()),
        };
    }
    hasher.finalize().to_hex()[..32].to_string()
}

fn relative(spec: &Spec, path: &Path) -> String {
    match path.strip_prefix(&spec.root) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => path.to_string_lossy().into_owned(),
    }
}

fn absolute(spec: &Spec, stored: &str) -> PathBuf {
    if stored.starts_with('/') {
        PathBuf::from(stored)
    } else {
        spec.root.join(stored)
    }
}
