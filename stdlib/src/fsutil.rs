//! Atomic file writes: write beside the target, fsync, then rename, so a reader never sees a
//! half-written file and a crash leaves the previous version intact; and the same for a
//! whole directory ([`StagedDir`]).

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

/// A directory being filled in a staging directory; it appears at its path, whole, only on
/// [`StagedDir::commit`]. Dropped uncommitted, it leaves nothing.
///
/// A new target is staged beside it (`.NAME.XXXXXX.partial`) and renamed into place. An
/// existing target directory (a mount point, say, or one whose parent is not writable) is
/// staged inside itself (`.staging.XXXXXX.partial`) and filled file by file, each rename
/// atomic, the target's other files kept.
#[derive(Debug)]
pub struct StagedDir {
    staging: tempfile::TempDir,
    path: PathBuf,
}

/// The name of the staging directory inside an existing target.
const INSIDE: &str = "staging";

impl StagedDir {
    /// Starts filling `path` (its parent is created if needed). Staging directories that an
    /// earlier, killed attempt left are removed first.
    pub fn create(path: &Path) -> Result<Self, StageError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| StageError::Failed(format!("{} names no directory", path.display())))?;
        if path.exists() && !path.is_dir() {
            return Err(StageError::Failed(format!("{} exists and is not a directory", path.display())));
        }
        let (home, prefix) = if path.is_dir() {
            (path.to_path_buf(), INSIDE.to_string())
        } else {
            let parent = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            };
            std::fs::create_dir_all(&parent).map_err(|e| StageError::io(&parent, e))?;
            (parent, name)
        };
        remove_stale_staging(&home, &prefix);
        let head = format!(".{prefix}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&head).suffix(".partial");
        // The usual permissions, as the umask makes them (a temporary directory is 0700).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o777));
        }
        let staging = builder.tempdir_in(&home).map_err(|e| StageError::io(&home, e))?;
        Ok(Self { staging, path: path.to_path_buf() })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// Moves the directory into place (see [`StagedDir`]).
    pub fn commit(self) -> Result<(), StageError> {
        let path = self.path;
        let staged = self.staging.keep();
        let moved = if staged.parent() == Some(path.as_path()) {
            move_entries(&staged, &path).and_then(|()| std::fs::remove_dir(&staged))
        } else {
            match std::fs::rename(&staged, &path) {
                Ok(()) => Ok(()),
                // Someone made the target meanwhile.
                Err(_) if path.is_dir() => move_entries(&staged, &path).and_then(|()| std::fs::remove_dir(&staged)),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = moved {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(StageError::io(&path, e));
        }
        if let Some(parent) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(handle) = std::fs::File::open(parent)
        {
            let _ = handle.sync_all();
        }
        Ok(())
    }
}

/// Renames every entry of `from` into `to`, replacing entries of the same name.
fn move_entries(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if target.is_dir() && entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(entry.path(), target)?;
    }
    Ok(())
}

/// Removes `.PREFIX.XXXXXX.partial` directories in `dir`: what a killed [`StagedDir`] left
/// (not those of another target whose name only starts like it: `XXXXXX` holds no dot).
fn remove_stale_staging(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let head = format!(".{prefix}.");
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let stale = file_name
            .strip_prefix(&head)
            .and_then(|rest| rest.strip_suffix(".partial"))
            .is_some_and(|random| !random.is_empty() && !random.contains('.'));
        if stale && entry.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!(path = %entry.path().display(), "removing what an interrupted write left");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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

    #[test]
    fn a_staged_directory_appears_whole_on_commit_and_not_at_all_without() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("model");
        let listing = |at: &Path| {
            let mut names: Vec<String> =
                std::fs::read_dir(at).expect("list").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        };
        // Dropped before commit: nothing there.
        let staged = StagedDir::create(&target).expect("create");
        std::fs::write(staged.path().join("config.json"), "{}").expect("write");
        drop(staged);
        assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));

        // A killed attempt's staging directory is removed by the next one (not that of
        // `model.v2`, which only starts like it); commit renames the whole directory, with the
        // permissions any new directory gets here.
        for stale in [".model.AbC123.partial", ".model.v2.AbC123.partial", ".other.AbC123.partial"] {
            std::fs::create_dir(dir.path().join(stale)).expect("stale");
        }
        let staged = StagedDir::create(&target).expect("create");
        std::fs::write(staged.path().join("config.json"), "{\"a\": 1}").expect("write");
        assert!(!target.exists());
        staged.commit().expect("commit");
        assert_eq!(listing(dir.path()), [".model.v2.AbC123.partial", ".other.AbC123.partial", "model"]);
        assert_eq!(std::fs::read_to_string(target.join("config.json")).expect("read"), "{\"a\": 1}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let plain = dir.path().join("plain");
            std::fs::create_dir(&plain).expect("mkdir");
            let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
            assert_eq!(mode(&target), mode(&plain));
            std::fs::remove_dir(&plain).expect("rmdir");
        }

        // Into an existing directory (staged inside it): its files are replaced, others kept.
        std::fs::write(target.join("notes.txt"), "kept").expect("write");
        let staged = StagedDir::create(&target).expect("create");
        assert!(staged.path().starts_with(&target));
        std::fs::write(staged.path().join("config.json"), "{\"a\": 2}").expect("write");
        staged.commit().expect("commit");
        assert_eq!(std::fs::read_to_string(target.join("config.json")).expect("read"), "{\"a\": 2}");
        assert_eq!(listing(&target), ["config.json", "notes.txt"]);

        // A file where the directory should be is refused before anything is written.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        let err = StagedDir::create(&file).expect_err("a file");
        assert!(err.to_string().contains("exists and is not a directory"), "{err}");
    }
}
