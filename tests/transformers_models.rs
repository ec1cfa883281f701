//! fpx against transformers itself on checkpoints transformers builds
//! (`AutoModelForCausalLM.from_config`, FP32, random weights with the norm weights drawn
//! around 1, saved with `save_pretrained` by `scripts/hf_tiny.py`): tiny Llama models with
//! llama3, linear and yarn RoPE scaling, a Qwen3 (q/k norms, head_dim 32 against hidden 64 / 4 heads),
//! a Mistral whose sliding window (16) is shorter than the sequence, and a Qwen3 whose window
//! is on one layer of two. fpx's CPU reference logits on the same tokens equal transformers'
//! within 1e-4 of the largest logit, greedy tokens agree (CPU reference and the schedule's cpu
//! backend, which reads the RoPE tables the kernels get), and each feature is shown to matter
//! (transformers' logits without it differ by more than 1e-2). The llama3 checkpoint is also
//! written as GGUF by the `gguf` package's writer, as llama.cpp's converter does (a
//! `rope_freqs` tensor, `scripts/gguf_tiny.py`): fpx reads the factors, they agree with the
//! ones the config's llama3 parameters give, and the GGUF gives transformers' logits too.
//! Needs .venv-ct (`make ct-tools`, FPX_CT_PYTHON) and .venv (FPX_PYTHON); skipped with a
//! reason without them unless FPX_REQUIRE_DATA=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use fpx::ir::Graph;
use fpx::lower::PrecisionMap;
use fpx::model::rope::RopeScaling;
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::{load_model, Architecture, ModelSpec};
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

/// `tiny_llama` as another architecture.
fn as_arch(arch: &str, model_type: &str) -> Value {
    let mut v = tiny_llama();
    v["architectures"] = json!([arch]);
    v["model_type"] = json!(model_type);
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
fn fpx_run(model_path: &Path, tokens: &[u32]) -> (Vec<f32>, Vec<u32>, ModelSpec) {
    let model = load_model(model_path).unwrap();
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
    (logits, greedy, model.spec)
}

/// transformers' model of `config` on `n` tokens against fpx's; `feature` names the entry of
/// the script's `ablated` that must exceed 1e-2. Returns fpx's spec and the directory.
fn check(py: &Path, config: &Value, n: usize, feature: &str) -> (ModelSpec, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(n);
    let hf = transformers_model(py, dir.path(), config, &toks);
    let hf_greedy: Vec<u32> = serde_json::from_value(hf["greedy"].clone()).unwrap();
    let ablated = hf["ablated"][feature].as_f64().unwrap();
    let (logits, greedy, spec) = fpx_run(&dir.path().join("model"), &toks);
    let err = common::rel_err(&logits, &logits_of(&hf));
    eprintln!(
        "{feature}: {n} tokens, fpx vs transformers relative error {err:.2e}; transformers \
         without the feature differs by {ablated:.2e}"
    );
    assert!(err < 1e-4, "logits: relative error {err}");
    assert_eq!(greedy, hf_greedy, "greedy tokens");
    // The test can fail: without the feature transformers' own logits move by far more than
    // the tolerance.
    assert!(
        ablated > 1e-2,
        "{feature} changed transformers' logits by only {ablated}"
    );
    (spec, dir)
}

fn logits_of(hf: &Value) -> Vec<f32> {
    hf["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The checkpoint in `dir/model` with its config in transformers 4's spelling
/// (`rope_scaling` + top-level `rope_theta`) gives fpx the same model.
fn check_transformers4_spelling(dir: &Path, n: usize) {
    let model_dir = dir.join("model");
    let toks = tokens(n);
    let (logits, _, spec) = fpx_run(&model_dir, &toks);
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
    let (again, _, again_spec) = fpx_run(&model_dir, &toks);
    assert_eq!(again_spec.rope_scaling, spec.rope_scaling);
    assert_eq!(again, logits, "rope_scaling and rope_parameters spellings");
}

fn llama3_config() -> (Value, RopeScaling) {
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
    (config, want)
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let (config, want) = llama3_config();
    let (spec, dir) = check(&py, &config, 96, "rope_scaling");
    assert_eq!(spec.rope_scaling, want, "rope scaling fpx read");
    assert_eq!(spec.eos_token_id.ids(), &[0, 1]);
    check_transformers4_spelling(dir.path(), 96);
}

#[test]
fn yarn_rope_scaling_matches_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = tiny_llama();
    // head_dim 16, theta 1e4, original context 64: the correction range is pairs 0..3 of 8
    // (kept, ramped, interpolated all occur); the attention factor 0.1 ln 4 + 1 scales q.k.
    config["rope_scaling"] = json!({
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64
    });
    let (spec, _dir) = check(&py, &config, 96, "rope_scaling");
    assert!(
        matches!(spec.rope_scaling, RopeScaling::Yarn { factor: 4.0, .. }),
        "{:?}",
        spec.rope_scaling
    );
}

#[test]
fn dynamic_rope_scaling_is_the_default_rope_within_the_context() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = tiny_llama();
    config["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 4.0});
    let dir = tempfile::tempdir().unwrap();
    // 96 of the model's 256 positions: transformers' dynamic update never fires.
    let toks = tokens(96);
    let hf = transformers_model(&py, dir.path(), &config, &toks);
    let (logits, greedy, spec) = fpx_run(&dir.path().join("model"), &toks);
    assert_eq!(spec.rope_scaling, RopeScaling::Default);
    let err = common::rel_err(&logits, &logits_of(&hf));
    assert!(err < 1e-4, "logits: relative error {err}");
    let hf_greedy: Vec<u32> = serde_json::from_value(hf["greedy"].clone()).unwrap();
    assert_eq!(greedy, hf_greedy, "greedy tokens");
    let ablated = hf["ablated"]["rope_scaling"].as_f64().unwrap();
    assert_eq!(
        ablated, 0.0,
        "transformers' own dynamic RoPE within the context"
    );
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
    let (spec, dir) = check(&py, &config, 64, "rope_scaling");
    assert_eq!(spec.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    check_transformers4_spelling(dir.path(), 64);
}

#[test]
fn qwen3_qk_norms_and_explicit_head_dim_match_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = as_arch("Qwen3ForCausalLM", "qwen3");
    // head_dim 32 with 4 heads against a hidden size of 64 (Qwen3's default would be 128).
    config["head_dim"] = json!(32);
    config["rms_norm_eps"] = json!(1e-6);
    let (spec, _dir) = check(&py, &config, 48, "qk_norm");
    assert_eq!(spec.architecture, Architecture::Qwen3);
    assert!(spec.qk_norm() && !spec.attention_bias);
    assert_eq!(spec.head_dim, 32);
}

#[test]
fn mistral_sliding_window_shorter_than_the_sequence_matches_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = as_arch("MistralForCausalLM", "mistral");
    config["sliding_window"] = json!(16);
    let (spec, _dir) = check(&py, &config, 48, "sliding_window");
    let w = spec.sliding_window.expect("a window");
    assert_eq!((w.size, w.layers), (16, vec![0, 1]));
}

#[test]
fn qwen3_window_on_one_layer_matches_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = as_arch("Qwen3ForCausalLM", "qwen3");
    config["head_dim"] = json!(16);
    config["use_sliding_window"] = json!(true);
    config["sliding_window"] = json!(12);
    config["layer_types"] = json!(["full_attention", "sliding_attention"]);
    let (spec, _dir) = check(&py, &config, 40, "sliding_window");
    let w = spec.sliding_window.expect("a window");
    assert_eq!((w.size, w.layers), (12, vec![1]));
}

/// `DIR/model` written as `DIR/model.gguf` by `scripts/gguf_tiny.py` (the gguf package's
/// writer, as llama.cpp's converter does).
/// `ty`: `f32` or `q8_0` (every matrix).
fn as_gguf(gguf_py: &std::path::Path, dir: &std::path::Path, ty: &str) -> std::path::PathBuf {
    let gguf = dir.join(format!("model-{ty}.gguf"));
    let out = Command::new(gguf_py)
        .arg(common::repo().join("scripts/gguf_tiny.py"))
        .args(["--model".as_ref(), dir.join("model").as_os_str()])
        .args(["--out".as_ref(), gguf.as_os_str()])
        .args(["--type", ty])
        .output()
        .expect("runs python");
    assert!(
        out.status.success(),
        "gguf_tiny.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    gguf
}

#[test]
fn llama3_gguf_with_rope_freqs_gives_the_hf_logits() {
    let (Some(py), Some(gguf_py)) = (ct_python(), common::python()) else {
        common::have(".venv-ct (transformers) and .venv (gguf)", false);
        return;
    };
    let (config, want) = llama3_config();
    let n = 96;
    let (hf_spec, dir) = check(&py, &config, n, "rope_scaling");
    let gguf = as_gguf(&gguf_py, dir.path(), "f32");
    let toks = tokens(n);
    let (hf_logits, hf_greedy, _) = fpx_run(&dir.path().join("model"), &toks);
    let (logits, greedy, spec) = fpx_run(&gguf, &toks);
    // fpx read llama.cpp's factors, and they are the ones the llama3 parameters give.
    let RopeScaling::Factors { factors } = &spec.rope_scaling else {
        panic!("GGUF rope scaling {:?}", spec.rope_scaling)
    };
    let ours = want
        .llama_cpp_factors(hf_spec.rope_theta, hf_spec.head_dim)
        .unwrap();
    let factor_err = common::rel_err(factors, &ours);
    assert!(factor_err < 1e-6, "rope_freqs vs llama3: {factor_err}");
    assert!(
        factors.contains(&1.0) && factors.contains(&4.0),
        "{factors:?}"
    );
    assert_eq!(spec.eos_token_id.ids(), &[0, 1], "eos and eot");
    let err = common::rel_err(&logits, &hf_logits);
    eprintln!("llama3 GGUF (rope_freqs) vs the HF checkpoint in fpx: relative error {err:.2e}");
    assert!(err < 1e-5, "GGUF vs HF logits: {err}");
    assert_eq!(greedy, hf_greedy);
    // Without the factors the GGUF's logits move (the test has teeth on the GGUF side too).
    let plain = fpx::model::rope::Rope::plain(spec.rope_theta).inv_freq(spec.head_dim);
    let scaled = spec.rope().inv_freq(spec.head_dim);
    assert_ne!(plain, scaled);
}

/// [`tiny_llama`] as a mixture-of-experts architecture: 4 experts of 32, top-2.
fn tiny_moe(arch: &str, model_type: &str) -> Value {
    let mut config = as_arch(arch, model_type);
    config["num_local_experts"] = json!(4);
    config["num_experts_per_tok"] = json!(2);
    config
}

#[test]
fn qwen3_moe_router_experts_and_a_dense_layer_match_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let mut config = tiny_moe("Qwen3MoeForCausalLM", "qwen3_moe");
    config["head_dim"] = json!(16);
    config["moe_intermediate_size"] = json!(32);
    config["norm_topk_prob"] = json!(true);
    // Layer 0 keeps a dense MLP of intermediate_size; layer 1 routes.
    config["mlp_only_layers"] = json!([0]);
    let (spec, _dir) = check(&py, &config, 40, "top_k");
    let moe = spec.moe.expect("fpx read the experts");
    assert_eq!((moe.experts, moe.top_k, moe.expert_ffn), (4, 2, 32));
    assert_eq!(moe.dense_layers, vec![0]);
    let (_, _dir) = check(&py, &config, 40, "norm_topk_prob");
}

#[test]
fn mixtral_router_and_experts_match_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (transformers)", false);
        return;
    };
    let config = tiny_moe("MixtralForCausalLM", "mixtral");
    let (spec, _dir) = check(&py, &config, 40, "top_k");
    let moe = spec.moe.expect("fpx read the experts");
    assert_eq!((moe.experts, moe.top_k, moe.expert_ffn), (4, 2, 128));
    assert!(moe.norm_top_k);
}

#[test]
fn qwen3moe_and_mixtral_ggufs_give_the_hf_logits() {
    let (Some(py), Some(gguf_py)) = (ct_python(), common::python()) else {
        common::have(".venv-ct (transformers) and .venv (gguf)", false);
        return;
    };
    let mut qwen = tiny_moe("Qwen3MoeForCausalLM", "qwen3_moe");
    qwen["head_dim"] = json!(16);
    qwen["moe_intermediate_size"] = json!(32);
    qwen["norm_topk_prob"] = json!(true);
    // llama.cpp's qwen3moe has no dense blocks (its converter maps no ffn_gate for it).
    qwen["mlp_only_layers"] = json!([]);
    let mixtral = tiny_moe("MixtralForCausalLM", "mixtral");
    for (config, arch) in [
        (qwen, Architecture::Qwen3Moe),
        (mixtral, Architecture::Mixtral),
    ] {
        let n = 40;
        let (hf_spec, dir) = check(&py, &config, n, "top_k");
        let toks = tokens(n);
        let (hf_logits, hf_greedy, _) = fpx_run(&dir.path().join("model"), &toks);
        let (logits, greedy, spec) = fpx_run(&as_gguf(&gguf_py, dir.path(), "f32"), &toks);
        assert_eq!(spec.architecture, arch);
        assert_eq!(
            spec.moe, hf_spec.moe,
            "{arch:?}: experts, top-k, dense layers"
        );
        let err = common::rel_err(&logits, &hf_logits);
        eprintln!("{arch:?} GGUF (stacked experts) vs the HF checkpoint in fpx: {err:.2e}");
        assert!(err < 1e-5, "{arch:?}: GGUF vs HF logits: {err}");
        assert_eq!(greedy, hf_greedy);
        // Q8_0 stacks: each expert is its own run of blocks inside the stack.
        let q8 = load_model(&as_gguf(&gguf_py, dir.path(), "q8_0")).unwrap();
        let hf = load_model(&dir.path().join("model")).unwrap();
        let names = fpx::model::moe::MoeNames::of(arch).unwrap();
        for e in 0..4 {
            for proj in names.expert(1, e) {
                let t = format!("{proj}.weight");
                let (got, want) = (
                    q8.weights.tensor(&t).unwrap(),
                    hf.weights.tensor(&t).unwrap(),
                );
                assert_eq!(got.shape, want.shape, "{t}");
                let err = common::rel_err(&got.data, &want.data);
                assert!(err < 1e-2, "{arch:?} {t}: Q8_0 expert vs HF: {err}");
            }
        }
    }
}
