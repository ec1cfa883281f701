//! FP8 E4M3 scalar codec and the per-row FP8 quantizer.
//!
//! The format is OCP OFP8 "E4M3" as implemented by NVIDIA's `__nv_fp8_e4m3` (a.k.a.
//! `float8_e4m3fn`): 1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits, subnormals,
//! no infinities, NaN = `S.1111.111` (0x7F / 0xFF), largest finite magnitude 448 (0x7E).
//!
//! Encoding rounds to nearest, ties to even, and saturates: every finite magnitude above 448
//! (including the midpoint 464 and beyond) and ±inf become ±448; NaN becomes the NaN code
//! with the input's sign bit; magnitudes at or below 2^-10 (half the smallest subnormal) become
//! a zero with the input's sign.
//!
//! The `float8` crate's `F8E4M3` fits this definition: its `from_f32` is a port of CUDA's
//! `__nv_cvt_double_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` (e4m3fn, RNE, saturating to finite,
//! computed through `f64`, so no double rounding), and its `to_f32` is exact. We use it for the
//! 256-entry decode table (built at compile time) and as the oracle in the tests, but not for
//! encoding in the quantizer loops: its encoder takes data-dependent branches (the rounding
//! decision) through an `f64` path and measured about 7x slower than the branch-free encoder
//! below (~16 ns vs ~2 ns per element), which matters because calibration re-quantizes every
//! matrix many times. The tests check that both encoders give identical codes on a sweep of
//! every sign/exponent/leading-mantissa pattern (including every tie and its neighbours), and
//! against an independent nearest-value search. Note that the crate's `F8E4M3::INFINITY` /
//! `is_infinite()` call 0x7E "infinity", which is wrong for e4m3fn (0x7E is 448); this module
//! never uses them.
//!
//! Per-row quantization (weights per output row, activations per token): the scale is
//! `s = amax / 448` in FP32, where `amax` is the largest finite magnitude of the row (NaN and
//! ±inf are ignored), codes are `e4m3(x / s)` and dequantization is `decode(code) * s`. Hence
//! ±inf saturates to ±448·s (the row's finite amax) and NaN stays NaN. When `s == 0` (an
//! all-zero row, one without finite non-zero values, or one so tiny that amax/448 underflows)
//! the stored scale is 0, every code is a zero with the input's sign (NaN keeps the NaN code)
//! and the row dequantizes to zeros (and NaN).

use float8::F8E4M3;
use rayon::prelude::*;

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Canonical (positive) E4M3 NaN code; 0xFF is the negative one.
pub const E4M3_NAN: u8 = 0x7F;

/// Decode table for all 256 codes, built at compile time.
static DECODE: [f32; 256] = build_decode_table();

const fn build_decode_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = F8E4M3::from_bits(i as u8).to_f32();
        i += 1;
    }
    table
}

/// Value of an E4M3 code (NaN for 0x7F and 0xFF).
#[inline]
pub fn e4m3_decode(code: u8) -> f32 {
    DECODE[code as usize]
}

/// E4M3 code of `x`: round to nearest even, saturate to ±448, NaN to NaN (see module doc).
///
/// Branch-free (selects only), so loops over it vectorize; bit-identical to
/// `float8::F8E4M3::from_f32(x).to_bits()` (tested).
#[inline]
pub fn e4m3_encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs_bits = bits & 0x7FFF_FFFF;
    let a = f32::from_bits(abs_bits);
    // Normal range: round the f32 mantissa to 3 bits, ties to even, in the integer domain;
    // a carry correctly bumps the exponent. Then rebias (127 -> 7) and saturate at 0x7E,
    // which also catches 464 < a (rounds past 448) and +inf.
    let rounded = abs_bits.wrapping_add(0x7FFFF + ((abs_bits >> 20) & 1));
    let normal = ((rounded >> 20) as i32 - ((127 - 7) << 3)).min(0x7E) as u8;
    // Subnormal range (a < 2^-6): the code is a / 2^-9 rounded to an integer (0..=8, where 8
    // is the smallest normal, 0x08). Adding 2^23 rounds to an integer with ties to even.
    let sub = ((a * 512.0 + 8_388_608.0).to_bits() - 0x4B00_0000) as u8;
    let code = if a < 0.015_625 { sub } else { normal };
    let code = if a.is_nan() { E4M3_NAN } else { code };
    code | sign
}

/// The E4M3 value nearest to `x`, i.e. `e4m3_decode(e4m3_encode(x))` bit for bit (NaN gives
/// the decode table's NaN), computed without a table so loops over it vectorize.
#[inline]
pub fn e4m3_round(x: f32) -> f32 {
    let abs_bits = x.to_bits() & 0x7FFF_FFFF;
    let a = f32::from_bits(abs_bits);
    // Same rounding as `e4m3_encode`, kept in the f32 domain.
    let rounded = abs_bits.wrapping_add(0x7FFFF + ((abs_bits >> 20) & 1));
    let normal = f32::from_bits(rounded & !0xF_FFFF).min(E4M3_MAX);
    let sub = ((a * 512.0 + 8_388_608.0) - 8_388_608.0) * (1.0 / 512.0);
    let v = if a < 0.015_625 { sub } else { normal };
    if a.is_nan() {
        DECODE[E4M3_NAN as usize]
    } else {
        v.copysign(x)
    }
}

/// Largest finite magnitude of `xs` (0 if none) and whether any element is NaN.
#[inline]
pub(crate) fn amax_finite(xs: &[f32]) -> (f32, bool) {
    let mut amax = 0.0f32;
    let mut nan = false;
    for &x in xs {
        let a = x.abs();
        nan |= x.is_nan();
        if a < f32::INFINITY && a > amax {
            amax = a;
        }
    }
    (amax, nan)
}

/// Quantizer of one FP8 row, shared by `quantize`, `dequantize` and fake quantization so the
/// three agree bit for bit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowQ {
    /// The stored FP32 scale.
    scale: f32,
}

impl RowQ {
    /// Scale chosen for `row`: its finite amax / 448.
    pub(crate) fn for_row(row: &[f32]) -> Self {
        Self::from_scale(amax_finite(row).0 / E4M3_MAX)
    }

    /// Rebuild from a stored scale.
    pub(crate) fn from_scale(scale: f32) -> Self {
        Self { scale }
    }

    pub(crate) fn scale(self) -> f32 {
        self.scale
    }

    #[inline]
    pub(crate) fn encode(self, x: f32) -> u8 {
        if self.scale > 0.0 {
            e4m3_encode(x / self.scale)
        } else if x.is_nan() {
            E4M3_NAN
        } else {
            // Zero-scale row: a zero with the sign of x (also for ±inf).
            (x.to_bits() >> 24) as u8 & 0x80
        }
    }

    #[inline]
    pub(crate) fn decode(self, code: u8) -> f32 {
        e4m3_decode(code) * self.scale
    }
}

/// Quantize one row into `codes` (same length); returns the row scale.
pub(crate) fn quantize_row(row: &[f32], codes: &mut [u8]) -> f32 {
    let q = RowQ::for_row(row);
    for (c, &x) in codes.iter_mut().zip(row) {
        *c = q.encode(x);
    }
    q.scale()
}

/// Quantize `rows x cols` values row by row (weights per output row, activations per token):
/// the codes and one scale per row. What [`crate::formats::Format::quantize`] stores for FP8,
/// and what the W8A8 kernels' quantizing steps leave in their buffers.
///
/// # Panics
/// If `x.len() != rows * cols`.
pub fn quantize_rows(x: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(x.len(), rows * cols, "{rows} x {cols} values expected");
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows];
    if cols > 0 {
        codes
            .par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .zip(scales.par_iter_mut())
            .for_each(|((c, row), s)| *s = quantize_row(row, c));
    }
    (codes, scales)
}

/// Dequantize one row of codes with its stored scale.
pub(crate) fn dequantize_row(codes: &[u8], scale: f32, out: &mut [f32]) {
    let q = RowQ::from_scale(scale);
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = q.decode(c);
    }
}

/// Quantize and dequantize one row in place.
pub(crate) fn fake_quantize_row(row: &mut [f32]) {
    let q = RowQ::for_row(row);
    if q.scale > 0.0 {
        // Same as below (`decode(code) * s`), table-free.
        for x in row.iter_mut() {
            *x = e4m3_round(*x / q.scale) * q.scale;
        }
    } else {
        for x in row.iter_mut() {
            *x = q.decode(q.encode(*x));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Value of a code from the format definition, independently of the crate.
    fn reference_value(code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0f64 } else { 1.0 };
        let exp = ((code >> 3) & 0xF) as i32;
        let man = (code & 7) as f64;
        if exp == 15 && man == 7.0 {
            return f32::NAN;
        }
        let mag = if exp == 0 {
            man / 8.0 * 2f64.powi(1 - 7)
        } else {
            (1.0 + man / 8.0) * 2f64.powi(exp - 7)
        };
        (sign * mag) as f32
    }

    /// Non-negative finite codes 0x00..=0x7E in increasing value order.
    fn positive_codes() -> impl Iterator<Item = u8> {
        0u8..=0x7E
    }

    /// Independent encoder: nearest finite value, ties to the even code, saturating.
    fn reference_encode(x: f32) -> u8 {
        if x.is_nan() {
            return E4M3_NAN | if x.is_sign_negative() { 0x80 } else { 0 };
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = (x as f64).abs();
        let mut best = 0u8;
        let mut best_d = f64::INFINITY;
        for c in positive_codes() {
            let d = (reference_value(c) as f64 - a).abs();
            if d < best_d || (d == best_d && c % 2 == 0) {
                best = c;
                best_d = d;
            }
        }
        best | sign
    }

    #[test]
    fn e4m3_all_256_codes_decode_to_definition() {
        for c in 0..=255u8 {
            let (got, want) = (e4m3_decode(c), reference_value(c));
            if want.is_nan() {
                assert!(got.is_nan(), "code {c:#04x}");
                assert!(c & 0x7F == 0x7F);
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {c:#04x}");
            }
        }
        assert_eq!(e4m3_decode(0x7E), 448.0);
        assert_eq!(e4m3_decode(0xFE), -448.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_decode(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_decode(0x38), 1.0);
    }

    #[test]
    fn e4m3_encode_decode_round_trips_every_code() {
        for c in 0..=255u8 {
            if c & 0x7F == 0x7F {
                continue;
            }
            // ±0 keep their sign bit: 0x00 and 0x80 both round-trip.
            assert_eq!(e4m3_encode(e4m3_decode(c)), c, "code {c:#04x}");
        }
    }

    #[test]
    fn e4m3_ties_round_to_even_at_every_midpoint() {
        for c in 0..0x7Eu8 {
            let (lo, hi) = (reference_value(c), reference_value(c + 1));
            let mid = (lo as f64 + hi as f64) / 2.0;
            let mid32 = mid as f32;
            assert_eq!(mid32 as f64, mid, "midpoint exact in f32");
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(e4m3_encode(mid32), even, "tie between {c:#04x} and next");
            assert_eq!(e4m3_encode(-mid32), even | 0x80);
            // Just off the midpoint goes to the nearer neighbour.
            assert_eq!(e4m3_encode(f32::from_bits(mid32.to_bits() - 1)), c);
            assert_eq!(e4m3_encode(f32::from_bits(mid32.to_bits() + 1)), c + 1);
        }
    }

    #[test]
    fn e4m3_subnormals() {
        let tiny = 2f32.powi(-9);
        for m in 1..8u8 {
            assert_eq!(e4m3_encode(m as f32 * tiny), m);
            assert_eq!(e4m3_decode(m), m as f32 * tiny);
        }
        // Half the smallest subnormal ties to zero (even); just above goes to the subnormal.
        assert_eq!(e4m3_encode(tiny / 2.0), 0x00);
        assert_eq!(e4m3_encode(-tiny / 2.0), 0x80);
        assert_eq!(
            e4m3_encode(f32::from_bits((tiny / 2.0).to_bits() + 1)),
            0x01
        );
        assert_eq!(e4m3_encode(1e-30), 0x00);
        assert_eq!(e4m3_encode(f32::from_bits(1)), 0x00);
        // 1.5 * tiny is a tie between codes 1 and 2 -> 2.
        assert_eq!(e4m3_encode(1.5 * tiny), 0x02);
    }

    #[test]
    fn e4m3_saturates_and_keeps_nan() {
        assert_eq!(e4m3_encode(448.0), 0x7E);
        assert_eq!(e4m3_encode(460.0), 0x7E);
        assert_eq!(e4m3_encode(464.0), 0x7E);
        assert_eq!(e4m3_encode(500.0), 0x7E);
        assert_eq!(e4m3_encode(-1e9), 0xFE);
        assert_eq!(e4m3_encode(f32::MAX), 0x7E);
        assert_eq!(e4m3_encode(f32::INFINITY), 0x7E);
        assert_eq!(e4m3_encode(f32::NEG_INFINITY), 0xFE);
        assert_eq!(e4m3_encode(f32::NAN) & 0x7F, 0x7F);
        assert_eq!(e4m3_encode(-f32::NAN), 0xFF);
        assert!(e4m3_decode(e4m3_encode(f32::NAN)).is_nan());
    }

    #[test]
    fn e4m3_encode_matches_reference_and_float8_crate_on_a_dense_sweep() {
        // The top 16 bits cover every sign, binade and the 3 kept mantissa bits plus the
        // rounding bit (bit 19); the low patterns give exact ties (lo = 0 with bit 19 set),
        // just above (1), and just below (bit 19 clear, bits 16..19 set, lo = 0xFFFF).
        for hi in 0..=u16::MAX {
            for lo in [0u32, 1, 0x7FFF, 0x8000, 0xFFFF, 0x1234] {
                let x = f32::from_bits(((hi as u32) << 16) | lo);
                let got = e4m3_encode(x);
                let (r, d) = (e4m3_round(x), e4m3_decode(got));
                assert_eq!(
                    r.to_bits(),
                    d.to_bits(),
                    "round: x = {x:e} ({:#010x})",
                    x.to_bits()
                );
                let krate = F8E4M3::from_f32(x).to_bits();
                assert_eq!(got, krate, "vs crate: x = {x:e} ({:#010x})", x.to_bits());
                if lo != 0x1234 {
                    let want = reference_encode(x);
                    assert_eq!(got, want, "vs reference: x = {x:e} ({:#010x})", x.to_bits());
                }
            }
        }
    }

    #[test]
    fn row_quantizer_scale_and_edge_rows() {
        let row = [1.0f32, -2.0, 0.5, 224.0];
        let mut codes = [0u8; 4];
        let s = quantize_row(&row, &mut codes);
        assert_eq!(s, 224.0 / 448.0);
        assert_eq!(codes[3], 0x7E);
        let mut out = [0f32; 4];
        dequantize_row(&codes, s, &mut out);
        assert_eq!(out, row, "these values are exact in E4M3 at scale 0.5");

        // Zero row: scale 0, zero codes (sign kept), zeros back.
        let zero = [0.0f32, -0.0, 0.0];
        let mut codes = [0xAAu8; 3];
        assert_eq!(quantize_row(&zero, &mut codes), 0.0);
        assert_eq!(codes, [0x00, 0x80, 0x00]);
        let mut out = [1f32; 3];
        dequantize_row(&codes, 0.0, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));

        // NaN stays NaN, inf saturates to the finite amax, neither affects the scale.
        let row = [f32::NAN, f32::INFINITY, -4.0, f32::NEG_INFINITY];
        let mut codes = [0u8; 4];
        let s = quantize_row(&row, &mut codes);
        assert_eq!(s, 4.0 / 448.0);
        let mut out = [0f32; 4];
        dequantize_row(&codes, s, &mut out);
        assert!(out[0].is_nan());
        assert_eq!(&out[1..], &[4.0, -4.0, -4.0]);
    }
}
