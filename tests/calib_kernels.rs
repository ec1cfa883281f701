//! Calibration on the generated kernels (`fpx calibrate --backend emu|cuda`), checked on the
//! emulator against the CPU interpreter: both passes' forwards run through the kernels, so
//! every record's eps, W+A eps and KL must equal the cpu backend's within the tolerances below
//! (the kernels sum in other orders; weight errors are host arithmetic and must be identical).
//! Windows of 12 tokens run the GEMM kernels, the KL windows of 6 the GEMV kernels, and the
//! KL variants run each layer's kernel in its format (fp8, nvfp4, mxfp4) on packed bytes; tiny
//! Llama (tied lm_head), Qwen2 (biases) and Qwen3 (q/k head norms) models.
//!
//! The emulator tests need g++ and the CUDA header wheels in .venv (skipped without, failing
//! under FPX_REQUIRE_DATA=1); the same check on a GPU needs a CUDA driver (skipped without,
//! failing under FPX_REQUIRE_GPU=1; `scripts/gpu-check.sh` runs it).

mod common;

use common::emu_probe::emu_opts;
use common::{fpx, gpu};
use fpx::calib::capture::{measure_eps_with, EpsOptions};
use fpx::calib::sensitivity::measure_kl;
use fpx::calib::{CpuForwards, KernelStages, LayerCalibration, StageForwards};
use fpx::eval;
use fpx::formats::Format;
use fpx::ir::Graph;
use fpx::lower::Arch;
use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
use fpx::model::{load_model, Architecture, Model};

/// Weight-only eps, relative: the inputs come from a whole forward in other summation orders,
/// and on the kernels it is the difference of two products (measured: at most 1.1e-6).
const EPS_TOL: f64 = 1e-5;
/// W+A eps, relative: activation quantization is discontinuous, so inputs that differ by 1e-6
/// can round a value to the neighbouring code (measured: at most 1.4e-4, Qwen3's o_proj in
/// fp8; 1.1e-6 on the other models).
const WA_TOL: f64 = 1e-3;
/// KL, relative (measured: at most 2.6e-5; the kernels decode the same values the CPU's
/// fake-quantized weights hold).
const KL_TOL: f64 = 2e-4;

const FORMATS: [Format; 3] = [Format::Fp8, Format::Nvfp4, Format::Mxfp4];

fn calibrate(
    model: &Model,
    graph: &Graph,
    windows: &[&[u32]],
    kl_windows: &[&[u32]],
    forwards: &mut dyn StageForwards,
) -> Vec<LayerCalibration> {
    let w = model.weights.as_ref();
    let options = EpsOptions::default();
    let mut records = measure_eps_with(
        graph,
        w,
        windows,
        &FORMATS,
        options,
        forwards,
        &mut |_, _| {},
    )
    .unwrap();
    measure_kl(
        graph,
        w,
        kl_windows,
        &mut records,
        false,
        forwards,
        &mut |_, _| {},
    )
    .unwrap();
    records
}

fn close(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs(),
        "{what}: {got} on the kernels, {want} on the cpu"
    );
}

/// Both passes on `kernels` (built per graph) and on the CPU interpreter, record by record.
fn check_against_cpu<F: StageForwards>(
    backend: &str,
    (eps_tol, wa_tol, kl_tol): (f64, f64, f64),
    mut kernels_for: impl FnMut(&Graph) -> F,
) {
    // Llama: tied lm_head, no bias; Qwen2: q/k/v bias, its own lm_head; Qwen3: q/k head norms
    // in the RoPE step.
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_hf_checkpoint(dir.path(), &tiny_spec(arch), 11, HfDtype::F32, 1).unwrap();
        let model = load_model(dir.path()).unwrap();
        let graph = Graph::build(&model.spec);
        let vocab = model.spec.vocab_size as u32;
        let toks: Vec<u32> = (0..36u32).map(|i| (i * 97 + 5) % vocab).collect();
        let windows = eval::windows(&toks[..24], 12, None).unwrap();
        let kl_windows = eval::windows(&toks[24..], 6, None).unwrap();

        let cpu = calibrate(&model, &graph, &windows, &kl_windows, &mut CpuForwards);
        let mut forwards = kernels_for(&graph);
        assert_eq!(forwards.name(), backend);
        let kernels = calibrate(&model, &graph, &windows, &kl_windows, &mut forwards);

        assert_eq!(kernels.len(), cpu.len());
        assert_eq!(
            kernels.len(),
            model.spec.num_layers * 7 + 1,
            "lm_head included"
        );
        for (k, c) in kernels.iter().zip(&cpu) {
            assert_eq!(k.name, c.name);
            for f in FORMATS {
                let (km, cm) = (&k.metrics[&f], &c.metrics[&f]);
                let what = |m: &str| format!("{backend} {arch:?} {} {f} {m}", k.name);
                assert_eq!(km.weight_error, cm.weight_error, "{}", what("weight error"));
                close(&what("eps"), km.eps, cm.eps, eps_tol);
                close(&what("W+A eps"), km.eps_wa, cm.eps_wa, wa_tol);
                let (kk, ck) = (km.kl.unwrap(), cm.kl.unwrap());
                assert!(ck > 0.0, "{}: the variant changes the output", what("KL"));
                close(&what("KL"), kk, ck, kl_tol);
            }
        }
    }
}

#[test]
fn emu_calibration_equals_the_cpu_interpreters() {
    let Some(opts) = emu_opts(Arch::Sm90) else {
        return;
    };
    check_against_cpu("emu", (EPS_TOL, WA_TOL, KL_TOL), |graph| {
        KernelStages::emu(graph, &FORMATS, 12, &opts).unwrap()
    });
}

#[test]
fn cuda_calibration_equals_the_cpu_interpreters() {
    if !gpu() {
        return;
    }
    // Ten times the emulator's tolerances: the device contracts multiply-adds (not measured
    // on a GPU yet).
    let tolerances = (10.0 * EPS_TOL, 10.0 * WA_TOL, 10.0 * KL_TOL);
    check_against_cpu("cuda", tolerances, |graph| {
        KernelStages::cuda(graph, &FORMATS, 12, 0).unwrap()
    });
}

#[test]
fn fpx_calibrate_runs_on_the_emulator_and_refuses_a_missing_gpu() {
    let Some(_) = emu_opts(Arch::Sm90) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_hf_checkpoint(
        &model_dir,
        &tiny_spec(Architecture::Qwen2),
        11,
        HfDtype::BF16,
        1,
    )
    .unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let out = dir.path().join("calib.json");
    let calibrate = |backend: &str| {
        fpx(&[
            "calibrate",
            "--model",
            model_dir.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--seq-len",
            "10",
            "--windows",
            "2",
            "--kl-seq-len",
            "6",
            "--formats",
            "fp8,nvfp4",
            "--backend",
            backend,
            "-o",
            out.to_str().unwrap(),
            "--json",
        ])
    };
    let (code, stdout, stderr) = calibrate("emu");
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["backend"], "emu");
    assert_eq!(summary["kl"]["seq_len"], 6);
    let written = fpx::calib::Calibration::read(&out).unwrap();
    assert!(written
        .layers
        .iter()
        .all(|l| l.metrics[&Format::Fp8].kl.is_some()));
    std::fs::remove_file(&out).unwrap();

    if fpx::runtime::cuda::probe_driver().is_err() {
        let (code, _, stderr) = calibrate("cuda");
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("no CUDA driver"), "{stderr}");
        assert!(!out.exists(), "no calibration file without a GPU");
    }
}
