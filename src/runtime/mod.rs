//! Execution backends. `cpu` is the FP32 reference: it runs the IR with each linear layer's
//! weights (and optionally activations) fake-quantized to the format a precision map assigns.

pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod exec;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, Op};

/// Precision of one linear layer: weight format, and the format activations are quantized to
/// on the fly (`None`: activations stay FP32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearPrecision {
    pub weights: Format,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<Format>,
}

impl LinearPrecision {
    pub fn weight_only(weights: Format) -> Self {
        LinearPrecision {
            weights,
            activations: None,
        }
    }
}

/// Linear node name -> precision. Layers absent from the map run in full FP32 precision.
pub type PrecisionMap = BTreeMap<String, LinearPrecision>;

/// Checks that every layer `precision` names is a linear layer of `graph`: a plan made for
/// another model must not silently run at full precision.
pub fn check_precision_targets(graph: &Graph, precision: &PrecisionMap) -> Result<()> {
    for name in precision.keys() {
        if !matches!(
            graph.find(name).map(|id| &graph.node(id).op),
            Some(Op::Linear(_))
        ) {
            return Err(Error::Layer {
                layer: name.clone(),
                reason: "the precision map names a layer that is not a linear layer of this model"
                    .into(),
            });
        }
    }
    Ok(())
}
