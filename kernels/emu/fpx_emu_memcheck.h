// fpx_emu_memcheck.h: the emulator's checks of the kernels' memory accesses (included by
// fpx_emu.h, which describes the emulator).
//
// Kernels are compiled with two of g++'s sanitizer instrumentations, without their runtime
// libraries: the hooks they call are defined here.
// - Bounds: -fsanitize=kernel-address with every check out of line calls
//   __asan_{load,store}{1,2,4,8,16,N}_noabort(address[, size]) before each load and store.
//   While kernel code runs (not the emulator's own code, see `Unchecked`), an access must lie
//   on the running thread's stack, wholly inside one buffer argument of the launch (its base
//   and byte length are registered by `run`), inside the launch's dynamic shared memory
//   (`smem_bytes` of it, not the emulator's whole 8 MiB), or in the kernel library's own static
//   storage (static __shared__ variables, constants, the emulator's globals). Anything else
//   (one element past a buffer's end, a write before its start, a wild pointer) fails the
//   launch.
// - Alignment: -fsanitize=alignment calls __ubsan_handle_type_mismatch_v1 for a typed access
//   whose address is not aligned to its type (a uint4 / float4 load at an address that is not
//   16-byte aligned), which a GPU faults on and x86 forgives. It sees the access in the source,
//   before the compiler splits a vector copy into words (the bounds hooks see those words).
// A failed check stops the launch at once (the faulting thread switches to the scheduler and
// no thread resumes, as a GPU kills the kernel) before the access happens, and the launch
// returns a message naming the access, the argument and offset, and the thread.
#pragma once
#include <link.h>

namespace fpx_emu {

// The buffer kernel argument `index` points to: [base, base + len).
struct Span {
  uintptr_t base = 0;
  size_t len = 0;
  unsigned index = 0;
};

constexpr unsigned MAX_ARGS = 32;

// What the running launch may touch. Read by the hooks, which are not instrumented.
struct Checks {
  bool on = false;                       // kernel code is running (not the emulator's own)
  uintptr_t stack_lo = 0, stack_hi = 0;  // the running thread's stack
  uintptr_t smem_hi = 0;                 // end of the launch's dynamic shared memory
  uintptr_t image_lo = 0, image_hi = 0;  // this library's loaded segments
  Span args[MAX_ARGS];
  unsigned nargs = 0;
  char msg[384] = {};
};
inline Checks checks;

#define FPX_EMU_HOOK __attribute__((no_sanitize_address, no_sanitize("alignment"), visibility("hidden")))

// The emulator's own code (barriers, shuffles, the scheduler: its heap bookkeeping) runs
// unchecked: each entry from kernel code holds one of these. A fiber that yields inside one
// leaves the flag off for the scheduler and the fiber it resumes, which restores its own on
// return; so one global flag is right for every fiber.
struct Unchecked {
  bool prev;
  FPX_EMU_HOOK Unchecked() : prev(checks.on) { checks.on = false; }
  FPX_EMU_HOOK ~Unchecked() { checks.on = prev; }
};

// The address range of the loaded object (this kernel library) holding `checks`.
FPX_EMU_HOOK inline int find_image(dl_phdr_info* info, size_t, void*) {
  const uintptr_t self = reinterpret_cast<uintptr_t>(&checks);
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& p = info->dlpi_phdr[i];
    if (p.p_type != PT_LOAD) continue;
    lo = std::min<uintptr_t>(lo, info->dlpi_addr + p.p_vaddr);
    hi = std::max<uintptr_t>(hi, info->dlpi_addr + p.p_vaddr + p.p_memsz);
  }
  if (self < lo || self >= hi) return 0;
  checks.image_lo = lo;
  checks.image_hi = hi;
  return 1;
}

// Registers the buffer arguments of a launch of a kernel with parameters A...: for each
// pointer parameter, the pointer `args[i]` points to and `lens[i]` bytes.
template <class... A> inline void register_args(void** args, const size_t* lens) {
  static_assert(sizeof...(A) <= MAX_ARGS, "kernel parameters");
  constexpr bool is_buffer[] = {std::is_pointer_v<std::remove_cv_t<std::remove_reference_t<A>>>..., false};
  if (checks.image_hi == 0) dl_iterate_phdr(find_image, nullptr);
  checks.nargs = 0;
  for (unsigned i = 0; i < sizeof...(A); ++i)
    if (is_buffer[i]) {
      uintptr_t base;
      std::memcpy(&base, args[i], sizeof base);
      checks.args[checks.nargs++] = {base, lens[i], i};
    }
}

// "at byte offset 4096 of argument 2 (a buffer of 4096 bytes)" and the like: where `a` is.
FPX_EMU_HOOK inline int where(char* out, size_t len, uintptr_t a) {
  const Checks& c = checks;
  const uintptr_t smem = reinterpret_cast<uintptr_t>(fpx_emu_dyn_smem);
  if (a - smem < FPX_EMU_DYN_SMEM_BYTES)
    return std::snprintf(out, len, "at byte offset %zu of dynamic shared memory (%zu bytes in this launch)",
                         size_t(a - smem), size_t(c.smem_hi - smem));
  if (a - c.stack_lo < c.stack_hi - c.stack_lo) return std::snprintf(out, len, "on the thread's stack");
  // The argument whose bytes are nearest (inside, just before or just past it).
  const Span* best = nullptr;
  uintptr_t dist = 64 * 1024;  // farther from every buffer: a wild address
  for (unsigned i = 0; i < c.nargs; ++i) {
    const Span& s = c.args[i];
    const uintptr_t d = a < s.base ? s.base - a : a - s.base < s.len ? 0 : a - (s.base + s.len) + 1;
    if (d < dist || (d == dist && best == nullptr)) best = &s, dist = d;
  }
  if (best == nullptr)
    return std::snprintf(out, len, "at address %#zx, in no buffer argument of the launch", size_t(a));
  if (a < best->base)
    return std::snprintf(out, len, "%zu bytes before the start of argument %u (a buffer of %zu bytes)",
                         size_t(best->base - a), best->index, best->len);
  return std::snprintf(out, len, "at byte offset %zu of argument %u (a buffer of %zu bytes)", size_t(a - best->base),
                       best->index, best->len);
}

// Fails the launch with "<what> <where><suffix>, block (x,y,z) thread (x,y,z)" and stops it.
FPX_EMU_HOOK inline void fail(const char* what, uintptr_t a, const char* suffix) {
  checks.on = false;  // for good: no thread of this launch runs again
  char at[160];
  where(at, sizeof at, a);
  std::snprintf(checks.msg, sizeof checks.msg, "%s %s%s, block (%u,%u,%u) thread (%u,%u,%u)", what, at, suffix,
                blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  Block* b = block();
  b->error = checks.msg;
  b->aborted = true;
  yield();
}

// The bounds check of one access of `n` bytes at `a` (see the top of this file).
FPX_EMU_HOOK inline void access(uintptr_t a, size_t n, bool store) {
  const Checks& c = checks;
  if (!c.on) return;
  if (a - c.stack_lo < c.stack_hi - c.stack_lo) return;
  for (unsigned i = 0; i < c.nargs; ++i) {
    const uintptr_t off = a - c.args[i].base;
    if (off < c.args[i].len && n <= c.args[i].len - off) return;
  }
  const uintptr_t smem = reinterpret_cast<uintptr_t>(fpx_emu_dyn_smem);
  const bool in_smem = a - smem < FPX_EMU_DYN_SMEM_BYTES;
  if (in_smem && a + n <= c.smem_hi) return;
  if (!in_smem && a - c.image_lo < c.image_hi - c.image_lo) return;
  char what[64];
  std::snprintf(what, sizeof what, "out-of-bounds %s of %zu bytes", store ? "write" : "read", n);
  fail(what, a, "");
}

// The parts of UBSan's type-mismatch record (ABI of GCC and Clang) the alignment check uses.
struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
struct TypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct TypeMismatch {
  SourceLocation loc;
  const TypeDescriptor* type;
  unsigned char log_alignment, check_kind;
};

}  // namespace fpx_emu

// Weak rather than inline: the compiler's calls to them do not make an inline function be
// emitted; each kernel's object defines them and the link keeps one.
#define FPX_EMU_EXPORT FPX_EMU_HOOK __attribute__((weak))
extern "C" {
#define FPX_EMU_ACCESS(N)                                                                                    \
  FPX_EMU_EXPORT void __asan_load##N##_noabort(uintptr_t a) { fpx_emu::access(a, N, false); }          \
  FPX_EMU_EXPORT void __asan_store##N##_noabort(uintptr_t a) { fpx_emu::access(a, N, true); }
FPX_EMU_ACCESS(1)
FPX_EMU_ACCESS(2)
FPX_EMU_ACCESS(4)
FPX_EMU_ACCESS(8)
FPX_EMU_ACCESS(16)
#undef FPX_EMU_ACCESS
FPX_EMU_EXPORT void __asan_loadN_noabort(uintptr_t a, size_t n) { fpx_emu::access(a, n, false); }
FPX_EMU_EXPORT void __asan_storeN_noabort(uintptr_t a, size_t n) { fpx_emu::access(a, n, true); }
FPX_EMU_EXPORT void __asan_handle_no_return() {}

// A typed access at an address not aligned to its type (the only check -fsanitize=alignment
// enables).
FPX_EMU_EXPORT void __ubsan_handle_type_mismatch_v1(fpx_emu::TypeMismatch* d, uintptr_t p) {
  if (!fpx_emu::checks.on) return;
  const char* kind = d->check_kind == 0 ? "load of" : d->check_kind == 1 ? "store to" : "access to";
  const char* slash = std::strrchr(d->loc.file, '/');
  const char* file = slash ? slash + 1 : d->loc.file;
  char what[160], suffix[96] = "";
  std::snprintf(what, sizeof what, "misaligned %s %s (%u-byte alignment needed)", kind, d->type->name,
                1u << d->log_alignment);
  // The kernel's line; a line of the emulator's headers (__ldg) would say nothing.
  if (std::strncmp(file, "fpx_emu", 7) != 0) std::snprintf(suffix, sizeof suffix, " (%s:%u)", file, d->loc.line);
  fpx_emu::fail(what, p, suffix);
}
}
