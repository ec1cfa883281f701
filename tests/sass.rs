//! SASS checks without a GPU: every kernel of a mixed plan (all families) plus the linear
//! kernels of every format on several shapes, compiled by NVRTC to CUBIN for sm_80 (no FP8
//! conversion instruction), sm_90 and sm_120a (native FP4), then inspected with ptxas -v and cuobjdump -sass from the wheels
//! (`codegen::report`). Asserts: no kernel spills; every decode GEMV whose rows allow 16-byte
//! loads reads its weights with 128-bit global loads (LDG.E.128); every tensor-core prefill GEMM
//! issues HMMA fed by ldmatrix (LDSM) and, where x rows are 16-byte aligned, cp.async
//! (LDGSTS), and no SIMT kernel does; the report names the native FP8/FP4 cvt paths the
//! emulator cannot run exactly where the PTX uses them.
//!
//! Needs NVRTC and the nvcc / cuobjdump wheels in .venv: skipped with a printed reason
//! without them, failing under FPX_REQUIRE_DATA=1.

mod common;

use fpx::codegen::report::{analyze, gemv_instructions_per_weight, table, SassTools};
use fpx::codegen::{KernelContext, Renderer};
use fpx::formats::Format;
use fpx::ir::{Graph, LinearKind};
use fpx::lower::{
    decode_instructions_per_weight, ActDtype, Arch, InstructionPath, KernelSpec, LinearShape,
    Schedule, WeightFormat,
};
use fpx::lower::{LinearPrecision, PrecisionMap};
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::{load_model, Architecture};
use fpx::runtime::cuda::{Compiler, CompilerOptions};
use rayon::prelude::*;

fn specs() -> Vec<KernelSpec> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Llama), 11, GgmlDType::F32).unwrap();
    let model = load_model(&path).unwrap();
    let graph = Graph::build(&model.spec);
    let mut map = PrecisionMap::new();
    for (id, l) in graph.linears() {
        let f = match l.kind {
            LinearKind::Gate | LinearKind::Up => Format::Nvfp4,
            LinearKind::Down => Format::Mxfp4,
            _ => Format::Fp8,
        };
        map.insert(graph.node(id).name.clone(), LinearPrecision::weight_only(f));
    }
    let schedule = Schedule::build(&graph, &map).unwrap();
    let mut v = schedule.kernels();
    v.extend(schedule.with_act(ActDtype::Bf16).kernels());
    // The same model in W8A8 (quantizing RMSNorm and SiLU-gate, quant_fp8 steps, W8A8 GEMVs and GEMMs).
    let w8a8: PrecisionMap = (map.keys())
        .map(|n| {
            let p = LinearPrecision {
                weights: Format::Fp8,
                activations: Some(Format::Fp8),
            };
            (n.clone(), p)
        })
        .collect();
    let schedule = Schedule::build(&graph, &w8a8).unwrap();
    v.extend(schedule.kernels());
    v.extend(schedule.with_act(ActDtype::Bf16).kernels());
    // A tiny Qwen3-MoE's routing, grouped expert GEMVs and combine, and the grouped GEMVs of a
    // Qwen3-30B-A3B-shaped block (128 experts, top-8, 768 x 2048).
    let moe = Graph::build(&tiny_spec(Architecture::Qwen3Moe));
    let moe = Schedule::build(&moe, &common::mixed_precision(&moe)).unwrap();
    v.extend(moe.kernels());
    v.extend(moe.with_act(ActDtype::Bf16).kernels());
    for (format, gather, n, k) in [
        (WeightFormat::Nvfp4, true, 768, 2048),
        (WeightFormat::Fp8, true, 768, 2048),
        (WeightFormat::Mxfp4, false, 2048, 768),
    ] {
        let shape = LinearShape {
            format,
            n,
            k,
            bias: false,
            accumulate: false,
            act: ActDtype::Bf16,
            w8a8: false,
        };
        v.push(KernelSpec::ExpertGemv {
            shape,
            experts: 128,
            top_k: 8,
            gather,
        });
    }
    // Qwen3's RoPE with q/k norms (head_dim 128, two warps) and a windowed attention kernel.
    for act in [ActDtype::F32, ActDtype::Bf16] {
        v.push(KernelSpec::RopeKv {
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            act,
            qk_norm: true,
        });
        v.push(KernelSpec::Attention {
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            act,
            window: Some(4096),
        });
    }
    for format in WeightFormat::ALL {
        for (n, k) in [(4096, 4096), (40, 100)] {
            let shape = LinearShape {
                format,
                n,
                k,
                bias: false,
                accumulate: false,
                act: ActDtype::F32,
                w8a8: false,
            };
            v.push(KernelSpec::Gemv(shape));
            v.push(KernelSpec::Gemm(shape));
            v.push(KernelSpec::Gemm(LinearShape {
                act: ActDtype::Bf16,
                ..shape
            }));
        }
    }
    for (n, k) in [(4096, 4096), (40, 100)] {
        let shape = LinearShape {
            format: WeightFormat::Fp8,
            n,
            k,
            bias: false,
            accumulate: false,
            act: ActDtype::Bf16,
            w8a8: true,
        };
        v.push(KernelSpec::Gemv(shape));
        v.push(KernelSpec::Gemm(shape));
    }
    v.sort();
    v.dedup();
    v
}

/// The SASS tools and NVRTC (its cache under the test target dir), or `None` after saying why.
fn sass_tools() -> Option<(SassTools, Compiler)> {
    let tools = SassTools::find();
    let compiler = Compiler::new(CompilerOptions {
        cache_dir: Some(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-cache")),
        ..CompilerOptions::default()
    });
    let ok = tools.is_ok() && compiler.is_ok();
    common::have("NVRTC + the nvcc and cuobjdump wheels (.venv)", ok)
        .then(|| (tools.unwrap(), compiler.unwrap()))
}

#[test]
fn sass_no_spills_and_128_bit_weight_loads() {
    let Some((tools, compiler)) = sass_tools() else {
        return;
    };
    let renderer = Renderer::new().unwrap();
    let specs = specs();
    // sm_80: no FP8 conversion instruction (the register decode); sm_90; sm_120a: native FP4.
    for arch in [Arch::Sm80, Arch::Sm90, Arch::Sm120a] {
        let sources: Vec<_> = specs
            .iter()
            .map(|s| renderer.render(s, arch).unwrap())
            .collect();
        let compiled = compiler.compile_all(&sources).unwrap();
        let mut rows = Vec::new();
        let mut wide = 0;
        let (mut mma_gemms, mut fp8_gemms) = (0, 0);
        let mut spilled = Vec::new();
        let analysed: Vec<_> = sources
            .par_iter()
            .zip(&compiled)
            .map(|(_, c)| analyze(&tools, arch, &c.ptx, &c.cubin).unwrap())
            .collect();
        for ((src, c), reports) in sources.iter().zip(&compiled).zip(analysed) {
            assert_eq!(
                reports.len(),
                src.entry_points.len(),
                "{}: entries",
                src.name
            );
            for r in &reports {
                if r.spills() > 0 || r.stack_bytes > 0 {
                    spilled.push(format!(
                        "{} {} ({} registers, spills {}/{} B stored/loaded, stack {} B)",
                        r.entry,
                        arch.name(),
                        r.registers,
                        r.spill_store_bytes,
                        r.spill_load_bytes,
                        r.stack_bytes
                    ));
                }
                if let KernelContext::Gemv(g) = &src.context {
                    if g.vec_bytes == 16 {
                        assert!(r.loads(128) > 0, "{} on {arch:?}: no LDG.E.128", r.entry);
                        wide += 1;
                    }
                }
                let fp8 = c.ptx.contains("cvt.rn.f16x2.e4m3x2");
                let fp4 = c.ptx.contains("cvt.rn.f16x2.e2m1x2");
                assert!(
                    !fp8 || arch.has_fp8_cvt(),
                    "{} on {arch:?}: FP8 cvt",
                    r.entry
                );
                assert_eq!(
                    r.emulator_cannot_run.len(),
                    usize::from(fp8) + usize::from(fp4),
                    "{}",
                    r.entry
                );
                if let KernelSpec::Gemm(s) = src.spec {
                    // The tensor-core GEMMs issue HMMA fed by ldmatrix (and cp.async where
                    // x rows are 16-byte aligned); the SIMT ones none.
                    let (hmma, ldsm, cp) = (r.count("HMMA"), r.count("LDSM"), r.count("LDGSTS"));
                    if s.gemm_mma(arch) == Some("e4m3") {
                        // W8A8's FP8 mma.sync (its SASS per arch: sass_w8a8_gemm_instruction),
                        // x and W tiles both by cp.async where rows are 16-byte aligned.
                        let mma = r.count("QMMA") + hmma;
                        assert!(mma >= 8 && ldsm >= 4, "{} {arch:?}: {:?}", r.entry, r.mix);
                        assert_eq!(cp > 0, s.k % 16 == 0, "{} {arch:?}: {:?}", r.entry, r.mix);
                        fp8_gemms += 1;
                    } else if s.gemm_mma(arch).is_some() {
                        assert!(hmma >= 8 && ldsm >= 4, "{} {arch:?}: {:?}", r.entry, r.mix);
                        assert_eq!(cp > 0, s.k % 8 == 0, "{} {arch:?}: {:?}", r.entry, r.mix);
                        mma_gemms += 1;
                    } else {
                        assert_eq!(hmma + ldsm + cp, 0, "{} {arch:?}: {:?}", r.entry, r.mix);
                    }
                }
                if let KernelSpec::Gemv(s) = src.spec {
                    // Native FP4 conversion only on the FP4-capable target.
                    let is_fp4 = matches!(s.format, WeightFormat::Nvfp4 | WeightFormat::Mxfp4);
                    assert_eq!(fp4, is_fp4 && arch == Arch::Sm120a, "{}", r.entry);
                }
            }
            rows.extend(reports);
        }
        assert!(
            spilled.is_empty(),
            "kernels that spill or use a stack frame on {arch:?}: {spilled:?}"
        );
        assert!(
            wide >= 10,
            "{arch:?}: only {wide} GEMV entries with 16-byte rows checked"
        );
        assert!(
            mma_gemms >= 6,
            "{arch:?}: only {mma_gemms} tensor-core GEMMs checked"
        );
        assert_eq!(
            fp8_gemms >= 4,
            arch.has_fp8_mma(),
            "{arch:?}: {fp8_gemms} FP8 GEMMs"
        );
        eprintln!("{}", table(&rows));
    }
}

#[test]
fn codegen_report_json_carries_the_sass_table() {
    let ok = SassTools::find().is_ok() && Compiler::new(CompilerOptions::default()).is_ok();
    if !common::have("NVRTC + the nvcc and cuobjdump wheels (.venv)", ok) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_gguf(&model, &tiny_spec(Architecture::Llama), 11, GgmlDType::F32).unwrap();
    let out = dir.path().join("kernels");
    let (code, stdout, stderr) = common::fpx(&[
        "codegen",
        "--model",
        model.to_str().unwrap(),
        "--arch",
        "sm_120a",
        "--no-cache",
        "--report",
        "--json",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let printed: fpx::codegen::Manifest = serde_json::from_str(&stdout).unwrap();
    let written: fpx::codegen::Manifest =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(printed, written);
    let sass = printed.sass.expect("--report fills `sass`");
    let entries: usize = printed.kernels.iter().map(|k| k.entry_points.len()).sum();
    assert_eq!(sass.len(), entries);
    assert!(sass.iter().all(|r| r.registers > 0 && r.arch == "sm_120a"));
    assert!(sass.iter().all(|r| r.spills() == 0));
}

/// The latency model's decode cost per weight (`lower::decode_instructions_per_weight`) is what
/// the compiled `_m1` GEMV's main loop issues beyond its FMA, per format and target (every
/// target the cost model prices), measured on the SASS of a SmolLM2 gate/up shape (1536 x 576).
#[test]
fn decode_cost_per_weight_matches_the_sass() {
    let Some((tools, compiler)) = sass_tools() else {
        return;
    };
    let renderer = Renderer::new().unwrap();
    let (mut measured, mut wrong) = (Vec::new(), Vec::new());
    // Every format, and FP8 also as W8A8.
    let formats =
        (WeightFormat::ALL.into_iter().map(|f| (f, false))).chain([(WeightFormat::Fp8, true)]);
    for (arch, (format, w8a8), act) in Arch::ALL.into_iter().flat_map(|a| {
        formats
            .clone()
            .flat_map(move |f| ActDtype::ALL.into_iter().map(move |d| (a, f, d)))
    }) {
        {
            let shape = LinearShape {
                format,
                n: 1536,
                k: 576,
                bias: false,
                accumulate: false,
                act,
                w8a8,
            };
            let spec = KernelSpec::Gemv(shape);
            let src = renderer.render(&spec, arch).unwrap();
            let c = &compiler.compile_all(std::slice::from_ref(&src)).unwrap()[0];
            let reports = analyze(&tools, arch, &c.ptx, &c.cubin).unwrap();
            let m1 = reports.iter().find(|r| r.entry.ends_with("_m1")).unwrap();
            let KernelContext::Gemv(g) = &src.context else {
                unreachable!()
            };
            let per_weight = gemv_instructions_per_weight(m1, g)
                .unwrap_or_else(|| panic!("{}: no main loop found: {:?}", m1.entry, m1.main_loop));
            let model = decode_instructions_per_weight(&shape, arch);
            let line = format!(
                "{} on {arch}: {:.4} per weight beyond the FMA (table: {model})",
                m1.entry,
                per_weight - 1.0
            );
            if (per_weight - 1.0 - model).abs() > 1e-9 {
                wrong.push(line.clone());
            }
            measured.push(line);
        }
    }
    eprintln!("{}", measured.join("\n"));
    assert!(
        wrong.is_empty(),
        "decode_instructions_per_weight (src/lower/work.rs) disagrees with the SASS:\n{}",
        wrong.join("\n")
    );
}

/// W8A8's `mma.sync` m16n8k32 E4M3 in the SASS of every target, and the instruction path the
/// latency model prices for it (`KernelSpec::path`) is the one the chip runs.
#[test]
fn sass_w8a8_gemm_instruction() {
    let Some((tools, compiler)) = sass_tools() else {
        return;
    };
    let renderer = Renderer::new().unwrap();
    let spec = KernelSpec::Gemm(LinearShape {
        format: WeightFormat::Fp8,
        n: 4096,
        k: 4096,
        bias: false,
        accumulate: false,
        act: ActDtype::Bf16,
        w8a8: true,
    });
    for arch in Arch::ALL {
        let src = renderer.render(&spec, arch).unwrap();
        let c = &compiler.compile_all(std::slice::from_ref(&src)).unwrap()[0];
        let r = &analyze(&tools, arch, &c.ptx, &c.cubin).unwrap()[0];
        let (qmma, hmma, path) = (r.count("QMMA"), r.count("HMMA"), spec.path(arch));
        eprintln!("{} {arch}: {:?} ({})", r.entry, r.mix, path.name());
        let want = if arch.fp8_mma_is_native() {
            qmma >= 8 && hmma == 0 && path == InstructionPath::TensorFp8
        } else if arch.has_fp8_mma() {
            qmma == 0 && hmma >= 8 && path == InstructionPath::TensorF16
        } else {
            qmma + hmma == 0 && path == InstructionPath::SimtF32
        };
        assert!(
            want,
            "{} {arch}: {:?}, priced {}",
            r.entry,
            r.mix,
            path.name()
        );
    }
}
