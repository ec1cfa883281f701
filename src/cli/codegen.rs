//! `fpx codegen`: renders a plan's kernels for one GPU target, compiles them with NVRTC to
//! CUBIN (through the disk cache) and writes, into the output directory, every `.cu` source,
//! its `.cubin` and `.ptx`, the helper headers under `include/`, and `manifest.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use fpx::codegen::{self, Manifest, HEADERS};
use fpx::fsutil::{write_atomic, write_json_atomic};
use fpx::ir::Graph;
use fpx::lower::PrecisionMap;
use fpx::lower::{Arch, Schedule};
use fpx::plan::Plan;
use fpx::runtime::cuda::{Compiler, CompilerOptions, KernelCache};

use crate::{emit, load};

#[derive(Args)]
pub(crate) struct CodegenArgs {
    /// Precision plan (JSON); without one every linear layer stays FP32.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Hugging Face model directory or GGUF file (only its shapes are read).
    #[arg(long)]
    model: PathBuf,
    /// Target: sm_80, sm_86, sm_89, sm_90, sm_100a or sm_120a.
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// Output directory.
    #[arg(short, long)]
    output: PathBuf,
    /// Write the sources only (no NVRTC).
    #[arg(long)]
    no_compile: bool,
    #[command(flatten)]
    act: crate::cli::args::ActDtypeArg,
    /// Kernel cache directory (default: FPX_CACHE_DIR, else ~/.cache/fpx/kernels).
    #[arg(long, conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Compile everything, neither reading nor writing the cache.
    #[arg(long)]
    no_cache: bool,
    /// Print the manifest as JSON instead of the summary.
    #[arg(long)]
    json: bool,
    /// Print, per kernel, registers, spills, shared memory and global load widths (ptxas and
    /// cuobjdump from the wheels) and the GPU-only paths the emulator cannot execute.
    #[arg(long, conflicts_with = "no_compile")]
    report: bool,
}

/// The precision map of `--plan` (checked against the model), or an empty one.
pub(crate) fn precision_of(plan: Option<&Path>, identity: &str) -> Result<PrecisionMap> {
    Ok(match plan {
        Some(path) => {
            let plan = Plan::read(path)?;
            plan.check_model(path, identity)?;
            plan.use_mx_scale_rule();
            plan.precision_map()
        }
        None => PrecisionMap::new(),
    })
}

/// Where NVRTC dumps the source of a kernel it could not compile: `DIR.failed` beside DIR.
fn failed_dir(out: &std::path::Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".failed");
    out.with_file_name(name)
}

pub(crate) fn run(args: CodegenArgs) -> Result<()> {
    let arch: Arch = args.arch.parse()?;
    // Built in a temporary sibling and renamed into place at the end: a failure (a full
    // disk, an NVRTC error, Ctrl-C) leaves the previous result or nothing.
    let staged = fpx::fsutil::StagedDir::new(&args.output, "manifest.json")?;
    let model = load(&args.model)?;
    let precision = precision_of(args.plan.as_deref(), &model.identity)?;
    let graph = Graph::build(&model.spec);
    let schedule = Schedule::build(&graph, &precision)?.with_act(args.act.resolve(&graph, &model));
    let start = Instant::now();
    let kernels = codegen::generate(&schedule, arch)?;
    let render_seconds = start.elapsed().as_secs_f64();
    let out = staged.path();
    for k in &kernels {
        write_atomic(&out.join(&k.file_name), k.source.as_bytes())?;
    }
    for (name, text) in HEADERS {
        write_atomic(&out.join("include").join(name), text.as_bytes())?;
    }
    let mut manifest = Manifest::new(arch, &schedule, &kernels);
    let mut summary = format!(
        "{} kernels for {} linear layers rendered for {arch} in {:.3} s\n",
        kernels.len(),
        schedule.linears.len(),
        render_seconds
    );
    if !args.no_compile {
        let cache_dir = if args.no_cache {
            None
        } else {
            Some(
                args.cache_dir
                    .clone()
                    .unwrap_or_else(KernelCache::default_dir),
            )
        };
        let compiler = Compiler::new(CompilerOptions {
            cache_dir: cache_dir.clone(),
            // Failed sources stay for the user to read, beside the (unwritten) output.
            dump_dir: Some(failed_dir(&args.output)),
            cuda_include: None,
        })?;
        let start = Instant::now();
        let compiled = compiler
            .compile_all(&kernels)
            .context("compiling the kernels with NVRTC")?;
        let seconds = start.elapsed().as_secs_f64();
        for (c, entry) in compiled.iter().zip(manifest.kernels.iter_mut()) {
            let cubin = format!("{}.cubin", c.name);
            let ptx = format!("{}.ptx", c.name);
            write_atomic(&out.join(&cubin), &c.cubin)?;
            write_atomic(&out.join(&ptx), c.ptx.as_bytes())?;
            entry.cubin = Some(cubin);
            entry.ptx = Some(ptx);
            entry.cached = Some(c.cached);
            if !c.log.trim().is_empty() {
                tracing::warn!(kernel = %c.name, log = %c.log, "NVRTC diagnostics");
            }
        }
        if args.report {
            let tools = codegen::report::SassTools::find()?;
            let mut rows = Vec::new();
            for c in &compiled {
                rows.extend(codegen::report::analyze(&tools, arch, &c.ptx, &c.cubin)?);
            }
            summary.push_str(&codegen::report::table(&rows));
            manifest.sass = Some(rows);
        }
        manifest.compiler = Some(compiler.version_string());
        manifest.options = Compiler::options(arch);
        let (fresh, hits) = compiler.stats();
        writeln!(
            summary,
            "{} to CUBIN in {seconds:.2} s: {fresh} compiled, {hits} from the cache{}",
            compiler.version_string(),
            cache_dir.map_or(" (disabled)".to_string(), |d| format!(" ({})", d.display()))
        )?;
    }
    write_json_atomic(&out.join("manifest.json"), &manifest)?;
    staged.commit()?;
    if args.json {
        emit(&(serde_json::to_string_pretty(&manifest)? + "\n"));
    } else {
        writeln!(
            summary,
            "wrote {}",
            args.output.join("manifest.json").display()
        )?;
        emit(&summary);
    }
    Ok(())
}
