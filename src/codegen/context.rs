//! Template contexts: every number a kernel template prints (tile sizes, vector widths, lanes
//! per row, scale-block geometry, launch dimensions) is computed here, in Rust, from a
//! [`KernelSpec`] and an [`Arch`]. Templates only print these fields and choose between code
//! paths by them; the cuda backend takes launch dimensions from the same structs
//! ([`KernelContext::launch`]), so the kernel and its launch cannot disagree.

use serde::Serialize;

use crate::lower::{split_kv, ActDtype, Arch};
use crate::lower::{KernelSpec, LinearShape, WeightFormat, GEMV_MAX_ROWS, GEMV_ROW_TILES};

/// Threads per block of the GEMV kernels (4 warps).
pub const GEMV_WARPS: usize = 4;
/// GEMM tile: rows of x, rows of W, depth, per-thread outputs; 256 threads.
pub const GEMM_TILE: (usize, usize, usize) = (64, 64, 32);
pub const GEMM_THREADS: usize = 256;
/// Threads of a block of the tensor-core prefill GEMM (4 warps).
pub const GEMM_MMA_THREADS: usize = 128;
/// Blocks of the SIMT GEMM that must fit on one SM at once (`__launch_bounds__` minimum): 3, a
/// register budget of 80 per thread (24 warps per SM). Without it ptxas 12.9 aims at 64
/// registers and, for some formats and shapes, spills two or three values out of the K loop.
/// On Ampere (sm_80/sm_86) 80 is not enough for the FP8 GEMM (28 bytes spilled), so those
/// targets get 2 (128 registers, 16 warps). tests/sass.rs checks that no kernel spills.
pub fn gemm_min_blocks_per_sm(arch: Arch) -> usize {
    match arch {
        Arch::Sm80 | Arch::Sm86 => 2,
        _ => 3,
    }
}
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

/// Decode GEMV: each row of W is read by a group of `lanes` lanes with `vec_bytes` loads.
#[derive(Debug, Clone, Serialize)]
pub struct GemvCtx {
    #[serde(flatten)]
    pub common: Common,
    pub format: WeightFormat,
    pub n: usize,
    pub k: usize,
    pub bias: bool,
    pub accumulate: bool,
    /// Bytes of codes per row.
    pub row_bytes: usize,
    /// Bytes per weight load: the largest power of two <= 16 dividing `row_bytes`.
    pub vec_bytes: usize,
    /// 32-bit words per load (1 for loads under 4 bytes).
    pub words: usize,
    /// Weight elements per load.
    pub epv: usize,
    /// Loads per row.
    pub row_vecs: usize,
    /// Lanes that share one row (a power of two <= 32) and rows per warp.
    pub lanes: usize,
    pub rows_per_warp: usize,
    pub warps: usize,
    pub rows_per_block: usize,
    pub threads: usize,
    /// Scale block along K (0: none), blocks per row, and the elements of one load that share
    /// a scale (`sub`), `segs = epv / sub` of them per load.
    pub block: usize,
    pub blocks_per_row: usize,
    pub sub: usize,
    pub segs: usize,
    /// Activations per load (divides `sub`; 1 when the row has a padded tail).
    pub xv: usize,
    /// The last load of a row extends past K into the zero padding of the last FP4 block.
    pub tail: bool,
    /// FP8 decode of whole 4-byte words: "cvt" (conversion instruction, sm_89+, exact values)
    /// or "scaled" (sm_80/sm_86: bit manipulation to f16x2, values times 2^-8); `fp8_unit` is
    /// the factor that undoes it on the row's sum, as a CUDA float literal (1 when loads are
    /// narrower than a word and bytes are decoded one by one, exactly).
    pub fp8_decode: &'static str,
    pub fp8_unit: &'static str,
    /// FP4 decode: "native" (sm_100a/sm_120a conversion, exact values) or "scaled" (register
    /// decode to values times 2^-14); `fp4_unit` is the factor that undoes it in the block
    /// scale, as a CUDA float literal.
    pub fp4_decode: &'static str,
    pub fp4_unit: &'static str,
    /// Row tiles the entry points are compiled for.
    pub row_tiles: Vec<usize>,
    /// The grouped expert GEMV ([`KernelSpec::ExpertGemv`]): one block column per expert
    /// (`experts` of them, weights stacked), over the pairs routed to it, [`GEMV_MAX_ROWS`]
    /// at a time; `top_k` pairs per token; `gather`: pair `p` reads row `p / top_k`.
    pub grouped: bool,
    pub experts: usize,
    pub top_k: usize,
    pub gather: bool,
    /// W8A8 ([`LinearShape::w8a8`]): x is read as E4M3 codes with a scale per row.
    pub w8a8: bool,
}

/// Prefill GEMM: `bm x bn` output tiles, `bk` deep, `tm x tn` outputs per thread.
#[derive(Debug, Clone, Serialize)]
pub struct GemmCtx {
    #[serde(flatten)]
    pub common: Common,
    pub format: WeightFormat,
    pub n: usize,
    pub k: usize,
    pub bias: bool,
    pub accumulate: bool,
    pub row_bytes: usize,
    pub block: usize,
    pub blocks_per_row: usize,
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub tm: usize,
    pub tn: usize,
    pub threads: usize,
    /// [`gemm_min_blocks_per_sm`].
    pub min_blocks: usize,
    /// The tensor-core MMA type (`bf16`, `f16`, `e4m3`; [`LinearShape::gemm_mma`]), or empty
    /// for the FP32 SIMT GEMM.
    pub mma: &'static str,
    /// Dynamic shared memory per block (the MMA path's two tiles; 0 for SIMT).
    pub shared_bytes: usize,
    /// W8A8 ([`LinearShape::w8a8`]): x is read as E4M3 codes with a scale per row.
    pub w8a8: bool,
    /// Threads along the output columns of a tile (`bn / tn`).
    pub tx: usize,
    /// Elements of each of the x and W tiles a thread loads per K step.
    pub loads: usize,
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

/// Largest power of two <= `cap` that divides `v` (`v > 0`).
fn pow2_divisor(v: usize, cap: usize) -> usize {
    let mut p = 1;
    while p * 2 <= cap && v.is_multiple_of(p * 2) {
        p *= 2;
    }
    p
}

/// Largest power of two <= `v` (`v > 0`).
fn pow2_floor(v: usize) -> usize {
    1 << (usize::BITS - 1 - v.max(1).leading_zeros())
}

fn gemv(common: Common, s: LinearShape, arch: Arch) -> GemvCtx {
    let row_bytes = s.format.row_stride_bytes(s.k).max(1);
    let vec_bytes = pow2_divisor(row_bytes, 16);
    let (num, den) = s.format.elements_per_byte();
    let epv = (vec_bytes * num / den).max(1);
    let row_vecs = row_bytes / vec_bytes;
    let lanes = pow2_floor(row_vecs).min(32);
    let rows_per_warp = 32 / lanes;
    let block = s.format.block_size().unwrap_or(0);
    let sub = if block > 0 { epv.min(block) } else { epv };
    let tail = row_vecs * epv != s.k;
    // 16-bit activations under FP4 block scales: two per (32-bit) load. With four per 64-bit
    // load ptxas 12.9 spills the 8-row entry point on sm_90 (32 bytes; tests/sass.rs).
    let xv_cap = if s.act != ActDtype::F32 && block > 0 {
        2
    } else {
        4
    };
    let xv = if tail {
        1
    } else {
        pow2_divisor(s.k, 4).min(pow2_divisor(sub, 4)).min(xv_cap)
    };
    GemvCtx {
        common,
        format: s.format,
        n: s.n,
        k: s.k,
        bias: s.bias,
        accumulate: s.accumulate,
        row_bytes,
        vec_bytes,
        words: (vec_bytes / 4).max(1),
        epv,
        row_vecs,
        lanes,
        rows_per_warp,
        warps: GEMV_WARPS,
        rows_per_block: GEMV_WARPS * rows_per_warp,
        threads: GEMV_WARPS * 32,
        block,
        blocks_per_row: s.format.blocks_per_row(s.k),
        sub,
        segs: epv / sub,
        xv,
        tail,
        fp8_decode: if arch.has_fp8_cvt() { "cvt" } else { "scaled" },
        fp8_unit: if arch.has_fp8_cvt() || vec_bytes < 4 {
            "1.f"
        } else {
            "256.f"
        },
        fp4_decode: if arch.has_fp4_cvt() {
            "native"
        } else {
            "scaled"
        },
        fp4_unit: if arch.has_fp4_cvt() { "1.f" } else { "16384.f" },
        row_tiles: GEMV_ROW_TILES.to_vec(),
        grouped: false,
        experts: 0,
        top_k: 0,
        gather: false,
        w8a8: s.w8a8,
    }
}

fn gemm(common: Common, s: LinearShape, arch: Arch) -> GemmCtx {
    let (bm, bn, bk) = GEMM_TILE;
    let (tm, tn) = (4, 4);
    let mma = s.gemm_mma(arch);
    // The MMA path: 4 warps, each a 32 x 32 warp tile; x and W tile rows of 64 bytes (`bk`
    // 16-bit elements, or twice as many E4M3 codes) plus 16 (80 bytes: rows stay 16-byte
    // aligned for ldmatrix and fall in distinct bank groups).
    let (threads, bk) = match mma {
        Some("e4m3") => (GEMM_MMA_THREADS, 2 * bk),
        Some(_) => (GEMM_MMA_THREADS, bk),
        None => (GEMM_THREADS, bk),
    };
    let tile_bytes = if s.w8a8 { 1 } else { s.act.bytes() };
    GemmCtx {
        mma: mma.unwrap_or(""),
        shared_bytes: mma.map_or(0, |_| (bm + bn) * (bk * tile_bytes + 16)),
        w8a8: s.w8a8,
        common,
        format: s.format,
        n: s.n,
        k: s.k,
        bias: s.bias,
        accumulate: s.accumulate,
        row_bytes: s.format.row_stride_bytes(s.k),
        block: s.format.block_size().unwrap_or(0),
        blocks_per_row: s.format.blocks_per_row(s.k),
        bm,
        bn,
        bk,
        tm,
        tn,
        threads,
        min_blocks: gemm_min_blocks_per_sm(arch),
        tx: bn / tn,
        loads: bm * bk / threads,
    }
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

    fn ctx(format: WeightFormat, n: usize, k: usize) -> GemvCtx {
        let spec = KernelSpec::Gemv(LinearShape {
            format,
            n,
            k,
            bias: false,
            accumulate: false,
            act: ActDtype::F32,
            w8a8: false,
        });
        match KernelContext::new(&spec, Arch::Sm90) {
            KernelContext::Gemv(c) => c,
            _ => unreachable!("a GEMV spec gives a GEMV context"),
        }
    }

    #[test]
    fn gemv_geometry_for_aligned_and_ragged_rows() {
        let c = ctx(WeightFormat::Fp8, 4096, 4096);
        assert_eq!((c.vec_bytes, c.epv, c.row_vecs, c.lanes), (16, 16, 256, 32));
        assert_eq!((c.xv, c.tail), (4, false));
        let c = ctx(WeightFormat::Nvfp4, 576, 576);
        assert_eq!((c.vec_bytes, c.epv, c.row_vecs, c.lanes), (16, 32, 18, 16));
        assert_eq!((c.block, c.sub, c.segs, c.rows_per_warp), (16, 16, 2, 2));
        let c = ctx(WeightFormat::Mxfp4, 8, 40);
        // 2 blocks of 32 = 32 bytes per row; elements 40..64 are padding.
        assert_eq!(
            (c.vec_bytes, c.epv, c.row_vecs, c.tail, c.xv),
            (16, 32, 2, true, 1)
        );
        let c = ctx(WeightFormat::Fp8, 8, 10);
        assert_eq!(
            (c.vec_bytes, c.epv, c.words, c.xv, c.tail),
            (2, 2, 1, 2, false)
        );
        let c = ctx(WeightFormat::F32, 8, 6);
        assert_eq!((c.vec_bytes, c.epv, c.row_vecs, c.xv), (8, 2, 3, 2));
    }

    #[test]
    fn literal_is_exact() {
        assert_eq!(
            f32_literal(0.125),
            "__uint_as_float(0x3e000000u) /* 1.25e-1 */"
        );
    }
}
