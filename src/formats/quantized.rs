//! [`QuantizedMatrix`]: a weight matrix in the exact byte layout the kernels read, and its
//! dequantization back to FP32.
//!
//! The layout is described in the module doc of `formats`. [`QuantizedMatrix::validate`]
//! checks that the buffer sizes agree with the format and shape (for matrices that come from
//! outside, e.g. a plan file), so that [`QuantizedMatrix::dequantize`] cannot index out of
//! bounds; it returns `Error::InvalidArgument` on a mismatch.

use rayon::prelude::*;

use super::fp16;
use super::fp4;
use super::fp8;
use super::mxfp4::Mxfp4Block;
use super::nvfp4::Nvfp4Block;
use super::Format;
use crate::error::{Error, Result};

/// A quantized row-major `rows x cols` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    /// codes: fp16 = little-endian f16 bytes; fp8 = one E4M3 byte per element, row-major;
    /// fp4 = two E2M1 codes per byte, even element in LOW nibble, each row padded with zero
    /// codes to a whole number of blocks.
    pub codes: Vec<u8>,
    pub scales: Scales,
}

/// The scales of a [`QuantizedMatrix`].
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// fp16: no scales.
    None,
    /// fp8: one FP32 per output row.
    Row(Vec<f32>),
    /// nvfp4: E4M3 byte per (row, block), row-major, plus FP32 tensor scale.
    Nvfp4 { block: Vec<u8>, global: f32 },
    /// mxfp4: E8M0 byte per (row, block), row-major.
    Mxfp4 { block: Vec<u8> },
}

impl Scales {
    /// Bytes these scales occupy in storage.
    pub fn byte_len(&self) -> usize {
        match self {
            Scales::None => 0,
            Scales::Row(s) => 4 * s.len(),
            Scales::Nvfp4 { block, .. } => block.len() + 4,
            Scales::Mxfp4 { block } => block.len(),
        }
    }
}

impl QuantizedMatrix {
    /// Bytes of codes per row.
    pub fn row_stride_bytes(&self) -> usize {
        self.format.row_stride_bytes(self.cols)
    }

    /// Scales per row (see [`Format::blocks_per_row`]).
    pub fn blocks_per_row(&self) -> usize {
        self.format.blocks_per_row(self.cols)
    }

    /// Total storage: codes plus scales; equals `format.weight_bytes(rows, cols)`.
    pub fn total_bytes(&self) -> u64 {
        (self.codes.len() + self.scales.byte_len()) as u64
    }

    /// Check that the codes and scales have the sizes and kinds the format and shape imply.
    pub fn validate(&self) -> Result<()> {
        let want_codes = self.rows.checked_mul(self.row_stride_bytes());
        if want_codes != Some(self.codes.len()) {
            return Err(Error::invalid(
                "quantized matrix",
                format!(
                    "{} {}x{} needs {want_codes:?} code bytes, found {}",
                    self.format,
                    self.rows,
                    self.cols,
                    self.codes.len()
                ),
            ));
        }
        let want_scales = self.rows * self.blocks_per_row();
        let found = match (&self.scales, self.format) {
            (Scales::None, Format::Fp16) => 0,
            (Scales::Row(s), Format::Fp8) => s.len(),
            (Scales::Nvfp4 { block, .. }, Format::Nvfp4) => block.len(),
            (Scales::Mxfp4 { block }, Format::Mxfp4) => block.len(),
            (s, f) => {
                return Err(Error::invalid(
                    "quantized matrix",
                    format!("{f} matrix carries scales of another format: {s:?}"),
                ))
            }
        };
        if found != want_scales {
            return Err(Error::invalid(
                "quantized matrix",
                format!(
                    "{} {}x{} needs {want_scales} scales, found {found}",
                    self.format, self.rows, self.cols
                ),
            ));
        }
        Ok(())
    }

    /// Dequantize to a row-major `rows x cols` FP32 matrix.
    ///
    /// # Panics
    /// If the matrix is inconsistent (see [`QuantizedMatrix::validate`]).
    pub fn dequantize(&self) -> Vec<f32> {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        let (rows, cols) = (self.rows, self.cols);
        match &self.scales {
            Scales::None => fp16::decode(&self.codes),
            Scales::Row(scales) => {
                let mut out = vec![0f32; rows * cols];
                if cols > 0 {
                    out.par_chunks_mut(cols)
                        .zip(self.codes.par_chunks(cols))
                        .zip(scales.par_iter())
                        .for_each(|((o, c), &s)| fp8::dequantize_row(c, s, o));
                }
                out
            }
            Scales::Nvfp4 { block, global } => {
                fp4::dequantize::<Nvfp4Block>(&self.codes, block, rows, cols, *global)
            }
            Scales::Mxfp4 { block } => fp4::dequantize::<Mxfp4Block>(
                &self.codes,
                block,
                rows,
                cols,
                super::mx_scale_rule(),
            ),
        }
    }
}
