//! Calibrating a model of the size people deploy within this machine's memory (issue 17):
//! writes a synthetic Qwen2.5-1.5B-shaped checkpoint (random BF16 weights, 1.54B parameters,
//! 3.1 GB of safetensors, written one tensor at a time by fpx's synthetic writer) and runs
//! `fpx calibrate` on it over `--windows` x `--seq-len` tokens of text (default 4 x 512 =
//! 2 048) with the default KL pass, then prints the wall time and the calibration process's
//! peak RSS as JSON and fails when the peak reaches `--max-rss-gb` (default 4).
//!
//! ```text
//! cargo bench --profile dev --bench calib_large [-- --dir DIR --windows 4 --seq-len 512
//!     --threads 2 --max-rss-gb 4 --calibrate-arg ARG ...]
//! ```
//!
//! The checkpoint is written once into `--dir` (default `target/bench-data/qwen2.5-1.5b`) and
//! reused while its config is unchanged. Under `cargo test` (no `--bench` argument) the same
//! steps run on a tiny model of the same architecture, so the benchmark's own code is tested.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::{Architecture, EosIds, ModelSpec};

/// Qwen2.5-1.5B's shape (its config.json): 28 blocks of hidden 1536, FFN 8960, 12 query and 2
/// KV heads of 128, q/k/v biases, a tied 151 936-token embedding.
fn qwen2_5_1_5b() -> ModelSpec {
    ModelSpec {
        hidden_size: 1536,
        intermediate_size: 8960,
        num_layers: 28,
        num_heads: 12,
        num_kv_heads: 2,
        head_dim: 128,
        vocab_size: 151_936,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        max_position_embeddings: 32_768,
        bos_token_id: None,
        eos_token_id: EosIds::new([151_643]),
        ..tiny_spec(Architecture::Qwen2)
    }
}

/// The benchmark's options (`cargo bench --bench calib_large -- --help`).
#[derive(clap::Parser)]
struct Cli {
    /// Where the checkpoint is written (and reused).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    windows: usize,
    /// Tokens per window (default 512; 32 under `cargo test`).
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Fail when the calibration's peak RSS reaches this many GB.
    #[arg(long, default_value_t = 4.0)]
    max_rss_gb: f64,
    /// One more argument for `fpx calibrate` (repeatable).
    #[arg(long = "calibrate-arg", allow_hyphen_values = true)]
    calibrate: Vec<String>,
    /// Passed by `cargo bench`: the full-size run.
    #[arg(long)]
    bench: bool,
}

/// The options with their size-dependent defaults filled in.
struct Args {
    dir: PathBuf,
    windows: usize,
    seq_len: usize,
    threads: usize,
    max_rss_gb: f64,
    calibrate: Vec<String>,
}

/// The options: parsed under `cargo bench`; the defaults under `cargo test`, whose harness
/// flags (a test filter, `--nocapture`) are not ours.
fn parse_args(bench: bool) -> Args {
    use clap::Parser;
    let cli = if bench {
        Cli::parse()
    } else {
        Cli::parse_from(["calib_large"])
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Args {
        dir: cli.dir.unwrap_or_else(|| {
            root.join(if bench {
                "target/bench-data/qwen2.5-1.5b"
            } else {
                "target/bench-data/qwen2-tiny"
            })
        }),
        windows: cli.windows,
        seq_len: cli.seq_len.unwrap_or(if bench { 512 } else { 32 }),
        threads: cli.threads,
        max_rss_gb: cli.max_rss_gb,
        calibrate: cli.calibrate,
    }
}

/// Peak resident set of the waited-for children, in bytes (Linux reports kilobytes).
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage writes one plain struct that we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_CHILDREN)");
    usage.ru_maxrss as u64 * 1024
}

fn run() -> Result<(), String> {
    let bench = std::env::args().any(|a| a == "--bench");
    let args = parse_args(bench);
    let (dir, seq_len) = (&args.dir, args.seq_len);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = root.join("data/text/moby-dick.txt");
    if !text.is_file() {
        if bench {
            return Err(format!("{} is missing (run `make fetch`)", text.display()));
        }
        eprintln!("calib_large: skipped, {} is missing", text.display());
        return Ok(());
    }
    let spec = if bench {
        qwen2_5_1_5b()
    } else {
        tiny_spec(Architecture::Qwen2)
    };
    let parameters: usize = fpx::model::expected_tensors(&spec)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();

    // The checkpoint, unless the one in `dir` has this spec's config already.
    let config = serde_json::to_string(&fpx::model::config::HfConfig::from(&spec))
        .map_err(|e| e.to_string())?;
    let stamp = dir.join(".fpx-bench-config");
    let written = Instant::now();
    let reused = std::fs::read_to_string(&stamp).is_ok_and(|s| s == config);
    if !reused {
        eprintln!(
            "calib_large: writing {parameters} random BF16 parameters to {}",
            dir.display()
        );
        write_hf_checkpoint(dir, &spec, 17, HfDtype::BF16, 1).map_err(|e| e.to_string())?;
        std::fs::write(&stamp, &config).map_err(|e| format!("{}: {e}", stamp.display()))?;
    }
    let write_seconds = written.elapsed().as_secs_f64();

    let out = dir.join("calibration.json");
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_fpx"))
        .arg("calibrate")
        .arg("--model")
        .arg(dir)
        .arg("--text")
        .arg(&text)
        .args(["--seq-len", &seq_len.to_string()])
        .args(["--windows", &args.windows.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .arg("-o")
        .arg(&out)
        .arg("--json")
        .args(&args.calibrate)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("fpx calibrate: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    if !run.status.success() {
        return Err(format!("fpx calibrate failed: {}", run.status));
    }
    let peak = children_peak_rss();
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout)
        .map_err(|e| format!("fpx calibrate --json printed no JSON: {e}"))?;
    let field = |k: &str| summary.get(k).cloned().unwrap_or_default();
    let report = serde_json::json!({
        "parameters": parameters,
        "tokens": args.windows * seq_len,
        "threads": args.threads,
        "checkpoint_reused": reused,
        "write_seconds": write_seconds,
        "calibrate_seconds": seconds,
        "eps_seconds": field("eps_seconds"),
        "eps_estimate_seconds": field("eps_estimate_seconds"),
        "kl": field("kl"),
        "kl_seconds": field("kl_seconds"),
        "kl_estimate_seconds": field("kl_estimate_seconds"),
        "peak_rss_bytes": peak,
        "max_rss_bytes": (args.max_rss_gb * 1e9) as u64,
    });
    println!("{report}");
    if peak as f64 >= args.max_rss_gb * 1e9 {
        return Err(format!(
            "peak RSS {:.2} GB reached the limit of {} GB",
            peak as f64 / 1e9,
            args.max_rss_gb
        ));
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("calib_large: error: {e}");
        std::process::exit(1);
    }
}
