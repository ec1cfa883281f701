//! The calibration file: versioned JSON with the identity and shape ([`ModelSpec`]) of the
//! model and the text it was measured on, the settings, and one record per linear layer of
//! the model, lm_head included. Readers refuse other schema versions and records that do not
//! match the model's graph; planners refuse a calibration made for another model. The spec
//! lets a planner lower the model's schedule (and price its kernels) without the weights.
//!
//! Version 2 added `spec` and the lm_head record; version 1 files are refused with a hint to
//! recalibrate.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::{Format, MxScaleRule};
use crate::ir::{Graph, Op};
use crate::model::ModelSpec;

use super::LayerCalibration;

/// The calibration schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Identity hash of the model (config and tensor headers).
    pub identity: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextRef {
    /// SHA-256 of the text (all files joined, as tokenized).
    pub sha256: String,
    pub path: String,
    /// Tokens of the text used by the eps pass.
    pub tokens: usize,
}

/// Settings of the KL pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlSetup {
    pub seq_len: usize,
    pub windows: usize,
    /// Predicted tokens the KL is averaged over.
    pub tokens: usize,
    /// The W+A variants were measured too (`kl_wa`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub activations: bool,
}

/// A calibration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub schema_version: u32,
    pub fpx_version: String,
    pub model: ModelRef,
    /// The model's hyper-parameters (its graph, schedule and layer shapes follow from them).
    pub spec: ModelSpec,
    pub text: TextRef,
    pub seq_len: usize,
    pub windows: usize,
    pub formats: Vec<Format>,
    /// The MXFP4 scale rule the quantizers used. Required: schema-1 files (made before the
    /// rule was selectable, with the OCP floor rule) are refused by version, so a calibration
    /// is never read under a rule it was not made with.
    pub mx_scale_rule: MxScaleRule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<KlSetup>,
    pub layers: Vec<LayerCalibration>,
}

/// The rule every fpx before the selectable rule used: OCP MX v1.0's floor (what a plan
/// without a recorded rule means).
pub(crate) fn legacy_mx_scale_rule() -> MxScaleRule {
    MxScaleRule::OcpFloor
}

impl Calibration {
    /// Reads a calibration file, refusing other schema versions.
    pub fn read(path: &Path) -> Result<Calibration> {
        Self::parse(&crate::fsutil::read_regular(path)?, path)
    }

    /// Parses and validates calibration bytes (`path` names them in errors): known schema,
    /// every layer once with metrics for every format and a shape whose size is computable,
    /// formats listed once.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Calibration> {
        let err = |reason: String| Error::File {
            path: path.to_path_buf(),
            what: "calibration",
            reason,
        };
        let raw =
            crate::fsutil::parse_versioned_json(bytes, path, "calibration", &[SCHEMA_VERSION])?;
        let calib: Calibration = serde_json::from_value(raw).map_err(|e| err(e.to_string()))?;
        let mut formats = std::collections::BTreeSet::new();
        if let Some(f) = calib.formats.iter().find(|&&f| !formats.insert(f)) {
            return Err(err(format!("formats: {f} is listed twice")));
        }
        let mut names = std::collections::BTreeSet::new();
        for l in &calib.layers {
            if !names.insert(l.name.as_str()) {
                return Err(err(format!("layer `{}` appears twice", l.name)));
            }
            crate::limits::tensor_elements(&[l.out_features, l.in_features]).map_err(|e| {
                err(format!(
                    "layer `{}`: out_features x in_features: {e}",
                    l.name
                ))
            })?;
            if let Some(f) = calib.formats.iter().find(|f| !l.metrics.contains_key(f)) {
                return Err(err(format!(
                    "layer `{}` has no metrics for format {f}",
                    l.name
                )));
            }
        }
        // The spec must be one fpx builds a graph for, and every record a layer of it.
        crate::model::config::validate_spec(&calib.spec).map_err(|e| err(format!("spec: {e}")))?;
        calib.check_layers().map_err(err)?;
        Ok(calib)
    }

    /// The model's graph.
    pub fn graph(&self) -> Graph {
        Graph::build(&self.spec)
    }

    /// Every record names a linear layer of the spec's graph, with its shape.
    fn check_layers(&self) -> std::result::Result<(), String> {
        let graph = self.graph();
        for l in &self.layers {
            let linear = graph.find(&l.name).and_then(|id| match &graph.node(id).op {
                Op::Linear(lin) => Some(lin),
                _ => None,
            });
            match linear {
                None => {
                    return Err(format!(
                        "layer `{}` is not a linear layer of the model",
                        l.name
                    ))
                }
                Some(lin)
                    if (lin.out_features, lin.in_features) != (l.out_features, l.in_features) =>
                {
                    return Err(format!(
                        "layer `{}` is {}x{} in the record but {}x{} in the model",
                        l.name, l.out_features, l.in_features, lin.out_features, lin.in_features
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_json_atomic(path, self)
    }

    /// Refuses a calibration made for a model other than `identity`.
    pub fn check_model(&self, path: &Path, identity: &str) -> Result<()> {
        if self.model.identity != identity {
            return Err(Error::File {
                path: path.to_path_buf(),
                what: "calibration",
                reason: format!(
                    "made for model {} ({}), not for the model given (identity {identity})",
                    self.model.identity, self.model.path
                ),
            });
        }
        Ok(())
    }
}
