//! The command line: argument parsing, rendering, exit codes. The only module that prints.
//!
//! Exit codes: 0 success (also when everything was skipped), 1 a stage failed (or `status
//! --exit-code` found work to do), 2 invalid pipeline or usage, 3 the workspace lock is held,
//! 130 interrupted.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use miette::{GraphicalReportHandler, GraphicalTheme};

use crate::build::{self, BuildError, BuildOptions};
use crate::event::Event;
use crate::graph::Graph;
use crate::lock::Wait;
use crate::memo::SkipMemo;
use crate::plan::{self, Decision};
use crate::spec::{LoadError, Spec, SpecError};
use crate::state::{RunRecord, RunStatus, StageStatus};
use crate::workspace::Workspace;

mod offline;
mod progress;
mod reference;

mod audit_cmd;
mod lines;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;
pub const EXIT_LOCKED: u8 = 3;
pub const EXIT_INTERRUPTED: u8 = 130;

/// Every exit code and its meaning (for `pipe man` and `docs/cli.md`).
pub const EXIT_CODES: &[(u8, &str)] = &[
    (EXIT_OK, "success (also when everything was skipped)"),
    (
        EXIT_FAILED,
        "a stage failed, `status --exit-code` found work to do, or `audit verify` found the log altered",
    ),
    (
        EXIT_INVALID,
        "invalid pipeline or usage (Pipefile errors are reported as FILE:LINE:COL)",
    ),
    (EXIT_LOCKED, "the workspace lock is held by another run"),
    (
        EXIT_INTERRUPTED,
        "interrupted (Ctrl-C / SIGTERM); running stages keep their checkpoints",
    ),
];

/// pipe: an offline, incremental, resumable task-graph engine for batch file processing.
#[derive(Debug, Parser)]
#[command(name = "pipe", version = VERSION_TEXT, disable_help_subcommand = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    global: GlobalArgs,
    /// Without a subcommand, `pipe [--run-id ID] ...` builds (the seed's spelling).
    #[command(flatten)]
    seed: SeedArgs,
}

/// The build flags accepted without a subcommand (`pipe --pipeline pipeline.json --run-id demo1`).
#[derive(Debug, Args, Default)]
struct SeedArgs {
    /// Print what would run and why; write nothing
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Name this run (default: timestamp + random suffix); a used id is refused
    #[arg(long, value_name = "ID")]
    run_id: Option<String>,
    /// Run stages not downstream of a failure
    #[arg(short, long)]
    keep_going: bool,
}

impl From<SeedArgs> for BuildArgs {
    fn from(seed: SeedArgs) -> BuildArgs {
        BuildArgs {
            stages: Vec::new(),
            dry_run: seed.dry_run,
            run_id: seed.run_id,
            keep_going: seed.keep_going,
            jobs: None,
            wait_lock: None,
            audit: Default::default(),
            offline_guard: offline::OfflineGuard::Strict,
            sandbox_debug: false,
            executor: None,
        }
    }
}

/// `pipe --version`: the release and the fingerprint schema it writes.
pub const VERSION_TEXT: &str = concat!(env!("CARGO_PKG_VERSION"), " (fingerprint schema 1)");

#[derive(Debug, Args)]
struct GlobalArgs {
    /// The pipeline file [default: Pipefile.json, or pipeline.json if only that exists]
    #[arg(
        short = 'f',
        long = "pipeline",
        visible_alias = "file",
        global = true,
        value_name = "FILE"
    )]
    pipeline: Option<PathBuf>,
    /// Print only errors
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Print more (checkpoints)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Colour in human output (NO_COLOR is honoured)
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
    /// `json`: one event object per line on stdout, for editors and tools
    #[arg(long, global = true, value_enum, default_value_t = MessageFormat::Human)]
    message_format: MessageFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MessageFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build everything, or the named stages and what they need
    Build(BuildArgs),
    /// Remove stage outputs, markers and progress (never a file no stage produced)
    Clean(CleanArgs),
    /// Show the plan (as --dry-run) and the last run's result per stage
    Status {
        /// Exit 1 when any stage would run (for CI)
        #[arg(long)]
        exit_code: bool,
    },
    /// Print the stage graph
    Graph {
        /// Output format (json: nodes and edges for tools)
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Validate the Pipefile and statically scan Python processors for network use, without
    /// running anything
    Check {
        /// Also prove the runtime sandbox on this machine: canaries must fail to reach a
        /// loopback listener pipe starts itself
        #[arg(long)]
        sandbox: bool,
    },
    /// Free cache space: entries of old runs, objects nothing references (never what current
    /// outputs need)
    Gc(GcArgs),
    /// Print the JSON Schema of the Pipefile format
    Schema,
    /// Verify or show the tamper-evident audit log (state/audit.jsonl)
    Audit(audit_cmd::AuditArgs),
    /// Print a shell completion script (e.g. `pipe completions bash > /etc/bash_completion.d/pipe`)
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: reference::CompletionShell,
    },
    /// Print the man page (roff; view with `pipe man | man -l -`)
    Man {
        /// Print the page of this subcommand instead (`pipe-SUBCOMMAND(1)`)
        #[arg(value_name = "SUBCOMMAND")]
        subcommand: Option<String>,
    },
    /// Run a built-in processor (the engine runs built-ins this way, as a child)
    Processor {
        /// copy | upper
        name: String,
    },
}

#[derive(Debug, Args, Default)]
struct BuildArgs {
    /// Stages to build (with everything they need); default: all
    #[arg(value_name = "STAGE")]
    stages: Vec<String>,
    /// Print what would run and why; write nothing
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Name this run (default: timestamp + random suffix); a used id is refused
    #[arg(long, value_name = "ID")]
    run_id: Option<String>,
    /// Run stages not downstream of a failure
    #[arg(short, long)]
    keep_going: bool,
    /// Run at most N stages' processors at once [default: the CPU quota]
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
    /// Wait for the workspace lock (optionally at most SECONDS) instead of failing with exit 3
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, require_equals = true)]
    wait_lock: Option<Option<u64>>,
    /// Which offline layers processors run under (see docs/offline.md)
    #[arg(long, value_enum, default_value_t = offline::OfflineGuard::Strict)]
    offline_guard: offline::OfflineGuard,
    /// Print the exact re-exec command of every processor attempt (to reproduce it by hand)
    #[arg(long)]
    sandbox_debug: bool,
    /// Where stages and map items run [default: `settings.executor`, else local] (see
    /// docs/slurm.md)
    #[arg(long, value_enum, value_name = "EXECUTOR")]
    executor: Option<crate::spec::Executor>,
    #[command(flatten)]
    audit: audit_cmd::KeyArg,
}

#[derive(Debug, Args)]
struct GcArgs {
    /// Keep the cache entries of the last N runs (default: all runs)
    #[arg(long, value_name = "N")]
    keep_runs: Option<usize>,
    /// Then drop the oldest entries until the objects fit in SIZE (e.g. 500M, 2G)
    #[arg(long, value_name = "SIZE", value_parser = crate::gc::parse_size)]
    max_size: Option<u64>,
    /// Say what would be freed; remove nothing
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Wait for the workspace lock (optionally at most SECONDS)
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, require_equals = true)]
    wait_lock: Option<Option<u64>>,
}

#[derive(Debug, Args)]
struct CleanArgs {
    /// Stages to clean; default: all
    #[arg(value_name = "STAGE")]
    stages: Vec<String>,
    /// Also remove run, stage and metrics records and logs in state/
    #[arg(long)]
    state: bool,
    /// Also remove cache/
    #[arg(long)]
    cache: bool,
    /// Wait for the workspace lock (optionally at most SECONDS)
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, require_equals = true)]
    wait_lock: Option<Option<u64>>,
    #[command(flatten)]
    audit: audit_cmd::KeyArg,
}

fn wait_of(arg: Option<Option<u64>>) -> Wait {
    match arg {
        None => Wait::No,
        Some(None) => Wait::Forever,
        Some(Some(s)) => Wait::For(Duration::from_secs(s)),
    }
}

/// Renders output for the chosen format and verbosity.
struct Output {
    json: bool,
    quiet: bool,
    verbose: bool,
    color: bool,
    /// Show the live progress display (stderr is a terminal, human output, not `-q`).
    live: bool,
    /// The writer thread lines go through, for commands that print one per stage.
    lines: Option<lines::Lines>,
}

impl Output {
    fn new(g: &GlobalArgs) -> Output {
        let color = match g.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
            }
        };
        Output {
            json: g.message_format == MessageFormat::Json,
            quiet: g.quiet,
            verbose: g.verbose > 0,
            color,
            live: g.message_format == MessageFormat::Human
                && !g.quiet
                && std::io::stderr().is_terminal()
                && progress::supported(),
            lines: None,
        }
    }

    /// Has the lines of a command that prints one per stage written in batches
    /// ([`lines`]); not under the live display, which draws on stderr itself.
    fn batch_lines(&mut self) {
        if !self.live && self.lines.is_none() {
            self.lines = lines::Lines::start();
        }
    }

    fn stdout(&self, line: &str) {
        self.write_line(lines::Stream::Stdout, line);
    }

    fn stderr(&self, line: &str) {
        self.write_line(lines::Stream::Stderr, line);
    }

    fn write_line(&self, stream: lines::Stream, line: &str) {
        if let Some(lines) = &self.lines {
            return lines.send(stream, line);
        }
        // One `write` (stderr is unbuffered: `writeln!` would make two).
        let line = format!("{line}\n");
        let _ = match stream {
            lines::Stream::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            lines::Stream::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
        };
    }

    fn error(&self, message: &str) {
        self.stderr(&self.error_text(message));
    }

    fn error_text(&self, message: &str) -> String {
        let prefix = if self.color {
            "\x1b[1;31merror\x1b[0m"
        } else {
            "error"
        };
        format!("{prefix}: {message}")
    }

    /// Renders an event of run `run_id`: with json, the event line object on stdout; and a human
    /// line on stderr (as with json: human messages stay on stderr), above the live display when
    /// there is one.
    fn event(&self, run_id: &str, event: &Event, live: Option<&mut progress::Live>) {
        if self.json {
            let ts = crate::state::now_rfc3339();
            self.stdout(&crate::runlog::line(&ts, run_id, event));
        }
        let line = match event {
            Event::RunStarted { run_id, stages, .. } => (!self.quiet).then(|| format!("pipe: run {run_id}: {stages} stage(s)")),
            Event::StagePlanned { stage, summary, .. } => (!self.quiet).then(|| format!("{stage}: {summary}")),
            Event::StageStarted { stage, attempt } => (!self.quiet && *attempt > 1).then(|| format!("{stage}: attempt {attempt}")),
            Event::Checkpoint { stage, input_index, line_offset, .. } => (self.verbose && !self.quiet).then(|| format!("{stage}: checkpoint at input {input_index}, line {line_offset}")),
            Event::AttemptFailed { stage, attempt, classification, message, retry_in_ms } => Some(match retry_in_ms {
                Some(ms) => format!("{stage}: attempt {attempt} failed ({}: {message}); retrying in {ms} ms", serde_json::to_value(classification).unwrap().as_str().unwrap_or("")),
                None => format!("{stage}: attempt {attempt} failed ({}): {message}", serde_json::to_value(classification).unwrap().as_str().unwrap_or("")),
            }),
            Event::StagePublished { stage, files, bytes, .. } => (self.verbose && !self.quiet).then(|| format!("{stage}: published {files} file(s), {bytes} bytes")),
            Event::StageFinished { stage, status, duration_ms, reason } => match status {
                StageStatus::Failed => Some(self.error_text(&format!("stage `{stage}` failed: {reason}"))),
                StageStatus::Skipped => None,
                StageStatus::NotRun => (!self.quiet).then(|| format!("{stage}: not run ({reason})")),
                other => (!self.quiet).then(|| format!("{stage}: {} in {duration_ms} ms", other.as_str())),
            },
            Event::Warning { message } => Some(format!("warning: {message}")),
            Event::AuditHead { seq, hash } => (!self.quiet).then(|| format!("audit head: {seq}:{hash}")),
            Event::RunFinished { run_id, status, duration_ms, totals } => (!self.quiet || *status != RunStatus::Succeeded).then(|| {
                format!(
                    "pipe: {}: {} ran, {} skipped, {} resumed, {}{} failed in {duration_ms} ms (run {run_id})",
                    serde_json::to_value(status).unwrap().as_str().unwrap_or(""),
                    totals.ran,
                    totals.skipped,
                    totals.resumed,
                    match totals.restored {
                        0 => String::new(),
                        n => format!("{n} restored, "),
                    },
                    totals.failed
                )
            }),
        };
        match live {
            Some(live) => {
                live.update(event);
                if let Some(line) = line {
                    live.println(&line);
                }
            }
            None => {
                if let Some(line) = line {
                    self.stderr(&line);
                }
            }
        }
    }

    fn spec_errors(&self, errors: &[SpecError]) {
        let theme = if self.color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme).with_width(100);
        for err in errors {
            if self.json {
                self.stdout(&serde_json::json!({"event": "pipefileError", "location": err.location, "message": err.message, "help": err.help}).to_string());
            }
            self.stderr(&format!("{}: error: {}", err.location, err.message));
            let mut rendered = String::new();
            if handler.render_report(&mut rendered, err).is_ok() {
                self.stderr(rendered.trim_end());
            }
        }
    }
}

/// Entry point of the `pipe` binary.
pub fn main() -> ExitCode {
    // `pipe __exec` (the sandbox's re-exec helper) and `pipe __connect` (a sandbox canary).
    if let Some(code) = crate::sandbox::hidden_command() {
        return ExitCode::from(code);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() {
                EXIT_INVALID
            } else {
                EXIT_OK
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    // The canary listener of `check --sandbox` must live outside pipe's own socket filter, so it
    // is forked first; then pipe denies itself every socket family but AF_UNIX.
    if matches!(cli.command, Some(Command::Check { sandbox: true })) {
        crate::sandbox::canary::start_listener();
    }
    // The Slurm submitter must also live outside the filter: it is the one process of a build
    // that may reach slurmctld (docs/offline.md).
    let (slurm, pipefile) = wants_slurm(&cli);
    if slurm {
        if let Ok(exe) = std::env::current_exe() {
            let _ = crate::slurm::submitter::start(&exe);
        }
    }
    let _ = crate::sandbox::install_engine_filter();
    let code = run(cli, pipefile);
    // The spawn server, if a build started one, ends now and is reaped here (it would otherwise
    // end only when this process is gone, left for init to reap).
    crate::sandbox::zygote::shutdown();
    ExitCode::from(code)
}

/// What reading the Pipefile gave, when it was read before the command ran.
type PipefileRead = Option<io::Result<Vec<u8>>>;

/// Whether this command line is a build that runs on Slurm: `--executor slurm`, or no
/// `--executor` and a Pipefile whose `settings.executor` is "slurm" (a quick look at the raw JSON;
/// the real validation comes later). In that second case the Pipefile is read here, and what was
/// read is returned too: the build validates those bytes rather than reading the file again.
fn wants_slurm(cli: &Cli) -> (bool, PipefileRead) {
    let given = match &cli.command {
        Some(Command::Build(args)) if !args.dry_run && !cli.seed.dry_run => args.executor,
        None if !cli.seed.dry_run => None,
        _ => return (false, None),
    };
    match given {
        Some(executor) => (executor == crate::spec::Executor::Slurm, None),
        None => {
            // Only `settings.executor` is deserialised: the stages are skipped unparsed (building
            // a `Value` of a 10,000-stage Pipefile costs a no-op build ~15% of its time).
            #[derive(serde::Deserialize)]
            struct Peek {
                settings: Option<PeekSettings>,
            }
            #[derive(serde::Deserialize)]
            struct PeekSettings {
                executor: Option<serde_json::Value>,
            }
            let read = std::fs::read(pipefile_path(cli.global.pipeline.clone()));
            let slurm = read
                .as_ref()
                .ok()
                .filter(|bytes| may_name_executor(bytes))
                .and_then(|bytes| serde_json::from_slice::<Peek>(bytes).ok())
                .and_then(|peek| peek.settings)
                .is_some_and(|settings| settings.executor == Some("slurm".into()));
            (slurm, Some(read))
        }
    }
}

/// Whether Pipefile text may hold an `executor` key: it must be spelled out, or written with a
/// `\u` escape. Nearly every Pipefile has neither, and for a 10,000-stage Pipefile this search
/// (0.5 ms) spares the skimming parse (2.5 ms) that runs before anything else.
fn may_name_executor(text: &[u8]) -> bool {
    memchr::memmem::find(text, b"\"executor\"").is_some()
        || memchr::memmem::find(text, b"\\u").is_some()
}

fn run(cli: Cli, pipefile: PipefileRead) -> u8 {
    let mut out = Output::new(&cli.global);
    let seed_given = cli.seed.dry_run || cli.seed.keep_going || cli.seed.run_id.is_some();
    let command = match cli.command {
        None => Command::Build(cli.seed.into()),
        Some(Command::Build(mut args)) => {
            args.dry_run |= cli.seed.dry_run;
            args.keep_going |= cli.seed.keep_going;
            args.run_id = args.run_id.or(cli.seed.run_id);
            Command::Build(args)
        }
        Some(_) if seed_given => {
            out.error("`--run-id`, `--dry-run` and `--keep-going` go with `pipe build`");
            return EXIT_INVALID;
        }
        Some(other) => other,
    };
    match command {
        Command::Schema => {
            out.stdout(crate::spec::raw::json_schema().trim_end());
            EXIT_OK
        }
        Command::Processor { name } => pipe_processors::builtins::run(&name).clamp(0, 255) as u8,
        Command::Audit(args) => audit_cmd::run(args, cli.global.pipeline, &out),
        Command::Completions { shell } => {
            reference::completions(shell, &mut std::io::stdout().lock());
            EXIT_OK
        }
        Command::Man { subcommand } => {
            match reference::man(subcommand.as_deref(), &mut std::io::stdout().lock()) {
                Ok(()) => EXIT_OK,
                Err(err) => {
                    out.error(&err);
                    EXIT_INVALID
                }
            }
        }
        command => {
            if matches!(command, Command::Build(_) | Command::Status { .. }) {
                out.batch_lines();
            }
            let file = pipefile_path(cli.global.pipeline);
            // A build takes the workspace lock now if no one holds it, and then also starts
            // taking the stats the memo needs: nothing else can change the workspace any more.
            let root = std::path::absolute(&file)
                .ok()
                .and_then(|file| file.parent().map(std::path::Path::to_path_buf));
            let early_lock = match (&command, &root) {
                (Command::Build(args), Some(root)) if !args.dry_run => {
                    crate::lock::EarlyLock::try_take(&crate::workspace::Workspace {
                        root: root.clone(),
                    })
                }
                _ => None,
            };
            // A build (also a dry one) reads its skip memo while the Pipefile is validated (it is
            // used only if the file is still the one read once the workspace lock is held, or for
            // a dry run, which takes no lock, once the Pipefile is loaded).
            let memo = match &command {
                Command::Build(_) | Command::Status { .. } => root.map(|root| {
                    let file = crate::workspace::Workspace { root: root.clone() }.skip_memo_file();
                    match early_lock {
                        Some(_) => crate::memo::Reading::start_with_stats(file, root),
                        None => crate::memo::Reading::start(file),
                    }
                }),
                _ => None,
            };
            // So is the sandbox probe (a process of its own) run, when a build will want it.
            let probe = match &command {
                Command::Build(args)
                    if !args.dry_run && args.offline_guard == offline::OfflineGuard::Strict =>
                {
                    std::env::current_exe()
                        .ok()
                        .map(crate::sandbox::Probe::start)
                }
                _ => None,
            };
            let (spec, graph) = match load(&file, pipefile, &out) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            // Never freed: the process ends right after, and dropping a 10,000-stage spec and
            // graph piece by piece costs a no-op build ~10% of its time.
            let (spec, graph) = (ManuallyDrop::new(spec), ManuallyDrop::new(graph));
            match command {
                Command::Build(args) if args.dry_run => {
                    dry_run(&spec, &graph, &args.stages, memo, &out, false).0
                }
                Command::Build(args) => {
                    run_build(&spec, &graph, args, memo, early_lock, probe, &out)
                }
                Command::Status { exit_code } => {
                    let (code, would_run) = dry_run(&spec, &graph, &[], memo, &out, true);
                    if code == EXIT_OK && exit_code && would_run {
                        EXIT_FAILED
                    } else {
                        code
                    }
                }
                Command::Graph { format } => {
                    match format {
                        GraphFormat::Dot => out.stdout(graph.to_dot(&spec).trim_end()),
                        GraphFormat::Mermaid => out.stdout(graph.to_mermaid(&spec).trim_end()),
                        GraphFormat::Json => out.stdout(
                            &serde_json::to_string_pretty(&graph.to_json(&spec)).expect("json"),
                        ),
                    }
                    EXIT_OK
                }
                Command::Check { sandbox } => offline::check(&spec, &out, sandbox),
                Command::Clean(args) => run_clean(&spec, args, &out),
                Command::Gc(args) => run_gc(&spec, args, &out),
                Command::Schema
                | Command::Processor { .. }
                | Command::Completions { .. }
                | Command::Man { .. }
                | Command::Audit(_) => unreachable!("handled above"),
            }
        }
    }
}

/// `-f FILE`, else `Pipefile.json`, else the seed's `pipeline.json` when only that exists.
fn pipefile_path(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let default = PathBuf::from("Pipefile.json");
        let seed = PathBuf::from("pipeline.json");
        if !default.exists() && seed.exists() {
            seed
        } else {
            default
        }
    })
}

/// Loads and validates the Pipefile `file` (from what was already `read` of it, if anything) and
/// compiles its graph; on an error, says it and gives the exit code.
fn load(file: &std::path::Path, read: PipefileRead, out: &Output) -> Result<(Spec, Graph), u8> {
    let read = read.unwrap_or_else(|| std::fs::read(file));
    let spec = match Spec::load_read(file, read) {
        Ok(spec) => spec,
        Err(LoadError::Invalid { errors }) => {
            out.spec_errors(&errors);
            return Err(EXIT_INVALID);
        }
        Err(err @ LoadError::Read { .. }) => {
            out.error(&err.to_string());
            return Err(EXIT_INVALID);
        }
    };
    match Graph::compile(&spec) {
        Ok(graph) => Ok((spec, graph)),
        Err(err) => {
            out.spec_errors(&[*err]);
            Err(EXIT_INVALID)
        }
    }
}

/// Prints the plan; returns the exit code and whether anything would run. Writes nothing.
fn dry_run(
    spec: &Spec,
    graph: &Graph,
    targets: &[String],
    memo: Option<crate::memo::Reading>,
    out: &Output,
    with_last_run: bool,
) -> (u8, bool) {
    let selected = match build::selection(spec, graph, targets) {
        Ok(s) => s,
        Err(name) => {
            out.error(&format!("unknown stage `{name}`"));
            return (EXIT_INVALID, false);
        }
    };
    let ws = Workspace::new(spec);
    // Read only: a dry run saves neither the stat cache nor the memo.
    let mut memo = match memo {
        Some(reading) => SkipMemo::load_read(&reading, &ws.skip_memo_file(), spec),
        None => SkipMemo::load(&ws.skip_memo_file(), spec),
    };
    memo.prefetch(spec, |i| selected.contains(&i));
    let order: Vec<usize> = graph
        .order()
        .iter()
        .copied()
        .filter(|i| selected.contains(i))
        .collect();
    let plans = plan::plan_all(spec, &ws, &order, |i| graph.upstream(i), &mut memo);
    memo.stop_prefetch();
    let last: HashMap<String, String> = match with_last_run.then(|| last_run(&ws)).flatten() {
        Some(run) => run
            .stages
            .into_iter()
            .map(|s| (s.name, s.status.as_str().to_string()))
            .collect(),
        None => HashMap::new(),
    };
    let mut would_run = false;
    for result in plans {
        let (name, decision, error) = match &result {
            Ok(p) => (&spec.stages[p.stage].name, Some(&p.decision), None),
            Err((i, e)) => (&spec.stages[*i].name, None, Some(e.to_string())),
        };
        would_run |= decision.is_none_or(Decision::runs);
        let last_status = last.get(name.as_str()).map(String::as_str);
        if out.json {
            let mut obj = serde_json::json!({"event": "stagePlanned", "stage": name});
            match (decision, &error) {
                (Some(d), _) => {
                    obj["summary"] = d.describe().into();
                    if let serde_json::Value::Object(fields) =
                        serde_json::to_value(d).expect("json")
                    {
                        obj.as_object_mut().unwrap().extend(fields);
                    }
                }
                (None, Some(e)) => {
                    obj["decision"] = "error".into();
                    obj["error"] = e.clone().into();
                }
                _ => {}
            }
            if with_last_run {
                obj["lastRun"] = last_status.into();
            }
            out.stdout(&obj.to_string());
        } else {
            let what = match (decision, error) {
                (Some(d), _) => d.describe(),
                (None, Some(e)) => format!("error: {e}"),
                _ => String::new(),
            };
            let suffix = match last_status {
                Some(s) => format!("   [last run: {s}]"),
                None if with_last_run => "   [never run]".to_string(),
                None => String::new(),
            };
            out.stdout(&format!("{name}: {what}{suffix}"));
        }
    }
    (EXIT_OK, would_run)
}

/// The most recent run record, by start time (of those that parse).
///
/// Every run leaves a record with an entry per stage (1.4 MB for 10,000 stages), and a workspace
/// keeps them all, so they are read newest write first and the walk stops at the first record
/// last written before the newest start found (a record is last written after its start; the
/// margin covers the coarse clock of file times). Builds hold the workspace lock one after the
/// other, so that is usually after two records; records whose times say nothing (a copied
/// workspace) are all read, as they always were.
fn last_run(ws: &Workspace) -> Option<RunRecord> {
    const MARGIN: Duration = Duration::from_secs(2);
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(ws.state_dir())
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("run_"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    files.sort_by_key(|(written, _)| std::cmp::Reverse(*written));
    let mut newest: Option<(RunRecord, Option<std::time::SystemTime>)> = None;
    for (written, path) in files {
        if let Some((_, Some(started))) = &newest {
            if written + MARGIN < *started {
                break;
            }
        }
        let Some(record) = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<RunRecord>(&bytes).ok())
        else {
            continue;
        };
        if newest
            .as_ref()
            .is_none_or(|(best, _)| record.started_at > best.started_at)
        {
            let started = chrono::DateTime::parse_from_rfc3339(&record.started_at)
                .ok()
                .map(std::time::SystemTime::from);
            newest = Some((record, started));
        }
    }
    newest.map(|(record, _)| record)
}

fn run_build(
    spec: &Spec,
    graph: &Graph,
    args: BuildArgs,
    memo: Option<crate::memo::Reading>,
    early_lock: Option<crate::lock::EarlyLock>,
    probe: Option<crate::sandbox::ProbeRun>,
    out: &Output,
) -> u8 {
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(err) = signal_hook::flag::register(signal, Arc::clone(&interrupt)) {
            out.error(&format!("cannot install the signal handler: {err}"));
            return EXIT_FAILED;
        }
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            out.error(&format!("cannot find the pipe binary: {err}"));
            return EXIT_FAILED;
        }
    };
    let sandbox = match offline::preflight(
        spec,
        graph,
        &args.stages,
        args.offline_guard,
        args.sandbox_debug,
        || match probe {
            Some(started) => started.wait(),
            None => crate::sandbox::Probe::run(&exe),
        },
        out,
    ) {
        Ok(options) => options,
        Err(code) => return code,
    };
    // Generated here when not given, so every event line (json) carries it from the first.
    let run_id = args.run_id.unwrap_or_else(crate::runid::generate);
    let audit_key = match args.audit.load(&spec.root, out) {
        Ok(key) => key,
        Err(code) => return code,
    };
    let executor = match args.executor.unwrap_or(spec.executor) {
        crate::spec::Executor::Local => crate::stage_job::Executor::Local,
        crate::spec::Executor::Slurm => match crate::slurm::submitter::client() {
            Some(Ok(client)) => crate::stage_job::Executor::Slurm(crate::slurm::Cluster::start(
                spec.slurm.clone(),
                client,
                &run_id,
                &crate::workspace::Workspace::new(spec),
            )),
            Some(Err(err)) => {
                out.error(&format!("cannot start the Slurm submitter: {err}"));
                return EXIT_FAILED;
            }
            None => {
                out.error("the Slurm submitter was not started (internal error)");
                return EXIT_FAILED;
            }
        },
    };
    let mut live = out.live.then(progress::Live::new);
    let opts = BuildOptions {
        run_id: Some(run_id.clone()),
        targets: args.stages,
        keep_going: args.keep_going,
        jobs: args.jobs,
        wait_lock: wait_of(args.wait_lock),
        exe,
        interrupt,
        sandbox,
        audit_key,
        executor,
        memo,
        early_lock,
    };
    let result = build::build(spec, graph, &opts, &mut |e| {
        out.event(&run_id, e, live.as_mut())
    });
    drop(live);
    match result {
        Ok(report) => match report.run.status {
            RunStatus::Succeeded => EXIT_OK,
            RunStatus::Interrupted => EXIT_INTERRUPTED,
            _ => EXIT_FAILED,
        },
        Err(err @ BuildError::Lock(crate::lock::LockError::Held(_))) => {
            out.error(&format!(
                "{err}\n  hint: wait for it with `pipe build --wait-lock`"
            ));
            EXIT_LOCKED
        }
        Err(
            err
            @ (BuildError::BadRunId(_) | BuildError::RunIdUsed(_) | BuildError::UnknownStage(_)),
        ) => {
            out.error(&err.to_string());
            EXIT_INVALID
        }
        Err(err) => {
            out.error(&err.to_string());
            EXIT_FAILED
        }
    }
}

fn run_gc(spec: &Spec, args: GcArgs, out: &Output) -> u8 {
    let opts = crate::gc::GcOptions {
        keep_runs: args.keep_runs,
        max_size: args.max_size,
        dry_run: args.dry_run,
    };
    match crate::gc::gc(spec, &opts, wait_of(args.wait_lock)) {
        Ok(r) => {
            let verb = if args.dry_run { "would free" } else { "freed" };
            if out.json {
                out.stdout(&serde_json::json!({"event": "gc", "dryRun": args.dry_run, "actionsRemoved": r.actions_removed, "objectsRemoved": r.objects_removed, "bytesFreed": r.bytes_freed, "objectsKept": r.objects_kept, "bytesKept": r.bytes_kept}).to_string());
            } else if !out.quiet {
                out.stderr(&format!(
                    "pipe gc: {verb} {} bytes ({} objects, {} cache entries); kept {} objects ({} bytes)",
                    r.bytes_freed, r.objects_removed, r.actions_removed, r.objects_kept, r.bytes_kept
                ));
            }
            EXIT_OK
        }
        Err(err @ crate::gc::GcError::Lock(crate::lock::LockError::Held(_))) => {
            out.error(&err.to_string());
            EXIT_LOCKED
        }
        Err(err) => {
            out.error(&err.to_string());
            EXIT_FAILED
        }
    }
}

fn run_clean(spec: &Spec, args: CleanArgs, out: &Output) -> u8 {
    let audit_key = match args.audit.load(&spec.root, out) {
        Ok(key) => key,
        Err(code) => return code,
    };
    match crate::clean::clean(
        spec,
        &args.stages,
        args.state,
        args.cache,
        wait_of(args.wait_lock),
        audit_key,
    ) {
        Ok(cleaned) => {
            if out.json {
                out.stdout(&serde_json::json!({"event": "cleaned", "stages": cleaned.stages, "removed": cleaned.files, "auditHead": cleaned.audit_head.as_ref().map(ToString::to_string)}).to_string());
            } else if !out.quiet {
                for f in &cleaned.files {
                    out.stderr(&format!("removed {f}"));
                }
                out.stderr(&format!(
                    "pipe: cleaned {} stage(s), removed {} path(s)",
                    cleaned.stages.len(),
                    cleaned.files.len()
                ));
                if let Some(head) = &cleaned.audit_head {
                    out.stderr(&format!("audit head: {head}"));
                }
            }
            EXIT_OK
        }
        Err(err @ crate::clean::CleanError::Lock(crate::lock::LockError::Held(_))) => {
            out.error(&err.to_string());
            EXIT_LOCKED
        }
        Err(err @ crate::clean::CleanError::UnknownStage(_)) => {
            out.error(&err.to_string());
            EXIT_INVALID
        }
        Err(err) => {
            out.error(&err.to_string());
            EXIT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_the_current_fingerprint_schema() {
        assert!(VERSION_TEXT.ends_with(&format!(
            "(fingerprint schema {})",
            crate::FINGERPRINT_SCHEMA
        )));
    }

    #[test]
    fn an_executor_key_however_spelled_is_never_searched_past() {
        let parses_as_slurm = |text: &str| {
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            value["settings"]["executor"] == "slurm"
        };
        for text in [
            r#"{"settings": {"executor": "slurm"}}"#,
            r#"{"settings": {"\u0065xecutor": "slurm"}}"#,
            r#"{"settings": {"exec\u0075tor": "slurm"}}"#,
        ] {
            assert!(parses_as_slurm(text), "{text}");
            assert!(may_name_executor(text.as_bytes()), "{text}");
        }
        assert!(!may_name_executor(
            br#"{"version": 1, "stages": [{"name": "the-executor", "outputDir": "out/executor"}]}"#
        ));
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
