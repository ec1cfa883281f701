//! The generated kernels run on the CPU by the CUDA emulator (`runtime::emu`), checked kernel
//! by kernel against the cpu backend, with FP32 and with 16-bit (BF16, FP16) activations and KV
//! cache:
//! - every linear kernel (GEMV `_m1`, `_m8`, GEMM) in every format on shapes that are and are
//!   not multiples of the block and tile sizes, on the same packed bytes;
//! - every kernel family (embedding, RMSNorm, RoPE + KV store, attention, SiLU-gate, the
//!   linear kernels in fp8/fp16/nvfp4/mxfp4, argmax) inside five synthetic models of unaligned
//!   shapes, step by step on identical inputs (`exec::compare_steps`): exact where the
//!   arithmetic is the same, within 1e-5 of the largest output where the summation order
//!   differs; two of them Qwen3 (the RoPE step with q/k norms, heads of 16 and 48: a block of
//!   one warp with idle lanes) with sliding windows (6 positions on one layer; 5 on every
//!   layer), so windowed attention runs beside full attention;
//! - deliberately broken variants the comparisons must catch: the GEMV's tail loop one load
//!   short, the FP4 nibble order swapped (in the decoders of kernels/fpx_formats.cuh and in the
//!   GEMM), attention's causal mask one position short, its window one position short, and
//!   q's norm applied with k's weight.
//!
//! Needs g++ and the CUDA header wheels in .venv (`make tools`): skipped with a printed reason
//! without them, failing under FPX_REQUIRE_DATA=1.

mod common;

use fpx::codegen::Renderer;
use fpx::ir::Graph;
use fpx::lower::{ActDtype, Arch, KernelSpec, LinearShape, WeightFormat};
use fpx::model::synthetic::{tiny_spec, write_gguf, write_hf_checkpoint, GgmlDType, HfDtype};
use fpx::model::{load_model, Architecture, ModelSpec, SlidingWindow};
use fpx::runtime::emu::{EmuBackend, EmuKernels, EmuOptions};
use fpx::runtime::exec::{
    compare_steps, reference_linear, CpuBackend, ExecutablePlan, PackedLinear,
};
use fpx::runtime::launch::run_linear;

use common::emu_probe::emu_opts;
use common::{break_once, embedded, rel_err};

const SHAPES: [(usize, usize, bool, bool); 3] = [
    (192, 576, true, false),
    (40, 100, false, true),
    (33, 70, true, true),
];
const ROWS: [usize; 4] = [1, 3, 8, 20];

fn inputs(n: usize, k: usize, rows: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = (0..n * k)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
        .collect();
    let x = (0..rows * k)
        .map(|i| (i * 104729 % 997) as f32 / 997.0 - 0.5)
        .collect();
    let y0 = (0..rows * n).map(|i| (i % 3) as f32).collect();
    (w, x, y0)
}

/// Max relative error over rows of every (shape, rows) of `format` on `act` activations with
/// `kernels`.
fn linear_errors(kernels: &EmuKernels, format: WeightFormat, act: ActDtype) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    for (n, k, bias, accumulate) in SHAPES {
        let shape = LinearShape {
            format,
            n,
            k,
            bias,
            accumulate,
            act,
            w8a8: false,
        };
        for rows in ROWS {
            let (w, x, y0) = inputs(n, k, rows);
            let b = bias.then(|| (0..n).map(|i| i as f32 * 0.01).collect::<Vec<f32>>());
            let packed = PackedLinear::pack(format, &w, n, k, b, None);
            let got = run_linear(kernels, shape, &packed, &x, rows, &y0).unwrap();
            let want = reference_linear(&packed, &shape, &x, rows, &y0);
            out.push((
                format!("{format} {n}x{k} rows {rows} ({act})"),
                rel_err(&got, &want),
            ));
        }
    }
    out
}

fn specs(formats: &[WeightFormat], act: ActDtype) -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for &format in formats {
        for (n, k, bias, accumulate) in SHAPES {
            let shape = LinearShape {
                format,
                n,
                k,
                bias,
                accumulate,
                act,
                w8a8: false,
            };
            v.push(KernelSpec::Gemv(shape));
            v.push(KernelSpec::Gemm(shape));
        }
    }
    v
}

/// `specs` rendered by `renderer` for `opts.arch`, built and loaded in the emulator.
fn build(renderer: &Renderer, specs: &[KernelSpec], opts: &EmuOptions) -> EmuKernels {
    let sources = specs
        .iter()
        .map(|s| renderer.render(s, opts.arch))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    EmuKernels::from_sources(&sources, opts).unwrap()
}

/// Tolerance: the kernels sum in a different order than the cpu backend (warp trees, tiles),
/// so FP32 rounding differs; 1e-5 of the largest output is far below one FP8/FP4 step.
const TOL: f32 = 1e-5;

/// Tolerance on `act` outputs: [`TOL`], plus one unit in the last place of the type relative
/// to the largest output (the FP32 sums, a few FP32 ulp apart, may round to neighbouring
/// 16-bit values: `ActDtype::ulp`).
fn tol(act: ActDtype) -> f32 {
    TOL + act.ulp()
}

#[test]
fn emu_linear_kernels_match_the_cpu_backend_in_every_format() {
    let runs = [
        (Arch::Sm90, ActDtype::F32),
        (Arch::Sm120a, ActDtype::F32),
        (Arch::Sm90, ActDtype::Bf16),
        (Arch::Sm120a, ActDtype::F16),
        // sm_80's sources: FP8 decoded in registers by the code generator's choice.
        (Arch::Sm80, ActDtype::Bf16),
    ];
    for (arch, act) in runs {
        let Some(opts) = emu_opts(arch) else { return };
        let kernels = EmuKernels::load(&specs(&WeightFormat::ALL, act), &opts).unwrap();
        let mut checked = 0;
        for format in WeightFormat::ALL {
            for (what, err) in linear_errors(&kernels, format, act) {
                assert!(err <= tol(act), "{arch:?} {what}: relative error {err}");
                checked += 1;
            }
        }
        eprintln!(
            "{arch:?} {act}: {checked} linear launches within {}",
            tol(act)
        );
    }
}

#[test]
fn emu_catches_a_broken_tail_loop() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let broken = break_once(
        embedded(&fpx::codegen::TEMPLATES, "gemv.cu.tera"),
        "for (int v = gl; v < ROW_VECS; v += LANES)",
        "for (int v = gl; v < ROW_VECS - 1; v += LANES)",
    );
    let renderer = Renderer::with_overrides(&[("gemv.cu.tera", &broken)]).unwrap();
    let formats = [WeightFormat::Nvfp4, WeightFormat::Fp8];
    let kernels = build(&renderer, &specs(&formats, ActDtype::F32), &opts);
    for format in formats {
        for (what, err) in linear_errors(&kernels, format, ActDtype::F32) {
            // GEMV launches (rows <= 8) must be caught; the GEMM (20 rows) is not broken.
            if what.contains("rows 20 ") {
                assert!(err <= TOL, "{what}: {err}");
            } else {
                assert!(
                    err > 1e-3,
                    "{what}: the broken kernel was not caught ({err})"
                );
            }
        }
    }
}

#[test]
fn emu_catches_broken_tensor_core_gemms() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let gemm = embedded(&fpx::codegen::TEMPLATES, "gemm.cu.tera");
    // W's fragments loaded with rows and columns swapped; the x copies never waited for.
    let broken = [
        break_once(
            gemm,
            "fpx::ldmatrix<4, false>(q, wt",
            "fpx::ldmatrix<4, true>(q, wt",
        ),
        break_once(gemm, "    fpx::cp_async_wait<0>();\n", "\n"),
    ];
    let formats = [WeightFormat::Fp8, WeightFormat::Nvfp4];
    for (i, template) in broken.iter().enumerate() {
        let renderer = Renderer::with_overrides(&[("gemm.cu.tera", template)]).unwrap();
        let kernels = build(&renderer, &specs(&formats, ActDtype::Bf16), &opts);
        for format in formats {
            for (what, err) in linear_errors(&kernels, format, ActDtype::Bf16) {
                // The GEMM launches (20 rows) must be caught; the GEMVs are not broken. The
                // missing wait shows only where the copies go by cp.async (k % 8 == 0).
                let caught_here = what.contains("rows 20 ") && (i == 0 || what.contains("x576 "));
                if caught_here {
                    // NaN (the missing wait reads the NaN fill) counts as caught.
                    assert!(
                        err.is_nan() || err > 0.1,
                        "variant {i} {what}: not caught ({err})"
                    );
                } else if !what.contains("rows 20 ") {
                    assert!(err <= tol(ActDtype::Bf16), "variant {i} {what}: {err}");
                }
            }
        }
    }
}

#[test]
fn emu_catches_swapped_fp4_nibbles() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    // Element j + 1 read from the nibble of element j and vice versa, in every FP4 decoder the
    // kernels use on sm_90 and in the emulator: the register and scaled word decoders (GEMV) and
    // the GEMM's per-element decode.
    let formats = embedded(&fpx::codegen::HEADERS, "fpx_formats.cuh");
    let formats = break_once(
        formats,
        "for (int j = 0; j < 8; ++j) f[j] = e2m1_decode(w >> (4 * j));",
        "for (int j = 0; j < 8; ++j) f[j ^ 1] = e2m1_decode(w >> (4 * j));",
    );
    let formats = break_once(
        &formats,
        "f[j] = v[0];\n    f[j + 4] = v[1];",
        "f[j ^ 1] = v[0];\n    f[(j ^ 1) + 4] = v[1];",
    );
    // The GEMMs' (SIMT and tensor-core) one per-element weight decode.
    let macros = break_once(
        embedded(&fpx::codegen::TEMPLATES, "macros.cu.tera"),
        "byte >> ((kk & 1) * 4)",
        "byte >> ((~kk & 1) * 4)",
    );
    let renderer =
        Renderer::with_overrides(&[("fpx_formats.cuh", &formats), ("macros.cu.tera", &macros)])
            .unwrap();
    let typo = Renderer::with_overrides(&[("fpx_format.cuh", "")])
        .err()
        .unwrap();
    assert!(typo.to_string().contains("fpx_format.cuh"), "{typo}");
    let formats = [WeightFormat::Nvfp4, WeightFormat::Mxfp4, WeightFormat::Fp8];
    let kernels = build(&renderer, &specs(&formats, ActDtype::F32), &opts);
    for format in formats {
        for (what, err) in linear_errors(&kernels, format, ActDtype::F32) {
            if format == WeightFormat::Fp8 {
                assert!(err <= TOL, "{what}: FP8 does not use nibbles, yet {err}");
            } else {
                assert!(err > 1e-2, "{what}: swapped nibbles not caught ({err})");
            }
        }
    }
}

/// Model shapes for the step-by-step comparison: tiny Llama (powers of two, tied embeddings);
/// Qwen2 with biases, head_dim 48 (attention's single-group path), K = 96 and 200 (partial
/// MXFP4 blocks), a vocabulary larger than the argmax block; Llama with head_dim 128, hidden 200
/// (partial NVFP4 and MXFP4 blocks) and FFN 72; tiny Qwen3 with a window of 6 on its second
/// layer; Qwen3 of the Qwen2 shapes with a window of 5 on both layers.
fn step_models() -> Vec<ModelSpec> {
    let llama = tiny_spec(Architecture::Llama);
    let qwen = ModelSpec {
        hidden_size: 96,
        intermediate_size: 200,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 48,
        vocab_size: 1100,
        ..tiny_spec(Architecture::Qwen2)
    };
    let wide_heads = ModelSpec {
        hidden_size: 200,
        intermediate_size: 72,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 128,
        num_layers: 1,
        ..tiny_spec(Architecture::Llama)
    };
    let qwen3_wide = ModelSpec {
        architecture: Architecture::Qwen3,
        attention_bias: false,
        sliding_window: Some(SlidingWindow {
            size: 5,
            layers: vec![0, 1],
        }),
        ..qwen.clone()
    };
    vec![
        llama,
        qwen,
        wide_heads,
        common::tiny_qwen3_windowed(),
        qwen3_wide,
    ]
}

/// Largest relative error of each launched entry point over three passes of `spec` (12 rows
/// at position 0: GEMM; 3 rows: GEMV `_m8`; one row: GEMV `_m1`) on `act` activations, every
/// step compared on the cpu backend's inputs (`compare_steps`); the emulated kernels come from
/// `renderer`.
fn step_errors(
    spec: &ModelSpec,
    seed: u64,
    act: ActDtype,
    renderer: &Renderer,
    opts: &EmuOptions,
) -> Vec<(String, f32)> {
    let dir = tempfile::tempdir().unwrap();
    // llama.cpp's architectures have no sliding window: those models as Hugging Face files.
    let path = if spec.sliding_window.is_some() {
        let p = dir.path().join("model");
        write_hf_checkpoint(&p, spec, seed, HfDtype::F32, 1).unwrap();
        p
    } else {
        let p = dir.path().join("model.gguf");
        write_gguf(&p, spec, seed, GgmlDType::F32).unwrap();
        p
    };
    let model = load_model(&path).unwrap();
    let graph = Graph::build(&model.spec);
    let plan = ExecutablePlan::build(
        &graph,
        model.weights.as_ref(),
        &common::mixed_precision(&graph),
        16,
        act,
    )
    .unwrap();
    let mut cpu = CpuBackend::new(&plan);
    let mut emu =
        EmuBackend::with_kernels(&plan, build(renderer, &plan.schedule.kernels(), opts)).unwrap();
    let vocab = spec.vocab_size as u32;
    let tokens: Vec<u32> = (0..16u32).map(|t| (t * 97 + 13) % vocab).collect();
    let mut out = Vec::new();
    for (from, to) in [(0, 12), (12, 15), (15, 16)] {
        for c in compare_steps(&plan, &mut cpu, &mut emu, &tokens[from..to], from).unwrap() {
            out.push((c.kernel.clone(), c.rel()));
        }
    }
    out
}

/// Kernel families whose arithmetic is the cpu backend's, operation for operation (copies,
/// RoPE from the same tables, RMSNorm's double accumulator, SiLU with the same libm, argmax),
/// with the same rounding at the store: exact in the emulator, in FP32 and in 16 bits.
/// Attention and the linear kernels sum in other orders: within [`tol`].
const EXACT_FAMILIES: [&str; 5] = ["embedding", "rmsnorm", "rope", "silu", "argmax"];

#[test]
fn emu_every_kernel_family_matches_the_cpu_backend_step_by_step() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    let renderer = Renderer::new().unwrap();
    // family -> (launches, largest relative error)
    let mut worst: std::collections::BTreeMap<String, (usize, f32)> = Default::default();
    let mut entries = std::collections::BTreeSet::new();
    let models = step_models();
    let runs = models
        .iter()
        .enumerate()
        .flat_map(|(i, m)| [(i, m, ActDtype::F32), (i, m, ActDtype::Bf16)])
        .chain([(0, &models[0], ActDtype::F16)]);
    for (i, spec, act) in runs {
        for (kernel, err) in step_errors(spec, 5 + i as u64, act, &renderer, &opts) {
            let family = kernel.split('_').next().unwrap().to_string();
            if EXACT_FAMILIES.contains(&family.as_str()) {
                assert_eq!(err, 0.0, "{kernel} in model {i} ({act}): not exact");
            } else {
                assert!(
                    err <= tol(act),
                    "{kernel} in model {i} ({act}): relative error {err}"
                );
            }
            let e = worst.entry(family).or_default();
            e.0 += 1;
            e.1 = e.1.max(err);
            entries.insert(kernel);
        }
    }
    for (family, (n, err)) in &worst {
        eprintln!("{family}: {n} launches, largest relative error {err:.2e}");
    }
    assert_eq!(worst.len(), 8, "families launched: {:?}", worst.keys());
    for want in [
        "rope_kv_h4_kv2_d16_qknorm",
        "rope_kv_h6_kv2_d48_qknorm_abf16",
    ] {
        assert!(entries.contains(want), "no {want} launch");
    }
    for want in ["attention_h4_kv2_d16_w6", "attention_h6_kv2_d48_w5_abf16"] {
        assert!(entries.contains(want), "no {want} launch");
    }
    for format in ["fp8", "fp16", "nvfp4", "mxfp4"] {
        for kind in ["gemm_", "gemv_"] {
            for tail in ["", "_m8", "_m1"] {
                if kind == "gemm_" && !tail.is_empty() || kind == "gemv_" && tail.is_empty() {
                    continue;
                }
                let prefix = format!("{kind}{format}_");
                assert!(
                    entries
                        .iter()
                        .any(|e| e.starts_with(&prefix) && e.ends_with(tail)),
                    "no {prefix}*{tail} launch"
                );
            }
        }
    }
}

#[test]
fn emu_step_comparison_catches_a_broken_causal_mask() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    // Each query row stops one position short of itself.
    let broken = break_once(
        embedded(&fpx::codegen::TEMPLATES, "attention.cu.tera"),
        "const int len = *pos + r + 1;",
        "const int len = *pos + r;",
    );
    let renderer = Renderer::with_overrides(&[("attention.cu.tera", &broken)]).unwrap();
    let errors = step_errors(
        &tiny_spec(Architecture::Llama),
        5,
        ActDtype::F32,
        &renderer,
        &opts,
    );
    for (kernel, err) in errors {
        if kernel.starts_with("attention") {
            assert!(
                err > 1e-3,
                "{kernel}: the broken mask was not caught ({err})"
            );
        } else {
            assert!(err <= TOL, "{kernel}: {err}");
        }
    }
}

#[test]
fn emu_step_comparison_catches_a_short_window_and_swapped_qk_norms() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    // Each windowed query sees one position fewer than its window.
    let attention = break_once(
        embedded(&fpx::codegen::TEMPLATES, "attention.cu.tera"),
        "const int first = len > WINDOW ? len - WINDOW : 0;",
        "const int first = len > WINDOW - 1 ? len - WINDOW + 1 : 0;",
    );
    // q normalised with k's weight.
    let rope = break_once(
        embedded(&fpx::codegen::TEMPLATES, "rope_kv.cu.tera"),
        "is_q ? q_norm : k_norm",
        "k_norm",
    );
    let renderer = Renderer::with_overrides(&[
        ("attention.cu.tera", &attention),
        ("rope_kv.cu.tera", &rope),
    ])
    .unwrap();
    let spec = common::tiny_qwen3_windowed();
    let mut caught = std::collections::BTreeSet::new();
    for (kernel, err) in step_errors(&spec, 5, ActDtype::F32, &renderer, &opts) {
        let broken = kernel.starts_with("rope_kv") || kernel.contains("_w6");
        if broken && err > 1e-3 {
            caught.insert(kernel);
        } else if !broken {
            assert!(err <= TOL, "{kernel}: {err}");
        }
    }
    // The window only bites where a query has more than 6 positions: the 12-row prefill.
    for want in ["rope_kv_h4_kv2_d16_qknorm", "attention_h4_kv2_d16_w6"] {
        assert!(caught.contains(want), "{want} not caught: {caught:?}");
    }
}
