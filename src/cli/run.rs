//! `fpx run`: builds a plan's executable plan (weights packed in their formats) and generates
//! text greedily on the cpu backend or on the GPU with the generated kernels; prints the text,
//! tokens/s and per-token latency. With `--check-kernels` (emu backend) it instead runs the
//! prompt's prefill and one decode step kernel by kernel on the emulator and on the cpu
//! backend, on identical inputs, and reports each entry point's largest difference.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Serialize;

use fpx::ir::Graph;
use fpx::runtime::exec::{generate, Backend, CpuBackend, ExecutablePlan, Generation, LatencyStats};

use crate::cli::codegen::precision_of;
use crate::{emit, load};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendKind {
    Cpu,
    Cuda,
    /// The generated CUDA kernels run on the CPU by the emulator (g++ + CUDA header wheels).
    Emu,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Precision plan (JSON); without one every linear layer runs in FP32.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Hugging Face model directory or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// New tokens to generate (fewer when the model emits its end-of-sequence token).
    #[arg(long, default_value_t = 32,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_tokens: usize,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    backend: BackendKind,
    /// CUDA device ordinal (cuda backend).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// KV-cache positions (default: prompt + max tokens).
    #[arg(long)]
    max_seq: Option<usize>,
    /// Generations to time (the latency percentiles cover every decode step of every run; the
    /// text printed is the first run's).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    repeat: usize,
    #[command(flatten)]
    act: crate::cli::args::ActDtypeArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Emu backend: instead of generating, compare every kernel launch of the prefill and one
    /// decode step with the cpu backend on identical inputs; fails above --tolerance.
    #[arg(long)]
    check_kernels: bool,
    /// Largest difference --check-kernels accepts, relative to the largest reference value
    /// of the step (default: 1e-4 plus one unit in the last place of the activation type,
    /// 2^-7 for bf16 and 2^-10 for f16: a kernel's other summation order may round a value to
    /// the neighbouring 16-bit number).
    #[arg(long, value_parser = crate::cli::args::finite_f32)]
    tolerance: Option<f32>,
}

/// One entry point in `--check-kernels`.
#[derive(Serialize)]
struct KernelCheck {
    kernel: String,
    launches: usize,
    max_abs: f32,
    max_rel: f32,
}

/// `fpx run --backend emu --check-kernels`.
fn check_kernels(args: &RunArgs, plan: &ExecutablePlan, prompt: &[u32]) -> Result<()> {
    use fpx::runtime::exec::{compare_steps, HostBackend};
    let opts = fpx::runtime::emu::EmuOptions::default();
    let mut emu = fpx::runtime::emu::EmuBackend::new(plan, &opts)?;
    let mut cpu = CpuBackend::new(plan);
    let mut by_kernel: std::collections::BTreeMap<String, KernelCheck> = Default::default();
    let mut record = |steps: Vec<fpx::runtime::exec::StepComparison>| {
        for c in steps {
            let k = by_kernel.entry(c.kernel.clone()).or_insert(KernelCheck {
                kernel: c.kernel.clone(),
                launches: 0,
                max_abs: 0.0,
                max_rel: 0.0,
            });
            k.launches += 1;
            k.max_abs = k.max_abs.max(c.max_abs);
            k.max_rel = k.max_rel.max(c.rel());
        }
    };
    record(compare_steps(plan, &mut cpu, &mut emu, prompt, 0)?);
    if plan.max_seq > prompt.len() {
        let next = cpu.state().next() as u32;
        record(compare_steps(
            plan,
            &mut cpu,
            &mut emu,
            &[next],
            prompt.len(),
        )?);
    }
    let checks: Vec<KernelCheck> = by_kernel.into_values().collect();
    let tolerance = args.tolerance.unwrap_or(1e-4 + plan.schedule.act.ulp());
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.max_rel.is_nan() || c.max_rel > tolerance)
        .map(|c| c.kernel.as_str())
        .collect();
    if args.json {
        emit(&(serde_json::to_string_pretty(&checks)? + "\n"));
    } else {
        let mut t = format!(
            "{:<36} {:>8} {:>10} {:>10}\n",
            "kernel", "launches", "max abs", "max rel"
        );
        for c in &checks {
            writeln!(
                t,
                "{:<36} {:>8} {:>10.2e} {:>10.2e}",
                c.kernel, c.launches, c.max_abs, c.max_rel
            )?;
        }
        writeln!(
            t,
            "{} entry points, {} launches compared (emu vs cpu, identical inputs per step)",
            checks.len(),
            checks.iter().map(|c| c.launches).sum::<usize>()
        )?;
        emit(&t);
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "kernels above the relative tolerance {}: {}",
            tolerance,
            failed.join(", ")
        );
    }
    Ok(())
}

fn plan_of(
    graph: &Graph,
    model: &fpx::model::Model,
    precision: &fpx::lower::PrecisionMap,
    max_seq: usize,
    act: fpx::lower::ActDtype,
) -> Result<ExecutablePlan> {
    Ok(ExecutablePlan::build(
        graph,
        model.weights.as_ref(),
        precision,
        max_seq,
        act,
    )?)
}

#[derive(Serialize)]
struct RunOutput<'a> {
    backend: &'static str,
    /// Generations timed (`--repeat`); tokens and text are the first one's.
    repeats: usize,
    prompt_tokens: usize,
    tokens: &'a [u32],
    text: String,
    build_seconds: f64,
    /// The first run's prefill (its time to the first token).
    prefill_seconds: f64,
    /// Over every decode step of every run.
    decode_tokens_per_s: Option<f64>,
    median_token_ms: Option<f64>,
    /// Time to first token (the prefill) over the runs.
    ttft_ms: LatencyStats,
    /// Per-token decode latency over every decode step of every run.
    decode_ms: Option<LatencyStats>,
    linear_weight_bytes: usize,
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    let model = load(&args.model)?;
    let precision = precision_of(args.plan.as_deref(), &model.identity)?;
    let prompt = model.tokenizer.encode(&args.prompt)?;
    let context = model.spec.max_position_embeddings;
    let max_seq = match args.max_seq {
        Some(n) => n,
        None => prompt.len().saturating_add(args.max_tokens),
    };
    if max_seq > context {
        anyhow::bail!(
            "{} prompt tokens + --max-tokens {} (or --max-seq) need {max_seq} positions, more \
             than the model's context of {context}",
            prompt.len(),
            args.max_tokens
        );
    }
    let graph = Graph::build(&model.spec);
    let act = args.act.resolve(&graph, &model);
    if args.check_kernels {
        if args.backend != BackendKind::Emu {
            anyhow::bail!(
                "--check-kernels compares the emulated kernels: use it with --backend emu"
            );
        }
        fpx::runtime::emu::Toolchain::find()?;
        let plan = plan_of(
            &graph,
            &model,
            &precision,
            max_seq.max(prompt.len() + 1),
            act,
        )?;
        return check_kernels(&args, &plan, &prompt);
    }
    // Probe what the backend needs before the (slow) packing of the weights.
    let emu_opts = fpx::runtime::emu::EmuOptions::default();
    match args.backend {
        BackendKind::Cpu => {}
        BackendKind::Cuda => {
            fpx::runtime::cuda::probe_driver()?;
        }
        BackendKind::Emu => {
            fpx::runtime::emu::Toolchain::find()?;
        }
    }
    let start = Instant::now();
    let plan = plan_of(&graph, &model, &precision, max_seq, act)?;
    let mut backend: Box<dyn Backend + '_> = match args.backend {
        BackendKind::Cpu => Box::new(CpuBackend::new(&plan)),
        BackendKind::Cuda => Box::new(fpx::runtime::cuda::CudaBackend::new(
            &plan,
            args.device,
            None,
        )?),
        BackendKind::Emu => Box::new(fpx::runtime::emu::EmuBackend::new(&plan, &emu_opts)?),
    };
    let build_seconds = start.elapsed().as_secs_f64();
    let eos = model.spec.eos_token_id.ids();
    let mut runs: Vec<Generation> = Vec::with_capacity(args.repeat);
    let bar = crate::progress_bar(args.repeat, "generating");
    for _ in 0..args.repeat {
        runs.push(generate(backend.as_mut(), &prompt, args.max_tokens, eos)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let generation = &runs[0];
    let ttft: Vec<f64> = runs.iter().map(|g| g.prefill_seconds).collect();
    let steps: Vec<f64> = runs.iter().flat_map(|g| g.step_seconds.clone()).collect();
    let decode = LatencyStats::of_seconds(&steps);
    let out = RunOutput {
        backend: backend.name(),
        repeats: runs.len(),
        prompt_tokens: generation.prompt_tokens,
        tokens: &generation.tokens,
        text: model.tokenizer.decode(&generation.tokens)?,
        build_seconds,
        prefill_seconds: generation.prefill_seconds,
        decode_tokens_per_s: (!steps.is_empty())
            .then(|| steps.len() as f64 / steps.iter().sum::<f64>().max(1e-12)),
        median_token_ms: decode.map(|d| d.p50_ms),
        ttft_ms: LatencyStats::of_seconds(&ttft).expect("at least one run"),
        decode_ms: decode,
        linear_weight_bytes: fpx::lower::Schedule::build(&graph, &precision)?
            .linears
            .iter()
            .map(|l| match l.shape.format.format() {
                Some(f) => f.weight_bytes(l.shape.n, l.shape.k) as usize,
                None => 4 * l.shape.n * l.shape.k,
            })
            .sum(),
    };
    if args.json {
        emit(&(serde_json::to_string_pretty(&out)? + "\n"));
        return Ok(());
    }
    let mut t = String::new();
    writeln!(t, "{}{}", args.prompt, out.text)?;
    writeln!(
        t,
        "\n[{} backend] prompt {} tokens, prefill {:.1} ms ({:.0} tokens/s); {} new tokens",
        out.backend,
        out.prompt_tokens,
        out.prefill_seconds * 1e3,
        out.prompt_tokens as f64 / out.prefill_seconds.max(1e-12),
        out.tokens.len()
    )?;
    let row = latency_row;
    t.push_str(&row("time to first token", "runs", &out.ttft_ms));
    match (out.decode_tokens_per_s, &out.decode_ms) {
        (Some(tps), Some(d)) => {
            t.push_str(&row("decode, per token", "tokens", d));
            writeln!(
                t,
                "decode {tps:.1} tokens/s; linear weights {:.1} MB; plan built in {:.2} s",
                out.linear_weight_bytes as f64 / 1e6,
                out.build_seconds
            )?
        }
        _ => writeln!(t, "no decode steps (one new token comes from the prefill)")?,
    }
    emit(&t);
    Ok(())
}

/// One table row of a latency distribution (shared by `fpx run` and `fpx bench`).
pub(crate) fn latency_row(what: &str, n: &str, s: &LatencyStats) -> String {
    format!(
        "{what:<22} {:>6} {n:<7} p50 {:>9.2}  p95 {:>9.2}  p99 {:>9.2}  max {:>9.2} ms\n",
        s.count, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
    )
}
