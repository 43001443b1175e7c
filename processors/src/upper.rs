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
        // simdutf8's `compat` validator: std's error semantics (valid_up_to, error_len), several
        // times faster than `std::str::from_utf8` on text dense in non-ASCII characters.
        let valid =
            match simdutf8::compat::from_utf8(chunk) {
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

/// Appends the full Unicode upper-casing of `text` to `out`. ASCII goes eight bytes at a time
/// (SWAR), two-byte characters through a table, longer ones through `char::to_uppercase`; the
/// output is written by index into space reserved up front (`str::to_uppercase` would build a new
/// `String` and push every character singly).
fn upper_utf8(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    let table = two_byte_table();
    let start = out.len();
    // Reserve for the worst expansion of the fast paths; longer mappings check their own room.
    out.resize(start + bytes.len() + bytes.len() / 2 + 16, 0);
    let mut w = start;
    let mut i = 0;
    while i < bytes.len() {
        if i + 8 <= bytes.len() && w + 8 <= out.len() {
            let word = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
            let high = word & 0x8080_8080_8080_8080;
            // The ASCII bytes before the first non-ASCII one (all eight if there is none): the
            // whole word is converted with its high bits cleared, and only those bytes kept.
            let ascii = if high == 0 {
                8
            } else {
                high.trailing_zeros() as usize / 8
            };
            let upper = ascii_upper_word(word & 0x7f7f_7f7f_7f7f_7f7f);
            out[w..w + 8].copy_from_slice(&upper.to_le_bytes());
            i += ascii;
            w += ascii;
            if ascii > 0 {
                continue;
            }
        } else if bytes[i] < 0x80 {
            if w >= out.len() {
                out.resize(w + 16 + (bytes.len() - i), 0);
            }
            out[w] = bytes[i].to_ascii_uppercase();
            i += 1;
            w += 1;
            continue;
        }
        if bytes[i] & 0xE0 == 0xC0 {
            // A run of two-byte characters (validated UTF-8: Greek, Cyrillic, accented Latin...):
            // decoded by hand, mapped by the table, without going back to the ASCII test.
            while i + 1 < bytes.len() && bytes[i] & 0xE0 == 0xC0 {
                let cp = (usize::from(bytes[i] & 0x1F) << 6) | usize::from(bytes[i + 1] & 0x3F);
                let upper = table[cp - 0x80];
                if w + 8 > out.len() {
                    out.resize(w + 16 + 2 * (bytes.len() - i), 0);
                }
                out[w..w + 8].copy_from_slice(&upper);
                w += usize::from(upper[7]);
                i += 2;
            }
            continue;
        }
        let c = text[i..].chars().next().expect("i is a char boundary");
        let mut buf = [0u8; 4];
        for u in c.to_uppercase() {
            let encoded = u.encode_utf8(&mut buf).as_bytes();
            if w + encoded.len() > out.len() {
                out.resize(w + 16 + 2 * (bytes.len() - i), 0);
            }
            out[w..w + encoded.len()].copy_from_slice(encoded);
            w += encoded.len();
        }
        i += c.len_utf8();
    }
    out.truncate(w);
}

/// Upper-cases the eight ASCII bytes of `word` (every high bit clear): each byte in `a..=z`
/// loses 0x20.
fn ascii_upper_word(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // With every byte below 0x80 no addition carries into the next byte.
    let at_least_a = word + ONES * (0x80 - b'a' as u64);
    let above_z = word + ONES * (0x80 - b'z' as u64 - 1);
    let lower = at_least_a & !above_z & HIGH;
    word - (lower >> 2)
}

/// Upper-casings of every two-byte UTF-8 character (U+0080..U+07FF: Latin, Greek, Cyrillic,
/// Hebrew, Arabic...), computed once: the common non-ASCII characters then cost a table lookup
/// instead of a search of the case-mapping tables. Each entry is the UTF-8 of the upper-casing in
/// its first bytes and that length in its last byte (the longest, of `ΐ`, is 6 bytes), so one
/// eight-byte copy writes it.
fn two_byte_table() -> &'static [[u8; 8]] {
    static TABLE: std::sync::OnceLock<Vec<[u8; 8]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0x80u32..0x800)
            .map(|cp| {
                let mut entry = [0u8; 8];
                let mut len = 0;
                if let Some(c) = char::from_u32(cp) {
                    for u in c.to_uppercase() {
                        len += u.encode_utf8(&mut entry[len..7]).len();
                    }
                }
                entry[7] = len as u8;
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
            let mut out = b"kept".to_vec();
            upper_utf8(&text, &mut out);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), format!("kept{}", text.to_uppercase()));
        }

        /// Text dense in ASCII letters, punctuation and the characters with unusual mappings
        /// (ß, ŉ, ΐ, ǆ, ﬁ, final sigma, a 4-byte character): runs of every length meet the
        /// eight-byte path at every alignment.
        #[test]
        fn the_fast_path_equals_std_to_uppercase_on_mixed_text(
            text in "[a-zA-Z0-9 .@`{~\n\u{7f}ßŉΐǆﬁσςéжא🦀]{0,300}"
        ) {
            let mut out = Vec::new();
            upper_utf8(&text, &mut out);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), text.to_uppercase());
        }
    }

    #[test]
    fn every_two_byte_character_maps_as_std_does() {
        for c in (0x80u32..0x800).filter_map(char::from_u32) {
            let text = format!("{c}a{c}");
            let mut out = Vec::new();
            upper_utf8(&text, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                text.to_uppercase(),
                "{c:?}"
            );
        }
    }

    #[test]
    fn the_eight_byte_path_maps_exactly_a_to_z() {
        for b in 0u8..0x80 {
            let word = u64::from_le_bytes([b; 8]);
            assert_eq!(
                ascii_upper_word(word),
                u64::from_le_bytes([b.to_ascii_uppercase(); 8]),
                "{b:#x}"
            );
        }
    }

    #[test]
    fn mode_parses_only_known_names() {
        assert_eq!(Mode::parse("ascii"), Some(Mode::Ascii));
        assert_eq!(Mode::parse("unicode"), Some(Mode::Unicode));
        assert_eq!(Mode::parse("ASCII"), None);
    }
}
