//! The latency model prices the kernels the schedule really launches: `KernelCost::explain`
//! lists exactly the schedule's steps and entry points, its weight bytes are the bytes the
//! executable plan packs for each layer, its per-layer latencies add up with the fixed part to
//! the explained step, and a cheaper lm_head format lowers a plan's modelled latency.

mod common;

use fpx::formats::Format;
use fpx::ir::{Graph, LinearKind};
use fpx::latency::{Gpu, KernelCost, LatencyModel, LayerShape};
use fpx::lower::{ActDtype, LinearPrecision, PrecisionMap, Schedule, Step};
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::{load_model, Architecture};
use fpx::runtime::exec::ExecutablePlan;

fn layer_shapes(graph: &Graph) -> Vec<LayerShape> {
    graph
        .linears()
        .map(|(id, l)| LayerShape {
            name: graph.node(id).name.clone(),
            layer: graph.node(id).layer.unwrap_or(graph.spec().num_layers),
            kind: l.kind,
            out_features: l.out_features,
            in_features: l.in_features,
        })
        .collect()
}

#[test]
fn explained_kernels_are_the_schedules_and_their_bytes_the_packed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Qwen2), 5, GgmlDType::F32).unwrap();
    let model = load_model(&path).unwrap();
    let graph = Graph::build(&model.spec);
    let precision = common::mixed_precision(&graph);
    // BF16 activations and KV cache, as `fpx run` executes a BF16 checkpoint.
    let act = ActDtype::Bf16;
    let schedule = Schedule::build(&graph, &precision).unwrap().with_act(act);
    let plan = ExecutablePlan::build(&graph, model.weights.as_ref(), &precision, 64, act).unwrap();
    assert_eq!(plan.schedule.kernels(), schedule.kernels());
    for gpu in [Gpu::H100, Gpu::Rtx5090] {
        let cost = KernelCost::new(gpu, &graph, 1, 32).unwrap().with_act(act);
        let rows = cost.explain(&precision).unwrap();
        assert_eq!(rows.len(), schedule.steps.len(), "one launch per step");
        for (row, step) in rows.iter().zip(&schedule.steps) {
            assert_eq!(row.kernel, schedule.entry_of(step, 1), "step {}", row.step);
            assert!(
                row.seconds >= row.bound_seconds,
                "{}: fpx beats the chip",
                row.kernel
            );
            let Step::Linear { linear, .. } = *step else {
                continue;
            };
            let slot = &schedule.linears[linear];
            let packed = &plan.linears[linear];
            let (n, k) = (slot.shape.n, slot.shape.k);
            // The executable plan's codes + scales, the NVFP4 tensor scale, the FP32 bias.
            let tensor_scale = if slot.shape.format.name() == "nvfp4" {
                4
            } else {
                0
            };
            let bias = packed.bias.as_ref().map_or(0, |b| 4 * b.len());
            let weights = packed.weight_bytes() + tensor_scale + bias;
            let outputs = if slot.shape.accumulate { 2 } else { 1 };
            let acts = 2 * (k + outputs * n);
            assert_eq!(row.work.bytes, (weights + acts) as f64, "{}", slot.name);
            assert_eq!(row.layer.as_deref(), Some(slot.name.as_str()));
        }
        // Per-layer latencies + the fixed part = the explained step.
        let layers = layer_shapes(&graph);
        let planned: f64 = layers
            .iter()
            .map(|l| cost.latency(l, precision[&l.name].weights).unwrap())
            .sum();
        let step: f64 = rows.iter().map(|r| r.seconds).sum();
        let total = planned + cost.fixed_latency(&layers);
        assert!((total - step).abs() <= 1e-12 * step, "{total} vs {step}");
    }
}

#[test]
fn a_cheaper_lm_head_lowers_the_modelled_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut spec = tiny_spec(Architecture::Llama);
    spec.vocab_size = 4096;
    write_gguf(&path, &spec, 7, GgmlDType::F32).unwrap();
    let graph = Graph::build(&load_model(&path).unwrap().spec);
    let cost = KernelCost::new(Gpu::H100, &graph, 1, 128).unwrap();
    let lm_head = layer_shapes(&graph)
        .into_iter()
        .find(|l| l.kind == LinearKind::LmHead)
        .unwrap();
    let t = |f| cost.latency(&lm_head, f).unwrap();
    assert!(t(Format::Nvfp4) < t(Format::Fp8) && t(Format::Fp8) < t(Format::Fp16));
    let step = |f: Format| {
        let mut map = PrecisionMap::new();
        map.insert("lm_head".into(), LinearPrecision::weight_only(f));
        cost.explain(&map)
            .unwrap()
            .iter()
            .map(|r| r.seconds)
            .sum::<f64>()
    };
    assert!(step(Format::Fp8) < step(Format::Fp16));
    // A layer the model lacks is refused by name.
    let mut bad = PrecisionMap::new();
    bad.insert(
        "model.layers.99.mlp.up_proj".into(),
        LinearPrecision::weight_only(Format::Fp8),
    );
    let e = cost.explain(&bad).unwrap_err().to_string();
    assert!(e.contains("model.layers.99.mlp.up_proj"), "{e}");
}
