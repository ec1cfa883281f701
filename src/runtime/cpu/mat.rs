//! Row-major FP32 matrices and the matrix product the CPU backend is built on.
//!
//! Products go through the `gemm` crate (vectorized, cache-blocked, multithreaded with rayon),
//! the same kernel library candle uses on CPU; strides let us multiply by a transposed weight
//! or a single attention head in place, without copies.

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
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// Columns `[col0, col0 + cols)` of a row-major matrix with `ld` elements per row.
    pub fn cols_of(data: &'a [f32], rows: usize, ld: usize, col0: usize, cols: usize) -> Self {
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
    assert_eq!(a.cols, b.rows, "inner dimensions");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len());
    assert!((m - 1) * ld_dst + n <= dst.len(), "destination too small");
    if k == 0 {
        for r in 0..m {
            dst[r * ld_dst..r * ld_dst + n].fill(0.0);
        }
        return;
    }
    let parallelism = match threads {
        Threads::Single => gemm::Parallelism::None,
        Threads::Pool => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: the asserts above keep every index the strides address inside the slices, and
    // `dst` does not alias `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld_dst as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
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
