//! Benchmarks of the generated kernels and of whole executable plans.
//!
//! GPU groups (need a CUDA device and NVRTC; each prints why it skips otherwise):
//! - `gpu_gemv`: the decode GEMV (`_m1`) of every linear shape of the SmolLM2 plans and of
//!   synthetic layers 4096x4096, 4096x14336 and 14336x4096, in every weight format, on BF16
//!   and FP32 activations. CUDA events around batches of launches (`Device::time_launches`,
//!   criterion's custom timing), the weights rotated through copies totalling four times the
//!   L2, so that every launch streams them from DRAM. Throughput in bytes; the fraction of the
//!   device's peak DRAM bandwidth is printed.
//! - `gpu_gemm`: the prefill GEMM at 512 rows of the same shapes; throughput in FLOPs ("elements"),
//!   the fraction of the peak of the instruction path the kernel uses printed.
//! - `gpu_steps`: every other kernel of the SmolLM2 decode step (embedding, RMSNorm, RoPE and
//!   KV write, attention over `PROMPT` cached positions, SiLU-gate, argmax), each launched in
//!   place on the buffers a real decode step leaves, printed next to its modelled cost.
//! - `gpu_plans`: prefill and decode step of each plan on the cuda backend.
//!
//! CPU group (always, and what CI runs in test mode): `cpu_plans`, the same whole-plan
//! timings on the cpu backend (CPU timings, labelled so). Every plan is printed with the
//! decode-step latency its latency source modelled next to what was measured, so a gamma sweep
//! (`fpx sweep -o DIR`, then `FPX_BENCH_PLANS=DIR`) shows the measured latency/gamma curve
//! beside the modelled one. Plans: the committed `plans/*.plan.json` plus any in
//! `FPX_BENCH_PLANS`. `FPX_BENCH_QUICK=1` shortens every measurement (the GPU check's mode).

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

use fpx::ir::Graph;
use fpx::latency::{Gpu, KernelCost};
use fpx::lower::{ActDtype, KernelSpec, LinearShape, PrecisionMap, Schedule, Step, WeightFormat};
use fpx::model::{load_model, Model};
use fpx::plan::Plan;
use fpx::runtime::cuda::{timing_weights, CompilerOptions, CudaBackend, Device, KernelCache};
use fpx::runtime::exec::{Backend, CpuBackend, ExecutablePlan, PackedLinear};
use fpx::runtime::launch::{linear_args, Launcher, LinearBuffers, LinearInput, Memory};

/// Prompt tokens of the whole-plan prefill; the decode step runs at this position.
const PROMPT: usize = 64;
/// Rows of the prefill GEMM benchmark.
const PREFILL_ROWS: usize = 512;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn quick() -> bool {
    std::env::var("FPX_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn configure(g: &mut BenchmarkGroup<'_, WallTime>) {
    let (warm, measure) = if quick() { (100, 300) } else { (500, 2000) };
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(warm))
        .measurement_time(Duration::from_millis(measure));
}

fn smollm2() -> Option<Model> {
    let path = repo().join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    load_model(&path)
        .map_err(|e| eprintln!("kernels bench: whole-plan groups skipped: {e} (run `make fetch`)"))
        .ok()
}

/// The committed plans, then those in `FPX_BENCH_PLANS`, sorted by name within each.
fn plan_files() -> Vec<PathBuf> {
    let list = |dir: &Path| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".plan.json"))
            .collect();
        v.sort();
        v
    };
    let mut files = list(&repo().join("plans"));
    if let Some(dir) = std::env::var_os("FPX_BENCH_PLANS") {
        files.extend(list(Path::new(&dir)));
    }
    files
}

/// Linear shapes to time: those of the SmolLM2 schedule (every format) and the synthetic
/// 7B-class layers, each on BF16 and FP32 activations.
fn linear_shapes(model: Option<&Model>) -> Vec<LinearShape> {
    let mut base: Vec<(usize, usize)> = vec![(4096, 4096), (4096, 14336), (14336, 4096)];
    if let Some(m) = model {
        let graph = Graph::build(&m.spec);
        if let Ok(s) = Schedule::build(&graph, &Default::default()) {
            base.extend(s.linears.iter().map(|l| (l.shape.n, l.shape.k)));
        }
    }
    base.sort();
    base.dedup();
    let mut out = Vec::new();
    for (n, k) in base {
        for format in WeightFormat::ALL {
            for act in [ActDtype::Bf16, ActDtype::F32] {
                out.push(LinearShape {
                    format,
                    n,
                    k,
                    bias: false,
                    accumulate: false,
                    act,
                    w8a8: false,
                });
            }
        }
    }
    out
}

fn gpu_kernels(c: &mut Criterion) {
    let model = smollm2();
    let mut dev = match Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kernels bench: GPU groups gpu_gemv, gpu_gemm skipped: {e}");
            return;
        }
    };
    let shapes = linear_shapes(model.as_ref());
    let specs: Vec<KernelSpec> = shapes
        .iter()
        .flat_map(|&s| [KernelSpec::Gemv(s), KernelSpec::Gemm(s)])
        .collect();
    let opts = CompilerOptions {
        cache_dir: Some(KernelCache::default_dir()),
        ..CompilerOptions::default()
    };
    if let Err(e) = dev.load_kernels(&specs, opts) {
        eprintln!("kernels bench: GPU groups skipped: {e}");
        return;
    }
    let peak = Gpu::of_device_name(&dev.name).map(Gpu::spec);
    let l2 = dev.l2_bytes().unwrap_or(64 << 20);
    eprintln!(
        "kernels bench on {} ({}; L2 {} MiB; peaks from {})",
        dev.name,
        dev.arch.name(),
        l2 >> 20,
        peak.map_or("no built-in figures", |p| p.full_name)
    );
    let mut gemv = c.benchmark_group("gpu_gemv");
    configure(&mut gemv);
    for &shape in &shapes {
        let (n, k) = (shape.n, shape.k);
        let packed = PackedLinear::pack(shape.format, &timing_weights(n, k), n, k, None, None);
        let copies = (4 * l2)
            .div_ceil(packed.weight_bytes().max(1))
            .clamp(2, 4096);
        let bufs = (0..copies)
            .map(|_| LinearBuffers::upload(&dev, &packed))
            .collect::<fpx::Result<Vec<_>>>()
            .expect("weights fit on the device");
        let x = dev.upload(&shape.act.encode(&vec![0.5; k])).unwrap();
        let y = dev.zeros(n * shape.act.bytes()).unwrap();
        let (spec, entry) = shape.kernel_for_rows(1);
        let launch = |i: usize| {
            // SAFETY: x and y hold one row of k and n activations of the shape's type.
            unsafe {
                dev.launch(
                    &spec,
                    &entry,
                    1,
                    0,
                    &linear_args(&bufs[i % copies], LinearInput::Act(&x), &y, 1),
                )
            }
        };
        let bytes = fpx::lower::linear_work(&shape, 1, dev.arch).bytes;
        gemv.throughput(Throughput::Bytes(bytes as u64));
        gemv.bench_function(&entry, |b| {
            b.iter_custom(|iters| {
                Duration::from_secs_f64(dev.time_launches(iters as usize, launch).unwrap())
            })
        });
        let t = dev.time_launches(200, launch).unwrap() / 200.0;
        let frac = peak.map_or(String::new(), |p| {
            format!(
                ", {:.1}% of peak bandwidth",
                100.0 * bytes / t / p.bandwidth
            )
        });
        eprintln!(
            "{entry}: {:.2} us, {:.0} GB/s{frac} ({copies} weight copies)",
            t * 1e6,
            bytes / t / 1e9
        );
    }
    gemv.finish();
    let mut gemm = c.benchmark_group("gpu_gemm");
    configure(&mut gemm);
    for &shape in &shapes {
        let (n, k) = (shape.n, shape.k);
        let packed = PackedLinear::pack(shape.format, &timing_weights(n, k), n, k, None, None);
        let w = LinearBuffers::upload(&dev, &packed).unwrap();
        let x = dev
            .upload(&shape.act.encode(&vec![0.5; PREFILL_ROWS * k]))
            .unwrap();
        let y = dev.zeros(PREFILL_ROWS * n * shape.act.bytes()).unwrap();
        let (spec, entry) = shape.kernel_for_rows(PREFILL_ROWS);
        let launch = |_: usize| {
            // SAFETY: x and y hold PREFILL_ROWS rows of k and n activations.
            unsafe {
                dev.launch(
                    &spec,
                    &entry,
                    PREFILL_ROWS,
                    0,
                    &linear_args(&w, LinearInput::Act(&x), &y, PREFILL_ROWS),
                )
            }
        };
        let flops = 2.0 * (PREFILL_ROWS * n * k) as f64;
        gemm.throughput(Throughput::Elements(flops as u64));
        gemm.bench_function(&entry, |b| {
            b.iter_custom(|iters| {
                Duration::from_secs_f64(dev.time_launches(iters as usize, launch).unwrap())
            })
        });
        let t = dev.time_launches(20, launch).unwrap() / 20.0;
        let path = spec.path(dev.arch);
        let frac = peak.map_or(String::new(), |p| {
            // Every kernel's path is SIMT FP32 today; a tensor-core path compares with its peak.
            let peak_flops = match path {
                fpx::lower::InstructionPath::TensorF16 => p.fp16_flops,
                fpx::lower::InstructionPath::TensorFp8 => p.fp8_flops,
                fpx::lower::InstructionPath::TensorFp4 => p.fp4_flops.unwrap_or(p.fp8_flops),
                _ => p.fp32_flops,
            };
            format!(
                ", {:.1}% of the {} peak",
                100.0 * flops / t / peak_flops,
                path.name()
            )
        });
        eprintln!(
            "{entry} ({PREFILL_ROWS} rows): {:.1} us, {:.2} TFLOP/s{frac}",
            t * 1e6,
            flops / t / 1e12
        );
    }
    gemm.finish();
}

/// The decode step's kernels other than the linear layers, each at its real launch
/// configuration on the state a real decode step leaves, with its modelled cost.
fn gpu_steps(c: &mut Criterion) {
    if let Err(e) = fpx::runtime::cuda::probe_driver() {
        eprintln!("kernels bench: GPU group gpu_steps skipped: {e}");
        return;
    }
    let Some(model) = smollm2() else { return };
    let graph = Graph::build(&model.spec);
    let act = ActDtype::of_checkpoint(&graph, model.weights.as_ref());
    let exec = ExecutablePlan::build(
        &graph,
        model.weights.as_ref(),
        &PrecisionMap::new(),
        PROMPT + 1,
        act,
    )
    .expect("SmolLM2 builds");
    let mut backend = match CudaBackend::new(&exec, 0, None) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kernels bench: GPU group gpu_steps skipped: {e}");
            return;
        }
    };
    let prompt: Vec<u32> = (0..PROMPT as u32).collect();
    let next = backend.forward(&prompt, 0).unwrap();
    backend.start_pass(&[next], PROMPT, true).unwrap();
    let cost = Gpu::of_device_name(&backend.launcher.name).map(|gpu| {
        KernelCost::new(gpu, &graph, 1, PROMPT)
            .unwrap()
            .with_act(act)
    });
    let mut g = c.benchmark_group("gpu_steps");
    configure(&mut g);
    let mut seen = std::collections::BTreeSet::new();
    for (i, step) in exec.schedule.steps.iter().enumerate() {
        let entry = exec.schedule.entry_of(step, 1);
        if matches!(step, Step::Linear { .. }) || !seen.insert(entry.clone()) {
            continue;
        }
        let launch = |_: usize| backend.launch_step(i, 1, true);
        g.bench_function(&entry, |b| {
            b.iter_custom(|iters| {
                let dev = &backend.launcher;
                Duration::from_secs_f64(dev.time_launches(iters as usize, launch).unwrap())
            })
        });
        let t = backend.launcher.time_launches(200, launch).unwrap() / 200.0;
        let modelled = cost.as_ref().map_or("-".to_string(), |c| {
            let work = exec.schedule.work(step, 1, PROMPT, c.arch);
            format!("{:.2} us", c.seconds(&work) * 1e6)
        });
        eprintln!("{entry}: {:.2} us measured, {modelled} modelled", t * 1e6);
    }
    g.finish();
}

/// Prefill and decode step of every plan on `backend`, with the plan's modelled step.
fn whole_plans(
    c: &mut Criterion,
    group: &str,
    new_backend: &dyn Fn(&ExecutablePlan) -> fpx::Result<Box<dyn Backend + '_>>,
) {
    let Some(model) = smollm2() else { return };
    let graph = Graph::build(&model.spec);
    let act = ActDtype::of_checkpoint(&graph, model.weights.as_ref());
    let prompt: Vec<u32> = (0..PROMPT as u32)
        .map(|i| (i * 7919 + 13) % model.spec.vocab_size as u32)
        .collect();
    let mut g = c.benchmark_group(group);
    configure(&mut g);
    for path in plan_files() {
        let name = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".plan.json", "");
        let plan = match Plan::read(&path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{group}: {name} skipped: {e}");
                continue;
            }
        };
        plan.use_mx_scale_rule();
        let exec = ExecutablePlan::build(
            &graph,
            model.weights.as_ref(),
            &plan.precision_map(),
            PROMPT + 1,
            act,
        )
        .expect("the plan fits the model");
        let mut backend = match new_backend(&exec) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{group} skipped: {e}");
                return;
            }
        };
        g.bench_function(format!("{name}/prefill_{PROMPT}"), |b| {
            b.iter(|| backend.forward(&prompt, 0).unwrap())
        });
        let next = backend.forward(&prompt, 0).unwrap();
        g.bench_function(format!("{name}/decode_step"), |b| {
            b.iter(|| backend.forward(&[next], PROMPT).unwrap())
        });
        let start = std::time::Instant::now();
        let reps = 3;
        for _ in 0..reps {
            backend.forward(&[next], PROMPT).unwrap();
        }
        let measured = start.elapsed().as_secs_f64() / reps as f64;
        let modelled = plan.totals.as_ref().map(|t| t.step_latency);
        let source = plan
            .provenance
            .as_ref()
            .map_or(String::new(), |p| p.latency.to_string());
        eprintln!(
            "{name}: decode step measured {:.3} ms on the {} backend ({act} activations); modelled {} ({source})",
            measured * 1e3,
            backend.name(),
            modelled.map_or("-".into(), |s| format!("{:.1} us", s * 1e6)),
        );
    }
    g.finish();
}

fn cpu_plans(c: &mut Criterion) {
    whole_plans(c, "cpu_plans", &|p| Ok(Box::new(CpuBackend::new(p))));
}

fn gpu_plans(c: &mut Criterion) {
    if let Err(e) = fpx::runtime::cuda::probe_driver() {
        eprintln!("kernels bench: GPU group gpu_plans skipped: {e}");
        return;
    }
    whole_plans(c, "gpu_plans", &|p| {
        Ok(Box::new(CudaBackend::new(p, 0, None)?))
    });
}

criterion_group!(benches, cpu_plans, gpu_kernels, gpu_steps, gpu_plans);
criterion_main!(benches);
