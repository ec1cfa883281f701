//! W8A8 on the planner's menu, end to end through the `fpx` binary: a tiny checkpoint is
//! calibrated, planned with `--menu fp8,w8a8,nvfp4` where the kernel cost model makes W8A8 the
//! fastest choice for the layers whose input a norm quantizes, and the plan (with
//! `"activations": "fp8"` layers) runs. Pins take a precision; what cannot be planned (W8A8
//! with the KL objective, W4A4 on the kernels) fails naming the layer.

mod common;

use common::planner::{fails, ok, s};
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::Architecture;
use fpx::plan::Plan;

/// A tiny Llama checkpoint and its calibration (eps only, or with KL).
fn calibrated(dir: &std::path::Path, kl: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = dir.join("tiny");
    write_hf_checkpoint(&model, &tiny_spec(Architecture::Llama), 7, HfDtype::F32, 1).unwrap();
    let words = ["the", "whale", "and", "sea", "ship", "is", "on", "at"];
    let text: String = (0..600)
        .map(|i| words[(i * 5 + i / 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ");
    let text_path = dir.join("text.txt");
    std::fs::write(&text_path, text).unwrap();
    let calib = dir.join("calib.json");
    let kl_windows = if kl { "1" } else { "0" };
    ok(&[
        "calibrate",
        "--model",
        s(&model),
        "--text",
        s(&text_path),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--kl-windows",
        kl_windows,
        "--kl-seq-len",
        "32",
        "-o",
        s(&calib),
        "--json",
    ]);
    (model, calib)
}

/// `fpx plan` on a prefill-sized step of an L40S (sm_89: FP8 MMA in the SASS), where the
/// activations' bytes dominate the tiny weights': the fastest plan the menu allows.
fn fastest(calib: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> String {
    let args = [
        "plan",
        "--calib",
        s(calib),
        "--device",
        "l40s",
        "--batch",
        "2048",
        "--launch-overhead-us",
        "0",
        "--menu",
        "fp8,w8a8,nvfp4",
        "--group",
        "qkv,gate_up",
        "--solver",
        "ilp",
        "--error-budget",
        "1e9",
        "-o",
        s(out),
    ];
    ok(&[&args[..], extra].concat())
}

#[test]
fn the_planner_offers_w8a8_and_its_plan_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = calibrated(dir.path(), false);
    let plan_path = dir.path().join("w8a8.plan.json");
    let table = fastest(&calib, &plan_path, &[]);
    let plan = Plan::read(&plan_path).unwrap();
    let calibration = fpx::calib::Calibration::read(&calib).unwrap();
    for l in &plan.layers {
        let normed = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
            .iter()
            .any(|k| l.name.ends_with(k));
        // A norm quantizes q/k/v's and gate/up's input in the launch that writes it: W8A8
        // halves the bytes of x. o/down pay a quantizing launch of their own, which costs
        // more than it saves.
        assert_eq!(l.activations.is_some(), normed, "{}: {table}", l.name);
        if l.activations.is_some() {
            assert_eq!(l.precision().to_string(), "fp8+fp8");
            // Its error is the calibration's W+A eps.
            let record = calibration
                .layers
                .iter()
                .find(|r| r.name == l.name)
                .unwrap();
            let m = record.metrics[&fpx::formats::Format::Fp8];
            assert_eq!(l.eps, Some(m.eps_wa), "{}", l.name);
        }
    }
    assert!(table.contains("fp8+fp8"), "{table}");
    let menu = &plan.provenance.as_ref().unwrap().menu;
    assert_eq!(
        menu.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["fp8", "fp8+fp8", "nvfp4"]
    );
    // The plan runs with its activations quantized.
    let out = ok(&[
        "run",
        "--model",
        s(&model),
        "--plan",
        s(&plan_path),
        "--prompt",
        "the whale and",
        "--max-tokens",
        "4",
        "--backend",
        "cpu",
        "--json",
    ]);
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["tokens"].as_array().unwrap().len(), 4, "{run}");

    // A pin takes a precision: down_proj forced to W8A8.
    let pins = dir.path().join("pins.toml");
    std::fs::write(
        &pins,
        "[[pin]]\nname = 'mlp\\.down_proj$'\nformat = \"w8a8\"\n",
    )
    .unwrap();
    let pinned = dir.path().join("pinned.plan.json");
    fastest(&calib, &pinned, &["--pins", s(&pins)]);
    let plan = Plan::read(&pinned).unwrap();
    let downs: Vec<_> = plan
        .layers
        .iter()
        .filter(|l| l.name.ends_with("down_proj"))
        .collect();
    assert!(!downs.is_empty());
    assert!(downs.iter().all(|l| l.precision().to_string() == "fp8+fp8"));
}

#[test]
fn what_cannot_be_planned_fails_naming_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (_, calib) = calibrated(dir.path(), true);
    let out = dir.path().join("p.plan.json");
    // The KL pass measures weight-only variants.
    let e = fails(&[
        "plan",
        "--calib",
        s(&calib),
        "--menu",
        "fp8,w8a8",
        "--objective",
        "kl",
        "--solver",
        "ilp",
        "--error-budget",
        "1e9",
        "-o",
        s(&out),
    ]);
    assert!(e.contains("model.layers.0") && e.contains("fp8+fp8"), "{e}");
    // The generated kernels quantize activations only as W8A8.
    let e = fails(&[
        "plan",
        "--calib",
        s(&calib),
        "--menu",
        "fp8,w4a4",
        "--solver",
        "ilp",
        "--error-budget",
        "1e9",
        "-o",
        s(&out),
    ]);
    assert!(e.contains("model.layers.0") && e.contains("W8A8"), "{e}");
    // A menu entry that is not a precision.
    let e = fails(&[
        "plan",
        "--calib",
        s(&calib),
        "--menu",
        "fp8+int4",
        "--solver",
        "ilp",
        "--error-budget",
        "1e9",
        "-o",
        s(&out),
    ]);
    assert!(e.contains("--menu") && e.contains("int4"), "{e}");
    assert!(!out.exists(), "no plan is left behind");
}
