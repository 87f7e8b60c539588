//! Refusing an `--out` that would write over the command's own input: a folder copied onto
//! itself is emptied (`std::fs::copy(a, a)` truncates), a cache rebuilt over its corpus
//! deletes it, a report written over `metrics.jsonl` replaces it.

use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};

/// `path` made absolute with symlinks resolved, also for a path that does not exist yet:
/// its longest existing ancestor canonicalised, the rest appended (`..` applied to the text).
fn resolved(path: &Path) -> Option<PathBuf> {
    let mut existing = std::path::absolute(path).ok()?;
    let mut rest = Vec::new();
    let mut base = loop {
        match existing.canonicalize() {
            Ok(base) => break base,
            Err(_) => {
                rest.push(
                    existing
                        .components()
                        .next_back()?
                        .as_os_str()
                        .to_os_string(),
                );
                if !existing.pop() {
                    return None;
                }
            }
        }
    };
    for part in rest.iter().rev() {
        match Path::new(part).components().next() {
            Some(Component::ParentDir) => {
                base.pop();
            }
            Some(Component::CurDir) | None => {}
            Some(_) => base.push(part),
        }
    }
    Some(base)
}

/// Whether two existing paths are one file through hard links.
#[cfg(unix)]
fn same_inode(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_inode(_: &Path, _: &Path) -> bool {
    false
}

/// How `out` relates to `input`: "is", "is inside" or "contains"; `None` when apart (or when
/// `input` does not exist: there is nothing to overwrite).
fn relation(out: &Path, input: &Path) -> Option<&'static str> {
    let input_real = input.canonicalize().ok()?;
    let out_real = resolved(out)?;
    if out_real == input_real || same_inode(out, input) {
        Some("is")
    } else if out_real.starts_with(&input_real) {
        Some("is inside")
    } else if input_real.starts_with(&out_real) {
        Some("contains")
    } else {
        None
    }
}

/// Refuses `--out OUT` when it is, is inside, or contains `input` (given as `input_flag`).
pub fn refuse_overlap(out: &Path, input: &Path, input_flag: &str) -> Result<()> {
    if let Some(relation) = relation(out, input) {
        bail!(
            "--out {} {relation} {input_flag} {}: the command would write over its own input; \
             choose an --out apart from it",
            out.display(),
            input.display()
        );
    }
    Ok(())
}

/// [`refuse_overlap`] for each corpus input: files and folders as given, and the files a glob
/// matches.
pub fn refuse_overlap_inputs(out: &Path, inputs: &[String], input_flag: &str) -> Result<()> {
    for input in inputs {
        let paths = if input.contains(['*', '?', '[']) {
            masklm_data::resolve_inputs(std::slice::from_ref(input)).unwrap_or_default()
        } else {
            vec![PathBuf::from(input)]
        };
        for path in paths {
            refuse_overlap(out, &path, input_flag)?;
        }
    }
    Ok(())
}

/// Whether an output folder holds anything but a lock file (left by an earlier run).
pub fn occupied(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .is_ok_and(|entries| entries.flatten().any(|entry| entry.file_name() != ".lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_see_through_symlinks_dots_and_missing_tails() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("metrics.jsonl"), "{}").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        let cases: [(PathBuf, &Path, Option<&str>); 9] = [
            (model.clone(), &model, Some("is")),
            (link.clone(), &model, Some("is")),
            (model.join("../model/."), &model, Some("is")),
            (link.join("new/../../model"), &model, Some("is")),
            (link.join("new/deeper"), &model, Some("is inside")),
            (dir.path().to_path_buf(), &link, Some("contains")),
            (dir.path().join("other"), &model, None),
            (
                link.join("metrics.jsonl"),
                &model.join("metrics.jsonl"),
                Some("is"),
            ),
            (link.join("report.html"), &model.join("metrics.jsonl"), None),
        ];
        for (out, input, want) in cases {
            assert_eq!(
                relation(&out, input),
                want,
                "{} vs {}",
                out.display(),
                input.display()
            );
        }
    }
}
