//! FP4 E2M1 scalar codec and nibble packing, shared by NVFP4 and MXFP4.
//!
//! E2M1 (OCP MX v1.0 "FP4"): 1 sign bit, 2 exponent bits with bias 1, 1 mantissa bit, no
//! infinities and no NaN. The 16 codes `S EE M` decode to ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}
//! (code 0x8 is -0). Encoding rounds to nearest with ties to the even code and saturates
//! every magnitude above 6 (including +inf) to ±6. NaN has no encoding: the scalar encoder
//! maps it to a zero with the input's sign bit, and the block quantizers mark a block that
//! contains NaN through its (E4M3 or E8M0) NaN scale instead.
//!
//! No maintained crate provides E2M1 (the `float8` crate has only E4M3/E5M2, `half` only
//! 16-bit types), so the codec is written here; it is a handful of comparisons against the
//! midpoints between adjacent values, which is branch-free and vectorizes.
//!
//! Packing: two codes per byte, the even element in the LOW nibble, the odd element in the
//! high nibble. `pack_block` writes one scale block, padding with zero codes.

/// Largest finite E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// Value of each of the 16 E2M1 codes.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Value of an E2M1 code (only the low 4 bits are used).
#[inline]
pub fn e2m1_decode(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// E2M1 code of `x`: round to nearest, ties to even code, saturate at ±6, NaN -> ±0.
#[inline]
pub fn e2m1_encode(x: f32) -> u8 {
    let a = x.abs();
    // Each midpoint moves the magnitude code up by one. A tie goes to the even code, so the
    // comparison is strict (`>`) where the lower neighbour is even and `>=` where it is odd.
    let mag = (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8;
    mag | ((x.to_bits() >> 28) as u8 & 0x8)
}

/// The E2M1 value nearest to `x` (same rounding as [`e2m1_encode`]), i.e.
/// `e2m1_decode(e2m1_encode(x))` bit for bit, computed without a table so it vectorizes.
#[inline]
pub fn e2m1_round(x: f32) -> f32 {
    let a = x.abs();
    let step = |cond: bool, d: f32| if cond { d } else { 0.0 };
    let mag = step(a > 0.25, 0.5)
        + step(a >= 0.75, 0.5)
        + step(a > 1.25, 0.5)
        + step(a >= 1.75, 0.5)
        + step(a > 2.5, 1.0)
        + step(a >= 3.5, 1.0)
        + step(a > 5.0, 2.0);
    mag.copysign(x)
}

/// Pack the codes of one block into `out` (two per byte, even element in the low nibble).
/// `xs.len()` may be smaller than `2 * out.len()` (the last, partial block of a row): the
/// missing elements are written as zero codes.
#[inline]
pub(crate) fn pack_block(xs: &[f32], out: &mut [u8], encode: impl Fn(f32) -> u8) {
    debug_assert!(xs.len() <= 2 * out.len());
    let pairs = xs.chunks_exact(2);
    let rest = pairs.remainder();
    let full = xs.len() / 2;
    for (o, p) in out.iter_mut().zip(pairs) {
        *o = encode(p[0]) | (encode(p[1]) << 4);
    }
    let mut tail = &mut out[full..];
    if let [last] = rest {
        tail[0] = encode(*last);
        tail = &mut tail[1..];
    }
    tail.fill(0);
}

/// The `i`-th code of a packed row.
#[inline]
pub fn unpack_nibble(packed: &[u8], i: usize) -> u8 {
    (packed[i / 2] >> ((i & 1) * 4)) & 0xF
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent encoder: nearest value, ties to the even code, saturating.
    fn reference_encode(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 8 } else { 0 };
        let a = x.abs() as f64;
        let mut best = 0u8;
        let mut best_d = f64::INFINITY;
        for c in 0..8u8 {
            let d = (E2M1_VALUES[c as usize] as f64 - a).abs();
            if d < best_d || (d == best_d && c % 2 == 0) {
                best = c;
                best_d = d;
            }
        }
        best | sign
    }

    #[test]
    fn e2m1_all_16_codes_decode_to_definition() {
        for c in 0..16u8 {
            let sign = if c & 8 != 0 { -1.0 } else { 1.0 };
            let (e, m) = ((c >> 1) & 3, (c & 1) as f32);
            let mag = if e == 0 {
                m * 0.5
            } else {
                (1.0 + m / 2.0) * 2f32.powi(e as i32 - 1)
            };
            let want: f32 = sign * mag;
            assert_eq!(e2m1_decode(c).to_bits(), want.to_bits(), "code {c:#x}");
            assert_eq!(e2m1_encode(want), c, "round trip of code {c:#x}");
        }
        assert_eq!(e2m1_decode(0xF7), 6.0, "high bits are ignored");
    }

    #[test]
    fn e2m1_ties_to_even_and_saturation() {
        let cases = [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (5.01, 7),
            (6.0, 7),
            (7.0, 7),
            (1e30, 7),
            (f32::INFINITY, 7),
        ];
        for (x, c) in cases {
            assert_eq!(e2m1_encode(x), c, "x = {x}");
            assert_eq!(e2m1_encode(-x), c | 8, "x = -{x}");
        }
        assert_eq!(e2m1_encode(f32::NAN) & 7, 0);
        assert_eq!(e2m1_encode(-0.0), 8);
    }

    #[test]
    fn e2m1_encode_matches_reference_on_a_sweep() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.000_4;
            assert_eq!(e2m1_encode(x), reference_encode(x), "x = {x}");
            let r = e2m1_decode(e2m1_encode(x));
            assert_eq!(e2m1_round(x).to_bits(), r.to_bits(), "x = {x}");
        }
        for x in [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
        ] {
            let r = e2m1_decode(e2m1_encode(x));
            assert_eq!(e2m1_round(x).to_bits(), r.to_bits(), "x = {x}");
        }
        for m in [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] {
            for x in [
                f32::from_bits(m.to_bits() - 1),
                m,
                f32::from_bits(m.to_bits() + 1),
            ] {
                assert_eq!(e2m1_encode(x), reference_encode(x), "x = {x:e}");
            }
        }
    }

    #[test]
    fn nibble_order_even_element_low() {
        let xs = [1.0f32, -6.0, 0.5];
        let mut out = [0xFFu8; 4];
        pack_block(&xs, &mut out, e2m1_encode);
        assert_eq!(out, [0xF2, 0x01, 0x00, 0x00]);
        assert_eq!(unpack_nibble(&out, 0), 0x2);
        assert_eq!(unpack_nibble(&out, 1), 0xF);
        assert_eq!(unpack_nibble(&out, 2), 0x1);
        for i in 3..8 {
            assert_eq!(unpack_nibble(&out, i), 0);
        }
    }
}
