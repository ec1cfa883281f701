//! The CPU arithmetic of a mixture-of-experts block ([`crate::lower::moe`]): routing (the
//! router's product, softmax over the experts, top-k, optional renormalisation, in the order
//! transformers' `Qwen3MoeTopKRouter` and `MixtralTopKRouter` compute them) and the dispatch
//! of each expert's rows (gather, and the weighted scatter-add of its output).

use super::{mat, vmath, Mat};

/// Each token's experts and their weights, `top_k` per row, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl Routing {
    /// The rows routed to `expert`, ascending, with their routing weights.
    pub fn rows_of(&self, expert: usize) -> (Vec<usize>, Vec<f32>) {
        let k = self.top_k.max(1);
        let mut rows = Vec::new();
        let mut weights = Vec::new();
        for (i, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            if e == expert {
                rows.push(i / k);
                weights.push(w);
            }
        }
        (rows, weights)
    }
}

/// Routes every row of `x` (`[m, hidden]`) with `router` (`[experts, hidden]`): the softmax of
/// `x R^T` over the experts, the `top_k` largest probabilities (the lower expert index first
/// on ties, as `torch.topk` on CPU), divided by their sum with `normalise`.
pub fn route(x: &Mat, router: &[f32], experts: usize, top_k: usize, normalise: bool) -> Routing {
    let logits = mat::matmul_wt(x, router, experts);
    let mut out = Routing {
        top_k,
        experts: Vec::with_capacity(x.rows * top_k),
        weights: Vec::with_capacity(x.rows * top_k),
    };
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for r in 0..x.rows {
        let mut p = logits.row(r).to_vec();
        vmath::softmax(&mut p, 1.0);
        order.clear();
        order.extend(0..experts);
        // Descending probability; NaN (a NaN input row) sorts last.
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let chosen = &order[..top_k.min(experts)];
        let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
        for &e in chosen {
            out.experts.push(e);
            out.weights.push(if normalise { p[e] / sum } else { p[e] });
        }
    }
    out
}

/// The rows `rows` of `x`, in that order.
pub fn gather(x: &Mat, rows: &[usize]) -> Mat {
    let mut data = Vec::with_capacity(rows.len() * x.cols);
    for &r in rows {
        data.extend_from_slice(x.row(r));
    }
    Mat::from_vec(rows.len(), x.cols, data)
}

/// `out[rows[i]] += weights[i] * y[i]` for every row of `y`.
pub fn scatter_add(out: &mut Mat, rows: &[usize], weights: &[f32], y: &Mat) {
    for (i, (&r, &w)) in rows.iter().zip(weights).enumerate() {
        let dst = &mut out.data[r * out.cols..(r + 1) * out.cols];
        dst.iter_mut().zip(y.row(i)).for_each(|(d, &v)| *d += w * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_top_k_of_the_softmax_and_renormalises() {
        // Two experts of four scored per row: the router is the identity on 4 columns.
        let router: Vec<f32> = (0..16)
            .map(|i| if i % 5 == 0 { 1.0 } else { 0.0 })
            .collect();
        let x = Mat::from_vec(2, 4, vec![0.0, 3.0, 1.0, 2.0, 5.0, 5.0, 0.0, 0.0]);
        let r = route(&x, &router, 4, 2, false);
        assert_eq!(r.experts, vec![1, 3, 0, 1]);
        let p: Vec<f32> = [0.0f32, 3.0, 1.0, 2.0].iter().map(|v| v.exp()).collect();
        let z: f32 = p.iter().sum();
        assert!((r.weights[0] - p[1] / z).abs() < 1e-6);
        let n = route(&x, &router, 4, 2, true);
        assert!((n.weights[0] + n.weights[1] - 1.0).abs() < 1e-6);
        assert!(
            (n.weights[2] - 0.5).abs() < 1e-6,
            "a tie keeps both, lower index first"
        );
        assert_eq!(n.rows_of(1), (vec![0, 1], vec![n.weights[0], n.weights[3]]));
        assert_eq!(n.rows_of(2).0, Vec::<usize>::new());
    }

    #[test]
    fn gather_and_weighted_scatter_add() {
        let x = Mat::from_vec(3, 2, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let g = gather(&x, &[2, 0]);
        assert_eq!(g.data, vec![5.0, 6.0, 1.0, 2.0]);
        let mut out = Mat::zeros(3, 2);
        scatter_add(&mut out, &[2, 0], &[0.5, 2.0], &g);
        assert_eq!(out.data, vec![2.0, 4.0, 0.0, 0.0, 2.5, 3.0]);
    }
}
