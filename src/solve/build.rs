//! Building a [`Problem`] from a calibration file, a latency model, a menu of formats,
//! groups and pins. The only place in `solve` that knows layer kinds and blocks; the problem
//! it returns is flat arrays.
//!
//! Per layer, the allowed formats are the menu (lm_head: its own menu, 16-bit by default as
//! serving engines keep it), or the pinned format alone. Error per choice:
//! the calibrated eps (objective `eps`) or KL (objective `kl`, refused when the calibration
//! has no KL). FP16 is the reference precision: when the calibration did not measure it, its
//! error is taken as 0. Latency comes from the latency model (which must cover every pair),
//! bytes from [`Format::weight_bytes`].

use std::collections::BTreeMap;

use crate::calib::Calibration;
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::LinearKind;
use crate::latency::{LatencyModel, LayerShape};

use super::pins::{PinTarget, Pins};
use super::{GroupKind, Objective, Problem};

/// What to plan with.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Formats every unpinned layer but lm_head may take.
    pub menu: Vec<Format>,
    /// Formats an unpinned lm_head may take.
    pub lm_head: Vec<Format>,
    pub objective: Objective,
    /// Layers that must share a format.
    pub groups: Vec<GroupKind>,
    pub pins: Option<Pins>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            menu: vec![Format::Fp8, Format::Nvfp4],
            lm_head: vec![Format::Fp16],
            objective: Objective::Eps,
            groups: Vec::new(),
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
}

fn group_key(kind: LinearKind, groups: &[GroupKind]) -> Option<u8> {
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
            return Err(Error::invalid(flag, format!("format {f} is listed twice")));
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
    let allowed: Vec<Vec<Format>> = (0..shapes.len())
        .map(|i| match resolution.as_ref().and_then(|r| r.pinned[i]) {
            Some((f, _)) => vec![f],
            None if shapes[i].kind == LinearKind::LmHead => o.lm_head.clone(),
            None => o.menu.clone(),
        })
        .collect();
    // Ask the latency source about every pair first, so a profile reports all it misses
    // (layers grouped by their allowed formats: lm_head is asked only its own menu).
    let mut by_menu: BTreeMap<&[Format], Vec<LayerShape>> = BTreeMap::new();
    for (shape, formats) in shapes.iter().zip(&allowed) {
        by_menu.entry(formats).or_default().push(shape.clone());
    }
    for (formats, layers) in &by_menu {
        latency.check_covers(layers, formats)?;
    }

    let mut p = Problem {
        offsets: vec![0],
        fixed_latency: latency.fixed_latency(&shapes),
        ..Problem::default()
    };
    let mut group_ids: BTreeMap<(usize, u8), u32> = BTreeMap::new();
    for (i, (shape, record)) in shapes.iter().zip(&calib.layers).enumerate() {
        p.names.push(shape.name.clone());
        let id = match group_key(shape.kind, &o.groups) {
            Some(k) => {
                let next = (shapes.len() + group_ids.len()) as u32;
                *group_ids.entry((shape.layer, k)).or_insert(next)
            }
            None => i as u32,
        };
        p.groups.push(id);
        for &f in &allowed[i] {
            let (eps, kl) = match record.metrics.get(&f) {
                Some(m) => (m.eps, m.kl),
                None if f == Format::Fp16 => (0.0, Some(0.0)),
                None => {
                    let measured: Vec<&str> = record.metrics.keys().map(|f| f.name()).collect();
                    return Err(Error::Layer {
                        layer: shape.name.clone(),
                        reason: format!(
                            "the calibration has no metrics for format {f} (it measured {})",
                            measured.join(", ")
                        ),
                    });
                }
            };
            let error = match o.objective {
                Objective::Eps => eps,
                Objective::Kl => kl.ok_or_else(|| Error::Layer {
                    layer: shape.name.clone(),
                    reason: format!(
                        "objective kl, but the calibration has no KL for format {f} \
                         (calibrate with --kl-windows > 0, or plan with --objective eps)"
                    ),
                })?,
            };
            p.formats.push(f);
            p.error.push(error);
            p.eps.push(eps);
            p.latency.push(latency.latency(shape, f)?);
            p.bytes
                .push(f.weight_bytes(shape.out_features, shape.in_features));
        }
        p.offsets.push(p.formats.len());
    }
    p.validate()?;
    let report = BuildReport {
        pinned: resolution
            .as_ref()
            .map_or(0, |r| r.pinned.iter().filter(|x| x.is_some()).count()),
        unmatched_pins: resolution.map(|r| r.unmatched).unwrap_or_default(),
        layers: shapes,
    };
    Ok((p, report))
}
