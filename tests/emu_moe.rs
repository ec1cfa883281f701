//! Mixture-of-experts plans on the generated kernels: a tiny Qwen3-MoE (a dense block and a
//! MoE block, top-2 of 4 experts, renormalised) and a tiny Mixtral (top-2 of 4, not
//! renormalised), each in a mixed FP8/FP4 plan (FP8 attention, NVFP4 expert gate/up, MXFP4
//! expert down), on FP32 and BF16 activations: the emu backend (routing, grouped expert GEMVs,
//! SiLU-gate over the routed pairs and the combine, run by the CUDA emulator) against the cpu
//! backend, step by step (each MoE block's output within a tolerance; Mixtral's experts also
//! in FP8 and FP16, so every weight format runs grouped) and as whole passes
//! (prefill logits within a tolerance, identical greedy tokens); a plan that gives one
//! block's experts different formats is refused by name.
//!
//! Needs g++ and the CUDA header wheels in .venv (skipped without, failing under
//! FPX_REQUIRE_DATA=1).

mod common;

use common::emu_probe::emu_opts;
use fpx::formats::Format;
use fpx::lower::{ActDtype, Arch, LinearPrecision, Step};
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::Architecture;
use fpx::runtime::emu::EmuBackend;
use fpx::runtime::exec::{compare_steps, CpuBackend, ExecutablePlan};

#[test]
fn emu_moe_plans_give_the_cpu_backends_tokens_and_block_outputs() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (arch, dtype) in [
        (Architecture::Qwen3Moe, HfDtype::F32),
        (Architecture::Qwen3Moe, HfDtype::BF16),
        (Architecture::Mixtral, HfDtype::BF16),
    ] {
        let path = dir.path().join(format!("tiny-{arch:?}-{dtype:?}"));
        write_hf_checkpoint(&path, &tiny_spec(arch), 7, dtype, 1).unwrap();

        // Kernel by kernel: each step (a MoE block as a whole) on the cpu backend's inputs.
        let model = fpx::model::load_model(&path).unwrap();
        let graph = fpx::ir::Graph::build(&model.spec);
        let act = ActDtype::of_checkpoint(&graph, model.weights.as_ref());
        // Step by step, Mixtral's experts also in FP8 (gate/up) and FP16 (down), attention in
        // MXFP4: every weight format through the grouped GEMV.
        let precision = match arch {
            Architecture::Mixtral => other_formats(&graph),
            _ => common::mixed_precision(&graph),
        };
        let plan =
            ExecutablePlan::build(&graph, model.weights.as_ref(), &precision, 24, act).unwrap();
        assert!(!plan.schedule.moes.is_empty());
        let mut cpu = CpuBackend::new(&plan);
        let mut emu = EmuBackend::new(&plan, &opts).unwrap();
        let tokens: Vec<u32> = (0..13u32).map(|i| (i * 17 + 3) % 256).collect();
        let steps = compare_steps(&plan, &mut cpu, &mut emu, &tokens, 0).unwrap();
        let tol = 1e-4f32.max(4.0 * act.ulp());
        let mut moe_steps = 0;
        for c in &steps {
            if matches!(c.step, Step::Moe { .. }) {
                moe_steps += 1;
                let gate = if arch == Architecture::Mixtral {
                    "expert_gemv_fp8"
                } else {
                    "expert_gemv_nvfp4"
                };
                assert!(
                    c.kernel.contains("moe_route") && c.kernel.contains(gate),
                    "{}",
                    c.kernel
                );
            }
            assert!(
                c.rel() <= tol,
                "{arch:?} {act} step {} ({}): relative error {}",
                c.index,
                c.kernel,
                c.rel()
            );
        }
        assert_eq!(moe_steps, plan.schedule.moes.len());

        // Whole passes: prefill logits and greedy tokens.
        common::compare_with_cpu(&path, None, 6, 1e-3, |plan| {
            Box::new(EmuBackend::new(plan, &opts).unwrap())
        });
    }
}

/// FP8 expert gate/up, FP16 expert down, MXFP4 everything else.
fn other_formats(graph: &fpx::ir::Graph) -> fpx::lower::PrecisionMap {
    use fpx::ir::LinearKind;
    let mut map = fpx::lower::PrecisionMap::new();
    for (id, l) in graph.linears() {
        let f = match (l.expert.is_some(), l.kind) {
            (true, LinearKind::Gate | LinearKind::Up) => Format::Fp8,
            (true, _) => Format::Fp16,
            _ => Format::Mxfp4,
        };
        map.insert(graph.node(id).name.clone(), LinearPrecision::weight_only(f));
    }
    map
}

#[test]
fn split_expert_formats_are_refused_by_the_kernel_backends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    write_hf_checkpoint(
        &path,
        &tiny_spec(Architecture::Qwen3Moe),
        7,
        HfDtype::F32,
        1,
    )
    .unwrap();
    let model = fpx::model::load_model(&path).unwrap();
    let graph = fpx::ir::Graph::build(&model.spec);
    let mut precision = common::mixed_precision(&graph);
    let name = "model.layers.1.mlp.experts.2.down_proj";
    precision.insert(name.into(), LinearPrecision::weight_only(Format::Fp8));
    let err = ExecutablePlan::build(&graph, model.weights.as_ref(), &precision, 8, ActDtype::F32)
        .err()
        .expect("split formats are refused")
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.gate") && err.contains(name) && err.contains("fp8"),
        "{err}"
    );
}
