//! `x W^T` for the linear layers over weights packed once at load: the product a forward pass
//! spends most of its time in. `matrixmultiply` (the general kernel in [`super::mat`]) packs
//! both operands for every tile of every product and reaches 100-120 GFLOP/s per core at
//! SmolLM2's shapes on an AVX-512 Xeon, where MKL reaches 140-150; on an AVX2 EPYC (Zen 3) it
//! stays at about half of MKL's rate. A linear layer's weights never change, so [`Panels`]
//! stores them once in the order a microkernel reads them (`[n / NR][k][NR]`, zero-padded),
//! and the activations are read in place: nothing is packed per product.
//!
//! One driver, two register tiles ([`Microkernel`]): AVX-512 holds a 14 x 32 tile of `y` in
//! 28 zmm registers ([`super::linear_avx512`]), AVX2 + FMA a 6 x 16 tile in 12 ymm registers
//! ([`super::linear_avx2`]); per step of `k` a tile loads two vectors of the panel and
//! broadcasts one activation per row. Loops: a parallel task owns a panel (`NR` output
//! columns); per panel, `k` is cut into [`KC`] slices (the panel's slice stays in L2 with the
//! activations), and the tile accumulates in `y` across slices. Each output is the sequential
//! FMA sum over `k`, so results depend neither on the thread count nor on the tile. CPUs with
//! neither extension, and products of fewer than `MR` rows, use the general kernel.

use rayon::prelude::*;

/// Steps of `k` per microkernel call (576 measured as fast as 192 at SmolLM2's layers and 5%
/// faster at lm_head on AVX-512; smaller slices that fit L1 did not help).
const KC: usize = 576;

/// The largest tile of any microkernel (`MR * NR`), for the padded tail block.
const MAX_TILE: usize = 14 * 32;

/// A register-tile kernel: `y[i][c] (+)= sum_p x[i][p] * panel[p][c]` for an `MR x NR` tile.
pub(super) trait Microkernel {
    /// Activation rows per tile (broadcast side).
    const MR: usize;
    /// Output columns per panel (the vector side).
    const NR: usize;
    /// The lanes of a panel's `cols` valid columns, as the kernel's loads and stores take them.
    type Masks: Copy;

    fn masks(cols: usize) -> Self::Masks;

    /// The tile at `y` (row stride `ldy`) from `x` (`MR` rows, stride `ldx`) and `k` steps of
    /// `panel`; `accumulate` adds to the tile; lanes outside `masks` are not touched.
    ///
    /// # Safety
    /// The CPU must have the kernel's extension ([`Isa::available`]); `x` must hold `MR` rows
    /// of `k` (stride `ldx`), `panel` `k x NR` values, `y` `MR` rows of the masked lanes
    /// (stride `ldy`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        k: usize,
        x: *const f32,
        ldx: usize,
        panel: *const f32,
        y: *mut f32,
        ldy: usize,
        accumulate: bool,
        masks: Self::Masks,
    );
}

/// The vector extension a [`Panels`] was packed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The widest extension this CPU runs, if any.
    pub fn best() -> Option<Isa> {
        [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.available())
    }

    pub fn available(self) -> bool {
        match self {
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
    }

    fn nr(self) -> usize {
        match self {
            Isa::Avx512 => super::linear_avx512::Tile::NR,
            Isa::Avx2 => super::linear_avx2::Tile::NR,
        }
    }

    fn mr(self) -> usize {
        match self {
            Isa::Avx512 => super::linear_avx512::Tile::MR,
            Isa::Avx2 => super::linear_avx2::Tile::MR,
        }
    }
}

/// A row-major `[n, k]` weight matrix in panels of `NR` rows: `data[(j * k + p) * NR + c]` is
/// `W[j * NR + c][p]` (zero past row `n`).
#[derive(Debug, Clone, PartialEq)]
pub struct Panels {
    isa: Isa,
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl Panels {
    /// `w` packed for the widest extension this CPU has (`None`: neither).
    pub fn pack_best(w: &[f32], n: usize, k: usize) -> Option<Panels> {
        Isa::best().map(|isa| Panels::pack(isa, w, n, k))
    }

    pub fn pack(isa: Isa, w: &[f32], n: usize, k: usize) -> Panels {
        assert_eq!(w.len(), n * k, "weight matrix length");
        let nr = isa.nr();
        let mut data = vec![0f32; n.div_ceil(nr) * k * nr];
        data.par_chunks_mut((k * nr).max(1))
            .enumerate()
            .for_each(|(j, panel)| {
                for c in 0..nr.min(n - j * nr) {
                    let row = &w[(j * nr + c) * k..][..k];
                    for (p, &v) in row.iter().enumerate() {
                        panel[p * nr + c] = v;
                    }
                }
            });
        Panels { isa, n, k, data }
    }

    /// Whether [`Panels::matmul_wt`] takes a product of `m` rows.
    pub fn runs(&self, m: usize) -> bool {
        m >= self.isa.mr() && self.isa.available()
    }

    /// `x W^T` (`[m, n]`) for row-major `x: [m, k]`. The caller checks [`Panels::runs`].
    pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(self.runs(m), "{:?} product of {m} rows", self.isa);
        assert!(x.len() >= m * self.k);
        match self.isa {
            Isa::Avx512 => self.product::<super::linear_avx512::Tile>(x, m),
            Isa::Avx2 => self.product::<super::linear_avx2::Tile>(x, m),
        }
    }

    fn product<T: Microkernel>(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k, mr, nr) = (self.n, self.k, T::MR, T::NR);
        // Not zeroed first (a fresh product's memset was 2% of a forward): every element is
        // written below (each panel's first slice stores its lanes, the tail rows are copied).
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let full = m / mr * mr;
        // The last rows (fewer than MR) as a zero-padded block.
        let mut tail_x = vec![0f32; mr * k];
        tail_x[..(m - full) * k].copy_from_slice(&x[full * k..m * k]);
        let y_ptr = y.spare_capacity_mut().as_mut_ptr() as usize;
        (0..n.div_ceil(nr)).into_par_iter().for_each(|j| {
            let mut tail_y = [0f32; MAX_TILE];
            let panel = &self.data[j * k * nr..(j + 1) * k * nr];
            let cols = nr.min(n - j * nr);
            let masks = T::masks(cols);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let slice = &panel[k0 * nr..];
                for i0 in (0..full).step_by(mr) {
                    // SAFETY: the ISA was checked (`runs`); rows i0..i0 + MR of x hold
                    // columns k0..k0 + kc; the tile is rows i0..i0 + MR, columns j*NR + cols
                    // of y, which only this task writes (tasks own disjoint panels).
                    unsafe {
                        T::tile(
                            kc,
                            x.as_ptr().add(i0 * k + k0),
                            k,
                            slice.as_ptr(),
                            (y_ptr as *mut f32).add(i0 * n + j * nr),
                            n,
                            k0 > 0,
                            masks,
                        )
                    };
                }
                if full < m {
                    // SAFETY: as above, on the padded block and a local tile.
                    unsafe {
                        T::tile(
                            kc,
                            tail_x.as_ptr().add(k0),
                            k,
                            slice.as_ptr(),
                            tail_y.as_mut_ptr(),
                            nr,
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
                        tail_y[r * nr..r * nr + cols].as_ptr(),
                        (y_ptr as *mut f32).add((full + r) * n + j * nr),
                        cols,
                    )
                };
            }
        });
        // SAFETY: all m x n elements were written above.
        unsafe { y.set_len(m * n) };
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_tail_block() {
        for isa in [Isa::Avx512, Isa::Avx2] {
            assert!(isa.mr() * isa.nr() <= MAX_TILE, "{isa:?}");
        }
    }

    #[test]
    fn panels_equal_a_sequential_fma_loop_at_ragged_shapes() {
        let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|i| i.available())
            .collect();
        if isas.is_empty() {
            eprintln!("skipped: neither AVX-512 nor AVX2 + FMA");
            return;
        }
        // m: one block, blocks + tail; n: one partial panel, panels + partial; k: under, over
        // and across KC slices.
        for isa in isas {
            let shapes = [
                (14, 5, 7),
                (29, 45, 200),
                (15, 64, 700),
                (40, 33, 1),
                (6, 17, 9),
            ];
            for (m, n, k) in shapes.into_iter().filter(|s| s.0 >= isa.mr()) {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07)
                    .collect();
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05)
                    .collect();
                let y = Panels::pack(isa, &w, n, k).matmul_wt(&x, m);
                for r in 0..m {
                    for c in 0..n {
                        let want = (0..k).fold(0f32, |s, p| x[r * k + p].mul_add(w[c * k + p], s));
                        assert_eq!(y[r * n + c], want, "{isa:?} ({m}, {n}, {k}) at [{r}][{c}]");
                    }
                }
            }
        }
    }
}
