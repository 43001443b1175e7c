//! The Rust processor SDK: streaming, mirrored outputs, durable checkpoints, exactly-once resume.
//!
//! Why it exists: resuming a stage in the middle without losing or duplicating a line needs care at
//! every step (flush, fsync, then report; truncate, then seek, then continue), and each processor
//! author getting that right alone would be a bug farm. The SDK owns the loop; a processor supplies
//! a [`ChunkTransform`], a pure function from input bytes to output bytes.
//!
//! The loop runs on three threads. The calling thread reads each input into 1 MiB buffers, hands
//! the transform the part that ends on a line boundary (transformed in place, or into the `out`
//! buffer), and queues, per buffer, what to write and when to checkpoint: when the cadence says so
//! and the position is on a line boundary. A buffer goes to the writer thread when only a partial
//! line is left in it (that line moves to the front of the next buffer); the writer thread writes
//! the chunks to the mirrored output file in order and hands each checkpoint, once every byte it
//! covers is written, to the syncer thread, which fsyncs the output and only then writes one JSON
//! line on the progress pipe. So reading and transforming one buffer overlaps writing the one
//! before, and both overlap the fsyncs. A few buffers rotate between the threads (no allocation
//! per chunk): memory use is constant whatever the input size.
//!
//! The writer thread starts only when it pays: with more than one CPU available (the engine's
//! affinity for a one-CPU stage leaves one) and once the first 4 MiB show checkpoints at least
//! 2 MiB apart (with checkpoints closer together the fsyncs bound the run, and a writer thread
//! slowed them down). Until then the calling thread writes each buffer itself, through the same
//! code and in the same order.
//!
//! The cadence counts across inputs: the checkpoint at the end of an input waits for the next one
//! the cadence asks for (or the last input's), so one sync covers many small inputs.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint::{Cadence, Checkpoint};

/// Bytes read from an input at a time.
const CHUNK_BYTES: usize = 1 << 20;

/// Exit code for bad input data (sysexits `EX_DATAERR`).
pub const EXIT_DATA: i32 = 65;
/// Exit code for bad usage or params (sysexits `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for a transient failure worth retrying (sysexits `EX_TEMPFAIL`).
pub const EXIT_TEMPFAIL: i32 = 75;

/// Why a processor stopped; each kind maps to the exit code the engine classifies.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("{0}")]
    Usage(String),
    #[error("{}: {message} at byte offset {offset}", path.display())]
    Data {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    #[error("{what} `{}`: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ProcessorError {
    /// The process exit code for this error: usage 64, data 65, transient I/O 75, other I/O 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            ProcessorError::Usage(_) => EXIT_USAGE,
            ProcessorError::Data { .. } => EXIT_DATA,
            ProcessorError::Io { source, .. } if is_transient(source) => EXIT_TEMPFAIL,
            ProcessorError::Io { .. } => 1,
        }
    }

    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ProcessorError + 'a {
        move |source| ProcessorError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Errors a retry can cure: the resource was busy, not broken.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAGAIN | libc::EBUSY | libc::EINTR | libc::ETXTBSY)
    ) || err.kind() == io::ErrorKind::Interrupted
}

/// A deliberate crash for tests and demos (`PIPE_FAULT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL this process once this many lines were processed in this attempt.
    CrashAfterLines(u64),
}

impl Fault {
    fn parse(text: &str) -> Result<Fault, ProcessorError> {
        let bad = || {
            ProcessorError::Usage(format!(
                "PIPE_FAULT: expected `crash-after-lines:N`, found `{text}`"
            ))
        };
        let count = text.strip_prefix("crash-after-lines:").ok_or_else(bad)?;
        count.parse().map(Fault::CrashAfterLines).map_err(|_| bad())
    }
}

/// Everything a processor learns from its environment.
#[derive(Debug)]
pub struct Context {
    pub run_id: String,
    pub stage: String,
    pub attempt: u32,
    pub inputs: Vec<PathBuf>,
    pub input_root: PathBuf,
    pub output_dir: PathBuf,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub resume: Option<Checkpoint>,
    pub cadence: Cadence,
    pub fault: Option<Fault>,
    /// Test instrumentation (`PIPE_LINE_TALLY`): a file to which each checkpoint appends the
    /// number of lines handled since the previous one, so a test can add up the work done across
    /// killed attempts.
    pub line_tally: Option<PathBuf>,
    progress: Option<File>,
}

impl Context {
    /// Reads the context from this process's environment.
    pub fn from_env() -> Result<Context, ProcessorError> {
        Context::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the context through `var`, so tests can supply variables without touching the
    /// process environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Context, ProcessorError> {
        let required = |name: &str| {
            var(name).ok_or_else(|| {
                ProcessorError::Usage(format!(
                    "{name} is not set: run this processor through `pipe build`"
                ))
            })
        };
        let json = |name: &str, text: &str| -> Result<serde_json::Value, ProcessorError> {
            serde_json::from_str(text)
                .map_err(|err| ProcessorError::Usage(format!("{name} is not valid JSON: {err}")))
        };
        let inputs_json = match var("PIPELINE_INPUTS") {
            Some(text) => text,
            None => {
                let path = required("PIPELINE_INPUTS_FILE")?;
                std::fs::read_to_string(&path).map_err(ProcessorError::io(
                    "reading the input list",
                    Path::new(&path),
                ))?
            }
        };
        let inputs: Vec<PathBuf> = serde_json::from_value(json("PIPELINE_INPUTS", &inputs_json)?)
            .map_err(|err| {
            ProcessorError::Usage(format!("PIPELINE_INPUTS must be an array of paths: {err}"))
        })?;
        let params = match var("PIPELINE_PARAMS") {
            None => serde_json::Map::new(),
            Some(text) => match json("PIPELINE_PARAMS", &text)? {
                serde_json::Value::Object(map) => map,
                _ => {
                    return Err(ProcessorError::Usage(
                        "PIPELINE_PARAMS must be a JSON object".into(),
                    ))
                }
            },
        };
        let resume = match var("PIPELINE_RESUME") {
            None => None,
            Some(text) => Some(Checkpoint::parse(&text).map_err(|err| {
                ProcessorError::Usage(format!("PIPELINE_RESUME is not a valid checkpoint: {err}"))
            })?),
        };
        let cadence = match var("PIPELINE_CHECKPOINT") {
            None => Cadence::default(),
            Some(text) => serde_json::from_str(&text).map_err(|err| {
                ProcessorError::Usage(format!("PIPELINE_CHECKPOINT is not a valid cadence: {err}"))
            })?,
        };
        let progress = match var("PIPELINE_PROGRESS_FD") {
            None => None,
            Some(text) => {
                let fd: i32 = text.trim().parse().map_err(|_| {
                    ProcessorError::Usage(format!(
                        "PIPELINE_PROGRESS_FD must be a file descriptor number, found `{text}`"
                    ))
                })?;
                if fd <= 2 {
                    return Err(ProcessorError::Usage(format!(
                        "PIPELINE_PROGRESS_FD must be above 2, found {fd}"
                    )));
                }
                // SAFETY: the engine opened this descriptor for this process alone and named it in
                // PIPELINE_PROGRESS_FD; nothing else in the process uses it, so taking ownership is sound.
                Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
            }
        };
        Ok(Context {
            run_id: var("PIPELINE_RUN_ID").unwrap_or_default(),
            stage: var("PIPELINE_STAGE").unwrap_or_default(),
            attempt: var("PIPELINE_ATTEMPT")
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
            inputs,
            input_root: PathBuf::from(required("PIPELINE_INPUT_ROOT")?),
            output_dir: PathBuf::from(required("PIPELINE_OUTPUT_DIR")?),
            params,
            resume,
            cadence,
            fault: var("PIPE_FAULT").map(|f| Fault::parse(&f)).transpose()?,
            line_tally: var("PIPE_LINE_TALLY").map(PathBuf::from),
            progress,
        })
    }

    /// The output path that mirrors `input` under the staging dir.
    pub fn output_path(&self, input: &Path) -> Result<PathBuf, ProcessorError> {
        let relative = input.strip_prefix(&self.input_root).map_err(|_| {
            ProcessorError::Usage(format!(
                "input `{}` is not under PIPELINE_INPUT_ROOT `{}`",
                input.display(),
                self.input_root.display()
            ))
        })?;
        Ok(self.output_dir.join(relative))
    }
}

/// What a transform did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the chunk consumed (the rest is offered again with more data after it).
    pub consumed: usize,
    /// Where the output of the consumed bytes is.
    pub emit: Emit,
}

/// Where a transform put its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// In the chunk itself, transformed in place (same length).
    Chunk,
    /// In the `out` buffer.
    Buffer,
}

/// A data error inside a chunk; the SDK turns the offset into an absolute file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    pub offset_in_chunk: usize,
    pub message: String,
}

/// The processor author's part: bytes in, bytes out.
pub trait ChunkTransform {
    /// Transforms `chunk`, which ends on a line boundary unless it holds no newline at all (a line
    /// longer than the read buffer) or `eof` is set. Returns how much of it was consumed; an
    /// in-place transform must keep `\n` bytes where they are (lines are counted after it ran).
    fn apply(&mut self, chunk: &mut [u8], eof: bool, out: &mut Vec<u8>) -> Result<Step, DataError>;
}

/// What a run did, for the caller's own reporting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub lines: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub checkpoints: u64,
    /// Checkpoints handed to the syncer thread, each with the end-of-input checkpoints deferred
    /// before it (a group commit may still merge several into one sync).
    pub sync_requests: u64,
}

/// Reads the environment, runs `transform` over every input and returns the process exit code,
/// printing any error to stderr. The `main` of a processor in one call.
pub fn main_with<T: ChunkTransform>(
    make: impl FnOnce(&Context) -> Result<T, ProcessorError>,
) -> i32 {
    let mut ctx = match Context::from_env() {
        Ok(ctx) => ctx,
        Err(err) => {
            eprintln!("error: {err}");
            return err.exit_code();
        }
    };
    match make(&ctx).and_then(|mut transform| run(&mut ctx, &mut transform)) {
        Ok(_) => 0,
        Err(err) => {
            eprintln!("error: stage `{}`: {err}", ctx.stage);
            err.exit_code()
        }
    }
}

/// Runs `transform` over every input of `ctx`, resuming from `ctx.resume` when set.
pub fn run<T: ChunkTransform>(
    ctx: &mut Context,
    transform: &mut T,
) -> Result<Summary, ProcessorError> {
    run_writing(ctx, transform, Writing::Adaptive)
}

/// Whether the stage may use more than one CPU: the affinity and CPU quota the engine gives it
/// count here, and with one CPU a writer thread could overlap no work, only add thread switches.
/// Asked only once a writer thread would pay: the answer costs the cgroup's quota files (three
/// opens and reads), which a processor of a few small files would otherwise pay every attempt.
fn more_than_one_cpu() -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) > 1
}

/// Where the output is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// On the calling thread throughout (what [`Writing::Adaptive`] amounts to on one CPU; the
    /// tests compare the three).
    #[cfg(test)]
    Here,
    /// On a writer thread throughout.
    Thread,
    /// On the calling thread until [`writer_thread_pays`], then on a writer thread.
    Adaptive,
}

/// Whether a writer thread is worth starting, after `input_bytes` read and `checkpoints` taken:
/// once [`THREAD_AFTER_BYTES`] are read with checkpoints at least [`THREAD_CHECKPOINT_SPAN`]
/// apart on average.
///
/// Measured on 2 CPUs (1 GiB, unicode `upper`, checkpoints fsynced on ext4): against writing on
/// the calling thread, a writer thread took 0.85x the time with checkpoints every ~2 MB and 0.84x
/// every 64 MiB, but 0.98x every ~1 MB and 1.09x every ~0.5 MB. With checkpoints that close
/// together the fsyncs bound the run, and they took longer beside a writer thread.
fn writer_thread_pays(input_bytes: u64, checkpoints: u64) -> bool {
    input_bytes >= THREAD_AFTER_BYTES && input_bytes >= THREAD_CHECKPOINT_SPAN * checkpoints
}

/// See [`writer_thread_pays`].
const THREAD_AFTER_BYTES: u64 = 4 << 20;

/// See [`writer_thread_pays`].
const THREAD_CHECKPOINT_SPAN: u64 = 2 << 20;

/// [`run`], writing as `writing` says.
fn run_writing<T: ChunkTransform>(
    ctx: &mut Context,
    transform: &mut T,
    writing: Writing,
) -> Result<Summary, ProcessorError> {
    let start = ctx.resume.unwrap_or(Checkpoint::START);
    let first = usize::try_from(start.input_index).unwrap_or(usize::MAX);
    if ctx.resume.is_some()
        && first >= ctx.inputs.len().max(1)
        && !(first == 0 && ctx.inputs.is_empty())
    {
        return Err(ProcessorError::Data {
            path: PathBuf::from("PIPELINE_RESUME"),
            offset: 0,
            message: format!(
                "checkpoint names input {first} but the stage has {} inputs",
                ctx.inputs.len()
            ),
        });
    }
    let mut runner = Runner {
        cadence: ctx.cadence,
        fault: ctx.fault,
        untallied: 0,
        writer: Writer::start(
            Syncer::start(
                ctx.progress.take(),
                ctx.output_dir.clone(),
                ctx.line_tally.clone(),
            ),
            writing,
        ),
        summary: Summary::default(),
        lines_this_attempt: 0,
        out: Vec::new(),
        since: Since {
            lines: 0,
            bytes: 0,
            at: Instant::now(),
            files: 0,
        },
        deferred: Vec::new(),
    };
    let result = (|| {
        for index in first..ctx.inputs.len() {
            let position = if index == first {
                start
            } else {
                Checkpoint {
                    input_index: index as u64,
                    ..Checkpoint::START
                }
            };
            let input = ctx.inputs[index].clone();
            let output = ctx.output_path(&input)?;
            let last = index + 1 == ctx.inputs.len();
            runner.process_input(&input, &output, position, last, transform)?;
        }
        Ok(runner.summary)
    })();
    // Every byte queued is written and every checkpoint taken is durable and reported before the
    // run counts as done; the progress pipe closes with the syncer thread, which the writer thread
    // finishes.
    let written = runner.writer.finish();
    let summary = result?;
    written?;
    Ok(summary)
}

/// The state of one processor run across its inputs.
struct Runner {
    cadence: Cadence,
    fault: Option<Fault>,
    untallied: u64,
    writer: Writer,
    summary: Summary,
    lines_this_attempt: u64,
    /// The transform's `out` buffer: empty at every call; after an [`Emit::Buffer`] it goes to the
    /// writer thread with its batch and a recycled one takes its place.
    out: Vec<u8>,
    /// What has happened since the last checkpoint sent to the syncer, across inputs.
    since: Since,
    /// Checkpoints at the end of inputs that are waiting for the next due checkpoint (each with
    /// its line tally): a stage of many small inputs syncs once per cadence, not once per input.
    deferred: Vec<(Checkpoint, u64)>,
}

/// Input consumed since the last checkpoint sent to the syncer; the cadence counts it across
/// input boundaries.
struct Since {
    lines: u64,
    bytes: u64,
    at: Instant,
    /// Output files written to since then, the current one included.
    files: u32,
}

/// Where the current input stands.
struct Position {
    at: Checkpoint,
    dir_synced: bool,
    /// The bytes consumed so far end inside a line.
    unterminated: bool,
}

impl Runner {
    fn process_input<T: ChunkTransform>(
        &mut self,
        input: &Path,
        output: &Path,
        start: Checkpoint,
        last_input: bool,
        transform: &mut T,
    ) -> Result<(), ProcessorError> {
        let resuming = start
            != Checkpoint {
                input_index: start.input_index,
                ..Checkpoint::START
            };
        let mut source = File::open(input).map_err(ProcessorError::io("opening input", input))?;
        // Shared with the writer thread, which writes it, and the syncer thread, which fsyncs it
        // for each checkpoint (one descriptor: no `dup` per checkpoint).
        let sink = Arc::new(open_output(output, &start, resuming, input, &mut source)?);
        let mut pos = Position {
            at: start,
            dir_synced: resuming,
            unterminated: false,
        };
        self.since.files += 1;
        let mut batch = self.writer.take(&sink, output)?;
        let streamed = self.stream(
            &mut source,
            input,
            &mut pos,
            last_input,
            transform,
            &mut batch,
        );
        // Whatever happened, the writes and checkpoints queued before it go to the writer thread:
        // an error leaves the same durable progress as if this thread had written them itself.
        let sent = self.writer.send(batch);
        streamed.and(sent)
    }

    /// Reads, transforms and queues the writes and checkpoints of one input, from `pos`, into
    /// `batch` and the batches after it (each full one goes to the writer thread); the last one is
    /// left in `batch` for the caller to send.
    fn stream<T: ChunkTransform>(
        &mut self,
        source: &mut File,
        input: &Path,
        pos: &mut Position,
        last_input: bool,
        transform: &mut T,
        batch: &mut Batch,
    ) -> Result<(), ProcessorError> {
        // The bytes read and not yet consumed are `batch.buf[begin..filled]`. Chunks are
        // transformed where they were read; the buffer goes to the writer thread only when more
        // must be read behind its rest and that rest holds no whole line — a partial line, a few
        // bytes, which moves to the front of the next buffer. A chunk cut short by a line-count
        // checkpoint costs no copy of the rest of the buffer.
        let mut begin = 0usize;
        let mut filled = 0usize;
        let mut eof = false;
        let mut want_more = false;
        loop {
            if !eof
                && (want_more
                    || begin == filled
                    || memchr::memrchr(b'\n', &batch.buf[begin..filled]).is_none())
            {
                want_more = false;
                if begin > 0 {
                    if self.writer.adaptive
                        && writer_thread_pays(self.summary.input_bytes, self.summary.checkpoints)
                    {
                        if more_than_one_cpu() {
                            self.writer.go_threaded();
                        } else {
                            self.writer.adaptive = false;
                        }
                    }
                    let rest = filled - begin;
                    if self.writer.writes_here() {
                        // Everything before `begin` is written already: the rest moves to the
                        // front of this same buffer.
                        batch.buf.copy_within(begin..filled, 0);
                    } else {
                        let sink =
                            Arc::clone(batch.sink.as_ref().expect("a batch names its output"));
                        let mut next = self.writer.take(&sink, &batch.output)?;
                        next.buf[..rest].copy_from_slice(&batch.buf[begin..filled]);
                        self.writer.send(std::mem::replace(batch, next))?;
                    }
                    filled = rest;
                    begin = 0;
                }
                if filled < batch.buf.len() {
                    let n = read_retrying(source, &mut batch.buf[filled..])
                        .map_err(ProcessorError::io("reading input", input))?;
                    eof = n == 0;
                    filled += n;
                    if !eof
                        && filled < batch.buf.len()
                        && memchr::memrchr(b'\n', &batch.buf[..filled]).is_none()
                    {
                        continue;
                    }
                }
            }
            if filled == begin {
                break;
            }
            let (len, lines_to_end) = self.chunk_len(&batch.buf[begin..filled], eof);
            let end = begin + len;
            let last = eof && end == filled;
            let step = transform
                .apply(&mut batch.buf[begin..end], last, &mut self.out)
                .map_err(|err| ProcessorError::Data {
                    path: input.to_path_buf(),
                    offset: pos.at.byte_offset + err.offset_in_chunk as u64,
                    message: err.message,
                })?;
            if step.consumed == 0 {
                if last {
                    return Err(ProcessorError::Data {
                        path: input.to_path_buf(),
                        offset: pos.at.byte_offset,
                        message: "the input ends inside a character".into(),
                    });
                }
                want_more = true;
                continue;
            }
            let range = begin..begin + step.consumed;
            let consumed = &batch.buf[range.clone()];
            let lines = match lines_to_end {
                Some(lines) if range.end == end => lines,
                _ => memchr::memchr_iter(b'\n', consumed).count() as u64,
            };
            let on_boundary = consumed.last() == Some(&b'\n');
            let written = match step.emit {
                Emit::Chunk => {
                    self.out.clear();
                    batch.ops.push(Op::Chunk(range));
                    step.consumed
                }
                Emit::Buffer => {
                    let len = self.out.len();
                    let out = std::mem::replace(&mut self.out, self.writer.spare_out());
                    batch.ops.push(Op::Out(batch.outs.len()));
                    batch.outs.push(out);
                    len
                }
            } as u64;
            pos.at.output_bytes += written;
            pos.at.byte_offset += step.consumed as u64;
            pos.at.line_offset += lines;
            self.since.lines += lines;
            self.since.bytes += step.consumed as u64;
            self.summary.lines += lines;
            self.summary.input_bytes += step.consumed as u64;
            self.summary.output_bytes += written;
            self.lines_this_attempt += lines;
            self.untallied += lines;
            begin += step.consumed;
            if let Some(Fault::CrashAfterLines(n)) = self.fault {
                if self.lines_this_attempt >= n {
                    // Die with these lines' output written (not synced), as a crash right after
                    // the write would: once the writer thread has written everything queued.
                    self.writer.send(std::mem::take(batch))?;
                    self.writer.drain()?;
                    crate::failpoint::crash_now();
                }
            }
            if on_boundary && self.checkpoint_due() {
                self.checkpoint(batch, pos);
            }
            // Without a writer thread, each chunk is written and its checkpoint handed over at
            // once, as the single-threaded loop always did.
            self.writer.write_here(batch)?;
            pos.unterminated = !on_boundary;
        }
        // A last line without a newline is a line too (as in the Python SDK).
        if pos.unterminated {
            pos.at.line_offset += 1;
            self.summary.lines += 1;
            pos.unterminated = false;
        }
        // The checkpoint at the end of an input is always reported, but it waits for the next
        // one the cadence asks for (or the last input's): one sync then covers every input
        // finished in between.
        if last_input || self.checkpoint_due() || self.deferred.len() >= MAX_DEFERRED {
            self.checkpoint(batch, pos);
        } else {
            self.deferred
                .push((pos.at, std::mem::take(&mut self.untallied)));
            self.summary.checkpoints += 1;
        }
        Ok(())
    }

    /// How long the next chunk of `data` (the unconsumed bytes read) is: up to the last newline
    /// read, but short enough that a line-count checkpoint or an injected fault falls exactly on
    /// its line. When it was cut there, also the number of lines up to the end (the budget), so
    /// they are not counted twice.
    fn chunk_len(&self, data: &[u8], eof: bool) -> (usize, Option<u64>) {
        let mut end = if eof {
            data.len()
        } else {
            memchr::memrchr(b'\n', data).map_or(data.len(), |i| i + 1)
        };
        let mut budget = u64::MAX;
        if let Some(every) = self.cadence.every_lines {
            budget = budget.min(every.saturating_sub(self.since.lines).max(1));
        }
        if let Some(Fault::CrashAfterLines(n)) = self.fault {
            budget = budget.min(n.saturating_sub(self.lines_this_attempt).max(1));
        }
        let mut lines = None;
        if budget != u64::MAX {
            if let Some(nth_end) = nth_line_end(&data[..end], budget) {
                end = nth_end;
                lines = Some(budget);
            }
        }
        (end, lines)
    }

    fn checkpoint_due(&self) -> bool {
        let c = &self.cadence;
        c.every_lines.is_some_and(|n| self.since.lines >= n)
            || c.every_bytes.is_some_and(|n| self.since.bytes >= n)
            || c.every_seconds
                .is_some_and(|s| self.since.at.elapsed().as_secs_f64() >= s)
    }

    /// Takes a checkpoint at `pos`: queues it in `batch` after the writes it covers. The writer
    /// thread hands it to the syncer thread once they are written; the syncer fsyncs the output
    /// (shared, not duplicated) and only then reports the end-of-input checkpoints deferred
    /// before it and `pos`, in order. This thread goes on processing: the write and the fsync
    /// overlap the work instead of stalling it.
    fn checkpoint(&mut self, batch: &mut Batch, pos: &mut Position) {
        let mut checkpoints = std::mem::take(&mut self.deferred);
        checkpoints.push((pos.at, std::mem::take(&mut self.untallied)));
        let job = SyncJob {
            file: Arc::clone(batch.sink.as_ref().expect("a batch names its output")),
            output: batch.output.clone(),
            checkpoints,
            sync_dirs: !pos.dir_synced,
            spans_files: self.since.files > 1,
            weight: self.since.bytes.max(MIN_JOB_WEIGHT),
        };
        pos.dir_synced = true;
        batch.ops.push(Op::Checkpoint(job));
        self.summary.checkpoints += 1;
        self.summary.sync_requests += 1;
        self.since = Since {
            lines: 0,
            bytes: 0,
            at: Instant::now(),
            files: 1,
        };
    }
}

/// Read buffers rotating between the reading thread and the writer thread: one being read into
/// and transformed, one being written, two waiting between them (measured a little faster than
/// three in all; 2 MiB buffers were much slower).
const POOL_BUFFERS: usize = 4;

/// Emptied `out` buffers kept for reuse (an [`Emit::Buffer`] chunk takes one).
const SPARE_OUTS: usize = 16;

/// What the writer thread does for a batch, in order.
enum Op {
    /// Write these bytes of the buffer (transformed in place).
    Chunk(std::ops::Range<usize>),
    /// Write `outs[i]` (a transform's output in its `out` buffer).
    Out(usize),
    /// Hand this checkpoint to the syncer thread: the writes before it are done.
    Checkpoint(SyncJob),
}

/// One read buffer and what to do with it: the writes of its transformed chunks, each followed by
/// the checkpoints taken after it, all into one output file.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    outs: Vec<Vec<u8>>,
    ops: Vec<Op>,
    sink: Option<Arc<File>>,
    output: PathBuf,
}

/// The reading thread's end of the writer thread, and the pool of buffers that rotate between
/// them: this thread fills a batch and sends it; the writer thread writes it, hands its
/// checkpoints to the syncer thread (which it owns) and sends the batch back for reuse.
///
/// Without a writer thread (one CPU, or until [`writer_thread_pays`]), `send` writes the batch on
/// the calling thread through the same code, with the syncer held here; after a failed write it
/// writes nothing more. [`Writer::go_threaded`] moves the syncer to a new writer thread.
struct Writer {
    inline: Option<Syncer>,
    /// The writer thread's ends of the channels, until it starts.
    pending: Option<(
        std::sync::mpsc::Receiver<Batch>,
        std::sync::mpsc::Sender<Batch>,
    )>,
    /// Whether to start the writer thread once [`writer_thread_pays`].
    adaptive: bool,
    work: Option<std::sync::mpsc::SyncSender<Batch>>,
    returned: std::sync::mpsc::Receiver<Batch>,
    handle: Option<std::thread::JoinHandle<Result<(), ProcessorError>>>,
    free: Vec<Batch>,
    /// Batches made so far (at most [`POOL_BUFFERS`]) and of those, the ones with the writer.
    made: usize,
    outstanding: usize,
    spare_outs: Vec<Vec<u8>>,
}

impl Writer {
    fn start(syncer: Syncer, writing: Writing) -> Writer {
        // Never more batches than the pool has: a send does not block, a `take` waits instead.
        let (work, batches) = std::sync::mpsc::sync_channel::<Batch>(POOL_BUFFERS);
        let (done, returned) = std::sync::mpsc::channel::<Batch>();
        let mut writer = Writer {
            inline: Some(syncer),
            pending: Some((batches, done)),
            adaptive: writing == Writing::Adaptive,
            work: Some(work),
            returned,
            handle: None,
            free: Vec::new(),
            made: 0,
            outstanding: 0,
            spare_outs: Vec::new(),
        };
        if writing == Writing::Thread {
            writer.go_threaded();
        }
        writer
    }

    /// Starts the writer thread, which takes over the syncer: the batches sent from now on are
    /// written there, after those already written here.
    fn go_threaded(&mut self) {
        self.adaptive = false;
        let (Some(mut syncer), Some((batches, done))) = (self.inline.take(), self.pending.take())
        else {
            return;
        };
        self.handle = Some(std::thread::spawn(move || {
            // On an error both channels close at once, so the reading thread stops at its next
            // send or take; the checkpoints handed over before the error are still made durable
            // and reported.
            let written = write_batches(batches, done, &mut syncer);
            let synced = syncer.finish();
            written.and(synced)
        }));
    }

    /// An empty batch for `output`: a free one, a new one while the pool is not full, or the next
    /// one the writer thread is done with.
    fn take(&mut self, sink: &Arc<File>, output: &Path) -> Result<Batch, ProcessorError> {
        let mut batch = match self.free.pop() {
            Some(batch) => batch,
            None => match self.returned.try_recv() {
                Ok(batch) => self.recycle(batch),
                Err(_) if self.made < POOL_BUFFERS => {
                    self.made += 1;
                    Batch {
                        buf: vec![0; CHUNK_BYTES],
                        ..Batch::default()
                    }
                }
                Err(_) => match self.returned.recv() {
                    Ok(batch) => self.recycle(batch),
                    Err(_) => return Err(self.stopped()),
                },
            },
        };
        batch.sink = Some(Arc::clone(sink));
        output.clone_into(&mut batch.output);
        Ok(batch)
    }

    /// A batch back from the writer thread, emptied for reuse.
    fn recycle(&mut self, mut batch: Batch) -> Batch {
        self.outstanding -= 1;
        self.keep_spare_outs(&mut batch);
        batch.sink = None;
        batch
    }

    /// Takes the written `out` buffers of `batch` back for reuse (up to [`SPARE_OUTS`]).
    fn keep_spare_outs(&mut self, batch: &mut Batch) {
        for mut out in batch.outs.drain(..) {
            if self.spare_outs.len() < SPARE_OUTS {
                out.clear();
                self.spare_outs.push(out);
            }
        }
    }

    /// An empty `out` buffer for the transform, reused when one is spare.
    fn spare_out(&mut self) -> Vec<u8> {
        self.spare_outs.pop().unwrap_or_default()
    }

    /// Whether this thread writes (no writer thread, or not yet).
    fn writes_here(&self) -> bool {
        self.inline.is_some()
    }

    /// Without a writer thread, writes what `batch` queued so far and hands over its checkpoints,
    /// leaving the buffer in place; with one, does nothing (the batch goes to it when full).
    fn write_here(&mut self, batch: &mut Batch) -> Result<(), ProcessorError> {
        let Some(syncer) = &mut self.inline else {
            return Ok(());
        };
        if let Err(err) = write_batch(batch, syncer) {
            // As when the writer thread ends: what was handed to the syncer is still made
            // durable and reported; nothing is written or handed over after this.
            let _ = self.inline.take().map(|mut syncer| syncer.finish());
            self.pending = None;
            self.work = None;
            return Err(err);
        }
        self.keep_spare_outs(batch);
        Ok(())
    }

    /// Queues `batch` for the writer thread (or, without one, writes it); if the writer already
    /// failed, returns its error.
    fn send(&mut self, mut batch: Batch) -> Result<(), ProcessorError> {
        if self.writes_here() {
            self.write_here(&mut batch)?;
            batch.sink = None;
            self.free.push(batch);
            return Ok(());
        }
        match self.work.as_ref().map(|work| work.send(batch)) {
            Some(Ok(())) => {
                self.outstanding += 1;
                Ok(())
            }
            _ => Err(self.stopped()),
        }
    }

    /// Waits until the writer thread has done everything sent to it.
    fn drain(&mut self) -> Result<(), ProcessorError> {
        while self.outstanding > 0 {
            match self.returned.recv() {
                Ok(batch) => {
                    let batch = self.recycle(batch);
                    self.free.push(batch);
                }
                Err(_) => return Err(self.stopped()),
            }
        }
        Ok(())
    }

    /// Why the writer thread is gone: its own error (or the syncer's), not a channel's.
    fn stopped(&mut self) -> ProcessorError {
        match self.finish() {
            Err(err) => err,
            Ok(()) => ProcessorError::Usage("the output writer thread stopped early".into()),
        }
    }

    /// Waits until every batch sent is written and every checkpoint durable and reported.
    fn finish(&mut self) -> Result<(), ProcessorError> {
        if let Some(mut syncer) = self.inline.take() {
            return syncer.finish();
        }
        self.work = None;
        join(self.handle.take(), "the output writer thread")
    }
}

/// The writer thread's loop: writes each batch and returns it for reuse.
fn write_batches(
    batches: std::sync::mpsc::Receiver<Batch>,
    done: std::sync::mpsc::Sender<Batch>,
    syncer: &mut Syncer,
) -> Result<(), ProcessorError> {
    for mut batch in batches {
        write_batch(&mut batch, syncer)?;
        if done.send(batch).is_err() {
            break;
        }
    }
    Ok(())
}

/// Writes a batch's chunks in order and hands each checkpoint to the syncer once the writes
/// before it are done.
fn write_batch(batch: &mut Batch, syncer: &mut Syncer) -> Result<(), ProcessorError> {
    let Batch {
        buf,
        outs,
        ops,
        sink,
        output,
    } = batch;
    for op in ops.drain(..) {
        let bytes = match op {
            Op::Chunk(range) => &buf[range],
            Op::Out(i) => &outs[i][..],
            Op::Checkpoint(job) => {
                syncer.send(job)?;
                continue;
            }
        };
        let file: &File = sink.as_ref().expect("a batch names its output");
        (&*file)
            .write_all(bytes)
            .map_err(ProcessorError::io("writing output", output))?;
        crate::failpoint::hit("sdk.after-output-write");
    }
    Ok(())
}

/// One due checkpoint for the syncer thread, with the end-of-input checkpoints deferred before
/// it.
struct SyncJob {
    file: Arc<File>,
    output: PathBuf,
    /// The checkpoints to report once durable, in order, each with its line tally; the last is
    /// the one at `output`'s current end.
    checkpoints: Vec<(Checkpoint, u64)>,
    sync_dirs: bool,
    /// Other output files were written since the previous job: only a `syncfs` covers them all.
    spans_files: bool,
    /// Input bytes this job covers (at least [`MIN_JOB_WEIGHT`]): what a crash before it is
    /// reported would make the next attempt redo.
    weight: u64,
}

impl SyncJob {
    /// The checkpoint at `output`'s current end.
    fn last(&self) -> &Checkpoint {
        &self
            .checkpoints
            .last()
            .expect("a job has its own checkpoint")
            .0
    }
}

/// The thread that makes outputs durable and reports checkpoints, in order.
///
/// Started by the first checkpoint that is not small: a stage of a few small files has one
/// checkpoint, at its end, whose sync nothing could overlap, and it is made durable and reported
/// on the calling thread instead (a thread's start and end were a visible part of such an
/// attempt).
struct Syncer {
    /// Until the thread starts, what it will own.
    idle: Option<Reporter>,
    tx: Option<std::sync::mpsc::SyncSender<SyncJob>>,
    handle: Option<std::thread::JoinHandle<Result<(), ProcessorError>>>,
    /// Weight of the checkpoints sent and not yet reported: beyond [`MIN_BACKLOG_JOBS`]
    /// checkpoints at most [`MAX_BACKLOG`], so that batching never lets the work a kill would
    /// lose grow past a few checkpoints' worth.
    sent: u64,
    reported: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Checkpoints sent and reported (counts).
    sent_jobs: u64,
    reported_jobs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// One message per batch the syncer thread finished (wakes a sender waiting on the backlog).
    acks: Option<std::sync::mpsc::Receiver<()>>,
}

/// A first checkpoint covering at most this much input is synced and reported on the calling
/// thread (see [`Syncer`]); any other starts the syncer thread.
const INLINE_FIRST_JOB: u64 = 64 << 10;

/// What makes checkpoints durable and reports them: the progress pipe, the staging root (for
/// `syncfs`) and the test switch's line tally.
struct Reporter {
    progress: Option<File>,
    staging_root: PathBuf,
    line_tally: Option<PathBuf>,
}

impl Reporter {
    /// Makes `batch` durable (one group commit, see [`sync_batch`]) and reports its checkpoints,
    /// in order. Returns the batch's weight.
    fn sync_and_report(&mut self, batch: Vec<SyncJob>) -> Result<u64, ProcessorError> {
        sync_batch(&batch, &self.staging_root)?;
        let weight: u64 = batch.iter().map(|j| j.weight).sum();
        for (checkpoint, lines) in batch.into_iter().flat_map(|job| job.checkpoints) {
            if let Some(progress) = &mut self.progress {
                progress
                    .write_all(checkpoint.to_line().as_bytes())
                    .map_err(ProcessorError::io(
                        "writing a checkpoint to",
                        Path::new("PIPELINE_PROGRESS_FD"),
                    ))?;
                crate::failpoint::hit("sdk.after-checkpoint-sent");
            }
            if let Some(tally) = &self.line_tally {
                let mut file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(tally)
                    .map_err(ProcessorError::io("opening the line tally", tally))?;
                writeln!(file, "{lines}")
                    .map_err(ProcessorError::io("writing the line tally", tally))?;
            }
        }
        Ok(weight)
    }
}

impl Syncer {
    fn start(progress: Option<File>, staging_root: PathBuf, line_tally: Option<PathBuf>) -> Syncer {
        Syncer {
            idle: Some(Reporter {
                progress,
                staging_root,
                line_tally,
            }),
            tx: None,
            handle: None,
            sent: 0,
            reported: Default::default(),
            sent_jobs: 0,
            reported_jobs: Default::default(),
            acks: None,
        }
    }

    /// Starts the syncer thread, which takes the reporter over.
    fn start_thread(&mut self, mut reporter: Reporter) {
        // At most SYNC_QUEUE checkpoints wait: memory and descriptors stay bounded if the disk
        // is slow.
        let (tx, rx) = std::sync::mpsc::sync_channel::<SyncJob>(SYNC_QUEUE);
        let (ack_tx, acks) = std::sync::mpsc::channel::<()>();
        let reported_by_thread = self.reported.clone();
        let reported_jobs_by_thread = self.reported_jobs.clone();
        self.handle = Some(std::thread::spawn(move || {
            while let Ok(first) = rx.recv() {
                // Group commit: checkpoints that queued up while the last sync ran are made
                // durable together (`sync_batch`): one fdatasync for checkpoints of one output
                // file, one `syncfs` for several (every output lives under the staging root, on
                // one filesystem).
                let mut batch = vec![first];
                while batch.len() < SYNC_QUEUE {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let count = batch.len() as u64;
                let weight = reporter.sync_and_report(batch)?;
                reported_by_thread.fetch_add(weight, std::sync::atomic::Ordering::SeqCst);
                reported_jobs_by_thread.fetch_add(count, std::sync::atomic::Ordering::SeqCst);
                let _ = ack_tx.send(());
            }
            Ok(())
        }));
        self.tx = Some(tx);
        self.acks = Some(acks);
    }

    /// Queues a checkpoint (called by the writer thread, once every byte the checkpoint covers is
    /// written); if the syncer already failed, returns its error.
    fn send(&mut self, job: SyncJob) -> Result<(), ProcessorError> {
        // The order the protocol rests on (write, then sync, then report), checked where it can
        // be exact: the writer thread alone writes the output, in order, so when it hands over a
        // checkpoint the file ends exactly at the checkpoint's `outputBytes`.
        debug_assert_eq!(
            job.file.metadata().map(|m| m.len()).ok(),
            Some(job.last().output_bytes),
            "checkpoint {:?} handed to the syncer before its output was written",
            job.last()
        );
        let weight = job.weight;
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(mut reporter) = self.idle.take() {
            if self.sent_jobs == 0 && weight <= INLINE_FIRST_JOB {
                let result = reporter.sync_and_report(vec![job]);
                self.idle = Some(reporter);
                result?;
                self.sent += weight;
                self.sent_jobs += 1;
                self.reported.fetch_add(weight, SeqCst);
                self.reported_jobs.fetch_add(1, SeqCst);
                return Ok(());
            }
            self.start_thread(reporter);
        }
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            return self.finish();
        }
        self.sent += weight;
        self.sent_jobs += 1;
        // Wait for the syncer while more than MIN_BACKLOG_JOBS checkpoints are unreported and
        // they cover more than MAX_BACKLOG of input: big checkpoints overlap their sync with the
        // work as before, tiny ones queue up into one group commit (each finished batch sends an
        // ack; a dead syncer drops its end and `finish` reports why).
        while self.sent_jobs - self.reported_jobs.load(SeqCst) > MIN_BACKLOG_JOBS
            && self.sent - self.reported.load(SeqCst) > MAX_BACKLOG
        {
            if self.acks.as_ref().is_none_or(|acks| acks.recv().is_err()) {
                return self.finish();
            }
        }
        Ok(())
    }

    /// Waits until every queued checkpoint is durable and reported; the progress pipe closes.
    fn finish(&mut self) -> Result<(), ProcessorError> {
        self.idle = None;
        self.tx = None;
        join(self.handle.take(), "the checkpoint thread")
    }
}

/// Waits for `thread` (if it was started) and returns its result; its panic becomes an error
/// naming `what`.
fn join(
    thread: Option<std::thread::JoinHandle<Result<(), ProcessorError>>>,
    what: &str,
) -> Result<(), ProcessorError> {
    match thread.map(|h| h.join()) {
        Some(Ok(result)) => result,
        Some(Err(_)) => Err(ProcessorError::Usage(format!("{what} panicked"))),
        None => Ok(()),
    }
}

/// Opens the output for one input: fresh (created, truncated) or resumed (cut back to the
/// checkpoint's `outputBytes`, with the input positioned at its `byteOffset`).
fn open_output(
    output: &Path,
    start: &Checkpoint,
    resuming: bool,
    input: &Path,
    source: &mut File,
) -> Result<File, ProcessorError> {
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).map_err(ProcessorError::io("creating output folder", dir))?;
    }
    if !resuming {
        return File::create(output).map_err(ProcessorError::io("creating output", output));
    }
    let input_len = source
        .metadata()
        .map_err(ProcessorError::io("reading input size", input))?
        .len();
    if start.byte_offset > input_len {
        return Err(ProcessorError::Data {
            path: input.to_path_buf(),
            offset: start.byte_offset,
            message: format!("resume checkpoint is past the end of the input ({input_len} bytes)"),
        });
    }
    let mut sink = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(output)
        .map_err(ProcessorError::io("opening output to resume", output))?;
    let have = sink
        .metadata()
        .map_err(ProcessorError::io("reading output size", output))?
        .len();
    if have < start.output_bytes {
        return Err(ProcessorError::Data {
            path: output.to_path_buf(),
            offset: have,
            message: format!(
                "output is shorter than the checkpoint's {} bytes: it cannot be resumed",
                start.output_bytes
            ),
        });
    }
    sink.set_len(start.output_bytes)
        .map_err(ProcessorError::io(
            "truncating output to the checkpoint",
            output,
        ))?;
    sink.seek(SeekFrom::End(0))
        .map_err(ProcessorError::io("seeking output", output))?;
    source
        .seek(SeekFrom::Start(start.byte_offset))
        .map_err(ProcessorError::io("seeking input", input))?;
    Ok(sink)
}

/// The offset just past the `n`-th newline of `data` (`n` ≥ 1), if it has that many. Newlines
/// are counted a block at a time (memchr's vectorised count) and only the block holding the
/// `n`-th is walked newline by newline: finding the 10,000th line costs a count, not 10,000
/// searches.
fn nth_line_end(data: &[u8], n: u64) -> Option<usize> {
    const BLOCK: usize = 16 << 10;
    let mut left = n;
    let mut at = 0;
    for block in data.chunks(BLOCK) {
        let count = memchr::memchr_iter(b'\n', block).count() as u64;
        if count >= left {
            let nth = memchr::memchr_iter(b'\n', block).nth((left - 1) as usize)?;
            return Some(at + nth + 1);
        }
        left -= count;
        at += block.len();
    }
    None
}

fn read_retrying(source: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match source.read(buf) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Checkpoints that may wait for the syncer thread (each holds a descriptor of its output).
const SYNC_QUEUE: usize = 64;

/// Input bytes of checkpoints that may wait for the syncer thread: what a crash can cost on top
/// of the checkpoint being synced (a few checkpoints of a big file; many of tiny files). The
/// writer thread waits when it is exceeded, and the reading thread waits for a free buffer, so a
/// kill loses at most this backlog plus the [`POOL_BUFFERS`] buffers of input between the threads.
const MAX_BACKLOG: u64 = 16 << 10;

/// Unreported checkpoints always allowed whatever their size (a big checkpoint's fsync overlaps
/// the work on the next ones).
const MIN_BACKLOG_JOBS: u64 = 3;

/// The least weight of one checkpoint, so a backlog of tiny files is bounded in count as well.
const MIN_JOB_WEIGHT: u64 = 256;

/// End-of-input checkpoints that may wait for the next due one (memory stays bounded when the
/// cadence sets no threshold); reaching it takes a checkpoint.
const MAX_DEFERRED: usize = 4096;

/// Makes the outputs of `batch` durable up to each job's checkpoint, and the folders of new
/// outputs: checkpoints of one output file, with fdatasync of it and fsync of its folders;
/// several output files at once, with one `syncfs` of the staging root's filesystem (data, inodes
/// and folder entries alike).
fn sync_batch(batch: &[SyncJob], staging_root: &Path) -> Result<(), ProcessorError> {
    let last = batch.last().expect("a batch is never empty");
    if !needs_syncfs(batch) {
        // One output file (a big input's checkpoints): its own fdatasync covers them all.
        last.file
            .sync_data()
            .map_err(ProcessorError::io("syncing output", &last.output))?;
        crate::failpoint::hit("sdk.after-output-fsync");
        if batch.iter().any(|j| j.sync_dirs) {
            sync_dirs_up_to(&last.output, staging_root)?;
            crate::failpoint::hit("sdk.after-dir-fsync");
        }
        return Ok(());
    }
    rustix::fs::syncfs(&last.file).map_err(|e| {
        ProcessorError::io("syncing the outputs' filesystem", &last.output)(e.into())
    })?;
    crate::failpoint::hit("sdk.after-output-fsync");
    if batch.iter().any(|j| j.sync_dirs) {
        crate::failpoint::hit("sdk.after-dir-fsync");
    }
    Ok(())
}

/// Whether `batch` covers more than one output file (several jobs' outputs, or a job that
/// follows deferred end-of-input checkpoints): then only a `syncfs` makes all of them durable.
fn needs_syncfs(batch: &[SyncJob]) -> bool {
    let last = batch.last().expect("a batch is never empty");
    batch
        .iter()
        .any(|j| j.spans_files || j.output != last.output)
}

/// fsyncs every folder from `output`'s parent up to `root`, so a newly created output file (and
/// any folders `create_dir_all` made for it) survives a power cut once a checkpoint names it.
fn sync_dirs_up_to(output: &Path, root: &Path) -> Result<(), ProcessorError> {
    let mut dir = output.parent();
    while let Some(d) = dir {
        if !d.starts_with(root) {
            break;
        }
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(ProcessorError::io("syncing output folder", d))?;
        if d == root {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
