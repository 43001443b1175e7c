//! The `.<stage>.done` marker: proof that a stage's outputs are complete and what produced them.
//!
//! **Architecture invariant:** a marker is written only after its outputs are published, and it is
//! the last thing a stage writes. Downstream stages and skip decisions trust only the marker.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fingerprint::Ingredients;

/// Version of the marker format.
pub const MARKER_VERSION: u32 = 1;

/// One published output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEntry {
    /// Relative to the output folder, `/`-separated.
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// The completion marker of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    pub version: u32,
    pub stage: String,
    pub fingerprint: String,
    pub run_id: String,
    pub finished_at: String,
    pub outputs: Vec<OutputEntry>,
    pub ingredients: Ingredients,
    /// Map stages only: each input file's own fingerprint and the outputs it produced.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub items: BTreeMap<String, ItemEntry>,
}

/// One item of a map stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemEntry {
    pub fingerprint: String,
    /// Output paths (relative to the output folder) this item produced.
    pub outputs: Vec<String>,
}

impl Marker {
    /// Reads a marker: `Ok(None)` when there is none, `Err` with a reason when it is unreadable.
    pub fn read(path: &Path) -> Result<Option<Marker>, String> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err.to_string()),
        };
        let marker: Marker =
            serde_json::from_slice(&bytes).map_err(|err| format!("invalid marker JSON: {err}"))?;
        check_version(marker)
    }

    /// [`Marker::read`] without keeping the map items (`items` is left empty): they are read and
    /// checked as `read` checks them, so the result is the same, but not kept, and the file is
    /// parsed as it is read, not held whole. An unreadable marker is read again by `read`, for
    /// its error. For readers that need the stage's
    /// outputs and ingredients only (the audit record of a map stage of 100,000 items).
    pub fn read_without_items(path: &Path) -> Result<Option<Marker>, String> {
        Marker::read_without_items_whole_up_to(path, WHOLE_READ_BYTES)
    }

    /// [`Marker::read_without_items`], reading a file of up to `whole_up_to` bytes whole.
    fn read_without_items_whole_up_to(
        path: &Path,
        whole_up_to: u64,
    ) -> Result<Option<Marker>, String> {
        use std::io::Read;
        let mut file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err.to_string()),
        };
        // A marker up to a few MiB (a fan-in over 10,000 stages: 2.6 MB) is parsed from memory,
        // about twice as fast as through a reader; a bigger one is streamed.
        let parsed = match file.metadata() {
            Ok(meta) if meta.len() <= whole_up_to => {
                let mut bytes = Vec::with_capacity(meta.len() as usize);
                file.read_to_end(&mut bytes)
                    .ok()
                    .and_then(|_| serde_json::from_slice::<WithoutItems>(&bytes).ok())
            }
            _ => {
                let reader = std::io::BufReader::with_capacity(64 * 1024, file);
                serde_json::from_reader::<_, WithoutItems>(reader).ok()
            }
        };
        let Some(marker) = parsed else {
            // Unreadable: `read` says why in its words (a reader's error positions can differ
            // from a slice's by a column).
            return Marker::read(path).and_then(|_| Err("the marker changed while read".into()));
        };
        let m = marker;
        check_version(Marker {
            version: m.version,
            stage: m.stage,
            fingerprint: m.fingerprint,
            run_id: m.run_id,
            finished_at: m.finished_at,
            outputs: m.outputs,
            ingredients: m.ingredients,
            items: BTreeMap::new(),
        })
    }
}

/// [`Marker::read_without_items`] reads a marker up to this size whole.
const WHOLE_READ_BYTES: u64 = 4 << 20;

fn check_version(marker: Marker) -> Result<Option<Marker>, String> {
    if marker.version != MARKER_VERSION {
        return Err(format!(
            "marker version {} is not {MARKER_VERSION}",
            marker.version
        ));
    }
    Ok(Some(marker))
}

/// [`Marker`] with its items checked and dropped ([`CheckedItems`]): the same fields, types and
/// defaults, so it accepts and rejects what `Marker` does, with the same messages.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WithoutItems {
    version: u32,
    stage: String,
    fingerprint: String,
    run_id: String,
    finished_at: String,
    outputs: Vec<OutputEntry>,
    ingredients: Ingredients,
    #[serde(default)]
    #[allow(dead_code)]
    items: CheckedItems,
}

/// A map of item entries, each deserialised (so checked) as `BTreeMap<String, ItemEntry>` would
/// and then dropped.
#[derive(Default)]
struct CheckedItems;

impl<'de> Deserialize<'de> for CheckedItems {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CheckedItems;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<CheckedItems, A::Error> {
                while map.next_entry::<String, ItemEntry>()?.is_some() {}
                Ok(CheckedItems)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_without_items_reads_and_rejects_what_read_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.done");
        let marker = serde_json::json!({
            "version": 1, "stage": "s", "fingerprint": "f", "runId": "r",
            "finishedAt": "t", "outputs": [{"path": "a", "size": 1, "blake3": "h"}],
            "ingredients": {"schema": 1, "stage": "s",
                "processor": {"command": ["c"], "version": "1", "files": {}},
                "params": {"p": 1}, "inputs": {"in/a": "h"}},
            "items": {"in/a": {"fingerprint": "g", "outputs": ["a"]}},
            "unknown": true
        });
        let mut cases: Vec<serde_json::Value> = vec![marker.clone()];
        let mut without = marker.clone();
        without.as_object_mut().unwrap().remove("items");
        cases.push(without);
        for (key, bad) in [
            ("items", serde_json::json!("x")),
            (
                "items",
                serde_json::json!({"in/a": {"fingerprint": 1, "outputs": []}}),
            ),
            ("items", serde_json::json!({"in/a": {"outputs": []}})),
            ("items", serde_json::json!([])),
            ("version", serde_json::json!(2)),
            ("outputs", serde_json::json!({})),
        ] {
            let mut m = marker.clone();
            m[key] = bad;
            cases.push(m);
        }
        let mut missing = marker.clone();
        missing.as_object_mut().unwrap().remove("runId");
        cases.push(missing);
        let texts: Vec<Vec<u8>> = cases
            .iter()
            .map(|c| serde_json::to_vec_pretty(c).unwrap())
            .chain([b"{\"version\": 1,".to_vec(), b"".to_vec(), b"[]".to_vec()])
            .chain([b"{\"version\":1} x".to_vec()])
            .collect();
        // Read whole and streamed alike.
        for whole_up_to in [u64::MAX, 0] {
            let mut oks = 0;
            for text in &texts {
                std::fs::write(&path, text).unwrap();
                let full = Marker::read(&path);
                let light = Marker::read_without_items_whole_up_to(&path, whole_up_to);
                match (full, light) {
                    (Ok(Some(mut full)), Ok(Some(light))) => {
                        oks += 1;
                        full.items.clear();
                        assert_eq!(full, light);
                    }
                    (full, light) => {
                        assert_eq!(full, light, "{}", String::from_utf8_lossy(text))
                    }
                }
            }
            assert_eq!(oks, 2);
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Marker::read_without_items(&path), Ok(None));
        std::fs::create_dir(&path).unwrap();
        assert_eq!(
            Marker::read(&path).unwrap_err(),
            Marker::read_without_items(&path).unwrap_err()
        );
    }
}
