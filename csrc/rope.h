// Standalone scaled-RoPE rotation (torch-free). Conventions: docs/DESIGN.md §3.1 and §5.1 (rotation tables).
// Angles are 64-bit fixed-point turns: T = p * turns + offset (wrapping mod
// 2^64), angle = float(T) * 2pi / 2^64 in [-pi, pi).
#pragma once

#include <cstdint>
#include <string>
#include <cuda_runtime.h>

namespace scaled_rope {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RotateParams {
  const void* x;                  // (B, N, H, D), last dim contiguous
  void* out;                      // (B, N, H, D), last dim contiguous; may alias x
  const void* positions;          // (B, N), int64 or int32 (positions_int32)
  const int64_t* turns;           // (B, R/2), last dim contiguous
  const int64_t* offset;          // (B, R/2) or nullptr, last dim contiguous
  const int64_t* turns_unscaled;  // (R/2,) or nullptr; used for positions p < n_hat
  const float* factor;            // (B,) attention factor m; 1 is used for positions p < n_hat

  int64_t batch, seqlen, heads, head_dim, rotary_dim;
  int64_t n_hat;                  // 0 = off
  bool interleaved;               // false: pair i = (x[i], x[i + R/2]); true: pair i = (x[2i], x[2i+1])
  bool inverse;                   // transpose of the rotation (for gradients)
  bool positions_int32;
  DType dtype;

  int64_t stride_xb, stride_xn, stride_xh;
  int64_t stride_ob, stride_on, stride_oh;
  int64_t stride_pb, stride_pn;
  int64_t stride_tb;              // row stride of turns (0 = one row shared by every batch row)
  int64_t stride_offb;            // row stride of offset (0 = one row shared by every batch row)
  int64_t stride_fb;              // stride of factor
};

// The rotation tables of one tensor for the attention kernels that rotate on-chip (csrc/rope_device.cuh): the
// fields of RotateParams that describe the rotation, with the same meanings. turns == nullptr: no rotation.
struct RopeTables {
  const int64_t* turns = nullptr;           // (B, R/2)
  const int64_t* offset = nullptr;          // (B, R/2) or nullptr
  const int64_t* turns_unscaled = nullptr;  // (R/2,), used for positions p < n_hat; nullptr without n_hat
  const float* factor = nullptr;            // (B,)
  int64_t rotary_dim = 0, n_hat = 0;
  bool interleaved = false;
  int64_t stride_tb = 0, stride_offb = 0, stride_fb = 0;  // batch-row strides (0: one row for every batch row)
};

// Launches the rotation on `stream` (of the current device). Returns "" on success, else an error message.
std::string rotate(const RotateParams& params, cudaStream_t stream);

}  // namespace scaled_rope
