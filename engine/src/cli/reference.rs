//! `pipe completions SHELL` and `pipe man [SUBCOMMAND]`: shell completion scripts (clap_complete)
//! and man pages (clap_mangen), both generated from the clap definition so they cannot go stale.

use std::io::Write;

use clap::{CommandFactory, ValueEnum};
use clap_complete::Shell;

use super::{Cli, EXIT_CODES};

/// Shells `pipe completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum CompletionShell {
    Bash,
    Zsh,
    Fish,
    Powershell,
}

/// Writes the completion script for `shell`.
pub(super) fn completions(shell: CompletionShell, out: &mut dyn Write) {
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
        CompletionShell::Powershell => Shell::PowerShell,
    };
    // Generated into memory first: clap_complete panics on a write error (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "pipe", &mut script);
    let _ = out.write_all(&script);
}

/// Writes the man page (roff) of `pipe`, or of `pipe SUBCOMMAND` as `pipe-SUBCOMMAND(1)`.
/// `Err` names an unknown subcommand.
pub(super) fn man(subcommand: Option<&str>, out: &mut dyn Write) -> Result<(), String> {
    let mut root = Cli::command();
    root.build();
    let cmd = match subcommand {
        None => root,
        Some(name) => {
            // Built, a subcommand is displayed as `pipe-NAME` and used as `pipe NAME`.
            root.find_subcommand(name)
                .filter(|c| !c.is_hide_set())
                .ok_or_else(|| format!("unknown subcommand `{name}`"))?
                .clone()
        }
    };
    let page = clap_mangen::Man::new(cmd).source(concat!("pipe ", env!("CARGO_PKG_VERSION")));
    let mut roff = Vec::new();
    page.render(&mut roff).map_err(|err| err.to_string())?;
    let mut roff = String::from_utf8(roff).map_err(|err| err.to_string())?;
    if subcommand.is_none() {
        let at = roff.find(".SH VERSION").unwrap_or(roff.len());
        roff.insert_str(at, &exit_status_section());
    }
    out.write_all(roff.as_bytes())
        .map_err(|err| err.to_string())
}

/// The EXIT STATUS section of pipe(1), from [`EXIT_CODES`].
fn exit_status_section() -> String {
    let mut section = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in EXIT_CODES {
        section.push_str(&format!(".TP\n\\fB{code}\\fR\n{}\n", roff_text(meaning)));
    }
    section
}

/// Text safe in a roff body line: backslashes doubled, no leading `.` or `'`.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('-', "\\-");
    match escaped.chars().next() {
        Some('.' | '\'') => format!("\\&{escaped}"),
        _ => escaped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut buf = Vec::new();
        f(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn completions_know_the_subcommands() {
        for shell in CompletionShell::value_variants() {
            let script = text(|b| completions(*shell, b));
            assert!(
                script.contains("build") && script.contains("completions"),
                "{shell:?}"
            );
        }
    }

    #[test]
    fn the_man_page_has_the_sections_and_exit_codes() {
        let page = text(|b| man(None, b).unwrap());
        assert!(
            page.starts_with(".ie") || page.contains(".TH pipe 1"),
            "{page}"
        );
        for section in [
            "NAME",
            "SYNOPSIS",
            "OPTIONS",
            "SUBCOMMANDS",
            "\"EXIT STATUS\"",
        ] {
            assert!(
                page.contains(&format!(".SH {section}")),
                "{section}\n{page}"
            );
        }
        assert!(page.contains("\\fB130\\fR"));
        let build = text(|b| man(Some("build"), b).unwrap());
        assert!(
            build.contains("pipe\\-build") && build.contains("dry\\-run"),
            "{build}"
        );
        assert!(man(Some("nope"), &mut Vec::new()).is_err());
    }
}
