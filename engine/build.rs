//! Names the sources this build was made from, for the two binaries to recognise each other.
//!
//! `pipe` and `pipe-spawn` (its spawn server) are built from one library, and `pipe` starts the
//! `pipe-spawn` it finds beside itself. A `pipe-spawn` left from another build (an older install
//! that a copied `pipe` now sits beside) would speak another protocol or run other built-in
//! processors, so each binary carries `PIPE_BUILD_ID`, a hash of every source file of the engine
//! and the processors, and the server refuses an engine whose id differs. It is a hash of the
//! sources, not a time or a random number, so that building the same sources twice gives the same
//! binaries.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let roots = [
        manifest.join("src"),
        manifest.join("Cargo.toml"),
        manifest.join("../processors/src"),
        manifest.join("../processors/Cargo.toml"),
    ];
    let mut files = Vec::new();
    for root in &roots {
        println!("cargo:rerun-if-changed={}", root.display());
        collect(root, &mut files);
    }
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::env::var("CARGO_PKG_VERSION")
        .unwrap_or_default()
        .hash(&mut hasher);
    for file in &files {
        file.strip_prefix(&manifest)
            .unwrap_or(file)
            .hash(&mut hasher);
        std::fs::read(file)
            .expect("a source file is readable")
            .hash(&mut hasher);
    }
    println!("cargo:rustc-env=PIPE_BUILD_ID={:016x}", hasher.finish());
}

/// Every file under `path` (or `path` itself).
fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            for entry in entries.flatten() {
                collect(&entry.path(), files);
            }
        }
        Err(_) if path.is_file() => files.push(path.to_path_buf()),
        Err(_) => {}
    }
}
