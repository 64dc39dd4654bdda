// Hopper (sm_90a) building blocks shared by the flash forward (csrc/flash_fwd_sm90.cu) and backward
// (csrc/flash_bwd_sm90.cu): wgmma with shared-memory descriptors, mbarriers, TMA tensor and bulk copies, named
// barriers, the register budget, and the tensor maps of (batch, rows, heads, head_dim) tensors.
//
// Shared tiles are 64-column blocks of 128-byte rows with 16-byte chunks XOR-swizzled by (row & 7): the layout TMA's
// 128-byte swizzle writes into a 1024-byte aligned destination, and the one the wgmma descriptors below describe.
#pragma once

#include "flash_common.cuh"
#include "rope_device.cuh"

#include <cuda.h>  // CUtensorMap (types only: the encoder comes through the runtime's driver entry point)
#include <cudaTypedefs.h>

#include <cstdint>
#include <string>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SCALED_ROPE_SM90A 1
#endif

namespace scaled_rope {
namespace flash {
namespace sm90 {

// ---- wgmma -------------------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets (>> 4 each).
// K-major operands: stride = 1024 (8 rows of 128 bytes), leading unused. M/N-major operands: leading = the distance
// between 64-element blocks along M/N, stride = 1024 (8 rows along K).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride & 0x3FFFF) >> 4) << 32) | (uint64_t{1} << 62);
}
// desc moved on by `bytes` (a multiple of 16). Shared addresses are < 2^18, so the 14-bit start field cannot carry:
// adding in the low word keeps the high word a compile-time constant (no registers, no carry instructions).
__device__ __forceinline__ uint64_t desc_plus(uint64_t desc, uint32_t bytes) {
  return (desc & 0xFFFFFFFF00000000ull) | (static_cast<uint32_t>(desc) + (bytes >> 4));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers read or written by an asynchronous wgmma at a wait: later code sees the finished accumulators, and
// A-fragment registers stay live (unreused) until the product that reads them is known to be done.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int M, int N>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i) {
#pragma unroll
    for (int j = 0; j < N; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
  }
}

// The accumulator registers of an m64n128 (64) or m64n64 (32) fp32 wgmma, operands %0..; the inputs follow.
#define SCALED_ROPE_WGMMA_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SCALED_ROPE_WGMMA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SCALED_ROPE_WGMMA_OPERANDS32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
  "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), \
  "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SCALED_ROPE_WGMMA_OPERANDS64(d) SCALED_ROPE_WGMMA_OPERANDS32(d), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

template <typename T>
struct Wgmma;
// One input type (TYPE: the PTX type name, bf16 or f16): m64n128k16 and m64n64k16 with A and B in shared memory
// (TRANS_A / TRANS_B: 0 = K-major, 1 = M/N-major), and the same two shapes with A in registers and B N-major.
#define SCALED_ROPE_WGMMA(T, TYPE)                                                                                \
  template <>                                                                                                   \
  struct Wgmma<T> {                                                                                             \
    template <int TRANS_A, int TRANS_B>                                                                         \
    static __device__ __forceinline__ void ss(float (&d)[64], uint64_t a, uint64_t b, int scale_d) {            \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE "\n" SCALED_ROPE_WGMMA_D64      \
                   ", %64, %65, p, 1, 1, %67, %68;\n}\n"                                                         \
                   : SCALED_ROPE_WGMMA_OPERANDS64(d)                                                             \
                   : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));                                  \
    }                                                                                                           \
    template <int TRANS_A, int TRANS_B>                                                                         \
    static __device__ __forceinline__ void ss(float (&d)[32], uint64_t a, uint64_t b, int scale_d) {            \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE "\n" SCALED_ROPE_WGMMA_D32       \
                   ", %32, %33, p, 1, 1, %35, %36;\n}\n"                                                         \
                   : SCALED_ROPE_WGMMA_OPERANDS32(d)                                                             \
                   : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));                                  \
    }                                                                                                           \
    static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int scale_d) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE "\n" SCALED_ROPE_WGMMA_D64      \
                   ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                               \
                   : SCALED_ROPE_WGMMA_OPERANDS64(d)                                                             \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                          \
    }                                                                                                           \
    static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int scale_d) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE "\n" SCALED_ROPE_WGMMA_D32       \
                   ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                               \
                   : SCALED_ROPE_WGMMA_OPERANDS32(d)                                                             \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                          \
    }                                                                                                           \
  };
SCALED_ROPE_WGMMA(__nv_bfloat16, "bf16")
SCALED_ROPE_WGMMA(__half, "f16")
#undef SCALED_ROPE_WGMMA
#undef SCALED_ROPE_WGMMA_OPERANDS64
#undef SCALED_ROPE_WGMMA_OPERANDS32
#undef SCALED_ROPE_WGMMA_D64
#undef SCALED_ROPE_WGMMA_D32

// d (m64 x n, fp32; n = 2 * R: 128 or 64) = (scale_d ? d : 0) + A (m64 x k16, shared) * B (k16 x n, shared).
template <typename T, int TRANS_A = 0, int TRANS_B = 0, int R>
__device__ __forceinline__ void wgmma_ss(float (&d)[R], uint64_t a, uint64_t b, int scale_d) {
  Wgmma<T>::template ss<TRANS_A, TRANS_B>(d, a, b, scale_d);
}
// d += A (m64 x k16, registers: the accumulator layout of an m64 product, packed in pairs) * B (k16 x n, shared,
// N-major; n = 2 * R: 128 or 64).
template <typename T, int R>
__device__ __forceinline__ void wgmma_rs(float (&d)[R], const uint32_t (&a)[4], uint64_t b, int scale_d) {
  Wgmma<T>::rs(d, a, b, scale_d);
}

// ---- mbarrier, TMA, bulk copies, named barriers, register budget ----------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Returns once the phase of the given parity has completed (parity 1 of a fresh barrier counts as completed).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  } while (!done);
}
// One box of `map` at coordinates (column, row, head, batch) into shared memory at dst; completes on bar.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap& map, uint32_t bar, int col, int row,
                                         int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(bar), "r"(col), "r"(row), "r"(head), "r"(batch)
      : "memory");
}
// `bytes` (a multiple of 16) from global src (16-byte aligned) into shared memory at dst; completes on bar.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// dst[i] += src[i] over `bytes` (a multiple of 16) of floats: global dst, shared src, both 16-byte aligned; one bulk
// group per call (bulk_commit), finished with bulk_wait_read (source read) or bulk_wait (done).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's earlier shared-memory stores before later reads by the tensor cores or the copy engine (once
// a barrier has passed them on).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Named barriers 1..15 (0 is __syncthreads); `threads` a multiple of 32, every thread of a participating warp calls.
__device__ __forceinline__ void barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int REGS>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// ---- on-chip rotation of a shared tile -------------------------------------------------------------------------
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Address of 16-byte chunk `chunk` (columns 8 chunk .. 8 chunk + 7) of row `row` of a tile of 64-column blocks of
// block_rows rows each.
__device__ __forceinline__ uint32_t tile_chunk(uint32_t tile, int block_rows, int row, int chunk) {
  return tile + (chunk >> 3) * (block_rows * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

__device__ __forceinline__ uint32_t ld_shared_b32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// Address of the 4-byte word holding columns col, col + 1 (col even) of row `row` of such a tile.
__device__ __forceinline__ uint32_t tile_word(uint32_t tile, int block_rows, int row, int col) {
  return tile_chunk(tile, block_rows, row, col >> 3) + (col & 7) * 2;
}

// Rotates rows [row_begin, row_begin + rows) of a shared tile of 16-bit elements in place (rope_on_chip_layout
// tables): tile row r holds position pos0 + r, or positions[r] when positions is given; rows at or past valid_rows
// (past the tensor's end: TMA's zero fill) are left alone. `sign` (+1 or -1) multiplies the rotated columns and the
// pass-through ones up to head_dim. `thread` of `threads` (a warpgroup) share the work: each thread keeps one 4-byte
// word of pairs (one pair interleaved; two, with their partner word R/2 columns on, in the half layout) and walks
// rows `stride` = threads / words apart, so that consecutive lanes touch consecutive words of a row (no bank
// conflicts) and m' (cos, sin) comes from the previous row's by one complex multiplication with
// e^(i stride theta): two special-function evaluations per thread and pair instead of one per row and pair (which
// measured hardly faster: ~3 us a 128-row tile on an H100 either way, so the special functions are not what the
// rotation's time goes to; bench/NOTES.md, CUDA backward v2). Explicit positions, and a row whose set differs from the previous row's (the
// LongRoPE n_hat switch), restart from an exact evaluation. Over the <= 32 rows of a walk the products add < 2e-6 to
// cos and sin, below a thousandth of a 16-bit element's rounding. The caller orders the stores before tensor-core
// reads (fence_proxy_async, then a barrier). TRANSPOSE applies the rotation's transpose (gradients).
template <typename T, bool TRANSPOSE = false>
__device__ void rotate_tile_rows(uint32_t tile, int block_rows, int row_begin, int rows, int valid_rows,
                                 const RopeTables& rope, int64_t b, int64_t pos0, const int32_t* positions,
                                 float sign, int head_dim, int thread, int threads) {
  const int rotary_dim = static_cast<int>(rope.rotary_dim);
  const int half = rotary_dim / 2;
  const int words = rope.interleaved ? half : half / 2;  // words of pairs a row
  const int stride = threads / words;
  const int row_end = min(row_begin + rows, valid_rows);
  const int word = thread % words;
  if (thread < words * stride) {
    constexpr int kMaxPairs = 2;
    const int n_pairs = rope.interleaved ? 1 : 2;
    const int pair0 = rope.interleaved ? word : 2 * word;  // the word's first pair
    const int col = 2 * word;                              // the word's columns (lo half in the half layout)
    float2 cs[kMaxPairs], step[kMaxPairs];
    int set = -1;  // the rotation set of the previous row: 1 unscaled (below n_hat), 0 scaled
    for (int row = row_begin + thread / words; row < row_end; row += stride) {
      const int64_t pos = positions != nullptr ? static_cast<int64_t>(positions[row]) : pos0 + row;
      const int row_set = rope.n_hat > 0 && pos < rope.n_hat ? 1 : 0;
#pragma unroll
      for (int e = 0; e < kMaxPairs; ++e) {
        if (e >= n_pairs) break;
        if (positions != nullptr || row_set != set) {
          const float2 c = rope_cos_sin(rope, b, pos, pair0 + e);
          cs[e] = make_float2(c.x * sign, c.y * sign);
          step[e] = rope_step_cos_sin(rope, b, row_set, pair0 + e, stride);
        } else {
          cs[e] = make_float2(fmaf(cs[e].x, step[e].x, -cs[e].y * step[e].y),
                              fmaf(cs[e].x, step[e].y, cs[e].y * step[e].x));
        }
      }
      set = row_set;
      if (rope.interleaved) {
        const uint32_t at = tile_word(tile, block_rows, row, col);
        const float2 xy = unpack2<T>(ld_shared_b32(at));
        const float2 r = rope_apply<TRANSPOSE>(xy.x, xy.y, cs[0]);
        st_shared_b32(at, pack2<T>(r.x, r.y));
      } else {
        const uint32_t at_lo = tile_word(tile, block_rows, row, col);
        const uint32_t at_hi = tile_word(tile, block_rows, row, col + half);
        const float2 x = unpack2<T>(ld_shared_b32(at_lo)), y = unpack2<T>(ld_shared_b32(at_hi));
        const float2 r0 = rope_apply<TRANSPOSE>(x.x, y.x, cs[0]);
        const float2 r1 = rope_apply<TRANSPOSE>(x.y, y.y, cs[1]);
        st_shared_b32(at_lo, pack2<T>(r0.x, r1.x));
        st_shared_b32(at_hi, pack2<T>(r0.y, r1.y));
      }
    }
  }
  if (sign == 1.0f) return;
  const int pass_chunks = (head_dim - rotary_dim) / 8;  // the sign alone: flip each element's sign bit
  for (int u = thread; u < rows * pass_chunks; u += threads) {
    const int row = row_begin + u / pass_chunks;
    if (row >= row_end) break;  // rows only grow with u
    const uint32_t at = tile_chunk(tile, block_rows, row, rotary_dim / 8 + u % pass_chunks);
    uint4 v = ld_shared_v4(at);
    v.x ^= 0x80008000u;
    v.y ^= 0x80008000u;
    v.z ^= 0x80008000u;
    v.w ^= 0x80008000u;
    st_shared_v4(at, v);
  }
}

// ---- host side ---------------------------------------------------------------------------------------------------
// True when this build holds sm_90a code for KERNEL and the current device runs it (cached per kernel).
template <auto KERNEL>
bool has_sm90a_code() {
  static const bool available = [] {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major != 9) {
      cudaGetLastError();
      return false;
    }
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, KERNEL) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attr.binaryVersion == 90;
  }();
  return available;
}

// cuTensorMapEncodeTiled, taken through the runtime so that the extension needs no link against libcuda; nullptr
// when the driver does not have it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encoder;
}

// Tensor map of a (batch, rows, heads, head_dim) tensor of 2-byte elements with the given element strides: boxes of
// 64 columns x box_rows rows, 128-byte swizzle; rows past the end and columns past head_dim read as zeros (so a
// head_dim of 96 fills two 64-column blocks, the last 32 columns zero). A stride of 0 (a dimension of size 1, see
// scaled_rope._cuda._stride) becomes a valid one that is never stepped on. Returns "" or an error message that
// starts with `who`.
template <typename T>
std::string encode_tile_map(CUtensorMap* map, const char* who, const char* name, const void* base, int64_t batch,
                            int64_t rows, int64_t heads, int64_t head_dim, int64_t batch_stride, int64_t row_stride,
                            int64_t head_stride, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return std::string(who) + ": the CUDA driver has no cuTensorMapEncodeTiled";
  const cuuint64_t row_bytes = row_stride ? row_stride * 2 : head_dim * 2;
  const cuuint64_t head_bytes = head_stride ? head_stride * 2 : row_bytes * rows;
  const cuuint64_t batch_bytes = batch_stride ? batch_stride * 2 : head_bytes * heads;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {row_bytes, head_bytes, batch_bytes};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(
      map, std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4,
      const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) {
    return std::string(who) + ": cannot build the tensor map of " + name + " (CUresult " +
           std::to_string(static_cast<int>(result)) + ")";
  }
  return "";
}

}  // namespace sm90
}  // namespace flash
}  // namespace scaled_rope
