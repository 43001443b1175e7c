//! `docs/cli.md` must list exactly the commands, arguments, flags and exit codes that the clap
//! definition (what `--help` prints) has: this test generates the page from `Cli::command()` and
//! compares. Regenerate after changing the command line with
//! `UPDATE_CLI_DOCS=1 cargo test -p pipe-engine --test cli_docs`.

use clap::{Arg, ArgAction, Command, CommandFactory};
use pipe_engine::cli::{Cli, EXIT_CODES};

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md");

#[test]
fn docs_cli_md_matches_the_command_line() {
    let expected = markdown();
    if std::env::var_os("UPDATE_CLI_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(PATH, &expected).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(PATH).unwrap_or_default();
    if committed != expected {
        let first = committed
            .lines()
            .zip(expected.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(expected.lines().count()));
        panic!(
            "docs/cli.md is out of date with the clap definition (first difference at line {}):\n  \
             docs:     {:?}\n  expected: {:?}\nregenerate with `UPDATE_CLI_DOCS=1 cargo test -p \
             pipe-engine --test cli_docs`",
            first + 1,
            committed.lines().nth(first).unwrap_or("<end of file>"),
            expected.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

#[test]
fn every_visible_command_and_flag_is_in_the_generated_page() {
    let page = markdown();
    let mut cmd = Cli::command();
    cmd.build();
    let mut todo: Vec<(String, Command)> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| (format!("pipe {}", s.get_name()), s.clone()))
        .collect();
    while let Some((name, sub)) = todo.pop() {
        assert!(page.contains(&format!("`{name}`\n")), "{name} is missing");
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                assert!(page.contains(&format!("--{long}")), "{long}");
            }
        }
        for child in sub
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            todo.push((format!("{name} {}", child.get_name()), child.clone()));
        }
    }
    for (code, _) in EXIT_CODES {
        assert!(page.contains(&format!("| {code} |")));
    }
}

fn markdown() -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let mut out = String::new();
    out.push_str("# `pipe` command line\n\n");
    out.push_str(
        "<!-- Generated from the clap definition by engine/tests/cli_docs.rs, which fails when this \
         page is stale. Do not edit by hand: change the definition in engine/src/cli.rs, then run \
         `UPDATE_CLI_DOCS=1 cargo test -p pipe-engine --test cli_docs`. -->\n\n",
    );
    out.push_str(&format!("{}\n\n", text(cmd.get_about())));
    out.push_str(&format!("Usage: `{}`\n\n", usage(&mut cmd)));
    out.push_str(
        "`pipe --version` prints the release and the fingerprint schema it writes; `-h` / `--help` \
         on any command prints its help; `pipe man` prints the man page and `pipe completions \
         SHELL` a shell completion script.\n\n",
    );

    out.push_str("## Global options\n\nAccepted by every command, before or after it.\n\n");
    let globals: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set() && !a.is_hide_set())
        .collect();
    table(&mut out, &globals);

    let seed: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_global_set() && !a.is_hide_set() && !is_builtin(a))
        .collect();
    out.push_str(
        "## Without a command\n\n`pipe [OPTIONS]` without a command builds, as `pipe build` does; \
         these build options are accepted there too.\n\n",
    );
    table(&mut out, &seed);

    out.push_str("## Commands\n\n| command | does |\n| --- | --- |\n");
    let subs: Vec<Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    for sub in &subs {
        out.push_str(&format!(
            "| [`pipe {name}`](#pipe-{name}) | {} |\n",
            cell(&text(sub.get_about())),
            name = sub.get_name()
        ));
    }
    out.push('\n');
    for sub in subs {
        section(&mut out, sub, "pipe", 3);
    }

    out.push_str("## Exit codes\n\n| code | meaning |\n| --- | --- |\n");
    for (code, meaning) in EXIT_CODES {
        out.push_str(&format!("| {code} | {} |\n", cell(meaning)));
    }
    out.push_str(
        "\nEnvironment: `NO_COLOR` (any value) turns colour off unless `--color always`. The live \
         progress display is shown only when stderr is a terminal (not with `-q`, \
         `--message-format json` or `TERM=dumb`).\n",
    );
    out
}

/// One command's section, then its own visible subcommands' sections one heading level deeper.
fn section(out: &mut String, mut sub: Command, parent: &str, level: usize) {
    let name = format!("{parent} {}", sub.get_name());
    out.push_str(&format!("{} `{name}`\n\n", "#".repeat(level)));
    let about = sub
        .get_long_about()
        .or_else(|| sub.get_about())
        .map(ToString::to_string)
        .unwrap_or_default();
    out.push_str(&format!("{}\n\n", about.trim()));
    out.push_str(&format!("Usage: `{}`\n\n", usage(&mut sub)));
    let own: Vec<&Arg> = sub
        .get_arguments()
        .filter(|a| !a.is_global_set() && !a.is_hide_set() && !is_builtin(a))
        .collect();
    if own.is_empty() {
        out.push_str("No arguments or options of its own (global options apply).\n\n");
    } else {
        table(out, &own);
    }
    let nested: Vec<Command> = sub
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .cloned()
        .collect();
    for child in nested {
        section(out, child, &name, level + 1);
    }
}

/// `-h/--help` and `-V/--version`, which clap adds: described once in the intro.
fn is_builtin(arg: &Arg) -> bool {
    matches!(
        arg.get_action(),
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
    )
}

fn usage(cmd: &mut Command) -> String {
    let rendered = cmd.render_usage().to_string();
    rendered.trim_start_matches("Usage:").trim().to_string()
}

fn table(out: &mut String, args: &[&Arg]) {
    out.push_str("| argument | meaning | default | values |\n| --- | --- | --- | --- |\n");
    for arg in args {
        let flag = matches!(
            arg.get_action(),
            ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
        );
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .filter(|_| !flag)
            .map(|v| format!("`{}`", v.to_string_lossy()))
            .collect();
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            spelling(arg),
            cell(&text(arg.get_long_help().or_else(|| arg.get_help()))),
            defaults.join(", "),
            values.join(", ")
        ));
    }
    out.push('\n');
}

/// `-f, --pipeline FILE` (aliases too), or `STAGE...` for a positional.
fn spelling(arg: &Arg) -> String {
    let value = arg
        .get_value_names()
        .map(|names| {
            names
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
    let many = matches!(arg.get_action(), ArgAction::Append)
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
    if arg.is_positional() {
        let dots = if many { "..." } else { "" };
        return if arg.is_required_set() {
            format!("`{value}{dots}`")
        } else {
            format!("`[{value}]{dots}`")
        };
    }
    let mut names = Vec::new();
    if let Some(short) = arg.get_short() {
        names.push(format!("-{short}"));
    }
    if let Some(long) = arg.get_long() {
        names.push(format!("--{long}"));
    }
    for alias in arg.get_visible_aliases().unwrap_or_default() {
        names.push(format!("--{alias}"));
    }
    let mut spelled = names.join(", ");
    if arg.get_action().takes_values() {
        let optional = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
        if optional {
            spelled.push_str(&format!("[={value}]"));
        } else {
            spelled.push_str(&format!(" {value}"));
        }
    } else if matches!(arg.get_action(), ArgAction::Count) {
        return format!("`{spelled}` (repeatable)");
    }
    format!("`{spelled}`")
}

fn text(styled: Option<&clap::builder::StyledStr>) -> String {
    styled.map(ToString::to_string).unwrap_or_default()
}

/// Text safe inside a markdown table cell.
fn cell(text: &str) -> String {
    text.trim().replace('|', "\\|").replace('\n', " ")
}
