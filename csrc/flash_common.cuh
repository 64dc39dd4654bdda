// Device helpers shared by the flash forward kernels (csrc/flash_fwd.cu: sm_80+; csrc/flash_fwd_sm90.cu: sm_90a).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
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

struct TileClass {
  int mode;          // 0: skip; else kNear and/or kFar
  bool elementwise;  // some pair of the tile is masked (or the tile is partial)
};

// sm_90a kernel (csrc/flash_fwd_sm90.cu) for head_dim 128: launches it and sets *launched when this build holds
// sm_90a code, the device is compute capability 9.x and SCALED_ROPE_FLASH_SM80 is unset or 0; else returns "" with
// *launched false and the caller runs the sm_80 kernel. Returns "" on success, else an error message.
std::string flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream, bool* launched);

}  // namespace flash
}  // namespace scaled_rope
