//! Atomic, durable file replacement: the one way `pipe` writes state, markers and caches.
//!
//! A reader must never see a torn file, and a crash must leave either the old or the new content.
//! So every write goes to a temporary file in the same folder, is fsynced, renamed over the target,
//! and the folder is fsynced so the rename itself survives a power cut.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use pipe_processors::failpoint;
use serde::Serialize;

/// Replaces `path` with `bytes` atomically but without fsync: readers (including a later process
/// after this one is killed) see the old or the new content, never a torn file; a power cut may
/// lose the update. Only for files whose loss to a power cut costs nothing (the `running` stage
/// record, which a durable record supersedes within the stage's run) or only a future shortcut
/// (the output-cache entry of a published stage: the stage runs instead of being restored).
pub fn replace_volatile(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (_, tmp) = temporary_for(path)?;
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The folder of `path` and the temporary file (`.NAME.tmp-PID`) a write to it goes through.
fn temporary_for(path: &Path) -> io::Result<(&Path, std::path::PathBuf)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("atomic write needs a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    Ok((dir, tmp))
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |file| file.write_all(bytes))
}

/// Writes what `fill` writes to `path` atomically and durably: `fill` streams into the
/// temporary file (through a buffer), so content of any size needs no copy of it in memory.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let (dir, tmp) = temporary_for(path)?;
    std::fs::create_dir_all(dir)?;
    let result = (|| {
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, File::create(&tmp)?);
        fill(&mut out)?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        failpoint::hit("atomic.after-tmp-write");
        file.sync_all()?;
        failpoint::hit("atomic.after-tmp-fsync");
        drop(file);
        std::fs::rename(&tmp, path)?;
        failpoint::hit("atomic.after-rename");
        sync_dir(dir)?;
        failpoint::hit("atomic.after-dir-fsync");
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The buffer [`write_with`] streams through: big writes pass it by (`BufWriter` hands a write
/// larger than its buffer straight to the file).
const WRITE_BUFFER: usize = 64 * 1024;

/// Serialises `value` as pretty JSON (with a final newline) and writes it atomically: streamed
/// into the file, never held whole in memory (a map stage's marker lists every item), the same
/// bytes as `serde_json::to_vec_pretty` and a newline.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> io::Result<()> {
    write_with(path, |out| {
        serde_json::to_writer_pretty(&mut *out, value).map_err(json_error)?;
        out.write_all(b"\n")
    })
}

/// A serialisation error as an I/O error; a failed write keeps its own kind and OS error (a full
/// disk stays `StorageFull`, a transient error stays retryable).
pub fn json_error(err: serde_json::Error) -> io::Error {
    if err.is_io() {
        io::Error::from(err)
    } else {
        io::Error::other(err)
    }
}

/// fsyncs a folder, making renames and removals inside it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Above this many folders or files, [`sync_dirs`] and [`sync_files`] sync their filesystem once
/// instead.
const SYNCFS_ABOVE: usize = 8;

/// Whether [`sync_dirs`] and [`sync_files`] sync the whole filesystem for `count` paths.
pub fn syncs_filesystem(count: usize) -> bool {
    count > SYNCFS_ABOVE
}

/// Makes renames and removals in all of `dirs` (on one filesystem) durable: a few with one fsync
/// each; many with a single `syncfs`, the group commit that turns a fan-in publishing 10,000
/// folders from 10,000 journal commits into one.
pub fn sync_dirs<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
    let dirs: Vec<&Path> = dirs.into_iter().collect();
    if dirs.len() > SYNCFS_ABOVE {
        return sync_filesystem(dirs[0]);
    }
    dirs.into_iter().try_for_each(sync_dir)
}

/// Makes the contents of `files` (on one filesystem) durable: a few with one fdatasync each;
/// many with a single `syncfs`. Cheap for a file its writer synced already (nothing is dirty).
pub fn sync_files<'a>(files: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
    let files: Vec<&Path> = files.into_iter().collect();
    if files.len() > SYNCFS_ABOVE {
        return sync_filesystem(files[0]);
    }
    files
        .into_iter()
        .try_for_each(|file| File::open(file)?.sync_data())
}

/// `syncfs` of the filesystem holding `path` (or its nearest existing ancestor): every dirty
/// file, inode and folder entry on it.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let mut at = path;
    let file = loop {
        match File::open(at) {
            Ok(file) => break file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                at = at
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .ok_or(err)?;
            }
            Err(err) => return Err(err),
        }
    };
    rustix::fs::syncfs(file).map_err(io::Error::from)
}

/// Whether `name` is a temporary file of [`write`] (`.NAME.tmp-PID`).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes temporaries that a process killed in the middle of [`write`] left in `dir` (and below
/// it when `recursive`). Call only while holding the workspace lock, so no live writer owns them.
pub fn sweep_temporaries(dir: &Path, recursive: bool) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(0)
        }
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() && recursive {
            removed += sweep_temporaries(&entry.path(), true)?;
        } else if kind.is_file() && is_temporary(&entry.file_name().to_string_lossy()) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes a file if it exists; `Ok(true)` when something was removed.
pub fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();
        write_json(&path, &serde_json::json!({"b": 2})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::json!({"b": 2})
        );
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn streamed_json_is_the_bytes_of_to_vec_pretty() {
        // Bigger than the write buffer, with strings that need escaping.
        let value: std::collections::BTreeMap<String, (String, u64)> = (0..20_000)
            .map(|i| (format!("input/f{i:06}.txt"), (format!("\"é\\{i}\n"), i)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        write_json(&path, &value).unwrap();
        let mut want = serde_json::to_vec_pretty(&value).unwrap();
        want.push(b'\n');
        assert!(want.len() > 2 * WRITE_BUFFER);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn a_failed_streamed_write_keeps_its_error_kind_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let err = write_with(&path, |out| {
            out.write_all(b"partial")?;
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = json_error(serde_json::to_writer(Full, &[1, 2, 3]).unwrap_err());
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn volatile_replacement_replaces_whole_files_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("processes.json");
        replace_volatile(&path, b"{\"a\": 1}\n").unwrap();
        replace_volatile(&path, b"{}\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("no/such/folder/x.json");
        assert!(replace_volatile(&missing, b"x").is_err());
    }

    #[test]
    fn stray_temporaries_are_recognised_and_swept() {
        assert!(is_temporary(".run_x.json.tmp-1234"));
        assert!(!is_temporary("run_x.json.tmp-1234"));
        assert!(!is_temporary(".a.tmp-"));
        assert!(!is_temporary(".a.tmp-12x"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for name in [
            ".a.json.tmp-1",
            "sub/.b.json.tmp-22",
            "keep.json",
            ".hidden",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(sweep_temporaries(dir.path(), false).unwrap(), 1);
        assert_eq!(sweep_temporaries(dir.path(), true).unwrap(), 1);
        assert!(dir.path().join("keep.json").exists() && dir.path().join(".hidden").exists());
        assert_eq!(
            sweep_temporaries(&dir.path().join("missing"), true).unwrap(),
            0
        );
    }

    #[test]
    fn remove_if_exists_reports_what_it_did() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        assert!(!remove_if_exists(&path).unwrap());
        std::fs::write(&path, b"1").unwrap();
        assert!(remove_if_exists(&path).unwrap());
    }
}
