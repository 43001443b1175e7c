//! The workspace lock: one build (or clean) at a time per project, never stale.
//!
//! `locks/pipeline.lock` is a dedicated file that is never renamed or replaced, held with
//! `flock` for the whole command. The OS releases it when the process dies, even on `kill -9`,
//! so there is nothing to unlock by hand. Who holds it (pid, run id, start time) is written beside
//! it in `pipeline.lock.json`, for the error message of a second build only.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::workspace::Workspace;

/// Who holds the lock, as they said when they took it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub pid: u32,
    pub run_id: String,
    pub command: String,
    pub started_at: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pid == 0 {
            return write!(f, "another pipe process (holder unknown)");
        }
        write!(
            f,
            "pid {} ({} run {}, started {})",
            self.pid, self.command, self.run_id, self.started_at
        )
    }
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the workspace is locked by {0}")]
    Held(Holder),
    #[error("cannot open the workspace lock `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long to wait for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    No,
    Forever,
    For(Duration),
}

/// A held workspace lock; released on drop (or by the OS on death).
#[derive(Debug)]
pub struct WorkspaceLock {
    _file: File,
    info: PathBuf,
    previous_died: bool,
}

impl WorkspaceLock {
    /// Whether the previous holder died holding the lock (killed, crashed, power lost): its holder
    /// file was still there. Only then can temporaries of an interrupted write be left over, so
    /// only then does a build sweep every output folder for them.
    pub fn previous_holder_died(&self) -> bool {
        self.previous_died
    }
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        // A panicking holder may have left work half done: keep the holder file, so that the
        // next holder treats it as dead and sweeps.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.info);
        }
    }
}

/// The lock's `flock`, taken before the Pipefile is validated if no one holds it, without waiting
/// and without writing the holder file. A build that has it knows that no other build or clean
/// can change the workspace any more, so it may start taking the stats its skip memo needs while
/// the Pipefile is still being validated. [`acquire`] completes it; dropped unused (an invalid
/// Pipefile), it releases the lock and leaves nothing behind.
#[derive(Debug, Clone)]
pub struct EarlyLock {
    path: PathBuf,
    /// Taken by the first [`acquire`]; shared by clones (of the build's options).
    file: std::sync::Arc<std::sync::Mutex<Option<File>>>,
}

impl EarlyLock {
    /// Takes the lock of `ws` if its lock file exists (a workspace that was built before: nothing
    /// is created) and no one holds it.
    pub fn try_take(ws: &Workspace) -> Option<EarlyLock> {
        let path = ws.locks_dir().join("pipeline.lock");
        let file = OpenOptions::new().read(true).write(true).open(&path).ok()?;
        file.try_lock().ok()?;
        Some(EarlyLock {
            path,
            file: std::sync::Arc::new(std::sync::Mutex::new(Some(file))),
        })
    }

    /// The held lock file if it is the one at `path` (the lock is released otherwise).
    fn take_for(&self, path: &std::path::Path) -> Option<File> {
        let file = self.file.lock().ok()?.take()?;
        (self.path == path).then_some(file)
    }
}

/// Takes the lock for `me` (completing `early` if it was taken early); calls `on_wait` once if
/// it has to wait.
pub fn acquire(
    ws: &Workspace,
    me: &Holder,
    wait: Wait,
    early: Option<&EarlyLock>,
    on_wait: impl FnOnce(&Holder),
) -> Result<WorkspaceLock, LockError> {
    let dir = ws.locks_dir();
    let path = dir.join("pipeline.lock");
    let info = dir.join("pipeline.lock.json");
    let file = match early.and_then(|early| early.take_for(&path)) {
        Some(file) => file,
        None => take(&dir, &path, &info, wait, on_wait)?,
    };
    let previous_died = info.exists();
    crate::atomic::write_json(&info, me).map_err(|source| LockError::Io {
        path: info.clone(),
        source,
    })?;
    Ok(WorkspaceLock {
        _file: file,
        info,
        previous_died,
    })
}

/// Opens the lock file at `path` (creating it and its folder `dir`) and takes its `flock`,
/// waiting as `wait` says.
fn take(
    dir: &std::path::Path,
    path: &std::path::Path,
    info: &std::path::Path,
    wait: Wait,
    on_wait: impl FnOnce(&Holder),
) -> Result<File, LockError> {
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    let deadline = match wait {
        Wait::For(d) => Some(Instant::now() + d),
        _ => None,
    };
    let mut on_wait = Some(on_wait);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(info);
                if wait == Wait::No || deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(LockError::Held(holder));
                }
                if let Some(f) = on_wait.take() {
                    f(&holder);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(TryLockError::Error(err)) => return Err(io(err)),
        }
    }
}

fn read_holder(info: &std::path::Path) -> Holder {
    std::fs::read(info)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}
