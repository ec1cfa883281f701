//! The CPU arithmetic of a mixture-of-experts block ([`crate::lower::moe`]): routing (the
//! router's product, softmax over the experts, top-k, optional renormalisation, in the order
//! transformers' `Qwen3MoeTopKRouter` and `MixtralTopKRouter` compute them), each expert's MLP
//! over the (token, slot) pairs routed to it, and the weighted combine into the residual
//! stream. The CPU interpreter and the executable plan's cpu backend both run a block as
//! [`block_forward`] (route, [`run_experts`], [`combine`]); the generated kernels round where these do (the pair rows
//! of gate, up, SiLU-gate and down in the activation type; the residual once) and sum a
//! token's experts in the same, ascending, order.

use super::{kernels, mat, vmath, Mat};
use crate::error::Result;
use crate::lower::{ActDtype, MoeSlot};

/// Each token's experts and their weights, `top_k` per row, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl Routing {
    /// The rows routed to `expert`, ascending, with their routing weights (the tests' view;
    /// the forward works by pairs, [`Routing::pairs_of`]).
    #[cfg(test)]
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

    /// The pairs (`token * top_k + slot`) routed to `expert`, ascending.
    pub fn pairs_of(&self, expert: usize) -> Vec<usize> {
        (self.experts.iter().enumerate())
            .filter(|&(_, &e)| e == expert)
            .map(|(p, _)| p)
            .collect()
    }
}

/// MoE block `slot` on `x`'s rows (`[m, hidden]`): routes them with `router`, runs the chosen
/// experts (`apply(expert, projection, input)` as in [`run_experts`]) and adds their weighted
/// sum into `acc` (the block's destination rows), rounding where the kernels store. Returns
/// the routing (the cpu backend leaves it in the kernels' buffers).
pub fn block_forward(
    x: &Mat,
    router: &[f32],
    slot: &MoeSlot,
    act: ActDtype,
    acc: &mut Mat,
    apply: impl FnMut(usize, usize, &Mat) -> Result<Mat>,
) -> Result<Routing> {
    let experts = slot.experts.len();
    let routing = route(x, router, experts, slot.top_k, slot.norm_top_k);
    let y = run_experts(x, &routing, experts, act, apply)?;
    combine(acc, &routing, &y, act);
    Ok(routing)
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

/// Every expert's MLP over the pairs routed to it: `x` (`[m, hidden]`) rows gathered by pair,
/// `apply(expert, projection, input)` the product of projection 0 (gate), 1 (up) or 2 (down)
/// of `expert`; gate, up, SiLU-gate and down rounded to `act` as the kernels store them.
/// Returns the down outputs by pair, `[m * top_k, hidden]`.
pub fn run_experts(
    x: &Mat,
    routing: &Routing,
    experts: usize,
    act: ActDtype,
    mut apply: impl FnMut(usize, usize, &Mat) -> Result<Mat>,
) -> Result<Mat> {
    let k = routing.top_k.max(1);
    let mut out = Mat::zeros(x.rows * k, x.cols);
    for e in 0..experts {
        let pairs = routing.pairs_of(e);
        if pairs.is_empty() {
            continue;
        }
        let rows: Vec<usize> = pairs.iter().map(|p| p / k).collect();
        let xe = gather(x, &rows);
        let mut g = apply(e, 0, &xe)?;
        let mut u = apply(e, 1, &xe)?;
        act.round_slice(&mut g.data);
        act.round_slice(&mut u.data);
        let mut a = kernels::silu_mul(g, &u);
        act.round_slice(&mut a.data);
        let mut y = apply(e, 2, &a)?;
        act.round_slice(&mut y.data);
        for (i, &p) in pairs.iter().enumerate() {
            out.data[p * out.cols..(p + 1) * out.cols].copy_from_slice(y.row(i));
        }
    }
    Ok(out)
}

/// `x[t] += sum_j w[t, j] * y[t * top_k + j]` over each row's pairs in ascending expert
/// order (each product and sum rounded to FP32, as the combine kernel computes), `x` rounded
/// to `act` once.
pub fn combine(x: &mut Mat, routing: &Routing, y: &Mat, act: ActDtype) {
    let k = routing.top_k.max(1);
    let mut order: Vec<usize> = Vec::with_capacity(k);
    let mut acc = vec![0f32; x.cols];
    for t in 0..x.rows {
        order.clear();
        order.extend(t * k..(t + 1) * k);
        order.sort_by_key(|&p| routing.experts[p]);
        acc.fill(0.0);
        for &p in &order {
            let w = routing.weights[p];
            acc.iter_mut().zip(y.row(p)).for_each(|(a, &v)| *a += w * v);
        }
        let row = &mut x.data[t * x.cols..(t + 1) * x.cols];
        row.iter_mut()
            .zip(&acc)
            .for_each(|(d, &a)| *d = act.round(*d + a));
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
    fn gather_and_weighted_combine_in_expert_order() {
        let x = Mat::from_vec(3, 2, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let g = gather(&x, &[2, 0]);
        assert_eq!(g.data, vec![5.0, 6.0, 1.0, 2.0]);
        // Two rows, top-2: row 0 chose experts 3 then 1, row 1 experts 0 then 2.
        let routing = Routing {
            top_k: 2,
            experts: vec![3, 1, 0, 2],
            weights: vec![0.5, 2.0, 1.0, 0.25],
        };
        assert_eq!(routing.pairs_of(1), vec![1]);
        let y = Mat::from_vec(4, 2, vec![1.0, 1.0, 10.0, 20.0, 4.0, 4.0, 8.0, 0.0]);
        let mut out = Mat::from_vec(2, 2, vec![100.0, 100.0, 0.0, 0.0]);
        combine(&mut out, &routing, &y, ActDtype::F32);
        assert_eq!(out.data, vec![120.5, 140.5, 6.0, 4.0]);
    }
}
