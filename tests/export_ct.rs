//! `fpx export` checked with the engines' own format library: compressed-tensors decompresses
//! fpx's export to fpx's dequantized weights and its quantizer gives fpx's bytes (tensor by
//! tensor, per format); transformers loads the directory on the CPU with the same perplexity
//! as `fpx eval --plan`; fpx reads the export back with the same perplexity. Needs .venv-ct
//! (`make ct-tools`, FPX_CT_PYTHON); skipped with a reason without it unless
//! FPX_REQUIRE_DATA=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use fpx::formats::{set_mx_scale_rule, Format};
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::{load_model, Architecture};
use fpx::plan::Plan;
use serde_json::Value;

/// Every layer of a block in one of the three formats; block 0's down_proj left in 16 bits.
const PINS: &str = r#"
[[pin]]
layers = "0-99"
kinds = ["q", "k", "v"]
format = "nvfp4"
[[pin]]
layers = "0-99"
kinds = ["gate", "up"]
format = "mxfp4"
[[pin]]
layers = "0-99"
kinds = ["o"]
format = "fp8"
[[pin]]
layers = "1-99"
kinds = ["down"]
format = "fp8"
[[pin]]
layers = "0"
kinds = ["down"]
format = "fp16"
"#;

/// For MoE models, whose experts of a block share one format (vLLM's fused MoE layer): every
/// MLP in MXFP4, q/k/v in NVFP4, o in FP8 but block 0's in 16 bits.
const MOE_PINS: &str = r#"
[[pin]]
layers = "0-99"
kinds = ["q", "k", "v"]
format = "nvfp4"
[[pin]]
layers = "0-99"
kinds = ["gate", "up", "down"]
format = "mxfp4"
[[pin]]
layers = "1-99"
kinds = ["o"]
format = "fp8"
[[pin]]
layers = "0"
kinds = ["o"]
format = "fp16"
"#;

fn ct_python() -> Option<PathBuf> {
    let p = std::env::var_os("FPX_CT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo().join(".venv-ct/bin/python"));
    p.exists().then_some(p)
}

fn fpx(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fpx"))
        .args(args)
        .output()
        .expect("runs fpx");
    assert!(
        out.status.success(),
        "fpx {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn python(py: &Path, args: &[&str]) -> Value {
    let out = Command::new(py)
        .arg(common::repo().join("scripts/ct_check.py"))
        .args(args)
        .env("FPX_THREADS", "2")
        .output()
        .expect("runs python");
    assert!(
        out.status.success(),
        "ct_check.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))
}

/// Calibrate briefly, then plan with the pins for vLLM: the plan every check below exports.
fn mixed_plan(model: &Path, text: &Path, dir: &Path, pins_toml: &str) -> PathBuf {
    let calib = dir.join("calib.json");
    let pins = dir.join("pins.toml");
    std::fs::write(&pins, pins_toml).unwrap();
    let (m, t, c, p) = (
        model.to_str().unwrap(),
        text.to_str().unwrap(),
        calib.to_str().unwrap(),
        pins.to_str().unwrap(),
    );
    fpx(&[
        "calibrate",
        "--model",
        m,
        "--text",
        t,
        "--seq-len",
        "32",
        "--windows",
        "1",
        "--kl-windows",
        "0",
        "-o",
        c,
        "--json",
    ]);
    let plan = dir.join("mixed.plan.json");
    fpx(&[
        "plan",
        "--calib",
        c,
        "--device",
        "h100",
        "--solver",
        "greedy",
        "--gamma",
        "0.5",
        "--target",
        "vllm",
        "--menu",
        "fp16,fp8,nvfp4,mxfp4",
        "--pins",
        p,
        "-o",
        plan.to_str().unwrap(),
        "--json",
    ]);
    plan
}

/// Writes `L.source` (FP32 weight) and `L.fpx` (fpx's dequantized bytes) for the plan's
/// quantized layers in `blocks` (None: all).
fn write_weights(model: &Path, plan: &Plan, blocks: Option<&[usize]>, out: &Path) {
    let m = load_model(model).unwrap();
    set_mx_scale_rule(plan.mx_scale_rule());
    // NVFP4 members of a fused q/k/v or gate/up share its tensor scale (lower::fused).
    let graph = fpx::ir::Graph::build(&m.spec);
    let formats: std::collections::HashMap<&str, Format> = plan
        .layers
        .iter()
        .map(|l| (l.name.as_str(), l.format))
        .collect();
    let shared = fpx::lower::fused::nvfp4_tensor_amax(&graph, m.weights.as_ref(), &|n| {
        formats.get(n).copied()
    })
    .unwrap();
    let mut tensors = Vec::new();
    for l in &plan.layers {
        let block: Option<usize> = l.name.split('.').nth(2).and_then(|b| b.parse().ok());
        if l.format == Format::Fp16
            || blocks.is_some_and(|bs| !block.is_some_and(|b| bs.contains(&b)))
        {
            continue;
        }
        let w = m.weights.tensor(&format!("{}.weight", l.name)).unwrap();
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let amax = shared.get(&l.name).copied();
        let deq = l
            .format
            .quantize_against(&w.data, rows, cols, amax)
            .dequantize();
        for (suffix, data) in [("source", w.data), ("fpx", deq)] {
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{}.{suffix}", l.name), vec![rows, cols], bytes));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, out).unwrap();
}

/// The pins of a check and the linear they leave in 16 bits.
struct Pins {
    toml: &'static str,
    ignored: &'static str,
}

const DENSE: Pins = Pins {
    toml: PINS,
    ignored: "model.layers.0.mlp.down_proj",
};
const MOE: Pins = Pins {
    toml: MOE_PINS,
    ignored: "model.layers.0.self_attn.o_proj",
};

/// The whole check for one model: export, compressed-tensors' decompression and quantizer,
/// transformers' perplexity, fpx's read-back perplexity.
fn check_model(
    py: &Path,
    model: &Path,
    text: &Path,
    seq_len: usize,
    blocks: Option<&[usize]>,
    pins: &Pins,
) {
    let dir = tempfile::tempdir().unwrap();
    let plan_path = mixed_plan(model, text, dir.path(), pins.toml);
    let plan = Plan::read(&plan_path).unwrap();
    let out = dir.path().join("export");
    let (m, t, p, o) = (
        model.to_str().unwrap(),
        text.to_str().unwrap(),
        plan_path.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let report = json(&fpx(&[
        "export", "--model", m, "--plan", p, "-o", o, "--dtype", "fp32", "--json",
    ]));
    assert_eq!(report["mx_scale_rule"], "round");
    let ignored = report["ignored"].as_array().unwrap();
    assert!(ignored.iter().any(|v| v == pins.ignored), "{report}");
    // Mixtral: vLLM looks its experts' scheme up as experts.0.gate_proj etc. (aliases).
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    if config["model_type"] == "mixtral" {
        let groups = config["quantization_config"]["config_groups"]
            .as_object()
            .unwrap();
        let alias = "model.layers.0.block_sparse_moe.experts.0.gate_proj";
        let owner = groups
            .values()
            .find(|g| g["targets"].as_array().unwrap().iter().any(|t| t == alias))
            .expect("the alias is a target");
        assert!(
            owner["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "model.layers.0.block_sparse_moe.experts.3.w2"),
            "the alias joins the experts' own group"
        );
    }
    // MoE routers stay in the export dtype, named in `ignore`.
    let graph = fpx::ir::Graph::build(&load_model(model).unwrap().spec);
    for id in graph.routers() {
        let router = &graph.node(id).name;
        assert!(ignored.iter().any(|v| v == router), "{router}: {report}");
    }

    // Tensor by tensor: decompression and quantizer, per format.
    let weights = dir.path().join("weights.safetensors");
    write_weights(model, &plan, blocks, &weights);
    let cmp = python(
        py,
        &[
            "compare",
            "--export",
            o,
            "--weights",
            weights.to_str().unwrap(),
        ],
    );
    assert_eq!(
        cmp["fused_nvfp4_global_scales_differ"],
        serde_json::json!([]),
        "vLLM keeps one global scale per fused NVFP4 matrix"
    );
    let layers = cmp["layers"].as_array().unwrap();
    let mut seen = std::collections::BTreeMap::new();
    let (mut nvfp4_code_diffs, mut nvfp4_code_bytes) = (0, 0);
    for l in layers {
        let format = l["format"].as_str().unwrap();
        *seen.entry(format.to_string()).or_insert(0) += 1;
        assert_eq!(l["decompress_beyond_one_ulp"], 0, "{l}");
        if format != "nvfp4-pack-quantized" {
            // FP8 and MXFP4 decode exactly (power-of-two or FP32 products).
            assert_eq!(l["decompress_mismatches"], 0, "{l}");
        }
        for (tensor, n) in l["quantizer_byte_mismatches"].as_object().unwrap() {
            let n = n.as_i64().unwrap();
            let total = l["tensor_bytes"][tensor].as_i64().unwrap();
            // Scales and codes agree byte for byte, except NVFP4's: fpx stores the reciprocal
            // of its tensor scale amax/2688, compressed-tensors computes 2688/amax (one ulp
            // apart at times, so one byte of the 4), and elements sitting exactly on a
            // rounding boundary then round differently (a few per million).
            let nvfp4 = format == "nvfp4-pack-quantized";
            let allowed = if nvfp4 { 1.max(total / 1000) } else { 0 };
            if nvfp4 && tensor == "weight_packed" {
                nvfp4_code_diffs += n;
                nvfp4_code_bytes += total;
            }
            assert!(
                n >= 0 && n <= allowed,
                "{} {tensor}: {n} of {total} bytes differ: {l}",
                l["layer"]
            );
        }
    }
    assert_eq!(seen.len(), 3, "all three formats checked: {seen:?}");
    eprintln!(
        "compressed-tensors agrees on {} layers {seen:?}; NVFP4 code bytes differing: \
         {nvfp4_code_diffs} of {nvfp4_code_bytes}",
        layers.len()
    );

    // Perplexity: fpx's plan, transformers on the export, fpx on the export.
    let tokens = dir.path().join("tokens.json");
    let sl = seq_len.to_string();
    let eval = |model: &str, plan: Option<&str>| {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--text",
            t,
            "--seq-len",
            &sl,
            "--windows",
            "2",
            "--json",
        ];
        if let Some(p) = plan {
            args.extend(["--plan", p, "--save-tokens", tokens.to_str().unwrap()]);
        }
        json(&fpx(&args))["perplexity"].as_f64().unwrap()
    };
    let planned = eval(m, Some(p));
    let read_back = eval(o, None);
    let hf = python(
        py,
        &[
            "ppl",
            "--model",
            o,
            "--tokens",
            tokens.to_str().unwrap(),
            "--seq-len",
            &sl,
        ],
    );
    let hf_ppl = hf["ppl"].as_f64().unwrap();
    eprintln!("perplexity: fpx eval --plan {planned:.6}, fpx on the export {read_back:.6}, transformers {hf_ppl:.6}");
    assert!(hf["quantized"].as_bool().unwrap());
    assert!(
        ((read_back - planned) / planned).abs() < 1e-5,
        "{read_back} vs {planned}"
    );
    // compressed-tensors decodes NVFP4 in bfloat16, its global scale included: that rounds a
    // whole tensor's scale by up to 2^-9, the same way for the q/k/v (or gate/up) that share
    // it. Measured on the tiny Mixtral: 1.2e-3 here, while transformers on fpx's FP32 decode
    // of the same bytes gives fpx's perplexity to 3e-8.
    assert!(
        ((hf_ppl - planned) / planned).abs() < 3e-3,
        "{hf_ppl} vs {planned}"
    );
}

#[test]
fn smollm2_mixed_export_matches_compressed_tensors_and_transformers() {
    let (model, text) = (common::smollm2(), common::repo().join("data/text/sotu"));
    let Some(py) = ct_python() else {
        common::have(".venv-ct (compressed-tensors)", false);
        return;
    };
    if !common::have(
        "SmolLM2 and the sotu text",
        model.is_file() && text.is_dir(),
    ) {
        return;
    }
    check_model(&py, &model, &text, 256, Some(&[0, 15, 29]), &DENSE);
}

#[test]
fn tiny_llama_qwen2_and_qwen3_exports_match_compressed_tensors_and_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (compressed-tensors)", false);
        return;
    };
    let text = common::moby_dick();
    if !common::have("the Moby Dick text", text.is_file()) {
        return;
    }
    // Qwen3: q/k norms, and a window of 6 positions on its second layer (32-token windows).
    let qwen3 = common::tiny_qwen3_windowed();
    for mut spec in [
        tiny_spec(Architecture::Llama),
        tiny_spec(Architecture::Qwen2),
        qwen3,
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Untied lm_head (Qwen2's tiny spec has q/k/v biases).
        spec.tie_word_embeddings = false;
        write_hf_checkpoint(dir.path(), &spec, 7, HfDtype::F32, 2).unwrap();
        check_model(&py, dir.path(), &text, 32, None, &DENSE);
    }
}

#[test]
fn tiny_qwen3_moe_and_mixtral_exports_match_compressed_tensors_and_transformers() {
    let Some(py) = ct_python() else {
        common::have(".venv-ct (compressed-tensors)", false);
        return;
    };
    let text = common::moby_dick();
    if !common::have("the Moby Dick text", text.is_file()) {
        return;
    }
    for arch in [Architecture::Qwen3Moe, Architecture::Mixtral] {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = tiny_spec(arch);
        spec.tie_word_embeddings = false;
        write_hf_checkpoint(dir.path(), &spec, 7, HfDtype::F32, 2).unwrap();
        check_model(&py, dir.path(), &text, 32, None, &MOE);
    }
}
