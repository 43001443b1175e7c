//! Terminal lines written in batches, by a thread of their own.
//!
//! A build prints a line per stage (`u000123: skip (unchanged)`), and stderr is unbuffered: a
//! no-op build of 10,000 stages made 20,000 `write` calls for them, an eighth of its time with
//! stderr going to a file. Buffering them on the coordinator's thread would hold a line back while
//! that thread waits for a running stage, so they are queued for a writer thread instead. Woken by
//! the first line queued, it waits [`GATHER`] for more and writes them all at once: a line is on
//! screen at most that much later, and a no-op build writes a few dozen times.
//!
//! Lines keep their order, also across the two streams (`2>&1` shows them as printed): a write
//! ends where the stream changes.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Which standard stream a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

/// How long the writer gathers lines after the first one it is woken for.
const GATHER: Duration = Duration::from_millis(5);

/// Lines queued and not yet written, as runs of one stream each, in order.
#[derive(Default)]
struct Queue {
    runs: Vec<(Stream, Vec<u8>)>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when the queue stops being empty, and when it is closed.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, stream: Stream, line: &str) {
        let mut queue = self.lock();
        let was_empty = queue.runs.is_empty();
        match queue.runs.last_mut() {
            Some((last, bytes)) if *last == stream => {
                bytes.extend_from_slice(line.as_bytes());
                bytes.push(b'\n');
            }
            _ => {
                let mut bytes = Vec::with_capacity(line.len() + 1);
                bytes.extend_from_slice(line.as_bytes());
                bytes.push(b'\n');
                queue.runs.push((stream, bytes));
            }
        }
        drop(queue);
        if was_empty {
            self.changed.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_one();
    }
}

/// The writer thread; dropping it writes what is queued and waits for the thread.
pub(super) struct Lines {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

impl Lines {
    /// Starts the writer thread; `None` if no thread can be started (lines are then written
    /// one by one).
    pub(super) fn start() -> Option<Lines> {
        let shared = Arc::new(Shared::default());
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("pipe-output".into())
                .spawn(move || write_queued(&shared, &mut io::stdout(), &mut io::stderr()))
                .ok()?
        };
        Some(Lines {
            shared,
            writer: Some(writer),
        })
    }

    /// Queues `line` (without its newline) for `stream`.
    pub(super) fn send(&self, stream: Stream, line: &str) {
        self.shared.push(stream, line);
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Writes the queued lines until the queue is closed and empty: each run of one stream's lines
/// in one `write_all` (a closed stream is ignored, as `writeln!` on it was).
fn write_queued(shared: &Shared, stdout: &mut dyn Write, stderr: &mut dyn Write) {
    let mut queue = shared.lock();
    loop {
        while queue.runs.is_empty() && !queue.closed {
            queue = shared
                .changed
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if queue.runs.is_empty() {
            return;
        }
        if !queue.closed {
            // Woken early only by `close`: lines queued meanwhile find the queue not empty.
            queue = shared
                .changed
                .wait_timeout(queue, GATHER)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let runs = std::mem::take(&mut queue.runs);
        drop(queue);
        for (stream, bytes) in runs {
            let out: &mut dyn Write = match stream {
                Stream::Stdout => stdout,
                Stream::Stderr => stderr,
            };
            let _ = out.write_all(&bytes).and_then(|()| out.flush());
        }
        queue = shared.lock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that records each `write` call.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn queued_lines_are_written_together_in_order_and_split_where_the_stream_changes() {
        let shared = Shared::default();
        for i in 0..3 {
            shared.push(Stream::Stderr, &format!("e{i}"));
        }
        shared.push(Stream::Stdout, "o0");
        shared.push(Stream::Stderr, "e3");
        shared.close();
        let (mut stdout, mut stderr) = (Calls::default(), Calls::default());
        write_queued(&shared, &mut stdout, &mut stderr);
        assert_eq!(stderr.0, vec![b"e0\ne1\ne2\n".to_vec(), b"e3\n".to_vec()]);
        assert_eq!(stdout.0, vec![b"o0\n".to_vec()]);
    }

    #[test]
    fn lines_sent_from_another_thread_are_all_written_before_the_writer_ends() {
        let shared = Arc::new(Shared::default());
        let sender = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for i in 0..10_000 {
                    shared.push(Stream::Stdout, &format!("line {i}"));
                }
                shared.close();
            })
        };
        let (mut stdout, mut stderr) = (Calls::default(), Calls::default());
        write_queued(&shared, &mut stdout, &mut stderr);
        sender.join().unwrap();
        let expected: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(stdout.0.concat(), expected.into_bytes());
        assert!(
            stdout.0.len() < 10_000,
            "{} writes: nothing was batched",
            stdout.0.len()
        );
        assert!(stderr.0.is_empty());
    }
}
