//! MXFP4 (OCP Microscaling Formats v1.0): E2M1 elements in blocks of 32 along K, one E8M0
//! scale byte per block, no tensor scale.
//!
//! * E8M0: an unsigned biased exponent, value `2^(byte - 127)` for bytes 0..=254; 255 is NaN.
//! * Block scale (the spec's conversion): `X = 2^(floor(log2(amax(block))) - 2)`, where 2 is
//!   the largest exponent of E2M1 (6 = 1.5·2^2). `amax` is over finite elements and
//!   `floor(log2)` is taken exactly from the FP32 bits (subnormals included). The exponent is
//!   clamped to E8M0's range [-127, 127].
//! * Zero block (amax == 0): byte 0 (the smallest scale, 2^-127) and zero codes.
//! * NaN anywhere in the block: byte 255, zero codes; the whole block dequantizes to NaN.
//! * Elements: `e2m1(x / X)` (RNE; since amax/X lies in [4, 8), magnitudes above 6·X — and
//!   ±inf — saturate to ±6·X, as the spec prescribes). Scaling by a power of two is exact.
//! * Dequantization: `e2m1_value * X` (exact).
//! * Tail: a partial last block (cols not a multiple of 32) is scaled by its own elements and
//!   padded with zero codes (see `fp4`).

use super::e2m1::{e2m1_decode, e2m1_encode, e2m1_round};
use super::fp4::Fp4Block;
use super::fp8::amax_finite;

/// Elements per MXFP4 scale block.
pub const BLOCK: usize = 32;
/// E8M0 exponent bias.
pub const E8M0_BIAS: i32 = 127;
/// E8M0 NaN byte.
pub const E8M0_NAN: u8 = 0xFF;
/// Largest exponent of an E2M1 value (6 = 1.5 * 2^2).
const E2M1_EMAX: i32 = 2;

/// Value of an E8M0 scale byte: `2^(byte - 127)`, NaN for 255.
#[inline]
pub fn e8m0_decode(byte: u8) -> f32 {
    match byte {
        0 => f32::from_bits(0x0040_0000), // 2^-127, an FP32 subnormal
        E8M0_NAN => f32::NAN,
        b => f32::from_bits((b as u32) << 23),
    }
}

/// `floor(log2(a))` for a positive finite `a`, exact (subnormals included).
#[inline]
pub fn floor_log2(a: f32) -> i32 {
    debug_assert!(a > 0.0 && a.is_finite());
    let bits = a.to_bits() & 0x7FFF_FFFF;
    let exp = (bits >> 23) as i32;
    if exp > 0 {
        exp - 127
    } else {
        // Subnormal: value = mantissa * 2^-149.
        31 - bits.leading_zeros() as i32 - 149
    }
}

/// E8M0 scale byte for a block whose largest finite magnitude is `amax` (> 0).
pub fn scale_byte_for_amax(amax: f32) -> u8 {
    let e = (floor_log2(amax) - E2M1_EMAX).clamp(-E8M0_BIAS, E8M0_BIAS);
    (e + E8M0_BIAS) as u8
}

/// One MXFP4 block, rebuilt from its E8M0 byte.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mxfp4Block {
    scale: f32,
    /// `1 / scale` (exact, a power of two), or 0 for a NaN scale (all codes ±0).
    inv: f32,
}

impl Fp4Block for Mxfp4Block {
    const BLOCK: usize = BLOCK;
    type Ctx = ();

    fn scale_byte(xs: &[f32], _: ()) -> u8 {
        let (amax, nan) = amax_finite(xs);
        if nan {
            E8M0_NAN
        } else if amax > 0.0 {
            scale_byte_for_amax(amax)
        } else {
            0
        }
    }

    #[inline]
    fn from_byte(byte: u8, _: ()) -> Self {
        let scale = e8m0_decode(byte);
        let inv = if byte == E8M0_NAN {
            0.0
        } else {
            // 2^(127 - byte): byte 0 gives 2^127, byte 254 gives 2^-127 (subnormal, exact).
            e8m0_decode((2 * E8M0_BIAS - byte as i32).clamp(0, 254) as u8)
        };
        Self { scale, inv }
    }

    #[inline]
    fn encode(&self, x: f32) -> u8 {
        e2m1_encode(x * self.inv)
    }

    #[inline]
    fn decode(&self, code: u8) -> f32 {
        e2m1_decode(code) * self.scale
    }

    #[inline]
    fn round(&self, x: f32) -> f32 {
        e2m1_round(x * self.inv) * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::super::fp4;
    use super::*;

    #[test]
    fn e8m0_values() {
        assert_eq!(e8m0_decode(127), 1.0);
        assert_eq!(e8m0_decode(128), 2.0);
        assert_eq!(e8m0_decode(126), 0.5);
        assert_eq!(e8m0_decode(0), 2f32.powi(-127));
        assert_eq!(e8m0_decode(254), 2f32.powi(127));
        assert!(e8m0_decode(255).is_nan());
        for b in 0..=254u8 {
            let q = Mxfp4Block::from_byte(b, ());
            assert_eq!(q.scale * q.inv, 1.0, "byte {b}");
        }
    }

    #[test]
    fn floor_log2_is_exact() {
        assert_eq!(floor_log2(1.0), 0);
        assert_eq!(floor_log2(f32::from_bits(1.0f32.to_bits() - 1)), -1);
        assert_eq!(floor_log2(6.0), 2);
        assert_eq!(floor_log2(8.0), 3);
        assert_eq!(floor_log2(0.3), -2);
        assert_eq!(floor_log2(f32::MAX), 127);
        assert_eq!(floor_log2(f32::MIN_POSITIVE), -126);
        assert_eq!(floor_log2(f32::from_bits(1)), -149);
        assert_eq!(floor_log2(f32::from_bits(0x0040_0000)), -127);
    }

    #[test]
    fn mxfp4_scale_formula_on_known_blocks() {
        // amax 6 -> 2^(2-2) = 1; amax 8 -> 2^(3-2) = 2; amax 7.99 -> 1; amax 0.3 -> 2^-4.
        for (amax, byte) in [
            (6.0f32, 127u8),
            (8.0, 128),
            (7.99, 127),
            (0.3, 123),
            (1.0, 125),
        ] {
            let mut xs = vec![0.01f32; 32];
            xs[5] = -amax;
            assert_eq!(Mxfp4Block::scale_byte(&xs, ()), byte, "amax {amax}");
        }
        // Clamping: huge and tiny blocks.
        assert_eq!(scale_byte_for_amax(f32::MAX), 252);
        assert_eq!(scale_byte_for_amax(f32::from_bits(1)), 0);
        // amax 7 at scale 1: 7 saturates to 6; 5 is a tie -> 4; 0.3 -> 0.5.
        let mut xs = vec![0f32; 32];
        xs[0] = 7.0;
        xs[1] = 5.0;
        xs[2] = -0.3;
        let (codes, scales) = fp4::quantize::<Mxfp4Block>(&xs, 1, 32, ());
        assert_eq!(scales, [127]);
        assert_eq!(codes[0], 0x67);
        assert_eq!(codes[1], 0x09);
        let back = fp4::dequantize::<Mxfp4Block>(&codes, &scales, 1, 32, ());
        assert_eq!(&back[..4], &[6.0, 4.0, -0.5, 0.0]);
    }

    #[test]
    fn mxfp4_zero_nan_and_inf_blocks() {
        let mut w = vec![0f32; 64];
        w[40] = f32::NAN;
        w[41] = 2.0;
        let (codes, scales) = fp4::quantize::<Mxfp4Block>(&w, 1, 64, ());
        assert_eq!(scales, [0, E8M0_NAN]);
        assert!(codes.iter().all(|&c| c == 0));
        let back = fp4::dequantize::<Mxfp4Block>(&codes, &scales, 1, 64, ());
        assert!(back[..32].iter().all(|&v| v == 0.0));
        assert!(back[32..].iter().all(|v| v.is_nan()));

        let mut w = vec![1f32; 32];
        w[7] = f32::NEG_INFINITY;
        let (codes, scales) = fp4::quantize::<Mxfp4Block>(&w, 1, 32, ());
        assert_eq!(scales, [125], "inf is excluded from amax");
        let back = fp4::dequantize::<Mxfp4Block>(&codes, &scales, 1, 32, ());
        assert_eq!(back[7], -1.5, "inf saturates to -6 * 2^-2");
        assert_eq!(back[6], 1.0);
    }
}
