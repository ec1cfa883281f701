//! Property tests (proptest) of the quantizers on random matrices, including NaN/±inf/zeros
//! and row lengths that are not multiples of the blocks: `fake_quantize_weights` equals
//! `quantize(..).dequantize()` bit for bit, codes round-trip under their stored scales, error
//! bounds per format, the MXFP4 scale formula, and exact commutation with 2^k scaling.

use proptest::prelude::*;

use super::fp4;
use super::fp8::RowQ;
use super::mxfp4::Mxfp4Block;
use super::nvfp4::{self, Nvfp4Block};
use super::tests::same_bits;
use super::{Format, QuantizedMatrix, Scales};

/// Matrix elements: mostly finite values over a wide range, sometimes zero or special.
fn element() -> impl Strategy<Value = f32> {
    prop_oneof![
        20 => (-1.0f32..1.0, -20i32..20).prop_map(|(m, e)| m * 2f32.powi(e)),
        2 => Just(0.0f32),
        1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
    ]
}

fn finite_element() -> impl Strategy<Value = f32> {
    (-1.0f32..1.0, -20i32..20).prop_map(|(m, e)| m * 2f32.powi(e))
}

fn matrix(elt: BoxedStrategy<f32>) -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..5, 1usize..80)
        .prop_flat_map(move |(r, c)| (Just(r), Just(c), prop::collection::vec(elt.clone(), r * c)))
}

fn row_bytes(q: &QuantizedMatrix) -> &[u8] {
    match &q.scales {
        Scales::Nvfp4 { block, .. } | Scales::Mxfp4 { block } => block,
        _ => &[],
    }
}

proptest! {
    #[test]
    fn prop_fake_quantize_equals_dequantize_quantize((r, c, w) in matrix(element().boxed())) {
        for f in Format::ALL {
            let fake = f.fake_quantize_weights(&w, r, c);
            let q = f.quantize(&w, r, c);
            prop_assert!(same_bits(&fake, &q.dequantize()), "{}", f);
            prop_assert_eq!(q.total_bytes(), f.weight_bytes(r, c));
        }
    }

    #[test]
    fn prop_codes_round_trip_under_stored_scales((r, c, w) in matrix(element().boxed())) {
        for f in Format::QUANTIZED {
            let q = f.quantize(&w, r, c);
            let back = q.dequantize();
            let again = match (&q.scales, f) {
                (Scales::Row(s), _) => {
                    let codes: Vec<u8> = back
                        .chunks(c)
                        .zip(s)
                        .flat_map(|(row, &s)| row.iter().map(move |&x| RowQ::from_scale(s).encode(x)))
                        .collect();
                    // NaN elements keep the NaN code; everything else must match.
                    prop_assert_eq!(codes, q.codes.clone());
                    continue;
                }
                (Scales::Nvfp4 { global, .. }, _) => {
                    fp4::quantize_with_bytes::<Nvfp4Block>(&back, r, c, *global, row_bytes(&q))
                }
                (_, _) => fp4::quantize_with_bytes::<Mxfp4Block>(&back, r, c, super::mx_scale_rule(), row_bytes(&q)),
            };
            // NaN blocks hold zero codes and dequantize to NaN; their codes cannot round trip.
            let stride = q.row_stride_bytes();
            let bs = f.block_size().unwrap() / 2;
            for (i, (a, b)) in again.iter().zip(&q.codes).enumerate() {
                let blk = (i / stride) * q.blocks_per_row() + (i % stride) / bs;
                let nan = matches!(row_bytes(&q)[blk], 0x7F | 0xFF);
                prop_assert!(nan || a == b, "{} byte {}: {:#x} vs {:#x}", f, i, a, b);
            }
        }
    }

    #[test]
    fn prop_fp8_error_within_half_ulp((r, c, w) in matrix(finite_element().boxed())) {
        let back = Format::Fp8.fake_quantize_weights(&w, r, c);
        for (row, qrow) in w.chunks(c).zip(back.chunks(c)) {
            let s = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 448.0;
            for (&x, &q) in row.iter().zip(qrow) {
                // Half a mantissa step (relative 2^-4) or half the subnormal step (2^-10 * s).
                let bound = (x.abs() / 16.0).max(s / 1024.0) * (1.0 + 1e-5);
                prop_assert!((x - q).abs() <= bound, "x={} q={} s={}", x, q, s);
            }
        }
    }

    #[test]
    fn prop_nvfp4_error_bound((r, c, w) in matrix(finite_element().boxed())) {
        let back = Format::Nvfp4.fake_quantize_weights(&w, r, c);
        let g = nvfp4::global_scale(w.iter().fold(0f32, |m, x| m.max(x.abs())));
        for (row, qrow) in w.chunks(c).zip(back.chunks(c)) {
            for (xs, qs) in row.chunks(16).zip(qrow.chunks(16)) {
                let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
                let bound = (0.25 * amax + 6.0 * g / 1024.0) * (1.0 + 1e-5);
                for (&x, &q) in xs.iter().zip(qs) {
                    prop_assert!((x - q).abs() <= bound, "x={} q={} amax={}", x, q, amax);
                }
            }
        }
    }

    #[test]
    fn prop_mxfp4_scale_is_round_rule_and_error_bound((r, c, w) in matrix(finite_element().boxed())) {
        let q = Format::Mxfp4.quantize(&w, r, c);
        let back = q.dequantize();
        let bytes = row_bytes(&q);
        let blocks = w.chunks(c).flat_map(|row| row.chunks(32));
        let qblocks = back.chunks(c).flat_map(|row| row.chunks(32));
        for ((xs, qs), &b) in blocks.zip(qblocks).zip(bytes) {
            let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            if amax == 0.0 {
                prop_assert_eq!(b, 0);
                continue;
            }
            // The default (round) rule: floor(log2 amax), plus one when the mantissa >= 1.75.
            let floor = (amax as f64).log2().floor();
            let up = (amax as f64) / 2f64.powf(floor) >= 1.75;
            let e = (floor as i32 + up as i32 - 2).max(-127);
            prop_assert_eq!(b as i32, e + 127);
            let x_scale = 2f32.powi(e);
            for (&x, &q) in xs.iter().zip(qs) {
                prop_assert!((x - q).abs() <= 2.0 * x_scale, "x={} q={}", x, q);
                prop_assert!(q.abs() <= 6.0 * x_scale);
            }
        }
    }

    #[test]
    fn prop_power_of_two_scaling_commutes((r, c, w) in matrix(finite_element().boxed()), k in -8i32..8) {
        let p = 2f32.powi(k);
        let scaled: Vec<f32> = w.iter().map(|x| x * p).collect();
        for f in Format::QUANTIZED {
            let a: Vec<f32> = f.fake_quantize_weights(&w, r, c).iter().map(|x| x * p).collect();
            let mut b = scaled.clone();
            f.fake_quantize_activations(&mut b, r, c);
            prop_assert!(same_bits(&a, &b), "{}", f);
        }
    }
}
