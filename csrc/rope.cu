// Scaled-RoPE rotation kernel (torch-free).
//
// One thread block takes a tile of positions of one batch row and every head. Phase 1 computes m' * (cos, sin)
// once per (position, pair) into shared memory; phase 2 streams x through registers in 16-byte chunks where the
// strides and pointers allow it (a scalar path covers the rest) and reuses the shared cos/sin for every head.
#include "rope.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

namespace scaled_rope {
namespace {

constexpr double kTurnToRadian = 3.4061215800865545e-19;  // 2 pi / 2^64
constexpr int kThreads = 256;
constexpr int kChunksPerThread = 8;        // phase-2 work per thread that sizes the position tile
constexpr int kMaxTile = 64;
constexpr int kSharedBytes = 32 * 1024;    // cos/sin tile; below the 48 KiB that needs no opt-in

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// CH consecutive elements; one vector access when VEC (the host checked alignment), element-wise otherwise.
template <typename T, int CH>
struct alignas(sizeof(T) * CH) Chunk {
  T v[CH];
};

template <typename T, int CH, bool VEC>
__device__ __forceinline__ Chunk<T, CH> load_chunk(const T* ptr) {
  Chunk<T, CH> c;
  if constexpr (VEC) {
    c = *reinterpret_cast<const Chunk<T, CH>*>(ptr);
  } else {
#pragma unroll
    for (int j = 0; j < CH; ++j) c.v[j] = ptr[j];
  }
  return c;
}

template <typename T, int CH, bool VEC>
__device__ __forceinline__ void store_chunk(T* ptr, const Chunk<T, CH>& c) {
  if constexpr (VEC) {
    *reinterpret_cast<Chunk<T, CH>*>(ptr) = c;
  } else {
#pragma unroll
    for (int j = 0; j < CH; ++j) ptr[j] = c.v[j];
  }
}

__device__ __forceinline__ float2 rotate_pair(float x1, float x2, float2 cs) {
  return make_float2(x1 * cs.x - x2 * cs.y, x1 * cs.y + x2 * cs.x);
}

// Rotated units: half layout, CH pairs (a chunk at i and one at i + R/2); interleaved, CH/2 pairs (one chunk).
// Pass-through units: one chunk of CH elements at R + u * CH (CH = 1 on the scalar path).
template <typename T, int CH, bool VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads) rotate_kernel(const RotateParams p, int tile_n, int units_rot,
                                                          int units_pass) {
  extern __shared__ float2 cos_sin[];  // [tile_n][R/2], already multiplied by m'
  const int64_t b = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * tile_n;
  const int rows = static_cast<int>(min(static_cast<int64_t>(tile_n), p.seqlen - n0));
  const int half = static_cast<int>(p.rotary_dim / 2);

  for (int k = threadIdx.x; k < rows * half; k += blockDim.x) {
    const int r = k / half;
    const int i = k - r * half;
    const int64_t at = b * p.stride_pb + (n0 + r) * p.stride_pn;
    const int64_t pos = p.positions_int32 ? static_cast<const int32_t*>(p.positions)[at]
                                          : static_cast<const int64_t*>(p.positions)[at];
    const bool unscaled = p.n_hat > 0 && pos < p.n_hat;  // turns_unscaled is null without n_hat
    const uint64_t turns = static_cast<uint64_t>(unscaled ? p.turns_unscaled[i] : p.turns[b * p.stride_tb + i]);
    uint64_t t = static_cast<uint64_t>(pos) * turns;  // wraps mod 2^64 by design
    if (p.offset != nullptr) t += static_cast<uint64_t>(p.offset[b * p.stride_offb + i]);
    // The angle in double, split into a float pair: sincosf at the exact float a_hi, corrected to first
    // order by a_lo (|a_lo| <= 2^-22 rad), so cos/sin carry no float rounding of the angle itself.
    const double angle = static_cast<double>(static_cast<int64_t>(t)) * kTurnToRadian;
    const float a_hi = static_cast<float>(angle);
    const float a_lo = static_cast<float>(angle - static_cast<double>(a_hi));
    float s_hi, c_hi;
    sincosf(a_hi, &s_hi, &c_hi);
    const float c = c_hi - s_hi * a_lo;
    const float s = s_hi + c_hi * a_lo;
    const float m = unscaled ? 1.0f : p.factor[b * p.stride_fb];
    cos_sin[k] = make_float2(c * m, (p.inverse ? -s : s) * m);
  }
  __syncthreads();

  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int units = units_rot + units_pass;
  const int per_row = static_cast<int>(p.heads) * units;
  for (int k = threadIdx.x; k < rows * per_row; k += blockDim.x) {
    const int r = k / per_row;
    const int rest = k - r * per_row;
    const int h = rest / units;
    const int u = rest - h * units;
    const int64_t n = n0 + r;
    const T* xr = x + b * p.stride_xb + n * p.stride_xn + h * p.stride_xh;
    T* orow = out + b * p.stride_ob + n * p.stride_on + h * p.stride_oh;
    const float2* cs = cos_sin + r * half;
    if (u >= units_rot) {
      constexpr int PCH = VEC ? CH : 1;
      const int64_t d = p.rotary_dim + static_cast<int64_t>(u - units_rot) * PCH;
      store_chunk<T, PCH, VEC>(orow + d, load_chunk<T, PCH, VEC>(xr + d));
    } else if constexpr (INTERLEAVED) {
      const int d = u * CH;
      const Chunk<T, CH> a = load_chunk<T, CH, VEC>(xr + d);
      Chunk<T, CH> o;
#pragma unroll
      for (int j = 0; j < CH / 2; ++j) {
        const float2 y = rotate_pair(to_float(a.v[2 * j]), to_float(a.v[2 * j + 1]), cs[d / 2 + j]);
        o.v[2 * j] = from_float<T>(y.x);
        o.v[2 * j + 1] = from_float<T>(y.y);
      }
      store_chunk<T, CH, VEC>(orow + d, o);
    } else {
      const int d = u * CH;
      const Chunk<T, CH> lo = load_chunk<T, CH, VEC>(xr + d);
      const Chunk<T, CH> hi = load_chunk<T, CH, VEC>(xr + half + d);
      Chunk<T, CH> olo, ohi;
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const float2 y = rotate_pair(to_float(lo.v[j]), to_float(hi.v[j]), cs[d + j]);
        olo.v[j] = from_float<T>(y.x);
        ohi.v[j] = from_float<T>(y.y);
      }
      store_chunk<T, CH, VEC>(orow + d, olo);
      store_chunk<T, CH, VEC>(orow + half + d, ohi);
    }
  }
}

bool divides(int64_t ch, std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v % ch != 0) return false;
  }
  return true;
}

template <typename T, int CH, bool VEC, bool INTERLEAVED>
std::string launch(const RotateParams& p, cudaStream_t stream) {
  const int64_t half = p.rotary_dim / 2;
  constexpr int PCH = VEC ? CH : 1;
  const int units_rot = static_cast<int>(INTERLEAVED ? p.rotary_dim / CH : half / CH);
  const int units_pass = static_cast<int>((p.head_dim - p.rotary_dim) / PCH);
  const int64_t per_row = p.heads * (units_rot + units_pass);
  if (per_row > (int64_t{1} << 24)) return "rotate: heads * head_dim is too large";

  int64_t tile = (int64_t{kThreads} * kChunksPerThread + per_row - 1) / per_row;
  tile = std::min<int64_t>({tile, kMaxTile, p.seqlen});
  if (half > 0) tile = std::min<int64_t>(tile, kSharedBytes / (half * static_cast<int64_t>(sizeof(float2))));
  tile = std::max<int64_t>(tile, 1);
  if (half * static_cast<int64_t>(sizeof(float2)) > kSharedBytes) return "rotate: rotary_dim is too large";

  const int64_t blocks_n = (p.seqlen + tile - 1) / tile;
  if (blocks_n > 0x7fffffff) return "rotate: seqlen is too large";
  const dim3 grid(static_cast<unsigned>(blocks_n), static_cast<unsigned>(p.batch));
  const size_t shared = static_cast<size_t>(tile * half) * sizeof(float2);
  rotate_kernel<T, CH, VEC, INTERLEAVED>
      <<<grid, kThreads, shared, stream>>>(p, static_cast<int>(tile), units_rot, units_pass);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("rotate: kernel launch failed: ") + cudaGetErrorString(err);
  return "";
}

template <typename T>
std::string dispatch(const RotateParams& p, cudaStream_t stream) {
  constexpr int CH = 16 / sizeof(T);
  const int64_t half = p.rotary_dim / 2;
  const bool aligned = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  const bool vec = aligned && divides(CH, {p.head_dim, p.interleaved ? p.rotary_dim : half, p.stride_xb,
                                           p.stride_xn, p.stride_xh, p.stride_ob, p.stride_on, p.stride_oh});
  if (p.interleaved) {
    return vec ? launch<T, CH, true, true>(p, stream) : launch<T, 2, false, true>(p, stream);
  }
  return vec ? launch<T, CH, true, false>(p, stream) : launch<T, 1, false, false>(p, stream);
}

}  // namespace

std::string rotate(const RotateParams& p, cudaStream_t stream) {
  if (p.rotary_dim <= 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim) {
    return "rotate: rotary_dim must be even, positive and at most head_dim";
  }
  if (p.batch < 0 || p.seqlen < 0 || p.heads < 0) return "rotate: negative size";
  if (p.batch > 65535) return "rotate: batch larger than 65535 is not supported";
  if (p.batch == 0 || p.seqlen == 0 || p.heads == 0) return "";
  if (p.x == nullptr || p.out == nullptr || p.positions == nullptr || p.turns == nullptr || p.factor == nullptr ||
      (p.n_hat > 0 && p.turns_unscaled == nullptr)) {
    return "rotate: missing pointer";
  }
  switch (p.dtype) {
    case kFloat32: return dispatch<float>(p, stream);
    case kFloat16: return dispatch<__half>(p, stream);
    case kBFloat16: return dispatch<__nv_bfloat16>(p, stream);
  }
  return "rotate: unknown dtype code";
}

}  // namespace scaled_rope
