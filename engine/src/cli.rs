//! The command line: argument parsing, rendering, exit codes. The only module that prints.
//!
//! Exit codes: 0 success (also when everything was skipped), 1 a stage failed (or `status
//! --exit-code` found work to do), 2 invalid pipeline or usage, 3 the workspace lock is held,
//! 130 interrupted.

use std::io::{IsTerminal, Write};
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
use crate::hashing::StatCache;
use crate::lock::Wait;
use crate::plan::{self, Decision};
use crate::spec::{LoadError, Spec, SpecError};
use crate::state::{RunRecord, RunStatus, StageStatus};
use crate::workspace::Workspace;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;
pub const EXIT_LOCKED: u8 = 3;
pub const EXIT_INTERRUPTED: u8 = 130;

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
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Validate the Pipefile without running anything
    Check,
    /// Print the JSON Schema of the Pipefile format
    Schema,
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
    /// Run at most N stages at once [default: the CPU quota]
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
    /// Wait for the workspace lock (optionally at most SECONDS) instead of failing with exit 3
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
        }
    }

    fn stdout(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
    }

    fn stderr(&self, line: &str) {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn error(&self, message: &str) {
        let prefix = if self.color {
            "\x1b[1;31merror\x1b[0m"
        } else {
            "error"
        };
        self.stderr(&format!("{prefix}: {message}"));
    }

    fn event(&self, event: &Event) {
        if self.json {
            self.stdout(&serde_json::to_string(event).expect("events serialise"));
            return;
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
            Event::StageFinished { stage, status, duration_ms, reason } => match status {
                StageStatus::Failed => {
                    self.error(&format!("stage `{stage}` failed: {reason}"));
                    None
                }
                StageStatus::Skipped => None,
                StageStatus::NotRun => (!self.quiet).then(|| format!("{stage}: not run ({reason})")),
                other => (!self.quiet).then(|| format!("{stage}: {} in {duration_ms} ms", other.as_str())),
            },
            Event::Warning { message } => Some(format!("warning: {message}")),
            Event::RunFinished { run_id, status, duration_ms, totals } => (!self.quiet || *status != RunStatus::Succeeded).then(|| {
                format!(
                    "pipe: {}: {} ran, {} skipped, {} resumed, {} failed in {duration_ms} ms (run {run_id})",
                    serde_json::to_value(status).unwrap().as_str().unwrap_or(""),
                    totals.ran,
                    totals.skipped,
                    totals.resumed,
                    totals.failed
                )
            }),
        };
        if let Some(line) = line {
            self.stderr(&line);
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
    ExitCode::from(run(cli))
}

fn run(cli: Cli) -> u8 {
    let out = Output::new(&cli.global);
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
        command => {
            let file = pipefile_path(cli.global.pipeline);
            let (spec, graph) = match load(&file, &out) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            match command {
                Command::Build(args) if args.dry_run => {
                    dry_run(&spec, &graph, &args.stages, &out, false).0
                }
                Command::Build(args) => run_build(&spec, &graph, args, &out),
                Command::Status { exit_code } => {
                    let (code, would_run) = dry_run(&spec, &graph, &[], &out, true);
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
                Command::Check => {
                    if !out.quiet {
                        out.stderr(&format!("{}: ok ({} stages)", spec.file, spec.stages.len()));
                    }
                    EXIT_OK
                }
                Command::Clean(args) => run_clean(&spec, args, &out),
                Command::Schema | Command::Processor { .. } => unreachable!("handled above"),
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

fn load(file: &std::path::Path, out: &Output) -> Result<(Spec, Graph), u8> {
    let spec = match Spec::load(file) {
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
    let mut cache = StatCache::load(&ws.stat_cache_file());
    let order: Vec<usize> = graph
        .order()
        .iter()
        .copied()
        .filter(|i| selected.contains(i))
        .collect();
    let plans = plan::plan_all(spec, &ws, &order, |i| graph.upstream(i), &mut cache);
    let last = if with_last_run { last_run(&ws) } else { None };
    let mut would_run = false;
    for result in plans {
        let (name, decision, error) = match &result {
            Ok(p) => (&spec.stages[p.stage].name, Some(&p.decision), None),
            Err((i, e)) => (&spec.stages[*i].name, None, Some(e.to_string())),
        };
        would_run |= decision.is_none_or(Decision::runs);
        let last_status = last
            .as_ref()
            .and_then(|r| r.stages.iter().find(|s| &s.name == name))
            .map(|s| s.status.as_str());
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

/// The most recent run record, by start time.
fn last_run(ws: &Workspace) -> Option<RunRecord> {
    let entries = std::fs::read_dir(ws.state_dir()).ok()?;
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("run_"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|bytes| serde_json::from_slice::<RunRecord>(&bytes).ok())
        .max_by(|a, b| a.started_at.cmp(&b.started_at))
}

fn run_build(spec: &Spec, graph: &Graph, args: BuildArgs, out: &Output) -> u8 {
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
    let opts = BuildOptions {
        run_id: args.run_id,
        targets: args.stages,
        keep_going: args.keep_going,
        jobs: args.jobs,
        wait_lock: wait_of(args.wait_lock),
        exe,
        interrupt,
    };
    match build::build(spec, graph, &opts, &mut |e| out.event(e)) {
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

fn run_clean(spec: &Spec, args: CleanArgs, out: &Output) -> u8 {
    match crate::clean::clean(
        spec,
        &args.stages,
        args.state,
        args.cache,
        wait_of(args.wait_lock),
    ) {
        Ok(cleaned) => {
            if out.json {
                out.stdout(&serde_json::json!({"event": "cleaned", "stages": cleaned.stages, "removed": cleaned.files}).to_string());
            } else if !out.quiet {
                for f in &cleaned.files {
                    out.stderr(&format!("removed {f}"));
                }
                out.stderr(&format!(
                    "pipe: cleaned {} stage(s), removed {} path(s)",
                    cleaned.stages.len(),
                    cleaned.files.len()
                ));
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
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
