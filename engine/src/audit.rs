//! The tamper-evident audit log: `state/audit.jsonl` (hash-chained records) and `state/audit.head`.
//!
//! One record per consequential action (run start/end, a stage's outcome with the blake3 hashes of
//! what it published, clean, an interrupted publish completed, processors of a dead run stopped).
//! Each record carries `prev`, the SHA-256 of the previous record's canonical bytes, and its own
//! `hash`; with a key held outside the workspace each record's hash (and the head) is also
//! authenticated with HMAC-SHA256. `docs/audit.md` is the user-facing description.
//!
//! **Canonical bytes** of a record: the record's JSON object without its `hash` and `hmac` members,
//! serialised compactly (no whitespace), object members sorted by key (byte order), arrays in order,
//! strings escaped as serde_json escapes them, integers in decimal. A record's `hash` is the
//! lowercase hex SHA-256 of those bytes; each line of the log is the canonical serialisation of
//! the whole record (with `hash` and `hmac`) followed by `\n`.
//!
//! **Appending** happens only under the workspace lock (an [`Log`] can only be opened with a held
//! [`WorkspaceLock`]), by the one thread that writes shared state. One append writes a *batch* of
//! one or more records (group commit: the stage records that queued up while the previous batch
//! was being made durable, see [`Log::stage_finished`] and [`Log::flush`]):
//! 1. write the head with an *intent* (`pending`: seq and hash of the batch's last record),
//! 2. append the batch's lines and fsync the log (failpoint `audit.after-append` fires here),
//! 3. write the head naming the batch's last record (no intent).
//!
//! The head file holds two checksummed copies of the head, written in place one after the other
//! (each fdatasynced), so a head write costs no new inode and a torn one never loses the head
//! ([`read_head`]).
//!
//! **Crash rule:** a crash between 1 and 3 leaves the log with the first records of the batch
//! (none, some or all of them) ahead of the head, possibly followed by a torn line. That is
//! legitimate only while the head has an intent and the records ahead of it chain from the head's
//! record up to at most the intent's seq, the record at the intent's seq (if there) being exactly
//! the one it names: `verify` then accepts it (and says so), and the next appender repairs it under
//! the lock — it removes a torn final line and rolls the head forward over the complete records.
//! Records ahead of the head beyond the intent, or not chaining from the head, or a torn line
//! without an intent, are reported as tampering.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use pipe_processors::failpoint;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::atomic;
use crate::clean::Cleaned;
use crate::lock::WorkspaceLock;
use crate::marker::Marker;
use crate::publish::Recovery;
use crate::spec::{Spec, Stage};
use crate::state::{self, RunRecord, StageStatus, Totals};
use crate::workspace::Workspace;

/// Version of the record format (`v` in every record).
pub const RECORD_VERSION: u64 = 1;
/// Version of the head (the logical content of `state/audit.head`).
pub const HEAD_VERSION: u32 = 1;
/// Version of a copy of the head in the two-copy file (see [`read_head`]).
pub const HEAD_COPY_VERSION: u32 = 2;
/// Size of each of the two copies of the head in `state/audit.head`: one filesystem block each,
/// so that writing one never touches the other's block.
pub const HEAD_COPY_SIZE: usize = 4096;
/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Environment variable naming the key file when `--audit-key` is not given.
pub const KEY_ENV: &str = "PIPE_AUDIT_KEY";

const RECORD_DOMAIN: &str = "pipe-audit-record-v1\n";
const HEAD_DOMAIN: &str = "pipe-audit-head-v1\n";

/// `state/audit.jsonl`.
pub fn log_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.jsonl")
}

/// `state/audit.head`.
pub fn head_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.head")
}

// ------------------------------------------------------------------------------------- hashing

/// The canonical bytes of `record`: without `hash` and `hmac`, keys sorted, compact.
pub fn canonical_bytes(record: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match record {
        // Written without `hash` and `hmac`, in place: a copy of the record would double the
        // memory a record of a big map stage (every output listed) takes.
        Value::Object(map) => write_object(
            map.iter().filter(|(k, _)| *k != "hash" && *k != "hmac"),
            &mut out,
        ),
        other => write_canonical(other, &mut out),
    }
    out
}

/// Compact JSON with object keys sorted at every level (independent of serde_json's map order).
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => write_object(map.iter(), out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("a scalar serialises"),
    }
}

/// An object of these members, keys sorted.
fn write_object<'a>(members: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Vec<u8>) {
    write_members(
        members
            .map(|(key, value)| (key, Member::Value(value)))
            .collect(),
        out,
    );
}

/// The canonical bytes of a record made of `members` and a `data` member whose canonical bytes
/// are `data` (the same bytes as [`write_canonical`] of the whole record, written without
/// building `data` as a [`Value`]: the `stages.skip` record of a no-op build lists every stage).
fn write_record(members: &Map<String, Value>, data: &[u8], out: &mut Vec<u8>) {
    let data_key = String::from("data");
    let mut all: Vec<(&String, Member)> = members
        .iter()
        .map(|(key, value)| (key, Member::Value(value)))
        .collect();
    all.push((&data_key, Member::Canonical(data)));
    write_members(all, out);
}

/// A member's value: a JSON value, bytes that already are a value's canonical form, or a writer
/// of those bytes.
enum Member<'a> {
    Value(&'a Value),
    Canonical(&'a [u8]),
    Written(&'a dyn Fn(&mut Vec<u8>)),
}

/// An object of `members`, keys sorted.
fn write_members(mut members: Vec<(&String, Member)>, out: &mut Vec<u8>) {
    members.sort_by_key(|(key, _)| *key);
    out.push(b'{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key).expect("a string serialises");
        out.push(b':');
        match value {
            Member::Value(value) => write_canonical(value, out),
            Member::Canonical(bytes) => out.extend_from_slice(bytes),
            Member::Written(write) => write(out),
        }
    }
    out.push(b'}');
}

/// The canonical bytes of one entry of a `stages.skip` record: the object
/// `{"stage", "reason", "fingerprint", "producedBy"}` (or `"marker": "missing"` instead of the last
/// two), keys sorted.
fn skip_entry(stage: &str, reason: &str, produced: Option<&(String, String)>, out: &mut Vec<u8>) {
    /// `key` is the member's JSON key with its quotes, colon and (but first) comma: the keys
    /// are fixed ASCII words, nothing to escape.
    fn member(out: &mut Vec<u8>, key: &[u8], value: &str) {
        out.extend_from_slice(key);
        serde_json::to_writer(&mut *out, value).expect("a string serialises");
    }
    out.push(b'{');
    match produced {
        Some((fingerprint, run)) => {
            member(out, br#""fingerprint":"#, fingerprint);
            member(out, br#","producedBy":"#, run);
        }
        None => member(out, br#""marker":"#, "missing"),
    }
    member(out, br#","reason":"#, reason);
    member(out, br#","stage":"#, stage);
    out.push(b'}');
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

/// The `hash` a record must carry: SHA-256 of its canonical bytes.
pub fn record_hash(record: &Value) -> String {
    sha256_hex(&canonical_bytes(record))
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// ----------------------------------------------------------------------------------------- key

/// A secret held outside the workspace; authenticates hashes with HMAC-SHA256.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(redacted)")
    }
}

impl Key {
    /// The key is the file's bytes, less one final `\n` (or `\r\n`); at least [`MIN_KEY_LEN`].
    pub fn from_file(path: &Path) -> Result<Key, String> {
        let mut bytes = std::fs::read(path)
            .map_err(|err| format!("cannot read the audit key `{}`: {err}", path.display()))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.len() < MIN_KEY_LEN {
            return Err(format!(
                "the audit key `{}` is {} bytes; use at least {MIN_KEY_LEN} random bytes \
                 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                path.display(),
                bytes.len()
            ));
        }
        Ok(Key(bytes))
    }

    /// A key from bytes (tests).
    pub fn from_bytes(bytes: &[u8]) -> Key {
        Key(bytes.to_vec())
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    fn sign(&self, message: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(message);
        to_hex(&mac.finalize().into_bytes())
    }

    /// Constant-time check of a hex tag.
    fn check(&self, message: &[u8], tag: &str) -> bool {
        let Some(tag) = from_hex(tag) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(message);
        mac.verify_slice(&tag).is_ok()
    }

    fn sign_record(&self, hash: &str) -> String {
        self.sign(format!("{RECORD_DOMAIN}{hash}").as_bytes())
    }

    fn check_record(&self, hash: &str, tag: &str) -> bool {
        self.check(format!("{RECORD_DOMAIN}{hash}").as_bytes(), tag)
    }

    fn sign_head(&self, seq: u64, hash: &str) -> String {
        self.sign(format!("{HEAD_DOMAIN}{seq}\n{hash}").as_bytes())
    }

    fn check_head(&self, seq: u64, hash: &str, tag: &str) -> bool {
        self.check(format!("{HEAD_DOMAIN}{seq}\n{hash}").as_bytes(), tag)
    }
}

// ---------------------------------------------------------------------------------------- head

/// A position in the chain: a record's seq and hash (seq 0 and [`GENESIS`]: the empty log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// `state/audit.head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeadFile {
    pub version: u32,
    pub seq: u64,
    pub hash: String,
    /// HMAC of (seq, hash) when the log is keyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac: Option<String>,
    /// The record being appended right now (seq and hash), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Head>,
}

/// How `state/audit.head` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// One JSON object, replaced atomically (temporary file and rename): what versions before
    /// the two-copy file wrote. Still read; the next append converts it.
    Whole,
    /// Two copies, each a line of [`HEAD_COPY_SIZE`] bytes updated in place; `generation` of the
    /// newest intact copy, `damaged` when the other copy is not intact or older (a crash or power
    /// cut between or during the writes of one update).
    Copies { generation: u64, damaged: bool },
}

/// Reads `state/audit.head`: the head and how it is stored.
///
/// The file holds two copies of the head, at offsets 0 and [`HEAD_COPY_SIZE`]. Each is one line:
/// the canonical JSON of `{"version": 2, "generation": G, "seq", "hash", "hmac"?, "pending"?,
/// "check"}` padded with spaces to the copy size, `check` being the SHA-256 of the canonical
/// serialisation of the object without `check`. An update writes the first copy and fdatasyncs,
/// then the second and fdatasyncs, both in place (no new inode, no rename): at any instant at
/// least one copy is intact and holds the head before or after the update, so a torn write never
/// leaves the log without a valid head; the newest intact copy is the head. Once an update is
/// done both copies are the same, so the file never keeps a head older than the current one
/// (which would let whoever can write `state/` roll the log back by damaging the newer copy).
pub fn read_head(path: &Path) -> Result<Option<(HeadFile, HeadLayout)>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(format!("cannot read state/audit.head: {err}")),
    };
    if bytes.len() == 2 * HEAD_COPY_SIZE {
        let copies: Vec<Option<(HeadFile, u64)>> =
            bytes.chunks(HEAD_COPY_SIZE).map(parse_head_copy).collect();
        let newest = copies
            .iter()
            .flatten()
            .max_by_key(|(_, generation)| *generation);
        return match newest {
            Some((head, generation)) => {
                let damaged = copies
                    .iter()
                    .any(|c| c.as_ref().map(|(_, g)| g) != Some(generation));
                let layout = HeadLayout::Copies {
                    generation: *generation,
                    damaged,
                };
                Ok(Some((head.clone(), layout)))
            }
            None => Err("state/audit.head is not a valid head: neither copy is intact".into()),
        };
    }
    let head: HeadFile = serde_json::from_slice(&bytes)
        .map_err(|err| format!("state/audit.head is not a valid head: {err}"))?;
    if head.version != HEAD_VERSION || !is_hash(&head.hash) {
        return Err("state/audit.head is not a valid head".into());
    }
    Ok(Some((head, HeadLayout::Whole)))
}

/// One copy of the head as stored in the two-copy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeadCopy {
    version: u32,
    generation: u64,
    seq: u64,
    hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hmac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<Head>,
    check: String,
}

/// The head in one copy's bytes and its generation, if the copy is intact.
fn parse_head_copy(bytes: &[u8]) -> Option<(HeadFile, u64)> {
    let end = bytes.iter().rposition(|b| !b" \n".contains(b))? + 1;
    let mut value: Value = serde_json::from_slice(&bytes[..end]).ok()?;
    let check = value.as_object_mut()?.remove("check")?;
    if check.as_str()? != head_copy_check(&value) {
        return None;
    }
    value["check"] = check;
    let copy: HeadCopy = serde_json::from_value(value).ok()?;
    if copy.version != HEAD_COPY_VERSION || !is_hash(&copy.hash) {
        return None;
    }
    let head = HeadFile {
        version: HEAD_VERSION,
        seq: copy.seq,
        hash: copy.hash,
        hmac: copy.hmac,
        pending: copy.pending,
    };
    Some((head, copy.generation))
}

/// The `check` of a head copy: the SHA-256 of the canonical bytes of all its other members
/// (unlike a record's hash, `hash` and `hmac` included).
fn head_copy_check(copy: &Value) -> String {
    let mut bytes = Vec::new();
    write_canonical(copy, &mut bytes);
    sha256_hex(&bytes)
}

/// The bytes of one copy of `head` at `generation` (see [`read_head`]).
fn head_copy_bytes(head: &HeadFile, generation: u64) -> io::Result<Vec<u8>> {
    let mut value = serde_json::to_value(HeadCopy {
        version: HEAD_COPY_VERSION,
        generation,
        seq: head.seq,
        hash: head.hash.clone(),
        hmac: head.hmac.clone(),
        pending: head.pending.clone(),
        check: String::new(),
    })
    .map_err(io::Error::other)?;
    value.as_object_mut().expect("an object").remove("check");
    let check = head_copy_check(&value);
    value["check"] = check.into();
    let mut bytes = Vec::with_capacity(HEAD_COPY_SIZE);
    write_canonical(&value, &mut bytes);
    if bytes.len() >= HEAD_COPY_SIZE {
        return Err(io::Error::other("the audit head does not fit its copy"));
    }
    bytes.resize(HEAD_COPY_SIZE - 1, b' ');
    bytes.push(b'\n');
    Ok(bytes)
}

/// A head the user kept elsewhere: `SEQ:HASH` or `HASH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptHead {
    pub seq: Option<u64>,
    pub hash: String,
}

impl std::str::FromStr for KeptHead {
    type Err = String;
    fn from_str(s: &str) -> Result<KeptHead, String> {
        let (seq, hash) = match s.trim().split_once(':') {
            Some((seq, hash)) => (
                Some(
                    seq.parse::<u64>()
                        .map_err(|_| format!("`{seq}` is not a record number"))?,
                ),
                hash,
            ),
            None => (None, s.trim()),
        };
        if !is_hash(hash) {
            return Err(format!(
                "`{hash}` is not a SHA-256 hash (64 hex digits); give SEQ:HASH as printed by \
                 `pipe build` (`audit head: ...`)"
            ));
        }
        Ok(KeptHead {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

// --------------------------------------------------------------------------------------- actor

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Actor {
    pub user: String,
    pub uid: u32,
    pub pid: u32,
    pub hostname: String,
}

impl Actor {
    /// This process.
    pub fn current() -> Actor {
        let uid = rustix::process::getuid().as_raw();
        Actor {
            user: user_name(uid),
            uid,
            pid: std::process::id(),
            hostname: hostname(),
        }
    }
}

fn user_name(uid: u32) -> String {
    let from_passwd = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id = fields.nth(1)?;
                (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
        });
    from_passwd
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| uid.to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------------- appending

/// Why the audit log cannot be extended.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "the audit log cannot be extended: {0}\n  run `pipe audit verify` for details; pipe never \
         extends a log it cannot vouch for (to start a new log, move state/audit.jsonl and \
         state/audit.head aside)"
    )]
    Mismatch(String),
    #[error("{0}")]
    Key(String),
    #[error("cannot write the audit log: {0}")]
    Io(#[from] io::Error),
}

/// The last complete record of the log and what follows it.
#[derive(Debug, Default)]
struct Tail {
    /// Seq and hash of the last complete line, if any; `Err` when it is not a valid record.
    last: Option<Result<Head, String>>,
    /// Length of the log up to and including the last `\n`.
    complete_len: u64,
    /// Bytes after the last `\n` (a torn append).
    torn: bool,
}

fn read_tail(path: &Path) -> io::Result<Tail> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(err) => return Err(err),
    };
    let len = file.metadata()?.len();
    let newlines = last_newlines(&mut file, len, 2)?;
    let Some(&end) = newlines.first() else {
        return Ok(Tail {
            last: None,
            complete_len: 0,
            torn: len > 0,
        });
    };
    let start = newlines.get(1).map_or(0, |p| p + 1);
    let mut line = vec![0; (end - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    let last = serde_json::from_slice::<Value>(&line)
        .map_err(|err| format!("its last line is not valid JSON ({err})"))
        .and_then(|record| {
            let seq = record["seq"].as_u64().ok_or("its last record has no seq")?;
            let hash = record["hash"].as_str().unwrap_or_default().to_string();
            if hash != record_hash(&record) {
                return Err(format!("its last record ({seq}) does not match its hash"));
            }
            Ok(Head { seq, hash })
        });
    Ok(Tail {
        last: Some(last),
        complete_len: end + 1,
        torn: len > end + 1,
    })
}

/// Whether a log whose last complete record is `last` can be a batch append in flight over the
/// committed head (the crash rule): `last` is past the head, not past the intent's record
/// (`pending`), and is that very record when it has its seq. Whether the records chain from the
/// head is [`check_chain`]'s (or `verify`'s) part.
fn in_flight(committed: &Head, pending: &Head, last: &Head) -> bool {
    last.seq > committed.seq
        && last.seq <= pending.seq
        && (last.seq < pending.seq || last == pending)
}

/// Checks that the log's complete records after the head's record (`committed`), up to `last`
/// (the last complete one), chain from it: consecutive seqs, each `prev` the hash of the one
/// before, each hash (and with a key, HMAC) valid. Reads only those records, from the end.
fn check_chain(
    path: &Path,
    committed: &Head,
    last: &Head,
    key: Option<&Key>,
) -> Result<(), AuditError> {
    let after = (last.seq - committed.seq) as usize;
    let lines = read_last_lines(path, after + usize::from(committed.seq > 0))?;
    let broken = |why: String| {
        AuditError::Mismatch(format!(
            "the records after the head (record {}) do not chain from it: {why}",
            committed.seq
        ))
    };
    let mut records = Vec::with_capacity(lines.len());
    for line in &lines {
        let record: Value = serde_json::from_slice(line)
            .map_err(|err| broken(format!("a line is not JSON ({err})")))?;
        records.push(record);
    }
    let mut prev = Head {
        seq: 0,
        hash: GENESIS.into(),
    };
    for (i, record) in records.iter().enumerate() {
        let seq = record["seq"].as_u64().unwrap_or(0);
        let hash = record["hash"].as_str().unwrap_or_default();
        if hash != record_hash(record) {
            return Err(broken(format!("record {seq} does not match its hash")));
        }
        if let Some(key) = key {
            if !record["hmac"]
                .as_str()
                .is_some_and(|tag| key.check_record(hash, tag))
            {
                return Err(broken(format!("record {seq}'s HMAC does not verify")));
            }
        }
        if i == 0 && committed.seq > 0 {
            if seq != committed.seq || hash != committed.hash {
                return Err(broken(format!("record {seq} is not the head's record")));
            }
        } else if seq != prev.seq + 1 || record["prev"].as_str() != Some(prev.hash.as_str()) {
            return Err(broken(format!(
                "record {seq} does not follow record {}",
                prev.seq
            )));
        }
        prev = Head {
            seq,
            hash: hash.to_string(),
        };
    }
    if prev != *last || records.len() != lines.len() {
        return Err(broken(format!(
            "the log does not end at record {}",
            last.seq
        )));
    }
    Ok(())
}

/// Offsets of the last `count` newlines of the open `file` (of length `len`), the last first;
/// fewer if it has fewer. Reads backwards, a chunk at a time, only as far as needed.
fn last_newlines(file: &mut File, len: u64, count: usize) -> io::Result<Vec<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut newlines = Vec::new();
    let mut pos = len;
    let mut buf = Vec::new();
    while pos > 0 && newlines.len() < count {
        let start = pos.saturating_sub(CHUNK);
        buf.resize((pos - start) as usize, 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        for (i, b) in buf.iter().enumerate().rev() {
            if *b == b'\n' {
                newlines.push(start + i as u64);
                if newlines.len() == count {
                    break;
                }
            }
        }
        pos = start;
    }
    Ok(newlines)
}

/// The last `count` complete lines of the file (fewer if it has fewer), without their `\n`;
/// bytes after the last `\n` (a torn append) are not a line.
fn read_last_lines(path: &Path, count: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    // The newline ending the last line, and the one before the first wanted line (if any).
    let newlines = last_newlines(&mut file, len, count + 1)?;
    let Some(&end) = newlines.first() else {
        return Ok(Vec::new());
    };
    let start = newlines.get(count).map_or(0, |p| p + 1);
    let mut bytes = vec![0; (end - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut bytes)?;
    Ok(bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect())
}

/// One group-commit batch: the head it is chained from, the head it leads to, its lines.
#[derive(Debug)]
struct Batch {
    committed: Head,
    next: Head,
    lines: Vec<u8>,
}

impl Batch {
    /// This batch and `next` (taken after it, so chained from where this one ends) as one.
    fn followed_by(mut self, next: Batch) -> Batch {
        debug_assert_eq!(next.committed, self.next, "batches are taken in order");
        self.lines.extend_from_slice(&next.lines);
        Batch {
            committed: self.committed,
            next: next.next,
            lines: self.lines,
        }
    }
}

/// Writes batches to the log and its head file: the only code that changes them once the log is
/// open.
#[derive(Debug)]
struct Writer {
    log: PathBuf,
    head_file: PathBuf,
    state_dir: PathBuf,
    key: Option<Key>,
    /// Generation of the head file's copies (0: the file is not in two-copy form yet).
    generation: u64,
    /// The two-copy head file, open for updates in place.
    head_writer: Option<File>,
}

/// Where the [`Writer`] is.
#[derive(Debug)]
enum WriterSlot {
    Here(Writer),
    Away(Background),
    /// It failed on its thread: nothing more is written.
    Gone,
}

/// The writer on a thread of its own, fed batches in order.
#[derive(Debug)]
struct Background {
    batches: std::sync::mpsc::Sender<Batch>,
    /// Set when a write failed (the thread then stops taking batches).
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Hands the writer back when the channel closes, with the error that stopped it, if any.
    thread: std::thread::JoinHandle<(Writer, Option<io::Error>)>,
}

impl Background {
    fn start(mut writer: Writer) -> io::Result<Background> {
        let (batches, rx) = std::sync::mpsc::channel::<Batch>();
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("pipe-audit".into())
            .spawn(move || {
                while let Ok(batch) = rx.recv() {
                    if let Err(err) = writer.write_streak(batch, || rx.try_recv().ok()) {
                        flag.store(true, std::sync::atomic::Ordering::Release);
                        return (writer, Some(err));
                    }
                }
                (writer, None)
            })?;
        Ok(Background {
            batches,
            failed,
            thread,
        })
    }
}

/// The writer in `slot`, which [`Log::writer_here`] just brought back.
fn writer_of(slot: &mut WriterSlot) -> &mut Writer {
    match slot {
        WriterSlot::Here(writer) => writer,
        _ => unreachable!("the writer is here"),
    }
}

impl Writer {
    /// Appends `first` (see [`Log::flush`]: intent in the head, lines appended and fsynced, head
    /// committed) and every batch `queued` hands over meanwhile, with fewer head writes
    /// than a write of each alone, and leaves the head committed. Batches already
    /// queued are merged into one (as if they had been taken as one, which the crash rule
    /// accepts: any prefix of a batch); and when more arrived while lines were being written,
    /// the head that commits those lines also names the next batch as pending, so a streak of
    /// batches costs one head write each plus one at its end, not two each. The states the files
    /// pass through are those of synchronous flushes of the merged batches, minus the
    /// intermediate "committed, nothing pending" heads: a crash in any of them is repaired by
    /// the next appender.
    fn write_streak(
        &mut self,
        first: Batch,
        mut queued: impl FnMut() -> Option<Batch>,
    ) -> io::Result<()> {
        // The next batch and every one queued behind it, as one.
        let mut take = |first: Option<Batch>| {
            let mut batch = first.or_else(&mut queued)?;
            while let Some(next) = queued() {
                batch = batch.followed_by(next);
            }
            Some(batch)
        };
        let mut batch = take(Some(first)).expect("there is a first batch");
        self.write_head(&batch.committed, Some(&batch.next))?;
        loop {
            self.write_lines(&batch.lines)?;
            failpoint::hit("audit.after-append");
            match take(None) {
                Some(next) => {
                    self.write_head(&batch.next, Some(&next.next))?;
                    batch = next;
                }
                None => return self.write_head(&batch.next, None),
            }
        }
    }

    /// Writes the head (see [`read_head`]): both copies in place, each fdatasynced before the
    /// other is touched. A file not yet in two-copy form (missing, or written by an earlier
    /// version) is first replaced atomically by one holding the new head twice.
    fn write_head(&mut self, head: &Head, pending: Option<&Head>) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = HeadFile {
            version: HEAD_VERSION,
            seq: head.seq,
            hash: head.hash.clone(),
            hmac: self.key.as_ref().map(|k| k.sign_head(head.seq, &head.hash)),
            pending: pending.cloned(),
        };
        let copy = head_copy_bytes(&file, self.generation + 1)?;
        if self.generation == 0 {
            // Missing, or in the form of an earlier version: replaced atomically, once.
            atomic::write(
                &self.head_file,
                &[copy.as_slice(), copy.as_slice()].concat(),
            )?;
            self.generation = 1;
            return Ok(());
        }
        let writer = match &self.head_writer {
            Some(writer) => writer,
            None => self
                .head_writer
                .insert(OpenOptions::new().write(true).open(&self.head_file)?),
        };
        writer.write_all_at(&copy, 0)?;
        writer.sync_data()?;
        failpoint::hit("audit.after-first-head-copy");
        writer.write_all_at(&copy, HEAD_COPY_SIZE as u64)?;
        writer.sync_data()?;
        self.generation += 1;
        Ok(())
    }

    /// Appends `lines` (canonical records, each with its newline) to the log, durably.
    fn write_lines(&self, lines: &[u8]) -> io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let created = !self.log.exists();
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)?;
        file.write_all(lines)?;
        file.sync_all()?;
        if created {
            atomic::sync_dir(&self.state_dir)?;
        }
        Ok(())
    }
}

/// The appender. Open it under the workspace lock; the thread holding it is the only writer.
#[derive(Debug)]
pub struct Log {
    log: PathBuf,
    head_file: PathBuf,
    key: Option<Key>,
    /// The head after every batch taken so far (some may still be written by the background
    /// writer, see [`Log::flush_in_background`]).
    head: Head,
    /// What writes the batches: here, or on the background writer's thread.
    writer: WriterSlot,
    run: Option<String>,
    actor: Actor,
    /// Skipped stages not yet recorded: they go into one `stages.skip` record, appended before
    /// the next other record (a no-op build over 10,000 stages appends one record, not 10,000).
    /// Held as the canonical bytes of the entries, comma-separated (see [`Log::stage_skipped`]).
    skipped: Vec<u8>,
    /// Records queued for the next [`Log::flush`]: action, stage and the canonical bytes of
    /// `data`, in order.
    queued: Vec<(String, Option<String>, Vec<u8>)>,
}

/// The writer's steps one by one, for the crash tests.
#[cfg(test)]
impl Log {
    fn write_head(&mut self, head: &Head, pending: Option<&Head>) -> io::Result<()> {
        self.writer_here()?.write_head(head, pending)
    }

    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        self.writer_here()?.write_lines(lines)
    }
}

impl Drop for Log {
    /// Batches given to the background writer are written before the log is let go (as a
    /// synchronous flush would have written them); an error is only reported by a flush.
    fn drop(&mut self) {
        let _ = self.writer_here();
    }
}

impl Log {
    /// Opens the log for appending, after checking that its end matches its head and repairing an
    /// append a crash interrupted (see the module's crash rule). `run` goes into every record.
    pub fn open(
        ws: &Workspace,
        key: Option<Key>,
        _held: &WorkspaceLock,
        run: Option<&str>,
    ) -> Result<Log, AuditError> {
        let state_dir = ws.state_dir();
        let log = log_path(&state_dir);
        let head_file = head_path(&state_dir);
        let mut this = Log {
            log,
            head_file,
            key: key.clone(),
            skipped: Vec::new(),
            queued: Vec::new(),
            head: Head {
                seq: 0,
                hash: GENESIS.into(),
            },
            writer: WriterSlot::Here(Writer {
                log: log_path(&state_dir),
                head_file: head_path(&state_dir),
                state_dir: state_dir.clone(),
                key: key.clone(),
                generation: 0,
                head_writer: None,
            }),
            run: run.map(str::to_string),
            actor: Actor::current(),
        };
        let tail = read_tail(&this.log)?;
        let head = match read_head(&this.head_file).map_err(AuditError::Mismatch)? {
            Some((head, HeadLayout::Copies { generation, .. })) => {
                this.writer_here()?.generation = generation;
                Some(head)
            }
            Some((head, HeadLayout::Whole)) => Some(head),
            None => None,
        };
        let last = match tail.last {
            None => None,
            Some(Ok(last)) => Some(last),
            Some(Err(why)) => {
                return Err(AuditError::Mismatch(format!("state/audit.jsonl: {why}")))
            }
        };
        let Some(head) = head else {
            if last.is_none() && !tail.torn {
                return Ok(this); // a new log
            }
            return Err(AuditError::Mismatch(
                "state/audit.jsonl has records but state/audit.head is missing".into(),
            ));
        };
        match (&this.key, &head.hmac) {
            (Some(key), Some(tag)) if !key.check_head(head.seq, &head.hash, tag) => {
                return Err(AuditError::Key(
                    "the audit head is not authenticated by this key (another key, or a forged \
                     head); run `pipe audit verify` with the right key"
                        .into(),
                ))
            }
            (Some(_), None) => {
                return Err(AuditError::Key(
                    "this audit log was written without a key; a key can only be adopted with a \
                     new log (move state/audit.jsonl and state/audit.head aside)"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(AuditError::Key(format!(
                    "this audit log is authenticated with a key: give it with --audit-key FILE \
                     or {KEY_ENV}"
                )))
            }
            _ => {}
        }
        let committed = Head {
            seq: head.seq,
            hash: head.hash.clone(),
        };
        let at_head = match &last {
            None => committed.seq == 0,
            Some(last) => *last == committed,
        };
        if at_head {
            if tail.torn {
                if head.pending.as_ref().is_none_or(|p| p.seq <= committed.seq) {
                    return Err(AuditError::Mismatch(
                        "the log ends with an incomplete line that no append was writing".into(),
                    ));
                }
                // An append torn by a crash: it never happened.
                let file = OpenOptions::new().write(true).open(&this.log)?;
                file.set_len(tail.complete_len)?;
                file.sync_all()?;
            }
            this.head = committed;
            return Ok(this);
        }
        match last {
            Some(last)
                if head
                    .pending
                    .as_ref()
                    .is_some_and(|pending| in_flight(&committed, pending, &last)) =>
            {
                // (Part of) a batch appended, but the crash came before the head: check that the
                // records chain from the head, drop a torn line, roll the head forward.
                check_chain(&this.log, &committed, &last, this.key.as_ref())?;
                if tail.torn {
                    let file = OpenOptions::new().write(true).open(&this.log)?;
                    file.set_len(tail.complete_len)?;
                    file.sync_all()?;
                }
                this.writer_here()?.write_head(&last, None)?;
                this.head = last;
                Ok(this)
            }
            None => Err(AuditError::Mismatch(format!(
                "state/audit.jsonl is missing or empty but the head names record {}",
                committed.seq
            ))),
            Some(last) if last.seq < committed.seq => Err(AuditError::Mismatch(format!(
                "the log ends at record {} but the head names record {}: it was truncated",
                last.seq, committed.seq
            ))),
            Some(last) if last.seq == committed.seq => Err(AuditError::Mismatch(format!(
                "record {} is not the one the head names",
                last.seq
            ))),
            Some(_) => Err(AuditError::Mismatch(format!(
                "the log has records after the head (record {}) that pipe did not append",
                committed.seq
            ))),
        }
    }

    /// The current head.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The record following `prev` with `data` (its canonical bytes): its line (canonical bytes,
    /// with `hash` and `hmac`, and a newline) appended to `lines`, and the head it makes. The
    /// line is written in place (first without `hash` and `hmac`, to hash it): no copy of a big
    /// record is made.
    fn next_line(
        &self,
        prev: &Head,
        action: &str,
        stage: Option<&str>,
        data: &[u8],
        lines: &mut Vec<u8>,
    ) -> Head {
        let mut record = Map::new();
        record.insert("v".into(), RECORD_VERSION.into());
        record.insert("seq".into(), (prev.seq + 1).into());
        record.insert("ts".into(), state::now_rfc3339().into());
        record.insert("actor".into(), json!(self.actor));
        if let Some(run) = &self.run {
            record.insert("run".into(), run.clone().into());
        }
        if let Some(stage) = stage {
            record.insert("stage".into(), stage.into());
        }
        record.insert("action".into(), action.into());
        record.insert("prev".into(), prev.hash.clone().into());
        let start = lines.len();
        lines.reserve(data.len() + 1024);
        write_record(&record, data, lines);
        let hash = sha256_hex(&lines[start..]);
        if let Some(key) = &self.key {
            record.insert("hmac".into(), key.sign_record(&hash).into());
        }
        record.insert("hash".into(), hash.clone().into());
        lines.truncate(start);
        write_record(&record, data, lines);
        lines.push(b'\n');
        Head {
            seq: prev.seq + 1,
            hash,
        }
    }

    /// Appends one record, after the records queued before it, and makes them all durable.
    pub fn append(&mut self, action: &str, stage: Option<&str>, data: Value) -> io::Result<()> {
        self.queue(action, stage, data);
        self.flush()
    }

    /// Queues a record for the next [`Log::flush`], after the `stages.skip` record of the
    /// skipped stages held so far.
    fn queue(&mut self, action: &str, stage: Option<&str>, data: Value) {
        let mut canonical = Vec::new();
        write_canonical(&data, &mut canonical);
        self.queue_canonical(action, stage, canonical);
    }

    /// [`Log::queue`] of data given as its canonical bytes.
    fn queue_canonical(&mut self, action: &str, stage: Option<&str>, data: Vec<u8>) {
        self.queue_skipped();
        self.queued
            .push((action.to_string(), stage.map(str::to_string), data));
    }

    /// Turns the skipped stages held so far into a queued `stages.skip` record.
    fn queue_skipped(&mut self) {
        if self.skipped.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.skipped);
        let mut data = Vec::with_capacity(entries.len() + 14);
        data.extend_from_slice(b"{\"stages\":[");
        data.extend_from_slice(&entries);
        data.extend_from_slice(b"]}");
        self.queued.push(("stages.skip".into(), None, data));
    }

    /// Appends every queued record (and the skipped stages held) as one batch: intent in the
    /// head, lines appended and fsynced once, head committed. Five syncs however many records:
    /// the group commit that keeps a build of many short stages from paying them per stage.
    pub fn flush(&mut self) -> io::Result<()> {
        self.writer_here()?;
        let Some(batch) = self.take_batch() else {
            return Ok(());
        };
        let next = batch.next.clone();
        writer_of(&mut self.writer).write_streak(batch, || None)?;
        self.head = next;
        Ok(())
    }

    /// Like [`Log::flush`], but the batch is written by a writer thread while this one goes on
    /// (started on first use; batches are written one after the other, in order, so the log on
    /// disk goes through states synchronous flushes would leave: batches that queue up while the
    /// writer syncs are written as one, and a streak of them commits one while naming the next
    /// as pending, see [`Writer::write_streak`]). The build's
    /// coordinator flushes this way whenever it would wait for a stage, so the syncs of its group
    /// commit no longer hold up starting the next stage. A write error stops the writer; it is
    /// returned by the next flush of either kind (and nothing after the failed batch is written).
    pub fn flush_in_background(&mut self) -> io::Result<()> {
        let failed = match &self.writer {
            WriterSlot::Here(_) => false,
            WriterSlot::Away(away) => away.failed.load(std::sync::atomic::Ordering::Acquire),
            WriterSlot::Gone => true,
        };
        if failed {
            self.writer_here()?; // its error
        }
        let Some(batch) = self.take_batch() else {
            return Ok(());
        };
        self.head = batch.next.clone();
        if let WriterSlot::Here(_) = self.writer {
            let WriterSlot::Here(writer) = std::mem::replace(&mut self.writer, WriterSlot::Gone)
            else {
                unreachable!()
            };
            self.writer = WriterSlot::Away(Background::start(writer)?);
        }
        let WriterSlot::Away(away) = &self.writer else {
            unreachable!("just started")
        };
        if away.batches.send(batch).is_err() {
            // The writer stopped on an error: it is returned now.
            self.writer_here()?;
        }
        Ok(())
    }

    /// The writer, back on this thread: waits for the background writer (if any) to write what
    /// it was given, and returns its error if it failed.
    fn writer_here(&mut self) -> io::Result<&mut Writer> {
        if let WriterSlot::Away(_) = self.writer {
            let WriterSlot::Away(away) = std::mem::replace(&mut self.writer, WriterSlot::Gone)
            else {
                unreachable!()
            };
            let Background {
                batches, thread, ..
            } = away;
            drop(batches);
            match thread.join() {
                Ok((writer, None)) => self.writer = WriterSlot::Here(writer),
                Ok((_, Some(err))) => return Err(err),
                Err(_) => return Err(io::Error::other("the audit log writer panicked")),
            }
        }
        match &mut self.writer {
            WriterSlot::Here(writer) => Ok(writer),
            _ => Err(io::Error::other(
                "the audit log writer failed earlier; nothing more is appended",
            )),
        }
    }

    /// The queued records (and the skipped stages held) as one batch: their lines, chained from
    /// the head, and the head they lead to; `None` when nothing is queued.
    fn take_batch(&mut self) -> Option<Batch> {
        self.queue_skipped();
        if self.queued.is_empty() {
            return None;
        }
        let mut lines = Vec::new();
        let mut next = self.head.clone();
        for (action, stage, data) in std::mem::take(&mut self.queued) {
            next = self.next_line(&next, &action, stage.as_deref(), &data, &mut lines);
        }
        Some(Batch {
            committed: self.head.clone(),
            next,
            lines,
        })
    }

    // ------------------------------------------------------------- the actions pipe records

    /// Queues `run.start`: the pipeline and the stages selected (appended with the next record).
    pub fn run_started(
        &mut self,
        spec: &Spec,
        selected: &std::collections::BTreeSet<usize>,
    ) -> io::Result<()> {
        let stages: Vec<&str> = selected
            .iter()
            .map(|&i| spec.stages[i].name.as_str())
            .collect();
        self.queue(
            "run.start",
            None,
            json!({"pipeline": spec.file, "root": spec.root.display().to_string(), "stages": stages}),
        );
        Ok(())
    }

    /// `run.end`: the run's status and totals.
    pub fn run_finished(&mut self, run: &RunRecord, totals: &Totals) -> io::Result<()> {
        self.append(
            "run.end",
            None,
            json!({"status": run.status, "durationMs": run.duration_ms, "totals": totals}),
        )
    }

    /// Queues `stage.run|resume|restore|fail|interrupt`, with the published outputs (from the
    /// marker) when the stage published; it is appended at the next [`Log::flush`] or
    /// [`Log::append`] (the build flushes before it waits for a running stage, and at its end).
    /// Skipped stages go through [`Log::stage_skipped`]; not-run stages are not recorded.
    pub fn stage_finished(
        &mut self,
        ws: &Workspace,
        stage: &Stage,
        status: StageStatus,
        reason: &str,
        attempts: u32,
    ) -> io::Result<()> {
        let marker = ws.marker_file(&stage.output_dir, &stage.name);
        let action = match status {
            StageStatus::Succeeded => "stage.run",
            StageStatus::Resumed => "stage.resume",
            StageStatus::Restored => "stage.restore",
            StageStatus::Failed => "stage.fail",
            StageStatus::Interrupted => "stage.interrupt",
            _ => return Ok(()),
        };
        let mut data = Map::new();
        data.insert("reason".into(), reason.into());
        data.insert("attempts".into(), attempts.into());
        let canonical = if matches!(
            status,
            StageStatus::Succeeded | StageStatus::Resumed | StageStatus::Restored
        ) {
            with_marker(data, &marker)
        } else {
            let mut out = Vec::new();
            write_object(data.iter(), &mut out);
            out
        };
        self.queue_canonical(action, Some(&stage.name), canonical);
        Ok(())
    }

    /// Holds skipped `stage` for the next `stages.skip` record, with its marker's fingerprint and
    /// the run that produced its outputs (`produced`, as the planner read them).
    pub fn stage_skipped(
        &mut self,
        stage: &str,
        reason: &str,
        produced: Option<&(String, String)>,
    ) -> io::Result<()> {
        if !self.skipped.is_empty() {
            self.skipped.push(b',');
        }
        skip_entry(stage, reason, produced, &mut self.skipped);
        Ok(())
    }

    /// `publish.recover`: an interrupted publish completed or abandoned before the build.
    pub fn publish_recovered(
        &mut self,
        ws: &Workspace,
        stage: &Stage,
        recovery: &Recovery,
    ) -> io::Result<()> {
        let data = match recovery {
            Recovery::Nothing => return Ok(()),
            Recovery::Completed => {
                let mut data = Map::new();
                data.insert("outcome".into(), "completed".into());
                with_marker(data, &ws.marker_file(&stage.output_dir, &stage.name))
            }
            Recovery::Abandoned(why) => {
                let mut out = Vec::new();
                write_canonical(&json!({"outcome": "abandoned", "why": why}), &mut out);
                out
            }
        };
        self.queue_canonical("publish.recover", Some(&stage.name), data);
        self.flush()
    }

    /// `lock.takeover`: a processor that a dead run left running was stopped.
    pub fn lock_takeover(&mut self, stage: &str, pid: u32, dead_run: &str) -> io::Result<()> {
        self.append(
            "lock.takeover",
            Some(stage),
            json!({"stoppedPid": pid, "deadRun": dead_run}),
        )
    }

    /// `clean`: what was removed.
    pub fn cleaned(&mut self, cleaned: &Cleaned, state: bool, cache: bool) -> io::Result<()> {
        self.append(
            "clean",
            None,
            json!({"stages": cleaned.stages, "removed": cleaned.files, "state": state, "cache": cache}),
        )
    }
}

/// Adds what the marker says to `data`: the fingerprint, and either the run that produced the
/// outputs (`skipped`: they are in that run's records) or what went in and came out: inputs and
/// processor files with their blake3 hashes, params, and the outputs (path, size, blake3).
/// The canonical bytes of `data` with the published outputs (from the marker) added:
/// `fingerprint`, `processor`, `params`, `inputs` (path → blake3) and `outputs` (`path`, `size`,
/// `blake3`), or `marker` saying why there are none. The input and output lists (one entry per
/// item of a map stage) are written straight from the marker, not built as [`Value`]s.
fn with_marker(mut data: Map<String, Value>, marker: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let m = match Marker::read_without_items(marker) {
        Ok(Some(m)) => m,
        Ok(None) => {
            data.insert("marker".into(), "missing".into());
            write_object(data.iter(), &mut out);
            return out;
        }
        Err(why) => {
            data.insert("marker".into(), why.into());
            write_object(data.iter(), &mut out);
            return out;
        }
    };
    data.insert("fingerprint".into(), m.fingerprint.into());
    data.insert("processor".into(), json!(m.ingredients.processor));
    data.insert("params".into(), m.ingredients.params);
    let (inputs_key, outputs_key) = (String::from("inputs"), String::from("outputs"));
    let inputs = &m.ingredients.inputs;
    let outputs = &m.outputs;
    let write_inputs = |out: &mut Vec<u8>| {
        // A map's keys in canonical (byte) order: a BTreeMap<String, _> iterates in it.
        out.push(b'{');
        for (i, (path, blake3)) in inputs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(path, out);
            out.push(b':');
            write_str(blake3, out);
        }
        out.push(b'}');
    };
    let write_outputs = |out: &mut Vec<u8>| {
        out.push(b'[');
        for (i, o) in outputs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(br#"{"blake3":"#);
            write_str(&o.blake3, out);
            out.extend_from_slice(br#","path":"#);
            write_str(&o.path, out);
            out.extend_from_slice(br#","size":"#);
            serde_json::to_writer(&mut *out, &o.size).expect("a number serialises");
            out.push(b'}');
        }
        out.push(b']');
    };
    let mut members: Vec<(&String, Member)> = data
        .iter()
        .map(|(key, value)| (key, Member::Value(value)))
        .collect();
    members.push((&inputs_key, Member::Written(&write_inputs)));
    members.push((&outputs_key, Member::Written(&write_outputs)));
    write_members(members, &mut out);
    out
}

/// A string as canonical JSON (serde_json's escaping).
fn write_str(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("a string serialises");
}

// -------------------------------------------------------------------------------------- verify

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The last record (the head); `None` for an empty or missing log.
    pub head: Option<Head>,
    /// Every record's HMAC (and the head's) was checked with the key.
    pub authenticated: bool,
    /// Records carry HMACs that were not checked (no key given).
    pub hmacs_unchecked: bool,
    /// Whether a kept head (`--head`) was found in the chain.
    pub kept_head_found: bool,
    /// Benign findings (an append interrupted by a crash).
    pub notes: Vec<String>,
}

/// The first bad record and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The record the problem is about, when one can be named.
    pub seq: Option<u64>,
    /// Its line in state/audit.jsonl (1-based), when it has one.
    pub line: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.seq, self.line) {
            (Some(seq), Some(line)) => write!(f, "record {seq} (line {line}): {}", self.reason),
            (Some(seq), None) => write!(f, "record {seq}: {}", self.reason),
            (None, Some(line)) => write!(f, "line {line}: {}", self.reason),
            (None, None) => f.write_str(&self.reason),
        }
    }
}

fn broken(seq: Option<u64>, line: Option<u64>, reason: impl Into<String>) -> Broken {
    Broken {
        seq,
        line,
        reason: reason.into(),
    }
}

/// The line (1-based) of the first complete record whose `seq` is `seq`, after line `after`.
fn find_seq(path: &Path, seq: u64, after: u64) -> io::Result<Option<u64>> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(None);
        }
        line += 1;
        if line > after
            && serde_json::from_slice::<Value>(&buf)
                .ok()
                .and_then(|v| v["seq"].as_u64())
                == Some(seq)
        {
            return Ok(Some(line));
        }
    }
}

/// Walks the chain in `state_dir`: every record's hash, seq, prev (and HMAC with a key), then the
/// head file and the kept head. Reads only; takes no lock.
pub fn verify(
    state_dir: &Path,
    key: Option<&Key>,
    kept: Option<&KeptHead>,
) -> io::Result<Result<Verified, Broken>> {
    let path = log_path(state_dir);
    let (head_file, head_damaged) = match read_head(&head_path(state_dir)) {
        Ok(Some((head, HeadLayout::Copies { damaged, .. }))) => (Some(head), damaged),
        Ok(Some((head, HeadLayout::Whole))) => (Some(head), false),
        Ok(None) => (None, false),
        Err(why) => return Ok(Err(broken(None, None, why))),
    };
    let file = match File::open(&path) {
        Ok(file) => Some(file),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(err),
    };
    let mut reader = file.map(BufReader::new);
    let mut buf = Vec::new();
    let mut line = 0u64;
    let mut prev = Head {
        seq: 0,
        hash: GENESIS.to_string(),
    };
    let mut torn_line = None;
    let mut hmacs_unchecked = false;
    let mut kept_found: Option<bool> = None;
    // Whether the record the head names is in the log with that hash (what records ahead of the
    // head must chain from, under the crash rule).
    let mut head_record_found = head_file
        .as_ref()
        .is_some_and(|h| h.seq == 0 && h.hash == GENESIS);
    while let Some(reader) = reader.as_mut() {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line += 1;
        let expected = prev.seq + 1;
        if buf.last() != Some(&b'\n') {
            torn_line = Some(line);
            break;
        }
        let at = Some(line);
        let record: Value = match serde_json::from_slice(&buf) {
            Ok(Value::Object(map)) => Value::Object(map),
            Ok(_) => {
                return Ok(Err(broken(
                    None,
                    at,
                    "not a JSON object: the log was edited",
                )))
            }
            Err(err) => {
                return Ok(Err(broken(
                    None,
                    at,
                    format!("not valid JSON ({err}): the record was edited or the file damaged"),
                )))
            }
        };
        let seq = record["seq"].as_u64();
        let hash = record["hash"].as_str().unwrap_or_default().to_string();
        if hash != record_hash(&record) {
            return Ok(Err(broken(
                seq,
                at,
                "its content does not match its hash: the record was edited",
            )));
        }
        let Some(seq) = seq else {
            return Ok(Err(broken(None, at, "the record has no seq")));
        };
        if buf[..buf.len() - 1] != *to_json_line(&record).as_bytes() {
            return Ok(Err(broken(
                Some(seq),
                at,
                "the line is not in the canonical form pipe writes: it was edited (the same \
                 content in other bytes, e.g. reformatted or with a duplicated key)",
            )));
        }
        if record["v"].as_u64() != Some(RECORD_VERSION) {
            return Ok(Err(broken(
                Some(seq),
                at,
                format!("unknown record version {}", record["v"]),
            )));
        }
        match (key, record["hmac"].as_str()) {
            (Some(_), None) => {
                return Ok(Err(broken(
                    Some(seq),
                    at,
                    "it has no HMAC: it was written without the key, or forged",
                )))
            }
            (Some(key), Some(tag)) if !key.check_record(&hash, tag) => {
                return Ok(Err(broken(
                    Some(seq),
                    at,
                    "its HMAC does not verify with the key: the record was forged (its hash \
                     recomputed) or written with another key",
                )))
            }
            (None, Some(_)) => hmacs_unchecked = true,
            _ => {}
        }
        if seq > expected {
            let reason = match find_seq(&path, expected, line)? {
                Some(later) => format!(
                    "out of order: record {expected} comes after it, at line {later}: records \
                     were reordered"
                ),
                None => format!("record {expected} is missing before it: a record was deleted"),
            };
            return Ok(Err(broken(Some(seq), at, reason)));
        }
        if seq < expected {
            let reason = match find_seq(&path, seq, 0)?.filter(|&first| first < line) {
                Some(first) => format!(
                    "record {seq} already appeared at line {first}: a record was inserted, \
                     duplicated or reordered"
                ),
                None => format!("expected record {expected} here: records were reordered"),
            };
            return Ok(Err(broken(Some(seq), at, reason)));
        }
        if record["prev"].as_str() != Some(prev.hash.as_str()) {
            return Ok(Err(broken(
                Some(seq),
                at,
                format!(
                    "its prev is not the hash of record {}: the chain is broken (a record before \
                     it was replaced, inserted or deleted)",
                    prev.seq
                ),
            )));
        }
        if let Some(kept) = kept {
            if kept.seq == Some(seq) {
                if hash != kept.hash {
                    return Ok(Err(broken(
                        Some(seq),
                        at,
                        format!(
                            "its hash {hash} is not the kept head's {}: the log was rewritten at \
                             or before this record",
                            kept.hash
                        ),
                    )));
                }
                kept_found = Some(true);
            } else if kept.seq.is_none() && hash == kept.hash {
                kept_found = Some(true);
            }
        }
        if head_file.as_ref().is_some_and(|h| h.seq == seq) {
            head_record_found = head_file.as_ref().is_some_and(|h| h.hash == hash);
        }
        prev = Head { seq, hash };
    }
    let records = prev.seq;
    if let Some(kept) = kept {
        if kept_found.is_none() {
            return Ok(Err(match kept.seq {
                Some(seq) => broken(
                    Some(seq),
                    None,
                    format!(
                        "the kept head names record {seq} but the log ends at record {records}: \
                         the log was truncated or rewritten"
                    ),
                ),
                None => broken(
                    None,
                    None,
                    format!(
                        "no record has the kept head's hash {}: the log was rewritten or truncated",
                        kept.hash
                    ),
                ),
            }));
        }
    }
    let mut notes = Vec::new();
    if head_damaged {
        notes.push(
            "one of the two copies in state/audit.head is not intact or older than the other (a \
             crash or power cut while the head was updated); the newest intact copy is the head, \
             and the next build or clean rewrites both"
                .to_string(),
        );
    }
    let Some(head_file) = head_file else {
        if records == 0 && torn_line.is_none() {
            return Ok(Ok(Verified {
                records: 0,
                head: None,
                authenticated: key.is_some(),
                hmacs_unchecked: false,
                kept_head_found: kept_found.is_some(),
                notes,
            }));
        }
        return Ok(Err(broken(
            None,
            None,
            format!("state/audit.head is missing but the log has {records} record(s)"),
        )));
    };
    match (key, &head_file.hmac) {
        (Some(_), None) => {
            return Ok(Err(broken(
                None,
                None,
                "state/audit.head has no HMAC: it was written without the key, or forged",
            )))
        }
        (Some(key), Some(tag)) if !key.check_head(head_file.seq, &head_file.hash, tag) => {
            return Ok(Err(broken(
                None,
                None,
                "state/audit.head: its HMAC does not verify with the key (a forged head, or \
                 another key)",
            )))
        }
        (None, Some(_)) => hmacs_unchecked = true,
        _ => {}
    }
    let committed = Head {
        seq: head_file.seq,
        hash: head_file.hash.clone(),
    };
    // A batch append in flight (the crash rule): the complete records reach at most the intent's
    // record, chain from the head's (the walk above checked the chain), and the one at the
    // intent's seq is that record.
    let pending = head_file.pending.as_ref().filter(|p| p.seq > committed.seq);
    let appending = |complete: &Head| {
        pending.is_some_and(|p| {
            head_record_found && (*complete == committed || in_flight(&committed, p, complete))
        })
    };
    if let Some(torn) = torn_line {
        let torn_in_batch = pending.is_some_and(|p| records < p.seq);
        if !appending(&prev) || !torn_in_batch {
            return Ok(Err(broken(
                Some(records + 1),
                Some(torn),
                "the last line is incomplete and no append was in progress: the log was \
                 truncated or damaged",
            )));
        }
        notes.push(format!(
            "line {torn} is an append a crash interrupted (the head's intent names record {}); \
             the next build or clean removes it",
            pending.map_or(records + 1, |p| p.seq)
        ));
    }
    if prev == committed {
        // the normal case (or only a torn line after it, noted above)
    } else if records > committed.seq && appending(&prev) {
        let first = committed.seq + 1;
        let which = if first == records {
            format!("record {records} was")
        } else {
            format!("records {first}-{records} were")
        };
        notes.push(format!(
            "{which} appended by a build or clean that died before updating the head (the \
             head's intent names record {}); the next build or clean updates the head",
            pending.map_or(records, |p| p.seq)
        ));
    } else if records < committed.seq {
        return Ok(Err(broken(
            Some(records + 1),
            None,
            format!(
                "missing: the log ends at record {records} but state/audit.head names record {}: \
                 the log was truncated",
                committed.seq
            ),
        )));
    } else if records == committed.seq {
        return Ok(Err(broken(
            Some(records),
            Some(records),
            "its hash is not the one state/audit.head names: the record was replaced",
        )));
    } else {
        return Ok(Err(broken(
            Some(committed.seq + 1),
            Some(committed.seq + 1),
            format!(
                "not covered by state/audit.head (which names record {}): records were appended \
                 outside pipe",
                committed.seq
            ),
        )));
    }
    Ok(Ok(Verified {
        records,
        head: (records > 0).then_some(prev),
        authenticated: key.is_some(),
        hmacs_unchecked,
        kept_head_found: kept_found.is_some(),
        notes,
    }))
}

// ---------------------------------------------------------------------------------------- show

/// Which records `pipe audit show` prints.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub stage: Option<String>,
    pub run: Option<String>,
}

impl Filter {
    /// A record matches `--stage S` when it is about S (or a clean that cleaned S).
    pub fn matches(&self, record: &Value) -> bool {
        let stage_ok = self.stage.as_deref().is_none_or(|s| {
            record["stage"].as_str() == Some(s)
                || record["data"]["stages"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(s)))
        });
        let run_ok = self
            .run
            .as_deref()
            .is_none_or(|r| record["run"].as_str() == Some(r));
        stage_ok && run_ok
    }
}

/// Every line of the log: the parsed record, or the line number and why it is unreadable.
pub fn read_all(state_dir: &Path) -> io::Result<Vec<Result<Value, (u64, String)>>> {
    let file = match File::open(log_path(state_dir)) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut records = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(records);
        }
        line += 1;
        records.push(
            serde_json::from_slice::<Value>(&buf)
                .map_err(|err| (line, format!("unreadable: {err}"))),
        );
    }
}

/// A record for people: a header line, then the data indented.
pub fn render(record: &Value) -> String {
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    let actor = &record["actor"];
    let mut out = format!(
        "#{} {} {}",
        record["seq"],
        s(&record["ts"]),
        s(&record["action"])
    );
    if let Some(stage) = record["stage"].as_str() {
        out += &format!(" stage={stage}");
    }
    if let Some(run) = record["run"].as_str() {
        out += &format!(" run={run}");
    }
    out += &format!(
        " by {}@{} (uid {}, pid {})",
        s(&actor["user"]),
        s(&actor["hostname"]),
        actor["uid"],
        actor["pid"]
    );
    if let Value::Object(data) = &record["data"] {
        let mut keys: Vec<&String> = data.keys().collect();
        keys.sort();
        for key in keys {
            let value = &data[key];
            match (key.as_str(), value) {
                ("outputs", Value::Array(outputs)) => {
                    out += &format!("\n    outputs: {}", outputs.len());
                    for o in outputs {
                        out += &format!(
                            "\n      {}  {} bytes  blake3 {}",
                            s(&o["path"]),
                            o["size"],
                            s(&o["blake3"])
                        );
                    }
                }
                ("inputs", Value::Object(inputs)) => {
                    out += &format!("\n    inputs: {}", inputs.len());
                    for (path, hash) in inputs {
                        out += &format!("\n      {path}  blake3 {}", s(hash));
                    }
                }
                ("stages", Value::Array(stages)) => {
                    out += &format!("\n    stages: {}", stages.len());
                    for e in stages {
                        out += &format!(
                            "\n      {}  {}  fingerprint {}",
                            s(&e["stage"]),
                            s(&e["reason"]),
                            s(&e["fingerprint"])
                        );
                    }
                }
                (_, Value::Array(items)) if items.iter().all(Value::is_string) => {
                    let items: Vec<String> = items.iter().map(s).collect();
                    out += &format!("\n    {key}: {}", items.join(", "));
                }
                (_, value) => out += &format!("\n    {key}: {}", s(value)),
            }
        }
    }
    out += &format!("\n    hash: {}", s(&record["hash"]));
    out
}

/// A record as one canonical JSON line (for `--message-format json`).
pub fn to_json_line(record: &Value) -> String {
    let mut out = Vec::new();
    write_canonical(record, &mut out);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests;
