//! Test helper: a project in its own temp dir, and a way to run the real `pipe` binary in it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A throwaway project folder.
pub struct Project {
    pub dir: tempfile::TempDir,
}

/// What a `pipe` run printed and returned.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Project {
    pub fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` to `rel` (creating folders).
    pub fn file(self, rel: &str, text: &str) -> Project {
        self.write(rel, text);
        self
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(rel)).unwrap()
    }

    /// Runs `pipe ARGS` in the project.
    pub fn pipe(&self, args: &[&str]) -> Run {
        let out = Command::new(pipe_bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .output()
            .expect("pipe runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Every file and folder in the project with its content and mtime: to prove nothing changed.
    pub fn tree(&self) -> BTreeMap<PathBuf, Option<(Vec<u8>, std::time::SystemTime)>> {
        let mut tree = BTreeMap::new();
        for entry in walkdir::WalkDir::new(self.dir.path()).min_depth(1) {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(self.dir.path())
                .unwrap()
                .to_path_buf();
            let content = entry.file_type().is_file().then(|| {
                (
                    std::fs::read(entry.path()).unwrap(),
                    entry.metadata().unwrap().modified().unwrap(),
                )
            });
            tree.insert(rel, content);
        }
        tree
    }
}

pub fn pipe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pipe"))
}
