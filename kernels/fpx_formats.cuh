// fpx_formats.cuh: exact decoding of the weight formats of src/formats (the byte layouts are
// a contract with the Rust side; see the module doc of src/formats/mod.rs).
//
//   fp16   little-endian IEEE binary16
//   fp8    OCP E4M3 ("e4m3fn"): bias 7, no infinities, NaN = S.1111.111, max 448
//   e2m1   FP4 values +-{0, .5, 1, 1.5, 2, 3, 4, 6}; two per byte, even element in the LOW nibble
//   e8m0   MXFP4 block scale 2^(byte - 127); 0xFF is NaN
//
// Every decoder returns the exact value (all of these are representable in FP32), so kernels
// and the Rust CPU backend agree element by element. The register decoders use integer bit
// manipulation and one exact multiplication by a power of two (FP32 subnormal inputs are
// handled exactly: kernels are compiled without --ftz). Hardware conversions are used only
// where the chip has them, behind preprocessor guards with the register decoder as the
// fallback, so host-compiled emulation and older targets take the portable path. The fast FP4
// register path (e2m1x8_decode_scaled) returns values times 2^-14, which its caller undoes in
// the block scale (a power of two: exact). Conversion instructions:
//   cvt.rn.f16x2.e4m3x2  sm_89 and newer            (FPX_HAS_FP8_CVT)
//   cvt.rn.f16x2.e2m1x2  sm_100a / sm_120a families  (FPX_HAS_FP4_CVT)
#pragma once

#include <cuda_fp16.h>

#include "fpx_common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 890)
#define FPX_HAS_FP8_CVT 1
#else
#define FPX_HAS_FP8_CVT 0
#endif

// Same condition as cuda_fp8.h uses for its own e2m1 conversions: arch-family-specific
// targets of the Blackwell generations (sm_100a, sm_120a, ...).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && \
    ((__CUDA_ARCH_FAMILY_SPECIFIC__ >= 1000 && __CUDA_ARCH_FAMILY_SPECIFIC__ < 1100) || \
     (__CUDA_ARCH_FAMILY_SPECIFIC__ >= 1200 && __CUDA_ARCH_FAMILY_SPECIFIC__ < 1300))
#define FPX_HAS_FP4_CVT 1
#else
#define FPX_HAS_FP4_CVT 0
#endif

namespace fpx {

// ---- scalar decoders (portable) ------------------------------------------------------------

// IEEE binary16 bits (low 16 bits of `h`) to FP32.
__device__ __forceinline__ float f16_decode(u32 h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xffffu)));
}

// E4M3 code (low 8 bits of `b`) to FP32. Magnitude bits placed at FP32 bits 20..26 read as
// 2^(e-127) * (1 + m/8) (or m * 2^-129 for e = 0); times 2^120 that is the E4M3 value.
__device__ __forceinline__ float e4m3_decode(u32 b) {
  const u32 mag = b & 0x7fu;
  float v = __uint_as_float(mag << 20) * 0x1p120f;
  v = mag == 0x7fu ? __uint_as_float(0x7fc00000u) : v;
  return __uint_as_float(__float_as_uint(v) | ((b & 0x80u) << 24));
}

// E2M1 code (low 4 bits of `c`) to FP32: magnitude bits at FP32 bits 22..24, times 2^126.
__device__ __forceinline__ float e2m1_decode(u32 c) {
  const float v = __uint_as_float((c & 7u) << 22) * 0x1p126f;
  return __uint_as_float(__float_as_uint(v) | ((c & 8u) << 28));
}

// E8M0 scale byte to FP32: 2^(b - 127); byte 0 is the FP32 subnormal 2^-127, 0xFF is NaN.
__device__ __forceinline__ float e8m0_decode(u32 b) {
  b &= 0xffu;
  return b == 0u ? __uint_as_float(0x00400000u)
                 : (b == 0xffu ? __uint_as_float(0x7fc00000u) : __uint_as_float(b << 23));
}

// ---- word decoders: one 32-bit word of packed codes to FP32 values --------------------------

// Two f16 values (low half = element 0).
__device__ __forceinline__ void f16x2_decode(u32 w, float* f) {
  f[0] = f16_decode(w);
  f[1] = f16_decode(w >> 16);
}

// Four E4M3 bytes (byte j = element j), register decode.
__device__ __forceinline__ void e4m3x4_decode_register(u32 w, float* f) {
#pragma unroll
  for (int j = 0; j < 4; ++j) f[j] = e4m3_decode(w >> (8 * j));
}

// Four E4M3 bytes decoded to their values times 2^-8 (the caller multiplies its sum by 2^8,
// exactly), for chips without the conversion instruction. Bytes j and j + 2 share a word after
// one shift and become an f16x2: the magnitude bits go to f16 bits 7..13 (an f16 of value
// e4m3 * 2^-8, subnormals included: f16's exponent bias is E4M3's plus 8), the sign to bit 15,
// and the NaN code (magnitude 0x7f, detected by the carry of adding 1) gets an all-ones
// exponent. About half the instructions of the per-byte register decode.
__device__ __forceinline__ void e4m3x4_decode_scaled(u32 w, float* f) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const u32 t = w >> (8 * j);
    const u32 mag = t & 0x007f007fu;
    const u32 nan = ((mag + 0x00010001u) & 0x00800080u) >> 7;
    const u32 h = (mag << 7) | ((t << 8) & 0x80008000u) | (nan * 0x7e00u);
    float v[2];
    f16x2_decode(h, v);
    f[j] = v[0];
    f[j + 2] = v[1];
  }
}

// Four E4M3 bytes with the sm_89+ conversion instruction (exact: every E4M3 value, NaN
// included, is an f16 value); register decode elsewhere.
__device__ __forceinline__ void e4m3x4_decode_cvt(u32 w, float* f) {
#if FPX_HAS_FP8_CVT
  u32 lo, hi;
  asm("{\n\t.reg .b16 a, b;\n\tmov.b32 {a, b}, %2;\n\t"
      "cvt.rn.f16x2.e4m3x2 %0, a;\n\tcvt.rn.f16x2.e4m3x2 %1, b;\n\t}"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
  f16x2_decode(lo, f);
  f16x2_decode(hi, f + 2);
#else
  e4m3x4_decode_register(w, f);
#endif
}

// Eight E2M1 nibbles (nibble j = element j: the even element in the low nibble).
__device__ __forceinline__ void e2m1x8_decode_register(u32 w, float* f) {
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = e2m1_decode(w >> (4 * j));
}

// Eight E2M1 nibbles decoded to their values times 2^-14 (the caller multiplies its block
// scale by 2^14, exactly). Two nibbles at a time become an f16x2: the magnitude bits go to f16
// bits 9..11 (exponent low bits and top mantissa bit: an f16 of value e2m1 * 2^-14, subnormals
// included) and the sign to bit 15; nibbles j and j + 4 share a word, so each pair costs two
// shifts, two masks and one f16x2 -> f32 conversion, instead of a multiply per element.
__device__ __forceinline__ void e2m1x8_decode_scaled(u32 w, float* f) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const u32 t = w >> (4 * j);
    const u32 h = ((t << 9) & 0x0e000e00u) | ((t << 12) & 0x80008000u);
    float v[2];
    f16x2_decode(h, v);
    f[j] = v[0];
    f[j + 4] = v[1];
  }
}

// Eight E2M1 nibbles with the native conversion of sm_100a / sm_120a (one byte -> f16x2, the
// low nibble to the low half); register decode elsewhere.
__device__ __forceinline__ void e2m1x8_decode_native(u32 w, float* f) {
#if FPX_HAS_FP4_CVT
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    u32 h2;
    const unsigned short b = static_cast<unsigned short>((w >> (8 * j)) & 0xffu);
    asm("{\n\t.reg .b8 lo, hi;\n\tmov.b16 {lo, hi}, %1;\n\tcvt.rn.f16x2.e2m1x2 %0, lo;\n\t}"
        : "=r"(h2)
        : "h"(b));
    f16x2_decode(h2, f + 2 * j);
  }
#else
  e2m1x8_decode_register(w, f);
#endif
}

// ---- dynamic FP8 quantization of activations (W8A8) ------------------------------------------
// The arithmetic of the CPU reference's per-row quantizer (src/formats/fp8.rs, `RowQ`): the
// scale is the row's largest finite magnitude / 448 (an IEEE division: kernels are compiled
// with --prec-div=true), each code e4m3(x / scale); a zero scale gives zeros with x's sign
// (NaN keeps the NaN code). Integer arithmetic (no conversion instruction), so every target
// and the emulator compute the same codes.

// E4M3 code of x: round to nearest even, saturate to +-448, NaN to the NaN code (the branch-free
// encoder of src/formats/fp8.rs, `e4m3_encode`, step for step).
__device__ __forceinline__ u32 e4m3_encode(float x) {
  const u32 bits = __float_as_uint(x);
  const u32 sign = (bits >> 24) & 0x80u;
  const u32 abs_bits = bits & 0x7fffffffu;
  const float a = __uint_as_float(abs_bits);
  // Normal range: round the mantissa to 3 bits in the integer domain, rebias, saturate.
  const u32 rounded = abs_bits + 0x7ffffu + ((abs_bits >> 20) & 1u);
  const int biased = static_cast<int>(rounded >> 20) - ((127 - 7) << 3);
  const int normal = biased < 0x7e ? biased : 0x7e;
  // Subnormal range (a < 2^-6): a / 2^-9 rounded to an integer by adding 2^23.
  const u32 sub = __float_as_uint(__fadd_rn(__fmul_rn(a, 512.f), 8388608.f)) - 0x4b000000u;
  u32 code = a < 0.015625f ? sub : static_cast<u32>(normal);
  if (a != a) code = 0x7fu;
  return (code | sign) & 0xffu;
}

// Quantizes row `y` of DIM values (already rounded to its storage type) into `codes` and its
// scale into `*scale`, with THREADS threads: thread t reads elements t, t + THREADS, ... (the
// ones it may have just stored itself). `scratch` holds THREADS / 32 floats. Contains
// __syncthreads: every thread of the block must call it.
template <int DIM, int THREADS, typename T>
__device__ __forceinline__ void quantize_row_fp8(const T* y, u8* __restrict__ codes,
                                                 float* __restrict__ scale, float* scratch) {
  float amax = 0.f;
  for (int i = threadIdx.x; i < DIM; i += THREADS) {
    const float a = fabsf(to_f32(y[i]));
    if (a > amax && a <= 3.40282347e38f) amax = a;  // NaN and inf compare false
  }
  const float s = block_max<THREADS>(amax, scratch) / 448.f;
  for (int i = threadIdx.x; i < DIM; i += THREADS) {
    const float v = to_f32(y[i]);
    u32 c;
    if (s > 0.f) c = e4m3_encode(v / s);
    else c = v != v ? 0x7fu : (__float_as_uint(v) >> 24) & 0x80u;
    codes[i] = static_cast<u8>(c);
  }
  if (threadIdx.x == 0) *scale = s;
}

}  // namespace fpx
