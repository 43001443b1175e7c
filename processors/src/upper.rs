//! The `upper` transform: Unicode-correct upper-casing by default, ASCII-only on request.
//!
//! Unicode mode applies full case mapping (`ß` → `SS`), the same result as Python's `str.upper()`
//! for every character both Unicode versions know. Invalid UTF-8 is a data error naming the byte
//! offset: silently replacing bytes would corrupt the user's data. ASCII mode maps `a-z` only and
//! passes every other byte through, like `tr a-z A-Z`.
//!
//! Both modes transform in place: ASCII mode always, unicode mode whenever every character's
//! upper-casing is as long as the character (nearly all text; see `upper_utf8`).

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
        // Pure ASCII (the common case) needs neither validation nor the character paths.
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
                Ok(_) => chunk.len(),
                // A character cut by the end of the read buffer: take what is whole, the rest comes
                // back with the next read.
                Err(err) if err.error_len().is_none() && !eof => err.valid_up_to(),
                Err(err) => return Err(DataError {
                    offset_in_chunk: err.valid_up_to(),
                    message:
                        "invalid UTF-8 (use `\"params\": {\"mode\": \"ascii\"}` for non-UTF-8 data)"
                            .into(),
                }),
            };
        let emit = upper_utf8(&mut chunk[..valid], out);
        Ok(Step {
            consumed: valid,
            emit,
        })
    }
}

/// Upper-cases `text` (valid UTF-8, whole characters) with full Unicode case mapping: in place
/// when every character's upper-casing is as long as itself (`Emit::Chunk`: nearly all text,
/// `ß` → `SS` included), otherwise into `out` (`Emit::Buffer`), which then holds the whole result.
/// Either way the bytes of `text` are overwritten.
fn upper_utf8(text: &mut [u8], out: &mut Vec<u8>) -> Emit {
    let mut done = upper_in_place(text);
    if done == text.len() {
        return Emit::Chunk;
    }
    // Rare: a character that grows or shrinks (`ΐ`, `ŉ`, `ı`, `ſ`, `ɐ`...). Everything before it
    // is done in place; copy that, append the character's upper-casing, and go on in place
    // after it.
    out.reserve(text.len() + text.len() / 8 + 16);
    out.extend_from_slice(&text[..done]);
    while done < text.len() {
        let width = utf8_width(text[done]);
        let c = std::str::from_utf8(&text[done..done + width])
            .ok()
            .and_then(|s| s.chars().next())
            .expect("upper_in_place stops on a whole character");
        let mut buf = [0u8; 4];
        for u in c.to_uppercase() {
            out.extend_from_slice(u.encode_utf8(&mut buf).as_bytes());
        }
        done += width;
        let end = done + upper_in_place(&mut text[done..]);
        out.extend_from_slice(&text[done..end]);
        done = end;
    }
    Emit::Buffer
}

/// The length of the UTF-8 sequence that starts with `lead` (a valid lead byte).
fn utf8_width(lead: u8) -> usize {
    match lead {
        0..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// Upper-cases the longest prefix of `text` (valid UTF-8) whose characters all upper-case to the
/// same number of bytes, in place, and returns its length: all of `text`, or the offset of the
/// first character that upper-cases to a different length.
///
/// On x86_64, 64-byte blocks of ASCII and two-byte characters go through SSE2 (part of every
/// x86_64 CPU: no runtime detection needed): the block's ASCII letters are upper-cased at once,
/// and each two-byte character found by the block's lead-byte mask through the pair table, with
/// no branch per character. Elsewhere, and for blocks with longer characters, one character at a
/// time.
fn upper_in_place(text: &mut [u8]) -> usize {
    let pairs = pair_table();
    let mut i = 0;
    loop {
        i = blocks(text, i, pairs);
        if i == text.len() {
            return i;
        }
        // A block the block loop could not take (a 3- or 4-byte character, the tail, or a
        // character to stop at): characters one at a time, for about a block's length.
        let limit = (i + BLOCK).min(text.len());
        match upper_chars(text, i, limit, pairs) {
            Ok(next) => i = next,
            Err(stop) => return stop,
        }
    }
}

/// Bytes per block of [`blocks`].
const BLOCK: usize = 64;

/// Upper-cases characters of `text` from `i` (a character boundary) until at least `limit`, one
/// at a time. `Ok(next)`: done up to `next` (a boundary at or past `limit`); `Err(at)`: stopped at
/// the character at `at`, whose upper-casing has another length.
fn upper_chars(
    text: &mut [u8],
    mut i: usize,
    limit: usize,
    pairs: &[u16; 2048],
) -> Result<usize, usize> {
    while i < limit {
        let b = text[i];
        if b < 0x80 {
            text[i] = b.to_ascii_uppercase();
            i += 1;
        } else if b < 0xE0 {
            let cp = (usize::from(b & 0x1F) << 6) | usize::from(text[i + 1] & 0x3F);
            let upper = pairs[cp];
            if upper == 0 {
                return Err(i);
            }
            text[i..i + 2].copy_from_slice(&upper.to_le_bytes());
            i += 2;
        } else if b < 0xF0 && three_byte_block_is_caseless(b, text[i + 1]) {
            i += 3;
        } else {
            let width = utf8_width(b);
            let c = std::str::from_utf8(&text[i..i + width])
                .ok()
                .and_then(|s| s.chars().next())
                .expect("valid UTF-8 on a character boundary");
            let mut upper = c.to_uppercase();
            match (upper.next(), upper.next()) {
                (Some(u), None) if u.len_utf8() == width => {
                    u.encode_utf8(&mut text[i..i + width]);
                }
                _ => return Err(i),
            }
            i += width;
        }
    }
    Ok(i)
}

/// Upper-cases whole 64-byte blocks of ASCII and two-byte characters from `i` (a character
/// boundary) and returns where it stopped: the end of the last such block, or a two-byte
/// character inside a block whose upper-casing has another length (everything before it done;
/// the block's ASCII letters after it are upper-cased too, which doing again changes nothing).
#[cfg(target_arch = "x86_64")]
fn blocks(text: &mut [u8], mut i: usize, pairs: &[u16; 2048]) -> usize {
    use safe_arch::*;
    let a_minus_1 = set_splat_i8_m128i(b'a' as i8 - 1);
    let z_plus_1 = set_splat_i8_m128i(b'z' as i8 + 1);
    let case_bit = set_splat_i8_m128i(0x20);
    let last_two_byte_lead = set_splat_i8_m128i(0xDFu8 as i8);
    let last_continuation = set_splat_i8_m128i(0xBFu8 as i8);
    let zero = zeroed_m128i();
    while i + BLOCK <= text.len() {
        let block = &mut text[i..i + BLOCK];
        // SSE2 (the x86_64 baseline) through `safe_arch`: loads and stores of 16-byte arrays, no
        // raw pointers.
        let mut longer = 0u32;
        let mut leads = 0u64;
        for (k, part) in block.chunks_exact_mut(16).enumerate() {
            let part: &mut [u8; 16] = part.try_into().expect("16-byte parts");
            let v = load_unaligned_m128i(part);
            // Bytes above 0xDF start 3- or 4-byte characters: this block is not ours.
            let above_df = sub_saturating_u8_m128i(v, last_two_byte_lead);
            longer |= (move_mask_i8_m128i(cmp_eq_mask_i8_m128i(above_df, zero)) ^ 0xFFFF) as u32;
            // Bytes above 0xBF (and not above 0xDF) are lead bytes of 2-byte characters.
            let above_bf = sub_saturating_u8_m128i(v, last_continuation);
            let lead = move_mask_i8_m128i(cmp_eq_mask_i8_m128i(above_bf, zero)) ^ 0xFFFF;
            leads |= (lead as u64) << (16 * k);
            // ASCII a-z (signed compare: bytes from 0x80 are negative and never match).
            let lower = bitand_m128i(
                cmp_gt_mask_i8_m128i(v, a_minus_1),
                cmp_lt_mask_i8_m128i(v, z_plus_1),
            );
            if longer == 0 {
                store_unaligned_m128i(part, sub_i8_m128i(v, bitand_m128i(lower, case_bit)));
            }
        }
        if longer != 0 {
            // Stores above happened only for the 16-byte parts before the first longer
            // character; upper-casing ASCII again is harmless.
            return i;
        }
        // A lead byte in the last position: its character ends in the next block.
        let (mut leads, len) = if leads >> 63 == 1 {
            (leads & !(1 << 63), BLOCK - 1)
        } else {
            (leads, BLOCK)
        };
        while leads != 0 {
            let k = leads.trailing_zeros() as usize;
            let cp = (usize::from(block[k] & 0x1F) << 6) | usize::from(block[k + 1] & 0x3F);
            let upper = pairs[cp];
            if upper == 0 {
                return i + k;
            }
            block[k..k + 2].copy_from_slice(&upper.to_le_bytes());
            leads &= leads - 1;
        }
        i += len;
    }
    i
}

/// Without SSE2: no block loop, [`upper_chars`] does everything.
#[cfg(not(target_arch = "x86_64"))]
fn blocks(_text: &mut [u8], i: usize, _pairs: &[u16; 2048]) -> usize {
    i
}

/// Upper-casings of the two-byte UTF-8 characters (U+0080..U+07FF: Latin, Greek, Cyrillic,
/// Armenian, Hebrew, Arabic...) that upper-case to two bytes (`é` → `É`, `ж` → `Ж`, `ß` → `SS`),
/// indexed by code point, as the little-endian `u16` of those two bytes; 0 for every other
/// character (`ı` → `I`, `ɐ` → `Ɐ`, `ΐ` → three characters) and for the ASCII indexes, which are
/// never looked up. Computed once from `char::to_uppercase`, so it is std's mapping exactly.
fn pair_table() -> &'static [u16; 2048] {
    static TABLE: std::sync::OnceLock<Box<[u16; 2048]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([0u16; 2048]);
        for cp in 0x80u32..0x800 {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            let mut bytes = Vec::with_capacity(4);
            let mut buf = [0u8; 4];
            for u in c.to_uppercase() {
                bytes.extend_from_slice(u.encode_utf8(&mut buf).as_bytes());
            }
            if bytes.len() == 2 {
                table[cp as usize] = u16::from_le_bytes([bytes[0], bytes[1]]);
            }
        }
        table
    })
}

/// Whether every character of the 64-code-point block a three-byte sequence starting with `lead`,
/// `second` falls in (U+0800..U+FFFF; CJK, kana, most symbols) is its own upper-casing, so such
/// characters need no decoding. Computed per block on first use from `char::to_uppercase`.
fn three_byte_block_is_caseless(lead: u8, second: u8) -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    const UNKNOWN: u8 = 0;
    const CASELESS: u8 = 1;
    const CASED: u8 = 2;
    static BLOCKS: [AtomicU8; 1024] = [const { AtomicU8::new(UNKNOWN) }; 1024];
    let block = (usize::from(lead & 0x0F) << 6) | usize::from(second & 0x3F);
    match BLOCKS[block].load(Ordering::Relaxed) {
        CASELESS => true,
        CASED => false,
        _ => {
            let first = (block as u32) << 6;
            let caseless = (first..first + 64).filter_map(char::from_u32).all(|c| {
                let mut upper = c.to_uppercase();
                upper.next() == Some(c) && upper.next().is_none()
            });
            BLOCKS[block].store(if caseless { CASELESS } else { CASED }, Ordering::Relaxed);
            caseless
        }
    }
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

    /// `upper_utf8` on `text` alone, whichever way it emitted.
    fn upper_str(text: &str) -> String {
        let mut bytes = text.as_bytes().to_vec();
        let mut out = Vec::new();
        match upper_utf8(&mut bytes, &mut out) {
            Emit::Chunk => String::from_utf8(bytes).unwrap(),
            Emit::Buffer => String::from_utf8(out).unwrap(),
        }
    }

    /// Feeds `input` to the unicode transform as the SDK does, in reads of the given sizes (cut
    /// anywhere, mid-character included): unconsumed bytes come back at the front of the next
    /// chunk, and the last chunk is marked `eof`. Returns the concatenated output.
    fn upper_in_reads(input: &[u8], reads: &[usize]) -> Vec<u8> {
        let mut result = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0;
        let mut reads = reads.iter().copied().cycle();
        loop {
            let n = reads.next().unwrap_or(input.len()).max(1);
            let take = n.min(input.len() - at);
            pending.extend_from_slice(&input[at..at + take]);
            at += take;
            let eof = at == input.len();
            let mut out = Vec::new();
            let step = Upper {
                mode: Mode::Unicode,
            }
            .apply(&mut pending, eof, &mut out)
            .unwrap();
            match step.emit {
                Emit::Chunk => result.extend_from_slice(&pending[..step.consumed]),
                Emit::Buffer => result.extend_from_slice(&out),
            }
            pending.drain(..step.consumed);
            if eof {
                assert!(pending.is_empty(), "eof leaves nothing behind");
                return result;
            }
        }
    }

    #[test]
    fn characters_whose_upper_casing_changes_length_or_count() {
        let cases: &[(&str, &str)] = &[
            ("ß", "SS"),                    // 2 bytes → two ASCII letters (same length: in place)
            ("σς", "ΣΣ"),                   // final sigma has no special upper-casing
            ("ΐ", "\u{399}\u{308}\u{301}"), // 1 character → 3
            ("ﬁ", "FI"),                    // ligature: 3 bytes → 2
            ("ı", "I"),                     // dotless i: 2 bytes → 1
            ("ſ", "S"),                     // long s: 2 bytes → 1
            ("ɐ", "Ɐ"),                     // 2 bytes → 3
            ("ŉ", "ʼN"),                    // 2 bytes → 3, two characters
            ("µ", "Μ"),                     // micro sign → Greek capital mu
            ("ÿ", "Ÿ"),                     // Latin-1 → Latin Extended-A
            ("ǅ", "Ǆ"),                     // titlecase digraph
            ("ᾳ", "\u{391}\u{399}"),        // 3 bytes → 4
            ("ⓐ", "Ⓐ"),                     // 3 bytes → 3
            ("ａ", "Ａ"),                   // fullwidth
            ("𐐨", "𐐀"),                     // 4 bytes → 4 (Deseret)
            ("日本語", "日本語"),           // caseless
        ];
        for (input, expected) in cases {
            assert_eq!(
                input.to_uppercase(),
                *expected,
                "the case table itself: {input:?}"
            );
            assert_eq!(upper_str(input), *expected, "{input:?}");
            // The same character inside a run long enough for the block path, at every offset.
            for pad in 0..70 {
                let text = format!(
                    "{}{input}{}",
                    "ä".repeat(pad / 2) + &"x".repeat(pad % 2),
                    "б".repeat(40)
                );
                assert_eq!(upper_str(&text), text.to_uppercase(), "{text:?}");
            }
        }
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
            assert_eq!(upper_str(text), text.to_uppercase(), "{text:?}");
        }
    }

    /// Every two-byte character, at every offset of a 64-byte block, between ASCII and two-byte
    /// neighbours: the block path and the one-character path against std.
    #[test]
    fn every_two_byte_character_at_every_block_offset_maps_as_std_does() {
        for c in (0x80u32..0x800).filter_map(char::from_u32) {
            for offset in 0..BLOCK + 1 {
                for filler in ["a", "ж"] {
                    let mut text = String::new();
                    while text.len() + filler.len() <= offset {
                        text.push_str(filler);
                    }
                    while text.len() < offset {
                        text.push('q');
                    }
                    text.push(c);
                    text.push_str("zé");
                    text.push(c);
                    while text.len() < 3 * BLOCK {
                        text.push_str("λ a");
                    }
                    assert_eq!(upper_str(&text), text.to_uppercase(), "{c:?} at {offset}");
                }
            }
        }
    }

    /// Every character there is, in runs of its own 64-code-point block, cut into reads at odd
    /// sizes: the three- and four-byte paths (and the caseless-block memo) against std.
    #[test]
    fn every_character_maps_as_std_does() {
        let mut text = String::new();
        for block in 0..(0x110000u32 >> 6) {
            let first = block << 6;
            text.extend((first..first + 64).filter_map(char::from_u32));
            text.push('\n');
        }
        assert_eq!(
            String::from_utf8(upper_in_reads(text.as_bytes(), &[4093, 65536, 7])).unwrap(),
            text.to_uppercase()
        );
    }

    fn seeded(cases: u32) -> proptest::test_runner::Config {
        proptest::test_runner::Config {
            cases,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0a11),
            ..proptest::test_runner::Config::default()
        }
    }

    proptest::proptest! {
        #![proptest_config(seeded(512))]

        #[test]
        fn the_fast_path_equals_std_to_uppercase_on_any_text(text in "\\PC{0,200}") {
            proptest::prop_assert_eq!(upper_str(&text), text.to_uppercase());
        }

        /// Text dense in ASCII letters, punctuation, Greek, Cyrillic and the characters with
        /// unusual mappings (ß, ŉ, ΐ, ǆ, ﬁ, ı, ſ, ɐ, final sigma, 3- and 4-byte characters): runs
        /// of every length meet the 64-byte block path at every alignment.
        #[test]
        fn the_fast_path_equals_std_to_uppercase_on_mixed_text(
            text in "[a-zA-Z0-9 .@`{~\n\u{7f}ßŉΐǆﬁσςéжאıſɐµÿάέήίόύώαωπρяёѣ日ⓐ🦀𐐨]{0,400}"
        ) {
            proptest::prop_assert_eq!(upper_str(&text), text.to_uppercase());
        }

        /// The same text fed in reads of random sizes, so chunks end mid-character: the output
        /// is the upper-casing of the whole.
        #[test]
        fn reads_cut_anywhere_give_the_whole_upper_casing(
            text in "[a-z \nßŉΐﬁıſɐσςάαωяж日ⓐ🦀𐐨]{0,400}",
            reads in proptest::collection::vec(1usize..80, 1..8),
        ) {
            let out = upper_in_reads(text.as_bytes(), &reads);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), text.to_uppercase());
        }
    }

    #[test]
    fn the_pair_table_holds_exactly_the_same_length_mappings() {
        let table = pair_table();
        for cp in 0u32..0x800 {
            let expected = char::from_u32(cp)
                .filter(|_| cp >= 0x80)
                .map(|c| c.to_uppercase().collect::<String>())
                .filter(|u| u.len() == 2)
                .map(|u| u16::from_le_bytes([u.as_bytes()[0], u.as_bytes()[1]]));
            assert_eq!(table[cp as usize], expected.unwrap_or(0), "U+{cp:04X}");
        }
    }

    #[test]
    fn mode_parses_only_known_names() {
        assert_eq!(Mode::parse("ascii"), Some(Mode::Ascii));
        assert_eq!(Mode::parse("unicode"), Some(Mode::Unicode));
        assert_eq!(Mode::parse("ASCII"), None);
    }
}
