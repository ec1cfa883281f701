//! Codegen + NVRTC time for a whole SmolLM2 plan (mixed FP8/FP4) on sm_90: rendering alone,
//! compiling with a cold cache (every kernel through NVRTC), and with a warm cache (every
//! kernel read back from disk). Needs NVRTC (`make tools`, LD_LIBRARY_PATH) and data/ (`make
//! fetch`); a missing piece is reported and its benchmarks are skipped.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};

use fpx::codegen;
use fpx::formats::Format;
use fpx::ir::{Graph, LinearKind};
use fpx::lower::{Arch, Schedule};
use fpx::lower::{LinearPrecision, PrecisionMap};
use fpx::model::load_model;
use fpx::runtime::cuda::{Compiler, CompilerOptions};

fn smollm2_schedule() -> Option<Schedule> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = match load_model(&path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("codegen bench skipped: {e} (run `make fetch`)");
            return None;
        }
    };
    let graph = Graph::build(&model.spec);
    let mut map = PrecisionMap::new();
    for (id, l) in graph.block_linears() {
        let f = match l.kind {
            LinearKind::Gate | LinearKind::Up => Format::Nvfp4,
            LinearKind::Down => Format::Mxfp4,
            _ => Format::Fp8,
        };
        map.insert(graph.node(id).name.clone(), LinearPrecision::weight_only(f));
    }
    Schedule::build(&graph, &map).ok()
}

fn bench(c: &mut Criterion) {
    let Some(schedule) = smollm2_schedule() else {
        return;
    };
    let mut g = c.benchmark_group("codegen_smollm2_sm_90");
    g.sample_size(10);
    g.bench_function("render", |b| {
        b.iter(|| black_box(codegen::generate(&schedule, Arch::Sm90).unwrap()))
    });
    let kernels = codegen::generate(&schedule, Arch::Sm90).unwrap();
    eprintln!("{} kernels", kernels.len());
    if let Err(e) =
        fpx::runtime::cuda::ensure_nvrtc().and_then(|_| Compiler::new(CompilerOptions::default()))
    {
        eprintln!("NVRTC benchmarks skipped: {e}");
        return;
    }
    g.measurement_time(std::time::Duration::from_secs(40));
    g.bench_function("render_and_compile_cold_cache", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().unwrap();
            let compiler = Compiler::new(CompilerOptions {
                cache_dir: Some(dir.path().to_path_buf()),
                ..CompilerOptions::default()
            })
            .unwrap();
            let k = codegen::generate(&schedule, Arch::Sm90).unwrap();
            black_box(compiler.compile_all(&k).unwrap());
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let opts = CompilerOptions {
        cache_dir: Some(dir.path().to_path_buf()),
        ..CompilerOptions::default()
    };
    Compiler::new(opts.clone())
        .unwrap()
        .compile_all(&kernels)
        .unwrap();
    g.bench_function("render_and_compile_warm_cache", |b| {
        b.iter(|| {
            let compiler = Compiler::new(opts.clone()).unwrap();
            let k = codegen::generate(&schedule, Arch::Sm90).unwrap();
            let out = compiler.compile_all(&k).unwrap();
            assert_eq!(compiler.stats().0, 0, "warm cache");
            black_box(out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
