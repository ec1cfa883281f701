// fpx_emu.h: host C++ emulation of the CUDA execution model, enough to run the kernels fpx
// generates (templates/*.cu.tera + kernels/*.cuh) on the CPU, compiled by g++ -std=c++20 with
// CUDA's own host headers (cuda_fp16.h, cuda_fp8.h, cuda_fp4.h from the PyPI wheels).
//
// Blocks run one after another on the calling thread. The threads of a block are fibers (one
// stack each, switched by a few lines of x86-64 assembly, ucontext elsewhere), so
// __syncthreads is a barrier where a fiber yields until every live thread of its block has
// arrived; warp shuffles, votes and __syncwarp meet the live lanes of their `mask` only (lanes
// outside it may be elsewhere, e.g. in another branch syncing with another mask), as on Volta
// and newer. A barrier that can never complete (divergent __syncthreads, a mask naming lanes
// that never arrive) is reported as an error, not a hang. Static __shared__ variables are function
// statics (one block at a time); dynamic shared memory is the global `fpx_emu_dyn_smem`: the
// loader rewrites each `extern __shared__ T name[];` to a `T*` named `name` pointing at it
// (src/runtime/emu/build.rs, `translate`); it is filled with NaN bytes (0xff) before each
// block, so a read of shared memory no thread wrote shows in the result. Inline PTX sits behind
// __CUDA_ARCH__ guards in the kernels, so the portable fallbacks run here; the tensor-core
// instructions of kernels/fpx_mma.cuh (mma.sync, ldmatrix, cp.async) fall back to the
// implementations of their PTX ISA semantics in fpx_emu_mma.h. Misuse the hardware
// would not forgive (a misaligned ldmatrix row or cp.async address, a warp-collective
// instruction without every lane) is reported as the launch's error.
// Every load and store of kernel code is checked (fpx_emu_memcheck.h): one outside the
// launch's buffer arguments (of the lengths the host passes), its dynamic shared memory, the
// thread's stack and the library's statics, or a typed access misaligned for its type (a uint4
// at an address that is not 16-byte aligned), stops the launch with an error naming the access,
// the argument, the byte offset and the thread.
#pragma once
#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <vector_types.h>
#include <array>
#include <map>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

struct fpx_emu_dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline fpx_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// Dynamic shared memory of the running block.
constexpr size_t FPX_EMU_DYN_SMEM_BYTES = 8u << 20;
alignas(16) inline unsigned char fpx_emu_dyn_smem[FPX_EMU_DYN_SMEM_BYTES];

namespace fpx_emu {

#if defined(__x86_64__)
struct Ctx {
  void* sp = nullptr;
};
// Saves callee-saved registers on the current stack, stores its pointer in *from, switches to
// `to` and restores its registers.
extern "C" void fpx_emu_switch(void** from, void* to);
asm(R"(
.text
.weak fpx_emu_switch
.type fpx_emu_switch,@function
fpx_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fpx_emu_switch,.-fpx_emu_switch
)");
#endif

enum class State { Ready, Done };

// One cp.async: `n` bytes from `src` to `dst`, performed when a wait_group allows it.
struct Copy {
  void* dst;
  const void* src;
  size_t n;
};

// A thread's cp.async issued since its last commit, and its committed groups, oldest first.
struct AsyncCopies {
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> committed;
};

struct Barrier {
  int expected = 0, arrived = 0;
  unsigned long gen = 0;
};

// A rendezvous of the lanes of one warp named by a mask: complete when every live lane of
// `mask` has arrived.
struct LaneBarrier {
  unsigned arrived = 0;
  unsigned long gen = 0;
};

struct Warp {
  unsigned live = 0;                       // lanes that have not exited
  std::map<unsigned, LaneBarrier> by_mask;  // node-stable: waiters keep references
};

struct Fiber {
  unsigned tid = 0;
  State state = State::Ready;
  std::vector<unsigned char> stack;
#if defined(__x86_64__)
  Ctx ctx;
#else
  ucontext_t ctx;
#endif
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block;
  std::vector<uint64_t> slots;  // shuffle exchange, one per thread
  std::vector<uint32_t> votes;  // vote exchange, one per thread
  std::vector<std::array<uint32_t, 16>> wide;  // mma / ldmatrix exchange, one per thread
  std::vector<AsyncCopies> copies;             // cp.async state, one per thread
  unsigned current = 0;
  bool progressed = false;
#if defined(__x86_64__)
  Ctx sched;
#else
  ucontext_t sched;
#endif
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  const char* error = nullptr;
  bool aborted = false;  // a failed memory check: no thread resumes
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}

inline void yield() {
  Block* b = block();
  Fiber& f = b->fibers[b->current];
#if defined(__x86_64__)
  fpx_emu_switch(&f.ctx.sp, b->sched.sp);
#else
  swapcontext(&f.ctx, &b->sched);
#endif
}

}  // namespace fpx_emu

#include "fpx_emu_memcheck.h"

namespace fpx_emu {

// Records the first misuse of the running launch (the launch returns it when its block ends).
inline void report(const char* what) {
  Unchecked u;
  Block* b = block();
  if (b->error == nullptr) b->error = what;
}

// Arrives at `bar` and waits until every live participant has arrived.
inline void arrive(Barrier& bar) {
  Unchecked u;
  Block* b = block();
  b->progressed = true;
  if (++bar.arrived >= bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
    return;
  }
  const unsigned long gen = bar.gen;
  while (bar.gen == gen) yield();
}

// A thread exits: barriers stop waiting for it.
inline void leave(Barrier& bar) {
  if (--bar.expected > 0 && bar.arrived >= bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
  }
}

// Releases `lb` when every live lane of `mask` has arrived.
inline bool complete(LaneBarrier& lb, unsigned mask, unsigned live) {
  if ((mask & live & ~lb.arrived) != 0) return false;
  lb.arrived = 0;
  ++lb.gen;
  return true;
}

// The calling thread arrives at its warp's rendezvous for `mask` and waits for the other live
// lanes of `mask`.
inline void arrive_lanes(unsigned mask) {
  Unchecked u;
  Block* b = block();
  b->progressed = true;
  const unsigned t = b->current;
  Warp& w = b->warps[t / 32];
  LaneBarrier& lb = w.by_mask[mask];
  lb.arrived |= 1u << (t & 31);
  if (complete(lb, mask, w.live)) return;
  const unsigned long gen = lb.gen;
  while (lb.gen == gen) yield();
}

// A lane exits: rendezvous that waited only for it complete.
inline void leave_lanes(Warp& w, unsigned lane) {
  w.live &= ~(1u << lane);
  for (auto& [mask, lb] : w.by_mask)
    if (lb.arrived != 0) complete(lb, mask, w.live);
}

inline void fiber_main() {
  Block* b = block();
  b->body(b->arg);
  Fiber& f = b->fibers[b->current];
  f.state = State::Done;
  b->progressed = true;
  leave_lanes(b->warps[f.tid / 32], f.tid & 31);
  leave(b->block);
  yield();
}

#if defined(__x86_64__)
extern "C" inline void fpx_emu_entry() {
  fiber_main();
  std::abort();  // a finished fiber is never resumed
}
#endif

inline void start(Fiber& f) {
#if defined(__x86_64__)
  // Stack top: return address slot -> fpx_emu_entry, then the frame fpx_emu_switch pops.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // keeps the entry's stack 16-byte aligned after the `ret`
  *--sp = reinterpret_cast<void*>(&fpx_emu_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12..r15
  uint32_t csr[2] = {0x1f80, 0x037f};           // default mxcsr, x87 control word
  sp -= 1;
  std::memcpy(sp, csr, 8);
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = f.stack.size();
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
#endif
}

inline void resume(Block& b, unsigned i) {
  b.current = i;
  checks.stack_lo = reinterpret_cast<uintptr_t>(b.fibers[i].stack.data());
  checks.stack_hi = checks.stack_lo + b.fibers[i].stack.size();
#if defined(__x86_64__)
  fpx_emu_switch(&b.sched.sp, b.fibers[i].ctx.sp);
#else
  swapcontext(&b.sched, &b.fibers[i].ctx);
#endif
}

// Runs `body(arg)` on every thread of every block; returns an error message or nullptr.
inline const char* launch(fpx_emu_dim3 grid, fpx_emu_dim3 blk, size_t smem_bytes, void (*body)(void*),
                          void* arg) {
  const unsigned nt = blk.x * blk.y * blk.z;
  if (nt == 0 || nt > 1024) return "block size must be 1..1024 threads";
  if (smem_bytes > FPX_EMU_DYN_SMEM_BYTES) return "dynamic shared memory exceeds the emulator's 8 MiB";
  static Block b;
  b.fibers.resize(nt);
  for (auto& f : b.fibers)
    if (f.stack.size() != 64 * 1024) f.stack.assign(64 * 1024, 0);
  b.slots.assign(nt, 0);
  b.votes.assign(nt, 0);
  b.wide.assign(nt, {});
  b.error = nullptr;
  b.aborted = false;
  checks.smem_hi = reinterpret_cast<uintptr_t>(fpx_emu_dyn_smem) + smem_bytes;
  b.body = body;
  b.arg = arg;
  block() = &b;
  gridDim = grid;
  blockDim = blk;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        std::memset(fpx_emu_dyn_smem, 0xff, smem_bytes);
        b.copies.assign(nt, AsyncCopies{});
        b.warps.assign((nt + 31) / 32, Warp{});
        for (unsigned w = 0; w < b.warps.size(); ++w) {
          const unsigned lanes = std::min(32u, nt - 32 * w);
          b.warps[w].live = lanes == 32 ? ~0u : (1u << lanes) - 1;
        }
        b.block = Barrier{static_cast<int>(nt), 0, 0};
        for (unsigned t = 0; t < nt; ++t) {
          b.fibers[t].tid = t;
          b.fibers[t].state = State::Ready;
          start(b.fibers[t]);
        }
        unsigned live = nt;
        while (live > 0) {
          b.progressed = false;
          live = 0;
          for (unsigned t = 0; t < nt; ++t) {
            if (b.fibers[t].state == State::Done) continue;
            threadIdx = {t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)};
            resume(b, t);
            if (b.aborted) {
              block() = nullptr;
              return b.error;
            }
            if (b.fibers[t].state != State::Done) ++live;
          }
          if (live > 0 && !b.progressed) {
            block() = nullptr;
            return "deadlock: threads wait at a barrier that the other threads never reach";
          }
        }
        if (b.error != nullptr) {
          block() = nullptr;
          return b.error;
        }
      }
  block() = nullptr;
  return nullptr;
}

// Exchange among the lanes of `mask`: every lane posts `v`, reads its source lane's value
// after all have posted, and waits again before its slot may be reused.
template <class T> inline T shuffle(unsigned mask, T v, int src_of_lane(int, int, int), int arg, int width) {
  Unchecked u;
  Block* b = block();
  const unsigned t = b->current;
  const unsigned lane = t & 31, base = t & ~31u;
  static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  b->slots[t] = raw;
  arrive_lanes(mask);
  int src = src_of_lane(static_cast<int>(lane), arg, width);
  if (src < 0 || base + src >= b->slots.size()) src = static_cast<int>(lane);
  raw = b->slots[base + src];
  arrive_lanes(mask);
  T r;
  std::memcpy(&r, &raw, sizeof(T));
  return r;
}

inline int src_xor(int lane, int o, int w) {
  const int s = lane ^ o;
  return (s / w == lane / w) ? s : lane;
}
inline int src_down(int lane, int d, int w) { return (lane % w) + d < w ? lane + d : lane; }
inline int src_up(int lane, int d, int w) { return (lane % w) >= d ? lane - d : lane; }
inline int src_idx(int lane, int s, int w) { return (lane / w) * w + (s % w); }

// Ballot of `pred` over the warp's lanes in `mask`.
inline unsigned ballot(unsigned mask, bool pred) {
  Unchecked u;
  Block* b = block();
  const unsigned t = b->current, base = t & ~31u;
  b->votes[t] = pred ? 1u : 0u;
  arrive_lanes(mask);
  unsigned r = 0;
  for (unsigned l = 0; l < 32 && base + l < b->votes.size(); ++l)
    if ((mask >> l) & 1u && b->votes[base + l]) r |= 1u << l;
  arrive_lanes(mask);
  return r;
}

// Calls kernel `f` with the arguments that `args[i]` point to (cuLaunchKernel's convention).
// The kernel runs checked; its arguments are read before, unchecked (they are host memory).
template <class... A> struct Call {
  void (*f)(A...);
  void** args;
  template <size_t... I> void run(std::index_sequence<I...>) {
    std::tuple<std::remove_cv_t<std::remove_reference_t<A>>...> v{
        *static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...};
    void (*const kernel)(A...) = f;
    checks.on = true;
    kernel(std::get<I>(v)...);
    checks.on = false;
  }
  static void body(void* p) { static_cast<Call*>(p)->run(std::index_sequence_for<A...>{}); }
};

// dims: grid x y z, block x y z, dynamic shared bytes; lens: the byte length of each buffer
// argument (entries of value arguments are not read). Returns 0, or 1 with `err` filled.
template <class... A>
int run(void (*f)(A...), const unsigned* dims, void** args, const size_t* lens, char* err, size_t len) {
  register_args<A...>(args, lens);
  Call<A...> c{f, args};
  const char* e = launch({dims[0], dims[1], dims[2]}, {dims[3], dims[4], dims[5]}, dims[6], &Call<A...>::body, &c);
  if (e == nullptr) return 0;
  std::snprintf(err, len, "%s", e);
  return 1;
}

}  // namespace fpx_emu

#include "fpx_emu_mma.h"

inline void __syncthreads() { fpx_emu::arrive(fpx_emu::block()->block); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { fpx_emu::arrive_lanes(mask); }
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int o, int w = 32) {
  return fpx_emu::shuffle(m, v, fpx_emu::src_xor, o, w);
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) {
  return fpx_emu::shuffle(m, v, fpx_emu::src_down, static_cast<int>(d), w);
}
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) {
  return fpx_emu::shuffle(m, v, fpx_emu::src_up, static_cast<int>(d), w);
}
template <class T> inline T __shfl_sync(unsigned m, T v, int s, int w = 32) {
  return fpx_emu::shuffle(m, v, fpx_emu::src_idx, s, w);
}
inline unsigned __ballot_sync(unsigned m, int p) { return fpx_emu::ballot(m, p != 0); }
inline int __any_sync(unsigned m, int p) { return fpx_emu::ballot(m, p != 0) != 0; }
inline int __all_sync(unsigned m, int p) { return fpx_emu::ballot(m, p == 0) == 0; }

// Blocks run one at a time on one OS thread, so plain read-modify-write is atomic.
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }
template <class T> inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }
template <class T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicCAS(T* p, T c, T v) { T o = *p; if (o == c) *p = v; return o; }

template <class T> inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// fmaxf, expf, sqrtf, ... are the C library functions of <math.h>.
