//! The offline guard's part of a stage: `hermetic`, `offline` and `sandbox` (see
//! `docs/offline.md`), merged with the settings' defaults and checked.

use std::path::PathBuf;

use super::super::raw::{RawSandbox, RawSettings, RawStage};
use super::super::{Offline, SandboxPaths, Stage};
use super::{processor_path, Validator};

impl Validator<'_> {
    /// Fills `stage`'s offline fields from `raw` (stage `i`) and the settings.
    pub(super) fn offline_fields(
        &mut self,
        i: usize,
        raw: &RawStage,
        settings: &RawSettings,
        stage: &mut Stage,
    ) {
        stage.hermetic = raw.hermetic.or(settings.hermetic).unwrap_or(false);
        let rules = crate::sandbox::scan::rule_ids();
        let mut allowed = Vec::new();
        for (j, rule) in raw
            .offline
            .iter()
            .flat_map(|o| o.allow_static_findings.iter())
            .enumerate()
        {
            if rules.contains(&rule.as_str()) {
                allowed.push(rule.clone());
            } else {
                self.error(
                    &format!("/stages/{i}/offline/allowStaticFindings/{j}"),
                    format!("unknown static-scan rule `{rule}`"),
                    "no such rule",
                    Some(format!("rules: {}", rules.join(", "))),
                );
            }
        }
        stage.offline = Offline {
            allow_static_findings: allowed,
        };
        let mut paths = SandboxPaths::default();
        // The settings' paths are checked (and reported) once, with the first stage.
        if let Some(s) = &settings.sandbox {
            self.sandbox_paths(s, "/settings/sandbox", i == 0, &mut paths);
        }
        if let Some(s) = &raw.sandbox {
            self.sandbox_paths(s, &format!("/stages/{i}/sandbox"), true, &mut paths);
        }
        stage.sandbox = paths;
    }

    fn sandbox_paths(
        &mut self,
        raw: &RawSandbox,
        pointer: &str,
        report: bool,
        into: &mut SandboxPaths,
    ) {
        for (j, name) in raw.pass_env.iter().enumerate() {
            let proxy = name.to_ascii_uppercase().ends_with("_PROXY");
            if name.is_empty() || name.contains('=') || proxy {
                if report {
                    self.error(
                        &format!("{pointer}/passEnv/{j}"),
                        if proxy {
                            format!("`{name}` is a proxy setting, which never reaches a processor")
                        } else {
                            format!("`{name}` is not an environment variable name")
                        },
                        "not passed",
                        None,
                    );
                }
            } else if !into.pass_env.contains(name) {
                into.pass_env.push(name.clone());
            }
        }
        for (field, list, out) in [
            ("readablePaths", &raw.readable_paths, &mut into.readable),
            ("writablePaths", &raw.writable_paths, &mut into.writable),
        ] {
            for (j, path) in list.iter().enumerate() {
                let resolved = match processor_path(path) {
                    Some(p) if p.starts_with('/') => Some(PathBuf::from(p)),
                    Some(p) => Some(self.root.join(p)),
                    // `.` and the like: the project folder itself
                    None if !path.is_empty() && !path.starts_with('/') => {
                        Some(self.root.to_path_buf())
                    }
                    None => None,
                };
                match resolved {
                    Some(abs) if abs.exists() => out.push(abs),
                    _ if !report => {}
                    _ => self.error(
                        &format!("{pointer}/{field}/{j}"),
                        format!("sandbox path `{path}` does not exist"),
                        "no such file or folder",
                        Some(
                            "paths are relative to the Pipefile's folder, or absolute; the sandbox can only allow what exists".into(),
                        ),
                    ),
                }
            }
        }
    }
}
