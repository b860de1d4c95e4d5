//! Files that survive a crash: fsync, an atomic directory swap, a one-writer lock, free space.
//!
//! The checkpoint writer ([`crate::checkpoint::CheckpointWriter`]) is built from these. Each
//! follows the POSIX recipe the databases use (SQLite's and PostgreSQL's documentation of it):
//! data reaches the disk only after `fsync` of the file, and a rename or a new directory entry
//! only after `fsync` of the directory that holds it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `fsync` of a file: its data and size are on disk when this returns.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub(crate) fn sync_file(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// `fsync` of a directory: the entries created, renamed or removed in it are on disk.
///
/// # Errors
/// [`Error::Io`] naming the directory.
pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        f.sync_all().map_err(|e| Error::io(path, e))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// The directory holding `path` (`.` for a bare name).
pub(crate) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Swaps two existing directory entries in one atomic step (Linux `renameat2` with
/// `RENAME_EXCHANGE`): at every instant each path names one complete directory, the old or the
/// new. `Ok(false)` where the system or file system cannot (other systems, some network file
/// systems); the caller then falls back to two renames.
///
/// # Errors
/// The OS error for anything but "not supported".
pub(crate) fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let cstr = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        };
        let (ca, cb) = (cstr(a)?, cstr(b)?);
        // SAFETY: two valid NUL-terminated paths, relative to the working directory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// Bytes free to an unprivileged writer on the file system holding `path` (or its nearest
/// existing ancestor); `None` where it cannot be told.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let existing = path.ancestors().find(|a| a.exists())?;
        let existing = if existing.as_os_str().is_empty() {
            Path::new(".")
        } else {
            existing
        };
        let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
        // SAFETY: `st` is written by statvfs before it is read; `c` is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// "1.50 GB", "12.0 MB": a byte count for messages.
pub(crate) fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} bytes")
    }
}

/// One writer per directory: an exclusive `flock` on `PARENT/.NAME.lock`, which holds the
/// owner's pid. The lock goes with the process (the kernel drops it when the process dies, by
/// `kill -9` too), so a lock file a dead run left is taken over by the next run; the pid in it
/// only serves the message. Released (and the file removed) on drop.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    file: File,
}

impl DirLock {
    /// The lock file of `dir`: `.NAME.lock` beside it (not inside, because the checkpoint
    /// directory itself is swapped whole).
    pub fn path_for(dir: &Path) -> PathBuf {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        parent_of(dir).join(format!(".{name}.lock"))
    }

    /// Takes the lock of `dir` (creating its parent directories), or fails at once if another
    /// live process holds it.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming `dir`, the other process's pid and the lock file;
    /// [`Error::Io`] if the lock file cannot be created.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = Self::path_for(dir);
        let parent = parent_of(dir);
        std::fs::create_dir_all(&parent).map_err(|e| {
            Error::checkpoint(
                dir,
                format!(
                    "cannot create its parent directory {}: {e}",
                    parent.display()
                ),
            )
        })?;
        // A lock file removed by its owner between our open and our flock is a different
        // inode from the one at the path now: try again, a few times.
        for _ in 0..8 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            let mut previous = String::new();
            if !try_lock(&file).map_err(|e| Error::io(&path, e))? {
                let _ = file.read_to_string(&mut previous);
                let pid = previous.trim();
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "another run{} is writing checkpoints into it (lock file {}): wait for \
                         it to finish or stop it, or choose another output directory",
                        if pid.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {pid})")
                        },
                        path.display()
                    ),
                ));
            }
            if !same_file(&file, &path) {
                continue;
            }
            file.set_len(0).map_err(|e| Error::io(&path, e))?;
            file.rewind().map_err(|e| Error::io(&path, e))?;
            writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            return Ok(Self { path, file });
        }
        Err(Error::checkpoint(
            dir,
            format!(
                "its lock file {} keeps being replaced by another process",
                path.display()
            ),
        ))
    }

    /// The lock file.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock; a process that opened it meanwhile
        // sees a different inode at the path and tries again (see `acquire`).
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file; // unlocked when closed
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` if another open file holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid open file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(e)
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(true)
    }
}

/// Whether the open `file` is the file at `path` now.
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename, fsync of the
/// directory. A crash leaves the old file or the new one, never a mix.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent_of(path).join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(&parent_of(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_swaps_two_directories() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("x"), "a").unwrap();
        std::fs::write(b.join("x"), "b").unwrap();
        if exchange(&a, &b).unwrap() {
            assert_eq!(std::fs::read_to_string(a.join("x")).unwrap(), "b");
            assert_eq!(std::fs::read_to_string(b.join("x")).unwrap(), "a");
        }
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_owner_and_a_released_one_is_taken() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let lock = DirLock::acquire(&dir).unwrap();
        assert_eq!(lock.path(), root.path().join(".out.lock"));
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id()))
                && e.contains("another run")
                && e.contains(".out.lock"),
            "{e}"
        );
        drop(lock);
        assert!(!root.path().join(".out.lock").exists());
        // A lock file a dead process left (no flock held): taken over.
        std::fs::write(root.path().join(".out.lock"), "4000000000\n").unwrap();
        let lock = DirLock::acquire(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(lock.path()).unwrap().trim(),
            std::process::id().to_string()
        );
    }

    #[test]
    fn write_atomic_replaces_whole() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        assert!(free_bytes(root.path()).is_some_and(|b| b > 0));
        assert_eq!(human_bytes(1_500_000_000), "1.50 GB");
    }
}
