//! The kernel cost model through the `fpx` binary: `plan --explain` (the step as a table of
//! kernels, and as JSON), `--cost roofline` beside it, and tensor-parallel planning of a
//! 14B-class model from its shapes alone (a calibration file carries the model's spec).

mod common;

use std::path::Path;

use fpx::calib::Calibration;
use fpx::model::{Architecture, ModelSpec};
use fpx::plan::Plan;

fn ok(args: &[&str]) -> String {
    let (code, out, err) = common::fpx(args);
    assert_eq!(code, 0, "fpx {args:?} failed:\n{err}");
    out
}

fn fails(args: &[&str]) -> String {
    let (code, _, err) = common::fpx(args);
    assert_ne!(code, 0, "fpx {args:?} should fail");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn calibration_of(spec: ModelSpec) -> Calibration {
    common::calib::synthetic(spec, false, 99)
}

/// Shapes alone suffice to plan a 14B-class model, here Qwen2.5-14B's at tensor parallel 2 on
/// two RTX 5090s (PCIe): the plan records the sharding, the report shows the all-reduce share,
/// and each GPU's step is faster than one GPU's (half the weights) despite the all-reduces.
#[test]
fn qwen25_14b_plans_at_tensor_parallel_2_on_rtx5090() {
    let spec = ModelSpec {
        architecture: Architecture::Qwen2,
        hidden_size: 5120,
        intermediate_size: 13824,
        num_layers: 48,
        num_heads: 40,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 152064,
        rope_theta: 1e6,
        rope_scaling: Default::default(),
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        attention_bias: true,
        max_position_embeddings: 32768,
        sliding_window: None,
        bos_token_id: None,
        eos_token_id: Default::default(),
        moe: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("qwen14b.calib.json");
    calibration_of(spec).write(&calib).unwrap();
    let plan_at = |tp: &str| -> (Plan, String) {
        let out = dir.path().join(format!("tp{tp}.plan.json"));
        let args = [
            "plan",
            "--calib",
            s(&calib),
            "--device",
            "rtx5090",
            "--tensor-parallel",
            tp,
            "--solver",
            "ilp",
            "--gamma",
            "0.5",
            "-o",
            s(&out),
        ];
        let text = ok(&args);
        (Plan::read(&out).unwrap(), text)
    };
    let (one, _) = plan_at("1");
    let (two, text) = plan_at("2");
    assert_eq!(two.layers.len(), 48 * 7 + 1);
    let source = &two.provenance.as_ref().unwrap().latency;
    assert_eq!(source.tensor_parallel(), 2);
    assert!(text.contains("tensor parallel 2"), "{text}");
    assert!(text.contains("all-reduce (PCIe 5.0 x16, 2 GPUs)"), "{text}");
    let step = |p: &Plan| p.totals.as_ref().unwrap().step_latency;
    assert!(step(&two) < step(&one), "{} vs {}", step(&two), step(&one));
    // Heads that do not split evenly are refused by name.
    let out = dir.path().join("tp3.plan.json");
    let e = fails(&[
        "plan",
        "--calib",
        s(&calib),
        "--device",
        "rtx5090",
        "--tensor-parallel",
        "3",
        "--solver",
        "greedy",
        "--gamma",
        "0.5",
        "-o",
        s(&out),
    ]);
    assert!(e.contains("do not split evenly over 3 GPUs"), "{e}");
    assert!(!out.exists());
}

fn smollm2_shaped(blocks: usize) -> ModelSpec {
    common::calib::smollm2_spec(blocks)
}

/// `--explain` lists one row per launch of the decode step, with fpx's cost never below the
/// chip's bound and lm_head in its default fp16; `--cost roofline` names its source, and
/// `--lm-head` moves lm_head.
#[test]
fn explain_lists_the_kernels_of_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("c.json");
    calibration_of(smollm2_shaped(2)).write(&calib).unwrap();
    let out = dir.path().join("p.json");
    let base = [
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
        "--explain",
    ];
    let text = ok(&base);
    assert!(text.contains("kernels of one decode step"), "{text}");
    assert!(text.contains("gemv_fp16_49152x576_abf16_m1"), "{text}");
    assert!(
        text.contains("launches:") && text.contains("at the chip's bound"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&[&base[..], &["--json"]].concat())).unwrap();
    let rows = json["explain"].as_array().unwrap();
    // Per block: 2 norms, 7 linears, RoPE + KV store, attention, SiLU-gate = 12; plus the
    // embedding, the final norm, lm_head and argmax.
    assert_eq!(rows.len(), 2 * 12 + 4);
    for r in rows {
        assert!(
            r["seconds"].as_f64().unwrap() >= r["bound_seconds"].as_f64().unwrap(),
            "{r}"
        );
    }
    let lm = rows.iter().find(|r| r["layer"] == "lm_head").unwrap();
    assert_eq!(
        lm["kernel"], "gemv_fp16_49152x576_abf16_m1",
        "lm_head defaults to fp16, activations to bf16"
    );
    // The roofline source says so.
    let roof = ok(&[
        "plan",
        "--calib",
        s(&calib),
        "--device",
        "h100",
        "--cost",
        "roofline",
        "--solver",
        "greedy",
        "--gamma",
        "0.5",
        "-o",
        s(&out),
    ]);
    assert!(roof.contains("datasheet roofline of NVIDIA H100"), "{roof}");
    // lm_head in fp8 through --lm-head.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&[&base[..], &["--json", "--lm-head", "fp8"]].concat())).unwrap();
    let lm = json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "lm_head")
        .unwrap()
        .clone();
    assert_eq!(lm["format"], "fp8");
}
