//! The `upper` transform: Unicode-correct upper-casing by default, ASCII-only on request.
//!
//! Unicode mode applies full case mapping (`ß` → `SS`), the same result as Python's `str.upper()`
//! for every character both Unicode versions know. Invalid UTF-8 is a data error naming the byte
//! offset: silently replacing bytes would corrupt the user's data. ASCII mode maps `a-z` only and
//! passes every other byte through, like `tr a-z A-Z`.
//!
//! Both modes transform pure-ASCII chunks in place (the common case, and the fast one).

use crate::sdk::{ChunkTransform, DataError, Emit, Step};

/// Which letters `upper` maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unicode,
    Ascii,
}

impl Mode {
    /// Parses the `mode` param.
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "unicode" => Some(Mode::Unicode),
            "ascii" => Some(Mode::Ascii),
            _ => None,
        }
    }
}

/// The upper-casing transform.
#[derive(Debug, Clone, Copy)]
pub struct Upper {
    pub mode: Mode,
}

impl ChunkTransform for Upper {
    fn apply(&mut self, chunk: &mut [u8], eof: bool, out: &mut Vec<u8>) -> Result<Step, DataError> {
        if self.mode == Mode::Ascii || chunk.is_ascii() {
            chunk.make_ascii_uppercase();
            return Ok(Step {
                consumed: chunk.len(),
                emit: Emit::Chunk,
            });
        }
        let valid =
            match std::str::from_utf8(chunk) {
                Ok(text) => text,
                // A character cut by the end of the read buffer: take what is whole, the rest comes
                // back with the next read.
                Err(err) if err.error_len().is_none() && !eof => {
                    std::str::from_utf8(&chunk[..err.valid_up_to()])
                        .expect("valid_up_to is a char boundary")
                }
                Err(err) => return Err(DataError {
                    offset_in_chunk: err.valid_up_to(),
                    message:
                        "invalid UTF-8 (use `\"params\": {\"mode\": \"ascii\"}` for non-UTF-8 data)"
                            .into(),
                }),
            };
        upper_utf8(valid, out);
        Ok(Step {
            consumed: valid.len(),
            emit: Emit::Buffer,
        })
    }
}

/// Appends the full Unicode upper-casing of `text` to `out`: ASCII runs in bulk, other characters
/// one by one (`str::to_uppercase` would build a new `String` and map every character singly).
fn upper_utf8(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + bytes.len() / 8);
    let mut i = 0;
    while i < bytes.len() {
        let run_end = bytes[i..]
            .iter()
            .position(|b| !b.is_ascii())
            .map_or(bytes.len(), |p| i + p);
        let start = out.len();
        out.extend_from_slice(&bytes[i..run_end]);
        out[start..].make_ascii_uppercase();
        i = run_end;
        if let Some(c) = text[i..].chars().next() {
            match two_byte_table().get((c as usize).wrapping_sub(0x80)) {
                Some(upper) => out.extend_from_slice(&upper.bytes[..upper.len as usize]),
                None => {
                    let mut buf = [0u8; 4];
                    for u in c.to_uppercase() {
                        out.extend_from_slice(u.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            i += c.len_utf8();
        }
    }
}

/// The UTF-8 upper-casing of one character, inline.
#[derive(Clone, Copy)]
struct Upper8 {
    bytes: [u8; 12],
    len: u8,
}

/// Upper-casings of every two-byte UTF-8 character (U+0080..U+07FF: Latin, Greek, Cyrillic,
/// Hebrew, Arabic...), computed once: the common non-ASCII characters then cost a table lookup
/// instead of a search of the case-mapping tables.
fn two_byte_table() -> &'static [Upper8] {
    static TABLE: std::sync::OnceLock<Vec<Upper8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0x80u32..0x800)
            .map(|cp| {
                let mut entry = Upper8 {
                    bytes: [0; 12],
                    len: 0,
                };
                if let Some(c) = char::from_u32(cp) {
                    for u in c.to_uppercase() {
                        let n = u.encode_utf8(&mut entry.bytes[entry.len as usize..]).len();
                        entry.len += n as u8;
                    }
                }
                entry
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upper(mode: Mode, input: &[u8], eof: bool) -> Result<(Vec<u8>, usize), DataError> {
        let mut chunk = input.to_vec();
        let mut out = Vec::new();
        let step = Upper { mode }.apply(&mut chunk, eof, &mut out)?;
        let bytes = match step.emit {
            Emit::Chunk => chunk[..step.consumed].to_vec(),
            Emit::Buffer => out,
        };
        Ok((bytes, step.consumed))
    }

    #[test]
    fn unicode_mode_uses_full_case_mapping() {
        let cases: &[(&str, &str)] = &[
            ("straße\n", "STRASSE\n"),
            ("ﬁne\n", "FINE\n"),
            ("éèê ÿ\n", "ÉÈÊ Ÿ\n"),
            ("hello, world\n", "HELLO, WORLD\n"),
            ("ǆ\n", "Ǆ\n"),
            ("ΐ\n", "\u{399}\u{308}\u{301}\n"),
        ];
        for (input, expected) in cases {
            let (out, consumed) = upper(Mode::Unicode, input.as_bytes(), true).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                *expected,
                "input {input:?}"
            );
            assert_eq!(consumed, input.len());
        }
    }

    #[test]
    fn ascii_mode_maps_only_ascii_letters_and_passes_other_bytes() {
        let input = b"stra\xc3\x9fe \xff\xfe abc\n";
        let (out, _) = upper(Mode::Ascii, input, true).unwrap();
        assert_eq!(out, b"STRA\xc3\x9fE \xff\xfe ABC\n");
    }

    #[test]
    fn invalid_utf8_is_an_error_at_its_offset() {
        let err = upper(Mode::Unicode, b"ok\nbad \xff here\n", true).unwrap_err();
        assert_eq!(err.offset_in_chunk, 7);
        assert!(err.message.contains("invalid UTF-8"));
    }

    #[test]
    fn a_character_cut_by_the_buffer_is_left_for_the_next_read() {
        let (out, consumed) = upper(Mode::Unicode, "aß".as_bytes().split_at(2).0, false).unwrap();
        assert_eq!(out, b"A");
        assert_eq!(consumed, 1);
        assert!(upper(Mode::Unicode, "aß".as_bytes().split_at(2).0, true).is_err());
    }

    #[test]
    fn the_fast_path_equals_std_to_uppercase() {
        let samples = [
            "",
            "abc",
            "straße",
            "ÄÖÜ äöü ß",
            "mixed ascii ǆ ﬁ ΐ σς and 🦀 crab",
            "ends with é",
        ];
        for text in samples {
            let mut out = Vec::new();
            upper_utf8(text, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                text.to_uppercase(),
                "{text:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn the_fast_path_equals_std_to_uppercase_on_any_text(text in "\\PC{0,200}") {
            let mut out = Vec::new();
            upper_utf8(&text, &mut out);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), text.to_uppercase());
        }
    }

    #[test]
    fn mode_parses_only_known_names() {
        assert_eq!(Mode::parse("ascii"), Some(Mode::Ascii));
        assert_eq!(Mode::parse("unicode"), Some(Mode::Unicode));
        assert_eq!(Mode::parse("ASCII"), None);
    }
}
