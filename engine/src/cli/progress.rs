//! The live progress display of `pipe build` on a terminal (indicatif), part of the CLI's
//! rendering: stages done / total with the run's elapsed time, and one line per running stage
//! with its elapsed time and the lines / bytes its checkpoints report. Event lines scroll above
//! it; the display is cleared before the final summary line.
//!
//! Used only when stderr is a terminal, the output is human and not `-q`; otherwise the CLI prints
//! plain lines.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{
    HumanBytes, HumanCount, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike,
};

use crate::event::Event;

/// How often the elapsed times are redrawn without an event.
const TICK: Duration = Duration::from_millis(200);

/// A stage on screen while it runs.
struct Running {
    bar: ProgressBar,
    attempt: u32,
    /// Input index → (lines, bytes) read, from the last checkpoint of that input.
    progress: BTreeMap<u64, (u64, u64)>,
    note: Option<String>,
}

impl Running {
    fn message(&self) -> String {
        let (lines, bytes) = self
            .progress
            .values()
            .fold((0, 0), |(l, b), (dl, db)| (l + dl, b + db));
        let mut parts = Vec::new();
        if self.attempt > 1 {
            parts.push(format!("attempt {}", self.attempt));
        }
        if !self.progress.is_empty() {
            parts.push(format!("{} lines", HumanCount(lines)));
            parts.push(format!("{} read", HumanBytes(bytes)));
        }
        if let Some(note) = &self.note {
            parts.push(note.clone());
        }
        parts.join(" · ")
    }
}

/// The live display of one build.
pub(super) struct Live {
    multi: MultiProgress,
    overall: Option<ProgressBar>,
    running: BTreeMap<String, Running>,
    finished: bool,
}

impl Live {
    pub(super) fn new() -> Live {
        let stderr = Box::new(Stderr::new());
        Live {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::term_like_with_hz(
                stderr, 10,
            )),
            overall: None,
            running: BTreeMap::new(),
            finished: false,
        }
    }

    /// Updates the display for `event` (the caller prints the event's line with [`Live::println`]).
    pub(super) fn update(&mut self, event: &Event) {
        match event {
            Event::RunStarted { run_id, stages, .. } => {
                let bar = ProgressBar::new(*stages as u64)
                    .with_style(overall_style())
                    .with_prefix(format!("run {run_id}"));
                let bar = self.multi.add(bar);
                bar.enable_steady_tick(TICK);
                self.overall = Some(bar);
            }
            Event::StageStarted { stage, attempt } => {
                if let Some(running) = self.running.get_mut(stage) {
                    running.attempt = *attempt;
                    running.note = None;
                } else {
                    let bar = ProgressBar::new_spinner()
                        .with_style(stage_style())
                        .with_prefix(stage.clone());
                    let bar = match &self.overall {
                        Some(overall) => self.multi.insert_before(overall, bar),
                        None => self.multi.add(bar),
                    };
                    bar.enable_steady_tick(TICK);
                    self.running.insert(
                        stage.clone(),
                        Running {
                            bar,
                            attempt: *attempt,
                            progress: BTreeMap::new(),
                            note: None,
                        },
                    );
                }
            }
            Event::Checkpoint {
                stage,
                input_index,
                line_offset,
                byte_offset,
            } => {
                if let Some(running) = self.running.get_mut(stage) {
                    running
                        .progress
                        .insert(*input_index, (*line_offset, *byte_offset));
                    running.note = None;
                }
            }
            Event::AttemptFailed {
                stage, retry_in_ms, ..
            } => {
                if let Some(running) = self.running.get_mut(stage) {
                    running.note = retry_in_ms.map(|ms| format!("retrying in {ms} ms"));
                }
            }
            Event::StageFinished { stage, .. } => {
                if let Some(running) = self.running.remove(stage) {
                    running.bar.finish_and_clear();
                    self.multi.remove(&running.bar);
                }
                if let Some(overall) = &self.overall {
                    overall.inc(1);
                }
            }
            Event::RunFinished { .. } => self.clear(),
            _ => {}
        }
        for running in self.running.values() {
            running.bar.set_message(running.message());
        }
        if let Some(overall) = &self.overall {
            let names: Vec<&str> = self.running.keys().map(String::as_str).collect();
            overall.set_message(match names.len() {
                0 => String::new(),
                n => format!("{n} running"),
            });
        }
    }

    /// Prints a line above the display (or plainly once it is cleared).
    pub(super) fn println(&self, line: &str) {
        if self.finished || self.multi.println(line).is_err() {
            eprintln!("{line}");
        }
    }

    /// Removes the display from the screen; later lines print plainly.
    pub(super) fn clear(&mut self) {
        if self.finished {
            return;
        }
        for running in std::mem::take(&mut self.running).into_values() {
            running.bar.finish_and_clear();
        }
        if let Some(overall) = self.overall.take() {
            overall.finish_and_clear();
        }
        let _ = self.multi.clear();
        self.finished = true;
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Whether the terminal can show the live display (`TERM=dumb` cannot move the cursor).
pub(super) fn supported() -> bool {
    std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// stderr for indicatif, keeping the cursor off the last column between redraws.
///
/// indicatif ends every line with spaces up to the terminal's width and relies on the terminal
/// wrapping to reach the next line, so after a redraw the cursor rests past the last column.
/// A character the terminal echoes there (the `^C` of Ctrl-C) wraps to a new line, the next
/// redraw starts one line too low, and a stale line stays on screen. So the padding of the last
/// line of a redraw (the one followed by `flush`) stops two columns short and erases the rest of
/// the line instead (`ESC [K`): an echoed `^C` then stays on that line, which the next redraw
/// clears.
#[derive(Debug)]
struct Stderr {
    term: console::Term,
    /// Padding spaces written by indicatif and not yet passed on.
    padding: AtomicUsize,
}

impl Stderr {
    fn new() -> Stderr {
        Stderr {
            term: console::Term::stderr(),
            padding: AtomicUsize::new(0),
        }
    }

    /// Passes on held padding in full (more output follows on the next line).
    fn settle(&self) -> io::Result<()> {
        match self.padding.swap(0, Ordering::Relaxed) {
            0 => Ok(()),
            n => self.term.write_str(&" ".repeat(n)),
        }
    }
}

impl TermLike for Stderr {
    fn width(&self) -> u16 {
        self.term.size().1
    }

    fn height(&self) -> u16 {
        self.term.size().0
    }

    fn move_cursor_up(&self, n: usize) -> io::Result<()> {
        self.settle()?;
        self.term.move_cursor_up(n)
    }

    fn move_cursor_down(&self, n: usize) -> io::Result<()> {
        self.settle()?;
        self.term.move_cursor_down(n)
    }

    fn move_cursor_right(&self, n: usize) -> io::Result<()> {
        self.settle()?;
        self.term.move_cursor_right(n)
    }

    fn move_cursor_left(&self, n: usize) -> io::Result<()> {
        self.settle()?;
        self.term.move_cursor_left(n)
    }

    fn write_line(&self, s: &str) -> io::Result<()> {
        self.settle()?;
        self.term.write_line(s)
    }

    fn write_str(&self, s: &str) -> io::Result<()> {
        self.settle()?;
        if !s.is_empty() && s.bytes().all(|b| b == b' ') {
            self.padding.store(s.len(), Ordering::Relaxed);
            return Ok(());
        }
        self.term.write_str(s)
    }

    fn clear_line(&self) -> io::Result<()> {
        self.settle()?;
        self.term.clear_line()
    }

    fn flush(&self) -> io::Result<()> {
        match self.padding.swap(0, Ordering::Relaxed) {
            0 => {}
            n if n > 2 => self
                .term
                .write_str(&format!("{}\x1b[K", " ".repeat(n - 2)))?,
            _ => self.term.write_str("\x1b[K")?,
        }
        self.term.flush()
    }
}

fn overall_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {prefix} [{bar:30}] {pos}/{len} stages done · {elapsed_precise} {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

fn stage_style() -> ProgressStyle {
    ProgressStyle::with_template("  {spinner} {prefix:16} {elapsed:>6}  {msg}")
        .expect("valid template")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_stage_shows_lines_and_bytes_summed_over_inputs() {
        let mut running = Running {
            bar: ProgressBar::hidden(),
            attempt: 1,
            progress: BTreeMap::new(),
            note: None,
        };
        assert_eq!(running.message(), "");
        running.progress.insert(0, (1000, 2048));
        running.progress.insert(1, (234, 0));
        running.attempt = 2;
        running.note = Some("retrying in 5 ms".into());
        assert_eq!(
            running.message(),
            "attempt 2 · 1,234 lines · 2.00 KiB read · retrying in 5 ms"
        );
    }

    #[test]
    fn the_display_follows_the_build_and_clears_at_the_end() {
        let mut live = Live {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            overall: None,
            running: BTreeMap::new(),
            finished: false,
        };
        live.update(&Event::RunStarted {
            run_id: "r".into(),
            pipeline: "Pipefile.json".into(),
            stages: 2,
        });
        live.update(&Event::StageStarted {
            stage: "a".into(),
            attempt: 1,
        });
        live.update(&Event::Checkpoint {
            stage: "a".into(),
            input_index: 0,
            line_offset: 10,
            byte_offset: 100,
        });
        assert_eq!(live.running["a"].bar.message(), "10 lines · 100 B read");
        assert_eq!(live.overall.as_ref().unwrap().message(), "1 running");
        live.update(&Event::StageFinished {
            stage: "a".into(),
            status: crate::state::StageStatus::Succeeded,
            duration_ms: 1,
            reason: String::new(),
        });
        assert!(live.running.is_empty());
        assert_eq!(live.overall.as_ref().unwrap().position(), 1);
        live.update(&Event::RunFinished {
            run_id: "r".into(),
            status: crate::state::RunStatus::Succeeded,
            duration_ms: 1,
            totals: Default::default(),
        });
        assert!(live.finished && live.overall.is_none());
    }
}
