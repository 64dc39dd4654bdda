// FlashAttention forward for sm_90a (H100/H200) over rotated k and rotated or unrotated q, head_dim 64, 96 or 128:
// warp-specialised, with the tensor memory accelerator (TMA) and warpgroup MMA (wgmma). Semantics as csrc/flash_fwd.h;
// csrc/flash_fwd.cu launches this kernel where it applies and the sm_80 one otherwise.
//
// Tiles are kD = 64 or 128 columns wide. head_dim 96 runs the kD = 128 kernel: its tensor maps are 96 columns wide,
// so TMA fills columns 96..127 of every tile with zeros; they add nothing to Q K^T, give zero columns of P V, and the
// epilogue stores the first 96 (a quarter of the tensor-core work is spent on the zeros, none of the softmax).
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
// With q_rope (flash_fwd.h) q arrives unrotated and each consumer warpgroup rotates its 64 rows of the Q tile in shared
// memory before its first product (csrc/rope_device.cuh). Measured on an H100 it costs ~3 us a tile, about what the
// rotation pass over q that it replaces costs (bench/NOTES.md, CUDA backward v2); it saves q's scratch copy.
//
// Tile classification is that of the sm_80 kernel: skipped, unmasked or masked tiles; for ReRoPE the near pair, the
// far pair, or (straddling the window) two visits of the tile, far keys with (q_far, k_far) and near keys with
// (q, k), each masked to its keys. A visit loads its own K (near or far) and V, so a stage holds one K; q and q_far
// both stay in shared memory and each visit picks its pair.
#include "flash_sm90.cuh"

#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>

namespace scaled_rope {
namespace flash {
namespace {

using namespace sm90;

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kNB = kBlockN / 8;            // n8 blocks of S per thread row
static_assert(kNB * 8 == kBlockN && kBlockN % kFlashBlockN == 0, "key tiles of whole n8 blocks and prepass tiles");
constexpr int kPrepassTiles = kBlockN / kFlashBlockN;  // key tiles of the (min, max) prepass per key tile
// Bytes of a Q tile and of one K or V stage, kD (64 or 128) columns wide.
template <int kD>
constexpr int kQTileBytes = kBlockM * kD * 2;
template <int kD>
constexpr int kKVStageBytes = kBlockN * kD * 2;

// ---- visits, masks, softmax --------------------------------------------------------------------------------------
// Keys allowed for a query at position pos where key positions are the columns (docs/DESIGN.md §3.3: col < seqlen_k,
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

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ TileMaps maps, const FlashFwdParams p, int num_q_tiles,
                             int section_heads) {
#ifdef SCALED_ROPE_SM90A
  static_assert(kD == 64 || kD == 128, "tiles of one or two 64-column blocks");
  constexpr int S = kStages;
  constexpr int kQBytes = kQTileBytes<kD>, kKVBytes = kKVStageBytes<kD>;
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
    auto issue_pv = [&](float (&o)[kD / 2], const uint32_t (&pa)[kBlockN / 16][4], int stage) {
      const uint64_t vd = desc_plus(v_desc, stage * kKVBytes);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) wgmma_rs<T>(o, pa[kk], desc_plus(vd, kk * 16 * 128), 1);
    };

    float o[kD / 2];  // O rows as an m64 x kD accumulator
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) o[i] = 0.0f;
    uint32_t pa[kBlockN / 16][4];
    mbar_wait(q_full, 0);
    if (p.q_rope.turns != nullptr) {  // q came unrotated: each warpgroup rotates its 64 rows in place
      const int32_t* q_pos = p.q_positions ? p.q_positions + b * p.q_positions_batch_stride + m0 : nullptr;
      rotate_tile_rows<T>(sQ, kBlockM, 64 * wgc, 64, seqlen_q - m0, p.q_rope, b, seqlen_k - seqlen_q + m0, q_pos,
                          p.q_rope_sign, static_cast<int>(p.head_dim), tid - 128 * wg, 128);
      fence_proxy_async();
      barrier_sync(1 + wgc, 128);  // the warpgroup's stores before its wgmma reads
    }

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
          for (int e = 0; e < kD / 2; ++e) o[e] *= alpha[(e >> 1) & 1];
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

    // Epilogue: normalise, write out (input dtype; the first head_dim columns) and lse (natural log); empty rows give 0
    // and -inf.
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
        if (db * 8 >= p.head_dim) break;
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

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

template <typename T, int kD>
std::string launch_kernel(const FlashFwdParams& p, cudaStream_t stream) {
  constexpr int kQBytes = kQTileBytes<kD>, kKVBytes = kKVStageBytes<kD>;
  const bool rerope = p.rerope_window > 0, keys = p.seqlen_k > 0;
  TileMaps maps;
  constexpr const char* kWho = "flash_fwd (sm_90a)";
  std::string err = encode_tile_map<T>(&maps.q, kWho, "q", p.q, p.batch, p.seqlen_q, p.heads_q, p.head_dim,
                                       p.q_batch_stride, p.q_row_stride, p.q_head_stride, kBlockM);
  if (err.empty() && rerope) {  // q_far is laid out with q's strides
    err = encode_tile_map<T>(&maps.q_far, kWho, "q_far", p.q_far, p.batch, p.seqlen_q, p.heads_q, p.head_dim,
                             p.q_batch_stride, p.q_row_stride, p.q_head_stride, kBlockM);
  }
  if (err.empty() && keys) {
    err = encode_tile_map<T>(&maps.k, kWho, "k", p.k, p.batch, p.seqlen_k, p.heads_kv, p.head_dim,
                             p.k_batch_stride, p.k_row_stride, p.k_head_stride, kBlockN);
  }
  if (err.empty() && keys) {
    err = encode_tile_map<T>(&maps.v, kWho, "v", p.v, p.batch, p.seqlen_k, p.heads_kv, p.head_dim,
                             p.v_batch_stride, p.v_row_stride, p.v_head_stride, kBlockN);
  }
  if (err.empty() && keys && rerope) {
    err = encode_tile_map<T>(&maps.k_far, kWho, "k_far", p.k_far, p.batch, p.seqlen_k, p.heads_kv, p.head_dim,
                             p.k_far_batch_stride, p.k_far_row_stride, p.k_far_head_stride, kBlockN);
  }
  if (!err.empty()) return err;
  // Maps the kernel never reads (no keys, no ReRoPE) are copies of a valid one.
  if (!rerope) maps.q_far = maps.q;
  if (!keys) maps.k = maps.v = maps.q;
  if (!keys || !rerope) maps.k_far = maps.k;

  const size_t smem = static_cast<size_t>((rerope ? 2 : 1) * kQBytes + kStages * 2 * kKVBytes + 1024);
  auto kernel = flash_fwd_sm90_kernel<T, kD>;
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

template <typename T, int kD>
std::string try_launch_dim(const FlashFwdParams& p, cudaStream_t stream, bool* launched) {
  if (!has_sm90a_code<flash_fwd_sm90_kernel<T, kD>>()) return "";
  *launched = true;
  return launch_kernel<T, kD>(p, stream);
}

template <typename T>
std::string try_launch(const FlashFwdParams& p, cudaStream_t stream, bool* launched) {
  return p.head_dim == 64 ? try_launch_dim<T, 64>(p, stream, launched)
                          : try_launch_dim<T, 128>(p, stream, launched);
}

}  // namespace

std::string flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (p.head_dim != 64 && p.head_dim != 96 && p.head_dim != 128) return "";
  if (env_flag("SCALED_ROPE_FLASH_SM80")) return "";
  return p.dtype == kFloat16 ? try_launch<__half>(p, stream, launched)
                             : try_launch<__nv_bfloat16>(p, stream, launched);
}

}  // namespace flash
}  // namespace scaled_rope
