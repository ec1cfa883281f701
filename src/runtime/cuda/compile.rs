//! Compiling generated kernels with NVRTC to CUBIN for a real target, through the disk cache.
//!
//! The helper headers (`kernels/*.cuh`, embedded in the binary) are written to a directory
//! that NVRTC receives as an include path, next to the CUDA include directory. A failed
//! compilation dumps the source to a file and returns [`Error::Nvrtc`] with NVRTC's log, the
//! options and that file's path. Kernels compile in parallel (rayon): NVRTC programs are
//! independent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::cache::{KernelCache, KeyParts};
use super::nvrtc;
use crate::codegen::{KernelSource, HEADERS};
use crate::error::{Error, Result};
use crate::lower::Arch;

/// Where a [`Compiler`] keeps things.
#[derive(Debug, Clone, Default)]
pub struct CompilerOptions {
    /// Cache directory; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Where sources that fail to compile are dumped (default: the system temporary directory).
    pub dump_dir: Option<PathBuf>,
    /// CUDA include directory (default: see `find_cuda_include`).
    pub cuda_include: Option<PathBuf>,
}

/// One compiled kernel.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    pub name: String,
    pub arch: Arch,
    pub cubin: Vec<u8>,
    pub ptx: String,
    /// NVRTC's log (warnings); empty for a cache hit.
    pub log: String,
    /// Served from the disk cache.
    pub cached: bool,
}

/// NVRTC with fpx's options, headers and cache.
pub struct Compiler {
    cache: Option<KernelCache>,
    dump_dir: PathBuf,
    include_dir: PathBuf,
    cuda_include: PathBuf,
    cuda_headers_hash: String,
    version: (i32, i32),
    /// Keeps a temporary include directory alive when there is no cache.
    _tmp: Option<tempfile::TempDir>,
    compiled: AtomicUsize,
    hits: AtomicUsize,
}

impl Compiler {
    /// Loads NVRTC, finds the CUDA headers and writes the helper headers.
    pub fn new(opts: CompilerOptions) -> Result<Compiler> {
        let version = nvrtc::version()?;
        let cuda_include = nvrtc::find_cuda_include(opts.cuda_include.as_deref())?;
        let mut h = Sha256::new();
        for f in ["cuda_fp16.h", "cuda_fp16.hpp"] {
            let p = cuda_include.join(f);
            h.update(std::fs::read(&p).map_err(|e| Error::io(&p, e))?);
        }
        let cuda_headers_hash = format!("{:x}", h.finalize());
        let headers_hash = {
            let mut h = Sha256::new();
            for (name, text) in HEADERS {
                h.update(name.as_bytes());
                h.update(text.as_bytes());
            }
            format!("{:x}", h.finalize())
        };
        let cache = opts.cache_dir.map(KernelCache::new);
        let (include_dir, tmp) = match &cache {
            Some(c) => (
                c.dir().join(format!("include-{}", &headers_hash[..16])),
                None,
            ),
            None => {
                let t = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
                (t.path().join("include"), Some(t))
            }
        };
        write_headers(&include_dir)?;
        Ok(Compiler {
            cache,
            dump_dir: opts
                .dump_dir
                .unwrap_or_else(|| std::env::temp_dir().join("fpx-nvrtc-failures")),
            include_dir,
            cuda_include,
            cuda_headers_hash,
            version,
            _tmp: tmp,
            compiled: AtomicUsize::new(0),
            hits: AtomicUsize::new(0),
        })
    }

    /// "NVRTC 12.9".
    pub fn version_string(&self) -> String {
        format!("NVRTC {}.{}", self.version.0, self.version.1)
    }

    /// Options that determine the output (no paths): part of the cache key.
    pub fn options(arch: Arch) -> Vec<String> {
        vec![
            format!("--gpu-architecture={}", arch.name()),
            "--std=c++17".to_string(),
            "--fmad=true".to_string(),
            "--ftz=false".to_string(),
            "--prec-div=true".to_string(),
            "--prec-sqrt=true".to_string(),
        ]
    }

    fn all_options(&self, arch: Arch) -> Vec<String> {
        let mut o = Self::options(arch);
        o.push(format!("--include-path={}", self.include_dir.display()));
        o.push(format!("--include-path={}", self.cuda_include.display()));
        o
    }

    /// How many kernels NVRTC compiled, and how many came from the cache, so far.
    pub fn stats(&self) -> (usize, usize) {
        (
            self.compiled.load(Ordering::Relaxed),
            self.hits.load(Ordering::Relaxed),
        )
    }

    /// Compiles one kernel (or fetches it from the cache).
    pub fn compile(&self, k: &KernelSource) -> Result<CompiledKernel> {
        if !k.headers.is_embedded() {
            // The include directory holds the embedded headers; overrides exist only for the
            // emulator's broken-variant tests.
            return Err(Error::Codegen {
                kernel: k.name.clone(),
                reason: "rendered with overridden helper headers, which only the emulator builds"
                    .into(),
            });
        }
        let options = Self::options(k.arch);
        let key = KernelCache::key(&KeyParts {
            source: &k.source,
            headers: &HEADERS,
            cuda_headers: &self.cuda_headers_hash,
            options: &options,
            arch: k.arch.name(),
            nvrtc_version: self.version,
        });
        if let Some((cubin, ptx)) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(CompiledKernel {
                name: k.name.clone(),
                arch: k.arch,
                cubin,
                ptx,
                log: String::new(),
                cached: true,
            });
        }
        let all = self.all_options(k.arch);
        let out = match nvrtc::compile(&k.file_name, &k.source, &all)? {
            Ok(out) => out,
            Err(log) => return Err(self.failure(k, &all, log)),
        };
        self.compiled.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.cache {
            c.put(&key, &out.cubin, &out.ptx)?;
        }
        Ok(CompiledKernel {
            name: k.name.clone(),
            arch: k.arch,
            cubin: out.cubin,
            ptx: out.ptx,
            log: out.log,
            cached: false,
        })
    }

    /// Compiles every kernel, in parallel; the first failure is returned.
    pub fn compile_all(&self, kernels: &[KernelSource]) -> Result<Vec<CompiledKernel>> {
        kernels.par_iter().map(|k| self.compile(k)).collect()
    }

    /// Dumps the failing source and builds the error.
    fn failure(&self, k: &KernelSource, options: &[String], log: String) -> Error {
        let path = self.dump_dir.join(format!("{}-{}.cu", k.name, k.arch));
        let source_path = match crate::fsutil::write_atomic(&path, k.source.as_bytes()) {
            Ok(()) => path,
            Err(_) => PathBuf::from("(could not dump the source)"),
        };
        Error::Nvrtc {
            kernel: k.name.clone(),
            arch: k.arch.name().to_string(),
            options: options.join(" "),
            source_path,
            log: log.trim_end().to_string(),
        }
    }
}

/// Writes the helper headers into `dir` (skipping files that already hold the same text).
pub fn write_headers(dir: &Path) -> Result<()> {
    for (name, text) in HEADERS {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
            continue;
        }
        crate::fsutil::write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}
