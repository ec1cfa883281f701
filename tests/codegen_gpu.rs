//! GPU tests: every linear kernel (GEMV for 1 and 2..=8 rows, GEMM beyond) in every format, on
//! FP32 and BF16 activations, against the cpu backend on the same packed bytes, and whole plans
//! (logits and greedy tokens, in the checkpoint's activation type) against the cpu backend. They need a CUDA driver and a GPU: without one they are
//! skipped with a printed reason, and they fail when FPX_REQUIRE_GPU=1.

mod common;

use common::{gpu, smollm2};
use fpx::lower::{ActDtype, LinearShape, WeightFormat};
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::Architecture;
use fpx::runtime::cuda::{CudaBackend, Device};
use fpx::runtime::exec::{reference_linear, PackedLinear};

fn close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{i}]: gpu {g} vs cpu {w} (scale {scale})"
        );
    }
}

#[test]
fn gpu_linear_kernels_match_the_cpu_backend() {
    if !gpu() {
        return;
    }
    let mut dev = Device::open(0).unwrap();
    for format in WeightFormat::ALL {
        for (n, k, bias, accumulate) in [
            (192, 576, true, false),
            (40, 100, false, true),
            (4096, 4096, false, false),
        ] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
                .collect();
            let b = bias.then(|| (0..n).map(|i| i as f32 * 0.01).collect::<Vec<f32>>());
            let packed = PackedLinear::pack(format, &w, n, k, b, None);
            // FP8 also as W8A8 (FP8 activations quantized per row; the FP8 MMA from sm_89).
            for (act, rows, w8a8) in [ActDtype::F32, ActDtype::Bf16]
                .into_iter()
                .flat_map(|a| [1, 5, 8, 20].map(|r| (a, r)))
                .flat_map(|(a, r)| [(a, r, false), (a, r, true)])
                .filter(|&(_, _, q)| !q || format == WeightFormat::Fp8)
            {
                let shape = LinearShape {
                    format,
                    n,
                    k,
                    bias,
                    accumulate,
                    act,
                    w8a8,
                };
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| (i * 104729 % 997) as f32 / 997.0 - 0.5)
                    .collect();
                let y0: Vec<f32> = (0..rows * n).map(|i| (i % 3) as f32).collect();
                let got = dev.run_linear(shape, &packed, &x, rows, &y0).unwrap();
                let want = reference_linear(&packed, &shape, &x, rows, &y0);
                // 16 bits: one ulp more (another summation order may round to the neighbour).
                let tol = 1e-4 + if act == ActDtype::F32 { 0.0 } else { act.ulp() };
                close(
                    &format!("{format} {n}x{k} rows {rows} ({act}, w8a8 {w8a8})"),
                    &got,
                    &want,
                    tol,
                );
            }
        }
    }
}

/// Prefill logits (GEMM path for > 8 prompt tokens) within 1e-3 of the largest logit, then
/// identical greedy tokens with decode steps.
fn compare_plans(model_path: &std::path::Path, prompt_text: Option<&str>, n: usize) {
    common::compare_with_cpu(model_path, prompt_text, n, 1e-3, |plan| {
        Box::new(CudaBackend::new(plan, 0, None).unwrap())
    });
}

#[test]
fn gpu_whole_plan_matches_the_cpu_backend() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let path = dir.path().join(format!("tiny-{arch:?}.gguf"));
        write_gguf(&path, &tiny_spec(arch), 11, GgmlDType::F32).unwrap();
        compare_plans(&path, None, 12);
    }
    if smollm2().exists() {
        compare_plans(
            &smollm2(),
            Some("The sea was calm and the ship sailed on towards the"),
            16,
        );
    } else {
        eprintln!("skipped the SmolLM2 part: data/ is missing");
    }
}
