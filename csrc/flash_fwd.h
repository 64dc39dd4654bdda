// FlashAttention forward over rotated q and k (torch-free; q may be rotated on-chip, see q_rope): an sm_80+ kernel (mma.sync, ldmatrix, cp.async;
// csrc/flash_fwd.cu; head_dim 64 and 128) and, on compute capability 9.x when the build has sm_90a code, a wgmma
// kernel (csrc/flash_fwd_sm90.cu; head_dim 64, 96 and 128); SCALED_ROPE_FLASH_SM80=1 forces the sm_80 kernel.
// Semantics: docs/DESIGN.md §3 with the rotation done beforehand (csrc/rope.cu writes the rotated q, k and, for
// ReRoPE, the far pair q_far, k_far into scratch buffers). For a query at position P and a key at position Q,
// delta = P - Q: allowed when (not causal or delta >= 0) and (no window or delta < window); the score is
// softmax_scale * g(P) * <q, k> with g(P) = max(1, ln(P + 1) / ln(logn_base)) (1 when logn_base == 0), taken from
// the far pair when rerope_window > 0 and delta >= rerope_window. Rows with no allowed key: out 0, lse -inf.
#pragma once

#include <cstdint>
#include <string>
#include <cuda_runtime.h>

#include "rope.h"  // DType

namespace scaled_rope {

struct FlashFwdParams {
  const void* q;                 // (B, Nq, Hq, D), last dim contiguous, 16-byte aligned rows
  const void* k;                 // (B, Nk, Hkv, D), same requirements
  const void* v;                 // (B, Nk, Hkv, D), same requirements
  const void* q_far;             // ReRoPE far q, laid out with q's strides; nullptr unless rerope_window > 0
  const void* k_far;             // ReRoPE far k (its own strides: plain ReRoPE passes the caller's k); nullptr unless
                                 // rerope_window > 0
  void* out;                     // (B, Nq, Hq, D) in the input dtype, last dim contiguous
  float* lse;                    // (B, Hq, Nq) float32, natural log, last dim contiguous
  const int32_t* q_positions;    // (B, Nq), last dim contiguous; nullptr: default Nk - Nq + i
  const int32_t* k_positions;    // (B, Nk), last dim contiguous; nullptr: default j
  int32_t* k_tile_minmax;        // workspace (B, ceil(Nk / 64), 2) when k_positions is given, else unused

  int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  int64_t q_batch_stride, q_row_stride, q_head_stride;  // elements
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t k_far_batch_stride, k_far_row_stride, k_far_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
  int64_t q_positions_batch_stride, k_positions_batch_stride;

  float softmax_scale;
  bool causal;
  int64_t window;                // 0: no sliding window
  int64_t rerope_window;         // 0: no ReRoPE
  float logn_base;               // 0: no log-n scaling
  DType dtype;                   // kFloat16 or kBFloat16
  // q_rope.turns != nullptr: q arrives unrotated and the sm_90a kernel rotates each query tile on-chip at the query
  // positions with these tables (csrc/rope_device.cuh; rope_on_chip_layout; no ReRoPE), times q_rope_sign (+1 or -1,
  // softmax_scale's sign) on every column. Other kernels refuse it.
  RopeTables q_rope;
  float q_rope_sign = 1.0f;
};

// Rows of keys per tile; the workspace k_tile_minmax holds one (min, max) pair per tile of this many keys.
constexpr int kFlashBlockN = 64;

// Launches on `stream` (of the current device). Returns "" on success, else an error message.
// Positions must satisfy |P|, |Q| < 2^30 (deltas are formed in 32-bit integers).
std::string flash_fwd(const FlashFwdParams& params, cudaStream_t stream);

}  // namespace scaled_rope
