// FlashAttention backward over rotated q and rotated or unrotated k (torch-free): csrc/flash_bwd_sm90.cu, for sm_90a (H100/H200),
// head_dim 96 and 128, float16 and bfloat16.
// Semantics: those of the forward (csrc/flash_fwd.h) with default positions (query row i at seqlen_k - seqlen_q + i,
// key j at j) and no ReRoPE. With P the softmax of s = softmax_scale * g(pos) * <q, k> over the allowed keys (lse:
// the forward's natural-log row logsumexp, -inf on empty rows), dP = dout v^T, Delta = rowsum(dout * out) - dlse
// (dlse: the gradient reaching lse; none when nullptr) and dS = P * (dP - Delta) * softmax_scale * g(pos):
// dq = dS k, dk = dS^T q and dv = P^T dout, dk and dv summed over the q heads of a GQA group. Empty rows contribute
// nothing. The gradients are w.r.t. the rotated q and k (the caller applies the rotation's transpose), or, with
// `rope`, w.r.t. the unrotated ones.
#pragma once

#include <cstdint>
#include <string>
#include <cuda_runtime.h>

#include "rope.h"  // DType

namespace scaled_rope {

// Query rows per step of the kernel: the workspaces are padded to a multiple of it.
constexpr int kFlashBwdBlockM = 64;

struct FlashBwdParams {
  const void* q;       // (B, Nq, Hq, 128) rotated, last dim contiguous, 16-byte aligned rows
  const void* k;       // (B, Nk, Hkv, 128) rotated (unrotated with `rope`), same requirements
  const void* v;       // (B, Nk, Hkv, 128), same requirements
  const void* out;     // (B, Nq, Hq, 128), same requirements
  const void* dout;    // (B, Nq, Hq, 128), same requirements
  const float* lse;    // (B, Hq, Nq) float32, natural log, last dim contiguous
  const float* dlse;   // (B, Hq, Nq) float32, last dim contiguous; nullptr: no gradient through lse
  void* dq;            // (B, Nq, Hq, 128) in the input dtype, last dim contiguous, 8-byte aligned groups of 4
  void* dk;            // (B, Nk, Hkv, 128) in the input dtype, last dim contiguous, 4-byte aligned pairs
  void* dv;            // (B, Nk, Hkv, 128), same requirements as dk
  // Workspaces, 16-byte aligned, contiguous, overwritten; Nq_pad = ceil(Nq / kFlashBwdBlockM) * kFlashBwdBlockM:
  float* dq_accum;     // (B, Hq, Nq_pad, head_dim) float32: dq summed over key tiles (a layout of the kernel's own)
  float* row_info;     // (B, Hq, Nq_pad, 4) float32: per query row the scales, lse in log2 units and Delta (idem)

  int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  int64_t q_batch_stride, q_row_stride, q_head_stride;  // elements
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
  int64_t dlse_batch_stride, dlse_head_stride;

  float softmax_scale;  // > 0 (the caller folds its sign into q)
  bool causal;
  int64_t window;       // 0: no sliding window
  float logn_base;      // 0: no log-n scaling
  DType dtype;          // kFloat16 or kBFloat16
  float q_sign = 1.0f;  // dq is multiplied by it: +1 or -1, the sign of softmax_scale that the caller folded into q
  // rope.turns != nullptr: k arrives unrotated and the kernel rotates each key tile on-chip with these tables
  // (csrc/rope_device.cuh, rope_on_chip_layout) at the default key positions, and dk and dq come back through the
  // rotation's transpose (dk at the key positions, dq at the query positions): the gradients w.r.t. the unrotated k
  // and q, where q is given rotated (times q_sign) with the same tables.
  RopeTables rope;
};

// Launches on `stream` (of the current device). Returns "" on success, else an error message (also when the device
// is not compute capability 9.x or the build has no sm_90a code).
std::string flash_bwd(const FlashBwdParams& params, cudaStream_t stream);

}  // namespace scaled_rope
