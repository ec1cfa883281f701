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
/// on the fly (`None`: activations stay in the schedule's activation type).
///
/// Written `WEIGHTS` or `WEIGHTS+ACTIVATIONS` (`fp8`, `fp8+fp8`), with the engines' names
/// `w8a8` (= `fp8+fp8`) and `w4a4` (= `nvfp4+nvfp4`) accepted on input: the one spelling of a
/// planner menu entry, a plan's menu and a report's column. Serialized as that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LinearPrecision {
    pub weights: Format,
    pub activations: Option<Format>,
}

impl LinearPrecision {
    pub fn weight_only(weights: Format) -> Self {
        LinearPrecision {
            weights,
            activations: None,
        }
    }

    /// Weights and activations both in `format` (W8A8 for FP8).
    pub fn both(format: Format) -> Self {
        LinearPrecision {
            weights: format,
            activations: Some(format),
        }
    }

    /// FP8 weights with FP8 activations: the one activation quantization the generated
    /// kernels run (`LinearShape::w8a8`).
    pub fn is_w8a8(self) -> bool {
        self == LinearPrecision::both(Format::Fp8)
    }
}

impl std::fmt::Display for LinearPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.activations {
            Some(a) => write!(f, "{}+{a}", self.weights),
            None => write!(f, "{}", self.weights),
        }
    }
}

impl std::str::FromStr for LinearPrecision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "w8a8" => return Ok(LinearPrecision::both(Format::Fp8)),
            "w4a4" => return Ok(LinearPrecision::both(Format::Nvfp4)),
            _ => {}
        }
        Ok(match s.split_once('+') {
            Some((w, a)) => LinearPrecision {
                weights: w.parse()?,
                activations: Some(a.parse()?),
            },
            None => LinearPrecision::weight_only(s.parse()?),
        })
    }
}

impl TryFrom<String> for LinearPrecision {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<LinearPrecision> for String {
    fn from(p: LinearPrecision) -> String {
        p.to_string()
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
