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
        mut vars: HashMap<String, String>,
        transform: &mut T,
    ) -> (Result<Summary, ProcessorError>, Vec<Checkpoint>) {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        vars.insert(
            "PIPELINE_PROGRESS_FD".into(),
            writer.into_raw_fd().to_string(),
        );
        let mut ctx = Context::from_vars(|k| vars.get(k).cloned()).unwrap();
        let result = run(&mut ctx, transform);
        drop(ctx);
        let mut text = String::new();
        File::from(reader).read_to_string(&mut text).unwrap();
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
/// input before its byte offset.
fn assert_checkpoints_match_input(data: &[u8], cps: &[Checkpoint]) {
    for cp in cps {
        let consumed = &data[..cp.byte_offset as usize];
        assert_eq!(
            memchr::memchr_iter(b'\n', consumed).count() as u64,
            cp.line_offset
        );
        let upper = String::from_utf8(consumed.to_vec()).unwrap().to_uppercase();
        assert_eq!(cp.output_bytes, upper.len() as u64);
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
