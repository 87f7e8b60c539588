//! Corpus formats read on a thread of their own and handed over one document at a time:
//! Parquet (row group by row group, only the text column), Arrow IPC (the files of `datasets`
//! folders: record batch by record batch, only the text column) and JSON arrays (element by
//! element). Neither is ever held whole in memory; a panic inside a decoder on a damaged file
//! becomes an error naming the file.

use std::fs::File;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, reader::RowIter};
use parquet::schema::types::Type;

use crate::DataError;

/// A document (`None`: a record without text, e.g. a null cell) or the error that ends the
/// file.
type Item = Result<Option<String>, DataError>;

/// The documents of one Parquet or JSON-array file, read on a thread.
pub(crate) struct Threaded {
    rx: Receiver<Item>,
    handle: Option<JoinHandle<()>>,
}

impl Threaded {
    /// The next record: `Ok(Some(Some(text)))`, `Ok(Some(None))` for a record without text,
    /// `Ok(None)` at the end of the file.
    pub(crate) fn next(&mut self) -> Result<Option<Option<String>>, DataError> {
        match self.rx.recv() {
            Ok(item) => item.map(Some),
            Err(_) => {
                if let Some(handle) = self.handle.take() {
                    let _ = handle.join();
                }
                Ok(None)
            }
        }
    }
}

impl Drop for Threaded {
    fn drop(&mut self) {
        // Dropping the receiver makes the reader's next send fail, and it returns.
        let (_, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Runs `read` on a thread that sends each record through a bounded channel; a panic in it
/// becomes an error naming `path`.
fn spawn(
    path: &Path,
    read: impl FnOnce(&SyncSender<Item>) -> Result<(), DataError> + Send + 'static,
) -> Threaded {
    let (tx, rx) = sync_channel::<Item>(1024);
    let path = path.to_path_buf();
    let handle = std::thread::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&tx)));
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                structured_error(&path, None, format!("the file is damaged ({message})"))
            }
        };
        let _ = tx.send(Err(error));
    });
    Threaded {
        rx,
        handle: Some(handle),
    }
}

fn structured_error(path: &Path, record: Option<u64>, reason: String) -> DataError {
    DataError::Record {
        path: path.to_path_buf(),
        record,
        reason,
    }
}

/// The text column `field` of a Parquet file.
pub(crate) fn parquet(path: &Path, field: &str) -> Threaded {
    let (owned, field) = (path.to_path_buf(), field.to_string());
    spawn(path, move |tx| read_parquet(&owned, &field, tx))
}

fn read_parquet(path: &PathBuf, field: &str, tx: &SyncSender<Item>) -> Result<(), DataError> {
    let bad = |record: Option<u64>, reason: String| structured_error(path, record, reason);
    let file = File::open(path).map_err(|source| DataError::Read {
        path: path.clone(),
        line: None,
        source,
    })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| bad(None, format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let root = schema.root_schema();
    let Some(column) = root.get_fields().iter().find(|f| f.name() == field) else {
        let names: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
        return Err(bad(
            None,
            format!(
                "no column {field:?} (columns: {}); choose one with --text-field",
                names.join(", ")
            ),
        ));
    };
    if !column.is_primitive() || column.get_physical_type() != parquet::basic::Type::BYTE_ARRAY {
        return Err(bad(
            None,
            format!(
                "column {field:?} does not hold strings; choose a text column with --text-field"
            ),
        ));
    }
    let projection = Type::group_type_builder(root.name())
        .with_fields(vec![column.clone()])
        .build()
        .map_err(|e| bad(None, e.to_string()))?;
    let mut row = 0u64;
    for group in 0..reader.num_row_groups() {
        let group_reader = reader
            .get_row_group(group)
            .map_err(|e| bad(Some(row + 1), format!("row group {group}: {e}")))?;
        let rows = RowIter::from_row_group(Some(projection.clone()), &*group_reader)
            .map_err(|e| bad(Some(row + 1), format!("row group {group}: {e}")))?;
        for record in rows {
            row += 1;
            let record = record.map_err(|e| bad(Some(row), e.to_string()))?;
            let text = match record.get_column_iter().next().map(|(_, value)| value) {
                Some(Field::Str(text)) => Some(text.clone()),
                Some(Field::Bytes(bytes)) => Some(
                    String::from_utf8(bytes.data().to_vec())
                        .map_err(|_| bad(Some(row), format!("{field:?} is not UTF-8")))?,
                ),
                Some(Field::Null) | None => None,
                Some(other) => {
                    return Err(bad(Some(row), format!("{field:?} is {other}, not text")));
                }
            };
            if tx.send(Ok(text)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The text column `field` of an Arrow IPC file: the stream format `datasets` writes
/// (`save_to_disk`, the `load_dataset` cache), or the file format (`ARROW1`).
pub(crate) fn arrow(path: &Path, field: &str) -> Threaded {
    let (owned, field) = (path.to_path_buf(), field.to_string());
    spawn(path, move |tx| read_arrow(&owned, &field, tx))
}

/// An Arrow IPC reader of either format, decoding only the columns in `projection`.
fn arrow_batches(
    path: &Path,
    projection: Option<Vec<usize>>,
) -> Result<Box<dyn arrow_array::RecordBatchReader + Send>, DataError> {
    use std::io::{Read, Seek};
    let mut file = File::open(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        line: None,
        source,
    })?;
    let mut magic = [0u8; 6];
    let n = file.read(&mut magic).unwrap_or(0);
    file.rewind().map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        line: None,
        source,
    })?;
    let not_arrow = |e: arrow_schema::ArrowError| {
        structured_error(path, None, format!("not a readable Arrow file: {e}"))
    };
    if n == 6 && &magic == b"ARROW1" {
        Ok(Box::new(
            arrow_ipc::reader::FileReader::try_new_buffered(file, projection).map_err(not_arrow)?,
        ))
    } else {
        Ok(Box::new(
            arrow_ipc::reader::StreamReader::try_new_buffered(file, projection)
                .map_err(not_arrow)?,
        ))
    }
}

fn read_arrow(path: &Path, field: &str, tx: &SyncSender<Item>) -> Result<(), DataError> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_schema::DataType;
    let bad = |record: Option<u64>, reason: String| structured_error(path, record, reason);
    let schema = arrow_batches(path, None)?.schema();
    let Some((index, column)) = schema.column_with_name(field) else {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(bad(
            None,
            format!(
                "no column {field:?} (columns: {}); choose one with --text-field",
                names.join(", ")
            ),
        ));
    };
    let is_text =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    let data_type = column.data_type().clone();
    let text_column = match &data_type {
        DataType::Dictionary(_, values) => is_text(values),
        other => is_text(other),
    };
    if !text_column {
        return Err(bad(
            None,
            format!(
                "column {field:?} holds {data_type}, not strings; choose a text column with \
                 --text-field"
            ),
        ));
    }
    let mut row = 0u64;
    for batch in arrow_batches(path, Some(vec![index]))? {
        let batch = batch.map_err(|e| bad(Some(row + 1), format!("after row {row}: {e}")))?;
        let column = batch.column(0);
        // A dictionary-encoded column (pyarrow's `dictionary_encode`): each row's key into
        // its values.
        let dictionary = column.as_any_dictionary_opt();
        let keys = dictionary
            .filter(|d| !d.values().is_empty())
            .map(|d| d.normalized_keys());
        for i in 0..batch.num_rows() {
            row += 1;
            let text = match (dictionary, &keys) {
                _ if column.is_null(i) => None,
                (Some(d), Some(keys)) => string_at(d.values().as_ref(), keys[i]),
                (Some(_), None) => None,
                (None, _) => string_at(column.as_ref(), i),
            };
            if tx.send(Ok(text.map(str::to_string))).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Row `i` of a string array (any of Arrow's three layouts); `None` for a null.
fn string_at(array: &dyn arrow_array::Array, i: usize) -> Option<&str> {
    use arrow_array::{LargeStringArray, StringArray, StringViewArray};
    if array.is_null(i) {
        return None;
    }
    let any = array.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        Some(a.value(i))
    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        Some(a.value(i))
    } else {
        any.downcast_ref::<StringViewArray>().map(|a| a.value(i))
    }
}

/// The records of a JSON file holding one array: objects (their `field`) or strings.
pub(crate) fn json_array(path: &Path, field: &str) -> Threaded {
    let (owned, field) = (path.to_path_buf(), field.to_string());
    spawn(path, move |tx| read_json_array(&owned, &field, tx))
}

fn read_json_array(path: &PathBuf, field: &str, tx: &SyncSender<Item>) -> Result<(), DataError> {
    use serde::de::{Deserializer as _, SeqAccess, Visitor};

    struct Records<'a> {
        field: &'a str,
        tx: &'a SyncSender<Item>,
    }
    impl<'de> Visitor<'de> for Records<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of records")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            use serde::de::Error;
            let mut record = 0u64;
            while let Some(value) = seq.next_element::<serde_json::Value>()? {
                record += 1;
                let text = match &value {
                    serde_json::Value::String(text) => Some(text.clone()),
                    serde_json::Value::Object(o) => match o.get(self.field) {
                        Some(serde_json::Value::String(text)) => Some(text.clone()),
                        Some(serde_json::Value::Null) => None,
                        Some(other) => {
                            return Err(A::Error::custom(format!(
                                "record {record}: field {:?} is not a string but {other}",
                                self.field
                            )));
                        }
                        None => {
                            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
                            return Err(A::Error::custom(format!(
                                "record {record}: no field {:?} (fields: {}); choose one with \
                                 --text-field",
                                self.field,
                                keys.join(", ")
                            )));
                        }
                    },
                    other => {
                        return Err(A::Error::custom(format!(
                            "record {record} is {other}, not an object or a string"
                        )));
                    }
                };
                if self.tx.send(Ok(text)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        }
    }

    let file = File::open(path).map_err(|source| DataError::Read {
        path: path.clone(),
        line: None,
        source,
    })?;
    let mut reader = crate::corpus::decompressed(path, file)?;
    // serde_json does not skip a UTF-8 byte-order mark.
    let bom = reader
        .fill_buf()
        .map_err(|source| DataError::Read {
            path: path.clone(),
            line: None,
            source,
        })?
        .starts_with(&[0xEF, 0xBB, 0xBF]);
    if bom {
        reader.consume(3);
    }
    let mut de = serde_json::Deserializer::from_reader(reader);
    de.deserialize_seq(Records { field, tx })
        .and_then(|()| de.end())
        .map_err(|e| structured_error(path, None, e.to_string()))
}
