//! Content hashes of files, with a stat cache so unchanged files are not read again.
//!
//! Fingerprints hash content, not timestamps: touching a file must not rerun anything. Reading
//! every input on every build would be slow, so `cache/stat-v2.bin` remembers each file's hash
//! keyed by (size, mtime, ctime, inode). A cached hash is trusted only when the file's mtime is
//! clearly older than the moment it was hashed: a file written in the same timestamp tick as its
//! hashing could change again without its stat changing (git's "racy clean" problem), so such
//! entries are rehashed until they age.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How much older than its hashing a file's mtime must be for the cached hash to be trusted.
pub const RACY_WINDOW_NS: i128 = 2_000_000_000;

/// [`StatCache::hash_all`] of at least this many paths hashes them on all cores.
const PARALLEL_HASH_PATHS: usize = 64;

/// Files at least this big are hashed with memory mapping on all cores.
const PARALLEL_HASH_BYTES: u64 = 16 << 20;

/// What identifies a file version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatKey {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub inode: u64,
}

impl StatKey {
    pub fn of(meta: &Metadata) -> StatKey {
        StatKey {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            inode: meta.ino(),
        }
    }
}

/// One file's cached hash, held compactly (the cache has two per item of a map stage): times as
/// 64-bit nanoseconds (until the year 2262), the digest as its 32 bytes, as the file holds them
/// ([`BinEntry`]). A file of the earlier JSON form ([`WireEntry`]) is read once; an entry of it
/// that does not fit makes that file unusable, which only costs rehashing.
#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
    blake3: Digest,
    hashed_at_ns: i64,
    /// Looked up or written by this process: the file existed a moment ago, so pruning need
    /// not stat it again.
    seen: bool,
}

impl Entry {
    /// `None` when a time does not fit in 64 bits (such a file is not cached).
    fn new(stat: StatKey, blake3: Digest, hashed_at_ns: i128) -> Option<Entry> {
        Some(Entry {
            size: stat.size,
            mtime_ns: i64::try_from(stat.mtime_ns).ok()?,
            ctime_ns: i64::try_from(stat.ctime_ns).ok()?,
            inode: stat.inode,
            blake3,
            hashed_at_ns: i64::try_from(hashed_at_ns).ok()?,
            seen: true,
        })
    }

    fn stat(&self) -> StatKey {
        StatKey {
            size: self.size,
            mtime_ns: self.mtime_ns.into(),
            ctime_ns: self.ctime_ns.into(),
            inode: self.inode,
        }
    }
}

/// An entry as `cache/stat-v2.bin` holds it (postcard: integers as varints).
#[derive(Serialize, Deserialize)]
struct BinEntry {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
    blake3: [u8; 32],
    hashed_at_ns: i64,
}

impl From<&Entry> for BinEntry {
    fn from(entry: &Entry) -> BinEntry {
        BinEntry {
            size: entry.size,
            mtime_ns: entry.mtime_ns,
            ctime_ns: entry.ctime_ns,
            inode: entry.inode,
            blake3: entry.blake3.0,
            hashed_at_ns: entry.hashed_at_ns,
        }
    }
}

impl From<BinEntry> for Entry {
    fn from(bin: BinEntry) -> Entry {
        Entry {
            size: bin.size,
            mtime_ns: bin.mtime_ns,
            ctime_ns: bin.ctime_ns,
            inode: bin.inode,
            blake3: Digest(bin.blake3),
            hashed_at_ns: bin.hashed_at_ns,
            seen: false,
        }
    }
}

/// `cache/stat-v2.bin` before its trailer (the blake3 of these bytes), as it is read.
#[derive(Deserialize)]
struct BinFile<'a> {
    version: u32,
    #[serde(borrow)]
    entries: Vec<(&'a str, BinEntry)>,
}

/// The version of [`BinFile`].
const BIN_VERSION: u32 = 2;

/// [`BinFile`] as it is written: the entries streamed from the cache's map, not collected first
/// (300,000 of them at 100,000 stages).
#[derive(Serialize)]
struct BinFileOut<'a> {
    version: u32,
    entries: EntriesOut<'a>,
}

struct EntriesOut<'a>(&'a HashMap<Box<str>, Entry>);

impl Serialize for EntriesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .iter()
                .map(|(path, entry)| (&**path, BinEntry::from(entry))),
        )
    }
}

/// An entry as `cache/stat-v1.json` (the earlier form, only read) holds it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    stat: StatKey,
    blake3: Digest,
    hashed_at_ns: i128,
}

/// `cache/stat-v1.json`.
#[derive(Deserialize)]
struct WireFile {
    version: u32,
    entries: HashMap<Box<str>, WireEntry>,
}

impl TryFrom<WireEntry> for Entry {
    type Error = &'static str;

    fn try_from(wire: WireEntry) -> Result<Entry, &'static str> {
        let mut entry = Entry::new(wire.stat, wire.blake3, wire.hashed_at_ns)
            .ok_or("a time out of the 64-bit range")?;
        entry.seen = false;
        Ok(entry)
    }
}

/// A blake3 digest, as 32 bytes; read from the earlier JSON cache as lowercase hex (64 digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest([u8; 32]);

impl Digest {
    fn from_hex(hex: &str) -> Option<Digest> {
        blake3::Hash::from_hex(hex)
            .ok()
            .filter(|_| hex.bytes().all(|b| !b.is_ascii_uppercase()))
            .map(|h| Digest(*h.as_bytes()))
    }

    fn to_hex(self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Digest::from_hex(&hex).ok_or_else(|| serde::de::Error::custom("not a blake3 hex digest"))
    }
}

/// Stats by path, as [`StatCache::observe`] keeps them (keyed by the path's bytes: hashing a `Path`
/// walks its components).
pub type Observed = HashMap<std::ffi::OsString, StatKey>;

/// The stat cache: absolute path → hash of the file version with that stat.
#[derive(Debug, Default)]
pub struct StatCache {
    entries: HashMap<Box<str>, Entry>,
    dirty: bool,
    /// The earlier form's file (`cache/stat-v1.json`), removed once the cache is saved.
    legacy: Option<std::path::PathBuf>,
    /// While observing ([`StatCache::observe`]): the stat each [`StatCache::hash`] of a path
    /// started from, the first one per path.
    observed: Option<Observed>,
    /// A borrower's view of the entries lent by another cache ([`StatCache::lend`]), looked up
    /// after its own.
    lent: Option<Arc<HashMap<Box<str>, Entry>>>,
    /// The lent entries a borrower found valid (marked seen when they are taken back).
    seen_lent: Vec<Box<str>>,
}

/// The entries of a cache lent to borrowers on other threads ([`StatCache::lend`]).
struct Lent(Arc<HashMap<Box<str>, Entry>>);

/// A file's content hash and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHash {
    pub blake3: String,
    pub size: u64,
}

impl StatCache {
    /// Loads the cache; a missing, unreadable, damaged or foreign-version file gives an empty
    /// cache (it is only an accelerator: losing it costs time, never correctness).
    pub fn load(path: &Path) -> StatCache {
        StatCache::of_read(std::fs::read(path))
    }

    /// [`StatCache::load`] of what reading the file gave.
    fn of_read(read: io::Result<Vec<u8>>) -> StatCache {
        StatCache {
            entries: read
                .ok()
                .and_then(|bytes| read_bin(&bytes))
                .unwrap_or_default(),
            ..StatCache::default()
        }
    }

    /// [`StatCache::load`] of `path`, or when there is none, of the earlier form's file `legacy`
    /// (`cache/stat-v1.json`): upgrading pipe must not rehash every input once. Saving the cache
    /// writes `path` and removes `legacy`.
    pub fn load_or_migrate(path: &Path, legacy: &Path) -> StatCache {
        let read = std::fs::read(path);
        if !matches!(&read, Err(e) if e.kind() == io::ErrorKind::NotFound) || !legacy.exists() {
            return StatCache {
                legacy: Some(legacy.to_path_buf()),
                ..StatCache::of_read(read)
            };
        }
        let entries = std::fs::read(legacy)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<WireFile>(&bytes).ok())
            .filter(|file| file.version == 1)
            .and_then(|file| {
                file.entries
                    .into_iter()
                    .map(|(path, wire)| Some((path, Entry::try_from(wire).ok()?)))
                    .collect::<Option<HashMap<_, _>>>()
            })
            .unwrap_or_default();
        StatCache {
            entries,
            // Saved in the new form at the end of the build even if nothing else changes.
            dirty: true,
            legacy: Some(legacy.to_path_buf()),
            ..StatCache::default()
        }
    }

    /// Saves the cache atomically if anything changed: postcard, then the blake3 of those bytes
    /// (30,000 entries load in a few milliseconds, where their JSON took ~50).
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let file = BinFileOut {
            version: BIN_VERSION,
            entries: EntriesOut(&self.entries),
        };
        crate::atomic::write_with(path, |out| {
            let hashing = HashingWriter {
                inner: out,
                hasher: blake3::Hasher::new(),
            };
            let buffered = io::BufWriter::with_capacity(1 << 16, hashing);
            let buffered = postcard::to_io(&file, buffered).map_err(io::Error::other)?;
            let hashing = buffered
                .into_inner()
                .map_err(io::IntoInnerError::into_error)?;
            let trailer = hashing.hasher.finalize();
            hashing.inner.write_all(trailer.as_bytes())
        })?;
        self.dirty = false;
        // Also one an older pipe wrote again beside this one (it will not be read any more).
        if let Some(legacy) = self.legacy.take() {
            crate::atomic::remove_if_exists(&legacy)?;
        }
        Ok(())
    }

    /// Whether anything was hashed or remembered since the cache was loaded or saved.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// From now on, keeps the stat every [`StatCache::hash`] starts from (taken before the file
    /// is read), until [`StatCache::take_observed`].
    pub fn observe(&mut self) {
        self.observed = Some(HashMap::new());
    }

    /// The stats kept since [`StatCache::observe`] (the first per path), and stops keeping them.
    pub fn take_observed(&mut self) -> Observed {
        self.observed.take().unwrap_or_default()
    }

    /// The blake3 of `path`, from the cache when its stat matches and is not racy.
    pub fn hash(&mut self, path: &Path) -> io::Result<FileHash> {
        let meta = std::fs::metadata(path)?;
        let stat = StatKey::of(&meta);
        if let Some(observed) = &mut self.observed {
            observed.entry(path.as_os_str().to_owned()).or_insert(stat);
        }
        let trusted = |entry: &Entry| {
            entry.stat() == stat && stat.mtime_ns + RACY_WINDOW_NS < entry.hashed_at_ns.into()
        };
        let key = path.to_string_lossy();
        if let Some(entry) = self.entries.get_mut(&*key) {
            if trusted(entry) {
                entry.seen = true;
                return Ok(FileHash {
                    blake3: entry.blake3.to_hex(),
                    size: stat.size,
                });
            }
        } else if let Some(entry) = self.lent.as_ref().and_then(|lent| lent.get(&*key)) {
            if trusted(entry) {
                let blake3 = entry.blake3.to_hex();
                self.seen_lent.push(key.into());
                return Ok(FileHash {
                    blake3,
                    size: stat.size,
                });
            }
        }
        let hashed_at_ns = now_ns();
        let blake3 = hash_file(path, stat.size)?;
        // Only remember the hash if the file did not change while it was read.
        if StatKey::of(&std::fs::metadata(path)?) == stat {
            if let Some(entry) =
                Digest::from_hex(&blake3).and_then(|d| Entry::new(stat, d, hashed_at_ns))
            {
                self.entries.insert(key.into(), entry);
                self.dirty = true;
            }
        }
        Ok(FileHash {
            blake3,
            size: stat.size,
        })
    }

    /// [`StatCache::hash`] of each of `paths`, in order; many of them on all cores (a fan-in's
    /// decision hashes 10,000 inputs and checks 10,000 outputs). A borrower hashes them one by one.
    pub fn hash_all(&mut self, paths: &[&Path]) -> Vec<io::Result<FileHash>> {
        if paths.len() < PARALLEL_HASH_PATHS || self.lent.is_some() {
            return paths.iter().map(|path| self.hash(path)).collect();
        }
        let chunks: Vec<&[&Path]> = paths.chunks(PARALLEL_HASH_PATHS / 2).collect();
        self.par_map(&chunks, |chunk, cache| {
            chunk
                .iter()
                .map(|path| cache.hash(path))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// `work` on each of `items` on all cores, each with its own borrower of this cache's entries
    /// ([`StatCache::borrow`]); what the borrowers hashed is taken back, and while this cache
    /// observes, so do they (the first stat per path is kept, in the order of `items`). Results
    /// in the order of `items`. A single item is worked on with this cache itself: a borrower
    /// hashes one file at a time, this cache many at once ([`StatCache::hash_all`]).
    pub fn par_map<T: Sync, R: Send>(
        &mut self,
        items: &[T],
        work: impl Fn(&T, &mut StatCache) -> R + Sync + Send,
    ) -> Vec<R> {
        use rayon::prelude::*;
        if let [item] = items {
            return vec![work(item, self)];
        }
        let observing = self.observed.is_some();
        let lent = self.lend();
        let done: Vec<(R, StatCache)> = items
            .par_iter()
            .map(|item| {
                let mut cache = StatCache::borrow(&lent);
                if observing {
                    cache.observe();
                }
                (work(item, &mut cache), cache)
            })
            .collect();
        let mut results = Vec::with_capacity(done.len());
        let mut borrowers = Vec::with_capacity(done.len());
        for (result, mut cache) in done {
            if let (Some(observed), Some(theirs)) = (&mut self.observed, cache.observed.take()) {
                for (path, stat) in theirs {
                    observed.entry(path).or_insert(stat);
                }
            }
            results.push(result);
            borrowers.push(cache);
        }
        self.take_back(lent, borrowers);
        results
    }

    /// Lends the entries out, for stages decided on several threads at once: each thread
    /// [`StatCache::borrow`]s them, and [`StatCache::take_back`] merges what the borrowers found.
    /// Until then this cache holds no entry.
    fn lend(&mut self) -> Lent {
        Lent(Arc::new(std::mem::take(&mut self.entries)))
    }

    /// A cache for one thread that looks up the `lent` entries after its own (it records what it
    /// hashes in its own).
    fn borrow(lent: &Lent) -> StatCache {
        StatCache {
            lent: Some(lent.0.clone()),
            ..StatCache::default()
        }
    }

    /// Takes the `lent` entries back, with the hashes the `borrowers` recorded (newer than a lent
    /// entry of the same path) and the lent entries they used marked seen.
    fn take_back(&mut self, lent: Lent, borrowers: impl IntoIterator<Item = StatCache>) {
        let mut seen = Vec::new();
        let mut found = Vec::new();
        for mut borrower in borrowers {
            borrower.lent = None;
            self.dirty |= borrower.dirty;
            seen.append(&mut borrower.seen_lent);
            found.push(borrower.entries);
        }
        // Every borrower is gone by now; were one kept elsewhere, its view is copied.
        let mut entries = Arc::try_unwrap(lent.0).unwrap_or_else(|shared| (*shared).clone());
        for key in seen {
            if let Some(entry) = entries.get_mut(&key) {
                entry.seen = true;
            }
        }
        // This cache is not used while its entries are lent (`par_map` holds it).
        debug_assert!(self.entries.is_empty());
        self.entries = entries;
        for borrowed in found {
            self.entries.extend(borrowed);
        }
    }

    /// Records a hash the engine just computed for a file it wrote (e.g. a published output).
    pub fn remember(&mut self, path: &Path, blake3: &str) -> io::Result<()> {
        self.remember_stat(path, &std::fs::metadata(path)?, blake3);
        Ok(())
    }

    /// [`StatCache::remember`] with the stat `meta` of `path`, taken by the caller after the
    /// file's last change.
    pub fn remember_stat(&mut self, path: &Path, meta: &std::fs::Metadata, blake3: &str) {
        let stat = StatKey::of(meta);
        let key: Box<str> = path.to_string_lossy().into();
        let Some(entry) = Digest::from_hex(blake3).and_then(|d| Entry::new(stat, d, now_ns()))
        else {
            // Not a hash this cache could have computed (or a time it cannot hold): nothing is
            // remembered, and what was remembered for the path is forgotten (the file is hashed
            // when next asked for).
            self.dirty |= self.entries.remove(&key).is_some();
            return;
        };
        self.entries.insert(key, entry);
        self.dirty = true;
    }

    /// The stat recorded for `path`, if any (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn recorded_stat(&self, path: &Path) -> Option<StatKey> {
        self.entries.get(&*path.to_string_lossy()).map(Entry::stat)
    }

    /// Takes over the entries of another cache (e.g. hashes a worker recorded while publishing).
    pub fn absorb(&mut self, other: StatCache) {
        if !other.entries.is_empty() {
            self.entries.extend(other.entries);
            self.dirty = true;
        }
    }

    /// Drops entries of files that no longer exist (keeps the cache from growing forever); the
    /// files this process looked up are known to exist and are not stat'ed again.
    pub fn prune_missing(&mut self) {
        use rayon::prelude::*;
        // On all cores: after a one-touch build at 10,000 stages, 20,000 entries are unseen.
        let unseen: Vec<&str> = self
            .entries
            .iter()
            .filter(|(_, entry)| !entry.seen)
            .map(|(path, _)| &**path)
            .collect();
        let missing: Vec<Box<str>> = unseen
            .par_iter()
            .with_min_len(256)
            .filter(|path| !Path::new(path).exists())
            .map(|&path| Box::from(path))
            .collect();
        for path in &missing {
            self.entries.remove(path);
        }
        self.dirty |= !missing.is_empty();
    }
}

/// The entries of a `cache/stat-v2.bin` file's bytes; `None` unless its trailer is the blake3 of
/// the rest (a file cut short or damaged on disk) and it is of this version.
fn read_bin(bytes: &[u8]) -> Option<HashMap<Box<str>, Entry>> {
    let (body, trailer) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != trailer {
        return None;
    }
    let file: BinFile = postcard::from_bytes(body).ok()?;
    (file.version == BIN_VERSION).then(|| {
        file.entries
            .into_iter()
            .map(|(path, entry)| (Box::from(path), Entry::from(entry)))
            .collect()
    })
}

/// A writer that hashes what goes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: io::Write> io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How much of a big file is mapped at once while it is hashed. Mapping the whole file made every
/// page of it count in the engine's resident memory: a build over a 1 GiB input peaked at 1 GiB
/// RSS. Window by window, the peak stays bounded whatever the size of the inputs.
const HASH_WINDOW_BYTES: u64 = 16 << 20;

/// The blake3 of a file's content, hex-encoded; big files on all cores.
pub fn hash_file(path: &Path, size: u64) -> io::Result<String> {
    hash_open_file(&mut std::fs::File::open(path)?, size)
}

/// [`hash_file`] of a file already open (read from its current offset; mapped from its start
/// when it is big).
pub fn hash_open_file(file: &mut std::fs::File, size: u64) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    if size >= PARALLEL_HASH_BYTES {
        hash_mapped(&mut hasher, file, HASH_WINDOW_BYTES)?;
    } else {
        hasher.update_reader(file)?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Feeds `file` (its whole current length) to `hasher` on all cores, one mapped `window` (a
/// multiple of the page size) after the other; where a window cannot be mapped, the rest is
/// read instead.
fn hash_mapped(
    hasher: &mut blake3::Hasher,
    file: &mut std::fs::File,
    window: u64,
) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let len = file.metadata()?.len();
    let mut offset = 0;
    while offset < len {
        let window = window.min(len - offset);
        // SAFETY: mmap is the system call this needs; the mapping is read-only, private to this
        // function and dropped before the next one is made. A file truncated while it is hashed
        // raises SIGBUS, as blake3's own whole-file `update_mmap_rayon` (used before) did.
        let mapped = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(window as usize)
                .map(&*file)
        };
        let Ok(mapped) = mapped else {
            file.seek(SeekFrom::Start(offset))?;
            hasher.update_reader(file)?;
            return Ok(());
        };
        hasher.update_rayon(&mapped);
        offset += window;
    }
    Ok(())
}

pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn age(path: &Path, seconds: u64) {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(seconds);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }

    #[test]
    fn hashes_content_and_reuses_the_cache_for_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, b"hello").unwrap();
        age(&file, 60);
        let mut cache = StatCache::load(&dir.path().join("missing.json"));
        let first = cache.hash(&file).unwrap();
        assert_eq!(first.blake3, blake3::hash(b"hello").to_hex().to_string());
        assert_eq!(first.size, 5);
        // Poison the cached hash: if the cache is trusted, the poisoned value comes back.
        let poisoned = blake3::hash(b"poisoned").to_hex().to_string();
        cache
            .entries
            .values_mut()
            .for_each(|e| e.blake3 = Digest::from_hex(&poisoned).unwrap());
        assert_eq!(cache.hash(&file).unwrap().blake3, poisoned);
        let path = dir.path().join("cache.bin");
        cache.save(&path).unwrap();
        assert_eq!(StatCache::load(&path).hash(&file).unwrap().blake3, poisoned);
    }

    #[test]
    fn borrowers_use_the_lent_entries_and_give_back_what_they_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let (known, changed, new) = (
            dir.path().join("known.txt"),
            dir.path().join("changed.txt"),
            dir.path().join("new.txt"),
        );
        for (path, text) in [(&known, "known"), (&changed, "before"), (&new, "new")] {
            std::fs::write(path, text).unwrap();
            age(path, 60);
        }
        let mut cache = StatCache::default();
        cache.hash(&known).unwrap();
        cache.hash(&changed).unwrap();
        cache.save(&dir.path().join("cache.json")).unwrap();
        // Poisoned: a lent entry that is used gives the poisoned hash back.
        let poisoned = Digest::from_hex(&blake3::hash(b"poisoned").to_hex()).unwrap();
        cache.entries.values_mut().for_each(|e| {
            e.blake3 = poisoned;
            e.seen = false;
        });
        std::fs::write(&changed, "after!").unwrap();
        let lent = cache.lend();
        assert!(cache.entries.is_empty());
        let mut first = StatCache::borrow(&lent);
        let mut second = StatCache::borrow(&lent);
        assert_eq!(first.hash(&known).unwrap().blake3, poisoned.to_hex());
        let after = blake3::hash(b"after!").to_hex().to_string();
        assert_eq!(second.hash(&changed).unwrap().blake3, after);
        assert_eq!(
            second.hash(&new).unwrap().blake3,
            blake3::hash(b"new").to_hex().to_string()
        );
        // A borrower's own hash of a path wins over the lent one.
        assert_eq!(second.hash(&changed).unwrap().blake3, after);
        // Hashes a borrower takes are its own, not the lent ones.
        assert!(!first.is_dirty() && second.is_dirty());
        cache.take_back(lent, [first, second]);
        assert!(cache.is_dirty());
        let entry = |path: &Path| cache.entries[&*path.to_string_lossy()].clone();
        assert!(entry(&known).seen && entry(&known).blake3 == poisoned);
        assert_ne!(entry(&changed).blake3, poisoned);
        assert_eq!(
            entry(&new).blake3.to_hex(),
            blake3::hash(b"new").to_hex().to_string()
        );
    }

    #[test]
    fn hash_all_gives_each_path_its_hash_in_order_on_all_cores() {
        let dir = tempfile::tempdir().unwrap();
        let n = 5 * PARALLEL_HASH_PATHS;
        let paths: Vec<PathBuf> = (0..n)
            .map(|i| dir.path().join(format!("f{i}.txt")))
            .collect();
        for (i, path) in paths.iter().enumerate() {
            if i % 7 != 3 {
                std::fs::write(path, format!("file {i}")).unwrap();
            }
        }
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let mut cache = StatCache::default();
        cache.observe();
        let hashes = cache.hash_all(&refs);
        assert_eq!(hashes.len(), n);
        for (i, hash) in hashes.into_iter().enumerate() {
            match hash {
                Ok(h) => assert_eq!(
                    h.blake3,
                    blake3::hash(format!("file {i}").as_bytes())
                        .to_hex()
                        .to_string()
                ),
                Err(err) => assert!(
                    i % 7 == 3 && err.kind() == io::ErrorKind::NotFound,
                    "{i}: {err}"
                ),
            }
        }
        // Every file hashed is remembered, with the stat it was read at.
        let observed = cache.take_observed();
        let present: Vec<_> = paths
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 != 3)
            .collect();
        assert_eq!(observed.len(), present.len());
        for (_, path) in present {
            assert!(cache.entries.contains_key(&*path.to_string_lossy()));
            let stat = StatKey::of(&std::fs::metadata(path).unwrap());
            assert_eq!(observed[path.as_os_str()], stat);
        }
    }

    #[test]
    fn racy_entries_are_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, b"hello").unwrap();
        let mut cache = StatCache::default();
        cache.hash(&file).unwrap();
        cache
            .entries
            .values_mut()
            .for_each(|e| e.blake3 = Digest(*blake3::hash(b"poisoned").as_bytes()));
        // Just written: within the racy window, so the file is read again.
        assert_eq!(
            cache.hash(&file).unwrap().blake3,
            blake3::hash(b"hello").to_hex().to_string()
        );
    }

    #[test]
    fn a_changed_stat_means_a_new_hash() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, b"hello").unwrap();
        age(&file, 60);
        let mut cache = StatCache::default();
        cache.hash(&file).unwrap();
        std::fs::write(&file, b"world").unwrap();
        age(&file, 30);
        assert_eq!(
            cache.hash(&file).unwrap().blake3,
            blake3::hash(b"world").to_hex().to_string()
        );
    }

    #[test]
    fn large_files_hash_the_same_in_parallel() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        let data: Vec<u8> = (0..PARALLEL_HASH_BYTES as usize + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&file, &data).unwrap();
        assert_eq!(
            hash_file(&file, data.len() as u64).unwrap(),
            blake3::hash(&data).to_hex().to_string()
        );
    }

    #[test]
    fn a_file_hashed_window_by_window_hashes_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..(1 << 20) + 12345).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let page = rustix::param::page_size() as u64;
        // Windows that split the file at page multiples (the last one short), one window bigger
        // than the file, and the window the engine uses.
        for window in [page, 16 * page, 1 << 20, 4 << 20, HASH_WINDOW_BYTES] {
            let mut hasher = blake3::Hasher::new();
            let mut file = std::fs::File::open(&path).unwrap();
            hash_mapped(&mut hasher, &mut file, window).unwrap();
            assert_eq!(hasher.finalize(), blake3::hash(&data), "window {window}");
        }
    }

    #[test]
    fn digests_round_trip_as_lowercase_hex_and_nothing_else_is_one() {
        let hex = blake3::hash(b"x").to_hex().to_string();
        let d = Digest::from_hex(&hex).unwrap();
        assert_eq!(d.to_hex(), hex);
        assert_eq!(
            serde_json::from_str::<Digest>(&format!("\"{hex}\"")).unwrap(),
            d
        );
        for bad in [
            "",
            "poisoned",
            &hex[1..],
            &hex.to_uppercase(),
            &format!("{hex}0"),
        ] {
            assert!(Digest::from_hex(bad).is_none(), "{bad}");
        }
        // A hash that is no digest is not remembered, and forgets what was.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, b"x").unwrap();
        let mut cache = StatCache::default();
        cache.remember(&file, &hex).unwrap();
        assert_eq!(cache.entries.len(), 1);
        cache.remember(&file, "poisoned").unwrap();
        assert!(cache.entries.is_empty());
    }

    #[test]
    fn a_cache_of_the_earlier_json_form_is_read_once_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, b"x").unwrap();
        age(&file, 60);
        // Not the file's hash: if it comes back, the entry was trusted, not rehashed.
        let hex = blake3::hash(b"poisoned").to_hex().to_string();
        let meta = std::fs::metadata(&file).unwrap();
        let stat = StatKey::of(&meta);
        // As `cache/stat-v1.json` was written: read, trusted, then saved in the new form.
        let text = format!(
            r#"{{"version":1,"entries":{{{path}:{{"stat":{{"size":1,"mtimeNs":{m},"ctimeNs":{c},"inode":{i}}},"blake3":"{hex}","hashedAtNs":{h}}}}}}}"#,
            path = serde_json::to_string(&file.to_string_lossy()).unwrap(),
            m = stat.mtime_ns,
            c = stat.ctime_ns,
            i = stat.inode,
            h = now_ns(),
        );
        let (path, legacy) = (dir.path().join("v2.bin"), dir.path().join("v1.json"));
        std::fs::write(&legacy, &text).unwrap();
        let mut cache = StatCache::load_or_migrate(&path, &legacy);
        assert_eq!(cache.entries.len(), 1);
        assert!(!cache.entries.values().next().unwrap().seen);
        assert!(
            cache.is_dirty(),
            "saved in the new form even if nothing changes"
        );
        cache.save(&path).unwrap();
        assert!(!legacy.exists());
        let mut again = StatCache::load_or_migrate(&path, &legacy);
        assert!(!again.is_dirty());
        assert_eq!(again.entries.len(), 1);
        assert_eq!(again.hash(&file).unwrap().blake3, hex);
        // The new form wins over an earlier file written again beside it, which the next save
        // removes.
        std::fs::write(&legacy, b"{}").unwrap();
        let mut again = StatCache::load_or_migrate(&path, &legacy);
        assert_eq!(again.entries.len(), 1);
        again.dirty = true;
        again.save(&path).unwrap();
        assert!(!legacy.exists());
        // A time beyond 64 bits: the earlier file is not used (it only costs rehashing).
        let far = text.replace(
            &format!("\"mtimeNs\":{}", stat.mtime_ns),
            &format!("\"mtimeNs\":{}", i128::MAX),
        );
        assert_ne!(far, text);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&legacy, &far).unwrap();
        assert!(StatCache::load_or_migrate(&path, &legacy)
            .entries
            .is_empty());
    }

    #[test]
    fn pruning_drops_exactly_the_unseen_entries_of_files_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let n = 600;
        let mut cache = StatCache::default();
        let files: Vec<_> = (0..n)
            .map(|i| dir.path().join(format!("f{i}.txt")))
            .collect();
        for file in &files {
            std::fs::write(file, b"x").unwrap();
            age(file, 60);
            cache.hash(file).unwrap();
        }
        let path = dir.path().join("cache.bin");
        cache.save(&path).unwrap();
        // Loaded again: nothing seen. Every third file is removed, and the entries of files
        // 0..10 are looked up (seen) before their files go.
        let mut cache = StatCache::load(&path);
        for file in &files[..10] {
            cache.hash(file).unwrap();
        }
        for file in files.iter().step_by(3) {
            std::fs::remove_file(file).unwrap();
        }
        cache.prune_missing();
        assert!(cache.is_dirty());
        for (i, file) in files.iter().enumerate() {
            let kept = cache.entries.contains_key(&*file.to_string_lossy());
            assert_eq!(kept, i < 10 || i % 3 != 0, "f{i}");
        }
        // Saved and loaded again (nothing seen): the kept entries of removed files go now.
        cache.save(&path).unwrap();
        let mut again = StatCache::load(&path);
        let before = again.entries.len();
        again.prune_missing();
        assert_eq!(again.entries.len(), before - 4, "f0, f3, f6 and f9");
        again.save(&path).unwrap();
        let mut last = StatCache::load(&path);
        last.prune_missing();
        assert!(!last.is_dirty(), "nothing left to drop");
    }

    #[test]
    fn a_damaged_cut_or_foreign_cache_file_loads_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(StatCache::load(&path).entries.is_empty());
        let mut cache = StatCache::default();
        for i in 0..50 {
            let file = dir.path().join(format!("f{i}.txt"));
            std::fs::write(&file, format!("{i}")).unwrap();
            age(&file, 60);
            cache.hash(&file).unwrap();
        }
        cache.save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        assert_eq!(StatCache::load(&path).entries.len(), 50);
        // One byte flipped anywhere, body or trailer.
        for at in [0, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            assert!(StatCache::load(&path).entries.is_empty(), "flipped at {at}");
        }
        // Cut short.
        std::fs::write(&path, &good[..good.len() - 40]).unwrap();
        assert!(StatCache::load(&path).entries.is_empty());
        // Another version, with a valid trailer.
        let mut body = good[..good.len() - 32].to_vec();
        assert_eq!(
            body[0], BIN_VERSION as u8,
            "the version is the first varint"
        );
        body[0] = 9;
        let trailer = blake3::hash(&body);
        body.extend_from_slice(trailer.as_bytes());
        std::fs::write(&path, &body).unwrap();
        assert!(StatCache::load(&path).entries.is_empty());
    }
}
