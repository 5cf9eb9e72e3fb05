//! One server per data directory: `serve` takes an exclusive advisory lock (`flock` on Unix,
//! `LockFileEx` on Windows) on `storygpt-v.lock` in the data directory before it opens the
//! database, and holds it until it stops. A second server on the same directory, on whatever
//! port, fails at once with a message naming the directory and the process holding it, before
//! it has migrated the database, recovered jobs or started a worker.
//!
//! The lock goes with the process: the operating system drops it when the process ends, even
//! by kill -9, so a crash never leaves a stale lock behind. The file itself stays, holding the
//! PID of the last server that held it; its content is only informative.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Name of the lock file in the data directory.
pub const LOCK_FILE: &str = "storygpt-v.lock";

/// The held lock on a data directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `data_dir` (which must exist) without waiting, and writes this
    /// process's id into the lock file. Fails when another process holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(LOCK_FILE);
        // Opened without truncating: the holder's PID must stay readable to a second server.
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path);
        let mut file = match opened {
            Ok(file) => file,
            // The first write of a start: a read-only directory is said as what it is.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                tracing::error!(error = %err, file = %path.display(), "cannot open the lock file");
                bail!(
                    "cannot write in the data directory {} (its lock file {}): the directory \
                     or the file is read-only; make it writable or choose another --data-dir",
                    data_dir.display(),
                    path.display()
                );
            }
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot open the lock file {}", path.display()))
            }
        };
        if let Err(err) = fs2::FileExt::try_lock_exclusive(&file) {
            if err.kind() != fs2::lock_contended_error().kind() {
                return Err(err).with_context(|| {
                    format!(
                        "cannot lock the data directory {} (lock file {})",
                        data_dir.display(),
                        path.display()
                    )
                });
            }
            let holder = holder_pid(&mut file)
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            bail!(
                "the data directory {} is in use by another storygpt-v server{holder}, which \
                 holds its lock file {}; stop that server first, or give this one another data \
                 directory (--data-dir). Nothing was changed.",
                data_dir.display(),
                path.display()
            );
        }
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(format!("{pid}\n").as_bytes()))
            .and_then(|()| file.flush());
        if let Err(err) = written {
            // The lock is what matters; the PID is only there to name the holder.
            tracing::warn!(error = %err, file = %path.display(), "cannot write the PID into the lock file");
        }
        Ok(Self { file, path })
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Closing the file would release it too; unlocking first keeps the order explicit.
        let _ = fs2::FileExt::unlock(&self.file);
    }
}

/// The PID another server wrote into the lock file, when it can be read.
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());

        // A separate open file description conflicts with flock even in the same process.
        let err = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        assert!(err.contains("in use by another storygpt-v server"), "{err}");

        drop(first);
        let again = DataDirLock::acquire(dir.path()).unwrap();
        drop(again);
    }
}
