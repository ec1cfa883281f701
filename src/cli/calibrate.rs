//! `fpx calibrate`: runs the eps pass and the KL pass, writes the calibration file, and
//! prints the per-layer table (worst layers first) or a JSON summary.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use sha2::{Digest, Sha256};

use fpx::calib::{self, cost, Calibration, KlSetup, LayerCalibration, ModelRef, TextRef};
use fpx::eval;
use fpx::formats::{Format, MxScaleRule};
use fpx::ir::Graph;

use std::path::PathBuf;

use clap::Args;

use crate::cli::run::BackendKind;
use crate::{emit, progress_bar, ModelText};

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub(crate) input: ModelText,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub(crate) seq_len: usize,
    /// Calibration windows (from the start of the text).
    #[arg(long, default_value_t = 32)]
    pub(crate) windows: usize,
    /// Formats to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["fp8", "nvfp4", "mxfp4"])]
    pub(crate) formats: Vec<String>,
    /// Held-out windows (after the calibration windows) for the per-layer KL pass; 0 skips it.
    #[arg(long, default_value_t = 1)]
    pub(crate) kl_windows: usize,
    /// Tokens per KL window (default: the longest of 256, 128, 64, 32 whose estimated KL pass
    /// fits --kl-budget-minutes; with --backend cuda the longest).
    #[arg(long)]
    pub(crate) kl_seq_len: Option<usize>,
    /// The KL pass also measures each quantized format with the layer's activations quantized
    /// to it (`kl_wa`: what `fpx plan --objective kl` needs for W+A menu entries such as
    /// w8a8). Doubles the pass's variants of quantized formats. CPU backend only.
    #[arg(long)]
    pub(crate) kl_activations: bool,
    /// Run-time budget that sizes the default KL window, from the pass's counted flops and
    /// this machine's measured product throughput.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) kl_budget_minutes: f64,
    /// MXFP4 scale rule: round (compressed-tensors' rule, no clipping) or ocp-floor (the OCP
    /// MX spec's floor(log2 amax), which clips a block's largest values). Recorded in the file.
    #[arg(long, default_value_t = MxScaleRule::Round)]
    pub(crate) mx_scale_rule: MxScaleRule,
    /// Calibration file to write.
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Where the passes' forwards run: the CPU interpreter, the generated kernels on a GPU
    /// (cuda), or the generated kernels on the CPU emulator (emu: a check, slow). The errors,
    /// Gram matrices and KL sums are computed on the host for every backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub(crate) backend: BackendKind,
    /// CUDA device ordinal (--backend cuda).
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// Print a JSON summary instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Serialize)]
struct Summary<'a> {
    output: String,
    model: &'a ModelRef,
    text: &'a TextRef,
    /// Where the forwards ran: cpu, emu or cuda.
    backend: &'static str,
    seq_len: usize,
    windows: usize,
    formats: &'a [Format],
    layers: usize,
    eps_seconds: f64,
    /// Calibration tokens x linear layers per second of the eps pass.
    eps_token_layers_per_s: f64,
    /// Estimated seconds of the eps pass, printed before it started.
    eps_estimate_seconds: f64,
    kl: Option<KlSetup>,
    kl_seconds: Option<f64>,
    /// Estimated seconds of the KL pass, printed before it started.
    kl_estimate_seconds: Option<f64>,
    /// KL-pass seconds per held-out token (the pass scales linearly with tokens).
    kl_seconds_per_token: Option<f64>,
    /// The f32 product throughput measured before the passes, which the estimates use.
    measured_gflops: f64,
    /// Spearman rank correlation between eps and KL across layers, per format.
    rank_correlation: std::collections::BTreeMap<Format, f64>,
    /// The ten most sensitive layers, worst first.
    worst: Vec<&'a LayerCalibration>,
    /// MoE experts routed fewer than [`calib::MIN_EXPERT_TOKENS`] calibration tokens (module
    /// name -> tokens): their eps is a weak estimate (with none, the weight error).
    undersampled_experts: std::collections::BTreeMap<String, usize>,
}

/// The experts (module names, as `model.layers.1.mlp.experts.3`) of `layers` that saw fewer
/// than [`calib::MIN_EXPERT_TOKENS`] tokens, with their counts. An expert's projections see
/// the same tokens, so each is named once.
fn undersampled_experts(layers: &[LayerCalibration]) -> std::collections::BTreeMap<String, usize> {
    layers
        .iter()
        .filter(|l| l.undersampled())
        .map(|l| {
            let expert = l.name.rsplit_once('.').map_or(l.name.as_str(), |(e, _)| e);
            (expert.to_string(), l.tokens.unwrap_or(0))
        })
        .collect()
}

/// Variants per layer the KL pass runs ([`calib::sensitivity::variant_precisions`]).
fn kl_variants(args: &CalibrateArgs, formats: &[Format]) -> usize {
    calib::sensitivity::variant_precisions(formats, args.kl_activations).len()
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    fpx::formats::set_mx_scale_rule(args.mx_scale_rule);
    let formats = crate::cli::args::formats("--formats", &args.formats)?;
    if args.kl_activations && args.backend != BackendKind::Cpu {
        anyhow::bail!(
            "--kl-activations runs on --backend cpu (the kernel stages' KL variants are \
             weight-only)"
        );
    }
    // Checked before the (long) calibration, so a bad -o loses no work.
    fpx::fsutil::prepare_output_file(&args.output)?;
    let (model, text, tokens) = args.input.load()?;
    crate::cli::args::window("--seq-len", args.seq_len, &model)?;
    let graph = Graph::build(&model.spec);
    let gflops = cost::measure_gflops(model.spec.hidden_size);
    let kl_seq_len = match args.kl_seq_len {
        Some(n) => {
            if args.kl_windows > 0 {
                crate::cli::args::window("--kl-seq-len", n, &model)?;
            }
            n
        }
        None => default_kl_seq_len(&args, &formats, &graph, &model.spec, gflops)?,
    };
    // Saturating: a product beyond usize is more tokens than any text holds.
    let need = args
        .seq_len
        .saturating_mul(args.windows)
        .saturating_add(kl_seq_len.saturating_mul(args.kl_windows));
    if args.windows == 0 || tokens.len() < need {
        anyhow::bail!(
            "{}: the text has {} tokens; {} calibration windows of {} and {} KL windows of {} need {need}",
            args.input.text.display(),
            tokens.len(),
            args.windows,
            args.seq_len,
            args.kl_windows,
            kl_seq_len
        );
    }
    let (calib_tokens, held_out) = tokens.split_at(args.seq_len * args.windows);
    let windows = eval::windows(calib_tokens, args.seq_len, None)?;

    let max_seq = args
        .seq_len
        .max(if args.kl_windows > 0 { kl_seq_len } else { 0 });
    let mut forwards = forwards(&args, &graph, &formats, max_seq)?;
    let eps_flops = cost::eps_flops(&graph, calib_tokens.len(), args.seq_len, formats.len());
    let eps_estimate_seconds = eps_flops / (gflops * 1e9);
    eprintln!(
        "eps pass: {} tokens x {} formats, {:.1} TFLOP, about {}{}",
        calib_tokens.len(),
        formats.len(),
        eps_flops / 1e12,
        duration(eps_estimate_seconds),
        estimate_basis(args.backend, gflops),
    );
    let bar = progress_bar(0, "eps (stage passes x windows)");
    let start = Instant::now();
    let mut layers = calib::capture::measure_eps_with(
        &graph,
        model.weights.as_ref(),
        &windows,
        &formats,
        calib::capture::EpsOptions::default(),
        forwards.as_mut(),
        &mut |d, total| {
            bar.set_length(total as u64);
            bar.set_position(d as u64)
        },
    )?;
    bar.finish_and_clear();
    let eps_seconds = start.elapsed().as_secs_f64();

    let (kl, kl_seconds, kl_estimate_seconds) = if args.kl_windows > 0 {
        let kl_windows = eval::windows(held_out, kl_seq_len, Some(args.kl_windows))?;
        let variants = kl_variants(&args, &formats);
        let flops = cost::kl_flops(&graph, kl_windows.len(), kl_seq_len, variants);
        let estimate = flops / (gflops * 1e9);
        eprintln!(
            "KL pass: {} layers x {variants} variants on {} x {kl_seq_len} held-out tokens, {:.1} TFLOP, about {}{}",
            layers.len(),
            kl_windows.len(),
            flops / 1e12,
            duration(estimate),
            estimate_basis(args.backend, gflops),
        );
        let bar = progress_bar(0, "kl (stage crossings of layer x format x window)");
        let start = Instant::now();
        calib::sensitivity::measure_kl(
            &graph,
            model.weights.as_ref(),
            &kl_windows,
            &mut layers,
            args.kl_activations,
            forwards.as_mut(),
            &mut |d, total| {
                bar.set_length(total as u64);
                bar.set_position(d as u64)
            },
        )?;
        bar.finish_and_clear();
        let setup = KlSetup {
            seq_len: kl_seq_len,
            windows: kl_windows.len(),
            tokens: kl_windows.len() * (kl_seq_len - 1),
            activations: args.kl_activations,
        };
        (
            Some(setup),
            Some(start.elapsed().as_secs_f64()),
            Some(estimate),
        )
    } else {
        (None, None, None)
    };

    let calibration = Calibration {
        schema_version: calib::SCHEMA_VERSION,
        fpx_version: env!("CARGO_PKG_VERSION").to_string(),
        model: ModelRef {
            identity: model.identity.clone(),
            path: args.input.model.display().to_string(),
        },
        spec: model.spec.clone(),
        text: TextRef {
            sha256: format!("{:x}", Sha256::digest(text.as_bytes())),
            path: args.input.text.display().to_string(),
            tokens: calib_tokens.len(),
        },
        seq_len: args.seq_len,
        windows: windows.len(),
        formats: formats.clone(),
        mx_scale_rule: args.mx_scale_rule,
        kl,
        layers,
    };
    calibration.write(&args.output)?;
    let undersampled = undersampled_experts(&calibration.layers);
    if let Some((name, seen)) = undersampled.iter().min_by_key(|(_, t)| **t) {
        eprintln!(
            "warning: {} expert(s) were routed fewer than {} of the {} calibration tokens \
             (fewest: {name}, {seen}); their eps is a weak estimate (the weight error where \
             none came); calibrate on more text (--windows) for per-expert plans",
            undersampled.len(),
            calib::MIN_EXPERT_TOKENS,
            calib_tokens.len()
        );
    }

    let mut sorted: Vec<&LayerCalibration> = calibration.layers.iter().collect();
    sorted.sort_by(|a, b| b.sensitivity().total_cmp(&a.sensitivity()));
    let rank_correlation = formats
        .iter()
        .filter_map(|&f| {
            let pairs: Vec<(f64, f64)> = calibration
                .layers
                .iter()
                .filter_map(|l| l.metrics[&f].kl.map(|kl| (l.metrics[&f].eps, kl)))
                .collect();
            let (eps, kl): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
            calib::spearman(&eps, &kl).map(|r| (f, r))
        })
        .collect();
    let summary = Summary {
        output: args.output.display().to_string(),
        model: &calibration.model,
        text: &calibration.text,
        backend: forwards.name(),
        seq_len: calibration.seq_len,
        windows: calibration.windows,
        formats: &calibration.formats,
        layers: calibration.layers.len(),
        eps_seconds,
        eps_token_layers_per_s: (calib_tokens.len() * calibration.layers.len()) as f64
            / eps_seconds,
        eps_estimate_seconds,
        kl,
        kl_seconds,
        kl_estimate_seconds,
        kl_seconds_per_token: kl
            .zip(kl_seconds)
            .map(|(k, s)| s / (k.windows * k.seq_len) as f64),
        measured_gflops: gflops,
        rank_correlation,
        worst: sorted.iter().take(10).copied().collect(),
        undersampled_experts: undersampled,
    };
    if args.json {
        emit(&(serde_json::to_string_pretty(&summary)? + "\n"));
    } else {
        emit(&table(&summary, &sorted)?);
    }
    Ok(())
}

/// The backend the passes' forwards run on, its kernels built before any long work.
fn forwards(
    args: &CalibrateArgs,
    graph: &Graph,
    formats: &[Format],
    max_seq: usize,
) -> Result<Box<dyn calib::StageForwards>> {
    Ok(match args.backend {
        BackendKind::Cpu => Box::new(calib::CpuForwards),
        BackendKind::Emu => Box::new(calib::KernelStages::emu(
            graph,
            formats,
            max_seq,
            &fpx::runtime::emu::EmuOptions::default(),
        )?),
        BackendKind::Cuda => Box::new(calib::KernelStages::cuda(
            graph,
            formats,
            max_seq,
            args.device,
        )?),
    })
}

/// What a run-time estimate assumes: the CPU's measured product rate (the estimates model
/// the cpu backend; kernel backends run at their own speed).
fn estimate_basis(backend: BackendKind, gflops: f64) -> String {
    match backend {
        BackendKind::Cpu => format!(" at {gflops:.0} GFLOP/s (measured)"),
        _ => format!(" on the cpu backend at {gflops:.0} GFLOP/s (the kernel backends differ)"),
    }
}

/// KL window lengths the default chooses from, longest first.
const KL_SEQ_LENS: [usize; 4] = [256, 128, 64, 32];

/// The default `--kl-seq-len`: the longest of [`KL_SEQ_LENS`] (within the model's context)
/// whose estimated KL pass fits the budget, else the shortest with a warning.
fn default_kl_seq_len(
    args: &CalibrateArgs,
    formats: &[Format],
    graph: &Graph,
    spec: &fpx::model::ModelSpec,
    gflops: f64,
) -> Result<usize> {
    if args.kl_budget_minutes.is_nan() || args.kl_budget_minutes <= 0.0 {
        anyhow::bail!(
            "--kl-budget-minutes {}: must be positive (--kl-windows 0 skips the KL pass)",
            args.kl_budget_minutes
        );
    }
    let windows = args.kl_windows.max(1);
    let fits: Vec<usize> = KL_SEQ_LENS
        .into_iter()
        .filter(|&n| n <= spec.max_position_embeddings)
        .collect();
    let variants = kl_variants(args, formats);
    let seconds = |n: usize| cost::kl_flops(graph, windows, n, variants) / (gflops * 1e9);
    let budget = args.kl_budget_minutes * 60.0;
    let Some(&shortest) = fits.last() else {
        anyhow::bail!(
            "the model's context of {} tokens is shorter than every default KL window; pass --kl-seq-len",
            spec.max_position_embeddings
        );
    };
    // The estimate models the CPU; a GPU runs the pass orders of magnitude faster.
    if args.backend == BackendKind::Cuda {
        return Ok(fits[0]);
    }
    match fits.iter().find(|&&n| seconds(n) <= budget) {
        Some(&n) => Ok(n),
        None => {
            if args.kl_windows > 0 {
                eprintln!(
                    "warning: even {windows} KL window(s) of {shortest} tokens take about {} (budget {:.0} min); \
                     --kl-windows 0 skips the KL pass",
                    duration(seconds(shortest)),
                    args.kl_budget_minutes
                );
            }
            Ok(shortest)
        }
    }
}

/// `95 s`, `12.5 min` or `3.2 h`.
fn duration(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else if seconds < 7200.0 {
        format!("{:.1} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

/// The readable report: every layer, worst first, then the summary lines.
fn table(s: &Summary, sorted: &[&LayerCalibration]) -> Result<String> {
    let mut t = String::new();
    write!(
        t,
        "{:>4} {:<34} {:>5} {:>5} {:>10}",
        "rank", "linear", "layer", "kind", "shape"
    )?;
    for f in s.formats {
        write!(t, " {:>10} {:>10}", format!("eps {f}"), format!("W+A {f}"))?;
        if s.kl.is_some() {
            write!(t, " {:>10}", format!("KL {f}"))?;
        }
        if s.kl.is_some_and(|k| k.activations) && *f != Format::Fp16 {
            write!(t, " {:>10}", format!("KL W+A {f}"))?;
        }
    }
    writeln!(t)?;
    for (rank, l) in sorted.iter().enumerate() {
        let shape = format!("{}x{}", l.out_features, l.in_features);
        write!(
            t,
            "{:>4} {:<34} {:>5} {:>5} {:>10}",
            rank + 1,
            l.name,
            l.layer,
            l.kind.name(),
            shape
        )?;
        for f in s.formats {
            let m = &l.metrics[f];
            write!(t, " {:>10.5} {:>10.5}", m.eps, m.eps_wa)?;
            for kl in [m.kl, m.kl_wa].into_iter().flatten() {
                write!(t, " {kl:>10.6}")?;
            }
        }
        writeln!(t)?;
    }
    writeln!(
        t,
        "\n{} layers, {} calibration tokens ({} x {}), eps pass {:.1} s (estimated {:.1} s; {:.0} token-layers/s)",
        s.layers,
        s.text.tokens,
        s.windows,
        s.seq_len,
        s.eps_seconds,
        s.eps_estimate_seconds,
        s.eps_token_layers_per_s
    )?;
    if let (Some(kl), Some(sec), Some(est), Some(per)) = (
        s.kl,
        s.kl_seconds,
        s.kl_estimate_seconds,
        s.kl_seconds_per_token,
    ) {
        writeln!(
            t,
            "KL pass: {} held-out windows x {} tokens in {sec:.1} s (estimated {est:.1} s; {:.3} s per held-out token)",
            kl.windows, kl.seq_len, per
        )?;
    }
    for (f, r) in &s.rank_correlation {
        writeln!(t, "Spearman rank correlation of eps vs KL, {f}: {r:.3}")?;
    }
    writeln!(t, "wrote {}", s.output)?;
    Ok(t)
}
