//! `fpx bench`: throughput of the CPU reference forward (prefill of whole windows, FP32 or a
//! plan's formats), timed without tokenization, loading or loss computation, after one
//! untimed warm-up window, with the distribution of the windows' latency (each window is the
//! prefill that gives a prompt of `--seq-len` tokens its first token); then, on the cpu
//! backend of the same plan's executable plan (FP32 activations), `--decode-tokens` greedy
//! decode steps after the last window, as per-token latency percentiles. Compare with
//! `make bench-torch` (PyTorch eager, same windows and threads).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use fpx::ir::Graph;
use fpx::lower::ActDtype;
use fpx::lower::PrecisionMap;
use fpx::plan::Plan;
use fpx::runtime::cpu::CpuModel;
use fpx::runtime::exec::{generate, CpuBackend, ExecutablePlan, LatencyStats};

use crate::{emit, progress_bar, ModelText};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    input: ModelText,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Timed windows.
    #[arg(long, default_value_t = 4)]
    windows: usize,
    /// Run the plan's formats instead of FP32.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Greedy decode steps timed on the cpu backend after the last window (0: none).
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    plan: Option<String>,
    threads: usize,
    seq_len: usize,
    windows: usize,
    tokens: usize,
    seconds: f64,
    tokens_per_s: f64,
    /// Seconds per window, in order.
    window_seconds: Vec<f64>,
    /// Time to first token of a `seq_len`-token prompt: the windows' latency.
    ttft_ms: LatencyStats,
    /// Per-token decode latency on the cpu backend, at `seq_len` and more cached positions.
    decode_ms: Option<LatencyStats>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let (model, _, tokens) = args.input.load()?;
    let windows = args.input.windows(
        &model,
        &tokens,
        "--seq-len",
        args.seq_len,
        Some(args.windows.saturating_add(1)),
    )?;
    if windows.len() < 2 {
        anyhow::bail!(
            "{}: the text holds fewer than 2 windows of {} tokens (1 warm-up + 1 timed)",
            args.input.text.display(),
            args.seq_len
        );
    }
    let graph = Graph::build(&model.spec);
    let precision = match &args.plan {
        Some(path) => {
            let plan = Plan::read(path)?;
            plan.check_model(path, &model.identity)?;
            plan.use_mx_scale_rule();
            plan.precision_map()
        }
        None => PrecisionMap::new(),
    };
    let cpu = CpuModel::load(&graph, model.weights.as_ref(), &precision)?;
    cpu.forward(windows[0])?;
    let bar = progress_bar(windows.len() - 1, "bench");
    let mut window_seconds = Vec::new();
    let start = Instant::now();
    for w in &windows[1..] {
        let t = Instant::now();
        cpu.forward(w)?;
        window_seconds.push(t.elapsed().as_secs_f64());
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let timed = windows.len() - 1;
    let decode_ms = match args.decode_tokens {
        0 => None,
        n => {
            let last = windows[windows.len() - 1];
            let plan = ExecutablePlan::build(
                &graph,
                model.weights.as_ref(),
                &precision,
                last.len() + n,
                ActDtype::F32,
            )?;
            // `n + 1` new tokens: the first comes from the prefill, then `n` decode steps; no
            // end-of-sequence stop, so the count is what was asked.
            let g = generate(&mut CpuBackend::new(&plan), last, n + 1, &[])?;
            LatencyStats::of_seconds(&g.step_seconds)
        }
    };
    let report = BenchReport {
        model: args.input.model.display().to_string(),
        plan: args.plan.as_ref().map(|p| p.display().to_string()),
        threads: rayon::current_num_threads(),
        seq_len: args.seq_len,
        windows: timed,
        tokens: timed * args.seq_len,
        seconds,
        tokens_per_s: (timed * args.seq_len) as f64 / seconds,
        ttft_ms: LatencyStats::of_seconds(&window_seconds).expect("at least one timed window"),
        window_seconds,
        decode_ms,
    };
    if args.json {
        emit(&(serde_json::to_string_pretty(&report)? + "\n"));
    } else {
        let mut t = format!(
            "{} windows x {} tokens on {} threads: {:.2} s, {:.1} tokens/s\n",
            report.windows, report.seq_len, report.threads, report.seconds, report.tokens_per_s
        );
        t.push_str(&crate::cli::run::latency_row(
            "time to first token",
            "windows",
            &report.ttft_ms,
        ));
        if let Some(d) = &report.decode_ms {
            t.push_str(&crate::cli::run::latency_row(
                "decode, per token",
                "tokens",
                d,
            ));
        }
        emit(&t);
    }
    Ok(())
}
