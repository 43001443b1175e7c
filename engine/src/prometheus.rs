//! `state/metrics_<id>.prom`: a run's metrics in the Prometheus text exposition format (0.0.4), so
//! an offline node_exporter textfile collector (or anything else that reads the format) can pick
//! them up. Same numbers as `state/metrics_<id>.json`, in base units (seconds, bytes); every
//! sample is labelled with `run_id` (and `stage` for per-stage metrics). Schema: `docs/metrics.md`.
//!
//! Every metric is a gauge: a file describes one run, not a counter that grows across runs.

use std::io::{self, Write};

use crate::state::{Metrics, StageMetrics};

/// A metric family: name, help text, and its value for one run or stage.
type Family<T> = (&'static str, &'static str, fn(&T) -> f64);

/// Per-run metrics.
const RUN_METRICS: &[Family<Metrics>] = &[
    (
        "pipe_run_wall_seconds",
        "Wall-clock time of the whole run.",
        |m| ms(m.totals.wall_ms),
    ),
    ("pipe_run_stages", "Stages the run considered.", |m| {
        m.totals.stages.into()
    }),
    (
        "pipe_run_retries",
        "Attempts that were retried after a transient failure.",
        |m| m.totals.retries.into(),
    ),
];

/// Per-stage metrics.
const STAGE_METRICS: &[Family<StageMetrics>] = &[
    (
        "pipe_stage_wall_seconds",
        "Wall-clock time of the stage in this run (attempts, backoff and publishing).",
        |s| ms(s.wall_ms),
    ),
    (
        "pipe_stage_cpu_user_seconds",
        "User CPU time of the stage's processors (rusage of the child and its reaped descendants).",
        |s| ms(s.cpu_user_ms),
    ),
    (
        "pipe_stage_cpu_system_seconds",
        "System CPU time of the stage's processors (rusage of the child and its reaped descendants).",
        |s| ms(s.cpu_sys_ms),
    ),
    (
        "pipe_stage_max_rss_bytes",
        "Peak resident memory of the stage's processors.",
        |s| (s.max_rss_kb * 1024) as f64,
    ),
    (
        "pipe_stage_input_bytes",
        "Total size of the stage's input files.",
        |s| s.input_bytes as f64,
    ),
    (
        "pipe_stage_output_bytes",
        "Total size of the outputs the stage published.",
        |s| s.output_bytes as f64,
    ),
    (
        "pipe_stage_lines",
        "Input lines processed, from the processor's checkpoints.",
        |s| s.lines as f64,
    ),
    (
        "pipe_stage_attempts",
        "Processor attempts of the stage in this run.",
        |s| s.attempts.into(),
    ),
];

/// The statuses counted in `pipe_run_stages_by_status`, from the totals.
type StatusCount = (&'static str, fn(&Metrics) -> u32);
const STATUSES: &[StatusCount] = &[
    ("ran", |m| m.totals.ran),
    ("skipped", |m| m.totals.skipped),
    ("resumed", |m| m.totals.resumed),
    ("restored", |m| m.totals.restored),
    ("failed", |m| m.totals.failed),
];

fn ms(value: u64) -> f64 {
    value as f64 / 1000.0
}

/// Renders `metrics` in the text exposition format (ends with a newline).
pub fn render(metrics: &Metrics) -> String {
    let mut out = Vec::new();
    write(metrics, &mut out).expect("writing to memory does not fail");
    String::from_utf8(out).expect("the exposition text is UTF-8")
}

/// [`render`], streamed into `out`: at 100,000 stages the text is 60 MB, which is not worth
/// holding in memory only to copy it into a file.
pub fn write(metrics: &Metrics, out: &mut dyn Write) -> io::Result<()> {
    let run = escape_label(&metrics.run_id);
    for (name, help, value) in RUN_METRICS {
        family(out, name, help)?;
        writeln!(out, "{name}{{run_id=\"{run}\"}} {}", number(value(metrics)))?;
    }
    family(
        out,
        "pipe_run_stages_by_status",
        "Stages of the run by outcome (resumed stages also count as ran).",
    )?;
    for (status, count) in STATUSES {
        writeln!(
            out,
            "pipe_run_stages_by_status{{run_id=\"{run}\",status=\"{status}\"}} {}",
            count(metrics)
        )?;
    }
    // Label sets built once per stage, not once per stage and metric (10,000 stages: 80,000).
    let labels: Vec<String> = metrics
        .stages
        .keys()
        .map(|stage| format!("{{run_id=\"{run}\",stage=\"{}\"}}", escape_label(stage)))
        .collect();
    let mut sample = String::new();
    for (name, help, value) in STAGE_METRICS {
        family(out, name, help)?;
        for (labels, m) in labels.iter().zip(metrics.stages.values()) {
            sample.clear();
            sample.push_str(name);
            sample.push_str(labels);
            sample.push(' ');
            write_number(&mut sample, value(m));
            sample.push('\n');
            out.write_all(sample.as_bytes())?;
        }
    }
    Ok(())
}

fn family(out: &mut dyn Write, name: &str, help: &str) -> io::Result<()> {
    debug_assert!(valid_metric_name(name), "{name}");
    writeln!(out, "# HELP {name} {}", escape_help(help))?;
    writeln!(out, "# TYPE {name} gauge")
}

/// A sample value: integers without a fraction, others as Rust prints them (never exponent form).
fn number(value: f64) -> String {
    let mut text = String::new();
    write_number(&mut text, value);
    text
}

/// [`number`], appended to `out`.
fn write_number(out: &mut String, value: f64) {
    use std::fmt::Write as _;
    let _ = if value.fract() == 0.0 && value.abs() < 1e15 {
        write!(out, "{}", value as i64)
    } else {
        write!(out, "{value}")
    };
}

/// A label value: `\`, `"` and newline escaped, as the format requires.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A HELP text: `\` and newline escaped.
fn escape_help(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Totals;

    fn sample() -> Metrics {
        let mut stages = std::collections::BTreeMap::new();
        stages.insert(
            "copy".to_string(),
            StageMetrics {
                wall_ms: 1500,
                cpu_user_ms: 20,
                cpu_sys_ms: 3,
                max_rss_kb: 2048,
                input_bytes: 10,
                output_bytes: 10,
                lines: 2,
                attempts: 1,
            },
        );
        stages.insert("we\"ird\\\nname".to_string(), StageMetrics::default());
        Metrics {
            version: 1,
            run_id: "r1".into(),
            totals: Totals {
                stages: 2,
                ran: 1,
                skipped: 1,
                wall_ms: 1600,
                ..Totals::default()
            },
            stages,
        }
    }

    #[test]
    fn renders_help_type_and_labelled_samples_in_base_units() {
        let text = render(&sample());
        assert!(text.ends_with('\n'));
        assert!(text.contains("# HELP pipe_stage_wall_seconds "));
        assert!(text.contains("# TYPE pipe_stage_wall_seconds gauge\n"));
        assert!(text.contains("pipe_stage_wall_seconds{run_id=\"r1\",stage=\"copy\"} 1.5\n"));
        assert!(text.contains("pipe_stage_max_rss_bytes{run_id=\"r1\",stage=\"copy\"} 2097152\n"));
        assert!(text.contains("pipe_run_wall_seconds{run_id=\"r1\"} 1.6\n"));
        assert!(text.contains("pipe_run_stages_by_status{run_id=\"r1\",status=\"skipped\"} 1\n"));
        assert!(
            text.contains("stage=\"we\\\"ird\\\\\\nname\"} 0\n"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split('{').next().unwrap();
            assert!(valid_metric_name(name), "{line}");
        }
    }

    #[test]
    fn metric_names_follow_the_format() {
        assert!(valid_metric_name("pipe_stage_lines"));
        assert!(!valid_metric_name("9lives"));
        assert!(!valid_metric_name("pipe-stage"));
        assert!(!valid_metric_name(""));
    }

    #[test]
    fn numbers_never_use_exponent_form() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(1e16), "10000000000000000");
        assert_eq!(number(0.001), "0.001");
    }
}
