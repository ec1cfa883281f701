//! The text report of `fpx plan`: the per-layer table and totals, the tensor-parallel and
//! all-reduce lines, the one-line provenance (`describe`, also used by `fpx compare`), and the
//! `--explain` table of the step's kernels.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use fpx::latency::KernelRow;
use fpx::lower::LinearPrecision;
use fpx::plan::{BudgetRecord, Plan, SolverRecord};

use crate::cli::plan::Prepared;

/// The kernels of one decode step: per launch its bytes, FLOPs, instruction path, fpx's cost
/// and the chip's bound, grouped by kernel entry point (with the launch count), then totals.
pub fn explain_table(rows: &[KernelRow]) -> String {
    let mut by_kernel: std::collections::BTreeMap<&str, (usize, f64, f64, f64, f64, &str)> =
        Default::default();
    for r in rows {
        let e = by_kernel
            .entry(&r.kernel)
            .or_insert((0, 0.0, 0.0, 0.0, 0.0, r.work.path.name()));
        e.0 += 1;
        e.1 += r.work.bytes;
        e.2 += r.work.flops;
        e.3 += r.seconds;
        e.4 += r.bound_seconds;
    }
    let mut sorted: Vec<_> = by_kernel.into_iter().collect();
    sorted.sort_by(|a, b| b.1 .3.total_cmp(&a.1 .3));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nkernels of one decode step (fpx's kernel cost vs the chip's bound):\n{:<40} {:>4} {:>10} {:>10} {:>11} {:>10} {:>10}",
        "kernel", "n", "MB", "MFLOP", "path", "fpx us", "bound us"
    );
    for (k, (n, bytes, flops, sec, bound, path)) in &sorted {
        let _ = writeln!(
            t,
            "{k:<40} {n:>4} {:>10.3} {:>10.3} {path:>11} {:>10.3} {:>10.3}",
            bytes / 1e6,
            flops / 1e6,
            sec * 1e6,
            bound * 1e6
        );
    }
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    let bound: f64 = rows.iter().map(|r| r.bound_seconds).sum();
    let _ = writeln!(
        t,
        "{} launches: {:.3} us with fpx's kernels, {:.3} us at the chip's bound ({:.1}% of it)",
        rows.len(),
        total * 1e6,
        bound * 1e6,
        100.0 * bound / total
    );
    t
}

/// A one-line description of how a plan was made.
pub fn describe(plan: &Plan) -> String {
    let Some(p) = &plan.provenance else {
        return "no provenance (schema version 1)".into();
    };
    let solver = match &p.solver {
        SolverRecord::Greedy {
            options,
            achieved_gamma,
        } => format!(
            "greedy {}/{} (gamma {achieved_gamma:.3}{}{})",
            options.low,
            options.high,
            if options.by_bytes { " by bytes" } else { "" },
            if options.rank_by_error {
                ", ranked by the objective"
            } else {
                ""
            }
        ),
        SolverRecord::Ilp {
            options,
            status,
            gap,
            ..
        } => format!(
            "ilp ({status:?} at mip gap {:e}; within {:.4}% of the LP bound)",
            options.mip_rel_gap,
            gap * 100.0
        ),
    };
    let budget = match &p.budget {
        BudgetRecord::Gamma { gamma } => format!("gamma {gamma}"),
        BudgetRecord::MatchGreedy { gamma, seconds } => format!(
            "latency {:.2} us (greedy's at gamma {gamma})",
            seconds * 1e6
        ),
        BudgetRecord::Latency { seconds } => format!("latency {:.2} us", seconds * 1e6),
        BudgetRecord::Speedup {
            speedup, baseline, ..
        } => format!("{speedup}x over all-{baseline}"),
        BudgetRecord::Error { error } => format!("error {error}"),
    };
    format!(
        "{solver}, {budget}, objective {:?}; {}",
        p.objective, p.latency
    )
}

pub fn table(plan: &Plan, prep: &Prepared, out: &Path) -> Result<String> {
    let mut t = String::new();
    writeln!(t, "{}", describe(plan))?;
    writeln!(
        t,
        "{:<42} {:>6} {:>10} {:>10} {:>12} {:>10}",
        "layer", "format", "eps", "error", "latency us", "bytes"
    )?;
    for l in &plan.layers {
        writeln!(
            t,
            "{:<42} {:>6} {:>10.5} {:>10.3e} {:>12.3} {:>10}",
            l.name,
            l.precision().to_string(),
            l.eps.unwrap_or(f64::NAN),
            l.error.unwrap_or(f64::NAN),
            l.latency.unwrap_or(f64::NAN) * 1e6,
            l.weight_bytes.unwrap_or(0)
        )?;
    }
    if let Some(tot) = &plan.totals {
        let counts: Vec<String> = tot
            .layers_per_format
            .iter()
            .map(|(f, n)| format!("{f} {n}"))
            .collect();
        writeln!(
            t,
            "\n{} layers ({}); {} pinned",
            plan.layers.len(),
            counts.join(", "),
            prep.report.pinned
        )?;
        writeln!(
            t,
            "latency {:.3} us per step for the planned layers (+ {:.3} us fixed = {:.3} us)",
            tot.total_latency * 1e6,
            tot.fixed_latency * 1e6,
            tot.step_latency * 1e6
        )?;
        writeln!(
            t,
            "total error {:.6}   total eps {:.6}   weights {:.3} MiB",
            tot.total_error,
            tot.total_eps,
            tot.weight_bytes as f64 / 1048576.0
        )?;
        for f in [prep.baseline(), prep.greedy.low] {
            if let Some(u) = prep.problem.uniform(f) {
                let step = u.totals.latency + prep.problem.fixed_latency;
                writeln!(
                    t,
                    "vs all-{f}: step speedup {:.4}x, error {:.6}",
                    step / tot.step_latency,
                    u.totals.error
                )?;
            }
        }
    }
    if !prep.report.not_offered.is_empty() {
        let mut by_format: std::collections::BTreeMap<LinearPrecision, usize> = Default::default();
        for (_, f) in &prep.report.not_offered {
            *by_format.entry(*f).or_default() += 1;
        }
        for (f, n) in by_format {
            writeln!(
                t,
                "{f} not offered to {n} row-parallel layers: its scale blocks would straddle the \
                 {} tensor-parallel shards",
                prep.options.tensor_parallel
            )?;
        }
    }
    if let (Some(cost), Some(tot)) = (&prep.kernel_cost, &plan.totals) {
        let ar = cost.all_reduce_seconds();
        if ar > 0.0 {
            writeln!(
                t,
                "all-reduce ({}, {} GPUs): {:.3} us per step, {:.1}% of the step",
                cost.spec.interconnect.name,
                cost.tensor_parallel,
                ar * 1e6,
                100.0 * ar / tot.step_latency
            )?;
        }
    }
    writeln!(t, "wrote {}", out.display())?;
    Ok(t)
}
