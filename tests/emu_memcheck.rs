//! The emulator's memory checks (kernels/emu/fpx_emu_memcheck.h): deliberately broken kernels
//! whose launches must fail with a message naming the access, the argument and the offset, and
//! the correct kernels at the same shapes, which must pass:
//! - hand-written: a read one element past the end of an input (and one before its start), a
//!   16-byte vector load through `fpx::load_vec<16>` (the linear kernels' weight loads) at an
//!   address 4 bytes off its alignment, and a write one element past the end of an output,
//!   which must not happen (the launch stops before the access);
//! - generated: the GEMV's weight loop one load too long (reads past the end of its buffers),
//!   its weight loads 4 bytes off alignment, and its store guard one row too long (writes one
//!   row past the output).
//!
//! Needs g++ and the CUDA header wheels in .venv (skipped without, failing under
//! FPX_REQUIRE_DATA=1).

mod common;

use std::ffi::c_void;

use fpx::codegen::{KernelSource, Launch, Renderer};
use fpx::lower::{ActDtype, Arch, KernelSpec, LinearShape, WeightFormat};
use fpx::runtime::emu::{arg, EmuKernels};
use fpx::runtime::exec::{reference_linear, PackedLinear};
use fpx::runtime::launch::run_linear;

use common::break_once;

const SOURCE: &str = r#"
#include "fpx_common.cuh"

extern "C" __global__ void shift_copy(const float* __restrict__ in, float* __restrict__ out,
                                      int shift) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  out[t] = in[t + shift];
}

extern "C" __global__ void vec_copy(const unsigned char* __restrict__ in,
                                    unsigned* __restrict__ out, int offset) {
  const int t = threadIdx.x;
  const fpx::Vec<16> v = fpx::load_vec<16>(in + 16 * t + offset);
  for (int j = 0; j < 4; ++j) out[4 * t + j] = v.w[j];
}

extern "C" __global__ void shift_store(float* __restrict__ out, int shift) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  out[t + shift] = static_cast<float>(t);
}
"#;

const ENTRIES: [&str; 3] = ["shift_copy", "vec_copy", "shift_store"];

fn probe_source(arch: Arch) -> KernelSource {
    common::emu_probe::source("memcheck_probe", SOURCE, &ENTRIES, arch)
}

fn launch(grid: u32, block: u32) -> Launch {
    Launch {
        grid: (grid, 1, 1),
        block: (block, 1, 1),
        shared_bytes: 0,
    }
}

/// `err`'s text, which must contain every one of `parts`.
fn assert_names(err: &fpx::Error, parts: &[&str]) {
    let text = err.to_string();
    for p in parts {
        assert!(text.contains(p), "`{p}` missing from: {text}");
    }
}

#[test]
fn emu_fails_a_read_past_the_end_or_before_the_start_of_an_input() {
    let Some(k) = common::emu_probe::kernels(probe_source(Arch::Sm90)) else {
        return;
    };
    let n = 64usize;
    let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut out = vec![0f32; n];
    let mut run = |shift: i32| {
        let (pi, po) = (input.as_ptr(), out.as_mut_ptr());
        let mut args: Vec<*mut c_void> = vec![arg(&pi), arg(&po), arg(&shift)];
        // SAFETY: in and out hold n floats; the emulator stops any access outside them.
        unsafe { k.launch_with("shift_copy", launch(2, 32), &mut args, &[4 * n, 4 * n, 0]) }
    };
    let err = run(1).unwrap_err();
    assert_names(
        &err,
        &[
            "launch of shift_copy",
            "out-of-bounds read of 4 bytes at byte offset 256 of argument 0 (a buffer of 256 bytes)",
            "block (1,0,0) thread (31,0,0)",
        ],
    );
    let err = run(-1).unwrap_err();
    assert_names(
        &err,
        &[
            "out-of-bounds read of 4 bytes 4 bytes before the start of argument 0",
            "block (0,0,0) thread (0,0,0)",
        ],
    );
    run(0).unwrap();
    assert_eq!(out, input, "the correct launch copied");
}

#[test]
fn emu_fails_a_misaligned_16_byte_vector_load() {
    let Some(k) = common::emu_probe::kernels(probe_source(Arch::Sm90)) else {
        return;
    };
    let threads = 8usize;
    // One spare vector: every load is in bounds at either offset.
    let input: Vec<u8> = (0..16 * (threads + 1)).map(|i| i as u8).collect();
    let mut out = vec![0u32; 4 * threads];
    let mut run = |offset: i32| {
        let (pi, po) = (input.as_ptr(), out.as_mut_ptr());
        let mut args: Vec<*mut c_void> = vec![arg(&pi), arg(&po), arg(&offset)];
        let lens = [input.len(), 4 * out.len(), 0];
        // SAFETY: in holds threads + 1 vectors, out 4 words per thread.
        unsafe { k.launch_with("vec_copy", launch(1, threads as u32), &mut args, &lens) }
    };
    let err = run(4).unwrap_err();
    assert_names(
        &err,
        &[
            "launch of vec_copy",
            "misaligned access to",
            "uint4' (16-byte alignment needed) at byte offset 4 of argument 0",
            "block (0,0,0) thread (0,0,0)",
        ],
    );
    run(0).unwrap();
    let want: Vec<u32> = input[..16 * threads]
        .chunks(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    assert_eq!(out, want, "the aligned launch copied");
}

#[test]
fn emu_stops_a_write_past_the_end_of_an_output_before_it_happens() {
    let Some(k) = common::emu_probe::kernels(probe_source(Arch::Sm90)) else {
        return;
    };
    let n = 64usize;
    // The kernel's buffer is the first n floats; the one after it is a sentinel.
    let mut out = vec![-1f32; n + 1];
    let mut run = |shift: i32| {
        let po = out.as_mut_ptr();
        let mut args: Vec<*mut c_void> = vec![arg(&po), arg(&shift)];
        // SAFETY: out holds n + 1 floats; the kernel is told of n.
        unsafe { k.launch_with("shift_store", launch(2, 32), &mut args, &[4 * n, 0]) }
    };
    let err = run(1).unwrap_err();
    assert_names(
        &err,
        &[
            "launch of shift_store",
            "out-of-bounds write of 4 bytes at byte offset 256 of argument 0 (a buffer of 256 bytes)",
            "block (1,0,0) thread (31,0,0)",
        ],
    );
    run(0).unwrap();
    assert_eq!(out[n], -1.0, "the faulting write did not happen");
    let want: Vec<f32> = (0..n).map(|t| t as f32).collect();
    assert_eq!(out[..n], want[..], "the correct launch wrote");
}

#[test]
fn emu_fails_generated_gemvs_that_overrun_or_misalign() {
    let Some(opts) = common::emu_probe::emu_opts(Arch::Sm90) else {
        return;
    };
    // FP16 weights (no scales: the store touches y alone), 33 rows (the grid has rows past
    // N), rows of 1152 bytes (16-byte loads).
    let shape = LinearShape {
        format: WeightFormat::Fp16,
        n: 33,
        k: 576,
        bias: false,
        accumulate: false,
        act: ActDtype::F32,
        w8a8: false,
    };
    let w: Vec<f32> = (0..shape.n * shape.k)
        .map(|i| (i % 13) as f32 / 16.0 - 0.4)
        .collect();
    let x: Vec<f32> = (0..shape.k).map(|i| (i % 7) as f32 / 8.0 - 0.3).collect();
    let y0 = vec![0f32; shape.n];
    let packed = PackedLinear::pack(shape.format, &w, shape.n, shape.k, None, None);
    let gemv = fpx::codegen::TEMPLATES
        .iter()
        .find(|(n, _)| *n == "gemv.cu.tera")
        .unwrap()
        .1;
    let weight_loop = "for (int v = gl; v < ROW_VECS; v += LANES)";
    let weight_load = "fpx::load_vec<VEC_BYTES>(wrow + static_cast<size_t>(v) * VEC_BYTES)";
    let store_guard = "if (row < N && gl == 0)";
    let variants: [(String, &[&str]); 4] = [
        (gemv.to_string(), &[]),
        (
            break_once(gemv, weight_loop, "for (int v = gl; v <= ROW_VECS; v += LANES)"),
            &["launch of gemv", "out-of-bounds read of"],
        ),
        (
            break_once(
                gemv,
                weight_load,
                "fpx::load_vec<VEC_BYTES>(wrow + static_cast<size_t>(v) * VEC_BYTES + 4)",
            ),
            &[
                "misaligned access to",
                "uint4' (16-byte alignment needed) at byte offset 4 of argument 0",
            ],
        ),
        (
            break_once(gemv, store_guard, "if (row <= N && gl == 0)"),
            &["out-of-bounds write of 4 bytes at byte offset 132 of argument 5 (a buffer of 132 bytes)"],
        ),
    ];
    for (i, (template, expected)) in variants.iter().enumerate() {
        let renderer = Renderer::with_overrides(&[("gemv.cu.tera", template)]).unwrap();
        let source = renderer
            .render(&KernelSpec::Gemv(shape), opts.arch)
            .unwrap();
        let kernels = EmuKernels::from_sources(&[source], &opts).unwrap();
        let got = run_linear(&kernels, shape, &packed, &x, 1, &y0);
        if expected.is_empty() {
            let want = reference_linear(&packed, &shape, &x, 1, &y0);
            assert!(common::rel_err(&got.unwrap(), &want) < 1e-5, "variant {i}");
        } else {
            assert_names(&got.unwrap_err(), expected);
        }
    }
}

#[test]
fn the_memcheck_probe_is_real_cuda() {
    let Some(_ptx) = common::emu_probe::nvrtc_ptx(&probe_source(Arch::Sm90), &ENTRIES) else {
        return;
    };
}
