//! The planner end to end through the `fpx` binary: `plan` (greedy, ILP, every budget kind,
//! roofline sources, pins, groups; measured profiles are in `profile_cli.rs`), `compare`,
//! `sweep`, and their errors; and a tiny synthetic checkpoint taken from `calibrate` (with KL) through `plan --objective kl`,
//! `eval --plan` and `sweep --eval-text`.

mod common;

use common::fpx;
use common::planner::{calibrate_tiny, fails, ok, s, write_calib};
use fpx::formats::Format;
use fpx::plan::{BudgetRecord, Plan, SolverRecord};

#[test]
fn greedy_and_ilp_at_the_same_latency_then_compare() {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_calib(dir.path(), 4, false);
    let (g, i) = (
        dir.path().join("g.plan.json"),
        dir.path().join("i.plan.json"),
    );
    let base = ["plan", "--calib", s(&calib), "--device", "h100"];
    let out = ok(&[
        &base[..],
        &["--solver", "greedy", "--gamma", "0.5", "-o", s(&g)],
    ]
    .concat());
    assert!(
        out.contains(
            "fpx kernel cost model of NVIDIA H100 SXM5 80GB, sm_90 (batch 1, context 512, bf16 activations)"
        ),
        "{out}"
    );
    ok(&[
        &base[..],
        &["--solver", "ilp", "--gamma", "0.5", "-o", s(&i)],
    ]
    .concat());
    let (gp, ip) = (Plan::read(&g).unwrap(), Plan::read(&i).unwrap());
    let (gt, it) = (gp.totals.clone().unwrap(), ip.totals.clone().unwrap());
    assert_eq!(
        gt.layers_per_format[&fpx::lower::LinearPrecision::weight_only(Format::Nvfp4)],
        14,
        "half of 28 layers"
    );
    assert!(it.total_latency <= gt.total_latency * (1.0 + 1e-9));
    assert!(it.total_error <= gt.total_error + 1e-12);
    let prov = ip.provenance.as_ref().unwrap();
    assert!(matches!(prov.solver, SolverRecord::Ilp { .. }));
    assert!(matches!(prov.budget, BudgetRecord::MatchGreedy { gamma, .. } if gamma == 0.5));
    assert_eq!(prov.calibration.sha256.len(), 64);
    assert_eq!(ip.model.as_deref(), Some("synthetic-identity"));
    let l = &ip.layers[0];
    assert!(l.eps.is_some() && l.latency.is_some() && l.weight_bytes.is_some());
    // Deterministic: the same inputs give the same bytes.
    let again = dir.path().join("again.plan.json");
    ok(&[
        &base[..],
        &["--solver", "ilp", "--gamma", "0.5", "-o", s(&again)],
    ]
    .concat());
    assert_eq!(std::fs::read(&i).unwrap(), std::fs::read(&again).unwrap());

    let cmp = ok(&["compare", s(&g), s(&i)]);
    assert!(cmp.contains("layers differ"), "{cmp}");
    assert!(
        cmp.contains("planned latency (us)") && cmp.contains("total error"),
        "{cmp}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["compare", s(&g), s(&i), "--json"])).unwrap();
    assert_eq!(
        json["same"].as_u64().unwrap() + json["differing"].as_array().unwrap().len() as u64,
        29,
        "7 layers per block + lm_head"
    );
}

#[test]
fn every_budget_kind_and_groups_and_pins() {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_calib(dir.path(), 3, false);
    let out = dir.path().join("p.json");
    let base = ["plan", "--calib", s(&calib), "-o", s(&out)];
    for (solver, budget) in [
        ("ilp", ["--speedup", "1.005"]),
        ("greedy", ["--speedup", "1.005"]),
        ("ilp", ["--error-budget", "2.0"]),
        ("greedy", ["--error-budget", "2.0"]),
        ("ilp", ["--latency-budget", "0.1"]),
    ] {
        let json = ok(&[&base[..], &["--solver", solver, "--json"], &budget[..]].concat());
        let plan: Plan = serde_json::from_str(&json).unwrap();
        let t = plan.totals.unwrap();
        match budget[0] {
            "--error-budget" => assert!(t.total_error <= 2.0 + 1e-9),
            "--latency-budget" => assert!(t.total_latency <= 1e-4 * (1.0 + 1e-9)),
            _ => {}
        }
    }
    // Groups: q/k/v and gate/up share formats.
    let json = ok(&[
        &base[..],
        &[
            "--solver",
            "ilp",
            "--gamma",
            "0.6",
            "--group",
            "qkv,gate_up",
            "--json",
        ],
    ]
    .concat());
    let plan: Plan = serde_json::from_str(&json).unwrap();
    let f = plan.formats();
    for b in 0..3 {
        let at = |k: &str| f[format!("model.layers.{b}.{k}").as_str()];
        assert_eq!(at("self_attn.q_proj"), at("self_attn.k_proj"));
        assert_eq!(at("self_attn.q_proj"), at("self_attn.v_proj"));
        assert_eq!(at("mlp.gate_proj"), at("mlp.up_proj"));
    }
    // Pins: block 0 stays fp8 even at gamma 1; lm_head is a planned layer a pin can move to
    // fp8 (its default is fp16).
    let pins = dir.path().join("pins.toml");
    std::fs::write(
        &pins,
        "[[pin]]\nlayers = \"0\"\nformat = \"fp8\"\n[[pin]]\nname = \"lm_head\"\nformat = \"fp8\"\n",
    )
    .unwrap();
    let (code, json, err) = fpx(&[
        &base[..],
        &[
            "--solver",
            "greedy",
            "--gamma",
            "1",
            "--pins",
            s(&pins),
            "--json",
        ],
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    let plan: Plan = serde_json::from_str(&json).unwrap();
    for l in &plan.layers {
        let want = if l.name.starts_with("model.layers.0.") || l.name == "lm_head" {
            Format::Fp8
        } else {
            Format::Nvfp4
        };
        assert_eq!(l.format, want, "{}", l.name);
    }
    assert!(plan.provenance.unwrap().pins.unwrap().sha256.len() == 64);
    // A pin that matches no layer is an error naming the rule.
    std::fs::write(
        &pins,
        "[[pin]]\nname = \"model.layers.9.mlp.up_proj\"\nformat = \"fp8\"\n",
    )
    .unwrap();
    let (code, _, err) = fpx(&[
        &base[..],
        &["--solver", "greedy", "--gamma", "1", "--pins", s(&pins)],
    ]
    .concat());
    assert_ne!(code, 0);
    assert!(
        err.contains("matches no layer of the calibrated model"),
        "{err}"
    );
}

#[test]
fn errors_say_what_binds() {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_calib(dir.path(), 2, false);
    let out = dir.path().join("p.json");
    let base = ["plan", "--calib", s(&calib), "-o", s(&out)];
    let e = fails(&[&base[..], &["--solver", "ilp", "--latency-budget", "0.001"]].concat());
    assert!(
        e.contains("infeasible: the latency budget 0.001000 ms is below the minimum achievable"),
        "{e}"
    );
    let e = fails(&[&base[..], &["--solver", "ilp", "--speedup", "5"]].concat());
    assert!(
        e.contains("speedup over all-fp8") && e.contains("at most"),
        "{e}"
    );
    let e = fails(
        &[
            &base[..],
            &["--solver", "ilp", "--gamma", "0.5", "--objective", "kl"],
        ]
        .concat(),
    );
    assert!(
        e.contains("objective kl, but the calibration has no KL"),
        "{e}"
    );
    assert!(e.contains("model.layers.0.self_attn.q_proj"), "{e}");
    let e = fails(
        &[
            &base[..],
            &["--solver", "ilp", "--gamma", "0.5", "--menu", "fp8,fp6"],
        ]
        .concat(),
    );
    assert!(e.contains("unknown format `fp6`"), "{e}");
    let e = fails(
        &[
            &base[..],
            &["--solver", "ilp", "--gamma", "0.5", "--device", "v100"],
        ]
        .concat(),
    );
    assert!(e.contains("`v100` is neither a known GPU"), "{e}");
    let e = fails(
        &[
            &base[..],
            &["--solver", "ilp", "--gamma", "0.5", "--menu", "fp8,fp16"],
        ]
        .concat(),
    );
    assert!(
        e.contains("greedy moves layers between nvfp4 and fp8, but no layer allows both"),
        "{e}"
    );
    let pins = dir.path().join("bad.toml");
    std::fs::write(
        &pins,
        "[[pin]]\nname = \"down\"\nformat = \"fp8\"\n[[pin]]\nlayers = \"1\"\nformat = \"nvfp4\"\n",
    )
    .unwrap();
    let e = fails(
        &[
            &base[..],
            &["--solver", "ilp", "--gamma", "0.5", "--pins", s(&pins)],
        ]
        .concat(),
    );
    assert!(
        e.contains("layer `model.layers.1.mlp.down_proj` is pinned to fp8 by rule 1 (name = \"down\") and to nvfp4 by rule 2 (layers = \"1\")"),
        "{e}"
    );
    // Both a gamma and a latency budget: clap refuses.
    let e = fails(
        &[
            &base[..],
            &["--solver", "ilp", "--gamma", "0.5", "--latency-budget", "1"],
        ]
        .concat(),
    );
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn sweep_writes_csv_json_svg_and_plans() {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_calib(dir.path(), 3, false);
    let out = dir.path().join("sweep");
    let text = ok(&[
        "sweep",
        "--calib",
        s(&calib),
        "--device",
        "b200",
        "--points",
        "5",
        "-o",
        s(&out),
    ]);
    assert!(
        text.contains("fpx kernel cost model of NVIDIA B200"),
        "{text}"
    );
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11);
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ILP, same latency"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 10);
    for pair in points.chunks(2) {
        assert_eq!(pair[0]["solver"], "greedy");
        assert!(pair[1]["error"].as_f64().unwrap() <= pair[0]["error"].as_f64().unwrap() + 1e-12);
        let plan = Plan::read(&out.join(pair[1]["plan"].as_str().unwrap())).unwrap();
        assert_eq!(plan.layers.len(), 22, "7 layers per block + lm_head");
    }
}

/// A tiny random checkpoint through calibrate (with KL) -> plan --objective kl -> eval --plan
/// -> sweep with evaluation.
#[test]
fn tiny_model_calibrate_plan_eval_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let (model, text_path, calib) = calibrate_tiny(dir.path(), "calib.json", Some(&[]));
    let plan = dir.path().join("kl.plan.json");
    ok(&[
        "plan",
        "--calib",
        s(&calib),
        "--solver",
        "ilp",
        "--gamma",
        "0.5",
        "--objective",
        "kl",
        "-o",
        s(&plan),
    ]);
    let eval: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        s(&model),
        "--text",
        s(&text_path),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--plan",
        s(&plan),
        "--json",
    ]))
    .unwrap();
    assert!(eval["kl"].as_f64().unwrap() >= 0.0);
    let out = dir.path().join("sweep");
    ok(&[
        "sweep",
        "--calib",
        s(&calib),
        "--points",
        "3",
        "--model",
        s(&model),
        "--eval-text",
        s(&text_path),
        "--eval-seq-len",
        "32",
        "--eval-windows",
        "2",
        "-o",
        s(&out),
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    // The calibration used 2 x 32 + 1 x 32 tokens of this text: evaluation skips them.
    assert_eq!(report["eval"]["skip"], 96);
    let points = report["points"].as_array().unwrap();
    // gamma 0 is all fp8 for both solvers: identical plans, identical measurements.
    assert_eq!(points[0]["perplexity"], points[1]["perplexity"]);
    assert!(points.iter().all(|p| p["kl"].as_f64().unwrap() >= 0.0));
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.contains("perplexity (held-out text)") && svg.contains("KL(full || plan)"));
}
