//! The CUDA backend: NVRTC compilation of generated kernels (with a disk cache) and, through
//! the driver API, loading and launching them. This is the only module that imports cudarc.
//!
//! cudarc is built with `dynamic-loading`: libnvrtc and libcuda are opened at run time, so
//! fpx builds and runs on machines without CUDA. cudarc panics when a library it needs is
//! absent, so every entry point here probes first ([`nvrtc::ensure_loaded`], [`probe_driver`])
//! and reports absence as [`Error::CudaUnavailable`] ("NVRTC library not found", "no CUDA
//! driver"). NVRTC itself needs no GPU.

mod backend;
mod cache;
mod compile;
mod nvrtc;
mod profile;

pub use backend::{CudaBackend, Device};
pub use profile::{profile_linears, profile_rest, timing_weights, ProfileOptions, ShapeSamples};

pub use cache::{KernelCache, KeyParts};
pub use compile::{write_headers, CompiledKernel, Compiler, CompilerOptions};
pub use nvrtc::{ensure_loaded as ensure_nvrtc, find_cuda_include, version as nvrtc_version};

use crate::error::{Error, Result};

/// Hint printed when the driver is missing.
pub const NO_DRIVER: &str = "no CUDA driver (libcuda.so.1 could not be loaded): this machine has \
     no NVIDIA GPU driver; use `--backend cpu`";

/// Loads the driver library, initialises it and returns the number of devices.
pub fn probe_driver() -> Result<usize> {
    // SAFETY: probing only opens (and closes) the shared library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::CudaUnavailable {
            what: "CUDA driver",
            hint: NO_DRIVER.to_string(),
        });
    }
    let driver_err = |call: &str, e: cudarc::driver::DriverError| Error::Cuda {
        call: call.to_string(),
        reason: format!("{e}"),
    };
    cudarc::driver::result::init().map_err(|e| driver_err("cuInit", e))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| driver_err("cuDeviceGetCount", e))?;
    if n <= 0 {
        return Err(Error::CudaUnavailable {
            what: "CUDA device",
            hint: "the CUDA driver reports no device".into(),
        });
    }
    Ok(n as usize)
}
