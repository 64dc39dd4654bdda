// FlashAttention forward for sm_90a (H100/H200) over already rotated q and k, head_dim 128: warp-specialised, with
// the tensor memory accelerator (TMA) and warpgroup MMA (wgmma). Semantics as csrc/flash_fwd.h; csrc/flash_fwd.cu
// launches this kernel where it applies and the sm_80 one otherwise.
//
// One CTA of three warpgroups takes kBlockM = 128 query rows of one (batch, q head). Warpgroup 0 is the producer: one
// thread issues every copy (TMA boxes of 64 columns x 128 rows, 128-byte swizzle) and the others exit. Warpgroups 1
// and 2 are the consumers, 64 query rows each (setmaxnreg moves the producer's registers to them). Keys come in
// tiles of kBlockN = 128 through a ring of kStages K and V buffers; copies complete on mbarriers (full[stage] counts
// the bytes in, empty[stage] the consumer warps done with the stage), so no CTA-wide barrier sits in the loop, and K
// and V have barriers of their own: S = Q K^T starts when K is in.
// S = Q K^T is one wgmma.m64n128k16 chain per warpgroup with Q and K both read from shared memory, and O += P V takes
// P from registers (the S accumulator layout is the A-fragment layout) and V from shared memory as an N-major
// operand, so no tile is ever transposed. Tiles are 64-column blocks of 128-byte rows with 16-byte chunks XOR-swizzled
// by (row & 7), the layout TMA's 128-byte swizzle writes (bases 1024-byte aligned). Each consumer's loop is
// software-pipelined: S(i) and O += P(i-1) V(i-1) are issued together and the softmax of S(i) runs on the CUDA cores
// while the tensor cores finish P(i-1) V(i-1). (Forcing the two consumers to take turns at issuing, FA3's ping-pong
// through named barriers, measured no different; three stages instead of two neither: bench/NOTES.md, v6.)
// Query tiles are taken heaviest first, in L2 sections of heads (flash_common.cuh, tile_order).
//
// Tile classification is that of the sm_80 kernel: skipped, unmasked or masked tiles; for ReRoPE the near pair, the
// far pair, or (straddling the window) two visits of the tile, far keys with (q_far, k_far) and near keys with
// (q, k), each masked to its keys. A visit loads its own K (near or far) and V, so a stage holds one K; q and q_far
// both stay in shared memory and each visit picks its pair.
#include "flash_common.cuh"

#include <cuda.h>  // CUtensorMap (types only: the encoder comes through the runtime's driver entry point)
#include <cudaTypedefs.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SCALED_ROPE_SM90A 1
#endif

namespace scaled_rope {
namespace flash {
namespace {

constexpr int kD = 128;
constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kNB = kBlockN / 8;            // n8 blocks of S per thread row
static_assert(kNB * 8 == kBlockN && kBlockN % kFlashBlockN == 0, "key tiles of whole n8 blocks and prepass tiles");
constexpr int kPrepassTiles = kBlockN / kFlashBlockN;  // key tiles of the (min, max) prepass per key tile
constexpr int kQBytes = kBlockM * kD * 2;
constexpr int kKVBytes = kBlockN * kD * 2;

// ---- wgmma wrappers ----------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets (>> 4 each).
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
__device__ __forceinline__ void fence_regs(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_regs(uint32_t (&a)[8][4]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
  }
}

// d (m64 x n128, fp32) = (scale_d ? d : 0) + A (m64 x k16, shared, K-major) * B (k16 x n128, shared, K-major).
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t a, uint64_t b, int scale_d);
// d += A (m64 x k16, registers) * B (k16 x n128, shared, N-major).
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int scale_d);

// The 64 accumulator registers of an m64n128 fp32 wgmma: operands %0..%63, then the inputs from %64.
#define SCALED_ROPE_WGMMA_D "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SCALED_ROPE_WGMMA_D_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
  "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), \
  "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), \
  "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), \
  "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
  "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// Both wrappers for one input type (TYPE: the PTX type name, bf16 or f16).
#define SCALED_ROPE_WGMMA(T, TYPE)                                                                                 \
  template <>                                                                                                    \
  __device__ __forceinline__ void wgmma_ss<T>(float (&d)[64], uint64_t a, uint64_t b, int scale_d) {             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                   \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE "\n" SCALED_ROPE_WGMMA_D           \
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                               \
                 : SCALED_ROPE_WGMMA_D_OPERANDS(d)                                                                \
                 : "l"(a), "l"(b), "r"(scale_d));                                                                 \
  }                                                                                                              \
  template <>                                                                                                    \
  __device__ __forceinline__ void wgmma_rs<T>(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int scale_d) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                   \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE "\n" SCALED_ROPE_WGMMA_D           \
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                 \
                 : SCALED_ROPE_WGMMA_D_OPERANDS(d)                                                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                             \
  }
SCALED_ROPE_WGMMA(__nv_bfloat16, "bf16")
SCALED_ROPE_WGMMA(__half, "f16")
#undef SCALED_ROPE_WGMMA
#undef SCALED_ROPE_WGMMA_D_OPERANDS
#undef SCALED_ROPE_WGMMA_D

// ---- visits, masks, softmax --------------------------------------------------------------------------------------
// Keys allowed for a query at position pos where key positions are the columns (DESIGN.md section 3: col < seqlen_k,
// causal delta >= 0, window delta < window, a split ReRoPE visit keeps delta >= rerope_w (far) or < rerope_w
// (near); delta = pos - col): the columns base + c with lo <= c < hi, clamped to the offsets 0..kBlockN of a tile.
struct ColumnRange {
  int lo, hi;
};
__host__ __device__ __forceinline__ ColumnRange allowed_columns(int pos, int base, int seqlen_k, bool causal,
                                                                int window, bool split, bool far, int rerope_w) {
  const int64_t q = pos, first = base, end = first + kBlockN;  // 64 bits: pos - window + 1 can leave the int range
  int64_t lo = first, hi = seqlen_k;
  auto raise_lo = [&lo](int64_t x) { lo = x > lo ? x : lo; };
  auto cut_hi = [&hi](int64_t x) { hi = x < hi ? x : hi; };
  if (causal) cut_hi(q + 1);
  if (window) raise_lo(q - window + 1);
  if (split) {
    if (far) {
      cut_hi(q - rerope_w + 1);
    } else {
      raise_lo(q - rerope_w + 1);
    }
  }
  cut_hi(end);
  return {static_cast<int>((lo < end ? lo : end) - first), static_cast<int>((hi > first ? hi : first) - first)};
}

// f over x[I, I + N) as a pairwise tree: depth log2 N instead of a serial chain of N dependent steps.
template <int I, int N, typename F, int M>
__device__ __forceinline__ float tree_reduce(const float (&x)[M], F f) {
  static_assert(N > 0 && (N & (N - 1)) == 0 && I + N <= M, "a power-of-two range inside x");
  if constexpr (N == 1) {
    return x[I];
  } else {
    return f(tree_reduce<I, N / 2>(x, f), tree_reduce<I + N / 2, N / 2>(x, f));
  }
}

// A visit of a key tile, packed into one register:
// the tile index (< 2^23: flash_fwd() keeps seqlen_k below 2^30) in bits 0..27, the flags above it.
class Visit {
 public:
  Visit() = default;
  __device__ Visit(int j, bool far, bool masked, bool split)
      : bits_(j | (far ? kFarBit : 0) | (masked ? kMaskedBit : 0) | (split ? kSplitBit : 0)) {}
  __device__ int j() const { return bits_ & (kFarBit - 1); }     // key tile; j_end when done
  __device__ bool far() const { return bits_ & kFarBit; }        // product: far pair (q_far, k_far) or near (q, k)
  __device__ bool masked() const { return bits_ & kMaskedBit; }  // per-element masks needed
  __device__ bool split() const { return bits_ & kSplitBit; }    // straddling tile: keys on this visit's side only

 private:
  static constexpr int kFarBit = 1 << 28, kMaskedBit = 1 << 29, kSplitBit = 1 << 30;
  int bits_;
};

constexpr int kThreads = 384;      // producer warpgroup + two consumer warpgroups
constexpr int kStages = 2;         // K/V ring
constexpr int kProducerRegs = 24;   // setmaxnreg: 128 * 24 + 256 * 240 = 64512 of the 65536 registers
constexpr int kConsumerRegs = 240;
constexpr int kConsumerWarps = 8;   // arrivals that free a stage: lane 0 of each consumer warp

// Tensor maps of the (B, N, H, D) tensors, boxes of 64 columns x 128 rows with the 128-byte swizzle (the layout the
// wgmma descriptors read). Passed by value as a __grid_constant__ kernel parameter.
struct TileMaps {
  CUtensorMap q, k, v, q_far, k_far;
};

// ---- mbarrier, TMA, named barriers, register budget (sm_90) ---------------------------------------------------------
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
template <int REGS>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// The key tiles one query tile visits, in order: producer and consumers each walk it, so no visit list passes
// between them.
struct VisitPlan {
  const int2* k_tile_minmax;  // this batch row's (min, max) key position per prepass tile; nullptr: key = column
  int n_prepass, seqlen_k, window, rerope_w, q_min, q_max, j_begin, j_end;
  bool causal;

  __device__ TileClass classify(int j) const {
    int k_min, k_max;
    if (k_tile_minmax) {
      k_min = INT_MAX;
      k_max = INT_MIN;
#pragma unroll
      for (int i = 0; i < kPrepassTiles; ++i) {
        const int jp = j * kPrepassTiles + i;
        if (jp < n_prepass) {
          const int2 mm = k_tile_minmax[jp];
          k_min = min(k_min, mm.x);
          k_max = max(k_max, mm.y);
        }
      }
    } else {
      k_min = j * kBlockN;
      k_max = min(j * kBlockN + kBlockN, seqlen_k) - 1;
    }
    return classify_span(q_min, q_max, k_min, k_max, (j + 1) * kBlockN > seqlen_k, causal, window, rerope_w);
  }
  // The first visit with the far (or near) pair at tile j or later; Visit{j_end} when none.
  __device__ Visit find(int j, bool far) const {
    for (; j < j_end; ++j) {
      const TileClass c = classify(j);
      if (c.mode & (far ? kFar : kNear)) {
        const bool straddle = c.mode == (kNear | kFar);
        return Visit{j, far, c.elementwise || straddle, straddle};
      }
    }
    return Visit{j_end, false, false, false};
  }
  // Far visits first, then near ones (any order gives the same softmax; this one keeps the far pair's loads together).
  __device__ Visit first() const {
    const Visit v = rerope_w ? find(j_begin, true) : Visit{j_end, false, false, false};
    return v.j() < j_end ? v : find(j_begin, false);
  }
  __device__ Visit next(const Visit& v) const {
    if (v.j() >= j_end) return v;
    const Visit w = find(v.j() + 1, v.far());
    return (w.j() < j_end || !v.far()) ? w : find(j_begin, false);
  }
};

// Per-thread row state of a consumer: the two rows r = 0, 1 this thread holds (see the kernel).
struct Rows {
  int pos[2];
  float scale[2];    // softmax_scale * log2(e) * log-n factor
  float max[2];      // running max of scale * s, log2 units
  float sum[2];      // this thread's partial sums
};

// Masks and exponentiates the finished scores s of visit v in place and updates the row statistics; alpha[r] is
// the factor O's row r must be multiplied by. The row scale is folded into the exponent, p = 2^(s * scale - max): one
// FFMA per element. Masking and the max work on the raw scores, which needs scale > 0 (flash_fwd() checks
// softmax_scale; the log-n factor is >= 1): -inf stays -inf, and max(s) * scale = max(s * scale) exactly (rounding
// is monotonic). Max and sum are pairwise trees, not serial chains.
__device__ __forceinline__ void softmax_visit(float (&s)[64], const Visit& v, Rows& rows, float (&alpha)[2],
                                              const VisitPlan& plan, const int32_t* k_pos, int t) {
  const int n0 = v.j() * kBlockN;
  if (v.masked() && k_pos) {  // key positions given: each element compares its own
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n0 + nb * 8 + 2 * t + e;
        const int key = col < plan.seqlen_k ? k_pos[col] : 0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int delta = rows.pos[r] - key;
          const bool allowed = col < plan.seqlen_k && (!plan.causal || delta >= 0) &&
                               (!plan.window || delta < plan.window) &&
                               (!v.split() || (delta >= plan.rerope_w) == v.far());
          if (!allowed) s[4 * nb + 2 * r + e] = -INFINITY;
        }
      }
    }
  } else if (v.masked()) {  // key = column: each row's allowed keys are one range, two compares an element
    int lo[2], hi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const ColumnRange c = allowed_columns(rows.pos[r], n0 + 2 * t, plan.seqlen_k, plan.causal, plan.window,
                                            v.split(), v.far(), plan.rerope_w);
      lo[r] = c.lo;
      hi[r] = c.hi;
    }
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (nb * 8 + e < lo[r] || nb * 8 + e >= hi[r]) s[4 * nb + 2 * r + e] = -INFINITY;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m[kNB];
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) m[nb] = fmaxf(s[4 * nb + 2 * r], s[4 * nb + 2 * r + 1]);
    float mx = tree_reduce<0, kNB>(m, [](float a, float b) { return fmaxf(a, b); });
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx = fmaxf(rows.max[r], mx * rows.scale[r]);
    const float ref = mx == -INFINITY ? 0.0f : mx;  // a row with nothing allowed so far keeps max -inf
    alpha[r] = ex2(rows.max[r] - ref);
    rows.max[r] = mx;
    float sum[kNB];
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * nb + 2 * r + e];
        x = ex2(fmaf(x, rows.scale[r], -ref));
      }
      sum[nb] = s[4 * nb + 2 * r] + s[4 * nb + 2 * r + 1];
    }
    rows.sum[r] = fmaf(rows.sum[r], alpha[r], tree_reduce<0, kNB>(sum, [](float a, float b) { return a + b; }));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ TileMaps maps, const FlashFwdParams p, int num_q_tiles,
                             int section_heads) {
#ifdef SCALED_ROPE_SM90A
  constexpr int S = kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t bars[1 + 4 * S];  // q_full, k_full[S], v_full[S], k_empty[S], v_empty[S]
  __shared__ int q_range[2][kThreads / 32];
  const bool rerope = p.rerope_window > 0;
  const uint32_t sQ = (smem_u32(smem_raw) + 1023u) & ~1023u;  // q, then q_far (ReRoPE); the launch adds 1024 bytes
  const uint32_t sK = sQ + (rerope ? 2 : 1) * kQBytes;          // K stages, then V stages
  const uint32_t sV = sK + S * kKVBytes;
  const uint32_t bar0 = smem_u32(bars);
  const uint32_t q_full = bar0;
  auto k_full = [&](int s) { return bar0 + 8u * (1 + s); };
  auto v_full = [&](int s) { return bar0 + 8u * (1 + S + s); };
  auto k_empty = [&](int s) { return bar0 + 8u * (1 + 2 * S + s); };
  auto v_empty = [&](int s) { return bar0 + 8u * (1 + 3 * S + s); };

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform by construction
  const int lane = tid % 32;
  const int cw = tid / 32 - 4;                            // consumer warp 0..7 (negative in the producer)
  const int g = lane >> 2, t = lane & 3;
  const TileIndex tile = tile_order(blockIdx.x, num_q_tiles, p.batch * p.heads_q, section_heads);
  const int64_t b = tile.bh / p.heads_q, h = tile.bh % p.heads_q;
  const int hk = static_cast<int>(h / (p.heads_q / p.heads_kv));
  const int seqlen_q = static_cast<int>(p.seqlen_q), seqlen_k = static_cast<int>(p.seqlen_k);
  const int m0 = tile.q_tile * kBlockM;
  const int32_t* k_pos = p.k_positions ? p.k_positions + b * p.k_positions_batch_stride : nullptr;

  // Consumer rows: r = 0, 1 is row m0 + 16 cw + g + 8 r (warp w of a consumer warpgroup owns 16 of its 64 rows).
  Rows rows;
  int q_min = INT_MAX, q_max = INT_MIN;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + cw * 16 + g + 8 * r;
    const bool mine = cw >= 0 && row < seqlen_q;
    rows.pos[r] = p.q_positions ? (mine ? p.q_positions[b * p.q_positions_batch_stride + row] : 0)
                                : seqlen_k - seqlen_q + row;
    float scale = p.softmax_scale * kLog2e;
    if (p.logn_base > 0.0f) scale *= fmaxf(1.0f, logf(static_cast<float>(rows.pos[r]) + 1.0f) / logf(p.logn_base));
    rows.scale[r] = scale;
    rows.max[r] = -INFINITY;
    rows.sum[r] = 0.0f;
    if (mine) {
      q_min = min(q_min, rows.pos[r]);
      q_max = max(q_max, rows.pos[r]);
    }
  }
  if (p.q_positions) {
    cta_min_max(q_min, q_max, q_range);  // every thread of the CTA; the producer's contribute nothing
  } else {
    q_min = seqlen_k - seqlen_q + m0;
    q_max = seqlen_k - seqlen_q + min(m0 + kBlockM, seqlen_q) - 1;
  }

  VisitPlan plan;
  plan.n_prepass = (seqlen_k + kFlashBlockN - 1) / kFlashBlockN;
  plan.k_tile_minmax = k_pos ? reinterpret_cast<const int2*>(p.k_tile_minmax) + b * plan.n_prepass : nullptr;
  plan.seqlen_k = seqlen_k;
  plan.window = p.window > 0 ? static_cast<int>(min(p.window, static_cast<int64_t>(INT_MAX))) : 0;
  plan.rerope_w = rerope ? static_cast<int>(min(p.rerope_window, static_cast<int64_t>(INT_MAX))) : 0;
  plan.causal = p.causal;
  plan.q_min = q_min;
  plan.q_max = q_max;
  const int n_tiles = (seqlen_k + kBlockN - 1) / kBlockN;
  const TileRange range =
      k_pos ? TileRange{0, n_tiles} : default_key_tiles(q_min, q_max, n_tiles, kBlockN, p.causal, plan.window);
  plan.j_begin = range.begin;
  plan.j_end = range.end;

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), kConsumerWarps);
      mbar_init(v_empty(s), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // ---- producer ----
    regs_dec<kProducerRegs>();
    if (tid != 0) return;
    const int bi = static_cast<int>(b), hi = static_cast<int>(h);
    mbar_expect_tx(q_full, (rerope ? 2 : 1) * kQBytes);
#pragma unroll
    for (int c = 0; c < kD / 64; ++c) {
      tma_load(sQ + c * kBlockM * 128, maps.q, q_full, c * 64, m0, hi, bi);
      if (rerope) tma_load(sQ + kQBytes + c * kBlockM * 128, maps.q_far, q_full, c * 64, m0, hi, bi);
    }
    int i = 0;
    for (Visit v = plan.first(); v.j() < plan.j_end; v = plan.next(v), ++i) {
      const int s = i % S;
      const uint32_t free_parity = ((i / S) & 1) ^ 1;  // the first round finds every stage free
      const int n0 = v.j() * kBlockN;
      mbar_wait(k_empty(s), free_parity);
      mbar_expect_tx(k_full(s), kKVBytes);
#pragma unroll
      for (int c = 0; c < kD / 64; ++c) {
        tma_load(sK + s * kKVBytes + c * kBlockN * 128, v.far() ? maps.k_far : maps.k, k_full(s), c * 64, n0, hk, bi);
      }
      mbar_wait(v_empty(s), free_parity);
      mbar_expect_tx(v_full(s), kKVBytes);
#pragma unroll
      for (int c = 0; c < kD / 64; ++c) {
        tma_load(sV + s * kKVBytes + c * kBlockN * 128, maps.v, v_full(s), c * 64, n0, hk, bi);
      }
    }
  } else {  // ---- consumers ----
    regs_inc<kConsumerRegs>();
    const int wgc = wg - 1;
    // Descriptors of this warpgroup's Q rows (q; q_far is kQBytes on) and of stage 0 of K and V.
    const uint64_t q_desc = smem_desc(sQ + wgc * 64 * 128, 16, 1024);
    const uint64_t k_desc = smem_desc(sK, 16, 1024);
    const uint64_t v_desc = smem_desc(sV, kBlockN * 128, 1024);
    auto issue_qk = [&](float (&s)[64], bool far, int stage) {
      const uint64_t qd = desc_plus(q_desc, far ? kQBytes : 0);
      const uint64_t kd = desc_plus(k_desc, stage * kKVBytes);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        wgmma_ss<T>(s, desc_plus(qd, (kk >> 2) * kBlockM * 128 + (kk & 3) * 32),
                    desc_plus(kd, (kk >> 2) * kBlockN * 128 + (kk & 3) * 32), kk > 0 ? 1 : 0);
      }
    };
    auto issue_pv = [&](float (&o)[64], const uint32_t (&pa)[kBlockN / 16][4], int stage) {
      const uint64_t vd = desc_plus(v_desc, stage * kKVBytes);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) wgmma_rs<T>(o, pa[kk], desc_plus(vd, kk * 16 * 128), 1);
    };

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    uint32_t pa[kBlockN / 16][4];
    // Turns: warpgroup c waits at barrier 1 + c before issuing, then opens the other's; the second warpgroup
    // opens the first's turn once to start.
    mbar_wait(q_full, 0);

    int i = 0, prev_stage = 0;
    uint32_t prev_parity = 0;
    bool has_prev = false;
    for (Visit v = plan.first(); v.j() < plan.j_end; v = plan.next(v), ++i) {
      const int stage = i % S;
      const uint32_t parity = (i / S) & 1;
      // Both waits come before the products: a wait loop between two wgmma groups makes ptxas fence them apart.
      if (has_prev) mbar_wait(v_full(prev_stage), prev_parity);
      mbar_wait(k_full(stage), parity);
      // Each branch issues its whole group: wgmma issued in another basic block than the fence gets fenced again.
      float s[64];
      if (has_prev) {
        wgmma_fence();
        issue_qk(s, v.far(), stage);
        wgmma_commit();
        issue_pv(o, pa, prev_stage);
        wgmma_commit();
        wgmma_wait<1>();
      } else {
        wgmma_fence();
        issue_qk(s, v.far(), stage);
        wgmma_commit();
        wgmma_wait<0>();
      }
      fence_regs(s);
      if (lane == 0) mbar_arrive(k_empty(stage));
      float alpha[2];
      softmax_visit(s, v, rows, alpha, plan, k_pos, t);
      // The wait for P(i-1) V(i-1) sits in a block of its own, after the softmax (ptxas schedules a wgmma wait at
      // the top of its basic block: in the softmax's block it would stop the softmax overlapping the product), under
      // a CTA-uniform condition (wgmma.wait_group is .aligned: one instruction for every warp of the warpgroup).
      if (has_prev) {
        wgmma_wait<0>();
        fence_regs(o);
        if (lane == 0) mbar_arrive(v_empty(prev_stage));
        // alpha is exactly 1 for a row whose max did not grow (most visits once the maxima settle): a warp with no
        // other skips the 64 multiplications.
        if (!__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) {
#pragma unroll
          for (int e = 0; e < 64; ++e) o[e] *= alpha[(e >> 1) & 1];
        }
      }
      fence_regs(pa);  // P(i-1) stays untouched until its product is done
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
        for (int e = 0; e < 4; ++e) pa[kk][e] = pack2<T>(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
      }
      has_prev = true;
      prev_stage = stage;
      prev_parity = parity;
    }
    if (has_prev) {
      mbar_wait(v_full(prev_stage), prev_parity);
      wgmma_fence();
      issue_pv(o, pa, prev_stage);
      wgmma_commit();
    }
    wgmma_wait<0>();  // unconditional: ptxas cannot tell that nothing is in flight on the path without visits
    fence_regs(o);
    fence_regs(pa);

    // Epilogue: normalise, write out (input dtype) and lse (natural log); empty rows give 0 and -inf.
    T* out_base = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
    float* lse_base = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = rows.sum[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int row = m0 + cw * 16 + g + 8 * r;
      if (row >= seqlen_q) continue;
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      T* out_row = out_base + row * p.o_row_stride;
#pragma unroll
      for (int db = 0; db < kD / 8; ++db) {
        *reinterpret_cast<uint32_t*>(out_row + db * 8 + 2 * t) =
            pack2<T>(o[4 * db + 2 * r] * inv, o[4 * db + 2 * r + 1] * inv);
      }
      if (t == 0) lse_base[row] = sum > 0.0f ? (rows.max[r] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
#endif
}

std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return "";
  return std::string("flash_fwd (sm_90a): ") + what + ": " + cudaGetErrorString(err);
}

// 1 when this build holds sm_90a code for the kernel and the current device runs it, else 0 (cached per kernel).
template <typename T>
bool sm90_available() {
  static const bool available = [] {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major != 9) {
      cudaGetLastError();
      return false;
    }
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, flash_fwd_sm90_kernel<T>) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attr.binaryVersion == 90;
  }();
  return available;
}

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

// cuTensorMapEncodeTiled, taken through the runtime so that the extension needs no link against libcuda; nullptr
// when the driver does not have it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
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

// Tensor map of a (batch, rows, heads, 128) tensor of 2-byte elements with the given element strides: boxes of
// 64 columns x 128 rows, 128-byte swizzle, rows past the end read as zeros. A stride of 0 (a dimension of size 1,
// see scaled_rope._cuda._stride) becomes a valid one that is never stepped on. Returns "" or an error message.
template <typename T>
std::string encode_tile_map(CUtensorMap* map, const char* name, const void* base, int64_t batch, int64_t rows,
                            int64_t heads, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return "flash_fwd (sm_90a): the CUDA driver has no cuTensorMapEncodeTiled";
  const cuuint64_t row_bytes = row_stride ? row_stride * 2 : kD * 2;
  const cuuint64_t head_bytes = head_stride ? head_stride * 2 : row_bytes * rows;
  const cuuint64_t batch_bytes = batch_stride ? batch_stride * 2 : head_bytes * heads;
  const cuuint64_t dims[4] = {kD, static_cast<cuuint64_t>(rows), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {row_bytes, head_bytes, batch_bytes};
  const cuuint32_t box[4] = {64, kBlockN, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(
      map, std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4,
      const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) {
    return std::string("flash_fwd (sm_90a): cannot build the tensor map of ") + name + " (CUresult " +
           std::to_string(static_cast<int>(result)) + ")";
  }
  return "";
}

template <typename T>
std::string launch_kernel(const FlashFwdParams& p, cudaStream_t stream) {
  static_assert(kBlockM == kBlockN, "one box shape serves the q and the k/v tiles");
  const bool rerope = p.rerope_window > 0, keys = p.seqlen_k > 0;
  TileMaps maps;
  std::string err = encode_tile_map<T>(&maps.q, "q", p.q, p.batch, p.seqlen_q, p.heads_q, p.q_batch_stride,
                                       p.q_row_stride, p.q_head_stride);
  if (err.empty() && rerope) {  // q_far is laid out with q's strides
    err = encode_tile_map<T>(&maps.q_far, "q_far", p.q_far, p.batch, p.seqlen_q, p.heads_q, p.q_batch_stride,
                             p.q_row_stride, p.q_head_stride);
  }
  if (err.empty() && keys) {
    err = encode_tile_map<T>(&maps.k, "k", p.k, p.batch, p.seqlen_k, p.heads_kv, p.k_batch_stride, p.k_row_stride,
                             p.k_head_stride);
  }
  if (err.empty() && keys) {
    err = encode_tile_map<T>(&maps.v, "v", p.v, p.batch, p.seqlen_k, p.heads_kv, p.v_batch_stride, p.v_row_stride,
                             p.v_head_stride);
  }
  if (err.empty() && keys && rerope) {
    err = encode_tile_map<T>(&maps.k_far, "k_far", p.k_far, p.batch, p.seqlen_k, p.heads_kv, p.k_far_batch_stride,
                             p.k_far_row_stride, p.k_far_head_stride);
  }
  if (!err.empty()) return err;
  // Maps the kernel never reads (no keys, no ReRoPE) are copies of a valid one.
  if (!rerope) maps.q_far = maps.q;
  if (!keys) maps.k = maps.v = maps.q;
  if (!keys || !rerope) maps.k_far = maps.k;

  const size_t smem = static_cast<size_t>((rerope ? 2 : 1) * kQBytes + kStages * 2 * kKVBytes + 1024);
  auto kernel = flash_fwd_sm90_kernel<T>;
  const cudaError_t attr_err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (attr_err != cudaSuccess) {
    cudaGetLastError();
    return std::string("flash_fwd (sm_90a): cannot reserve shared memory: ") + cudaGetErrorString(attr_err);
  }
  const int64_t num_q_tiles = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t blocks = num_q_tiles * p.batch * p.heads_q;
  if (blocks > INT_MAX) return "flash_fwd: batch * heads_q * ceil(seqlen_q / 128) is too large";
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(maps, p, static_cast<int>(num_q_tiles),
                                                                    l2_section_heads(p));
  return launch_error("attention kernel launch failed");
}

}  // namespace

std::string flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (p.head_dim != kD) return "";
  if (env_flag("SCALED_ROPE_FLASH_SM80")) return "";
  if (p.dtype == kFloat16) {
    if (!sm90_available<__half>()) return "";
    *launched = true;
    return launch_kernel<__half>(p, stream);
  }
  if (!sm90_available<__nv_bfloat16>()) return "";
  *launched = true;
  return launch_kernel<__nv_bfloat16>(p, stream);
}

}  // namespace flash
}  // namespace scaled_rope
