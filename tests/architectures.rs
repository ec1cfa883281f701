//! The architectures fpx reads, each as a Hugging Face directory and (where llama.cpp has the
//! architecture) as GGUF, on synthetic checkpoints: `fpx inspect` lists their norms (Qwen3's
//! per-head q/k norms), RoPE scaling, attention windows and end-of-sequence ids; a Llama with
//! llama3 RoPE scaling written as GGUF (a `rope_freqs` tensor, as llama.cpp does) and a Qwen3
//! GGUF (q/k norm tensors) give the logits of their Hugging Face form; a sliding window
//! changes the logits of positions past it only; GGUF RoPE factors of the wrong length are
//! refused by name.

mod common;

use fpx::ir::Graph;
use fpx::lower::PrecisionMap;
use fpx::model::rope::RopeScaling;
use fpx::model::synthetic::{tiny_spec, write_gguf, write_hf_checkpoint, GgmlDType, HfDtype};
use fpx::model::{load_model, Architecture, EosIds, ModelSpec, SlidingWindow};
use fpx::runtime::cpu::CpuModel;
use serde_json::Value;

fn llama3() -> ModelSpec {
    ModelSpec {
        rope_scaling: RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        },
        eos_token_id: EosIds::new([0, 1]),
        ..tiny_spec(Architecture::Llama)
    }
}

fn logits(path: &std::path::Path, tokens: &[u32]) -> (Vec<f32>, ModelSpec) {
    let model = load_model(path).unwrap();
    let graph = Graph::build(&model.spec);
    let cpu = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new()).unwrap();
    (cpu.forward(tokens).unwrap().data, model.spec)
}

fn tokens(n: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 37 + 11) % 300).collect()
}

#[test]
fn gguf_forms_give_the_hf_logits() {
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("llama3", llama3()),
        ("qwen3", tiny_spec(Architecture::Qwen3)),
        (
            "linear",
            ModelSpec {
                rope_scaling: RopeScaling::Linear { factor: 2.0 },
                ..tiny_spec(Architecture::Llama)
            },
        ),
    ] {
        let (hf, gguf) = (
            dir.path().join(name),
            dir.path().join(format!("{name}.gguf")),
        );
        write_hf_checkpoint(&hf, &spec, 3, HfDtype::F32, 1).unwrap();
        write_gguf(&gguf, &spec, 3, GgmlDType::F32).unwrap();
        let t = tokens(100);
        let (want, hf_spec) = logits(&hf, &t);
        let (got, gguf_spec) = logits(&gguf, &t);
        assert_eq!(hf_spec, spec);
        assert_eq!(
            gguf_spec.eos_token_id, spec.eos_token_id,
            "{name}: eos and eot"
        );
        match (&spec.rope_scaling, &gguf_spec.rope_scaling) {
            (s @ RopeScaling::Llama3 { .. }, RopeScaling::Factors { factors }) => {
                let expected = s.llama_cpp_factors(spec.rope_theta, spec.head_dim).unwrap();
                assert_eq!(factors, &expected, "{name}");
            }
            (a, b) => assert_eq!(a, b, "{name}"),
        }
        let err = common::rel_err(&got, &want);
        eprintln!("{name}: GGUF vs Hugging Face logits, relative error {err:.2e}");
        assert!(err < 1e-5, "{name}: {err}");
    }
}

#[test]
fn a_window_changes_only_the_positions_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny_spec(Architecture::Mistral);
    let windowed = ModelSpec {
        sliding_window: Some(SlidingWindow {
            size: 10,
            layers: vec![0, 1],
        }),
        ..full.clone()
    };
    let t = tokens(24);
    let mut out = Vec::new();
    for (name, spec) in [("full", &full), ("windowed", &windowed)] {
        let path = dir.path().join(name);
        write_hf_checkpoint(&path, spec, 4, HfDtype::F32, 1).unwrap();
        out.push(logits(&path, &t).0);
    }
    let vocab = full.vocab_size;
    let (a, b) = (&out[0], &out[1]);
    // Positions 0..=9 see at most 10 keys: identical; later ones lose keys and differ.
    assert_eq!(a[..10 * vocab], b[..10 * vocab]);
    for p in 10..24 {
        let row = p * vocab..(p + 1) * vocab;
        assert!(
            common::rel_err(&b[row.clone()], &a[row]) > 1e-4,
            "position {p}"
        );
    }
}

#[test]
fn inspect_lists_norms_windows_rope_and_eos_ids() {
    let dir = tempfile::tempdir().unwrap();
    let qwen3 = dir.path().join("qwen3.gguf");
    write_gguf(&qwen3, &tiny_spec(Architecture::Qwen3), 1, GgmlDType::F32).unwrap();
    let llama = dir.path().join("llama3.gguf");
    write_gguf(&llama, &llama3(), 1, GgmlDType::F32).unwrap();
    let mistral = dir.path().join("mistral");
    let windowed = ModelSpec {
        sliding_window: Some(SlidingWindow {
            size: 6,
            layers: vec![0, 1],
        }),
        ..tiny_spec(Architecture::Mistral)
    };
    write_hf_checkpoint(&mistral, &windowed, 1, HfDtype::BF16, 1).unwrap();
    let inspect = |path: &std::path::Path, json: bool| {
        let mut args = vec!["inspect", path.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let (code, stdout, stderr) = common::fpx(&args);
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    let text = inspect(&qwen3, false);
    for want in [
        "(Qwen3)",
        "model.layers.N.self_attn.q_norm",
        "model.layers.N.self_attn.k_norm",
        "model.layers.N.input_layernorm",
        "model.norm",
        "attention full causal on every layer",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    let json: Value = serde_json::from_str(&inspect(&qwen3, true)).unwrap();
    let norms = json["norms"].as_array().unwrap();
    let q = norms
        .iter()
        .find(|n| n["name"] == "model.layers.N.self_attn.q_norm")
        .unwrap();
    assert_eq!(
        (&q["dim"], &q["per_head"], &q["count"]),
        (&16.into(), &true.into(), &2.into())
    );
    assert_eq!(norms.len(), 5, "{norms:?}");
    let text = inspect(&llama, false);
    assert!(
        text.contains("factors (GGUF rope_freqs, 8 values)"),
        "{text}"
    );
    assert!(text.contains("eos [0, 1]"), "{text}");
    let text = inspect(&mistral, false);
    assert!(
        text.contains("sliding window of 6 positions on every layer"),
        "{text}"
    );
    let json: Value = serde_json::from_str(&inspect(&mistral, true)).unwrap();
    assert_eq!(json["spec"]["sliding_window"]["size"], 6);
}

#[test]
fn gguf_rope_factors_of_the_wrong_length_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let spec = ModelSpec {
        rope_scaling: RopeScaling::Factors {
            factors: vec![1.0; 5],
        },
        ..tiny_spec(Architecture::Llama)
    };
    write_gguf(&path, &spec, 1, GgmlDType::F32).unwrap();
    let err = load_model(&path).unwrap_err().to_string();
    assert!(
        err.contains("5 RoPE frequency factors") && err.contains("m.gguf"),
        "{err}"
    );
    let spec = ModelSpec {
        rope_scaling: RopeScaling::Factors {
            factors: vec![-1.0; 8],
        },
        ..tiny_spec(Architecture::Llama)
    };
    write_gguf(&path, &spec, 1, GgmlDType::F32).unwrap();
    let err = load_model(&path).unwrap_err().to_string();
    assert!(
        err.contains("rope_freqs.weight") && err.contains("positive"),
        "{err}"
    );
}

/// The whole command line on a Qwen3 with q/k norms and a window shorter than the sequence:
/// calibrate, plan (greedy, half the layers in FP4), run the plan on the cpu backend and, with
/// the emulator's toolchain, on emu: the same greedy tokens.
#[test]
fn qwen3_windowed_calibrates_plans_and_runs_on_cpu_and_emu() {
    let text = common::moby_dick();
    if !common::have("the Moby Dick text", text.is_file()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("qwen3");
    write_hf_checkpoint(&model, &common::tiny_qwen3_windowed(), 2, HfDtype::BF16, 1).unwrap();
    let (calib, plan) = (dir.path().join("c.json"), dir.path().join("p.json"));
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let (code, stdout, stderr) = common::fpx(args);
        assert_eq!(code, 0, "fpx {args:?}: {stderr}");
        stdout
    };
    let (m, t, c, p) = (path(&model), path(&text), path(&calib), path(&plan));
    run(&[
        "calibrate",
        "--model",
        &m,
        "--text",
        &t,
        "-o",
        &c,
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--kl-windows",
        "0",
    ]);
    run(&[
        "plan", "--calib", &c, "--solver", "greedy", "--gamma", "0.5", "--device", "h100", "-o", &p,
    ]);
    let tokens = |backend: &str| {
        let out = run(&[
            "run",
            "--model",
            &m,
            "--plan",
            &p,
            "--prompt",
            "The whale and the sea, the sea",
            "--max-tokens",
            "8",
            "--backend",
            backend,
            "--json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["tokens"].clone()
    };
    let cpu = tokens("cpu");
    // Eight tokens, or fewer when one is the end-of-sequence id.
    assert!(!cpu.as_array().unwrap().is_empty(), "{cpu}");
    let emu_ok = fpx::runtime::emu::Toolchain::find().is_ok();
    if common::have("g++ and the CUDA header wheels (.venv)", emu_ok) {
        assert_eq!(tokens("emu"), cpu);
    }
}
