//! What each step of a schedule makes the GPU do: the DRAM bytes its kernel moves, the FLOPs it
//! computes, the extra instructions it spends decoding FP8/FP4 weights in registers, and the
//! instruction path its inner loop runs on. Read from the kernel's spec, so the latency model
//! (`latency::KernelCost`) prices exactly the kernels codegen generates: when a kernel changes
//! (a tensor-core path, 16-bit activations), its [`KernelSpec::path`] or the byte counts here
//! change with it, and so does the price of every plan that uses it.
//!
//! Byte counts are compulsory DRAM traffic: every weight byte (codes, scales, tensor scale,
//! bias) once per launch, activations read and written once, the KV cache rows attention reads
//! and RoPE writes. Re-reads served by L1/L2 (the GEMM's K tiles, activations shared by rows)
//! are not counted.

use serde::Serialize;

use super::arch::Arch;
use super::dtype::ActDtype;
use super::schedule::{Act, Schedule, Step};
use super::spec::{KernelSpec, LinearShape, WeightFormat};

/// The instruction path a kernel's arithmetic runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstructionPath {
    /// FP32 FMA on the CUDA cores (weights decoded to FP32 in registers first).
    SimtF32,
    /// FP16/BF16 tensor-core MMA.
    TensorF16,
    /// FP8 E4M3 tensor-core MMA.
    TensorFp8,
    /// Block-scaled FP4 tensor-core MMA.
    TensorFp4,
    /// Not a kernel: a ring all-reduce over the interconnect (tensor parallelism).
    AllReduce,
}

impl InstructionPath {
    pub fn name(self) -> &'static str {
        match self {
            InstructionPath::SimtF32 => "simt_f32",
            InstructionPath::TensorF16 => "tensor_f16",
            InstructionPath::TensorFp8 => "tensor_fp8",
            InstructionPath::TensorFp4 => "tensor_fp4",
            InstructionPath::AllReduce => "all_reduce",
        }
    }
}

impl KernelSpec {
    /// The instruction path of this kernel on `arch`: the tensor-core MMA
    /// [`LinearShape::gemm_mma`] gives a prefill GEMM (16-bit on every target; FP8 for W8A8 where
    /// [`Arch::fp8_mma_is_native`], else the 16-bit rate its SASS runs at), FP32 FMA on the
    /// CUDA cores for every other kernel.
    pub fn path(&self, arch: Arch) -> InstructionPath {
        match self {
            KernelSpec::Gemm(s) => match s.gemm_mma(arch) {
                Some("e4m3") if arch.fp8_mma_is_native() => InstructionPath::TensorFp8,
                Some(_) => InstructionPath::TensorF16,
                None => InstructionPath::SimtF32,
            },
            _ => InstructionPath::SimtF32,
        }
    }
}

/// SASS instructions the decode GEMV spends per weight element beyond the FMA, by format,
/// target and activation type (W8A8 layers: [`w8a8_decode_instructions_per_weight`]): weight and activation loads, the decode to FP32, the scales, address arithmetic and
/// the loop. Measured on the `_m1` GEMV of a 1536 x 576 layer: the static instruction count of
/// its main loop (`codegen::report::MainLoop`, the body of the longest backward branch)
/// divided by the weights one trip handles, minus the one FMA per weight
/// (`codegen::report::gemv_instructions_per_weight`); `tests/sass.rs` recomputes every entry
/// from the compiled kernels and fails when one drifts. The shape's own unrolling makes other
/// shapes differ by a fraction of an instruction.
pub fn decode_instructions_per_weight(shape: &LinearShape, arch: Arch) -> f64 {
    use WeightFormat as W;
    let (format, act) = (shape.format, shape.act);
    if shape.w8a8 {
        return w8a8_decode_instructions_per_weight(arch);
    }
    // Measured with NVRTC 12.9 (`cargo test --test sass decode_cost -- --nocapture` prints
    // them); fractions because the compiler unrolls the loop over several weight vectors.
    // 16-bit activations cost about one instruction per weight more than FP32 ones: the
    // widening of each activation to FP32 (the kernels keep FP32 FMA arithmetic); with FP4
    // weights they are loaded two at a time (codegen::context, no spills), a little more.
    match act {
        ActDtype::F32 => match (arch, format) {
            (Arch::Sm86 | Arch::Sm89, W::F32) => 0.9375,
            (Arch::Sm80 | Arch::Sm90, W::F32) => 1.0625,
            (Arch::Sm100a, W::F32) => 3.25,
            (Arch::Sm120a, W::F32) => 1.75,
            (Arch::Sm80 | Arch::Sm86 | Arch::Sm89 | Arch::Sm90, W::Fp16) => 1.59375,
            (Arch::Sm100a, W::Fp16) => 2.25,
            (Arch::Sm120a, W::Fp16) => 2.0,
            // No FP8 conversion instruction: the f16x2 bit decode (`e4m3x4_decode_scaled`).
            (Arch::Sm80, W::Fp8) => 6.8125,
            (Arch::Sm86, W::Fp8) => 7.0,
            (Arch::Sm89 | Arch::Sm90 | Arch::Sm100a, W::Fp8) => 2.25,
            (Arch::Sm120a, W::Fp8) => 2.125,
            (Arch::Sm80, W::Nvfp4) => 4.53125,
            (Arch::Sm86 | Arch::Sm89 | Arch::Sm90, W::Nvfp4) => 4.3125,
            (Arch::Sm100a, W::Nvfp4) => 3.53125,
            (Arch::Sm120a, W::Nvfp4) => 3.46875,
            (Arch::Sm80, W::Mxfp4) => 3.84375,
            (Arch::Sm86 | Arch::Sm89, W::Mxfp4) => 4.0,
            (Arch::Sm90, W::Mxfp4) => 3.8125,
            (Arch::Sm100a, W::Mxfp4) => 3.21875,
            (Arch::Sm120a, W::Mxfp4) => 3.15625,
        },
        ActDtype::Bf16 | ActDtype::F16 => match (arch, format) {
            (Arch::Sm80 | Arch::Sm86 | Arch::Sm89 | Arch::Sm90, W::F32) => 1.9375,
            (Arch::Sm100a, W::F32) => 3.25,
            (Arch::Sm120a, W::F32) => 2.75,
            (Arch::Sm80 | Arch::Sm86 | Arch::Sm89 | Arch::Sm90, W::Fp16) => 2.59375,
            (Arch::Sm100a, W::Fp16) => 3.5,
            (Arch::Sm120a, W::Fp16) => 3.0,
            (Arch::Sm80, W::Fp8) => 7.875,
            (Arch::Sm86, W::Fp8) => 7.75,
            (Arch::Sm89 | Arch::Sm90 | Arch::Sm100a, W::Fp8) => 3.25,
            (Arch::Sm120a, W::Fp8) => 3.125,
            (Arch::Sm80 | Arch::Sm86 | Arch::Sm89, W::Nvfp4) => 5.75,
            (Arch::Sm90, W::Nvfp4) => 5.65625,
            (Arch::Sm100a, W::Nvfp4) => 4.84375,
            (Arch::Sm120a, W::Nvfp4) => 4.71875,
            (Arch::Sm80 | Arch::Sm86 | Arch::Sm89, W::Mxfp4) => 5.09375,
            (Arch::Sm90, W::Mxfp4) if act == ActDtype::Bf16 => 5.09375,
            (Arch::Sm90, W::Mxfp4) => 5.125,
            (Arch::Sm100a | Arch::Sm120a, W::Mxfp4) => 4.4375,
        },
    }
}

/// [`decode_instructions_per_weight`] of a W8A8 GEMV, measured the same way (`tests/sass.rs`):
/// x's codes are loaded and decoded like W's (once per weight at one row), whatever the
/// activation type of the output; about twice the weight-only FP8 decode.
fn w8a8_decode_instructions_per_weight(arch: Arch) -> f64 {
    match arch {
        Arch::Sm80 => 12.8125,
        Arch::Sm86 => 12.5625,
        Arch::Sm89 => 3.75,
        Arch::Sm90 => 3.8125,
        Arch::Sm100a => 3.6875,
        Arch::Sm120a => 3.4375,
    }
}

/// What one launch does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KernelWork {
    /// DRAM bytes moved (read + written).
    pub bytes: f64,
    /// Floating-point operations (an FMA counts two).
    pub flops: f64,
    /// Extra SIMT instructions for decoding weights in registers.
    pub decode_instructions: f64,
    pub path: InstructionPath,
}

/// Bytes of a linear layer's parameters as the kernels read them: the format's codes and
/// scales ([`crate::formats::Format::weight_bytes`]; FP32 weights 4 per element) and an FP32 bias.
pub fn linear_weight_bytes(shape: &LinearShape) -> usize {
    let (n, k) = (shape.n, shape.k);
    let weights = shape
        .format
        .format()
        .map_or(4 * n * k, |f| f.weight_bytes(n, k) as usize);
    weights + if shape.bias { 4 * n } else { 0 }
}

/// The work of a linear kernel over `rows` activation rows.
pub fn linear_work(shape: &LinearShape, rows: usize, arch: Arch) -> KernelWork {
    let (spec, _) = shape.kernel_for_rows(rows);
    let (m, n, k) = (rows as f64, shape.n as f64, shape.k as f64);
    let act = shape.act.bytes() as f64;
    let outputs = if shape.accumulate { 2.0 } else { 1.0 };
    // W8A8 reads its input as one E4M3 code per element and an FP32 scale per row.
    let input = if shape.w8a8 {
        m * (k + 4.0)
    } else {
        act * m * k
    };
    KernelWork {
        bytes: linear_weight_bytes(shape) as f64 + input + act * outputs * m * n,
        flops: 2.0 * m * n * k,
        decode_instructions: n * k * decode_instructions_per_weight(shape, arch),
        path: spec.path(arch),
    }
}

impl Schedule {
    /// The work of `step` over `rows` independent sequences, one new token each, each attending
    /// `context` cached positions (a decode step of a batch; `rows = 1` for one sequence).
    pub fn work(&self, step: &Step, rows: usize, context: usize, arch: Arch) -> KernelWork {
        if let Step::Moe { moe } = *step {
            return self.moe_work(moe, rows, arch);
        }
        let d = &self.dims;
        let r = rows as f64;
        let act = self.act.bytes() as f64;
        let ctx = context.max(1) as f64;
        let simt = |bytes: f64, flops: f64| KernelWork {
            bytes,
            flops,
            decode_instructions: 0.0,
            path: self.kernels_of(step)[0].path(arch),
        };
        let cols = |a: Act| self.act_cols(a) as f64;
        let (hidden, q_dim, kv_dim) = (d.hidden as f64, d.q_dim as f64, d.kv_dim as f64);
        match *step {
            Step::Linear { linear, .. } => linear_work(&self.linears[linear].shape, rows, arch),
            // The table rows gathered (stored in the activation type) and the residual rows
            // written.
            Step::Embed => simt(r * hidden * 2.0 * act, 0.0),
            // A fused quantization writes a code per element and a scale per row.
            Step::RmsNorm {
                src, dst, quant, ..
            } => {
                let q = if quant { r * (cols(dst) + 4.0) } else { 0.0 };
                simt(
                    r * act * (cols(src) + cols(dst)) + 4.0 * hidden + q,
                    4.0 * r * hidden,
                )
            }
            // Read twice (amax, then the codes: the second read from L1/L2 is not counted), a
            // code and a row scale written.
            Step::QuantFp8 { src } => {
                simt(r * (cols(src) * (act + 1.0) + 4.0), 2.0 * r * cols(src))
            }
            // Q rotated in place, K rotated and V copied into the cache, the cos/sin rows read;
            // with q/k norms, their two weights read and four more FLOPs per element (square,
            // sum, scale, weight).
            Step::RopeKv { qk_norm, .. } => {
                let (norm_bytes, norm_flops) = match qk_norm {
                    Some(_) => (2.0 * 4.0 * d.head_dim as f64, 4.0),
                    None => (0.0, 0.0),
                };
                simt(
                    r * act * (2.0 * q_dim + 4.0 * kv_dim)
                        + r * 4.0 * d.head_dim as f64
                        + norm_bytes,
                    r * (3.0 + norm_flops) * (q_dim + kv_dim),
                )
            }
            // Each row's queries against its sequence's `context` cached keys and values (the
            // last `window` of them with a sliding window).
            Step::Attention { window, .. } => {
                let ctx = window.map_or(ctx, |w| ctx.min(w as f64));
                simt(
                    r * act * (2.0 * ctx * kv_dim + 2.0 * q_dim),
                    4.0 * r * ctx * q_dim,
                )
            }
            // Fused quantization: a code per element and a scale per row written.
            Step::SiluMul { quant } => {
                let q = if quant { r * (d.ffn as f64 + 4.0) } else { 0.0 };
                simt(3.0 * r * d.ffn as f64 * act + q, 5.0 * r * d.ffn as f64)
            }
            Step::Argmax => simt(r * d.vocab as f64 * act, 0.0),
            Step::Moe { .. } => unreachable!("returned above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_work_counts_weights_activations_and_the_epilogue() {
        let shape = LinearShape {
            format: WeightFormat::Fp8,
            n: 96,
            k: 200,
            bias: true,
            accumulate: true,
            act: ActDtype::Bf16,
            w8a8: false,
        };
        let w = linear_work(&shape, 1, Arch::Sm90);
        // codes + per-row FP32 scales + bias, then x read, y read and written in BF16.
        let want = 96 * 200 + 4 * 96 + 4 * 96 + 2 * (200 + 2 * 96);
        assert_eq!(w.bytes, want as f64);
        assert_eq!(w.flops, 2.0 * 96.0 * 200.0);
        assert_eq!(w.path, InstructionPath::SimtF32);
    }

    #[test]
    fn prefill_gemms_on_16_bit_activations_take_the_tensor_core_path_where_exact() {
        let shape = |format, act| LinearShape {
            format,
            n: 64,
            k: 64,
            bias: false,
            accumulate: false,
            act,
            w8a8: false,
        };
        let path = |format, act| linear_work(&shape(format, act), 64, Arch::Sm90).path;
        for f in [WeightFormat::Fp8, WeightFormat::Nvfp4, WeightFormat::Mxfp4] {
            assert_eq!(path(f, ActDtype::Bf16), InstructionPath::TensorF16, "{f:?}");
        }
        for f in [WeightFormat::Fp16, WeightFormat::Fp8, WeightFormat::Nvfp4] {
            assert_eq!(path(f, ActDtype::F16), InstructionPath::TensorF16, "{f:?}");
        }
        // FP16 weights are not BF16 values, E8M0 scales leave FP16's range, FP32 is FP32.
        assert_eq!(
            path(WeightFormat::Fp16, ActDtype::Bf16),
            InstructionPath::SimtF32
        );
        assert_eq!(
            path(WeightFormat::Mxfp4, ActDtype::F16),
            InstructionPath::SimtF32
        );
        assert_eq!(
            path(WeightFormat::Fp8, ActDtype::F32),
            InstructionPath::SimtF32
        );
        // The decode GEMV stays SIMT.
        let gemv = linear_work(&shape(WeightFormat::Fp8, ActDtype::Bf16), 1, Arch::Sm90);
        assert_eq!(gemv.path, InstructionPath::SimtF32);
    }

    #[test]
    fn a_windowed_layer_reads_only_its_window_and_qk_norms_their_weights() {
        use crate::ir::Graph;
        use crate::model::{synthetic::tiny_spec, Architecture, ModelSpec, SlidingWindow};
        let spec = ModelSpec {
            sliding_window: Some(SlidingWindow {
                size: 16,
                layers: vec![1],
            }),
            ..tiny_spec(Architecture::Qwen3)
        };
        let s = Schedule::build(&Graph::build(&spec), &Default::default()).unwrap();
        let attention = |layer: usize, ctx: usize| {
            let step = s
                .steps
                .iter()
                .find(|st| matches!(st, Step::Attention { layer: l, .. } if *l == layer))
                .unwrap();
            s.work(step, 1, ctx, Arch::Sm90)
        };
        // Layer 1 slides: at 512 positions it reads what it reads at 16; layer 0 does not.
        assert_eq!(attention(1, 512), attention(1, 16));
        assert_eq!(attention(1, 512), attention(0, 16));
        assert!(attention(0, 512).bytes > attention(1, 512).bytes);
        let rope = s
            .steps
            .iter()
            .find(|st| matches!(st, Step::RopeKv { .. }))
            .unwrap();
        let plain = Schedule::build(
            &Graph::build(&tiny_spec(Architecture::Qwen2)),
            &Default::default(),
        )
        .unwrap();
        let plain_rope = plain
            .steps
            .iter()
            .find(|st| matches!(st, Step::RopeKv { .. }))
            .unwrap();
        let (a, b) = (
            s.work(rope, 1, 1, Arch::Sm90),
            plain.work(plain_rope, 1, 1, Arch::Sm90),
        );
        // The two head_dim weights in FP32.
        assert_eq!(a.bytes - b.bytes, 2.0 * 4.0 * 16.0);
    }
}
