// pybind11 module scaled_rope._C. Takes plain integers (data pointers, sizes, strides, dtype code, device, stream);
// python/scaled_rope/_cuda.py checks the tensors and passes them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "flash_bwd.h"
#include "flash_fwd.h"
#include "rope.h"

#ifndef SCALED_ROPE_CUDA_ARCHS
#define SCALED_ROPE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// This module links its own (static) CUDA runtime, whose current device is independent of torch's.
void use_device(int device) {
  int current = -1;
  check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check(cudaSetDevice(device), "cudaSetDevice");
}

// The on-chip rotation's tables from the launcher's integers (scaled_rope._cuda.rope_args): turns, offset,
// turns_unscaled, factor (pointers), rotary_dim, n_hat, interleaved, stride_tb, stride_offb, stride_fb; empty: none.
// One list rather than ten keyword arguments: pybind11 3.x's keyword bookkeeping failed an assertion on the
// backward's call with them (67 keywords; 57 pass).
scaled_rope::RopeTables rope_tables(const std::vector<int64_t>& v) {
  scaled_rope::RopeTables r;
  if (v.empty()) return r;
  if (v.size() != 10) {
    throw std::invalid_argument("rope: expected 10 integers (turns, offset, turns_unscaled, factor, rotary_dim, "
                                "n_hat, interleaved, stride_tb, stride_offb, stride_fb), got " +
                                std::to_string(v.size()));
  }
  if (v[0] == 0) throw std::invalid_argument("rope: the turns pointer is null");
  r.turns = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(v[0]));
  r.offset = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(v[1]));
  r.turns_unscaled = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(v[2]));
  r.factor = reinterpret_cast<const float*>(static_cast<uintptr_t>(v[3]));
  r.rotary_dim = v[4];
  r.n_hat = v[5];
  r.interleaved = v[6] != 0;
  r.stride_tb = v[7];
  r.stride_offb = v[8];
  r.stride_fb = v[9];
  return r;
}

void rotate(uintptr_t x, uintptr_t out, uintptr_t positions, uintptr_t turns, uintptr_t offset,
            uintptr_t turns_unscaled, uintptr_t factor, int64_t batch, int64_t seqlen, int64_t heads,
            int64_t head_dim, int64_t rotary_dim, int64_t n_hat, bool interleaved, bool inverse, int dtype,
            bool positions_int32, int64_t stride_xb, int64_t stride_xn, int64_t stride_xh, int64_t stride_ob,
            int64_t stride_on, int64_t stride_oh, int64_t stride_pb, int64_t stride_pn, int64_t stride_tb,
            int64_t stride_offb, int64_t stride_fb, int device, uintptr_t stream) {
  if (dtype < scaled_rope::kFloat32 || dtype > scaled_rope::kBFloat16) {
    throw std::invalid_argument("rotate: unknown dtype code " + std::to_string(dtype));
  }
  scaled_rope::RotateParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.out = reinterpret_cast<void*>(out);
  p.positions = reinterpret_cast<const void*>(positions);
  p.turns = reinterpret_cast<const int64_t*>(turns);
  p.offset = reinterpret_cast<const int64_t*>(offset);
  p.turns_unscaled = reinterpret_cast<const int64_t*>(turns_unscaled);
  p.factor = reinterpret_cast<const float*>(factor);
  p.batch = batch;
  p.seqlen = seqlen;
  p.heads = heads;
  p.head_dim = head_dim;
  p.rotary_dim = rotary_dim;
  p.n_hat = n_hat;
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.positions_int32 = positions_int32;
  p.dtype = static_cast<scaled_rope::DType>(dtype);
  p.stride_xb = stride_xb;
  p.stride_xn = stride_xn;
  p.stride_xh = stride_xh;
  p.stride_ob = stride_ob;
  p.stride_on = stride_on;
  p.stride_oh = stride_oh;
  p.stride_pb = stride_pb;
  p.stride_pn = stride_pn;
  p.stride_tb = stride_tb;
  p.stride_offb = stride_offb;
  p.stride_fb = stride_fb;
  use_device(device);
  const std::string err = scaled_rope::rotate(p, reinterpret_cast<cudaStream_t>(stream));
  if (!err.empty()) throw std::runtime_error(err);
}

void flash_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t q_far, uintptr_t k_far, uintptr_t out, uintptr_t lse,
               uintptr_t q_positions, uintptr_t k_positions, uintptr_t k_tile_minmax, int64_t batch, int64_t seqlen_q,
               int64_t seqlen_k, int64_t heads_q, int64_t heads_kv, int64_t head_dim, int64_t q_batch_stride,
               int64_t q_row_stride, int64_t q_head_stride, int64_t k_batch_stride, int64_t k_row_stride,
               int64_t k_head_stride, int64_t k_far_batch_stride, int64_t k_far_row_stride,
               int64_t k_far_head_stride, int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride,
               int64_t o_batch_stride, int64_t o_row_stride, int64_t o_head_stride, int64_t lse_batch_stride,
               int64_t lse_head_stride, int64_t q_positions_batch_stride, int64_t k_positions_batch_stride,
               double softmax_scale, bool causal, int64_t window, int64_t rerope_window, double logn_base, int dtype,
               int device, uintptr_t stream, const std::vector<int64_t>& rope, double q_sign) {
  scaled_rope::FlashFwdParams p;
  p.q_rope = rope_tables(rope);
  p.q_rope_sign = static_cast<float>(q_sign);
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.q_far = reinterpret_cast<const void*>(q_far);
  p.k_far = reinterpret_cast<const void*>(k_far);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.q_positions = reinterpret_cast<const int32_t*>(q_positions);
  p.k_positions = reinterpret_cast<const int32_t*>(k_positions);
  p.k_tile_minmax = reinterpret_cast<int32_t*>(k_tile_minmax);
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.q_batch_stride = q_batch_stride;
  p.q_row_stride = q_row_stride;
  p.q_head_stride = q_head_stride;
  p.k_batch_stride = k_batch_stride;
  p.k_row_stride = k_row_stride;
  p.k_head_stride = k_head_stride;
  p.k_far_batch_stride = k_far_batch_stride;
  p.k_far_row_stride = k_far_row_stride;
  p.k_far_head_stride = k_far_head_stride;
  p.v_batch_stride = v_batch_stride;
  p.v_row_stride = v_row_stride;
  p.v_head_stride = v_head_stride;
  p.o_batch_stride = o_batch_stride;
  p.o_row_stride = o_row_stride;
  p.o_head_stride = o_head_stride;
  p.lse_batch_stride = lse_batch_stride;
  p.lse_head_stride = lse_head_stride;
  p.q_positions_batch_stride = q_positions_batch_stride;
  p.k_positions_batch_stride = k_positions_batch_stride;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.window = window;
  p.rerope_window = rerope_window;
  p.logn_base = static_cast<float>(logn_base);
  p.dtype = static_cast<scaled_rope::DType>(dtype);
  use_device(device);
  const std::string err = scaled_rope::flash_fwd(p, reinterpret_cast<cudaStream_t>(stream));
  if (!err.empty()) throw std::runtime_error(err);
}

void flash_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t dout, uintptr_t lse, uintptr_t dlse,
               uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dq_accum, uintptr_t row_info, int64_t batch,
               int64_t seqlen_q, int64_t seqlen_k, int64_t heads_q, int64_t heads_kv, int64_t head_dim,
               int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride, int64_t k_batch_stride,
               int64_t k_row_stride, int64_t k_head_stride, int64_t v_batch_stride, int64_t v_row_stride,
               int64_t v_head_stride, int64_t o_batch_stride, int64_t o_row_stride, int64_t o_head_stride,
               int64_t do_batch_stride, int64_t do_row_stride, int64_t do_head_stride, int64_t dq_batch_stride,
               int64_t dq_row_stride, int64_t dq_head_stride, int64_t dk_batch_stride, int64_t dk_row_stride,
               int64_t dk_head_stride, int64_t dv_batch_stride, int64_t dv_row_stride, int64_t dv_head_stride,
               int64_t lse_batch_stride, int64_t lse_head_stride, int64_t dlse_batch_stride, int64_t dlse_head_stride,
               double softmax_scale, bool causal, int64_t window, double logn_base, int dtype, int device,
               uintptr_t stream, const std::vector<int64_t>& rope, double q_sign) {
  scaled_rope::FlashBwdParams p;
  p.rope = rope_tables(rope);
  p.q_sign = static_cast<float>(q_sign);
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.out = reinterpret_cast<const void*>(out);
  p.dout = reinterpret_cast<const void*>(dout);
  p.lse = reinterpret_cast<const float*>(lse);
  p.dlse = reinterpret_cast<const float*>(dlse);
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.dq_accum = reinterpret_cast<float*>(dq_accum);
  p.row_info = reinterpret_cast<float*>(row_info);
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.q_batch_stride = q_batch_stride;
  p.q_row_stride = q_row_stride;
  p.q_head_stride = q_head_stride;
  p.k_batch_stride = k_batch_stride;
  p.k_row_stride = k_row_stride;
  p.k_head_stride = k_head_stride;
  p.v_batch_stride = v_batch_stride;
  p.v_row_stride = v_row_stride;
  p.v_head_stride = v_head_stride;
  p.o_batch_stride = o_batch_stride;
  p.o_row_stride = o_row_stride;
  p.o_head_stride = o_head_stride;
  p.do_batch_stride = do_batch_stride;
  p.do_row_stride = do_row_stride;
  p.do_head_stride = do_head_stride;
  p.dq_batch_stride = dq_batch_stride;
  p.dq_row_stride = dq_row_stride;
  p.dq_head_stride = dq_head_stride;
  p.dk_batch_stride = dk_batch_stride;
  p.dk_row_stride = dk_row_stride;
  p.dk_head_stride = dk_head_stride;
  p.dv_batch_stride = dv_batch_stride;
  p.dv_row_stride = dv_row_stride;
  p.dv_head_stride = dv_head_stride;
  p.lse_batch_stride = lse_batch_stride;
  p.lse_head_stride = lse_head_stride;
  p.dlse_batch_stride = dlse_batch_stride;
  p.dlse_head_stride = dlse_head_stride;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.window = window;
  p.logn_base = static_cast<float>(logn_base);
  p.dtype = static_cast<scaled_rope::DType>(dtype);
  use_device(device);
  const std::string err = scaled_rope::flash_bwd(p, reinterpret_cast<cudaStream_t>(stream));
  if (!err.empty()) throw std::runtime_error(err);
}

int runtime_version() {
  int version = 0;
  check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "scaled_rope CUDA kernels (torch-free; arguments are plain integers)";
  m.def("rotate", &rotate, "Scaled-RoPE rotation (inverse=True applies the transpose)", py::arg("x"),
        py::arg("out"), py::arg("positions"), py::arg("turns"), py::arg("offset"), py::arg("turns_unscaled"),
        py::arg("factor"), py::arg("batch"), py::arg("seqlen"), py::arg("heads"), py::arg("head_dim"),
        py::arg("rotary_dim"), py::arg("n_hat"), py::arg("interleaved"), py::arg("inverse"), py::arg("dtype"),
        py::arg("positions_int32"), py::arg("stride_xb"), py::arg("stride_xn"), py::arg("stride_xh"),
        py::arg("stride_ob"), py::arg("stride_on"), py::arg("stride_oh"), py::arg("stride_pb"), py::arg("stride_pn"),
        py::arg("stride_tb"), py::arg("stride_offb"), py::arg("stride_fb"), py::arg("device"), py::arg("stream"));
  m.def("flash_fwd", &flash_fwd,
        "FlashAttention-2 forward over rotated q/k (sm_80+); window, rerope_window, logn_base: 0 = off; rope (10 integers, "
        "see rope_tables): q unrotated, rotated on-chip (sm_90a), times q_sign",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_far"), py::arg("k_far"), py::arg("out"), py::arg("lse"),
        py::arg("q_positions"), py::arg("k_positions"), py::arg("k_tile_minmax"), py::arg("batch"),
        py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("head_dim"),
        py::arg("q_batch_stride"), py::arg("q_row_stride"), py::arg("q_head_stride"), py::arg("k_batch_stride"),
        py::arg("k_row_stride"), py::arg("k_head_stride"), py::arg("k_far_batch_stride"),
        py::arg("k_far_row_stride"), py::arg("k_far_head_stride"), py::arg("v_batch_stride"), py::arg("v_row_stride"),
        py::arg("v_head_stride"), py::arg("o_batch_stride"), py::arg("o_row_stride"), py::arg("o_head_stride"),
        py::arg("lse_batch_stride"), py::arg("lse_head_stride"), py::arg("q_positions_batch_stride"),
        py::arg("k_positions_batch_stride"), py::arg("softmax_scale"), py::arg("causal"), py::arg("window"),
        py::arg("rerope_window"), py::arg("logn_base"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        py::arg("rope") = std::vector<int64_t>{}, py::arg("q_sign") = 1.0);
  m.def("flash_bwd", &flash_bwd,
        "FlashAttention backward over rotated q/k (sm_90a, head_dim 96 or 128, default positions); dlse 0 = none; "
        "window, logn_base: 0 = off; rope given: k unrotated, rotated on-chip, dq and dk w.r.t. the unrotated "
        "q and k; dq times q_sign",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("dlse"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dq_accum"), py::arg("row_info"), py::arg("batch"),
        py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("head_dim"),
        py::arg("q_batch_stride"), py::arg("q_row_stride"), py::arg("q_head_stride"), py::arg("k_batch_stride"),
        py::arg("k_row_stride"), py::arg("k_head_stride"), py::arg("v_batch_stride"), py::arg("v_row_stride"),
        py::arg("v_head_stride"), py::arg("o_batch_stride"), py::arg("o_row_stride"), py::arg("o_head_stride"),
        py::arg("do_batch_stride"), py::arg("do_row_stride"), py::arg("do_head_stride"), py::arg("dq_batch_stride"),
        py::arg("dq_row_stride"), py::arg("dq_head_stride"), py::arg("dk_batch_stride"), py::arg("dk_row_stride"),
        py::arg("dk_head_stride"), py::arg("dv_batch_stride"), py::arg("dv_row_stride"), py::arg("dv_head_stride"),
        py::arg("lse_batch_stride"), py::arg("lse_head_stride"), py::arg("dlse_batch_stride"),
        py::arg("dlse_head_stride"), py::arg("softmax_scale"), py::arg("causal"), py::arg("window"),
        py::arg("logn_base"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("rope") = std::vector<int64_t>{}, py::arg("q_sign") = 1.0);
  m.def("cuda_version", &runtime_version, "CUDA runtime version this module was built with (e.g. 13000)");
  m.def("compiled_archs", []() { return std::string(SCALED_ROPE_CUDA_ARCHS); },
        "SCALED_ROPE_CUDA_ARCHS at build time, e.g. '80;90a'");
}
