//! 16-bit activations and KV cache (`lower::ActDtype`):
//! - the CPU interpreter run at 16 bits (`CpuModel::with_act`) and the cpu backend of a 16-bit
//!   executable plan compute the same values (same ops, same rounding points), so comparisons
//!   of kernels against the CPU stay tight at 16 bits too;
//! - the distance of BF16 and FP16 execution to the FP32 reference on SmolLM2, stated in the
//!   README: mean KL divergence of the next-token distributions, top-1 agreement and the
//!   largest logit difference over a window of real text.

mod common;

use common::{have, moby_dick, rel_err, smollm2};
use fpx::ir::Graph;
use fpx::lower::{ActDtype, PrecisionMap};
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::{load_model, Architecture};
use fpx::runtime::cpu::{CpuModel, Mat};
use fpx::runtime::exec::{generate, greedy_reference, Backend, CpuBackend, ExecutablePlan};

#[test]
fn interpreter_and_cpu_backend_agree_at_16_bits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Qwen2), 3, GgmlDType::F32).unwrap();
    let model = load_model(&path).unwrap();
    let graph = Graph::build(&model.spec);
    let map = common::mixed_precision(&graph);
    let prompt: Vec<u32> = (0..10u32).map(|i| (i * 31 + 7) % 300).collect();
    for act in [ActDtype::Bf16, ActDtype::F16] {
        let reference = CpuModel::load(&graph, model.weights.as_ref(), &map)
            .unwrap()
            .with_act(act);
        let logits = reference.forward(&prompt).unwrap();
        let plan =
            ExecutablePlan::build(&graph, model.weights.as_ref(), &map, prompt.len() + 6, act)
                .unwrap();
        let mut cpu = CpuBackend::new(&plan);
        cpu.forward(&prompt, 0).unwrap();
        let got = cpu.logits().unwrap();
        let want = logits.row(logits.rows - 1);
        // Every value the two store is rounded to `act` at the same points; only summation
        // orders inside attention differ, which can move a value to a neighbouring 16-bit
        // number: one unit in the last place.
        let err = rel_err(&got, want);
        assert!(err <= 4.0 * act.ulp(), "{act}: logits differ by {err}");
        assert!(
            got.iter().all(|&v| act.round(v) == v),
            "{act}: the backend's logits are not {act} values"
        );
        let mut cpu = CpuBackend::new(&plan);
        let tokens = generate(&mut cpu, &prompt, 6, &[]).unwrap().tokens;
        assert_eq!(
            tokens,
            greedy_reference(&reference, &prompt, 6).unwrap(),
            "{act}"
        );
    }
}

/// Softmax of a row, in f64.
fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// (mean KL(reference || test), top-1 agreement, largest logit difference relative to the
/// largest reference logit) over every position.
fn distance(reference: &Mat, test: &Mat) -> (f64, f64, f32) {
    let (mut kl, mut agree, mut rel) = (0.0, 0usize, 0f32);
    for r in 0..reference.rows {
        let (p, q) = (softmax(reference.row(r)), softmax(test.row(r)));
        kl += p
            .iter()
            .zip(&q)
            .filter(|(&p, _)| p > 0.0)
            .map(|(&p, &q)| p * (p / q.max(1e-300)).ln())
            .sum::<f64>();
        let top = |v: &[f32]| fpx::runtime::cpu::kernels::argmax(v);
        agree += usize::from(top(reference.row(r)) == top(test.row(r)));
        rel = rel.max(rel_err(test.row(r), reference.row(r)));
    }
    let n = reference.rows as f64;
    (kl / n, agree as f64 / n, rel)
}

#[test]
fn sixteen_bit_execution_stays_close_to_the_fp32_reference_on_smollm2() {
    if !have(
        "SmolLM2 and the text corpus (make fetch)",
        smollm2().exists() && moby_dick().exists(),
    ) {
        return;
    }
    let model = load_model(&smollm2()).unwrap();
    let text = std::fs::read_to_string(moby_dick()).unwrap();
    let tokens = model.tokenizer.encode(&text[..4000]).unwrap();
    let window = &tokens[..192.min(tokens.len())];
    let graph = Graph::build(&model.spec);
    let fp32 = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new()).unwrap();
    let reference = fp32.forward(window).unwrap();
    for (act, max_kl, min_agree) in [(ActDtype::Bf16, 3e-3, 0.92), (ActDtype::F16, 2e-4, 0.98)] {
        let model16 = CpuModel::load(&graph, model.weights.as_ref(), &PrecisionMap::new())
            .unwrap()
            .with_act(act);
        let (kl, agree, rel) = distance(&reference, &model16.forward(window).unwrap());
        eprintln!(
            "SmolLM2, {} tokens, {act} vs FP32: mean KL {kl:.2e} nats, top-1 agreement {:.1}%, \
             largest logit difference {rel:.2e} of the largest logit",
            window.len(),
            100.0 * agree
        );
        assert!(kl <= max_kl, "{act}: mean KL {kl}");
        assert!(agree >= min_agree, "{act}: top-1 agreement {agree}");
        assert!(
            kl > 0.0,
            "{act}: no difference at all: the rounding did not run"
        );
    }
}
