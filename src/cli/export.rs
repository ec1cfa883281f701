//! `fpx export`: writes a plan's model as a compressed-tensors Hugging Face directory
//! (`fpx::export`) and prints what it wrote and the engine commands that serve it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use fpx::export::{export, ExportDtype, ExportOptions, DEFAULT_MAX_SHARD_BYTES};
use fpx::plan::Plan;

use crate::emit;

#[derive(Args)]
pub struct ExportArgs {
    /// Hugging Face model directory or GGUF file the plan was made for.
    #[arg(long)]
    model: PathBuf,
    /// Precision plan (`fpx plan`; `--target vllm` keeps fused layers in one scheme).
    #[arg(long)]
    plan: PathBuf,
    /// Output directory (must not exist or be empty, unless --force).
    #[arg(short, long)]
    output: PathBuf,
    /// Dtype of the tensors the plan does not quantize: bf16, fp16, or fp32 (exact checks).
    #[arg(long, default_value = "bf16")]
    dtype: ExportDtype,
    /// Replace an existing non-empty output directory.
    #[arg(long)]
    force: bool,
    /// Largest shard, bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let model = crate::load(&args.model)?;
    let plan = Plan::read(&args.plan)?;
    let opts = ExportOptions {
        dtype: args.dtype,
        force: args.force,
        max_shard_bytes: args.max_shard_bytes,
    };
    let start = Instant::now();
    let report = export(&model, &plan, &args.plan, &args.output, &opts)?;
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = seconds.into();
        v["tensor_parallel"] = plan.tensor_parallel().into();
        emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
        return Ok(());
    }
    let mut out = String::new();
    let dir = report.dir.display();
    writeln!(
        out,
        "exported {} tensors ({:.1} MB) in {} shard(s) to {dir} in {seconds:.1} s",
        report.tensors,
        report.tensor_bytes as f64 / 1e6,
        report.shards
    )?;
    for (format, n) in &report.layers_per_format {
        writeln!(out, "  {format:<22} {n} layers")?;
    }
    writeln!(
        out,
        "  {:<22} {} linears in {}",
        "ignore",
        report.ignored.len(),
        report.dtype.torch_name()
    )?;
    writeln!(out, "  mxfp4 scale rule       {}", report.mx_scale_rule)?;
    writeln!(out, "serve it with:")?;
    let tp = plan.tensor_parallel();
    if tp > 1 {
        writeln!(out, "  vllm serve {dir} --tensor-parallel-size {tp}")?;
        writeln!(
            out,
            "  python -m sglang.launch_server --model-path {dir} --tp {tp}"
        )?;
    } else {
        writeln!(out, "  vllm serve {dir}")?;
        writeln!(out, "  python -m sglang.launch_server --model-path {dir}")?;
    }
    emit(&out);
    Ok(())
}
