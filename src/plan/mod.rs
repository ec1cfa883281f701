//! Precision plans: which format each linear layer uses. A plan is a versioned JSON file;
//! readers refuse other schema versions and plans made for another model.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::runtime::{LinearPrecision, PrecisionMap};

/// The plan schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// One linear layer's assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanLayer {
    /// Linear node name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub format: Format,
    /// Dynamic activation format, when activations are quantized too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<Format>,
}

/// A per-layer precision assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub schema_version: u32,
    /// Identity hash of the model the plan was made for (`None`: any model with these layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub layers: Vec<PlanLayer>,
}

impl Plan {
    /// Reads and validates a plan file.
    pub fn read(path: &Path) -> Result<Plan> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let err = |reason: String| Error::File {
            path: path.to_path_buf(),
            what: "plan",
            reason,
        };
        let raw: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
        let version = raw.get("schema_version").and_then(|v| v.as_u64());
        if version != Some(SCHEMA_VERSION as u64) {
            return Err(err(format!(
                "schema_version is {}, this fpx reads version {SCHEMA_VERSION}",
                version.map_or("missing".to_string(), |v| v.to_string())
            )));
        }
        let plan: Plan = serde_json::from_value(raw).map_err(|e| err(e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for l in &plan.layers {
            if !seen.insert(&l.name) {
                return Err(err(format!("layer `{}` is assigned twice", l.name)));
            }
        }
        Ok(plan)
    }

    /// Checks the plan against a model's identity hash.
    pub fn check_model(&self, path: &Path, identity: &str) -> Result<()> {
        match &self.model {
            Some(m) if m != identity => Err(Error::File {
                path: path.to_path_buf(),
                what: "plan",
                reason: format!("made for model {m}, but the model given has identity {identity}"),
            }),
            _ => Ok(()),
        }
    }

    /// The layer -> precision map the CPU backend takes.
    pub fn precision_map(&self) -> PrecisionMap {
        self.layers
            .iter()
            .map(|l| {
                let p = LinearPrecision {
                    weights: l.format,
                    activations: l.activations,
                };
                (l.name.clone(), p)
            })
            .collect()
    }
}
