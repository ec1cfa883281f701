//! The calibration file: versioned JSON with the identity of the model and text it was
//! measured on, the settings, and one record per linear layer. Readers refuse other schema
//! versions; planners refuse a calibration made for another model.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::Format;

use super::LayerCalibration;

/// The calibration schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

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
}

/// A calibration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub schema_version: u32,
    pub fpx_version: String,
    pub model: ModelRef,
    pub text: TextRef,
    pub seq_len: usize,
    pub windows: usize,
    pub formats: Vec<Format>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<KlSetup>,
    pub layers: Vec<LayerCalibration>,
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
        Ok(calib)
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
