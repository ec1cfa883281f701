//! Calibration checked against independent computations and fed bad input.
//!
//! - eps / eps_wa / weight_error of the streaming eps pass equal a plain-loop f64 computation
//!   over the inputs captured from one ordinary full-model forward per window (eps, from Gram
//!   matrices, to 1e-6 relative);
//! - the KL pass equals `eval` of a plan that puts only that layer in that format;
//! - the CLI rejects bad input with clear messages and leaves no output file.

mod common;

use std::collections::BTreeMap;

use common::*;
use fpx::calib::capture::{
    formats_per_pass, measure_eps, measure_eps_with, EpsOptions, WeightOnlyMethod,
};
use fpx::calib::{sensitivity::measure_kl, Calibration, CpuForwards};
use fpx::eval;
use fpx::formats::Format;
use fpx::ir::{Graph, NodeId, Op};
use fpx::lower::{LinearPrecision, PrecisionMap};
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::{load_model, Architecture, Model};
use fpx::runtime::cpu::{CpuModel, Mat, Run};

fn tiny(arch: Architecture, dir: &std::path::Path) -> Model {
    write_hf_checkpoint(dir, &tiny_spec(arch), 11, HfDtype::F32, 1).unwrap();
    load_model(dir).unwrap()
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 97 + 5) % vocab as u32).collect()
}

/// `x w^T` with plain loops, f64 accumulation.
fn product(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; rows * n];
    for r in 0..rows {
        for o in 0..n {
            y[r * n + o] = (0..k)
                .map(|c| x[r * k + c] as f64 * w[o * k + c] as f64)
                .sum();
        }
    }
    y
}

fn sq_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum()
}

#[test]
fn eps_matches_a_plain_loop_computation() {
    // Qwen3-MoE: each expert's eps over the tokens routed to it, as the forward routes them.
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3Moe,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(arch, dir.path());
        let graph = Graph::build(&model.spec);
        let toks = tokens(48, model.spec.vocab_size);
        let windows = eval::windows(&toks, 16, None).unwrap();
        let formats = [Format::Fp8, Format::Nvfp4, Format::Mxfp4];
        // Both exact methods, the default's per-input choice between them, and the default
        // measuring one format per pass over each stage (as a 150k-vocabulary lm_head is).
        let one_per_pass = EpsOptions {
            quantized_bytes: 1,
            ..EpsOptions::default()
        };
        assert!(formats_per_pass(&graph, 3, 1).iter().all(|&n| n == 1));
        let by_method: Vec<_> = [
            EpsOptions {
                method: WeightOnlyMethod::Gram,
                ..EpsOptions::default()
            },
            EpsOptions {
                method: WeightOnlyMethod::Direct,
                ..EpsOptions::default()
            },
            EpsOptions::default(),
            one_per_pass,
        ]
        .into_iter()
        .map(|options| {
            let (mut done, mut total) = (0, 0);
            let records = measure_eps_with(
                &graph,
                model.weights.as_ref(),
                &windows,
                &formats,
                options,
                &mut CpuForwards,
                &mut |d, t| (done, total) = (d, t),
            )
            .unwrap();
            assert_eq!(done, total, "{options:?}: progress ends at its total");
            records
        })
        .collect();
        assert_eq!(by_method[3], by_method[2], "passes change nothing");
        let records = &by_method[0];
        assert_eq!(records.len(), graph.linears().count(), "every linear");

        // Capture every linear layer's input with an ordinary full-model forward.
        let full = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new()).unwrap();
        let mut inputs: BTreeMap<NodeId, Vec<Mat>> = BTreeMap::new();
        for w in &windows {
            full.execute(w, Run::default(), &mut |id, x, _| {
                inputs.entry(id).or_default().push(x.clone())
            })
            .unwrap();
        }
        let mut routed = 0;
        for (index, record) in records.iter().enumerate() {
            let id = graph.find(&record.name).unwrap();
            let Op::Linear(l) = &graph.node(id).op else {
                panic!("not linear")
            };
            let (n, k) = (l.out_features, l.in_features);
            let w = model.weights.tensor(&l.weight).unwrap().data;
            let seen: Vec<&Mat> = inputs
                .get(&id)
                .map_or(Vec::new(), |xs| xs.iter().filter(|x| x.rows > 0).collect());
            let rows: usize = seen.iter().map(|x| x.rows).sum();
            if l.expert.is_some() && l.kind == fpx::ir::LinearKind::Gate {
                routed += rows;
            }
            assert_eq!(
                record.tokens,
                l.expert.map(|_| rows),
                "{arch:?} {}: experts record their routed tokens",
                record.name
            );
            for f in formats {
                let q = f.fake_quantize_weights(&w, n, k);
                let (mut reference, mut wo, mut wa) = (0.0, 0.0, 0.0);
                for x in &seen {
                    let y = product(&x.data, x.rows, k, &w, n);
                    let mut xq = x.data.clone();
                    f.fake_quantize_activations(&mut xq, x.rows, k);
                    reference += y.iter().map(|v| v * v).sum::<f64>();
                    wo += sq_diff(&y, &product(&x.data, x.rows, k, &q, n));
                    wa += sq_diff(&y, &product(&xq, x.rows, k, &q, n));
                }
                let werr = (w
                    .iter()
                    .zip(&q)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
                    / w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>())
                .sqrt();
                let close = |what: &str, ours: f64, expect: f64, rel: f64| {
                    assert!(
                        (ours - expect).abs() <= rel * expect.abs() + 1e-12,
                        "{arch:?} {} {f} {what}: {ours} vs {expect}",
                        record.name
                    );
                };
                // Weight-only eps comes from f64 Gram matrices: as exact as the f64 loop (the
                // only f32 rounding left is the reference output's); W+A eps is still two f32
                // products apart.
                for (method, records) in by_method.iter().enumerate() {
                    let m = records[index].metrics[&f];
                    let what = |s: &str| format!("{s} (method {method})");
                    // An expert no token reached: the data-free estimate, its weight error.
                    let (eps, eps_wa) = if rows == 0 {
                        (werr, werr)
                    } else {
                        ((wo / reference).sqrt(), (wa / reference).sqrt())
                    };
                    close(&what("eps"), m.eps, eps, 1e-6);
                    close(&what("eps_wa"), m.eps_wa, eps_wa, 1e-4);
                    close(&what("weight_error"), m.weight_error, werr, 1e-6);
                    assert!(m.eps > 0.0 && m.eps_wa >= 0.0);
                }
            }
        }
        // Each token reaches top_k experts of each sparse block (Qwen3-MoE's block 1).
        let sparse = model.spec.moe.as_ref().map_or(0, |m| m.top_k);
        assert_eq!(routed, toks.len() * sparse, "{arch:?}: tokens routed");
    }
}

#[test]
fn kl_pass_equals_eval_of_a_single_layer_plan_weight_only_and_w_plus_a() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(Architecture::Llama, dir.path());
    let graph = Graph::build(&model.spec);
    let toks = tokens(64, model.spec.vocab_size);
    let windows = eval::windows(&toks, 32, None).unwrap();
    let formats = [Format::Nvfp4, Format::Mxfp4];
    let mut records = measure_eps(
        &graph,
        model.weights.as_ref(),
        &windows,
        &formats,
        &mut |_, _| {},
    )
    .unwrap();
    let full = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new()).unwrap();
    measure_kl(
        &graph,
        model.weights.as_ref(),
        &windows,
        &mut records,
        true,
        &mut CpuForwards,
        &mut |_, _| {},
    )
    .unwrap();
    for record in [&records[0], &records[5], &records[13]] {
        for f in formats {
            // Weight-only, and W+A (`--kl-activations`): the layer's input quantized too.
            let m = record.metrics[&f];
            for (p, ours) in [
                (LinearPrecision::weight_only(f), m.kl),
                (LinearPrecision::both(f), m.kl_wa),
            ] {
                let only_this: PrecisionMap = [(record.name.clone(), p)].into();
                let planned = CpuModel::load(&graph, model.weights.as_ref(), &only_this).unwrap();
                let expect = eval::evaluate(&planned, Some(&full), &windows, &mut || {})
                    .unwrap()
                    .kl
                    .unwrap();
                let ours = ours.unwrap();
                assert!(expect > 0.0);
                assert!(
                    (ours - expect).abs() <= 1e-3 * expect,
                    "{} {p}: KL {ours} vs {expect}",
                    record.name
                );
            }
            // Quantizing the activations too changes the output: a distinct measurement.
            assert_ne!(m.kl, m.kl_wa, "{} {f}", record.name);
        }
    }
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn cli_rejects_bad_input_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    tiny(Architecture::Llama, &model_dir);
    let model = model_dir.to_str().unwrap();
    let out = dir.path().join("calib.json");
    let text = write(
        dir.path(),
        "text.txt",
        "the quick brown fox jumps over the lazy dog. "
            .repeat(40)
            .as_bytes(),
    );
    let calibrate = |text: &str, extra: &[&str]| {
        let mut args = vec![
            "calibrate",
            "--model",
            model,
            "--text",
            text,
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        fpx(&args)
    };
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            text.clone(),
            vec!["--formats", "fp8,fp5"],
            "unknown format `fp5`",
        ),
        (
            write(dir.path(), "empty.txt", b" \n"),
            vec![],
            "the text is empty",
        ),
        (
            write(dir.path(), "bin.txt", b"abc\xff"),
            vec![],
            "not UTF-8",
        ),
        (
            text.clone(),
            vec!["--seq-len", "100000", "--windows", "1"],
            "--seq-len 100000 is longer than the model's context of 256 tokens",
        ),
        (
            text.clone(),
            vec!["--seq-len", "40", "--windows", "100"],
            "tokens;",
        ),
        (
            text.clone(),
            vec!["--seq-len", "32", "--windows", "0"],
            "calibration windows",
        ),
        (
            dir.path().join("missing.txt").to_str().unwrap().to_string(),
            vec![],
            "missing.txt",
        ),
    ];
    for (text, extra, expected) in cases {
        let (code, _, stderr) = calibrate(&text, &extra);
        assert_eq!(code, 1, "{extra:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{extra:?}: expected `{expected}` in: {stderr}"
        );
        assert!(!out.exists(), "{extra:?}: an output file was left behind");
    }
    // And a good run writes a file that reads back.
    let (code, stdout, stderr) = calibrate(
        &text,
        &[
            "--seq-len",
            "32",
            "--windows",
            "2",
            "--kl-windows",
            "1",
            "--kl-seq-len",
            "16",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["layers"], 15, "7 per block + lm_head");
    let calib = Calibration::read(&out).unwrap();
    assert_eq!(calib.layers.len(), 15);
    assert!(calib
        .layers
        .iter()
        .all(|l| l.metrics.len() == 3 && l.metrics.values().all(|m| m.kl.is_some())));
}

#[test]
fn calibration_files_of_other_schemas_or_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let model = tiny(Architecture::Llama, &model_dir);
    let text = write(
        dir.path(),
        "text.txt",
        "a b c d e f g h i j k l m n o p ".repeat(30).as_bytes(),
    );
    let out = dir.path().join("calib.json");
    let (code, _, stderr) = fpx(&[
        "calibrate",
        "--model",
        model_dir.to_str().unwrap(),
        "--text",
        &text,
        "--seq-len",
        "32",
        "--windows",
        "1",
        "--kl-windows",
        "0",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let calib = Calibration::read(&out).unwrap();
    calib.check_model(&out, &model.identity).unwrap();
    let err = calib
        .check_model(&out, "another-model")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("calib.json: calibration: made for model"),
        "{err}"
    );

    let mut raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    raw["schema_version"] = 99.into();
    std::fs::write(&out, serde_json::to_vec(&raw).unwrap()).unwrap();
    let err = Calibration::read(&out).unwrap_err().to_string();
    assert!(
        err.contains("schema_version is 99, this fpx reads version 2"),
        "{err}"
    );
    std::fs::write(&out, b"{ not json").unwrap();
    assert!(Calibration::read(&out).is_err());
}

#[test]
fn smollm2_calibrates_all_211_linear_layers() {
    if !have(
        "SmolLM2 and Moby Dick (data/)",
        smollm2().exists() && moby_dick().exists(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2.calib.json");
    let (code, stdout, stderr) = fpx(&[
        "calibrate",
        "--model",
        smollm2().to_str().unwrap(),
        "--text",
        moby_dick().to_str().unwrap(),
        "--seq-len",
        "64",
        "--windows",
        "2",
        "--formats",
        "fp8,nvfp4",
        "--kl-windows",
        "1",
        "--kl-seq-len",
        "16",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("model.layers.29.mlp.down_proj"), "{stdout}");
    let calib = Calibration::read(&out).unwrap();
    assert_eq!(calib.layers.len(), 211, "210 block layers + lm_head");
    assert!(calib
        .layers
        .iter()
        .any(|l| l.name == "lm_head" && l.layer == 30));
    assert_eq!(calib.text.tokens, 128);
    for l in &calib.layers {
        let (fp8, fp4) = (l.metrics[&Format::Fp8], l.metrics[&Format::Nvfp4]);
        // FP8 has 3 mantissa bits against E2M1's 1: it must be the more accurate on every layer.
        assert!(
            fp8.eps < fp4.eps,
            "{}: fp8 eps {} vs nvfp4 {}",
            l.name,
            fp8.eps,
            fp4.eps
        );
        assert!(fp8.weight_error < fp4.weight_error, "{}", l.name);
        assert!(fp4.kl.unwrap() >= 0.0);
    }
}
