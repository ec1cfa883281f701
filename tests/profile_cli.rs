//! Measured latency profiles through the `fpx` binary: validation and provenance of profiles
//! a plan is priced by, tail percentiles (p95/p99/max) of schema-2 profiles in `plan` and
//! `sweep`, and `profile --compare` of measured against modelled kernel times.

mod common;

use std::path::{Path, PathBuf};

use common::planner::{calibration, fails, ok, s, write_calib};
use fpx::formats::Format;
use fpx::plan::Plan;

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
            let m = cost
                .latency(shape, fpx::lower::LinearPrecision::weight_only(f))
                .unwrap()
                * scale;
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
