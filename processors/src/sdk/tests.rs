use std::collections::HashMap;
use std::io::Read;
use std::os::fd::IntoRawFd;

use super::*;
use crate::upper::{Mode, Upper};

/// A staged stage: inputs under `root/in`, staging dir `root/out`.
struct Fixture {
    dir: tempfile::TempDir,
    inputs: Vec<PathBuf>,
}

impl Fixture {
    fn new(files: &[(&str, &[u8])]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = Vec::new();
        for (name, bytes) in files {
            let path = dir.path().join("in").join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            inputs.push(path);
        }
        inputs.sort();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        Fixture { dir, inputs }
    }

    fn vars(&self) -> HashMap<String, String> {
        let mut vars = HashMap::new();
        vars.insert(
            "PIPELINE_INPUTS".into(),
            serde_json::to_string(&self.inputs).unwrap(),
        );
        vars.insert(
            "PIPELINE_INPUT_ROOT".into(),
            self.dir.path().join("in").display().to_string(),
        );
        vars.insert(
            "PIPELINE_OUTPUT_DIR".into(),
            self.dir.path().join("out").display().to_string(),
        );
        vars.insert("PIPELINE_STAGE".into(), "test".into());
        vars
    }

    fn output(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("out").join(name)).unwrap()
    }

    /// Runs `transform` with `vars` and a real progress pipe; returns the summary (or error) and
    /// every checkpoint line received.
    fn run_with<T: ChunkTransform>(
        &self,
        vars: HashMap<String, String>,
        transform: &mut T,
    ) -> (Result<Summary, ProcessorError>, Vec<Checkpoint>) {
        self.run_writing(vars, transform, None)
    }

    /// [`Fixture::run_with`], writing as `writing` says, or as [`run`] decides from the CPUs
    /// available (`None`).
    fn run_writing<T: ChunkTransform>(
        &self,
        mut vars: HashMap<String, String>,
        transform: &mut T,
        writing: Option<Writing>,
    ) -> (Result<Summary, ProcessorError>, Vec<Checkpoint>) {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        vars.insert(
            "PIPELINE_PROGRESS_FD".into(),
            writer.into_raw_fd().to_string(),
        );
        // Read as the engine does, while the run goes on: a pipe holds only 64 KiB of lines.
        let lines = std::thread::spawn(move || {
            let mut text = String::new();
            File::from(reader).read_to_string(&mut text).unwrap();
            text
        });
        let mut ctx = Context::from_vars(|k| vars.get(k).cloned()).unwrap();
        let result = match writing {
            None => run(&mut ctx, transform),
            Some(writing) => run_writing(&mut ctx, transform, writing),
        };
        drop(ctx);
        let text = lines.join().unwrap();
        let checkpoints = text
            .lines()
            .map(|l| Checkpoint::parse(l).unwrap())
            .collect();
        (result, checkpoints)
    }
}

fn lines(count: usize, width: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| format!("{i:0width$} straße line\n").into_bytes())
        .collect()
}

/// The next value of a seeded linear congruential generator (deterministic test data).
fn next_random(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state
}

/// Runs unicode `upper` over `data` as the one input `big.txt`, checkpointing every `every`
/// lines; returns the fixture, the summary and the checkpoints.
fn upper_every_lines(
    data: &[u8],
    every: u64,
) -> (Fixture, Result<Summary, ProcessorError>, Vec<Checkpoint>) {
    let fx = Fixture::new(&[("big.txt", data)]);
    let mut vars = fx.vars();
    vars.insert(
        "PIPELINE_CHECKPOINT".into(),
        format!(r#"{{"everyLines": {every}}}"#),
    );
    let (summary, cps) = fx.run_with(
        vars,
        &mut Upper {
            mode: Mode::Unicode,
        },
    );
    (fx, summary, cps)
}

/// Every checkpoint of `upper` over `data` counts the lines and output bytes of exactly the
/// input before its byte offset. (Upper-casing maps each character on its own, so the input
/// between two checkpoints is upper-cased alone: linear in the input, however many checkpoints.)
fn assert_checkpoints_match_input(data: &[u8], cps: &[Checkpoint]) {
    let (mut at, mut lines, mut output) = (0usize, 0u64, 0u64);
    for cp in cps {
        let next = cp.byte_offset as usize;
        assert!(next >= at, "checkpoint {cp:?} goes back from byte {at}");
        let segment = &data[at..next];
        lines += memchr::memchr_iter(b'\n', segment).count() as u64;
        output += std::str::from_utf8(segment).unwrap().to_uppercase().len() as u64;
        at = next;
        assert_eq!(cp.line_offset, lines, "{cp:?}");
        assert_eq!(cp.output_bytes, output, "{cp:?}");
    }
}

#[test]
fn copies_inputs_to_mirrored_paths_with_a_final_checkpoint_each() {
    let fx = Fixture::new(&[("a.txt", b"one\ntwo\n"), ("sub/b.txt", b"three")]);
    let (summary, cps) = fx.run_with(fx.vars(), &mut Upper { mode: Mode::Ascii });
    let summary = summary.unwrap();
    assert_eq!(fx.output("a.txt"), b"ONE\nTWO\n");
    assert_eq!(fx.output("sub/b.txt"), b"THREE");
    assert_eq!(summary.lines, 3);
    assert_eq!(summary.input_bytes, 13);
    assert_eq!(
        cps,
        vec![
            Checkpoint {
                input_index: 0,
                line_offset: 2,
                byte_offset: 8,
                output_bytes: 8
            },
            Checkpoint {
                input_index: 1,
                line_offset: 1,
                byte_offset: 5,
                output_bytes: 5
            },
        ]
    );
}

/// `count` inputs `f0000.txt`… of `lines` short lines each.
fn small_inputs(count: usize, lines: usize) -> (Fixture, Vec<Vec<u8>>) {
    let names: Vec<String> = (0..count).map(|i| format!("f{i:04}.txt")).collect();
    let data: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            (0..lines)
                .flat_map(|l| format!("{i}.{l}\n").into_bytes())
                .collect()
        })
        .collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&data)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    (Fixture::new(&files), data)
}

#[test]
fn many_small_inputs_report_every_input_after_one_sync() {
    let (fx, data) = small_inputs(200, 1);
    let (summary, cps) = fx.run_with(fx.vars(), &mut Upper { mode: Mode::Ascii });
    let summary = summary.unwrap();
    // The default cadence (64 MiB / 5 s) is never due: only the last input's checkpoint asks
    // for a sync, and the 199 before it are reported with it, in order.
    assert_eq!(summary.sync_requests, 1);
    assert_eq!(summary.checkpoints, 200);
    let expected: Vec<Checkpoint> = data
        .iter()
        .enumerate()
        .map(|(i, d)| Checkpoint {
            input_index: i as u64,
            line_offset: 1,
            byte_offset: d.len() as u64,
            output_bytes: d.len() as u64,
        })
        .collect();
    assert_eq!(cps, expected);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(fx.output(&format!("f{i:04}.txt")), d.to_ascii_uppercase());
    }
}

#[test]
fn the_line_cadence_counts_across_inputs() {
    let (fx, _) = small_inputs(3, 3);
    let mut vars = fx.vars();
    vars.insert("PIPELINE_CHECKPOINT".into(), r#"{"everyLines": 4}"#.into());
    let (summary, cps) = fx.run_with(vars, &mut Upper { mode: Mode::Ascii });
    let summary = summary.unwrap();
    let at: Vec<(u64, u64)> = cps.iter().map(|c| (c.input_index, c.line_offset)).collect();
    // Input 0 ends after 3 lines (deferred); the 4th line is input 1's first (due: synced with
    // input 0's); input 1's end is deferred again; input 2's 2nd line is the next 4th; then the
    // last input's end.
    assert_eq!(at, vec![(0, 3), (1, 1), (1, 3), (2, 2), (2, 3)]);
    assert_eq!(summary.sync_requests, 3);
    assert!(cps
        .iter()
        .all(|c| c.byte_offset == 4 * c.line_offset && c.output_bytes == c.byte_offset));
}

#[test]
fn resuming_from_a_deferred_end_of_input_redoes_only_the_inputs_after_it() {
    let (fx, data) = small_inputs(4, 2);
    let (first, cps) = fx.run_with(fx.vars(), &mut Upper { mode: Mode::Ascii });
    first.unwrap();
    let at_end_of_1 = cps[1];
    assert_eq!(
        (at_end_of_1.input_index, at_end_of_1.byte_offset),
        (1, data[1].len() as u64)
    );
    // Outputs 2 and 3 torn (as a kill before their sync would leave them), 0 and 1 intact.
    std::fs::write(fx.dir.path().join("out/f0002.txt"), b"TORN").unwrap();
    std::fs::remove_file(fx.dir.path().join("out/f0003.txt")).unwrap();
    let mut vars = fx.vars();
    vars.insert(
        "PIPELINE_RESUME".into(),
        at_end_of_1.to_line().trim_end().to_string(),
    );
    let (resumed, cps) = fx.run_with(vars, &mut Upper { mode: Mode::Ascii });
    let resumed = resumed.unwrap();
    assert_eq!(resumed.lines, 4, "only inputs 2 and 3 are processed again");
    // Input 1 is resumed at its end: nothing left of it but its final checkpoint again.
    assert_eq!(cps[0], at_end_of_1);
    assert_eq!(
        cps.iter().map(|c| c.input_index).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for (i, d) in data.iter().enumerate() {
        assert_eq!(fx.output(&format!("f{i:04}.txt")), d.to_ascii_uppercase());
    }
}

#[test]
fn a_sync_covering_several_outputs_is_a_syncfs() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(File::create(dir.path().join("a")).unwrap());
    let job = |output: &str, spans_files: bool| SyncJob {
        file: file.clone(),
        output: PathBuf::from(output),
        checkpoints: vec![(Checkpoint::START, 0)],
        sync_dirs: false,
        spans_files,
        weight: MIN_JOB_WEIGHT,
    };
    assert!(!needs_syncfs(&[job("a", false), job("a", false)]));
    assert!(needs_syncfs(&[job("a", false), job("b", false)]));
    // One job, one output, but deferred end-of-input checkpoints of other files before it.
    assert!(needs_syncfs(&[job("a", true)]));
}

#[test]
fn every_lines_cadence_checkpoints_exactly_on_its_lines() {
    let data = lines(1000, 6);
    let (_fx, summary, cps) = upper_every_lines(&data, 100);
    summary.unwrap();
    let offsets: Vec<u64> = cps.iter().map(|c| c.line_offset).collect();
    let mut expected: Vec<u64> = (1..=10).map(|i| i * 100).collect();
    expected.push(1000); // the final checkpoint of the input
    assert_eq!(offsets, expected);
    assert_checkpoints_match_input(&data, &cps);
}

/// The exactly-once property: from any checkpoint, with any garbage after `outputBytes` (writes
/// that were not yet durable when the process died), a resume yields the uninterrupted output.
#[test]
fn resume_from_every_checkpoint_gives_identical_output() {
    let files: Vec<(String, Vec<u8>)> = vec![
        ("a.txt".into(), lines(300, 4)),
        ("b/c.txt".into(), lines(450, 5)),
        (
            "d.txt".into(),
            "no newline at the end: ß".as_bytes().to_vec(),
        ),
    ];
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let fx = Fixture::new(&refs);
    let mut vars = fx.vars();
    vars.insert("PIPELINE_CHECKPOINT".into(), r#"{"everyLines": 37}"#.into());
    let (summary, cps) = fx.run_with(
        vars.clone(),
        &mut Upper {
            mode: Mode::Unicode,
        },
    );
    summary.unwrap();
    let golden: Vec<Vec<u8>> = files.iter().map(|(n, _)| fx.output(n)).collect();
    assert!(
        cps.len() > 15,
        "expected many checkpoints, got {}",
        cps.len()
    );

    for cp in &cps {
        // Damage what was not durable: the current output gets garbage past the checkpoint, later
        // outputs hold garbage too.
        for (i, (name, _)) in files.iter().enumerate() {
            let path = fx.dir.path().join("out").join(name);
            if i as u64 == cp.input_index {
                let mut bytes = golden[i][..cp.output_bytes as usize].to_vec();
                bytes.extend_from_slice(b"GARBAGE NOT YET DURABLE\n");
                std::fs::write(&path, bytes).unwrap();
            } else if i as u64 > cp.input_index {
                std::fs::write(&path, b"stale partial output").unwrap();
            }
        }
        let mut resume_vars = vars.clone();
        resume_vars.insert("PIPELINE_RESUME".into(), serde_json::to_string(cp).unwrap());
        let (summary, _) = fx.run_with(
            resume_vars,
            &mut Upper {
                mode: Mode::Unicode,
            },
        );
        summary.unwrap();
        for (i, (name, _)) in files.iter().enumerate() {
            assert_eq!(
                fx.output(name),
                golden[i],
                "resume from {cp:?}: {name} differs"
            );
        }
    }
}

#[test]
fn resume_with_an_output_shorter_than_the_checkpoint_is_a_data_error() {
    let fx = Fixture::new(&[("a.txt", b"one\ntwo\n")]);
    std::fs::write(fx.dir.path().join("out/a.txt"), b"ON").unwrap();
    let mut vars = fx.vars();
    vars.insert(
        "PIPELINE_RESUME".into(),
        r#"{"inputIndex":0,"lineOffset":1,"byteOffset":4,"outputBytes":4}"#.into(),
    );
    let (result, _) = fx.run_with(vars, &mut Upper { mode: Mode::Ascii });
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), EXIT_DATA);
    assert!(
        err.to_string().contains("shorter than the checkpoint"),
        "{err}"
    );
}

#[test]
fn resume_past_the_input_or_past_the_last_input_is_a_data_error() {
    let fx = Fixture::new(&[("a.txt", b"one\n")]);
    for resume in [
        r#"{"inputIndex":0,"lineOffset":1,"byteOffset":99,"outputBytes":0}"#,
        r#"{"inputIndex":5,"lineOffset":0,"byteOffset":0,"outputBytes":0}"#,
    ] {
        let mut vars = fx.vars();
        vars.insert("PIPELINE_RESUME".into(), resume.into());
        let (result, _) = fx.run_with(vars, &mut Upper { mode: Mode::Ascii });
        assert_eq!(result.unwrap_err().exit_code(), EXIT_DATA, "{resume}");
    }
}

#[test]
fn invalid_utf8_names_the_file_and_absolute_offset() {
    let mut data = lines(50, 3);
    let bad_at = data.len() + 4;
    data.extend_from_slice(b"bad \xff\n");
    let fx = Fixture::new(&[("x.txt", &data)]);
    let (result, _) = fx.run_with(
        fx.vars(),
        &mut Upper {
            mode: Mode::Unicode,
        },
    );
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), EXIT_DATA);
    let text = err.to_string();
    assert!(
        text.contains("x.txt") && text.contains(&format!("byte offset {bad_at}")),
        "{text}"
    );
}

#[test]
fn lines_longer_than_the_read_buffer_stream_through() {
    let mut data = "é".repeat(CHUNK_BYTES).into_bytes(); // 2 MiB, no newline, chars cut at 1 MiB edges
    data.extend_from_slice("\nend ß".as_bytes());
    let fx = Fixture::new(&[("long.txt", &data)]);
    let (summary, _) = fx.run_with(
        fx.vars(),
        &mut Upper {
            mode: Mode::Unicode,
        },
    );
    summary.unwrap();
    let expected = String::from_utf8(data).unwrap().to_uppercase();
    assert_eq!(fx.output("long.txt"), expected.as_bytes());
}

#[test]
fn context_errors_say_what_is_wrong() {
    let fx = Fixture::new(&[("a.txt", b"x")]);
    let cases: &[(&str, Option<&str>, &str)] = &[
        (
            "PIPELINE_OUTPUT_DIR",
            None,
            "PIPELINE_OUTPUT_DIR is not set",
        ),
        ("PIPELINE_PARAMS", Some("[1]"), "must be a JSON object"),
        ("PIPELINE_PARAMS", Some("{"), "not valid JSON"),
        ("PIPELINE_RESUME", Some("{}"), "not a valid checkpoint"),
        (
            "PIPELINE_CHECKPOINT",
            Some(r#"{"everyLine": 3}"#),
            "not a valid cadence",
        ),
        ("PIPELINE_PROGRESS_FD", Some("x"), "file descriptor number"),
        ("PIPELINE_PROGRESS_FD", Some("1"), "above 2"),
        ("PIPE_FAULT", Some("crash"), "crash-after-lines:N"),
        ("PIPELINE_INPUTS", Some("{}"), "array of paths"),
    ];
    for (name, value, expected) in cases {
        let mut vars = fx.vars();
        match value {
            Some(v) => vars.insert(name.to_string(), v.to_string()),
            None => vars.remove(*name),
        };
        let err = Context::from_vars(|k| vars.get(k).cloned()).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert!(
            err.to_string().contains(expected),
            "{name}={value:?}: {err}"
        );
    }
}

#[test]
fn inputs_file_replaces_a_large_inputs_variable() {
    let fx = Fixture::new(&[("a.txt", b"abc\n")]);
    let list = fx.dir.path().join("inputs.json");
    std::fs::write(&list, serde_json::to_string(&fx.inputs).unwrap()).unwrap();
    let mut vars = fx.vars();
    vars.remove("PIPELINE_INPUTS");
    vars.insert("PIPELINE_INPUTS_FILE".into(), list.display().to_string());
    let ctx = Context::from_vars(|k| vars.get(k).cloned()).unwrap();
    assert_eq!(ctx.inputs, fx.inputs);
}

#[test]
fn an_input_outside_the_root_is_a_usage_error() {
    let fx = Fixture::new(&[("a.txt", b"abc\n")]);
    let mut vars = fx.vars();
    vars.insert("PIPELINE_INPUTS".into(), r#"["/etc/hostname"]"#.into());
    let (result, _) = fx.run_with(vars, &mut Upper { mode: Mode::Ascii });
    assert_eq!(result.unwrap_err().exit_code(), EXIT_USAGE);
}

#[test]
fn transient_io_errors_exit_75() {
    let err = ProcessorError::Io {
        what: "reading input",
        path: PathBuf::from("x"),
        source: io::Error::from_raw_os_error(libc::EAGAIN),
    };
    assert_eq!(err.exit_code(), EXIT_TEMPFAIL);
    let err = ProcessorError::Io {
        what: "reading input",
        path: PathBuf::from("x"),
        source: io::Error::from_raw_os_error(libc::ENOENT),
    };
    assert_eq!(err.exit_code(), 1);
}

#[test]
fn nth_line_end_finds_the_nth_newline_across_count_blocks() {
    let mut rng: u64 = 7;
    let mut data = Vec::new();
    for _ in 0..60_000 {
        let r = next_random(&mut rng);
        data.extend(std::iter::repeat_n(b'x', (r >> 58) as usize));
        data.push(b'\n');
    }
    let ends: Vec<usize> = data
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    for n in [
        1, 2, 3, 500, 4095, 4096, 4097, 10_000, 33_333, 59_999, 60_000,
    ] {
        assert_eq!(nth_line_end(&data, n as u64), Some(ends[n - 1]), "n = {n}");
    }
    assert_eq!(nth_line_end(&data, 60_001), None);
    assert_eq!(nth_line_end(b"no newline", 1), None);
    assert_eq!(nth_line_end(b"", 1), None);
}

/// Several read buffers' worth of lines of varied length (some with characters whose
/// upper-casing changes length), checkpointed every 7,919 lines: chunks cut short by the line
/// budget leave the rest of the buffer to the next chunk, which must not lose, repeat or
/// misplace a byte, and every checkpoint must land exactly on its line.
#[test]
fn line_checkpoints_across_many_buffers_land_on_their_lines() {
    let mut rng: u64 = 11;
    let mut text = String::new();
    let words = ["alpha", "ΐota", "straße", "ﬁne", "ıi", "жук", "x"];
    let mut line_count = 0u64;
    while text.len() < 3 * CHUNK_BYTES + 12_345 {
        let r = next_random(&mut rng);
        for w in 0..(r >> 60) {
            text.push_str(words[((r >> (20 + 3 * w)) % words.len() as u64) as usize]);
            text.push(' ');
        }
        text.push('\n');
        line_count += 1;
    }
    let data = text.as_bytes();
    let (fx, summary, cps) = upper_every_lines(data, 7919);
    assert_eq!(summary.unwrap().lines, line_count);
    assert_eq!(fx.output("big.txt"), text.to_uppercase().as_bytes());
    let mut expected: Vec<u64> = (1..=line_count / 7919).map(|i| i * 7919).collect();
    if !line_count.is_multiple_of(7919) {
        expected.push(line_count);
    }
    let offsets: Vec<u64> = cps.iter().map(|c| c.line_offset).collect();
    assert_eq!(offsets, expected);
    assert_checkpoints_match_input(data, &cps);
}

/// Upper-cases ASCII letters, in place for most chunks but through `out` for chunks holding a
/// `#` (so both emissions mix within one read buffer), and checks that `out` is empty at every
/// call, as the trait promises. The output does not depend on how the input was cut into chunks.
struct MixedUpper {
    buffered_chunks: u64,
}

impl ChunkTransform for MixedUpper {
    fn apply(
        &mut self,
        chunk: &mut [u8],
        _eof: bool,
        out: &mut Vec<u8>,
    ) -> Result<Step, DataError> {
        assert!(out.is_empty(), "`out` holds {} stale bytes", out.len());
        chunk.make_ascii_uppercase();
        let emit = if chunk.contains(&b'#') {
            self.buffered_chunks += 1;
            out.extend_from_slice(chunk);
            // What is left in the chunk must not be what gets written (newlines stay: lines are
            // counted in the chunk after the transform ran).
            for b in chunk.iter_mut().filter(|b| **b != b'\n') {
                *b = b'?';
            }
            Emit::Buffer
        } else {
            Emit::Chunk
        };
        Ok(Step {
            consumed: chunk.len(),
            emit,
        })
    }
}

/// Writes `!` before every newline (through `out`): the output grows by one byte per line, so a
/// checkpoint's `outputBytes` must be its `byteOffset` plus its `lineOffset`.
struct MarkLineEnds;

impl ChunkTransform for MarkLineEnds {
    fn apply(
        &mut self,
        chunk: &mut [u8],
        _eof: bool,
        out: &mut Vec<u8>,
    ) -> Result<Step, DataError> {
        assert!(out.is_empty(), "`out` holds {} stale bytes", out.len());
        for &b in chunk.iter() {
            if b == b'\n' {
                out.push(b'!');
            }
            out.push(b);
        }
        Ok(Step {
            consumed: chunk.len(),
            emit: Emit::Buffer,
        })
    }
}

fn mark_line_ends(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in data {
        if b == b'\n' {
            out.push(b'!');
        }
        out.push(b);
    }
    out
}

/// Seeded text of about `size` bytes: mostly short lines of mixed width, and now and then a line
/// longer than a read buffer (up to 2.5 buffers), so lines cross buffer edges at every kind of
/// offset. `hash_every`: one line in that many holds a `#`.
fn varied_text(size: usize, seed: u64, hash_every: u64) -> Vec<u8> {
    let mut rng = seed;
    let mut data = Vec::with_capacity(size + 3 * CHUNK_BYTES);
    while data.len() < size {
        let r = next_random(&mut rng);
        let len = match r % 1000 {
            0 => CHUNK_BYTES + (r >> 20) as usize % (3 * CHUNK_BYTES / 2),
            1..=9 => (r >> 20) as usize % 100_000,
            _ => (r >> 20) as usize % 120,
        };
        let letter = b'a' + (r >> 8) as u8 % 26;
        data.extend(std::iter::repeat_n(letter, len));
        if (r >> 40).is_multiple_of(hash_every) {
            data.push(b'#');
        }
        data.push(b'\n');
    }
    data
}

/// Many read buffers of lines of every length (some longer than a buffer), with the default
/// cadence: the output is the transformed input byte for byte, whether chunks were written from
/// the read buffer or from `out`.
#[test]
fn output_spanning_many_buffers_is_the_transformed_input() {
    let data = varied_text(6 * POOL_BUFFERS * CHUNK_BYTES + 4321, 5, 50);
    for writing in [Writing::Thread, Writing::Here, Writing::Adaptive] {
        let fx = Fixture::new(&[("big.txt", &data)]);
        let mut transform = MixedUpper { buffered_chunks: 0 };
        let (summary, cps) = fx.run_writing(fx.vars(), &mut transform, Some(writing));
        assert_transformed_whole(&data, &fx, summary, &cps, &transform);
    }
}

fn assert_transformed_whole(
    data: &[u8],
    fx: &Fixture,
    summary: Result<Summary, ProcessorError>,
    cps: &[Checkpoint],
    transform: &MixedUpper,
) {
    let summary = summary.unwrap();
    assert!(transform.buffered_chunks > 0, "no chunk went through `out`");
    let expected = data.to_ascii_uppercase();
    assert!(fx.output("big.txt") == expected, "output differs");
    assert_eq!(summary.input_bytes, data.len() as u64);
    assert_eq!(summary.output_bytes, data.len() as u64);
    assert_eq!(
        summary.lines,
        memchr::memchr_iter(b'\n', data).count() as u64
    );
    assert_eq!(
        cps.last().map(|c| (c.byte_offset, c.output_bytes)),
        Some((data.len() as u64, data.len() as u64))
    );
}

/// Checkpoints every 997 lines over many buffers, long lines included, with a transform whose
/// output is longer than its input and always in `out`: each checkpoint's `outputBytes` counts
/// exactly the output of the input before its `byteOffset`, and that prefix of the output file
/// is exactly that output.
#[test]
fn checkpoints_over_many_buffers_count_exactly_the_output_before_them() {
    let data = varied_text(4 * POOL_BUFFERS * CHUNK_BYTES, 9, 1);
    for writing in [Writing::Thread, Writing::Here, Writing::Adaptive] {
        let fx = Fixture::new(&[("big.txt", &data)]);
        let mut vars = fx.vars();
        vars.insert(
            "PIPELINE_CHECKPOINT".into(),
            r#"{"everyLines": 997}"#.into(),
        );
        let (summary, cps) = fx.run_writing(vars, &mut MarkLineEnds, Some(writing));
        summary.unwrap();
        assert_marked_with_exact_checkpoints(&data, &fx, &cps);
    }
}

fn assert_marked_with_exact_checkpoints(data: &[u8], fx: &Fixture, cps: &[Checkpoint]) {
    let output = fx.output("big.txt");
    assert!(output == mark_line_ends(data), "output differs");
    let line_count = memchr::memchr_iter(b'\n', data).count() as u64;
    assert_eq!(cps.len() as u64, line_count.div_ceil(997));
    for (i, cp) in cps.iter().enumerate() {
        let line = ((i as u64 + 1) * 997).min(line_count);
        assert_eq!(cp.line_offset, line);
        assert_eq!(nth_line_end(data, line), Some(cp.byte_offset as usize));
        assert_eq!(cp.output_bytes, cp.byte_offset + cp.line_offset);
        let prefix = &output[..cp.output_bytes as usize];
        assert!(
            prefix == mark_line_ends(&data[..cp.byte_offset as usize]),
            "output before {cp:?} differs"
        );
    }
}

/// Unicode `upper` over several buffers of short lines whose characters sometimes change length,
/// checkpointed every 97 lines (many small chunks per buffer, some written from `out`): the output
/// and every checkpoint agree with `str::to_uppercase`.
#[test]
fn unicode_upper_over_many_buffers_with_frequent_checkpoints() {
    let mut rng: u64 = 23;
    let words = ["ΐota", "straße", "жук", "ﬁne", "ıi", "plain", "x"];
    let mut text = String::new();
    while text.len() < POOL_BUFFERS * CHUNK_BYTES + 777 {
        let r = next_random(&mut rng);
        for w in 0..(r >> 61) + 1 {
            text.push_str(words[((r >> (16 + 3 * w)) % words.len() as u64) as usize]);
        }
        text.push('\n');
    }
    let (fx, summary, cps) = upper_every_lines(text.as_bytes(), 97);
    summary.unwrap();
    assert!(fx.output("big.txt") == text.to_uppercase().as_bytes());
    assert!(cps.len() > 1000, "{} checkpoints", cps.len());
    assert_checkpoints_match_input(text.as_bytes(), &cps);
}

/// A resume from checkpoints in the middle of a many-buffer input (garbage after `outputBytes`)
/// gives the uninterrupted output.
#[test]
fn resume_in_the_middle_of_a_many_buffer_input_gives_identical_output() {
    let data = varied_text(3 * POOL_BUFFERS * CHUNK_BYTES, 31, 40);
    let fx = Fixture::new(&[("big.txt", &data)]);
    let mut vars = fx.vars();
    vars.insert(
        "PIPELINE_CHECKPOINT".into(),
        r#"{"everyLines": 499}"#.into(),
    );
    let (summary, cps) = fx.run_with(vars.clone(), &mut MarkLineEnds);
    summary.unwrap();
    let golden = fx.output("big.txt");
    assert!(cps.len() >= 4, "{} checkpoints", cps.len());
    let path = fx.dir.path().join("out/big.txt");
    for cp in cps.iter().step_by(cps.len() / 4) {
        let mut damaged = golden[..cp.output_bytes as usize].to_vec();
        damaged.extend_from_slice(b"GARBAGE NOT YET DURABLE\n");
        std::fs::write(&path, damaged).unwrap();
        let mut resume_vars = vars.clone();
        resume_vars.insert("PIPELINE_RESUME".into(), serde_json::to_string(cp).unwrap());
        let (summary, _) = fx.run_with(resume_vars, &mut MarkLineEnds);
        summary.unwrap();
        assert!(fx.output("big.txt") == golden, "resume from {cp:?} differs");
    }
}

/// More inputs than read buffers, an empty one among them: each gets its own output and one
/// checkpoint, in input order.
#[test]
fn many_small_inputs_rotate_through_the_buffers() {
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            let body = if i == 17 { Vec::new() } else { lines(i + 1, 3) };
            (format!("f{i:02}.txt"), body)
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let fx = Fixture::new(&refs);
    let (summary, cps) = fx.run_with(
        fx.vars(),
        &mut Upper {
            mode: Mode::Unicode,
        },
    );
    summary.unwrap();
    for (name, body) in &files {
        let expected = String::from_utf8(body.clone()).unwrap().to_uppercase();
        assert_eq!(fx.output(name), expected.as_bytes(), "{name}");
    }
    let indexes: Vec<u64> = cps.iter().map(|c| c.input_index).collect();
    assert_eq!(indexes, (0..40).collect::<Vec<u64>>());
    assert_eq!(cps[17].byte_offset, 0);
}

/// A write that fails on the writer thread (ENOSPC from /dev/full, the output's target) ends the
/// run with the writer's error — what failed and on which output, exit code 1 as before — not a
/// channel error, even though the reading thread had many buffers of input left; and no
/// checkpoint is reported for output that was never written. The same without a writer thread
/// (one CPU): nothing is written or reported after the failed write.
#[test]
fn a_write_error_on_the_writer_thread_is_the_runs_error() {
    let data = varied_text(8 * CHUNK_BYTES, 3, 1000);
    for writing in [Writing::Thread, Writing::Here, Writing::Adaptive] {
        let fx = Fixture::new(&[("big.txt", &data)]);
        let output = fx.dir.path().join("out/big.txt");
        std::os::unix::fs::symlink("/dev/full", &output).unwrap();
        let mut vars = fx.vars();
        vars.insert(
            "PIPELINE_CHECKPOINT".into(),
            r#"{"everyLines": 100}"#.into(),
        );
        let (result, cps) = fx.run_writing(vars, &mut Upper { mode: Mode::Ascii }, Some(writing));
        assert_enospc_on(&output, result, &cps);
    }
}

fn assert_enospc_on(output: &Path, result: Result<Summary, ProcessorError>, cps: &[Checkpoint]) {
    let err = result.unwrap_err();
    match &err {
        ProcessorError::Io { what, path, source } => {
            assert_eq!(*what, "writing output");
            assert_eq!(path, output);
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
        }
        other => panic!("expected the writer's I/O error, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert!(cps.is_empty(), "checkpoints reported: {cps:?}");
}

#[test]
fn a_writer_thread_starts_only_for_checkpoints_far_apart() {
    // Too early to tell.
    assert!(!writer_thread_pays(THREAD_AFTER_BYTES - 1, 0));
    // The default cadence (64 MiB): no checkpoint yet after 4 MiB.
    assert!(writer_thread_pays(THREAD_AFTER_BYTES, 0));
    // Every ~2 MiB and more: yes; every ~0.5 MiB: no.
    assert!(writer_thread_pays(8 << 20, 4));
    assert!(!writer_thread_pays(8 << 20, 16));
    // Many small inputs: one final checkpoint each.
    assert!(!writer_thread_pays(100 << 20, 10_000));
}

/// Adaptive writing over an input whose checkpoints (every 3 MiB) make the writer thread start
/// in the middle: the batches written on the calling thread and those written by the writer
/// thread after it make one exact output, every checkpoint counts exactly the output before it,
/// and a resume from a checkpoint after the switch gives the same output.
#[test]
fn switching_to_the_writer_thread_mid_input_keeps_output_and_checkpoints_exact() {
    let data = varied_text(24 << 20, 17, 1);
    assert!(writer_thread_pays(THREAD_AFTER_BYTES, 1) && 3 << 20 < THREAD_AFTER_BYTES);
    let fx = Fixture::new(&[("big.txt", &data)]);
    let mut vars = fx.vars();
    vars.insert(
        "PIPELINE_CHECKPOINT".into(),
        format!(r#"{{"everyBytes": {}}}"#, 3 << 20),
    );
    let (summary, cps) = fx.run_writing(vars.clone(), &mut MarkLineEnds, Some(Writing::Adaptive));
    summary.unwrap();
    let golden = fx.output("big.txt");
    assert!(golden == mark_line_ends(&data), "output differs");
    assert!(cps.len() >= 6, "{} checkpoints", cps.len());
    for cp in &cps {
        let before = &data[..cp.byte_offset as usize];
        assert_eq!(
            cp.line_offset,
            memchr::memchr_iter(b'\n', before).count() as u64
        );
        assert_eq!(cp.output_bytes, cp.byte_offset + cp.line_offset);
        assert!(golden[..cp.output_bytes as usize] == mark_line_ends(before));
    }
    let late = cps[cps.len() - 2];
    assert!(late.byte_offset > THREAD_AFTER_BYTES);
    let path = fx.dir.path().join("out/big.txt");
    let mut damaged = golden[..late.output_bytes as usize].to_vec();
    damaged.extend_from_slice(b"GARBAGE NOT YET DURABLE\n");
    std::fs::write(&path, damaged).unwrap();
    vars.insert(
        "PIPELINE_RESUME".into(),
        serde_json::to_string(&late).unwrap(),
    );
    let (summary, _) = fx.run_writing(vars, &mut MarkLineEnds, Some(Writing::Adaptive));
    summary.unwrap();
    assert!(
        fx.output("big.txt") == golden,
        "resume from {late:?} differs"
    );
}

#[test]
fn a_small_first_checkpoint_is_reported_without_the_syncer_thread_and_a_second_starts_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let file = Arc::new(File::create(&path).unwrap());
    let (mut read_end, write_end) = std::io::pipe().unwrap();
    let write_end = File::from(std::os::fd::OwnedFd::from(write_end));
    let mut syncer = Syncer::start(Some(write_end), dir.path().to_path_buf(), None);
    let at = |bytes: u64| Checkpoint {
        byte_offset: bytes,
        output_bytes: bytes,
        ..Checkpoint::START
    };
    let job = |bytes: u64, weight: u64| SyncJob {
        file: file.clone(),
        output: PathBuf::from("a"),
        checkpoints: vec![(at(bytes), 1)],
        sync_dirs: false,
        spans_files: false,
        weight,
    };
    (&*file).write_all(b"x\n").unwrap();
    syncer.send(job(2, MIN_JOB_WEIGHT)).unwrap();
    assert!(
        syncer.handle.is_none(),
        "no thread for a small first checkpoint"
    );
    // Reported already (durable first), on this thread.
    let mut line = [0u8; 4096];
    let n = read_end.read(&mut line).unwrap();
    let reported = std::str::from_utf8(&line[..n]).unwrap();
    assert_eq!(reported, at(2).to_line());

    (&*file).write_all(b"y\n").unwrap();
    syncer.send(job(4, MIN_JOB_WEIGHT)).unwrap();
    assert!(
        syncer.handle.is_some(),
        "a second checkpoint starts the thread"
    );
    syncer.finish().unwrap();
    let mut rest = String::new();
    read_end.read_to_string(&mut rest).unwrap();
    assert_eq!(
        rest,
        at(4).to_line(),
        "reported by the thread, and the pipe closed"
    );

    // A big first checkpoint goes to the thread at once.
    let (_read_end, write_end) = std::io::pipe().unwrap();
    let write_end = File::from(std::os::fd::OwnedFd::from(write_end));
    let mut syncer = Syncer::start(Some(write_end), dir.path().to_path_buf(), None);
    syncer.send(job(4, INLINE_FIRST_JOB + 1)).unwrap();
    assert!(syncer.handle.is_some());
    syncer.finish().unwrap();
}
