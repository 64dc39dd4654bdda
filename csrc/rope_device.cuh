// On-chip rotation for the attention kernels (csrc/flash_fwd_sm90.cu rotates each query tile as it arrives,
// csrc/flash_bwd_sm90.cu each key tile and, with the transpose, dK and dQ), so that no rotated copy of a tensor is
// written to memory and read back.
//
// Angles follow docs/DESIGN.md §5.1 (64-bit fixed-point turns, t = p * T + offset wrapping mod 2^64) and keep the top
// 32 bits of t: float(int32(t >> 32)) * 2pi / 2^32 lies within 3e-7 rad of the exact angle in [-pi, pi) (2^-25
// relative from the conversion, 2^-24 from the product, 2^-32 turns dropped), and the hardware sine and cosine
// (__sincosf, 2^-21.4 absolute on [-pi, pi]) add 4e-7: cos and sin within 1e-6 of a float64 truth, the claim of §5.1,
// for two multiply-adds and two special-function instructions a pair (the rotation kernel, csrc/rope.cu, spends
// ~50 instructions a pair on a double-precision split that gets it to ~1e-7).
#pragma once

#include <cstdint>
#include <string>

#include "rope.h"

namespace scaled_rope {

constexpr float kTurn32ToRadian = 1.4629180792671596e-09f;  // 2 pi / 2^32

// m' (cos, sin) of rotation pair `pair` at position `pos` for batch row b: the unscaled set with m' = 1 below n_hat.
__device__ __forceinline__ float2 rope_cos_sin(const RopeTables& rope, int64_t b, int64_t pos, int pair) {
  const bool unscaled = rope.n_hat > 0 && pos < rope.n_hat;
  const int64_t turns = unscaled ? __ldg(rope.turns_unscaled + pair) : __ldg(rope.turns + b * rope.stride_tb + pair);
  uint64_t t = static_cast<uint64_t>(pos) * static_cast<uint64_t>(turns);  // wraps mod 2^64 by design
  if (rope.offset != nullptr) t += static_cast<uint64_t>(__ldg(rope.offset + b * rope.stride_offb + pair));
  const float angle = static_cast<float>(static_cast<int32_t>(t >> 32)) * kTurn32ToRadian;
  float s, c;
  __sincosf(angle, &s, &c);
  const float m = unscaled ? 1.0f : __ldg(rope.factor + b * rope.stride_fb);
  return make_float2(c * m, s * m);
}

// e^(i rows theta) of rotation pair `pair` of batch row b in set `unscaled` (1: the set used below n_hat): the step from a row's
// (cos, sin) to that `rows` positions on (no attention factor, no offset: both are in the row's own value).
__device__ __forceinline__ float2 rope_step_cos_sin(const RopeTables& rope, int64_t b, int unscaled, int pair,
                                                   int rows) {
  const int64_t turns = unscaled ? __ldg(rope.turns_unscaled + pair) : __ldg(rope.turns + b * rope.stride_tb + pair);
  const uint64_t t = static_cast<uint64_t>(rows) * static_cast<uint64_t>(turns);
  float s, c;
  __sincosf(static_cast<float>(static_cast<int32_t>(t >> 32)) * kTurn32ToRadian, &s, &c);
  return make_float2(c, s);
}

// (x, y) rotated by cs = m' (cos, sin), or by its transpose.
template <bool TRANSPOSE>
__device__ __forceinline__ float2 rope_apply(float x, float y, float2 cs) {
  if constexpr (TRANSPOSE) {
    return make_float2(fmaf(x, cs.x, y * cs.y), fmaf(y, cs.x, -x * cs.y));
  } else {
    return make_float2(fmaf(x, cs.x, -y * cs.y), fmaf(x, cs.y, y * cs.x));
  }
}

// Whether the kernels' on-chip rotation takes these tables: pairs of whole 16-byte chunks (the half layout pairs
// chunk c with chunk c + R/16; interleaved chunks hold 4 pairs each) and, in the half layout, a partner column that
// the same thread holds in an m64 accumulator for R/2 in {32, 48, 64} (csrc/flash_bwd_sm90.cu, dK's transpose).
__host__ __device__ constexpr bool rope_on_chip_layout(int64_t rotary_dim, int64_t head_dim, bool interleaved) {
  if (rotary_dim <= 0 || rotary_dim > head_dim) return false;
  return interleaved ? rotary_dim % 8 == 0 : (rotary_dim == 64 || rotary_dim == 96 || rotary_dim == 128);
}

// "" when the on-chip rotation takes `rope` for tiles of head_dim columns, else an error message starting with `who`.
inline std::string check_rope(const RopeTables& rope, int64_t head_dim, const char* who) {
  if (!rope_on_chip_layout(rope.rotary_dim, head_dim, rope.interleaved)) {
    return std::string(who) + ": rotary_dim " + std::to_string(rope.rotary_dim) + " is not rotated on-chip (" +
           (rope.interleaved ? "interleaved: a multiple of 8" : "half layout: 64, 96 or 128") + ", at most head_dim)";
  }
  if (rope.factor == nullptr || (rope.n_hat > 0 && rope.turns_unscaled == nullptr)) {
    return std::string(who) + ": missing pointer";
  }
  return "";
}

}  // namespace scaled_rope
