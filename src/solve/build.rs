//! Building a [`Problem`] from a calibration file, a latency model, a menu of formats,
//! groups and pins. The only place in `solve` that knows layer kinds and blocks; the problem
//! it returns is flat arrays.
//!
//! Per layer, the allowed precisions are the menu (lm_head: its own menu, 16-bit by default as
//! serving engines keep it), or the pinned precision alone. A menu entry is a weight format
//! (`fp8`: weight-only) or weights with activations quantized to the same format (`fp8+fp8`,
//! W8A8), which is what the calibration measures (`eps_wa`). Error per choice: the calibrated
//! eps, or eps_wa for quantized activations (objective `eps`), or KL, kl_wa for quantized
//! activations (objective `kl`, refused when the calibration has no KL for that precision:
//! kl_wa needs `calibrate --kl-activations`). FP16 is the reference precision: when the
//! calibration did not measure it, its error is taken as 0. Latency comes from the latency model (which must cover every pair:
//! the kernel cost model refuses what the generated kernels cannot run), bytes from
//! [`Format::weight_bytes`].

use std::collections::BTreeMap;

use crate::calib::{Calibration, LayerCalibration};
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::LinearKind;
use crate::latency::{LatencyModel, LayerShape};
use crate::lower::LinearPrecision;

use super::pins::{PinTarget, Pins};
use super::{GroupKind, Objective, Problem};

/// What to plan with.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Precisions every unpinned layer but lm_head may take.
    pub menu: Vec<LinearPrecision>,
    /// Precisions an unpinned lm_head may take.
    pub lm_head: Vec<LinearPrecision>,
    /// GPUs the model is sharded over: a row-parallel layer (o, down) is not offered a
    /// block-scaled format whose blocks would straddle its shards.
    pub tensor_parallel: usize,
    pub objective: Objective,
    /// Layers that must share a format.
    pub groups: Vec<GroupKind>,
    /// Each MoE expert projection takes its own format. By default every expert projection
    /// of a block shares one (the fused MoE kernels of vLLM and SGLang, and ModelOpt's
    /// exports, quantize a block's experts alike).
    pub per_expert: bool,
    pub pins: Option<Pins>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            menu: vec![
                LinearPrecision::weight_only(Format::Fp8),
                LinearPrecision::weight_only(Format::Nvfp4),
            ],
            lm_head: vec![LinearPrecision::weight_only(Format::Fp16)],
            tensor_parallel: 1,
            objective: Objective::Eps,
            groups: Vec::new(),
            per_expert: false,
            pins: None,
        }
    }
}

/// What building found besides the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildReport {
    /// The layers, in problem order.
    pub layers: Vec<LayerShape>,
    /// Number of pinned layers.
    pub pinned: usize,
    /// Pin rules that matched no layer.
    pub unmatched_pins: Vec<String>,
    /// (layer, precision) pairs of the menu not offered because the format's scale blocks
    /// would straddle the layer's tensor-parallel shards.
    pub not_offered: Vec<(String, LinearPrecision)>,
}

/// Whether `format` keeps whole scale blocks inside each of `tp` shards of a layer of `kind`
/// with `k` input features (row-parallel layers split K; column-parallel ones split rows,
/// which never cuts a block).
pub fn shards_cleanly(kind: LinearKind, k: usize, format: Format, tp: usize) -> bool {
    if tp <= 1 || !matches!(kind, LinearKind::O | LinearKind::Down) {
        return true;
    }
    k.is_multiple_of(tp)
        && format
            .block_size()
            .is_none_or(|b| (k / tp).is_multiple_of(b))
}

/// [`shards_cleanly`] for the weights and, when quantized, the activations (whose blocks
/// also run along K).
fn precision_shards_cleanly(kind: LinearKind, k: usize, p: LinearPrecision, tp: usize) -> bool {
    std::iter::once(p.weights)
        .chain(p.activations)
        .all(|f| shards_cleanly(kind, k, f, tp))
}

/// The calibrated (eps, KL) of `record` in precision `p`.
fn metrics_of(record: &LayerCalibration, p: LinearPrecision) -> Result<(f64, Option<f64>)> {
    let f = p.weights;
    let Some(m) = record.metrics.get(&f) else {
        if p == LinearPrecision::weight_only(Format::Fp16) {
            return Ok((0.0, Some(0.0)));
        }
        let measured: Vec<&str> = record.metrics.keys().map(|f| f.name()).collect();
        return Err(Error::Layer {
            layer: record.name.clone(),
            reason: format!(
                "the calibration has no metrics for format {f} (it measured {})",
                measured.join(", ")
            ),
        });
    };
    match p.activations {
        None => Ok((m.eps, m.kl)),
        Some(a) if a == f => Ok((m.eps_wa, m.kl_wa)),
        Some(a) => Err(Error::Layer {
            layer: record.name.clone(),
            reason: format!(
                "{p}: the calibration measures quantized activations only in the weights' \
                 format ({f}+{f}), not {a}"
            ),
        }),
    }
}

fn group_key(kind: LinearKind, expert: bool, o: &BuildOptions) -> Option<u8> {
    let groups = &o.groups;
    if expert {
        return (!o.per_expert).then_some(2);
    }
    let qkv = matches!(kind, LinearKind::Q | LinearKind::K | LinearKind::V);
    let gate_up = matches!(kind, LinearKind::Gate | LinearKind::Up);
    if qkv && groups.contains(&GroupKind::Qkv) {
        Some(0)
    } else if gate_up && groups.contains(&GroupKind::GateUp) {
        Some(1)
    } else {
        None
    }
}

/// The planning problem of `calib`'s layers.
pub fn build_problem(
    calib: &Calibration,
    latency: &dyn LatencyModel,
    o: &BuildOptions,
) -> Result<(Problem, BuildReport)> {
    for (flag, menu) in [("--menu", &o.menu), ("--lm-head", &o.lm_head)] {
        if menu.is_empty() {
            return Err(Error::invalid(flag, "empty: give at least one format"));
        }
        if let Some(f) = menu
            .iter()
            .enumerate()
            .find_map(|(i, f)| menu[..i].contains(f).then_some(f))
        {
            return Err(Error::invalid(flag, format!("{f} is listed twice")));
        }
    }
    let shapes = LayerShape::from_calibration(calib);
    let resolution = match &o.pins {
        Some(pins) => {
            let targets: Vec<PinTarget> = shapes
                .iter()
                .map(|s| PinTarget {
                    name: &s.name,
                    layer: s.layer,
                    kind: s.kind,
                })
                .collect();
            Some(pins.resolve(&targets)?)
        }
        None => None,
    };
    let mut not_offered = Vec::new();
    let mut allowed: Vec<Vec<LinearPrecision>> = Vec::with_capacity(shapes.len());
    for (i, shape) in shapes.iter().enumerate() {
        let clean = |p: &LinearPrecision| {
            precision_shards_cleanly(shape.kind, shape.in_features, *p, o.tensor_parallel)
        };
        let precisions = match resolution.as_ref().and_then(|r| r.pinned[i]) {
            Some((p, rule)) if !clean(&p) => {
                return Err(Error::Layer {
                    layer: shape.name.clone(),
                    reason: format!(
                        "pinned to {p} by pin rule {}, but its scale blocks straddle the \
                         layer's {} tensor-parallel shards of K = {}",
                        rule + 1,
                        o.tensor_parallel,
                        shape.in_features
                    ),
                })
            }
            Some((p, _)) => vec![p],
            None => {
                let menu = if shape.kind == LinearKind::LmHead {
                    &o.lm_head
                } else {
                    &o.menu
                };
                let (ok, dropped): (Vec<LinearPrecision>, Vec<LinearPrecision>) =
                    menu.iter().copied().partition(|p| clean(p));
                not_offered.extend(dropped.into_iter().map(|p| (shape.name.clone(), p)));
                if ok.is_empty() {
                    return Err(Error::Layer {
                        layer: shape.name.clone(),
                        reason: format!(
                            "no format of the menu shards cleanly over {} GPUs (K = {})",
                            o.tensor_parallel, shape.in_features
                        ),
                    });
                }
                ok
            }
        };
        allowed.push(precisions);
    }
    // Ask the latency source about every pair first, so a profile reports all it misses
    // (layers grouped by their allowed precisions: lm_head is asked only its own menu).
    let mut by_menu: BTreeMap<&[LinearPrecision], Vec<LayerShape>> = BTreeMap::new();
    for (shape, precisions) in shapes.iter().zip(&allowed) {
        by_menu.entry(precisions).or_default().push(shape.clone());
    }
    for (precisions, layers) in &by_menu {
        latency.check_covers(layers, precisions)?;
    }

    let mut p = Problem {
        offsets: vec![0],
        fixed_latency: latency.fixed_latency(&shapes),
        ..Problem::default()
    };
    let graph = calib.graph();
    let is_expert = |name: &str| {
        graph.find(name).is_some_and(
            |id| matches!(&graph.node(id).op, crate::ir::Op::Linear(l) if l.expert.is_some()),
        )
    };
    let mut group_ids: BTreeMap<(usize, u8), u32> = BTreeMap::new();
    for (i, (shape, record)) in shapes.iter().zip(&calib.layers).enumerate() {
        p.names.push(shape.name.clone());
        let id = match group_key(shape.kind, is_expert(&shape.name), o) {
            Some(k) => {
                let next = (shapes.len() + group_ids.len()) as u32;
                *group_ids.entry((shape.layer, k)).or_insert(next)
            }
            None => i as u32,
        };
        p.groups.push(id);
        for &precision in &allowed[i] {
            let (eps, kl) = metrics_of(record, precision)?;
            let error = match o.objective {
                Objective::Eps => eps,
                Objective::Kl => kl.ok_or_else(|| Error::Layer {
                    layer: shape.name.clone(),
                    reason: if precision.activations.is_some() {
                        format!(
                            "objective kl, but the calibration has no KL for {precision} \
                             (calibrate with --kl-activations, or plan with --objective eps)"
                        )
                    } else {
                        format!(
                            "objective kl, but the calibration has no KL for format {precision} \
                             (calibrate with --kl-windows > 0, or plan with --objective eps)"
                        )
                    },
                })?,
            };
            p.precisions.push(precision);
            p.error.push(error);
            p.eps.push(eps);
            p.latency.push(latency.latency(shape, precision)?);
            p.bytes.push(
                precision
                    .weights
                    .weight_bytes(shape.out_features, shape.in_features),
            );
        }
        p.offsets.push(p.precisions.len());
    }
    p.validate()?;
    let report = BuildReport {
        pinned: resolution
            .as_ref()
            .map_or(0, |r| r.pinned.iter().filter(|x| x.is_some()).count()),
        unmatched_pins: resolution.map(|r| r.unmatched).unwrap_or_default(),
        not_offered,
        layers: shapes,
    };
    Ok((p, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_parallel_layers_keep_whole_scale_blocks_per_shard() {
        // K = 1000 over 2 GPUs: 500 columns each, not a multiple of 16 or 32.
        for f in [Format::Nvfp4, Format::Mxfp4] {
            assert!(!shards_cleanly(LinearKind::Down, 1000, f, 2), "{f}");
            assert!(shards_cleanly(LinearKind::Down, 1000, f, 1), "{f}");
            // Column-parallel layers split rows: blocks stay whole.
            assert!(shards_cleanly(LinearKind::Up, 1000, f, 2), "{f}");
        }
        assert!(shards_cleanly(LinearKind::O, 1000, Format::Fp8, 2));
        // K not divisible by the GPU count at all.
        assert!(!shards_cleanly(LinearKind::O, 1001, Format::Fp8, 2));
        // Qwen2.5-14B's down_proj (K = 13824) at TP 2: 6912 = 216 x 32.
        assert!(shards_cleanly(LinearKind::Down, 13824, Format::Mxfp4, 2));
    }
}
