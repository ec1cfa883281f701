//! The eps pass: streams the calibration windows through the model one stage at a time (each
//! decoder block, then the head: final norm and lm_head). For every linear layer of the stage
//! it measures the weight-only error `||X D^T||^2` (`D = W - Q_f(W)`) exactly, in whichever of
//! two ways costs fewer flops for the layers sharing that input ([`WeightOnlyMethod`]): from
//! the input's Gram matrix ([`super::gram`], independent of the token count) or as the product
//! `X D^T` of every window; and compares the full-precision output with the output through the
//! quantized weights and quantized activations (W+A eps, which has no such shortcut).
//! lm_head's record has `layer` = the number of blocks (the stage after the last block).
//!
//! Memory: the residual stream of every calibration token (`tokens x hidden` FP32), one
//! block's weights in FP32 plus one fake-quantized copy per format, the f64 Gram matrices of
//! the block's inputs (`8 K^2` bytes each), and the activations of one window inside one block.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, NodeId, Op};
use crate::lower::LinearPrecision;
use crate::model::WeightSource;
use crate::runtime::cpu::mat::matmul_wt;
use crate::runtime::cpu::{LinearWeights, Mat};

use super::gram::Gram;
use super::{embed_windows, load_stage, stage_of, stage_run, LayerCalibration, LayerMetrics};

/// How the weight-only error of the layers reading one input is computed; both are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightOnlyMethod {
    /// Per input, whichever of the two counts fewer flops (the default).
    Cheapest,
    /// `trace(D G D^T)` from the input's Gram matrix `G = X^T X`, in f64 (cheaper when the
    /// tokens outnumber the input width several times).
    Gram,
    /// `||X D^T||^2` from the product of every window with `D`, in f32.
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

/// One linear layer in one format.
struct FormatState {
    format: Format,
    /// The quantized weights with quantized activations (W+A); `D = W - Q_f(W)` is formed
    /// from them when needed, so a stage holds one quantized copy per format, not two.
    weight_act: LinearWeights,
    weight_error: f64,
    /// `||X D^T||^2` so far (the direct method).
    weight_only_sq: f64,
    /// `||X W^T - Q(X) Q(W)^T||^2` so far.
    weight_act_sq: f64,
}

/// One linear layer of the stage being measured.
struct LayerState {
    input: NodeId,
    out_features: usize,
    in_features: usize,
    weight: Arc<Vec<f32>>,
    bias: Option<Arc<Vec<f32>>>,
    /// `||X W^T||^2` so far.
    reference_sq: f64,
    formats: Vec<FormatState>,
}

impl LayerState {
    /// `W - Q_f(W)` of one format.
    fn diff(&self, f: &FormatState) -> Vec<f32> {
        self.weight
            .iter()
            .zip(f.weight_act.weight.iter())
            .map(|(a, b)| a - b)
            .collect()
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

/// Runs the eps pass over `windows` with the default [`WeightOnlyMethod::Cheapest`].
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
        WeightOnlyMethod::Cheapest,
        progress,
    )
}

/// Runs the eps pass over `windows`; `progress(done, total)` is called after each stage and
/// window. Returns one record per linear layer, lm_head included (no `kl` yet), in graph order.
pub fn measure_eps_with(
    graph: &Graph,
    weights: &dyn WeightSource,
    windows: &[&[u32]],
    formats: &[Format],
    method: WeightOnlyMethod,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerCalibration>> {
    let spec = graph.spec();
    let layers = spec.num_layers;
    let total = (layers + 1) * windows.len();
    let tokens: usize = windows.iter().map(|w| w.len()).sum();
    let mut hidden = embed_windows(graph, weights, windows)?;
    let mut records = Vec::new();
    for stage in 0..=layers {
        let block = load_stage(graph, weights, stage)?;
        let mut state: BTreeMap<NodeId, LayerState> = BTreeMap::new();
        for (id, l) in graph
            .linears()
            .filter(|(id, _)| stage_of(graph, graph.node(*id)) == stage)
        {
            let full = block.linear(id).expect("block weights loaded");
            let formats = formats
                .iter()
                .map(|&format| {
                    let q = full.quantized(l, LinearPrecision::weight_only(format));
                    FormatState {
                        format,
                        weight_error: relative_weight_error(&full.weight, &q.weight),
                        weight_act: LinearWeights {
                            activations: Some(format),
                            ..q
                        },
                        weight_only_sq: 0.0,
                        weight_act_sq: 0.0,
                    }
                })
                .collect();
            let layer = LayerState {
                input: graph.inputs(id)[0],
                out_features: l.out_features,
                in_features: l.in_features,
                weight: full.weight.clone(),
                bias: full.bias.clone(),
                reference_sq: 0.0,
                formats,
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
            let m = method.resolve(s.in_features, &outs, tokens, formats.len());
            methods.insert(s.input, m);
        }
        let mut grams: BTreeMap<NodeId, Gram> = BTreeMap::new();
        for (w, window) in windows.iter().enumerate() {
            let mut seen: BTreeSet<NodeId> = BTreeSet::new();
            // The head stage runs to the logits.
            let x = std::mem::replace(&mut hidden[w], Mat::zeros(0, 0));
            let run = stage_run(graph, stage, x);
            let mut observe = |id: NodeId, x: &Mat, y: &Mat| {
                let Some(s) = state.get_mut(&id) else { return };
                let method = methods[&s.input];
                if method == WeightOnlyMethod::Gram && seen.insert(s.input) {
                    grams
                        .entry(s.input)
                        .or_insert_with(|| Gram::new(x.cols))
                        .add(x);
                }
                // ||X W^T||: the output without its bias.
                s.reference_sq += match &s.bias {
                    Some(b) => y
                        .data
                        .chunks(s.out_features)
                        .flat_map(|row| {
                            row.iter()
                                .zip(b.iter())
                                .map(|(&v, &b)| ((v - b) as f64).powi(2))
                        })
                        .sum(),
                    None => sum_sq(y),
                };
                for i in 0..s.formats.len() {
                    if method == WeightOnlyMethod::Direct {
                        let d = s.diff(&s.formats[i]);
                        s.formats[i].weight_only_sq += sum_sq(&matmul_wt(x, &d, s.out_features));
                    }
                    let wa = s.formats[i].weight_act.apply(s.out_features, x);
                    s.formats[i].weight_act_sq += sum_sq_diff(&wa, y);
                }
            };
            let out = block.execute(window, run, &mut observe)?;
            if stage < layers {
                hidden[w] = out;
            }
            progress(stage * windows.len() + w + 1, total);
        }
        for (id, s) in &state {
            let node = graph.node(*id);
            let Op::Linear(l) = &node.op else { continue };
            if s.reference_sq.is_nan() || s.reference_sq <= 0.0 {
                return Err(Error::Layer {
                    layer: node.name.clone(),
                    reason: "its full-precision output is zero on the calibration text; eps is undefined".into(),
                });
            }
            let mut metrics = BTreeMap::new();
            for f in &s.formats {
                let weight_only = match grams.get(&s.input) {
                    Some(g) => g.quadratic_form(&s.diff(f), s.out_features),
                    None => f.weight_only_sq,
                };
                metrics.insert(
                    f.format,
                    LayerMetrics {
                        eps: (weight_only / s.reference_sq).sqrt(),
                        eps_wa: (f.weight_act_sq / s.reference_sq).sqrt(),
                        weight_error: f.weight_error,
                        kl: None,
                    },
                );
            }
            records.push(LayerCalibration {
                name: node.name.clone(),
                layer: stage,
                kind: l.kind,
                out_features: l.out_features,
                in_features: l.in_features,
                metrics,
            });
        }
    }
    Ok(records)
}
