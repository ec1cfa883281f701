//! From measured samples to a latency profile, and a profile against fpx's kernel cost model.
//!
//! `fpx profile` times kernels on a GPU (`runtime::cuda::profile_linears`, `profile_rest`) and
//! hands the raw samples here: [`record`] turns them into the stored [`RawProfile`] (the median
//! per layer and format that plans read, and per distinct kernel its distribution and what
//! [`KernelCost`] predicts for it); [`compare`] reads a profile back as measured / modelled per
//! kernel family, which is how the latency model is judged, and corrected, on real hardware.
//! Neither needs a GPU, so both are tested without one.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::lower::{LinearPrecision, LinearShape, Schedule, WeightFormat};

use super::profile::{KernelTiming, Profile, RawProfile, SCHEMA_VERSION};
use super::{KernelCost, LatencyModel, LayerShape, Percentiles};

/// What one `fpx profile` run measured.
#[derive(Debug, Clone)]
pub struct Measurements {
    /// The device's name as the driver reports it.
    pub device: String,
    pub batch: usize,
    pub context: usize,
    /// Identity of the model measured.
    pub model: Option<String>,
    /// Seconds per launch, one per sample, of each (shape, format) timed.
    pub linears: BTreeMap<(LinearShape, WeightFormat), Vec<f64>>,
    /// Seconds of the rest of the step (every launch but the linear layers), per sample.
    pub rest: Vec<f64>,
}

/// The profile of `m` for the model whose schedule is `schedule` and whose linear layers are
/// `shapes` ([`LayerShape::of_graph`]); `cost`, the kernel cost model of the same device, batch,
/// context and activation type, adds the modelled seconds.
pub fn record(
    schedule: &Schedule,
    shapes: &[LayerShape],
    m: &Measurements,
    cost: Option<&KernelCost>,
) -> Result<RawProfile> {
    let mut layers: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut kernels = Vec::with_capacity(m.linears.len());
    for ((shape, format), samples) in &m.linears {
        let Some(f) = format.format() else {
            return Err(Error::invalid(
                "--formats",
                "f32 weights are not a plan format and cannot be profiled",
            ));
        };
        let measured = Percentiles::of(samples)
            .ok_or_else(|| Error::invalid("--repeats", "a kernel was timed with no samples"))?;
        let names: Vec<String> = schedule
            .linears
            .iter()
            .filter(|l| {
                LinearShape {
                    format: *format,
                    ..l.shape
                } == *shape
            })
            .map(|l| l.name.clone())
            .collect();
        let Some(first) = names.first() else {
            continue;
        };
        for name in &names {
            layers
                .entry(name.clone())
                .or_default()
                .insert(f.name().to_string(), measured.p50);
        }
        let modelled_seconds = match cost {
            Some(cost) => {
                let layer =
                    shapes
                        .iter()
                        .find(|s| &s.name == first)
                        .ok_or_else(|| Error::Layer {
                            layer: first.clone(),
                            reason: "in the schedule but not among the model's linear layers"
                                .into(),
                        })?;
                Some(cost.latency(layer, LinearPrecision::weight_only(f))?)
            }
            None => None,
        };
        let (spec, kernel) = shape.kernel_for_rows(m.batch);
        kernels.push(KernelTiming {
            kernel,
            family: spec.family().to_string(),
            format: f.name().to_string(),
            n: shape.n,
            k: shape.k,
            layers: names,
            measured,
            modelled_seconds,
        });
    }
    let other_distribution = Percentiles::of(&m.rest);
    Ok(RawProfile {
        schema_version: SCHEMA_VERSION,
        device: m.device.clone(),
        batch: m.batch,
        context: m.context,
        model: m.model.clone(),
        activations: Some(schedule.act),
        other_seconds: other_distribution.map_or(0.0, |d| d.p50),
        layers,
        other_distribution,
        other_modelled_seconds: cost.map(|c| c.fixed_latency(shapes)),
        modelled_by: cost.map(|c| c.source().to_string()),
        kernels,
    })
}

/// Measured against modelled for one kernel family and weight format, over the layers that run
/// it: the step with every layer in this format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FamilyComparison {
    /// `gemv fp8`, ...
    pub family: String,
    /// Distinct kernels (shapes).
    pub kernels: usize,
    /// Launches per step (layers).
    pub launches: usize,
    /// Median seconds summed over the launches.
    pub measured_seconds: f64,
    pub modelled_seconds: f64,
    /// measured / modelled of the sums.
    pub ratio: f64,
    /// The smallest and largest per-kernel ratio.
    pub min_ratio: f64,
    pub max_ratio: f64,
    /// The kernel with the largest ratio (where the model is most optimistic).
    pub worst_kernel: String,
}

/// A profile read against the cost model recorded in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub device: String,
    pub modelled_by: String,
    pub families: Vec<FamilyComparison>,
    /// The rest of the step: measured median, modelled, ratio.
    pub rest: Option<[f64; 3]>,
}

/// Measured / modelled per kernel family of `profile` (schema 2, written where fpx has a cost
/// model of the device).
pub fn compare(profile: &Profile) -> Result<Comparison> {
    let err = |reason: String| Error::File {
        path: profile.path.clone(),
        what: "latency profile",
        reason,
    };
    if profile.kernels.is_empty() {
        return Err(err(
            "records no kernels (a schema 1 profile); measure it again with this fpx's \
             `fpx profile` to compare it with the cost model"
                .into(),
        ));
    }
    let Some(modelled_by) = profile.modelled_by.clone() else {
        return Err(err(format!(
            "records no modelled cost: fpx has no cost model of `{}` (see `fpx plan --help` \
             for the GPUs it models)",
            profile.device
        )));
    };
    let mut by_family: BTreeMap<String, Vec<(&KernelTiming, f64)>> = BTreeMap::new();
    for k in &profile.kernels {
        let modelled = k.modelled_seconds.ok_or_else(|| {
            err(format!(
                "kernel `{}` has no modelled_seconds while the profile names its cost model",
                k.kernel
            ))
        })?;
        by_family
            .entry(format!("{} {}", k.family, k.format))
            .or_default()
            .push((k, modelled));
    }
    let families = by_family
        .into_iter()
        .map(|(family, ks)| {
            let launches: usize = ks.iter().map(|(k, _)| k.layers.len()).sum();
            let sum = |f: &dyn Fn(&KernelTiming, f64) -> f64| -> f64 {
                ks.iter()
                    .map(|&(k, m)| f(k, m) * k.layers.len() as f64)
                    .sum()
            };
            let measured_seconds = sum(&|k, _| k.measured.p50);
            let modelled_seconds = sum(&|_, m| m);
            let ratios: Vec<(f64, &str)> = ks
                .iter()
                .map(|&(k, m)| (k.measured.p50 / m, k.kernel.as_str()))
                .collect();
            let min_ratio = ratios.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
            let worst = ratios
                .iter()
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .expect("a family has a kernel");
            FamilyComparison {
                family,
                kernels: ks.len(),
                launches,
                measured_seconds,
                modelled_seconds,
                ratio: measured_seconds / modelled_seconds,
                min_ratio,
                max_ratio: worst.0,
                worst_kernel: worst.1.to_string(),
            }
        })
        .collect();
    let rest = profile
        .other_modelled_seconds
        .filter(|m| *m > 0.0 && profile.other_seconds > 0.0)
        .map(|m| [profile.other_seconds, m, profile.other_seconds / m]);
    Ok(Comparison {
        device: profile.device.clone(),
        modelled_by,
        families,
        rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Format;
    use crate::ir::Graph;
    use crate::latency::Gpu;
    use crate::lower::{ActDtype, PrecisionMap};
    use crate::model::{synthetic::tiny_spec, Architecture};

    /// Measurements of every distinct (shape, format) of `schedule`, each sample `scale` times
    /// what `cost` models, plus a spread so the tail differs from the median.
    fn measurements(schedule: &Schedule, cost: &KernelCost, scale: f64) -> Measurements {
        let shapes = LayerShape::of_graph(&Graph::build(&tiny_spec(Architecture::Llama)));
        let mut linears = BTreeMap::new();
        for l in &schedule.linears {
            for f in [Format::Fp8, Format::Nvfp4] {
                let w = WeightFormat::of(Some(f));
                let shape = LinearShape {
                    format: w,
                    ..l.shape
                };
                let layer = shapes.iter().find(|s| s.name == l.name).unwrap();
                let m = cost
                    .latency(layer, LinearPrecision::weight_only(f))
                    .unwrap()
                    * scale;
                linears.insert((shape, w), vec![m * 1.5, m, m, m * 0.9, m]);
            }
        }
        Measurements {
            device: "NVIDIA H100 80GB HBM3".into(),
            batch: 1,
            context: 64,
            model: Some("tiny".into()),
            linears,
            rest: vec![2e-4, 1e-4, 1e-4],
        }
    }

    #[test]
    fn a_recorded_profile_compares_measured_with_modelled_per_family() {
        let graph = Graph::build(&tiny_spec(Architecture::Llama));
        let schedule = Schedule::build(&graph, &PrecisionMap::new())
            .unwrap()
            .with_act(ActDtype::Bf16);
        let cost = KernelCost::new(Gpu::H100, &graph, 1, 64)
            .unwrap()
            .with_act(ActDtype::Bf16);
        let shapes = LayerShape::of_graph(&graph);
        let m = measurements(&schedule, &cost, 2.0);
        let raw = record(&schedule, &shapes, &m, Some(&cost)).unwrap();
        // Every linear layer, lm_head included, in both formats; the rest's median.
        assert_eq!(raw.layers.len(), schedule.linears.len());
        assert!(raw.layers.values().all(|f| f.len() == 2));
        assert_eq!(raw.other_seconds, 1e-4);
        assert_eq!(raw.activations, Some(ActDtype::Bf16));
        let bytes = serde_json::to_vec(&raw).unwrap();
        let profile = Profile::parse(&bytes, std::path::Path::new("p.json")).unwrap();
        let c = compare(&profile).unwrap();
        let families: Vec<&str> = c.families.iter().map(|f| f.family.as_str()).collect();
        assert_eq!(families, ["gemv fp8", "gemv nvfp4"]);
        for f in &c.families {
            assert!((f.ratio - 2.0).abs() < 1e-9, "{f:?}");
            assert!((f.min_ratio - 2.0).abs() < 1e-9 && (f.max_ratio - 2.0).abs() < 1e-9);
            assert_eq!(f.launches, schedule.linears.len());
        }
        let [measured, modelled, _] = c.rest.unwrap();
        assert_eq!(measured, 1e-4);
        assert!((modelled - cost.fixed_latency(&shapes)).abs() < 1e-15);
        // The tail: each kernel's p95 is its slowest of 5 samples, 1.5x the median.
        let p95 = profile
            .with_percentile(crate::latency::Percentile::P95)
            .unwrap();
        let q = &shapes[0];
        let median = cost
            .latency(q, LinearPrecision::weight_only(Format::Fp8))
            .unwrap()
            * 2.0;
        assert!(
            (p95.latency(q, LinearPrecision::weight_only(Format::Fp8))
                .unwrap()
                - 1.5 * median)
                .abs()
                < 1e-15
        );
    }

    #[test]
    fn without_a_cost_model_there_is_nothing_to_compare() {
        let graph = Graph::build(&tiny_spec(Architecture::Llama));
        let schedule = Schedule::build(&graph, &PrecisionMap::new()).unwrap();
        let cost = KernelCost::new(Gpu::H100, &graph, 1, 64).unwrap();
        let m = measurements(&schedule, &cost, 1.0);
        let raw = record(&schedule, &LayerShape::of_graph(&graph), &m, None).unwrap();
        assert!(raw.kernels.iter().all(|k| k.modelled_seconds.is_none()));
        let bytes = serde_json::to_vec(&raw).unwrap();
        let profile = Profile::parse(&bytes, std::path::Path::new("p.json")).unwrap();
        let e = compare(&profile).unwrap_err().to_string();
        assert!(e.contains("records no modelled cost"), "{e}");
    }
}
