//! Resolves a stage's declared inputs (files, folders, globs) to the sorted list of files it reads.
//!
//! Folders contribute every regular file below them, except pipe's own markers and staging
//! folders. The *input root* is the deepest folder containing every input: processors mirror
//! input names relative to it (`input/a/b.txt` with root `input` becomes `<out>/a/b.txt`).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use globset::GlobBuilder;
use walkdir::WalkDir;

use crate::spec::{Input, Spec, Stage};
use crate::workspace::is_pipe_internal;

/// The files a stage reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInputs {
    /// Root-relative path → absolute path, sorted by relative path.
    pub files: BTreeMap<String, PathBuf>,
    /// Root-relative input root ("" for the project folder).
    pub root: String,
    /// Every folder the listing walked (absolute): adding or removing a file changes one of their
    /// mtimes, which is what lets [`crate::memo`] re-verify a listing with `stat` alone.
    pub dirs: Vec<PathBuf>,
}

/// An input that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input file name `{path}` is not valid UTF-8: pipe records paths in JSON and passes them to processors as JSON, so rename the file")]
    NotUtf8 { path: String },
    #[error("input `{path}` does not exist")]
    Missing { path: String },
    #[error("cannot read input `{path}`: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Lists the files `stage` reads, now.
pub fn resolve(spec: &Spec, stage: &Stage) -> Result<ResolvedInputs, InputError> {
    let mut files = BTreeMap::new();
    let mut folders = Vec::new();
    let mut dirs = Vec::new();
    for input in &stage.inputs {
        match input {
            Input::Path(rel) => {
                let abs = spec.path(rel);
                let meta = std::fs::metadata(&abs).map_err(|source| match source.kind() {
                    io::ErrorKind::NotFound => InputError::Missing { path: rel.clone() },
                    _ => InputError::Unreadable {
                        path: rel.clone(),
                        source,
                    },
                })?;
                if meta.is_dir() {
                    folders.push(rel.clone());
                    walk(spec, rel, &mut files, &mut dirs, |_| true)?;
                } else {
                    folders.push(
                        rel.rsplit_once('/')
                            .map_or(String::new(), |(d, _)| d.to_string()),
                    );
                    files.insert(rel.clone(), abs);
                }
            }
            Input::Glob { pattern, base } => {
                folders.push(base.clone());
                let matcher = GlobBuilder::new(pattern)
                    .literal_separator(true)
                    .build()
                    .expect("validated glob")
                    .compile_matcher();
                if spec.path(base).is_dir() {
                    walk(spec, base, &mut files, &mut dirs, |rel| {
                        matcher.is_match(rel)
                    })?;
                }
            }
        }
    }
    Ok(ResolvedInputs {
        root: common_root(&folders),
        files,
        dirs,
    })
}

fn walk(
    spec: &Spec,
    rel: &str,
    files: &mut BTreeMap<String, PathBuf>,
    dirs: &mut Vec<PathBuf>,
    keep: impl Fn(&str) -> bool,
) -> Result<(), InputError> {
    let walker = WalkDir::new(spec.path(rel))
        .follow_links(true)
        .sort_by_file_name()
        .into_iter();
    for entry in walker
        .filter_entry(|e| e.depth() == 0 || !is_pipe_internal(&e.file_name().to_string_lossy()))
    {
        let entry = entry.map_err(|err| InputError::Unreadable {
            path: err
                .path()
                .map_or_else(|| rel.to_string(), |p| p.display().to_string()),
            source: err
                .into_io_error()
                .unwrap_or_else(|| io::Error::other("filesystem loop")),
        })?;
        if entry.file_type().is_dir() {
            dirs.push(entry.into_path());
            continue;
        }
        if !entry.file_type().is_file() {
            continue;
        }
        if entry.path().to_str().is_none() {
            return Err(InputError::NotUtf8 {
                path: entry.path().to_string_lossy().into_owned(),
            });
        }
        let relative = entry
            .path()
            .strip_prefix(&spec.root)
            .unwrap_or(entry.path());
        let relative = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if keep(&relative) {
            files.insert(relative, entry.into_path());
        }
    }
    Ok(())
}

/// The deepest folder containing every one of `folders` (root-relative).
fn common_root(folders: &[String]) -> String {
    let mut iter = folders.iter();
    let Some(first) = iter.next() else {
        return String::new();
    };
    let mut root: Vec<&str> = first.split('/').filter(|s| !s.is_empty()).collect();
    for folder in iter {
        let parts: Vec<&str> = folder.split('/').filter(|s| !s.is_empty()).collect();
        let same = root.iter().zip(&parts).take_while(|(a, b)| a == b).count();
        root.truncate(same);
    }
    root.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_root_is_the_deepest_common_folder() {
        let root = |f: &[&str]| common_root(&f.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(root(&["input"]), "input");
        assert_eq!(root(&["data/a", "data/b/c"]), "data");
        assert_eq!(root(&["a", "b"]), "");
        assert_eq!(root(&[]), "");
    }
}
