//! The lowering: the one description of how a plan executes, below both `codegen` (which
//! renders its kernels as strings) and `runtime` (whose backends run it), and read by
//! `latency` (which prices its kernels).
//!
//! - [`PrecisionMap`]: the format of each linear layer (what a plan says, as execution needs it);
//! - [`Schedule::build`]: IR graph + precision map -> the ordered steps of a forward pass,
//!   each step's activation buffers taken from the graph's edges, each bound to the
//!   [`KernelSpec`]s it launches;
//! - [`Schedule::work`]: what each step's kernel moves and computes, and on which
//!   [`InstructionPath`] (the latency model prices exactly this);
//! - [`Arch`]: the real GPU targets, as data (which instructions each chip has).
//!
//! Layering (nothing imports upward): formats -> model -> ir -> lower -> calib / latency /
//! solve / plan -> codegen -> runtime -> cli. See `docs/architecture.md`.

pub mod arch;
pub mod dtype;
pub mod fused;
pub mod moe;
pub mod schedule;
pub mod spec;
pub mod split_kv;
pub mod step;
pub mod work;

pub use arch::{Arch, DeviceTarget};
pub use dtype::ActDtype;
pub use schedule::{
    Act, Dims, LinearSlot, MoeSlot, NormSlot, Param, QkNorm, Schedule, Step, StepLaunch,
};
pub use spec::{KernelSpec, LinearShape, WeightFormat, GEMV_MAX_ROWS, GEMV_ROW_TILES};
pub use work::{
    decode_instructions_per_weight, linear_weight_bytes, linear_work, InstructionPath, KernelWork,
};

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
