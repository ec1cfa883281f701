//! The integer program: choose one format per decision unit (a layer, or a group sharing a
//! format) to minimise total error under a latency budget, or total latency under an error
//! budget, optionally under a weight-memory budget. Solved with HiGHS through good_lp
//! (`solve::formulation` has the models and their numerics).
//!
//! Guarantees: budgets below the minimum achievable are reported before solving, naming the
//! binding one and the minimum (`solve::exhaustive::check_bounds`); budgets achievable
//! alone but not together are reported with the best the budgeted quantity reaches within
//! the memory budget. The returned assignment is re-checked in exact f64 against the
//! unscaled budgets ([`fits`]). HiGHS stops at `mip_rel_gap` (default 1e-4, HiGHS's own
//! default); independently, the LP relaxation's optimum is reported as `lower_bound`, so
//! every plan carries a certificate: no assignment beats it by more than
//! `objective - lower_bound`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

use super::exhaustive::check_bounds;
use super::formulation::{self, Key, Mode, Spec};
use super::units::{self, Unit};
use super::{fits, Constraints, Problem, Solution, Target};

/// Solver settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IlpOptions {
    /// Relative optimality gap at which HiGHS stops.
    pub mip_rel_gap: f64,
    /// Wall-clock limit in seconds (the best assignment found so far is returned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<f64>,
}

impl Default for IlpOptions {
    fn default() -> Self {
        IlpOptions {
            mip_rel_gap: 1e-4,
            time_limit: None,
        }
    }
}

/// How the MIP ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IlpStatus {
    /// Proven optimal (gap 0).
    Optimal,
    /// Within `mip_rel_gap` of the optimum.
    GapLimit,
    /// Stopped by the time limit: feasible, optimality not proven.
    TimeLimit,
}

/// An ILP assignment, how the solver ended, and the LP bound on the objective (total error
/// under a latency budget, total latency under an error budget).
#[derive(Debug, Clone, PartialEq)]
pub struct IlpSolution {
    pub solution: Solution,
    pub status: IlpStatus,
    /// The LP relaxation's optimum: no assignment has a smaller objective.
    pub lower_bound: f64,
}

impl IlpSolution {
    /// `(objective - lower_bound) / objective` for `target` (0 when the objective is 0).
    pub fn gap(&self, target: Target) -> f64 {
        let v = match target {
            Target::Latency { .. } => self.solution.totals.error,
            Target::Error { .. } => self.solution.totals.latency,
        };
        if v > 0.0 {
            ((v - self.lower_bound) / v).max(0.0)
        } else {
            0.0
        }
    }
}

fn spec<'u>(units: &'u [Unit], c: &Constraints) -> Spec<'u> {
    let (objective, budget) = match c.target {
        Target::Latency { seconds } => (Key::Error, (Key::Latency, seconds)),
        Target::Error { error } => (Key::Latency, (Key::Error, error)),
    };
    Spec {
        units,
        objective,
        budget: Some(budget),
        memory: c.memory,
    }
}

/// Solves in the aggregated formulation when no row involves the error, falling back to
/// binaries if HiGHS returns a fractional `x` there.
fn solve_mip(s: &Spec, o: &IlpOptions) -> Result<Option<formulation::Outcome>> {
    if !s.budget.is_some_and(|(k, _)| k == Key::Error) {
        let start = std::time::Instant::now();
        let solved = formulation::solve(s, Mode::Aggregated, o)?;
        tracing::debug!(seconds = start.elapsed().as_secs_f64(), "aggregated MIP");
        if let Some(out) = solved {
            if out.integral {
                return Ok(Some(out));
            }
            tracing::debug!("aggregated ILP returned a fractional x; solving with binaries");
        } else {
            return Ok(None);
        }
    }
    formulation::solve(s, Mode::Binary, o)
}

/// Solves `p` under `c`.
pub fn ilp(p: &Problem, c: &Constraints, o: &IlpOptions) -> Result<IlpSolution> {
    p.validate()?;
    if !(o.mip_rel_gap.is_finite() && o.mip_rel_gap >= 0.0) {
        return Err(Error::invalid(
            "--mip-gap",
            format!("{}: must be a finite number >= 0", o.mip_rel_gap),
        ));
    }
    if o.time_limit.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
        return Err(Error::invalid(
            "--time-limit",
            "must be a positive number of seconds",
        ));
    }
    let units = units::units(p)?;
    check_bounds(&units, c)?;
    let s = spec(&units, c);
    let Some(out) = solve_mip(&s, o)? else {
        return Err(Error::Infeasible {
            reason: explain(&units, c, o)?,
        });
    };
    let solution = units::expand(p, &units, &out.picks);
    let t = solution.totals;
    let ok = match c.target {
        Target::Latency { seconds } => fits(t.latency, seconds),
        Target::Error { error } => fits(t.error, error),
    } && c.memory.is_none_or(|m| t.bytes <= m);
    if !ok {
        return Err(Error::Solver {
            reason: format!(
                "HiGHS returned an assignment that violates a budget beyond the tolerance \
                 (latency {} s, error {}, {} bytes)",
                t.latency, t.error, t.bytes
            ),
        });
    }
    let start = std::time::Instant::now();
    let lower_bound =
        formulation::solve(&s, Mode::Relaxed, o)?.map_or(f64::NEG_INFINITY, |r| r.objective);
    tracing::debug!(seconds = start.elapsed().as_secs_f64(), "LP bound");
    Ok(IlpSolution {
        solution,
        status: out.status,
        lower_bound,
    })
}

/// Says which budget binds when the budgets cannot be met together (each one alone can,
/// or [`check_bounds`] would have said so): the best the budgeted quantity reaches within
/// the memory budget.
fn explain(units: &[Unit], c: &Constraints, o: &IlpOptions) -> Result<String> {
    let Some(mem) = c.memory else {
        return Ok("no assignment meets the budget".into());
    };
    let key = match c.target {
        Target::Latency { .. } => Key::Latency,
        Target::Error { .. } => Key::Error,
    };
    let probe = Spec {
        units,
        objective: key,
        budget: None,
        memory: Some(mem),
    };
    let min = match solve_mip(&probe, o)? {
        Some(out) => units
            .iter()
            .zip(&out.picks)
            .map(|(u, &k)| key.of(&u.options[k]))
            .sum(),
        None => f64::NAN,
    };
    Ok(match c.target {
        Target::Latency { seconds } => format!(
            "within the weight-memory budget of {mem} bytes the minimum achievable latency is \
             {:.6} ms, above the latency budget of {:.6} ms",
            min * 1e3,
            seconds * 1e3
        ),
        Target::Error { error } => format!(
            "within the weight-memory budget of {mem} bytes the minimum achievable error is \
             {min:.6}, above the error budget of {error:.6}"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Format;
    use crate::solve::exhaustive::exhaustive;
    use crate::solve::testing::two_format;

    #[test]
    fn matches_the_hand_solved_knapsack_and_explains_joint_infeasibility() {
        // Savings in microseconds; errors tiny, as real KL values are.
        let p = two_format(&[
            (1e-5, 5e-5, 4e-6, 1e-6),
            (1e-5, 2e-5, 2e-6, 1e-6),
            (1e-5, 3e-5, 3e-6, 1e-6),
        ]);
        let lat = |seconds| Constraints {
            target: Target::Latency { seconds },
            memory: None,
        };
        // all fp8: 9 us. Budget 6 us: save 3 us: layer 0 alone (3 us, +4e-5) or layers 1+2
        // (1 + 2 us, +1e-5 + 2e-5 = 3e-5): the pair wins.
        let s = ilp(&p, &lat(6e-6), &IlpOptions::default()).unwrap();
        assert_eq!(s.solution.choice, vec![0, 3, 5]);
        assert_eq!(s.solution, exhaustive(&p, &lat(6e-6)).unwrap());
        assert!(s.lower_bound <= s.solution.totals.error + 1e-15);
        assert!(s.gap(lat(6e-6).target) < 0.2);
        let e = ilp(&p, &lat(2e-6), &IlpOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("minimum achievable 0.003000 ms"), "{e}");
        // Error budget with a memory budget that forces fp4 everywhere.
        let both = Constraints {
            target: Target::Error { error: 5e-5 },
            memory: Some(180),
        };
        let e = ilp(&p, &both, &IlpOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("within the weight-memory budget of 180 bytes the minimum achievable error is 0.000100"),
            "{e}"
        );
    }

    #[test]
    fn identical_shapes_are_aggregated_without_losing_the_optimum() {
        // Ten layers of one shape (a class): the aggregated model must pick the four with
        // the smallest fp4 penalty for a budget of four savings; pin one of them to fp8.
        let penalties = [0.09, 0.02, 0.07, 0.01, 0.05, 0.03, 0.08, 0.04, 0.06, 0.10];
        let layers: Vec<(f64, f64, f64, f64)> = penalties
            .iter()
            .map(|&d| (0.01, 0.01 + d, 2e-6, 1e-6))
            .collect();
        let p = two_format(&layers);
        let c = Constraints {
            target: Target::Latency { seconds: 16e-6 },
            memory: None,
        };
        let s = ilp(&p, &c, &IlpOptions::default()).unwrap();
        let low: Vec<usize> = (0..10)
            .filter(|&i| p.precisions[s.solution.choice[i]].weights == Format::Nvfp4)
            .collect();
        assert_eq!(low, vec![1, 3, 5, 7]);
        assert_eq!(s.status, IlpStatus::Optimal);
        // The error target takes the binary model with ordering rows: same optimum mirrored.
        let c = Constraints {
            target: Target::Error {
                error: s.solution.totals.error,
            },
            memory: None,
        };
        let m = ilp(&p, &c, &IlpOptions::default()).unwrap();
        assert_eq!(m.solution.totals.latency, 16e-6);
    }
}
