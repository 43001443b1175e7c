//! Stage fingerprints (the idempotency key) and the reasons a stage is dirty.
//!
//! The key is blake3 over a canonical JSON encoding of [`Ingredients`]: the fingerprint schema
//! version, the stage name, the processor's identity (argv or built-in name, its version, and the
//! content hash of every processor file), the params, and every input's relative path and content
//! hash. Content, never mtime or absolute paths: touching a file or moving the project folder
//! changes nothing. Markers store the ingredients, not only the key, so the planner can say
//! exactly what changed (like cargo's fingerprint `DirtyReason`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Everything a stage's result depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ingredients {
    pub schema: u32,
    pub stage: String,
    pub processor: ProcessorIdentity,
    pub params: Value,
    /// Root-relative input path → blake3 of its content.
    pub inputs: BTreeMap<String, String>,
}

/// What identifies a processor's behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessorIdentity {
    /// `builtin:NAME@IMPLEMENTATION` for built-ins, the argv for commands.
    pub command: Vec<String>,
    pub version: String,
    /// Root-relative processor file → blake3 of its content.
    pub files: BTreeMap<String, String>,
}

impl Ingredients {
    /// A copy without the input list (which grows with the stage's inputs).
    pub fn without_inputs(&self) -> Ingredients {
        Ingredients {
            schema: self.schema,
            stage: self.stage.clone(),
            processor: self.processor.clone(),
            params: self.params.clone(),
            inputs: BTreeMap::new(),
        }
    }

    /// The fingerprint: blake3 of the canonical encoding, hex.
    pub fn key(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        self.write_canonical(&mut hasher)
            .expect("hashing does not fail");
        hasher.finalize().to_hex().to_string()
    }

    /// The canonical encoding (compact JSON, object keys sorted at every level: the bytes of
    /// `serde_json::to_vec(&canonical(&to_value(self)))`), streamed into `out`. The input list
    /// is written from the map itself (a `BTreeMap<String, _>` iterates in canonical key order):
    /// a map stage's list of 100,000 inputs is never copied into `Value`s.
    pub fn write_canonical(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        // Every field by name: a field added to `Ingredients` fails to compile here until it is
        // written (in its sorted place), so it can never be left out of the fingerprint.
        let Ingredients {
            schema,
            stage,
            processor,
            params,
            inputs,
        } = self;
        let json = |err: serde_json::Error| std::io::Error::other(err);
        out.write_all(b"{\"inputs\":{")?;
        for (i, (path, blake3)) in inputs.iter().enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            serde_json::to_writer(&mut *out, path).map_err(json)?;
            out.write_all(b":")?;
            serde_json::to_writer(&mut *out, blake3).map_err(json)?;
        }
        out.write_all(b"},\"params\":")?;
        serde_json::to_writer(&mut *out, &canonical(params)).map_err(json)?;
        out.write_all(b",\"processor\":")?;
        let processor = serde_json::to_value(processor).map_err(json)?;
        serde_json::to_writer(&mut *out, &canonical(&processor)).map_err(json)?;
        out.write_all(b",\"schema\":")?;
        serde_json::to_writer(&mut *out, schema).map_err(json)?;
        out.write_all(b",\"stage\":")?;
        serde_json::to_writer(&mut *out, stage).map_err(json)?;
        out.write_all(b"}")
    }
}

/// `value` with every object's keys sorted, whatever map type serde_json was built with.
pub fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Why a stage must run (shown by `--dry-run`, `status` and the build log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Reason {
    /// No marker: the stage never completed here.
    FirstRun,
    /// The marker exists but cannot be read.
    MarkerUnreadable {
        error: String,
    },
    /// The marker was written by another fingerprint schema.
    SchemaChanged,
    InputChanged {
        path: String,
        old: String,
        new: String,
    },
    InputAdded {
        path: String,
    },
    InputRemoved {
        path: String,
    },
    ParamChanged {
        key: String,
    },
    ProcessorVersionChanged {
        old: String,
        new: String,
    },
    ProcessorCommandChanged {
        old: Vec<String>,
        new: Vec<String>,
    },
    ProcessorFileChanged {
        path: String,
    },
    OutputMissing {
        path: String,
    },
    OutputModified {
        path: String,
    },
    /// An upstream stage will run first (decided for real once it has published).
    UpstreamRuns {
        stage: String,
    },
    /// Interrupted progress exists but no longer matches the stage (its inputs changed).
    StaleProgress,
    /// A crash interrupted publishing the outputs; the next build completes it.
    PublishInterrupted,
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(8)]
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::FirstRun => write!(f, "first run: no marker"),
            Reason::MarkerUnreadable { error } => write!(f, "marker unreadable: {error}"),
            Reason::SchemaChanged => write!(f, "fingerprint schema changed"),
            Reason::InputChanged { path, old, new } => {
                write!(f, "input {path} changed ({} → {})", short(old), short(new))
            }
            Reason::InputAdded { path } => write!(f, "input {path} added"),
            Reason::InputRemoved { path } => write!(f, "input {path} removed"),
            Reason::ParamChanged { key } => write!(f, "param `{key}` changed"),
            Reason::ProcessorVersionChanged { old, new } => {
                write!(f, "processor version changed ({old} → {new})")
            }
            Reason::ProcessorCommandChanged { old, new } => write!(
                f,
                "processor command changed ({} → {})",
                old.join(" "),
                new.join(" ")
            ),
            Reason::ProcessorFileChanged { path } => write!(f, "processor file {path} changed"),
            Reason::OutputMissing { path } => write!(f, "output {path} missing"),
            Reason::OutputModified { path } => write!(f, "output {path} modified"),
            Reason::UpstreamRuns { stage } => write!(f, "upstream {stage} runs"),
            Reason::StaleProgress => write!(
                f,
                "inputs changed since the interruption: restarting from zero"
            ),
            Reason::PublishInterrupted => {
                write!(f, "publishing was interrupted: the next build completes it")
            }
        }
    }
}

/// What differs between the ingredients of the last success (`old`) and now (`new`).
pub fn diff(old: &Ingredients, new: &Ingredients) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if old.schema != new.schema {
        reasons.push(Reason::SchemaChanged);
    }
    if old.processor.command != new.processor.command {
        reasons.push(Reason::ProcessorCommandChanged {
            old: old.processor.command.clone(),
            new: new.processor.command.clone(),
        });
    }
    if old.processor.version != new.processor.version {
        reasons.push(Reason::ProcessorVersionChanged {
            old: old.processor.version.clone(),
            new: new.processor.version.clone(),
        });
    }
    for path in changed_keys(&old.processor.files, &new.processor.files) {
        reasons.push(Reason::ProcessorFileChanged { path });
    }
    let empty = serde_json::Map::new();
    let old_params = old.params.as_object().unwrap_or(&empty);
    let new_params = new.params.as_object().unwrap_or(&empty);
    let keys: std::collections::BTreeSet<&String> =
        old_params.keys().chain(new_params.keys()).collect();
    for key in keys {
        if old_params.get(key) != new_params.get(key) {
            reasons.push(Reason::ParamChanged { key: key.clone() });
        }
    }
    for (path, new_hash) in &new.inputs {
        match old.inputs.get(path) {
            None => reasons.push(Reason::InputAdded { path: path.clone() }),
            Some(old_hash) if old_hash != new_hash => reasons.push(Reason::InputChanged {
                path: path.clone(),
                old: old_hash.clone(),
                new: new_hash.clone(),
            }),
            Some(_) => {}
        }
    }
    for path in old.inputs.keys().filter(|p| !new.inputs.contains_key(*p)) {
        reasons.push(Reason::InputRemoved { path: path.clone() });
    }
    reasons
}

fn changed_keys(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Ingredients {
        Ingredients {
            schema: 1,
            stage: "upper".into(),
            processor: ProcessorIdentity {
                command: vec!["python3".into(), "p.py".into()],
                version: "1".into(),
                files: BTreeMap::from([("p.py".into(), "aaaa".into())]),
            },
            params: json!({"mode": "ascii", "n": 1}),
            inputs: BTreeMap::from([
                ("in/a.txt".into(), "1111".into()),
                ("in/b.txt".into(), "2222".into()),
            ]),
        }
    }

    /// The key as it was computed before the encoding was streamed: the whole ingredients as a
    /// canonical `Value`, serialised, hashed.
    fn key_through_values(i: &Ingredients) -> String {
        let canonical = canonical(&serde_json::to_value(i).unwrap());
        blake3::hash(&serde_json::to_vec(&canonical).unwrap())
            .to_hex()
            .to_string()
    }

    #[test]
    fn the_streamed_encoding_is_the_canonical_value_form() {
        let mut cases = vec![base(), base().without_inputs()];
        let mut odd = base();
        odd.stage = "s\"t\\ü\u{1}".into();
        odd.params = json!({"z": [3, {"y": null, "b": 1.5}], "a": "é\n", "m": {"k": true}});
        odd.processor
            .files
            .insert("dir/ü \"f\".py".into(), "bbbb".into());
        odd.inputs = (0..500)
            .map(|i| (format!("in/{i}\t\"€\"/{}", 500 - i), format!("{i:064x}")))
            .collect();
        cases.push(odd);
        for i in &cases {
            let mut bytes = Vec::new();
            i.write_canonical(&mut bytes).unwrap();
            let want = serde_json::to_vec(&canonical(&serde_json::to_value(i).unwrap())).unwrap();
            assert_eq!(
                String::from_utf8(bytes).unwrap(),
                String::from_utf8(want).unwrap()
            );
            assert_eq!(i.key(), key_through_values(i));
        }
        // Pinned: a fingerprint written by an earlier build must still match.
        assert_eq!(
            base().key(),
            "0649f2fb5d0f5f613aa2757a76b075b88a8d392f35d0cb16d6c9655d1604d2ca"
        );
    }

    /// Every ingredient changes the key, and the diff names it.
    #[test]
    fn each_ingredient_changes_the_key_and_is_named() {
        type Change = (&'static str, fn(&mut Ingredients), Reason);
        let cases: Vec<Change> = vec![
            ("schema", |i| i.schema = 2, Reason::SchemaChanged),
            (
                "version",
                |i| i.processor.version = "2".into(),
                Reason::ProcessorVersionChanged {
                    old: "1".into(),
                    new: "2".into(),
                },
            ),
            (
                "command",
                |i| i.processor.command.push("-x".into()),
                Reason::ProcessorCommandChanged {
                    old: vec!["python3".into(), "p.py".into()],
                    new: vec!["python3".into(), "p.py".into(), "-x".into()],
                },
            ),
            (
                "file",
                |i| {
                    i.processor.files.insert("p.py".into(), "bbbb".into());
                },
                Reason::ProcessorFileChanged {
                    path: "p.py".into(),
                },
            ),
            (
                "param",
                |i| i.params = json!({"mode": "unicode", "n": 1}),
                Reason::ParamChanged { key: "mode".into() },
            ),
            (
                "input content",
                |i| {
                    i.inputs.insert("in/a.txt".into(), "9999".into());
                },
                Reason::InputChanged {
                    path: "in/a.txt".into(),
                    old: "1111".into(),
                    new: "9999".into(),
                },
            ),
            (
                "input added",
                |i| {
                    i.inputs.insert("in/c.txt".into(), "3333".into());
                },
                Reason::InputAdded {
                    path: "in/c.txt".into(),
                },
            ),
            (
                "input removed",
                |i| {
                    i.inputs.remove("in/b.txt");
                },
                Reason::InputRemoved {
                    path: "in/b.txt".into(),
                },
            ),
        ];
        for (name, change, reason) in cases {
            let mut changed = base();
            change(&mut changed);
            assert_ne!(changed.key(), base().key(), "{name} must change the key");
            assert_eq!(diff(&base(), &changed), vec![reason], "{name}");
        }
        // The stage name is an ingredient too (it is not reported as a reason: markers are per stage).
        let mut renamed = base();
        renamed.stage = "other".into();
        assert_ne!(renamed.key(), base().key());
    }

    #[test]
    fn the_key_is_canonical() {
        let mut reordered = base();
        reordered.params = serde_json::from_str(r#"{"n": 1, "mode": "ascii"}"#).unwrap();
        assert_eq!(reordered.key(), base().key());
        assert_eq!(base().key(), base().key());
        assert!(diff(&base(), &reordered).is_empty());
    }

    #[test]
    fn reasons_read_well() {
        let r = Reason::InputChanged {
            path: "input/a.txt".into(),
            old: "0123456789".into(),
            new: "abcdef0123".into(),
        };
        assert_eq!(
            r.to_string(),
            "input input/a.txt changed (01234567 → abcdef01)"
        );
        assert_eq!(serde_json::to_value(&r).unwrap()["kind"], "inputChanged");
    }
}
