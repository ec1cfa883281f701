// fpx_common.cuh: integer types, read-only vector loads, activation storage types and warp /
// block reductions shared by every kernel that fpx generates (templates/*.cu.tera).
//
// Only standard CUDA C++ is used here (no inline PTX), so a host C++ emulation of the CUDA
// execution model (grid/block indices, __syncthreads, warp shuffles) can run these helpers
// unchanged. Reductions take the full warp mask: callers make sure every lane of the warp
// reaches them (no early return before a shuffle).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fpx {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

static_assert(sizeof(u16) == 2 && sizeof(u32) == 4 && sizeof(u64) == 8, "fixed-width types");

constexpr u32 FULL_MASK = 0xffffffffu;

// A vector of BYTES bytes (1, 2, 4, 8 or 16) loaded through the read-only path and returned as
// 32-bit words: word j holds bytes 4j..4j+3, little-endian; vectors under 4 bytes occupy the
// low bytes of word 0. The address must be BYTES-aligned.
template <int BYTES> struct Vec {
  static constexpr int WORDS = BYTES >= 4 ? BYTES / 4 : 1;
  u32 w[WORDS];
};

template <int BYTES> __device__ __forceinline__ Vec<BYTES> load_vec(const u8* __restrict__ p) {
  Vec<BYTES> v;
  if constexpr (BYTES == 16) {
    const uint4 t = __ldg(reinterpret_cast<const uint4*>(p));
    v.w[0] = t.x; v.w[1] = t.y; v.w[2] = t.z; v.w[3] = t.w;
  } else if constexpr (BYTES == 8) {
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(p));
    v.w[0] = t.x; v.w[1] = t.y;
  } else if constexpr (BYTES == 4) {
    v.w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else if constexpr (BYTES == 2) {
    v.w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
  } else {
    static_assert(BYTES == 1, "vector width");
    v.w[0] = __ldg(p);
  }
  return v;
}

// N consecutive floats (N = 1, 2 or 4; the address N*4-aligned) through the read-only path.
template <int N> __device__ __forceinline__ void load_f32(const float* __restrict__ p, float* out) {
  if constexpr (N == 4) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = t.x; out[1] = t.y; out[2] = t.z; out[3] = t.w;
  } else if constexpr (N == 2) {
    const float2 t = __ldg(reinterpret_cast<const float2*>(p));
    out[0] = t.x; out[1] = t.y;
  } else {
    static_assert(N == 1, "float vector width");
    out[0] = __ldg(p);
  }
}

// ---- activations -----------------------------------------------------------------------------
// Activation buffers and the KV cache hold `act_t`: float, or the 16-bit types of CUDA's own
// headers (fpx::bf16 = __nv_bfloat16, fpx::f16 = __half; src/lower/dtype.rs). The rule of
// every kernel: load and widen to FP32, compute in FP32, round to nearest even when storing
// (the header's __float2bfloat16_rn / __float2half_rn: cvt.rn on the device, the same rounding
// in software on the host, which is what the emulator runs).
typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }

// Element i of an activation buffer that no thread of the launch writes (read-only path).
template <typename T> __device__ __forceinline__ float load_act(const T* __restrict__ p, size_t i) {
  return to_f32(__ldg(p + i));
}

// A 16-bit activation's bits widened to FP32 (exactly), the type chosen by the pointer.
__device__ __forceinline__ float widen_bits(unsigned short b, const bf16*) {
  return __uint_as_float(static_cast<u32>(b) << 16);
}
__device__ __forceinline__ float widen_bits(unsigned short b, const f16*) {
  return __half2float(__ushort_as_half(b));
}

// N consecutive activations (N = 1, 2 or 4; the address N-element aligned), widened to FP32,
// with one vector load. (Written out per width: a Vec temporary indexed in a loop was kept in
// a stack frame by ptxas 12.9 in the 8-row GEMV.)
template <int N, typename T> __device__ __forceinline__ void load_acts(const T* __restrict__ p, float* out) {
  if constexpr (sizeof(T) == 4) {
    load_f32<N>(reinterpret_cast<const float*>(p), out);
  } else if constexpr (N == 4) {
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(p));
    out[0] = widen_bits(static_cast<unsigned short>(t.x), p);
    out[1] = widen_bits(static_cast<unsigned short>(t.x >> 16), p);
    out[2] = widen_bits(static_cast<unsigned short>(t.y), p);
    out[3] = widen_bits(static_cast<unsigned short>(t.y >> 16), p);
  } else if constexpr (N == 2) {
    const u32 t = __ldg(reinterpret_cast<const unsigned int*>(p));
    out[0] = widen_bits(static_cast<unsigned short>(t), p);
    out[1] = widen_bits(static_cast<unsigned short>(t >> 16), p);
  } else {
    static_assert(sizeof(T) == 2 && N == 1, "16-bit activation vector");
    out[0] = widen_bits(__ldg(reinterpret_cast<const unsigned short*>(p)), p);
  }
}

__device__ __forceinline__ void store_act(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_act(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_act(f16* p, float v) { *p = __float2half_rn(v); }

// Sum over aligned groups of WIDTH lanes (WIDTH a power of two <= 32); every lane of the
// group gets the group's sum.
template <int WIDTH, typename T> __device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o, WIDTH);
  return v;
}

template <typename T> __device__ __forceinline__ T warp_sum(T v) { return group_sum<32>(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// Sum over a block of THREADS threads (a multiple of 32). `scratch` holds THREADS/32 values.
// Every thread gets the result. Contains __syncthreads: all threads must call it.
template <int THREADS, typename T> __device__ __forceinline__ T block_sum(T v, T* scratch) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size");
  constexpr int WARPS = THREADS / 32;
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
#pragma unroll
  for (int i = 1; i < WARPS; ++i) total += scratch[i];
  __syncthreads();
  return total;
}

// Maximum over a block (see block_sum).
template <int THREADS> __device__ __forceinline__ float block_max(float v, float* scratch) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size");
  constexpr int WARPS = THREADS / 32;
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = scratch[0];
#pragma unroll
  for (int i = 1; i < WARPS; ++i) m = fmaxf(m, scratch[i]);
  __syncthreads();
  return m;
}

// A device-wide memory fence: this thread's global writes are visible to every block before
// its later writes (split attention publishes partials before counting itself done). The
// emulator runs blocks one after another, so it needs none.
__device__ __forceinline__ void fence() {
#ifdef __CUDA_ARCH__
  __threadfence();
#endif
}

// Arg-max step: (v, i) wins over (w, j) when v > w, or v == w and i < j (the first maximum).
// NaN never wins (a NaN logit is skipped, as by the CPU backend).
__device__ __forceinline__ void argmax_merge(float& v, int& i, float w, int j) {
  if (w > v || (w == v && j < i)) { v = w; i = j; }
}

}  // namespace fpx
