//! Atomic file writes: write beside the target, fsync, then rename, so a reader never sees a
//! half-written file and a crash leaves the previous version intact.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::StageError;

/// A file being written; it appears at its path only on [`AtomicFile::commit`].
#[derive(Debug)]
pub struct AtomicFile {
    temp: tempfile::NamedTempFile,
    path: PathBuf,
    overwrite: bool,
}

impl AtomicFile {
    /// Starts writing `path`. Its directory is created if needed. With `overwrite` false,
    /// commit fails if `path` exists by then.
    pub fn create(path: &Path, overwrite: bool) -> Result<Self, StageError> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        if !overwrite && path.exists() {
            return Err(StageError::Failed(format!(
                "{} already exists; refusing to overwrite it (set `overwrite: true` to replace it)",
                path.display()
            )));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp =
            tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".tmp").tempfile_in(&dir).map_err(|e| StageError::io(&dir, e))?;
        Ok(Self { temp, path: path.to_path_buf(), overwrite })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes, syncs and renames into place.
    pub fn commit(mut self) -> Result<(), StageError> {
        let path = self.path.clone();
        self.temp.flush().map_err(|e| StageError::io(&path, e))?;
        self.temp.as_file().sync_all().map_err(|e| StageError::io(&path, e))?;
        // Temporary files are private (0600); the result gets the usual permissions.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = self.temp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
        }
        let result = if self.overwrite { self.temp.persist(&path).map(|_| ()) } else { self.temp.persist_noclobber(&path).map(|_| ()) };
        result.map_err(|e| StageError::io(&path, e.error))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every filesystem supports syncing a directory.
            if let Ok(handle) = std::fs::File::open(dir) {
                let _ = handle.sync_all();
            }
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.temp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.temp.flush()
    }
}

/// Writes a whole file atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let mut file = AtomicFile::create(path, true)?;
    file.write_all(bytes).map_err(|e| StageError::io(path, e))?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_appears_until_commit_and_a_drop_leaves_no_trace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let mut file = AtomicFile::create(&path, false).expect("create");
        file.write_all(b"{}\n").expect("write");
        assert!(!path.exists());
        drop(file);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);

        let mut file = AtomicFile::create(&path, false).expect("create");
        file.write_all(b"{}\n").expect("write");
        file.commit().expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}\n");
        let err = AtomicFile::create(&path, false).expect_err("exists");
        assert!(err.to_string().contains("refusing to overwrite"));
    }
}
