//! Output paths (`--out`, `--report`, `--plot`) are checked before a command loads or computes
//! anything, so a job never runs for minutes to fail at its last write. Outputs are written
//! atomically (temp + rename in the same directory), which replaces a symbolic link instead of
//! writing through it, so links are refused rather than silently replaced.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// What a command will write at a path.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A file, created or replaced.
    File,
    /// A file that must not exist yet.
    NewFile,
    /// A directory that must not exist yet or be empty.
    NewDir,
    /// A directory that may already hold files (a run to resume).
    Dir,
}

/// Check that `path` can receive the output `flag` names; one-line error otherwise.
pub fn check(flag: &str, path: &Path, kind: Target) -> Result<()> {
    let shown = path.display();
    if path.as_os_str().is_empty() {
        bail!("{flag}: empty path; give a file or directory name");
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_symlink() => {
            let to = std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            let what = if path.exists() { "" } else { "dangling " };
            bail!(
                "{flag} {shown}: is a {what}symbolic link (to '{to}'); outputs are replaced \
                 atomically, not written through links: give the real path"
            );
        }
        Ok(md) => match kind {
            Target::File | Target::NewFile if md.is_dir() => {
                bail!("{flag} {shown}: is a directory; give a file path")
            }
            Target::NewFile => {
                bail!("{flag} {shown}: already exists; choose a new file name")
            }
            Target::File if !md.is_file() => {
                bail!("{flag} {shown}: exists and is not a regular file; give a new file path")
            }
            Target::NewDir | Target::Dir if !md.is_dir() => {
                bail!("{flag} {shown}: exists and is not a directory; give a directory path")
            }
            Target::NewDir if !is_empty_dir(path) => {
                bail!("{flag} {shown}: already exists and is not empty; choose a new {flag}")
            }
            _ => {}
        },
        // Missing, or under a file (reported below with the parent).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) => {}
        Err(e) => bail!("{flag} {shown}: {e}"),
    }
    // The directory the temp file or directory will be created in: the path itself for an
    // existing directory that receives files, else its parent (created on write if missing).
    let home = if kind == Target::Dir && path.is_dir() {
        path.to_path_buf()
    } else {
        parent(path)
    };
    let existing = home
        .ancestors()
        .find(|a| std::fs::symlink_metadata(a).is_ok())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if !existing.is_dir() {
        bail!(
            "{flag} {shown}: cannot create directory {}: {} is not a directory",
            home.display(),
            existing.display()
        );
    }
    // Probing with a real file catches read-only file systems and permissions alike (root
    // passes access(2) checks that a write then fails).
    if let Err(e) = models::tmp::probe(&existing) {
        bail!(
            "{flag} {shown}: cannot write in {} ({e}); choose a writable location",
            existing.display()
        );
    }
    Ok(())
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}
