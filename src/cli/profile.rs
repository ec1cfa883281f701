//! `fpx profile`: measures, on a GPU, the decode-step time of every linear layer in every
//! format (the generated GEMV kernels, CUDA events, warm-up, samples of batched launches,
//! weights rotated through more memory than the L2 holds) and of the rest of the step, and
//! writes the latency profile the planner reads (schema: `fpx::latency::profile`), with each
//! kernel's distribution and modelled cost. `fpx profile --compare` reads one back as measured
//! / modelled per kernel family, on any machine.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;

use fpx::fsutil::write_json_atomic;
use fpx::ir::Graph;
use fpx::latency::measured::{compare, record, Comparison, Measurements};
use fpx::latency::{Gpu, KernelCost, LayerShape, Profile};
use fpx::lower::PrecisionMap;
use fpx::lower::{Schedule, WeightFormat};
use fpx::runtime::cuda::{
    probe_driver, profile_linears, profile_rest, CompilerOptions, Device, KernelCache,
    ProfileOptions,
};
use fpx::runtime::exec::ExecutablePlan;

use crate::{emit, load};

#[derive(Args)]
pub(crate) struct ProfileArgs {
    /// Hugging Face model directory or GGUF file.
    #[arg(long, required_unless_present = "compare")]
    model: Option<PathBuf>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Profile file to write.
    #[arg(short, long, required_unless_present = "compare")]
    output: Option<PathBuf>,
    /// Read this profile and print, per kernel family, measured / modelled (the kernel cost
    /// model the profile recorded); needs no GPU.
    #[arg(long, conflicts_with_all = ["model", "output"])]
    compare: Option<PathBuf>,
    /// With --compare: print one JSON object.
    #[arg(long, requires = "compare")]
    json: bool,
    /// Formats to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["fp16", "fp8", "nvfp4", "mxfp4"])]
    formats: Vec<String>,
    /// Tokens per step (1..=8).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// KV-cache positions the rest-of-step measurement attends over.
    #[arg(long, default_value_t = 512)]
    context: usize,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    repeats: usize,
    /// Bytes of weight copies to rotate through (default 512 MiB, several L2 sizes).
    #[arg(long, default_value_t = 512 << 20)]
    rotate_bytes: usize,
    #[command(flatten)]
    act: crate::cli::args::ActDtypeArg,
}

pub(crate) fn run(args: ProfileArgs) -> Result<()> {
    if let Some(path) = &args.compare {
        return print_comparison(path, args.json);
    }
    let (Some(model_path), Some(output)) = (&args.model, &args.output) else {
        anyhow::bail!("`fpx profile` needs --model and --output (or --compare PROFILE)");
    };
    // Fail fast, before loading the model, on a machine without a GPU. The library's hint
    // (`--backend cpu`) is for `run`; `profile` has no CPU backend.
    probe_driver().map_err(|e| match e {
        fpx::Error::CudaUnavailable { what, .. } => anyhow::anyhow!(
            "{what}: `fpx profile` times kernels on an NVIDIA GPU and this machine has no \
             CUDA driver; plan without a profile with a roofline instead (`fpx plan --device h100`)"
        ),
        other => other.into(),
    })?;
    let formats: Vec<WeightFormat> = crate::cli::args::formats("--formats", &args.formats)?
        .into_iter()
        .map(|f| WeightFormat::of(Some(f)))
        .collect();
    fpx::fsutil::prepare_output_file(output)?;
    if args.repeats == 0 {
        anyhow::bail!("--repeats must be at least 1");
    }
    let model = load(model_path)?;
    let graph = Graph::build(&model.spec);
    let act = args.act.resolve(&graph, &model);
    let schedule = Schedule::build(&graph, &PrecisionMap::new())?.with_act(act);
    let opts = ProfileOptions {
        formats: formats.clone(),
        batch: args.batch,
        warmup: args.warmup,
        repeats: args.repeats,
        rotate_bytes: args.rotate_bytes,
        compiler: CompilerOptions {
            cache_dir: Some(KernelCache::default_dir()),
            ..CompilerOptions::default()
        },
    };
    let mut dev = Device::open(args.device)?;
    let device = dev.name.clone();
    let linears = profile_linears(&mut dev, &schedule, &opts)?;
    drop(dev);
    let plan = ExecutablePlan::build(
        &graph,
        model.weights.as_ref(),
        &PrecisionMap::new(),
        args.context + 1,
        act,
    )?;
    let rest = profile_rest(&plan, args.device, args.context, &opts)?;
    // The cost model of the same device, batch, context and activations, when fpx has one.
    let cost = Gpu::of_device_name(&device)
        .map(|gpu| KernelCost::new(gpu, &graph, args.batch, args.context).map(|c| c.with_act(act)))
        .transpose()?;
    let measurements = Measurements {
        device: device.clone(),
        batch: args.batch,
        context: args.context,
        model: Some(model.identity.clone()),
        linears,
        rest,
    };
    let profile = record(
        &schedule,
        &LayerShape::of_graph(&graph),
        &measurements,
        cost.as_ref(),
    )?;
    write_json_atomic(output, &profile)?;
    let mut t = String::new();
    writeln!(
        t,
        "{device}: {} shapes x formats timed",
        profile.kernels.len()
    )?;
    for k in &profile.kernels {
        let modelled = k
            .modelled_seconds
            .map_or(String::new(), |m| format!("  modelled {:>8.2} us", m * 1e6));
        writeln!(
            t,
            "  {:>6} x {:<6} {:<6} p50 {:>8.2}  p99 {:>8.2} us{modelled}",
            k.n,
            k.k,
            k.format,
            k.measured.p50 * 1e6,
            k.measured.p99 * 1e6,
        )?;
    }
    writeln!(
        t,
        "rest of the decode step at context {}: {:.2} us",
        args.context,
        profile.other_seconds * 1e6
    )?;
    if cost.is_none() {
        writeln!(
            t,
            "fpx has no cost model of `{device}`: the profile records no modelled cost"
        )?;
    }
    writeln!(t, "wrote {}", output.display())?;
    emit(&t);
    Ok(())
}

/// `fpx profile --compare`: measured / modelled per kernel family.
fn print_comparison(path: &std::path::Path, json: bool) -> Result<()> {
    let profile = Profile::read(path)?;
    let c: Comparison =
        compare(&profile).with_context(|| format!("--compare {}", path.display()))?;
    if json {
        emit(&(serde_json::to_string_pretty(&c)? + "\n"));
        return Ok(());
    }
    let mut t = String::new();
    writeln!(t, "{}: measured / modelled ({})", c.device, c.modelled_by)?;
    writeln!(
        t,
        "{:<14} {:>7} {:>8} {:>13} {:>13} {:>7} {:>15}  most optimistic for",
        "family", "kernels", "launches", "measured us", "modelled us", "ratio", "kernel range"
    )?;
    for f in &c.families {
        writeln!(
            t,
            "{:<14} {:>7} {:>8} {:>13.2} {:>13.2} {:>7.2} {:>7.2} - {:<5.2}  {}",
            f.family,
            f.kernels,
            f.launches,
            f.measured_seconds * 1e6,
            f.modelled_seconds * 1e6,
            f.ratio,
            f.min_ratio,
            f.max_ratio,
            f.worst_kernel
        )?;
    }
    if let Some([measured, modelled, ratio]) = c.rest {
        writeln!(
            t,
            "{:<14} {:>7} {:>8} {:>13.2} {:>13.2} {:>7.2}",
            "rest of step",
            "",
            "",
            measured * 1e6,
            modelled * 1e6,
            ratio
        )?;
    }
    writeln!(
        t,
        "ratio > 1: the kernels are slower than modelled (sums over the step's launches of each \
         family, every layer in that format)"
    )?;
    emit(&t);
    Ok(())
}
