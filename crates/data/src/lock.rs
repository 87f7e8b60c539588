//! Advisory folder locks, so two processes never write one run or one cache.
//!
//! A lock is `flock` on a `.lock` file inside the folder, holding the owner's pid for the
//! message the second process prints. The kernel drops the lock when its process dies (even by
//! `kill -9`), so a stale lock file is simply taken over.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::DataError;

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    pub path: PathBuf,
}

/// Locks `dir` (created if needed) for this process through `dir/.lock`, or says who holds
/// it. `what` names the folder's role in the message ("run", "prepare").
pub fn lock_folder(dir: &Path, what: &str) -> Result<FolderLock, DataError> {
    std::fs::create_dir_all(dir).map_err(|source| DataError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    lock_file(&dir.join(".lock"), dir, what)
}

/// Locks the lock file `path` (created if needed), guarding `guarded` (named in the message).
pub fn lock_file(path: &Path, guarded: &Path, what: &str) -> Result<FolderLock, DataError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Write { path, source }
    };
    let path = path.to_path_buf();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(write_err(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(DataError::Locked {
                path: guarded.to_path_buf(),
                what: what.to_string(),
                holder: if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {holder}")
                },
            });
        }
        Err(TryLockError::Error(source)) => return Err(DataError::Write { path, source }),
    }
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(pid.as_bytes()))
        .map_err(write_err(&path))?;
    Ok(FolderLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_folder(dir.path(), "run").unwrap();
        let err = lock_folder(dir.path(), "run").unwrap_err().to_string();
        assert!(
            err.contains(&std::process::id().to_string()) && err.contains("in use"),
            "{err}"
        );
        drop(first);
        lock_folder(dir.path(), "run").unwrap();
    }
}
