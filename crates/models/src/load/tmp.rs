//! Temporary files and directories for atomic writes (assemble under a temp name, then
//! rename into place), made safe against runs that are killed half-way. Every output mpolm
//! writes goes through here: [`write_file`] for a file written in one piece, [`file_in`] /
//! [`file_beside`] for one written as a stream, [`dir_in`] for a directory.
//!
//! Every temp entry is named `.mpolm-tmp-<pid>-…` and holds an advisory lock (`flock`) on
//! itself for as long as it lives; the kernel drops the lock when its process dies, however it
//! dies. Before creating a temp entry in a directory, the leftovers of killed runs there are
//! removed: entries with the prefix that nobody holds locked and that are older than this
//! process. Nothing without the prefix is ever touched.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::SystemTime;

/// Name prefix of every temp entry this program creates.
pub const PREFIX: &str = ".mpolm-tmp-";

static STARTED: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

/// Record this process's start time now (call first thing in `main`): leftovers must be older
/// than it to be removed.
pub fn init() {
    LazyLock::force(&STARTED);
}

fn prefix() -> String {
    format!("{PREFIX}{}-", std::process::id())
}

/// Lock `f` exclusively without waiting; false if another open file holds it.
fn try_lock(f: &File) -> bool {
    f.try_lock().is_ok()
}

/// Remove the leftovers of killed runs in `dir` (see the module docs); returns how many.
pub fn clean_stale(dir: &Path) -> usize {
    let started = *STARTED;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let p = e.path();
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.file_type().is_symlink() || md.modified().map_or(true, |t| t >= started) {
            continue;
        }
        // Opening a directory read-only is allowed on Unix; elsewhere it fails and the entry
        // is left alone.
        let Ok(f) = File::open(&p) else { continue };
        if !try_lock(&f) {
            continue;
        }
        let gone = if md.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        n += gone.is_ok() as usize;
    }
    n
}

/// Mode of every file mpolm writes (rw-r--r--, what `cp` or an editor gives under the usual umask).
pub const OUTPUT_MODE: u32 = 0o644;

/// Give a file another library wrote (into one of our temp directories) the output mode.
pub fn publish(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    std::fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(OUTPUT_MODE),
    )?;
    Ok(())
}

/// A temp directory in a chosen parent, removed on drop unless renamed into place.
pub struct TempDir {
    dir: Option<tempfile::TempDir>,
    _lock: Option<File>,
}

impl TempDir {
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("live temp dir").path()
    }

    /// Rename the directory to `dst` (replacing an empty directory there); on failure it is
    /// removed when `self` drops.
    pub fn rename_to(mut self, dst: &Path) -> io::Result<()> {
        if dst.is_dir() {
            let _ = std::fs::remove_dir(dst);
        }
        std::fs::rename(self.path(), dst)?;
        // Renamed away: nothing left to delete.
        let _ = self.dir.take().map(|d| d.keep());
        Ok(())
    }

    /// Keep the directory under its temp name (the caller renames or removes it).
    pub fn keep(mut self) -> PathBuf {
        self.dir.take().expect("live temp dir").keep()
    }
}

/// A new temp directory in `parent`, after removing stale leftovers there.
pub fn dir_in(parent: &Path) -> io::Result<TempDir> {
    clean_stale(parent);
    let dir = tempfile::Builder::new()
        .prefix(&prefix())
        .tempdir_in(parent)?;
    let lock = File::open(dir.path()).ok().filter(try_lock);
    Ok(TempDir {
        dir: Some(dir),
        _lock: lock,
    })
}

/// A new temp file in `parent` (persist it to its final name), after removing stale leftovers
/// there. The file's own descriptor holds its lock.
pub fn file_in(parent: &Path) -> io::Result<tempfile::NamedTempFile> {
    file_with_suffix(parent, "")
}

/// The directory a file at `path` lands in ("." for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A new temp file in the directory of `path`, to be persisted to `path`; its name ends in
/// `suffix`, for writers that choose the format by the extension (image encoders).
pub fn file_beside(path: &Path, suffix: &str) -> io::Result<tempfile::NamedTempFile> {
    file_with_suffix(&parent_of(path), suffix)
}

/// Write `bytes` to `path` atomically: a temp file beside it, synced, then renamed over
/// `path`, so a reader (or a run killed half-way) sees the old file or the new one, never part
/// of one. The directory must exist.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = file_beside(path, "")?;
    f.write_all(bytes)?;
    f.as_file().sync_all()?;
    f.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn file_with_suffix(parent: &Path, suffix: &str) -> io::Result<tempfile::NamedTempFile> {
    clean_stale(parent);
    let name = prefix();
    let mut b = tempfile::Builder::new();
    b.prefix(&name).suffix(suffix);
    // Outputs are shared artefacts (models, adapters, reports), not secrets: tempfile's private
    // 0600 would survive the rename and hide them from other users and tools.
    #[cfg(unix)]
    b.permissions(std::os::unix::fs::PermissionsExt::from_mode(OUTPUT_MODE));
    let f = b.tempfile_in(parent)?;
    let _ = try_lock(f.as_file());
    Ok(f)
}

/// Whether a file can be created in `dir` (created and removed again).
pub fn probe(dir: &Path) -> io::Result<()> {
    tempfile::Builder::new()
        .prefix(&prefix())
        .tempfile_in(dir)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn age(p: &Path) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::open(p).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn only_unlocked_old_prefixed_entries_are_cleaned() {
        init();
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        // Ours, old, but still held by a live writer (here: this process). Created first, as
        // creating them cleans the directory.
        let live = dir_in(root).unwrap();
        age(live.path());
        let live_file = file_in(root).unwrap();
        age(live_file.path());
        // Leftovers of a killed run: a directory with content and a file.
        let orphan = root.join(format!("{PREFIX}999999-abc"));
        std::fs::create_dir_all(orphan.join("sub")).unwrap();
        std::fs::write(orphan.join("sub/model.safetensors"), vec![0u8; 4096]).unwrap();
        age(&orphan);
        let orphan_file = root.join(format!("{PREFIX}999999-def"));
        std::fs::write(&orphan_file, b"partial").unwrap();
        age(&orphan_file);
        // Not ours, though old and temp-looking.
        let foreign = root.join(".tmpXYZ");
        std::fs::create_dir(&foreign).unwrap();
        age(&foreign);
        // A new entry of a run that started after this one is left alone even when unlocked.
        let young = root.join(format!("{PREFIX}1-young"));
        std::fs::create_dir(&young).unwrap();

        assert_eq!(clean_stale(root), 2);
        assert!(!orphan.exists() && !orphan_file.exists());
        assert!(foreign.exists() && young.exists());
        assert!(live.path().exists() && live_file.path().exists());
        // Once the writer is gone its leftovers go too.
        let kept = live.keep();
        assert_eq!(clean_stale(root), 1);
        assert!(!kept.exists());
    }

    #[test]
    fn written_file_replaces_the_old_one_whole_with_the_output_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        std::fs::write(&p, b"old contents, longer than the new").unwrap();
        write_file(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, OUTPUT_MODE, "{mode:o}");
        }
        // No temp file stays behind, and a missing directory is an error, not a partial file.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(write_file(&d.path().join("no/r.json"), b"x").is_err());
        let f = file_beside(&p, ".png").unwrap();
        assert!(f.path().to_string_lossy().ends_with(".png"));
        assert_eq!(f.path().parent(), Some(d.path()));
    }

    #[test]
    fn renamed_dir_lands_and_failed_dir_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let t = dir_in(d.path()).unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        let dst = d.path().join("out");
        std::fs::create_dir(&dst).unwrap(); // an empty target is replaced
        t.rename_to(&dst).unwrap();
        assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"x");
        let t = dir_in(d.path()).unwrap();
        let p = t.path().to_path_buf();
        std::fs::write(p.join("a"), b"y").unwrap();
        assert!(t.rename_to(&dst).is_err(), "a non-empty target stays");
        assert!(!p.exists());
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
