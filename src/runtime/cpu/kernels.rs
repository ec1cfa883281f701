//! The non-linear ops of a decoder on FP32 row-major matrices `[tokens, features]`:
//! embedding gather, RMSNorm (of rows, or of each head of q and k), rotary embedding, causal
//! grouped-query attention (optionally over a sliding window), SiLU-gate multiply, residual
//! add, greedy argmax.
//! Rows (tokens) or heads run in parallel with rayon; products use [`super::mat`].

use rayon::prelude::*;

use super::mat::{matmul_into, Mat, Threads, View};
use super::vmath;
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::model::window::first_key;

/// Rows of the `[vocab, hidden]` table for `tokens`.
pub fn embed(table: &[f32], vocab: usize, hidden: usize, tokens: &[u32]) -> Result<Mat> {
    let mut x = Mat::zeros(tokens.len(), hidden);
    for (row, &tok) in x.data.chunks_mut(hidden).zip(tokens) {
        let t = tok as usize;
        if t >= vocab {
            return Err(Error::invalid(
                "token id",
                format!("{t} is outside the vocabulary of {vocab}"),
            ));
        }
        row.copy_from_slice(&table[t * hidden..(t + 1) * hidden]);
    }
    Ok(x)
}

/// `x * rsqrt(mean(x^2) + eps) * weight`, per row.
pub fn rms_norm(x: &Mat, weight: &[f32], eps: f32) -> Mat {
    let mut y = Mat::zeros(x.rows, x.cols);
    rms_norm_rows(&x.data, x.cols, weight, eps, &mut y.data);
    y
}

/// [`rms_norm`] of the rows of `x` (`cols` each) into `out`: the mean of squares in f64, then
/// `v * inv * w` in f32 (the kernel's arithmetic).
pub fn rms_norm_rows(x: &[f32], cols: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(out, row)| {
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
                *o = v * inv * w;
            }
        });
}

/// Rotary embedding in the rotate-half convention (Hugging Face Llama): within each head,
/// element `i` pairs with `i + head_dim/2`. `x` holds streams of `seq` rows each (one window,
/// or several streams of the same positions); row `t` of a stream is at position `t`. With
/// `norm`, each head is RMS-normalised first ([`norm_rope_rows`]).
pub fn rope(
    x: &mut Mat,
    seq: usize,
    heads: usize,
    head_dim: usize,
    rope: &Rope,
    norm: Option<(&[f32], f32)>,
) {
    let width = heads * head_dim;
    let (cos, sin) = rope_tables(seq, head_dim, rope);
    for stream in x.data.chunks_mut(seq * width) {
        norm_rope_rows(stream, width, head_dim, norm, &cos, &sin, 0);
    }
}

/// The RoPE step's arithmetic on rows of q or k (`width` elements, heads of `head_dim`):
/// with `norm = (weight, eps)` each head is RMS-normalised by [`rms_norm_rows`] (Qwen3's
/// q_norm / k_norm, one weight of `head_dim` for every head), then every head is rotated by
/// [`rope_rows`]; FP32 throughout, so a caller storing 16-bit values rounds once.
pub fn norm_rope_rows(
    x: &mut [f32],
    width: usize,
    head_dim: usize,
    norm: Option<(&[f32], f32)>,
    cos: &[f32],
    sin: &[f32],
    pos0: usize,
) {
    if let Some((weight, eps)) = norm {
        let heads = x.to_vec();
        rms_norm_rows(&heads, head_dim, weight, eps, x);
    }
    rope_rows(x, width, head_dim, cos, sin, pos0);
}

/// cos and sin of `pos * inv_freq[i]` for every position below `positions` and
/// `i < head_dim / 2` (f32, `sin_cos`), the frequencies from [`Rope::inv_freq`] (base and
/// scaling), times [`Rope::attention_factor`] (YaRN; 1 otherwise): the tables [`rope_rows`]
/// reads and the kernels get.
pub fn rope_tables(positions: usize, head_dim: usize, rope: &Rope) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq = rope.inv_freq(head_dim);
    let scale = rope.attention_factor();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for pos in 0..positions {
        for &f in &inv_freq {
            let (s, c) = (pos as f32 * f).sin_cos();
            sin.push(s * scale);
            cos.push(c * scale);
        }
    }
    (cos, sin)
}

/// Rotates each head of the rows of `x` (`width` elements each, heads of `head_dim`); row `r`
/// is at position `pos0 + r` of the tables.
pub fn rope_rows(
    x: &mut [f32],
    width: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    pos0: usize,
) {
    let half = head_dim / 2;
    x.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let p = pos0 + r;
        let (cos, sin) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for head in row.chunks_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    });
}

/// Causal attention with grouped KV heads over streams of `seq` tokens each (each stream
/// attends only to itself): query head `h` reads KV head `h / (heads / kv_heads)`.
/// `q: [t, heads*head_dim]`, `k, v: [t, kv_heads*head_dim]`, `t` a multiple of `seq`.
pub fn causal_attention(q: &Mat, k: &Mat, v: &Mat, seq: usize, shape: AttentionShape) -> Mat {
    let (q_dim, kv_dim) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let mut y = Mat::zeros(q.rows, q_dim);
    for (((y, q), k), v) in y
        .data
        .chunks_mut(seq * q_dim)
        .zip(q.data.chunks(seq * q_dim))
        .zip(k.data.chunks(seq * kv_dim))
        .zip(v.data.chunks(seq * kv_dim))
    {
        attention_rows(q, q.len() / q_dim, k, v, 0, shape, y);
    }
    y
}

/// The head layout of an attention op, and its sliding window (`None`: the whole context).
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
}

/// Causal attention of `m` query rows at positions `pos0..pos0 + m` over the keys and values
/// of positions `0..pos0 + m` (a KV cache, row-major `[positions, kv_heads * head_dim]`), into
/// `out: [m, heads * head_dim]`; with a window, the query at `p` sees positions
/// [`first_key`]`(p, window)..=p` only. Probabilities are normalised before the value
/// product, as the kernel does.
pub fn attention_rows(
    q: &[f32],
    m: usize,
    k: &[f32],
    v: &[f32],
    pos0: usize,
    shape: AttentionShape,
    out: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
        window,
    } = shape;
    let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // Work items of one head and up to QUERY_BLOCK query rows, each multiplying only by the
    // keys its last row can see (the causal triangle, not the square).
    let blocks = m.div_ceil(QUERY_BLOCK);
    let per_item: Vec<Vec<f32>> = (0..heads * blocks)
        .into_par_iter()
        .map(|item| {
            let (h, block) = (item / blocks, item % blocks);
            let (r0, r1) = (block * QUERY_BLOCK, ((block + 1) * QUERY_BLOCK).min(m));
            let (rows, len) = (r1 - r0, pos0 + r1);
            let kvh = h / group;
            let qh = View::cols_of(&q[r0 * q_dim..], rows, q_dim, h * head_dim, head_dim);
            let kh = View::cols_of(k, len, kv_dim, kvh * head_dim, head_dim);
            let vh = View::cols_of(v, len, kv_dim, kvh * head_dim, head_dim);
            let mut scores = vec![0.0f32; rows * len];
            matmul_into(&mut scores, len, qh, kh.t(), Threads::Single);
            for (i, row) in scores.chunks_mut(len).enumerate() {
                let p = pos0 + r0 + i;
                let first = first_key(p, window);
                row[..first].fill(0.0);
                vmath::softmax(&mut row[first..=p], scale);
                row[p + 1..].fill(0.0);
            }
            let mut o = vec![0.0f32; rows * head_dim];
            let p = View::cols_of(&scores, rows, len, 0, len);
            matmul_into(&mut o, head_dim, p, vh, Threads::Single);
            o
        })
        .collect();
    for (item, o) in per_item.iter().enumerate() {
        let (h, block) = (item / blocks, item % blocks);
        for (i, src) in o.chunks(head_dim).enumerate() {
            let dst = (block * QUERY_BLOCK + i) * q_dim + h * head_dim;
            out[dst..dst + head_dim].copy_from_slice(src);
        }
    }
}

/// Query rows per attention work item.
const QUERY_BLOCK: usize = 64;

/// `silu(gate) * up`, elementwise; consumes `gate`.
pub fn silu_mul(mut gate: Mat, up: &Mat) -> Mat {
    silu_mul_in_place(&mut gate.data, &up.data);
    gate
}

/// `gate = silu(gate) * up`, elementwise over equally long slices.
pub fn silu_mul_in_place(gate: &mut [f32], up: &[f32]) {
    gate.par_iter_mut()
        .zip(up.par_iter())
        .for_each(|(g, &u)| *g = *g / (1.0 + (-*g).exp()) * u);
}

/// `a + b`, elementwise; consumes `a`.
pub fn add(mut a: Mat, b: &Mat) -> Mat {
    a.data
        .par_iter_mut()
        .zip(b.data.par_iter())
        .for_each(|(x, &y)| *x += y);
    a
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

    #[test]
    fn attention_of_first_token_returns_its_value() {
        let (heads, kv, hd, t) = (4, 2, 4, 3);
        let q = Mat::from_vec(
            t,
            heads * hd,
            (0..t * heads * hd).map(|i| (i % 5) as f32 * 0.3).collect(),
        );
        let k = Mat::from_vec(
            t,
            kv * hd,
            (0..t * kv * hd).map(|i| (i % 3) as f32 * 0.2).collect(),
        );
        let v = Mat::from_vec(t, kv * hd, (0..t * kv * hd).map(|i| i as f32).collect());
        let shape = AttentionShape {
            heads,
            kv_heads: kv,
            head_dim: hd,
            window: None,
        };
        let y = causal_attention(&q, &k, &v, t, shape);
        // A window of one position: every row returns its own value.
        let own = causal_attention(
            &q,
            &k,
            &v,
            t,
            AttentionShape {
                window: Some(1),
                ..shape
            },
        );
        for r in 0..t {
            for h in 0..heads {
                let kvh = h / 2;
                assert_eq!(
                    &own.row(r)[h * hd..(h + 1) * hd],
                    &v.row(r)[kvh * hd..(kvh + 1) * hd]
                );
            }
        }
        for h in 0..heads {
            let kvh = h / 2;
            assert_eq!(
                &y.row(0)[h * hd..(h + 1) * hd],
                &v.row(0)[kvh * hd..(kvh + 1) * hd]
            );
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut x = Mat::from_vec(2, 8, (0..16).map(|i| i as f32 - 7.5).collect());
        let orig = x.clone();
        rope(&mut x, 2, 2, 4, &Rope::plain(10000.0), None);
        assert_eq!(x.row(0), orig.row(0));
        let n = |r: &[f32]| r.iter().map(|v| v * v).sum::<f32>();
        assert!((n(x.row(1)) - n(orig.row(1))).abs() < 1e-3);
    }

    #[test]
    fn head_norm_normalises_each_head_on_its_own() {
        // Two heads of 4, the second 10x the first: after the norm (weight 1) they are equal.
        let row: Vec<f32> = [1.0, -2.0, 3.0, 0.5]
            .iter()
            .chain(&[10.0, -20.0, 30.0, 5.0])
            .copied()
            .collect();
        let mut x = Mat::from_vec(1, 8, row);
        rope(
            &mut x,
            1,
            2,
            4,
            &Rope::plain(10000.0),
            Some((&[1.0; 4], 1e-6)),
        );
        let (a, b) = x.row(0).split_at(4);
        for (p, q) in a.iter().zip(b) {
            assert!((p - q).abs() < 1e-5, "{a:?} {b:?}");
        }
        let ms = a.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-4, "{ms}");
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }
}
