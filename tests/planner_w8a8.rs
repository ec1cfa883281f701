//! W8A8 on the planner's menu, end to end through the `fpx` binary: a tiny checkpoint is
//! calibrated, planned with `--menu fp8,w8a8,nvfp4` where the kernel cost model makes W8A8 the
//! fastest choice for the layers whose input a norm quantizes, and the plan (with
//! `"activations": "fp8"` layers) runs. Pins take a precision; the KL objective plans W8A8
//! from `calibrate --kl-activations`; what cannot be planned (W8A8 KL not measured, W4A4 on
//! the kernels) fails naming the layer.

mod common;

use common::planner::{calibrate_tiny, ok, s};
use fpx::formats::Format;
use fpx::plan::Plan;

/// A tiny Llama checkpoint and its calibration `name` (model, calibration).
fn calibrated(
    dir: &std::path::Path,
    name: &str,
    kl: Option<&[&str]>,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (model, _, calib) = calibrate_tiny(dir, name, kl);
    (model, calib)
}

/// `fpx plan` on a prefill-sized step of an L40S (sm_89: FP8 MMA in the SASS), where the
/// activations' bytes dominate the tiny weights': the fastest plan the menu allows.
fn fastest(calib: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> String {
    let step = [
        "--device",
        "l40s",
        "--batch",
        "2048",
        "--launch-overhead-us",
        "0",
        "--group",
        "qkv,gate_up",
    ];
    least_latency(calib, "fp8,w8a8,nvfp4", &[&step[..], extra].concat(), out)
        .unwrap_or_else(|e| panic!("fpx plan failed:\n{e}"))
}

#[test]
fn the_planner_offers_w8a8_and_its_plan_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = calibrated(dir.path(), "calib.json", None);
    let plan_path = dir.path().join("w8a8.plan.json");
    let table = fastest(&calib, &plan_path, &[]);
    let plan = Plan::read(&plan_path).unwrap();
    let calibration = fpx::calib::Calibration::read(&calib).unwrap();
    for l in &plan.layers {
        let normed = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
            .iter()
            .any(|k| l.name.ends_with(k));
        // A norm quantizes q/k/v's and gate/up's input in the launch that writes it: W8A8
        // halves the bytes of x. o_proj pays a quantizing launch of its own, and down's codes
        // (written by the SiLU-gate) cost the bytes they save: weight-only is as fast.
        assert_eq!(l.activations.is_some(), normed, "{}: {table}", l.name);
        if l.activations.is_some() {
            assert_eq!(l.precision().to_string(), "fp8+fp8");
            // Its error is the calibration's W+A eps.
            let record = calibration
                .layers
                .iter()
                .find(|r| r.name == l.name)
                .unwrap();
            let m = record.metrics[&Format::Fp8];
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
fn the_kl_objective_plans_w8a8_from_its_measured_kl() {
    let dir = tempfile::tempdir().unwrap();
    let (_, calib) = calibrated(dir.path(), "wa.calib.json", Some(&["--kl-activations"]));
    let c = fpx::calib::Calibration::read(&calib).unwrap();
    assert!(c.kl.unwrap().activations);
    let out = dir.path().join("kl.plan.json");
    let kl_plan = |calib| least_latency(calib, "fp8,w8a8", &["--objective", "kl"], &out);
    assert!(kl_plan(&calib).is_ok());
    let plan = Plan::read(&out).unwrap();
    // The fastest plan quantizes q/k/v's and gate/up's inputs (their norm does it).
    assert!(plan.layers.iter().any(|l| l.activations.is_some()));
    // lm_head stays 16-bit (its own menu): the reference, error 0.
    for l in plan.layers.iter().filter(|l| l.format != Format::Fp16) {
        let m = c.layers.iter().find(|r| r.name == l.name).unwrap().metrics[&l.format];
        let want = match l.activations {
            Some(_) => m.kl_wa,
            None => m.kl,
        };
        assert_eq!(l.error, want, "{}: the objective's error is its KL", l.name);
    }
    // Without `--kl-activations` the W+A KL is not measured: refused, saying how to get it.
    std::fs::remove_file(&out).unwrap();
    let (_, weight_only) = calibrated(dir.path(), "wo.calib.json", Some(&[]));
    let e = kl_plan(&weight_only).unwrap_err();
    assert!(
        e.contains("model.layers.0") && e.contains("fp8+fp8") && e.contains("--kl-activations"),
        "{e}"
    );
    assert!(!out.exists(), "no plan is left behind");
}

/// `fpx plan` of least latency (ILP, unbounded error) over `menu`, on the default H100 step
/// unless the `extra` flags say otherwise: Ok(stdout), or Err(stderr) on failure.
fn least_latency(
    calib: &std::path::Path,
    menu: &str,
    extra: &[&str],
    out: &std::path::Path,
) -> Result<String, String> {
    let args = [
        "plan",
        "--calib",
        s(calib),
        "--menu",
        menu,
        "--solver",
        "ilp",
        "--error-budget",
        "1e9",
        "-o",
        s(out),
    ];
    match common::fpx(&[&args[..], extra].concat()) {
        (0, stdout, _) => Ok(stdout),
        (_, _, stderr) => Err(stderr),
    }
}

#[test]
fn what_cannot_be_planned_fails_naming_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (_, calib) = calibrated(dir.path(), "calib.json", None);
    let out = dir.path().join("p.plan.json");
    // The generated kernels quantize activations only as W8A8.
    let e = least_latency(&calib, "fp8,w4a4", &[], &out).unwrap_err();
    assert!(e.contains("model.layers.0") && e.contains("W8A8"), "{e}");
    // A menu entry that is not a precision.
    let e = least_latency(&calib, "fp8+int4", &[], &out).unwrap_err();
    assert!(e.contains("--menu") && e.contains("int4"), "{e}");
    assert!(!out.exists(), "no plan is left behind");
}
