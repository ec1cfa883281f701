//! The `fpx` command line. This is the only place that uses anyhow, progress bars and the
//! tracing subscriber; everything it does is a thin call into the library.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Subcommands too large to sit in this file.
mod cli {
    pub mod args;
    pub mod bench;
    pub mod calibrate;
    pub mod codegen;
    pub mod compare;
    pub mod export;
    pub mod inspect;
    pub mod plan;
    pub mod plan_report;
    pub mod profile;
    pub mod run;
    pub mod sweep;
}

use fpx::eval::{self, EvalReport};
use fpx::ir::Graph;
use fpx::lower::PrecisionMap;
use fpx::model::{load_model, Model};
use fpx::plan::Plan;
use fpx::runtime::cpu::CpuModel;

#[derive(Parser)]
#[command(
    name = "fpx",
    version,
    about = "Compile mixed-precision (FP8/FP4) inference plans for transformer LLMs"
)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's architecture, its linear layers and their weight bytes per format.
    Inspect(cli::inspect::InspectArgs),
    /// Perplexity on text with the CPU reference forward; with --plan, also KL from full precision.
    Eval(EvalArgs),
    /// Measure every linear layer's error in every format on calibration text.
    Calibrate(cli::calibrate::CalibrateArgs),
    /// Time the CPU reference forward (tokens/s) on windows of real text.
    Bench(cli::bench::BenchArgs),
    /// Solve a per-layer format plan (greedy-gamma or ILP) from a calibration and a latency source.
    Plan(cli::plan::PlanArgs),
    /// Greedy-gamma across gamma and the ILP at the same latencies: CSV, JSON, SVG, plans.
    Sweep(cli::sweep::SweepArgs),
    /// Compare two plans: totals side by side and the layers that differ.
    Compare(cli::compare::CompareArgs),
    /// Generate a plan's CUDA kernels for a GPU target; compile them with NVRTC (CUBIN, PTX).
    Codegen(cli::codegen::CodegenArgs),
    /// Generate text greedily with a plan's executable plan on the cpu or cuda backend.
    Run(cli::run::RunArgs),
    /// Measure per-layer, per-format kernel times on a GPU; write a latency profile.
    Profile(cli::profile::ProfileArgs),
    /// Write a plan's model as a compressed-tensors checkpoint (vLLM, SGLang, transformers).
    Export(cli::export::ExportArgs),
}

/// The model and the text a command runs on.
#[derive(Args)]
pub(crate) struct ModelText {
    /// Hugging Face model directory or GGUF file.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// UTF-8 text file, or a directory of them.
    #[arg(long)]
    pub(crate) text: PathBuf,
}

impl ModelText {
    /// Loads the model and the text, and tokenizes the text.
    pub(crate) fn load(&self) -> Result<(Model, String, Vec<u32>)> {
        let model = load(&self.model)?;
        let text = eval::load_text(&self.text)?;
        let tokens = model.tokenizer.encode(&text)?;
        Ok((model, text, tokens))
    }

    /// Whole windows of `seq_len` tokens (given by `flag`): the length checked against the
    /// model's context first, and a shortage of tokens reported with the text's path.
    pub(crate) fn windows<'t>(
        &self,
        model: &Model,
        tokens: &'t [u32],
        flag: &str,
        seq_len: usize,
        max_windows: Option<usize>,
    ) -> Result<Vec<&'t [u32]>> {
        cli::args::window(flag, seq_len, model)?;
        eval::windows(tokens, seq_len, max_windows)
            .with_context(|| format!("{}: {flag} {seq_len}", self.text.display()))
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    input: ModelText,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// At most this many windows (default: all whole windows of the text).
    #[arg(long)]
    windows: Option<usize>,
    /// Precision plan to evaluate against the full-precision model.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write the evaluated token ids (JSON array) to this file.
    #[arg(long)]
    save_tokens: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FPX_LOG"))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", leaving out a cause that its parent's message
/// already ends with (fpx's I/O errors print their OS error and also return it as the
/// source, which `{:#}` would print twice).
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        let n = fpx::limits::threads(n).map_err(anyhow::Error::msg)?;
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    match cli.command {
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Eval(args) => eval_cmd(args),
        Command::Calibrate(args) => cli::calibrate::run(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::Export(args) => cli::export::run(args),
        Command::Sweep(args) => cli::sweep::run(args),
        Command::Compare(args) => cli::compare::run(args),
        Command::Codegen(args) => cli::codegen::run(args),
        Command::Run(args) => cli::run::run(args),
        Command::Profile(args) => cli::profile::run(args),
        Command::Bench(args) => cli::bench::run(args),
    }
}

/// Writes command output to stdout. A closed pipe (`fpx inspect M | head`) ends the output
/// quietly instead of panicking the way `println!` does.
pub(crate) fn emit(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

pub(crate) fn load(path: &Path) -> Result<Model> {
    let start = Instant::now();
    let model = load_model(path)?;
    tracing::info!(path = %path.display(), seconds = start.elapsed().as_secs_f64(), "model loaded");
    Ok(model)
}

pub(crate) fn progress_bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

#[derive(Serialize)]
struct EvalOutput<'a> {
    model: String,
    text: String,
    plan: Option<String>,
    seconds: f64,
    tokens_per_s: f64,
    #[serde(flatten)]
    report: &'a EvalReport,
}

fn eval_cmd(args: EvalArgs) -> Result<()> {
    if let Some(path) = &args.save_tokens {
        fpx::fsutil::prepare_output_file(path)?;
    }
    let (model, _, tokens) = args.input.load()?;
    let windows = args
        .input
        .windows(&model, &tokens, "--seq-len", args.seq_len, args.windows)?;
    let graph = Graph::build(&model.spec);
    let reference = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new())?;
    let planned = match &args.plan {
        Some(path) => {
            let plan = Plan::read(path)?;
            plan.check_model(path, &model.identity)?;
            plan.use_mx_scale_rule();
            Some(CpuModel::load(
                &graph,
                model.weights.as_ref(),
                &plan.precision_map(),
            )?)
        }
        None => None,
    };
    let bar = progress_bar(windows.len(), "eval");
    let start = Instant::now();
    let report = match &planned {
        Some(p) => eval::evaluate(p, Some(&reference), &windows, &mut || bar.inc(1))?,
        None => eval::evaluate(&reference, None, &windows, &mut || bar.inc(1))?,
    };
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    // Written only once the evaluation succeeded, so a failed run leaves no token file.
    if let Some(path) = &args.save_tokens {
        let used: Vec<u32> = windows.iter().flat_map(|w| w.iter().copied()).collect();
        fpx::fsutil::write_json_atomic(path, &used)?;
    }
    let forwards = if planned.is_some() { 2 } else { 1 };
    let out = EvalOutput {
        model: args.input.model.display().to_string(),
        text: args.input.text.display().to_string(),
        plan: args.plan.as_ref().map(|p| p.display().to_string()),
        seconds,
        tokens_per_s: (report.windows * report.seq_len * forwards) as f64 / seconds,
        report: &report,
    };
    if args.json {
        emit(&(serde_json::to_string_pretty(&out)? + "\n"));
        return Ok(());
    }
    let mut text = String::new();
    writeln!(
        text,
        "{} windows x {} tokens ({} predictions) in {:.1} s ({:.0} tokens/s)",
        report.windows, report.seq_len, report.tokens, seconds, out.tokens_per_s
    )?;
    writeln!(text, "perplexity {:.4}", report.perplexity)?;
    if let (Some(r), Some(kl)) = (report.reference_perplexity, report.kl) {
        writeln!(text, "full-precision perplexity {r:.4}")?;
        writeln!(text, "mean KL(full || plan) {kl:.6}")?;
    }
    emit(&text);
    Ok(())
}
