//! `fpx compare A.plan.json B.plan.json`: how each plan was made, their totals side by
//! side, and the layers whose format differs (or JSON with all of it).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use fpx::plan::compare::{compare, PlanDiff};
use fpx::plan::Plan;

use crate::cli::plan_report::describe;
use crate::emit;

#[derive(Args)]
pub struct CompareArgs {
    /// First plan.
    pub a: PathBuf,
    /// Second plan.
    pub b: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Output<'a> {
    a: String,
    b: String,
    totals_a: Option<&'a fpx::plan::PlanTotals>,
    totals_b: Option<&'a fpx::plan::PlanTotals>,
    #[serde(flatten)]
    diff: &'a PlanDiff,
}

fn opt(v: Option<f64>, scale: f64, prec: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{:.*}", prec, v * scale))
}

pub fn run(args: CompareArgs) -> Result<()> {
    let a = Plan::read(&args.a)?;
    let b = Plan::read(&args.b)?;
    if let (Some(ma), Some(mb)) = (&a.model, &b.model) {
        if ma != mb {
            eprintln!("warning: the plans were made for different models ({ma} vs {mb})");
        }
    }
    let diff = compare(&a, &b);
    if args.json {
        let out = Output {
            a: args.a.display().to_string(),
            b: args.b.display().to_string(),
            totals_a: a.totals.as_ref(),
            totals_b: b.totals.as_ref(),
            diff: &diff,
        };
        emit(&(serde_json::to_string_pretty(&out)? + "\n"));
        return Ok(());
    }
    let mut t = String::new();
    writeln!(t, "A  {}\n   {}", args.a.display(), describe(&a))?;
    writeln!(t, "B  {}\n   {}\n", args.b.display(), describe(&b))?;
    writeln!(t, "{:<28} {:>16} {:>16} {:>12}", "", "A", "B", "B - A")?;
    let (ta, tb) = (a.totals.as_ref(), b.totals.as_ref());
    type Field = fn(&fpx::plan::PlanTotals) -> f64;
    let rows: [(&str, Field, f64, usize); 6] = [
        ("planned latency (us)", |x| x.total_latency, 1e6, 3),
        ("step latency (us)", |x| x.step_latency, 1e6, 3),
        ("total error", |x| x.total_error, 1.0, 6),
        ("total eps", |x| x.total_eps, 1.0, 6),
        (
            "weights (MiB)",
            |x| x.weight_bytes as f64,
            1.0 / 1048576.0,
            3,
        ),
        (
            "layers",
            |x| x.layers_per_format.values().sum::<usize>() as f64,
            1.0,
            0,
        ),
    ];
    for (name, f, scale, prec) in rows {
        let (va, vb) = (ta.map(f), tb.map(f));
        let d = va.zip(vb).map(|(x, y)| y - x);
        writeln!(
            t,
            "{name:<28} {:>16} {:>16} {:>12}",
            opt(va, scale, prec),
            opt(vb, scale, prec),
            opt(d, scale, prec)
        )?;
    }
    let counts = |p: Option<&fpx::plan::PlanTotals>| {
        p.map_or("-".to_string(), |x| {
            x.layers_per_format
                .iter()
                .map(|(f, n)| format!("{f} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    };
    writeln!(t, "{:<28} {:>16} {:>16}", "formats", counts(ta), counts(tb))?;
    writeln!(
        t,
        "\n{} layers differ, {} agree (A has {}, B has {})",
        diff.differing.len(),
        diff.same,
        diff.layers_a,
        diff.layers_b
    )?;
    if !diff.differing.is_empty() {
        writeln!(
            t,
            "{:<42} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10}",
            "layer", "A", "B", "eps A", "eps B", "lat A us", "lat B us"
        )?;
        for l in &diff.differing {
            let f = |x: Option<fpx::formats::Format>| x.map_or("-", |f| f.name());
            writeln!(
                t,
                "{:<42} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10}",
                l.name,
                f(l.a),
                f(l.b),
                opt(l.eps_a, 1.0, 5),
                opt(l.eps_b, 1.0, 5),
                opt(l.latency_a, 1e6, 3),
                opt(l.latency_b, 1e6, 3)
            )?;
        }
    }
    emit(&t);
    Ok(())
}
