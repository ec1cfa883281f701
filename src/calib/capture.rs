//! The eps pass: streams the calibration windows through the model one stage at a time (each
//! decoder block, then the head: final norm and lm_head). For every linear layer of the stage
//! it measures the weight-only error `||X D^T||^2` (`D = W - Q_f(W)`) exactly, in whichever of
//! two ways costs fewer flops for the layers sharing that input ([`WeightOnlyMethod`]): from
//! the input's Gram matrix ([`super::gram`], independent of the token count) or as the product
//! `X D^T` of every window; and compares the full-precision output with the output through the
//! quantized weights and quantized activations (W+A eps, which has no such shortcut).
//! lm_head's record has `layer` = the number of blocks (the stage after the last block).
//! On a kernel backend ([`super::Stage::computes_products`]) the products run on its kernels,
//! after each window's forward, and weight-only eps takes the direct method.
//!
//! Memory: the residual stream of every calibration token (`tokens x hidden` FP32), one
//! stage's weights in FP32 plus one fake-quantized copy per format of the current pass (at
//! most [`QUANTIZED_BYTES`], or one format's copy where that alone is larger; the stage's
//! windows are run once per pass), the f64 Gram matrices of the stage's inputs (`8 K^2` bytes
//! each), `W - Q_f(W)` in chunks of 64 MiB, and the activations of one window in one stage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, Linear, NodeId, Op};
use crate::lower::LinearPrecision;
use crate::model::WeightSource;
use crate::runtime::cpu::mat::matmul_wt;
use crate::runtime::cpu::{LinearWeights, Mat};

use super::forwards::{CpuForwards, StageForwards};
use super::gram::Gram;
use super::{embed_windows, stage_of, LayerCalibration, LayerMetrics};

/// How the weight-only error of the layers reading one input is computed; both are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightOnlyMethod {
    /// Per input, whichever of the two counts fewer flops (the default); on a kernel backend
    /// ([`super::Stage::computes_products`]) the direct products, which run there.
    Cheapest,
    /// `trace(D G D^T)` from the input's Gram matrix `G = X^T X`, in f64 (cheaper when the
    /// tokens outnumber the input width several times).
    Gram,
    /// `||X D^T||^2` from the product of every window with `D`, in f32 (on a kernel backend
    /// `||X Q(W)^T - X W^T||^2`, both products on the device).
    Direct,
}

impl WeightOnlyMethod {
    /// The method for an input of width `k` read by layers of `outs` output rows, over
    /// `tokens` calibration tokens and `formats` formats.
    fn resolve(self, k: usize, outs: &[usize], tokens: usize, formats: usize) -> Self {
        if self != Self::Cheapest {
            return self;
        }
        let (gram, direct) = super::cost::weight_only_flops(k, outs, tokens, formats);
        if gram < direct {
            Self::Gram
        } else {
            Self::Direct
        }
    }
}

/// Bytes of fake-quantized weight copies a stage holds at once. A stage whose copies in
/// every format would exceed it is measured in several passes over its windows, each pass
/// with as many formats as fit (at least one): a 150k-vocabulary lm_head (0.9 GB per copy in
/// FP32) takes one pass per format.
pub const QUANTIZED_BYTES: usize = 1 << 30;

/// Bytes of `W - Q_f(W)` formed at a time.
const DIFF_BYTES: usize = 64 << 20;

/// How the eps pass computes and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpsOptions {
    pub method: WeightOnlyMethod,
    /// Bytes of fake-quantized weight copies held at once (see [`QUANTIZED_BYTES`]).
    pub quantized_bytes: usize,
}

impl Default for EpsOptions {
    fn default() -> Self {
        EpsOptions {
            method: WeightOnlyMethod::Cheapest,
            quantized_bytes: QUANTIZED_BYTES,
        }
    }
}

/// How many formats each pass over a stage measures: per stage (decoder blocks, then the
/// head), the number of formats whose quantized copies of the stage's linear layers fit in
/// `quantized_bytes`, at least one.
pub fn formats_per_pass(graph: &Graph, formats: usize, quantized_bytes: usize) -> Vec<usize> {
    let mut weights = vec![0usize; graph.spec().num_layers + 1];
    for (id, l) in graph.linears() {
        weights[stage_of(graph, graph.node(id))] += l.in_features * l.out_features;
    }
    weights
        .into_iter()
        .map(|w| (quantized_bytes / (4 * w).max(1)).clamp(1, formats.max(1)))
        .collect()
}

/// One linear layer in one format.
struct FormatState {
    format: Format,
    /// The quantized weights with quantized activations (W+A); `D = W - Q_f(W)` is formed
    /// from them in row chunks when needed, so a pass holds one quantized copy per format.
    weight_act: LinearWeights,
    weight_error: f64,
    /// `||X D^T||^2` so far (the direct method).
    weight_only_sq: f64,
    /// `||X W^T - Q(X) Q(W)^T||^2` so far.
    weight_act_sq: f64,
}

impl FormatState {
    /// `full` (a layer's FP32 weights) quantized to `format`, with no sums yet.
    fn new(full: &LinearWeights, l: &Linear, format: Format) -> FormatState {
        let q = full.quantized(l, LinearPrecision::weight_only(format), None);
        FormatState {
            format,
            weight_error: relative_weight_error(&full.weight, &q.weight),
            weight_act: q.with_activations(Some(format)),
            weight_only_sq: 0.0,
            weight_act_sq: 0.0,
        }
    }
}

/// One linear layer of the stage being measured.
struct LayerState {
    input: NodeId,
    out_features: usize,
    in_features: usize,
    weight: Arc<Vec<f32>>,
    bias: Option<Arc<Vec<f32>>>,
    /// `||X W^T||^2` (summed in the first pass).
    reference_sq: f64,
    /// Rows seen (summed in the first pass); counted for MoE experts only.
    tokens: Option<usize>,
    /// The formats of the current pass.
    formats: Vec<FormatState>,
    /// The formats measured in earlier passes.
    metrics: BTreeMap<Format, LayerMetrics>,
}

impl LayerState {
    /// `W - Q_f(W)` of one format in chunks of whole rows (at most [`DIFF_BYTES`] each):
    /// `(rows, data)`.
    fn diff_chunks<'a>(
        &'a self,
        f: &'a FormatState,
    ) -> impl Iterator<Item = (usize, Vec<f32>)> + 'a {
        let k = self.in_features;
        let len = (DIFF_BYTES / (4 * k)).max(1) * k;
        self.weight
            .chunks(len)
            .zip(f.weight_act.weight.chunks(len))
            .map(move |(a, b)| (a.len() / k, a.iter().zip(b).map(|(a, b)| a - b).collect()))
    }

    /// `||X D^T||^2` of one format over every token: from the input's Gram matrix, or the
    /// direct sum of the pass.
    fn weight_only_sq(&self, f: &FormatState, gram: Option<&Gram>) -> f64 {
        match gram {
            Some(g) => self
                .diff_chunks(f)
                .map(|(rows, d)| g.quadratic_form(&d, rows))
                .sum(),
            None => f.weight_only_sq,
        }
    }
}

fn sum_sq(m: &Mat) -> f64 {
    m.data.iter().map(|&v| (v as f64).powi(2)).sum()
}

fn sum_sq_diff(a: &Mat, b: &Mat) -> f64 {
    a.data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum()
}

fn relative_weight_error(w: &[f32], q: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in w.iter().zip(q) {
        num += ((a - b) as f64).powi(2);
        den += (a as f64).powi(2);
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        0.0
    }
}

/// Runs the eps pass over `windows` with the default [`EpsOptions`] on the CPU interpreter.
pub fn measure_eps(
    graph: &Graph,
    weights: &dyn WeightSource,
    windows: &[&[u32]],
    formats: &[Format],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerCalibration>> {
    measure_eps_with(
        graph,
        weights,
        windows,
        formats,
        EpsOptions::default(),
        &mut CpuForwards,
        progress,
    )
}

/// Runs the eps pass over `windows`, its forwards on `forwards`; `progress(done, total)` is
/// called after each stage, pass ([`formats_per_pass`]) and window. Returns one record per
/// linear layer, lm_head included (no `kl` yet), in graph order.
pub fn measure_eps_with(
    graph: &Graph,
    weights: &dyn WeightSource,
    windows: &[&[u32]],
    formats: &[Format],
    options: EpsOptions,
    forwards: &mut dyn StageForwards,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerCalibration>> {
    let layers = graph.spec().num_layers;
    let per_pass = formats_per_pass(graph, formats.len(), options.quantized_bytes);
    let passes: Vec<Vec<&[Format]>> = per_pass
        .iter()
        .map(|&n| formats.chunks(n).collect())
        .collect();
    let total = passes.iter().map(|p| p.len()).sum::<usize>() * windows.len();
    let mut done = 0;
    let tokens: usize = windows.iter().map(|w| w.len()).sum();
    let mut hidden = embed_windows(graph, weights, windows)?;
    let mut records = Vec::new();
    for (stage, passes) in passes.iter().enumerate() {
        let mut block = forwards.load(graph, weights, stage)?;
        let linears: Vec<_> = graph
            .linears()
            .filter(|(id, _)| stage_of(graph, graph.node(*id)) == stage)
            .collect();
        let mut state: BTreeMap<NodeId, LayerState> = BTreeMap::new();
        for &(id, l) in &linears {
            let full = block.linear(id);
            let layer = LayerState {
                input: graph.inputs(id)[0],
                out_features: l.out_features,
                in_features: l.in_features,
                weight: full.weight.clone(),
                bias: full.bias.clone(),
                reference_sq: 0.0,
                tokens: l.expert.map(|_| 0),
                formats: Vec::new(),
                metrics: BTreeMap::new(),
            };
            state.insert(id, layer);
        }
        // Layers reading one input share its method (and its Gram matrix).
        let mut methods: BTreeMap<NodeId, WeightOnlyMethod> = BTreeMap::new();
        for s in state.values() {
            if methods.contains_key(&s.input) {
                continue;
            }
            let outs: Vec<usize> = state
                .values()
                .filter(|o| o.input == s.input)
                .map(|o| o.out_features)
                .collect();
            let m = match options.method {
                // The device runs the products; Gram matrices and traces would run here.
                WeightOnlyMethod::Cheapest if block.computes_products() => WeightOnlyMethod::Direct,
                method => method.resolve(s.in_features, &outs, tokens, formats.len()),
            };
            methods.insert(s.input, m);
        }
        let mut grams: BTreeMap<NodeId, Gram> = BTreeMap::new();
        for (pass, pass_formats) in passes.iter().enumerate() {
            let (first, last) = (pass == 0, pass + 1 == passes.len());
            for &(id, l) in &linears {
                let full = block.linear(id);
                let s = state.get_mut(&id).expect("inserted above");
                s.formats = pass_formats
                    .iter()
                    .map(|&format| FormatState::new(full, l, format))
                    .collect();
            }
            for (w, window) in windows.iter().enumerate() {
                let mut seen: BTreeSet<NodeId> = BTreeSet::new();
                // The head stage runs to the logits; the last pass hands the stream on.
                let x = if last {
                    std::mem::replace(&mut hidden[w], Mat::zeros(0, 0))
                } else {
                    hidden[w].clone()
                };
                // On a kernel backend the products run there, after the forward (which
                // holds the stage), on the inputs and outputs it showed; on the CPU they run
                // here, on the pass's own quantized copies, as each layer is seen.
                let device = block.computes_products();
                let mut shown: Vec<(NodeId, Mat, Mat)> = Vec::new();
                let mut observe = |id: NodeId, x: &Mat, y: &Mat| {
                    let Some(s) = state.get_mut(&id) else { return };
                    let method = methods[&s.input];
                    if first {
                        if method == WeightOnlyMethod::Gram && seen.insert(s.input) {
                            grams
                                .entry(s.input)
                                .or_insert_with(|| Gram::new(x.cols))
                                .add(x);
                        }
                        s.reference_sq += reference_sq(y, s.bias.as_deref(), s.out_features);
                        if let Some(t) = &mut s.tokens {
                            *t += x.rows;
                        }
                    }
                    if device {
                        shown.push((id, x.clone(), y.clone()));
                        return;
                    }
                    for i in 0..s.formats.len() {
                        if method == WeightOnlyMethod::Direct {
                            let sq: f64 = s
                                .diff_chunks(&s.formats[i])
                                .map(|(rows, d)| sum_sq(&matmul_wt(x, &d, rows)))
                                .sum();
                            s.formats[i].weight_only_sq += sq;
                        }
                        let wa = s.formats[i].weight_act.apply(s.out_features, x);
                        s.formats[i].weight_act_sq += sum_sq_diff(&wa, y);
                    }
                };
                let out = block.run(window, x, None, Some(&mut observe))?;
                for (id, x, y) in shown {
                    let s = state.get_mut(&id).expect("only measured layers are kept");
                    let direct = methods[&s.input] == WeightOnlyMethod::Direct;
                    for f in &mut s.formats {
                        if direct {
                            let yq = block.quantized_product(id, f.format, &x, false)?;
                            f.weight_only_sq += sum_sq_diff(&yq, &y);
                        }
                        let wa = block.quantized_product(id, f.format, &x, true)?;
                        f.weight_act_sq += sum_sq_diff(&wa, &y);
                    }
                }
                if last && stage < layers {
                    hidden[w] = out;
                }
                done += 1;
                progress(done, total);
            }
            for s in state.values_mut() {
                let measured = std::mem::take(&mut s.formats);
                for f in &measured {
                    let weight_only = s.weight_only_sq(f, grams.get(&s.input));
                    // An expert no calibration token reached: its weight error stands in.
                    let unseen = s.tokens == Some(0);
                    let relative = |sq: f64| match unseen {
                        true => f.weight_error,
                        false => (sq / s.reference_sq).sqrt(),
                    };
                    s.metrics.insert(
                        f.format,
                        LayerMetrics {
                            eps: relative(weight_only),
                            eps_wa: relative(f.weight_act_sq),
                            weight_error: f.weight_error,
                            kl: None,
                            kl_wa: None,
                        },
                    );
                }
            }
        }
        for (id, s) in state {
            let node = graph.node(id);
            let Op::Linear(l) = &node.op else { continue };
            let unseen = s.tokens == Some(0);
            if !unseen && (s.reference_sq.is_nan() || s.reference_sq <= 0.0) {
                return Err(Error::Layer {
                    layer: node.name.clone(),
                    reason: "its full-precision output is zero on the calibration text; eps is undefined".into(),
                });
            }
            records.push(LayerCalibration {
                name: node.name.clone(),
                layer: stage,
                kind: l.kind,
                out_features: l.out_features,
                in_features: l.in_features,
                metrics: s.metrics,
                tokens: s.tokens,
            });
        }
    }
    Ok(records)
}

/// `||X W^T||^2` of one window: the squared output `y` without its bias.
fn reference_sq(y: &Mat, bias: Option<&Vec<f32>>, out_features: usize) -> f64 {
    match bias {
        Some(b) => y
            .data
            .chunks(out_features)
            .flat_map(|row| {
                row.iter()
                    .zip(b.iter())
                    .map(|(&v, &b)| ((v - b) as f64).powi(2))
            })
            .sum(),
        None => sum_sq(y),
    }
}
