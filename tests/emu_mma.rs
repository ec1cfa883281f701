//! The emulator's tensor-core instructions (kernels/fpx_mma.cuh on kernels/emu/fpx_emu.h):
//! `cp.async` with commit and wait groups, `ldmatrix` (x2, x4, with and without `.trans`) and
//! `mma.sync` m16n8k16 BF16 and m16n8k32 FP8 E4M3, on one warp computing one 16x8 tile.
//!
//! The oracle is independent of the emulator's code: the fragment each lane holds is checked
//! against CUTLASS CuTe's thread-value layouts of the same instructions (`MMA_Traits` of
//! `SM80_16x8x16_F32BF16BF16F32_TN`, written out below as shapes and strides, and the E4M3
//! layout of the PTX ISA tables), and the product against an f64 product of the same
//! matrices (values chosen so that FP32 accumulation is exact). Deliberately broken variants
//! must be caught: a B fragment loaded with rows and columns swapped, a missing `cp.async`
//! wait (shared memory holds the emulator's NaN fill), a misaligned `ldmatrix` row. The same
//! source compiles with NVRTC for sm_90, so it is real CUDA with the real instructions.

mod common;

use std::ffi::c_void;

use fpx::codegen::{KernelSource, Launch};
use fpx::lower::Arch;
use fpx::runtime::emu::{arg, EmuKernels};

const SOURCE: &str = r#"
#include "fpx_mma.cuh"
using namespace fpx;

// One warp: A (16 x 16 BF16, row-major) and B (stored as the weights are, [n = 8][k = 16]) to
// shared memory by cp.async; fragments by ldmatrix; D = A B by mma.sync. `variant`: 0 as
// meant, 1 B loaded with .trans (rows and columns swapped), 2 no cp.async wait, 3 A's
// fragments loaded instead from a column-major copy with .trans (must equal variant 0),
// 4 a misaligned ldmatrix row.
extern "C" __global__ void mma_bf16_probe(const u16* __restrict__ a, const u16* __restrict__ at,
                                          const u16* __restrict__ b, float* __restrict__ d,
                                          u32* __restrict__ frags, int variant) {
  extern __shared__ __align__(16) unsigned char smem[];
  u16* sa = reinterpret_cast<u16*>(smem);  // 16 x 16
  u16* st = sa + 256;                      // A transposed, [k][m]
  u16* sb = st + 256;                      // [n][k], 8 x 16
  const int lane = threadIdx.x;
  cp_async_16(sa + lane * 8, a + lane * 8);
  cp_async_16(st + lane * 8, at + lane * 8);
  if (lane < 16) cp_async_16(sb + lane * 8, b + lane * 8);
  cp_async_commit();
  if (variant != 2) cp_async_wait<0>();
  __syncthreads();
  u32 ra[4], rb[2];
  const int j = lane / 8, i = lane % 8;
  if (variant == 3) {
    // Matrix j of the fragment is A's rows 8 (j % 2).., cols 8 (j / 2)..: rows of A^T.
    ldmatrix<4, true>(ra, st + (i + 8 * (j / 2)) * 16 + 8 * (j % 2));
  } else {
    ldmatrix<4, false>(ra, sa + (i + 8 * (j % 2)) * 16 + 8 * (j / 2) + (variant == 4 ? 1 : 0));
  }
  const u16* brow = sb + (lane % 8) * 16 + 8 * ((lane / 8) % 2);
  if (variant == 1) ldmatrix<2, true>(rb, brow);
  else ldmatrix<2, false>(rb, brow);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma_bf16(acc, ra, rb);
  for (int r = 0; r < 4; ++r) {
    d[lane * 4 + r] = acc[r];
    frags[lane * 6 + r] = ra[r];
  }
  frags[lane * 6 + 4] = rb[0];
  frags[lane * 6 + 5] = rb[1];
}

// One warp: A (16 x 32 E4M3, row-major) and B ([n = 8][k = 32]) by cp.async, fragments by
// ldmatrix of byte pairs (no .trans for 8-bit types: B is K-major, as weights are stored),
// D = A B by mma.sync m16n8k32.
extern "C" __global__ void mma_e4m3_probe(const u8* __restrict__ a, const u8* __restrict__ b,
                                          float* __restrict__ d, u32* __restrict__ frags) {
  extern __shared__ __align__(16) unsigned char smem[];
  u8* sa = smem;        // 16 x 32 bytes
  u8* sb = smem + 512;  // 8 x 32 bytes
  const int lane = threadIdx.x;
  cp_async_16(sa + lane * 16, a + lane * 16);
  if (lane < 16) cp_async_16(sb + lane * 16, b + lane * 16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  u32 ra[4], rb[2];
  const int j = lane / 8, i = lane % 8;
  ldmatrix<4, false>(ra, sa + (i + 8 * (j % 2)) * 32 + 16 * (j / 2));
  ldmatrix<2, false>(rb, sb + (lane % 8) * 32 + 16 * ((lane / 8) % 2));
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma_e4m3(acc, ra, rb);
  for (int r = 0; r < 4; ++r) {
    d[lane * 4 + r] = acc[r];
    frags[lane * 6 + r] = ra[r];
  }
  frags[lane * 6 + 4] = rb[0];
  frags[lane * 6 + 5] = rb[1];
}
"#;

const ENTRIES: [&str; 2] = ["mma_bf16_probe", "mma_e4m3_probe"];

fn source(arch: Arch) -> KernelSource {
    common::emu_probe::source("emu_mma_probe", SOURCE, &ENTRIES, arch)
}

fn kernels() -> Option<EmuKernels> {
    common::emu_probe::kernels(source(Arch::Sm90))
}

fn one_warp(shared_bytes: u32) -> Launch {
    Launch {
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes,
    }
}

/// A CuTe layout `((4, 8), values) : ((s_t0, s_t1), value strides)`: lane = t0 + 4 t1, value
/// index v in the mixed radix of `value_shape`; returns the flat (column-major) index.
fn cute(lane: usize, v: usize, thread_strides: [usize; 2], values: &[(usize, usize)]) -> usize {
    let (t0, t1) = (lane % 4, lane / 4);
    let mut index = t0 * thread_strides[0] + t1 * thread_strides[1];
    let mut rest = v;
    for &(shape, stride) in values {
        index += (rest % shape) * stride;
        rest /= shape;
    }
    index
}

/// CuTe's SM80_16x8x16 layouts: A (M = 16, K = 16), B (N = 8, K = 16), C (M = 16, N = 8),
/// each (lane, value) -> (row, col) of the matrix as written (A: m, k; B: k, n; C: m, n).
fn a_16x16(lane: usize, v: usize) -> (usize, usize) {
    let i = cute(lane, v, [32, 1], &[(2, 16), (2, 8), (2, 128)]);
    (i % 16, i / 16)
}
fn b_16x8(lane: usize, v: usize) -> (usize, usize) {
    let i = cute(lane, v, [16, 1], &[(2, 8), (2, 64)]);
    (i / 8, i % 8)
}
fn c_16x8(lane: usize, v: usize) -> (usize, usize) {
    let i = cute(lane, v, [32, 1], &[(2, 16), (2, 8)]);
    (i % 16, i / 16)
}

/// The PTX ISA's E4M3 m16n8k32 layouts: A (16 x 32) value v of a lane, B (32 x 8).
fn a_16x32(lane: usize, v: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    let row = g + if v < 4 || (8..12).contains(&v) { 0 } else { 8 };
    (row, 4 * t + (v & 3) + if v < 8 { 0 } else { 16 })
}
fn b_32x8(lane: usize, v: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    (4 * t + (v & 3) + if v < 4 { 0 } else { 16 }, g)
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Small multiples of 1/8 (exact in BF16 and E4M3; every product and sum exact in FP32).
fn value(i: usize, salt: usize) -> f32 {
    ((i * 37 + salt * 11) % 17) as f32 / 8.0 - 1.0
}

struct Bf16Run {
    d: Vec<f32>,
    frags: Vec<u32>,
}

/// A[m][k] = value(16 m + k, 1), B[k][n] = value(8 k + n, 2).
fn run_bf16(k: &EmuKernels, variant: i32) -> fpx::Result<Bf16Run> {
    let a: Vec<u16> = (0..256).map(|i| bf16_bits(value(i, 1))).collect();
    let at: Vec<u16> = (0..256).map(|i| a[(i % 16) * 16 + i / 16]).collect();
    // Stored [n][k]: element (k, n) at n * 16 + k.
    let b: Vec<u16> = (0..128)
        .map(|i| bf16_bits(value((i % 16) * 8 + i / 16, 2)))
        .collect();
    let mut d = vec![0f32; 128];
    let mut frags = vec![0u32; 32 * 6];
    let (pa, pt, pb) = (a.as_ptr(), at.as_ptr(), b.as_ptr());
    let (pd, pf) = (d.as_mut_ptr(), frags.as_mut_ptr());
    let mut args: Vec<*mut c_void> = vec![
        arg(&pa),
        arg(&pt),
        arg(&pb),
        arg(&pd),
        arg(&pf),
        arg(&variant),
    ];
    let lens = [
        a.len() * 2,
        at.len() * 2,
        b.len() * 2,
        d.len() * 4,
        frags.len() * 4,
        0,
    ];
    // SAFETY: a, at hold 256 and b 128 u16, d 128 floats, frags 192 words; 1280 bytes of
    // shared memory hold the three tiles.
    unsafe { k.launch_with("mma_bf16_probe", one_warp(1280), &mut args, &lens) }?;
    Ok(Bf16Run { d, frags })
}

fn product_bf16() -> Vec<f64> {
    let mut d = vec![0f64; 128];
    for m in 0..16 {
        for n in 0..8 {
            d[m * 8 + n] = (0..16)
                .map(|k| value(16 * m + k, 1) as f64 * value(8 * k + n, 2) as f64)
                .sum();
        }
    }
    d
}

/// D as the lanes hold it, as a row-major 16 x 8 matrix (by CuTe's C layout).
fn gather_d(d: &[f32]) -> Vec<f64> {
    let mut out = vec![f64::NAN; 128];
    for lane in 0..32 {
        for v in 0..4 {
            let (m, n) = c_16x8(lane, v);
            out[m * 8 + n] = d[lane * 4 + v] as f64;
        }
    }
    out
}

#[test]
fn bf16_fragments_follow_cute_layouts_and_the_mma_is_the_product() {
    let Some(k) = kernels() else { return };
    let run = run_bf16(&k, 0).unwrap();
    for lane in 0..32 {
        for v in 0..8 {
            let (m, kk) = a_16x16(lane, v);
            let word = run.frags[lane * 6 + v / 2];
            let got = (word >> (16 * (v % 2))) as u16;
            assert_eq!(
                got,
                bf16_bits(value(16 * m + kk, 1)),
                "A lane {lane} value {v}"
            );
        }
        for v in 0..4 {
            let (kk, n) = b_16x8(lane, v);
            let word = run.frags[lane * 6 + 4 + v / 2];
            let got = (word >> (16 * (v % 2))) as u16;
            assert_eq!(
                got,
                bf16_bits(value(8 * kk + n, 2)),
                "B lane {lane} value {v}"
            );
        }
    }
    assert_eq!(gather_d(&run.d), product_bf16());
    // ldmatrix .trans of the column-major copy gives the same A fragments.
    let trans = run_bf16(&k, 3).unwrap();
    assert_eq!(trans.frags, run.frags);
    assert_eq!(trans.d, run.d);
}

#[test]
fn broken_tensor_core_variants_are_caught() {
    let Some(k) = kernels() else { return };
    let want = product_bf16();
    // B with rows and columns swapped: a different product.
    let swapped = gather_d(&run_bf16(&k, 1).unwrap().d);
    let differs = swapped.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert!(
        differs > 64,
        "a swapped B fragment went unnoticed ({differs} of 128 differ)"
    );
    // No cp.async wait: the copies never land and the NaN fill shows.
    let no_wait = run_bf16(&k, 2).unwrap();
    assert!(
        no_wait.d.iter().all(|v| v.is_nan()),
        "{:?}",
        &no_wait.d[..4]
    );
    // A misaligned ldmatrix row is the launch's error.
    let e = run_bf16(&k, 4).err().expect("a misaligned ldmatrix fails");
    assert!(e.to_string().contains("not 16-byte aligned"), "{e}");
}

#[test]
fn e4m3_fragments_follow_the_isa_layout_and_the_mma_is_the_product() {
    let Some(k) = kernels() else { return };
    let e4m3 = |x: f32| float8::F8E4M3::from_f32(x).to_bits();
    let a: Vec<u8> = (0..512).map(|i| e4m3(value(i, 3))).collect();
    // Stored [n][k]: element (k, n) at n * 32 + k.
    let b: Vec<u8> = (0..256)
        .map(|i| e4m3(value((i % 32) * 8 + i / 32, 4)))
        .collect();
    let mut d = vec![0f32; 128];
    let mut frags = vec![0u32; 32 * 6];
    let (pa, pb, pd, pf) = (a.as_ptr(), b.as_ptr(), d.as_mut_ptr(), frags.as_mut_ptr());
    let mut args: Vec<*mut c_void> = vec![arg(&pa), arg(&pb), arg(&pd), arg(&pf)];
    let lens = [a.len(), b.len(), d.len() * 4, frags.len() * 4];
    // SAFETY: a 512 and b 256 bytes, d 128 floats, frags 192 words; 768 bytes of shared memory.
    unsafe { k.launch_with("mma_e4m3_probe", one_warp(768), &mut args, &lens) }.unwrap();
    for lane in 0..32 {
        for v in 0..16 {
            let (m, kk) = a_16x32(lane, v);
            let got = (frags[lane * 6 + v / 4] >> (8 * (v % 4))) as u8;
            assert_eq!(got, a[m * 32 + kk], "A lane {lane} value {v}");
        }
        for v in 0..8 {
            let (kk, n) = b_32x8(lane, v);
            let got = (frags[lane * 6 + 4 + v / 4] >> (8 * (v % 4))) as u8;
            assert_eq!(got, b[n * 32 + kk], "B lane {lane} value {v}");
        }
    }
    let mut want = vec![0f64; 128];
    for m in 0..16 {
        for n in 0..8 {
            want[m * 8 + n] = (0..32)
                .map(|kk| value(m * 32 + kk, 3) as f64 * value(kk * 8 + n, 4) as f64)
                .sum();
        }
    }
    assert_eq!(gather_d(&d), want);
}

#[test]
fn the_tensor_core_probe_is_real_cuda() {
    let Some(ptx) = common::emu_probe::nvrtc_ptx(&source(Arch::Sm90), &ENTRIES) else {
        return;
    };
    for instruction in [
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
        "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
        "cp.async.cg.shared.global",
        "cp.async.wait_group 0",
    ] {
        assert!(ptx.contains(instruction), "{instruction} not in the PTX");
    }
}
