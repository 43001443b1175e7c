use super::*;
use crate::lock::{self, Holder, Wait};

fn workspace() -> (tempfile::TempDir, Workspace) {
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace {
        root: dir.path().to_path_buf(),
    };
    (dir, ws)
}

fn held(ws: &Workspace) -> WorkspaceLock {
    lock::acquire(ws, &Holder::default(), Wait::No, None, |_| {}).unwrap()
}

/// A log with `n` records (`step 1`..`step n`), written with `key`.
fn log_with(ws: &Workspace, n: u64, key: Option<Key>) -> Head {
    let lock = held(ws);
    let mut log = Log::open(ws, key, &lock, Some("r1")).unwrap();
    for i in 1..=n {
        log.append("test.step", Some("s"), json!({"i": i})).unwrap();
    }
    log.head().clone()
}

fn lines(ws: &Workspace) -> Vec<String> {
    std::fs::read_to_string(log_path(&ws.state_dir()))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(ws: &Workspace, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(log_path(&ws.state_dir()), text).unwrap();
}

fn check(ws: &Workspace, key: Option<&Key>, kept: Option<&KeptHead>) -> Result<Verified, Broken> {
    verify(&ws.state_dir(), key, kept).unwrap()
}

/// Rewrites the whole chain with `edit` applied to record `at`, recomputing every hash (and the
/// head file) as a forger without the key would; old HMACs are kept where they still are.
fn forge(ws: &Workspace, at: u64, edit: impl Fn(&mut Value)) {
    let mut prev = GENESIS.to_string();
    let mut out = Vec::new();
    for line in lines(ws) {
        let mut record: Value = serde_json::from_str(&line).unwrap();
        if record["seq"] == at {
            edit(&mut record);
        }
        record["prev"] = prev.clone().into();
        let hash = record_hash(&record);
        record["hash"] = hash.clone().into();
        prev = hash;
        out.push(to_json_line(&record));
    }
    let seq = out.len() as u64;
    write_lines(ws, &out);
    // The forger writes the head in the one-object form, which pipe still reads.
    let (mut head, _) = read_head(&head_path(&ws.state_dir())).unwrap().unwrap();
    head.seq = seq;
    head.hash = prev;
    head.pending = None;
    atomic::write_json(&head_path(&ws.state_dir()), &head).unwrap();
}

#[test]
fn canonical_bytes_sort_keys_drop_the_hash_and_have_no_whitespace() {
    let record = json!({"b": 1, "a": {"d": [1, {"z": true, "y": null}], "c": "x\n\u{e9}"}, "hash": "h", "hmac": "m"});
    assert_eq!(
        String::from_utf8(canonical_bytes(&record)).unwrap(),
        "{\"a\":{\"c\":\"x\\n\u{e9}\",\"d\":[1,{\"y\":null,\"z\":true}]},\"b\":1}"
    );
}

#[test]
fn the_primitives_match_published_test_vectors() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // RFC 4231, test case 2.
    assert_eq!(
        Key::from_bytes(b"Jefe").sign(b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let key = Key::from_bytes(b"0123456789abcdef");
    let tag = key.sign_record(GENESIS);
    assert!(key.check_record(GENESIS, &tag));
    assert!(!key.check_head(0, GENESIS, &tag), "domains are separated");
    assert!(!Key::from_bytes(b"another key 12345").check_record(GENESIS, &tag));
}

#[test]
fn appends_form_a_chain_that_verifies_and_reopening_continues_it() {
    let (_dir, ws) = workspace();
    assert_eq!(check(&ws, None, None).unwrap().records, 0);
    let head = log_with(&ws, 3, None);
    assert_eq!(head.seq, 3);
    let lock = held(&ws);
    let mut log = Log::open(&ws, None, &lock, None).unwrap();
    assert_eq!(log.head(), &head);
    log.append("clean", None, json!({})).unwrap();
    let ok = check(&ws, None, None).unwrap();
    assert_eq!(ok.records, 4);
    assert_eq!(ok.head.as_ref(), Some(log.head()));
    assert!(ok.notes.is_empty() && !ok.authenticated);
    let records = lines(&ws);
    let first: Value = serde_json::from_str(&records[0]).unwrap();
    assert_eq!(first["prev"], GENESIS);
    assert_eq!(first["run"], "r1");
    assert_eq!(first["actor"]["pid"], std::process::id());
    let second: Value = serde_json::from_str(&records[1]).unwrap();
    assert_eq!(second["prev"], first["hash"]);
    assert_eq!(records[0], to_json_line(&first), "lines are canonical");
    let kept: KeptHead = format!("{head}").parse().unwrap();
    assert!(check(&ws, None, Some(&kept)).unwrap().kept_head_found);
}

#[test]
fn every_kind_of_tampering_names_the_first_bad_record() {
    type Tamper = Box<dyn Fn(&Workspace)>;
    let cases: Vec<(&str, Tamper, Option<u64>, &str)> = vec![
        (
            "edit",
            Box::new(|ws| {
                let mut l = lines(ws);
                l[2] = l[2].replace("\"i\":3", "\"i\":4");
                write_lines(ws, &l);
            }),
            Some(3),
            "edited",
        ),
        (
            "delete",
            Box::new(|ws| {
                let mut l = lines(ws);
                l.remove(1);
                write_lines(ws, &l);
            }),
            Some(3),
            "record 2 is missing",
        ),
        (
            "swap",
            Box::new(|ws| {
                let mut l = lines(ws);
                l.swap(1, 2);
                write_lines(ws, &l);
            }),
            Some(3),
            "reordered",
        ),
        (
            "duplicate",
            Box::new(|ws| {
                let mut l = lines(ws);
                let copy = l[1].clone();
                l.insert(2, copy);
                write_lines(ws, &l);
            }),
            Some(2),
            "already appeared at line 2",
        ),
        (
            "truncate",
            Box::new(|ws| {
                let mut l = lines(ws);
                l.truncate(3);
                write_lines(ws, &l);
            }),
            Some(4),
            "truncated",
        ),
        (
            "torn",
            Box::new(|ws| {
                let text = std::fs::read(log_path(&ws.state_dir())).unwrap();
                std::fs::write(log_path(&ws.state_dir()), &text[..text.len() - 10]).unwrap();
            }),
            Some(5),
            "incomplete",
        ),
        (
            "append",
            Box::new(|ws| {
                let l = lines(ws);
                let last: Value = serde_json::from_str(&l[4]).unwrap();
                let mut forged = last.clone();
                forged["seq"] = 6.into();
                forged["prev"] = last["hash"].clone();
                forged["hash"] = record_hash(&forged).into();
                let mut l = l;
                l.push(to_json_line(&forged));
                write_lines(ws, &l);
            }),
            Some(6),
            "outside pipe",
        ),
        (
            "head deleted",
            Box::new(|ws| std::fs::remove_file(head_path(&ws.state_dir())).unwrap()),
            None,
            "audit.head is missing",
        ),
    ];
    for (name, tamper, seq, why) in cases {
        let (_dir, ws) = workspace();
        log_with(&ws, 5, None);
        tamper(&ws);
        let bad = check(&ws, None, None).expect_err(name);
        assert_eq!(bad.seq, seq, "{name}: {bad}");
        assert!(bad.reason.contains(why), "{name}: {bad}");
        // An appender checks only the end of the log against the head (verify checks the rest);
        // appending after a tampered middle keeps the evidence where it is.
        let at_end = ["truncate", "torn", "append", "head deleted"].contains(&name);
        let lock = held(&ws);
        assert_eq!(
            matches!(
                Log::open(&ws, None, &lock, None),
                Err(AuditError::Mismatch(_))
            ),
            at_end,
            "{name}"
        );
    }
}

#[test]
fn a_rehashed_forgery_is_caught_by_a_kept_head_or_the_key() {
    let (_dir, ws) = workspace();
    let kept = log_with(&ws, 4, None);
    forge(&ws, 2, |r| r["data"]["i"] = 99.into());
    assert!(check(&ws, None, None).is_ok(), "undetectable without more");
    let kept_full: KeptHead = kept.to_string().parse().unwrap();
    let bad = check(&ws, None, Some(&kept_full)).unwrap_err();
    assert_eq!(bad.seq, Some(4));
    assert!(bad.reason.contains("rewritten"), "{bad}");
    let kept_hash: KeptHead = kept.hash.parse().unwrap();
    assert!(check(&ws, None, Some(&kept_hash)).is_err());

    let (_dir, ws) = workspace();
    let key = Key::from_bytes(b"0123456789abcdef0123");
    log_with(&ws, 4, Some(key.clone()));
    assert!(check(&ws, Some(&key), None).unwrap().authenticated);
    assert!(check(&ws, None, None).unwrap().hmacs_unchecked);
    forge(&ws, 2, |r| r["data"]["i"] = 99.into());
    let bad = check(&ws, Some(&key), None).unwrap_err();
    assert_eq!(bad.seq, Some(2), "{bad}");
    assert!(bad.reason.contains("HMAC"), "{bad}");
    forge(&ws, 2, |r| {
        r.as_object_mut().unwrap().remove("hmac");
    });
    let bad = check(&ws, Some(&key), None).unwrap_err();
    assert_eq!(bad.seq, Some(2), "{bad}");
    let other = Key::from_bytes(b"another key, 20 bytes");
    assert_eq!(check(&ws, Some(&other), None).unwrap_err().seq, Some(1));
}

#[test]
fn a_crash_after_the_append_is_not_tampering_and_the_next_appender_repairs_the_head() {
    let (_dir, ws) = workspace();
    log_with(&ws, 2, None);
    {
        let lock = held(&ws);
        let mut log = Log::open(&ws, None, &lock, None).unwrap();
        let (next, line) = one_line(&log);
        assert_eq!(next.seq, 3);
        let committed = log.head().clone();
        log.write_head(&committed, Some(&next)).unwrap();
        log.write_lines(&line).unwrap();
        // crash: the head is never committed
    }
    let ok = check(&ws, None, None).unwrap();
    assert_eq!(ok.records, 3);
    assert_eq!(ok.notes.len(), 1, "{:?}", ok.notes);
    let lock = held(&ws);
    let mut log = Log::open(&ws, None, &lock, None).unwrap();
    assert_eq!(log.head().seq, 3);
    log.append("x", None, json!({})).unwrap();
    let ok = check(&ws, None, None).unwrap();
    assert_eq!((ok.records, ok.notes.len()), (4, 0));
}

#[test]
fn a_torn_append_is_removed_only_when_the_head_announced_it() {
    let (_dir, ws) = workspace();
    log_with(&ws, 2, None);
    {
        let lock = held(&ws);
        let mut log = Log::open(&ws, None, &lock, None).unwrap();
        let (next, line) = one_line(&log);
        assert_eq!(next.seq, 3);
        let committed = log.head().clone();
        log.write_head(&committed, Some(&next)).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(log_path(&ws.state_dir()))
            .unwrap();
        f.write_all(&line[..20]).unwrap();
    }
    let ok = check(&ws, None, None).unwrap();
    assert_eq!((ok.records, ok.notes.len()), (2, 1));
    {
        let lock = held(&ws);
        let mut log = Log::open(&ws, None, &lock, None).unwrap();
        assert_eq!(log.head().seq, 2);
        log.append("x", None, json!({})).unwrap();
    }
    assert_eq!(lines(&ws).len(), 3);
    assert_eq!(check(&ws, None, None).unwrap().records, 3);
}

#[test]
fn a_log_is_keyed_or_not_from_its_first_record() {
    let (_dir, ws) = workspace();
    let key = Key::from_bytes(b"0123456789abcdef");
    log_with(&ws, 1, Some(key.clone()));
    let lock = held(&ws);
    assert!(matches!(
        Log::open(&ws, None, &lock, None),
        Err(AuditError::Key(_))
    ));
    let wrong = Key::from_bytes(b"fedcba9876543210");
    assert!(matches!(
        Log::open(&ws, Some(wrong), &lock, None),
        Err(AuditError::Key(_))
    ));
    assert!(Log::open(&ws, Some(key.clone()), &lock, None).is_ok());
    drop(lock);

    let (_dir, ws) = workspace();
    log_with(&ws, 1, None);
    let lock = held(&ws);
    assert!(matches!(
        Log::open(&ws, Some(key), &lock, None),
        Err(AuditError::Key(_))
    ));
}

#[test]
fn keys_and_kept_heads_are_parsed_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    std::fs::write(&path, "short\n").unwrap();
    assert!(Key::from_file(&path).unwrap_err().contains("at least 16"));
    std::fs::write(&path, "0123456789abcdef\r\n").unwrap();
    assert_eq!(Key::from_file(&path).unwrap().0, b"0123456789abcdef");
    assert!(Key::from_file(&dir.path().join("missing")).is_err());
    assert!(format!("{:?}", Key::from_bytes(b"secret")).contains("redacted"));

    let hash = "AB".repeat(32);
    let kept: KeptHead = format!("7:{hash}").parse().unwrap();
    assert_eq!(kept.seq, Some(7));
    assert_eq!(kept.hash, "ab".repeat(32));
    assert_eq!(hash.parse::<KeptHead>().unwrap().seq, None);
    assert!("7:abc".parse::<KeptHead>().is_err());
    assert!(format!("x:{hash}").parse::<KeptHead>().is_err());
}

#[test]
fn show_filters_by_stage_and_run_and_renders_outputs() {
    let record = json!({"v": 1, "seq": 3, "ts": "t", "actor": {"user": "u", "uid": 1, "pid": 2, "hostname": "h"},
        "run": "r1", "stage": "copy", "action": "stage.run", "prev": GENESIS, "hash": "x",
        "data": {"reason": "first run", "outputs": [{"path": "a.txt", "size": 3, "blake3": "b3"}]}});
    let clean = json!({"action": "clean", "data": {"stages": ["copy", "upper"]}});
    let by_stage = Filter {
        stage: Some("copy".into()),
        run: None,
    };
    assert!(by_stage.matches(&record) && by_stage.matches(&clean));
    let by_run = Filter {
        stage: None,
        run: Some("r2".into()),
    };
    assert!(!by_run.matches(&record) && !by_run.matches(&clean));
    let text = render(&record);
    assert!(
        text.starts_with("#3 t stage.run stage=copy run=r1 by u@h (uid 1, pid 2)"),
        "{text}"
    );
    assert!(text.contains("a.txt  3 bytes  blake3 b3"), "{text}");
}

#[test]
fn a_line_must_be_the_canonical_bytes_not_just_the_same_content() {
    let (_dir, ws) = workspace();
    log_with(&ws, 3, None);
    let mut l = lines(&ws);
    // Same parsed content, other bytes: a duplicated key whose last value is the real one.
    l[1] = l[1].replacen("{\"action\":", "{\"action\":\"clean\",\"action\":", 1);
    write_lines(&ws, &l);
    let bad = check(&ws, None, None).unwrap_err();
    assert_eq!(bad.seq, Some(2), "{bad}");
    assert!(bad.reason.contains("canonical form"), "{bad}");
}

/// The raw bytes of `state/audit.head`.
fn head_bytes(ws: &Workspace) -> Vec<u8> {
    std::fs::read(head_path(&ws.state_dir())).unwrap()
}

fn set_head_bytes(ws: &Workspace, bytes: &[u8]) {
    std::fs::write(head_path(&ws.state_dir()), bytes).unwrap();
}

#[test]
fn the_head_is_two_identical_intact_copies_updated_in_place() {
    let (_dir, ws) = workspace();
    let head = log_with(&ws, 3, None);
    let path = head_path(&ws.state_dir());
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&path);
    let bytes = head_bytes(&ws);
    assert_eq!(bytes.len(), 2 * HEAD_COPY_SIZE);
    let (first, second) = bytes.split_at(HEAD_COPY_SIZE);
    assert_eq!(first, second, "at rest both copies hold the current head");
    let text = std::str::from_utf8(first).unwrap();
    assert!(text.starts_with('{') && text.ends_with(" \n"), "{text:?}");
    let (read, layout) = read_head(&path).unwrap().unwrap();
    assert_eq!((read.seq, read.hash, read.pending), (3, head.hash, None));
    // Record 1 created the file (two head writes), records 2 and 3 updated it twice each.
    assert_eq!(
        layout,
        HeadLayout::Copies {
            generation: 6,
            damaged: false
        }
    );
    log_with(&ws, 2, None);
    assert_eq!(inode(&path), before, "updated in place: no new inode");
    assert!(check(&ws, None, None).unwrap().notes.is_empty());
}

#[test]
fn a_torn_copy_leaves_the_other_and_the_log_verifiable() {
    let (_dir, ws) = workspace();
    let head = log_with(&ws, 2, None);
    let intact = head_bytes(&ws);
    for copy in 0..2 {
        let mut bytes = intact.clone();
        // A write torn at a sector boundary: the copy's first sector is garbage.
        bytes[copy * HEAD_COPY_SIZE..copy * HEAD_COPY_SIZE + 512].fill(b'x');
        set_head_bytes(&ws, &bytes);
        let ok = check(&ws, None, None).unwrap();
        assert_eq!(ok.head.as_ref().map(|h| h.seq), Some(2));
        assert_eq!(ok.notes.len(), 1, "{:?}", ok.notes);
        assert!(ok.notes[0].contains("two copies"), "{:?}", ok.notes);
        // The next appender uses the intact copy and rewrites both.
        let lock = held(&ws);
        let mut log = Log::open(&ws, None, &lock, None).unwrap();
        assert_eq!(log.head(), &head);
        drop(lock);
        log.append("x", None, json!({})).unwrap();
        let bytes = head_bytes(&ws);
        assert_eq!(bytes[..HEAD_COPY_SIZE], bytes[HEAD_COPY_SIZE..]);
        assert!(check(&ws, None, None).unwrap().notes.is_empty());
        // Back to two records for the next round.
        let mut lines = lines(&ws);
        lines.pop();
        write_lines(&ws, &lines);
        set_head_bytes(&ws, &intact);
    }
    // Both copies damaged: no head, and the log cannot be vouched for.
    let mut bytes = intact.clone();
    bytes[100] ^= 1;
    bytes[HEAD_COPY_SIZE + 100] ^= 1;
    set_head_bytes(&ws, &bytes);
    let bad = check(&ws, None, None).unwrap_err();
    assert!(bad.reason.contains("neither copy is intact"), "{bad}");
    let lock = held(&ws);
    assert!(matches!(
        Log::open(&ws, None, &lock, None),
        Err(AuditError::Mismatch(_))
    ));
}

#[test]
fn a_crash_between_the_two_copies_keeps_the_newer_one() {
    let (_dir, ws) = workspace();
    log_with(&ws, 2, None);
    let old = head_bytes(&ws);
    let record3;
    {
        let lock = held(&ws);
        let mut log = Log::open(&ws, None, &lock, None).unwrap();
        let next;
        (next, record3) = one_line(&log);
        assert_eq!(next.seq, 3);
        let committed = log.head().clone();
        log.write_head(&committed, Some(&next)).unwrap();
    }
    // The intent reached the first copy only; the second still holds the old head.
    let mut bytes = head_bytes(&ws);
    bytes[HEAD_COPY_SIZE..].copy_from_slice(&old[HEAD_COPY_SIZE..]);
    set_head_bytes(&ws, &bytes);
    let (head, layout) = read_head(&head_path(&ws.state_dir())).unwrap().unwrap();
    assert_eq!(head.pending.map(|p| p.seq), Some(3));
    assert!(matches!(layout, HeadLayout::Copies { damaged: true, .. }));
    // The record itself was appended before the crash: the intent names it, so it is no tampering.
    {
        let lock = held(&ws);
        let mut log = Log::open(&ws, None, &lock, None).unwrap();
        log.write_lines(&record3).unwrap();
    }
    let ok = check(&ws, None, None).unwrap();
    assert_eq!((ok.records, ok.notes.len()), (3, 2), "{:?}", ok.notes);
    let lock = held(&ws);
    let log = Log::open(&ws, None, &lock, None).unwrap();
    assert_eq!(log.head().seq, 3, "rolled forward");
    assert!(check(&ws, None, None).unwrap().notes.is_empty());
}

#[test]
fn a_head_in_the_one_object_form_of_earlier_versions_is_read_and_converted() {
    let (_dir, ws) = workspace();
    let head = log_with(&ws, 2, None);
    let old = HeadFile {
        version: HEAD_VERSION,
        seq: head.seq,
        hash: head.hash.clone(),
        hmac: None,
        pending: None,
    };
    atomic::write_json(&head_path(&ws.state_dir()), &old).unwrap();
    let (read, layout) = read_head(&head_path(&ws.state_dir())).unwrap().unwrap();
    assert_eq!((read, layout), (old, HeadLayout::Whole));
    assert!(check(&ws, None, None).unwrap().notes.is_empty());
    log_with(&ws, 1, None);
    let (read, layout) = read_head(&head_path(&ws.state_dir())).unwrap().unwrap();
    assert_eq!(read.seq, 3);
    assert!(matches!(layout, HeadLayout::Copies { damaged: false, .. }));
}

/// Leaves the log as a crash in the middle of appending a batch of `batch` records after the
/// `n` already there would: the head's intent names the batch's last record, and only the
/// batch's first `keep` bytes reached the log. Returns the batch's lines.
fn crash_in_a_batch(ws: &Workspace, key: Option<Key>, n: u64, batch: u64, keep: usize) -> Vec<u8> {
    log_with(ws, n, key.clone());
    let lock = held(ws);
    let mut log = Log::open(ws, key, &lock, Some("r2")).unwrap();
    for i in 1..=batch {
        log.queue("stage.run", Some(&format!("s{i}")), json!({"i": i}));
    }
    let Batch {
        committed,
        next,
        lines,
    } = log.take_batch().unwrap();
    log.write_head(&committed, Some(&next)).unwrap();
    log.write_lines(&lines[..keep]).unwrap();
    lines
}

#[test]
fn stage_records_queue_and_one_flush_appends_them_as_one_chained_batch() {
    let (_dir, ws) = workspace();
    log_with(&ws, 1, None);
    let lock = held(&ws);
    let mut log = Log::open(&ws, None, &lock, Some("r2")).unwrap();
    log.stage_skipped("a", "unchanged", None).unwrap();
    log.queue("stage.run", Some("b"), json!({}));
    log.stage_skipped("c", "unchanged", None).unwrap();
    assert_eq!(lines(&ws).len(), 1, "nothing is written before the flush");
    log.append("run.end", None, json!({})).unwrap();
    let actions: Vec<String> = lines(&ws)
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        actions,
        [
            "test.step",
            "stages.skip",
            "stage.run",
            "stages.skip",
            "run.end"
        ]
    );
    assert_eq!(log.head().seq, 5);
    let ok = check(&ws, None, None).unwrap();
    assert_eq!((ok.records, ok.notes.len()), (5, 0));
    log.flush().unwrap();
    assert_eq!(lines(&ws).len(), 5, "an empty flush appends nothing");
}

#[test]
fn a_crash_anywhere_in_a_batch_verifies_and_the_next_appender_rolls_forward() {
    for key in [None, Some(Key::from_bytes(b"0123456789abcdef0123"))] {
        let (_dir, ws) = workspace();
        let full = crash_in_a_batch(&ws, key.clone(), 2, 3, 0);
        let ends: Vec<usize> = full
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        // Every line boundary, and a cut in the middle of each line.
        let mut cuts = vec![0];
        let mut start = 0;
        for &end in &ends {
            cuts.push((start + end) / 2);
            cuts.push(end);
            start = end;
        }
        for keep in cuts {
            let (_dir, ws) = workspace();
            crash_in_a_batch(&ws, key.clone(), 2, 3, keep);
            let complete = ends.iter().filter(|&&e| e <= keep).count() as u64;
            let torn = !ends.contains(&keep) && keep > 0;
            let ok =
                check(&ws, key.as_ref(), None).unwrap_or_else(|b| panic!("cut at {keep}: {b}"));
            assert_eq!(ok.records, 2 + complete, "cut at {keep}");
            assert_eq!(
                ok.notes.len(),
                usize::from(torn) + usize::from(complete > 0),
                "cut at {keep}: {:?}",
                ok.notes
            );
            let lock = held(&ws);
            let mut log = Log::open(&ws, key.clone(), &lock, None)
                .unwrap_or_else(|e| panic!("cut at {keep}: {e}"));
            assert_eq!(log.head().seq, 2 + complete, "cut at {keep}");
            log.append("x", None, json!({})).unwrap();
            let ok = check(&ws, key.as_ref(), None).unwrap();
            assert_eq!(
                (ok.records, ok.notes.len()),
                (3 + complete, 0),
                "cut at {keep}"
            );
        }
    }
}

#[test]
fn records_ahead_of_the_head_must_chain_from_it_and_stay_within_the_intent() {
    // A record of the batch edited (its hash recomputed): it no longer chains.
    let (_dir, ws) = workspace();
    let full = crash_in_a_batch(&ws, None, 2, 3, 0);
    let mut batch: Vec<Value> = std::str::from_utf8(&full)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    batch[0]["data"] = json!({"i": 99});
    batch[0]["hash"] = record_hash(&batch[0]).into();
    let mut all = lines(&ws);
    all.extend(batch[..2].iter().map(to_json_line));
    write_lines(&ws, &all);
    let broken = check(&ws, None, None).unwrap_err();
    assert_eq!(broken.seq, Some(4), "{broken}");
    let lock = held(&ws);
    assert!(matches!(
        Log::open(&ws, None, &lock, None),
        Err(AuditError::Mismatch(_))
    ));
    drop(lock);

    // The whole batch and one record more than the intent names.
    let (_dir, ws) = workspace();
    let full = crash_in_a_batch(&ws, None, 2, 2, 0);
    let mut all = lines(&ws);
    all.extend(
        std::str::from_utf8(&full)
            .unwrap()
            .lines()
            .map(str::to_string),
    );
    let last: Value = serde_json::from_str(all.last().unwrap()).unwrap();
    let mut extra = json!({"v": 1, "seq": 5, "action": "forged", "prev": last["hash"]});
    extra["hash"] = record_hash(&extra).into();
    all.push(to_json_line(&extra));
    write_lines(&ws, &all);
    let broken = check(&ws, None, None).unwrap_err();
    assert_eq!(broken.seq, Some(3), "{broken}");
    let lock = held(&ws);
    assert!(matches!(
        Log::open(&ws, None, &lock, None),
        Err(AuditError::Mismatch(_))
    ));
}

/// Strings that exercise JSON escaping: quotes, backslashes, control characters, non-ASCII.
const AWKWARD: &[&str] = &["plain", "q\"uo\\te", "tab\tnl\ncr\r\u{1}", "straße → ✓", ""];

#[test]
fn skip_entries_are_the_canonical_bytes_of_their_object() {
    for stage in AWKWARD {
        for reason in AWKWARD {
            for produced in [None, Some(("f\"p".to_string(), "run\n1".to_string()))] {
                let mut expected = json!({"stage": stage, "reason": reason});
                match &produced {
                    Some((fingerprint, run)) => {
                        expected["fingerprint"] = fingerprint.as_str().into();
                        expected["producedBy"] = run.as_str().into();
                    }
                    None => expected["marker"] = "missing".into(),
                }
                let mut bytes = Vec::new();
                skip_entry(stage, reason, produced.as_ref(), &mut bytes);
                assert_eq!(
                    String::from_utf8(bytes).unwrap(),
                    to_json_line(&expected),
                    "{stage:?} {reason:?} {produced:?}"
                );
            }
        }
    }
}

#[test]
fn a_record_with_canonical_data_is_the_canonical_bytes_of_the_whole_record() {
    let mut members = Map::new();
    for (i, key) in [
        "v", "seq", "ts", "actor", "run", "stage", "action", "prev", "hash", "hmac",
    ]
    .iter()
    .enumerate()
    {
        members.insert(
            key.to_string(),
            json!({"k": AWKWARD[i % AWKWARD.len()], "n": i}),
        );
    }
    let data = json!({"stages": [{"b": 1, "a": [AWKWARD[1], {"z": null, "y": 2.5}]}]});
    let mut canonical_data = Vec::new();
    write_canonical(&data, &mut canonical_data);
    let mut written = Vec::new();
    write_record(&members, &canonical_data, &mut written);
    let mut whole = members.clone();
    whole.insert("data".into(), data);
    assert_eq!(
        String::from_utf8(written).unwrap(),
        to_json_line(&Value::Object(whole))
    );
}

#[test]
fn skipped_stages_are_one_verifiable_record_listing_them_in_order() {
    let (_dir, ws) = workspace();
    let lock = held(&ws);
    let mut log = Log::open(&ws, None, &lock, Some("r1")).unwrap();
    log.stage_skipped("a", "unchanged", Some(&("fp\"a".into(), "r0".into())))
        .unwrap();
    log.stage_skipped("b\n", "unchanged", None).unwrap();
    log.append("run.end", None, json!({"status": "succeeded"}))
        .unwrap();
    // Nothing pending: no empty `stages.skip` record either.
    log.flush().unwrap();
    drop(log);
    let records: Vec<Value> = lines(&ws)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["action"], "stages.skip");
    assert_eq!(
        records[0]["data"],
        json!({"stages": [
            {"stage": "a", "reason": "unchanged", "fingerprint": "fp\"a", "producedBy": "r0"},
            {"stage": "b\n", "reason": "unchanged", "marker": "missing"},
        ]})
    );
    assert_eq!(records[1]["action"], "run.end");
    for (record, line) in records.iter().zip(lines(&ws)) {
        assert_eq!(to_json_line(record), line);
        assert_eq!(record["hash"], record_hash(record));
    }
    assert_eq!(check(&ws, None, None).unwrap().records, 2);
}

/// The line of one `run.end` record after the head of `log`, and the head it makes.
fn one_line(log: &Log) -> (Head, Vec<u8>) {
    let mut line = Vec::new();
    let next = log.next_line(&log.head().clone(), "run.end", None, b"{}", &mut line);
    (next, line)
}

/// A marker of a map stage whose paths and params need escaping, with several items.
fn sample_marker() -> Marker {
    use crate::fingerprint::{Ingredients, ProcessorIdentity};
    use crate::marker::{ItemEntry, OutputEntry, MARKER_VERSION};
    let names = [
        "a.txt",
        "b \"quoted\".txt",
        "c/ü\\ñ.txt",
        "d\n\t\u{1}.txt",
        "z€.txt",
    ];
    Marker {
        version: MARKER_VERSION,
        stage: "map".into(),
        fingerprint: "f".repeat(64),
        run_id: "r1".into(),
        finished_at: "2026-11-30T09:00:00.000Z".into(),
        outputs: names
            .iter()
            .enumerate()
            .map(|(i, n)| OutputEntry {
                path: n.to_string(),
                size: (i as u64) * 1_000_000_007,
                blake3: format!("{i:064x}"),
            })
            .collect(),
        ingredients: Ingredients {
            schema: 3,
            stage: "map".into(),
            processor: ProcessorIdentity {
                command: vec!["python3".into(), "p \"x\".py".into()],
                version: "1".into(),
                files: [("p \"x\".py".to_string(), "e".repeat(64))].into(),
            },
            params: json!({"z": [1, {"b": null, "a": 2.5}], "mode": "ascii", "é": "\"\\"}),
            inputs: names
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("input/{n}"), format!("{:064x}", i + 7)))
                .collect(),
        },
        items: names
            .iter()
            .map(|n| {
                (
                    format!("input/{n}"),
                    ItemEntry {
                        fingerprint: "c".repeat(64),
                        outputs: vec![n.to_string()],
                    },
                )
            })
            .collect(),
    }
}

/// What the audit data of a stage with a marker was before it was written without `Value`s: the
/// marker read whole, its lists turned into `Value`s, the object written canonically.
fn data_through_values(mut data: Value, marker: &Path) -> Vec<u8> {
    match Marker::read(marker) {
        Ok(Some(m)) => {
            data["fingerprint"] = m.fingerprint.into();
            data["processor"] = json!(m.ingredients.processor);
            data["params"] = m.ingredients.params;
            data["inputs"] = json!(m.ingredients.inputs);
            data["outputs"] = json!(m.outputs);
        }
        Ok(None) => data["marker"] = "missing".into(),
        Err(why) => data["marker"] = why.into(),
    }
    let mut out = Vec::new();
    write_canonical(&data, &mut out);
    out
}

#[test]
fn audit_data_with_a_marker_is_byte_identical_to_the_value_form() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".map.done");
    let same = |path: &Path| {
        let base = json!({"reason": "map: 5 of 5 items would run: \"x\"", "attempts": 5});
        let Value::Object(map) = base.clone() else {
            unreachable!()
        };
        let new = with_marker(map, path);
        assert_eq!(
            String::from_utf8(new.clone()).unwrap(),
            String::from_utf8(data_through_values(base, path)).unwrap()
        );
        new
    };
    // No marker, an unreadable one, one of another version, then a real one.
    assert!(String::from_utf8(same(&path))
        .unwrap()
        .contains("\"missing\""));
    std::fs::write(&path, b"{\"version\": 1, \"stage\": ").unwrap();
    same(&path);
    let mut other = serde_json::to_value(sample_marker()).unwrap();
    other["version"] = 7.into();
    atomic::write_json(&path, &other).unwrap();
    same(&path);
    atomic::write_json(&path, &sample_marker()).unwrap();
    let bytes = same(&path);
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.contains(r#""path":"b \"quoted\".txt""#), "{text}");
    // And a whole record made from it hashes as `record_hash` of the parsed line says.
    let (_dir, ws) = workspace();
    let lock = held(&ws);
    let mut log = Log::open(&ws, None, &lock, Some("r1")).unwrap();
    let Value::Object(map) = json!({"outcome": "completed"}) else {
        unreachable!()
    };
    log.queue_canonical("publish.recover", Some("map"), with_marker(map, &path));
    log.flush().unwrap();
    let line = lines(&ws).pop().unwrap();
    let record: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["hash"], record_hash(&record));
    assert_eq!(to_json_line(&record), line);
    assert_eq!(record["data"]["outputs"][1]["path"], "b \"quoted\".txt");
    check(&ws, None, None).unwrap();
}

#[test]
fn background_flushes_write_the_batches_in_order_and_a_synchronous_flush_waits_for_them() {
    let (_dir, ws) = workspace();
    let key = Key::from_bytes(b"k");
    let lock = held(&ws);
    let mut log = Log::open(&ws, Some(key.clone()), &lock, Some("r1")).unwrap();
    for i in 1..=20u64 {
        log.queue("test.step", Some("s"), json!({"i": i}));
        if i % 3 == 0 {
            log.flush_in_background().unwrap();
        }
    }
    log.append("test.last", None, json!({})).unwrap();
    assert_eq!(log.head().seq, 21);
    // The append waited for every background batch: all of them are on disk, chained, with the
    // head file at the last one.
    let verified = check(&ws, Some(&key), None).unwrap();
    assert_eq!(verified.records, 21);
    assert_eq!(verified.head.as_ref(), Some(log.head()));
    let steps: Vec<u64> = lines(&ws)
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["data"]["i"].as_u64())
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
    // Dropping the log after a background flush still writes it.
    log.queue("test.dropped", None, json!({}));
    log.flush_in_background().unwrap();
    drop(log);
    assert_eq!(check(&ws, Some(&key), None).unwrap().records, 22);
}

#[test]
fn a_background_write_error_is_returned_by_the_next_flush_and_nothing_follows_it() {
    let (_dir, ws) = workspace();
    let lock = held(&ws);
    let mut log = Log::open(&ws, None, &lock, Some("r1")).unwrap();
    log.append("test.first", None, json!({})).unwrap();
    // The log file replaced by a folder: appending to it fails.
    let path = log_path(&ws.state_dir());
    let kept = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    log.queue("test.lost", None, json!({}));
    log.flush_in_background().unwrap();
    assert!(log.flush().is_err(), "the writer's error comes back");
    log.queue("test.after", None, json!({}));
    assert!(
        log.flush().is_err(),
        "nothing is appended after a failed batch"
    );
    assert!(log.flush_in_background().is_err());
    drop(log);
    std::fs::remove_dir(&path).unwrap();
    std::fs::write(&path, kept).unwrap();
    // The failed batch's intent is in the head; the log (its one record) is still consistent, and
    // the next appender goes on from it.
    assert_eq!(check(&ws, None, None).unwrap().records, 1);
    let mut log = Log::open(&ws, None, &lock, Some("r2")).unwrap();
    log.append("test.next", None, json!({})).unwrap();
    assert_eq!(check(&ws, None, None).unwrap().records, 2);
}

/// Three batches of one record each (`test.b1`..`test.b3`), taken from `log` without writing.
fn three_batches(log: &mut Log) -> [Batch; 3] {
    [1, 2, 3].map(|i| {
        log.queue(&format!("test.b{i}"), None, json!({"i": i}));
        let batch = log.take_batch().unwrap();
        log.head = batch.next.clone();
        batch
    })
}

#[test]
fn a_streak_of_batches_is_written_in_order_with_one_head_write_per_batch_plus_one() {
    for key in [None, Some(Key::from_bytes(b"k"))] {
        // Queued behind the first: merged with it (one batch, two head writes).
        let (_dir, ws) = workspace();
        log_with(&ws, 1, key.clone());
        let lock = held(&ws);
        let mut log = Log::open(&ws, key.clone(), &lock, Some("r2")).unwrap();
        let [b1, b2, b3] = three_batches(&mut log);
        let mut queue = vec![b2, b3].into_iter();
        let writer = log.writer_here().unwrap();
        let before = writer.generation;
        writer.write_streak(b1, || queue.next()).unwrap();
        assert_eq!(writer.generation - before, 2, "queued batches are merged");
        let verified = check(&ws, key.as_ref(), None).unwrap();
        assert_eq!((verified.records, verified.notes.len()), (4, 0));
        assert_eq!(verified.head.as_ref(), Some(log.head()));

        // Arriving while lines are written: the head that commits one names the next as pending
        // (four head writes for three batches instead of six).
        let (_dir, ws) = workspace();
        log_with(&ws, 1, key.clone());
        let mut log = Log::open(&ws, key.clone(), &lock, Some("r2")).unwrap();
        let [b1, b2, b3] = three_batches(&mut log);
        let mut arrivals = vec![None, Some(b2), None, Some(b3), None, None].into_iter();
        let writer = log.writer_here().unwrap();
        let before = writer.generation;
        writer
            .write_streak(b1, || arrivals.next().flatten())
            .unwrap();
        assert_eq!(writer.generation - before, 4);
        let verified = check(&ws, key.as_ref(), None).unwrap();
        assert_eq!((verified.records, verified.notes.len()), (4, 0));
        assert_eq!(verified.head.as_ref(), Some(log.head()));
        let actions: Vec<String> = lines(&ws)
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["action"].to_string())
            .collect();
        assert_eq!(
            actions,
            [
                r#""test.step""#,
                r#""test.b1""#,
                r#""test.b2""#,
                r#""test.b3""#
            ]
        );
    }
}

#[test]
fn a_crash_after_a_head_that_commits_one_batch_and_names_the_next_is_repaired() {
    // The states a kill leaves after a streak's head write (it commits batch 1 and names batch
    // 2 as pending): the log ends at batch 1, or batch 2's lines are there too.
    for with_next_lines in [false, true] {
        let (_dir, ws) = workspace();
        log_with(&ws, 1, None);
        let lock = held(&ws);
        let mut log = Log::open(&ws, None, &lock, Some("r2")).unwrap();
        let [b1, b2, _] = three_batches(&mut log);
        let writer = log.writer_here().unwrap();
        writer.write_streak(b1, || None).unwrap();
        writer.write_head(&b2.committed, Some(&b2.next)).unwrap();
        if with_next_lines {
            writer.write_lines(&b2.lines).unwrap();
        }
        drop(log);
        let extra = u64::from(with_next_lines);
        let verified = check(&ws, None, None).unwrap();
        assert_eq!(
            (verified.records, verified.notes.len() as u64),
            (2 + extra, extra),
            "{:?}",
            verified.notes
        );
        let mut log = Log::open(&ws, None, &lock, Some("r3")).unwrap();
        assert_eq!(log.head().seq, 2 + extra, "rolled forward over batch 2");
        log.append("test.next", None, json!({})).unwrap();
        let verified = check(&ws, None, None).unwrap();
        assert_eq!((verified.records, verified.notes.len()), (3 + extra, 0));
    }
}
