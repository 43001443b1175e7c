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
        if marker.version != MARKER_VERSION {
            return Err(format!(
                "marker version {} is not {MARKER_VERSION}",
                marker.version
            ));
        }
        Ok(Some(marker))
    }
}
