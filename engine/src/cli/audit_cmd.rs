//! `pipe audit verify|show` and the `--audit-key` option. Part of the CLI (the only code that
//! prints); the work is in [`crate::audit`]. Read-only: no lock, nothing written.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::{Output, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::audit::{self, Filter, KeptHead, Key};
use crate::workspace::Workspace;

/// `--audit-key FILE` (else `$PIPE_AUDIT_KEY`).
#[derive(Debug, Args, Default)]
pub(super) struct KeyArg {
    /// Authenticate audit records with the HMAC-SHA256 key in FILE; keep it outside the workspace
    /// [env: PIPE_AUDIT_KEY]
    #[arg(long, value_name = "FILE")]
    audit_key: Option<PathBuf>,
}

impl KeyArg {
    /// The key, if one is given; `Err(exit code)` after printing why it cannot be used.
    pub(super) fn load(&self, root: &Path, out: &Output) -> Result<Option<Key>, u8> {
        let path = self.audit_key.clone().or_else(|| {
            std::env::var_os(audit::KEY_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let Some(path) = path else {
            return Ok(None);
        };
        match Key::from_file(&path) {
            Ok(key) => {
                if std::path::absolute(&path).is_ok_and(|p| p.starts_with(root)) {
                    out.stderr(&format!(
                        "warning: the audit key `{}` is inside the workspace: whoever can rewrite \
                         the log can read it; keep it elsewhere",
                        path.display()
                    ));
                }
                Ok(Some(key))
            }
            Err(message) => {
                out.error(&message);
                Err(EXIT_INVALID)
            }
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk the hash chain: OK with the record count and head, or exit 1 naming the first bad record
    Verify {
        /// A head kept elsewhere (SEQ:HASH as printed by `pipe build`, or HASH): the log must
        /// still contain it unchanged
        #[arg(long, value_name = "[SEQ:]HASH")]
        head: Option<KeptHead>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Print the audit records, oldest first (does not verify them)
    Show {
        /// Only records about this stage
        #[arg(long, value_name = "STAGE")]
        stage: Option<String>,
        /// Only records of this run
        #[arg(long, value_name = "RUN")]
        run: Option<String>,
    },
}

/// Runs `pipe audit ...` in the folder of the pipeline file (which need not be valid).
pub(super) fn run(args: AuditArgs, pipeline: Option<PathBuf>, out: &Output) -> u8 {
    let file = super::pipefile_path(pipeline);
    let root = std::path::absolute(&file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let state = Workspace { root: root.clone() }.state_dir();
    match args.command {
        AuditCommand::Verify { head, key } => {
            let key = match key.load(&root, out) {
                Ok(key) => key,
                Err(code) => return code,
            };
            verify(&state, key.as_ref(), head.as_ref(), out)
        }
        AuditCommand::Show { stage, run } => show(&state, &Filter { stage, run }, out),
    }
}

fn verify(state: &Path, key: Option<&Key>, kept: Option<&KeptHead>, out: &Output) -> u8 {
    let verdict = match audit::verify(state, key, kept) {
        Ok(verdict) => verdict,
        Err(err) => {
            out.error(&format!("cannot read the audit log: {err}"));
            return EXIT_FAILED;
        }
    };
    match verdict {
        Ok(ok) => {
            let mut notes = ok.notes.clone();
            if ok.hmacs_unchecked {
                notes.push(format!(
                    "the records carry HMACs that were not checked: give the key (--audit-key \
                     FILE or {}) to authenticate them",
                    audit::KEY_ENV
                ));
            }
            if key.is_none() {
                notes.push(if kept.is_some() {
                    "the kept head is in the chain, so nothing up to it was changed; records after \
                     it could have been rewritten with recomputed hashes, which only a key \
                     (--audit-key FILE) detects"
                        .to_string()
                } else {
                    "without a key, a rewrite of the whole log whose hashes were all recomputed \
                     cannot be detected: compare with a head kept elsewhere (--head SEQ:HASH) or \
                     use a key (--audit-key FILE) to close that gap"
                        .to_string()
                });
            }
            let head = ok.head.as_ref().map(ToString::to_string);
            if out.json {
                out.stdout(
                    &serde_json::json!({"event": "auditVerify", "ok": true, "records": ok.records,
                        "head": head, "authenticated": ok.authenticated,
                        "keptHead": kept.map(|_| ok.kept_head_found), "notes": notes})
                    .to_string(),
                );
            } else if !out.quiet {
                out.stdout(&match &head {
                    Some(head) => format!("audit log OK: {} records, head {head}", ok.records),
                    None => "audit log OK: no records yet".to_string(),
                });
                if ok.authenticated {
                    out.stdout("every record and the head are authenticated with the key");
                }
                for note in notes {
                    out.stdout(&format!("note: {note}"));
                }
            }
            EXIT_OK
        }
        Err(bad) => {
            if out.json {
                out.stdout(
                    &serde_json::json!({"event": "auditVerify", "ok": false, "seq": bad.seq,
                        "line": bad.line, "reason": bad.reason, "message": bad.to_string()})
                    .to_string(),
                );
            }
            out.error(&format!("audit log verification failed: {bad}"));
            EXIT_FAILED
        }
    }
}

fn show(state: &Path, filter: &Filter, out: &Output) -> u8 {
    let records = match audit::read_all(state) {
        Ok(records) => records,
        Err(err) => {
            out.error(&format!("cannot read the audit log: {err}"));
            return EXIT_FAILED;
        }
    };
    let mut first = true;
    for record in records {
        match record {
            Ok(record) if filter.matches(&record) => {
                if out.json {
                    out.stdout(&audit::to_json_line(&record));
                } else {
                    if !first {
                        out.stdout("");
                    }
                    out.stdout(&audit::render(&record));
                }
                first = false;
            }
            Ok(_) => {}
            Err((line, why)) => {
                out.stderr(&format!("warning: state/audit.jsonl line {line}: {why}"))
            }
        }
    }
    EXIT_OK
}
