//! Template contexts: every number a kernel template prints (tile sizes, vector widths, lanes
//! per row, scale-block geometry, launch dimensions) is computed here, in Rust, from a
//! [`KernelSpec`] and an [`Arch`] (the GEMV's and GEMM's geometry in [`super::linear_ctx`]). Templates only print these fields and choose between code
//! paths by them; the cuda backend takes launch dimensions from the same structs
//! ([`KernelContext::launch`]), so the kernel and its launch cannot disagree.

use serde::Serialize;

use crate::lower::{split_kv, ActDtype, Arch, KernelSpec, GEMV_MAX_ROWS};

use super::linear_ctx::{gemm, gemv};
use super::linear_ctx::{GemmCtx, GemvCtx};

/// Threads of the row-wise kernels (RMSNorm, embedding) and of attention.
pub const ROW_THREADS: usize = 256;
pub const ATTENTION_THREADS: usize = 128;
pub const ARGMAX_THREADS: usize = 1024;
pub const ELEMENTWISE_THREADS: usize = 256;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Launch {
    fn new(grid: (usize, usize), block: usize, shared_bytes: usize) -> Launch {
        let c = |v: usize| u32::try_from(v.max(1)).unwrap_or(u32::MAX);
        Launch {
            grid: (c(grid.0), c(grid.1), 1),
            block: (c(block), 1, 1),
            shared_bytes: u32::try_from(shared_bytes).unwrap_or(u32::MAX),
        }
    }
}

/// Fields every template prints in its header.
#[derive(Debug, Clone, Serialize)]
pub struct Common {
    pub name: String,
    pub family: &'static str,
    pub arch: &'static str,
    /// The spec as one line of JSON (printed in the generated file's header comment).
    pub spec: String,
    /// Element type of the activation buffers and KV cache, and its C++ storage type
    /// (`float`, `fpx::bf16`, `fpx::f16` from `kernels/fpx_common.cuh`): templates declare
    /// those pointers as `act_t`, load with `fpx::load_act` and store with `fpx::store_act`.
    pub act: ActDtype,
    pub act_t: &'static str,
}

/// Row-wise and elementwise kernels.
#[derive(Debug, Clone, Serialize)]
pub struct SimpleCtx {
    #[serde(flatten)]
    pub common: Common,
    /// Row length (hidden size / feature count); 0 where not applicable.
    pub dim: usize,
    pub vocab: usize,
    pub threads: usize,
    /// RMSNorm: each output row also quantized to FP8 codes and a row scale.
    pub quant: bool,
}

/// A MoE block's routing and combine kernels: one block per token.
#[derive(Debug, Clone, Serialize)]
pub struct MoeCtx {
    #[serde(flatten)]
    pub common: Common,
    pub hidden: usize,
    /// Routing: experts scored, chosen per token, renormalised.
    pub experts: usize,
    pub top_k: usize,
    pub norm_top_k: bool,
    pub threads: usize,
}

/// RoPE and attention.
#[derive(Debug, Clone, Serialize)]
pub struct HeadsCtx {
    #[serde(flatten)]
    pub common: Common,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub half: usize,
    /// Query heads per KV head.
    pub group: usize,
    pub q_dim: usize,
    pub kv_dim: usize,
    pub threads: usize,
    /// Attention: thread groups splitting the keys in the value product, threads per group.
    pub groups: usize,
    pub dspan: usize,
    /// Attention: `1/sqrt(head_dim)` as a CUDA float literal (the CPU reference's value).
    pub scale: String,
    /// RoPE: each head of q and k RMS-normalised first (the block then has a whole number of
    /// warps, `threads` >= `half`, for the reduction).
    pub qk_norm: bool,
    /// Attention: positions a query sees (its own included); 0: the whole context.
    pub window: usize,
    /// Attention: the split-KV layout ([`split_kv`]): rows that split, splits per row.
    pub split_rows: usize,
    pub max_splits: usize,
}

/// The context of one kernel.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum KernelContext {
    Gemv(GemvCtx),
    Gemm(GemmCtx),
    Simple(SimpleCtx),
    Heads(HeadsCtx),
    Moe(MoeCtx),
}

impl KernelContext {
    /// The context of `spec` compiled for `arch`.
    pub fn new(spec: &KernelSpec, arch: Arch) -> KernelContext {
        let common = Common {
            name: spec.name(),
            family: spec.family(),
            arch: arch.name(),
            spec: serde_json::to_string(spec).unwrap_or_default(),
            act: spec.act(),
            act_t: match spec.act() {
                ActDtype::F32 => "float",
                ActDtype::Bf16 => "fpx::bf16",
                ActDtype::F16 => "fpx::f16",
            },
        };
        let simple_ctx = |dim, vocab, threads| SimpleCtx {
            common: common.clone(),
            dim,
            vocab,
            threads,
            quant: false,
        };
        let simple = |dim, vocab, threads| KernelContext::Simple(simple_ctx(dim, vocab, threads));
        match *spec {
            KernelSpec::Gemv(s) => KernelContext::Gemv(gemv(common, s, arch)),
            KernelSpec::Gemm(s) => KernelContext::Gemm(gemm(common, s, arch)),
            KernelSpec::Embedding { vocab, hidden, .. } => simple(hidden, vocab, ROW_THREADS),
            KernelSpec::RmsNorm { dim, quant, .. } => KernelContext::Simple(SimpleCtx {
                quant,
                ..simple_ctx(dim, 0, ROW_THREADS)
            }),
            KernelSpec::QuantFp8 { dim, .. } => simple(dim, 0, ROW_THREADS),
            // Quantizing: one block of ROW_THREADS per row (the row's amax is a block reduction).
            KernelSpec::SiluMul { dim, quant, .. } => KernelContext::Simple(SimpleCtx {
                quant,
                ..simple_ctx(
                    dim,
                    0,
                    if quant {
                        ROW_THREADS
                    } else {
                        ELEMENTWISE_THREADS
                    },
                )
            }),
            KernelSpec::Argmax { vocab, .. } => simple(0, vocab, ARGMAX_THREADS),
            KernelSpec::ExpertGemv {
                shape,
                experts,
                top_k,
                gather,
            } => KernelContext::Gemv(GemvCtx {
                grouped: true,
                experts,
                top_k,
                gather,
                row_tiles: vec![GEMV_MAX_ROWS],
                ..gemv(common, shape, arch)
            }),
            KernelSpec::MoeRoute {
                experts,
                hidden,
                top_k,
                norm_top_k,
                ..
            } => KernelContext::Moe(MoeCtx {
                common,
                hidden,
                experts,
                top_k,
                norm_top_k,
                threads: ATTENTION_THREADS,
            }),
            KernelSpec::MoeCombine { hidden, top_k, .. } => KernelContext::Moe(MoeCtx {
                common,
                hidden,
                experts: 0,
                top_k,
                norm_top_k: false,
                threads: ROW_THREADS,
            }),
            KernelSpec::RopeKv {
                heads,
                kv_heads,
                head_dim,
                qk_norm,
                ..
            } => {
                let half = (head_dim / 2).max(1);
                let threads = if qk_norm {
                    half.next_multiple_of(32)
                } else {
                    half
                };
                KernelContext::Heads(HeadsCtx {
                    qk_norm,
                    ..heads_ctx(common, (heads, kv_heads, head_dim), threads)
                })
            }
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                window,
                ..
            } => KernelContext::Heads(HeadsCtx {
                window: window.unwrap_or(0),
                ..heads_ctx(common, (heads, kv_heads, head_dim), ATTENTION_THREADS)
            }),
        }
    }

    pub fn common(&self) -> &Common {
        match self {
            KernelContext::Gemv(c) => &c.common,
            KernelContext::Gemm(c) => &c.common,
            KernelContext::Simple(c) => &c.common,
            KernelContext::Heads(c) => &c.common,
            KernelContext::Moe(c) => &c.common,
        }
    }

    /// Launch dimensions for `rows` activation rows (tokens of this pass); `context` is the
    /// number of KV-cache positions attention must be able to hold (its shared memory).
    pub fn launch(&self, rows: usize, context: usize) -> Launch {
        match self {
            KernelContext::Gemv(c) => Launch::new(
                (c.n.div_ceil(c.rows_per_block), c.experts.max(1)),
                c.threads,
                0,
            ),
            KernelContext::Moe(c) => Launch::new((rows, 1), c.threads, 0),
            KernelContext::Gemm(c) => Launch::new(
                (c.n.div_ceil(c.bn), rows.div_ceil(c.bm)),
                c.threads,
                c.shared_bytes,
            ),
            KernelContext::Simple(c) => match c.common.family {
                "silu_mul" if !c.quant => {
                    Launch::new(((rows * c.dim).div_ceil(c.threads), 1), c.threads, 0)
                }
                "argmax" => Launch::new((1, 1), c.threads, 0),
                _ => Launch::new((rows, 1), c.threads, 0),
            },
            KernelContext::Heads(c) => match c.common.family {
                "rope_kv" => Launch::new((rows, c.heads + c.kv_heads), c.threads, 0),
                _ => {
                    let splits = split_kv::splits(rows, context);
                    let shared = 4 * attention_shared_floats(c, context.div_ceil(splits));
                    let mut l = Launch::new((c.heads, rows), c.threads, shared);
                    l.grid.2 = splits as u32; // at most split_kv::MAX_SPLITS
                    l
                }
            },
        }
    }
}

/// Floats of dynamic shared memory of the attention kernel for `context` cache positions (of
/// one split): the query row, the per-group partial outputs, a reduction scratch and the
/// scores.
pub fn attention_shared_floats(c: &HeadsCtx, context: usize) -> usize {
    c.head_dim + c.groups * c.head_dim + 32 + context
}

fn heads_ctx(
    common: Common,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    threads: usize,
) -> HeadsCtx {
    let groups = if head_dim <= threads && threads.is_multiple_of(head_dim) {
        threads / head_dim
    } else {
        1
    };
    let scale = 1.0 / (head_dim as f32).sqrt();
    HeadsCtx {
        common,
        heads,
        kv_heads,
        head_dim,
        half: head_dim / 2,
        group: heads / kv_heads.max(1),
        q_dim: heads * head_dim,
        kv_dim: kv_heads * head_dim,
        threads,
        groups,
        dspan: threads / groups,
        scale: f32_literal(scale),
        qk_norm: false,
        window: 0,
        split_rows: split_kv::SPLIT_ROWS,
        max_splits: split_kv::MAX_SPLITS,
    }
}

/// A CUDA `float` literal that parses back to exactly `v` (hexadecimal float).
pub fn f32_literal(v: f32) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "__uint_as_float(0x7fc00000u)".to_string()
        } else if v > 0.0 {
            "__uint_as_float(0x7f800000u)".to_string()
        } else {
            "__uint_as_float(0xff800000u)".to_string()
        };
    }
    format!("__uint_as_float({:#010x}u) /* {v:e} */", v.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_is_exact() {
        assert_eq!(
            f32_literal(0.125),
            "__uint_as_float(0x3e000000u) /* 1.25e-1 */"
        );
    }
}
