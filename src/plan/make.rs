//! Turning a solver's [`Solution`] of a [`Problem`] into a [`Plan`] with its totals and
//! provenance. Deterministic: no timestamps or timings, so a plan regenerated from the same
//! inputs is byte-identical (plans/ doubles as golden files).

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::calib::Calibration;
use crate::error::{Error, Result};
use crate::solve::{Problem, Solution};

use super::{CalibrationRef, Plan, PlanLayer, PlanTotals, Provenance, SCHEMA_VERSION};

impl CalibrationRef {
    /// The reference of the calibration file at `path` (hashes its bytes).
    pub fn from_file(path: &Path, calib: &Calibration) -> Result<CalibrationRef> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(CalibrationRef {
            path: path.display().to_string(),
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            text_sha256: calib.text.sha256.clone(),
        })
    }
}

impl Plan {
    /// The plan of `solution`, for the model `identity`.
    pub fn from_solution(
        problem: &Problem,
        solution: &Solution,
        identity: &str,
        provenance: Provenance,
    ) -> Plan {
        let layers: Vec<PlanLayer> = solution
            .choice
            .iter()
            .enumerate()
            .map(|(i, &c)| PlanLayer {
                name: problem.names[i].clone(),
                format: problem.precisions[c].weights,
                activations: problem.precisions[c].activations,
                eps: Some(problem.eps[c]),
                error: Some(problem.error[c]),
                latency: Some(problem.latency[c]),
                weight_bytes: Some(problem.bytes[c]),
            })
            .collect();
        let mut layers_per_format = BTreeMap::new();
        for l in &layers {
            *layers_per_format.entry(l.precision()).or_insert(0) += 1;
        }
        let t = solution.totals;
        Plan {
            schema_version: SCHEMA_VERSION,
            model: Some(identity.to_string()),
            provenance: Some(provenance),
            totals: Some(PlanTotals {
                total_latency: t.latency,
                fixed_latency: problem.fixed_latency,
                step_latency: t.latency + problem.fixed_latency,
                total_error: t.error,
                total_eps: t.eps,
                weight_bytes: t.bytes,
                layers_per_format,
            }),
            layers,
        }
    }
}
