//! NVRTC through cudarc's raw bindings: locating the library, and compiling one program to
//! CUBIN (plus its PTX) with the compile log.
//!
//! cudarc loads `libnvrtc` lazily and PANICS when it cannot; [`ensure_loaded`] probes it
//! first and turns absence into [`Error::CudaUnavailable`]. When the library is not on the
//! default search path (LD_LIBRARY_PATH, ldconfig), it is preloaded from an explicit path:
//! `FPX_NVRTC_LIB` (a file or directory; when set, nothing else is tried), else the PyPI wheel
//! in a project `.venv` (current directory, then the checkout this binary was built from).
//! Once a library with the soname `libnvrtc.so.12` is loaded, cudarc's lookup by that name
//! finds it.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;

use crate::error::{Error, Result};

/// The library file the wheel `nvidia-cuda-nvrtc-cu12` ships.
const LIB_NAME: &str = "libnvrtc.so.12";

/// Hint printed when NVRTC cannot be loaded.
pub const NVRTC_HINT: &str =
    "NVRTC library not found (libnvrtc.so.12): run `make tools`, then put \
     `scripts/setup-tools.sh --print-ld-path` on LD_LIBRARY_PATH (the Makefile's test target does) \
     or set FPX_NVRTC_LIB to the library file";

/// Loads NVRTC once per process; an error when it is not installed.
pub fn ensure_loaded() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(load)
        .clone()
        .map_err(|tried| Error::CudaUnavailable {
            what: "NVRTC",
            hint: format!("{NVRTC_HINT} (tried: {tried})"),
        })
}

fn load() -> std::result::Result<(), String> {
    let explicit = std::env::var_os("FPX_NVRTC_LIB")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    // SAFETY: probing only opens (and closes) the shared library.
    if explicit.is_none() && unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) if p.is_dir() => vec![p.join(LIB_NAME)],
        Some(p) => vec![p],
        None => venv_candidates(),
    };
    for path in &candidates {
        if !path.is_file() {
            continue;
        }
        // SAFETY: loading NVRTC runs its initialisers only; the handle is leaked on purpose so
        // the library stays resident for cudarc's lookup by soname.
        if let Ok(lib) = unsafe { libloading::Library::new(path) } {
            std::mem::forget(lib);
            // SAFETY: as above.
            if unsafe { sys::is_culib_present() } {
                return Ok(());
            }
        }
    }
    let tried: Vec<String> = std::iter::once("the default library path".to_string())
        .chain(candidates.iter().map(|p| p.display().to_string()))
        .collect();
    Err(tried.join(", "))
}

/// `libnvrtc.so.12` inside `.venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib` of the
/// current directory and of the source checkout.
fn venv_candidates() -> Vec<PathBuf> {
    crate::fsutil::venv_site_packages()
        .into_iter()
        .map(|site| site.join("nvidia/cuda_nvrtc/lib").join(LIB_NAME))
        .collect()
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda {
            call: "nvrtcVersion".into(),
            reason: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// What NVRTC produced for one program.
#[derive(Debug, Clone)]
pub struct Output {
    pub cubin: Vec<u8>,
    pub ptx: String,
    pub log: String,
}

/// A program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

/// Compiles `source` (file name `name` in diagnostics) with `options`. A compile error is
/// returned as `Err(log)`; NVRTC being absent or failing otherwise is an `Error`.
pub fn compile(
    name: &str,
    source: &str,
    options: &[String],
) -> Result<std::result::Result<Output, String>> {
    ensure_loaded()?;
    let call_err = |call: &str, e: sys::nvrtcResult| Error::Cuda {
        call: call.to_string(),
        reason: format!("{e:?}"),
    };
    let nul = |what: &str| Error::invalid("NVRTC input", format!("{what} contains a NUL byte"));
    let src = CString::new(source).map_err(|_| nul("kernel source"))?;
    let file = CString::new(name).map_err(|_| nul("kernel name"))?;
    let opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).map_err(|_| nul("option")))
        .collect::<Result<_>>()?;
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut raw: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NVRTC is loaded; the strings outlive the program (destroyed before return).
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            src.as_ptr(),
            file.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(call_err("nvrtcCreateProgram", r));
    }
    let prog = Program(raw);
    let n = i32::try_from(ptrs.len()).map_err(|_| Error::invalid("NVRTC options", "too many"))?;
    // SAFETY: `ptrs` holds `n` valid C strings.
    let compiled = unsafe { sys::nvrtcCompileProgram(prog.0, n, ptrs.as_ptr()) };
    let log = get_text(&prog, sys::nvrtcGetProgramLogSize, sys::nvrtcGetProgramLog)
        .map_err(|e| call_err("nvrtcGetProgramLog", e))?;
    if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
        let mut log = log;
        if log.trim().is_empty() {
            log = format!("{compiled:?}");
        }
        return Ok(Err(log));
    }
    let cubin = get_bytes(&prog, sys::nvrtcGetCUBINSize, sys::nvrtcGetCUBIN)
        .map_err(|e| call_err("nvrtcGetCUBIN", e))?;
    let ptx = get_text(&prog, sys::nvrtcGetPTXSize, sys::nvrtcGetPTX)
        .map_err(|e| call_err("nvrtcGetPTX", e))?;
    Ok(Ok(Output { cubin, ptx, log }))
}

type SizeFn = unsafe fn(sys::nvrtcProgram, *mut usize) -> sys::nvrtcResult;
type DataFn = unsafe fn(sys::nvrtcProgram, *mut c_char) -> sys::nvrtcResult;

fn get_bytes(
    prog: &Program,
    size: SizeFn,
    data: DataFn,
) -> std::result::Result<Vec<u8>, sys::nvrtcResult> {
    let mut n = 0usize;
    // SAFETY: a live program; `n` is valid for writes.
    let r = unsafe { size(prog.0, &mut n) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(r);
    }
    let mut buf = vec![0u8; n];
    if n == 0 {
        return Ok(buf);
    }
    // SAFETY: `buf` has the `n` bytes NVRTC reported.
    let r = unsafe { data(prog.0, buf.as_mut_ptr().cast()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(r);
    }
    Ok(buf)
}

fn get_text(
    prog: &Program,
    size: SizeFn,
    data: DataFn,
) -> std::result::Result<String, sys::nvrtcResult> {
    let bytes = get_bytes(prog, size, data)?;
    let text = CStr::from_bytes_until_nul(&bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    Ok(text)
}

/// The CUDA include directory NVRTC needs for `cuda_fp16.h`: `FPX_CUDA_INCLUDE`, else
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`, else the
/// `nvidia-cuda-runtime-cu12` wheel in a project `.venv`.
pub fn find_cuda_include(explicit: Option<&Path>) -> Result<PathBuf> {
    let has = |d: &Path| d.join("cuda_fp16.h").is_file();
    if let Some(d) = explicit {
        return if has(d) {
            Ok(d.to_path_buf())
        } else {
            Err(missing_headers(&[d.to_path_buf()]))
        };
    }
    let mut tried = Vec::new();
    if let Some(d) = std::env::var_os("FPX_CUDA_INCLUDE").filter(|v| !v.is_empty()) {
        let d = PathBuf::from(d);
        return if has(&d) {
            Ok(d)
        } else {
            Err(missing_headers(&[d]))
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            tried.push(PathBuf::from(root).join("include"));
        }
    }
    tried.push(PathBuf::from("/usr/local/cuda/include"));
    tried.extend(
        crate::fsutil::venv_site_packages()
            .into_iter()
            .map(|s| s.join("nvidia/cuda_runtime/include")),
    );
    tried
        .iter()
        .find(|d| has(d))
        .cloned()
        .ok_or_else(|| missing_headers(&tried))
}

fn missing_headers(tried: &[PathBuf]) -> Error {
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Error::CudaUnavailable {
        what: "CUDA headers",
        hint: format!(
            "cuda_fp16.h not found (tried {}): run `make tools` and set \
             FPX_CUDA_INCLUDE=$(scripts/setup-tools.sh --print-cuda-include)",
            tried.join(", ")
        ),
    }
}
