// fpx_mma.cuh: warp-level tensor-core building blocks for the generated kernels: mma.sync
// (m16n8k16 BF16/FP16 and m16n8k32 FP8 E4M3, FP32 accumulators), ldmatrix (x1/x2/x4, with and
// without .trans) and cp.async with commit and wait groups.
//
// On the GPU (NVRTC, __CUDA_ARCH__ defined) each function is the one PTX instruction. In
// emulator builds (kernels/emu/fpx_emu.h, no __CUDA_ARCH__) each calls the emulator's
// implementation of that instruction's PTX ISA semantics: the fragment each lane holds, the
// warp-wide exchange, and cp.async copies that land only when a wait_group allows them (so a
// missing wait reads the NaN the emulator fills shared memory with).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k32"), with
// g = lane / 4 and t = lane % 4:
//   A 16x16 (16-bit, row): a[r] holds (row g + 8 (r % 2), cols 2t + 8 (r / 2) + {0, 1})
//   B 16x8  (16-bit, col): b[r] holds (rows 2t + 8 r + {0, 1}, col g)
//   A 16x32 (e4m3, row):   a[r] holds (row g + 8 (r % 2), cols 4t + 16 (r / 2) + {0..3})
//   B 32x8  (e4m3, col):   b[r] holds (rows 4t + 16 r + {0..3}, col g)
//   C/D 16x8 (f32):        d[r] is (row g + 8 (r / 2), col 2t + r % 2)
// Lower k (column of A, row of B) sits in the lower bits of a register.
#pragma once

#include "fpx_common.cuh"

namespace fpx {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix .m8n8 .b16: lane l gives the address of row l % 8 of matrix l / 8 (lanes 0-7 for
// x1, 0-15 for x2, all for x4; a row is 16 bytes, 16-byte aligned, in shared memory). r[j] of
// lane l is matrix j's (row l / 4, cols 2 (l % 4) + {0, 1}); with .trans, its (rows
// 2 (l % 4) + {0, 1}, col l / 4).
template <int N, bool TRANS> __device__ __forceinline__ void ldmatrix(u32 (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(__CUDA_ARCH__)
  const u32 a = smem_addr(row);
  if constexpr (N == 1 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 2 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (!TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
#else
  fpx_emu::ldmatrix(r, N, TRANS, row);
#endif
}

// d += a * b, m16n8k16, A row-major and B column-major BF16, FP32 accumulators (sm_80+).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  fpx_emu::mma(d, a, b, fpx_emu::MmaType::Bf16);
#endif
}

// d += a * b, m16n8k16, FP16 inputs, FP32 accumulators (sm_80+).
__device__ __forceinline__ void mma_f16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  fpx_emu::mma(d, a, b, fpx_emu::MmaType::F16);
#endif
}

// d += a * b, m16n8k32, FP8 E4M3 inputs, FP32 accumulators (sm_89 and newer).
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // no FP8 MMA before sm_89: the code generator never emits this call there
#endif
#else
  fpx_emu::mma(d, a, b, fpx_emu::MmaType::E4m3);
#endif
}

// 16 bytes global -> shared, asynchronously (both 16-byte aligned); visible to the issuing
// thread after a cp_async_wait that covers its group, to the block after a __syncthreads that
// follows that wait.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
#else
  fpx_emu::cp_async(smem, gmem, 16);
#endif
}

// Closes the group of the cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#else
  fpx_emu::cp_async_commit();
#endif
}

// Waits until at most PENDING committed groups of this thread are still in flight.
template <int PENDING> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#else
  fpx_emu::cp_async_wait(PENDING);
#endif
}

}  // namespace fpx
