//! Run ids: one name per run, forever. Generated ids sort by time.

use std::fmt::Write;

/// A fresh run id: UTC timestamp plus 6 random hex digits, e.g. `20261129T182559Z-3fa9c1`.
pub fn generate() -> String {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let mut bytes = [0u8; 3];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = chrono::Utc::now().timestamp_subsec_nanos() ^ std::process::id();
        bytes.copy_from_slice(&nanos.to_le_bytes()[..3]);
    }
    let mut id = format!("{now}-");
    for b in bytes {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// Whether a user-given run id is usable in file names.
pub fn valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(valid(&a), "{a}");
        assert_eq!(a.len(), "20261129T182559Z-3fa9c1".len());
        assert_ne!(a, b);
    }

    #[test]
    fn ids_must_be_file_name_safe() {
        assert!(valid("demo1"));
        assert!(!valid("../x"));
        assert!(!valid(""));
        assert!(!valid(".hidden"));
        assert!(!valid("a b"));
    }
}
