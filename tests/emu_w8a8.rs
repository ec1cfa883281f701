//! W8A8 (FP8 weights x FP8 activations quantized per token on the fly) on every backend:
//! - the schedule: the quantization fused into the RMSNorm that produces a W8A8 layer's input,
//!   else a `QuantFp8` step before the layer, once per buffer (q/k/v and gate/up share one);
//!   layer precisions the kernels cannot run are refused by name;
//! - the cpu backend of a W8A8 plan equals the CPU interpreter's W+A mode (the reference
//!   calibration's `eps_wa` measures);
//! - on the emulator, against the cpu backend: the W8A8 GEMVs (`_m1`, `_m8`), the GEMM on the
//!   FP8 tensor cores (`mma.sync` m16n8k32 E4M3, sm_90 and sm_120a) and on SIMT FP32 (sm_80,
//!   no FP8 MMA), on aligned and unaligned shapes; tiny models step by step, the quantizing
//!   steps exact (the same codes and scales) and the same greedy tokens;
//! - broken variants that must be caught: the GEMM's B fragments transposed, the activation
//!   scale dropped from its epilogue, and the quantizer's scale off by one part in 448.
//!
//! The emulator tests need g++ and the CUDA header wheels in .venv (`make tools`): skipped
//! with a printed reason without them, failing under FPX_REQUIRE_DATA=1.

mod common;

use fpx::codegen::Renderer;
use fpx::formats::Format;
use fpx::ir::{Graph, LinearKind};
use fpx::lower::{
    ActDtype, Arch, KernelSpec, LinearPrecision, LinearShape, PrecisionMap, Schedule, Step,
    WeightFormat,
};
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::{load_model, Architecture};
use fpx::runtime::cpu::CpuModel;
use fpx::runtime::emu::{EmuBackend, EmuKernels, EmuOptions};
use fpx::runtime::exec::{
    compare_steps, generate, reference_linear, Backend, CpuBackend, ExecutablePlan, PackedLinear,
};
use fpx::runtime::launch::run_linear;

use common::emu_probe::emu_opts;
use common::{break_once, embedded, rel_err};

const W8A8: LinearPrecision = LinearPrecision {
    weights: Format::Fp8,
    activations: Some(Format::Fp8),
};

/// Every linear layer W8A8 (`all`), else a mix: q weight-only FP8 with k/v W8A8 (a quantizing
/// step after q), o_proj and gate W8A8, up NVFP4, down MXFP4, lm_head FP16.
fn w8a8_map(graph: &Graph, all: bool) -> PrecisionMap {
    let mut map = PrecisionMap::new();
    for (id, l) in graph.linears() {
        let p = match l.kind {
            _ if all => W8A8,
            LinearKind::Q => LinearPrecision::weight_only(Format::Fp8),
            LinearKind::Up => LinearPrecision::weight_only(Format::Nvfp4),
            LinearKind::Down => LinearPrecision::weight_only(Format::Mxfp4),
            LinearKind::LmHead => LinearPrecision::weight_only(Format::Fp16),
            _ => W8A8,
        };
        map.insert(graph.node(id).name.clone(), p);
    }
    map
}

fn tiny_llama(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("model.gguf");
    write_gguf(&p, &tiny_spec(Architecture::Llama), 11, GgmlDType::F32).unwrap();
    p
}

#[test]
fn the_schedule_quantizes_each_w8a8_input_once_fused_where_a_norm_or_silu_produces_it() {
    let graph = Graph::build(&tiny_spec(Architecture::Llama));
    let quantizing = |s: &Schedule| -> Vec<String> {
        (s.steps.iter())
            .filter_map(|st| match *st {
                Step::RmsNorm {
                    quant: true,
                    last_row,
                    ..
                } => Some(if last_row { "norm(last)" } else { "norm" }.to_string()),
                Step::QuantFp8 { src } => Some(format!("{src:?}")),
                Step::SiluMul { quant: true } => Some("silu".to_string()),
                _ => None,
            })
            .collect()
    };
    let all = Schedule::build(&graph, &w8a8_map(&graph, true)).unwrap();
    let blocks = graph.spec().num_layers;
    let mut want = Vec::new();
    for _ in 0..blocks {
        // o_proj's input by a quant_fp8 launch, down_proj's by the SiLU-gate.
        want.extend(["norm", "Att", "norm", "silu"].map(String::from));
    }
    want.push("norm(last)".into());
    assert_eq!(quantizing(&all), want);
    let mixed = Schedule::build(&graph, &w8a8_map(&graph, false)).unwrap();
    let mut want = Vec::new();
    for _ in 0..blocks {
        want.extend(["Xn", "Att", "norm"].map(String::from));
    }
    assert_eq!(quantizing(&mixed), want);
    mixed.check_kernels().unwrap();
    let w8a8_kernels = (mixed.kernels().into_iter())
        .filter(|k| matches!(k, KernelSpec::Gemv(s) | KernelSpec::Gemm(s) if s.w8a8))
        .count();
    assert!(w8a8_kernels >= 6, "{w8a8_kernels}");

    // What the kernels cannot run is refused by layer name.
    for (weights, activations) in [(Format::Nvfp4, Format::Fp8), (Format::Fp8, Format::Mxfp4)] {
        let mut map = w8a8_map(&graph, false);
        let name = "model.layers.1.mlp.down_proj";
        map.insert(
            name.into(),
            LinearPrecision {
                weights,
                activations: Some(activations),
            },
        );
        let err = Schedule::build(&graph, &map)
            .unwrap()
            .check_kernels()
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains("W8A8"), "{err}");
    }
}

#[test]
fn the_cpu_backend_of_a_w8a8_plan_is_the_cpu_reference_w_plus_a() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&tiny_llama(dir.path())).unwrap();
    let graph = Graph::build(&model.spec);
    let tokens: Vec<u32> = (0..9u32).map(|t| (t * 37 + 5) % 256).collect();
    for all in [true, false] {
        let map = w8a8_map(&graph, all);
        let reference = CpuModel::load(&graph, model.weights.as_ref(), &map).unwrap();
        let want = reference.forward(&tokens).unwrap();
        let last = &want.data[(tokens.len() - 1) * want.cols..];
        let plan =
            ExecutablePlan::build(&graph, model.weights.as_ref(), &map, 16, ActDtype::F32).unwrap();
        let mut cpu = CpuBackend::new(&plan);
        cpu.forward(&tokens, 0).unwrap();
        let err = rel_err(&cpu.logits().unwrap(), last);
        assert!(err <= 1e-5, "all W8A8 {all}: logits relative error {err}");
        // Quantizing activations changes the result: the check is not of a weight-only plan.
        let weight_only: PrecisionMap = (map.iter())
            .map(|(n, p)| (n.clone(), LinearPrecision::weight_only(p.weights)))
            .collect();
        let wo = CpuModel::load(&graph, model.weights.as_ref(), &weight_only).unwrap();
        let wo = wo.forward(&tokens).unwrap();
        let moved = rel_err(&wo.data[(tokens.len() - 1) * wo.cols..], last);
        assert!(
            moved > 1e-4,
            "activation quantization moved nothing ({moved})"
        );
    }
}

const SHAPES: [(usize, usize, bool, bool); 3] = [
    (192, 576, true, false),
    (40, 96, false, true),
    (33, 70, true, true),
];
const ROWS: [usize; 5] = [1, 3, 8, 20, 70];

fn shape(n: usize, k: usize, bias: bool, accumulate: bool, act: ActDtype) -> LinearShape {
    LinearShape {
        format: WeightFormat::Fp8,
        n,
        k,
        bias,
        accumulate,
        act,
        w8a8: true,
    }
}

fn build(renderer: &Renderer, specs: &[KernelSpec], opts: &EmuOptions) -> EmuKernels {
    let sources = (specs.iter())
        .map(|s| renderer.render(s, opts.arch))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    EmuKernels::from_sources(&sources, opts).unwrap()
}

/// Relative error of every (shape, rows) W8A8 launch on `act` with `kernels` against the cpu
/// backend's linear on the same packed bytes and the same quantized activations.
fn linear_errors(kernels: &EmuKernels, act: ActDtype) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    for (n, k, bias, accumulate) in SHAPES {
        let s = shape(n, k, bias, accumulate, act);
        for rows in ROWS {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
                .collect();
            let x: Vec<f32> = (0..rows * k)
                .map(|i| (i * 104729 % 997) as f32 / 997.0 - 0.5)
                .collect();
            let y0: Vec<f32> = (0..rows * n).map(|i| (i % 3) as f32).collect();
            let b = bias.then(|| (0..n).map(|i| i as f32 * 0.01).collect::<Vec<f32>>());
            let packed = PackedLinear::pack(WeightFormat::Fp8, &w, n, k, b, None);
            let got = run_linear(kernels, s, &packed, &x, rows, &y0).unwrap();
            let want = reference_linear(&packed, &s, &x, rows, &y0);
            out.push((format!("{n}x{k} rows {rows} ({act})"), rel_err(&got, &want)));
        }
    }
    out
}

fn specs(act: ActDtype) -> Vec<KernelSpec> {
    (SHAPES.iter())
        .flat_map(|&(n, k, b, a)| {
            let s = shape(n, k, b, a, act);
            [KernelSpec::Gemv(s), KernelSpec::Gemm(s)]
        })
        .collect()
}

fn tol(act: ActDtype) -> f32 {
    1e-5 + act.ulp()
}

#[test]
fn emu_w8a8_linear_kernels_match_the_cpu_backend() {
    for (arch, act) in [
        (Arch::Sm90, ActDtype::F32),
        (Arch::Sm90, ActDtype::Bf16),
        (Arch::Sm120a, ActDtype::F16),
        (Arch::Sm80, ActDtype::Bf16),
    ] {
        let Some(opts) = emu_opts(arch) else { return };
        let kernels = EmuKernels::load(&specs(act), &opts).unwrap();
        let gemm = KernelSpec::Gemm(shape(40, 96, false, true, act));
        let path = gemm.path(arch).name();
        // The cost model's path is the SASS's (tests/sass.rs): sm_90 lowers the FP8 MMA to HMMA.
        let want = match arch {
            Arch::Sm80 => "simt_f32",
            Arch::Sm90 => "tensor_f16",
            _ => "tensor_fp8",
        };
        assert_eq!(path, want, "{arch:?}");
        let mut worst = 0f32;
        for (what, err) in linear_errors(&kernels, act) {
            assert!(err <= tol(act), "{arch:?} {what}: relative error {err}");
            worst = worst.max(err);
        }
        eprintln!(
            "{arch:?} {act}: W8A8 linears within {worst:.2e} (tolerance {:.2e}; GEMM {path})",
            tol(act)
        );
    }
}

#[test]
fn emu_catches_broken_w8a8_gemms() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let gemm = embedded(&fpx::codegen::TEMPLATES, "gemm.cu.tera");
    let broken = [
        // B fragments with rows and columns swapped.
        break_once(
            gemm,
            "fpx::ldmatrix<4, false>(q, wt",
            "fpx::ldmatrix<4, true>(q, wt",
        ),
        // The activation scale never applied on the tensor-core path.
        break_once(gemm, "acc[i][j][r] * __ldg(xs + gm)", "acc[i][j][r]"),
    ];
    for template in &broken {
        let renderer = Renderer::with_overrides(&[("gemm.cu.tera", template)]).unwrap();
        let kernels = build(&renderer, &specs(ActDtype::Bf16), &opts);
        for (what, err) in linear_errors(&kernels, ActDtype::Bf16) {
            // GEMM launches (20, 70 rows) must be caught; the GEMVs are not broken.
            if what.contains("rows 20 ") || what.contains("rows 70 ") {
                assert!(err > 1e-2, "{what}: broken GEMM not caught ({err})");
            } else {
                assert!(err <= tol(ActDtype::Bf16), "{what}: {err}");
            }
        }
    }
}

/// Per entry point, the largest relative error over three passes (12 rows: GEMM; 3: `_m8`;
/// 1: `_m1`) of the tiny Llama under `map`, step by step on the cpu backend's inputs; and
/// whether the two backends generate the same 6 greedy tokens.
fn step_errors(
    map_all: bool,
    act: ActDtype,
    renderer: &Renderer,
    opts: &EmuOptions,
) -> Vec<(String, f32)> {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&tiny_llama(dir.path())).unwrap();
    let graph = Graph::build(&model.spec);
    let map = w8a8_map(&graph, map_all);
    let plan = ExecutablePlan::build(&graph, model.weights.as_ref(), &map, 24, act).unwrap();
    let kernels = || build(renderer, &plan.schedule.kernels(), opts);
    let mut cpu = CpuBackend::new(&plan);
    let mut emu = EmuBackend::with_kernels(&plan, kernels()).unwrap();
    let tokens: Vec<u32> = (0..16u32).map(|t| (t * 97 + 13) % 256).collect();
    let mut out = Vec::new();
    for (from, to) in [(0, 12), (12, 15), (15, 16)] {
        for c in compare_steps(&plan, &mut cpu, &mut emu, &tokens[from..to], from).unwrap() {
            out.push((c.kernel.clone(), c.rel()));
        }
    }
    let want = generate(&mut CpuBackend::new(&plan), &tokens[..7], 6, &[]).unwrap();
    let mut emu = EmuBackend::with_kernels(&plan, kernels()).unwrap();
    let got = generate(&mut emu, &tokens[..7], 6, &[]).unwrap();
    out.push((
        "greedy tokens".into(),
        if got.tokens == want.tokens { 0.0 } else { 1.0 },
    ));
    out
}

#[test]
fn emu_w8a8_models_match_the_cpu_backend_step_by_step() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let renderer = Renderer::new().unwrap();
    let mut entries = std::collections::BTreeSet::new();
    for (all, act) in [
        (true, ActDtype::F32),
        (false, ActDtype::Bf16),
        (true, ActDtype::Bf16),
    ] {
        for (kernel, err) in step_errors(all, act, &renderer, &opts) {
            // The quantizing steps compute the same codes and scales as the cpu backend; so do
            // RMSNorm and SiLU-gate (exact in every run of tests/emu_kernels.rs).
            let exact = [
                "quant_fp8",
                "rmsnorm",
                "silu",
                "embedding",
                "rope",
                "argmax",
                "greedy",
            ]
            .iter()
            .any(|f| kernel.starts_with(f));
            if exact {
                assert_eq!(err, 0.0, "{kernel} (all W8A8 {all}, {act}): not exact");
            } else {
                assert!(err <= tol(act), "{kernel} (all W8A8 {all}, {act}): {err}");
            }
            entries.insert(kernel);
        }
    }
    for want in [
        "rmsnorm_64_qfp8",
        "quant_fp8_64",
        "silu_mul_128_qfp8",
        "silu_mul_128_qfp8_abf16",
        "gemm_fp8_64x64_w8a8",
        "gemv_fp8_64x64_w8a8_m1",
        "gemv_fp8_64x64_w8a8_m8",
        "gemm_fp8_64x64_w8a8_abf16",
    ] {
        assert!(entries.contains(want), "no {want} launch in {entries:?}");
    }
}

#[test]
fn emu_catches_a_wrong_quantization_scale() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let formats = break_once(
        embedded(&fpx::codegen::HEADERS, "fpx_formats.cuh"),
        "block_max<THREADS>(amax, scratch) / 448.f",
        "block_max<THREADS>(amax, scratch) / 447.f",
    );
    let renderer = Renderer::with_overrides(&[("fpx_formats.cuh", &formats)]).unwrap();
    let errors = step_errors(true, ActDtype::F32, &renderer, &opts);
    let caught = (errors.iter())
        .filter(|(k, e)| (k.starts_with("quant_fp8") || k.starts_with("rmsnorm")) && *e > 1e-4)
        .count();
    assert!(caught > 0, "a scale of amax/447 was not caught: {errors:?}");
}

/// A plan with W8A8 layers (`"activations": "fp8"`, the plan schema's field) runs on the CLI:
/// `fpx run` on the cpu and emu backends gives the same tokens, `fpx codegen` writes the
/// quantizing kernels, and a precision the kernels cannot run fails with the layer's name.
#[test]
fn a_w8a8_plan_runs_on_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let spec = tiny_spec(Architecture::Llama);
    fpx::model::synthetic::write_hf_checkpoint(
        &model,
        &spec,
        3,
        fpx::model::synthetic::HfDtype::BF16,
        1,
    )
    .unwrap();
    let graph = Graph::build(&spec);
    let layers: Vec<serde_json::Value> = (w8a8_map(&graph, false).iter())
        .map(|(name, p)| {
            let mut l = serde_json::json!({"name": name, "format": p.weights});
            if let Some(a) = p.activations {
                l["activations"] = serde_json::json!(a);
            }
            l
        })
        .collect();
    let plan = dir.path().join("plan.json");
    let write = |layers: &[serde_json::Value]| {
        let json = serde_json::json!({"schema_version": 2, "layers": layers});
        std::fs::write(&plan, json.to_string()).unwrap();
    };
    write(&layers);
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = |backend: &str| -> (i32, serde_json::Value, String) {
        let (code, out, err) = common::fpx(&[
            "run",
            "--model",
            &s(&model),
            "--plan",
            &s(&plan),
            "--prompt",
            "Call me Ishmael. Some years ago",
            "--max-tokens",
            "5",
            "--backend",
            backend,
            "--json",
        ]);
        (code, serde_json::from_str(&out).unwrap_or_default(), err)
    };
    let (code, cpu, err) = run("cpu");
    assert_eq!(code, 0, "{err}");
    assert_eq!(cpu["tokens"].as_array().unwrap().len(), 5, "{cpu}");
    if emu_opts(Arch::Sm90).is_some() {
        let (code, emu, err) = run("emu");
        assert_eq!(code, 0, "{err}");
        assert_eq!(emu["tokens"], cpu["tokens"]);
    }
    let cg = dir.path().join("cg");
    let (code, _, err) = common::fpx(&[
        "codegen",
        "--model",
        &s(&model),
        "--plan",
        &s(&plan),
        "-o",
        &s(&cg),
        "--no-compile",
    ]);
    assert_eq!(code, 0, "{err}");
    let files: Vec<String> = (std::fs::read_dir(&cg).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for want in [
        "rmsnorm_64_qfp8_abf16.cu",
        "quant_fp8_64_abf16.cu",
        "gemm_fp8_32x64_w8a8_abf16.cu",
    ] {
        assert!(files.iter().any(|f| f == want), "no {want} in {files:?}");
    }
    // NVFP4 weights with FP8 activations: the CPU reference runs them, the kernels do not.
    let mut bad = layers.clone();
    bad[0]["format"] = serde_json::json!("nvfp4");
    bad[0]["activations"] = serde_json::json!("fp8");
    write(&bad);
    let (code, _, err) = run("cpu");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(bad[0]["name"].as_str().unwrap()) && err.contains("W8A8"),
        "{err}"
    );
}
