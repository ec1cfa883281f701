//! Pareto sweeps: greedy-gamma across a grid of gamma, and the ILP at the latency each
//! greedy point reaches, so the two curves can be compared at equal latency. Points carry
//! optional quality measurements (perplexity, KL) that the caller fills in (the CLI, with
//! the CPU reference backend); [`csv`] and [`super::plot::svg`] render them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::lower::LinearPrecision;

use super::{
    greedy, ilp, Constraints, GreedyOptions, GreedyRule, IlpOptions, IlpStatus, Problem, Solution,
    Target,
};

/// Which solver made a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverKind {
    Greedy,
    Ilp,
}

impl SolverKind {
    pub fn name(self) -> &'static str {
        match self {
            SolverKind::Greedy => "greedy",
            SolverKind::Ilp => "ilp",
        }
    }
}

/// Sweep settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepOptions {
    /// Gamma values for greedy, each in [0, 1].
    pub gammas: Vec<f64>,
    pub greedy: GreedyOptions,
    pub ilp: IlpOptions,
    /// Weight-memory budget for both solvers.
    pub memory: Option<u64>,
}

/// `n` evenly spaced gammas from 0 to 1 (`n >= 2`).
pub fn gamma_grid(n: usize) -> Vec<f64> {
    let n = n.max(2);
    (0..n).map(|i| i as f64 / (n - 1) as f64).collect()
}

/// One plan of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub solver: SolverKind,
    /// Greedy: its gamma. ILP: the gamma of the greedy point whose latency is its budget.
    pub gamma: f64,
    /// Greedy: the fraction of layers it actually put low (groups round it).
    pub achieved_gamma: f64,
    /// Seconds per step of the planned layers.
    pub latency: f64,
    /// Seconds per step including the fixed part.
    pub step_latency: f64,
    /// Objective error (eps or KL sum).
    pub error: f64,
    pub eps: f64,
    pub weight_bytes: u64,
    /// Layers per format.
    pub formats: BTreeMap<LinearPrecision, usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<IlpStatus>,
    /// ILP: the LP bound on the error (no plan at this latency has less).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_bound: Option<f64>,
    pub solve_seconds: f64,
    /// Plan file written for the point, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

impl SweepPoint {
    fn new(p: &Problem, solver: SolverKind, gamma: f64, s: &Solution, seconds: f64) -> Self {
        let mut formats = BTreeMap::new();
        for &c in &s.choice {
            *formats.entry(p.precisions[c]).or_insert(0) += 1;
        }
        SweepPoint {
            solver,
            gamma,
            achieved_gamma: gamma,
            latency: s.totals.latency,
            step_latency: s.totals.latency + p.fixed_latency,
            error: s.totals.error,
            eps: s.totals.eps,
            weight_bytes: s.totals.bytes,
            formats,
            status: None,
            lower_bound: None,
            solve_seconds: seconds,
            plan: None,
            perplexity: None,
            kl: None,
        }
    }
}

/// Greedy at every gamma, then the ILP at each greedy point's latency. Returns the points
/// (greedy then ILP per gamma) with their assignments.
pub fn sweep(p: &Problem, o: &SweepOptions) -> Result<Vec<(SweepPoint, Solution)>> {
    let mut out = Vec::with_capacity(2 * o.gammas.len());
    for &gamma in &o.gammas {
        let start = Instant::now();
        let g = greedy(p, &o.greedy, GreedyRule::Gamma(gamma), o.memory)?;
        let mut gp = SweepPoint::new(
            p,
            SolverKind::Greedy,
            gamma,
            &g.solution,
            start.elapsed().as_secs_f64(),
        );
        gp.achieved_gamma = g.gamma;
        let c = Constraints {
            target: Target::Latency {
                seconds: g.solution.totals.latency,
            },
            memory: o.memory,
        };
        let start = Instant::now();
        let s = ilp(p, &c, &o.ilp)?;
        let mut ip = SweepPoint::new(
            p,
            SolverKind::Ilp,
            gamma,
            &s.solution,
            start.elapsed().as_secs_f64(),
        );
        ip.status = Some(s.status);
        ip.lower_bound = Some(s.lower_bound);
        out.push((gp, g.solution));
        out.push((ip, s.solution));
    }
    Ok(out)
}

/// The points as CSV (one row per point; formats as `<format>_layers` columns).
pub fn csv(points: &[SweepPoint]) -> String {
    let mut formats: Vec<LinearPrecision> = points
        .iter()
        .flat_map(|p| p.formats.keys().copied())
        .collect();
    formats.sort();
    formats.dedup();
    let mut t = String::from(
        "solver,gamma,achieved_gamma,latency_ms,step_latency_ms,error,eps,weight_bytes",
    );
    for f in &formats {
        let _ = write!(t, ",{f}_layers");
    }
    t.push_str(",status,solve_seconds,perplexity,kl,plan\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    for p in points {
        let _ = write!(
            t,
            "{},{},{},{},{},{},{},{}",
            p.solver.name(),
            p.gamma,
            p.achieved_gamma,
            p.latency * 1e3,
            p.step_latency * 1e3,
            p.error,
            p.eps,
            p.weight_bytes
        );
        for f in &formats {
            let _ = write!(t, ",{}", p.formats.get(f).copied().unwrap_or(0));
        }
        let status = p.status.map_or(String::new(), |s| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        });
        let _ = writeln!(
            t,
            ",{status},{},{},{},{}",
            p.solve_seconds,
            opt(p.perplexity),
            opt(p.kl),
            p.plan.as_deref().unwrap_or("")
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solve::testing::two_format;

    #[test]
    fn ilp_points_match_greedy_latency_and_never_lose() {
        // Layer 0 saves 3 us, the others 1 us: greedy by eps misses the big saver.
        let p = two_format(&[
            (0.01, 0.06, 4e-6, 1e-6),
            (0.01, 0.02, 2e-6, 1e-6),
            (0.01, 0.03, 2e-6, 1e-6),
            (0.01, 0.04, 2e-6, 1e-6),
        ]);
        let o = SweepOptions {
            gammas: gamma_grid(5),
            greedy: GreedyOptions::default(),
            ilp: IlpOptions::default(),
            memory: None,
        };
        let pts = sweep(&p, &o).unwrap();
        assert_eq!(pts.len(), 10);
        for pair in pts.chunks(2) {
            let (g, i) = (&pair[0].0, &pair[1].0);
            assert!(i.latency <= g.latency * (1.0 + 1e-9));
            assert!(i.error <= g.error + 1e-12, "{g:?} {i:?}");
        }
        // gamma 0.25: greedy takes layer 1 (saves 1 us, +0.01); at that latency the ILP can
        // do no better. gamma 0.75: greedy saves 3 us with +0.06 total; the ILP takes layer 0
        // alone (saves 3 us, +0.05).
        assert!((pts[6].0.error - 0.10).abs() < 1e-12);
        assert!((pts[7].0.error - 0.09).abs() < 1e-12);
        let text = csv(&pts.iter().map(|x| x.0.clone()).collect::<Vec<_>>());
        assert!(text.starts_with("solver,gamma,achieved_gamma,latency_ms"));
        assert!(text.contains(",fp8_layers,nvfp4_layers,status,"));
        assert_eq!(text.lines().count(), 11);
    }
}
