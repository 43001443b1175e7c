//! The content-addressed output cache: objects by blake3, and action entries by fingerprint.
//!
//! When a stage publishes, each output file is stored once in `cache/objects-v1/<aa>/<rest of
//! hash>` (a hard link to the published file where the filesystem allows, a copy otherwise; never
//! a second copy of the same content), and `cache/actions-v1/<fingerprint>.json` maps the stage
//! fingerprint to the output manifest. A later build whose fingerprint has an entry with every
//! object present restores the outputs from the store instead of running the processor: going back
//! to earlier inputs (a git checkout, an undo) costs no recomputation.
//!
//! Objects are verified against their hash before they are restored: a hard-linked object shares
//! its inode with a published output, so editing that output in place corrupts the object too;
//! verification turns that into a rerun with a warning, never a wrong output. Formats carry their
//! version in the folder name (`-v1`), so a new format never misreads old data.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::hashing::hash_file;
use crate::marker::OutputEntry;

/// What a fingerprint produced, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionEntry {
    pub version: u32,
    pub stage: String,
    pub fingerprint: String,
    pub run_id: String,
    pub finished_at: String,
    pub outputs: Vec<OutputEntry>,
}

/// The cache folders of one workspace.
#[derive(Debug, Clone)]
pub struct Store {
    objects: PathBuf,
    actions: PathBuf,
    /// Whether writes are fsynced (see [`Store::volatile`]).
    durable: bool,
}

/// Why an object could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cached object {0} is missing")]
    Missing(String),
    #[error("cached object {hash} is corrupt (its content hashes to {actual})")]
    Corrupt { hash: String, actual: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Store {
    pub fn new(cache_dir: &Path) -> Store {
        Store {
            objects: cache_dir.join("objects-v1"),
            actions: cache_dir.join("actions-v1"),
            durable: true,
        }
    }

    /// The same store, written without fsync: objects and entries still appear whole or not at
    /// all (a rename), but a power cut may lose the latest. For what a durable marker already
    /// covers (a published stage's outputs): losing its cache entry only costs a future restore
    /// (the stage runs instead), and an entry whose object was lost is not used. A map stage's
    /// items, which a build killed mid-stage restores from the cache, are stored durably.
    pub fn volatile(mut self) -> Store {
        self.durable = false;
        self
    }

    /// Folders that may hold temporaries of interrupted writes (swept under the workspace lock).
    pub fn temporary_dirs(&self) -> [&Path; 2] {
        [&self.objects, &self.actions]
    }

    /// Where the object with `hash` lives.
    pub fn object_path(&self, hash: &str) -> PathBuf {
        let (fan, rest) = hash.split_at(2.min(hash.len()));
        self.objects.join(fan).join(rest)
    }

    fn action_path(&self, fingerprint: &str) -> PathBuf {
        self.actions.join(format!("{fingerprint}.json"))
    }

    /// Stores `file` (whose content hashes to `hash`) unless an object with that hash exists.
    /// `Ok(true)` when `file` itself became the object (a hard link: its ctime changed), `Ok(false)`
    /// when it was left as it was (the object existed, or was copied from it).
    ///
    /// An object that exists is looked for first: a stage run again mostly produces what it
    /// produced before, and a `stat` is cheaper than the link it makes fail (a fan-in of 10,000
    /// unchanged outputs: ~4.5 µs per failed link on tmpfs).
    pub fn put(&self, file: &Path, hash: &str) -> io::Result<bool> {
        let object = self.object_path(hash);
        if std::fs::symlink_metadata(&object).is_ok() {
            return Ok(false);
        }
        let dir = object.parent().expect("objects live in a fan-out folder");
        // A hard link is the object, whole, under its final name at once: no temporary, and an
        // object that exists already (the same content) stays. Where no link can be made (another
        // filesystem, links not allowed) the file is copied through a temporary instead.
        let linked = match std::fs::hard_link(file, &object) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // Most likely a fan-out folder not made yet (a vanished `file` fails the copy).
                std::fs::create_dir_all(dir)?;
                std::fs::hard_link(file, &object)
            }
            other => other,
        };
        match linked {
            Ok(()) => return Ok(true),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(_) => {}
        }
        std::fs::create_dir_all(dir)?;
        // The temporary lives at the top of the store (not in a fan-out folder), where the sweep
        // of interrupted writes looks without walking every object.
        // Unique per process and call: two workers may store the same content at once.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.objects.join(format!(
            ".{}.tmp-{}{call:06}",
            &hash[..hash.len().min(16)],
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        std::fs::copy(file, &tmp)?;
        if self.durable {
            File::open(&tmp)?.sync_all()?;
        }
        if let Err(err) = std::fs::rename(&tmp, &object) {
            let _ = std::fs::remove_file(&tmp);
            return Err(err);
        }
        Ok(false)
    }

    /// Makes the objects stored so far durable (one `syncfs`, not a folder fsync per object):
    /// a durable store calls it before [`Store::put_action`] names them. An object lost anyway
    /// is only a restore that does not happen: entries whose objects are missing or wrong are
    /// never used.
    fn sync_objects(&self) -> io::Result<()> {
        atomic::sync_filesystem(&self.objects)
    }

    /// Materialises object `hash` at `dest` after checking its content.
    pub fn restore(&self, hash: &str, dest: &Path) -> Result<(), RestoreError> {
        let object = self.object_path(hash);
        let meta =
            std::fs::metadata(&object).map_err(|_| RestoreError::Missing(hash.to_string()))?;
        let actual = hash_file(&object, meta.len())?;
        if actual != hash {
            return Err(RestoreError::Corrupt {
                hash: hash.to_string(),
                actual,
            });
        }
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if std::fs::hard_link(&object, dest).is_err() {
            std::fs::copy(&object, dest)?;
        }
        Ok(())
    }

    /// Records what `entry.fingerprint` produced.
    pub fn put_action(&self, entry: &ActionEntry) -> io::Result<()> {
        let path = self.action_path(&entry.fingerprint);
        if self.durable {
            self.sync_objects()?;
            return atomic::write_json(&path, entry);
        }
        let mut bytes = serde_json::to_vec_pretty(entry).map_err(io::Error::other)?;
        bytes.push(b'\n');
        std::fs::create_dir_all(&self.actions)?;
        atomic::replace_volatile(&path, &bytes)
    }

    /// The action entry of `fingerprint` if every object it names is present (content is checked
    /// when restoring).
    pub fn usable_action(&self, fingerprint: &str) -> Option<ActionEntry> {
        let entry: ActionEntry =
            serde_json::from_slice(&std::fs::read(self.action_path(fingerprint)).ok()?).ok()?;
        let complete = entry.version == 1
            && entry
                .outputs
                .iter()
                .all(|o| self.object_path(&o.blake3).is_file());
        complete.then_some(entry)
    }

    /// Like [`Store::usable_action`], and every object's content matches its name, checked
    /// through the stat cache (so an object is read once, not on every plan). `Err` names the
    /// first corrupt object: a hard-linked object whose published twin was edited in place, or
    /// bit rot; the plan then says `run`, with a warning.
    pub fn verified_action(
        &self,
        fingerprint: &str,
        cache: &mut crate::hashing::StatCache,
    ) -> Result<Option<ActionEntry>, String> {
        let Some(entry) = self.usable_action(fingerprint) else {
            return Ok(None);
        };
        for o in &entry.outputs {
            match cache.hash(&self.object_path(&o.blake3)) {
                Ok(h) if h.blake3 == o.blake3 => {}
                Ok(h) => {
                    return Err(format!(
                        "cached object of `{}` is corrupt (it hashes to {}, not {})",
                        o.path,
                        &h.blake3[..12],
                        &o.blake3[..12]
                    ))
                }
                Err(err) => {
                    return Err(format!(
                        "cached object of `{}` is unreadable: {err}",
                        o.path
                    ))
                }
            }
        }
        Ok(Some(entry))
    }

    /// Every action entry (unreadable ones are skipped).
    pub fn actions(&self) -> Vec<(PathBuf, ActionEntry)> {
        let Ok(dir) = std::fs::read_dir(&self.actions) else {
            return Vec::new();
        };
        let mut entries: Vec<(PathBuf, ActionEntry)> = dir
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| {
                Some((
                    e.path(),
                    serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?,
                ))
            })
            .collect();
        entries.sort_by(|a, b| a.1.finished_at.cmp(&b.1.finished_at));
        entries
    }

    /// Every object: (hash, path, size).
    pub fn objects(&self) -> Vec<(String, PathBuf, u64)> {
        let mut objects = Vec::new();
        for entry in walkdir::WalkDir::new(&self.objects)
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .filter_map(Result::ok)
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type().is_file() || name.starts_with('.') {
                continue;
            }
            let fan = entry
                .path()
                .parent()
                .and_then(|p| p.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let size = entry.metadata().map_or(0, |m| m.len());
            objects.push((format!("{fan}{name}"), entry.into_path(), size));
        }
        objects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blake(bytes: &[u8]) -> String {
        blake3::hash(bytes).to_hex().to_string()
    }

    #[test]
    fn stores_each_content_once_and_restores_it_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("cache"));
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, b"same").unwrap();
        std::fs::write(&b, b"same").unwrap();
        let h = blake(b"same");
        store.put(&a, &h).unwrap();
        store.put(&b, &h).unwrap();
        assert_eq!(store.objects().len(), 1);
        let out = dir.path().join("restored/x.txt");
        store.restore(&h, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"same");
    }

    #[test]
    fn an_object_is_a_link_to_the_file_and_a_file_on_another_filesystem_is_copied() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("cache"));
        let f = dir.path().join("f");
        std::fs::write(&f, b"linked").unwrap();
        assert!(
            store.put(&f, &blake(b"linked")).unwrap(),
            "f became the object"
        );
        let object = store.object_path(&blake(b"linked"));
        assert_eq!(
            std::fs::metadata(&object).unwrap().ino(),
            std::fs::metadata(&f).unwrap().ino()
        );
        // Stored again (the same content under another name): the object stays.
        let g = dir.path().join("g");
        std::fs::write(&g, b"linked").unwrap();
        assert!(
            !store.put(&g, &blake(b"linked")).unwrap(),
            "g is left as it was"
        );
        assert_eq!(
            std::fs::metadata(&object).unwrap().ino(),
            std::fs::metadata(&f).unwrap().ino()
        );

        // No link across filesystems: a copy, through a temporary that does not stay.
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
            return; // no second filesystem to try here
        };
        if std::fs::metadata(other.path()).unwrap().dev()
            == std::fs::metadata(dir.path()).unwrap().dev()
        {
            return;
        }
        let far = other.path().join("far");
        std::fs::write(&far, b"copied").unwrap();
        assert!(
            !store.put(&far, &blake(b"copied")).unwrap(),
            "far was copied, not linked"
        );
        let copy = store.object_path(&blake(b"copied"));
        assert_eq!(std::fs::read(&copy).unwrap(), b"copied");
        assert_ne!(
            std::fs::metadata(&copy).unwrap().dev(),
            std::fs::metadata(&far).unwrap().dev()
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("cache/objects-v1"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn corrupt_and_missing_objects_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let f = dir.path().join("f");
        std::fs::write(&f, b"content").unwrap();
        let h = blake(b"content");
        store.put(&f, &h).unwrap();
        std::fs::write(store.object_path(&h), b"tampered").unwrap();
        assert!(matches!(
            store.restore(&h, &dir.path().join("o")),
            Err(RestoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.restore(&blake(b"other"), &dir.path().join("o")),
            Err(RestoreError::Missing(_))
        ));
    }

    #[test]
    fn an_action_is_usable_only_with_all_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let entry = ActionEntry {
            version: 1,
            stage: "s".into(),
            fingerprint: "fp".into(),
            run_id: "r1".into(),
            finished_at: "2026-01-01T00:00:00Z".into(),
            outputs: vec![OutputEntry {
                path: "f".into(),
                size: 1,
                blake3: blake(b"x"),
            }],
        };
        store.put_action(&entry).unwrap();
        assert!(store.usable_action("fp").is_none(), "object not stored yet");
        store.put(&f, &blake(b"x")).unwrap();
        assert_eq!(store.usable_action("fp"), Some(entry.clone()));
        assert!(store.usable_action("other").is_none());

        // Written without fsync, the same files (and a zero-length entry, which a power cut can
        // leave of an entry never synced, is not usable).
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).volatile();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        store.put(&f, &blake(b"x")).unwrap();
        store.put_action(&entry).unwrap();
        assert_eq!(store.usable_action("fp"), Some(entry));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("actions-v1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("fp.json")]);
        std::fs::write(store.action_path("fp"), b"").unwrap();
        assert!(store.usable_action("fp").is_none());
    }
}
