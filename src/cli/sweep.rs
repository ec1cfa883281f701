//! `fpx sweep`: greedy-gamma across gamma in [0, 1] and the ILP at each greedy point's
//! latency; writes every plan, a CSV, a JSON report and an SVG plot into the output
//! directory. With `--model` and `--eval-text`, each distinct plan is also run with the CPU
//! reference on held-out text (perplexity, and KL from the full-precision model).
//!
//! Held-out by default: when the evaluation text is the calibration text (same SHA-256),
//! the tokens the calibration used (eps windows, then KL windows) are skipped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha256};

use fpx::eval::{self, kl::NextTokenReference};
use fpx::formats::Format;
use fpx::ir::Graph;
use fpx::latency::LatencySource;
use fpx::lower::{LinearPrecision, PrecisionMap};
use fpx::plan::{BudgetRecord, CalibrationRef, Plan, SolverRecord};
use fpx::runtime::cpu::{CpuModel, Mat};
use fpx::solve::plot::svg;
use fpx::solve::sweep::{csv, gamma_grid, sweep, SolverKind, SweepOptions, SweepPoint};
use fpx::solve::{GroupKind, Objective};

use crate::cli::plan::PlanSetup;
use crate::{emit, load, progress_bar};

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub setup: PlanSetup,
    /// Number of gamma values, evenly spaced from 0 to 1 (2..=1001: a step of 0.001).
    #[arg(long, default_value_t = 11,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1001))]
    pub points: usize,
    /// Model to evaluate each plan with (needs --eval-text).
    #[arg(long, requires = "eval_text")]
    pub model: Option<PathBuf>,
    /// Held-out text for perplexity and KL of each plan (needs --model).
    #[arg(long, requires = "model")]
    pub eval_text: Option<PathBuf>,
    /// Tokens per evaluation window.
    #[arg(long, default_value_t = 128)]
    pub eval_seq_len: usize,
    /// Evaluation windows (the CPU reference runs ~200 tokens/s on 2 cores).
    #[arg(long, default_value_t = 4)]
    pub eval_windows: usize,
    /// Tokens to skip at the start of the evaluation text (default: those the calibration
    /// used, when it is the calibration text; else 0).
    #[arg(long)]
    pub eval_skip: Option<usize>,
    /// Output directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct EvalSetup {
    text: String,
    skip: usize,
    seq_len: usize,
    windows: usize,
    predictions: usize,
    reference_perplexity: f64,
    seconds: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    calibration: &'a CalibrationRef,
    latency: LatencySource,
    objective: Objective,
    menu: &'a [LinearPrecision],
    groups: &'a [GroupKind],
    fixed_latency: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval: Option<EvalSetup>,
    points: &'a [SweepPoint],
}

/// Reference next-token distributions of held-out windows, for perplexity and KL of plans.
struct Evaluator<'m> {
    model: &'m fpx::model::Model,
    graph: Graph,
    windows: Vec<Vec<u32>>,
    /// Per window, the full model's next-token distributions.
    reference: Vec<NextTokenReference>,
    reference_nll: f64,
    predictions: usize,
}

impl<'m> Evaluator<'m> {
    fn new(model: &'m fpx::model::Model, windows: Vec<Vec<u32>>) -> Result<Self> {
        let graph = Graph::build(&model.spec);
        let full = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new())?;
        let reference = windows
            .iter()
            .map(|w| Ok(NextTokenReference::new(&full.forward(w)?, w)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Evaluator {
            model,
            graph,
            reference_nll: reference.iter().map(|r| r.nll()).sum(),
            predictions: reference.iter().map(|r| r.predictions()).sum(),
            windows,
            reference,
        })
    }

    /// (perplexity, mean KL(full || plan)) of `plan`.
    fn evaluate(&self, plan: &PrecisionMap) -> Result<(f64, f64)> {
        let m = CpuModel::load(&self.graph, self.model.weights.as_ref(), plan)?;
        let (mut nll, mut kl) = (0.0, 0.0);
        for (w, reference) in self.windows.iter().zip(&self.reference) {
            let logits: Mat = m.forward(w)?;
            nll += eval::nll_sum(&logits, w);
            kl += reference.kl_sum(&logits);
        }
        let n = self.predictions as f64;
        Ok(((nll / n).exp(), kl / n))
    }
}

pub fn run(args: SweepArgs) -> Result<()> {
    // Built in a temporary sibling and renamed into place at the end: an error or an
    // interrupt leaves the previous result or nothing, never a half-written sweep.
    let staged = fpx::fsutil::StagedDir::new(&args.output, "sweep.json")?;
    let out = staged.path();
    let prep = args.setup.prepare()?;
    let options = SweepOptions {
        gammas: gamma_grid(args.points),
        greedy: prep.greedy,
        ilp: prep.ilp,
        memory: prep.memory,
    };
    let mut points = sweep(&prep.problem, &options)?;
    let plans_dir = out.join("plans");
    for (point, solution) in points.iter_mut() {
        let (solver, budget) = match point.solver {
            SolverKind::Greedy => (
                SolverRecord::Greedy {
                    options: prep.greedy,
                    achieved_gamma: point.achieved_gamma,
                },
                BudgetRecord::Gamma { gamma: point.gamma },
            ),
            SolverKind::Ilp => (
                SolverRecord::Ilp {
                    options: prep.ilp,
                    status: point.status.unwrap_or(fpx::solve::IlpStatus::Optimal),
                    lower_bound: point.lower_bound.unwrap_or(f64::NAN),
                    gap: point.lower_bound.map_or(f64::NAN, |b| {
                        if point.error > 0.0 {
                            ((point.error - b) / point.error).max(0.0)
                        } else {
                            0.0
                        }
                    }),
                },
                BudgetRecord::MatchGreedy {
                    gamma: point.gamma,
                    seconds: point.latency,
                },
            ),
        };
        let plan = Plan::from_solution(
            &prep.problem,
            solution,
            &prep.calib.model.identity,
            prep.provenance(solver, budget),
        );
        let name = format!("{}-gamma{:.2}.plan.json", point.solver.name(), point.gamma);
        plan.write(&plans_dir.join(&name))?;
        point.plan = Some(format!("plans/{name}"));
    }

    let eval_setup = match (&args.model, &args.eval_text) {
        (Some(model_path), Some(text_path)) => {
            let model = load(model_path)?;
            prep.calib.check_model(&args.setup.calib, &model.identity)?;
            let text = eval::load_text(text_path)?;
            let skip = args.eval_skip.unwrap_or_else(|| {
                let same =
                    format!("{:x}", Sha256::digest(text.as_bytes())) == prep.calib.text.sha256;
                let kl = prep.calib.kl.map_or(0, |k| k.seq_len * k.windows);
                if same {
                    prep.calib.text.tokens + kl
                } else {
                    0
                }
            });
            crate::cli::args::window("--eval-seq-len", args.eval_seq_len, &model)?;
            let tokens = model.tokenizer.encode(&text)?;
            if tokens.len() <= skip {
                bail!(
                    "{}: {} tokens, all within the {skip} skipped (calibration) tokens",
                    text_path.display(),
                    tokens.len()
                );
            }
            let windows: Vec<Vec<u32>> =
                eval::windows(&tokens[skip..], args.eval_seq_len, Some(args.eval_windows))?
                    .into_iter()
                    .map(<[u32]>::to_vec)
                    .collect();
            let start = Instant::now();
            let ev = Evaluator::new(&model, windows)?;
            let mut cache: BTreeMap<Vec<LinearPrecision>, (f64, f64)> = BTreeMap::new();
            let bar = progress_bar(points.len(), "eval plans");
            for (point, solution) in points.iter_mut() {
                let key: Vec<LinearPrecision> = solution
                    .choice
                    .iter()
                    .map(|&c| prep.problem.precisions[c])
                    .collect();
                let (ppl, kl) = match cache.get(&key) {
                    Some(&v) => v,
                    None => {
                        let map: PrecisionMap = prep
                            .problem
                            .names
                            .iter()
                            .zip(&key)
                            .map(|(n, &p)| (n.clone(), p))
                            .collect();
                        let v = ev.evaluate(&map)?;
                        cache.insert(key, v);
                        v
                    }
                };
                point.perplexity = Some(ppl);
                point.kl = Some(kl);
                bar.inc(1);
            }
            bar.finish_and_clear();
            Some(EvalSetup {
                text: text_path.display().to_string(),
                skip,
                seq_len: args.eval_seq_len,
                windows: ev.windows.len(),
                predictions: ev.predictions,
                reference_perplexity: (ev.reference_nll / ev.predictions as f64).exp(),
                seconds: start.elapsed().as_secs_f64(),
            })
        }
        _ => None,
    };

    let pts: Vec<SweepPoint> = points.into_iter().map(|(p, _)| p).collect();
    let source = prep.latency.source();
    let objective = prep.options.objective;
    let error_label = match objective {
        Objective::Eps => "total eps (sum over layers)",
        Objective::Kl => "total per-layer KL (sum over layers)",
    };
    let greedy_label = if prep.greedy.rank_by_error {
        "greedy ranked by the objective"
    } else {
        "greedy-gamma (paper)"
    };
    let title = format!("{} — {}", args.setup.calib.display(), source);
    fpx::fsutil::write_atomic(&out.join("sweep.csv"), csv(&pts).as_bytes())?;
    fpx::fsutil::write_atomic(
        &out.join("sweep.svg"),
        svg(&pts, &title, error_label, greedy_label).as_bytes(),
    )?;
    let report = Report {
        calibration: &prep.calib_ref,
        latency: source,
        objective,
        menu: &prep.options.menu,
        groups: &prep.options.groups,
        fixed_latency: prep.problem.fixed_latency,
        eval: eval_setup,
        points: &pts,
    };
    fpx::fsutil::write_json_atomic(&out.join("sweep.json"), &report)?;
    staged.commit()?;
    if args.json {
        emit(&(serde_json::to_string_pretty(&report)? + "\n"));
    } else {
        emit(&table(&report, &args.output)?);
    }
    Ok(())
}

fn table(r: &Report, dir: &std::path::Path) -> Result<String> {
    let mut t = String::new();
    writeln!(t, "{}; objective {:?}", r.latency, r.objective)?;
    if let Some(e) = &r.eval {
        writeln!(
            t,
            "eval: {} windows x {} tokens of {} after {} skipped tokens; full-precision \
             perplexity {:.4} ({:.0} s)",
            e.windows, e.seq_len, e.text, e.skip, e.reference_perplexity, e.seconds
        )?;
    }
    writeln!(
        t,
        "{:>6} {:>7} {:>8} {:>12} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "gamma", "solver", "fp4 frac", "latency us", "error", "eps", "ppl", "KL", "solve ms"
    )?;
    for p in r.points {
        let low: usize = p
            .formats
            .iter()
            .filter(|(p, _)| matches!(p.weights, Format::Nvfp4 | Format::Mxfp4))
            .map(|(_, n)| n)
            .sum();
        let n: usize = p.formats.values().sum();
        let opt = |v: Option<f64>, prec: usize| v.map_or("-".into(), |v| format!("{v:.prec$}"));
        writeln!(
            t,
            "{:>6.2} {:>7} {:>8.3} {:>12.3} {:>10.5} {:>10.5} {:>10} {:>10} {:>9.2}",
            p.gamma,
            p.solver.name(),
            low as f64 / n.max(1) as f64,
            p.latency * 1e6,
            p.error,
            p.eps,
            opt(p.perplexity, 4),
            opt(p.kl, 5),
            p.solve_seconds * 1e3
        )?;
    }
    writeln!(
        t,
        "wrote {0}/sweep.csv, {0}/sweep.json, {0}/sweep.svg and {0}/plans/",
        dir.display()
    )?;
    Ok(t)
}
