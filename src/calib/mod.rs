//! Calibration: how much each linear layer suffers in each format, measured on real text.
//!
//! Per linear layer `l` and format `f`, over the calibration windows:
//! - `eps`: `||X W^T - X Q_f(W)^T||_F / ||X W^T||_F`, `X` the layer's inputs captured from the
//!   full-precision forward pass (the FPX paper's metric);
//! - `eps_wa`: the same with the activations quantized to `f` as well (W+A);
//! - `weight_error`: `||W - Q_f(W)||_F / ||W||_F`, data-free;
//! - `kl` (optional): mean KL divergence of the next-token distribution, on held-out windows,
//!   when only layer `l` is in format `f`;
//! - `kl_wa` (optional, `calibrate --kl-activations`): the same with `l`'s activations
//!   quantized to `f` as well (the KL objective's error of a W+A plan entry such as W8A8).
//!
//! Both passes stream the model one stage (a decoder block, or the head) at a time, so only
//! one stage's weights are in memory: the eps pass ([`capture`]; weight-only eps from Gram
//! matrices, [`gram`]) and the KL pass ([`sensitivity`]; every variant's forward starts at its
//! own stage, and the perturbed streams cross later stages in batches). [`mod@file`] is the
//! versioned calibration file.

pub mod capture;
pub mod cost;
pub mod file;
pub mod forwards;
pub mod gram;
pub mod kernel_stages;
pub mod sensitivity;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::formats::Format;
use crate::ir::{Graph, LinearKind, Node, Op};
use crate::lower::PrecisionMap;
use crate::model::WeightSource;
use crate::runtime::cpu::{CpuModel, Mat, Run};

pub use forwards::{CpuForwards, Stage, StageForwards};
pub use kernel_stages::KernelStages;

pub(crate) use file::legacy_mx_scale_rule;
pub use file::{Calibration, KlSetup, ModelRef, TextRef, SCHEMA_VERSION};

/// Metrics of one layer in one format.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub eps: f64,
    pub eps_wa: f64,
    pub weight_error: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_wa: Option<f64>,
}

/// Calibration record of one linear layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCalibration {
    /// Linear node name, e.g. `model.layers.3.mlp.down_proj`.
    pub name: String,
    pub layer: usize,
    pub kind: LinearKind,
    pub out_features: usize,
    pub in_features: usize,
    pub metrics: BTreeMap<Format, LayerMetrics>,
    /// For a MoE expert's projection: the calibration tokens routed to it (its eps is
    /// measured on those alone). Absent for dense layers, which see every token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
}

/// Fewer routed calibration tokens than this make an expert's eps a weak estimate:
/// [`LayerCalibration::undersampled`] flags it, `fpx calibrate` warns. An expert that saw no
/// token at all has no output to compare; its eps and eps_wa are then its relative weight
/// error (the data-free estimate), never a silent zero.
pub const MIN_EXPERT_TOKENS: usize = 32;

impl LayerCalibration {
    /// An expert projection that saw fewer than [`MIN_EXPERT_TOKENS`] calibration tokens.
    pub fn undersampled(&self) -> bool {
        self.tokens.is_some_and(|t| t < MIN_EXPERT_TOKENS)
    }

    /// How sensitive the layer is: its largest KL over the formats when measured, else its
    /// largest eps. Reports sort worst-first by this.
    pub fn sensitivity(&self) -> f64 {
        self.metrics
            .values()
            .map(|m| m.kl.unwrap_or(m.eps))
            .fold(0.0, f64::max)
    }
}

/// The stage a node runs in: its decoder block, or the number of blocks for the head (final
/// norm, lm_head). Both passes stream the model one stage at a time.
fn stage_of(graph: &Graph, n: &Node) -> usize {
    n.layer.unwrap_or(graph.spec().num_layers)
}

/// The full-precision parameters of one stage on the host (the embedding excluded).
fn load_stage(graph: &Graph, weights: &dyn WeightSource, stage: usize) -> Result<CpuModel> {
    CpuModel::load_where(graph, weights, &PrecisionMap::new(), &|n| {
        stage_of(graph, n) == stage && !matches!(n.op, Op::Embedding { .. })
    })
}

/// The residual stream entering block 0 of every window (only the embedding is loaded).
fn embed_windows(
    graph: &Graph,
    weights: &dyn WeightSource,
    windows: &[&[u32]],
) -> Result<Vec<Mat>> {
    let embed = CpuModel::load_where(graph, weights, &PrecisionMap::new(), &|n| {
        matches!(n.op, Op::Embedding { .. })
    })?;
    windows
        .iter()
        .map(|w| {
            let run = Run {
                until: graph.block_input(0),
                ..Run::default()
            };
            embed.execute(w, run, &mut |_, _, _| {})
        })
        .collect()
}

/// Spearman rank correlation of two equally long samples (ties get their average rank).
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = (a.len() as f64 + 1.0) / 2.0;
    let (mut num, mut da, mut db) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        num += (x - mean) * (y - mean);
        da += (x - mean).powi(2);
        db += (y - mean).powi(2);
    }
    (da > 0.0 && db > 0.0).then(|| num / (da * db).sqrt())
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_monotone_samples_is_one_and_ties_average() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 90.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }
}
