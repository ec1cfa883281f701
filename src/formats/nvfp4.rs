//! NVFP4: E2M1 elements in blocks of 16 along K, an E4M3 scale per block and an FP32 scale
//! per tensor.
//!
//! * Global (tensor) scale: `global = amax(tensor) / (448 * 6)`, so that the largest block
//!   scale lands on the top of the E4M3 range. `amax` is over finite elements (NaN and ±inf are
//!   ignored). For weights the tensor is the whole matrix, or the engine-fused matrix it is
//!   part of ([`crate::lower::fused`], via `Format::quantize_against`); for activations it
//!   is the whole `[tokens, cols]` buffer being quantized (dynamic).
//! * Block scale byte: `e4m3(amax(block) / 6 / global)` (RNE, saturating), or the E4M3 NaN code
//!   0x7F if the block contains a NaN, or 0 when `global == 0`.
//! * Effective block scale: `eff = decode(byte) * global`. Element code: `e2m1(x / eff)`
//!   (RNE, saturating at ±6, so ±inf becomes ±6·eff). If `eff` is not positive (a zero block,
//!   a block whose scale underflows E4M3, or a NaN scale) every element code is zero.
//! * Dequantization: `(e2m1_value * decode(byte)) * global`. The inner product is exact (both
//!   factors have at most four significant bits), so the result is the correctly rounded
//!   value of `e2m1_value × block scale × global`; a NaN block scale gives a NaN block.
//! * Tail: a partial last block (cols not a multiple of 16) is scaled by its own elements and
//!   padded with zero codes (see `fp4`).

use super::e2m1::{e2m1_decode, e2m1_encode, e2m1_round, E2M1_MAX};
use super::fp4::Fp4Block;
use super::fp8::{amax_finite, e4m3_decode, e4m3_encode, E4M3_MAX, E4M3_NAN};

/// Elements per NVFP4 scale block.
pub const BLOCK: usize = 16;

/// The FP32 tensor scale for a tensor whose largest finite magnitude is `amax`.
pub fn global_scale(amax: f32) -> f32 {
    amax / (E4M3_MAX * E2M1_MAX)
}

/// The largest finite magnitude of `x` (parallel over chunks): what a tensor scale is made of.
pub fn tensor_amax(x: &[f32]) -> f32 {
    use rayon::prelude::*;
    x.par_chunks(1 << 14)
        .map(|c| amax_finite(c).0)
        .reduce(|| 0.0, f32::max)
}

/// The FP32 tensor scale of `x`.
pub(crate) fn global_scale_of(x: &[f32]) -> f32 {
    global_scale(tensor_amax(x))
}

/// One NVFP4 block, rebuilt from its E4M3 scale byte and the tensor scale.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Nvfp4Block {
    /// Decoded E4M3 block scale.
    block: f32,
    global: f32,
    /// Divisor for encoding: `block * global`, or +inf when that is not positive (all codes 0).
    div: f32,
}

impl Fp4Block for Nvfp4Block {
    const BLOCK: usize = BLOCK;
    type Ctx = f32;

    fn scale_byte(xs: &[f32], global: f32) -> u8 {
        let (amax, nan) = amax_finite(xs);
        if nan {
            E4M3_NAN
        } else if global > 0.0 {
            e4m3_encode(amax / E2M1_MAX / global)
        } else {
            0
        }
    }

    #[inline]
    fn from_byte(byte: u8, global: f32) -> Self {
        let block = e4m3_decode(byte);
        let eff = block * global;
        let div = if eff > 0.0 { eff } else { f32::INFINITY };
        Self { block, global, div }
    }

    #[inline]
    fn encode(&self, x: f32) -> u8 {
        // x / inf is ±0 (code 0 or 8) for finite x; NaN or inf over inf is NaN -> ±0 too.
        e2m1_encode(x / self.div)
    }

    #[inline]
    fn decode(&self, code: u8) -> f32 {
        (e2m1_decode(code) * self.block) * self.global
    }

    #[inline]
    fn round(&self, x: f32) -> f32 {
        (e2m1_round(x / self.div) * self.block) * self.global
    }
}

#[cfg(test)]
mod tests {
    use super::super::fp4;
    use super::*;

    #[test]
    fn nvfp4_global_and_block_scales() {
        // One row, two blocks: amax 12 -> global 12/2688; block 0 amax 12 -> scale 448.
        let mut w = vec![0f32; 32];
        w[0] = 12.0;
        w[1] = -6.0;
        w[16] = 3.0;
        let global = global_scale_of(&w);
        assert_eq!(global, 12.0 / 2688.0);
        let (codes, scales) = fp4::quantize::<Nvfp4Block>(&w, 1, 32, global);
        assert_eq!(scales[0], e4m3_encode(448.0));
        assert_eq!(scales[1], e4m3_encode(3.0 / 6.0 / global));
        // 12 / (448 * global) = 6 -> code 7; -6 -> -3 -> code 0xD.
        assert_eq!(codes[0], 0xD7);
        let back = fp4::dequantize::<Nvfp4Block>(&codes, &scales, 1, 32, global);
        assert!((back[0] - 12.0).abs() <= 12.0 * 1e-6, "{}", back[0]);
        assert!((back[1] + 6.0).abs() <= 6.0 * 1e-6, "{}", back[1]);
        assert!(
            (back[16] - 3.0).abs() <= 3.0 / 8.0,
            "block 1 within E4M3 scale error"
        );
    }

    #[test]
    fn nvfp4_zero_tensor_and_zero_block() {
        let w = vec![0f32; 40];
        let global = global_scale_of(&w);
        assert_eq!(global, 0.0);
        let (codes, scales) = fp4::quantize::<Nvfp4Block>(&w, 2, 20, global);
        assert!(codes.iter().all(|&c| c == 0));
        assert!(scales.iter().all(|&s| s == 0));
        let back = fp4::dequantize::<Nvfp4Block>(&codes, &scales, 2, 20, global);
        assert!(back.iter().all(|&v| v == 0.0));

        // A zero block in a non-zero tensor.
        let mut w = vec![0f32; 32];
        w[20] = 1.0;
        let global = global_scale_of(&w);
        let (codes, scales) = fp4::quantize::<Nvfp4Block>(&w, 1, 32, global);
        assert_eq!(scales[0], 0);
        assert!(codes[..8].iter().all(|&c| c == 0));
        let back = fp4::dequantize::<Nvfp4Block>(&codes, &scales, 1, 32, global);
        assert!((back[20] - 1.0).abs() <= 1e-6, "{}", back[20]);
        assert!(back.iter().enumerate().all(|(i, &v)| i == 20 || v == 0.0));
    }

    #[test]
    fn nvfp4_nan_block_and_inf_saturation() {
        let mut w: Vec<f32> = (0..32).map(|i| i as f32 / 8.0).collect();
        w[3] = f32::NAN;
        w[20] = f32::INFINITY;
        let global = global_scale_of(&w);
        assert_eq!(
            global,
            (31.0 / 8.0) / 2688.0,
            "NaN and inf excluded from amax"
        );
        let (codes, scales) = fp4::quantize::<Nvfp4Block>(&w, 1, 32, global);
        assert_eq!(scales[0], E4M3_NAN);
        let back = fp4::dequantize::<Nvfp4Block>(&codes, &scales, 1, 32, global);
        assert!(back[..16].iter().all(|v| v.is_nan()), "NaN marks its block");
        assert_eq!(back[20], back[31], "inf saturates to the block's top value");
        assert!(back[16..].iter().all(|v| v.is_finite()));
    }
}
