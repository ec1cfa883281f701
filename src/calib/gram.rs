//! Weight-only eps without recomputing products: for a linear layer with inputs `X` (`T x K`,
//! every calibration token) and weights `W`, the output error in format `f` is
//! `||X D^T||_F^2 = trace(D G D^T)` with `D = W - Q_f(W)` and `G = X^T X`.
//!
//! [`Gram`] accumulates `G` in f64 once per distinct layer input (q/k/v read one, gate/up read
//! one) while the calibration windows stream through a block; each format then costs `N K^2`
//! products instead of `T N K`, whatever the number of tokens. f64 throughout (the inputs are
//! f32, so `G` and the trace are exact to f64 rounding), which is what lets the result equal
//! an f64 plain-loop computation of `||X W^T - X Q(W)^T||^2` to 1e-6 relative.

use crate::runtime::cpu::mat::{gemm_strided, Mat, Threads, View};

/// `G = X^T X` of one layer input, summed over the windows seen so far (`K x K`, row-major).
pub struct Gram {
    k: usize,
    g: Vec<f64>,
}

/// Rows of `D` multiplied by `G` at a time (bounds the f64 scratch of lm_head-sized layers).
const ROWS_PER_CHUNK: usize = 1024;

impl Gram {
    pub fn new(k: usize) -> Gram {
        Gram {
            k,
            g: vec![0.0; k * k],
        }
    }

    /// Adds the rows of `x` (`[t, k]`): `G += x^T x`.
    pub fn add(&mut self, x: &Mat) {
        assert_eq!(x.cols, self.k, "Gram matrix width");
        let x64: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
        let xv = View::cols_of(&x64, x.rows, self.k, 0, self.k);
        gemm_strided(&mut self.g, self.k, xv.t(), xv, true, Threads::Pool);
    }

    /// `trace(D G D^T) = sum_r d_r^T G d_r` over the `rows` rows of `d` (`[rows, k]`): the
    /// squared Frobenius norm of `X d^T` over every token added.
    pub fn quadratic_form(&self, d: &[f32], rows: usize) -> f64 {
        assert_eq!(d.len(), rows * self.k, "difference matrix shape");
        let g = View::cols_of(&self.g, self.k, self.k, 0, self.k);
        d.chunks(ROWS_PER_CHUNK * self.k)
            .map(|chunk| {
                let r = chunk.len() / self.k;
                let d64: Vec<f64> = chunk.iter().map(|&v| v as f64).collect();
                let mut dg = vec![0.0f64; r * self.k];
                let dv = View::cols_of(&d64, r, self.k, 0, self.k);
                gemm_strided(&mut dg, self.k, dv, g, false, Threads::Pool);
                dg.iter().zip(&d64).map(|(a, b)| a * b).sum::<f64>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quadratic_form_is_the_squared_norm_of_the_product() {
        let (t, k, n) = (37, 9, 5);
        let x = Mat::from_vec(
            t,
            k,
            (0..t * k)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.07)
                .collect(),
        );
        let d: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01)
            .collect();
        // Two windows: the sum over both equals one pass over all rows.
        let (a, b) = x.data.split_at(20 * k);
        let mut gram = Gram::new(k);
        gram.add(&Mat::from_vec(20, k, a.to_vec()));
        gram.add(&Mat::from_vec(t - 20, k, b.to_vec()));
        let mut expect = 0.0f64;
        for r in 0..t {
            for o in 0..n {
                let y: f64 = (0..k)
                    .map(|c| x.data[r * k + c] as f64 * d[o * k + c] as f64)
                    .sum();
                expect += y * y;
            }
        }
        let ours = gram.quadratic_form(&d, n);
        assert!(
            (ours - expect).abs() <= 1e-12 * expect,
            "{ours} vs {expect}"
        );
    }
}
