//! Host build of generated kernels: each [`KernelSource`] (the exact text NVRTC receives) is
//! prefixed with `#include "fpx_emu.h"`, each `extern __shared__ T name[];` becomes a `T*` named
//! `name` into the emulator's dynamic shared memory, and one C entry point per
//! kernel is appended (`fpx_emu_run_<entry>`: launch dimensions + cuLaunchKernel-style argument
//! pointers and each buffer's byte length). Every kernel is its own translation unit (the
//! templates' constants live in anonymous namespaces), compiled by the host C++ compiler
//! against CUDA's host headers from the PyPI wheels, with the instrumentation through which the
//! emulator checks every memory access (kernels/emu/fpx_emu_memcheck.h); objects and the
//! linked shared library are cached on disk under names that hash the translated source, the
//! headers, the compiler and its flags.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::codegen::{HelperHeaders, KernelSource};
use crate::error::{Error, Result};

/// The emulation headers (kernels/emu/), embedded: the memory checks, the tensor-core
/// instructions, and `fpx_emu.h`, which each translation unit includes and which includes
/// them. `fpx_emu.h` is written last: its presence marks a complete include directory.
pub const EMU_HEADERS: [(&str, &str); 3] = [
    (
        "fpx_emu_memcheck.h",
        include_str!("../../../kernels/emu/fpx_emu_memcheck.h"),
    ),
    (
        "fpx_emu_mma.h",
        include_str!("../../../kernels/emu/fpx_emu_mma.h"),
    ),
    ("fpx_emu.h", include_str!("../../../kernels/emu/fpx_emu.h")),
];

/// Flags of every host build (one optimisation level keeps tests short and results stable).
/// `-fno-gnu-unique`: the emulator's state (the running block, its fibers) lives in statics of
/// inline functions, which g++ otherwise makes process-wide unique symbols shared by every
/// loaded kernel library; two libraries would then corrupt each other's state.
/// The sanitizer flags make every load and store call a hook of fpx_emu_memcheck.h (bounds:
/// kernel-address with every check out of line and no stack or global redzones, so neither
/// shadow memory nor a runtime library; alignment: UBSan's typed-access check, whose handler is
/// there too). They are g++'s spelling.
pub const CXX_FLAGS: [&str; 11] = [
    "-std=c++20",
    "-O1",
    "-fPIC",
    "-w",
    "-fno-fast-math",
    "-fno-gnu-unique",
    "-fsanitize=kernel-address",
    "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0",
    "--param=asan-globals=0",
    "-fsanitize=alignment",
];

fn emu_err(stage: &str, reason: impl Into<String>) -> Error {
    Error::Emu {
        stage: stage.to_string(),
        reason: reason.into(),
    }
}

/// Where the host compiler and CUDA's host headers are.
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// `$CXX`, else `g++`.
    pub cxx: PathBuf,
    /// Include dirs of the runtime (cuda_fp16.h...), nvcc (crt/host_defines.h) and cccl
    /// (nv/target) wheels.
    pub includes: Vec<PathBuf>,
}

impl Toolchain {
    /// Finds the headers in `FPX_EMU_INCLUDE` (colon-separated) or in the project `.venv`
    /// (current directory, then this checkout); errors name what is missing.
    pub fn find() -> Result<Toolchain> {
        let cxx = std::env::var_os("CXX")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from("g++"), PathBuf::from);
        let needed = [
            ("cuda_runtime", "cuda_fp16.h"),
            ("cuda_nvcc", "crt/host_defines.h"),
            ("cuda_cccl", "nv/target"),
        ];
        let includes: Vec<PathBuf> = match std::env::var_os("FPX_EMU_INCLUDE") {
            Some(v) if !v.is_empty() => std::env::split_paths(&v).collect(),
            _ => {
                let mut found = Vec::new();
                for (wheel, file) in needed {
                    let dir = crate::fsutil::venv_site_packages()
                        .into_iter()
                        .map(|s| s.join("nvidia").join(wheel).join("include"))
                        .find(|d| d.join(file).exists());
                    match dir {
                        Some(d) => found.push(d),
                        None => {
                            return Err(Error::CudaUnavailable {
                                what: "CUDA host headers for the emulator",
                                hint: format!(
                                    "{file} (wheel nvidia-{}-cu12) not found in .venv; run `make tools` \
                                     (scripts/setup-tools.sh) or set FPX_EMU_INCLUDE",
                                    wheel.replace('_', "-")
                                ),
                            })
                        }
                    }
                }
                found
            }
        };
        Ok(Toolchain { cxx, includes })
    }
}

/// `extern __shared__ [__align__(N)|alignas(N)] T name[];`: a kernel's dynamic shared memory.
static DYNAMIC_SHARED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(
        r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s+)?(?P<ty>[^;\[\]]+?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;",
    )
    .expect("valid regex")
});

/// The translation unit the host compiler gets for `src` (its lines numbered as in the kernel's
/// own file, which the emulator's alignment errors name).
pub fn translate(src: &KernelSource) -> String {
    let mut out = String::with_capacity(src.source.len() + 512);
    out.push_str("#include \"fpx_emu.h\"\n");
    let file = src.file_name.replace(['"', '\\'], "_");
    out.push_str(&format!("#line 1 \"{file}\"\n"));
    out.push_str(&DYNAMIC_SHARED.replace_all(
        &src.source,
        "${ty}* const ${name} = reinterpret_cast<${ty}*>(fpx_emu_dyn_smem);",
    ));
    out.push_str("\n// fpx emulator entry points\n");
    for e in &src.entry_points {
        out.push_str(&format!(
            "extern \"C\" int fpx_emu_run_{e}(const unsigned* d, void** a, const size_t* l, \
             char* err, size_t n) {{ return fpx_emu::run(&{e}, d, a, l, err, n); }}\n"
        ));
    }
    out
}

/// A scratch name next to `path` that no other build writes, in this process (concurrent
/// test threads) or another; the finished file is renamed onto `path`.
fn unique_tmp(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    PathBuf::from(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles `sources` (cached) and links them into one shared library; returns its path.
pub fn build(tc: &Toolchain, sources: &[KernelSource], cache: &Path) -> Result<PathBuf> {
    let io =
        |what: &str, p: &Path, e: std::io::Error| emu_err(what, format!("{}: {e}", p.display()));
    let headers = sources
        .first()
        .map_or_else(HelperHeaders::embedded, |s| s.headers.clone());
    if let Some(s) = sources.iter().find(|s| s.headers != headers) {
        return Err(emu_err(
            "build",
            format!(
                "kernel `{}` was rendered with other helper headers than `{}`; one build shares one include directory",
                s.name, sources[0].name
            ),
        ));
    }
    let mut inc = Sha256::new();
    for (name, text) in EMU_HEADERS {
        inc.update(name);
        inc.update(text);
    }
    for (name, text) in headers.iter() {
        inc.update(name);
        inc.update(text);
    }
    let inc_hash = hex(&inc.finalize())[..16].to_string();
    let include_dir = cache.join(format!("include-{inc_hash}"));
    if !include_dir.join("fpx_emu.h").exists() {
        std::fs::create_dir_all(&include_dir).map_err(|e| io("cache", &include_dir, e))?;
        // Atomic writes: a concurrent build may already be compiling against these files.
        for (name, text) in headers.iter().chain(EMU_HEADERS) {
            crate::fsutil::write_atomic(&include_dir.join(name), text.as_bytes())?;
        }
    }
    let obj_dir = cache.join("obj");
    std::fs::create_dir_all(&obj_dir).map_err(|e| io("cache", &obj_dir, e))?;
    let mut jobs = Vec::new();
    let mut objects = Vec::new();
    for src in sources {
        let tu = translate(src);
        let mut h = Sha256::new();
        h.update(&tu);
        h.update(&inc_hash);
        h.update(tc.cxx.as_os_str().as_encoded_bytes());
        for f in CXX_FLAGS {
            h.update(f);
        }
        let key = hex(&h.finalize())[..24].to_string();
        let obj = obj_dir.join(format!("{}-{key}.o", src.name));
        if !obj.exists() {
            let cpp = obj_dir.join(format!("{}-{key}.cpp", src.name));
            crate::fsutil::write_atomic(&cpp, tu.as_bytes())?;
            jobs.push((src.name.clone(), cpp, obj.clone()));
        }
        objects.push(obj);
    }
    let par = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    for chunk in jobs.chunks(par) {
        let children = chunk
            .iter()
            .map(|(name, cpp, obj)| {
                let tmp = unique_tmp(obj);
                let mut c = Command::new(&tc.cxx);
                c.args(CXX_FLAGS).arg("-I").arg(&include_dir);
                for i in &tc.includes {
                    c.arg("-I").arg(i);
                }
                c.arg("-c").arg(cpp).arg("-o").arg(&tmp);
                let child = c
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| {
                        emu_err("compile", format!("cannot run {}: {e}", tc.cxx.display()))
                    })?;
                Ok((name, cpp, obj, tmp, child))
            })
            .collect::<Result<Vec<_>>>()?;
        for (name, cpp, obj, tmp, child) in children {
            let out = child
                .wait_with_output()
                .map_err(|e| emu_err("compile", e.to_string()))?;
            if !out.status.success() {
                return Err(emu_err(
                    "compile",
                    format!(
                        "kernel `{name}` ({}):\n{}",
                        cpp.display(),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                ));
            }
            std::fs::rename(&tmp, obj).map_err(|e| io("cache", obj, e))?;
        }
    }
    let mut h = Sha256::new();
    for o in &objects {
        h.update(o.as_os_str().as_encoded_bytes());
    }
    let lib = cache.join(format!("lib/fpx-emu-{}.so", &hex(&h.finalize())[..24]));
    if !lib.exists() {
        let dir = cache.join("lib");
        std::fs::create_dir_all(&dir).map_err(|e| io("cache", &dir, e))?;
        let tmp = unique_tmp(&lib);
        let out = Command::new(&tc.cxx)
            .arg("-shared")
            .args(&objects)
            .arg("-o")
            .arg(&tmp)
            .output()
            .map_err(|e| emu_err("link", format!("cannot run {}: {e}", tc.cxx.display())))?;
        if !out.status.success() {
            return Err(emu_err("link", String::from_utf8_lossy(&out.stderr)));
        }
        std::fs::rename(&tmp, &lib).map_err(|e| io("cache", &lib, e))?;
    }
    Ok(lib)
}
