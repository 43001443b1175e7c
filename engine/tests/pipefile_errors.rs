//! Every Pipefile validation error: exit 2, a message with file:line:col and a help, nothing
//! written. The messages are snapshot-tested (insta), so a change in wording is a reviewed change.

mod util;

use util::Project;

/// (snapshot name, Pipefile text). Each case has exactly one problem.
const CASES: &[(&str, &str)] = &[
    ("invalid_json", r#"{"version": 1, "stages": [ }"#),
    ("trailing_comma", "{\"version\": 1, \"stages\": [],\n}"),
    (
        "unknown_field",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out", "ouputs": 1}
]}"#,
    ),
    (
        "wrong_type",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": 1}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "empty_stage_name",
        r#"{"version": 1, "stages": [
  {"name": "", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "stage_name_not_a_file_name",
        r#"{"version": 1, "stages": [
  {"name": "a/b", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "duplicate_stage_name",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out1"},
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out2"}
]}"#,
    ),
    (
        "shared_output_dir",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"},
  {"name": "b", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "./out/"}
]}"#,
    ),
    (
        "nested_output_dirs",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"},
  {"name": "b", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out/inner"}
]}"#,
    ),
    (
        "after_unknown_stage",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out", "after": ["b"]}
]}"#,
    ),
    (
        "missing_input",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["nowhere"], "outputDir": "out"}
]}"#,
    ),
    (
        "missing_processor_program",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"command": ["./bin/missing.sh"], "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "missing_processor_file",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"command": ["python3", "p.py"], "version": "1", "files": ["lib/helper.py"]}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "unknown_builtin",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "lower", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "bad_builtin_param",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input"], "outputDir": "out", "params": {"mode": "shout"}}
]}"#,
    ),
    (
        "unknown_builtin_param",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "upper", "version": "1"}, "inputs": ["input"], "outputDir": "out", "params": {"mood": "ascii"}}
]}"#,
    ),
    (
        "cycle",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input", "out_c"], "outputDir": "out_a"},
  {"name": "b", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["out_a"], "outputDir": "out_b"},
  {"name": "c", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["out_b"], "outputDir": "out_c"}
]}"#,
    ),
    (
        "reads_own_output",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "input/out"}
]}"#,
    ),
    (
        "max_attempts_zero",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out", "retry": {"maxAttempts": 0}}
]}"#,
    ),
    (
        "base_delay_above_max",
        r#"{"version": 1, "settings": {"retry": {"baseDelayMs": 900, "maxDelayMs": 100}}, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "negative_delay",
        r#"{"version": 1, "settings": {"retry": {"baseDelayMs": -5}}, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
    (
        "output_in_reserved_dir",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "state/out"}
]}"#,
    ),
    (
        "path_leaves_project",
        r#"{"version": 1, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["../elsewhere"], "outputDir": "out"}
]}"#,
    ),
    (
        "stage_needs_more_than_quota",
        r#"{"version": 1, "settings": {"quotas": {"cpus": 1, "memoryMb": 100}}, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out", "resources": {"memoryMb": 200}}
]}"#,
    ),
    ("no_stages", r#"{"version": 1, "stages": []}"#),
    (
        "unsupported_version",
        r#"{"version": 2, "stages": [
  {"name": "a", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#,
    ),
];

#[test]
fn every_validation_error_is_located_exits_2_and_writes_nothing() {
    for (name, text) in CASES {
        let project = Project::new()
            .file("Pipefile.json", text)
            .file("input/a.txt", "hello\n");
        let before = project.tree();
        for args in [
            &["build"][..],
            &["build", "--dry-run"],
            &["check"],
            &["status"],
        ] {
            let out = project.pipe(args);
            assert_eq!(out.code, 2, "{name} {args:?}: exit code\n{}", out.stderr);
            assert!(
                out.stderr.contains("Pipefile.json:"),
                "{name}: no location in\n{}",
                out.stderr
            );
            assert_eq!(
                project.tree(),
                before,
                "{name} {args:?}: something was written"
            );
        }
        insta::assert_snapshot!(*name, project.pipe(&["check"]).stderr);
    }
}

#[test]
fn the_cpu_quota_must_fit_the_machine() {
    let cpus = std::thread::available_parallelism().unwrap().get() + 1;
    let text = format!(
        r#"{{"version": 1, "settings": {{"quotas": {{"cpus": {cpus}}}}}, "stages": [
  {{"name": "a", "processor": {{"builtin": "copy", "version": "1"}}, "inputs": ["input"], "outputDir": "out"}}
]}}"#
    );
    let project = Project::new()
        .file("Pipefile.json", &text)
        .file("input/a.txt", "x\n");
    let out = project.pipe(&["check"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("Pipefile.json:1:"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("CPU quota {cpus} does not fit this machine")),
        "{}",
        out.stderr
    );
}

#[test]
fn a_missing_pipefile_is_a_usage_error() {
    let project = Project::new();
    let out = project.pipe(&["build"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("cannot read the Pipefile `Pipefile.json`"),
        "{}",
        out.stderr
    );
    assert!(project.tree().is_empty());
}

#[test]
fn several_errors_are_all_reported() {
    let text = r#"{"version": 1, "stages": [
  {"name": "", "processor": {"builtin": "lower", "version": "1"}, "inputs": ["nowhere"], "outputDir": "out"}
]}"#;
    let project = Project::new().file("Pipefile.json", text);
    let out = project.pipe(&["check"]);
    assert_eq!(out.code, 2);
    for expected in ["must not be empty", "unknown built-in", "does not exist"] {
        assert!(
            out.stderr.contains(expected),
            "missing {expected:?} in\n{}",
            out.stderr
        );
    }
}

#[test]
fn json_message_format_reports_errors_as_events() {
    let project = Project::new().file("Pipefile.json", r#"{"version": 1, "stages": [ }"#);
    let out = project.pipe(&["--message-format", "json", "check"]);
    assert_eq!(out.code, 2);
    let event: serde_json::Value =
        serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(event["event"], "pipefileError");
    assert_eq!(event["location"], "Pipefile.json:1:27");
}
