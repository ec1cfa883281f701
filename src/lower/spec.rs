//! Kernel specialisations: the closed set of kernels fpx generates, each identified by the
//! values that change its source (op family, shapes, weight format, epilogue flags). Two plan
//! steps with equal specs share one kernel; the spec's [`KernelSpec::name`] is stable and
//! unique per spec, so it names the `.cu` file, the entry points and the cache entry.

use serde::{Deserialize, Serialize};

use super::dtype::ActDtype;
use crate::formats::Format;

/// How a linear layer's weights are stored on the device: one of the plan formats, or FP32
/// for layers the plan leaves in full precision (the CPU reference runs those in FP32 too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    F32,
    Fp16,
    Fp8,
    Nvfp4,
    Mxfp4,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 5] = [
        WeightFormat::F32,
        WeightFormat::Fp16,
        WeightFormat::Fp8,
        WeightFormat::Nvfp4,
        WeightFormat::Mxfp4,
    ];

    /// The storage of a layer with this plan format (`None`: not in the plan, FP32).
    pub fn of(format: Option<Format>) -> WeightFormat {
        match format {
            None => WeightFormat::F32,
            Some(Format::Fp16) => WeightFormat::Fp16,
            Some(Format::Fp8) => WeightFormat::Fp8,
            Some(Format::Nvfp4) => WeightFormat::Nvfp4,
            Some(Format::Mxfp4) => WeightFormat::Mxfp4,
        }
    }

    /// The quantized format, or `None` for FP32.
    pub fn format(self) -> Option<Format> {
        match self {
            WeightFormat::F32 => None,
            WeightFormat::Fp16 => Some(Format::Fp16),
            WeightFormat::Fp8 => Some(Format::Fp8),
            WeightFormat::Nvfp4 => Some(Format::Nvfp4),
            WeightFormat::Mxfp4 => Some(Format::Mxfp4),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Fp16 => "fp16",
            WeightFormat::Fp8 => "fp8",
            WeightFormat::Nvfp4 => "nvfp4",
            WeightFormat::Mxfp4 => "mxfp4",
        }
    }

    /// Bytes of codes per row of `cols` elements (FP4 rows padded to whole blocks).
    pub fn row_stride_bytes(self, cols: usize) -> usize {
        match self.format() {
            None => 4 * cols,
            Some(f) => f.row_stride_bytes(cols),
        }
    }

    /// Elements per scale block along K (FP4 only).
    pub fn block_size(self) -> Option<usize> {
        self.format().and_then(Format::block_size)
    }

    /// Scale entries per row: fp8 one FP32, FP4 one byte per block, none otherwise.
    pub fn blocks_per_row(self, cols: usize) -> usize {
        self.format().map_or(0, |f| f.blocks_per_row(cols))
    }

    /// Weight elements per code byte, as (numerator, denominator).
    pub fn elements_per_byte(self) -> (usize, usize) {
        match self {
            WeightFormat::F32 => (1, 4),
            WeightFormat::Fp16 => (1, 2),
            WeightFormat::Fp8 => (1, 1),
            WeightFormat::Nvfp4 | WeightFormat::Mxfp4 => (2, 1),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The specialisation of a linear kernel: `y[m, n] (+)= x[m, k] W[n, k]^T (+ b)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinearShape {
    pub format: WeightFormat,
    /// Output features (rows of W).
    pub n: usize,
    /// Input features (columns of W).
    pub k: usize,
    pub bias: bool,
    /// The epilogue adds into `y` (fused residual add) instead of overwriting it.
    pub accumulate: bool,
    /// Element type of `x` and `y`.
    #[serde(default)]
    pub act: ActDtype,
    /// W8A8: FP8 weights times FP8 activations quantized per token (row) on the fly, the
    /// CPU reference's dynamic quantizer (`Format::Fp8.fake_quantize_activations`). The
    /// kernel reads `x` as E4M3 codes with one FP32 scale per row (the schedule's
    /// [`Param::XCodes`](super::Param::XCodes) and `XScales`, written by the step before it)
    /// instead of activations.
    #[serde(default, skip_serializing_if = "is_false")]
    pub w8a8: bool,
}

impl LinearShape {
    /// The tensor-core MMA type of this layer's prefill GEMM (`"bf16"` or `"f16"`), or `None`
    /// for the FP32 SIMT GEMM. The MMA path needs 16-bit activations and weights whose decoded
    /// values are exact in the activation type, so that the product is the CPU reference's
    /// FP32 product of the same values: BF16 with FP8, NVFP4 and MXFP4 weights (E4M3 values,
    /// E2M1 times an E4M3 or power-of-two block scale); FP16 with FP16, FP8 and NVFP4 weights
    /// (an E8M0 scale can leave FP16's range). Every target fpx compiles for (sm_80 and newer)
    /// has the m16n8k16 MMA.
    ///
    /// A W8A8 GEMM multiplies E4M3 codes by E4M3 codes (`"e4m3"`, m16n8k32) on chips with the
    /// FP8 MMA ([`Arch::has_fp8_mma`](super::Arch::has_fp8_mma)); `arch` decides only that.
    pub fn gemm_mma(self, arch: super::Arch) -> Option<&'static str> {
        use WeightFormat::{Fp16, Fp8, Mxfp4, Nvfp4};
        if self.w8a8 {
            return arch.has_fp8_mma().then_some("e4m3");
        }
        match (self.act, self.format) {
            (ActDtype::Bf16, Fp8 | Nvfp4 | Mxfp4) => Some("bf16"),
            (ActDtype::F16, Fp16 | Fp8 | Nvfp4) => Some("f16"),
            _ => None,
        }
    }

    /// The kernel and entry point that run this layer on `rows` activation rows: the `_m1`
    /// GEMV for one row, `_m8` for up to [`GEMV_MAX_ROWS`], else the GEMM.
    pub fn kernel_for_rows(self, rows: usize) -> (KernelSpec, String) {
        if rows <= GEMV_MAX_ROWS {
            let spec = KernelSpec::Gemv(self);
            let tile = if rows == 1 { 1 } else { GEMV_MAX_ROWS };
            (spec, format!("{}_m{tile}", spec.name()))
        } else {
            let spec = KernelSpec::Gemm(self);
            (spec, spec.name())
        }
    }

    fn suffix(&self) -> String {
        let mut s = format!("{}_{}x{}", self.format, self.n, self.k);
        if self.bias {
            s.push_str("_bias");
        }
        if self.accumulate {
            s.push_str("_acc");
        }
        if self.w8a8 {
            s.push_str("_w8a8");
        }
        s.push_str(&act_suffix(self.act));
        s
    }
}

/// One kernel specialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum KernelSpec {
    /// Decode linear (GEMV) for 1..=8 activation rows; entry points `<name>_m1`, `<name>_m8`.
    Gemv(LinearShape),
    /// Tiled linear (GEMM) for prefill, any number of rows.
    Gemm(LinearShape),
    /// Gathers rows of the embedding table (stored in the activation type) by token id.
    Embedding {
        vocab: usize,
        hidden: usize,
        #[serde(default)]
        act: ActDtype,
    },
    /// `x * rsqrt(mean(x^2) + eps) * w` per row; `quant`: each output row (as stored) also
    /// quantized to FP8 E4M3 codes with its per-row scale, the input of W8A8 linears.
    RmsNorm {
        dim: usize,
        #[serde(default)]
        act: ActDtype,
        #[serde(default, skip_serializing_if = "is_false")]
        quant: bool,
    },
    /// Per-row dynamic FP8 quantization of `dim`-wide activation rows (scale = the row's finite
    /// amax / 448, codes `e4m3(x / scale)`): the input of W8A8 linears whose source no fused
    /// producer quantizes.
    QuantFp8 {
        dim: usize,
        #[serde(default)]
        act: ActDtype,
    },
    /// Rotary embedding of q in place, and of k into the KV cache (v copied alongside);
    /// `qk_norm`: each head of q and k RMS-normalised first (Qwen3).
    RopeKv {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        #[serde(default)]
        act: ActDtype,
        #[serde(default, skip_serializing_if = "is_false")]
        qk_norm: bool,
    },
    /// Causal grouped-query attention of new query rows over the KV cache; `window`: over
    /// the last `window` positions only (sliding-window attention).
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        #[serde(default)]
        act: ActDtype,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<usize>,
    },
    /// `gate = silu(gate) * up`, elementwise over rows of `dim`; `quant`: one block per row,
    /// which also quantizes the stored row to FP8 codes and its scale (the W8A8 down
    /// projection's input, as [`KernelSpec::RmsNorm`]'s `quant`).
    SiluMul {
        dim: usize,
        #[serde(default)]
        act: ActDtype,
        #[serde(default, skip_serializing_if = "is_false")]
        quant: bool,
    },
    /// The routing of a mixture-of-experts block ([`super::moe`]): per row, the softmax of
    /// `x R^T` over `experts` (FP32 router weights `[experts, hidden]`), the `top_k` largest
    /// probabilities (the lower expert first on ties), divided by their sum with `norm_top_k`;
    /// writes each row's experts and weights, best first.
    MoeRoute {
        experts: usize,
        hidden: usize,
        top_k: usize,
        norm_top_k: bool,
        #[serde(default)]
        act: ActDtype,
    },
    /// One projection of every expert of a MoE block in one launch (a grouped GEMV): the
    /// experts' weights stacked expert after expert, one block column per expert, each
    /// streaming its weights once for every pair (row, slot) routed to it. Pair `p` reads
    /// source row `p / top_k` with `gather` (the block's input) and row `p` without (the
    /// previous projection's pair rows), and writes pair row `p`.
    ExpertGemv {
        shape: LinearShape,
        experts: usize,
        top_k: usize,
        gather: bool,
    },
    /// `x[t] += sum of w[t, j] * y[t * top_k + j]` over a row's `top_k` pairs, in ascending
    /// expert order, rounded once (a MoE block's weighted combine and residual add).
    MoeCombine {
        hidden: usize,
        top_k: usize,
        #[serde(default)]
        act: ActDtype,
    },
    /// Index of the largest logit (the first one on ties).
    Argmax {
        vocab: usize,
        #[serde(default)]
        act: ActDtype,
    },
}

impl KernelSpec {
    /// Stable, unique name: the `.cu` file stem and the entry-point prefix.
    pub fn name(&self) -> String {
        let base = match self {
            KernelSpec::Gemv(s) => return format!("gemv_{}", s.suffix()),
            KernelSpec::Gemm(s) => return format!("gemm_{}", s.suffix()),
            KernelSpec::Embedding { vocab, hidden, .. } => format!("embedding_{vocab}x{hidden}"),
            KernelSpec::RmsNorm { dim, quant, .. } => {
                format!("rmsnorm_{dim}{}", if *quant { "_qfp8" } else { "" })
            }
            KernelSpec::QuantFp8 { dim, .. } => format!("quant_fp8_{dim}"),
            KernelSpec::RopeKv {
                heads,
                kv_heads,
                head_dim,
                qk_norm,
                ..
            } => {
                let norm = if *qk_norm { "_qknorm" } else { "" };
                format!("rope_kv_h{heads}_kv{kv_heads}_d{head_dim}{norm}")
            }
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                window,
                ..
            } => {
                let w = window.map_or(String::new(), |w| format!("_w{w}"));
                format!("attention_h{heads}_kv{kv_heads}_d{head_dim}{w}")
            }
            KernelSpec::SiluMul { dim, quant, .. } => {
                format!("silu_mul_{dim}{}", if *quant { "_qfp8" } else { "" })
            }
            KernelSpec::MoeRoute {
                experts,
                hidden,
                top_k,
                norm_top_k,
                ..
            } => {
                let norm = if *norm_top_k { "_norm" } else { "" };
                format!("moe_route_e{experts}_top{top_k}_{hidden}{norm}")
            }
            KernelSpec::ExpertGemv {
                shape,
                experts,
                top_k,
                gather,
            } => {
                let g = if *gather { "_gather" } else { "" };
                return format!("expert_gemv_{}_e{experts}_top{top_k}{g}", shape.suffix());
            }
            KernelSpec::MoeCombine { hidden, top_k, .. } => {
                format!("moe_combine_top{top_k}_{hidden}")
            }
            KernelSpec::Argmax { vocab, .. } => format!("argmax_{vocab}"),
        };
        base + &act_suffix(self.act())
    }

    /// The element type of the activation buffers (and KV cache) the kernel reads and writes.
    pub fn act(&self) -> ActDtype {
        match *self {
            KernelSpec::Gemv(s) | KernelSpec::Gemm(s) | KernelSpec::ExpertGemv { shape: s, .. } => {
                s.act
            }
            KernelSpec::Embedding { act, .. }
            | KernelSpec::RmsNorm { act, .. }
            | KernelSpec::QuantFp8 { act, .. }
            | KernelSpec::RopeKv { act, .. }
            | KernelSpec::Attention { act, .. }
            | KernelSpec::SiluMul { act, .. }
            | KernelSpec::MoeRoute { act, .. }
            | KernelSpec::MoeCombine { act, .. }
            | KernelSpec::Argmax { act, .. } => act,
        }
    }

    /// The op family: also the template file `templates/<family>.cu.tera`.
    pub fn family(&self) -> &'static str {
        match self {
            KernelSpec::Gemv(_) => "gemv",
            KernelSpec::Gemm(_) => "gemm",
            KernelSpec::Embedding { .. } => "embedding",
            KernelSpec::RmsNorm { .. } => "rmsnorm",
            KernelSpec::QuantFp8 { .. } => "quant_fp8",
            KernelSpec::RopeKv { .. } => "rope_kv",
            KernelSpec::Attention { .. } => "attention",
            KernelSpec::SiluMul { .. } => "silu_mul",
            KernelSpec::MoeRoute { .. } => "moe_route",
            KernelSpec::ExpertGemv { .. } => "expert_gemv",
            KernelSpec::MoeCombine { .. } => "moe_combine",
            KernelSpec::Argmax { .. } => "argmax",
        }
    }

    /// The template the kernel is rendered from, `templates/<template>.cu.tera`: its family's,
    /// except that the grouped expert GEMV is the GEMV template in its grouped mode (one
    /// decode loop for both).
    pub fn template(&self) -> &'static str {
        match self {
            KernelSpec::ExpertGemv { .. } => "gemv",
            _ => self.family(),
        }
    }

    /// The `extern "C"` entry points of the kernel's module.
    pub fn entry_points(&self) -> Vec<String> {
        let name = self.name();
        match self {
            KernelSpec::Gemv(_) => GEMV_ROW_TILES
                .iter()
                .map(|m| format!("{name}_m{m}"))
                .collect(),
            _ => vec![name],
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The name suffix of a kernel on `act` activations (none for FP32, so FP32 names stay as
/// they were).
fn act_suffix(act: ActDtype) -> String {
    match act {
        ActDtype::F32 => String::new(),
        a => format!("_a{a}"),
    }
}

/// Activation rows the GEMV entry points are compiled for: `_m1` (decode) and `_m8` (any
/// 1..=8 rows; prefill of short prompts). More rows use the GEMM.
pub const GEMV_ROW_TILES: [usize; 2] = [1, 8];

/// The largest number of activation rows a GEMV handles.
pub const GEMV_MAX_ROWS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_per_spec() {
        let mut specs = Vec::new();
        for format in WeightFormat::ALL {
            for (bias, accumulate) in [(false, false), (true, false), (false, true)] {
                let s = LinearShape {
                    format,
                    n: 64,
                    k: 96,
                    bias,
                    accumulate,
                    act: ActDtype::F32,
                    w8a8: false,
                };
                specs.push(KernelSpec::Gemv(s));
                specs.push(KernelSpec::Gemm(s));
                let s16 = LinearShape {
                    act: ActDtype::Bf16,
                    ..s
                };
                specs.push(KernelSpec::Gemv(s16));
            }
        }
        let fp8 = |w8a8| LinearShape {
            format: WeightFormat::Fp8,
            n: 64,
            k: 96,
            bias: false,
            accumulate: false,
            act: ActDtype::Bf16,
            w8a8,
        };
        specs.push(KernelSpec::Gemm(fp8(true)));
        for act in ActDtype::ALL {
            specs.push(KernelSpec::SiluMul {
                dim: 64,
                act,
                quant: false,
            });
            specs.push(KernelSpec::QuantFp8 { dim: 64, act });
            for quant in [false, true] {
                specs.push(KernelSpec::RmsNorm {
                    dim: 64,
                    act,
                    quant,
                });
            }
        }
        let names: std::collections::BTreeSet<String> = specs.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), specs.len());
        assert_eq!(specs[3].name(), "gemv_f32_64x96_bias");
        assert_eq!(specs[5].name(), "gemv_f32_64x96_bias_abf16");
        assert!(specs
            .iter()
            .any(|s| s.name() == "gemm_fp8_64x96_w8a8_abf16"));
    }

    #[test]
    fn weight_format_layout_matches_formats() {
        for f in Format::ALL {
            let w = WeightFormat::of(Some(f));
            assert_eq!(w.format(), Some(f));
            assert_eq!(w.row_stride_bytes(100), f.row_stride_bytes(100));
        }
        assert_eq!(WeightFormat::F32.row_stride_bytes(10), 40);
        assert_eq!(WeightFormat::of(None), WeightFormat::F32);
    }
}
