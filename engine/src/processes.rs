//! `state/processes.jsonl`: which processors a build started and which of them ended, so that the
//! next build can stop what a killed one left running.
//!
//! The record is append-only: one JSON line per spawn (`{"event":"spawned","stage":…,"pid":…,
//! "startTime":…,"runId":…}`) and one per exit (`{"event":"exited","pid":…,"startTime":…}`), written
//! with one `write` each to a file opened once per build with `O_APPEND`. It is never fsynced: it
//! only matters to a build that starts after this one was killed, and a kill (unlike a power cut,
//! which ends the processes too) keeps what was written. Rewriting a whole file per spawn and per
//! exit (a temporary file and a rename: a new inode each time) cost more than the processors of
//! small stages.
//!
//! Replaying the lines in order gives the processors that were started and not seen ending: the
//! orphan candidates. A line that does not parse (the last one, torn by a kill in the middle of
//! its `write`) is skipped. The file is removed when a build ends with every processor it started
//! seen ending, and by the next build once it has stopped the orphans.
//!
//! `state/processes.json`, the whole-file map (stage → process) that earlier versions rewrote, is
//! still read (and removed) by [`orphans`], so a build of this version cleans up after a killed
//! build of the previous one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A processor started by a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningProcess {
    pub pid: u32,
    /// From `/proc/<pid>/stat`: with the pid, identifies the process across time.
    pub start_time: u64,
    pub run_id: String,
}

/// One line of `state/processes.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
enum Line {
    #[serde(rename_all = "camelCase")]
    Spawned {
        stage: String,
        pid: u32,
        start_time: u64,
        run_id: String,
    },
    #[serde(rename_all = "camelCase")]
    Exited { pid: u32, start_time: u64 },
}

/// The appender of one build. The coordinator thread is its only user.
#[derive(Debug)]
pub struct ProcessLog {
    path: PathBuf,
    /// Opened (created) at the first spawn: a build that runs nothing writes nothing.
    file: Option<File>,
    /// Processes spawned and not yet seen ending: pid → start time.
    live: BTreeMap<u32, u64>,
}

impl ProcessLog {
    /// An appender to `path` (`state/processes.jsonl`), which [`orphans`] has emptied.
    pub fn new(path: PathBuf) -> ProcessLog {
        ProcessLog {
            path,
            file: None,
            live: BTreeMap::new(),
        }
    }

    /// Records that `stage`'s processor `pid` started.
    pub fn spawned(&mut self, stage: &str, p: &RunningProcess) -> io::Result<()> {
        self.live.insert(p.pid, p.start_time);
        self.write(&Line::Spawned {
            stage: stage.to_string(),
            pid: p.pid,
            start_time: p.start_time,
            run_id: p.run_id.clone(),
        })
    }

    /// Records that processor `pid` (started at `start_time`) ended and its process group was
    /// stopped; a process this build did not record as spawned is ignored.
    pub fn exited(&mut self, pid: u32, start_time: u64) -> io::Result<()> {
        if self.live.get(&pid) != Some(&start_time) {
            return Ok(());
        }
        self.live.remove(&pid);
        self.write(&Line::Exited { pid, start_time })
    }

    /// Processors spawned and not yet seen ending.
    pub fn running(&self) -> usize {
        self.live.len()
    }

    fn write(&mut self, line: &Line) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            ),
        };
        // One `write` per line: a kill tears at most the line being written, the last one.
        file.write_all(&bytes)
    }
}

impl Drop for ProcessLog {
    /// Removes the record once every processor it lists has ended: nothing is left to stop.
    fn drop(&mut self) {
        if self.file.take().is_some() && self.live.is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The processors `state/processes.jsonl` (and a `state/processes.json` of an earlier version)
/// list as started and not ended, by pid, with their stage; reading stops at nothing: unreadable
/// lines are skipped.
pub fn orphans(log: &Path, legacy: &Path) -> BTreeMap<u32, (String, RunningProcess)> {
    let mut found = BTreeMap::new();
    if let Ok(bytes) = std::fs::read(legacy) {
        let recorded: BTreeMap<String, RunningProcess> =
            serde_json::from_slice(&bytes).unwrap_or_default();
        for (stage, p) in recorded {
            found.insert(p.pid, (stage, p));
        }
    }
    if let Ok(bytes) = std::fs::read(log) {
        replay(&bytes, &mut found);
    }
    found
}

/// Applies the lines of a process record, in order, to `live`.
fn replay(bytes: &[u8], live: &mut BTreeMap<u32, (String, RunningProcess)>) {
    for text in bytes.split(|b| *b == b'\n') {
        match serde_json::from_slice::<Line>(text) {
            Ok(Line::Spawned {
                stage,
                pid,
                start_time,
                run_id,
            }) => {
                let p = RunningProcess {
                    pid,
                    start_time,
                    run_id,
                };
                live.insert(pid, (stage, p));
            }
            Ok(Line::Exited { pid, start_time }) => {
                if live
                    .get(&pid)
                    .is_some_and(|(_, p)| p.start_time == start_time)
                {
                    live.remove(&pid);
                }
            }
            Err(_) => {} // empty, or torn by a kill mid-write
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, start_time: u64) -> RunningProcess {
        RunningProcess {
            pid,
            start_time,
            run_id: "r1".into(),
        }
    }

    #[test]
    fn a_record_lists_what_started_and_did_not_end_and_goes_when_all_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("processes.jsonl");
        let legacy = dir.path().join("processes.json");
        let mut log = ProcessLog::new(path.clone());
        assert!(!path.exists(), "nothing is written before a spawn");
        log.spawned("a", &process(10, 100)).unwrap();
        log.spawned("b", &process(11, 110)).unwrap();
        log.exited(10, 100).unwrap();
        log.exited(99, 990).unwrap(); // never spawned: ignored
        log.exited(11, 111).unwrap(); // another life of pid 11: ignored
        log.spawned("a", &process(12, 120)).unwrap(); // a retry
        assert_eq!(log.running(), 2);
        let found = orphans(&path, &legacy);
        assert_eq!(
            found
                .into_iter()
                .map(|(pid, (stage, _))| (pid, stage))
                .collect::<Vec<_>>(),
            vec![(11, "b".to_string()), (12, "a".to_string())]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.starts_with(
            "{\"event\":\"spawned\",\"stage\":\"a\",\"pid\":10,\"startTime\":100,\"runId\":\"r1\"}\n"
        ));
        // Processes still running: the record stays for the next build.
        drop(log);
        assert!(path.exists());

        let path = dir.path().join("clean.jsonl");
        let mut log = ProcessLog::new(path.clone());
        log.spawned("a", &process(10, 100)).unwrap();
        log.exited(10, 100).unwrap();
        drop(log);
        assert!(
            !path.exists(),
            "every processor ended: the record is removed"
        );
    }

    #[test]
    fn a_torn_line_is_skipped_and_a_reused_pid_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("processes.jsonl");
        let text = concat!(
            "{\"event\":\"spawned\",\"stage\":\"a\",\"pid\":7,\"startTime\":1,\"runId\":\"r\"}\n",
            "garbage\n",
            "{\"event\":\"exited\",\"pid\":7,\"startTime\":1}\n",
            "{\"event\":\"spawned\",\"stage\":\"b\",\"pid\":7,\"startTime\":2,\"runId\":\"r\"}\n",
            "{\"event\":\"exited\",\"pid\":7,\"startTime\":1}\n",
            "{\"event\":\"spawned\",\"stage\":\"c\",\"pid\":8,\"startTime\":3,\"runId\":\"r\"}\n",
            "{\"event\":\"exited\",\"pid\":8,\"sta",
        );
        std::fs::write(&path, text).unwrap();
        let found = orphans(&path, &dir.path().join("none.json"));
        let stages: Vec<_> = found
            .iter()
            .map(|(pid, (stage, p))| (*pid, stage.as_str(), p.start_time))
            .collect();
        // pid 7's second life never ended (the exit names its first life); pid 8's exit was torn.
        assert_eq!(stages, vec![(7, "b", 2), (8, "c", 3)]);
    }

    #[test]
    fn the_whole_file_map_of_earlier_versions_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("processes.json");
        std::fs::write(
            &legacy,
            b"{\"up\": {\"pid\": 5, \"startTime\": 50, \"runId\": \"old\"}}\n",
        )
        .unwrap();
        let found = orphans(&dir.path().join("processes.jsonl"), &legacy);
        assert_eq!(
            found.get(&5),
            Some(&(
                "up".to_string(),
                RunningProcess {
                    pid: 5,
                    start_time: 50,
                    run_id: "old".into()
                }
            ))
        );
        std::fs::write(&legacy, b"{torn").unwrap();
        assert!(orphans(&dir.path().join("processes.jsonl"), &legacy).is_empty());
    }
}
