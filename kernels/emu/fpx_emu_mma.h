// fpx_emu_mma.h: the emulator's tensor-core instructions (included by fpx_emu.h, which
// describes the emulator): mma.sync, ldmatrix and cp.async from their PTX ISA semantics, for
// the portable paths of kernels/fpx_mma.cuh. Each lane's operands are exchanged across the warp
// through the block's `wide` slots; cp.async copies land when a wait_group allows them.
#pragma once

namespace fpx_emu {

// Warp-collective instructions need every lane of the warp (.aligned).
inline void check_full_warp(const char* what) {
  Unchecked u;
  Block* b = block();
  if (b->warps[b->current / 32].live != ~0u) report(what);
}

// ldmatrix .m8n8 .b16 of `n` matrices (kernels/fpx_mma.cuh has the layout).
inline void ldmatrix(uint32_t* r, int n, bool trans, const void* row) {
  if ((block()->current & 31) < 8u * n) access(reinterpret_cast<uintptr_t>(row), 16, false);
  Unchecked u;
  Block* b = block();
  const unsigned t = b->current, lane = t & 31, base = t & ~31u;
  check_full_warp("ldmatrix needs every lane of the warp");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 && lane < 8u * n)
    report("ldmatrix: a row address is not 16-byte aligned");
  std::memcpy(b->wide[t].data(), &row, sizeof row);
  arrive_lanes(~0u);
  auto row_of = [&](unsigned l) {
    const unsigned char* p;
    std::memcpy(&p, b->wide[base + l].data(), sizeof p);
    return p;
  };
  for (int j = 0; j < n; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const unsigned char* p = row_of(8 * j + lane / 4);
      std::memcpy(&lo, p + 4 * (lane % 4), 2);
      std::memcpy(&hi, p + 4 * (lane % 4) + 2, 2);
    } else {
      std::memcpy(&lo, row_of(8 * j + 2 * (lane % 4)) + 2 * (lane / 4), 2);
      std::memcpy(&hi, row_of(8 * j + 2 * (lane % 4) + 1) + 2 * (lane / 4), 2);
    }
    r[j] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
  arrive_lanes(~0u);
}

enum class MmaType { Bf16, F16, E4m3 };

// FP8 E4M3 (OCP: bias 7, no infinities, S.1111.111 is NaN) to float.
inline float e4m3_to_float(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  const float mag = (e == 15 && m == 7) ? NAN
                    : e == 0            ? std::ldexp(static_cast<float>(m), -9)
                                        : std::ldexp(1.0f + m / 8.0f, e - 7);
  return (v & 0x80) ? -mag : mag;
}

// Element `sub` of a fragment register of type `ty`.
inline float element(uint32_t w, int sub, MmaType ty) {
  if (ty == MmaType::E4m3) return e4m3_to_float(static_cast<uint8_t>(w >> (8 * sub)));
  const uint16_t h = static_cast<uint16_t>(w >> (16 * sub));
  if (ty == MmaType::Bf16) {
    const uint32_t f = static_cast<uint32_t>(h) << 16;
    float r;
    std::memcpy(&r, &f, 4);
    return r;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

// d += a * b over the warp: m16n8k16 (16-bit types) or m16n8k32 (E4M3), fragments as in
// kernels/fpx_mma.cuh. Products are exact in FP32 for these types; they are accumulated in
// FP32 in k order onto the accumulator (the hardware's internal order and rounding of the sum
// may differ in the last bits).
inline void mma(float* d, const uint32_t* a, const uint32_t* bf, MmaType ty) {
  Unchecked u;
  Block* blk = block();
  const unsigned t = blk->current, lane = t & 31, base = t & ~31u;
  check_full_warp("mma.sync needs every lane of the warp");
  uint32_t* s = blk->wide[t].data();
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = bf[0];
  s[5] = bf[1];
  std::memcpy(s + 6, d, 16);
  arrive_lanes(~0u);
  const bool e4m3 = ty == MmaType::E4m3;
  const int K = e4m3 ? 32 : 16, per = e4m3 ? 4 : 2;  // k extent; elements per register
  const int kg = 4 * per;                            // k columns one register set spans
  auto at = [&](unsigned l, int word) { return blk->wide[base + l][word]; };
  auto A = [&](int row, int k) {
    const unsigned l = (row % 8) * 4 + (k % kg) / per;
    return element(at(l, row / 8 + 2 * (k / kg)), k % per, ty);
  };
  auto B = [&](int k, int n) {
    const unsigned l = n * 4 + (k % kg) / per;
    return element(at(l, 4 + k / kg), k % per, ty);
  };
  float out[4];
  for (int r = 0; r < 4; ++r) {
    const int row = lane / 4 + 8 * (r / 2), col = 2 * (lane % 4) + r % 2;
    const uint32_t cw = at((row % 8) * 4 + col / 2, 6 + (row / 8) * 2 + col % 2);
    float acc;
    std::memcpy(&acc, &cw, 4);
    for (int k = 0; k < K; ++k) acc = std::fma(A(row, k), B(k, col), acc);
    out[r] = acc;
  }
  arrive_lanes(~0u);
  std::memcpy(d, out, 16);
}

// cp.async of `n` bytes: queued in the thread's open group.
inline void cp_async(void* dst, const void* src, size_t n) {
  access(reinterpret_cast<uintptr_t>(src), n, false);
  access(reinterpret_cast<uintptr_t>(dst), n, true);
  Unchecked u;
  Block* b = block();
  if (reinterpret_cast<uintptr_t>(dst) % n != 0 || reinterpret_cast<uintptr_t>(src) % n != 0)
    report("cp.async: an address is not aligned to the copy size");
  b->copies[b->current].open.push_back({dst, src, n});
}

inline void cp_async_commit() {
  Unchecked u;
  AsyncCopies& c = block()->copies[block()->current];
  c.committed.push_back(std::move(c.open));
  c.open.clear();
}

// The thread's oldest committed groups land until at most `pending` remain in flight.
inline void cp_async_wait(int pending) {
  Unchecked u;
  AsyncCopies& c = block()->copies[block()->current];
  while (c.committed.size() > static_cast<size_t>(pending)) {
    for (const Copy& k : c.committed.front()) std::memcpy(k.dst, k.src, k.n);
    c.committed.erase(c.committed.begin());
  }
}

}  // namespace fpx_emu
