//! The emu backend: runs the generated CUDA kernels on the CPU. It renders the same sources the
//! cuda backend hands to NVRTC, builds them with the host C++ compiler and the emulation header
//! `kernels/emu/fpx_emu.h` (fibers per thread, barriers, warp shuffles, shared memory) into a
//! shared library ([`build`]), loads it with libloading and launches every step of an
//! [`ExecutablePlan`](crate::runtime::exec::ExecutablePlan) with the launch dimensions of
//! [`KernelContext::launch`](crate::codegen::KernelContext::launch), the ones the cuda backend
//! uses (both look kernels up through [`LoadedKernels`]). Inline PTX sits behind
//! `__CUDA_ARCH__` guards, so the portable paths run. Each launch passes the byte length of every
//! buffer argument: a kernel that reads or writes outside its buffers, or loads a vector from a
//! misaligned address, fails the launch (kernels/emu/fpx_emu_memcheck.h).
//!
//! Launches are serialised process-wide: the emulator keeps the running block in globals.

mod backend;
pub mod build;

pub use backend::EmuBackend;
pub use build::{translate, Toolchain, EMU_HEADERS};

use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::sync::Mutex;

use libloading::Library;

use crate::codegen::{KernelSource, Launch, Renderer};
use crate::error::{Error, Result};
use crate::lower::{Arch, KernelSpec};
use crate::runtime::exec::{HostBuf, HostMemory};
use crate::runtime::launch::{Arg, Launcher, Memory, RunPass};
use crate::runtime::LoadedKernels;

/// `fpx_emu_run_<entry>(dims, args, lens, err, err_len)`: dims = grid xyz, block xyz, shared
/// bytes; lens = the byte length of each buffer argument (not read for values).
type RunFn =
    unsafe extern "C" fn(*const u32, *mut *mut c_void, *const usize, *mut c_char, usize) -> i32;

static LAUNCH: Mutex<()> = Mutex::new(());

/// Options of the emulator build.
#[derive(Debug, Clone)]
pub struct EmuOptions {
    /// Target the sources are rendered for (the code paths a template picks by arch).
    pub arch: Arch,
    /// Build cache (default: the kernel cache directory + `/emu`).
    pub cache_dir: Option<PathBuf>,
}

impl Default for EmuOptions {
    fn default() -> Self {
        EmuOptions {
            arch: Arch::Sm90,
            cache_dir: None,
        }
    }
}

impl EmuOptions {
    fn cache(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| crate::runtime::cuda::KernelCache::default_dir().join("emu"))
    }
}

/// Argument pointer for a launch: the address of the value (cuLaunchKernel's convention).
pub fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// Kernels built for the emulator and loaded.
pub struct EmuKernels {
    kernels: LoadedKernels<RunFn>,
    /// Keeps the functions valid; unloaded under the launch lock.
    lib: Option<Library>,
}

impl Drop for EmuKernels {
    fn drop(&mut self) {
        self.kernels.clear();
        let _guard = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.lib.take());
    }
}

impl EmuKernels {
    /// Renders `specs` with the embedded templates, builds and loads them.
    pub fn load(specs: &[KernelSpec], opts: &EmuOptions) -> Result<EmuKernels> {
        let renderer = Renderer::new()?;
        let sources = specs
            .iter()
            .map(|s| renderer.render(s, opts.arch))
            .collect::<Result<Vec<_>>>()?;
        EmuKernels::from_sources(&sources, opts)
    }

    /// Builds and loads already rendered sources (e.g. from a renderer with overrides).
    pub fn from_sources(sources: &[KernelSource], opts: &EmuOptions) -> Result<EmuKernels> {
        let tc = Toolchain::find()?;
        let path = build::build(&tc, sources, &opts.cache())?;
        let err = |reason: String| Error::Emu {
            stage: "load".into(),
            reason,
        };
        // SAFETY: the library is ours (built above); its initialisers only define globals.
        let lib =
            unsafe { Library::new(&path) }.map_err(|e| err(format!("{}: {e}", path.display())))?;
        let mut kernels = LoadedKernels::default();
        for src in sources {
            kernels.add(src, |entry| {
                let sym = format!("fpx_emu_run_{entry}");
                // SAFETY: `translate` defines this symbol with exactly the RunFn signature.
                unsafe { lib.get::<RunFn>(sym.as_bytes()) }
                    .map(|s| *s)
                    .map_err(|e| err(format!("{sym}: {e}")))
            })?;
        }
        Ok(EmuKernels {
            kernels,
            lib: Some(lib),
        })
    }

    /// Launches entry `entry` of `spec` for `rows` rows (and `context` KV positions) with the
    /// cuda backend's launch dimensions; `args` in cuLaunchKernel's convention, `lens` the byte
    /// length of each buffer argument.
    ///
    /// # Safety
    /// `args` must point to values matching the kernel's parameters, and every pointer among
    /// them must be valid for reads and writes of its `lens` bytes.
    unsafe fn launch_raw(
        &self,
        spec: &KernelSpec,
        entry: &str,
        rows: usize,
        context: usize,
        args: &mut [*mut c_void],
        lens: &[usize],
    ) -> Result<()> {
        let (_, l) = self.kernels.get(spec, entry, rows, context)?;
        self.launch_with(entry, l, args, lens)
    }

    /// Launches entry `entry` with explicit dimensions (for hand-written kernels: the tests of
    /// the emulator itself). `lens[i]` is the byte length of the buffer that argument `i`
    /// points to (any value for a non-pointer argument): an access outside it fails the launch.
    ///
    /// # Safety
    /// As for [`EmuKernels::launch`].
    pub unsafe fn launch_with(
        &self,
        entry: &str,
        l: Launch,
        args: &mut [*mut c_void],
        lens: &[usize],
    ) -> Result<()> {
        if lens.len() != args.len() {
            return Err(Error::Emu {
                stage: format!("launch of {entry}"),
                reason: format!("{} arguments but {} buffer lengths", args.len(), lens.len()),
            });
        }
        let f = self.kernels.function(entry)?;
        let dims = [
            l.grid.0,
            l.grid.1,
            l.grid.2,
            l.block.0,
            l.block.1,
            l.block.2,
            l.shared_bytes,
        ];
        let mut msg = [0 as c_char; 512];
        let rc = {
            let _guard = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
            f(
                dims.as_ptr(),
                args.as_mut_ptr(),
                lens.as_ptr(),
                msg.as_mut_ptr(),
                msg.len(),
            )
        };
        if rc != 0 {
            let text = std::ffi::CStr::from_ptr(msg.as_ptr()).to_string_lossy();
            return Err(Error::Emu {
                stage: format!("launch of {entry}"),
                reason: text.into_owned(),
            });
        }
        Ok(())
    }
}

impl Memory for EmuKernels {
    type Buf = HostBuf;

    fn upload(&self, bytes: &[u8]) -> Result<HostBuf> {
        HostMemory.upload(bytes)
    }

    fn zeros(&self, bytes: usize) -> Result<HostBuf> {
        HostMemory.zeros(bytes)
    }

    fn write(&self, buf: &mut HostBuf, bytes: &[u8]) -> Result<()> {
        HostMemory.write(buf, bytes)
    }

    fn read(&self, buf: &HostBuf, len: usize) -> Result<Vec<u8>> {
        HostMemory.read(buf, len)
    }
}

impl Launcher for EmuKernels {
    unsafe fn launch(
        &self,
        spec: &KernelSpec,
        entry: &str,
        rows: usize,
        context: usize,
        args: &[Arg<'_, HostBuf>],
    ) -> Result<()> {
        // cuLaunchKernel's convention: one pointer per parameter, to the parameter's value (for
        // a buffer, to the pointer itself).
        let pointers: Vec<*mut u8> = args
            .iter()
            .map(|a| match a {
                Arg::Buf(b) => b.ptr(),
                _ => std::ptr::null_mut(),
            })
            .collect();
        let mut values: Vec<*mut c_void> = args
            .iter()
            .zip(&pointers)
            .map(|(a, p)| match a {
                Arg::Buf(_) => arg(p),
                Arg::I32(v) => arg(v),
                Arg::F32(v) => arg(v),
            })
            .collect();
        let lens: Vec<usize> = args
            .iter()
            .map(|a| match a {
                Arg::Buf(b) => b.bytes().len(),
                _ => 0,
            })
            .collect();
        self.launch_raw(spec, entry, rows, context, &mut values, &lens)
    }
}

impl RunPass for EmuKernels {}
