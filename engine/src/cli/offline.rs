//! The offline guard on the command line: the static scan's report, the preflight of a build
//! (scan, then which runtime layers this machine offers), and `pipe check [--sandbox]`.

use super::{Output, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::graph::Graph;
use crate::sandbox::{self, canary, scan, Guard, Options, Probe};
use crate::spec::Spec;

/// `--offline-guard`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum OfflineGuard {
    /// The static scan and every runtime sandbox layer the kernel offers (at least one)
    #[default]
    Strict,
    /// The static scan only: processors run without namespace, Landlock or seccomp
    Static,
}

impl From<OfflineGuard> for Guard {
    fn from(g: OfflineGuard) -> Guard {
        match g {
            OfflineGuard::Strict => Guard::Strict,
            OfflineGuard::Static => Guard::Static,
        }
    }
}

/// Reports the static-scan findings of stages `indices`: the allowed ones, or `None` when one is
/// not allowed.
fn report_scan(
    spec: &Spec,
    indices: impl IntoIterator<Item = usize>,
    out: &Output,
) -> Option<Vec<scan::Finding>> {
    let findings = scan::scan(spec, indices);
    let mut clean = true;
    for f in &findings {
        if out.json {
            let mut event = serde_json::to_value(f).expect("findings serialise");
            event["event"] = "offlineFinding".into();
            out.stdout(&event.to_string());
        }
        if f.allowed {
            if !out.quiet {
                out.stderr(&format!(
                    "warning: {f}: allowed by the stage's `offline.allowStaticFindings`"
                ));
            }
        } else {
            clean = false;
            out.error(&format!(
                "{f}\n  help: a pipe build never touches the network: remove it, or if it cannot reach one, allow the rule for this stage with \"offline\": {{\"allowStaticFindings\": [\"{}\"]}}",
                f.rule
            ));
        }
    }
    clean.then(|| findings.into_iter().filter(|f| f.allowed).collect())
}

/// Before a build: the static scan of the selected stages, then (strict guard) the probe of the
/// runtime layers (`probe` gives its report). The sandbox options, or the exit code when the build
/// must not start.
pub(super) fn preflight(
    spec: &Spec,
    graph: &Graph,
    targets: &[String],
    guard: OfflineGuard,
    debug: bool,
    probe: impl FnOnce() -> Result<Probe, String>,
    out: &Output,
) -> Result<Options, u8> {
    let selected = match crate::build::selection(spec, graph, targets) {
        Ok(s) => s,
        Err(name) => {
            out.error(&format!("unknown stage `{name}`"));
            return Err(EXIT_INVALID);
        }
    };
    let Some(allowed_findings) = report_scan(spec, selected.iter().copied(), out) else {
        out.error("the offline guard's static scan failed: nothing was run");
        return Err(EXIT_INVALID);
    };
    if let Some(Err(err)) = sandbox::engine_filter() {
        out.stderr(&format!(
            "warning: pipe could not install its own socket filter: {err}"
        ));
    }
    let guard = Guard::from(guard);
    if guard == Guard::Static {
        if !out.quiet {
            out.stderr("warning: --offline-guard=static: processors run without the runtime sandbox (static scan only)");
        }
        return Ok(Options {
            guard,
            debug,
            probe: Probe::default(),
            allowed_findings,
        });
    }
    let probe = match probe() {
        Ok(p) => p,
        Err(err) => {
            out.error(&format!("cannot probe the offline sandbox: {err}"));
            return Err(EXIT_INVALID);
        }
    };
    if !probe.any_network_layer() {
        out.error(&format!(
            "no runtime offline layer is available on this machine, so processors could reach a network:\n{}\n  help: run `pipe check --sandbox` for details; `--offline-guard=static` runs with the static scan only (recorded)",
            probe.explain()
        ));
        return Err(EXIT_INVALID);
    }
    if !probe.landlock.ok {
        if let Some(i) = selected.iter().find(|&&i| spec.stages[i].hermetic) {
            out.error(&format!(
                "stage `{}` is hermetic, which needs Landlock, but this kernel has none: {}",
                spec.stages[*i].name, probe.landlock.detail
            ));
            return Err(EXIT_INVALID);
        }
        if !out.quiet {
            out.stderr(&format!(
                "warning: no Landlock ({}): processors may write outside their staging folders",
                probe.landlock.detail
            ));
        }
    }
    Ok(Options {
        guard,
        debug,
        probe,
        allowed_findings,
    })
}

/// `pipe check [--sandbox]`: the Pipefile is valid (else we would not be here), the static scan,
/// and with `--sandbox` the canaries.
pub(super) fn check(spec: &Spec, out: &Output, with_sandbox: bool) -> u8 {
    if report_scan(spec, 0..spec.stages.len(), out).is_none() {
        return EXIT_INVALID;
    }
    if !out.quiet {
        out.stderr(&format!("{}: ok ({} stages)", spec.file, spec.stages.len()));
    }
    if !with_sandbox {
        return EXIT_OK;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            out.error(&format!("cannot find the pipe binary: {err}"));
            return EXIT_FAILED;
        }
    };
    let filter = sandbox::engine_filter()
        .cloned()
        .unwrap_or_else(|| Err("not installed".into()));
    let (lines, code) = canary::run_check(&exe, canary::take_listener(), &filter);
    for line in &lines {
        if out.json {
            let mut event = serde_json::to_value(line).expect("lines serialise");
            event["event"] = "sandboxCheck".into();
            out.stdout(&event.to_string());
        } else {
            out.stderr(&format!(
                "sandbox: {}: {}: {}",
                line.layer, line.status, line.detail
            ));
        }
    }
    match code {
        0 => {
            if !out.quiet {
                out.stderr("sandbox: ok: no canary reached the loopback listener");
            }
            EXIT_OK
        }
        2 => {
            out.error("no runtime offline layer is available on this machine");
            EXIT_INVALID
        }
        _ => {
            out.error("the offline sandbox does not hold on this machine (see the FAILED lines)");
            EXIT_FAILED
        }
    }
}
