//! The structured run log `state/logs/run_<id>.jsonl`, and the one event line format it shares
//! with `--message-format json`.
//!
//! Every [`Event`] of a build becomes one flat JSON object on one line (schema in
//! `docs/events.md`):
//!
//! ```text
//! {"ts":"2026-01-02T03:04:05.678Z","runId":"r1","event":"stageFinished","stage":"copy","status":"succeeded",...}
//! ```
//!
//! [`line`] is the only place that shapes that object: the coordinator writes it to the run log
//! through [`RunLog`], and the CLI prints the same object on stdout, so the two streams cannot
//! drift apart.
//!
//! Why the lines are written here rather than through `tracing-subscriber`'s JSON layer: that
//! layer's shape is `{"timestamp", "level", "target", "fields": {...}}` (or flattened, still with
//! `level`/`target`/`message`), a field value is a primitive (nested values such as the run totals
//! or a plan's reasons would become JSON inside strings), the subscriber is process- or
//! thread-global rather than per run, and its non-blocking writer drops what is buffered when the
//! process is killed. One small writer owned by the coordinator gives the documented flat schema,
//! one `write` per line (a killed `pipe` loses no line already reported) and a file per run.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::event::Event;

/// Version of the event line schema (`docs/events.md`); bumped only by incompatible changes.
pub const EVENT_SCHEMA: u32 = 1;

/// One event line: `ts`, `runId`, then the event's own fields (`event` first).
#[derive(Serialize)]
struct Line<'a> {
    ts: &'a str,
    #[serde(rename = "runId", skip_serializing_if = "Option::is_none")]
    run_id: Option<&'a str>,
    #[serde(flatten)]
    event: &'a Event,
}

/// The JSON text (no newline) of `event` at time `ts` (RFC 3339) in run `run_id`.
pub fn line(ts: &str, run_id: &str, event: &Event) -> String {
    // Every stage has these lines (a no-op build of 10,000 stages: 20,000 of them): written
    // directly, the same bytes as serde's (tested), without the cost of its flattening.
    match event {
        Event::StagePlanned {
            stage,
            summary,
            decision: crate::plan::Decision::Skip,
        } => {
            let mut out = Fields::start(ts, run_id, "stagePlanned");
            out.text("stage", stage);
            out.text("summary", summary);
            out.text("decision", "skip");
            out.end()
        }
        Event::StageFinished {
            stage,
            status,
            duration_ms,
            reason,
        } => {
            let mut out = Fields::start(ts, run_id, "stageFinished");
            out.text("stage", stage);
            out.text("status", status.as_str());
            out.number("durationMs", *duration_ms);
            out.text("reason", reason);
            out.end()
        }
        _ => serde_line(ts, run_id, event),
    }
}

/// [`line`] through serde.
fn serde_line(ts: &str, run_id: &str, event: &Event) -> String {
    // Run events carry their own `runId` field; do not write the key twice.
    let own = matches!(event, Event::RunStarted { .. } | Event::RunFinished { .. });
    let line = Line {
        ts,
        run_id: (!own).then_some(run_id),
        event,
    };
    serde_json::to_string(&line).expect("events serialise")
}

/// An event line written field by field, as serde_json writes a [`Line`].
struct Fields(Vec<u8>);

impl Fields {
    fn start(ts: &str, run_id: &str, event: &str) -> Fields {
        let mut out = Fields(Vec::with_capacity(160));
        out.0.push(b'{');
        out.text("ts", ts);
        out.text("runId", run_id);
        out.text("event", event);
        out
    }

    /// `key`: one of the fixed field names, ASCII letters only (nothing to escape).
    fn key(&mut self, key: &str) {
        debug_assert!(key.bytes().all(|b| b.is_ascii_alphabetic()), "{key}");
        if self.0.len() > 1 {
            self.0.push(b',');
        }
        self.0.push(b'"');
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        serde_json::to_writer(&mut self.0, value).expect("a string serialises");
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        serde_json::to_writer(&mut self.0, &value).expect("a number serialises");
    }

    fn end(mut self) -> String {
        self.0.push(b'}');
        String::from_utf8(self.0).expect("serde_json writes UTF-8")
    }
}

enum Sink {
    /// Before the run id is known to be new: lines wait in memory.
    Buffering(Vec<String>),
    /// The file, and lines of skipped stages not written yet.
    Open(File, String),
    /// Writing failed once; the build goes on without its log.
    Broken,
}

/// Pending skip lines are written once they reach this size.
const SKIP_BATCH_BYTES: usize = 64 << 10;

/// Whether `event` only says that a stage is skipped (such lines are written in batches).
fn is_skip(event: &Event) -> bool {
    match event {
        Event::StagePlanned { decision, .. } => !decision.runs(),
        Event::StageFinished { status, .. } => *status == crate::state::StageStatus::Skipped,
        _ => false,
    }
}

/// The run log of one build. Owned by the coordinator (one thread); `&self` methods so that the
/// build's event callback can hold it while the coordinator opens it.
pub struct RunLog {
    path: PathBuf,
    run_id: String,
    sink: RefCell<Sink>,
}

impl RunLog {
    /// A log for run `run_id` at `path`, buffering until [`RunLog::open`].
    pub fn new(path: PathBuf, run_id: &str) -> RunLog {
        RunLog {
            path,
            run_id: run_id.to_string(),
            sink: RefCell::new(Sink::Buffering(Vec::new())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the file (replacing a stale one of this never-recorded run id) and writes what was
    /// buffered. Call once the run id is known to be unused.
    pub fn open(&self) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        let mut sink = self.sink.borrow_mut();
        if let Sink::Buffering(lines) = &*sink {
            for line in lines {
                file.write_all(line.as_bytes())?;
            }
        }
        *sink = Sink::Open(file, String::new());
        Ok(())
    }

    /// Appends `event` stamped now. Returns a warning to show the first time the log cannot be
    /// written (the build goes on: the log is a record, not a result).
    pub fn record(&self, event: &Event) -> Option<Event> {
        let mut text = line(&crate::state::now_rfc3339(), &self.run_id, event);
        text.push('\n');
        let mut sink = self.sink.borrow_mut();
        let result = match &mut *sink {
            Sink::Buffering(lines) => {
                lines.push(text);
                Ok(())
            }
            // One write per line: a killed `pipe` leaves whole lines (at most a torn last one
            // after a power cut, which readers skip). Lines saying a stage was skipped wait and
            // go out with the next other line (or at 64 KiB, or when the log closes): a no-op
            // build of 10,000 stages makes 3 writes instead of 20,000, and a kill loses at most
            // skip lines, like the audit log's batched `stages.skip` record.
            Sink::Open(file, pending) => {
                pending.push_str(&text);
                if is_skip(event) && pending.len() < SKIP_BATCH_BYTES {
                    Ok(())
                } else {
                    let result = file.write_all(pending.as_bytes());
                    pending.clear();
                    result
                }
            }
            Sink::Broken => Ok(()),
        };
        result.err().map(|err| {
            *sink = Sink::Broken;
            Event::Warning {
                message: format!(
                    "cannot write the run log {}: {err}; it is incomplete",
                    self.path.display()
                ),
            }
        })
    }

    /// Writes the pending skip lines.
    pub fn flush(&self) -> io::Result<()> {
        let mut sink = self.sink.borrow_mut();
        if let Sink::Open(file, pending) = &mut *sink {
            if !pending.is_empty() {
                let result = file.write_all(pending.as_bytes());
                pending.clear();
                if let Err(err) = result {
                    *sink = Sink::Broken;
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Makes the log durable (fsync of the file and its folder). Lines of a build that never
    /// opened its log (it stopped before) are dropped.
    pub fn close(&self) -> io::Result<()> {
        self.flush()?;
        if let Sink::Open(file, _) = &*self.sink.borrow() {
            file.sync_all()?;
            if let Some(dir) = self.path.parent() {
                crate::atomic::sync_dir(dir)?;
            }
        }
        Ok(())
    }
}

impl Drop for RunLog {
    /// A build that stopped with an error does not close its log: keep its skip lines anyway.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{RunStatus, StageStatus, Totals};

    fn parse(text: &str) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::from_str(text).unwrap() {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn a_line_is_one_flat_object_with_ts_run_id_and_event() {
        let text = line(
            "2026-01-01T00:00:00.000Z",
            "r1",
            &Event::StageFinished {
                stage: "copy".into(),
                status: StageStatus::Succeeded,
                duration_ms: 12,
                reason: "first run".into(),
            },
        );
        assert!(!text.contains('\n'));
        assert!(
            text.starts_with(
                r#"{"ts":"2026-01-01T00:00:00.000Z","runId":"r1","event":"stageFinished","#
            ),
            "{text}"
        );
        let obj = parse(&text);
        assert_eq!(obj["stage"], "copy");
        assert_eq!(obj["status"], "succeeded");
        assert_eq!(obj["durationMs"], 12);
    }

    #[test]
    fn stage_lines_written_directly_are_the_bytes_serde_writes() {
        let awkward = ["copy", "q\"uo\\te", "tab\tnl\n\u{1}", "straße ✓", ""];
        let statuses = [
            StageStatus::Skipped,
            StageStatus::Running,
            StageStatus::Succeeded,
            StageStatus::Resumed,
            StageStatus::Restored,
            StageStatus::Failed,
            StageStatus::NotRun,
            StageStatus::Interrupted,
        ];
        let mut events = Vec::new();
        for text in awkward {
            events.push(Event::StagePlanned {
                stage: text.into(),
                summary: format!("skip {text}"),
                decision: crate::plan::Decision::Skip,
            });
            for (i, status) in statuses.into_iter().enumerate() {
                events.push(Event::StageFinished {
                    stage: text.into(),
                    status,
                    duration_ms: [0, 1, u64::MAX][i % 3],
                    reason: format!("because {text}"),
                });
            }
        }
        for event in &events {
            for (ts, run_id) in [("2026-01-01T00:00:00.000Z", "r1"), ("t\"", "r\\")] {
                assert_eq!(
                    line(ts, run_id, event),
                    serde_line(ts, run_id, event),
                    "{event:?}"
                );
            }
        }
    }

    #[test]
    fn run_events_carry_run_id_once() {
        let text = line(
            "t",
            "r1",
            &Event::RunFinished {
                run_id: "r1".into(),
                status: RunStatus::Succeeded,
                duration_ms: 5,
                totals: Totals::default(),
            },
        );
        assert_eq!(text.matches("\"runId\"").count(), 1, "{text}");
        assert_eq!(parse(&text)["totals"]["ran"], 0);
    }

    #[test]
    fn lines_before_open_are_kept_and_the_file_is_one_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join("run_r1.jsonl");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "stale\n").unwrap();
        let log = RunLog::new(path.clone(), "r1");
        let warning = Event::Warning {
            message: "waiting".into(),
        };
        assert_eq!(log.record(&warning), None);
        log.open().unwrap();
        assert_eq!(log.record(&warning), None);
        log.close().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        for l in lines {
            let obj = parse(l);
            assert_eq!(obj["event"], "warning");
            assert_eq!(obj["runId"], "r1");
        }
    }

    #[test]
    fn skip_lines_wait_for_the_next_other_line_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run_r1.jsonl");
        let log = RunLog::new(path.clone(), "r1");
        log.open().unwrap();
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        let planned = |stage: &str| Event::StagePlanned {
            stage: stage.into(),
            summary: "skip (unchanged)".into(),
            decision: crate::plan::Decision::Skip,
        };
        let skipped = |stage: &str| Event::StageFinished {
            stage: stage.into(),
            status: StageStatus::Skipped,
            duration_ms: 0,
            reason: "unchanged".into(),
        };
        for stage in ["a", "b"] {
            assert_eq!(log.record(&planned(stage)), None);
            assert_eq!(log.record(&skipped(stage)), None);
        }
        assert_eq!(lines(), 0, "skip lines are held");
        log.record(&Event::Warning {
            message: "w".into(),
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let order: Vec<(String, String)> = text
            .lines()
            .map(|l| {
                let obj = parse(l);
                let stage = obj.get("stage").and_then(|s| s.as_str()).unwrap_or("");
                (
                    obj["event"].as_str().unwrap().to_string(),
                    stage.to_string(),
                )
            })
            .collect();
        let expect = |e: &str, s: &str| (e.to_string(), s.to_string());
        assert_eq!(
            order,
            vec![
                expect("stagePlanned", "a"),
                expect("stageFinished", "a"),
                expect("stagePlanned", "b"),
                expect("stageFinished", "b"),
                expect("warning", ""),
            ]
        );
        // Held lines also go out when the log is closed, and when it is dropped.
        log.record(&skipped("c"));
        log.close().unwrap();
        assert_eq!(lines(), 6);
        log.record(&skipped("d"));
        drop(log);
        assert_eq!(lines(), 7);
    }

    #[test]
    fn a_log_that_cannot_be_written_warns_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::new(dir.path().join("run_r1.jsonl"), "r1");
        log.open().unwrap();
        *log.sink.borrow_mut() = Sink::Open(File::open(dir.path()).unwrap(), String::new());
        let event = Event::Warning {
            message: "x".into(),
        };
        assert!(matches!(log.record(&event), Some(Event::Warning { .. })));
        assert_eq!(log.record(&event), None);
    }
}
