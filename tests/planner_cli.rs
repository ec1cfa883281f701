//! The planner end to end through the `fpx` binary: `plan` (greedy, ILP, every budget kind,
//! roofline and profile sources, pins, groups), `compare`, `sweep`, and their errors; and a
//! tiny synthetic checkpoint taken from `calibrate` (with KL) through `plan --objective kl`,
//! `eval --plan` and `sweep --eval-text`.

mod common;

use std::path::{Path, PathBuf};

use common::fpx;
use fpx::calib::Calibration;
use fpx::formats::Format;
use fpx::plan::{BudgetRecord, Plan, SolverRecord};

/// A calibration of a SmolLM2-shaped model with `blocks` blocks and pseudo-random eps.
fn calibration(blocks: usize, with_kl: bool) -> Calibration {
    common::calib::synthetic(common::calib::smollm2_spec(blocks), with_kl, 12345)
}

fn write_calib(dir: &Path, blocks: usize, with_kl: bool) -> PathBuf {
    let path = dir.join("calib.json");
    calibration(blocks, with_kl).write(&path).unwrap();
    path
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = fpx(args);
    assert_eq!(code, 0, "fpx {args:?} failed:\n{err}");
    out
}

fn fails(args: &[&str]) -> String {
    let (code, _, err) = fpx(args);
    assert_ne!(code, 0, "fpx {args:?} should fail");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

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
        gt.layers_per_format[&Format::Nvfp4],
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
            &["--solver", "ilp", "--gamma", "0.5", "--device", "a100"],
        ]
        .concat(),
    );
    assert!(e.contains("`a100` is neither a known GPU"), "{e}");
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
fn measured_profiles_are_validated_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration(2, false);
    let calib_path = dir.path().join("calib.json");
    calib.write(&calib_path).unwrap();
    let mut layers = serde_json::Map::new();
    for l in &calib.layers {
        let bytes = |f: Format| f.weight_bytes(l.out_features, l.in_features) as f64;
        layers.insert(
            l.name.clone(),
            serde_json::json!({"fp16": bytes(Format::Fp16) / 3e12 + 3e-6, "fp8": bytes(Format::Fp8) / 3e12 + 3e-6, "nvfp4": bytes(Format::Nvfp4) / 3e12 + 3e-6}),
        );
    }
    let profile = serde_json::json!({"schema_version": 1, "device": "NVIDIA H100 80GB HBM3",
        "batch": 1, "context": 128, "other_seconds": 1e-4, "layers": layers});
    let path = dir.path().join("h100.profile.json");
    std::fs::write(&path, serde_json::to_vec(&profile).unwrap()).unwrap();
    let out = dir.path().join("p.json");
    let json = ok(&[
        "plan",
        "--calib",
        s(&calib_path),
        "--device",
        s(&path),
        "--solver",
        "ilp",
        "--gamma",
        "0.5",
        "-o",
        s(&out),
        "--json",
    ]);
    let plan: Plan = serde_json::from_str(&json).unwrap();
    let src = serde_json::to_value(&plan.provenance.unwrap().latency).unwrap();
    assert_eq!(src["kind"], "profile");
    assert_eq!(src["device"], "NVIDIA H100 80GB HBM3");
    assert_eq!(plan.totals.unwrap().fixed_latency, 1e-4);
    // mxfp4 is not measured: asking for it names the missing pairs.
    let e = fails(&[
        "plan",
        "--calib",
        s(&calib_path),
        "--device",
        s(&path),
        "--solver",
        "ilp",
        "--gamma",
        "0.5",
        "--menu",
        "fp8,nvfp4,mxfp4",
        "-o",
        s(&out),
    ]);
    assert!(e.contains("does not cover 14 of the 42"), "{e}");
    assert!(
        e.contains("layer `model.layers.0.self_attn.q_proj` has no measurement for format mxfp4"),
        "{e}"
    );
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
    use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
    use fpx::model::Architecture;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_hf_checkpoint(&model, &tiny_spec(Architecture::Llama), 7, HfDtype::F32, 1).unwrap();
    let words = [
        "the", "whale", "and", "sea", "ship", "is", "on", "at", "its", "captain",
    ];
    let text: String = (0..1500)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ");
    let text_path = dir.path().join("text.txt");
    std::fs::write(&text_path, &text).unwrap();
    let calib = dir.path().join("calib.json");
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
        "1",
        "--kl-seq-len",
        "32",
        "-o",
        s(&calib),
        "--json",
    ]);
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

/// A schema-2 profile recorded (by the same code `fpx profile` uses) from synthetic samples of
/// a 2-block SmolLM2-shaped model: every kernel `scale` times what the H100 cost model says,
/// NVFP4 kernels with one sample in five 3x slower (their p95), the rest of the step 1e-4 s
/// (p50) and 3e-4 s (p95).
fn recorded_profile(dir: &Path, scale: f64) -> PathBuf {
    use fpx::latency::measured::{record, Measurements};
    use fpx::latency::{Gpu, KernelCost, LatencyModel, LayerShape};
    use fpx::lower::{ActDtype, LinearShape, PrecisionMap, Schedule, WeightFormat};
    let graph = fpx::ir::Graph::build(&common::calib::smollm2_spec(2));
    let schedule = Schedule::build(&graph, &PrecisionMap::new())
        .unwrap()
        .with_act(ActDtype::Bf16);
    let cost = KernelCost::new(Gpu::H100, &graph, 1, 128)
        .unwrap()
        .with_act(ActDtype::Bf16);
    let shapes = LayerShape::of_graph(&graph);
    let mut linears = std::collections::BTreeMap::new();
    for (l, shape) in schedule.linears.iter().zip(&shapes) {
        for f in [Format::Fp16, Format::Fp8, Format::Nvfp4] {
            let w = WeightFormat::of(Some(f));
            let m = cost.latency(shape, f).unwrap() * scale;
            let slow = if f == Format::Nvfp4 { 3.0 * m } else { m };
            linears.insert(
                (
                    LinearShape {
                        format: w,
                        ..l.shape
                    },
                    w,
                ),
                vec![m, m, slow, m, m],
            );
        }
    }
    let m = Measurements {
        device: "NVIDIA H100 80GB HBM3".into(),
        batch: 1,
        context: 128,
        model: None,
        linears,
        rest: vec![1e-4, 1e-4, 3e-4, 1e-4, 1e-4],
    };
    let raw = record(&schedule, &shapes, &m, Some(&cost)).unwrap();
    let path = dir.join("h100.v2.profile.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&raw).unwrap()).unwrap();
    path
}

#[test]
fn tail_percentiles_of_a_measured_profile_price_plans() {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_calib(dir.path(), 2, false);
    let profile = recorded_profile(dir.path(), 1.5);
    let out = dir.path().join("p.json");
    let plan_at = |percentile: &str| -> Plan {
        let json = ok(&[
            "plan",
            "--calib",
            s(&calib),
            "--device",
            s(&profile),
            "--latency-percentile",
            percentile,
            "--solver",
            "greedy",
            "--gamma",
            "0.5",
            "-o",
            s(&out),
            "--json",
        ]);
        serde_json::from_str(&json).unwrap()
    };
    let (median, tail) = (plan_at("p50"), plan_at("p95"));
    let (m, t) = (median.totals.unwrap(), tail.totals.unwrap());
    assert_eq!((m.fixed_latency, t.fixed_latency), (1e-4, 3e-4));
    // Same greedy assignment (gamma fixes it); its NVFP4 half costs 3x at the tail.
    assert_eq!(m.layers_per_format, t.layers_per_format);
    assert!(t.total_latency > 1.5 * m.total_latency, "{t:?} vs {m:?}");
    let src = serde_json::to_value(tail.provenance.unwrap().latency).unwrap();
    assert_eq!(src["percentile"], "p95");
    let src = serde_json::to_value(median.provenance.unwrap().latency).unwrap();
    assert!(src.get("percentile").is_none(), "{src}");
    // The sweep takes the same flag and records it.
    let sweep = dir.path().join("sweep");
    ok(&[
        "sweep",
        "--calib",
        s(&calib),
        "--device",
        s(&profile),
        "--latency-percentile",
        "p95",
        "--points",
        "2",
        "-o",
        s(&sweep),
    ]);
    let report = std::fs::read_to_string(sweep.join("sweep.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report["latency"]["percentile"], "p95",
        "{}",
        report["latency"]
    );
    // A cost model has no tail.
    let e = fails(&[
        "plan",
        "--calib",
        s(&calib),
        "--device",
        "h100",
        "--latency-percentile",
        "p99",
        "--solver",
        "greedy",
        "--gamma",
        "0.5",
        "-o",
        s(&out),
    ]);
    assert!(
        e.contains("--latency-percentile p99 needs a measured profile"),
        "{e}"
    );
}

#[test]
fn profile_compare_prints_measured_over_modelled_per_family() {
    let dir = tempfile::tempdir().unwrap();
    let profile = recorded_profile(dir.path(), 1.5);
    let out = ok(&["profile", "--compare", s(&profile)]);
    assert!(
        out.contains("NVIDIA H100 80GB HBM3: measured / modelled"),
        "{out}"
    );
    for family in ["gemv fp16", "gemv fp8", "gemv nvfp4", "rest of step"] {
        assert!(out.contains(family), "{family} missing:\n{out}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["profile", "--compare", s(&profile), "--json"])).unwrap();
    let families = json["families"].as_array().unwrap();
    assert_eq!(families.len(), 3);
    for f in families {
        let ratio = f["ratio"].as_f64().unwrap();
        assert!((ratio - 1.5).abs() < 1e-9, "{f}");
        // 2 blocks x 7 projections + lm_head.
        assert_eq!(f["launches"], 15);
    }
    // A schema-1 profile has no kernels to compare.
    let v1 = dir.path().join("v1.json");
    std::fs::write(
        &v1,
        r#"{"schema_version": 1, "device": "x", "batch": 1, "context": 1, "layers": {"a": {"fp8": 1e-6}}}"#,
    )
    .unwrap();
    let e = fails(&["profile", "--compare", s(&v1)]);
    assert!(e.contains("records no kernels (a schema 1 profile)"), "{e}");
    // --compare stands alone.
    let e = fails(&["profile", "--compare", s(&profile), "--model", "m.gguf"]);
    assert!(e.contains("cannot be used with"), "{e}");
}
