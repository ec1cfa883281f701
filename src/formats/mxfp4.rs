//! MXFP4 (OCP Microscaling Formats v1.0): E2M1 elements in blocks of 32 along K, one E8M0
//! scale byte per block, no tensor scale.
//!
//! * E8M0: an unsigned biased exponent, value `2^(byte - 127)` for bytes 0..=254; 255 is NaN.
//! * Block scale `X = 2^(e - 2)`, 2 being the largest exponent of E2M1 (6 = 1.5·2^2), with `e`
//!   chosen from `amax(block)` by a [`ScaleRule`]:
//!   - [`ScaleRule::Round`] (the default, compressed-tensors' and vLLM's reference rule):
//!     `e = floor(log2(amax))`, plus one when amax's mantissa is at least 1.75. So
//!     `amax / X < 7`: the largest values round to 6 no worse than to a missing 8 would, where
//!     the floor rule lets `amax / X` reach almost 8 and clips the block's top values to 6.
//!   - [`ScaleRule::OcpFloor`] (the OCP spec's conversion): `e = floor(log2(amax))`.
//!
//!   `amax` is over finite elements; exponents are taken exactly from the FP32 bits
//!   (subnormals included) and clamped to E8M0's range [-127, 127]. Decoding reads only the
//!   stored byte, so the rule is the quantizer's choice and both decode alike.
//! * Zero block (amax == 0): byte 0 (the smallest scale, 2^-127) and zero codes.
//! * NaN anywhere in the block: byte 255, zero codes; the whole block dequantizes to NaN.
//! * Elements: `e2m1(x / X)` (RNE; magnitudes above 6·X — and ±inf — saturate to ±6·X, as
//!   the spec prescribes). Scaling by a power of two is exact.
//! * Dequantization: `e2m1_value * X` (exact).
//! * Tail: a partial last block (cols not a multiple of 32) is scaled by its own elements and
//!   padded with zero codes (see `fp4`).

use serde::{Deserialize, Serialize};

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

/// How an MXFP4 block's E8M0 scale is chosen from its largest magnitude (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleRule {
    /// `floor(log2(amax))`, rounded up when amax's mantissa is at least 1.75
    /// (compressed-tensors' `generate_mx_scales`); never lets amax / scale reach 7.
    #[default]
    Round,
    /// The OCP MX v1.0 conversion `floor(log2(amax))`: the block's top values may clip.
    OcpFloor,
}

impl ScaleRule {
    pub const ALL: [ScaleRule; 2] = [ScaleRule::Round, ScaleRule::OcpFloor];

    pub fn name(self) -> &'static str {
        match self {
            ScaleRule::Round => "round",
            ScaleRule::OcpFloor => "ocp-floor",
        }
    }
}

impl std::fmt::Display for ScaleRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScaleRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ScaleRule::ALL
            .into_iter()
            .find(|r| r.name() == s.trim())
            .ok_or_else(|| format!("unknown MXFP4 scale rule `{s}` (round, ocp-floor)"))
    }
}

/// `floor(log2(a))` rounded up when `a`'s mantissa is at least 1.75, for a positive finite
/// `a`: compressed-tensors' `round_to_power_2` (add 1 << 21 to the FP32 bits, keep the
/// exponent). Subnormals take the floor: their scale clamps to byte 0 under both rules.
#[inline]
pub fn round_log2(a: f32) -> i32 {
    debug_assert!(a > 0.0 && a.is_finite());
    let bits = a.to_bits() & 0x7FFF_FFFF;
    if bits >> 23 == 0 {
        return floor_log2(a);
    }
    ((bits + (1 << 21)) >> 23) as i32 - 127
}

/// E8M0 scale byte for a block whose largest finite magnitude is `amax` (> 0).
pub fn scale_byte_for_amax(amax: f32, rule: ScaleRule) -> u8 {
    let e = match rule {
        ScaleRule::Round => round_log2(amax),
        ScaleRule::OcpFloor => floor_log2(amax),
    };
    let e = (e - E2M1_EMAX).clamp(-E8M0_BIAS, E8M0_BIAS);
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
    /// The scale rule; decoding ignores it (the byte alone defines the block).
    type Ctx = ScaleRule;

    fn scale_byte(xs: &[f32], rule: ScaleRule) -> u8 {
        let (amax, nan) = amax_finite(xs);
        if nan {
            E8M0_NAN
        } else if amax > 0.0 {
            scale_byte_for_amax(amax, rule)
        } else {
            0
        }
    }

    #[inline]
    fn from_byte(byte: u8, _: ScaleRule) -> Self {
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
            let q = Mxfp4Block::from_byte(b, ScaleRule::Round);
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
        // Floor: amax 6 -> 2^(2-2) = 1; amax 8 -> 2^(3-2) = 2; amax 7.99 -> 1; 0.3 -> 2^-4.
        // Round: amax 7 (mantissa 1.75) and above rounds up; 6.99 and 6 do not.
        for (amax, floor, round) in [
            (6.0f32, 127u8, 127u8),
            (6.99, 127, 127),
            (7.0, 127, 128),
            (8.0, 128, 128),
            (7.99, 127, 128),
            (0.3, 123, 123),
            (0.4375, 123, 124),
            (1.0, 125, 125),
        ] {
            let mut xs = vec![0.01f32; 32];
            xs[5] = -amax;
            assert_eq!(
                Mxfp4Block::scale_byte(&xs, ScaleRule::OcpFloor),
                floor,
                "floor, amax {amax}"
            );
            assert_eq!(
                Mxfp4Block::scale_byte(&xs, ScaleRule::Round),
                round,
                "round, amax {amax}"
            );
        }
        // Clamping: huge and tiny blocks.
        for rule in ScaleRule::ALL {
            assert_eq!(scale_byte_for_amax(f32::from_bits(1), rule), 0);
            assert_eq!(scale_byte_for_amax(f32::MIN_POSITIVE, rule), 0);
        }
        assert_eq!(scale_byte_for_amax(f32::MAX, ScaleRule::OcpFloor), 252);
        assert_eq!(scale_byte_for_amax(f32::MAX, ScaleRule::Round), 253);
        // amax 7 at scale 1: 7 saturates to 6; 5 is a tie -> 4; 0.3 -> 0.5.
        let mut xs = vec![0f32; 32];
        xs[0] = 7.0;
        xs[1] = 5.0;
        xs[2] = -0.3;
        let (codes, scales) = fp4::quantize::<Mxfp4Block>(&xs, 1, 32, ScaleRule::OcpFloor);
        assert_eq!(scales, [127]);
        assert_eq!(codes[0], 0x67);
        assert_eq!(codes[1], 0x09);
        let back = fp4::dequantize::<Mxfp4Block>(&codes, &scales, 1, 32, ScaleRule::OcpFloor);
        assert_eq!(&back[..4], &[6.0, 4.0, -0.5, 0.0]);
        // The round rule takes scale 2 for amax 7: 7 -> 8 (3.5 is a tie -> 4), 5 -> 4 (2.5 -> 2),
        // -0.3 -> -0.15 -> 0 (-0 kept as code 8).
        let (codes, scales) = fp4::quantize::<Mxfp4Block>(&xs, 1, 32, ScaleRule::Round);
        assert_eq!(scales, [128]);
        let back = fp4::dequantize::<Mxfp4Block>(&codes, &scales, 1, 32, ScaleRule::Round);
        assert_eq!(&back[..4], &[8.0, 4.0, -0.0, 0.0]);
    }

    #[test]
    fn round_rule_never_clips_a_block_more_than_half_a_step() {
        // Over amax in [1, 16): the round rule keeps amax / scale below 7, so the largest
        // value's error is at most 1 (in units of the scale); the floor rule reaches ~2.
        let mut worst = [0f32; 2];
        for i in 0..4096 {
            let amax = 1.0 + 15.0 * i as f32 / 4096.0;
            for (k, rule) in ScaleRule::ALL.into_iter().enumerate() {
                let scale = e8m0_decode(scale_byte_for_amax(amax, rule));
                let q = Mxfp4Block::from_byte(scale_byte_for_amax(amax, rule), rule);
                worst[k] = worst[k].max((q.round(amax) - amax).abs() / scale);
            }
        }
        assert!(worst[0] <= 1.0, "round: {}", worst[0]);
        assert!(worst[1] > 1.9, "floor: {}", worst[1]);
    }

    #[test]
    fn mxfp4_zero_nan_and_inf_blocks() {
        let mut w = vec![0f32; 64];
        w[40] = f32::NAN;
        w[41] = 2.0;
        let (codes, scales) = fp4::quantize::<Mxfp4Block>(&w, 1, 64, ScaleRule::Round);
        assert_eq!(scales, [0, E8M0_NAN]);
        assert!(codes.iter().all(|&c| c == 0));
        let back = fp4::dequantize::<Mxfp4Block>(&codes, &scales, 1, 64, ScaleRule::Round);
        assert!(back[..32].iter().all(|&v| v == 0.0));
        assert!(back[32..].iter().all(|v| v.is_nan()));

        let mut w = vec![1f32; 32];
        w[7] = f32::NEG_INFINITY;
        let (codes, scales) = fp4::quantize::<Mxfp4Block>(&w, 1, 32, ScaleRule::Round);
        assert_eq!(scales, [125], "inf is excluded from amax");
        let back = fp4::dequantize::<Mxfp4Block>(&codes, &scales, 1, 32, ScaleRule::Round);
        assert_eq!(back[7], -1.5, "inf saturates to -6 * 2^-2");
        assert_eq!(back[6], 1.0);
    }
}
