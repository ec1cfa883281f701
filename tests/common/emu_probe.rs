//! Hand-written CUDA sources run on the emulator (tests/emu_header.rs, tests/emu_mma.rs): the
//! source wrapped as a kernel of the embedded helper headers, and its kernels built for sm_90.

use fpx::codegen::{HelperHeaders, KernelContext, KernelSource};
use fpx::lower::{ActDtype, Arch, KernelSpec};
use fpx::runtime::emu::{EmuKernels, EmuOptions, Toolchain};

/// `source` with entry points `entries` as a kernel for `arch` (its spec is a placeholder: the
/// source is not rendered from a template).
pub fn source(name: &str, source: &str, entries: &[&str], arch: Arch) -> KernelSource {
    let spec = KernelSpec::SiluMul {
        dim: 1,
        act: ActDtype::F32,
        quant: false,
    };
    KernelSource {
        spec,
        arch,
        name: name.into(),
        file_name: format!("{name}.cu"),
        source: source.into(),
        entry_points: entries.iter().map(|e| e.to_string()).collect(),
        context: KernelContext::new(&spec, arch),
        headers: HelperHeaders::embedded(),
    }
}

/// The PTX NVRTC makes of `kernel` (`None`, after saying why, without NVRTC), after checking
/// that it holds each of `entries`: a hand-written probe is real CUDA, not only emulator C++.
pub fn nvrtc_ptx(kernel: &KernelSource, entries: &[&str]) -> Option<String> {
    let compiler = fpx::runtime::cuda::Compiler::new(fpx::runtime::cuda::CompilerOptions {
        cache_dir: None,
        ..Default::default()
    });
    if !super::have("NVRTC (.venv)", compiler.is_ok()) {
        return None;
    }
    let ptx = compiler.unwrap().compile(kernel).unwrap().ptx;
    for entry in entries {
        assert!(ptx.contains(&format!(".entry {entry}")), "{entry}");
    }
    Some(ptx)
}

/// Emulator options for `arch` with the tests' shared build cache (`None`, after saying why,
/// without g++ or the CUDA header wheels; a failure under FPX_REQUIRE_DATA=1).
pub fn emu_opts(arch: Arch) -> Option<EmuOptions> {
    let ok = Toolchain::find().is_ok()
        && std::process::Command::new("g++")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !super::have("g++ and the CUDA header wheels (.venv)", ok) {
        return None;
    }
    Some(EmuOptions {
        arch,
        cache_dir: Some(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-cache")),
    })
}

/// `kernel` built by the emulator for sm_90 (`None` as for [`emu_opts`]).
pub fn kernels(kernel: KernelSource) -> Option<EmuKernels> {
    let opts = emu_opts(Arch::Sm90)?;
    Some(EmuKernels::from_sources(&[kernel], &opts).unwrap())
}
