//! Host memory laid out as a backend's device memory ([`HostBuf`], [`HostMemory`]): the emu
//! backend's kernels and the cpu backend's ops run on the same [`HostState`] (one sequence's
//! [`SequenceBuffers`] in host memory); and a kernel-by-kernel comparison of two such backends:
//! before every step the backend under test gets a copy of the reference's buffers, so each
//! kernel runs on exactly the reference's inputs and a difference points at that kernel alone,
//! not at an error carried from earlier.

use super::generate::Backend;
use super::ExecutablePlan;
use crate::error::Result;
use crate::formats::{Format, QuantizedMatrix, Scales};
use crate::lower::{Act, ActDtype, Step};
use crate::runtime::launch::{Memory, SequenceBuffers};

/// 16 bytes, 16-aligned: the unit of a [`HostBuf`], so that the kernels' vector loads (up to
/// 16 bytes) are aligned as on a device.
#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Chunk([u8; 16]);

/// A buffer in host memory that kernels write through raw pointers, as through device
/// pointers: the bytes live behind a raw pointer (not a Rust reference), so a kernel may write
/// them while the buffer is shared (`&HostBuf`), as long as no slice from [`HostBuf::bytes`]
/// is alive during the launch.
pub struct HostBuf {
    ptr: *mut Chunk,
    chunks: usize,
    len: usize,
}

// SAFETY: a HostBuf owns its allocation exclusively, like a Vec.
unsafe impl Send for HostBuf {}

impl HostBuf {
    /// `len` zero bytes (at least 16 are allocated).
    pub fn zeros(len: usize) -> HostBuf {
        let chunks = len.div_ceil(16).max(1);
        let b: Box<[Chunk]> = vec![Chunk::default(); chunks].into_boxed_slice();
        HostBuf {
            ptr: Box::into_raw(b).cast(),
            chunks,
            len,
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> HostBuf {
        let mut b = HostBuf::zeros(bytes.len());
        b.bytes_mut().copy_from_slice(bytes);
        b
    }

    /// The address kernels get.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.cast()
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len <= 16 * chunks` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.len) }
    }
}

impl Clone for HostBuf {
    fn clone(&self) -> HostBuf {
        HostBuf::from_bytes(self.bytes())
    }

    fn clone_from(&mut self, src: &HostBuf) {
        if self.len == src.len {
            self.bytes_mut().copy_from_slice(src.bytes());
        } else {
            *self = src.clone();
        }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from Box::into_raw of a boxed slice of `chunks` chunks.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr,
                self.chunks,
            )))
        };
    }
}

/// Host memory as a [`Memory`]: what the cpu backend and the emulator allocate.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostMemory;

impl Memory for HostMemory {
    type Buf = HostBuf;

    fn upload(&self, bytes: &[u8]) -> Result<HostBuf> {
        Ok(HostBuf::from_bytes(bytes))
    }

    fn zeros(&self, bytes: usize) -> Result<HostBuf> {
        Ok(HostBuf::zeros(bytes))
    }

    fn write(&self, buf: &mut HostBuf, bytes: &[u8]) -> Result<()> {
        buf.bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn read(&self, buf: &HostBuf, len: usize) -> Result<Vec<u8>> {
        Ok(buf.bytes()[..len].to_vec())
    }
}

/// One sequence's activations, KV cache, tokens, position and next token in host memory.
pub type HostState = SequenceBuffers<HostBuf>;

impl HostState {
    /// Zeroed buffers for `plan`.
    pub fn new(plan: &ExecutablePlan) -> HostState {
        SequenceBuffers::zeros(&HostMemory, plan).expect("host allocation does not fail")
    }

    /// The first `n` values of `buf` (elements of `act`), widened.
    pub fn values(buf: &HostBuf, act: ActDtype, n: usize) -> Vec<f32> {
        act.decode(&buf.bytes()[..n * act.bytes()])
    }

    /// The greedy next token the last argmax left.
    pub fn next(&self) -> i32 {
        let b = self.next.bytes();
        i32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The values the FP8 buffers hold (what a W8A8 linear multiplies): `rows` rows of `cols`
    /// E4M3 codes times their row scales.
    pub fn fp8_values(&self, rows: usize, cols: usize) -> Vec<f32> {
        let q = QuantizedMatrix {
            format: Format::Fp8,
            rows,
            cols,
            codes: self.x_codes.bytes()[..rows * cols].to_vec(),
            scales: Scales::Row(HostState::values(&self.x_scales, ActDtype::F32, rows)),
        };
        q.dequantize()
    }

    /// What `step` wrote in a pass of `m` rows at position `pos`, widened to FP32: its
    /// destination rows (RoPE: the rotated queries, then the pass's rows of the K and V cache;
    /// argmax: the token; a quantizing step, and a quantizing RMSNorm after its rows: the FP8
    /// rows' values).
    pub fn step_output(&self, plan: &ExecutablePlan, step: Step, m: usize, pos: usize) -> Vec<f32> {
        let s = &plan.schedule;
        let act = s.act;
        let rows_of = |a: Act, rows: usize| {
            HostState::values(&self.acts[a as usize], act, rows * s.act_cols(a))
        };
        let rows = step.rows(m);
        match step {
            Step::Embed => rows_of(Act::X, rows),
            Step::RmsNorm {
                dst, quant: true, ..
            } => {
                let mut v = rows_of(dst, rows);
                v.extend(self.fp8_values(rows, s.act_cols(dst)));
                v
            }
            Step::QuantFp8 { src } => self.fp8_values(rows, s.act_cols(src)),
            Step::RmsNorm { dst, .. } | Step::Linear { dst, .. } => rows_of(dst, rows),
            Step::RopeKv { layer, .. } => {
                let kv = s.dims.kv_dim;
                let e = act.bytes();
                let span = |c: &HostBuf| act.decode(&c.bytes()[pos * kv * e..(pos + m) * kv * e]);
                let mut v = rows_of(Act::Q, rows);
                v.extend(span(&self.k_cache[layer]));
                v.extend(span(&self.v_cache[layer]));
                v
            }
            Step::Attention { .. } => rows_of(Act::Att, rows),
            Step::SiluMul { quant: false } => rows_of(Act::Gate, rows),
            Step::SiluMul { quant: true } => {
                let mut v = rows_of(Act::Gate, rows);
                v.extend(self.fp8_values(rows, s.dims.ffn));
                v
            }
            Step::Argmax => vec![self.next() as f32],
            // The block's output: the residual rows its combine added into.
            Step::Moe { moe } => rows_of(s.moes[moe].dst, rows),
        }
    }
}

/// A backend whose buffers are a [`HostState`] and that can run one step at a time.
pub trait HostBackend: Backend {
    fn state(&self) -> &HostState;
    fn state_mut(&mut self) -> &mut HostState;
    /// Runs step `index` of the plan's schedule for a pass of `tokens` at `pos` (the pass must
    /// fit the plan: see [`Backend::forward`]).
    fn run_step(&mut self, index: usize, tokens: &[u32], pos: usize) -> Result<()>;
}

/// One step of [`compare_steps`].
#[derive(Debug, Clone)]
pub struct StepComparison {
    pub index: usize,
    pub step: Step,
    /// The entry point the step launched (`gemv_fp8_64x64_m8`, `rmsnorm_64`, ...).
    pub kernel: String,
    /// Values compared.
    pub len: usize,
    /// Largest |test - reference| (infinite where exactly one of them is NaN).
    pub max_abs: f32,
    /// Largest |reference|.
    pub scale: f32,
}

impl StepComparison {
    /// [`max_abs`](Self::max_abs) relative to the largest reference value.
    pub fn rel(&self) -> f32 {
        self.max_abs / self.scale.max(f32::MIN_POSITIVE)
    }
}

/// Runs a pass of `tokens` at `pos` one step at a time on `reference` and on `test`, copying
/// the reference's buffers into `test` before each step, and compares what each step wrote.
pub fn compare_steps(
    plan: &ExecutablePlan,
    reference: &mut dyn HostBackend,
    test: &mut dyn HostBackend,
    tokens: &[u32],
    pos: usize,
) -> Result<Vec<StepComparison>> {
    super::check_pass(plan, tokens, pos)?;
    let m = tokens.len();
    let mut out = Vec::with_capacity(plan.schedule.steps.len());
    for (index, &step) in plan.schedule.steps.iter().enumerate() {
        test.state_mut().clone_from(reference.state());
        reference.run_step(index, tokens, pos)?;
        test.run_step(index, tokens, pos)?;
        let want = reference.state().step_output(plan, step, m, pos);
        let got = test.state().step_output(plan, step, m, pos);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(g, w)| match (g.is_nan(), w.is_nan()) {
                (true, true) => 0.0,
                (false, false) => (g - w).abs(),
                _ => f32::INFINITY,
            })
            .fold(0f32, f32::max);
        out.push(StepComparison {
            index,
            step,
            kernel: plan.schedule.entry_of(&step, m),
            len: want.len(),
            max_abs,
            scale: want.iter().fold(0f32, |a, v| a.max(v.abs())),
        });
    }
    Ok(out)
}
