//! Files in and out, in one place. Inputs: [`read_regular`] / [`open_regular`] refuse FIFOs,
//! devices and sockets by name before opening them (opening a FIFO blocks forever), and
//! [`walk_files`] walks a directory following each symlinked directory only once. Outputs:
//! [`prepare_output_file`] / [`prepare_output_dir`] check before any work that the result
//! can be written; files are written atomically (a temporary file in the target's directory,
//! renamed over the target once complete) and directories are built in a temporary sibling
//! ([`StagedDir`]) renamed into place at the end, so an error or Ctrl-C never leaves a
//! partial output that looks finished.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a file type is, for "is a FIFO, not a regular file" messages.
fn kind_name(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_block_device() || ft.is_char_device() {
            return "a device";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, ft: &std::fs::FileType) -> Error {
    Error::File {
        path: path.to_path_buf(),
        what: "input",
        reason: format!("is {}, not a regular file", kind_name(ft)),
    }
}

/// Opens `path` for reading if it is a regular file (symlinks followed).
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    File::open(path).map_err(|e| Error::io(path, e))
}

/// Reads the whole of a regular file.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Every regular file under `dir`, recursively, sorted by path. Symlinks are followed, but a
/// directory reached twice (by device and inode: a symlink loop, or two links to one
/// folder) is walked only once, and a file reached twice is listed once, under the first of
/// its paths in sorted order; FIFOs, devices and sockets are refused by name. (`walkdir`
/// detects loops but still lists a file reached by two paths twice, and lists special
/// files: one small walker instead of a wrapper.)
pub fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    seen.insert(file_id(&meta));
    walk(dir, &mut seen, &mut out)?;
    Ok(out)
}

/// Depth-first in sorted name order, which is the sorted path order of the result.
fn walk(dir: &Path, seen: &mut HashSet<(u64, u64)>, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        entries.push(entry.map_err(|e| Error::io(dir, e))?.path());
    }
    entries.sort();
    for path in entries {
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if !(meta.is_dir() || meta.is_file()) {
            return Err(not_regular(&path, &meta.file_type()));
        }
        if !seen.insert(file_id(&meta)) {
            continue;
        }
        if meta.is_dir() {
            walk(&path, seen, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    // No inode numbers: every entry counts as new (no loop detection off Unix).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let _ = meta;
    (0, NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn output_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        what: "output",
        reason: reason.into(),
    }
}

/// The directory an output path will be written in.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Checks, before any work, that a file can later be written at `path`: it is not a
/// directory, and its directory exists (or is made now) and is writable (probed with a
/// temporary file, removed again).
pub fn prepare_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(output_err(path, "is a directory, expected a file path"));
    }
    probe_dir(parent_of(path))
}

/// Checks, before any work, that a directory output can later be put at `path`: it is a
/// directory or absent (not a file), and its parent exists (or is made now) and is writable.
pub fn prepare_output_dir(path: &Path) -> Result<()> {
    if path.exists() && !path.is_dir() {
        return Err(output_err(path, "is a file, expected a directory"));
    }
    probe_dir(parent_of(path))
}

fn probe_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(output_err(dir, "is a file, expected a directory"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tempfile::Builder::new()
        .prefix(".fpx-probe-")
        .tempfile_in(dir)
        .map_err(|e| output_err(dir, format!("cannot be written: {e}")))?;
    Ok(())
}

/// A directory output under construction: files go into a temporary sibling of the target
/// (`.fpx-NAME-XXXX`), which [`StagedDir::commit`] renames into place, replacing a previous
/// result only then. Dropped without a commit (an error, a panic), it is removed, so a failed
/// run leaves the previous result or nothing.
pub struct StagedDir {
    target: PathBuf,
    tmp: tempfile::TempDir,
}

impl StagedDir {
    /// Starts building the directory `target` (its parent is created if needed). An existing
    /// `target` is replaced at the commit only if it is empty or a previous result, i.e.
    /// holds the file `marker` (so `-o .` or `-o ~` can never wipe a folder of other files).
    pub fn new(target: &Path, marker: &str) -> Result<StagedDir> {
        prepare_output_dir(target)?;
        if target.is_dir() {
            let empty = std::fs::read_dir(target)
                .map_err(|e| Error::io(target, e))?
                .next()
                .is_none();
            if !empty && !target.join(marker).is_file() {
                return Err(output_err(
                    target,
                    format!(
                        "exists and is not an earlier fpx output (no {marker}); \
                         give a new or empty directory"
                    ),
                ));
            }
        }
        let parent = parent_of(target);
        let name = target
            .file_name()
            .ok_or_else(|| output_err(target, "give a directory name (not `.`, `..` or `/`)"))?
            .to_string_lossy()
            .into_owned();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".fpx-{name}-"))
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?;
        Ok(StagedDir {
            target: target.to_path_buf(),
            tmp,
        })
    }

    /// Where files go until the commit.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Moves the finished directory to its target. A previous directory there is moved
    /// aside first and removed after the rename.
    pub fn commit(self) -> Result<()> {
        let staged = self.tmp.keep();
        let set_mode = |p: &Path| -> Result<()> {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| Error::io(p, e))?;
            }
            let _ = p;
            Ok(())
        };
        set_mode(&staged)?;
        let old = if self.target.exists() {
            let aside = tempfile::Builder::new()
                .prefix(".fpx-old-")
                .tempdir_in(parent_of(&self.target))
                .map_err(|e| Error::io(&self.target, e))?
                .keep();
            let aside = aside.join("old");
            std::fs::rename(&self.target, &aside).map_err(|e| Error::io(&self.target, e))?;
            Some(aside)
        } else {
            None
        };
        std::fs::rename(&staged, &self.target).map_err(|e| Error::io(&self.target, e))?;
        if let Some(old) = old {
            let holder = old.parent().unwrap_or(&old).to_path_buf();
            std::fs::remove_dir_all(&holder).map_err(|e| Error::io(&holder, e))?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically, creating the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".fpx-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    // Temporary files are created 0600; the finished output gets the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(0o644);
        tmp.as_file()
            .set_permissions(mode)
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Serializes `value` as pretty JSON and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::File {
        path: path.to_path_buf(),
        what: "JSON",
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Parses `bytes` as JSON and checks its `schema_version` is one of `accepted`; the error
/// names the file, what kind of file it is, and the versions this build reads.
pub fn parse_versioned_json(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
    accepted: &[u32],
) -> Result<serde_json::Value> {
    let err = |reason: String| Error::File {
        path: path.to_path_buf(),
        what,
        reason,
    };
    let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
    let version = raw.get("schema_version").and_then(|v| v.as_u64());
    if !version.is_some_and(|v| accepted.iter().any(|&a| a as u64 == v)) {
        let reads = match accepted {
            [one] => format!("version {one}"),
            many => format!("versions {many:?}"),
        };
        return Err(err(format!(
            "schema_version is {}, this fpx reads {reads}",
            version.map_or("missing".to_string(), |v| v.to_string())
        )));
    }
    Ok(raw)
}

/// `site-packages` directories of the project `.venv` (in the current directory, then in the
/// checkout this binary was built from), where the NVRTC, CUDA header and SASS-tool wheels are:
/// the one lookup the cuda, emu and report modules share.
pub fn venv_site_packages() -> Vec<PathBuf> {
    let roots = [
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    let mut out = Vec::new();
    for root in roots.into_iter().flatten() {
        let lib = root.join(".venv/lib");
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pythons.sort();
        out.extend(pythons.into_iter().map(|p| p.join("site-packages")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_file_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/out.json");
        write_json_atomic(&path, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\n  \"a\": 1\n}\n"
        );
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
