//! Latency: what one decode (or batched) step of each linear layer costs in each format.
//!
//! A [`LatencyModel`] answers "how many seconds does layer `l` take in format `f`" for one
//! step of `batch` tokens. Three sources implement it, and every plan and report records which
//! one it used as a [`LatencySource`]:
//! - [`KernelCost`] (the default): what fpx's own generated kernels cost on a named GPU,
//!   computed from the plan's schedule (each kernel's bytes, FLOPs, decode instructions and
//!   instruction path: [`crate::lower::Schedule::work`]);
//! - [`Roofline`]: the datasheet roofline of a named GPU ([`Gpu`]), the hardware's bound: per
//!   layer `max(bytes / bandwidth, flops / peak(format)) + launch overhead`;
//! - [`Profile`]: a measured profile file (`fpx profile` writes it on a GPU; schema in
//!   `docs/planner.md` and [`profile`]), per layer name and format, in seconds. When there is
//!   one it overrides both models.
//!
//! Each also gives the latency of the rest of the step that no plan changes (attention, norms,
//! embedding, argmax, unplanned layers), so speedups can be stated end to end.

pub mod kernels;
pub mod measured;
pub mod percentiles;
pub mod profile;
pub mod roofline;

use serde::{Deserialize, Serialize};

use crate::calib::Calibration;
use crate::error::Result;
use crate::ir::LinearKind;
use crate::lower::LinearPrecision;

pub use kernels::{KernelCost, KernelRow};
pub use percentiles::{Percentile, Percentiles};
pub use profile::Profile;
pub use roofline::{Gpu, GpuSpec, Roofline};

/// The shape of one planned linear layer, as the latency models need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Linear node name, e.g. `model.layers.3.mlp.down_proj`.
    pub name: String,
    /// Decoder block index.
    pub layer: usize,
    pub kind: LinearKind,
    pub out_features: usize,
    pub in_features: usize,
}

impl LayerShape {
    /// Every linear layer of `graph` (lm_head included, as the stage after the last block).
    pub fn of_graph(graph: &crate::ir::Graph) -> Vec<LayerShape> {
        let blocks = graph.spec().num_layers;
        graph
            .linears()
            .map(|(id, l)| {
                let node = graph.node(id);
                LayerShape {
                    name: node.name.clone(),
                    layer: node.layer.unwrap_or(blocks),
                    kind: l.kind,
                    out_features: l.out_features,
                    in_features: l.in_features,
                }
            })
            .collect()
    }

    /// The shapes of every layer a calibration file measured, in its order.
    pub fn from_calibration(calib: &Calibration) -> Vec<LayerShape> {
        calib
            .layers
            .iter()
            .map(|l| LayerShape {
                name: l.name.clone(),
                layer: l.layer,
                kind: l.kind,
                out_features: l.out_features,
                in_features: l.in_features,
            })
            .collect()
    }
}

/// Where latencies came from. Recorded in every plan and sweep report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LatencySource {
    /// The cost model of fpx's generated kernels on a named GPU.
    Kernels {
        device: String,
        device_name: String,
        /// The CUDA target the kernels are priced for (`sm_90`, ...).
        arch: String,
        batch: usize,
        context: usize,
        /// GPUs the model is sharded over (tensor parallelism; 1 = one GPU).
        #[serde(default = "one", skip_serializing_if = "is_one")]
        tensor_parallel: usize,
        /// Element type of the activations and KV cache priced (plans written before 16-bit
        /// activations priced FP32).
        #[serde(default)]
        activations: crate::lower::ActDtype,
    },
    /// Datasheet roofline of a named GPU (the hardware's bound).
    Roofline {
        /// The GPU's short name (`h100`, `b200`, ...).
        device: String,
        /// Its full name and memory, e.g. `NVIDIA H100 SXM5 80GB`.
        device_name: String,
        /// Tokens per step (sequences decoding one token each; 1 = single-stream decode).
        batch: usize,
        /// Tokens of context each sequence attends to.
        context: usize,
    },
    /// A measured profile file.
    Profile {
        /// Device the profile was measured on, as the file says.
        device: String,
        /// Path of the profile file, as given.
        path: String,
        /// SHA-256 of the profile file's bytes.
        sha256: String,
        batch: usize,
        context: usize,
        /// The statistic of each layer's measured distribution used (the median unless a
        /// plan budgets on a tail percentile).
        #[serde(default, skip_serializing_if = "Percentile::is_median")]
        percentile: Percentile,
    },
}

impl std::fmt::Display for LatencySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LatencySource::Kernels {
                device_name,
                arch,
                batch,
                context,
                tensor_parallel,
                activations,
                ..
            } => {
                write!(
                    f,
                    "fpx kernel cost model of {device_name}, {arch} (batch {batch}, context {context}, {activations} activations"
                )?;
                if *tensor_parallel > 1 {
                    write!(f, ", tensor parallel {tensor_parallel}")?;
                }
                write!(f, ")")
            }
            LatencySource::Roofline {
                device_name,
                batch,
                context,
                ..
            } => write!(
                f,
                "datasheet roofline of {device_name} (batch {batch}, context {context})"
            ),
            LatencySource::Profile {
                device,
                path,
                batch,
                context,
                percentile,
                ..
            } => {
                write!(
                    f,
                    "measured profile {path} on {device} (batch {batch}, context {context}"
                )?;
                if !percentile.is_median() {
                    write!(f, ", {percentile} of each kernel's samples")?;
                }
                write!(f, ")")
            }
        }
    }
}

fn one() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

impl LatencySource {
    /// GPUs the latencies assume the model is sharded over (1 unless a kernel cost model with
    /// tensor parallelism made them).
    pub fn tensor_parallel(&self) -> usize {
        match self {
            LatencySource::Kernels {
                tensor_parallel, ..
            } => *tensor_parallel,
            _ => 1,
        }
    }
}

/// Per-layer latency of each precision (weight format, and activation format when
/// activations are quantized too). Open behaviour: a trait, so other sources (a simulator, a
/// remote profiler) can plug in.
pub trait LatencyModel {
    /// Which source this is, for plans and reports.
    fn source(&self) -> LatencySource;

    /// Seconds one step of `layer` takes in `precision`. Errors name the layer and precision
    /// when the source does not cover them.
    fn latency(&self, layer: &LayerShape, precision: LinearPrecision) -> Result<f64>;

    /// Seconds of the step spent outside the planned layers (attention over the context,
    /// norms, ...), which no plan changes. `layers` are all planned layers of the model.
    fn fixed_latency(&self, layers: &[LayerShape]) -> f64;

    /// Checks that every (layer, precision) pair can be answered, naming the first few that
    /// cannot.
    fn check_covers(&self, layers: &[LayerShape], precisions: &[LinearPrecision]) -> Result<()> {
        for l in layers {
            for &p in precisions {
                self.latency(l, p)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_say_what_they_are() {
        let r = LatencySource::Roofline {
            device: "h100".into(),
            device_name: "NVIDIA H100 SXM5 80GB".into(),
            batch: 1,
            context: 512,
        };
        assert_eq!(
            r.to_string(),
            "datasheet roofline of NVIDIA H100 SXM5 80GB (batch 1, context 512)"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kind"], "roofline");
        let back: LatencySource = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }
}
