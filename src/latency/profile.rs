//! Measured latency profiles: the file `fpx profile` writes on a GPU and the planner reads
//! anywhere. Schema version 1 (documented in `docs/planner.md`):
//!
//! ```json
//! {
//!   "schema_version": 1,
//!   "device": "NVIDIA H100 80GB HBM3",
//!   "batch": 1,
//!   "context": 512,
//!   "model": "<model identity hash, optional>",
//!   "other_seconds": 0.00021,
//!   "layers": {
//!     "model.layers.0.self_attn.q_proj": { "fp8": 4.1e-6, "nvfp4": 3.6e-6 }
//!   }
//! }
//! ```
//!
//! `layers` maps linear node names to format -> seconds per step (median of the
//! measurements); `other_seconds` (optional, default 0) is the measured rest of the step
//! (attention, norms) that no plan changes. Parsing goes raw serde struct -> validated
//! [`Profile`]: formats must be known, seconds finite and positive, and a planner asks
//! [`LatencyModel::check_covers`] for every layer and format it needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::formats::Format;

use super::{LatencyModel, LatencySource, LayerShape};

/// The profile schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// The file exactly as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub schema_version: u32,
    pub device: String,
    pub batch: usize,
    pub context: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub other_seconds: f64,
    pub layers: BTreeMap<String, BTreeMap<String, f64>>,
}

/// A validated measured profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub path: PathBuf,
    pub sha256: String,
    pub device: String,
    pub batch: usize,
    pub context: usize,
    /// Identity of the model measured, when the file records it.
    pub model: Option<String>,
    pub other_seconds: f64,
    pub layers: BTreeMap<String, BTreeMap<Format, f64>>,
}

impl Profile {
    /// Reads and validates a profile file.
    pub fn read(path: &Path) -> Result<Profile> {
        let bytes = crate::fsutil::read_regular(path)?;
        Profile::parse(&bytes, path)
    }

    /// Validates the bytes of a profile file; `path` is for messages and the source record.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Profile> {
        let err = |reason: String| Error::File {
            path: path.to_path_buf(),
            what: "latency profile",
            reason,
        };
        let value =
            crate::fsutil::parse_versioned_json(bytes, path, "latency profile", &[SCHEMA_VERSION])?;
        let raw: RawProfile = serde_json::from_value(value).map_err(|e| err(e.to_string()))?;
        if raw.batch == 0 {
            return Err(err("batch is 0".into()));
        }
        if !(raw.other_seconds.is_finite() && raw.other_seconds >= 0.0) {
            return Err(err(format!(
                "other_seconds is {}, expected a finite number >= 0",
                raw.other_seconds
            )));
        }
        if raw.layers.is_empty() {
            return Err(err("`layers` is empty".into()));
        }
        let mut layers = BTreeMap::new();
        for (name, formats) in raw.layers {
            let mut typed = BTreeMap::new();
            for (f, s) in formats {
                let format: Format = f
                    .parse()
                    .map_err(|e: Error| err(format!("layer `{name}`: {e}")))?;
                if !(s.is_finite() && s > 0.0) {
                    return Err(err(format!(
                        "layer `{name}`, format {format}: {s} s is not a positive number of seconds"
                    )));
                }
                typed.insert(format, s);
            }
            layers.insert(name, typed);
        }
        Ok(Profile {
            path: path.to_path_buf(),
            sha256: format!("{:x}", Sha256::digest(bytes)),
            device: raw.device,
            batch: raw.batch,
            context: raw.context,
            model: raw.model,
            other_seconds: raw.other_seconds,
            layers,
        })
    }

    /// Refuses a profile measured for another model (when the file names its model).
    pub fn check_model(&self, identity: &str) -> Result<()> {
        match &self.model {
            Some(m) if m != identity => Err(Error::File {
                path: self.path.clone(),
                what: "latency profile",
                reason: format!("measured for model {m}, not for model {identity}"),
            }),
            _ => Ok(()),
        }
    }

    fn missing(&self, layer: &str, format: Format) -> String {
        match self.layers.get(layer) {
            None => format!("layer `{layer}` is not in the profile"),
            Some(_) => format!("layer `{layer}` has no measurement for format {format}"),
        }
    }
}

impl LatencyModel for Profile {
    fn source(&self) -> LatencySource {
        LatencySource::Profile {
            device: self.device.clone(),
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
            batch: self.batch,
            context: self.context,
        }
    }

    fn latency(&self, layer: &LayerShape, format: Format) -> Result<f64> {
        self.layers
            .get(&layer.name)
            .and_then(|m| m.get(&format))
            .copied()
            .ok_or_else(|| Error::File {
                path: self.path.clone(),
                what: "latency profile",
                reason: self.missing(&layer.name, format),
            })
    }

    fn fixed_latency(&self, _layers: &[LayerShape]) -> f64 {
        self.other_seconds
    }

    fn check_covers(&self, layers: &[LayerShape], formats: &[Format]) -> Result<()> {
        let missing: Vec<String> = layers
            .iter()
            .flat_map(|l| formats.iter().map(move |&f| (l, f)))
            .filter(|(l, f)| self.latency(l, *f).is_err())
            .map(|(l, f)| self.missing(&l.name, f))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        Err(Error::File {
            path: self.path.clone(),
            what: "latency profile",
            reason: format!(
                "does not cover {} of the {} (layer, format) pairs asked: {}{}",
                missing.len(),
                layers.len() * formats.len(),
                shown.join("; "),
                if missing.len() > shown.len() {
                    "; ..."
                } else {
                    ""
                }
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::LinearKind;

    fn layer(name: &str) -> LayerShape {
        LayerShape {
            name: name.into(),
            layer: 0,
            kind: LinearKind::Q,
            out_features: 8,
            in_features: 8,
        }
    }

    const GOOD: &str = r#"{"schema_version": 1, "device": "NVIDIA H100", "batch": 1,
        "context": 256, "other_seconds": 1e-4,
        "layers": {"a": {"fp8": 2e-6, "nvfp4": 1.5e-6}, "b": {"fp8": 3e-6}}}"#;

    #[test]
    fn reads_a_profile_and_reports_its_source() {
        let p = Profile::parse(GOOD.as_bytes(), Path::new("h100.json")).unwrap();
        assert_eq!(p.latency(&layer("a"), Format::Nvfp4).unwrap(), 1.5e-6);
        assert_eq!(p.fixed_latency(&[]), 1e-4);
        let LatencySource::Profile {
            device, context, ..
        } = p.source()
        else {
            panic!("a profile is a profile source")
        };
        assert_eq!((device.as_str(), context), ("NVIDIA H100", 256));
    }

    #[test]
    fn coverage_errors_name_the_layer_and_format() {
        let p = Profile::parse(GOOD.as_bytes(), Path::new("h100.json")).unwrap();
        let e = p
            .check_covers(
                &[layer("a"), layer("b"), layer("c")],
                &[Format::Fp8, Format::Nvfp4],
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("h100.json: latency profile: does not cover 3 of the 6"),
            "{e}"
        );
        assert!(
            e.contains("layer `b` has no measurement for format nvfp4"),
            "{e}"
        );
        assert!(e.contains("layer `c` is not in the profile"), "{e}");
        assert!(p.check_covers(&[layer("a")], &[Format::Fp8]).is_ok());
    }

    #[test]
    fn invalid_profiles_are_rejected_with_the_reason() {
        let cases = [
            (
                GOOD.replace("\"schema_version\": 1", "\"schema_version\": 7"),
                "schema_version is 7",
            ),
            (
                GOOD.replace("2e-6", "-2e-6"),
                "layer `a`, format fp8: -0.000002 s",
            ),
            (
                GOOD.replace("\"fp8\": 3e-6", "\"fp5\": 3e-6"),
                "layer `b`: unknown format `fp5`",
            ),
            (GOOD.replace("\"batch\": 1", "\"batch\": 0"), "batch is 0"),
            (
                GOOD.replace("\"device\"", "\"devise\""),
                "unknown field `devise`",
            ),
        ];
        for (text, want) in cases {
            let e = Profile::parse(text.as_bytes(), Path::new("p.json")).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
    }
}
