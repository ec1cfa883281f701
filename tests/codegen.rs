//! Codegen and NVRTC: rendering is deterministic and matches the committed snapshots; every
//! template x weight format x target x representative shape compiles to CUBIN (and uses the
//! instructions it should); a warm cache compiles nothing; NVRTC and ptxas errors come back
//! with the log, the options and the dumped source.
//!
//! NVRTC comes from the PyPI wheels `make tools` installs (no GPU needed). Without them these
//! tests are skipped with a printed reason, or fail when FPX_REQUIRE_DATA=1 (`make test`).

mod common;

use common::have;
use fpx::codegen::{self, KernelSource, Renderer};
use fpx::formats::Format;
use fpx::ir::Graph;
use fpx::lower::{ActDtype, Arch, KernelSpec, LinearShape, Param, Schedule, WeightFormat};
use fpx::lower::{LinearPrecision, PrecisionMap};
use fpx::model::synthetic::tiny_spec;
use fpx::model::Architecture;
use fpx::runtime::cuda::{find_cuda_include, Compiler, CompilerOptions};

/// NVRTC and the CUDA headers are installed (else skip, or fail under FPX_REQUIRE_DATA=1).
fn nvrtc() -> bool {
    let ok = fpx::runtime::cuda::ensure_nvrtc().is_ok() && find_cuda_include(None).is_ok();
    have("NVRTC and the CUDA headers (PyPI wheels in .venv)", ok)
}

fn compiler() -> Compiler {
    Compiler::new(CompilerOptions::default()).expect("NVRTC is available")
}

/// A mixed plan for the tiny model: every format, lm_head left in FP32.
fn tiny_mixed_plan() -> (Graph, PrecisionMap) {
    let graph = Graph::build(&tiny_spec(Architecture::Llama));
    let mut map = PrecisionMap::new();
    for (id, l) in graph.block_linears() {
        let format = match l.kind {
            fpx::ir::LinearKind::Q | fpx::ir::LinearKind::Up => Format::Fp8,
            fpx::ir::LinearKind::K | fpx::ir::LinearKind::Gate => Format::Nvfp4,
            fpx::ir::LinearKind::V | fpx::ir::LinearKind::Down => Format::Mxfp4,
            _ => Format::Fp16,
        };
        map.insert(
            graph.node(id).name.clone(),
            LinearPrecision::weight_only(format),
        );
    }
    (graph, map)
}

#[test]
fn rendering_is_deterministic_and_deduplicated() {
    let (graph, map) = tiny_mixed_plan();
    let schedule = Schedule::build(&graph, &map).unwrap();
    let a = codegen::generate(&schedule, Arch::Sm90).unwrap();
    let b = codegen::generate(&Schedule::build(&graph, &map).unwrap(), Arch::Sm90).unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.name, &x.source), (&y.name, &y.source));
    }
    // 14 linear layers in 2 blocks + lm_head, but only 7 distinct (shape, format) pairs plus
    // lm_head's: 8 GEMVs, 8 GEMMs, and one kernel of each other family.
    let names: Vec<&str> = a.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(a.len(), 8 + 8 + 6, "{names:?}");
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "names are unique");
    assert!(
        names.contains(&"gemv_fp16_64x64_acc"),
        "o_proj fuses the residual add"
    );
    assert!(
        names.contains(&"gemv_f32_300x64"),
        "lm_head stays FP32 outside the plan"
    );
}

#[test]
fn generated_sources_match_snapshots() {
    // The tiny plan as `fpx run` executes a BF16 checkpoint (BF16 activations and KV cache).
    let (graph, map) = tiny_mixed_plan();
    let schedule = Schedule::build(&graph, &map)
        .unwrap()
        .with_act(ActDtype::Bf16);
    for k in codegen::generate(&schedule, Arch::Sm90).unwrap() {
        insta::assert_snapshot!(format!("tiny_sm_90__{}", k.name), k.source);
    }
    // The FP4 GEMV for a Blackwell target differs only in its decode path (here on FP32
    // activations).
    let spec = KernelSpec::Gemv(LinearShape {
        format: WeightFormat::Nvfp4,
        n: 128,
        k: 64,
        bias: false,
        accumulate: false,
        act: ActDtype::F32,
        w8a8: false,
    });
    let k = Renderer::new()
        .unwrap()
        .render(&spec, Arch::Sm120a)
        .unwrap();
    insta::assert_snapshot!("tiny_sm_120a__gemv_nvfp4_128x64", k.source);
}

/// Representative linear shapes: the tiny model's, SmolLM2's hidden size (16-lane FP4 rows),
/// and ragged ones (rows not a whole number of 16-byte loads, padded FP4 tails).
fn linear_shapes() -> Vec<LinearShape> {
    let mut v = Vec::new();
    for format in WeightFormat::ALL {
        for (n, k, bias, accumulate) in [(192, 576, true, false), (40, 100, false, true)] {
            v.push(LinearShape {
                format,
                n,
                k,
                bias,
                accumulate,
                act: ActDtype::F32,
                w8a8: false,
            });
        }
    }
    v
}

fn all_specs() -> Vec<KernelSpec> {
    let mut specs = Vec::new();
    for s in linear_shapes() {
        specs.push(KernelSpec::Gemv(s));
        specs.push(KernelSpec::Gemm(s));
    }
    specs.extend([
        KernelSpec::Embedding {
            vocab: 300,
            hidden: 64,
            act: ActDtype::F32,
        },
        KernelSpec::RmsNorm {
            dim: 576,
            act: ActDtype::F32,
            quant: false,
        },
        KernelSpec::RopeKv {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            act: ActDtype::F32,
            qk_norm: false,
        },
        // Qwen3's q/k norms fused into RoPE (head_dim 128: two warps per head).
        KernelSpec::RopeKv {
            heads: 16,
            kv_heads: 8,
            head_dim: 128,
            act: ActDtype::Bf16,
            qk_norm: true,
        },
        KernelSpec::Attention {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            act: ActDtype::F32,
            window: None,
        },
        KernelSpec::Attention {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            act: ActDtype::F32,
            window: None,
        },
        KernelSpec::Attention {
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            act: ActDtype::Bf16,
            window: Some(4096),
        },
        KernelSpec::SiluMul {
            dim: 1536,
            act: ActDtype::F32,
            quant: false,
        },
        KernelSpec::Argmax {
            vocab: 49152,
            act: ActDtype::F32,
        },
    ]);
    specs
}

#[test]
fn every_template_format_arch_and_shape_compiles_to_cubin() {
    if !nvrtc() {
        return;
    }
    let renderer = Renderer::new().unwrap();
    let compiler = compiler();
    let specs = all_specs();
    for arch in Arch::ALL {
        let sources: Vec<KernelSource> = specs
            .iter()
            .map(|s| renderer.render(s, arch).unwrap())
            .collect();
        let compiled = compiler
            .compile_all(&sources)
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        for (src, out) in sources.iter().zip(&compiled) {
            let what = format!("{} for {arch}", src.name);
            assert!(out.cubin.starts_with(b"\x7fELF"), "{what}: not a CUBIN");
            assert!(!out.cached, "{what}: no cache in this test");
            for entry in &src.entry_points {
                assert!(
                    out.ptx.contains(&format!(".entry {entry}(")),
                    "{what}: {entry}"
                );
            }
            if let KernelSpec::Gemv(s) = src.spec {
                let fp4 = matches!(s.format, WeightFormat::Nvfp4 | WeightFormat::Mxfp4);
                let native = out.ptx.contains("cvt.rn.f16x2.e2m1x2");
                assert_eq!(
                    native,
                    fp4 && arch.has_fp4_cvt(),
                    "{what}: native FP4 decode"
                );
                if s.format == WeightFormat::Fp8 && s.k % 4 == 0 {
                    assert_eq!(
                        out.ptx.contains("cvt.rn.f16x2.e4m3x2"),
                        arch.has_fp8_cvt(),
                        "{what}: FP8 cvt exactly where the chip has it"
                    );
                }
                if s.format.row_stride_bytes(s.k) % 16 == 0 {
                    assert!(
                        out.ptx.contains("ld.global.nc.v4.u32"),
                        "{what}: 128-bit loads"
                    );
                }
            }
        }
    }
    assert_eq!(compiler.stats(), (Arch::ALL.len() * specs.len(), 0));
}

#[test]
fn warm_cache_compiles_nothing() {
    if !nvrtc() {
        return;
    }
    let (graph, map) = tiny_mixed_plan();
    let kernels = codegen::generate(&Schedule::build(&graph, &map).unwrap(), Arch::Sm89).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = CompilerOptions {
        cache_dir: Some(dir.path().to_path_buf()),
        ..CompilerOptions::default()
    };
    let cold = Compiler::new(opts.clone()).unwrap();
    let first = cold.compile_all(&kernels).unwrap();
    assert_eq!(cold.stats(), (kernels.len(), 0));
    let warm = Compiler::new(opts).unwrap();
    let second = warm.compile_all(&kernels).unwrap();
    assert_eq!(
        warm.stats(),
        (0, kernels.len()),
        "a warm cache compiles nothing"
    );
    for (a, b) in first.iter().zip(&second) {
        assert!(b.cached && !a.cached);
        assert_eq!((&a.cubin, &a.ptx), (&b.cubin, &b.ptx));
    }
    // Another target is another key.
    let other = codegen::generate(&Schedule::build(&graph, &map).unwrap(), Arch::Sm90).unwrap();
    let third = Compiler::new(CompilerOptions {
        cache_dir: Some(dir.path().to_path_buf()),
        ..CompilerOptions::default()
    })
    .unwrap();
    third.compile(&other[0]).unwrap();
    assert_eq!(third.stats(), (1, 0));
}

#[test]
fn nvrtc_error_carries_log_options_and_dumped_source() {
    if !nvrtc() {
        return;
    }
    let broken = fpx::codegen::TEMPLATES
        .iter()
        .find(|(n, _)| *n == "silu_mul.cu.tera")
        .unwrap()
        .1
        .replace(
            "fpx::store_act(gate + i, g /",
            "fpx::store_act(gate + i, g / undeclared_name /",
        );
    let renderer = Renderer::with_overrides(&[("silu_mul.cu.tera", &broken)]).unwrap();
    let src = renderer
        .render(
            &KernelSpec::SiluMul {
                dim: 64,
                act: ActDtype::F32,
                quant: false,
            },
            Arch::Sm90,
        )
        .unwrap();
    let dump = tempfile::tempdir().unwrap();
    let compiler = Compiler::new(CompilerOptions {
        dump_dir: Some(dump.path().to_path_buf()),
        ..CompilerOptions::default()
    })
    .unwrap();
    let err = compiler.compile(&src).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("undeclared_name"), "{msg}");
    assert!(msg.contains("--gpu-architecture=sm_90"), "{msg}");
    match err {
        fpx::Error::Nvrtc { source_path, .. } => {
            let dumped = std::fs::read_to_string(&source_path).unwrap();
            assert!(dumped.contains("undeclared_name"));
            assert!(source_path.starts_with(dump.path()));
        }
        other => panic!("expected an NVRTC error, got {other}"),
    }
}

#[test]
fn ptxas_rejects_the_conversions_a_chip_lacks() {
    if !nvrtc() {
        return;
    }
    // The guards in kernels/fpx_formats.cuh are what keep the builds for chips without these
    // instructions working: the same conversions unguarded are refused by ptxas for those real
    // targets (FP4: every target before the Blackwell `a` ones; FP8: sm_80/sm_86).
    let kernel = |cvt: &str, input: &str| {
        format!(
            r#"extern "C" __global__ void k(const unsigned char* c, unsigned* out) {{
  unsigned short b = c[threadIdx.x];
  unsigned h2;
  asm("{{ .reg .b8 lo, hi; mov.b16 {{lo, hi}}, %1; cvt.rn.f16x2.{cvt} %0, {input}; }}" : "=r"(h2) : "h"(b));
  out[threadIdx.x] = h2;
}}
"#
        )
    };
    let compiler = compiler();
    /// Whether a target has a conversion instruction.
    type Has = fn(Arch) -> bool;
    // (instruction, its operand, which targets have it)
    let cases: [(&str, &str, Has); 2] = [
        ("e2m1x2", "lo", Arch::has_fp4_cvt),
        ("e4m3x2", "%1", Arch::has_fp8_cvt),
    ];
    for (cvt, input, has) in cases {
        let source = kernel(cvt, input);
        for arch in Arch::ALL {
            let spec = KernelSpec::SiluMul {
                dim: 1,
                act: ActDtype::F32,
                quant: false,
            };
            let src = KernelSource {
                spec,
                arch,
                name: format!("unguarded_{cvt}"),
                file_name: format!("unguarded_{cvt}.cu"),
                source: source.clone(),
                entry_points: vec!["k".into()],
                context: fpx::codegen::KernelContext::new(&spec, arch),
                headers: fpx::codegen::HelperHeaders::embedded(),
            };
            let r = compiler.compile(&src);
            if has(arch) {
                assert!(r.is_ok(), "{cvt} on {arch}: {:?}", r.err());
            } else {
                let msg = r.unwrap_err().to_string();
                assert!(
                    msg.contains(cvt)
                        && (msg.contains("not supported") || msg.contains("requires .target")),
                    "{cvt} on {arch}: {msg}"
                );
            }
        }
    }
}

#[test]
fn codegen_command_writes_sources_binaries_and_manifest_and_reuses_the_cache() {
    if !nvrtc() {
        return;
    }
    use fpx::model::synthetic::{write_gguf, GgmlDType};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_gguf(&model, &tiny_spec(Architecture::Llama), 1, GgmlDType::F32).unwrap();
    let plan = dir.path().join("plan.json");
    let layers: Vec<serde_json::Value> = (0..2)
        .flat_map(|i| {
            [("self_attn.q_proj", "fp8"), ("mlp.down_proj", "nvfp4")].map(
                |(n, f)| serde_json::json!({"name": format!("model.layers.{i}.{n}"), "format": f}),
            )
        })
        .collect();
    let body = serde_json::json!({"schema_version": 1, "layers": layers});
    std::fs::write(&plan, body.to_string()).unwrap();
    let cache = dir.path().join("cache");
    let run = |out: &str| {
        common::fpx(&[
            "codegen",
            "--plan",
            plan.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--arch",
            "sm_120a",
            "-o",
            dir.path().join(out).to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
    };
    let (code, stdout, stderr) = run("a");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("0 from the cache"), "{stdout}");
    let manifest: fpx::codegen::Manifest =
        serde_json::from_slice(&std::fs::read(dir.path().join("a/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest.arch, Arch::Sm120a);
    assert_eq!(manifest.layers.len(), 15);
    for k in &manifest.kernels {
        for file in [Some(&k.source), k.cubin.as_ref(), k.ptx.as_ref()] {
            let file = file.expect("compiled");
            assert!(dir.path().join("a").join(file).is_file(), "{file}");
        }
    }
    assert!(dir.path().join("a/include/fpx_formats.cuh").is_file());
    let (code, stdout, stderr) = run("b");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(": 0 compiled"),
        "a warm cache compiles nothing: {stdout}"
    );
    for k in &manifest.kernels {
        let cubin = k.cubin.as_ref().unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("a").join(cubin)).unwrap(),
            std::fs::read(dir.path().join("b").join(cubin)).unwrap()
        );
    }
}

#[test]
fn missing_nvrtc_and_missing_driver_are_ordinary_errors() {
    use fpx::model::synthetic::{write_gguf, GgmlDType};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_gguf(&model, &tiny_spec(Architecture::Llama), 1, GgmlDType::F32).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fpx"))
        .args(["codegen", "--model", model.to_str().unwrap(), "-o"])
        .arg(dir.path().join("out"))
        .env("LD_LIBRARY_PATH", "")
        .env("FPX_NVRTC_LIB", dir.path().join("no/libnvrtc.so.12"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NVRTC library not found"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    if fpx::runtime::cuda::probe_driver().is_ok() {
        eprintln!("skipped the no-driver check: this machine has a CUDA driver");
        return;
    }
    let (code, _, stderr) = common::fpx(&[
        "profile",
        "--model",
        model.to_str().unwrap(),
        "-o",
        dir.path().join("p.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no CUDA driver"), "{stderr}");
}

/// The C type a backend passes for `p`: element type and whether it is a pointer.
fn param_c_type(p: Param) -> (&'static str, bool) {
    match p {
        Param::Tokens | Param::Next | Param::Pos | Param::RouteIds => ("int", true),
        Param::Rows | Param::Row0 => ("int", false),
        Param::Eps | Param::LinearGlobal(_) => ("float", false),
        Param::Act(_) | Param::KCache(_) | Param::VCache(_) | Param::Embedding => ("act_t", true),
        Param::LinearCodes(_) | Param::ExpertCodes(..) | Param::XCodes => ("fpx::u8", true),
        Param::LinearScales(_) | Param::ExpertScales(..) => ("void", true),
        Param::Norm(_)
        | Param::RopeCos
        | Param::RopeSin
        | Param::LinearBias(_)
        | Param::AttnPartials
        | Param::Router(_)
        | Param::RouteWeights
        | Param::ExpertGlobals(..)
        | Param::ExpertBias(..)
        | Param::XScales => ("float", true),
    }
}

#[test]
fn step_params_match_the_template_signatures() {
    // The backends pass `Step::params` in order (one binding, `runtime::launch`); the
    // templates declare the signature. Checked here for every step and entry point, prefill
    // and decode, on FP32 and 16-bit activations (the cuda backend cannot run here, so this is
    // what keeps its argument lists honest).
    // Also Qwen3 with a sliding window on one layer: q/k norms in the RoPE step, a windowed
    // attention kernel beside a full one; and a Qwen3-MoE, whose MoE step is six launches.
    let (graph, map) = tiny_mixed_plan();
    let qwen3 = Graph::build(&common::tiny_qwen3_windowed());
    let moe = Graph::build(&tiny_spec(Architecture::Qwen3Moe));
    let moe_map = common::mixed_precision(&moe);
    let full = PrecisionMap::new();
    let renderer = Renderer::new().unwrap();
    let mut checked = std::collections::BTreeSet::new();
    let mut entries = std::collections::BTreeSet::new();
    let runs = ActDtype::ALL.iter().flat_map(|&act| {
        [
            (&graph, &map, act),
            (&qwen3, &full, act),
            (&moe, &moe_map, act),
        ]
    });
    for (graph, map, act) in runs {
        let schedule = Schedule::build(graph, map).unwrap().with_act(act);
        for step in &schedule.steps {
            for (m, decode) in [(1, true), (1, false), (3, false), (20, false)] {
                for launch in schedule.launches(step, m, decode) {
                    let (spec, entry) = (launch.spec, launch.entry.clone());
                    assert!(schedule.kernels_of(step).contains(&spec), "{entry}");
                    let src = renderer.render(&spec, Arch::Sm90).unwrap().source;
                    let head = format!("{entry}(");
                    let start = src.find(&head).unwrap() + head.len();
                    let end = start + src[start..].find(')').unwrap();
                    let declared: Vec<(String, bool)> = src[start..end]
                        .split(',')
                        .map(|p| {
                            let p = p.replace("__restrict__", "").replace("const", "");
                            let ty = p.split_whitespace().next().unwrap().to_string();
                            (ty.trim_end_matches('*').to_string(), p.contains('*'))
                        })
                        .collect();
                    let passed: Vec<(String, bool)> = (launch.params.iter())
                        .map(|&p| {
                            let (ty, ptr) = param_c_type(p);
                            (ty.to_string(), ptr)
                        })
                        .collect();
                    assert_eq!(passed, declared, "{entry} (decode {decode})");
                    assert!(
                        src.contains(&format!("using act_t = {};", act_c_type(act))),
                        "{entry}: act_t"
                    );
                    checked.insert(spec.family());
                    entries.insert(entry);
                }
            }
        }
    }
    assert_eq!(checked.len(), 11, "{checked:?}");
    for want in [
        "rope_kv_h4_kv2_d16_qknorm",
        "attention_h4_kv2_d16_w6",
        "attention_h4_kv2_d16",
    ] {
        assert!(entries.contains(want), "{want} not checked: {entries:?}");
    }
}

fn act_c_type(act: ActDtype) -> &'static str {
    match act {
        ActDtype::F32 => "float",
        ActDtype::Bf16 => "fpx::bf16",
        ActDtype::F16 => "fpx::f16",
    }
}
