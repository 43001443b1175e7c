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
    use rayon::prelude::*;
    // A fan-in over 10,000 folders lists them on all cores.
    let listed: Vec<Result<Listed, InputError>> = if stage.inputs.len() >= PARALLEL_INPUTS {
        stage
            .inputs
            .par_iter()
            .with_min_len(PARALLEL_INPUTS / 2)
            .map(|input| list(spec, input))
            .collect()
    } else {
        stage.inputs.iter().map(|input| list(spec, input)).collect()
    };
    let mut files = BTreeMap::new();
    let mut folders = Vec::new();
    let mut dirs = Vec::new();
    for one in listed {
        let one = one?;
        files.extend(one.files);
        dirs.extend(one.dirs);
        folders.push(one.folder);
    }
    Ok(ResolvedInputs {
        root: common_root(&folders),
        files,
        dirs,
    })
}

/// A stage with at least this many inputs lists them on all cores.
const PARALLEL_INPUTS: usize = 64;

/// What one declared input lists.
struct Listed {
    files: Vec<(String, PathBuf)>,
    dirs: Vec<PathBuf>,
    /// The folder it names (a file's folder), for the input root.
    folder: String,
}

/// Lists the files one input of a stage names, now.
fn list(spec: &Spec, input: &Input) -> Result<Listed, InputError> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let folder = match input {
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
                walk(spec, rel, &mut files, &mut dirs, |_| true)?;
                rel.clone()
            } else {
                files.push((rel.clone(), abs));
                rel.rsplit_once('/')
                    .map_or(String::new(), |(d, _)| d.to_string())
            }
        }
        Input::Glob { pattern, base } => {
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
            base.clone()
        }
    };
    Ok(Listed {
        files,
        dirs,
        folder,
    })
}

/// Lists the files under `rel` (following symlinks) into `files` and its folders into `dirs`.
///
/// Walked first without following links: that needs no loop detection, for which `walkdir`
/// resolves the root's real path (a `readlink` per component of every input folder, 10,000 of
/// them for a fan-in over 10,000 folders). Only if a symlink turns up is the folder walked again,
/// following links, so the result is the same either way.
fn walk(
    spec: &Spec,
    rel: &str,
    files: &mut Vec<(String, PathBuf)>,
    dirs: &mut Vec<PathBuf>,
    keep: impl Fn(&str) -> bool,
) -> Result<(), InputError> {
    let mut found = Vec::new();
    let mut found_dirs = Vec::new();
    if walk_with(spec, rel, false, &keep, &mut found, &mut found_dirs)? == Walked::SawSymlink {
        found.clear();
        found_dirs.clear();
        walk_with(spec, rel, true, &keep, &mut found, &mut found_dirs)?;
    }
    files.extend(found);
    dirs.extend(found_dirs);
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Walked {
    Complete,
    /// Not following links, a symlink was met: the walk stopped there.
    SawSymlink,
}

fn walk_with(
    spec: &Spec,
    rel: &str,
    follow_links: bool,
    keep: &impl Fn(&str) -> bool,
    files: &mut Vec<(String, PathBuf)>,
    dirs: &mut Vec<PathBuf>,
) -> Result<Walked, InputError> {
    let walker = WalkDir::new(spec.path(rel))
        .follow_links(follow_links)
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
        if !follow_links && entry.file_type().is_symlink() {
            return Ok(Walked::SawSymlink);
        }
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
            files.push((relative, entry.into_path()));
        }
    }
    Ok(Walked::Complete)
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

    /// A project whose one stage takes the folder `in` as its input.
    fn project(dir: &std::path::Path) -> Spec {
        let file = dir.join("Pipefile.json");
        let stages = serde_json::json!([{"name": "s", "processor": {"builtin": "copy", "version": "1"},
            "inputs": ["in"], "outputDir": "out"}]);
        std::fs::write(
            &file,
            serde_json::json!({"version": 1, "stages": stages}).to_string(),
        )
        .unwrap();
        Spec::load(&file).unwrap()
    }

    fn listed(spec: &Spec) -> Result<(Vec<String>, usize), InputError> {
        let resolved = resolve(spec, &spec.stages[0])?;
        Ok((resolved.files.into_keys().collect(), resolved.dirs.len()))
    }

    #[test]
    fn many_inputs_listed_on_all_cores_resolve_as_one_by_one_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * PARALLEL_INPUTS;
        let mut inputs = Vec::new();
        for i in 0..n {
            let folder = format!("data/d{i:03}");
            std::fs::create_dir_all(dir.path().join(&folder).join("sub")).unwrap();
            std::fs::write(dir.path().join(&folder).join("a.txt"), "a").unwrap();
            std::fs::write(dir.path().join(&folder).join("sub/b.txt"), "b").unwrap();
            inputs.push(serde_json::json!(folder));
        }
        std::fs::write(dir.path().join("data/top.txt"), "t").unwrap();
        inputs.push(serde_json::json!("data/top.txt"));
        inputs.push(serde_json::json!("data/d00*/a.txt"));
        let file = dir.path().join("Pipefile.json");
        let stages = serde_json::json!([{"name": "s", "processor": {"builtin": "copy", "version": "1"},
            "inputs": inputs, "outputDir": "out"}]);
        std::fs::write(
            &file,
            serde_json::json!({"version": 1, "stages": stages}).to_string(),
        )
        .unwrap();
        let spec = Spec::load(&file).unwrap();
        let resolved = resolve(&spec, &spec.stages[0]).unwrap();
        let mut expected: Vec<String> = (0..n)
            .flat_map(|i| {
                [
                    format!("data/d{i:03}/a.txt"),
                    format!("data/d{i:03}/sub/b.txt"),
                ]
            })
            .collect();
        expected.push("data/top.txt".into());
        expected.sort();
        assert_eq!(resolved.files.keys().cloned().collect::<Vec<_>>(), expected);
        assert!(resolved
            .files
            .iter()
            .all(|(rel, abs)| *abs == dir.path().join(rel)));
        assert_eq!(resolved.root, "data");
        // Each input folder and its `sub`, in input order; then what the glob walked.
        let dirs: Vec<String> = resolved
            .dirs
            .iter()
            .map(|d| {
                d.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            dirs[..4],
            ["data/d000", "data/d000/sub", "data/d001", "data/d001/sub"]
        );
        assert_eq!(dirs[2 * n], "data");
        // The first input that cannot be listed, in input order, is the error.
        for gone in ["data/d150", "data/d070"] {
            std::fs::remove_dir_all(dir.path().join(gone)).unwrap();
        }
        match resolve(&spec, &spec.stages[0]) {
            Err(InputError::Missing { path }) => assert_eq!(path, "data/d070"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn symlinks_in_an_input_folder_are_followed_and_a_loop_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let put = |rel: &str| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, rel).unwrap();
        };
        put("in/a.txt");
        put("in/sub/b.txt");
        put("elsewhere/c.txt");
        put("elsewhere/deep/d.txt");
        put("other.txt");
        std::fs::create_dir_all(dir.path().join("in/.pipe-staging")).unwrap();
        put("in/.pipe-staging/internal.txt");
        let spec = project(dir.path());
        // No symlink: listed without following links.
        assert_eq!(
            listed(&spec).unwrap(),
            (vec!["in/a.txt".to_string(), "in/sub/b.txt".into()], 2)
        );
        // A symlink to a file and one to a folder, found after plain entries: both followed,
        // listed under their own names.
        std::os::unix::fs::symlink(
            dir.path().join("other.txt"),
            dir.path().join("in/z-file.txt"),
        )
        .unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("in/z-dir"))
            .unwrap();
        assert_eq!(
            listed(&spec).unwrap(),
            (
                vec![
                    "in/a.txt".to_string(),
                    "in/sub/b.txt".into(),
                    "in/z-dir/c.txt".into(),
                    "in/z-dir/deep/d.txt".into(),
                    "in/z-file.txt".into(),
                ],
                4
            )
        );
        // A link back to an ancestor: a loop, reported.
        std::os::unix::fs::symlink(dir.path().join("in"), dir.path().join("in/sub/loop")).unwrap();
        assert!(matches!(listed(&spec), Err(InputError::Unreadable { .. })));
        // A dangling link: unreadable too, as when links are followed from the start.
        std::fs::remove_file(dir.path().join("in/sub/loop")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("in/dangling"))
            .unwrap();
        assert!(matches!(listed(&spec), Err(InputError::Unreadable { .. })));
    }
}
