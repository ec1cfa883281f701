//! fpx against transformers itself on checkpoints transformers builds: tiny random Llama models
//! with llama3 and linear RoPE scaling (`AutoModelForCausalLM.from_config`, FP32, saved with
//! `save_pretrained` by `scripts/hf_tiny.py`); fpx's CPU reference logits on the same tokens
//! equal transformers' within 1e-4 of the largest logit, greedy tokens agree (CPU reference and
//! the schedule's cpu backend, which reads the RoPE tables the kernels get), and the scaling is
//! shown to matter (transformers' logits without it differ). A Mistral checkpoint with a
//! sliding window shorter than its context is refused, naming `sliding_window`. Needs .venv-ct
//! (`make ct-tools`, FPX_CT_PYTHON); skipped with a reason without it unless FPX_REQUIRE_DATA=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use fpx::ir::Graph;
use fpx::lower::PrecisionMap;
use fpx::model::rope::RopeScaling;
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::{load_model, Architecture};
use fpx::runtime::cpu::CpuModel;
use fpx::runtime::exec::{generate, CpuBackend, ExecutablePlan};
use serde_json::{json, Value};

const NEW_TOKENS: usize = 8;

fn ct_python() -> Option<PathBuf> {
    let p = std::env::var_os("FPX_CT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo().join(".venv-ct/bin/python"));
    p.exists().then_some(p)
}

/// [`common::tiny_llama_config`] with untied embeddings and weights drawn with std 0.2, so that
/// the logits are not all near zero.
fn tiny_llama() -> Value {
    let mut v = common::tiny_llama_config();
    v["initializer_range"] = json!(0.2);
    v["tie_word_embeddings"] = json!(false);
    v
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 300).collect()
}

/// transformers builds, saves and runs the model of `config` into `dir/model` (with the
/// synthetic tokenizer.json fpx needs beside it); returns the script's JSON.
fn transformers_model(py: &Path, dir: &Path, config: &Value, tokens: &[u32]) -> Value {
    let (config_path, tokens_path) = (dir.join("config.in.json"), dir.join("tokens.json"));
    std::fs::write(&config_path, config.to_string()).unwrap();
    std::fs::write(&tokens_path, serde_json::to_vec(tokens).unwrap()).unwrap();
    let model = dir.join("model");
    let out = Command::new(py)
        .arg(common::repo().join("scripts/hf_tiny.py"))
        .args(["--config".as_ref(), config_path.as_os_str()])
        .args(["--out".as_ref(), model.as_os_str()])
        .args(["--tokens".as_ref(), tokens_path.as_os_str()])
        .args(["--new", &NEW_TOKENS.to_string()])
        .output()
        .expect("runs python");
    assert!(
        out.status.success(),
        "hf_tiny.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = dir.join("tok");
    write_hf_checkpoint(&tok, &tiny_spec(Architecture::Llama), 1, HfDtype::F32, 1).unwrap();
    std::fs::copy(tok.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    serde_json::from_slice(&out.stdout).expect("hf_tiny.py prints JSON")
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// fpx's logits of `tokens` and `NEW_TOKENS` greedy tokens, from the CPU reference; the cpu
/// backend of the schedule must decode the same greedy tokens.
fn fpx_run(model_dir: &Path, tokens: &[u32]) -> (Vec<f32>, Vec<u32>, RopeScaling) {
    let model = load_model(model_dir).unwrap();
    let graph = Graph::build(&model.spec);
    let cpu = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new()).unwrap();
    let logits = cpu.forward(tokens).unwrap().data;
    let mut seq = tokens.to_vec();
    let mut greedy = Vec::new();
    for _ in 0..NEW_TOKENS {
        let l = cpu.forward(&seq).unwrap();
        let next = argmax(&l.data[(l.rows - 1) * l.cols..]);
        greedy.push(next);
        seq.push(next);
    }
    let plan = ExecutablePlan::build(
        &graph,
        model.weights.as_ref(),
        &PrecisionMap::new(),
        tokens.len() + NEW_TOKENS,
        fpx::lower::ActDtype::F32,
    )
    .unwrap();
    let backend = generate(&mut CpuBackend::new(&plan), tokens, NEW_TOKENS, &[]).unwrap();
    assert_eq!(backend.tokens, greedy, "cpu backend vs CPU reference");
    (logits, greedy, model.spec.rope_scaling)
}

fn check(py: &Path, config: Value, n: usize, want_scaling: RopeScaling) {
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(n);
    let hf = transformers_model(py, dir.path(), &config, &toks);
    let hf_logits: Vec<f32> = hf["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let hf_greedy: Vec<u32> = serde_json::from_value(hf["greedy"].clone()).unwrap();
    let unscaled = hf["unscaled"].as_f64().unwrap();
    let model_dir = dir.path().join("model");
    let (logits, greedy, scaling) = fpx_run(&model_dir, &toks);
    assert_eq!(scaling, want_scaling, "rope scaling fpx read");
    let err = common::rel_err(&logits, &hf_logits);
    eprintln!(
        "{}: {n} tokens, fpx vs transformers relative error {err:.2e}; transformers without \
         the scaling differs by {unscaled:.2e}",
        want_scaling.rope_type()
    );
    assert!(err < 1e-4, "logits: relative error {err}");
    assert_eq!(greedy, hf_greedy, "greedy tokens");
    // The test can fail: without the scaling transformers' own logits move by far more than
    // the tolerance.
    assert!(
        unscaled > 1e-2,
        "scaling changed transformers' logits by only {unscaled}"
    );

    // The same checkpoint in transformers 4's spelling (`rope_scaling` + top-level
    // `rope_theta`) gives fpx the same model.
    let path = model_dir.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut params = c
        .as_object_mut()
        .unwrap()
        .remove("rope_parameters")
        .unwrap();
    c["rope_theta"] = params
        .as_object_mut()
        .unwrap()
        .remove("rope_theta")
        .unwrap();
    c["rope_scaling"] = params;
    std::fs::write(&path, c.to_string()).unwrap();
    let (again, _, scaling) = fpx_run(&model_dir, &toks);
    assert_eq!(scaling, want_scaling);
    assert_eq!(again, logits, "rope_scaling and rope_parameters spellings");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = tiny_llama();
    // original_max_position_embeddings 64: with head_dim 16 and theta 1e4 the wavelengths
    // 6.3, 20, 63, 199, ... fall in all three bands (kept below 16, blended up to 64, divided
    // above); 96 tokens run past the original context.
    config["rope_scaling"] = json!({
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64
    });
    // Llama 3 lists several end-of-sequence ids.
    config["eos_token_id"] = json!([0, 1]);
    let want = RopeScaling::Llama3 {
        factor: 4.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    check(&py, config, 96, want);
}

#[test]
fn linear_rope_scaling_and_explicit_head_dim_match_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = tiny_llama();
    config["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    // head_dim 32 with 4 heads: q is 128 wide against a hidden size of 64.
    config["head_dim"] = json!(32);
    config["tie_word_embeddings"] = json!(true);
    check(&py, config, 64, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn mistral_with_a_short_sliding_window_is_refused() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_llama();
    config["architectures"] = json!(["MistralForCausalLM"]);
    config["model_type"] = json!("mistral");
    config["sliding_window"] = json!(16);
    transformers_model(&py, dir.path(), &config, &tokens(4));
    let err = load_model(&dir.path().join("model"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sliding_window = 16") && err.contains("max_position_embeddings = 256"),
        "{err}"
    );
    // The same checkpoint with the window covering the context loads.
    let path = dir.path().join("model/config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    c["sliding_window"] = json!(256);
    std::fs::write(&path, c.to_string()).unwrap();
    load_model(&dir.path().join("model")).unwrap();
}
