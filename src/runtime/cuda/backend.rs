//! The cuda backend of an executable plan: a [`Device`] (context, stream, the schedule's kernels
//! compiled for its architecture through NVRTC and the disk cache) is the [`Launcher`] the one
//! generic backend ([`KernelBackend`]) runs on. What is CUDA's own lives here: the decode step
//! captured once as a CUDA graph and replayed (its launches depend on nothing but device
//! buffers: the position and the previous token are read on the device), and a decode step
//! timed with events around each linear layer (`fpx profile`).

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DriverError,
    LaunchConfig, PushKernelArg,
};

use super::compile::{Compiler, CompilerOptions};
use crate::codegen::Renderer;
use crate::error::{Error, Result};
use crate::lower::{Arch, DeviceTarget, KernelSpec, LinearShape, Schedule, Step};
use crate::runtime::exec::{ExecutablePlan, PackedLinear};
use crate::runtime::launch::{Arg, KernelBackend, Launcher, Memory, RunPass};
use crate::runtime::LoadedKernels;

pub(crate) fn driver_err(call: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Cuda {
        call: call.to_string(),
        reason: e.to_string(),
    }
}

/// A device, its stream and the compiled kernels of a set of specs.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: Arch,
    /// Whether kernels load as CUBIN or as PTX for the driver's JIT.
    pub target: DeviceTarget,
    pub name: String,
    kernels: LoadedKernels<CudaFunction>,
    /// The captured decode step (see [`RunPass`]).
    decode_graph: Option<CudaGraph>,
    /// Capture the decode step as a CUDA graph on its first run.
    pub use_graph: bool,
}

impl Device {
    /// Opens device `ordinal` (after probing the driver).
    pub fn open(ordinal: usize) -> Result<Device> {
        let count = super::probe_driver()?;
        if ordinal >= count {
            return Err(Error::invalid(
                "CUDA device",
                format!("ordinal {ordinal}, but the driver reports {count} device(s)"),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("cuCtxCreate"))?;
        // One stream only: no cross-stream events (they would also get in the way of graph
        // capture).
        // SAFETY: every buffer is created and used on the one stream below.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        let name = ctx.name().map_err(driver_err("cuDeviceGetName"))?;
        let target = Arch::for_device(major as u32, minor as u32).ok_or_else(|| {
            Error::CudaUnavailable {
                what: "supported GPU",
                hint: format!(
                    "{name} has compute capability {major}.{minor}; fpx targets sm_80, sm_86, sm_89, sm_90, sm_100a, sm_120a (and runs sm_80 PTX on other 8.x chips, sm_90 PTX on newer ones)"
                ),
            }
        })?;
        if let DeviceTarget::Ptx(a) = target {
            tracing::warn!(
                "{name} (compute capability {major}.{minor}) has no target of its own: loading \
                 {a} PTX for the driver to compile (FP4 conversions in software)"
            );
        }
        let arch = target.arch();
        // A stream of its own, not the legacy default stream, on which capture is invalid.
        let stream = ctx.new_stream().map_err(driver_err("cuStreamCreate"))?;
        Ok(Device {
            ctx,
            stream,
            arch,
            target,
            name,
            kernels: LoadedKernels::default(),
            decode_graph: None,
            use_graph: true,
        })
    }

    /// Renders, compiles (through the cache) and loads `specs`.
    pub fn load_kernels(&mut self, specs: &[KernelSpec], opts: CompilerOptions) -> Result<()> {
        let renderer = Renderer::new()?;
        let sources = specs
            .iter()
            .filter(|s| !self.kernels.has(&s.name()))
            .map(|s| renderer.render(s, self.arch))
            .collect::<Result<Vec<_>>>()?;
        if sources.is_empty() {
            return Ok(());
        }
        let compiler = Compiler::new(opts)?;
        for (src, bin) in sources.iter().zip(compiler.compile_all(&sources)?) {
            let image = match self.target {
                DeviceTarget::Cubin(_) => cudarc::nvrtc::Ptx::from_binary(bin.cubin),
                DeviceTarget::Ptx(_) => cudarc::nvrtc::Ptx::from_src(bin.ptx),
            };
            let module = self
                .ctx
                .load_module(image)
                .map_err(driver_err("cuModuleLoadData"))?;
            self.kernels.add(src, |entry| {
                module
                    .load_function(entry)
                    .map_err(driver_err("cuModuleGetFunction"))
            })?;
        }
        Ok(())
    }

    /// Lets the attention kernels of `schedule` use the dynamic shared memory `max_seq` positions need
    /// (beyond the default 48 KiB, up to the device's opt-in limit).
    pub fn allow_attention_shared_memory(&self, schedule: &Schedule, max_seq: usize) -> Result<()> {
        for spec in schedule.kernels() {
            if !matches!(spec, KernelSpec::Attention { .. }) {
                continue;
            }
            let Some(ctx) = self.kernels.context(&spec) else {
                continue;
            };
            // The longest pass needs the most: it splits the context least (or not at all).
            let bytes = ctx.launch(max_seq, max_seq).shared_bytes as i32;
            let limit = self
                .ctx
                .attribute(
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .map_err(driver_err("cuDeviceGetAttribute"))?;
            if bytes > limit {
                return Err(Error::invalid(
                    "max_seq",
                    format!(
                        "{} positions need {bytes} bytes of shared memory in the attention kernel; {} allows {limit}",
                        max_seq, self.name
                    ),
                ));
            }
            if let Ok(f) = self.kernels.function(&spec.name()) {
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
                .map_err(driver_err("cuFuncSetAttribute"))?;
            }
        }
        Ok(())
    }

    /// The function `entry` and the launch of kernel `spec` for `rows` rows.
    pub fn kernel(
        &self,
        spec: &KernelSpec,
        entry: &str,
        rows: usize,
        context: usize,
    ) -> Result<(&CudaFunction, LaunchConfig)> {
        let (f, l) = self.kernels.get(spec, entry, rows, context)?;
        Ok((
            f,
            LaunchConfig {
                grid_dim: l.grid,
                block_dim: l.block,
                shared_mem_bytes: l.shared_bytes,
            },
        ))
    }

    /// Seconds of `n` consecutive launches by `launch(i)`, measured with one pair of CUDA events
    /// around the batch: microsecond kernels are timed in batches, not one event pair each
    /// (whose resolution and overhead are of the kernel's own order).
    pub fn time_launches(
        &self,
        n: usize,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        let (start, end) = (timing_event(self)?, timing_event(self)?);
        start
            .record(&self.stream)
            .map_err(driver_err("cuEventRecord"))?;
        for i in 0..n {
            launch(i)?;
        }
        end.record(&self.stream)
            .map_err(driver_err("cuEventRecord"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(driver_err("cuEventElapsedTime"))?;
        Ok(ms as f64 * 1e-3)
    }

    /// Bytes of the device's L2 cache (what weight copies must exceed to be timed from DRAM).
    pub fn l2_bytes(&self) -> Result<usize> {
        let v = self
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        Ok(v.max(0) as usize)
    }

    /// Runs one linear layer on the device, loading its kernels first (see
    /// [`crate::runtime::launch::run_linear`]).
    pub fn run_linear(
        &mut self,
        shape: LinearShape,
        packed: &PackedLinear,
        x: &[f32],
        rows: usize,
        y_init: &[f32],
    ) -> Result<Vec<f32>> {
        let specs = [KernelSpec::Gemv(shape), KernelSpec::Gemm(shape)];
        self.load_kernels(&specs, CompilerOptions::default())?;
        crate::runtime::launch::run_linear(self, shape, packed, x, rows, y_init)
    }
}

impl Memory for Device {
    type Buf = CudaSlice<u8>;

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            // A zero-length allocation is an error in the driver; kernels never read these.
            return self.zeros(0);
        }
        self.stream
            .clone_htod(bytes)
            .map_err(driver_err("cuMemcpyHtoD"))
    }

    fn zeros(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros(bytes.max(16))
            .map_err(driver_err("cuMemAlloc"))
    }

    fn write(&self, buf: &mut CudaSlice<u8>, bytes: &[u8]) -> Result<()> {
        let mut dst = buf.slice_mut(..bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut dst)
            .map_err(driver_err("cuMemcpyHtoD"))
    }

    fn read(&self, buf: &CudaSlice<u8>, len: usize) -> Result<Vec<u8>> {
        self.stream
            .clone_dtoh(&buf.slice(..len))
            .map_err(driver_err("cuMemcpyDtoH"))
    }
}

impl Launcher for Device {
    unsafe fn launch(
        &self,
        spec: &KernelSpec,
        entry: &str,
        rows: usize,
        context: usize,
        args: &[Arg<'_, CudaSlice<u8>>],
    ) -> Result<()> {
        let (f, cfg) = self.kernel(spec, entry, rows, context)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Buf(buf) => b.arg(*buf),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: the caller's contract (arguments match the kernel's signature).
        unsafe { b.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
        Ok(())
    }
}

impl RunPass for Device {
    /// A decode step replays the graph captured on its first run; when capture fails, a
    /// warning says so and the step's kernels are launched directly from then on.
    fn run_pass(backend: &mut CudaBackend<'_>, m: usize, decode: bool) -> Result<()> {
        if !(decode && backend.launcher.use_graph) {
            return backend.launch_steps(m, decode);
        }
        if backend.launcher.decode_graph.is_none() {
            match backend.capture_decode() {
                Ok(g) => backend.launcher.decode_graph = g,
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA graph capture failed; launching directly");
                    backend.launcher.use_graph = false;
                }
            }
        }
        match &backend.launcher.decode_graph {
            Some(g) if backend.launcher.use_graph => {
                g.launch().map_err(driver_err("cuGraphLaunch"))
            }
            _ => backend.launch_steps(1, true),
        }
    }
}

/// An executable plan on a CUDA device.
pub type CudaBackend<'a> = KernelBackend<'a, Device>;

impl<'a> KernelBackend<'a, Device> {
    /// Opens device `ordinal`, loads the plan's kernels and uploads its buffers.
    pub fn new(
        plan: &'a ExecutablePlan,
        ordinal: usize,
        opts: Option<CompilerOptions>,
    ) -> Result<CudaBackend<'a>> {
        let mut dev = Device::open(ordinal)?;
        let opts = opts.unwrap_or_else(|| CompilerOptions {
            cache_dir: Some(super::KernelCache::default_dir()),
            ..CompilerOptions::default()
        });
        dev.load_kernels(&plan.schedule.kernels(), opts)?;
        dev.allow_attention_shared_memory(&plan.schedule, plan.max_seq)?;
        KernelBackend::on(plan, dev, "cuda")
    }

    /// The device's name and target.
    pub fn device(&self) -> (&str, Arch) {
        (&self.launcher.name, self.launcher.arch)
    }

    /// Captures the decode step's launches as a CUDA graph (capture always ends, so the
    /// stream is usable after a failure).
    fn capture_decode(&mut self) -> Result<Option<CudaGraph>> {
        let stream = self.launcher.stream.clone();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err("cuStreamBeginCapture"))?;
        let launched = self.launch_steps(1, true);
        let graph = stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(driver_err("cuStreamEndCapture"));
        launched?;
        graph
    }

    /// Runs one decode step at position `pos` (the token already in place) with events around
    /// the whole step and each linear step; returns (whole, sum of linears) in seconds.
    pub fn timed_decode_step(&mut self, pos: usize) -> Result<(f64, f64)> {
        self.launcher
            .write(&mut self.seq.pos, &(pos as i32).to_le_bytes())?;
        let dev = &self.launcher;
        let stream = dev.stream.clone();
        let (start, end) = (timing_event(dev)?, timing_event(dev)?);
        start.record(&stream).map_err(driver_err("cuEventRecord"))?;
        let mut pairs = Vec::new();
        for (i, step) in self.plan.schedule.steps.iter().enumerate() {
            let linear = matches!(step, Step::Linear { .. });
            if linear {
                let pair = (timing_event(dev)?, timing_event(dev)?);
                pair.0
                    .record(&stream)
                    .map_err(driver_err("cuEventRecord"))?;
                pairs.push(pair);
            }
            self.launch_step(i, 1, true)?;
            if let (true, Some((_, e))) = (linear, pairs.last()) {
                e.record(&stream).map_err(driver_err("cuEventRecord"))?;
            }
        }
        end.record(&stream).map_err(driver_err("cuEventRecord"))?;
        let secs = |a: &CudaEvent, b: &CudaEvent| -> Result<f64> {
            Ok(a.elapsed_ms(b).map_err(driver_err("cuEventElapsedTime"))? as f64 * 1e-3)
        };
        let whole = secs(&start, &end)?;
        let mut linears = 0.0;
        for (a, b) in &pairs {
            linears += secs(a, b)?;
        }
        Ok((whole, linears))
    }
}

/// An event that records timestamps.
pub(crate) fn timing_event(dev: &Device) -> Result<CudaEvent> {
    dev.ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver_err("cuEventCreate"))
}
