//! `fpx profile`: measures, on a GPU, the decode-step time of every linear layer in every
//! format (the generated GEMV kernels, CUDA events, warm-up, median of repeats, weights
//! rotated through more memory than the L2 holds) and of the rest of the step, and writes the
//! latency profile the planner reads (schema: `fpx::latency::profile`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use fpx::fsutil::write_json_atomic;
use fpx::ir::Graph;
use fpx::latency::profile::{RawProfile, SCHEMA_VERSION};
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
    #[arg(long)]
    model: PathBuf,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Profile file to write.
    #[arg(short, long)]
    output: PathBuf,
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
    fpx::fsutil::prepare_output_file(&args.output)?;
    if args.repeats == 0 {
        anyhow::bail!("--repeats must be at least 1");
    }
    let model = load(&args.model)?;
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
    let times = profile_linears(&mut dev, &schedule, &opts)?;
    drop(dev);
    let plan = ExecutablePlan::build(
        &graph,
        model.weights.as_ref(),
        &PrecisionMap::new(),
        args.context + 1,
        act,
    )?;
    let other_seconds = profile_rest(&plan, args.device, args.context, &opts)?;
    let mut layers = BTreeMap::new();
    // Every linear layer, lm_head included: plans cover it, and the rest of the step
    // (`other_seconds`) excludes every linear launch.
    for l in &schedule.linears {
        let per: BTreeMap<String, f64> = formats
            .iter()
            .filter_map(|&f| {
                let shape = fpx::lower::LinearShape {
                    format: f,
                    ..l.shape
                };
                times
                    .get(&(shape, f))
                    .and_then(|&s| f.format().map(|q| (q.name().to_string(), s)))
            })
            .collect();
        layers.insert(l.name.clone(), per);
    }
    let profile = RawProfile {
        schema_version: SCHEMA_VERSION,
        device: device.clone(),
        batch: args.batch,
        context: args.context,
        model: Some(model.identity.clone()),
        other_seconds,
        layers,
    };
    write_json_atomic(&args.output, &profile)?;
    let mut t = String::new();
    writeln!(t, "{device}: {} shapes x formats timed", times.len())?;
    for ((shape, f), s) in &times {
        writeln!(
            t,
            "  {:>6} x {:<6} {:<6} {:>9.2} us",
            shape.n,
            shape.k,
            f.name(),
            s * 1e6
        )?;
    }
    writeln!(
        t,
        "rest of the decode step at context {}: {:.2} us",
        args.context,
        other_seconds * 1e6
    )?;
    writeln!(t, "wrote {}", args.output.display())?;
    emit(&t);
    Ok(())
}
