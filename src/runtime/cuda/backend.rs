//! The cuda backend of an executable plan: uploads the packed weights, tables and KV cache,
//! compiles the schedule's kernels for the device's architecture (NVRTC, disk cache), and
//! runs the steps with the launch dimensions the codegen contexts compute. The decode step
//! can be captured once as a CUDA graph: its launches depend on nothing but device buffers
//! (the position and the previous token are read on the device).

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DriverError,
    LaunchConfig, PushKernelArg,
};

use super::compile::{Compiler, CompilerOptions};
use crate::codegen::Renderer;
use crate::error::{Error, Result};
use crate::lower::{Act, Arch, KernelSpec, Param, Step};
use crate::runtime::exec::{Backend, ExecutablePlan};
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
    pub name: String,
    kernels: LoadedKernels<CudaFunction>,
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
        // SAFETY: every buffer is created and used on the context's default stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        let name = ctx.name().map_err(driver_err("cuDeviceGetName"))?;
        let arch = Arch::from_compute_capability(major as u32, minor as u32).ok_or_else(|| {
            Error::CudaUnavailable {
                what: "supported GPU",
                hint: format!(
                    "{name} has compute capability {major}.{minor}; fpx targets sm_89, sm_90, sm_100a, sm_120a"
                ),
            }
        })?;
        let stream = ctx.default_stream();
        Ok(Device {
            ctx,
            stream,
            arch,
            name,
            kernels: LoadedKernels::default(),
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
            let module = self
                .ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bin.cubin))
                .map_err(driver_err("cuModuleLoadData"))?;
            self.kernels.add(src, |entry| {
                module
                    .load_function(entry)
                    .map_err(driver_err("cuModuleGetFunction"))
            })?;
        }
        Ok(())
    }

    /// Lets the attention kernel use the dynamic shared memory `plan.max_seq` positions need
    /// (beyond the default 48 KiB, up to the device's opt-in limit).
    fn allow_attention_shared_memory(&self, plan: &ExecutablePlan) -> Result<()> {
        for spec in plan.schedule.kernels() {
            if !matches!(spec, KernelSpec::Attention { .. }) {
                continue;
            }
            let Some(ctx) = self.kernels.context(&spec) else {
                continue;
            };
            let bytes = ctx.launch(1, plan.max_seq).shared_bytes as i32;
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
                        plan.max_seq, self.name
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

    /// Runs one linear layer on the device (loading its kernels if needed): `y_init` is the
    /// `[rows, n]` output before the kernel (it matters for `accumulate`); returns it after.
    pub fn run_linear(
        &mut self,
        shape: crate::lower::LinearShape,
        packed: &crate::runtime::exec::PackedLinear,
        x: &[f32],
        rows: usize,
        y_init: &[f32],
    ) -> Result<Vec<f32>> {
        let specs = [KernelSpec::Gemv(shape), KernelSpec::Gemm(shape)];
        self.load_kernels(&specs, CompilerOptions::default())?;
        let l = upload_linear(self, packed)?;
        let x = self.upload(x)?;
        let mut y = self.upload(y_init)?;
        launch_linear(self, shape, &l, &x, &mut y, rows)?;
        let mut out = self
            .stream
            .clone_dtoh(&y)
            .map_err(driver_err("cuMemcpyDtoH"))?;
        out.truncate(y_init.len());
        Ok(out)
    }

    pub fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            // A zero-length allocation is an error in the driver; kernels never read these.
            return self.zeros(1);
        }
        self.stream
            .clone_htod(data)
            .map_err(driver_err("cuMemcpyHtoD"))
    }

    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(driver_err("cuMemAlloc"))
    }
}

/// A linear layer on the device.
pub(crate) struct DevLinear {
    pub codes: CudaSlice<u8>,
    /// fp8 row scales (FP32 bytes) or FP4 block-scale bytes; one zero byte when none.
    pub scales: CudaSlice<u8>,
    pub global: f32,
    /// Bias, or one zero float (the kernel does not read it without a bias).
    pub bias: CudaSlice<f32>,
}

pub(crate) fn upload_linear(
    dev: &Device,
    l: &crate::runtime::exec::PackedLinear,
) -> Result<DevLinear> {
    Ok(DevLinear {
        codes: dev.upload(&l.codes)?,
        scales: dev.upload(&l.scales.kernel_bytes())?,
        global: l.global,
        bias: dev.upload(l.bias.as_deref().unwrap_or(&[]))?,
    })
}

/// Launches one linear step: the `_m1` GEMV for one row, `_m8` for up to eight, else GEMM.
pub(crate) fn launch_linear(
    dev: &Device,
    shape: crate::lower::LinearShape,
    l: &DevLinear,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    rows: usize,
) -> Result<()> {
    let (spec, entry) = shape.kernel_for_rows(rows);
    let (f, cfg) = dev.kernel(&spec, &entry, rows, 0)?;
    let m = rows as i32;
    let mut b = dev.stream.launch_builder(f);
    b.arg(&l.codes)
        .arg(&l.scales)
        .arg(&l.global)
        .arg(&l.bias)
        .arg(x)
        .arg(y)
        .arg(&m);
    // SAFETY: the argument list matches the kernel signature of templates/gemv|gemm.cu.tera
    // (w, scales, global, bias, x, y, m) and the buffers hold the shapes the spec names.
    unsafe { b.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
    Ok(())
}

/// Activation and cache buffers of one sequence, plus the plan's weights, on the device.
pub struct CudaBackend<'a> {
    plan: &'a ExecutablePlan,
    dev: Device,
    embedding: CudaSlice<f32>,
    norms: Vec<CudaSlice<f32>>,
    linears: Vec<DevLinear>,
    rope_cos: CudaSlice<f32>,
    rope_sin: CudaSlice<f32>,
    acts: Vec<CudaSlice<f32>>,
    k_cache: Vec<CudaSlice<f32>>,
    v_cache: Vec<CudaSlice<f32>>,
    tokens: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    next: CudaSlice<i32>,
    decode_graph: Option<CudaGraph>,
    /// Capture the decode step as a CUDA graph on its first run.
    pub use_graph: bool,
}

impl<'a> CudaBackend<'a> {
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
        dev.allow_attention_shared_memory(plan)?;
        let s = &plan.schedule;
        let d = &s.dims;
        let acts = Act::ALL
            .iter()
            .map(|&a| {
                let rows = if a == Act::Logits { 1 } else { plan.max_seq };
                dev.zeros(rows * s.act_cols(a))
            })
            .collect::<Result<Vec<_>>>()?;
        let cache = |dev: &Device| dev.zeros::<f32>(plan.max_seq * d.kv_dim);
        Ok(CudaBackend {
            embedding: dev.upload(&plan.embedding)?,
            norms: plan
                .norms
                .iter()
                .map(|n| dev.upload(n))
                .collect::<Result<_>>()?,
            linears: plan
                .linears
                .iter()
                .map(|l| upload_linear(&dev, l))
                .collect::<Result<_>>()?,
            rope_cos: dev.upload(&plan.rope_cos)?,
            rope_sin: dev.upload(&plan.rope_sin)?,
            acts,
            k_cache: (0..d.layers).map(|_| cache(&dev)).collect::<Result<_>>()?,
            v_cache: (0..d.layers).map(|_| cache(&dev)).collect::<Result<_>>()?,
            tokens: dev.zeros(plan.max_seq)?,
            pos: dev.zeros(1)?,
            next: dev.zeros(1)?,
            decode_graph: None,
            use_graph: true,
            plan,
            dev,
        })
    }

    /// The device's name and target.
    pub fn device(&self) -> (&str, Arch) {
        (&self.dev.name, self.dev.arch)
    }

    /// Launches every step for `m` rows; `decode` reads the token from the previous argmax.
    fn launch_steps(&mut self, m: usize, decode: bool) -> Result<()> {
        self.launch_steps_timed(m, decode, None)
    }

    /// [`Self::launch_steps`], recording an event pair around each linear step in `timing`.
    fn launch_steps_timed(
        &mut self,
        m: usize,
        decode: bool,
        mut timing: Option<&mut Vec<(CudaEvent, CudaEvent)>>,
    ) -> Result<()> {
        let plan = self.plan;
        let s = &plan.schedule;
        let d = &s.dims;
        let mi = m as i32;
        for &step in &s.steps {
            let specs = s.kernels_of(&step);
            let spec = specs[0];
            let name = spec.name();
            if let Step::Linear { linear, src, dst } = step {
                {
                    let rows = step.rows(m);
                    let (x, y) = two(&mut self.acts, src as usize, dst as usize);
                    let events = match timing.as_deref_mut() {
                        Some(t) => {
                            let pair = (timing_event(&self.dev)?, timing_event(&self.dev)?);
                            pair.0
                                .record(&self.dev.stream)
                                .map_err(driver_err("cuEventRecord"))?;
                            t.push(pair);
                            t.last()
                        }
                        None => None,
                    };
                    launch_linear(
                        &self.dev,
                        s.linears[linear].shape,
                        &self.linears[linear],
                        x,
                        y,
                        rows,
                    )?;
                    if let Some((_, end)) = events {
                        end.record(&self.dev.stream)
                            .map_err(driver_err("cuEventRecord"))?;
                    }
                    continue;
                }
            }
            let rows = step.rows(m);
            let row0 = step.row0(m);
            let (f, cfg) = self.dev.kernel(&spec, &name, rows, plan.max_seq)?;
            let mut b = self.dev.stream.launch_builder(f);
            for p in step.params(decode) {
                match p {
                    Param::Act(a) => b.arg(&self.acts[a as usize]),
                    Param::Tokens => b.arg(&self.tokens),
                    Param::Next => b.arg(&self.next),
                    Param::Embedding => b.arg(&self.embedding),
                    Param::Norm(i) => b.arg(&self.norms[i]),
                    Param::KCache(l) => b.arg(&self.k_cache[l]),
                    Param::VCache(l) => b.arg(&self.v_cache[l]),
                    Param::RopeCos => b.arg(&self.rope_cos),
                    Param::RopeSin => b.arg(&self.rope_sin),
                    Param::Pos => b.arg(&self.pos),
                    Param::Rows => b.arg(&mi),
                    Param::Eps => b.arg(&d.eps),
                    Param::Row0 => b.arg(&row0),
                };
            }
            // SAFETY: `Step::params` lists each template's kernel signature in order.
            unsafe { b.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
        }
        Ok(())
    }

    /// Runs one decode step at position `pos` (the token already in place) with events around
    /// the whole step and each linear step; returns (whole, sum of linears) in seconds.
    pub fn timed_decode_step(&mut self, pos: usize) -> Result<(f64, f64)> {
        let stream = self.dev.stream.clone();
        stream
            .memcpy_htod(&[pos as i32], &mut self.pos)
            .map_err(driver_err("cuMemcpyHtoD"))?;
        let mut pairs = Vec::new();
        let (start, end) = (timing_event(&self.dev)?, timing_event(&self.dev)?);
        start.record(&stream).map_err(driver_err("cuEventRecord"))?;
        self.launch_steps_timed(1, true, Some(&mut pairs))?;
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

    /// Captures the decode step's launches as a CUDA graph (capture always ends, so the
    /// stream is usable after a failure).
    fn capture_decode(&mut self) -> Result<Option<CudaGraph>> {
        let stream = self.dev.stream.clone();
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

    /// One decode step through the captured graph (captured on first use); when capture
    /// fails, the step's kernels are launched directly from then on.
    fn run_decode_graph(&mut self) -> Result<()> {
        if self.decode_graph.is_none() {
            match self.capture_decode() {
                Ok(g) => self.decode_graph = g,
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA graph capture failed; launching directly");
                    self.use_graph = false;
                }
            }
        }
        match &self.decode_graph {
            Some(g) if self.use_graph => g.launch().map_err(driver_err("cuGraphLaunch")),
            _ => self.launch_steps(1, true),
        }
    }
}

/// An event that records timestamps.
pub(crate) fn timing_event(dev: &Device) -> Result<CudaEvent> {
    dev.ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver_err("cuEventCreate"))
}

/// Two distinct activation buffers, one shared and one mutable.
fn two(acts: &mut [CudaSlice<f32>], a: usize, b: usize) -> (&CudaSlice<f32>, &mut CudaSlice<f32>) {
    assert_ne!(a, b, "a linear step reads and writes distinct buffers");
    if a < b {
        let (lo, hi) = acts.split_at_mut(b);
        (&lo[a], &mut hi[0])
    } else {
        let (lo, hi) = acts.split_at_mut(a);
        (&hi[0], &mut lo[b])
    }
}

impl Backend for CudaBackend<'_> {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        crate::runtime::exec::check_pass(self.plan, tokens, pos)?;
        let stream = self.dev.stream.clone();
        let p = [pos as i32];
        stream
            .memcpy_htod(&p, &mut self.pos)
            .map_err(driver_err("cuMemcpyHtoD"))?;
        // A decode step continues from the previous argmax, which is already in `next`.
        let decode = tokens.len() == 1 && pos > 0;
        if decode {
            let t = [tokens[0] as i32];
            stream
                .memcpy_htod(&t, &mut self.next)
                .map_err(driver_err("cuMemcpyHtoD"))?;
            if self.use_graph {
                self.run_decode_graph()?;
            } else {
                self.launch_steps(1, true)?;
            }
        } else {
            let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
            let mut dst = self.tokens.slice_mut(..ids.len());
            stream
                .memcpy_htod(&ids, &mut dst)
                .map_err(driver_err("cuMemcpyHtoD"))?;
            self.launch_steps(tokens.len(), false)?;
        }
        let next = stream
            .clone_dtoh(&self.next)
            .map_err(driver_err("cuMemcpyDtoH"))?;
        Ok(next[0].max(0) as u32)
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let mut v = self
            .dev
            .stream
            .clone_dtoh(&self.acts[Act::Logits as usize])
            .map_err(driver_err("cuMemcpyDtoH"))?;
        v.truncate(self.plan.schedule.dims.vocab);
        Ok(v)
    }
}
