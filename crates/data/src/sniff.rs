//! Telling a text file from one that is not, by its first bytes.
//!
//! A UTF-16 export (Windows tools, Excel's "Unicode text") or a binary file read as UTF-8
//! does not fail: ASCII in UTF-16 is valid UTF-8 with a NUL after every letter, and becomes
//! millions of junk tokens. So the first [`SNIFF_BYTES`] of every text, JSON Lines and JSON
//! file are checked before anything is read from it, with the rule git and grep use to call a
//! file binary (a NUL byte among the first 8000): UTF-8 text never holds a NUL. A byte-order
//! mark names UTF-16/32 outright; without one, NUL bytes at every other offset mean UTF-16.

use std::io::{Cursor, Read};
use std::path::Path;

use crate::DataError;

/// How many leading bytes of a file are checked (git's `FIRST_FEW_BYTES`).
pub const SNIFF_BYTES: usize = 8000;

/// Why a file is not UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotText {
    /// UTF-16, from its byte-order mark or the places of its NUL bytes.
    Utf16 { big_endian: bool, bom: bool },
    /// UTF-32, from its byte-order mark.
    Utf32 { big_endian: bool },
    /// A NUL byte at `offset` (0-based) on line `line` (1-based), not in a UTF-16 pattern.
    Binary { offset: u64, line: u64 },
}

impl NotText {
    /// What the file is, for a message.
    pub fn what(&self) -> String {
        let order = |big: bool| if big { "BE" } else { "LE" };
        match *self {
            Self::Utf16 { big_endian, bom } => {
                let evidence = match (bom, big_endian) {
                    (true, false) => "byte-order mark FF FE",
                    (true, true) => "byte-order mark FE FF",
                    (false, _) => "no byte-order mark, NUL bytes between its letters",
                };
                format!("UTF-16 {} text ({evidence})", order(big_endian))
            }
            Self::Utf32 { big_endian } => format!(
                "UTF-32 {} text (byte-order mark {})",
                order(big_endian),
                if big_endian {
                    "00 00 FE FF"
                } else {
                    "FF FE 00 00"
                }
            ),
            Self::Binary { offset, line } => {
                format!("binary, not text (a NUL byte at byte {offset}, line {line})")
            }
        }
    }

    /// What to do about it, for `path`.
    pub fn fix(&self, path: &Path) -> String {
        // With a byte-order mark iconv finds the byte order itself.
        let from = match *self {
            Self::Utf16 { bom: true, .. } => "UTF-16",
            Self::Utf16 {
                big_endian: false, ..
            } => "UTF-16LE",
            Self::Utf16 {
                big_endian: true, ..
            } => "UTF-16BE",
            Self::Utf32 { .. } => "UTF-32",
            Self::Binary { .. } => {
                return "give text, JSON Lines, JSON or Parquet files (optionally .gz/.zst), \
                        or leave this file out of the inputs"
                    .to_string();
            }
        };
        let p = path.display();
        format!("convert it to UTF-8 first, e.g. `iconv -f {from} -t UTF-8 {p} > {p}.utf8`")
    }
}

/// Why `head` (a file's first bytes) is not UTF-8 text, or `None` if it may be.
pub fn sniff(head: &[u8]) -> Option<NotText> {
    // UTF-32 LE's mark begins with UTF-16 LE's, so it is tested first.
    if head.starts_with(&[0xFF, 0xFE, 0, 0]) {
        return Some(NotText::Utf32 { big_endian: false });
    }
    if head.starts_with(&[0, 0, 0xFE, 0xFF]) {
        return Some(NotText::Utf32 { big_endian: true });
    }
    if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        let big_endian = head[0] == 0xFE;
        return Some(NotText::Utf16 {
            big_endian,
            bom: true,
        });
    }
    let first_nul = head.iter().position(|&b| b == 0)?;
    // ASCII in UTF-16 LE is `c 0 c 0 ...`: NULs at odd offsets, none at even ones.
    let nuls = |parity: usize| {
        head.iter()
            .skip(parity)
            .step_by(2)
            .filter(|&&b| b == 0)
            .count()
    };
    let (even, odd) = (nuls(0), nuls(1));
    let half = head.len() / 2;
    let mostly = |n: usize| n * 2 >= half;
    let rarely = |n: usize| n * 20 <= half;
    if mostly(odd) && rarely(even) {
        return Some(NotText::Utf16 {
            big_endian: false,
            bom: false,
        });
    }
    if mostly(even) && rarely(odd) {
        return Some(NotText::Utf16 {
            big_endian: true,
            bom: false,
        });
    }
    let line = 1 + head[..first_nul].iter().filter(|&&b| b == b'\n').count() as u64;
    Some(NotText::Binary {
        offset: first_nul as u64,
        line,
    })
}

/// `reader` unchanged, after checking that its first bytes are text; an error naming `path`,
/// what the file is and what to do otherwise.
pub(crate) fn checked(
    path: &Path,
    mut reader: Box<dyn Read + Send>,
) -> Result<Box<dyn Read + Send>, DataError> {
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    reader
        .by_ref()
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|source| DataError::Read {
            path: path.to_path_buf(),
            line: None,
            source,
        })?;
    match sniff(&head) {
        Some(kind) => Err(DataError::NotText {
            path: path.to_path_buf(),
            kind,
        }),
        None => Ok(Box::new(Cursor::new(head).chain(reader))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(text: &str, big_endian: bool) -> Vec<u8> {
        text.encode_utf16()
            .flat_map(|u| {
                if big_endian {
                    u.to_be_bytes()
                } else {
                    u.to_le_bytes()
                }
            })
            .collect()
    }

    #[test]
    fn utf8_text_passes_even_with_a_bom_and_non_ascii() {
        assert_eq!(sniff(b""), None);
        assert_eq!(
            sniff("Mitochondrien \u{e9}t\u{e9} \u{4e2d}\n".as_bytes()),
            None
        );
        assert_eq!(sniff(b"\xEF\xBB\xBFtext\r\n"), None);
        // Invalid UTF-8 (Latin-1) is left to the line reader, which skips and counts it.
        assert_eq!(sniff(b"caf\xe9\n"), None);
    }

    #[test]
    fn utf16_with_a_byte_order_mark() {
        let mut le = vec![0xFF, 0xFE];
        le.extend(utf16("a cell\n", false));
        let mut be = vec![0xFE, 0xFF];
        be.extend(utf16("a cell\n", true));
        let want = |big_endian| {
            Some(NotText::Utf16 {
                big_endian,
                bom: true,
            })
        };
        assert_eq!(sniff(&le), want(false));
        assert_eq!(sniff(&be), want(true));
        // Even a mark alone, or a mark before text without NULs (CJK).
        assert_eq!(sniff(&[0xFF, 0xFE]), want(false));
        let mut cjk = vec![0xFE, 0xFF];
        cjk.extend(utf16("\u{4e2d}\u{6587}", true));
        assert_eq!(sniff(&cjk), want(true));
    }

    #[test]
    fn utf16_without_a_mark_by_where_its_nuls_are() {
        let text = "The mitochondria of the cell.\nSecond line, some digits 1234.\n".repeat(20);
        let want = |big_endian| {
            Some(NotText::Utf16 {
                big_endian,
                bom: false,
            })
        };
        assert_eq!(sniff(&utf16(&text, false)), want(false));
        assert_eq!(sniff(&utf16(&text, true)), want(true));
        // Cut at an odd length, as a read of the first bytes may be.
        let le = utf16(&text, false);
        assert_eq!(sniff(&le[..101]), want(false));
    }

    #[test]
    fn utf32_by_its_mark() {
        assert_eq!(
            sniff(&[0xFF, 0xFE, 0, 0, b'a', 0, 0, 0]),
            Some(NotText::Utf32 { big_endian: false })
        );
        assert_eq!(
            sniff(&[0, 0, 0xFE, 0xFF, 0, 0, 0, b'a']),
            Some(NotText::Utf32 { big_endian: true })
        );
    }

    #[test]
    fn nul_bytes_are_binary_with_their_offset_and_line() {
        assert_eq!(
            sniff(&[0u8; 4096]),
            Some(NotText::Binary { offset: 0, line: 1 })
        );
        // Text cut short and padded with zeros (a crashed writer), or one stray NUL.
        let mut padded = b"line one\nline two\n".to_vec();
        padded.extend([0u8; 100]);
        assert_eq!(
            sniff(&padded),
            Some(NotText::Binary {
                offset: 18,
                line: 3
            })
        );
        assert_eq!(
            sniff(b"ab\ncd\x00ef\n"),
            Some(NotText::Binary { offset: 5, line: 2 })
        );
    }

    #[test]
    fn messages_name_the_encoding_and_the_iconv_command() {
        let path = Path::new("/data/corpus.txt");
        let le = NotText::Utf16 {
            big_endian: false,
            bom: false,
        };
        assert!(le.what().contains("UTF-16 LE"), "{}", le.what());
        assert!(
            le.fix(path)
                .contains("iconv -f UTF-16LE -t UTF-8 /data/corpus.txt"),
            "{}",
            le.fix(path)
        );
        let binary = NotText::Binary { offset: 7, line: 2 };
        assert!(
            binary.what().contains("byte 7, line 2"),
            "{}",
            binary.what()
        );
    }

    #[test]
    fn a_checked_reader_still_yields_every_byte() {
        let text: Vec<u8> = (0..3 * SNIFF_BYTES)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let reader: Box<dyn Read + Send> = Box::new(Cursor::new(text.clone()));
        let mut back = Vec::new();
        checked(Path::new("t.txt"), reader)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, text);
    }
}
