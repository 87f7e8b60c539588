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
    /// The folder [`lock_folder`] created for this lock: removed on release when nothing but
    /// the lock file was written into it (a refused run leaves no empty folder behind).
    created: Option<PathBuf>,
}

/// Locks `dir` (created if needed) for this process through `dir/.lock`, or says who holds
/// it. `what` names the folder's role in the message ("run", "prepare").
pub fn lock_folder(dir: &Path, what: &str) -> Result<FolderLock, DataError> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir).map_err(|source| DataError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut lock = lock_file(&dir.join(".lock"), dir, what)?;
    lock.created = (!existed).then(|| dir.to_path_buf());
    Ok(lock)
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let Some(dir) = &self.created else {
            return;
        };
        let only_the_lock = std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .map(|e| e.map(|e| e.path()))
                .all(|p| p.is_ok_and(|p| p == self.path))
        });
        if only_the_lock {
            // Best effort: `remove_dir` fails, leaving the folder, if another process has
            // written into it meanwhile.
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_dir(dir);
        }
    }
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
    Ok(FolderLock {
        _file: file,
        path,
        created: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_made_for_a_lock_and_left_empty_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        drop(lock_folder(&run, "run").unwrap());
        assert!(!run.exists(), "a refused run leaves no folder");

        let lock = lock_folder(&run, "run").unwrap();
        std::fs::write(run.join("metrics.jsonl"), "{}\n").unwrap();
        drop(lock);
        assert!(
            run.join("metrics.jsonl").is_file(),
            "a folder with work in it stays"
        );

        // A folder that was there before is never removed, empty or not.
        let existing = dir.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        drop(lock_folder(&existing, "run").unwrap());
        assert!(existing.is_dir());
    }

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
