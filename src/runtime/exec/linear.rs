//! The CPU backend's linear layer on packed weights, decoding each format exactly as the
//! generated kernels do (kernels/fpx_formats.cuh, templates/gemv.cu.tera):
//!
//! * f32 / fp16: the stored value;
//! * fp8: E4M3 values summed against x, the row's FP32 scale applied once at the end;
//! * nvfp4: per 16-block a partial sum of E2M1 values times x, times the block's E4M3 scale,
//!   accumulated; the FP32 tensor scale applied at the end;
//! * mxfp4: per 32-block a partial sum times the block's E8M0 scale.
//!
//! Then the bias, then either a store or the fused residual add. Only the summation order
//! differs from the kernels (they split rows across lanes).

use half::f16;
use rayon::prelude::*;

use super::{PackedLinear, PackedScales};
use crate::formats::{e2m1_decode, e4m3_decode, e8m0_decode};
use crate::lower::{LinearShape, WeightFormat};

/// `y[r, :] (+)= x[r, :] W^T (+ b)` for `m` rows; `x: [m, k]`, `y: [m, n]`.
///
/// # Panics
/// If the buffers are smaller than the shapes imply.
pub fn linear_forward(l: &PackedLinear, s: &LinearShape, x: &[f32], m: usize, y: &mut [f32]) {
    let (n, k) = (s.n, s.k);
    assert!(x.len() >= m * k && y.len() >= m * n, "linear buffers");
    let stride = s.format.row_stride_bytes(k);
    // Outputs computed column by column (one weight row each, in parallel), then scattered.
    let cols: Vec<Vec<f32>> = (0..n)
        .into_par_iter()
        .map_init(
            || vec![0f32; k.max(1)],
            |wrow, row| {
                let codes = &l.codes[row * stride..(row + 1) * stride];
                row_outputs(l, s, row, codes, wrow, x, m)
            },
        )
        .collect();
    for (col, out) in cols.iter().enumerate() {
        for (r, &v) in out.iter().enumerate() {
            let v = v + l.bias.as_ref().map_or(0.0, |b| b[col]);
            let dst = &mut y[r * n + col];
            if s.accumulate {
                *dst += v;
            } else {
                *dst = v;
            }
        }
    }
}

/// The `m` outputs of weight row `row` (before bias).
fn row_outputs(
    l: &PackedLinear,
    s: &LinearShape,
    row: usize,
    codes: &[u8],
    wrow: &mut [f32],
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let k = s.k;
    match s.format {
        WeightFormat::F32 => {
            for (w, b) in wrow.iter_mut().zip(codes.chunks_exact(4)) {
                *w = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        WeightFormat::Fp16 => {
            for (w, b) in wrow.iter_mut().zip(codes.chunks_exact(2)) {
                *w = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        WeightFormat::Fp8 => {
            for (w, &c) in wrow.iter_mut().zip(codes) {
                *w = e4m3_decode(c);
            }
        }
        WeightFormat::Nvfp4 | WeightFormat::Mxfp4 => {
            for (i, w) in wrow.iter_mut().enumerate().take(k) {
                *w = e2m1_decode(codes[i / 2] >> ((i & 1) * 4));
            }
        }
    }
    let post = match (&l.scales, s.format) {
        (PackedScales::Row(sc), WeightFormat::Fp8) => sc[row],
        (_, WeightFormat::Nvfp4) => l.global,
        _ => 1.0,
    };
    (0..m)
        .map(|r| {
            let xr = &x[r * k..(r + 1) * k];
            let acc = match (&l.scales, s.format.block_size()) {
                (PackedScales::Block(bytes), Some(block)) => {
                    let bpr = k.div_ceil(block);
                    let scales = &bytes[row * bpr..(row + 1) * bpr];
                    let mut acc = 0f32;
                    for ((w, xs), &b) in wrow[..k].chunks(block).zip(xr.chunks(block)).zip(scales) {
                        let scale = if s.format == WeightFormat::Nvfp4 {
                            e4m3_decode(b)
                        } else {
                            e8m0_decode(b)
                        };
                        acc += dot(w, xs) * scale;
                    }
                    acc
                }
                _ => dot(&wrow[..k], xr),
            };
            acc * post
        })
        .collect()
}

/// Dot product with eight partial sums (vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Index of the largest value, the first on ties; NaN never wins; 0 when all are NaN (as the
/// argmax kernel).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = f32::NEG_INFINITY;
    let mut idx: Option<usize> = None;
    for (i, &x) in v.iter().enumerate() {
        if x > best || (idx.is_none() && x == best) {
            best = x;
            idx = Some(i);
        }
    }
    idx.unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Format;

    fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
            }
        }
        y
    }

    #[test]
    fn packed_linear_matches_dequantized_weights_in_every_format() {
        let (m, n, k) = (3, 5, 70); // 70: partial last block for both FP4 formats
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.11)
            .collect();
        for format in WeightFormat::ALL {
            let deq = match format.format() {
                None => w.clone(),
                Some(f) => f.fake_quantize_weights(&w, n, k),
            };
            let want = reference(&deq, &x, m, n, k);
            let bias: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let l = PackedLinear::pack(format, &w, n, k, Some(bias.clone()));
            let shape = LinearShape {
                format,
                n,
                k,
                bias: true,
                accumulate: true,
            };
            let mut y = vec![1f32; m * n];
            linear_forward(&l, &shape, &x, m, &mut y);
            for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                let want = 1.0 + want + bias[i % n];
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{format} {i}: {got} vs {want}"
                );
            }
        }
        assert_eq!(Format::ALL.len() + 1, WeightFormat::ALL.len());
    }

    #[test]
    fn a_swapped_nibble_order_is_caught() {
        // The comparison above would catch a decoder that reads the odd element from the low
        // nibble: packing with the nibbles of every byte swapped changes the outputs.
        let (m, n, k) = (2, 4, 64);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.11)
            .collect();
        for format in [WeightFormat::Nvfp4, WeightFormat::Mxfp4] {
            let shape = LinearShape {
                format,
                n,
                k,
                bias: false,
                accumulate: false,
            };
            let good = PackedLinear::pack(format, &w, n, k, None);
            let mut bad = good.clone();
            bad.codes.iter_mut().for_each(|b| *b = b.rotate_left(4));
            let (mut y, mut z) = (vec![0f32; m * n], vec![0f32; m * n]);
            linear_forward(&good, &shape, &x, m, &mut y);
            linear_forward(&bad, &shape, &x, m, &mut z);
            let want = reference(
                &format.format().unwrap().fake_quantize_weights(&w, n, k),
                &x,
                m,
                n,
                k,
            );
            let err = |v: &[f32]| {
                v.iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            };
            assert!(
                err(&y) < 1e-4 && err(&z) > 1e-2,
                "{format}: {} vs {}",
                err(&y),
                err(&z)
            );
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }
}
