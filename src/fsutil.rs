//! Writing output files atomically: the bytes go to a temporary file in the target's
//! directory, which is renamed over the target only once complete, so an error or Ctrl-C
//! never leaves a partial file that looks finished.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically, creating the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
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
