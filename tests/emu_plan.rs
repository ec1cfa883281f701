//! Whole plans on the emu backend (the generated kernels run by the CUDA emulator) against the
//! cpu backend: every kernel family (embedding, RMSNorm, RoPE + KV cache, attention, SiLU-gate,
//! the linear kernels in fp16, fp8, nvfp4 and mxfp4, argmax) in one mixed plan; prefill logits
//! within a stated tolerance and identical greedy tokens, on tiny Llama, Qwen2 and Qwen3 models
//! (one Qwen3 with a sliding window of 6 positions on a layer, shorter than the sequence) and
//! for a few tokens of SmolLM2 (skipped with a printed reason when data/ is absent); and
//! `fpx run --backend emu --check-kernels`, the kernel-by-kernel report of the same comparison.
//!
//! Needs g++ and the CUDA header wheels in .venv (skipped without, failing under
//! FPX_REQUIRE_DATA=1).

mod common;

use common::emu_probe::emu_opts;
use common::{have, smollm2};
use fpx::lower::Arch;
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::Architecture;
use fpx::runtime::emu::{EmuBackend, EmuOptions};

/// Prefill logits: the kernels sum in other orders than the cpu backend; 1e-3 of the largest
/// logit after a whole forward pass.
const LOGIT_TOL: f32 = 1e-3;

fn compare(model_path: &std::path::Path, prompt: Option<&str>, n: usize, opts: &EmuOptions) {
    common::compare_with_cpu(model_path, prompt, n, LOGIT_TOL, |plan| {
        Box::new(EmuBackend::new(plan, opts).unwrap())
    });
}

#[test]
fn emu_tiny_models_give_the_cpu_backends_tokens() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let path = dir.path().join(format!("tiny-{arch:?}.gguf"));
        write_gguf(&path, &tiny_spec(arch), 11, GgmlDType::F32).unwrap();
        compare(&path, None, 8, &opts);
    }
    // 11 prompt tokens and 8 new ones run past the window.
    let path = dir.path().join("tiny-qwen3-windowed");
    fpx::model::synthetic::write_hf_checkpoint(
        &path,
        &common::tiny_qwen3_windowed(),
        11,
        fpx::model::synthetic::HfDtype::BF16,
        1,
    )
    .unwrap();
    compare(&path, None, 8, &opts);
}

#[test]
fn emu_smollm2_mixed_plan_gives_the_cpu_backends_tokens() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    if !have("data/smollm2 (SmolLM2-135M GGUF)", smollm2().exists()) {
        return;
    }
    compare(&smollm2(), Some("The sea was calm and the"), 3, &opts);
}

#[test]
fn fpx_run_check_kernels_reports_every_entry_point() {
    let Some(_) = emu_opts(Arch::Sm90) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Llama), 11, GgmlDType::F32).unwrap();
    let model = path.to_str().unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fpx"))
            .args([
                "run",
                "--model",
                model,
                "--prompt",
                "abc abc",
                "--check-kernels",
            ])
            .args(extra)
            .env(
                "FPX_CACHE_DIR",
                std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-cache"),
            )
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["--backend", "emu", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let checks: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let kernels: Vec<&str> = checks
        .iter()
        .map(|c| c["kernel"].as_str().unwrap())
        .collect();
    for family in [
        "embedding",
        "rmsnorm",
        "gemv",
        "rope_kv",
        "attention",
        "silu_mul",
        "argmax",
    ] {
        assert!(
            kernels.iter().any(|k| k.starts_with(family)),
            "{family}: {kernels:?}"
        );
    }
    // Prefill (the prompt's rows) and one decode step: both GEMV tiles ran.
    assert!(
        kernels.iter().any(|k| k.ends_with("_m1")) && kernels.iter().any(|k| k.ends_with("_m8"))
    );
    assert!(checks
        .iter()
        .all(|c| c["max_rel"].as_f64().unwrap() <= 1e-4));
    // A tolerance nothing meets fails with the kernels named; the cpu backend has no kernels.
    let (code, _, stderr) = run(&["--backend", "emu", "--tolerance", "0"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("above the relative tolerance 0") && stderr.contains("gemv_"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--backend emu"), "{stderr}");
}
