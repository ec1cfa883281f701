//! Row-major FP32 matrices and the matrix product the CPU backend is built on.
//!
//! Products go through `matrixmultiply` (vectorized, cache-blocked; the kernel ndarray uses),
//! tiled across the rayon pool by [`gemm_strided`]; strides let us multiply by a transposed
//! weight or a single attention head in place, without copies.

/// A dense row-major `rows x cols` FP32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Mat { rows, cols, data }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A strided read-only view: element (r, c) is at `ptr[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> View<'a, T> {
    /// Columns `[col0, col0 + cols)` of a row-major matrix with `ld` elements per row.
    pub fn cols_of(data: &'a [T], rows: usize, ld: usize, col0: usize, cols: usize) -> Self {
        View {
            data: &data[col0..],
            rows,
            cols,
            row_stride: ld,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn last_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
    }
}

/// The element types [`gemm_strided`] multiplies, with their `matrixmultiply` kernel.
pub trait Scalar: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
    /// `c = alpha a b + beta c` (matrixmultiply's `sgemm`/`dgemm` signature: strides in
    /// elements, `c` not read when `beta` is zero).
    ///
    /// # Safety
    /// The pointers and strides must address valid `m x k`, `k x n` and `m x n` matrices, `c`
    /// not aliasing `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
    );
}

/// `Scalar` for a float type and its `matrixmultiply` kernel.
macro_rules! scalar {
    ($t:ty, $kernel:path) => {
        impl Scalar for $t {
            const ZERO: $t = 0.0;
            const ONE: $t = 1.0;
            unsafe fn kernel(
                m: usize,
                k: usize,
                n: usize,
                a: *const $t,
                rsa: isize,
                csa: isize,
                b: *const $t,
                rsb: isize,
                csb: isize,
                beta: $t,
                c: *mut $t,
                rsc: isize,
            ) {
                $kernel(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, rsc, 1)
            }
        }
    };
}

scalar!(f32, matrixmultiply::sgemm);
scalar!(f64, matrixmultiply::dgemm);

/// Whether a product may split its work across rayon threads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Inside an already parallel loop.
    Single,
    /// Use the rayon pool.
    Pool,
}

/// `dst = a * b` where `dst` is row-major with leading dimension `ld_dst`.
pub fn matmul_into(dst: &mut [f32], ld_dst: usize, a: View, b: View, threads: Threads) {
    gemm_strided(dst, ld_dst, a, b, false, threads)
}

/// Output columns (or rows, for narrow products) per parallel tile, at least.
const MIN_TILE_COLS: usize = 128;
const MIN_TILE_ROWS: usize = 32;

/// `dst (+)= a * b` in f32 or f64; `accumulate` adds to `dst` instead of overwriting it.
///
/// The kernel is `matrixmultiply`'s single-threaded, cache-blocked one; with
/// [`Threads::Pool`] the output is cut into tiles (two per rayon thread, across columns, or
/// rows when the product is narrow) that run on the pool. Measured on the 2-core AVX2 build
/// machine at the shapes of SmolLM2, this reaches 220-290 GFLOP/s against 170-200 for the
/// `gemm` crate's own rayon split (and its single-thread kernel was 40% slower), which is why
/// the threading is ours: one pool, no nested parallelism.
pub fn gemm_strided<T: Scalar>(
    dst: &mut [T],
    ld_dst: usize,
    a: View<T>,
    b: View<T>,
    accumulate: bool,
    threads: Threads,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len());
    assert!((m - 1) * ld_dst + n <= dst.len(), "destination too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ld_dst..r * ld_dst + n].fill(T::ZERO);
            }
        }
        return;
    }
    let beta = if accumulate { T::ONE } else { T::ZERO };
    let parts = match threads {
        Threads::Single => 1,
        Threads::Pool => 2 * rayon::current_num_threads(),
    };
    let col_parts = parts.min(n / MIN_TILE_COLS).max(1);
    let row_parts = parts.div_ceil(col_parts).min(m / MIN_TILE_ROWS).max(1);
    let (tile_m, tile_n) = (m.div_ceil(row_parts), n.div_ceil(col_parts));
    let (a_ptr, b_ptr, c_ptr) = (
        a.data.as_ptr() as usize,
        b.data.as_ptr() as usize,
        dst.as_mut_ptr() as usize,
    );
    let tile = |t: usize| {
        let (r0, c0) = ((t / col_parts) * tile_m, (t % col_parts) * tile_n);
        let (rows, cols) = (tile_m.min(m - r0), tile_n.min(n - c0));
        let size = std::mem::size_of::<T>();
        // SAFETY: the asserts above keep every index the strides address inside the slices;
        // tiles cover disjoint rectangles of `dst`, which does not alias `a` or `b` (it is
        // borrowed mutably).
        unsafe {
            T::kernel(
                rows,
                k,
                cols,
                (a_ptr + r0 * a.row_stride * size) as *const T,
                a.row_stride as isize,
                a.col_stride as isize,
                (b_ptr + c0 * b.col_stride * size) as *const T,
                b.row_stride as isize,
                b.col_stride as isize,
                beta,
                (c_ptr + (r0 * ld_dst + c0) * size) as *mut T,
                ld_dst as isize,
            )
        }
    };
    let tiles = row_parts * col_parts;
    if tiles == 1 {
        tile(0);
    } else {
        use rayon::prelude::*;
        (0..tiles).into_par_iter().for_each(tile);
    }
}

/// `x W^T` for row-major `x: [t, in]` and `w: [out, in]`.
pub fn matmul_wt(x: &Mat, w: &[f32], out_features: usize) -> Mat {
    let mut y = Mat::zeros(x.rows, out_features);
    let a = View::cols_of(&x.data, x.rows, x.cols, 0, x.cols);
    let wt = View::cols_of(w, out_features, x.cols, 0, x.cols).t();
    matmul_into(&mut y.data, out_features, a, wt, Threads::Pool);
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &Mat, w: &[f32], out: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; a.rows * out];
        for r in 0..a.rows {
            for o in 0..out {
                y[r * out + o] = (0..a.cols)
                    .map(|c| a.data[r * a.cols + c] * w[o * a.cols + c])
                    .sum();
            }
        }
        y
    }

    #[test]
    fn matmul_wt_matches_naive_loop() {
        let (t, k, n) = (7, 13, 5);
        let x = Mat::from_vec(
            t,
            k,
            (0..t * k)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
                .collect(),
        );
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2)
            .collect();
        let y = matmul_wt(&x, &w, n);
        for (a, b) in y.data.iter().zip(naive(&x, &w, n)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
