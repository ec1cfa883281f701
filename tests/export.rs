//! `fpx export` without Python: the files it writes, sharding, fpx reading the export back to
//! the plan's own dequantized weights, and the refusals (split fused layers, a plan for another
//! model, an existing directory, schemes and checkpoint formats fpx cannot express or read).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fpx::formats::Format;
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::{load_model, Architecture};
use serde_json::{json, Value};

fn fpx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fpx"))
        .args(args)
        .output()
        .expect("runs fpx")
}

fn ok(args: &[&str]) -> String {
    let out = fpx(args);
    assert!(
        out.status.success(),
        "fpx {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn err(args: &[&str]) -> String {
    let out = fpx(args);
    assert!(!out.status.success(), "fpx {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A tiny Qwen2 (biases) with an untied lm_head, and a hand-written plan for it.
fn setup(dir: &Path, layers: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    setup_arch(dir, Architecture::Qwen2, layers)
}

/// A tiny model of `arch` with an untied lm_head, and a hand-written plan for it.
fn setup_arch(dir: &Path, arch: Architecture, layers: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let mut spec = tiny_spec(arch);
    spec.tie_word_embeddings = false;
    write_hf_checkpoint(&model, &spec, 3, HfDtype::F32, 1).unwrap();
    let identity = load_model(&model).unwrap().identity;
    let plan = dir.join("plan.json");
    let layers: Vec<Value> = layers
        .iter()
        .map(|(n, f)| json!({"name": n, "format": f}))
        .collect();
    let p = json!({"schema_version": 2, "model": identity, "layers": layers});
    std::fs::write(&plan, serde_json::to_string(&p).unwrap()).unwrap();
    (model, plan)
}

/// Every linear of both blocks: q/k/v nvfp4, o fp8, gate/up mxfp4, down fp8.
fn full_plan() -> Vec<(String, &'static str)> {
    let mut v = Vec::new();
    for b in 0..2 {
        for (p, f) in [
            ("self_attn.q_proj", "nvfp4"),
            ("self_attn.k_proj", "nvfp4"),
            ("self_attn.v_proj", "nvfp4"),
            ("self_attn.o_proj", "fp8"),
            ("mlp.gate_proj", "mxfp4"),
            ("mlp.up_proj", "mxfp4"),
            ("mlp.down_proj", "fp8"),
        ] {
            v.push((format!("model.layers.{b}.{p}"), f));
        }
    }
    v
}

/// `fpx export --model MODEL --plan PLAN -o OUT`, expected to fail: its stderr.
fn export_err(model: &Path, plan: &Path, out: &Path) -> String {
    err(&[
        "export",
        "--model",
        s(model),
        "--plan",
        s(plan),
        "-o",
        s(out),
    ])
}

/// `fpx export --model MODEL --plan PLAN -o OUT`, expected to succeed: its stdout.
fn export_ok(model: &Path, plan: &Path, out: &Path) -> String {
    ok(&[
        "export",
        "--model",
        s(model),
        "--plan",
        s(plan),
        "-o",
        s(out),
    ])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn export_writes_shards_config_and_reads_back_as_the_plan_dequantizes() {
    let dir = tempfile::tempdir().unwrap();
    let layers = full_plan();
    let refs: Vec<(&str, &str)> = layers.iter().map(|(n, f)| (n.as_str(), *f)).collect();
    let (model, plan) = setup(dir.path(), &refs);
    let out = dir.path().join("out");
    let report: Value = serde_json::from_str(&ok(&[
        "export",
        "--model",
        s(&model),
        "--plan",
        s(&plan),
        "-o",
        s(&out),
        "--dtype",
        "fp32",
        "--max-shard-bytes",
        "40000",
        "--json",
    ]))
    .unwrap();
    assert!(report["shards"].as_u64().unwrap() > 1, "{report}");
    assert_eq!(report["ignored"], json!(["lm_head"]));
    // A hand-written plan without provenance predates the rule choice: the floor rule.
    assert_eq!(report["mx_scale_rule"], "ocp-floor");

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "mixed-precision");
    assert_eq!(qc["ignore"], json!(["lm_head"]));
    assert_eq!(config["tie_word_embeddings"], false);
    let groups = qc["config_groups"].as_object().unwrap();
    assert_eq!(groups.len(), 3);
    let targets: usize = groups
        .values()
        .map(|g| g["targets"].as_array().unwrap().len())
        .sum();
    assert_eq!(targets, 14, "every quantized layer named exactly once");
    for f in [
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // fpx reads it back: the decoded weights are fpx's own dequantization of the plan (bit
    // for bit for fp8/mxfp4; NVFP4 within an ulp: the divisor is the tensor scale's reciprocal).
    // q/k/v in NVFP4 share the fused qkv matrix's tensor scale, as vLLM decodes them.
    let src = load_model(&model).unwrap();
    let back = load_model(&out).unwrap();
    assert_eq!(back.spec, src.spec);
    let graph = fpx::ir::Graph::build(&src.spec);
    let formats: std::collections::HashMap<String, Format> = layers
        .iter()
        .map(|(n, f)| (n.clone(), f.parse().unwrap()))
        .collect();
    let shared = fpx::lower::fused::nvfp4_tensor_amax(&graph, src.weights.as_ref(), &|n| {
        formats.get(n).copied()
    })
    .unwrap();
    assert!(
        shared.contains_key("model.layers.0.self_attn.k_proj"),
        "{shared:?}"
    );
    for (name, f) in &layers {
        let f: Format = f.parse().unwrap();
        let w = src.weights.tensor(&format!("{name}.weight")).unwrap();
        let (rows, cols) = (w.shape[0], w.shape[1]);
        fpx::formats::set_mx_scale_rule(fpx::formats::MxScaleRule::OcpFloor);
        let amax = shared.get(name).copied();
        let want = f.quantize_against(&w.data, rows, cols, amax).dequantize();
        let got = back.weights.tensor(&format!("{name}.weight")).unwrap();
        assert_eq!(got.shape, w.shape);
        for (a, b) in got.data.iter().zip(&want) {
            let tol = if f == Format::Nvfp4 {
                b.abs() * 2.5e-7
            } else {
                0.0
            };
            assert!((a - b).abs() <= tol, "{name}: {a} vs {b}");
        }
    }
    for name in [
        "model.layers.1.self_attn.q_proj.bias",
        "lm_head.weight",
        "model.norm.weight",
    ] {
        assert_eq!(
            back.weights.tensor(name).unwrap(),
            src.weights.tensor(name).unwrap()
        );
    }

    // An existing non-empty directory is refused, and left as it was; --force replaces it.
    let e = export_err(&model, &plan, &out);
    assert!(e.contains("--force"), "{e}");
    assert!(out.join("config.json").is_file());
    ok(&[
        "export",
        "--model",
        s(&model),
        "--plan",
        s(&plan),
        "-o",
        s(&out),
        "--force",
    ]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn export_refuses_split_fused_layers_other_models_and_inexpressible_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let (model, plan) = setup(
        dir.path(),
        &[
            ("model.layers.0.self_attn.q_proj", "nvfp4"),
            ("model.layers.0.self_attn.k_proj", "fp8"),
        ],
    );
    let out = dir.path().join("out");
    let e = export_err(&model, &plan, &out);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj = nvfp4")
            && e.contains("model.layers.0.self_attn.v_proj = fp16")
            && e.contains("--target vllm"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");

    // A plan made for another model.
    let other = dir.path().join("other.json");
    std::fs::write(
        &other,
        r#"{"schema_version": 2, "model": "abc", "layers": []}"#,
    )
    .unwrap();
    let e = export_err(&model, &other, &out);
    assert!(e.contains("made for model abc"), "{e}");
    let named = dir.path().join("named.json");
    std::fs::write(
        &named,
        r#"{"schema_version": 2, "layers": [{"name": "model.layers.9.mlp.up_proj", "format": "fp8"}]}"#,
    )
    .unwrap();
    let e = export_err(&model, &named, &out);
    assert!(
        e.contains("model.layers.9.mlp.up_proj") && e.contains("another model"),
        "{e}"
    );

    // NVFP4 activations: compressed-tensors' need a static global scale.
    let acts = dir.path().join("acts.json");
    std::fs::write(
        &acts,
        r#"{"schema_version": 2, "layers": [{"name": "model.layers.0.mlp.down_proj", "format": "fp8", "activations": "nvfp4"}]}"#,
    )
    .unwrap();
    let e = export_err(&model, &acts, &out);
    assert!(
        e.contains("model.layers.0.mlp.down_proj") && e.contains("input_global_scale"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn moe_exports_keep_a_blocks_experts_in_one_scheme_and_routers_in_ignore() {
    let dir = tempfile::tempdir().unwrap();
    // Qwen3-MoE's block 1 is sparse: one expert in NVFP4, its siblings in 16 bits.
    let (model, plan) = setup_arch(
        dir.path(),
        Architecture::Qwen3Moe,
        &[("model.layers.1.mlp.experts.2.down_proj", "nvfp4")],
    );
    let out = dir.path().join("out");
    let e = export_err(&model, &plan, &out);
    assert!(
        e.contains("experts into one MoE layer")
            && e.contains("model.layers.1.mlp.experts.2.down_proj = nvfp4")
            && e.contains("--per-expert-formats"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");

    // Every expert projection of the block in FP8: one scheme, the router ignored.
    let layers: Vec<(String, &str)> = (0..4)
        .flat_map(|x| {
            ["gate_proj", "up_proj", "down_proj"]
                .map(|p| (format!("model.layers.1.mlp.experts.{x}.{p}"), "fp8"))
        })
        .collect();
    let layers: Vec<(&str, &str)> = layers.iter().map(|(n, f)| (n.as_str(), *f)).collect();
    let (model, plan) = setup_arch(dir.path(), Architecture::Qwen3Moe, &layers);
    let report: Value = serde_json::from_str(&ok(&[
        "export",
        "--model",
        s(&model),
        "--plan",
        s(&plan),
        "-o",
        s(&out),
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        report["layers_per_format"]["float-quantized"], 12,
        "{report}"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let ignore = &config["quantization_config"]["ignore"];
    assert!(
        ignore
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "model.layers.1.mlp.gate"),
        "{ignore}"
    );
    // The per-expert layout vLLM loads: experts.{e}.{proj}.weight and .weight_scale.
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.contains_key("model.layers.1.mlp.experts.3.down_proj.weight_scale"));
    assert!(map.contains_key("model.layers.1.mlp.gate.weight"));
}

#[test]
fn checkpoints_in_formats_fpx_does_not_read_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (model, plan) = setup(dir.path(), &[("model.layers.0.mlp.down_proj", "fp8")]);
    let out = dir.path().join("out");
    export_ok(&model, &plan, &out);
    assert!(load_model(&out).is_ok());
    let path = out.join("config.json");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (edit, expect) in [
        (json!({"quant_method": "awq"}), "quant_method `awq`"),
        (
            {
                let mut qc = config["quantization_config"].clone();
                qc["config_groups"]["group_0"]["format"] = "pack-quantized".into();
                qc
            },
            "format `pack-quantized` (config group `group_0`)",
        ),
    ] {
        let mut c = config.clone();
        c["quantization_config"] = edit;
        std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
        let e = load_model(&out).unwrap_err().to_string();
        assert!(e.contains(expect) && e.contains("config.json"), "{e}");
    }
}

#[test]
fn plan_target_vllm_groups_fused_layers_and_records_the_rule() {
    let text = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/text/moby-dick.txt");
    if !text.is_file() {
        assert!(
            std::env::var("FPX_REQUIRE_DATA").as_deref() != Ok("1"),
            "Moby Dick text missing and FPX_REQUIRE_DATA=1"
        );
        eprintln!("skipped: data/text/moby-dick.txt is missing (make fetch)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = setup(dir.path(), &[]);
    let calib = dir.path().join("calib.json");
    ok(&[
        "calibrate",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--seq-len",
        "32",
        "--windows",
        "1",
        "--kl-windows",
        "0",
        "-o",
        s(&calib),
    ]);
    let plan = dir.path().join("p.json");
    ok(&[
        "plan",
        "--calib",
        s(&calib),
        "--device",
        "h100",
        "--solver",
        "ilp",
        "--gamma",
        "0.5",
        "--target",
        "vllm",
        "-o",
        s(&plan),
    ]);
    let p: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(p["provenance"]["groups"], json!(["qkv", "gate_up"]));
    assert_eq!(p["provenance"]["mx_scale_rule"], "round");
    let out = dir.path().join("out");
    export_ok(&model, &plan, &out);
}
