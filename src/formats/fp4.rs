//! Row-parallel driver shared by the two block-scaled FP4 formats (NVFP4 and MXFP4).
//!
//! A format describes one scale block through [`Fp4Block`]: how its scale byte is chosen from
//! the block's elements, and how elements are encoded to / decoded from E2M1 given that byte.
//! The driver here walks a row-major `rows x cols` matrix row by row (rows in parallel with
//! rayon), splits each row into `ceil(cols / BLOCK)` blocks along K, and writes:
//!
//! * codes: per row `blocks_per_row * BLOCK / 2` bytes, two E2M1 codes per byte with the even
//!   element in the low nibble; the last, partial block of a row gets its scale from the
//!   elements present and is padded with zero codes;
//! * scales: one byte per (row, block), row-major.
//!
//! Quantize, dequantize and fake quantization all go through the same `Fp4Block` value
//! rebuilt from the scale byte, so `dequantize(quantize(w)) == fake_quantize(w)` bit for bit.

use rayon::prelude::*;

use super::e2m1::{pack_block, unpack_nibble};

/// One scale block of a block-scaled FP4 format.
pub(crate) trait Fp4Block: Sized {
    /// Elements per block along K (even).
    const BLOCK: usize;
    /// Per-tensor context (NVFP4: the FP32 global scale; MXFP4: nothing).
    type Ctx: Copy + Send + Sync;

    /// Scale byte for a block holding `xs` (`1 <= xs.len() <= BLOCK`).
    fn scale_byte(xs: &[f32], ctx: Self::Ctx) -> u8;
    /// The block quantizer defined by a stored scale byte.
    fn from_byte(byte: u8, ctx: Self::Ctx) -> Self;
    /// E2M1 code of one element.
    fn encode(&self, x: f32) -> u8;
    /// Value of one E2M1 code.
    fn decode(&self, code: u8) -> f32;
    /// `decode(encode(x))`; formats override it with a table-free form that vectorizes.
    #[inline]
    fn round(&self, x: f32) -> f32 {
        self.decode(self.encode(x))
    }
}

/// Scale blocks per row.
pub(crate) fn blocks_per_row(cols: usize, block: usize) -> usize {
    cols.div_ceil(block)
}

/// Bytes of packed codes per row.
pub(crate) fn row_stride_bytes(cols: usize, block: usize) -> usize {
    blocks_per_row(cols, block) * block / 2
}

/// Quantize a row-major matrix: returns (packed codes, scale bytes).
pub(crate) fn quantize<B: Fp4Block>(
    w: &[f32],
    rows: usize,
    cols: usize,
    ctx: B::Ctx,
) -> (Vec<u8>, Vec<u8>) {
    let bpr = blocks_per_row(cols, B::BLOCK);
    let stride = row_stride_bytes(cols, B::BLOCK);
    let mut codes = vec![0u8; rows * stride];
    let mut scales = vec![0u8; rows * bpr];
    if rows == 0 || cols == 0 {
        return (codes, scales);
    }
    w.par_chunks(cols)
        .zip(codes.par_chunks_mut(stride))
        .zip(scales.par_chunks_mut(bpr))
        .for_each(|((row, row_codes), row_scales)| {
            let blocks = row.chunks(B::BLOCK);
            let code_blocks = row_codes.chunks_mut(B::BLOCK / 2);
            for ((xs, out), s) in blocks.zip(code_blocks).zip(row_scales.iter_mut()) {
                *s = B::scale_byte(xs, ctx);
                let q = B::from_byte(*s, ctx);
                pack_block(xs, out, |x| q.encode(x));
            }
        });
    (codes, scales)
}

/// Dequantize packed codes and scale bytes back to a row-major `rows x cols` matrix.
pub(crate) fn dequantize<B: Fp4Block>(
    codes: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
    ctx: B::Ctx,
) -> Vec<f32> {
    let bpr = blocks_per_row(cols, B::BLOCK);
    let stride = row_stride_bytes(cols, B::BLOCK);
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols)
        .zip(codes.par_chunks(stride))
        .zip(scales.par_chunks(bpr))
        .for_each(|((row, row_codes), row_scales)| {
            let blocks = row.chunks_mut(B::BLOCK);
            let code_blocks = row_codes.chunks(B::BLOCK / 2);
            for ((xs, packed), &s) in blocks.zip(code_blocks).zip(row_scales) {
                let q = B::from_byte(s, ctx);
                for (i, x) in xs.iter_mut().enumerate() {
                    *x = q.decode(unpack_nibble(packed, i));
                }
            }
        });
    out
}

/// Quantize then dequantize a row-major matrix in place.
pub(crate) fn fake_quantize<B: Fp4Block>(x: &mut [f32], cols: usize, ctx: B::Ctx) {
    if cols == 0 {
        return;
    }
    x.par_chunks_mut(cols).for_each(|row| {
        for xs in row.chunks_mut(B::BLOCK) {
            let q = B::from_byte(B::scale_byte(xs, ctx), ctx);
            for x in xs.iter_mut() {
                *x = q.round(*x);
            }
        }
    });
}

/// Encode a matrix with given scale bytes (test helper: re-encoding dequantized values).
#[cfg(test)]
pub(crate) fn quantize_with_bytes<B: Fp4Block>(
    w: &[f32],
    rows: usize,
    cols: usize,
    ctx: B::Ctx,
    scales: &[u8],
) -> Vec<u8> {
    let bpr = blocks_per_row(cols, B::BLOCK);
    let stride = row_stride_bytes(cols, B::BLOCK);
    let mut codes = vec![0u8; rows * stride];
    for ((row, row_codes), row_scales) in w
        .chunks(cols)
        .zip(codes.chunks_mut(stride))
        .zip(scales.chunks(bpr))
    {
        let blocks = row.chunks(B::BLOCK).zip(row_codes.chunks_mut(B::BLOCK / 2));
        for ((xs, out), &s) in blocks.zip(row_scales) {
            let q = B::from_byte(s, ctx);
            pack_block(xs, out, |x| q.encode(x));
        }
    }
    codes
}
