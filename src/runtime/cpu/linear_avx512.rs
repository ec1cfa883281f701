//! `x W^T` for the linear layers on AVX-512, over weights packed once at load: the product a
//! forward pass spends most of its time in. `matrixmultiply` (the general kernel in
//! [`super::mat`]) packs both operands for every tile of every product and reaches 100-120
//! GFLOP/s per core at SmolLM2's shapes on an AVX-512 Xeon, where MKL reaches 140-150. A
//! linear layer's weights never change, so [`Panels`] stores them once in the order the
//! microkernel reads them (`[n / 32][k][32]`, zero-padded), and the activations are read in
//! place: nothing is packed per product.
//!
//! The microkernel holds a 14 x 32 tile of `y` in 28 zmm registers: per step of `k` two vector
//! loads of the panel and fourteen broadcasts from fourteen activation rows (14 rows measured
//! 10-20% faster than 12, and as fast as MKL on one core: 128-147 GFLOP/s). Loops: a parallel task
//! owns a panel (32 output columns); per panel, `k` is cut into [`KC`] slices (the panel's
//! slice, 72 KiB, stays in L2 with the activations), and the tile
//! accumulates in `y` across slices. Each output is the sequential FMA sum over `k`, so results
//! do not depend on the thread count. Machines without AVX-512, and products of fewer than
//! [`MR`] rows, use the general kernel.

use std::arch::x86_64::*;

/// Activation rows per microkernel (broadcast side).
const MR: usize = 14;
/// Output columns per panel (two 16-lane registers).
const NR: usize = 32;
/// Steps of `k` per microkernel call (576 measured as fast as 192 at SmolLM2's layers and 5%
/// faster at lm_head; smaller slices that fit L1 did not help).
const KC: usize = 576;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// A row-major `[n, k]` weight matrix in panels of [`NR`] rows: `data[(j * k + p) * NR + c]`
/// is `W[j * NR + c][p]` (zero past row `n`).
#[derive(Debug, Clone, PartialEq)]
pub struct Panels {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl Panels {
    pub fn pack(w: &[f32], n: usize, k: usize) -> Panels {
        use rayon::prelude::*;
        assert_eq!(w.len(), n * k, "weight matrix length");
        let mut data = vec![0f32; n.div_ceil(NR) * k * NR];
        data.par_chunks_mut((k * NR).max(1))
            .enumerate()
            .for_each(|(j, panel)| {
                for c in 0..NR.min(n - j * NR) {
                    let row = &w[(j * NR + c) * k..][..k];
                    for (p, &v) in row.iter().enumerate() {
                        panel[p * NR + c] = v;
                    }
                }
            });
        Panels { n, k, data }
    }

    /// `x W^T` (`[m, n]`) for row-major `x: [m, k]`. The caller checks [`Panels::runs`].
    pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let (n, k) = (self.n, self.k);
        assert!(self.runs(m), "AVX-512 product of {m} rows");
        assert!(x.len() >= m * k);
        // Not zeroed first (a fresh product's memset was 2% of a forward): every element is
        // written below (each panel's first slice stores its lanes, the tail rows are copied).
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let full = m / MR * MR;
        // The last rows (fewer than MR) as a zero-padded block.
        let mut tail_x = vec![0f32; MR * k];
        tail_x[..(m - full) * k].copy_from_slice(&x[full * k..m * k]);
        let y_ptr = y.spare_capacity_mut().as_mut_ptr() as usize;
        let panels = n.div_ceil(NR);
        (0..panels).into_par_iter().for_each(|j| {
            let mut tail_y = [0f32; MR * NR];
            let panel = &self.data[j * k * NR..(j + 1) * k * NR];
            let cols = NR.min(n - j * NR);
            let masks = masks(cols);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let slice = &panel[k0 * NR..];
                for i0 in (0..full).step_by(MR) {
                    // SAFETY: AVX-512 checked; rows i0..i0 + MR of x hold columns
                    // k0..k0 + kc; the tile is rows i0..i0 + MR, columns j*NR + cols of
                    // y, which only this task writes (tasks own disjoint panels).
                    unsafe {
                        microkernel(
                            kc,
                            x.as_ptr().add(i0 * k + k0),
                            k,
                            slice.as_ptr(),
                            (y_ptr as *mut f32).add(i0 * n + j * NR),
                            n,
                            k0 > 0,
                            masks,
                        )
                    };
                }
                if full < m {
                    // SAFETY: as above, on the padded block and a local tile.
                    unsafe {
                        microkernel(
                            kc,
                            tail_x.as_ptr().add(k0),
                            k,
                            slice.as_ptr(),
                            tail_y.as_mut_ptr(),
                            NR,
                            k0 > 0,
                            masks,
                        )
                    };
                }
            }
            for r in 0..m - full {
                // SAFETY: row full + r < m, columns j*NR..j*NR + cols <= n of y, this
                // task's own.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        tail_y[r * NR..r * NR + cols].as_ptr(),
                        (y_ptr as *mut f32).add((full + r) * n + j * NR),
                        cols,
                    )
                };
            }
        });
        // SAFETY: all m x n elements were written above.
        unsafe { y.set_len(m * n) };
        y
    }

    /// Whether [`Panels::matmul_wt`] takes a product of `m` rows.
    pub fn runs(&self, m: usize) -> bool {
        m >= MR && available()
    }
}

/// Lane masks of the two halves of a panel with `cols` valid columns.
fn masks(cols: usize) -> (u16, u16) {
    let lanes = |c: usize| if c >= 16 { !0u16 } else { (1u16 << c) - 1 };
    (lanes(cols), lanes(cols.saturating_sub(16)))
}

/// `y[i][c] (+)= sum_p x[i][p] * panel[p][c]` for the MR x NR tile at `y` (row stride `ldy`),
/// `x` rows `ldx` apart; `accumulate` adds to the tile; lanes outside `masks` are not touched.
///
/// # Safety
/// The CPU must have AVX-512F; `x` must hold MR rows of `k` (stride `ldx`), `panel` `k x NR`
/// values, `y` MR rows of the masked lanes (stride `ldy`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn microkernel(
    k: usize,
    x: *const f32,
    ldx: usize,
    panel: *const f32,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
    (m0, m1): (u16, u16),
) {
    // Named accumulators, not an array (an array of vectors is spilled to the stack); pointer
    // steps and load intrinsics that lower to LLVM's own (the masked load): the test profile
    // keeps debug assertions, and the checks of `ptr::add` and of `_mm512_loadu_ps`'s
    // `read_unaligned` would sit in the loop (measured: half the speed).
    macro_rules! tile {
        ($(($i:literal, $c0:ident, $c1:ident)),*) => {
            $(
                let row = y.wrapping_add($i * ldy);
                let (mut $c0, mut $c1) = if accumulate {
                    (_mm512_maskz_loadu_ps(m0, row), _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)))
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
            )*
            let (mut pa, mut pb) = (x, panel);
            for _ in 0..k {
                let b0 = _mm512_maskz_loadu_ps(!0, pb);
                let b1 = _mm512_maskz_loadu_ps(!0, pb.wrapping_add(16));
                $(
                    let a = _mm512_set1_ps(_mm_cvtss_f32(_mm_load_ss(pa.wrapping_add($i * ldx))));
                    $c0 = _mm512_fmadd_ps(a, b0, $c0);
                    $c1 = _mm512_fmadd_ps(a, b1, $c1);
                )*
                pa = pa.wrapping_add(1);
                pb = pb.wrapping_add(NR);
            }
            $(
                let row = y.wrapping_add($i * ldy);
                _mm512_mask_storeu_ps(row, m0, $c0);
                _mm512_mask_storeu_ps(row.wrapping_add(16), m1, $c1);
            )*
        };
    }
    tile!(
        (0, c00, c01),
        (1, c10, c11),
        (2, c20, c21),
        (3, c30, c31),
        (4, c40, c41),
        (5, c50, c51),
        (6, c60, c61),
        (7, c70, c71),
        (8, c80, c81),
        (9, c90, c91),
        (10, ca0, ca1),
        (11, cb0, cb1),
        (12, cc0, cc1),
        (13, cd0, cd1)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_equal_a_sequential_fma_loop_at_ragged_shapes() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        // m: one block, blocks + tail; n: one partial panel, panels + partial; k: under, over
        // and across KC slices.
        for (m, n, k) in [(14, 5, 7), (29, 45, 200), (15, 64, 700), (40, 33, 1)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05)
                .collect();
            let y = Panels::pack(&w, n, k).matmul_wt(&x, m);
            for r in 0..m {
                for c in 0..n {
                    let want = (0..k).fold(0f32, |s, p| x[r * k + p].mul_add(w[c * k + p], s));
                    assert_eq!(y[r * n + c], want, "({m}, {n}, {k}) at [{r}][{c}]");
                }
            }
        }
    }
}
