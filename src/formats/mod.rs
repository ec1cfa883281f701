//! Number formats: FP16, FP8 E4M3 (per-row scale), NVFP4 and MXFP4, and their quantizers.
//!
//! The byte layout of a [`QuantizedMatrix`] is a contract with the CUDA kernels (DESIGN.md,
//! "Number formats"). A weight matrix is row-major `rows x cols` = `[N, K]`: each output row is
//! contiguous along K and scales are taken along K.
//!
//! | format | codes (per row)                                   | scales                                      |
//! |--------|---------------------------------------------------|---------------------------------------------|
//! | fp16   | `cols` little-endian IEEE f16 (2 bytes each)      | none                                        |
//! | fp8    | `cols` E4M3 bytes                                 | one FP32 per row, `amax(row)/448`           |
//! | nvfp4  | `ceil(cols/16) * 8` bytes of packed E2M1          | E4M3 byte per (row, 16-block) + FP32 global |
//! | mxfp4  | `ceil(cols/32) * 16` bytes of packed E2M1         | E8M0 byte per (row, 32-block), [`MxScaleRule`] |
//!
//! FP4 packing: two E2M1 codes per byte, the even element in the LOW nibble. When `cols` is
//! not a multiple of the block, the last, partial block of each row gets its own scale,
//! computed over the elements present only, and the packed row is padded with zero codes to
//! a whole number of blocks. Block scales are stored row-major, `blocks_per_row` per row.
//!
//! Special values (details in each submodule): scale maxima (`amax`) ignore NaN and ±inf;
//! ±inf saturates to the largest code times the scale; NaN propagates (FP8: NaN code; FP4:
//! the block's scale byte is the NaN code, so the whole block reads back as NaN). A zero row
//! (FP8) stores scale 0; a zero block stores scale byte 0 (NVFP4 E4M3 0, MXFP4 E8M0 2^-127);
//! both hold zero codes (±0: the sign bit of -0.0 inputs is kept) and dequantize to zeros. FP16 rounds to nearest even via the `half`
//! crate (IEEE: magnitudes beyond 65504 become ±inf).
//!
//! Activations use the same quantizers dynamically, with the token dimension as rows:
//! `fake_quantize_activations(x)` gives exactly `fake_quantize_weights(x)` (FP8 per-token
//! scale; NVFP4 with the tensor scale from this buffer's amax; MXFP4 per 32-block).
//!
//! Submodules: `fp16`, [`fp8`] (E4M3 codec, per-row quantizer), [`e2m1`] (FP4 codec, nibble
//! packing), `fp4` (row-parallel block driver), [`nvfp4`], [`mxfp4`], `quantized`
//! ([`QuantizedMatrix`], dequantization).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod e2m1;
mod fp16;
mod fp4;
pub mod fp8;
pub mod mxfp4;
pub mod nvfp4;
#[cfg(test)]
mod proptests;
mod quantized;
#[cfg(test)]
mod tests;

pub use e2m1::{e2m1_decode, e2m1_encode};
pub use fp8::{e4m3_decode, e4m3_encode};
pub use mxfp4::{e8m0_decode, ScaleRule as MxScaleRule};
pub use quantized::{QuantizedMatrix, Scales};

/// The MXFP4 scale rule this process's quantizers use (0: round, 1: ocp-floor).
static MX_SCALE_RULE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Chooses the MXFP4 scale rule for every later quantization in this process (weights and
/// activations, calibration, evaluation, export). The CLI sets it once from the calibration
/// or plan it works on, which record it; the default is [`MxScaleRule::Round`].
pub fn set_mx_scale_rule(rule: MxScaleRule) {
    let v = match rule {
        MxScaleRule::Round => 0,
        MxScaleRule::OcpFloor => 1,
    };
    MX_SCALE_RULE.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The MXFP4 scale rule in force (see [`set_mx_scale_rule`]).
pub fn mx_scale_rule() -> MxScaleRule {
    match MX_SCALE_RULE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => MxScaleRule::Round,
        _ => MxScaleRule::OcpFloor,
    }
}

use mxfp4::Mxfp4Block;
use nvfp4::Nvfp4Block;

/// Storage format of a linear layer's weights (and optionally its activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Fp16,
    Fp8,
    Nvfp4,
    Mxfp4,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Fp16, Format::Fp8, Format::Nvfp4, Format::Mxfp4];
    pub const QUANTIZED: [Format; 3] = [Format::Fp8, Format::Nvfp4, Format::Mxfp4];

    pub fn name(self) -> &'static str {
        match self {
            Format::Fp16 => "fp16",
            Format::Fp8 => "fp8",
            Format::Nvfp4 => "nvfp4",
            Format::Mxfp4 => "mxfp4",
        }
    }

    /// Elements per scale block along K (fp8: whole row, i.e. None; nvfp4 16; mxfp4 32;
    /// fp16 None).
    pub fn block_size(self) -> Option<usize> {
        match self {
            Format::Fp16 | Format::Fp8 => None,
            Format::Nvfp4 => Some(nvfp4::BLOCK),
            Format::Mxfp4 => Some(mxfp4::BLOCK),
        }
    }

    /// Scales stored per row: fp16 0, fp8 1 (FP32), fp4 one byte per (possibly partial) block.
    pub fn blocks_per_row(self, cols: usize) -> usize {
        match self {
            Format::Fp16 => 0,
            Format::Fp8 => 1,
            Format::Nvfp4 | Format::Mxfp4 => {
                fp4::blocks_per_row(cols, self.block_size().unwrap_or(1))
            }
        }
    }

    /// Bytes of codes per row (FP4 rows are padded to whole blocks).
    pub fn row_stride_bytes(self, cols: usize) -> usize {
        match self {
            Format::Fp16 => 2 * cols,
            Format::Fp8 => cols,
            Format::Nvfp4 | Format::Mxfp4 => {
                fp4::row_stride_bytes(cols, self.block_size().unwrap_or(1))
            }
        }
    }

    /// Bytes to store a rows x cols weight matrix in this format, including all scales
    /// (fp16: 2/elt; fp8: 1/elt + 4 bytes per row scale; nvfp4: packed codes (rows padded to
    /// whole 16-blocks) + 1 byte E4M3 scale per 16-block + 4 bytes tensor scale; mxfp4: codes
    /// padded to 32-blocks + 1 byte E8M0 per 32-block).
    pub fn weight_bytes(self, rows: usize, cols: usize) -> u64 {
        let (r, stride) = (rows as u64, self.row_stride_bytes(cols) as u64);
        let blocks = r * self.blocks_per_row(cols) as u64;
        r * stride
            + match self {
                Format::Fp16 => 0,
                Format::Fp8 => 4 * blocks,
                Format::Nvfp4 => blocks + 4,
                Format::Mxfp4 => blocks,
            }
    }

    /// Quantize then dequantize a row-major rows x cols weight matrix (per-row fp8 scales,
    /// etc.). Equal, bit for bit, to `self.quantize(w, rows, cols).dequantize()`.
    ///
    /// # Panics
    /// If `w.len() != rows * cols`.
    pub fn fake_quantize_weights(self, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        self.fake_quantize_weights_against(w, rows, cols, None)
    }

    /// [`Format::fake_quantize_weights`] with the NVFP4 tensor scale taken from `tensor_amax`
    /// (the largest magnitude of the engine-fused matrix this one is part of:
    /// [`crate::lower::fused`]) instead of this matrix's own; `None`, and other formats, as
    /// `fake_quantize_weights`. Equal to `quantize_against(..).dequantize()`.
    pub fn fake_quantize_weights_against(
        self,
        w: &[f32],
        rows: usize,
        cols: usize,
        tensor_amax: Option<f32>,
    ) -> Vec<f32> {
        check_shape(w.len(), rows, cols);
        let mut out = w.to_vec();
        if let (Format::Nvfp4, Some(amax)) = (self, tensor_amax) {
            if !out.is_empty() {
                fp4::fake_quantize::<Nvfp4Block>(&mut out, cols, nvfp4::global_scale(amax));
            }
        } else {
            self.fake_quantize_in_place(&mut out, cols);
        }
        out
    }

    /// In-place dynamic activation quantization of a row-major [tokens, cols] matrix:
    /// fp16: round through f16; fp8: per-token (row) scale amax/448; nvfp4: per-16 block
    /// along cols with E4M3 block scales and a per-tensor FP32 scale computed from this
    /// tensor's amax (dynamic); mxfp4: per-32 E8M0.
    ///
    /// # Panics
    /// If `x.len() != rows * cols`.
    pub fn fake_quantize_activations(self, x: &mut [f32], rows: usize, cols: usize) {
        check_shape(x.len(), rows, cols);
        self.fake_quantize_in_place(x, cols);
    }

    /// Real quantization to the byte layout the kernels read (see the module doc).
    ///
    /// # Panics
    /// If `w.len() != rows * cols`.
    pub fn quantize(self, w: &[f32], rows: usize, cols: usize) -> QuantizedMatrix {
        self.quantize_against(w, rows, cols, None)
    }

    /// [`Format::quantize`] with the NVFP4 tensor scale from `tensor_amax` (see
    /// [`Format::fake_quantize_weights_against`]).
    ///
    /// # Panics
    /// If `w.len() != rows * cols`.
    pub fn quantize_against(
        self,
        w: &[f32],
        rows: usize,
        cols: usize,
        tensor_amax: Option<f32>,
    ) -> QuantizedMatrix {
        check_shape(w.len(), rows, cols);
        let (codes, scales) = match self {
            Format::Fp16 => (fp16::encode(w), Scales::None),
            Format::Fp8 => {
                let (codes, scales) = fp8::quantize_rows(w, rows, cols);
                (codes, Scales::Row(scales))
            }
            Format::Nvfp4 => {
                let global =
                    tensor_amax.map_or_else(|| nvfp4::global_scale_of(w), nvfp4::global_scale);
                let (codes, block) = fp4::quantize::<Nvfp4Block>(w, rows, cols, global);
                (codes, Scales::Nvfp4 { block, global })
            }
            Format::Mxfp4 => {
                let (codes, block) = fp4::quantize::<Mxfp4Block>(w, rows, cols, mx_scale_rule());
                (codes, Scales::Mxfp4 { block })
            }
        };
        QuantizedMatrix {
            format: self,
            rows,
            cols,
            codes,
            scales,
        }
    }

    fn fake_quantize_in_place(self, x: &mut [f32], cols: usize) {
        if x.is_empty() {
            return;
        }
        match self {
            Format::Fp16 => x.par_chunks_mut(1 << 14).for_each(fp16::round_through_f16),
            Format::Fp8 => x.par_chunks_mut(cols).for_each(fp8::fake_quantize_row),
            Format::Nvfp4 => {
                let global = nvfp4::global_scale_of(x);
                fp4::fake_quantize::<Nvfp4Block>(x, cols, global);
            }
            Format::Mxfp4 => fp4::fake_quantize::<Mxfp4Block>(x, cols, mx_scale_rule()),
        }
    }
}

fn check_shape(len: usize, rows: usize, cols: usize) {
    assert_eq!(
        Some(len),
        rows.checked_mul(cols),
        "matrix buffer has {len} elements, expected {rows} x {cols}"
    );
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Format::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::UnknownFormat {
                name: s.to_string(),
            })
    }
}
