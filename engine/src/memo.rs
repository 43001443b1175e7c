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
//!
//! The stats kept for the files the decision hashed (inputs, processor files, outputs) are the ones
//! it took just before reading each ([`crate::hashing::StatCache::observe`]), not stats taken
//! afterwards: a file changed after its stat has another stat when the memo is next asked, and no
//! stat is kept of a version the decision did not read. The other paths are stat'ed then.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::hashing::{now_ns, Observed, StatKey, RACY_WINDOW_NS};
use crate::plan::StagePlan;
use crate::spec::{Input, Processor, Spec, Stage};
use crate::workspace::Workspace;

/// Version of the memo format, of what it watches and of the definition key; bumping it discards
/// every entry.
const MEMO_VERSION: u32 = 3;

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

/// What [`SkipMemo::save`] writes: [`Stored`] with the entries of the spec's stages, in name order.
#[derive(Serialize)]
struct ToStore<'a> {
    version: u32,
    engine: &'a str,
    paths: &'a [String],
    #[serde(serialize_with = "entries_by_name")]
    stages: Vec<(&'a str, &'a Entry)>,
}

fn entries_by_name<S: serde::Serializer>(
    entries: &[(&str, &Entry)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(entries.iter().copied())
}

/// The memo of one build.
#[derive(Debug)]
pub struct SkipMemo {
    /// The watched paths, by id (the stored table, moved out of the file's [`Stored`]; shared with
    /// the prefetch workers, copied only if a path is added while they run).
    paths: Arc<Vec<String>>,
    /// The entry of each stage of the spec, by stage index (looked up by name once, on load).
    entries: Vec<Option<Entry>>,
    dirty: bool,
    /// Stats taken by this build after a stage published, by path id, shared between stages;
    /// only those taken in the current generation count (a stage that publishes starts a new
    /// one: O(1), not O(paths)). Grown when first needed.
    seen: Vec<(u32, Option<StatKey>)>,
    generation: u32,
    /// Stats of generation 1 (before any stage published), taken on the pool from
    /// [`SkipMemo::prefetch`] on while the build goes on.
    prefetched: Option<Arc<Prefetch>>,
    /// Path → id, built when the first new entry is remembered.
    ids: Option<HashMap<String, u32>>,
    /// The project folder, opened once: stats relative to it skip the walk over its ancestors.
    root: Option<Arc<Root>>,
    /// The project folder's path (for paths outside it, stored absolute).
    project: PathBuf,
}

/// The stats of the watched paths of the stages whose definition is unchanged, taken by pool
/// workers in the order the stages are decided, while the coordinator decides them: a stage
/// whose stats are not taken yet takes them itself (each path is stat'ed once).
#[derive(Debug)]
struct Prefetch {
    paths: Arc<Vec<String>>,
    root: Arc<Root>,
    project: PathBuf,
    /// By path id: the stat (`None` inside when absent), `None` when it failed.
    slots: Vec<std::sync::OnceLock<Option<Option<StatKey>>>>,
    /// Path ids in the order stages want them, and the next one a worker takes.
    order: Vec<u32>,
    next: std::sync::atomic::AtomicUsize,
    /// Set when the stats would be of no use any more (a stage published).
    stop: std::sync::atomic::AtomicBool,
}

/// Path ids a prefetch worker takes at a time.
const PREFETCH_CHUNK: usize = 64;

impl Prefetch {
    /// The stats of `paths` to take, in the order of `order` (path ids).
    fn new(paths: Arc<Vec<String>>, root: Arc<Root>, project: PathBuf, order: Vec<u32>) -> Self {
        Prefetch {
            slots: (0..paths.len())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            paths,
            root,
            project,
            order,
            next: Default::default(),
            stop: Default::default(),
        }
    }

    /// Puts every thread of the pool to work on it.
    fn start_on_pool(self: &Arc<Self>) {
        for _ in 0..rayon::current_num_threads() {
            let prefetch = self.clone();
            rayon::spawn(move || prefetch.work());
        }
    }

    /// The stat of path `id`, taken now if no one took it yet.
    fn stat(&self, id: u32) -> Option<Option<StatKey>> {
        *self.slots[id as usize].get_or_init(|| self.take_stat(id))
    }

    /// A new stat of path `id` (`None` when it failed).
    fn take_stat(&self, id: u32) -> Option<Option<StatKey>> {
        self.root.stat(&self.project, &self.paths[id as usize]).ok()
    }

    /// A worker: takes the next chunk of ids until all are taken or the build stops needing them.
    fn work(&self) {
        use std::sync::atomic::Ordering;
        while !self.stop.load(Ordering::Relaxed) {
            let start = self.next.fetch_add(PREFETCH_CHUNK, Ordering::Relaxed);
            if start >= self.order.len() {
                break;
            }
            let end = (start + PREFETCH_CHUNK).min(self.order.len());
            for &id in &self.order[start..end] {
                // Taken outside the slot, then offered: the coordinator asking for this path
                // meanwhile takes its own stat instead of waiting for this thread, which may be
                // the reading thread under `SCHED_IDLE`, starved while the pool is busy.
                let slot = &self.slots[id as usize];
                if slot.get().is_none() {
                    let _ = slot.set(self.take_stat(id));
                }
            }
        }
    }
}

/// Which file was read: its identity and every stat field a rewrite changes (pipe replaces the
/// memo by rename, so a rewrite is a new inode; any edit in place changes mtime and ctime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    inode: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        let key = StatKey::of(meta);
        FileId {
            dev: meta.dev(),
            inode: key.inode,
            size: key.size,
            mtime_ns: key.mtime_ns,
            ctime_ns: key.ctime_ns,
        }
    }
}

/// The memo file as read: `None` when there was none; `Some(None)` when what was read cannot be
/// vouched for (it changed while it was read).
type Read = (Option<Option<FileId>>, Stored);

/// Reads and parses the memo file (anything unusable is an empty memo).
fn read(path: &Path) -> Read {
    use std::io::Read as _;
    let Ok(mut file) = std::fs::File::open(path) else {
        return (
            match std::fs::metadata(path) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                _ => Some(None),
            },
            Stored::default(),
        );
    };
    let before = file.metadata().ok().map(|m| FileId::of(&m));
    let mut bytes = Vec::new();
    let stored = file
        .read_to_end(&mut bytes)
        .ok()
        .and_then(|_| serde_json::from_slice::<Stored>(&bytes).ok())
        .filter(|s| s.version == MEMO_VERSION && s.engine == env!("CARGO_PKG_VERSION"))
        .filter(|s| {
            let n = s.paths.len();
            s.stages
                .values()
                .all(|e| e.watch.iter().all(|&id| (id as usize) < n))
        })
        .unwrap_or_default();
    let after = file.metadata().ok().map(|m| FileId::of(&m));
    (Some(before.filter(|_| before == after)), stored)
}

/// The memo file being read and parsed on another thread (while the Pipefile is validated,
/// before the workspace lock is taken). [`SkipMemo::load_read`] uses what it read only if the
/// file is still the one it read once the lock is held; otherwise it reads the file again.
///
/// A build that took the workspace lock early ([`crate::lock::EarlyLock`]) also has the thread
/// go on to stat every path the memo watches, at the lowest CPU priority: those stats are what
/// a no-op build waits for once its Pipefile is validated, and the validation leaves CPU idle.
/// They are taken under the lock, so no build or clean can change what they see; the build
/// drops them if it has to recover what a dead holder left ([`SkipMemo::drop_early_stats`]).
#[derive(Debug, Clone)]
pub struct Reading {
    path: PathBuf,
    read: Arc<std::sync::Mutex<Option<std::sync::mpsc::Receiver<ReadAhead>>>>,
}

/// What the reading thread hands over: the memo as read, and the stats it started taking.
type ReadAhead = (Read, Option<Arc<Prefetch>>);

impl Reading {
    /// Starts reading the memo file `path`.
    pub fn start(path: PathBuf) -> Reading {
        Reading::spawn(path, None)
    }

    /// Starts reading the memo file `path`, then taking the stats of the paths it watches
    /// (relative to `project`). Only with the workspace lock held.
    pub fn start_with_stats(path: PathBuf, project: PathBuf) -> Reading {
        Reading::spawn(path, Some(project))
    }

    fn spawn(path: PathBuf, stats_of: Option<PathBuf>) -> Reading {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        let spawned = {
            let path = path.clone();
            std::thread::Builder::new()
                .name("pipe-memo-read".into())
                .spawn(move || {
                    let (id, mut stored) = read(&path);
                    let early = stats_of
                        .filter(|_| !stored.paths.is_empty())
                        .map(|project| {
                            let paths = Arc::new(std::mem::take(&mut stored.paths));
                            let order = (0..paths.len() as u32).collect();
                            let root = Arc::new(Root::open(&project));
                            Arc::new(Prefetch::new(paths, root, project, order))
                        });
                    let _ = sender.send(((id, stored), early.clone()));
                    if let Some(early) = early {
                        // Only on CPU the build leaves idle: the validation is on the critical
                        // path. The build's pool joins in once the Pipefile is loaded.
                        run_when_idle();
                        early.work();
                    }
                })
        };
        Reading {
            path,
            read: Arc::new(std::sync::Mutex::new(spawned.ok().map(|_| receiver))),
        }
    }

    /// What was read from `path`, if it was read from this very file as it is now, with the
    /// stats being taken of the paths it watches, if any.
    fn take(&self, path: &Path) -> Option<(Stored, Option<Arc<Prefetch>>)> {
        let receiver = self.read.lock().ok()?.take()?;
        let (read, early) = receiver.recv().ok()?;
        let stop = || {
            if let Some(early) = &early {
                early.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        if self.path != path {
            stop();
            return None;
        }
        match still_current(read, path) {
            Some(stored) => Some((stored, early)),
            None => {
                stop();
                None
            }
        }
    }
}

/// Puts the calling thread under `SCHED_IDLE`: it runs only on a CPU nothing else wants, and the
/// kernel counts that CPU as idle when it places a waking thread (a thread at nice 19 is not:
/// measured, it kept a core from the validation's pool). Failure leaves the thread as it was.
fn run_when_idle() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler is the system call this needs; pid 0 is the calling thread, and
    // `param` is a valid, initialised struct that outlives the call.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

/// What `read` read from `path`, if `path` is still the file it read (or still absent).
fn still_current((read_id, stored): Read, path: &Path) -> Option<Stored> {
    let now = match std::fs::metadata(path) {
        Ok(meta) => Some(FileId::of(&meta)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(_) => return None,
    };
    match (read_id, now) {
        (Some(Some(then)), Some(now)) if then == now => Some(stored),
        // None then and none now: the empty memo.
        (None, None) => Some(stored),
        _ => None,
    }
}

impl SkipMemo {
    /// Loads the memo for the stages of `spec`; anything unreadable gives an empty one.
    pub fn load(path: &Path, spec: &Spec) -> SkipMemo {
        SkipMemo::of(read(path).1, spec)
    }

    /// [`SkipMemo::load`], with what `reading` read if the file at `path` is still the one it
    /// read (call with the workspace lock held: no build can replace the file any more).
    pub fn load_read(reading: &Reading, path: &Path, spec: &Spec) -> SkipMemo {
        match reading.take(path) {
            Some((stored, early)) => {
                let mut memo = SkipMemo::of(stored, spec);
                if let Some(early) = early {
                    memo.paths = early.paths.clone();
                    memo.root = Some(early.root.clone());
                    memo.prefetched = Some(early);
                }
                memo
            }
            None => SkipMemo::load(path, spec),
        }
    }

    /// Drops the stats taken before the build changed anything (a build that completes what a
    /// dead holder left changes files those stats saw).
    pub fn drop_early_stats(&mut self) {
        self.stop_prefetch();
        self.prefetched = None;
    }

    fn of(mut stored: Stored, spec: &Spec) -> SkipMemo {
        let entries = spec
            .stages
            .iter()
            .map(|stage| stored.stages.remove(&stage.name))
            .collect();
        // Entries of stages the spec no longer has are dropped: the memo is rewritten without them.
        let dropped = !stored.stages.is_empty();
        SkipMemo {
            paths: Arc::new(stored.paths),
            entries,
            dirty: dropped,
            seen: Vec::new(),
            generation: 1,
            prefetched: None,
            ids: None,
            root: None,
            project: spec.root.clone(),
        }
    }

    /// Writes the memo (atomically, without fsync) if it changed, keeping only stages of `spec`
    /// (the one it was loaded for) and the paths they watch.
    pub fn save(&mut self, path: &Path, spec: &Spec) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        // Renumber the paths still watched, in first-use order (stages by name).
        self.stop_prefetch();
        self.prefetched = None;
        let mut old = std::mem::take(Arc::make_mut(&mut self.paths));
        let mut renumbered: Vec<Option<u32>> = vec![None; old.len()];
        let mut paths = Vec::new();
        let mut stages: Vec<(&str, &mut Entry)> = spec
            .stages
            .iter()
            .zip(self.entries.iter_mut())
            .filter_map(|(stage, entry)| Some((stage.name.as_str(), entry.as_mut()?)))
            .collect();
        stages.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (_, entry) in &mut stages {
            for id in &mut entry.watch {
                let new = *renumbered[*id as usize].get_or_insert_with(|| {
                    paths.push(std::mem::take(&mut old[*id as usize]));
                    (paths.len() - 1) as u32
                });
                *id = new;
            }
        }
        let bytes = serde_json::to_vec(&ToStore {
            version: MEMO_VERSION,
            engine: env!("CARGO_PKG_VERSION"),
            paths: &paths,
            stages: stages
                .iter()
                .map(|(name, entry)| (*name, &**entry))
                .collect(),
        })
        .map_err(io::Error::other)?;
        self.paths = Arc::new(paths);
        self.seen = Vec::new();
        self.ids = None;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::atomic::replace_volatile(path, &bytes)?;
        self.dirty = false;
        Ok(())
    }

    /// Starts taking, on the pool, the stats of every path watched by a remembered stage of the
    /// build (`selected`) whose definition is unchanged (a no-op build of 10,000 stages: ~50,000
    /// `stat` calls, mostly path lookup), in the order of the spec's stages, while the build goes
    /// on deciding them. A stage not selected is left alone (`pipe build one-stage` in a large
    /// pipeline stats what that stage and its upstream rest on, not the whole pipeline's paths).
    pub fn prefetch(&mut self, spec: &Spec, selected: impl Fn(usize) -> bool + Sync) {
        use rayon::prelude::*;
        let current: Vec<bool> = spec
            .stages
            .par_iter()
            .zip(&self.entries)
            .enumerate()
            .with_min_len(256)
            .map(|(i, (stage, entry))| {
                selected(i)
                    && entry
                        .as_ref()
                        .is_some_and(|e| e.key == definition_key(spec, stage))
            })
            .collect();
        for (entry, current) in self.entries.iter_mut().zip(current) {
            if let Some(entry) = entry {
                entry.current = current;
            }
        }
        // Stats started while the Pipefile was validated cover every watched path; kept when the
        // whole pipeline is built (a build of a few stages takes only what they watch).
        if let Some(early) = self.prefetched.take() {
            if (0..spec.stages.len()).all(&selected) {
                early.start_on_pool();
                self.prefetched = Some(early);
                return;
            }
            early.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let mut wanted = vec![false; self.paths.len()];
        let mut order = Vec::new();
        for entry in self.entries.iter().flatten().filter(|e| e.current) {
            for &id in &entry.watch {
                if !std::mem::replace(&mut wanted[id as usize], true) {
                    order.push(id);
                }
            }
        }
        let root = self.root().clone();
        let prefetch = Arc::new(Prefetch::new(
            self.paths.clone(),
            root,
            self.project.clone(),
            order,
        ));
        prefetch.start_on_pool();
        self.prefetched = Some(prefetch);
    }

    /// The project folder, opened once.
    fn root(&mut self) -> &Arc<Root> {
        let project = &self.project;
        self.root
            .get_or_insert_with(|| Arc::new(Root::open(project)))
    }

    /// Stops the prefetch workers (those stats will not be asked for any more).
    pub fn stop_prefetch(&self) {
        if let Some(prefetch) = &self.prefetched {
            prefetch
                .stop
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// If stage `i` was found unchanged before and nothing it rests on changed since: the
    /// fingerprint and run id of its marker.
    pub fn unchanged(&mut self, spec: &Spec, i: usize) -> Option<(String, String)> {
        let entry = self.entries[i].as_ref()?;
        if !entry.current && entry.key != definition_key(spec, &spec.stages[i]) {
            return None;
        }
        let mut digest = Digest::default();
        match self.prefetched.as_ref().filter(|_| self.generation == 1) {
            Some(prefetch) => {
                for &id in &entry.watch {
                    digest.add(&prefetch.stat(id)?);
                }
            }
            None => {
                let root = self
                    .root
                    .get_or_insert_with(|| Arc::new(Root::open(&self.project)));
                if self.seen.len() < self.paths.len() {
                    self.seen.resize(self.paths.len(), (0, None));
                }
                for &id in &entry.watch {
                    let slot = &mut self.seen[id as usize];
                    if slot.0 != self.generation {
                        *slot = (
                            self.generation,
                            root.stat(&self.project, &self.paths[id as usize]).ok()?,
                        );
                    }
                    digest.add(&slot.1);
                }
            }
        }
        (digest.matches(&entry.stats)).then(|| (entry.fingerprint.clone(), entry.run_id.clone()))
    }

    /// Whether stage `i` needs the full decision whatever the files say: no verdict of it is
    /// remembered, or its definition changed (known without a `stat`, after [`SkipMemo::prefetch`]).
    pub fn needs_full(&self, i: usize) -> bool {
        self.entries[i].as_ref().is_none_or(|entry| !entry.current)
    }

    /// The id of `path` (root-relative or absolute), added to the table if new.
    fn id_of(&mut self, path: String) -> u32 {
        let ids = self.ids.get_or_insert_with(|| {
            self.paths
                .iter()
                .enumerate()
                .map(|(id, p)| (p.clone(), id as u32))
                .collect()
        });
        *ids.entry(path).or_insert_with_key(|path| {
            // Copies the table if prefetch workers still hold it; their ids stay valid.
            let paths = Arc::make_mut(&mut self.paths);
            paths.push(path.clone());
            (paths.len() - 1) as u32
        })
    }

    /// Remembers the [`verdict`] on stage `i` (taken on any thread), or forgets the stage when
    /// there is none.
    pub fn keep(&mut self, i: usize, verdict: Option<Verdict>) {
        let Some(verdict) = verdict else {
            return self.forget(i);
        };
        let watch = verdict.paths.into_iter().map(|p| self.id_of(p)).collect();
        self.entries[i] = Some(Entry {
            key: verdict.key,
            fingerprint: verdict.fingerprint,
            run_id: verdict.run_id,
            watch,
            stats: verdict.stats,
            current: true,
        });
        self.dirty = true;
    }

    /// Drops what is remembered about stage `i` (it runs, failed, or cannot be memoised).
    pub fn forget(&mut self, i: usize) {
        self.dirty |= self.entries[i].take().is_some();
    }

    /// Forgets the stats taken so far: a stage published, so they may be out of date.
    pub fn files_changed(&mut self) {
        self.generation += 1;
        self.stop_prefetch();
    }
}

/// A skip verdict ready to be remembered ([`SkipMemo::keep`]): the watched paths (root-relative
/// when inside the root) and the digest of their stats.
#[derive(Debug)]
pub struct Verdict {
    key: String,
    fingerprint: String,
    run_id: String,
    paths: Vec<String>,
    stats: String,
}

/// The verdict of a skip `plan` (a full decision that found its stage unchanged) for
/// [`SkipMemo::keep`], taken on any thread; `None` when the stage cannot be memoised now: a path
/// the verdict rests on is too new to be trusted, or unreadable.
///
/// `observed`: the stats the decision took of the files it hashed, each before reading it
/// ([`crate::hashing::StatCache::observe`]); they are used as they are, the other paths are
/// stat'ed now. A file changed after its observed stat has another stat when next checked, so
/// the verdict is not used, as with a stat taken now; and a stat taken now could be of a version
/// the decision did not read.
pub fn verdict(
    spec: &Spec,
    ws: &Workspace,
    plan: &StagePlan,
    observed: &Observed,
) -> Option<Verdict> {
    let stage = &spec.stages[plan.stage];
    let (Some(inputs), Some(marker)) = (&plan.inputs, &plan.marker) else {
        return None;
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
    // Each path watched once: an input file is also its own base path, an input folder also
    // the first folder its listing walked.
    let first: Vec<bool> = {
        let mut listed = std::collections::HashSet::with_capacity(paths.len());
        paths.iter().map(|p| listed.insert(p.as_path())).collect()
    };
    let mut first = first.into_iter();
    paths.retain(|_| first.next() == Some(true));

    let trusted_before = now_ns() - RACY_WINDOW_NS;
    let watched = |path: &PathBuf| -> Option<(Option<StatKey>, String)> {
        let stat = match observed.get(path.as_os_str()) {
            Some(stat) => Some(*stat),
            None => stat_of(path).ok()?,
        };
        if stat.is_some_and(|s| s.mtime_ns.max(s.ctime_ns) >= trusted_before) {
            return None;
        }
        Some((stat, relative(spec, path)))
    };
    // A fan-in over 10,000 folders watches 40,000 paths: stat'ed on all cores.
    let watched: Option<Vec<_>> = if paths.len() >= PARALLEL_WATCH_PATHS {
        use rayon::prelude::*;
        paths
            .par_iter()
            .with_min_len(PARALLEL_WATCH_PATHS / 2)
            .map(watched)
            .collect()
    } else {
        paths.iter().map(watched).collect()
    };
    let (stats, paths): (Vec<_>, Vec<_>) = watched?.into_iter().unzip();
    Some(Verdict {
        key: definition_key(spec, stage),
        fingerprint: marker.fingerprint.clone(),
        run_id: marker.run_id.clone(),
        paths,
        stats: digest(&stats),
    })
}

/// A verdict watching at least this many paths stats them on all cores.
const PARALLEL_WATCH_PATHS: usize = 256;

/// What a stage's verdict depends on in the Pipefile: its name, processor, inputs, output folder,
/// params and kind, the project folder, and the engine version (whose planning rules may differ).
///
/// Each value is fed to the hash with its length (or a tag) in front, so that no two definitions
/// share an encoding. The destructuring names every field, so a field added to a processor or an
/// input does not compile until it is part of the key (or deliberately left out).
fn definition_key(spec: &Spec, stage: &Stage) -> String {
    let mut key = KeyHasher(blake3::Hasher::new());
    key.number(MEMO_VERSION.into());
    key.text(env!("CARGO_PKG_VERSION"));
    key.bytes(spec.root.as_os_str().as_encoded_bytes());
    key.text(&stage.name);
    match &stage.processor {
        Processor::Builtin {
            name,
            implementation,
            version,
        } => {
            key.number(0);
            key.text(name);
            key.text(implementation);
            key.text(version);
        }
        Processor::Command {
            argv,
            version,
            files,
        } => {
            key.number(1);
            key.texts(argv);
            key.text(version);
            key.texts(files);
        }
    }
    key.number(stage.inputs.len() as u64);
    for input in &stage.inputs {
        match input {
            Input::Path(path) => {
                key.number(0);
                key.text(path);
            }
            Input::Glob { pattern, base } => {
                key.number(1);
                key.text(pattern);
                key.text(base);
            }
        }
    }
    key.text(&stage.output_dir);
    key.bytes(&serde_json::to_vec(&*stage.params).unwrap_or_default());
    key.number(stage.map.into());
    key.0.finalize().to_hex()[..32].to_string()
}

/// Feeds values to a hasher, each with its length in front.
struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    fn number(&mut self, n: u64) {
        self.0.update(&n.to_le_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.number(bytes.len() as u64);
        self.0.update(bytes);
    }

    fn text(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn texts(&mut self, texts: &[String]) {
        self.number(texts.len() as u64);
        for text in texts {
            self.text(text);
        }
    }
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
    fn open(project: &Path) -> Root {
        use rustix::fs::{Mode, OFlags};
        Root(
            rustix::fs::open(
                project,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok(),
        )
    }

    /// The same as [`stat_of`] on [`absolute`]`(project, stored)`, cheaper for root-relative
    /// paths.
    fn stat(&self, project: &Path, stored: &str) -> io::Result<Option<StatKey>> {
        let Some(fd) = self.0.as_ref().filter(|_| !stored.starts_with('/')) else {
            return stat_of(&absolute(project, stored));
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
    let mut digest = Digest::default();
    for stat in stats {
        digest.add(stat);
    }
    digest.0.finalize().to_hex()[..32].to_string()
}

/// [`digest`], fed one stat at a time.
#[derive(Default)]
struct Digest(blake3::Hasher);

impl Digest {
    fn add(&mut self, stat: &Option<StatKey>) {
        match stat {
            None => self.0.update(&[0]),
            Some(s) => {
                let mut bytes = [0u8; 49];
                bytes[0] = 1;
                bytes[1..9].copy_from_slice(&s.size.to_le_bytes());
                bytes[9..25].copy_from_slice(&s.mtime_ns.to_le_bytes());
                bytes[25..41].copy_from_slice(&s.ctime_ns.to_le_bytes());
                bytes[41..49].copy_from_slice(&s.inode.to_le_bytes());
                self.0.update(&bytes)
            }
        };
    }

    /// Whether the stats added so far have the digest `digest`.
    fn matches(&self, digest: &str) -> bool {
        self.0.finalize().to_hex()[..32] == *digest
    }
}

fn relative(spec: &Spec, path: &Path) -> String {
    match path.strip_prefix(&spec.root) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => path.to_string_lossy().into_owned(),
    }
}

fn absolute(project: &Path, stored: &str) -> PathBuf {
    if stored.starts_with('/') {
        PathBuf::from(stored)
    } else {
        project.join(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A project in a fresh folder: `stages` as its Pipefile's stages, with the inputs they name.
    fn spec_in(dir: &Path, stages: Value) -> Spec {
        for file in ["in/a.txt", "in/b.txt", "in/ab.txt", "tool.py"] {
            let path = dir.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x\n").unwrap();
        }
        let file = dir.join("Pipefile.json");
        std::fs::write(&file, json!({"version": 1, "stages": stages}).to_string()).unwrap();
        Spec::load(&file).unwrap()
    }

    fn stage() -> Value {
        json!({
            "name": "s",
            "processor": {"builtin": "upper", "version": "1"},
            "inputs": ["in/a.txt"],
            "outputDir": "out",
        })
    }

    fn key_of(dir: &Path, stage: Value) -> String {
        let spec = spec_in(dir, json!([stage]));
        definition_key(&spec, &spec.stages[0])
    }

    #[test]
    fn the_definition_key_changes_with_everything_a_verdict_rests_on() {
        let dir = tempfile::tempdir().unwrap();
        let base = key_of(dir.path(), stage());
        assert_eq!(base.len(), 32);
        assert_eq!(key_of(dir.path(), stage()), base, "deterministic");
        let edits: Vec<(&str, Value)> = vec![
            ("name", json!("t")),
            ("processor", json!({"builtin": "copy", "version": "1"})),
            ("processor", json!({"builtin": "upper", "version": "2"})),
            (
                "processor",
                json!({"command": ["python3", "tool.py"], "version": "1"}),
            ),
            ("inputs", json!(["in/b.txt"])),
            ("inputs", json!(["in/a.txt", "in/b.txt"])),
            ("inputs", json!(["in/*.txt"])),
            ("outputDir", json!("out2")),
            ("params", json!({"mode": "ascii"})),
            ("foreach", json!("file")),
        ];
        let mut keys = vec![base.clone()];
        for (field, value) in edits {
            let mut edited = stage();
            edited[field] = value.clone();
            let key = key_of(dir.path(), edited);
            assert!(!keys.contains(&key), "{field} = {value}: key not new");
            keys.push(key);
        }
        // The project folder is part of the key.
        let elsewhere = tempfile::tempdir().unwrap();
        assert_ne!(key_of(elsewhere.path(), stage()), base);
        // What cannot change a verdict does not change the key.
        let mut described = stage();
        described["description"] = json!("words");
        described["retry"] = json!({"maxAttempts": 3});
        assert_eq!(key_of(dir.path(), described), base);
    }

    #[test]
    fn the_definition_key_tells_apart_values_that_concatenate_alike() {
        let dir = tempfile::tempdir().unwrap();
        let command = |argv: Value| {
            let mut s = stage();
            s["processor"] = json!({"command": argv, "version": "1"});
            key_of(dir.path(), s)
        };
        assert_ne!(
            command(json!(["python3", "tool.py", "ab"])),
            command(json!(["python3", "tool.py", "a", "b"]))
        );
        assert_ne!(
            command(json!(["python3", "tool.py", "a", ""])),
            command(json!(["python3", "tool.py", "", "a"]))
        );
        let inputs = |inputs: Value| {
            let mut s = stage();
            s["inputs"] = inputs;
            key_of(dir.path(), s)
        };
        assert_ne!(inputs(json!(["in/ab.txt"])), inputs(json!(["in/a.txt"])));
    }

    fn entry(key: &str, watch: Vec<u32>) -> Entry {
        Entry {
            key: key.into(),
            fingerprint: format!("fp-{key}"),
            run_id: "r1".into(),
            watch,
            stats: "digest".into(),
            current: false,
        }
    }

    fn named(names: &[&str]) -> Value {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut s = stage();
                s["name"] = json!(name);
                s["outputDir"] = json!(format!("out{i}"));
                s
            })
            .collect()
    }

    #[test]
    fn entries_follow_their_stage_by_name_and_those_of_removed_stages_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache/skip-v1.json");
        let spec = spec_in(dir.path(), named(&["a", "b", "c"]));
        let mut memo = SkipMemo::load(&file, &spec);
        assert!(memo.entries.iter().all(Option::is_none) && !memo.dirty);
        memo.paths = Arc::new(vec!["p0".into(), "p1".into(), "p2".into()]);
        memo.entries[0] = Some(entry("ka", vec![2, 0]));
        memo.entries[2] = Some(entry("kc", vec![1]));
        memo.dirty = true;
        memo.save(&file, &spec).unwrap();
        let stored: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(stored["version"], MEMO_VERSION);
        // Paths renumbered in first-use order, stages by name.
        assert_eq!(stored["paths"], json!(["p2", "p0", "p1"]));
        assert_eq!(stored["stages"]["a"]["watch"], json!([0, 1]));
        assert_eq!(stored["stages"]["c"]["watch"], json!([2]));
        assert_eq!(stored["stages"].as_object().unwrap().len(), 2);

        // Same stages: nothing to write.
        let again = SkipMemo::load(&file, &spec);
        assert!(!again.dirty);
        assert_eq!(again.entries[0].as_ref().unwrap().fingerprint, "fp-ka");
        assert!(again.entries[1].is_none());

        // Reordered, `a` removed, `d` new: entries found by name; the memo must be rewritten.
        let spec = spec_in(dir.path(), named(&["c", "d", "b"]));
        let mut moved = SkipMemo::load(&file, &spec);
        assert!(moved.dirty);
        assert_eq!(moved.entries[0].as_ref().unwrap().fingerprint, "fp-kc");
        assert!(moved.entries[1].is_none() && moved.entries[2].is_none());
        moved.save(&file, &spec).unwrap();
        let stored: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(stored["paths"], json!(["p1"]));
        assert_eq!(
            stored["stages"],
            json!({"c": {
                "key": "kc", "fingerprint": "fp-kc", "runId": "r1", "watch": [0], "stats": "digest"
            }})
        );
        // A forgotten stage is written out too.
        let mut forgetting = SkipMemo::load(&file, &spec);
        forgetting.forget(1);
        assert!(!forgetting.dirty, "nothing to forget");
        forgetting.forget(0);
        assert!(forgetting.dirty);
        forgetting.save(&file, &spec).unwrap();
        let stored: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(stored["stages"], json!({}));
    }

    #[test]
    fn the_stats_digest_hashes_a_tag_and_every_field_of_each_stat_in_order() {
        let stat = |n: u64| StatKey {
            size: n,
            mtime_ns: -(n as i128) * 1_000_000_007,
            ctime_ns: (n as i128) << 70,
            inode: u64::MAX - n,
        };
        let stats = [Some(stat(1)), None, Some(stat(2)), None, None];
        let mut expected = blake3::Hasher::new();
        for stat in &stats {
            match stat {
                None => expected.update(&[0]),
                Some(s) => expected
                    .update(&[1])
                    .update(&s.size.to_le_bytes())
                    .update(&s.mtime_ns.to_le_bytes())
                    .update(&s.ctime_ns.to_le_bytes())
                    .update(&s.inode.to_le_bytes()),
            };
        }
        let expected = expected.finalize().to_hex()[..32].to_string();
        assert_eq!(digest(&stats), expected);
        let mut streamed = Digest::default();
        stats.iter().for_each(|s| streamed.add(s));
        assert!(streamed.matches(&expected));
        streamed.add(&None);
        assert!(!streamed.matches(&expected));
        assert_ne!(digest(&stats[..4]), expected);
    }

    #[test]
    fn a_memo_read_ahead_is_used_only_while_the_file_is_the_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache/skip-v1.json");
        let spec = spec_in(dir.path(), named(&["a", "b"]));
        let write = |fingerprint: &str| {
            let memo = json!({"version": MEMO_VERSION, "engine": env!("CARGO_PKG_VERSION"),
                "paths": ["p"], "stages": {"a": {"key": "k", "fingerprint": fingerprint,
                "runId": "r", "watch": [0], "stats": "d"}}});
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            crate::atomic::replace_volatile(&file, memo.to_string().as_bytes()).unwrap();
        };
        let fingerprint = |stored: Option<Stored>| {
            stored.map(|s| s.stages.get("a").map(|e| e.fingerprint.clone()))
        };
        // Absent when read, absent now: the empty memo, vouched for.
        assert_eq!(fingerprint(still_current(read(&file), &file)), Some(None));
        // Absent when read, written since: not vouched for.
        let absent = read(&file);
        write("one");
        assert!(still_current(absent, &file).is_none());
        // Unchanged since read: vouched for.
        assert_eq!(
            fingerprint(still_current(read(&file), &file)),
            Some(Some("one".into()))
        );
        // Replaced since read (pipe's own rewrite: a rename), even with the same size.
        let before = read(&file);
        write("two");
        assert!(still_current(before, &file).is_none());
        // Edited in place since read (same inode): mtime and ctime differ.
        let before = read(&file);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace("two", "TWO")).unwrap();
        assert!(still_current(before, &file).is_none());
        // Removed since read.
        let before = read(&file);
        std::fs::remove_file(&file).unwrap();
        assert!(still_current(before, &file).is_none());

        // Through the thread, as a build uses it: the same entries as a load.
        write("three");
        let reading = Reading::start(file.clone());
        let memo = SkipMemo::load_read(&reading, &file, &spec);
        assert_eq!(memo.entries[0].as_ref().unwrap().fingerprint, "three");
        // Taken once: a second use reads the file itself.
        write("four");
        let memo = SkipMemo::load_read(&reading, &file, &spec);
        assert_eq!(memo.entries[0].as_ref().unwrap().fingerprint, "four");
        // Another path than the one read: read afresh.
        let reading = Reading::start(dir.path().join("elsewhere.json"));
        let memo = SkipMemo::load_read(&reading, &file, &spec);
        assert_eq!(memo.entries[0].as_ref().unwrap().fingerprint, "four");
    }

    /// A memo over `n` stages, stage `i` watching `in/f<i>.txt`, a shared file, a missing path
    /// and (absolute) `in/abs.txt`, each entry holding the digest of the stats as they are now.
    fn armed(dir: &Path, n: usize) -> (Spec, SkipMemo) {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let spec = spec_in(
            dir,
            named(&names.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        std::fs::write(dir.join("in/abs.txt"), "abs").unwrap();
        let mut memo = SkipMemo::load(&dir.join("none.json"), &spec);
        let mut paths = vec![
            "in/shared.txt".to_string(),
            "gone/missing.txt".to_string(),
            dir.join("in/abs.txt").to_string_lossy().into_owned(),
        ];
        std::fs::write(dir.join("in/shared.txt"), "shared").unwrap();
        for i in 0..n {
            std::fs::write(dir.join(format!("in/f{i}.txt")), format!("{i}")).unwrap();
            paths.push(format!("in/f{i}.txt"));
        }
        let stats: Vec<Option<StatKey>> = paths
            .iter()
            .map(|p| stat_of(&absolute(dir, p)).unwrap())
            .collect();
        for i in 0..n {
            let watch = vec![3 + i as u32, 0, 1, 2];
            let watched: Vec<_> = watch.iter().map(|&id| stats[id as usize]).collect();
            memo.entries[i] = Some(Entry {
                key: definition_key(&spec, &spec.stages[i]),
                fingerprint: format!("fp{i}"),
                run_id: "r".into(),
                watch,
                stats: digest(&watched),
                current: false,
            });
        }
        memo.paths = Arc::new(paths);
        (spec, memo)
    }

    #[test]
    fn prefetched_stats_vouch_for_exactly_the_stages_whose_paths_are_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        // More paths than the workers take in a few chunks.
        let n = 6 * PREFETCH_CHUNK;
        let (spec, mut memo) = armed(dir.path(), n);
        // Changed before the build: a size, and an edit of the same size.
        std::fs::write(dir.path().join("in/f7.txt"), "seven").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("in/f9.txt"), "X").unwrap();
        memo.prefetch(&spec, |_| true);
        for i in 0..n {
            let expected = (i != 7 && i != 9).then(|| (format!("fp{i}"), "r".to_string()));
            assert_eq!(memo.unchanged(&spec, i), expected, "stage {i}");
        }
        // After a stage published, stats are taken again, not read from the prefetch.
        std::fs::write(dir.path().join("in/f3.txt"), "three").unwrap();
        assert!(
            memo.unchanged(&spec, 3).is_some(),
            "generation 1 keeps its stats"
        );
        memo.files_changed();
        assert_eq!(memo.unchanged(&spec, 3), None);
        assert!(memo.unchanged(&spec, 4).is_some());
        // A shared path changed: no stage is vouched for any more.
        std::fs::write(dir.path().join("in/shared.txt"), "changed!").unwrap();
        memo.files_changed();
        assert!((0..n).all(|i| memo.unchanged(&spec, i).is_none()));
    }

    #[test]
    fn stats_started_by_the_reading_thread_serve_a_whole_build_and_only_it() {
        let dir = tempfile::tempdir().unwrap();
        let n = 4 * PREFETCH_CHUNK;
        let file = dir.path().join("skip.json");
        let (spec, mut memo) = armed(dir.path(), n);
        memo.dirty = true;
        memo.save(&file, &spec).unwrap();
        let paths = memo.paths.len();
        // Changed before the stats were started: seen by them.
        std::fs::write(dir.path().join("in/f7.txt"), "seven").unwrap();
        let early_order = |memo: &SkipMemo| memo.prefetched.as_ref().map(|p| p.order.clone());
        let every_id: Vec<u32> = (0..paths as u32).collect();

        // A build of every stage: the thread's stats, of every path, are the build's.
        let reading = Reading::start_with_stats(file.clone(), dir.path().to_path_buf());
        let mut memo = SkipMemo::load_read(&reading, &file, &spec);
        assert_eq!(early_order(&memo), Some(every_id.clone()));
        memo.prefetch(&spec, |_| true);
        assert_eq!(early_order(&memo), Some(every_id.clone()));
        for i in 0..n {
            assert_eq!(memo.unchanged(&spec, i).is_some(), i != 7, "stage {i}");
        }

        // A build of some stages: its own prefetch, of their paths only; the thread is stopped.
        let reading = Reading::start_with_stats(file.clone(), dir.path().to_path_buf());
        let mut memo = SkipMemo::load_read(&reading, &file, &spec);
        let early = memo.prefetched.clone().unwrap();
        memo.prefetch(&spec, |i| i < 2);
        assert!(early.stop.load(std::sync::atomic::Ordering::Relaxed));
        let mut queued = early_order(&memo).unwrap();
        queued.sort_unstable();
        assert_eq!(queued, vec![0, 1, 2, 3, 4]);

        // Dropped (a dead holder's work was completed): the build takes its stats afresh.
        let reading = Reading::start_with_stats(file.clone(), dir.path().to_path_buf());
        let mut memo = SkipMemo::load_read(&reading, &file, &spec);
        memo.drop_early_stats();
        std::fs::write(dir.path().join("in/f9.txt"), "nine!").unwrap();
        memo.prefetch(&spec, |_| true);
        assert_ne!(early_order(&memo), Some(every_id.clone()));
        assert!(memo.unchanged(&spec, 9).is_none());
        assert!(memo.unchanged(&spec, 8).is_some());

        // What was read is not the file asked for (as when it changed since: `still_current`):
        // the file is read again, and no stats come with it.
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::copy(&file, &elsewhere).unwrap();
        let reading = Reading::start_with_stats(elsewhere, dir.path().to_path_buf());
        let memo = SkipMemo::load_read(&reading, &file, &spec);
        assert!(memo.prefetched.is_none());
        assert!(memo.entries.iter().all(Option::is_some));
    }

    #[test]
    fn a_prefetch_queues_only_the_selected_stages_paths_and_the_others_still_answer() {
        let dir = tempfile::tempdir().unwrap();
        let n = 4 * PREFETCH_CHUNK;
        let (spec, mut memo) = armed(dir.path(), n);
        memo.prefetch(&spec, |i| i % 2 == 0);
        let prefetch = memo.prefetched.clone().unwrap();
        let mut queued = prefetch.order.clone();
        queued.sort_unstable();
        // The three shared paths, then `in/f<i>.txt` (id 3 + i) of the even stages only.
        let expected: Vec<u32> = (0..3)
            .chain((0..n as u32).step_by(2).map(|i| 3 + i))
            .collect();
        assert_eq!(queued, expected);
        std::fs::write(dir.path().join("in/f5.txt"), "five!").unwrap();
        for i in 0..n {
            assert_eq!(memo.unchanged(&spec, i).is_some(), i != 5, "stage {i}");
        }
    }

    #[test]
    fn without_a_prefetch_the_stats_are_taken_when_asked_and_shared_within_a_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, mut memo) = armed(dir.path(), 3);
        assert_eq!(memo.unchanged(&spec, 0), Some(("fp0".into(), "r".into())));
        // The stats stage 0 took (the missing path's too) serve stage 1 in the same generation.
        std::fs::create_dir(dir.path().join("gone")).unwrap();
        std::fs::write(dir.path().join("gone/missing.txt"), "here now").unwrap();
        assert_eq!(memo.unchanged(&spec, 1), Some(("fp1".into(), "r".into())));
        memo.files_changed();
        assert_eq!(memo.unchanged(&spec, 2), None);
        std::fs::remove_file(dir.path().join("gone/missing.txt")).unwrap();
        memo.files_changed();
        assert_eq!(memo.unchanged(&spec, 2), Some(("fp2".into(), "r".into())));
    }

    #[test]
    fn a_memo_of_another_version_or_with_bad_path_ids_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("skip.json");
        let spec = spec_in(dir.path(), named(&["a"]));
        let write = |version: u32, watch: u32| {
            let memo = json!({"version": version, "engine": env!("CARGO_PKG_VERSION"),
                "paths": ["p"], "stages": {"a": {"key": "k", "fingerprint": "f", "runId": "r",
                "watch": [watch], "stats": "d"}}});
            std::fs::write(&file, memo.to_string()).unwrap();
        };
        write(MEMO_VERSION, 0);
        assert!(SkipMemo::load(&file, &spec).entries[0].is_some());
        write(MEMO_VERSION - 1, 0);
        assert!(SkipMemo::load(&file, &spec).entries[0].is_none());
        write(MEMO_VERSION, 1);
        assert!(SkipMemo::load(&file, &spec).entries[0].is_none());
    }

    #[test]
    fn a_verdict_is_remembered_with_the_stats_the_decision_took_before_reading() {
        use crate::marker::{Marker, OutputEntry, MARKER_VERSION};
        use crate::plan::{Decision, StagePlan};
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_in(dir.path(), json!([stage()]));
        let ws = Workspace::new(&spec);
        let input = spec.path("in/a.txt");
        let output = ws.output_dir("out").join("a.txt");
        std::fs::create_dir_all(output.parent().unwrap()).unwrap();
        std::fs::write(&output, "X\n").unwrap();
        std::fs::write(ws.marker_file("out", "s"), "{}").unwrap();
        // The memo keeps only stats older than the racy window: time that must pass (no file or
        // signal could stand in for it).
        std::thread::sleep(std::time::Duration::from_nanos(
            RACY_WINDOW_NS as u64 + 200_000_000,
        ));
        let plan = StagePlan {
            stage: 0,
            decision: Decision::Skip,
            ingredients: None,
            fingerprint: None,
            inputs: Some(crate::inputs::ResolvedInputs {
                files: BTreeMap::from([("in/a.txt".to_string(), input.clone())]),
                root: "in".into(),
                dirs: Vec::new(),
            }),
            marker: Some(Marker {
                version: MARKER_VERSION,
                stage: "s".into(),
                fingerprint: "fp".into(),
                run_id: "r".into(),
                finished_at: "2026-11-30T09:00:00Z".into(),
                outputs: vec![OutputEntry {
                    path: "a.txt".into(),
                    size: 2,
                    blake3: "00".into(),
                }],
                ingredients: serde_json::from_value(json!({
                    "schema": 1, "stage": "s", "processor": {"command": [], "version": "1", "files": {}},
                    "params": {}, "inputs": {},
                }))
                .unwrap(),
                items: BTreeMap::new(),
            }),
            warnings: Vec::new(),
        };
        // What the decision saw as it hashed the input and the output.
        let observed: Observed = [&input, &output]
            .into_iter()
            .map(|p| (p.as_os_str().to_owned(), stat_of(p).unwrap().unwrap()))
            .collect();
        let none = dir.path().join("none.json");
        let mut memo = SkipMemo::load(&none, &spec);
        memo.keep(0, verdict(&spec, &ws, &plan, &observed));
        assert_eq!(memo.unchanged(&spec, 0), Some(("fp".into(), "r".into())));
        // The input edited after the decision hashed it (same size): the verdict is kept with the
        // stat the decision saw (a stat taken now would be of a version it did not read), so it
        // does not vouch for the stage any more.
        std::fs::write(&input, "y\n").unwrap();
        let mut memo = SkipMemo::load(&none, &spec);
        memo.keep(0, verdict(&spec, &ws, &plan, &observed));
        assert!(
            memo.entries[0].is_some(),
            "remembered from the observed stats"
        );
        assert_eq!(memo.unchanged(&spec, 0), None);
    }
}
