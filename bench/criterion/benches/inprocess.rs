//! In-process costs the black-box benchmarks (bench/run.sh) cannot separate from process spawning:
//!
//! - `hash_file`: the engine's content hash of a file (blake3; reader below 16 MiB, mmap + rayon at
//!   and above, 16 MiB mapped at a time), 1 MiB and 64 MiB, page cache warm;
//! - `stat_cache_hit`: the engine's per-input cost of a no-op build once the stat cache knows the
//!   file (a `stat` and a map lookup);
//! - `upper`: the built-in `upper` transform on a 1 MiB buffer of ASCII-only and of
//!   non-ASCII-heavy text, unicode and ascii modes (no I/O).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pipe_engine::hashing::{hash_file, StatCache};
use pipe_processors::sdk::ChunkTransform;
use pipe_processors::upper::{Mode, Upper};

/// Seeded text: `lines` of eight words from `words` (a tiny LCG, no rand crate).
fn text(bytes: usize, words: &[&str]) -> Vec<u8> {
    let mut state: u64 = 1234;
    let mut out = Vec::with_capacity(bytes + 128);
    while out.len() < bytes {
        for i in 0..8 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            out.extend_from_slice(words[(state >> 33) as usize % words.len()].as_bytes());
            out.push(if i == 7 { b'\n' } else { b' ' });
        }
    }
    out.truncate(bytes);
    out
}

const ASCII: &[&str] = &["alpha", "beta", "gamma", "delta", "strasse", "cafe", "omega", "kappa"];
const NON_ASCII: &[&str] = &["αλφα", "βήτα", "γάμμα", "straße", "привет", "мир", "ωμέγα", "καππα"];

fn write(dir: &Path, name: &str, bytes: usize) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text(bytes, ASCII)).unwrap();
    path
}

fn hashing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("hash_file");
    for (label, size) in [("1MiB", 1usize << 20), ("64MiB", 64 << 20)] {
        let path = write(dir.path(), label, size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(label, |b| b.iter(|| hash_file(black_box(&path), size as u64).unwrap()));
    }
    group.finish();

    let path = write(dir.path(), "small.txt", 200);
    // Age the file past the racy window so the cached hash is trusted.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
    let mut cache = StatCache::load(&dir.path().join("none.json"));
    cache.hash(&path).unwrap();
    c.bench_function("stat_cache_hit", |b| b.iter(|| cache.hash(black_box(&path)).unwrap()));
}

fn upper(c: &mut Criterion) {
    let mut group = c.benchmark_group("upper_1MiB");
    group.throughput(Throughput::Bytes(1 << 20));
    for (kind, words) in [("ascii_text", ASCII), ("non_ascii_text", NON_ASCII)] {
        let mut input = text(1 << 20, words);
        // End on a whole character and a line (as the SDK hands chunks over).
        while std::str::from_utf8(&input).is_err() || input.last() != Some(&b'\n') {
            input.pop();
        }
        for (mode_name, mode) in [("unicode", Mode::Unicode), ("ascii", Mode::Ascii)] {
            let mut chunk = input.clone();
            let mut out = Vec::with_capacity(input.len() * 2);
            group.bench_with_input(BenchmarkId::new(mode_name, kind), &input, |b, input| {
                b.iter(|| {
                    chunk.copy_from_slice(input);
                    out.clear();
                    let step = Upper { mode }.apply(black_box(&mut chunk), true, &mut out).unwrap();
                    black_box((step.consumed, out.len()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, hashing, upper);
criterion_main!(benches);
