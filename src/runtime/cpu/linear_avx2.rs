//! The AVX2 + FMA register tile of the packed linear product ([`super::linear_packed`]): 6
//! rows x 16 columns of `y` in 12 ymm registers, two for the panel's vectors and one for the
//! broadcast activation (15 of the 16 registers; the classic Haswell/Zen shape, as BLIS and
//! OpenBLAS use). Per step of `k`: two panel loads, six broadcasts, twelve FMAs, which keeps
//! both FMA pipes of a Zen 3 or Skylake core busy with loads to spare.

use std::arch::x86_64::*;

use super::linear_packed::Microkernel;

/// The 6 x 16 AVX2 tile.
pub(super) struct Tile;

impl Microkernel for Tile {
    const MR: usize = 6;
    const NR: usize = 16;
    /// Lane masks (all bits set: the lane is valid) of the panel's two 8-lane halves.
    type Masks = [i32; 16];

    fn masks(cols: usize) -> [i32; 16] {
        std::array::from_fn(|c| if c < cols { -1 } else { 0 })
    }

    unsafe fn tile(
        k: usize,
        x: *const f32,
        ldx: usize,
        panel: *const f32,
        y: *mut f32,
        ldy: usize,
        accumulate: bool,
        masks: [i32; 16],
    ) {
        // SAFETY: the caller's contract (the CPU has AVX2 and FMA; the pointers span the tile).
        unsafe { tile(k, x, ldx, panel, y, ldy, accumulate, &masks) }
    }
}

/// [`Microkernel::tile`] on AVX2 + FMA.
///
/// # Safety
/// As [`Microkernel::tile`], on a CPU with AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(
    k: usize,
    x: *const f32,
    ldx: usize,
    panel: *const f32,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
    masks: &[i32; 16],
) {
    // As the AVX-512 tile: named accumulators (an array of vectors is spilled), pointer steps
    // by `wrapping_add` and loads through LLVM's own intrinsics (the masked load, which LLVM
    // turns into a plain load under an all-ones mask), so the test profile's debug assertions
    // stay out of the loop.
    let all = _mm256_set1_epi32(-1);
    // SAFETY (both loads): `masks` is 16 i32s.
    let m0 = unsafe { _mm256_maskload_epi32(masks.as_ptr(), all) };
    let m1 = unsafe { _mm256_maskload_epi32(masks.as_ptr().wrapping_add(8), all) };
    macro_rules! tile {
        ($(($i:literal, $c0:ident, $c1:ident)),*) => {
            $(
                let row = y.wrapping_add($i * ldy);
                let (mut $c0, mut $c1) = if accumulate {
                    (_mm256_maskload_ps(row, m0), _mm256_maskload_ps(row.wrapping_add(8), m1))
                } else {
                    (_mm256_setzero_ps(), _mm256_setzero_ps())
                };
            )*
            let (mut pa, mut pb) = (x, panel);
            for _ in 0..k {
                let b0 = _mm256_maskload_ps(pb, all);
                let b1 = _mm256_maskload_ps(pb.wrapping_add(8), all);
                $(
                    let a = _mm256_set1_ps(_mm_cvtss_f32(_mm_load_ss(pa.wrapping_add($i * ldx))));
                    $c0 = _mm256_fmadd_ps(a, b0, $c0);
                    $c1 = _mm256_fmadd_ps(a, b1, $c1);
                )*
                pa = pa.wrapping_add(1);
                pb = pb.wrapping_add(Tile::NR);
            }
            $(
                let row = y.wrapping_add($i * ldy);
                _mm256_maskstore_ps(row, m0, $c0);
                _mm256_maskstore_ps(row.wrapping_add(8), m1, $c1);
            )*
        };
    }
    // SAFETY: the caller's contract: x, panel and y span the tile's rows, steps and lanes.
    unsafe {
        tile!(
            (0, c00, c01),
            (1, c10, c11),
            (2, c20, c21),
            (3, c30, c31),
            (4, c40, c41),
            (5, c50, c51)
        );
    }
}
