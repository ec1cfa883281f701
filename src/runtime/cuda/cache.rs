//! On-disk cache of compiled kernels. An entry is keyed by the SHA-256 of everything that
//! determines NVRTC's output: the kernel source, the helper headers, the CUDA headers it
//! includes, the options (without include paths), the target arch and the NVRTC version.
//! Entries are written atomically (temporary file + rename), so concurrent compilers and
//! interrupted runs never leave a partial entry; a corrupt or missing entry is a miss.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::fsutil::write_atomic;

/// A directory of compiled kernels: `<dir>/<key[..2]>/<key>.cubin` and `.ptx`.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

/// Everything that goes into a cache key.
pub struct KeyParts<'a> {
    pub source: &'a str,
    /// (name, text) of the helper headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// Hash of the CUDA headers used (e.g. cuda_fp16.h).
    pub cuda_headers: &'a str,
    /// Options that are not paths.
    pub options: &'a [String],
    pub arch: &'a str,
    pub nvrtc_version: (i32, i32),
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: dir.into() }
    }

    /// `FPX_CACHE_DIR`, else `$XDG_CACHE_HOME/fpx/kernels`, else `~/.cache/fpx/kernels`, else
    /// a folder in the system temporary directory.
    pub fn default_dir() -> PathBuf {
        let var = |v: &str| {
            std::env::var_os(v)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        if let Some(d) = var("FPX_CACHE_DIR") {
            return d;
        }
        if let Some(d) = var("XDG_CACHE_HOME") {
            return d.join("fpx/kernels");
        }
        if let Some(h) = var("HOME") {
            return h.join(".cache/fpx/kernels");
        }
        std::env::temp_dir().join("fpx-kernels")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hex key of a compilation.
    pub fn key(parts: &KeyParts) -> String {
        let mut h = Sha256::new();
        let mut field = |tag: &str, bytes: &[u8]| {
            h.update(tag.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field("source", parts.source.as_bytes());
        for (name, text) in parts.headers {
            field("header", name.as_bytes());
            field("text", text.as_bytes());
        }
        field("cuda", parts.cuda_headers.as_bytes());
        for o in parts.options {
            field("option", o.as_bytes());
        }
        field("arch", parts.arch.as_bytes());
        let (major, minor) = parts.nvrtc_version;
        field("nvrtc", format!("{major}.{minor}").as_bytes());
        format!("{:x}", h.finalize())
    }

    fn path(&self, key: &str, ext: &str) -> PathBuf {
        self.dir
            .join(key.get(..2).unwrap_or("xx"))
            .join(format!("{key}.{ext}"))
    }

    /// The cached (CUBIN, PTX) of `key`, if present.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, String)> {
        let cubin = std::fs::read(self.path(key, "cubin")).ok()?;
        let ptx = std::fs::read_to_string(self.path(key, "ptx")).ok()?;
        // An ELF image starts with 0x7f 'E' 'L' 'F'; anything else is a damaged entry.
        (cubin.starts_with(b"\x7fELF") && !ptx.is_empty()).then_some((cubin, ptx))
    }

    /// Stores an entry (PTX first, so a present CUBIN implies a complete entry).
    pub fn put(&self, key: &str, cubin: &[u8], ptx: &str) -> Result<()> {
        write_atomic(&self.path(key, "ptx"), ptx.as_bytes())?;
        write_atomic(&self.path(key, "cubin"), cubin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(source: &'a str, options: &'a [String]) -> KeyParts<'a> {
        KeyParts {
            source,
            headers: &[("a.cuh", "x")],
            cuda_headers: "h",
            options,
            arch: "sm_90",
            nvrtc_version: (12, 9),
        }
    }

    #[test]
    fn key_depends_on_every_part_and_entries_round_trip() {
        let opts = vec!["--std=c++17".to_string()];
        let k = KernelCache::key(&parts("a", &opts));
        assert_eq!(k, KernelCache::key(&parts("a", &opts)));
        assert_ne!(k, KernelCache::key(&parts("b", &opts)));
        assert_ne!(k, KernelCache::key(&parts("a", &[])));
        let mut p = parts("a", &opts);
        p.arch = "sm_89";
        assert_ne!(k, KernelCache::key(&p));
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        assert!(cache.get(&k).is_none());
        cache.put(&k, b"\x7fELF..", "ptx").unwrap();
        assert_eq!(
            cache.get(&k).unwrap(),
            (b"\x7fELF..".to_vec(), "ptx".to_string())
        );
        std::fs::write(cache.path(&k, "cubin"), b"junk").unwrap();
        assert!(cache.get(&k).is_none(), "a damaged entry is a miss");
    }
}
