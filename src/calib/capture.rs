//! The eps pass: streams the calibration windows through the model one stage at a time (each
//! decoder block, then the head: final norm and lm_head) and, for every linear layer of the
//! stage, compares its full-precision output with the output of the same input through the
//! quantized weights (and quantized activations). lm_head's record has `layer` = the number of
//! blocks (the stage after the last block).
//!
//! Memory: the residual stream of every calibration token (`tokens x hidden` FP32), one
//! block's weights in FP32 plus one fake-quantized copy per format, and the activations of one
//! window inside one block.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, Node, NodeId, Op};
use crate::lower::{LinearPrecision, PrecisionMap};
use crate::model::WeightSource;
use crate::runtime::cpu::{CpuModel, LinearWeights, Mat, Run};

use super::{LayerCalibration, LayerMetrics};

/// Running sums of squares for one layer in one format.
#[derive(Default, Clone, Copy)]
struct Sums {
    reference: f64,
    weight_only: f64,
    weight_act: f64,
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

/// The quantized variants of one linear layer: per format, weight-only and W+A.
struct Variants {
    per_format: Vec<(Format, LinearWeights, LinearWeights)>,
}

/// Runs the eps pass over `windows`; `progress(done, total)` is called after each stage and
/// window. Returns one record per linear layer, lm_head included (no `kl` yet), in graph order.
pub fn measure_eps(
    graph: &Graph,
    weights: &dyn WeightSource,
    windows: &[&[u32]],
    formats: &[Format],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerCalibration>> {
    let spec = graph.spec();
    let layers = spec.num_layers;
    let total = (layers + 1) * windows.len();
    let none = PrecisionMap::new();
    let block_input = |i: usize| graph.block_input(i).expect("every block has an input node");
    // The residual stream entering block 0 of every window.
    let embed = CpuModel::load_where(graph, weights, &none, &|n| {
        matches!(n.op, Op::Embedding { .. })
    })?;
    let mut hidden: Vec<Mat> = windows
        .iter()
        .map(|w| {
            let run = Run {
                until: Some(block_input(0)),
                ..Run::default()
            };
            embed.execute(w, run, &mut |_, _, _| {})
        })
        .collect::<Result<_>>()?;
    drop(embed);

    // Stage of a node: its block, or `layers` for the head (final norm, lm_head).
    let stage_of = |n: &Node| n.layer.unwrap_or(layers);
    let mut records = Vec::new();
    for layer in 0..=layers {
        let block = CpuModel::load_where(graph, weights, &none, &|n| {
            stage_of(n) == layer && !matches!(n.op, Op::Embedding { .. })
        })?;
        let mut variants: BTreeMap<NodeId, Variants> = BTreeMap::new();
        let mut weight_error: BTreeMap<(NodeId, Format), f64> = BTreeMap::new();
        for (id, l) in graph
            .linears()
            .filter(|(id, _)| stage_of(graph.node(*id)) == layer)
        {
            let full = block.linear(id).expect("block weights loaded");
            let per_format = formats
                .iter()
                .map(|&f| {
                    let wo = full.quantized(l, LinearPrecision::weight_only(f));
                    weight_error.insert((id, f), relative_weight_error(&full.weight, &wo.weight));
                    let wa = LinearWeights {
                        activations: Some(f),
                        ..wo.clone()
                    };
                    (f, wo, wa)
                })
                .collect();
            variants.insert(id, Variants { per_format });
        }
        let mut sums: BTreeMap<(NodeId, Format), Sums> = BTreeMap::new();
        for (w, window) in windows.iter().enumerate() {
            let run = Run {
                from: Some((
                    block_input(layer),
                    std::mem::replace(&mut hidden[w], Mat::zeros(0, 0)),
                )),
                // The head stage runs to the logits.
                until: graph.block_output(layer),
                replace: None,
            };
            let mut observe = |id: NodeId, x: &Mat, y: &Mat| {
                let Op::Linear(l) = &graph.node(id).op else {
                    return;
                };
                let Some(v) = variants.get(&id) else { return };
                let bias_sq: f64 = match &block.linear(id).and_then(|lw| lw.bias.clone()) {
                    // ||X W^T||: the output without its bias.
                    Some(b) => y
                        .data
                        .chunks(l.out_features)
                        .flat_map(|row| {
                            row.iter()
                                .zip(b.iter())
                                .map(|(&v, &b)| ((v - b) as f64).powi(2))
                        })
                        .sum(),
                    None => y.data.iter().map(|&v| (v as f64).powi(2)).sum(),
                };
                for (f, wo, wa) in &v.per_format {
                    let s = sums.entry((id, *f)).or_default();
                    s.reference += bias_sq;
                    s.weight_only += sum_sq_diff(&wo.apply(l.out_features, x), y);
                    s.weight_act += sum_sq_diff(&wa.apply(l.out_features, x), y);
                }
            };
            let out = block.execute(window, run, &mut observe)?;
            if layer < layers {
                hidden[w] = out;
            }
            progress(layer * windows.len() + w + 1, total);
        }
        for id in variants.keys() {
            let node = graph.node(*id);
            let Op::Linear(l) = &node.op else { continue };
            let mut metrics = BTreeMap::new();
            for &f in formats {
                let s = sums.get(&(*id, f)).copied().unwrap_or_default();
                if s.reference.is_nan() || s.reference <= 0.0 {
                    return Err(Error::Layer {
                        layer: node.name.clone(),
                        reason: "its full-precision output is zero on the calibration text; eps is undefined".into(),
                    });
                }
                metrics.insert(
                    f,
                    LayerMetrics {
                        eps: (s.weight_only / s.reference).sqrt(),
                        eps_wa: (s.weight_act / s.reference).sqrt(),
                        weight_error: weight_error[&(*id, f)],
                        kl: None,
                    },
                );
            }
            records.push(LayerCalibration {
                name: node.name.clone(),
                layer,
                kind: l.kind,
                out_features: l.out_features,
                in_features: l.in_features,
                metrics,
            });
        }
    }
    Ok(records)
}
