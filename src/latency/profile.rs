//! Measured latency profiles: the file `fpx profile` writes on a GPU and the planner reads
//! anywhere. Schema version 2 (version 1, without `kernels`, is still read; documented in
//! `docs/planner.md`):
//!
//! ```json
//! {
//!   "schema_version": 2,
//!   "device": "NVIDIA H100 80GB HBM3",
//!   "batch": 1,
//!   "context": 512,
//!   "model": "<model identity hash, optional>",
//!   "activations": "bf16",
//!   "other_seconds": 0.00021,
//!   "layers": {
//!     "model.layers.0.self_attn.q_proj": { "fp8": 4.1e-6, "nvfp4": 3.6e-6 }
//!   },
//!   "other_distribution": { "samples": 50, "mean": 2.1e-4, "p50": 2.1e-4, "p95": 2.3e-4,
//!                           "p99": 2.4e-4, "max": 2.4e-4 },
//!   "other_modelled_seconds": 1.9e-4,
//!   "modelled_by": "fpx kernel cost model of NVIDIA H100 SXM5 80GB, sm_90 (...)",
//!   "kernels": [
//!     { "kernel": "gemv_fp8_576x576_abf16_m1", "family": "gemv", "format": "fp8",
//!       "n": 576, "k": 576, "layers": ["model.layers.0.self_attn.q_proj", "..."],
//!       "measured": { "samples": 50, "mean": 4.1e-6, "p50": 4.1e-6, ... },
//!       "modelled_seconds": 3.2e-6 }
//!   ]
//! }
//! ```
//!
//! `layers` maps linear node names to format -> seconds per step (the median of the
//! measurements); `other_seconds` (optional, default 0) is the measured rest of the step
//! (attention, norms) that no plan changes. `kernels` (schema 2) gives each distinct kernel
//! timed: the layers it runs, the distribution of its samples (each sample is the mean launch
//! of a batch of back-to-back launches) and what fpx's kernel cost model predicts for it, so
//! the planner can budget on a tail percentile ([`Profile::with_percentile`]) and
//! `fpx profile --compare` can judge the model. Parsing goes raw serde struct -> validated
//! [`Profile`]: formats must be known, seconds finite and positive, every kernel's median the
//! one `layers` gives its layers, and a planner asks [`LatencyModel::check_covers`] for every
//! layer and format it needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::lower::{ActDtype, LinearPrecision};

use super::{LatencyModel, LatencySource, LayerShape, Percentile, Percentiles};

/// The profile schema version this build writes.
pub const SCHEMA_VERSION: u32 = 2;

/// The schema versions this build reads.
pub const READS: [u32; 2] = [1, 2];

/// One distinct kernel timed, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelTiming {
    /// The entry point launched.
    pub kernel: String,
    /// Its family (`gemv`, `gemm`).
    pub family: String,
    /// Weight format.
    pub format: String,
    pub n: usize,
    pub k: usize,
    /// The model's layers this kernel runs.
    pub layers: Vec<String>,
    /// Seconds per launch over the samples.
    pub measured: Percentiles,
    /// Seconds per launch fpx's kernel cost model predicts (absent when fpx has no model of
    /// the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modelled_seconds: Option<f64>,
}

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
    /// Element type of the activations and KV cache measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<ActDtype>,
    #[serde(default)]
    pub other_seconds: f64,
    pub layers: BTreeMap<String, BTreeMap<String, f64>>,
    /// The distribution of the rest of the step's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_distribution: Option<Percentiles>,
    /// What the kernel cost model predicts for the rest of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_modelled_seconds: Option<f64>,
    /// The cost model the `modelled` seconds come from (its [`LatencySource`] in words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modelled_by: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<KernelTiming>,
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
    pub activations: Option<ActDtype>,
    pub other_seconds: f64,
    /// Median seconds per layer and format.
    pub layers: BTreeMap<String, BTreeMap<Format, f64>>,
    pub other_distribution: Option<Percentiles>,
    pub other_modelled_seconds: Option<f64>,
    pub modelled_by: Option<String>,
    pub kernels: Vec<KernelTiming>,
    /// The statistic [`LatencyModel::latency`] answers with (the median by default).
    pub percentile: Percentile,
    /// Each layer's distribution per format, from `kernels`.
    distributions: BTreeMap<String, BTreeMap<Format, Percentiles>>,
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
        let value = crate::fsutil::parse_versioned_json(bytes, path, "latency profile", &READS)?;
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
                let format = parse_format(&f).map_err(|e| err(format!("layer `{name}`: {e}")))?;
                if !(s.is_finite() && s > 0.0) {
                    return Err(err(format!(
                        "layer `{name}`, format {format}: {s} s is not a positive number of seconds"
                    )));
                }
                typed.insert(format, s);
            }
            layers.insert(name, typed);
        }
        if let Some(reason) = raw
            .other_distribution
            .as_ref()
            .and_then(Percentiles::invalid)
        {
            return Err(err(format!("other_distribution: {reason}")));
        }
        let distributions = kernel_distributions(&raw.kernels, &layers).map_err(err)?;
        Ok(Profile {
            path: path.to_path_buf(),
            sha256: format!("{:x}", Sha256::digest(bytes)),
            device: raw.device,
            batch: raw.batch,
            context: raw.context,
            model: raw.model,
            activations: raw.activations,
            other_seconds: raw.other_seconds,
            layers,
            other_distribution: raw.other_distribution,
            other_modelled_seconds: raw.other_modelled_seconds,
            modelled_by: raw.modelled_by,
            kernels: raw.kernels,
            percentile: Percentile::P50,
            distributions,
        })
    }

    /// The profile answering with statistic `p` of each kernel's samples. A tail percentile
    /// needs the distributions of schema 2 for every layer and format (and the rest of the
    /// step); per-kernel p95s summed estimate the step's p95 conservatively (exactly, for
    /// kernel times that move together), not as a guarantee.
    pub fn with_percentile(mut self, p: Percentile) -> Result<Profile> {
        if !p.is_median() {
            let pairs: usize = self.layers.values().map(BTreeMap::len).sum();
            let known: usize = self.distributions.values().map(BTreeMap::len).sum();
            let rest_missing = self.other_seconds > 0.0 && self.other_distribution.is_none();
            if known < pairs || rest_missing {
                return Err(Error::File {
                    path: self.path.clone(),
                    what: "latency profile",
                    reason: format!(
                        "planning on the {p} needs each kernel's distribution, and this profile \
                         holds only medians for {} of its {pairs} (layer, format) pairs{}; \
                         measure it again with `fpx profile` (schema {SCHEMA_VERSION}) or plan \
                         on the median (--latency-percentile p50)",
                        pairs - known,
                        if rest_missing {
                            " and for the rest of the step"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        self.percentile = p;
        Ok(self)
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

    fn missing(&self, layer: &str, precision: LinearPrecision) -> String {
        match self.layers.get(layer) {
            None => format!("layer `{layer}` is not in the profile"),
            Some(_) if precision.activations.is_some() => format!(
                "layer `{layer}` has no measurement for {precision}: profiles time the \
                 weight-only kernels (plan quantized activations with --cost kernels)"
            ),
            Some(_) => format!("layer `{layer}` has no measurement for format {precision}"),
        }
    }
}

fn parse_format(name: &str) -> std::result::Result<Format, String> {
    name.parse().map_err(|e: Error| e.to_string())
}

/// Each layer's distribution per format from the kernels that run it, checking that every
/// kernel's layers are in `layers` with the kernel's median.
fn kernel_distributions(
    kernels: &[KernelTiming],
    layers: &BTreeMap<String, BTreeMap<Format, f64>>,
) -> std::result::Result<BTreeMap<String, BTreeMap<Format, Percentiles>>, String> {
    let mut out: BTreeMap<String, BTreeMap<Format, Percentiles>> = BTreeMap::new();
    for k in kernels {
        let at = |reason: String| format!("kernel `{}`: {reason}", k.kernel);
        let format = parse_format(&k.format).map_err(at)?;
        if let Some(reason) = k.measured.invalid() {
            return Err(at(format!("measured: {reason}")));
        }
        if let Some(m) = k.modelled_seconds.filter(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(at(format!("modelled_seconds {m} is not a positive number")));
        }
        for name in &k.layers {
            match layers.get(name).and_then(|f| f.get(&format)) {
                Some(&median) if median == k.measured.p50 => {}
                Some(&median) => {
                    return Err(at(format!(
                        "its p50 {} s is not layer `{name}`'s {format} median {median} s",
                        k.measured.p50
                    )))
                }
                None => {
                    return Err(at(format!(
                        "layer `{name}` has no {format} entry in `layers`"
                    )))
                }
            }
            out.entry(name.clone())
                .or_default()
                .insert(format, k.measured);
        }
    }
    Ok(out)
}

impl LatencyModel for Profile {
    fn source(&self) -> LatencySource {
        LatencySource::Profile {
            device: self.device.clone(),
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
            batch: self.batch,
            context: self.context,
            percentile: self.percentile,
        }
    }

    fn latency(&self, layer: &LayerShape, precision: LinearPrecision) -> Result<f64> {
        // Profiles time weight-only kernels: a W+A question has no measurement.
        let format = precision.weights;
        let value = match self.percentile {
            _ if precision.activations.is_some() => None,
            Percentile::P50 => self
                .layers
                .get(&layer.name)
                .and_then(|m| m.get(&format))
                .copied(),
            p => self
                .distributions
                .get(&layer.name)
                .and_then(|m| m.get(&format))
                .map(|d| d.get(p)),
        };
        value.ok_or_else(|| Error::File {
            path: self.path.clone(),
            what: "latency profile",
            reason: self.missing(&layer.name, precision),
        })
    }

    fn fixed_latency(&self, _layers: &[LayerShape]) -> f64 {
        match (&self.other_distribution, self.percentile) {
            (Some(d), p) if !p.is_median() => d.get(p),
            _ => self.other_seconds,
        }
    }

    fn check_covers(&self, layers: &[LayerShape], precisions: &[LinearPrecision]) -> Result<()> {
        let missing: Vec<String> = layers
            .iter()
            .flat_map(|l| precisions.iter().map(move |&f| (l, f)))
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
                layers.len() * precisions.len(),
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
        assert_eq!(
            p.latency(&layer("a"), LinearPrecision::weight_only(Format::Nvfp4))
                .unwrap(),
            1.5e-6
        );
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
                &[
                    LinearPrecision::weight_only(Format::Fp8),
                    LinearPrecision::weight_only(Format::Nvfp4),
                ],
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
        assert!(p
            .check_covers(&[layer("a")], &[LinearPrecision::weight_only(Format::Fp8)])
            .is_ok());
        // Profiles time weight-only kernels: a W8A8 question is refused, not answered with
        // the FP8 weight-only time.
        let e = p
            .latency(&layer("a"), LinearPrecision::both(Format::Fp8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no measurement for fp8+fp8"), "{e}");
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

    const V2: &str = r#"{"schema_version": 2, "device": "NVIDIA H100", "batch": 1,
        "context": 256, "other_seconds": 1e-4,
        "other_distribution": {"samples": 3, "mean": 1.1e-4, "p50": 1e-4, "p95": 1.2e-4,
                               "p99": 1.2e-4, "max": 1.3e-4},
        "layers": {"a": {"fp8": 2e-6, "nvfp4": 1.5e-6}, "b": {"fp8": 2e-6}},
        "kernels": [
          {"kernel": "k8", "family": "gemv", "format": "fp8", "n": 8, "k": 8,
           "layers": ["a", "b"], "modelled_seconds": 1e-6,
           "measured": {"samples": 3, "mean": 2.2e-6, "p50": 2e-6, "p95": 3e-6, "p99": 4e-6,
                        "max": 5e-6}},
          {"kernel": "k4", "family": "gemv", "format": "nvfp4", "n": 8, "k": 8,
           "layers": ["a"], "modelled_seconds": 1e-6,
           "measured": {"samples": 3, "mean": 1.6e-6, "p50": 1.5e-6, "p95": 2e-6,
                        "p99": 2.5e-6, "max": 2.5e-6}}]}"#;

    #[test]
    fn a_tail_percentile_prices_each_kernel_at_its_tail() {
        let p = Profile::parse(V2.as_bytes(), Path::new("v2.json")).unwrap();
        assert_eq!(
            p.latency(&layer("b"), LinearPrecision::weight_only(Format::Fp8))
                .unwrap(),
            2e-6
        );
        let p99 = p.clone().with_percentile(Percentile::P99).unwrap();
        assert_eq!(
            p99.latency(&layer("b"), LinearPrecision::weight_only(Format::Fp8))
                .unwrap(),
            4e-6
        );
        assert_eq!(
            p99.latency(&layer("a"), LinearPrecision::weight_only(Format::Nvfp4))
                .unwrap(),
            2.5e-6
        );
        assert_eq!(p99.fixed_latency(&[]), 1.2e-4);
        let LatencySource::Profile { percentile, .. } = p99.source() else {
            panic!("a profile is a profile source")
        };
        assert_eq!(percentile, Percentile::P99);
        assert!(p99
            .source()
            .to_string()
            .contains("p99 of each kernel's samples"));
        // Plans on the median serialize as before (no `percentile` key).
        let json = serde_json::to_string(&p.source()).unwrap();
        assert!(!json.contains("percentile"), "{json}");
    }

    #[test]
    fn a_tail_percentile_of_a_median_only_profile_is_refused() {
        let p = Profile::parse(GOOD.as_bytes(), Path::new("v1.json")).unwrap();
        let e = p.with_percentile(Percentile::P95).unwrap_err().to_string();
        assert!(
            e.contains("holds only medians for 3 of its 3 (layer, format) pairs and for the rest"),
            "{e}"
        );
        assert!(e.contains("--latency-percentile p50"), "{e}");
    }

    #[test]
    fn kernels_must_agree_with_the_layer_medians() {
        let cases = [
            (
                V2.replace("\"p50\": 2e-6", "\"p50\": 2.1e-6"),
                "kernel `k8`: its p50",
            ),
            (
                V2.replace("[\"a\", \"b\"]", "[\"a\", \"c\"]"),
                "layer `c` has no fp8",
            ),
            (V2.replace("\"p95\": 3e-6", "\"p95\": 9e-6"), "out of order"),
            (
                V2.replace("\"format\": \"nvfp4\"", "\"format\": \"fp3\""),
                "unknown format",
            ),
            (
                V2.replace("\"modelled_seconds\": 1e-6,", "\"modelled_seconds\": -1,"),
                "modelled_seconds -1",
            ),
        ];
        for (text, want) in cases {
            let e = Profile::parse(text.as_bytes(), Path::new("p.json")).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
    }
}
