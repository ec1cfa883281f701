//! Attention split over the KV length (flash-decoding, `src/lower/split_kv.rs`) on the CUDA
//! emulator against the CPU reference's `attention_rows`: passes of 1 and 3 rows (split into
//! three chunks over a 700-position cache) and of 9 rows (one block per row), with and without
//! a sliding window, at the start of the cache, in its middle and at its end, each launched
//! twice on the same partials buffer (the last block of a row resets its counter, so the second
//! launch must give the same result); a combine that drops the last split must be caught. The
//! same cases run on a GPU when there is one (`scripts/gpu-check.sh`).
//!
//! Needs g++ and the CUDA header wheels in .venv (`make tools`): skipped with a printed reason
//! without them, failing under FPX_REQUIRE_DATA=1.

mod common;

use fpx::codegen::Renderer;
use fpx::lower::{split_kv, ActDtype, Arch, KernelSpec};
use fpx::runtime::cpu::kernels::{attention_rows, AttentionShape};
use fpx::runtime::emu::EmuKernels;
use fpx::runtime::launch::{Arg, Launcher};

use common::emu_probe::emu_opts;
use common::rel_err;

/// Cache positions of every case: three splits of at most 256 positions.
const CAPACITY: usize = 700;
/// Kernel and CPU reference sum in other orders (and the split combine rescales): 1e-5 of the
/// largest output, as the other attention checks.
const TOL: f32 = 1e-5;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 1.5)
        .collect()
}

fn spec(heads: usize, kv_heads: usize, head_dim: usize, window: Option<usize>) -> KernelSpec {
    KernelSpec::Attention {
        heads,
        kv_heads,
        head_dim,
        act: ActDtype::F32,
        window,
    }
}

/// The kernel's and the CPU reference's outputs for `m` rows at positions `pos0..pos0 + m`,
/// the kernel launched twice.
fn outputs<L: Launcher>(k: &L, spec: &KernelSpec, pos0: usize, m: usize) -> [Vec<f32>; 3] {
    let KernelSpec::Attention {
        heads,
        kv_heads,
        head_dim,
        window,
        ..
    } = *spec
    else {
        unreachable!("attention specs only")
    };
    let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
    let f32s = ActDtype::F32;
    let q = values(m * q_dim, 1 + pos0);
    let (kc, vc) = (values(CAPACITY * kv_dim, 2), values(CAPACITY * kv_dim, 3));
    let up = |v: &[f32]| k.upload(&f32s.encode(v)).unwrap();
    let (qb, kb, vb) = (up(&q), up(&kc), up(&vc));
    let partials = k.zeros(split_kv::partials_bytes(heads, head_dim)).unwrap();
    let pos = k.upload(&(pos0 as i32).to_le_bytes()).unwrap();
    // A fresh output each launch, the same partials (and counters).
    let launch = || {
        let out = k.zeros(4 * m * q_dim).unwrap();
        let args = [
            Arg::Buf(&qb),
            Arg::Buf(&kb),
            Arg::Buf(&vb),
            Arg::Buf(&out),
            Arg::Buf(&partials),
            Arg::Buf(&pos),
            Arg::I32(m as i32),
        ];
        // SAFETY: the buffers hold m query rows, CAPACITY cache rows and the partials.
        unsafe { k.launch(spec, &spec.name(), m, CAPACITY, &args) }.unwrap();
        f32s.decode(&k.read(&out, 4 * m * q_dim).unwrap())
    };
    let (first, second) = (launch(), launch());
    let shape = AttentionShape {
        heads,
        kv_heads,
        head_dim,
        window,
    };
    let mut want = vec![0f32; m * q_dim];
    let seen = (pos0 + m) * kv_dim;
    attention_rows(&q, m, &kc[..seen], &vc[..seen], pos0, shape, &mut want);
    [first, second, want]
}

fn specs() -> [KernelSpec; 3] {
    [
        spec(4, 2, 16, None),
        spec(4, 2, 16, Some(300)),
        spec(6, 2, 48, None),
    ]
}

fn build(renderer: &Renderer) -> Option<EmuKernels> {
    let opts = emu_opts(Arch::Sm90)?;
    let sources: Vec<_> = specs()
        .iter()
        .map(|s| renderer.render(s, Arch::Sm90).unwrap())
        .collect();
    Some(EmuKernels::from_sources(&sources, &opts).unwrap())
}

/// (first position, rows): the cache's start, middle and end; split and unsplit passes.
const CASES: [(usize, usize); 7] = [
    (0, 1),
    (5, 3),
    (400, 1),
    (450, 3),
    (697, 3),
    (300, 9),
    (691, 9),
];

/// Every case of [`CASES`] on `k` within `tol` of the CPU reference, each relaunch identical;
/// returns the largest error.
fn check_cases<L: Launcher>(k: &L, tol: f32) -> f32 {
    let mut worst = 0f32;
    for spec in specs() {
        for (pos0, m) in CASES {
            let [first, second, want] = outputs(k, &spec, pos0, m);
            let err = rel_err(&first, &want);
            assert!(err <= tol, "{} at {pos0} x {m}: {err}", spec.name());
            assert_eq!(first, second, "{} at {pos0} x {m}: relaunch", spec.name());
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn split_attention_matches_the_cpu_reference_and_resets_its_counters() {
    let Some(k) = build(&Renderer::new().unwrap()) else {
        return;
    };
    assert_eq!(split_kv::splits(3, CAPACITY), 3, "the decode cases split");
    assert_eq!(split_kv::splits(9, CAPACITY), 1, "the 9-row case does not");
    let worst = check_cases(&k, TOL);
    eprintln!("split attention: largest relative error {worst:.2e}");
}

/// The same cases on a GPU (skipped without one; failing under FPX_REQUIRE_GPU=1): real
/// blocks run concurrently, so the fence, the counter and the volatile reads of the combine
/// are exercised as the emulator cannot. 1e-4: the GPU's `expf` is not the host's.
#[test]
fn split_attention_on_the_gpu_matches_the_cpu_reference() {
    if !common::gpu() {
        return;
    }
    let mut dev = fpx::runtime::cuda::Device::open(0).unwrap();
    dev.load_kernels(&specs(), Default::default()).unwrap();
    let worst = check_cases(&dev, 1e-4);
    eprintln!("split attention on the GPU: largest relative error {worst:.2e}");
}

#[test]
fn a_combine_that_drops_the_last_split_is_caught() {
    let template = fpx::codegen::TEMPLATES
        .iter()
        .find(|(name, _)| *name == "attention.cu.tera")
        .map(|(_, text)| *text)
        .unwrap();
    let good = "if (all[s * PARTIAL + 1] > 0.f) o = fmaf(";
    assert_eq!(
        template.matches(good).count(),
        1,
        "the combine's output loop"
    );
    let broken = template.replace(
        &format!("for (int s = 0; s < splits; ++s) {{\n      const float ms = all[s * PARTIAL];\n      {good}"),
        &format!("for (int s = 0; s < splits - 1; ++s) {{\n      const float ms = all[s * PARTIAL];\n      {good}"),
    );
    assert_ne!(broken, template, "the break applies");
    let renderer = Renderer::with_overrides(&[("attention.cu.tera", &broken)]).unwrap();
    let Some(k) = build(&renderer) else {
        return;
    };
    let spec = spec(4, 2, 16, None);
    let [got, _, want] = outputs(&k, &spec, 600, 1);
    let err = rel_err(&got, &want);
    assert!(err > 1e-2, "the dropped split went unnoticed: {err}");
    // Passes that do not split are untouched by the break.
    let [got, _, want] = outputs(&k, &spec, 600, 9);
    assert!(rel_err(&got, &want) <= TOL);
}
