//! Loading evaluation / calibration text: one UTF-8 file, or every regular file under a
//! directory (recursively, in sorted path order, joined by a blank line; each file once,
//! however many symlinks reach it; FIFOs and devices refused).

use std::path::Path;

use crate::error::{Error, Result};

fn text_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Text {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a text file or a directory of text files. Fails on missing paths, non-UTF-8 bytes
/// (naming the file and byte offset) and text that is empty or only whitespace.
pub fn load_text(path: &Path) -> Result<String> {
    let files = if path.is_dir() {
        let files = crate::fsutil::walk_files(path)?;
        if files.is_empty() {
            return Err(text_err(path, "the directory holds no files"));
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut text = String::new();
    for file in &files {
        let bytes = crate::fsutil::read_regular(file)?;
        let s = String::from_utf8(bytes).map_err(|e| {
            text_err(
                file,
                format!(
                    "not UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            )
        })?;
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&s);
    }
    if text.trim().is_empty() {
        return Err(text_err(path, "the text is empty"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_files_are_joined_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "second").unwrap();
        std::fs::write(dir.path().join("a.txt"), "first").unwrap();
        std::fs::write(dir.path().join("sub/c.txt"), "third").unwrap();
        assert_eq!(load_text(dir.path()).unwrap(), "first\n\nsecond\n\nthird");
    }

    #[test]
    fn bad_text_is_rejected_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        assert!(load_text(&empty)
            .unwrap_err()
            .to_string()
            .contains("empty.txt: text: the text is empty"));
        let binary = dir.path().join("bin.txt");
        std::fs::write(&binary, b"ok \xff\xfe").unwrap();
        assert!(load_text(&binary)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8 (invalid byte at offset 3)"));
        let missing = dir.path().join("missing.txt");
        assert!(load_text(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.txt"));
        let empty_dir = dir.path().join("nothing");
        std::fs::create_dir(&empty_dir).unwrap();
        assert!(load_text(&empty_dir)
            .unwrap_err()
            .to_string()
            .contains("holds no files"));
    }
}
