//! A tiny Qwen3-MoE through the commands a user runs: `fpx calibrate` records each expert's
//! routed tokens and warns about experts that saw too few; `fpx plan` gives a block's experts
//! one format unless `--per-expert-formats`, refuses that option with `--target`; `fpx eval
//! --plan` runs the plan on the cpu backend; `fpx run` gives the same tokens on the cpu and emu
//! backends (the grouped expert kernels); `fpx codegen` writes the MoE kernels; `fpx
//! calibrate --backend emu` refuses MoE models by the router's name; `fpx inspect` lists
//! experts and norms.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::fpx;
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::Architecture;
use serde_json::Value;

fn ok(args: &[&str]) -> (String, String) {
    let (code, out, err) = fpx(args);
    assert_eq!(code, 0, "fpx {args:?}: {err}");
    (out, err)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The formats a plan gives the experts of block `layer`.
fn expert_formats(plan: &Value, layer: usize) -> BTreeSet<String> {
    let prefix = format!("model.layers.{layer}.mlp.experts.");
    plan["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["name"].as_str().unwrap().starts_with(&prefix))
        .map(|l| l["format"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tiny_qwen3_moe_calibrates_per_expert_and_plans_shared_or_per_expert_formats() {
    let text = common::moby_dick();
    if !common::have("the Moby Dick text", text.is_file()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_hf_checkpoint(
        &model,
        &tiny_spec(Architecture::Qwen3Moe),
        5,
        HfDtype::F32,
        1,
    )
    .unwrap();

    let (inspect, _) = ok(&["inspect", s(&model)]);
    assert!(
        inspect.contains("4 experts") && inspect.contains("top-2"),
        "{inspect}"
    );
    assert!(inspect.contains("q_norm"), "{inspect}");

    // 32 tokens, top-2 of 4 experts: 16 per expert on average, below the 32 the flag asks.
    let calib = dir.path().join("calib.json");
    let (summary, warnings) = ok(&[
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
        "--json",
    ]);
    let summary: Value = serde_json::from_str(&summary).unwrap();
    let undersampled = summary["undersampled_experts"].as_object().unwrap();
    assert!(!undersampled.is_empty(), "{summary}");
    assert!(
        undersampled
            .keys()
            .all(|k| k.starts_with("model.layers.1.mlp.experts.")),
        "{summary}"
    );
    assert!(warnings.contains("weak estimate"), "{warnings}");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&calib).unwrap()).unwrap();
    let layers = file["layers"].as_array().unwrap();
    let routed: u64 = layers
        .iter()
        .filter(|l| l["name"].as_str().unwrap().ends_with("gate_proj"))
        .filter_map(|l| l["tokens"].as_u64())
        .sum();
    assert_eq!(routed, 32 * 2, "each token reaches 2 experts of block 1");
    assert!(
        layers
            .iter()
            .filter(|l| l["name"].as_str().unwrap().contains(".experts."))
            .all(|l| l["metrics"]["nvfp4"]["eps"].as_f64().unwrap() > 0.0),
        "every expert has an eps"
    );

    let plan = |name: &str, extra: &[&str]| -> Value {
        let out = dir.path().join(name);
        let mut args = vec![
            "plan",
            "--calib",
            s(&calib),
            "--device",
            "h100",
            "--solver",
            "greedy",
            "--gamma",
            "0.5",
            "-o",
            s(&out),
        ];
        args.extend(extra);
        ok(&args);
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
    };
    let shared = plan("shared.json", &[]);
    assert_eq!(expert_formats(&shared, 1).len(), 1, "{shared}");
    let per_expert = plan("per_expert.json", &["--per-expert-formats"]);
    assert!(!expert_formats(&per_expert, 1).is_empty());

    let (code, _, err) = fpx(&[
        "plan",
        "--calib",
        s(&calib),
        "--device",
        "h100",
        "--solver",
        "greedy",
        "--gamma",
        "0.5",
        "--target",
        "vllm",
        "--per-expert-formats",
        "-o",
        s(&dir.path().join("x.json")),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--per-expert-formats conflicts with --target"),
        "{err}"
    );

    // The plan runs on the cpu reference.
    let (eval, _) = ok(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--seq-len",
        "32",
        "--windows",
        "1",
        "--plan",
        s(&dir.path().join("shared.json")),
        "--json",
    ]);
    let eval: Value = serde_json::from_str(&eval).unwrap();
    assert!(eval["perplexity"].as_f64().unwrap().is_finite(), "{eval}");

    // The plan on the generated kernels: the emu backend (grouped expert kernels run by the
    // CUDA emulator) generates the cpu backend's tokens; codegen writes the MoE kernels.
    let shared = dir.path().join("shared.json");
    let run = |backend: &str| -> Value {
        let (out, _) = ok(&[
            "run",
            "--model",
            s(&model),
            "--plan",
            s(&shared),
            "--prompt",
            "Call me Ishmael. Some years ago",
            "--max-tokens",
            "6",
            "--backend",
            backend,
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let cpu = run("cpu");
    assert_eq!(cpu["tokens"].as_array().unwrap().len(), 6, "{cpu}");
    if common::emu_probe::emu_opts(fpx::lower::Arch::Sm90).is_some() {
        assert_eq!(run("emu")["tokens"], cpu["tokens"]);
    }
    let cg = dir.path().join("cg");
    ok(&[
        "codegen",
        "--model",
        s(&model),
        "--plan",
        s(&shared),
        "-o",
        s(&cg),
        "--no-compile",
    ]);
    let files: Vec<String> = std::fs::read_dir(&cg)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for family in ["moe_route_e4_top2", "expert_gemv_", "moe_combine_top2"] {
        assert!(
            files.iter().any(|f| f.starts_with(family)),
            "{family}: {files:?}"
        );
    }

    // Calibration through the kernels does not observe the experts yet: refused by name.
    let (code, _, err) = fpx(&[
        "calibrate",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--seq-len",
        "16",
        "--windows",
        "1",
        "--kl-windows",
        "0",
        "--backend",
        "emu",
        "-o",
        s(&dir.path().join("c.json")),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("model.layers.1.mlp.gate") && err.contains("--backend cpu"),
        "{err}"
    );
}
