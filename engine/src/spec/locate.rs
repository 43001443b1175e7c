//! Maps JSON paths in a Pipefile to byte ranges of its text, so every error can point at the
//! offending value.
//!
//! serde_json reports line and column for syntax and type errors, but the semantic checks
//! (duplicate names, unknown `after` targets, missing inputs) happen after parsing, on typed
//! values that no longer know where they came from. This module re-reads the text once with a
//! span-keeping parser and answers "where is `/stages/2/outputDir`?".

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use jsonc_parser::ast::Value;
use jsonc_parser::common::Ranged;

/// Byte ranges of every value (and object key) in a JSON text, by JSON pointer. The text is
/// indexed on the first question, so a valid Pipefile (no errors to locate) never pays for it.
#[derive(Debug)]
pub struct Locator {
    text: Arc<String>,
    index: OnceLock<Index>,
}

#[derive(Debug, Default)]
struct Index {
    values: HashMap<String, (usize, usize)>,
    keys: HashMap<String, (usize, usize)>,
}

impl Locator {
    /// A locator over `text`; a text that does not parse yields an empty index.
    pub fn new(text: Arc<String>) -> Locator {
        Locator {
            text,
            index: OnceLock::new(),
        }
    }

    fn index(&self) -> &Index {
        self.index.get_or_init(|| {
            let mut index = Index::default();
            let parsed =
                jsonc_parser::parse_to_ast(&self.text, &Default::default(), &Default::default());
            if let Ok(Some(value)) = parsed.map(|r| r.value) {
                index.add(String::new(), &value);
            }
            index
        })
    }

    /// The range of the value at `pointer`, or of the nearest enclosing value that exists.
    pub fn value(&self, pointer: &str) -> (usize, usize) {
        let mut p = pointer;
        loop {
            if let Some(range) = self.index().values.get(p) {
                return *range;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return (0, 0),
            }
        }
    }

    /// The range of the key naming the value at `pointer` (falls back to the value).
    pub fn key(&self, pointer: &str) -> (usize, usize) {
        self.index()
            .keys
            .get(pointer)
            .copied()
            .unwrap_or_else(|| self.value(pointer))
    }
}

impl Index {
    fn add(&mut self, pointer: String, value: &Value<'_>) {
        let range = value.range();
        match value {
            Value::Object(object) => {
                for prop in &object.properties {
                    let child = format!("{pointer}/{}", escape(prop.name.as_str()));
                    let key = prop.name.range();
                    self.keys.insert(child.clone(), (key.start, key.end));
                    self.add(child, &prop.value);
                }
            }
            Value::Array(array) => {
                for (i, element) in array.elements.iter().enumerate() {
                    self.add(format!("{pointer}/{i}"), element);
                }
            }
            _ => {}
        }
        self.values.insert(pointer, (range.start, range.end));
    }
}

/// Escapes a key for use in a JSON pointer (RFC 6901).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Converts a 1-based line and column (as serde_json reports them) to a byte offset in `text`.
pub fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (line_start + column.saturating_sub(1)).min(text.len())
}

/// The 1-based line and column of byte `offset` in `text` (column counted in characters).
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "{\n  \"stages\": [\n    {\"name\": \"a\", \"x/y\": 1}\n  ]\n}\n";

    #[test]
    fn finds_values_and_keys_by_pointer() {
        let loc = Locator::new(Arc::new(TEXT.to_string()));
        let (s, e) = loc.value("/stages/0/name");
        assert_eq!(&TEXT[s..e], "\"a\"");
        let (s, e) = loc.key("/stages/0/name");
        assert_eq!(&TEXT[s..e], "\"name\"");
        let (s, e) = loc.value("/stages/0/x~1y");
        assert_eq!(&TEXT[s..e], "1");
        // Unknown pointers fall back to the nearest enclosing value.
        let (s, _) = loc.value("/stages/0/missing");
        assert_eq!(&TEXT[s..s + 1], "{");
    }

    #[test]
    fn converts_between_offsets_and_line_columns() {
        let offset = offset_of(TEXT, 3, 6);
        assert_eq!(&TEXT[offset..offset + 6], "\"name\"");
        assert_eq!(line_col(TEXT, offset), (3, 6));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
