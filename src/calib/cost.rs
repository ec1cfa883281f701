//! What a calibration will cost before it runs: the floating-point operations of the eps pass
//! and of the KL pass, counted from the graph's shapes, and a run-time estimate from this
//! machine's measured product throughput ([`measure_gflops`], a fraction of a second).
//!
//! Counted: every matrix product (2 flops per multiply-add; f64 products as two), causal
//! attention (half the square of a window), and the KL pass's log-sum-exp over the vocabulary
//! ([`LSE_FLOPS`] per element). Not counted: norms, RoPE, quantizers, loading. On the build
//! machine the estimate is within a factor of about 1.5 of the measured time; the calibration
//! summary reports both.

use std::time::Instant;

use std::collections::BTreeMap;

use super::capture::{formats_per_pass, QUANTIZED_BYTES};
use crate::ir::{Graph, LinearKind, NodeId};
use crate::runtime::cpu::mat::{matmul_wt, Mat};

/// Flop-equivalents of one vocabulary element's `exp` and dot product in the KL pass.
pub const LSE_FLOPS: f64 = 12.0;

/// Per-token flops of each stage (decoder blocks, then the head) of a full-precision
/// forward over windows of `seq` tokens.
fn stage_flops(graph: &Graph, seq: usize) -> Vec<f64> {
    let spec = graph.spec();
    let layers = spec.num_layers;
    let mut stages = vec![0.0f64; layers + 1];
    for (id, l) in graph.linears() {
        let stage = graph.node(id).layer.unwrap_or(layers);
        stages[stage] += 2.0 * (l.in_features * l.out_features) as f64;
    }
    // Scores and the value product, each `heads x head_dim` per visible key; on average a
    // query sees half the window.
    let attention = 2.0 * 2.0 * (spec.num_heads * spec.head_dim) as f64 * seq as f64 / 2.0;
    for s in stages.iter_mut().take(layers) {
        *s += attention;
    }
    stages
}

/// Flops of the two exact ways to get the weight-only error of the layers reading one input
/// of width `k` (`outs`: their output rows) over `tokens` tokens and `formats` formats:
/// `(gram, direct)`. Gram: `G = X^T X` once (`2 K^2 T`, f64 counted double) and per layer and
/// format `trace(D G D^T)` (`2 N K^2`, f64); direct: per layer and format the product `X D^T`
/// (`2 T N K`, f32).
pub fn weight_only_flops(k: usize, outs: &[usize], tokens: usize, formats: usize) -> (f64, f64) {
    let (k, t, f) = (k as f64, tokens as f64, formats as f64);
    let n: f64 = outs.iter().map(|&n| n as f64).sum();
    (4.0 * k * k * t + f * 4.0 * n * k * k, f * 2.0 * t * n * k)
}

/// The eps pass over `tokens` calibration tokens in windows of `seq`, measuring `formats`
/// formats: the forward of every stage once per pass over it ([`formats_per_pass`]), one W+A
/// product per layer and format, and the weight-only errors by the cheaper exact method of
/// each layer input ([`weight_only_flops`]).
pub fn eps_flops(graph: &Graph, tokens: usize, seq: usize, formats: usize) -> f64 {
    let forward: f64 = stage_flops(graph, seq)
        .iter()
        .zip(formats_per_pass(graph, formats, QUANTIZED_BYTES))
        .map(|(flops, per_pass)| flops * formats.div_ceil(per_pass).max(1) as f64)
        .sum();
    let linear: f64 = graph
        .linears()
        .map(|(_, l)| 2.0 * (l.in_features * l.out_features) as f64)
        .sum();
    let mut groups: BTreeMap<NodeId, (usize, Vec<usize>)> = BTreeMap::new();
    for (id, l) in graph.linears() {
        let g = groups
            .entry(graph.inputs(id)[0])
            .or_insert((l.in_features, Vec::new()));
        g.1.push(l.out_features);
    }
    let weight_only: f64 = groups
        .values()
        .map(|(k, outs)| {
            let (gram, direct) = weight_only_flops(*k, outs, tokens, formats);
            gram.min(direct)
        })
        .sum();
    tokens as f64 * (forward + formats as f64 * linear) + weight_only
}

/// The KL pass over `windows` held-out windows of `seq` tokens, measuring `formats` formats
/// of every linear layer: the reference forward, then per (layer, format) a forward from the
/// layer's stage on, and the KL of each against the reference.
pub fn kl_flops(graph: &Graph, windows: usize, seq: usize, formats: usize) -> f64 {
    let layers = graph.spec().num_layers;
    let mut stages = stage_flops(graph, seq);
    stages[layers] += LSE_FLOPS * graph.spec().vocab_size as f64;
    // Suffix sums: the cost of a forward starting at each stage.
    let mut from = vec![0.0f64; layers + 2];
    for s in (0..=layers).rev() {
        from[s] = from[s + 1] + stages[s];
    }
    let variants: f64 = graph
        .linears()
        .map(|(id, l)| {
            let stage = match l.kind {
                LinearKind::LmHead => layers,
                _ => graph.node(id).layer.unwrap_or(layers),
            };
            from[stage]
        })
        .sum();
    (windows * seq) as f64 * (from[0] + formats as f64 * variants)
}

/// This machine's f32 product throughput on the rayon pool, in GFLOP/s: a `256 x k x 4k`
/// product (`k` the model's hidden size) timed for about 0.2 s after one warm-up.
pub fn measure_gflops(k: usize) -> f64 {
    let (m, n) = (256, 4 * k);
    let x = Mat::from_vec(m, k, (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect());
    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.01).collect();
    std::hint::black_box(matmul_wt(&x, &w, n));
    let start = Instant::now();
    let mut reps = 0;
    while start.elapsed().as_secs_f64() < 0.2 {
        std::hint::black_box(matmul_wt(&x, &w, n));
        reps += 1;
    }
    2.0 * (m * k * n * reps) as f64 / start.elapsed().as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::tiny_spec;
    use crate::model::Architecture;

    #[test]
    fn costs_grow_with_tokens_and_formats_and_the_kl_pass_counts_suffixes() {
        let g = Graph::build(&tiny_spec(Architecture::Llama));
        let e1 = eps_flops(&g, 100, 50, 1);
        assert!(eps_flops(&g, 200, 50, 1) > e1 && eps_flops(&g, 100, 50, 3) > e1);
        // Gram: quadratic in K, linear in tokens; direct: linear in both.
        assert_eq!(
            weight_only_flops(8, &[4], 10, 1),
            (4.0 * 64.0 * 10.0 + 4.0 * 4.0 * 64.0, 2.0 * 10.0 * 4.0 * 8.0)
        );
        // With one format, the variants of a 2-block model start at stages 0, 0, .., 1, .., 2:
        // more than one and less than (layers + 1) full forwards per linear layer.
        let forward: f64 =
            stage_flops(&g, 32).iter().sum::<f64>() + LSE_FLOPS * g.spec().vocab_size as f64;
        let per_variant = kl_flops(&g, 1, 32, 1) / 32.0 / forward - 1.0;
        let linears = g.linears().count() as f64;
        assert!(
            per_variant > 0.3 * linears && per_variant < linears,
            "{per_variant}"
        );
        assert_eq!(kl_flops(&g, 2, 32, 3), 2.0 * kl_flops(&g, 1, 32, 3));
    }
}
