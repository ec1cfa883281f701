//! `fpx plan`: solve one plan from a calibration and a latency source, write it, and print
//! its per-layer table and totals (or the plan as JSON). Also the setup shared with
//! `fpx sweep` ([`PlanSetup`]: device, menu, groups, pins, objective, solver settings).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use fpx::calib::Calibration;
use fpx::formats::Format;
use fpx::latency::{Gpu, KernelCost, LatencyModel, Percentile, Profile, Roofline};
use fpx::lower::{ActDtype, LinearPrecision};
use fpx::plan::{BudgetRecord, CalibrationRef, Plan, Provenance, SolverRecord};
use fpx::solve::pins::{Pins, PinsRef};
use fpx::solve::{
    build_problem, greedy, ilp, BuildOptions, BuildReport, Constraints, GreedyOptions, GreedyRule,
    GroupKind, IlpOptions, Objective, Problem, Solution, Target,
};

use crate::cli::plan_report::{explain_table, table};
use crate::emit;

/// A serving engine whose layer fusions a plan must respect (`--target`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineTarget {
    Vllm,
    Sglang,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SolverArg {
    /// The FPX paper's rule: the fraction gamma of layers with the lowest eps in FP4.
    Greedy,
    /// 0-1 integer program (HiGHS): least error under a latency budget, or the reverse.
    Ilp,
}

/// What a named GPU's latencies are computed from.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CostArg {
    /// What fpx's generated kernels cost (bytes, FLOPs, decode instructions, launches).
    Kernels,
    /// The datasheet roofline: what the chip allows (peak bandwidth and tensor rates).
    Roofline,
}

/// Inputs and settings shared by `fpx plan` and `fpx sweep`.
#[derive(Args, Clone)]
pub struct PlanSetup {
    /// Calibration file (`fpx calibrate`).
    #[arg(long)]
    pub calib: PathBuf,
    /// GPU (h100, h200, b200, rtx5090, l40s, rtx4090, a100, rtx3090) or a measured profile JSON (which
    /// overrides both cost models).
    #[arg(long, default_value = "h100")]
    pub device: String,
    /// Cost model of a named GPU.
    #[arg(long, value_enum, default_value_t = CostArg::Kernels)]
    pub cost: CostArg,
    /// With a measured profile (--device PROFILE.json): the statistic of each kernel's
    /// samples that latencies and budgets use. p50 is the median; p95, p99 and max price
    /// every kernel at its tail (summed over the step: a conservative estimate of its tail).
    #[arg(long, value_enum, default_value_t = Percentile::P50)]
    pub latency_percentile: Percentile,
    /// Tokens per step (sequences decoding one token each).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Context length each sequence attends to (attention's cost).
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// GPUs the model is sharded over, as vLLM's tensor parallelism does (kernel cost model).
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
    /// Element type of activations and KV cache the kernel cost model prices: bf16 (what
    /// engines and `fpx run` use for BF16 checkpoints), f16, or f32.
    #[arg(long, value_enum, default_value_t = ActDtype::Bf16)]
    pub act_dtype: ActDtype,
    /// Per-kernel launch overhead, microseconds.
    #[arg(long, default_value_t = 2.0, value_parser = crate::cli::args::finite)]
    pub launch_overhead_us: f64,
    /// Formats unpinned layers may take, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["fp8", "nvfp4"])]
    pub menu: Vec<String>,
    /// Formats lm_head may take, comma-separated (default: 16-bit, as serving engines keep it).
    #[arg(long, value_delimiter = ',', default_values = ["fp16"])]
    pub lm_head: Vec<String>,
    /// Layers that must share a format: qkv, gate_up (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub group: Vec<String>,
    /// Give each MoE expert projection its own format (default: a block's experts share one,
    /// as the engines' fused MoE kernels need).
    #[arg(long)]
    pub per_expert_formats: bool,
    /// Plan for a serving engine's constraints: vllm or sglang fuse q/k/v and gate/up, so
    /// both groups are on (what `fpx export` needs).
    #[arg(long, value_enum)]
    pub target: Option<EngineTarget>,
    /// TOML file of pin rules (regex or block range -> format).
    #[arg(long)]
    pub pins: Option<PathBuf>,
    /// Error to minimise: eps (the paper) or kl (needs a calibration with KL).
    #[arg(long, default_value = "eps")]
    pub objective: String,
    /// Greedy's low-precision format.
    #[arg(long, default_value = "nvfp4")]
    pub low: String,
    /// Greedy's high-precision format.
    #[arg(long, default_value = "fp8")]
    pub high: String,
    /// Greedy counts gamma by weight bytes instead of layers.
    #[arg(long)]
    pub by_bytes: bool,
    /// Greedy ranks layers by the objective's error (e.g. KL) instead of eps (the paper).
    #[arg(long)]
    pub greedy_rank_by_error: bool,
    /// Weight-memory budget, MiB.
    #[arg(long, value_parser = crate::cli::args::finite)]
    pub memory_budget_mib: Option<f64>,
    /// ILP relative optimality gap (HiGHS stops within it; 0 = prove optimality).
    #[arg(long, default_value_t = 1e-4, value_parser = crate::cli::args::finite)]
    pub mip_gap: f64,
    /// ILP time limit, seconds.
    #[arg(long, value_parser = crate::cli::args::finite)]
    pub time_limit: Option<f64>,
}

/// The budget of `fpx plan`: exactly one.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct BudgetArgs {
    /// Greedy: fraction of layers in FP4. ILP: the latency greedy reaches at this gamma.
    #[arg(long, value_parser = crate::cli::args::finite)]
    pub gamma: Option<f64>,
    /// Latency budget of the planned layers, milliseconds per step.
    #[arg(long, value_parser = crate::cli::args::finite)]
    pub latency_budget: Option<f64>,
    /// Whole-step speedup over every layer in the menu's most precise format.
    #[arg(long, value_parser = crate::cli::args::finite)]
    pub speedup: Option<f64>,
    /// Budget on the total objective error.
    #[arg(long, value_parser = crate::cli::args::finite)]
    pub error_budget: Option<f64>,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub setup: PlanSetup,
    #[arg(long, value_enum)]
    pub solver: SolverArg,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Plan file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the plan as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Explain the plan's latency as a table of the kernels of one decode step (fpx's kernel
    /// cost and the chip's bound per launch); with --json, an `explain` field.
    #[arg(long)]
    pub explain: bool,
}

/// Everything a solver call needs, prepared once.
pub struct Prepared {
    pub calib: Calibration,
    pub calib_ref: CalibrationRef,
    pub latency: Box<dyn LatencyModel>,
    pub options: BuildOptions,
    pub problem: Problem,
    pub report: BuildReport,
    pub greedy: GreedyOptions,
    pub ilp: IlpOptions,
    pub memory: Option<u64>,
    pub pins: Option<PinsRef>,
    /// The kernel cost model, when the latencies come from it.
    pub kernel_cost: Option<KernelCost>,
}

/// The latency source of `s`: a measured profile file, the datasheet roofline, or (`None`)
/// the kernel cost model, which [`PlanSetup::prepare`] builds itself.
fn measured_or_roofline(
    s: &PlanSetup,
    calib: &Calibration,
) -> Result<Option<Box<dyn LatencyModel>>> {
    let path = Path::new(&s.device);
    if path.is_file() || s.device.ends_with(".json") {
        if s.tensor_parallel != 1 {
            bail!("--tensor-parallel needs a named GPU (a profile is measured on one GPU)");
        }
        let profile = Profile::read(path)?.with_percentile(s.latency_percentile)?;
        profile.check_model(&calib.model.identity)?;
        return Ok(Some(Box::new(profile)));
    }
    if !s.latency_percentile.is_median() {
        bail!(
            "--latency-percentile {} needs a measured profile with distributions (--device \
             PROFILE.json from `fpx profile`); the cost models give one number per kernel",
            s.latency_percentile
        );
    }
    let gpu = Gpu::parse(&s.device)?;
    match s.cost {
        CostArg::Kernels => Ok(None),
        CostArg::Roofline if s.tensor_parallel != 1 => {
            bail!(
                "--tensor-parallel {} needs --cost kernels",
                s.tensor_parallel
            )
        }
        CostArg::Roofline if calib.spec.moe.is_some() => {
            bail!(
                "--cost roofline prices every layer as dense; a MoE model's experts need \
                 --cost kernels (which prices each expert by the tokens routed to it)"
            )
        }
        CostArg::Roofline => Ok(Some(Box::new(
            Roofline::new(gpu, s.batch, s.context)?
                .with_launch_overhead(s.launch_overhead_us * 1e-6)?,
        ))),
    }
}

impl PlanSetup {
    /// The kernel cost model of `gpu` for the calibrated model.
    pub fn kernel_cost(&self, gpu: Gpu, calib: &Calibration) -> Result<KernelCost> {
        Ok(
            KernelCost::new(gpu, &calib.graph(), self.batch, self.context)?
                .with_launch_overhead(self.launch_overhead_us * 1e-6)?
                .with_tensor_parallel(self.tensor_parallel)?
                .with_act(self.act_dtype),
        )
    }

    /// Reads the inputs and builds the problem. Refuses pin rules that match nothing.
    pub fn prepare(&self) -> Result<Prepared> {
        let calib = Calibration::read(&self.calib)?;
        let calib_ref = CalibrationRef::from_file(&self.calib, &calib)?;
        let (latency, kernel_cost): (Box<dyn LatencyModel>, _) =
            match measured_or_roofline(self, &calib)? {
                Some(latency) => (latency, None),
                None => {
                    let cost = self.kernel_cost(Gpu::parse(&self.device)?, &calib)?;
                    (Box::new(cost.clone()), Some(cost))
                }
            };
        let menu = crate::cli::args::precisions("--menu", &self.menu)?;
        let mut groups = self
            .group
            .iter()
            .map(|g| g.parse::<GroupKind>())
            .collect::<Result<Vec<_>, _>>()?;
        if self.target.is_some() && self.per_expert_formats {
            bail!(
                "--per-expert-formats conflicts with --target: vLLM and SGLang run a MoE block's \
                 experts as one fused layer of one quantization scheme; drop one of the two"
            );
        }
        if self.target.is_some() {
            // Both engines fuse q/k/v into qkv_proj and gate/up into gate_up_proj (and a MoE
            // block's experts into one layer, which the default expert grouping gives).
            for g in [GroupKind::Qkv, GroupKind::GateUp] {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        if calib.mx_scale_rule != fpx::formats::MxScaleRule::default()
            && calib.formats.contains(&Format::Mxfp4)
        {
            eprintln!(
                "note: {} was calibrated with the MXFP4 `{}` scale rule; the plan records it and \
                 its evaluation and export use it (recalibrate for the default `{}` rule)",
                self.calib.display(),
                calib.mx_scale_rule,
                fpx::formats::MxScaleRule::default()
            );
        }
        fpx::formats::set_mx_scale_rule(calib.mx_scale_rule);
        let pins = self.pins.as_deref().map(Pins::read).transpose()?;
        let pins_ref = pins.as_ref().map(PinsRef::from);
        let lm_head = crate::cli::args::precisions("--lm-head", &self.lm_head)?;
        let options = BuildOptions {
            menu,
            lm_head,
            tensor_parallel: self.tensor_parallel,
            objective: self.objective.parse::<Objective>()?,
            groups,
            per_expert: self.per_expert_formats,
            pins,
        };
        let (problem, report) = build_problem(&calib, latency.as_ref(), &options)?;
        if !report.unmatched_pins.is_empty() {
            bail!(
                "{}: pin {} matches no layer of the calibrated model",
                self.pins.as_deref().unwrap_or(Path::new("pins")).display(),
                report.unmatched_pins.join(", ")
            );
        }
        let memory = match self.memory_budget_mib {
            Some(m) if !(m.is_finite() && m > 0.0) => {
                bail!("--memory-budget-mib: {m} is not positive")
            }
            Some(m) => Some((m * 1024.0 * 1024.0) as u64),
            None => None,
        };
        Ok(Prepared {
            calib,
            calib_ref,
            latency,
            problem,
            report,
            greedy: GreedyOptions {
                low: self.low.parse().context("--low")?,
                high: self.high.parse().context("--high")?,
                by_bytes: self.by_bytes,
                rank_by_error: self.greedy_rank_by_error,
            },
            ilp: IlpOptions {
                mip_rel_gap: self.mip_gap,
                time_limit: self.time_limit,
            },
            memory,
            pins: pins_ref,
            options,
            kernel_cost,
        })
    }
}

impl Prepared {
    /// The provenance of a plan solved with `solver` under `budget`.
    pub fn provenance(&self, solver: SolverRecord, budget: BudgetRecord) -> Provenance {
        Provenance {
            fpx_version: env!("CARGO_PKG_VERSION").to_string(),
            calibration: self.calib_ref.clone(),
            objective: self.options.objective,
            solver,
            budget,
            memory_budget: self.memory,
            latency: self.latency.source(),
            menu: self.options.menu.clone(),
            mx_scale_rule: self.calib.mx_scale_rule,
            groups: self.options.groups.clone(),
            pins: self.pins.clone(),
        }
    }

    /// Greedy under `rule`, as a plan.
    pub fn greedy_plan(&self, rule: GreedyRule, budget: BudgetRecord) -> Result<(Solution, Plan)> {
        let g = greedy(&self.problem, &self.greedy, rule, self.memory)?;
        let record = SolverRecord::Greedy {
            options: self.greedy,
            achieved_gamma: g.gamma,
        };
        let plan = self.plan(&g.solution, record, budget);
        Ok((g.solution, plan))
    }

    /// The ILP for `target`, as a plan.
    pub fn ilp_plan(&self, target: Target, budget: BudgetRecord) -> Result<(Solution, Plan)> {
        let c = Constraints {
            target,
            memory: self.memory,
        };
        let s = ilp(&self.problem, &c, &self.ilp)?;
        let record = SolverRecord::Ilp {
            options: self.ilp,
            status: s.status,
            lower_bound: s.lower_bound,
            gap: s.gap(target),
        };
        let plan = self.plan(&s.solution, record, budget);
        Ok((s.solution, plan))
    }

    fn plan(&self, s: &Solution, solver: SolverRecord, budget: BudgetRecord) -> Plan {
        let prov = self.provenance(solver, budget);
        Plan::from_solution(&self.problem, s, &self.calib.model.identity, prov)
    }

    /// The most precise precision of the menu (fp16 > fp8 > fp4, weight-only before quantized
    /// activations): the speedup baseline.
    pub fn baseline(&self) -> LinearPrecision {
        self.options
            .menu
            .iter()
            .copied()
            .min()
            .unwrap_or(LinearPrecision::weight_only(Format::Fp8))
    }
}

pub fn run(args: PlanArgs) -> Result<()> {
    fpx::fsutil::prepare_output_file(&args.output)?;
    let prep = args.setup.prepare()?;
    let b = &args.budget;
    let p = &prep.problem;
    let (_, plan) = match (
        args.solver,
        b.gamma,
        b.latency_budget,
        b.speedup,
        b.error_budget,
    ) {
        (SolverArg::Greedy, Some(gamma), ..) => {
            prep.greedy_plan(GreedyRule::Gamma(gamma), BudgetRecord::Gamma { gamma })?
        }
        (SolverArg::Ilp, Some(gamma), ..) => {
            let g = greedy(p, &prep.greedy, GreedyRule::Gamma(gamma), prep.memory)?;
            let seconds = g.solution.totals.latency;
            prep.ilp_plan(
                Target::Latency { seconds },
                BudgetRecord::MatchGreedy { gamma, seconds },
            )?
        }
        (solver, None, Some(ms), ..) => {
            let seconds = ms * 1e-3;
            let budget = BudgetRecord::Latency { seconds };
            match solver {
                SolverArg::Greedy => prep.greedy_plan(GreedyRule::Latency(seconds), budget)?,
                SolverArg::Ilp => prep.ilp_plan(Target::Latency { seconds }, budget)?,
            }
        }
        (solver, None, None, Some(speedup), _) => {
            let baseline = prep.baseline();
            let seconds = p.speedup_budget(speedup, baseline)?;
            let budget = BudgetRecord::Speedup {
                speedup,
                baseline,
                seconds,
            };
            match solver {
                SolverArg::Greedy => prep.greedy_plan(GreedyRule::Latency(seconds), budget)?,
                SolverArg::Ilp => prep.ilp_plan(Target::Latency { seconds }, budget)?,
            }
        }
        (solver, None, None, None, Some(error)) => {
            let budget = BudgetRecord::Error { error };
            match solver {
                SolverArg::Greedy => prep.greedy_plan(GreedyRule::Error(error), budget)?,
                SolverArg::Ilp => prep.ilp_plan(Target::Error { error }, budget)?,
            }
        }
        _ => bail!("give one of --gamma, --latency-budget, --speedup, --error-budget"),
    };
    let explain = if args.explain {
        let cost = match &prep.kernel_cost {
            Some(cost) => cost.clone(),
            None => {
                let gpu = Gpu::parse(&args.setup.device).context(
                    "--explain prices fpx's kernels on a named GPU; --device is not one",
                )?;
                args.setup.kernel_cost(gpu, &prep.calib)?
            }
        };
        Some(cost.explain(&plan.precision_map())?)
    } else {
        None
    };
    plan.write(&args.output)?;
    if args.json {
        let mut v = serde_json::to_value(&plan)?;
        if let Some(rows) = &explain {
            v["explain"] = serde_json::to_value(rows)?;
        }
        emit(&(serde_json::to_string_pretty(&v)? + "\n"));
    } else {
        let mut out = table(&plan, &prep, &args.output)?;
        if let Some(rows) = &explain {
            out.push_str(&explain_table(rows));
        }
        emit(&out);
    }
    Ok(())
}
