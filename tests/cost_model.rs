//! The latency model prices the kernels the schedule really launches: `KernelCost::explain`
//! lists exactly the schedule's steps and entry points, its weight bytes are the bytes the
//! executable plan packs for each layer, its per-layer latencies add up with the fixed part to
//! the explained step, and a cheaper lm_head format lowers a plan's modelled latency. Quantized
//! activations (W8A8) are priced with the quantizing steps their schedule adds, at the
//! tensor-core rate the SASS shows per architecture, and what the kernels cannot run is
//! refused by the layer's name.

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

/// Per-layer latencies under `precision` + the fixed part = the explained step (`rows`).
fn assert_layers_add_up(
    cost: &KernelCost,
    graph: &Graph,
    precision: &PrecisionMap,
    rows: &[fpx::latency::KernelRow],
    what: &str,
) {
    let layers = layer_shapes(graph);
    let planned: f64 = layers
        .iter()
        .map(|l| cost.latency(l, precision[&l.name]).unwrap())
        .sum();
    let step: f64 = rows.iter().map(|r| r.seconds).sum();
    let total = planned + cost.fixed_latency(&layers);
    assert!(
        (total - step).abs() <= 1e-12 * step,
        "{what}: {total} vs {step}"
    );
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
        assert_layers_add_up(&cost, &graph, &precision, &rows, &format!("{gpu:?}"));
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
    let t = |f| {
        cost.latency(&lm_head, LinearPrecision::weight_only(f))
            .unwrap()
    };
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

/// Every linear of `graph` in `p` (lm_head included).
fn all_in(graph: &Graph, p: LinearPrecision) -> PrecisionMap {
    graph
        .linears()
        .map(|(id, _)| (graph.node(id).name.clone(), p))
        .collect()
}

#[test]
fn w8a8_layers_add_up_to_their_schedule_quantizing_steps_included() {
    // The cost model needs the model's shapes only.
    let graph = Graph::build(&tiny_spec(Architecture::Qwen2));
    let w8a8 = LinearPrecision::both(Format::Fp8);
    // All W8A8, and W8A8 only in the MLP (the attention weight-only): the layers reading one
    // input agree in both, which is when the per-layer sum is exact.
    let mlp_only: PrecisionMap = all_in(&graph, w8a8)
        .into_iter()
        .map(|(n, p)| match n.contains(".mlp.") {
            true => (n, p),
            false => (n, LinearPrecision::weight_only(Format::Nvfp4)),
        })
        .collect();
    for (gpu, batch) in [
        (Gpu::H100, 1),
        (Gpu::L40s, 1),
        (Gpu::L40s, 64),
        (Gpu::A100, 8),
    ] {
        let cost = KernelCost::new(gpu, &graph, batch, 32)
            .unwrap()
            .with_act(ActDtype::Bf16);
        let blocks = graph.spec().num_layers;
        // All W8A8: o_proj's input takes a quant_fp8 launch per block; down_proj's is quantized
        // by the SiLU-gate, q/k/v's, gate/up's and lm_head's by their norm.
        for (precision, quant_steps) in [(all_in(&graph, w8a8), blocks), (mlp_only.clone(), 0)] {
            let rows = cost.explain(&precision).unwrap();
            let schedule = Schedule::build(&graph, &precision)
                .unwrap()
                .with_act(ActDtype::Bf16);
            assert_eq!(
                rows.len(),
                schedule.steps.len(),
                "{gpu:?}: one row per step"
            );
            let count = |f: fn(&Step) -> bool| schedule.steps.iter().filter(|s| f(s)).count();
            assert_eq!(count(|s| matches!(s, Step::QuantFp8 { .. })), quant_steps);
            assert_eq!(
                count(|s| matches!(s, Step::SiluMul { quant: true })),
                blocks
            );
            let what = format!("{gpu:?} batch {batch}");
            assert_layers_add_up(&cost, &graph, &precision, &rows, &what);
        }
    }
}

#[test]
fn w8a8_is_priced_at_the_rate_the_sass_shows() {
    let mut spec = tiny_spec(Architecture::Llama);
    (spec.hidden_size, spec.intermediate_size) = (1024, 4096);
    let graph = Graph::build(&spec);
    let up = layer_shapes(&graph)
        .into_iter()
        .find(|l| l.kind == LinearKind::Up)
        .unwrap();
    let fp8 = LinearPrecision::weight_only(Format::Fp8);
    let w8a8 = LinearPrecision::both(Format::Fp8);
    let at = |gpu, batch| {
        let cost = KernelCost::new(gpu, &graph, batch, 32)
            .unwrap()
            .with_act(ActDtype::Bf16);
        let t = |p| cost.latency(&up, p).unwrap();
        (t(fp8), t(w8a8))
    };
    // Prefill-sized steps on sm_89 run the FP8 MMA (QMMA): faster than the 16-bit product a
    // weight-only layer runs.
    let (weight_only, quantized) = at(Gpu::L40s, 2048);
    assert!(
        quantized < 0.8 * weight_only,
        "{quantized} vs {weight_only}"
    );
    // sm_90 lowers the FP8 mma.sync to HMMA: no faster than weight-only (and it pays the
    // input's quantization).
    let (weight_only, quantized) = at(Gpu::H100, 2048);
    assert!(quantized >= weight_only, "{quantized} vs {weight_only}");
    // Batch 1 is bound by the weights' bytes, equal in both (W8A8 reads x in 8 bits and its
    // norm writes the codes: within 1%).
    let (weight_only, quantized) = at(Gpu::H100, 1);
    assert!(
        (quantized / weight_only - 1.0).abs() < 0.01,
        "{quantized} vs {weight_only}"
    );
}

#[test]
fn quantized_activations_the_kernels_cannot_run_are_refused_by_layer() {
    let graph = Graph::build(&tiny_spec(Architecture::Llama));
    let cost = KernelCost::new(Gpu::Rtx5090, &graph, 1, 32).unwrap();
    let down = layer_shapes(&graph)
        .into_iter()
        .find(|l| l.kind == LinearKind::Down)
        .unwrap();
    for p in ["w4a4", "fp8+nvfp4", "mxfp4+mxfp4"] {
        let e = cost
            .latency(&down, p.parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&down.name) && e.contains("W8A8"), "{p}: {e}");
    }
    // A MoE expert's projection: the grouped expert kernels are weight-only.
    let moe = Graph::build(&tiny_spec(Architecture::Qwen3Moe));
    let cost = KernelCost::new(Gpu::Rtx5090, &moe, 1, 32).unwrap();
    let expert = layer_shapes(&moe)
        .into_iter()
        .find(|l| l.name.contains(".experts."))
        .unwrap();
    let w8a8 = LinearPrecision::both(Format::Fp8);
    let e = cost.latency(&expert, w8a8).unwrap_err().to_string();
    assert!(e.contains(&expert.name) && e.contains("W8A8"), "{e}");
    let weight_only = LinearPrecision::weight_only(Format::Fp8);
    assert!(cost.latency(&expert, weight_only).is_ok());
}
