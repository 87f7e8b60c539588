//! Corpus input: which files, in which format, as a stream of documents.
//!
//! Inputs are files, directories (walked recursively, in sorted order) and glob patterns.
//! Each file is read as a stream, never whole:
//!
//! - plain text: one document per non-empty line, or with [`CorpusOptions::paragraphs`], one
//!   document per blank-line-separated paragraph (its lines joined by `\n`);
//! - JSON Lines (`.jsonl`, `.json`, `.ndjson`): one JSON object per line, the document being
//!   the string field [`CorpusOptions::text_field`] (`"text"` by default);
//! - a JSON array (a `.json` file starting with `[`): one document per element, an object's
//!   text field or a string, read element by element;
//! - Parquet (`.parquet`): the text column [`CorpusOptions::text_field`], read row group by
//!   row group (only that column is decoded); errors name the row;
//! - Arrow IPC (`.arrow`), and `datasets` folders (`save_to_disk`, the `load_dataset` cache)
//!   as their Arrow files of one split ([`crate::datasets`]): the text column, record batch
//!   by record batch;
//! - gzip (`.gz`) and zstd (`.zst`) versions of the text and JSON formats, by extension.
//!
//! A file whose first bytes show UTF-16/32 or binary data is refused ([`crate::sniff`]). A line
//! that is not UTF-8, or holds a NUL byte, is skipped and counted
//! ([`CorpusStats::skipped_non_utf8`], [`CorpusStats::skipped_nul`]); with
//! [`CorpusOptions::strict`] it is an error naming `file:line`.
//!
//! Plain text lines end at `\n`, `\r\n` or a lone `\r`, as Python's universal newlines split
//! them: `run_mlm.py` reads text through `datasets`' text loader, which opens files that way, so
//! a file saved with old Mac line endings is many documents there too, not one. JSON Lines
//! end at `\n` only, as the format says (a lone `\r` there is JSON whitespace).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::structured::Threaded;

/// How to read the corpus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusOptions {
    /// JSON Lines field holding the text.
    pub text_field: String,
    /// Plain text: a document is a blank-line-separated paragraph instead of a line.
    pub paragraphs: bool,
    /// Fail on the first non-UTF-8 line instead of skipping it.
    pub strict: bool,
    /// The split of a `datasets` folder with several (`None`: `train`); see
    /// [`crate::datasets`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        Self {
            text_field: "text".to_string(),
            paragraphs: false,
            strict: false,
            split: None,
        }
    }
}

/// What reading a corpus found, for the user and the cache manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusStats {
    pub files: usize,
    pub lines: u64,
    pub documents: u64,
    /// Bytes of input read (decompressed).
    pub bytes: u64,
    pub skipped_non_utf8: u64,
    /// First skipped line, `file:line`, to show the user.
    pub first_non_utf8: Option<String>,
    /// Lines skipped because they hold a NUL byte.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_nul: u64,
    /// First line skipped for a NUL byte, `file:line`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_nul: Option<String>,
    /// FIFOs, sockets and device files found under input directories and skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_special: Vec<PathBuf>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CorpusStats {
    /// How many lines were skipped and why, e.g. `skipped 3 line(s) not UTF-8 (the first at
    /// a.txt:2)`, or `None` if none was.
    pub fn skipped_note(&self) -> Option<String> {
        let mut parts = Vec::new();
        let mut add = |n: u64, why: &str, first: &Option<String>| {
            if n > 0 {
                let first = first.as_deref().unwrap_or("?");
                parts.push(format!("{n} line(s) {why} (the first at {first})"));
            }
        };
        add(self.skipped_non_utf8, "not UTF-8", &self.first_non_utf8);
        add(self.skipped_nul, "holding a NUL byte", &self.first_nul);
        (!parts.is_empty()).then(|| format!("skipped {}", parts.join(" and ")))
    }

    fn skip(&mut self, bad: BadLine, at: String) {
        let (count, first) = match bad {
            BadLine::NotUtf8 { .. } => (&mut self.skipped_non_utf8, &mut self.first_non_utf8),
            BadLine::Nul { .. } => (&mut self.skipped_nul, &mut self.first_nul),
        };
        *count += 1;
        first.get_or_insert(at);
    }
}

/// Why a line cannot be a document; `column` is 1-based, in bytes.
#[derive(Debug, Clone, Copy)]
enum BadLine {
    NotUtf8 { column: usize },
    Nul { column: usize },
}

impl BadLine {
    fn error(self, path: &Path, line: u64) -> DataError {
        let path = path.to_path_buf();
        match self {
            Self::NotUtf8 { column } => DataError::NotUtf8 { path, line, column },
            Self::Nul { column } => DataError::NulByte { path, line, column },
        }
    }
}

/// `bytes` as text, or why they are not.
fn decode(bytes: &[u8]) -> Result<&str, BadLine> {
    let text = std::str::from_utf8(bytes).map_err(|e| BadLine::NotUtf8 {
        column: e.valid_up_to() + 1,
    })?;
    match memchr::memchr(0, bytes) {
        Some(i) => Err(BadLine::Nul { column: i + 1 }),
        None => Ok(text),
    }
}

/// Reads one line ending at `\n`, `\r\n` or a lone `\r` (universal newlines) into `line`,
/// without its ending; returns the bytes consumed, 0 at the end.
fn read_line_universal(reader: &mut dyn BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Some(end) = memchr::memchr2(b'\n', b'\r', available) else {
            let n = available.len();
            if n == 0 {
                return Ok(consumed);
            }
            line.extend_from_slice(available);
            reader.consume(n);
            consumed += n;
            continue;
        };
        let lone_cr_possible = available[end] == b'\r';
        line.extend_from_slice(&available[..end]);
        reader.consume(end + 1);
        consumed += end + 1;
        // The `\n` of a `\r\n` may lie in the next buffer.
        if lone_cr_possible && reader.fill_buf()?.first() == Some(&b'\n') {
            reader.consume(1);
            consumed += 1;
        }
        return Ok(consumed);
    }
}

/// Reads one line ending at `\n` into `line`, without its `\n` or `\r\n`; returns the bytes
/// consumed, 0 at the end.
fn read_line_lf(reader: &mut dyn BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let n = reader.read_until(b'\n', line)?;
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(n)
}

/// Expands files, directories and globs into a sorted, de-duplicated list of files.
pub fn resolve_inputs(inputs: &[String]) -> Result<Vec<PathBuf>, DataError> {
    resolve_inputs_reporting(inputs).map(|(files, _)| files)
}

/// [`resolve_inputs`], also returning the special files (FIFOs, sockets, devices) that were
/// skipped under directories, for a warning.
///
/// Directories are walked recursively, hidden entries skipped. Symbolic links are followed,
/// but each real directory is walked once, so a link loop ends instead of recursing for ever.
/// A special file named explicitly is an error: reading a FIFO or `/dev/zero` would hang or
/// never end.
pub fn resolve_inputs_reporting(
    inputs: &[String],
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), DataError> {
    resolve_corpus_inputs(inputs, None)
}

/// [`resolve_inputs_reporting`] reading `split` of the `datasets` folders among the inputs
/// ([`crate::datasets`]: their Arrow files, in shard order; `None`: `train`).
pub fn resolve_corpus_inputs(
    inputs: &[String],
    split: Option<&str>,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), DataError> {
    if inputs.is_empty() {
        return Err(DataError::Input("no input given".to_string()));
    }
    let mut walk = Walk {
        split: split.map(str::to_string),
        ..Walk::default()
    };
    for input in inputs {
        if input.contains(['*', '?', '[']) {
            let paths = glob::glob(input)
                .map_err(|e| DataError::Input(format!("bad glob pattern {input:?}: {e}")))?;
            let before = walk.files.len();
            for path in paths.flatten() {
                if path.is_file() {
                    walk.files.push((path.clone(), vec![path]));
                }
            }
            if walk.files.len() == before {
                return Err(DataError::Input(format!(
                    "{input}: the pattern matches no file"
                )));
            }
            continue;
        }
        let path = PathBuf::from(input);
        if path.is_dir() {
            let before = walk.files.len();
            walk.dir(&path)?;
            if walk.files.len() == before {
                return Err(DataError::Input(format!(
                    "{input}: the directory holds no file"
                )));
            }
        } else if path.is_file() {
            walk.files.push((path.clone(), vec![path]));
        } else if path.exists() {
            return Err(DataError::Input(format!(
                "{input}: not a regular file (a FIFO, socket or device); give text files"
            )));
        } else {
            return Err(DataError::Input(format!(
                "{input}: no such file or directory"
            )));
        }
    }
    // Text files in name order; a datasets folder's Arrow files in its own shard order,
    // each folder where its name sorts.
    walk.files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut files: Vec<PathBuf> = walk.files.into_iter().flat_map(|(_, f)| f).collect();
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    Ok((files, walk.special))
}

#[derive(Default)]
struct Walk {
    /// Sort key (a path) and the files it stands for: one file, or a datasets folder's shards.
    files: Vec<(PathBuf, Vec<PathBuf>)>,
    special: Vec<PathBuf>,
    /// The split of datasets folders.
    split: Option<String>,
    /// Real paths of the directories walked so far.
    seen: std::collections::HashSet<PathBuf>,
}

impl Walk {
    fn dir(&mut self, dir: &Path) -> Result<(), DataError> {
        let read_err = |source| DataError::Read {
            path: dir.to_path_buf(),
            line: None,
            source,
        };
        let real = std::fs::canonicalize(dir).map_err(read_err)?;
        if !self.seen.insert(real) {
            return Ok(());
        }
        if let Some(shards) = crate::datasets::dataset_files(dir, self.split.as_deref())? {
            self.files.push((dir.to_path_buf(), shards));
            return Ok(());
        }
        let entries = std::fs::read_dir(dir).map_err(read_err)?;
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                self.dir(&path)?;
            } else if path.is_file() {
                self.files.push((path.clone(), vec![path]));
            } else if path.exists() {
                self.special.push(path);
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    JsonLines,
    /// `.json` that starts with `[` (decided when the file is opened).
    JsonArray,
    Parquet,
    /// Arrow IPC (`.arrow`): the files of `datasets` folders.
    Arrow,
}

/// Format by the extension under any compression suffix.
fn format_of(path: &Path) -> Format {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let name = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(&name);
    if name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson") {
        Format::JsonLines
    } else if name.ends_with(".parquet") {
        Format::Parquet
    } else if name.ends_with(".arrow") {
        Format::Arrow
    } else {
        Format::Text
    }
}

/// `path` decompressed and buffered, once its first bytes show text ([`crate::sniff`]).
fn open(path: &Path) -> Result<Box<dyn BufRead + Send>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        line: None,
        source,
    })?;
    // The buffer goes outside the sniffed reader, so reading a line costs one dynamic call.
    let checked = crate::sniff::checked(path, decompressing(path, file)?)?;
    Ok(Box::new(BufReader::with_capacity(1 << 20, checked)))
}

/// `file`, decompressed by its extension (`.gz`, `.zst`), buffered.
pub(crate) fn decompressed(path: &Path, file: File) -> Result<Box<dyn BufRead + Send>, DataError> {
    let reader = decompressing(path, file)?;
    Ok(Box::new(BufReader::with_capacity(1 << 20, reader)))
}

/// `file`, decompressed by its extension (`.gz`, `.zst`).
fn decompressing(path: &Path, file: File) -> Result<Box<dyn Read + Send>, DataError> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    Ok(if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else if name.ends_with(".zst") {
        Box::new(
            zstd::stream::read::Decoder::new(file).map_err(|source| DataError::Read {
                path: path.to_path_buf(),
                line: None,
                source,
            })?,
        )
    } else {
        Box::new(file)
    })
}

/// Whether a `.json` file holds one array (its first non-blank byte is `[`) rather than JSON
/// Lines; peeks without consuming anything but leading blanks.
fn starts_array(path: &Path, reader: &mut Box<dyn BufRead + Send>) -> Result<bool, DataError> {
    loop {
        let buffer = reader.fill_buf().map_err(|source| DataError::Read {
            path: path.to_path_buf(),
            line: None,
            source,
        })?;
        let Some(&first) = buffer.first() else {
            return Ok(false);
        };
        match first {
            b' ' | b'\t' | b'\r' | b'\n' => reader.consume(1),
            // A UTF-8 byte-order mark.
            0xEF if buffer.starts_with(&[0xEF, 0xBB, 0xBF]) => reader.consume(3),
            byte => return Ok(byte == b'['),
        }
    }
}

/// Drops a UTF-8 byte-order mark (Notepad writes one), which would otherwise begin the first
/// document as three junk bytes.
fn skip_utf8_bom(path: &Path, reader: &mut Box<dyn BufRead + Send>) -> Result<(), DataError> {
    let buffer = reader.fill_buf().map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        line: None,
        source,
    })?;
    if buffer.starts_with(&[0xEF, 0xBB, 0xBF]) {
        reader.consume(3);
    }
    Ok(())
}

/// A streaming iterator over the documents of a list of files.
pub struct Documents {
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(PathBuf, Format, Box<dyn BufRead + Send>)>,
    /// The current file's records, for the formats read on a thread (Parquet, JSON arrays).
    records: Option<Threaded>,
    line_number: u64,
    buffer: Vec<u8>,
    options: CorpusOptions,
    stats: CorpusStats,
    failed: bool,
}

impl Documents {
    /// Documents of `files`, in order.
    pub fn new(files: Vec<PathBuf>, options: CorpusOptions) -> Self {
        Self {
            files,
            next_file: 0,
            current: None,
            records: None,
            line_number: 0,
            buffer: Vec::new(),
            options,
            stats: CorpusStats::default(),
            failed: false,
        }
    }

    /// Counts so far (complete once the iterator is exhausted).
    pub fn stats(&self) -> &CorpusStats {
        &self.stats
    }

    /// Reads the next line of the current file as text (without its ending), skipping lines
    /// that are not UTF-8 or hold a NUL byte unless strict. `Ok(None)` at end of file.
    fn next_line(&mut self) -> Result<Option<String>, DataError> {
        loop {
            let Some((path, format, reader)) = self.current.as_mut() else {
                return Ok(None);
            };
            self.buffer.clear();
            let read = match format {
                Format::Text => read_line_universal(reader, &mut self.buffer),
                _ => read_line_lf(reader, &mut self.buffer),
            };
            let n = read.map_err(|source| DataError::Read {
                path: path.clone(),
                line: Some(self.line_number + 1),
                source,
            })?;
            if n == 0 {
                return Ok(None);
            }
            self.line_number += 1;
            self.stats.lines += 1;
            self.stats.bytes += n as u64;
            match decode(&self.buffer) {
                Ok(text) => return Ok(Some(text.to_string())),
                Err(bad) if self.options.strict => return Err(bad.error(path, self.line_number)),
                Err(bad) => {
                    let at = format!("{}:{}", path.display(), self.line_number);
                    self.stats.skip(bad, at);
                }
            }
        }
    }

    fn next_document(&mut self) -> Result<Option<String>, DataError> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.get(self.next_file).cloned() else {
                    return Ok(None);
                };
                self.next_file += 1;
                self.stats.files += 1;
                self.line_number = 0;
                let mut format = format_of(&path);
                let reader: Box<dyn BufRead + Send> = match format {
                    Format::Parquet => {
                        self.records =
                            Some(crate::structured::parquet(&path, &self.options.text_field));
                        Box::new(std::io::empty())
                    }
                    Format::Arrow => {
                        self.records =
                            Some(crate::structured::arrow(&path, &self.options.text_field));
                        Box::new(std::io::empty())
                    }
                    _ => {
                        let mut reader = open(&path)?;
                        if format == Format::Text {
                            skip_utf8_bom(&path, &mut reader)?;
                        }
                        if format == Format::JsonLines && starts_array(&path, &mut reader)? {
                            format = Format::JsonArray;
                            self.records = Some(crate::structured::json_array(
                                &path,
                                &self.options.text_field,
                            ));
                        }
                        reader
                    }
                };
                self.current = Some((path.clone(), format, reader));
            }
            let format = self.current.as_ref().map(|c| c.1).unwrap_or(Format::Text);
            let document = match format {
                Format::JsonLines => self.next_json_document()?,
                Format::JsonArray | Format::Parquet | Format::Arrow => self.next_record()?,
                Format::Text if self.options.paragraphs => self.next_paragraph()?,
                Format::Text => self.next_text_line()?,
            };
            match document {
                Some(text) => {
                    self.stats.documents += 1;
                    return Ok(Some(text));
                }
                None => {
                    self.current = None;
                    self.records = None;
                }
            }
        }
    }

    /// The next non-empty record of a Parquet, Arrow or JSON-array file.
    fn next_record(&mut self) -> Result<Option<String>, DataError> {
        let Some(records) = self.records.as_mut() else {
            return Ok(None);
        };
        while let Some(record) = records.next()? {
            self.stats.lines += 1;
            if let Some(text) = record {
                self.stats.bytes += text.len() as u64;
                if !text.trim().is_empty() {
                    return Ok(Some(text));
                }
            }
        }
        Ok(None)
    }

    fn next_text_line(&mut self) -> Result<Option<String>, DataError> {
        while let Some(line) = self.next_line()? {
            if !line.trim().is_empty() {
                return Ok(Some(line));
            }
        }
        Ok(None)
    }

    fn next_paragraph(&mut self) -> Result<Option<String>, DataError> {
        let mut paragraph = String::new();
        while let Some(line) = self.next_line()? {
            if line.trim().is_empty() {
                if !paragraph.is_empty() {
                    return Ok(Some(paragraph));
                }
            } else {
                if !paragraph.is_empty() {
                    paragraph.push('\n');
                }
                paragraph.push_str(&line);
            }
        }
        Ok((!paragraph.is_empty()).then_some(paragraph))
    }

    fn next_json_document(&mut self) -> Result<Option<String>, DataError> {
        while let Some(line) = self.next_line()? {
            if line.trim().is_empty() {
                continue;
            }
            let path = self
                .current
                .as_ref()
                .map(|c| c.0.clone())
                .unwrap_or_default();
            let at = |reason: String| DataError::Json {
                path: path.clone(),
                line: self.line_number,
                reason,
            };
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| at(format!("not JSON: {e}")))?;
            let field = &self.options.text_field;
            match value.get(field) {
                Some(serde_json::Value::String(text)) => {
                    if !text.trim().is_empty() {
                        return Ok(Some(text.clone()));
                    }
                }
                Some(serde_json::Value::Null) => {}
                Some(other) => {
                    return Err(at(format!("field {field:?} is not a string but {other}")));
                }
                None => {
                    let keys: Vec<&str> = value
                        .as_object()
                        .map(|o| o.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    return Err(at(format!(
                        "no field {field:?} (fields: {}); choose one with --text-field",
                        keys.join(", ")
                    )));
                }
            }
        }
        Ok(None)
    }
}

impl Iterator for Documents {
    type Item = Result<String, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_document() {
            Ok(document) => document.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The error for a corpus that yielded no document.
pub fn no_text_error(inputs: &[PathBuf], stats: &CorpusStats) -> DataError {
    let shown: Vec<String> = inputs
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    let more = if inputs.len() > 3 { ", ..." } else { "" };
    let skipped = stats
        .skipped_note()
        .map(|note| format!(", of which {note}"))
        .unwrap_or_default();
    DataError::Input(format!(
        "no text in {}{more}: {} file(s), {} line(s){skipped}",
        shown.join(", "),
        stats.files,
        stats.lines
    ))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn docs(files: Vec<PathBuf>, options: CorpusOptions) -> Result<Vec<String>, DataError> {
        Documents::new(files, options).collect()
    }

    #[test]
    fn lines_paragraphs_jsonl_gzip_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("a.txt");
        std::fs::write(&text, "one\n\n  \ntwo\r\nthree\n").unwrap();
        assert_eq!(
            docs(vec![text.clone()], CorpusOptions::default()).unwrap(),
            ["one", "two", "three"]
        );

        let paragraphs = CorpusOptions {
            paragraphs: true,
            ..CorpusOptions::default()
        };
        std::fs::write(&text, "a\nb\n\n\nc\n").unwrap();
        assert_eq!(docs(vec![text], paragraphs).unwrap(), ["a\nb", "c"]);

        let jsonl = dir.path().join("b.jsonl.gz");
        let mut gz =
            flate2::write::GzEncoder::new(File::create(&jsonl).unwrap(), Default::default());
        gz.write_all(b"{\"text\": \"x y\", \"id\": 1}\n\n{\"text\": \"z\"}\n")
            .unwrap();
        gz.finish().unwrap();
        assert_eq!(
            docs(vec![jsonl], CorpusOptions::default()).unwrap(),
            ["x y", "z"]
        );

        let zst = dir.path().join("c.txt.zst");
        std::fs::write(&zst, zstd::encode_all(&b"p\nq\n"[..], 3).unwrap()).unwrap();
        assert_eq!(
            docs(vec![zst], CorpusOptions::default()).unwrap(),
            ["p", "q"]
        );
    }

    #[test]
    fn non_utf8_lines_are_skipped_and_counted_or_fatal_when_strict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.txt");
        std::fs::write(&path, b"good\ncaf\xe9\nalso good\n").unwrap();
        let mut documents = Documents::new(vec![path.clone()], CorpusOptions::default());
        let got: Vec<String> = documents.by_ref().map(Result::unwrap).collect();
        assert_eq!(got, ["good", "also good"]);
        assert_eq!(documents.stats().skipped_non_utf8, 1);
        assert_eq!(
            documents.stats().first_non_utf8.as_deref(),
            Some(format!("{}:2", path.display()).as_str())
        );

        let strict = CorpusOptions {
            strict: true,
            ..CorpusOptions::default()
        };
        let msg = docs(vec![path.clone()], strict).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("{}:2", path.display())) && msg.contains("UTF-8"),
            "{msg}"
        );
    }

    #[test]
    fn lone_cr_and_crlf_end_lines_as_python_universal_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mac.txt");
        std::fs::write(&path, "one\rtwo\r\nthree\nfour\r").unwrap();
        let mut documents = Documents::new(vec![path.clone()], CorpusOptions::default());
        let got: Vec<String> = documents.by_ref().map(Result::unwrap).collect();
        assert_eq!(got, ["one", "two", "three", "four"]);
        assert_eq!(documents.stats().lines, 4);
        assert_eq!(documents.stats().bytes, 20);

        std::fs::write(&path, "a\rb\r\rc\r").unwrap();
        let paragraphs = CorpusOptions {
            paragraphs: true,
            ..CorpusOptions::default()
        };
        assert_eq!(docs(vec![path], paragraphs).unwrap(), ["a\nb", "c"]);

        // A `\r\n` cut by the end of a buffer is still one line ending.
        let mut reader = std::io::BufReader::with_capacity(4, &b"abc\r\ndef\r"[..]);
        let mut lines = Vec::new();
        let mut line = Vec::new();
        while read_line_universal(&mut reader, &mut line).unwrap() > 0 {
            lines.push(String::from_utf8(std::mem::take(&mut line)).unwrap());
        }
        assert_eq!(lines, ["abc", "def"]);
    }

    #[test]
    fn a_utf8_byte_order_mark_does_not_begin_the_first_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notepad.txt");
        std::fs::write(&path, "\u{feff}first\nsecond\n").unwrap();
        assert_eq!(
            docs(vec![path], CorpusOptions::default()).unwrap(),
            ["first", "second"]
        );
    }

    #[test]
    fn utf16_and_binary_files_are_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain("a cell\n".encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let mut zeros = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        zeros.write_all(&[0u8; 1 << 16]).unwrap();
        let cases: [(&str, Vec<u8>, &str); 3] = [
            ("export.txt", utf16.clone(), "iconv -f UTF-16 -t UTF-8"),
            ("records.jsonl", utf16, "iconv -f UTF-16 -t UTF-8"),
            ("zeros.txt.gz", zeros.finish().unwrap(), "binary, not text"),
        ];
        for (name, bytes, hint) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let err = docs(vec![path.clone()], CorpusOptions::default()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, DataError::NotText { .. }), "{name}: {msg}");
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains(hint),
                "{msg}"
            );
        }
    }

    #[test]
    fn nul_lines_past_the_first_bytes_are_skipped_and_counted_or_fatal_when_strict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("padded.txt");
        let mut bytes = "clean text\n".repeat(1000).into_bytes();
        bytes.extend(b"cut\0\0\0\0\nlast\n");
        std::fs::write(&path, &bytes).unwrap();
        let mut documents = Documents::new(vec![path.clone()], CorpusOptions::default());
        assert_eq!(documents.by_ref().count(), 1001);
        let at = format!("{}:1001", path.display());
        assert_eq!(documents.stats().skipped_nul, 1);
        assert_eq!(documents.stats().first_nul.as_deref(), Some(at.as_str()));
        assert_eq!(
            documents.stats().skipped_note().unwrap(),
            format!("skipped 1 line(s) holding a NUL byte (the first at {at})")
        );

        let strict = CorpusOptions {
            strict: true,
            ..CorpusOptions::default()
        };
        let msg = docs(vec![path], strict).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("{at}: a NUL byte at column 4")),
            "{msg}"
        );
    }

    #[test]
    fn jsonl_without_the_field_names_file_line_and_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\": \"ok\"}\n{\"body\": \"no\", \"id\": 2}\n").unwrap();
        let msg = docs(vec![path.clone()], CorpusOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&format!("{}:2", path.display()))
                && msg.contains("no field \"text\"")
                && msg.contains("body, id")
                && msg.contains("--text-field"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_gzip_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        for i in 0..2000 {
            writeln!(gz, "line number {i} of a file that will be cut").unwrap();
        }
        let bytes = gz.finish().unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = docs(vec![path.clone()], CorpusOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("t.txt.gz") && msg.contains("cannot read"),
            "{msg}"
        );
    }

    #[test]
    fn inputs_missing_empty_dir_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt").display().to_string();
        let msg = resolve_inputs(std::slice::from_ref(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&missing) && msg.contains("no such file"),
            "{msg}"
        );

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let msg = resolve_inputs(&[empty.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("holds no file"), "{msg}");

        std::fs::create_dir_all(dir.path().join("tree/sub")).unwrap();
        std::fs::write(dir.path().join("tree/b.txt"), "b\n").unwrap();
        std::fs::write(dir.path().join("tree/sub/a.txt"), "a\n").unwrap();
        std::fs::write(dir.path().join("tree/.hidden"), "h\n").unwrap();
        let files = resolve_inputs(&[dir.path().join("tree").display().to_string()]).unwrap();
        assert_eq!(files.len(), 2);
        let pattern = dir.path().join("tree/*.txt").display().to_string();
        assert_eq!(resolve_inputs(&[pattern]).unwrap().len(), 1);
    }

    #[test]
    fn link_loops_end_and_special_files_are_skipped_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/a.txt"), "a\n").unwrap();
        // sub/loop -> .. : following it naively recurses until the path is too long.
        std::os::unix::fs::symlink("..", tree.join("sub/loop")).unwrap();
        let fifo = tree.join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let (files, special) = resolve_inputs_reporting(&[tree.display().to_string()]).unwrap();
        assert_eq!(files, [tree.join("sub/a.txt")]);
        assert_eq!(special, std::slice::from_ref(&fifo));
        let msg = resolve_inputs(&[fifo.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a regular file"), "{msg}");
    }

    #[test]
    fn only_empty_lines_is_no_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blank.txt");
        std::fs::write(&path, "\n  \n\n").unwrap();
        let mut documents = Documents::new(vec![path.clone()], CorpusOptions::default());
        assert!(documents.next().is_none());
        let msg = no_text_error(&[path], documents.stats()).to_string();
        assert!(
            msg.contains("no text in") && msg.contains("3 line(s)"),
            "{msg}"
        );
    }
}
