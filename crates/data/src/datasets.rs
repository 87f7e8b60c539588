//! Hugging Face `datasets` folders as corpus input: their Arrow files, in order.
//!
//! Three layouts, recognised by the files `datasets` writes beside the data:
//! - `Dataset.save_to_disk(DIR)`: `DIR/state.json` lists the shards
//!   (`_data_files: [{"filename": "data-00000-of-00002.arrow"}, ...]`);
//! - `DatasetDict.save_to_disk(DIR)`: `DIR/dataset_dict.json` lists the splits
//!   (`{"splits": ["train", "validation"]}`), each a `Dataset` folder `DIR/SPLIT`;
//! - the `load_dataset` cache (`~/.cache/huggingface/datasets/NAME/CONFIG/VERSION/HASH`):
//!   `dataset_info.json` names the splits, and each split is `NAME-SPLIT.arrow` or the shards
//!   `NAME-SPLIT-00000-of-00003.arrow`, ...
//!
//! A split is chosen with `--split` (`data.split`); without one, `train`, as `run_mlm.py`
//! trains on `raw_datasets["train"]`. The Arrow files themselves are read by
//! [`crate::structured`], one record batch at a time.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::DataError;

/// The split read when none is chosen.
pub const DEFAULT_SPLIT: &str = "train";

/// The Arrow files of `dir` when it is a `datasets` folder (`None` when it is not), for
/// `split` (default [`DEFAULT_SPLIT`]) where the folder holds several.
pub(crate) fn dataset_files(
    dir: &Path,
    split: Option<&str>,
) -> Result<Option<Vec<PathBuf>>, DataError> {
    if dir.join("dataset_dict.json").is_file() {
        let splits = read_json(&dir.join("dataset_dict.json"))?;
        let names = string_list(&splits["splits"]);
        let split = chosen(dir, split, &names)?;
        let folder = dir.join(split);
        if !folder.join("state.json").is_file() {
            return Err(DataError::Input(format!(
                "{}: dataset_dict.json lists split {split:?} but {} holds no state.json; the \
                 folder is incomplete: save it again with DatasetDict.save_to_disk",
                dir.display(),
                folder.display()
            )));
        }
        return saved_dataset(&folder).map(Some);
    }
    if dir.join("state.json").is_file() {
        return saved_dataset(dir).map(Some);
    }
    if dir.join("dataset_info.json").is_file() {
        return cached_split(dir, split);
    }
    Ok(None)
}

/// The shards a `Dataset.save_to_disk` folder's `state.json` lists, each checked present.
fn saved_dataset(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let path = dir.join("state.json");
    let state = read_json(&path)?;
    let Some(files) = state["_data_files"].as_array() else {
        return Err(DataError::Input(format!(
            "{}: no `_data_files` list; not a state.json written by datasets' save_to_disk",
            path.display()
        )));
    };
    let mut shards = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let Some(name) = file["filename"].as_str() else {
            return Err(DataError::Input(format!(
                "{}: `_data_files[{i}]` has no filename",
                path.display()
            )));
        };
        let shard = dir.join(name);
        if !shard.is_file() {
            return Err(DataError::Input(format!(
                "{}: lists {name}, which is missing from {}",
                path.display(),
                dir.display()
            )));
        }
        shards.push(shard);
    }
    if shards.is_empty() {
        return Err(DataError::Input(format!(
            "{}: the dataset has no data file",
            path.display()
        )));
    }
    Ok(shards)
}

/// The Arrow files of one split in a `load_dataset` cache folder: `NAME-SPLIT.arrow` or its
/// shards `NAME-SPLIT-NNNNN-of-NNNNN.arrow`, in shard order. `None` when the folder holds no
/// Arrow file (a `dataset_info.json` alone is not a dataset).
fn cached_split(dir: &Path, split: Option<&str>) -> Result<Option<Vec<PathBuf>>, DataError> {
    let arrow_files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DataError::Read {
            path: dir.to_path_buf(),
            line: None,
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "arrow") && p.is_file())
        .collect();
    if arrow_files.is_empty() {
        return Ok(None);
    }
    let info = read_json(&dir.join("dataset_info.json"))?;
    let names: Vec<String> = match info["splits"].as_object() {
        Some(splits) => splits.keys().cloned().collect(),
        None => Vec::new(),
    };
    let split = chosen(dir, split, &names)?;
    let mut files: Vec<PathBuf> = arrow_files
        .into_iter()
        .filter(|p| {
            let name = p.file_stem().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(&format!("-{split}")) || is_shard_of(name, split)
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::Input(format!(
            "{}: dataset_info.json lists split {split:?} but no {split} Arrow file is there \
             (NAME-{split}.arrow or NAME-{split}-00000-of-NNNNN.arrow); the cache is \
             incomplete: load the dataset again",
            dir.display()
        )));
    }
    Ok(Some(files))
}

/// Whether the file stem `name` is `...-SPLIT-NNNNN-of-NNNNN`.
fn is_shard_of(name: &str, split: &str) -> bool {
    let Some((head, total)) = name.rsplit_once("-of-") else {
        return false;
    };
    let Some((head, index)) = head.rsplit_once('-') else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    digits(total) && digits(index) && head.ends_with(&format!("-{split}"))
}

/// `split` (or the default) if the folder has it; an error listing the folder's splits.
fn chosen<'a>(dir: &Path, split: Option<&'a str>, names: &[String]) -> Result<&'a str, DataError> {
    let wanted = split.unwrap_or(DEFAULT_SPLIT);
    if names.iter().any(|n| n == wanted) {
        return Ok(wanted);
    }
    let how = if split.is_some() {
        format!("it has no split {wanted:?}")
    } else {
        format!("it has no {DEFAULT_SPLIT:?} split, the default")
    };
    Err(DataError::Input(format!(
        "{}: a datasets folder with the splits {}; {how}: choose one with --split (data.split \
         in a training config)",
        dir.display(),
        if names.is_empty() {
            "(none listed)".to_string()
        } else {
            names.join(", ")
        }
    )))
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn read_json(path: &Path) -> Result<Value, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        line: None,
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| DataError::Input(format!("{}: not valid JSON: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_follow_datasets_spelling() {
        assert!(is_shard_of("json-train-00000-of-00002", "train"));
        assert!(!is_shard_of("json-train-00000-of-00002", "test"));
        assert!(!is_shard_of("json-pretrain-0-of-2", "train"));
        assert!(!is_shard_of("json-train", "train"));
    }
}
