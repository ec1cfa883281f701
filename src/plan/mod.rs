//! Precision plans: which format each linear layer uses, and where that came from.
//!
//! A plan is a versioned JSON file (schema in `docs/planner.md`). Version 2, written by
//! `fpx plan`, records per layer its format, eps, objective error, latency and weight bytes;
//! totals (`total_latency` and `step_latency` in seconds, `total_error`, `weight_bytes`);
//! and its [`Provenance`]: solver and settings, budget, latency source, menu, groups, pins,
//! and the hashes of the model and calibration it came from. Version 1 (layers and model
//! only) is still read. Readers refuse other versions, duplicate layers and plans made for
//! another model. [`compare`] diffs two plans; [`make`] turns a solver's solution into one.

pub mod compare;
pub mod make;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::{Format, MxScaleRule};
use crate::latency::LatencySource;
use crate::lower::{LinearPrecision, PrecisionMap};
use crate::solve::ilp::{IlpOptions, IlpStatus};
use crate::solve::pins::PinsRef;
use crate::solve::{GreedyOptions, GroupKind, Objective};

/// The plan schema version this build writes.
pub const SCHEMA_VERSION: u32 = 2;
/// Versions this build reads.
pub const READS: [u32; 2] = [1, 2];

/// One linear layer's assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanLayer {
    /// Linear node name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub format: Format,
    /// Dynamic activation format, when activations are quantized too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<Format>,
    /// Calibrated eps of the layer in `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// The objective's error of the layer in `format` (eps or KL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<f64>,
    /// Seconds per step in `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_bytes: Option<u64>,
}

impl PlanLayer {
    /// The layer's weight format and activation format as one precision.
    pub fn precision(&self) -> LinearPrecision {
        LinearPrecision {
            weights: self.format,
            activations: self.activations,
        }
    }
}

/// Sums over the plan's layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanTotals {
    /// Seconds per step of the planned layers.
    pub total_latency: f64,
    /// Seconds per step of everything else (attention, norms), from the latency source.
    pub fixed_latency: f64,
    /// `total_latency + fixed_latency`.
    pub step_latency: f64,
    /// Sum of the objective's error.
    pub total_error: f64,
    /// Sum of eps (equal to `total_error` for the eps objective).
    pub total_eps: f64,
    pub weight_bytes: u64,
    /// Number of layers per precision (weight format, `+activations` when quantized).
    pub layers_per_format: BTreeMap<LinearPrecision, usize>,
}

/// Which solver made the plan, with its settings and outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SolverRecord {
    Greedy {
        #[serde(flatten)]
        options: GreedyOptions,
        /// Fraction of the free layers (or bytes) greedy put in the low format.
        achieved_gamma: f64,
    },
    Ilp {
        #[serde(flatten)]
        options: IlpOptions,
        status: IlpStatus,
        /// The LP relaxation's optimum of the objective: no assignment does better.
        lower_bound: f64,
        /// `(objective - lower_bound) / objective`: how far from optimal the plan can be.
        gap: f64,
    },
}

/// The constraint the plan was solved under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BudgetRecord {
    /// The paper's fraction of layers in FP4.
    Gamma { gamma: f64 },
    /// Seconds per step of the planned layers.
    Latency { seconds: f64 },
    /// The latency (seconds per step) greedy-gamma reaches at `gamma`: an ILP plan at the
    /// same latency as a greedy one.
    MatchGreedy { gamma: f64, seconds: f64 },
    /// Whole-step speedup over every layer in `baseline`, and the latency budget it implies.
    Speedup {
        speedup: f64,
        baseline: LinearPrecision,
        seconds: f64,
    },
    /// Total objective error.
    Error { error: f64 },
}

/// The calibration a plan came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRef {
    pub path: String,
    /// SHA-256 of the calibration file's bytes.
    pub sha256: String,
    /// SHA-256 of the calibration text.
    pub text_sha256: String,
}

/// Everything needed to reproduce a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub fpx_version: String,
    pub calibration: CalibrationRef,
    pub objective: Objective,
    pub solver: SolverRecord,
    pub budget: BudgetRecord,
    /// Weight-memory budget in bytes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<u64>,
    pub latency: LatencySource,
    pub menu: Vec<LinearPrecision>,
    /// The MXFP4 scale rule of the calibration, which evaluation and export of the plan
    /// quantize with (absent in plans made before it was recorded: the OCP floor rule).
    #[serde(default = "crate::calib::legacy_mx_scale_rule")]
    pub mx_scale_rule: MxScaleRule,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins: Option<PinsRef>,
}

/// A per-layer precision assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub schema_version: u32,
    /// Identity hash of the model the plan was made for (`None`: any model with these layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<PlanTotals>,
    pub layers: Vec<PlanLayer>,
}

impl Plan {
    /// Reads and validates a plan file.
    pub fn read(path: &Path) -> Result<Plan> {
        let bytes = crate::fsutil::read_regular(path)?;
        Plan::parse(&bytes, path)
    }

    /// Validates the bytes of a plan file; `path` is for messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Plan> {
        let err = |reason: String| Error::File {
            path: path.to_path_buf(),
            what: "plan",
            reason,
        };
        let raw = crate::fsutil::parse_versioned_json(bytes, path, "plan", &READS)?;
        let plan: Plan = serde_json::from_value(raw).map_err(|e| err(e.to_string()))?;
        plan.validate().map_err(err)?;
        Ok(plan)
    }

    /// What a reader requires beyond the schema: every layer once, every number finite
    /// (JSON has no infinity: serde writes it as `null`, which no reader takes back).
    fn validate(&self) -> std::result::Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for l in &self.layers {
            if !seen.insert(&l.name) {
                return Err(format!("layer `{}` is assigned twice", l.name));
            }
            for (field, v) in [("eps", l.eps), ("error", l.error), ("latency", l.latency)] {
                if let Some(v) = v.filter(|v| !v.is_finite()) {
                    return Err(format!("layer `{}`: {field} is {v}", l.name));
                }
            }
        }
        if let Some(t) = &self.totals {
            for (field, v) in [
                ("total_latency", t.total_latency),
                ("fixed_latency", t.fixed_latency),
                ("step_latency", t.step_latency),
                ("total_error", t.total_error),
                ("total_eps", t.total_eps),
            ] {
                if !v.is_finite() {
                    return Err(format!("totals.{field} is {v}, not a finite number"));
                }
            }
        }
        Ok(())
    }

    /// Writes the plan atomically as pretty JSON, after checking that [`Plan::parse`] reads
    /// it back: fpx never writes a plan it would refuse.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.validate().map_err(|reason| Error::File {
            path: path.to_path_buf(),
            what: "plan (not written)",
            reason,
        })?;
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::File {
            path: path.to_path_buf(),
            what: "plan (not written)",
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        // Anything else a reader refuses (a NaN in the solver record, written as null).
        Plan::parse(&bytes, path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            what: "plan (not written)",
            reason: format!("fpx would not read it back: {e}"),
        })?;
        crate::fsutil::write_atomic(path, &bytes)
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

    /// The MXFP4 scale rule this plan's formats mean (see [`Provenance::mx_scale_rule`];
    /// plans without provenance predate the choice and used the OCP floor rule).
    pub fn mx_scale_rule(&self) -> MxScaleRule {
        self.provenance
            .as_ref()
            .map_or_else(crate::calib::legacy_mx_scale_rule, |p| p.mx_scale_rule)
    }

    /// GPUs the plan was made for (tensor parallelism; 1 for plans of one GPU or without
    /// provenance).
    pub fn tensor_parallel(&self) -> usize {
        self.provenance
            .as_ref()
            .map_or(1, |p| p.latency.tensor_parallel())
    }

    /// Makes this process quantize MXFP4 with the plan's rule
    /// ([`crate::formats::set_mx_scale_rule`]); call before evaluating or exporting it.
    pub fn use_mx_scale_rule(&self) {
        crate::formats::set_mx_scale_rule(self.mx_scale_rule());
    }

    /// The layer -> precision map the CPU backend takes.
    pub fn precision_map(&self) -> PrecisionMap {
        self.layers
            .iter()
            .map(|l| (l.name.clone(), l.precision()))
            .collect()
    }

    /// The plan's layer -> format map.
    pub fn formats(&self) -> BTreeMap<&str, Format> {
        self.layers
            .iter()
            .map(|l| (l.name.as_str(), l.format))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_plans_still_read_and_map() {
        let v1 = br#"{"schema_version": 1, "model": "abc",
            "layers": [{"name": "model.layers.0.mlp.up_proj", "format": "nvfp4"}]}"#;
        let p = Plan::parse(v1, Path::new("old.plan.json")).unwrap();
        assert!(p.provenance.is_none() && p.totals.is_none());
        let m = p.precision_map();
        assert_eq!(m["model.layers.0.mlp.up_proj"].weights, Format::Nvfp4);
        assert!(p.check_model(Path::new("x"), "abc").is_ok());
        let e = p
            .check_model(Path::new("x"), "def")
            .unwrap_err()
            .to_string();
        assert!(e.contains("made for model abc"), "{e}");
    }

    #[test]
    fn bad_plans_are_refused_with_the_path() {
        let dup = br#"{"schema_version": 2, "layers": [{"name": "a", "format": "fp8"},
            {"name": "a", "format": "fp8"}]}"#;
        let e = Plan::parse(dup, Path::new("d.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "d.json: plan: layer `a` is assigned twice");
        let v9 = br#"{"schema_version": 9, "layers": []}"#;
        let e = Plan::parse(v9, Path::new("v.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("schema_version is 9, this fpx reads versions [1, 2]"),
            "{e}"
        );
    }
}
