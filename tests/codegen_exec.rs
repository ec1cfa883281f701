//! Executable plans on the cpu backend: weights packed in their formats' byte layouts, the
//! schedule's steps with a KV cache, greedy decoding. Their tokens must equal the greedy tokens
//! of the CPU reference forward (`CpuModel`, fake-quantized FP32 weights, whole window
//! recomputed per token) with the same formats: on tiny random models in every format, and on
//! SmolLM2 with a mixed FP8/FP4 plan.

mod common;

use common::{fpx, have, smollm2};
use fpx::formats::Format;
use fpx::ir::Graph;
use fpx::lower::{ActDtype, LinearPrecision, PrecisionMap};
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::{load_model, Architecture, Model};
use fpx::runtime::cpu::CpuModel;
use fpx::runtime::exec::{generate, greedy_reference, CpuBackend, ExecutablePlan};

fn uniform(graph: &Graph, format: Option<Format>) -> PrecisionMap {
    let mut map = PrecisionMap::new();
    if let Some(f) = format {
        for (id, _) in graph.block_linears() {
            map.insert(graph.node(id).name.clone(), LinearPrecision::weight_only(f));
        }
    }
    map
}

/// Greedy tokens of the executable plan (cpu backend) and of the reference forward.
fn both(model: &Model, map: &PrecisionMap, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<u32>) {
    let graph = Graph::build(&model.spec);
    let plan = ExecutablePlan::build(
        &graph,
        model.weights.as_ref(),
        map,
        prompt.len() + n,
        ActDtype::F32,
    )
    .unwrap();
    let mut backend = CpuBackend::new(&plan);
    let ours = generate(&mut backend, prompt, n, &[]).unwrap();
    assert_eq!(ours.step_seconds.len(), n - 1);
    let reference = CpuModel::load(&graph, model.weights.as_ref(), map).unwrap();
    (
        ours.tokens,
        greedy_reference(&reference, prompt, n).unwrap(),
    )
}

#[test]
fn tiny_models_match_the_reference_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let path = dir.path().join(format!("tiny-{arch:?}.gguf"));
        let spec = tiny_spec(arch);
        write_gguf(&path, &spec, 11, GgmlDType::F32).unwrap();
        let model = load_model(&path).unwrap();
        let graph = Graph::build(&model.spec);
        // 9 prompt tokens: the prefill takes the GEMM path (> 8 rows) in the kernels.
        let prompt: Vec<u32> = (0..9u32).map(|i| (i * 31 + 7) % 300).collect();
        let mut maps = vec![common::mixed_precision(&graph)];
        maps.extend(
            [
                None,
                Some(Format::Fp16),
                Some(Format::Fp8),
                Some(Format::Nvfp4),
                Some(Format::Mxfp4),
            ]
            .map(|f| uniform(&graph, f)),
        );
        for map in &maps {
            let (ours, reference) = both(&model, map, &prompt, 12);
            assert_eq!(ours, reference, "{arch:?}, plan {map:?}");
        }
    }
}

#[test]
fn decode_steps_continue_the_prefill_exactly() {
    // Prefilling the prompt plus the first generated token in one pass must give the same
    // next token as prefill + one decode step (the KV cache holds what the prefill computed).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Llama), 5, GgmlDType::F32).unwrap();
    let model = load_model(&path).unwrap();
    let graph = Graph::build(&model.spec);
    let map = common::mixed_precision(&graph);
    let plan =
        ExecutablePlan::build(&graph, model.weights.as_ref(), &map, 32, ActDtype::F32).unwrap();
    let prompt = [3u32, 141, 59, 26, 5];
    let mut a = CpuBackend::new(&plan);
    let g = generate(&mut a, &prompt, 3, &[]).unwrap();
    let mut window = prompt.to_vec();
    window.extend(&g.tokens[..2]);
    let mut b = CpuBackend::new(&plan);
    use fpx::runtime::exec::Backend;
    assert_eq!(b.forward(&window, 0).unwrap(), g.tokens[2]);
    // Positions past the KV cache and unknown token ids are errors, not panics.
    assert!(b.forward(&[1], 32).is_err());
    assert!(b.forward(&[300], 7).is_err());
}

#[test]
fn smollm2_mixed_plan_matches_the_reference() {
    if !have("SmolLM2 (data/)", smollm2().exists()) {
        return;
    }
    let model = load_model(&smollm2()).unwrap();
    let graph = Graph::build(&model.spec);
    let prompt = model
        .tokenizer
        .encode("The sea was calm and the ship")
        .unwrap();
    let (ours, reference) = both(&model, &common::mixed_precision(&graph), &prompt, 8);
    assert_eq!(ours, reference);
}

#[test]
fn bench_command_reports_time_to_first_token_and_decode_percentiles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Llama), 3, GgmlDType::F32).unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "the cat sat on the mat and the dog ran. ".repeat(40)).unwrap();
    let (code, stdout, stderr) = fpx(&[
        "bench",
        "--model",
        path.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "16",
        "--windows",
        "3",
        "--decode-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // One time to first token per timed window (the warm-up excluded), 5 decode steps.
    assert_eq!(out["windows"], 3);
    assert_eq!(out["ttft_ms"]["count"], 3);
    let w: Vec<f64> = out["window_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() * 1e3)
        .collect();
    let max = w.iter().cloned().fold(0.0, f64::max);
    assert!((out["ttft_ms"]["max_ms"].as_f64().unwrap() - max).abs() < 1e-9);
    let d = &out["decode_ms"];
    assert_eq!(d["count"], 5);
    assert!(d["p50_ms"].as_f64().unwrap() <= d["p99_ms"].as_f64().unwrap());
    let (code, stdout, _) = fpx(&[
        "bench",
        "--model",
        path.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "16",
        "--windows",
        "2",
        "--decode-tokens",
        "0",
    ]);
    assert_eq!(code, 0);
    assert!(stdout.contains("time to first token"), "{stdout}");
    assert!(!stdout.contains("decode, per token"), "{stdout}");
}

#[test]
fn run_command_generates_text_on_the_cpu_and_refuses_cuda_without_a_driver() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Llama), 3, GgmlDType::F32).unwrap();
    let model = path.to_str().unwrap();
    let (code, stdout, stderr) = fpx(&[
        "run",
        "--model",
        model,
        "--prompt",
        "the cat",
        "--max-tokens",
        "5",
        "--repeat",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["backend"], "cpu");
    assert_eq!(out["tokens"].as_array().unwrap().len(), 5);
    assert!(out["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // Tail latency over 3 runs: one time to first token each, 4 decode steps each.
    assert_eq!(out["repeats"], 3);
    assert_eq!(out["ttft_ms"]["count"], 3);
    let d = &out["decode_ms"];
    assert_eq!(d["count"], 12);
    let ms = |k: &str| d[k].as_f64().unwrap();
    assert!(ms("p50_ms") > 0.0 && ms("p50_ms") <= ms("p95_ms"));
    assert!(ms("p95_ms") <= ms("p99_ms") && ms("p99_ms") <= ms("max_ms"));
    assert_eq!(out["median_token_ms"].as_f64(), Some(ms("p50_ms")));

    let has_driver = fpx::runtime::cuda::probe_driver().is_ok();
    let (code, _, stderr) = fpx(&[
        "run",
        "--model",
        model,
        "--prompt",
        "the cat",
        "--max-tokens",
        "2",
        "--backend",
        "cuda",
    ]);
    if has_driver {
        eprintln!("skipped the no-driver check: this machine has a CUDA driver");
    } else {
        assert_eq!(code, 1);
        assert!(stderr.contains("no CUDA driver"), "{stderr}");
    }
}
