//! What an attempt's descriptors say, read on the attempt's own thread with one `poll`.
//!
//! A running attempt has up to four sources: the progress pipe (checkpoint lines), the helper's
//! report channel (which sandbox layers it applied, and the seccomp listener attached to the
//! first report), the listener itself (a processor's network attempt, to be answered at once),
//! and the processor's end (from the spawn server's ends reader, or a `wait4` thread). They used
//! to be read by two helper threads per attempt that forwarded messages to the attempt's thread:
//! in a build of many short stages those hand-offs were most of the build's thread wake-ups.
//! Here one `poll` over all of them wakes the attempt's thread once for whatever is ready.
//!
//! [`Watch::wait`] returns the events in the order that keeps their meaning: reports, then
//! network attempts, then checkpoint lines (with the pipe's end), then the processor's end, so a
//! checkpoint written just before the processor exited is seen while it runs.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipe_processors::checkpoint::Checkpoint;
use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, Signal};

use crate::sandbox::helper::Report;
use crate::sandbox::zygote::Exit;
use crate::sandbox::{channel, seccomp, Violation};

/// Longest checkpoint line accepted, newline included.
pub const MAX_LINE: usize = 4096;
/// Reads of the progress pipe per wake-up at most, so that a processor writing without pause
/// cannot keep the attempt's thread from its clocks.
const READS_PER_WAKE: usize = 16;

/// Something an attempt's descriptors said.
#[derive(Debug)]
pub enum Event {
    Line(Result<Checkpoint, String>),
    /// The progress pipe closed.
    Eof,
    Report(Report),
    /// A network attempt, already denied and its process killed.
    Violation(Violation),
    Exited(Exit),
}

/// Where the processor's end is told: whoever learns it (the spawn server's ends reader, or a
/// `wait4` thread) calls [`ExitSender::send`], which wakes the attempt's `poll`.
pub struct ExitSender {
    slot: Arc<Mutex<Option<Exit>>>,
    /// Closing it is the wake-up.
    wake: OwnedFd,
}

impl ExitSender {
    /// Tells the end (`None`: nobody can tell it any more, so the processor counts as killed).
    pub fn send(self, exit: Option<Exit>) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(exit.unwrap_or_else(Exit::killed));
        drop(self.wake);
    }
}

/// An attempt's descriptors, and what is half-read from them.
pub struct Watch {
    progress: Option<OwnedFd>,
    /// Bytes of a checkpoint line whose newline has not come yet.
    partial: Vec<u8>,
    /// A line was too long or the pipe broke: the rest is read and dropped.
    discarding: bool,
    report: Option<OwnedFd>,
    listener: Option<OwnedFd>,
    exit: Option<OwnedFd>,
    slot: Arc<Mutex<Option<Exit>>>,
    buf: Vec<u8>,
}

impl Watch {
    /// Watches `progress` (the pipe's read end) and `report` (the engine's end of the helper's
    /// channel). The processor's end is watched once [`Watch::exit_sender`] made its sender.
    pub fn new(progress: OwnedFd, report: OwnedFd) -> io::Result<Watch> {
        rustix::io::ioctl_fionbio(&progress, true)?;
        Ok(Watch {
            progress: Some(progress),
            partial: Vec::new(),
            discarding: false,
            report: Some(report),
            listener: None,
            exit: None,
            slot: Arc::new(Mutex::new(None)),
            buf: vec![0u8; channel::MAX_MESSAGE],
        })
    }

    /// What tells this watch the processor's end. A new one replaces the last (whose
    /// start failed: dropping it untold would have counted as an end).
    pub fn exit_sender(&mut self) -> io::Result<ExitSender> {
        let (exit, wake) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        self.exit = Some(exit);
        self.slot = Arc::new(Mutex::new(None));
        Ok(ExitSender {
            slot: Arc::clone(&self.slot),
            wake,
        })
    }

    /// Whether the progress pipe is still open.
    pub fn progress_open(&self) -> bool {
        self.progress.is_some()
    }

    /// Waits up to `timeout` for any descriptor to be ready and appends what they said to
    /// `events`; returns whether any was ready.
    pub fn wait(&mut self, timeout: Duration, events: &mut Vec<Event>) -> io::Result<bool> {
        let timeout = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let sources = [&self.report, &self.listener, &self.progress, &self.exit];
        let mut fds: Vec<PollFd<'_>> = sources
            .iter()
            .filter_map(|fd| fd.as_ref().map(|fd| PollFd::new(fd, PollFlags::IN)))
            .collect();
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(false),
            Err(err) => return Err(err.into()),
        }
        let mut ready = [PollFlags::empty(); 4];
        let mut next = fds.iter().map(PollFd::revents);
        for (flags, source) in ready.iter_mut().zip(sources) {
            if source.is_some() {
                *flags = next.next().unwrap_or(PollFlags::empty());
            }
        }
        drop(fds);
        let [report, listener, progress, exit] = ready;
        if !report.is_empty() {
            self.read_report(events);
        }
        if !listener.is_empty() {
            self.answer_listener(listener, events);
        }
        if !progress.is_empty() {
            self.read_progress(events);
        }
        if !exit.is_empty() {
            // The sender closed its end: the end is in the slot (or it was dropped untold).
            self.exit = None;
            let told = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            events.push(Event::Exited(told.unwrap_or_else(Exit::killed)));
        }
        Ok(ready.iter().any(|flags| !flags.is_empty()))
    }

    /// One report message (the first may carry the listener); the channel's end closes it.
    fn read_report(&mut self, events: &mut Vec<Event>) {
        let Some(fd) = &self.report else { return };
        match channel::recv(fd.as_fd(), &mut self.buf) {
            Ok(Some((n, fd))) => {
                if fd.is_some() {
                    self.listener = fd;
                }
                if let Ok(report) = serde_json::from_slice::<Report>(&self.buf[..n]) {
                    events.push(Event::Report(report));
                }
            }
            _ => self.report = None,
        }
    }

    /// Answers one network attempt: the offender is killed (while it is still blocked in the
    /// call, so the pid is still its own) and the call denied.
    fn answer_listener(&mut self, flags: PollFlags, events: &mut Vec<Event>) {
        let Some(fd) = &self.listener else { return };
        if !flags.contains(PollFlags::IN) {
            // Hung up: no process uses the filter any more (reading would block).
            self.listener = None;
            return;
        }
        match seccomp::receive(fd) {
            Ok(Some(n)) => {
                let command = command_of(n.pid);
                if seccomp::still_pending(fd, n.id) {
                    let _ = rustix::process::kill_process(
                        Pid::from_raw(n.pid as i32).expect("pid is positive"),
                        Signal::KILL,
                    );
                }
                seccomp::deny(fd, n.id, libc::EPERM);
                events.push(Event::Violation(Violation {
                    call: format!(
                        "{}({}, {})",
                        n.syscall,
                        seccomp::family_name(n.family),
                        seccomp::type_name(n.sock_type)
                    ),
                    pid: Some(n.pid),
                    command,
                }));
            }
            Ok(None) => {}
            // No more users of the filter, or the listener broke: nothing more to hear.
            Err(_) => self.listener = None,
        }
    }

    /// Reads what the progress pipe has (a few reads at most) and turns whole lines into events.
    fn read_progress(&mut self, events: &mut Vec<Event>) {
        for _ in 0..READS_PER_WAKE {
            let Some(fd) = &self.progress else { return };
            match rustix::io::read(fd, &mut self.buf) {
                Ok(0) => {
                    if !self.partial.is_empty() && !self.discarding {
                        events.push(Event::Line(Err(
                            "checkpoint line cut short (no final newline)".into(),
                        )));
                    }
                    self.progress = None;
                    events.push(Event::Eof);
                    return;
                }
                Ok(n) => {
                    if !self.discarding {
                        let bytes = std::mem::take(&mut self.buf);
                        self.split_lines(&bytes[..n], events);
                        self.buf = bytes;
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR) => {}
                Err(err) => {
                    events.push(Event::Line(Err(format!(
                        "reading the progress pipe: {err}"
                    ))));
                    self.progress = None;
                    events.push(Event::Eof);
                    return;
                }
            }
        }
    }

    fn split_lines(&mut self, mut bytes: &[u8], events: &mut Vec<Event>) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = bytes.split_at(end + 1);
            bytes = rest;
            if self.partial.len() + line.len() > MAX_LINE {
                return self.too_long(events);
            }
            let parsed = if self.partial.is_empty() {
                parse_line(line)
            } else {
                self.partial.extend_from_slice(line);
                let parsed = parse_line(&self.partial);
                self.partial.clear();
                parsed
            };
            events.push(Event::Line(parsed));
        }
        if self.partial.len() + bytes.len() > MAX_LINE {
            return self.too_long(events);
        }
        self.partial.extend_from_slice(bytes);
    }

    /// A line over [`MAX_LINE`]: an error, and the rest of the pipe is drained unread (so the
    /// processor is not blocked on a full pipe until it is killed).
    fn too_long(&mut self, events: &mut Vec<Event>) {
        events.push(Event::Line(Err(format!(
            "checkpoint line longer than {MAX_LINE} bytes"
        ))));
        self.partial.clear();
        self.discarding = true;
    }
}

fn parse_line(line: &[u8]) -> Result<Checkpoint, String> {
    std::str::from_utf8(line)
        .map_err(|_| "checkpoint line is not UTF-8".to_string())
        .and_then(|text| {
            Checkpoint::parse(text)
                .map_err(|err| format!("malformed checkpoint line {:?}: {err}", text.trim_end()))
        })
}

/// The command line of process `pid`, as far as `/proc` tells it (at most 200 characters).
fn command_of(pid: u32) -> String {
    let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return String::new();
    };
    let words: Vec<OsString> = bytes
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| OsStr::from_bytes(w).to_os_string())
        .collect();
    crate::executor::join_argv(&words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn watched() -> (Watch, ExitSender, std::fs::File, OwnedFd) {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        let (report, helper_end) = channel::pair().unwrap();
        let mut watch = Watch::new(reader, report).unwrap();
        let sender = watch.exit_sender().unwrap();
        (watch, sender, std::fs::File::from(writer), helper_end)
    }

    /// Waits until the pipe's end or an exit was seen, collecting every event.
    fn drain(watch: &mut Watch) -> Vec<Event> {
        let mut events = Vec::new();
        while !events
            .iter()
            .any(|e| matches!(e, Event::Eof | Event::Exited(_)))
        {
            watch.wait(Duration::from_secs(5), &mut events).unwrap();
        }
        events
    }

    fn lines(events: &[Event]) -> Vec<Result<u64, String>> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Line(l) => Some(l.clone().map(|cp| cp.line_offset)),
                _ => None,
            })
            .collect()
    }

    fn cp(line: u64) -> String {
        format!(
            "{{\"inputIndex\":0,\"lineOffset\":{line},\"byteOffset\":{line},\"outputBytes\":0}}\n"
        )
    }

    #[test]
    fn lines_split_across_writes_are_joined_and_each_is_parsed_in_order() {
        let (mut watch, _exit, mut pipe, _helper) = watched();
        let text = format!("{}{}{}", cp(1), cp(2), cp(3));
        let (a, b) = text.as_bytes().split_at(text.len() / 2 + 3);
        pipe.write_all(a).unwrap();
        let mut events = Vec::new();
        watch.wait(Duration::from_secs(5), &mut events).unwrap();
        pipe.write_all(b).unwrap();
        drop(pipe);
        events.extend(drain(&mut watch));
        assert_eq!(lines(&events), vec![Ok(1), Ok(2), Ok(3)]);
        assert!(matches!(events.last(), Some(Event::Eof)));
        assert!(!watch.progress_open());
    }

    #[test]
    fn a_bad_line_a_line_cut_short_and_a_line_too_long_are_errors() {
        let (mut watch, _exit, mut pipe, _helper) = watched();
        pipe.write_all(format!("not json\n{}", cp(5)).as_bytes())
            .unwrap();
        pipe.write_all(b"{\"inputIndex\":0").unwrap();
        drop(pipe);
        let got = lines(&drain(&mut watch));
        assert!(got[0]
            .as_ref()
            .unwrap_err()
            .starts_with("malformed checkpoint line"));
        assert_eq!(got[1], Ok(5));
        assert_eq!(
            got[2],
            Err("checkpoint line cut short (no final newline)".into())
        );

        let (mut watch, _exit, mut pipe, _helper) = watched();
        // Exactly MAX_LINE bytes with the newline is accepted; one more is not, and nothing after
        // it is read as a line, not even a good one.
        let padded = format!(
            "{}{}\n",
            cp(7).trim_end(),
            " ".repeat(MAX_LINE - cp(7).len())
        );
        assert_eq!(padded.len(), MAX_LINE);
        let writer = std::thread::spawn(move || {
            pipe.write_all(padded.as_bytes()).unwrap();
            pipe.write_all(&vec![b'x'; 100_000]).unwrap();
            pipe.write_all(b"\n").unwrap();
            pipe.write_all(cp(8).as_bytes()).unwrap();
        });
        let got = lines(&drain(&mut watch));
        writer.join().unwrap();
        assert_eq!(
            got,
            vec![
                Ok(7),
                Err(format!("checkpoint line longer than {MAX_LINE} bytes"))
            ]
        );
    }

    #[test]
    fn non_utf8_is_an_error() {
        let (mut watch, _exit, mut pipe, _helper) = watched();
        pipe.write_all(b"\xff\xfe\n").unwrap();
        drop(pipe);
        assert_eq!(
            lines(&drain(&mut watch)),
            vec![Err("checkpoint line is not UTF-8".into())]
        );
    }

    #[test]
    fn reports_come_before_lines_and_the_end_comes_last() {
        let (mut watch, exit, mut pipe, helper) = watched();
        let told = Exit {
            status: 3 << 8,
            user_us: 1,
            sys_us: 2,
            max_rss_kb: 4,
        };
        // All three are ready before the one wait that sees them.
        pipe.write_all(cp(9).as_bytes()).unwrap();
        channel::send(helper.as_fd(), br#"{"peakRssKb":12}"#, None).unwrap();
        exit.send(Some(told));
        let mut events = Vec::new();
        assert!(watch.wait(Duration::from_secs(5), &mut events).unwrap());
        match &events[..] {
            [Event::Report(r), Event::Line(Ok(cp)), Event::Exited(e)] => {
                assert_eq!(r.peak_rss_kb, Some(12));
                assert_eq!(cp.line_offset, 9);
                assert_eq!(e, &told);
            }
            other => panic!("unexpected events {other:?}"),
        }
        // Nothing is ready any more: the wait times out with no event.
        events.clear();
        assert!(!watch.wait(Duration::from_millis(1), &mut events).unwrap());
        assert!(events.is_empty());
    }

    #[test]
    fn an_end_never_told_counts_as_killed_and_a_replaced_sender_is_not_heard() {
        let (mut watch, exit, _pipe, _helper) = watched();
        drop(exit);
        let events = drain(&mut watch);
        assert!(matches!(&events[..], [Event::Exited(e)] if e == &Exit::killed()));

        let (mut watch, first, _pipe, _helper) = watched();
        let second = watch.exit_sender().unwrap();
        drop(first);
        let mut events = Vec::new();
        assert!(!watch.wait(Duration::from_millis(1), &mut events).unwrap());
        second.send(Some(Exit::killed()));
        assert!(matches!(&drain(&mut watch)[..], [Event::Exited(_)]));
    }
}
