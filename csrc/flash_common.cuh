// Helpers shared by the flash kernels (csrc/flash_fwd.cu: sm_80+; csrc/flash_fwd_sm90.cu, csrc/flash_bwd_sm90.cu:
// sm_90a; the sm_90a building blocks are in csrc/flash_sm90.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "flash_fwd.h"

namespace scaled_rope {
namespace flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

constexpr int kNear = 1;  // tile modes (bits): which product a key tile needs; 0 = skip
constexpr int kFar = 2;

// ---- PTX wrappers (sm_80+) -------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared; zero-fills the destination (and reads nothing) when !valid.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats -> one register of two 16-bit values (lo in the low half: the lower column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One register of two 16-bit values -> two floats (lo: the lower column).
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// ---- tile order ---------------------------------------------------------------------------------------------------
// blockIdx.x -> (b * heads_q + h, query tile). Heads are taken in L2 sections of section_heads and, inside a section,
// tile-major with the heaviest (last) query tiles first: the CTAs running at once then read the K and V of a few
// heads, which stay in L2, rather than of every head (a whole wave streaming every head's K/V from DRAM).
struct TileIndex {
  int64_t bh;
  int q_tile;
};
__device__ __forceinline__ TileIndex tile_order(int64_t block, int num_q_tiles, int64_t bh_count, int section_heads) {
  const int64_t per_section = static_cast<int64_t>(section_heads) * num_q_tiles;
  const int64_t first = block / per_section * section_heads;
  const int64_t r = block % per_section;
  const int64_t heads_here = min(static_cast<int64_t>(section_heads), bh_count - first);
  return {first + r % heads_here, num_q_tiles - 1 - static_cast<int>(r / heads_here)};
}

// Heads per section, out of bh_count (batch * heads) of which each streams bytes_per_head shared by `multiple`
// consecutive heads: as many as keep what they stream within 32 MB (H100 L2: 50 MB), a multiple of `multiple`.
// SCALED_ROPE_L2_SECTION_HEADS overrides it for measurements (1: head by head; large: all heads tile-major).
inline int l2_section_heads(int64_t bh_count, int64_t bytes_per_head, int64_t multiple) {
  int64_t heads = 0;
  if (const char* forced = std::getenv("SCALED_ROPE_L2_SECTION_HEADS"); forced != nullptr && forced[0] != '\0') {
    heads = std::atoll(forced);
  } else {
    heads = std::max<int64_t>(1, (int64_t{32} << 20) / std::max<int64_t>(bytes_per_head, 1)) * multiple;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min(heads, bh_count)));
}
// The forward's sections: q heads that share their K, V (and far K), a multiple of the GQA group.
inline int l2_section_heads(const FlashFwdParams& p) {
  const int64_t per_kv_head = p.seqlen_k * p.head_dim * 2 * (p.rerope_window > 0 ? 3 : 2);
  return l2_section_heads(p.batch * p.heads_q, per_kv_head, p.heads_q / p.heads_kv);
}

// Smallest lo and largest hi over every thread of the CTA (warp reductions, then the warps' results through
// `scratch` in shared memory); every thread returns with them. Called by all threads (it holds a __syncthreads).
template <int WARPS>
__device__ __forceinline__ void cta_min_max(int& lo, int& hi, int (&scratch)[2][WARPS]) {
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  if (threadIdx.x % 32 == 0) {
    scratch[0][threadIdx.x / 32] = lo;
    scratch[1][threadIdx.x / 32] = hi;
  }
  __syncthreads();
  lo = INT_MAX;
  hi = INT_MIN;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    lo = min(lo, scratch[0][w]);
    hi = max(hi, scratch[1][w]);
  }
}

struct TileClass {
  int mode;          // 0: skip; else kNear and/or kFar
  bool elementwise;  // some pair of the tile is masked (or the tile is partial)
};

// The class of a key tile whose keys sit at positions [k_min, k_max], for queries at [q_min, q_max]; partial: the
// tile reaches past seqlen_k; window, rerope_w: 0 when off. Both kernels classify their tiles with it.
__device__ __forceinline__ TileClass classify_span(int q_min, int q_max, int k_min, int k_max, bool partial,
                                                   bool causal, int window, int rerope_w) {
  const int64_t d_min = static_cast<int64_t>(q_min) - k_max, d_max = static_cast<int64_t>(q_max) - k_min;
  TileClass c{0, false};
  if ((causal && d_max < 0) || (window && d_min >= window)) return c;
  c.elementwise = partial || (causal && d_min < 0) || (window && d_max >= window);
  if (rerope_w == 0 || d_max < rerope_w) {
    c.mode = kNear;
  } else {
    c.mode = d_min >= rerope_w ? kFar : (kNear | kFar);
  }
  return c;
}

// Key tiles [begin, end) of block_n keys that can hold an allowed key with default key positions (key j at
// position j), for queries at [q_min, q_max]: causal rows see no key past their position, windowed rows none at or
// below q - window.
struct TileRange {
  int begin, end;
};
__device__ __forceinline__ TileRange default_key_tiles(int q_min, int q_max, int n_tiles, int block_n, bool causal,
                                                       int window) {
  TileRange range{0, n_tiles};
  if (causal) range.end = q_max < 0 ? 0 : min(n_tiles, q_max / block_n + 1);
  if (window) {
    const int64_t first = static_cast<int64_t>(q_min) - window + 1;  // smallest allowed key position
    if (first > 0) range.begin = static_cast<int>(min(first / block_n, static_cast<int64_t>(n_tiles)));
  }
  return range;
}

// sm_90a kernel (csrc/flash_fwd_sm90.cu) for head_dim 64, 96, 128: launches it and sets *launched when this build holds
// sm_90a code, the device is compute capability 9.x and SCALED_ROPE_FLASH_SM80 is unset or 0; else returns "" with
// *launched false and the caller runs the sm_80 kernel. Returns "" on success, else an error message.
std::string flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream, bool* launched);

}  // namespace flash
}  // namespace scaled_rope
