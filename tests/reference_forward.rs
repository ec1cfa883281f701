//! The CPU forward checked against an independent implementation: `scripts/reference_ppl.py`
//! (numpy, weights read by the `gguf` Python package) computes the perplexity of the same
//! token ids; fpx must agree to float32 rounding.

mod common;

use common::*;
use fpx::eval;
use fpx::ir::Graph;
use fpx::lower::PrecisionMap;
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::{load_model, Architecture};
use fpx::runtime::cpu::CpuModel;

fn assert_close(what: &str, ours: f64, reference: f64) {
    let rel = (ours - reference).abs() / reference;
    assert!(
        rel < 1e-4,
        "{what}: fpx {ours} vs reference {reference} (relative difference {rel:e})"
    );
}

#[test]
fn tiny_random_model_matches_numpy_reference() {
    let Some(python) = python() else {
        have("the Python reference tools (.venv)", false);
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = tiny_spec(Architecture::Llama);
    write_gguf(&path, &spec, 7, GgmlDType::F32).unwrap();
    let model = load_model(&path).unwrap();
    let tokens: Vec<u32> = (0..96u32)
        .map(|i| (i * 37 + 11) % spec.vocab_size as u32)
        .collect();
    let tokens_path = dir.path().join("tokens.json");
    std::fs::write(&tokens_path, serde_json::to_vec(&tokens).unwrap()).unwrap();
    let windows = eval::windows(&tokens, 32, None).unwrap();
    let graph = Graph::build(&model.spec);
    let cpu = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new()).unwrap();
    let ours = eval::evaluate(&cpu, None, &windows, &mut || {}).unwrap();
    let reference = reference_perplexity(&python, &path, &tokens_path, 32, 3);
    assert_eq!(reference["tokens"].as_u64().unwrap() as usize, ours.tokens);
    assert_close(
        "perplexity",
        ours.perplexity,
        reference["perplexity"].as_f64().unwrap(),
    );
}

#[test]
fn smollm2_eval_on_moby_dick_matches_numpy_reference() {
    if !have(
        "SmolLM2 and Moby Dick (data/)",
        smollm2().exists() && moby_dick().exists(),
    ) {
        return;
    }
    let Some(python) = python() else {
        have("the Python reference tools (.venv)", false);
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens_path = dir.path().join("tokens.json");
    let (code, stdout, stderr) = fpx(&[
        "eval",
        "--model",
        smollm2().to_str().unwrap(),
        "--text",
        moby_dick().to_str().unwrap(),
        "--seq-len",
        "128",
        "--windows",
        "2",
        "--json",
        "--save-tokens",
        tokens_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "fpx eval failed: {stderr}");
    let ours: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(ours["tokens"], 254);
    // The first tokens of Moby Dick as the Hugging Face `tokenizers` library splits them with
    // SmolLM2's tokenizer (digits split, byte-level BPE).
    let tokens: Vec<u32> = serde_json::from_slice(&std::fs::read(&tokens_path).unwrap()).unwrap();
    assert_eq!(
        &tokens[..20],
        &[
            5229, 41958, 216, 33, 30, 450, 6364, 616, 30, 198, 198, 12800, 549, 46588, 30, 2015,
            929, 3156, 1265, 15661
        ]
    );
    let reference = reference_perplexity(&python, &smollm2(), &tokens_path, 128, 2);
    assert_close(
        "perplexity",
        ours["perplexity"].as_f64().unwrap(),
        reference["perplexity"].as_f64().unwrap(),
    );
}
