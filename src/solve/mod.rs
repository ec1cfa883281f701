//! Solvers: pick one precision per linear layer from calibrated errors and per-layer latency.
//!
//! Everything here works on a [`Problem`] of flat arrays (no graph, no petgraph, no CUDA):
//! `n` layers; layer `i`'s allowed precisions (a weight format, and an activation format when
//! activations are quantized too: [`LinearPrecision`]) are the choices
//! `offsets[i]..offsets[i+1]`, each with its error (the objective: eps or KL), the paper's
//! eps, latency (seconds) and weight bytes; layers with equal group ids must take the same
//! precision (q/k/v or gate/up running as one fused kernel). [`build`] makes a problem from a calibration, a latency model, a menu
//! and pins ([`pins`]). Solvers:
//! - [`mod@greedy`]: the FPX paper's rule: the fraction gamma of layers with the lowest eps go to
//!   FP4, the rest to FP8 (or gamma counted by weight bytes);
//! - [`mod@ilp`]: a 0-1 integer program (good_lp + HiGHS): minimise total error under a latency
//!   budget, or total latency under an error budget, optionally under a weight-memory budget;
//! - [`exhaustive`]: enumeration, the ground truth for tests on small instances.
//!
//! [`sweep`] runs both across gamma for Pareto curves and renders them ([`plot`]).

pub mod build;
pub mod exhaustive;
mod formulation;
pub mod greedy;
pub mod ilp;
pub mod pins;
pub mod plot;
pub mod sweep;
mod units;

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lower::LinearPrecision;

pub use build::{build_problem, shards_cleanly, BuildOptions, BuildReport};
pub use greedy::{greedy, GreedyOptions, GreedyRule, GreedySolution};
pub use ilp::{ilp, IlpOptions, IlpSolution, IlpStatus};

/// What "error" means in the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Sum over layers of the relative output error eps (the FPX paper).
    #[default]
    Eps,
    /// Sum over layers of the measured KL divergence with only that layer quantized.
    Kl,
}

impl std::str::FromStr for Objective {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "eps" => Ok(Objective::Eps),
            "kl" => Ok(Objective::Kl),
            _ => Err(Error::invalid(
                "--objective",
                format!("`{s}` (expected eps or kl)"),
            )),
        }
    }
}

/// Layers that run as one fused kernel and so must share a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKind {
    /// q_proj, k_proj and v_proj of a block.
    Qkv,
    /// gate_proj and up_proj of a block.
    GateUp,
}

impl std::str::FromStr for GroupKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "qkv" => Ok(GroupKind::Qkv),
            "gate_up" | "gateup" => Ok(GroupKind::GateUp),
            _ => Err(Error::invalid(
                "--group",
                format!("`{s}` (expected qkv or gate_up)"),
            )),
        }
    }
}

/// A planning problem as flat arrays.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Problem {
    /// Layer names (`n`).
    pub names: Vec<String>,
    /// Group id per layer (`n`): layers with equal ids take the same format.
    pub groups: Vec<u32>,
    /// `n + 1` offsets: layer `i`'s choices are `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<usize>,
    /// Per choice: the precision.
    pub precisions: Vec<LinearPrecision>,
    /// Per choice: the objective's error (eps or KL).
    pub error: Vec<f64>,
    /// Per choice: the paper's eps (greedy ranks by it; plans report it).
    pub eps: Vec<f64>,
    /// Per choice: seconds per step.
    pub latency: Vec<f64>,
    /// Per choice: weight bytes.
    pub bytes: Vec<u64>,
    /// Seconds of the step outside the planned layers.
    pub fixed_latency: f64,
}

/// Sums over the layers of an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Totals {
    pub error: f64,
    pub eps: f64,
    /// Seconds per step of the planned layers.
    pub latency: f64,
    pub bytes: u64,
}

/// One format per layer: `choice[i]` indexes the problem's choice arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub choice: Vec<usize>,
    pub totals: Totals,
}

/// What the ILP and the exhaustive search optimise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Minimise total error subject to total latency (seconds) <= the budget.
    Latency { seconds: f64 },
    /// Minimise total latency subject to total error <= the budget.
    Error { error: f64 },
}

/// A target and an optional weight-memory budget (bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Constraints {
    pub target: Target,
    pub memory: Option<u64>,
}

/// Relative slack with which a total meets a budget: solvers' feasibility tolerances and
/// f64 summation order must not turn an assignment exactly at the budget into a violation.
pub const BUDGET_SLACK: f64 = 1e-9;

/// Whether `value` meets `budget` (within [`BUDGET_SLACK`]).
pub fn fits(value: f64, budget: f64) -> bool {
    value <= budget + BUDGET_SLACK * budget.abs().max(1e-30)
}

impl Problem {
    /// Number of layers.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Layer `i`'s choices.
    pub fn choices(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// The choice of layer `i` in precision `f`.
    pub fn choice_of(&self, i: usize, f: LinearPrecision) -> Option<usize> {
        self.choices(i).find(|&c| self.precisions[c] == f)
    }

    /// Checks array lengths, values and menus. Errors name the layer.
    pub fn validate(&self) -> Result<()> {
        let n = self.names.len();
        let m = self.precisions.len();
        let bad = |reason: String| Err(Error::invalid("planning problem", reason));
        if self.groups.len() != n || self.offsets.len() != n + 1 {
            return bad(format!(
                "{n} layers but {} group ids and {} offsets",
                self.groups.len(),
                self.offsets.len()
            ));
        }
        if [
            self.error.len(),
            self.eps.len(),
            self.latency.len(),
            self.bytes.len(),
        ]
        .iter()
        .any(|&l| l != m)
            || self.offsets.first() != Some(&0)
            || self.offsets.last() != Some(&m)
        {
            return bad(format!(
                "choice arrays disagree on their length ({m} formats)"
            ));
        }
        if n == 0 {
            return bad("no layers to plan".into());
        }
        for i in 0..n {
            let name = &self.names[i];
            if self.offsets[i] > self.offsets[i + 1] {
                return bad(format!("offsets decrease at layer `{name}`"));
            }
            if self.choices(i).is_empty() {
                return Err(Error::Layer {
                    layer: name.clone(),
                    reason: "no allowed format (the menu is empty for this layer)".into(),
                });
            }
            let mut seen = Vec::new();
            for c in self.choices(i) {
                let f = self.precisions[c];
                if seen.contains(&f) {
                    return bad(format!("layer `{name}` lists format {f} twice"));
                }
                seen.push(f);
                for (what, v) in [
                    ("error", self.error[c]),
                    ("eps", self.eps[c]),
                    ("latency", self.latency[c]),
                ] {
                    if !(v.is_finite() && v >= 0.0) {
                        return Err(Error::Layer {
                            layer: name.clone(),
                            reason: format!("{what} of format {f} is {v}, not a finite value >= 0"),
                        });
                    }
                }
            }
        }
        if !(self.fixed_latency.is_finite() && self.fixed_latency >= 0.0) {
            return bad(format!("fixed latency is {}", self.fixed_latency));
        }
        units::units(self).map(|_| ())
    }

    /// Totals of an assignment.
    pub fn totals(&self, choice: &[usize]) -> Totals {
        let mut t = Totals::default();
        for &c in choice {
            t.error += self.error[c];
            t.eps += self.eps[c];
            t.latency += self.latency[c];
            t.bytes += self.bytes[c];
        }
        t
    }

    /// A solution from per-layer choices.
    pub fn solution(&self, choice: Vec<usize>) -> Solution {
        let totals = self.totals(&choice);
        Solution { choice, totals }
    }

    /// Every layer in precision `f`; a layer with a single allowed precision (a pin,
    /// lm_head's default 16-bit) keeps that one. `None` if some layer allows neither.
    pub fn uniform(&self, f: LinearPrecision) -> Option<Solution> {
        let choice = (0..self.len())
            .map(|i| {
                let only = (self.choices(i).len() == 1).then_some(self.offsets[i]);
                self.choice_of(i, f).or(only)
            })
            .collect::<Option<Vec<usize>>>()?;
        Some(self.solution(choice))
    }

    /// The planned-layer latency budget that makes the whole step `speedup` times faster
    /// than every layer in `baseline` (fixed latency included on both sides).
    pub fn speedup_budget(&self, speedup: f64, baseline: LinearPrecision) -> Result<f64> {
        if !(speedup.is_finite() && speedup > 0.0) {
            return Err(Error::invalid(
                "--speedup",
                format!("{speedup}: must be a positive number"),
            ));
        }
        let base = self.uniform(baseline).ok_or_else(|| {
            Error::invalid(
                "--speedup",
                format!("the baseline format {baseline} is not allowed for every layer"),
            )
        })?;
        let step = base.totals.latency + self.fixed_latency;
        let budget = step / speedup - self.fixed_latency;
        let fastest: f64 = units::units(self)?
            .iter()
            .map(|u| {
                u.options
                    .iter()
                    .map(|o| o.latency)
                    .fold(f64::INFINITY, f64::min)
            })
            .sum();
        if !fits(fastest, budget) {
            return Err(Error::Infeasible {
                reason: format!(
                    "a {speedup}x speedup over all-{baseline} ({:.3} ms per step) needs {:.3} ms \
                     per step; the fastest assignment takes {:.3} ms (at most {:.4}x)",
                    step * 1e3,
                    step / speedup * 1e3,
                    (fastest + self.fixed_latency) * 1e3,
                    step / (fastest + self.fixed_latency)
                ),
            });
        }
        Ok(budget)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Small problems for the solver tests.
    use super::*;
    use crate::formats::Format;

    /// A two-format (fp8, nvfp4) problem: per layer (eps fp8, eps fp4, lat fp8, lat fp4).
    pub fn two_format(layers: &[(f64, f64, f64, f64)]) -> Problem {
        let mut p = Problem {
            offsets: vec![0],
            ..Problem::default()
        };
        for (i, &(e8, e4, l8, l4)) in layers.iter().enumerate() {
            p.names.push(format!("model.layers.{i}.mlp.down_proj"));
            p.groups.push(i as u32);
            for (f, e, l, b) in [(Format::Fp8, e8, l8, 100), (Format::Nvfp4, e4, l4, 60)] {
                p.precisions.push(LinearPrecision::weight_only(f));
                p.error.push(e);
                p.eps.push(e);
                p.latency.push(l);
                p.bytes.push(b);
            }
            p.offsets.push(p.precisions.len());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Format;

    #[test]
    fn validation_names_the_layer() {
        let mut p = testing::two_format(&[(0.01, 0.05, 2.0, 1.0), (0.01, 0.04, 2.0, 1.0)]);
        assert!(p.validate().is_ok());
        p.latency[3] = f64::NAN;
        let e = p.validate().unwrap_err().to_string();
        assert!(
            e.contains("model.layers.1.mlp.down_proj") && e.contains("latency"),
            "{e}"
        );
        let mut q = testing::two_format(&[(0.01, 0.05, 2.0, 1.0)]);
        q.precisions.truncate(0);
        assert!(q.validate().is_err());
    }

    #[test]
    fn speedup_budget_counts_the_fixed_latency() {
        let mut p = testing::two_format(&[(0.01, 0.05, 2.0, 1.0), (0.01, 0.04, 2.0, 1.0)]);
        p.fixed_latency = 2.0;
        // all fp8: 4 + 2 = 6 per step; 1.2x -> 5 per step -> 3 for the layers.
        let only = LinearPrecision::weight_only;
        assert!((p.speedup_budget(1.2, only(Format::Fp8)).unwrap() - 3.0).abs() < 1e-12);
        // the fastest step is 2 + 2 = 4: at most 1.5x.
        let e = p
            .speedup_budget(2.0, only(Format::Fp8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 1.5000x"), "{e}");
        assert!(p.speedup_budget(1.0, only(Format::Mxfp4)).is_err());
    }
}
