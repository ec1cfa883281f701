//! Greedy-gamma, exactly as the FPX paper: sort the layers by their eps in the low-precision
//! format (FP4), put the fraction gamma with the lowest eps in it, and the rest in the
//! high-precision format (FP8).
//!
//! Details the paper leaves open, fixed here:
//! - gamma counts layers: the first `round(gamma * free)` layers of the order go low, `free`
//!   being the layers whose menu holds both formats; with `by_bytes`, the longest prefix of
//!   the order whose weight bytes (in the high format) are at most gamma of the free total;
//! - pinned layers (one allowed format) keep it; a layer allowing several formats but not
//!   both low and high takes high if allowed, else low, else the solver refuses;
//! - groups (q/k/v, gate/up) move as one unit ranked by their members' mean eps; a unit goes
//!   low only while the whole unit fits in the count;
//! - ties in eps keep layer order;
//! - `rank_by_error` ranks by the objective's error (e.g. KL) instead of eps: not the paper,
//!   a baseline that separates the choice of error measure from the choice of solver.
//!
//! Besides a gamma, [`GreedyRule`] takes a latency or error budget: then every prefix of the
//! order is a candidate and the best one meeting the budget wins (least error under a latency
//! budget, least latency under an error budget), so greedy and ILP answer the same question.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::lower::LinearPrecision;

use super::exhaustive::check_bounds;
use super::units::{self, Unit};
use super::{fits, Constraints, Problem, Solution, Target};

/// The two precisions greedy chooses between, and how gamma counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GreedyOptions {
    /// Precision of the fraction gamma with the lowest eps (default nvfp4, weight-only).
    pub low: LinearPrecision,
    /// Precision of the rest (default fp8, weight-only).
    pub high: LinearPrecision,
    /// Count gamma by weight bytes instead of layers.
    pub by_bytes: bool,
    /// Rank by the objective's error in the low format (e.g. KL) instead of by eps (the
    /// paper). A baseline that separates the choice of error from the choice of solver.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rank_by_error: bool,
}

impl Default for GreedyOptions {
    fn default() -> Self {
        GreedyOptions {
            low: LinearPrecision::weight_only(Format::Nvfp4),
            high: LinearPrecision::weight_only(Format::Fp8),
            by_bytes: false,
            rank_by_error: false,
        }
    }
}

/// How many layers go low.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GreedyRule {
    /// The paper's fraction gamma in [0, 1].
    Gamma(f64),
    /// The prefix with the least error whose latency (seconds) meets the budget.
    Latency(f64),
    /// The prefix with the least latency whose error meets the budget.
    Error(f64),
}

/// A greedy assignment and the gamma it realises.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedySolution {
    pub solution: Solution,
    /// Fraction of the free layers (or of their bytes, with `by_bytes`) in the low format.
    pub gamma: f64,
    /// Layers in the low format that greedy put there (pinned ones not counted).
    pub low_layers: usize,
}

/// The units greedy may move, in the paper's order, and the fixed picks of the others.
struct Order {
    units: Vec<Unit>,
    /// Option index per unit when not moved low.
    base: Vec<usize>,
    /// Free units, lowest eps first: (unit, option index of low).
    free: Vec<(usize, usize)>,
    /// Per free unit in order: its weight (layers, or high-format bytes).
    weight: Vec<f64>,
    by_bytes: bool,
}

fn order(p: &Problem, o: &GreedyOptions) -> Result<Order> {
    if o.low == o.high {
        return Err(Error::invalid(
            "greedy formats",
            format!("low and high are both {}", o.low),
        ));
    }
    p.validate()?;
    let units = units::units(p)?;
    let mut base = Vec::with_capacity(units.len());
    let mut free = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        match (unit.option(o.low), unit.option(o.high)) {
            (Some(lo), Some(hi)) => {
                base.push(hi);
                free.push((u, lo));
            }
            (_, Some(k)) | (Some(k), None) => base.push(k),
            (None, None) if unit.options.len() == 1 => base.push(0),
            (None, None) => {
                let first = unit.members[0];
                let menu: Vec<String> = unit
                    .options
                    .iter()
                    .map(|x| x.precision.to_string())
                    .collect();
                return Err(Error::Layer {
                    layer: p.names[first].clone(),
                    reason: format!(
                        "greedy chooses between {} and {}, but this layer allows {}",
                        o.low,
                        o.high,
                        menu.join(", ")
                    ),
                });
            }
        }
    }
    if free.is_empty() && units.iter().any(|u| u.options.len() > 1) {
        return Err(Error::invalid(
            "greedy formats",
            format!(
                "greedy moves layers between {} and {}, but no layer allows both \
                 (check --menu, --low and --high)",
                o.low, o.high
            ),
        ));
    }
    let mean_eps = |&(u, lo): &(usize, usize)| {
        let unit: &Unit = &units[u];
        let o_lo = &unit.options[lo];
        let key = if o.rank_by_error {
            o_lo.error
        } else {
            o_lo.eps
        };
        key / unit.members.len() as f64
    };
    free.sort_by(|a, b| mean_eps(a).total_cmp(&mean_eps(b)).then(a.0.cmp(&b.0)));
    let weight = free
        .iter()
        .map(|&(u, _)| {
            let unit = &units[u];
            if o.by_bytes {
                unit.options[base[u]].bytes as f64
            } else {
                unit.members.len() as f64
            }
        })
        .collect();
    Ok(Order {
        units,
        base,
        free,
        weight,
        by_bytes: o.by_bytes,
    })
}

impl Order {
    /// Option picks with the first `k` free units low.
    fn picks(&self, k: usize) -> Vec<usize> {
        let mut picks = self.base.clone();
        for &(u, lo) in &self.free[..k] {
            picks[u] = lo;
        }
        picks
    }

    /// Number of free units that go low for `gamma`.
    fn prefix_for(&self, gamma: f64) -> usize {
        let total: f64 = self.weight.iter().sum();
        let target = if self.by_bytes {
            gamma * total
        } else {
            (gamma * total).round()
        };
        let (mut k, mut sum) = (0, 0.0);
        while k < self.weight.len() && fits(sum + self.weight[k], target) {
            sum += self.weight[k];
            k += 1;
        }
        k
    }
}

/// The greedy assignment under `rule`, optionally also under a weight-memory budget.
pub fn greedy(
    p: &Problem,
    o: &GreedyOptions,
    rule: GreedyRule,
    memory: Option<u64>,
) -> Result<GreedySolution> {
    let ord = order(p, o)?;
    let make = |k: usize| units::expand(p, &ord.units, &ord.picks(k));
    let memory_ok = |s: &Solution| memory.is_none_or(|m| s.totals.bytes <= m);
    let (k, solution) = match rule {
        GreedyRule::Gamma(gamma) => {
            if !(0.0..=1.0).contains(&gamma) {
                return Err(Error::invalid(
                    "--gamma",
                    format!("{gamma}: must lie in [0, 1]"),
                ));
            }
            let k = ord.prefix_for(gamma);
            let s = make(k);
            if !memory_ok(&s) {
                return Err(Error::Infeasible {
                    reason: format!(
                        "greedy at gamma {gamma} needs {} bytes of weights, over the \
                         weight-memory budget of {} bytes",
                        s.totals.bytes,
                        memory.unwrap_or_default()
                    ),
                });
            }
            (k, s)
        }
        GreedyRule::Latency(_) | GreedyRule::Error(_) => {
            let target = match rule {
                GreedyRule::Latency(seconds) => Target::Latency { seconds },
                GreedyRule::Error(error) => Target::Error { error },
                GreedyRule::Gamma(_) => unreachable!("handled above"),
            };
            check_bounds(&ord.units, &Constraints { target, memory })?;
            let key = |s: &Solution| match target {
                Target::Latency { .. } => (s.totals.error, s.totals.latency),
                Target::Error { .. } => (s.totals.latency, s.totals.error),
            };
            let mut best: Option<(usize, Solution)> = None;
            for k in 0..=ord.free.len() {
                let s = make(k);
                let ok = match target {
                    Target::Latency { seconds } => fits(s.totals.latency, seconds),
                    Target::Error { error } => fits(s.totals.error, error),
                };
                if ok && memory_ok(&s) && best.as_ref().is_none_or(|(_, b)| key(&s) < key(b)) {
                    best = Some((k, s));
                }
            }
            best.ok_or_else(|| Error::Infeasible {
                reason: format!(
                    "no greedy prefix ({} low / {} high, {} choices) meets the budget{}; \
                     the ILP searches all assignments",
                    o.low,
                    o.high,
                    ord.free.len() + 1,
                    if memory.is_some() { "s" } else { "" }
                ),
            })?
        }
    };
    let total: f64 = ord.weight.iter().sum();
    // fold from +0.0: an empty f64 `sum()` is -0.0, which would print as "-0".
    let low: f64 = ord.weight[..k].iter().fold(0.0, |a, w| a + w);
    let low_layers = ord.free[..k]
        .iter()
        .map(|&(u, _)| ord.units[u].members.len())
        .sum();
    Ok(GreedySolution {
        solution,
        gamma: if total > 0.0 { low / total } else { 0.0 },
        low_layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solve::testing::two_format;

    fn problem() -> Problem {
        two_format(&[
            (0.01, 0.05, 2.0, 1.0),
            (0.01, 0.02, 2.0, 1.0),
            (0.02, 0.04, 2.0, 1.0),
            (0.01, 0.03, 2.0, 1.0),
        ])
    }

    #[test]
    fn gamma_puts_the_lowest_eps_layers_in_fp4() {
        let p = problem();
        let o = GreedyOptions::default();
        let g = greedy(&p, &o, GreedyRule::Gamma(0.5), None).unwrap();
        // eps fp4 order: 1 (0.02), 3 (0.03), 2 (0.04), 0 (0.05).
        assert_eq!(g.solution.choice, vec![0, 3, 4, 7]);
        assert_eq!((g.gamma, g.low_layers), (0.5, 2));
        let all = greedy(&p, &o, GreedyRule::Gamma(1.0), None).unwrap();
        assert_eq!(all.solution.choice, vec![1, 3, 5, 7]);
        let none = greedy(&p, &o, GreedyRule::Gamma(0.0), None).unwrap();
        assert_eq!(none.solution.choice, vec![0, 2, 4, 6]);
        assert!(greedy(&p, &o, GreedyRule::Gamma(1.5), None).is_err());
    }

    #[test]
    fn by_bytes_counts_weight_not_layers() {
        let mut p = problem();
        // Layer 1 (lowest eps) is as heavy as the three others together.
        p.bytes[2] = 300;
        let o = GreedyOptions {
            by_bytes: true,
            ..GreedyOptions::default()
        };
        let g = greedy(&p, &o, GreedyRule::Gamma(0.4), None).unwrap();
        assert_eq!(g.low_layers, 0, "layer 1 alone is half the bytes");
        let g = greedy(&p, &o, GreedyRule::Gamma(0.5), None).unwrap();
        assert_eq!((g.low_layers, g.gamma), (1, 0.5));
    }

    #[test]
    fn rank_by_error_uses_the_objective_not_eps() {
        let mut p = problem();
        // KL-like errors that reverse the eps order of layers 1 and 0.
        p.error = vec![0.0, 0.001, 0.0, 0.009, 0.0, 0.005, 0.0, 0.007];
        let paper = greedy(&p, &GreedyOptions::default(), GreedyRule::Gamma(0.25), None).unwrap();
        assert_eq!(
            paper.solution.choice,
            vec![0, 3, 4, 6],
            "eps order: layer 1 first"
        );
        let o = GreedyOptions {
            rank_by_error: true,
            ..GreedyOptions::default()
        };
        let by_error = greedy(&p, &o, GreedyRule::Gamma(0.25), None).unwrap();
        assert_eq!(
            by_error.solution.choice,
            vec![1, 2, 4, 6],
            "error order: layer 0 first"
        );
    }

    #[test]
    fn budgets_pick_the_best_prefix_and_pins_stay() {
        let mut p = problem();
        let o = GreedyOptions::default();
        let g = greedy(&p, &o, GreedyRule::Latency(6.5), None).unwrap();
        assert_eq!(g.solution.choice, vec![0, 3, 4, 7]);
        let g = greedy(&p, &o, GreedyRule::Error(0.06), None).unwrap();
        assert_eq!(g.low_layers, 1);
        // Pin layer 0 to fp4: it stays there at gamma 0.
        p.precisions.remove(0);
        p.error.remove(0);
        p.eps.remove(0);
        p.latency.remove(0);
        p.bytes.remove(0);
        for off in p.offsets.iter_mut().skip(1) {
            *off -= 1;
        }
        let g = greedy(&p, &o, GreedyRule::Gamma(0.0), None).unwrap();
        assert_eq!(g.solution.choice, vec![0, 1, 3, 5]);
        assert_eq!(g.solution.totals.latency, 7.0);
    }
}
