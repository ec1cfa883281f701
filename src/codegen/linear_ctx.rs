//! Template contexts of the linear kernels: the decode GEMV's geometry (vector width, lanes
//! and rows per warp, scale-block segments, row tiles) and the prefill GEMM's (tiles, threads,
//! instruction path, shared memory), computed from a [`LinearShape`] and an [`Arch`].
//! [`super::context::KernelContext`] wraps them with the other kernels' contexts.

use serde::Serialize;

use crate::lower::{ActDtype, Arch, LinearShape, WeightFormat, GEMV_ROW_TILES};

use super::context::Common;

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

pub(super) fn gemv(common: Common, s: LinearShape, arch: Arch) -> GemvCtx {
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

pub(super) fn gemm(common: Common, s: LinearShape, arch: Arch) -> GemmCtx {
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

#[cfg(test)]
mod tests {
    use super::super::context::KernelContext;
    use super::*;
    use crate::lower::KernelSpec;

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
}
