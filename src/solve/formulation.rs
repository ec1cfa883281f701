//! The MIP formulations behind [`super::ilp`], built with good_lp and solved by HiGHS.
//!
//! Base model: a variable `x[u][k]` per decision unit `u` and allowed option `k`,
//! `sum_k x[u][k] = 1`, minimise `sum obj[u][k] x[u][k]` subject to an optional budget row
//! and an optional memory row. Every row is divided by its largest coefficient (HiGHS's
//! tolerances are absolute; latencies are microseconds and KL values 1e-4) and the
//! feasibility tolerances are tightened to 1e-9: with the default 1e-7, HiGHS was seen to
//! cut off an optimum lying 1e-11 (relative) inside a latency budget. The absolute MIP gap
//! is 0, so `mip_rel_gap` alone decides when HiGHS stops (0: proven optimal).
//!
//! Classes: units whose options agree in format, latency and bytes (the same layer shape
//! under a roofline: SmolLM2 has four shapes over 210 layers) are interchangeable in every
//! latency and memory row; only their errors differ. Branching on their binaries explores
//! many equivalent trees, so:
//! - [`Mode::Aggregated`] (no error row, i.e. the latency target): an integer count
//!   `n[c][k] = sum_{u in c} x[u][k]` per class and option, and `x` continuous in [0, 1] for
//!   class members. Once the counts are integral, the rows on `x` are a product of
//!   transportation polytopes (the latency and memory rows depend on the counts only), whose
//!   vertices are integral, so the LP optimum at an integral-count node is an integral `x`:
//!   HiGHS branches on a few counts instead of hundreds of binaries. [`solve`] checks the
//!   returned `x` is integral and the caller falls back to [`Mode::Binary`] if not.
//! - [`Mode::Binary`] (error target, where the error row breaks the argument): binaries, and
//!   in two-option classes the ordering rows of [`symmetry_pairs`].
//! - [`Mode::Relaxed`]: every variable continuous: the LP bound reported next to a plan.

use std::collections::BTreeMap;

use good_lp::solvers::highs::highs;
use good_lp::{
    variable, variables, Constraint, Expression, ResolutionError, Solution as _, SolutionStatus,
    SolverModel, Variable,
};

use crate::error::{Error, Result};
use crate::lower::LinearPrecision;

use super::ilp::{IlpOptions, IlpStatus};
use super::units::{Unit, UnitOption};

/// A quantity of an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    Error,
    Latency,
    Bytes,
}

impl Key {
    pub fn of(self, o: &UnitOption) -> f64 {
        match self {
            Key::Error => o.error,
            Key::Latency => o.latency,
            Key::Bytes => o.bytes as f64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Binary,
    Aggregated,
    Relaxed,
}

/// What to minimise and under which rows.
pub(crate) struct Spec<'u> {
    pub units: &'u [Unit],
    pub objective: Key,
    /// `sum key x <= limit`.
    pub budget: Option<(Key, f64)>,
    pub memory: Option<u64>,
}

/// A solved model: the option picked per unit (argmax of `x`), whether `x` was integral,
/// the objective value at `x` (unscaled) and how HiGHS ended.
pub(crate) struct Outcome {
    pub picks: Vec<usize>,
    pub integral: bool,
    pub objective: f64,
    pub status: IlpStatus,
}

/// Largest absolute entry, or 1 for an all-zero row (so scaling never divides by zero).
fn scale(values: impl Iterator<Item = f64>) -> f64 {
    let m = values.fold(0.0, |a: f64, v: f64| a.max(v.abs()));
    if m > 0.0 {
        m
    } else {
        1.0
    }
}

/// Units with at least two options, grouped by identical (format, latency, bytes) options;
/// only classes of two or more units.
pub(crate) fn classes(units: &[Unit]) -> Vec<Vec<usize>> {
    let mut by_key: BTreeMap<Vec<(LinearPrecision, u64, u64)>, Vec<usize>> = BTreeMap::new();
    for (u, unit) in units.iter().enumerate() {
        if unit.options.len() < 2 {
            continue;
        }
        let key = unit
            .options
            .iter()
            .map(|o| (o.precision, o.latency.to_bits(), o.bytes))
            .collect();
        by_key.entry(key).or_default().push(u);
    }
    by_key.into_values().filter(|m| m.len() > 1).collect()
}

/// Ordering pairs for two-option classes. Let `d(u)` = error of the faster option minus
/// error of the slower one (what going fast costs `u`). If `d(a) <= d(b)` and `a` is slow
/// while `b` is fast, swapping them keeps every latency and byte total and does not raise
/// the error, so some optimum has `x[a][fast] >= x[b][fast]` for consecutive `a, b` in `d`
/// order. Returns `(a, b, fast option index)`.
pub(crate) fn symmetry_pairs(units: &[Unit]) -> Vec<(usize, usize, usize)> {
    let mut pairs = Vec::new();
    for members in classes(units) {
        let opts = &units[members[0]].options;
        if opts.len() != 2 {
            continue;
        }
        let (fast, slow) = if opts[0].latency <= opts[1].latency {
            (0, 1)
        } else {
            (1, 0)
        };
        let d = |u: usize| units[u].options[fast].error - units[u].options[slow].error;
        let mut sorted = members.clone();
        sorted.sort_by(|&a, &b| d(a).total_cmp(&d(b)).then(a.cmp(&b)));
        pairs.extend(sorted.windows(2).map(|w| (w[0], w[1], fast)));
    }
    pairs
}

fn linear(units: &[Unit], x: &[Vec<Variable>], key: Key, s: f64) -> Expression {
    let mut e = Expression::with_capacity(x.iter().map(Vec::len).sum());
    for (u, xs) in units.iter().zip(x) {
        for (opt, &v) in u.options.iter().zip(xs) {
            e.add_mul(key.of(opt) / s, v);
        }
    }
    e
}

/// Builds and solves `spec` in `mode`. `Ok(None)`: infeasible.
pub(crate) fn solve(spec: &Spec, mode: Mode, o: &IlpOptions) -> Result<Option<Outcome>> {
    let units = spec.units;
    let classes = match mode {
        Mode::Aggregated => classes(units),
        Mode::Binary | Mode::Relaxed => Vec::new(),
    };
    let mut in_class = vec![false; units.len()];
    for c in &classes {
        for &u in c {
            in_class[u] = true;
        }
    }
    let mut vars = variables!();
    let x: Vec<Vec<Variable>> = units
        .iter()
        .enumerate()
        .map(|(u, unit)| {
            unit.options
                .iter()
                .map(|_| {
                    let continuous = mode == Mode::Relaxed || in_class[u];
                    vars.add(if continuous {
                        variable().min(0.0).max(1.0)
                    } else {
                        variable().binary()
                    })
                })
                .collect()
        })
        .collect();
    let mut rows: Vec<Constraint> = Vec::new();
    for xs in &x {
        let mut one = Expression::with_capacity(xs.len());
        for &v in xs {
            one.add_mul(1.0, v);
        }
        rows.push(one.eq(1.0));
    }
    for members in &classes {
        for (k, _) in units[members[0]].options.iter().enumerate() {
            let n = vars.add(variable().integer().min(0.0).max(members.len() as f64));
            let mut e = Expression::with_capacity(members.len() + 1);
            for &u in members {
                e.add_mul(1.0, x[u][k]);
            }
            e.add_mul(-1.0, n);
            rows.push(e.eq(0.0));
        }
    }
    if mode == Mode::Binary {
        for (a, b, fast) in symmetry_pairs(units) {
            let mut e = Expression::with_capacity(2);
            e.add_mul(1.0, x[a][fast]);
            e.add_mul(-1.0, x[b][fast]);
            rows.push(e.geq(0.0));
        }
    }
    let all = || units.iter().flat_map(|u| u.options.iter());
    if let Some((key, limit)) = spec.budget {
        let s = scale(all().map(|o| key.of(o)));
        rows.push(linear(units, &x, key, s).leq(limit / s));
    }
    if let Some(m) = spec.memory {
        let s = scale(all().map(|o| o.bytes as f64));
        rows.push(linear(units, &x, Key::Bytes, s).leq(m as f64 / s));
    }
    let so = scale(all().map(|o| spec.objective.of(o)));
    let mut model = vars
        .minimise(linear(units, &x, spec.objective, so))
        .using(highs)
        .set_mip_rel_gap(o.mip_rel_gap as f32)
        .map_err(|e| Error::invalid("--mip-gap", e.to_string()))?
        .set_option("primal_feasibility_tolerance", 1e-9)
        .set_option("mip_feasibility_tolerance", 1e-9)
        .set_option("mip_abs_gap", 0.0);
    if mode == Mode::Aggregated {
        // RINS and RENS presolve a sub-MIP over the thousands of continuous x: measured
        // 3-5x slower on 1 000-5 000 layers for no better solutions (docs/planner.md).
        model = model
            .set_option("mip_heuristic_run_rins", false)
            .set_option("mip_heuristic_run_rens", false);
    }
    if let Some(t) = o.time_limit {
        model = model.set_time_limit(t);
    }
    for r in rows {
        model.add_constraint(r);
    }
    let solved = match model.solve() {
        Ok(s) => s,
        Err(ResolutionError::Infeasible) => return Ok(None),
        Err(e) => {
            return Err(Error::Solver {
                reason: format!("HiGHS: {e}"),
            })
        }
    };
    let status = match solved.status() {
        SolutionStatus::Optimal => IlpStatus::Optimal,
        SolutionStatus::GapLimit => IlpStatus::GapLimit,
        SolutionStatus::TimeLimit => IlpStatus::TimeLimit,
    };
    let (mut integral, mut objective) = (true, 0.0);
    let picks = units
        .iter()
        .zip(&x)
        .map(|(unit, xs)| {
            let values: Vec<f64> = xs.iter().map(|&v| solved.value(v)).collect();
            for (opt, &v) in unit.options.iter().zip(&values) {
                objective += spec.objective.of(opt) * v;
                integral &= v.min(1.0 - v).abs() < 1e-6;
            }
            values
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (k, &v)| if v > b.1 { (k, v) } else { b },
                )
                .0
        })
        .collect();
    Ok(Some(Outcome {
        picks,
        integral,
        objective,
        status,
    }))
}
