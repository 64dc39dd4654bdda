// FlashAttention backward for sm_90a (H100/H200) over rotated q and rotated or unrotated k (`rope`), head_dim 96 or
// 128: warp-specialised, with TMA and wgmma, in the manner of FlashAttention-3's backward. Semantics: csrc/flash_bwd.h.
//
// Tiles are 128 columns wide. For head_dim 96 the tensor maps are 96 columns wide, so TMA fills columns 96..127 of
// every Q, K, V and dO tile with zeros: they add nothing to S^T or dP^T, give zero columns of dV, dK and dQ, and the
// epilogues store the first 96.
//
// Three launches. (1) A preprocess kernel writes, per query row, the exponent scale c = softmax_scale log2(e) g(pos),
// lse in log2 units L (+inf on empty and padding rows, so that p = 2^(c s - L) = 0 there), the log-n factor g(pos)
// and Delta g, Delta = rowsum(dout * out) - dlse; it also zeroes dq_accum. (2) The main
// kernel takes one key tile of kBlockN = 128 keys of one (batch, kv head) per CTA (first key tiles first: under the
// causal mask they see the most queries) and walks the query tiles of kBlockM = 64 rows of every q head of the GQA
// group that can see them. (3) A small kernel converts dq_accum to dq in the input dtype. With `rope` (flash_bwd.h)
// the consumers rotate their key rows of K in shared memory before the first step, dK goes back through the
// rotation's transpose in shared memory at the end and (3) applies it to dq. The constant softmax_scale
// of dS is applied in float32 at the end (dK's epilogue, the conversion of dq), as the Triton backward does: folded
// into the 16-bit dS it would push small gradients ~11x further into float16's subnormal range.
//
// Main kernel: warpgroup 0 is the producer. Its warp 0 (one thread) loads K and V once and then, per step, Q, dO and
// the step's row info through a two-stage ring (TMA, mbarriers: full[stage] counts the bytes in, empty[stage] the
// consumer warps done with the stage); its warp 1 adds each step's dQ to dq_accum with one bulk reduce-add of the
// whole 32 KB tile from shared memory (cp.reduce.async.bulk, as FlashAttention-3 does: one instruction moves the tile
// in full 128-byte lines and the reduction runs in L2, where per-element red.global.add from the consumers would cost
// them 16 instructions a step and partial-line atomics). Warpgroups 1 and 2 are the consumers, 64 keys each, with
// setmaxnreg moving the producer's registers to them. A consumer step, all products m64 wgmma with fp32 accumulators:
//   S^T = K Q^T, dP^T = V dO^T            (A = K, V rows; B = Q, dO rows, K-major: both from shared memory)
//   P^T = 2^(c S^T - L), masked on tiles that need it; dS^T = P^T (g dP^T - g Delta) (softmax_scale comes later)
//   dV += P^T dO, dK += dS^T Q            (A = P^T, dS^T from registers: an m64 accumulator is an A fragment; B = dO,
//                                          Q read N-major through the transpose flag: no tile is ever transposed)
//   dQ = dS K                             (A = dS^T stored to shared memory and read M-major, B = K N-major; each
//                                          warpgroup computes 64 of the 128 columns over all 128 keys)
// dK and dV stay in registers for the CTA's whole life (2 x 64 per thread) and are written once at the end. dS^T has
// two shared buffers so that a warpgroup writing step i + 1's never meets the other still reading step i's; dQ has
// one, handed between consumers and the writer warp through named barriers.
#include "flash_bwd.h"
#include "flash_sm90.cuh"

#include <climits>
#include <cmath>
#include <string>

namespace scaled_rope {
namespace flash {
namespace {

using namespace sm90;

constexpr int kD = 128;  // tile columns (head_dim 96: the last 32 zero)
constexpr int kBlockM = kFlashBwdBlockM;  // query rows per step
constexpr int kBlockN = 128;              // keys per CTA: 64 per consumer warpgroup
constexpr int kStages = 2;                // Q / dO ring
constexpr int kThreads = 384;             // producer warpgroup + two consumer warpgroups
constexpr int kProducerRegs = 24;         // setmaxnreg: 128 * 24 + 256 * 240 = 64512 of the 65536 registers
constexpr int kConsumerRegs = 240;
constexpr int kConsumerWarps = 8;         // arrivals that free a stage: lane 0 of each consumer warp
constexpr int kConsumerThreads = 256;
constexpr int kWriterThreads = 32;        // warp 1: the dQ writer

// Shared memory, offsets from a 1024-byte aligned base (the period of the 128-byte swizzle). Tiles are 64-column
// blocks of 128-byte rows (flash_sm90.cuh).
constexpr int kKVBlock = kBlockN * 128;         // one 64-column block of K or V
constexpr int kKVBytes = 2 * kKVBlock;          // 32 KB each
constexpr int kQBlock = kBlockM * 128;          // one 64-column block of a Q or dO stage
constexpr int kQBytes = 2 * kQBlock;            // 16 KB a stage
constexpr int kDsBytes = kBlockN * kBlockM * 2;  // dS^T: 128 key rows of 64 queries (one 128-byte row each)
constexpr int kDqBytes = kBlockM * kD * 4;       // room for a step's float32 dQ, laid out as dq_accum_index says
constexpr int kRowInfoBytes = kBlockM * 16;      // per query row (c, L) then (g, Delta g): float2 x 64 each
constexpr int kRowInfoF4 = kRowInfoBytes / 16;   // float4s a stage
constexpr int kOffK = 0;
constexpr int kOffV = kOffK + kKVBytes;
constexpr int kOffQ = kOffV + kKVBytes;
constexpr int kOffDo = kOffQ + kStages * kQBytes;
constexpr int kOffDs = kOffDo + kStages * kQBytes;
constexpr int kOffDq = kOffDs + 2 * kDsBytes;
constexpr int kOffRowInfo = kOffDq + kDqBytes;
constexpr int kSmemBytes = kOffRowInfo + kStages * kRowInfoBytes + 1024;  // + the alignment slack
static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");  // 195 KB
static_assert(kD == 128 && kBlockM == 64 && kBlockN == 128, "the fragment and descriptor arithmetic below");

// Named barriers (0 is __syncthreads).
constexpr int kBarDs = 1;       // both consumer warpgroups' dS^T halves are in shared memory
constexpr int kBarDqFull = 2;   // consumers -> writer: the step's dQ is in shared memory
constexpr int kBarDqEmpty = 3;  // writer -> consumers: the dQ buffer may be written
constexpr int kBarKRotated = 4;  // + consumer warpgroup (4, 5): its 64 key rows of K (of dK at the end) are in place
constexpr int kBarEpilogue = 6;  // both consumer warpgroups are past their last read of K (rope: dK takes its buffer)

// Tensor maps (boxes of 64 columns x kBlockN rows for K, V, x kBlockM rows for Q, dO; 128-byte swizzle).
struct BwdMaps {
  CUtensorMap q, k, v, dout;
};

// Float index of dQ element (row, col) in a dq_accum tile (and in the shared dQ buffer) of `width` = head_dim columns:
// the two column halves apart (one per consumer warpgroup: 64 columns, then width - 64), a row of a half its columns'
// floats, the float pairs of a row XOR-swizzled by (row & 3) << 2. A consumer's float2 store covers 8 rows x 4 pairs
// a warp; the swizzle spreads them over all 32 banks twice for 256-byte rows, the minimum for 256 bytes. Pairs 2u,
// 2u + 1 stay adjacent, so 4 floats from a multiple of 4 are one float4. Dropping head_dim 96's zero columns keeps
// the workspace at the size of dq in float32.
__host__ __device__ constexpr int dq_half_floats(int half, int width) { return half ? width - 64 : 64; }
__host__ __device__ constexpr int dq_accum_index(int row, int col, int width) {
  return (col >> 6) * (kBlockM * 64) + row * dq_half_floats(col >> 6, width) +
         ((((col & 63) >> 1) ^ ((row & 3) << 2)) << 1) + (col & 1);
}

// The consumers' store addresses for dq_accum_index, from one per-thread base: thread (warp w, lane 4 g + t) of
// warpgroup `half` stores dQ rows 16 w + g + 8 r, columns 64 half + 8 nb + 2 t (+ 1) at byte
// (dq_thread_base(w, g, t, half, width) + 32 * dq_half_floats(half, width) * r) ^ (32 nb): base bits 5..6 are g & 3,
// so the XOR swizzles as above.
__host__ __device__ constexpr int dq_thread_base(int w, int g, int t, int half, int width) {
  return half * (kBlockM * 64 * 4) + (16 * w + g) * 4 * dq_half_floats(half, width) + 32 * (g & 3) + 8 * t;
}
constexpr bool dq_addressing_matches(int width) {
  for (int w = 0; w < 4; ++w)
    for (int lane = 0; lane < 32; ++lane)
      for (int half = 0; half < 2; ++half)
        for (int r = 0; r < 2; ++r)
          for (int nb = 0; nb < dq_half_floats(half, width) / 8; ++nb) {
            const int g = lane >> 2, t = lane & 3;
            const int bytes =
                (dq_thread_base(w, g, t, half, width) + 32 * dq_half_floats(half, width) * r) ^ (32 * nb);
            if (bytes != 4 * dq_accum_index(16 * w + g + 8 * r, 64 * half + 8 * nb + 2 * t, width)) return false;
          }
  return true;
}
static_assert(dq_addressing_matches(128) && dq_addressing_matches(96), "the consumers' dQ stores follow dq_accum_index");


__device__ __forceinline__ void st_shared_v2_f32(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}

// Query tiles [begin, end) of kBlockM rows that hold a row which may attend a key in [k_first, k_last], default
// positions (row i at q_offset + i): causal rows see no key past their position, windowed rows none at or below
// position - window.
__device__ __forceinline__ TileRange default_query_tiles(int k_first, int k_last, int q_offset, int n_tiles,
                                                         bool causal, int window) {
  TileRange range{0, n_tiles};
  if (causal) {
    const int64_t first_row = static_cast<int64_t>(k_first) - q_offset;
    if (first_row > 0) range.begin = static_cast<int>(min(first_row / kBlockM, static_cast<int64_t>(n_tiles)));
  }
  if (window) {
    const int64_t last_row = static_cast<int64_t>(k_last) + window - 1 - q_offset;
    range.end = last_row < 0 ? 0 : static_cast<int>(min(last_row / kBlockM + 1, static_cast<int64_t>(n_tiles)));
  }
  range.end = max(range.end, range.begin);
  return range;
}

// The query rows base + c that may attend `key` (key < seqlen_k; causal: q_offset + row >= key; window:
// q_offset + row - key < window): those with lo <= c < hi, clamped to [0, kBlockM]; lo > hi means none.
struct RowRange {
  int lo, hi;
};
__device__ __forceinline__ RowRange allowed_rows(int key, int base, int seqlen_k, int q_offset, bool causal,
                                                 int window) {
  if (key >= seqlen_k) return {0, 0};
  const int64_t at_key = static_cast<int64_t>(key) - q_offset - base;  // c of the row at position `key`
  int64_t lo = 0, hi = kBlockM;
  if (causal) lo = max(lo, at_key);
  if (window) hi = min(hi, at_key + window);
  return {static_cast<int>(min(lo, static_cast<int64_t>(kBlockM))), static_cast<int>(max(hi, int64_t{0}))};
}

// ---- preprocess: row info, dq_accum zeroed --------------------------------------------------------------------------
// One CTA of 256 threads per (batch, q head, query tile); 4 threads a row, head_dim / 4 elements each.
template <typename T>
__global__ void __launch_bounds__(256) flash_bwd_preprocess_kernel(const FlashBwdParams p, int n_query_tiles) {
  const int64_t tile = blockIdx.x;  // (b * heads_q + h) * n_query_tiles + query tile
  const int64_t bh = tile / n_query_tiles;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int m0 = static_cast<int>(tile % n_query_tiles) * kBlockM;

  const int width = static_cast<int>(p.head_dim);  // dq_accum columns
  float4* acc = reinterpret_cast<float4*>(p.dq_accum + tile * (kBlockM * width));
  for (int i = threadIdx.x; i < kBlockM * width / 4; i += blockDim.x) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  const int row = m0 + r;
  const bool valid = row < p.seqlen_q;
  float dot = 0.0f;
  if (valid) {
    const int per_part = static_cast<int>(p.head_dim) / 4;  // 32 or 24: whole 16-byte chunks
    const uint4* o = reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + b * p.o_batch_stride +
                                                    row * p.o_row_stride + h * p.o_head_stride + part * per_part);
    const uint4* d = reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + b * p.do_batch_stride +
                                                    row * p.do_row_stride + h * p.do_head_stride + part * per_part);
#pragma unroll 4
    for (int c = 0; c < per_part / 8; ++c) {
      const uint4 ov = o[c], dv = d[c];
      const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 of = unpack2<T>(ow[e]), df = unpack2<T>(dw[e]);
        dot = fmaf(of.x, df.x, fmaf(of.y, df.y, dot));
      }
    }
  }
  dot += __shfl_xor_sync(0xffffffffu, dot, 1);
  dot += __shfl_xor_sync(0xffffffffu, dot, 2);
  if (part != 0) return;
  float2 exponent{0.0f, INFINITY}, ds{0.0f, 0.0f};  // padding rows: p = 0 and dS = 0
  if (valid) {
    const int pos = static_cast<int>(p.seqlen_k - p.seqlen_q) + row;
    // g(pos) as the forward forms it (a position below 0 gives g = 1: fmaxf drops the NaN of logf)
    const float g = p.logn_base > 0.0f ? fmaxf(1.0f, logf(static_cast<float>(pos) + 1.0f) / logf(p.logn_base)) : 1.0f;
    const float lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row];
    const float dlse = p.dlse ? p.dlse[b * p.dlse_batch_stride + h * p.dlse_head_stride + row] : 0.0f;
    exponent = make_float2(p.softmax_scale * kLog2e * g, lse == -INFINITY ? INFINITY : lse * kLog2e);
    ds = make_float2(g, (dot - dlse) * g);
  }
  float2* info = reinterpret_cast<float2*>(p.row_info + tile * (kBlockM * 4));
  info[r] = exponent;
  info[kBlockM + r] = ds;
}

// ---- main kernel ----------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ BwdMaps maps, const FlashBwdParams p, int n_key_tiles,
                          int n_query_tiles, int section_heads) {
#ifdef SCALED_ROPE_SM90A
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 + 3 * kStages];  // k_full, v_full, q_full[S], do_full[S], empty[S]
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t sK = base + kOffK, sV = base + kOffV, sQ = base + kOffQ, sDo = base + kOffDo, sDs = base + kOffDs,
                 sDq = base + kOffDq, sRowInfo = base + kOffRowInfo;
  const uint32_t bar0 = smem_u32(bars);
  const uint32_t k_full = bar0, v_full = bar0 + 8u;
  auto q_full = [&](int s) { return bar0 + 8u * (2 + s); };
  auto do_full = [&](int s) { return bar0 + 8u * (2 + kStages + s); };
  auto empty = [&](int s) { return bar0 + 8u * (2 + 2 * kStages + s); };

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform by construction
  const int lane = tid % 32;
  const TileIndex tile = tile_order(blockIdx.x, n_key_tiles, p.batch * p.heads_kv, section_heads);
  const int64_t b = tile.bh / p.heads_kv;
  const int hk = static_cast<int>(tile.bh % p.heads_kv);
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int n0 = (n_key_tiles - 1 - tile.q_tile) * kBlockN;  // tile_order hands out the last tile first
  const int seqlen_q = static_cast<int>(p.seqlen_q), seqlen_k = static_cast<int>(p.seqlen_k);
  const int q_offset = seqlen_k - seqlen_q;  // query row i sits at position q_offset + i
  const int k_last = min(n0 + kBlockN, seqlen_k) - 1;
  const int window = p.window > 0 ? static_cast<int>(min(p.window, static_cast<int64_t>(INT_MAX))) : 0;
  const TileRange range = default_query_tiles(n0, k_last, q_offset, n_query_tiles, p.causal, window);
  const int steps = group * (range.end - range.begin);  // the same count for every role

  if (tid == 0) {
    mbar_init(k_full, 1);
    mbar_init(v_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(q_full(s), 1);
      mbar_init(do_full(s), 1);
      mbar_init(empty(s), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    regs_dec<kProducerRegs>();
    const int warp = tid / 32;
    if (steps > 0 && warp == 0) {  // ---- loads ----
      if (lane != 0) return;
      const int bi = static_cast<int>(b);
      mbar_expect_tx(k_full, kKVBytes);
      mbar_expect_tx(v_full, kKVBytes);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        tma_load(sK + c * kKVBlock, maps.k, k_full, c * 64, n0, hk, bi);
        tma_load(sV + c * kKVBlock, maps.v, v_full, c * 64, n0, hk, bi);
      }
      int it = 0;
      for (int gh = 0; gh < group; ++gh) {
        const int h = hk * group + gh;
        const float* info_head = p.row_info + (b * p.heads_q + h) * n_query_tiles * (kBlockM * 4);
        for (int mt = range.begin; mt < range.end; ++mt, ++it) {
          const int s = it % kStages;
          mbar_wait(empty(s), ((it / kStages) & 1) ^ 1);  // the first round finds every stage free
          mbar_expect_tx(q_full(s), kQBytes + kRowInfoBytes);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            tma_load(sQ + s * kQBytes + c * kQBlock, maps.q, q_full(s), c * 64, mt * kBlockM, h, bi);
          }
          bulk_load(sRowInfo + s * kRowInfoBytes, info_head + static_cast<int64_t>(mt) * (kBlockM * 4), kRowInfoBytes,
                    q_full(s));
          mbar_expect_tx(do_full(s), kQBytes);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            tma_load(sDo + s * kQBytes + c * kQBlock, maps.dout, do_full(s), c * 64, mt * kBlockM, h, bi);
          }
        }
      }
    } else if (steps > 0 && warp == 1) {  // ---- dQ writer ----
      barrier_arrive(kBarDqEmpty, kConsumerThreads + kWriterThreads);  // the buffer starts free
      const int tile_floats = kBlockM * static_cast<int>(p.head_dim);
      int it = 0;
      for (int gh = 0; gh < group; ++gh) {
        float* dq_head = p.dq_accum + (b * p.heads_q + hk * group + gh) * n_query_tiles * tile_floats;
        for (int mt = range.begin; mt < range.end; ++mt) {
          barrier_sync(kBarDqFull, kConsumerThreads + kWriterThreads);
          if (lane == 0) {
            bulk_reduce_add_f32(dq_head + static_cast<int64_t>(mt) * tile_floats, sDq, tile_floats * 4);
            bulk_commit();
            bulk_wait_read<0>();
          }
          __syncwarp();
          if (++it < steps) barrier_arrive(kBarDqEmpty, kConsumerThreads + kWriterThreads);
        }
      }
      if (lane == 0) bulk_wait<0>();
    }
  } else {  // ---- consumers ----
    regs_inc<kConsumerRegs>();
    const int wgc = wg - 1;           // keys n0 + 64 wgc .. n0 + 64 wgc + 63
    const int w = (tid / 32) % 4;     // warp w of the warpgroup holds rows 16 w .. 16 w + 15 of its m64 products
    const int g = lane >> 2, t = lane & 3;
    const int key_row = 64 * wgc + 16 * w + g;  // this thread's key rows in the tile: key_row and key_row + 8
    float dk[64], dv[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) dk[i] = dv[i] = 0.0f;

    if (steps > 0) {
      // Descriptors of stage 0 and the first k step; the loops add byte offsets.
      const uint64_t k_desc = smem_desc(sK + wgc * 64 * 128, 16, 1024);  // A of S^T: this warpgroup's 64 key rows
      const uint64_t v_desc = smem_desc(sV + wgc * 64 * 128, 16, 1024);  // A of dP^T
      const uint64_t q_desc = smem_desc(sQ, 16, 1024);                   // B of S^T: query rows, K-major
      const uint64_t do_desc = smem_desc(sDo, 16, 1024);                 // B of dP^T
      const uint64_t q_n_desc = smem_desc(sQ, kQBlock, 1024);            // B of dK: Q read N-major
      const uint64_t do_n_desc = smem_desc(sDo, kQBlock, 1024);          // B of dV
      const uint64_t ds_desc = smem_desc(sDs, kDsBytes, 1024);           // A of dQ: dS^T read M-major (one atom wide)
      const uint64_t kn_desc = smem_desc(sK + wgc * kKVBlock, kKVBlock, 1024);  // B of dQ: this warpgroup's 64
                                                                                // columns of K, N-major
      const float4* row_info = reinterpret_cast<const float4*>(smem_raw + (sRowInfo - raw));
      // Per-thread store bases: dS^T row key_row (+ 8) with chunk c at (base ^ (c << 4)) (+ 1024), bits 4..6 of the
      // base being (key_row & 7) = g; dQ as dq_thread_base says.
      const uint32_t ds_base = sDs + key_row * 128 + (g << 4) + 4 * t;
      const int width = static_cast<int>(p.head_dim);
      const uint32_t dq_base = sDq + dq_thread_base(w, g, t, wgc, width);
      mbar_wait(k_full, 0);
      mbar_wait(v_full, 0);
      if (p.rope.turns != nullptr) {  // k came unrotated: each warpgroup rotates its 64 key rows in place
        rotate_tile_rows<T>(sK, kBlockN, 64 * wgc, 64, seqlen_k - n0, p.rope, b, n0, nullptr, 1.0f, width,
                            tid - 128 * wg, 128);
        fence_proxy_async();
        barrier_sync(kBarKRotated + wgc, 128);  // its own rows before its S^T; the other's before dQ (kBarDs)
      }

      int mt = range.begin;  // query tile of step it; the q head only matters to the producer and the writer
      for (int it = 0; it < steps; ++it) {
        const int s = it % kStages;
        const uint32_t parity = (it / kStages) & 1;
        const int m0 = mt * kBlockM;
        // Both waits come before the products: a wait loop between two wgmma groups makes ptxas fence them apart.
        mbar_wait(q_full(s), parity);
        mbar_wait(do_full(s), parity);
        float st[32], dpt[32];  // S^T and dP^T: key rows key_row (+ 8), query columns 8 nb + 2 t (+ 1)
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          const uint32_t a_off = (kk >> 2) * kKVBlock + (kk & 3) * 32;
          const uint32_t b_off = s * kQBytes + (kk >> 2) * kQBlock + (kk & 3) * 32;
          wgmma_ss<T>(st, desc_plus(k_desc, a_off), desc_plus(q_desc, b_off), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          const uint32_t a_off = (kk >> 2) * kKVBlock + (kk & 3) * 32;
          const uint32_t b_off = s * kQBytes + (kk >> 2) * kQBlock + (kk & 3) * 32;
          wgmma_ss<T>(dpt, desc_plus(v_desc, a_off), desc_plus(do_desc, b_off), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_regs(st);

        // P^T = 2^(c s - L) per query column (c, L of columns 8 nb + 2 t and + 1 in one float4).
        const float4* exponent = row_info + s * kRowInfoF4 + t;
#pragma unroll
        for (int nb = 0; nb < kBlockM / 8; ++nb) {
          const float4 cl = exponent[4 * nb];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            st[4 * nb + 2 * r] = ex2(fmaf(st[4 * nb + 2 * r], cl.x, -cl.y));
            st[4 * nb + 2 * r + 1] = ex2(fmaf(st[4 * nb + 2 * r + 1], cl.z, -cl.w));
          }
        }
        const int q_last = q_offset + min(m0 + kBlockM, seqlen_q) - 1;
        if (classify_span(q_offset + m0, q_last, n0, k_last, n0 + kBlockN > seqlen_k, p.causal, window, 0)
                .elementwise) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const RowRange rows =
                allowed_rows(n0 + key_row + 8 * r, m0 + 2 * t, seqlen_k, q_offset, p.causal, window);
#pragma unroll
            for (int nb = 0; nb < kBlockM / 8; ++nb) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int c = 8 * nb + e;
                if (c < rows.lo || c >= rows.hi) st[4 * nb + 2 * r + e] = 0.0f;
              }
            }
          }
        }
        uint32_t pa[kBlockM / 16][4];  // P^T as A fragments: k step kk holds query columns 16 kk .. 16 kk + 15
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
          for (int e = 0; e < 4; ++e) pa[kk][e] = pack2<T>(st[8 * kk + 2 * e], st[8 * kk + 2 * e + 1]);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
          wgmma_rs<T>(dv, pa[kk], desc_plus(do_n_desc, s * kQBytes + kk * 16 * 128), 1);
        }
        wgmma_commit();
        wgmma_wait<1>();  // dP^T done (dV may still run)
        fence_regs(dpt);

        // dS^T = P^T (g dP^T - g Delta) in place of dP^T, (g, g Delta) of columns 8 nb + 2 t and + 1 in one float4.
        const float4* scale = row_info + s * kRowInfoF4 + kRowInfoF4 / 2 + t;
#pragma unroll
        for (int nb = 0; nb < kBlockM / 8; ++nb) {
          const float4 ed = scale[4 * nb];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            dpt[4 * nb + 2 * r] = st[4 * nb + 2 * r] * fmaf(dpt[4 * nb + 2 * r], ed.x, -ed.y);
            dpt[4 * nb + 2 * r + 1] = st[4 * nb + 2 * r + 1] * fmaf(dpt[4 * nb + 2 * r + 1], ed.z, -ed.w);
          }
        }
        uint32_t dsa[kBlockM / 16][4];
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dsa[kk][e] = pack2<T>(dpt[8 * kk + 2 * e], dpt[8 * kk + 2 * e + 1]);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
          wgmma_rs<T>(dk, dsa[kk], desc_plus(q_n_desc, s * kQBytes + kk * 16 * 128), 1);
        }
        wgmma_commit();

        // dS^T into this step's buffer: key rows of 64 queries, 16-byte chunks swizzled by (row & 7). A fragment
        // register e of k step kk holds key row key_row + 8 (e & 1), queries 16 kk + 8 (e >> 1) + 2 t (+ 1).
        const uint32_t ds_thread = ds_base + (it & 1) * kDsBytes;
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            st_shared_b32((ds_thread ^ ((2 * kk + (e >> 1)) << 4)) + 1024 * (e & 1), dsa[kk][e]);
          }
        }
        fence_proxy_async();
        barrier_sync(kBarDs, kConsumerThreads);

        float dq[32];  // dQ rows 16 w + g (+ 8), columns 64 wgc + 8 nb + 2 t (+ 1)
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          wgmma_ss<T, 1, 1>(dq, desc_plus(ds_desc, (it & 1) * kDsBytes + kk * 16 * 128),
                            desc_plus(kn_desc, kk * 16 * 128), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(dq);
        fence_regs(dk);
        fence_regs(dv);
        fence_regs(pa);
        fence_regs(dsa);
        if (lane == 0) mbar_arrive(empty(s));  // Q, dO and the row info of stage s are read

        barrier_sync(kBarDqEmpty, kConsumerThreads + kWriterThreads);
#pragma unroll
        for (int nb = 0; nb < kD / 2 / 8; ++nb) {
          // head_dim 96: the second half's last 32 columns are zero and not kept (read from the parameters here,
          // not held in registers across the loop: that spilled)
          const int half_floats = dq_half_floats(wgc, static_cast<int>(p.head_dim));
          if (nb >= half_floats / 8) break;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            st_shared_v2_f32((dq_base + 32 * half_floats * r) ^ (32 * nb), dq[4 * nb + 2 * r], dq[4 * nb + 2 * r + 1]);
          }
        }
        fence_proxy_async();
        barrier_arrive(kBarDqFull, kConsumerThreads + kWriterThreads);
        if (++mt == range.end) mt = range.begin;  // the next q head of the group
      }
    }

    // Epilogue: dK (times softmax_scale) and dV rows key_row (+ 8) of the tile, columns 8 db + 2 t (+ 1), in the
    // input dtype. With rope, dK goes through shared memory: K's buffer takes it once both warpgroups are past their
    // last dQ product (which reads all 128 keys), each warpgroup applies the rotation's transpose to its 64 rows there
    // (rotate_tile_rows) and stores them in 16-byte chunks.
    const bool dk_via_shared = p.rope.turns != nullptr && steps > 0;
    if (dk_via_shared) {
      barrier_sync(kBarEpilogue, kConsumerThreads);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int db = 0; db < kD / 8; ++db) {
          st_shared_b32(tile_word(sK, kBlockN, key_row + 8 * r, db * 8 + 2 * t),
                        pack2<T>(dk[4 * db + 2 * r] * p.softmax_scale, dk[4 * db + 2 * r + 1] * p.softmax_scale));
        }
      }
      barrier_sync(kBarKRotated + wgc, 128);
      rotate_tile_rows<T, true>(sK, kBlockN, 64 * wgc, 64, seqlen_k - n0, p.rope, b, n0, nullptr, 1.0f,
                                static_cast<int>(p.head_dim), tid - 128 * wg, 128);
      barrier_sync(kBarKRotated + wgc, 128);
      T* dk_tile = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
      const int chunks = static_cast<int>(p.head_dim) / 8;
      const int rows = min(64, seqlen_k - n0 - 64 * wgc);
      for (int u = tid - 128 * wg; u < rows * chunks; u += 128) {
        const int row = 64 * wgc + u / chunks, c = u % chunks;
        *reinterpret_cast<uint4*>(dk_tile + static_cast<int64_t>(n0 + row) * p.dk_row_stride + 8 * c) =
            ld_shared_v4(tile_chunk(sK, kBlockN, row, c));
      }
    }
    const float scale = p.softmax_scale;
    T* dk_base = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
    T* dv_base = static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = n0 + key_row + 8 * r;
      if (key >= seqlen_k) continue;
      T* dk_row = dk_base + key * p.dk_row_stride;
      T* dv_row = dv_base + key * p.dv_row_stride;
#pragma unroll
      for (int db = 0; db < kD / 8; ++db) {
        if (db * 8 >= p.head_dim) break;
        if (!dk_via_shared) {
          *reinterpret_cast<uint32_t*>(dk_row + db * 8 + 2 * t) =
              pack2<T>(dk[4 * db + 2 * r] * scale, dk[4 * db + 2 * r + 1] * scale);
        }
        *reinterpret_cast<uint32_t*>(dv_row + db * 8 + 2 * t) = pack2<T>(dv[4 * db + 2 * r], dv[4 * db + 2 * r + 1]);
      }
    }
  }
#endif
}

// ---- dq_accum -> dq ---------------------------------------------------------------------------------------------
// dq = q_sign * softmax_scale * dq_accum in the input dtype, with rope through the rotation's transpose at the query
// positions. One CTA of 256 threads per (batch, q head, query tile); a thread takes a unit of a row at a time: in the
// rotated columns, 4 pairs (a float4 and its partner float4 R/2 columns on in the half layout, one float4 of 2 pairs
// interleaved), then the pass-through float4s.
template <typename T>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_kernel(const FlashBwdParams p, int n_query_tiles) {
  const int64_t tile = blockIdx.x;
  const int64_t bh = tile / n_query_tiles;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int m0 = static_cast<int>(tile % n_query_tiles) * kBlockM;
  const int width = static_cast<int>(p.head_dim);
  const float* acc = p.dq_accum + tile * (kBlockM * width);
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
  const bool rope = p.rope.turns != nullptr;
  const bool interleaved = rope && p.rope.interleaved;
  const int rotary_dim = rope ? static_cast<int>(p.rope.rotary_dim) : 0;
  const int rot_units = interleaved ? rotary_dim / 4 : rotary_dim / 8;
  const int units = rot_units + (width - rotary_dim) / 4;
  const float scale = p.softmax_scale * p.q_sign;
  auto load = [&](int r, int col) {
    const float4 x = *reinterpret_cast<const float4*>(acc + dq_accum_index(r, col, width));
    return make_float4(x.x * scale, x.y * scale, x.z * scale, x.w * scale);
  };
  auto store = [&](T* at, float4 x) {
    *reinterpret_cast<uint2*>(at) = make_uint2(pack2<T>(x.x, x.y), pack2<T>(x.z, x.w));
  };
  for (int f = threadIdx.x; f < kBlockM * units; f += blockDim.x) {
    const int r = f / units, u = f % units;
    const int64_t row = m0 + r;
    if (row >= p.seqlen_q) break;  // rows only grow with f
    T* dq_row = dq + row * p.dq_row_stride;
    const int64_t pos = p.seqlen_k - p.seqlen_q + row;
    if (u >= rot_units) {
      const int col = rotary_dim + 4 * (u - rot_units);
      store(dq_row + col, load(r, col));
    } else if (interleaved) {
      const int col = 4 * u;  // pairs 2 u, 2 u + 1
      const float4 x = load(r, col);
      const float2 a = rope_apply<true>(x.x, x.y, rope_cos_sin(p.rope, b, pos, 2 * u));
      const float2 c = rope_apply<true>(x.z, x.w, rope_cos_sin(p.rope, b, pos, 2 * u + 1));
      store(dq_row + col, make_float4(a.x, a.y, c.x, c.y));
    } else {
      const int col = 4 * u, partner = col + rotary_dim / 2;  // pairs col .. col + 3
      const float4 x = load(r, col), y = load(r, partner);
      const float2 p0 = rope_apply<true>(x.x, y.x, rope_cos_sin(p.rope, b, pos, col));
      const float2 p1 = rope_apply<true>(x.y, y.y, rope_cos_sin(p.rope, b, pos, col + 1));
      const float2 p2 = rope_apply<true>(x.z, y.z, rope_cos_sin(p.rope, b, pos, col + 2));
      const float2 p3 = rope_apply<true>(x.w, y.w, rope_cos_sin(p.rope, b, pos, col + 3));
      store(dq_row + col, make_float4(p0.x, p1.x, p2.x, p3.x));
      store(dq_row + partner, make_float4(p0.y, p1.y, p2.y, p3.y));
    }
  }
}

std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return "";
  return std::string("flash_bwd: ") + what + ": " + cudaGetErrorString(err);
}

template <typename T>
std::string launch(const FlashBwdParams& p, cudaStream_t stream) {
  auto kernel = flash_bwd_sm90_kernel<T>;
  if (!has_sm90a_code<flash_bwd_sm90_kernel<T>>()) {
    return "flash_bwd: needs a compute capability 9.x device and an extension built with sm_90a "
           "(SCALED_ROPE_CUDA_ARCHS)";
  }
  const int64_t n_query_tiles = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t n_key_tiles = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int64_t q_blocks = p.batch * p.heads_q * n_query_tiles;
  const int64_t kv_blocks = p.batch * p.heads_kv * n_key_tiles;
  if (q_blocks > INT_MAX || kv_blocks > INT_MAX) return "flash_bwd: batch * heads * tiles is too large";
  const int nq_tiles = static_cast<int>(n_query_tiles);

  if (q_blocks > 0) {
    flash_bwd_preprocess_kernel<T><<<static_cast<unsigned>(q_blocks), 256, 0, stream>>>(p, nq_tiles);
    const std::string err = launch_error("preprocess kernel launch failed");
    if (!err.empty()) return err;
  }
  if (kv_blocks > 0) {
    constexpr const char* kWho = "flash_bwd";
    BwdMaps maps;
    std::string err = encode_tile_map<T>(&maps.k, kWho, "k", p.k, p.batch, p.seqlen_k, p.heads_kv, p.head_dim,
                                         p.k_batch_stride, p.k_row_stride, p.k_head_stride, kBlockN);
    if (err.empty()) {
      err = encode_tile_map<T>(&maps.v, kWho, "v", p.v, p.batch, p.seqlen_k, p.heads_kv, p.head_dim,
                               p.v_batch_stride, p.v_row_stride, p.v_head_stride, kBlockN);
    }
    if (err.empty() && p.seqlen_q > 0) {
      err = encode_tile_map<T>(&maps.q, kWho, "q", p.q, p.batch, p.seqlen_q, p.heads_q, p.head_dim,
                               p.q_batch_stride, p.q_row_stride, p.q_head_stride, kBlockM);
    }
    if (err.empty() && p.seqlen_q > 0) {
      err = encode_tile_map<T>(&maps.dout, kWho, "dout", p.dout, p.batch, p.seqlen_q, p.heads_q, p.head_dim,
                               p.do_batch_stride, p.do_row_stride, p.do_head_stride, kBlockM);
    }
    if (!err.empty()) return err;
    if (p.seqlen_q == 0) maps.q = maps.dout = maps.k;  // never read: no query tile to visit

    const cudaError_t attr_err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (attr_err != cudaSuccess) {
      cudaGetLastError();
      return std::string("flash_bwd: cannot reserve shared memory: ") + cudaGetErrorString(attr_err);
    }
    // L2 sections of (batch, kv head): the CTAs running at once stream the Q and dO of a few heads' groups.
    const int64_t group = p.heads_q / p.heads_kv;
    const int section = l2_section_heads(p.batch * p.heads_kv, p.seqlen_q * kD * 2 * 2 * group, 1);
    kernel<<<static_cast<unsigned>(kv_blocks), kThreads, kSmemBytes, stream>>>(
        maps, p, static_cast<int>(n_key_tiles), nq_tiles, section);
    err = launch_error("main kernel launch failed");
    if (!err.empty()) return err;
  }
  if (q_blocks > 0) {
    flash_bwd_convert_dq_kernel<T><<<static_cast<unsigned>(q_blocks), 256, 0, stream>>>(p, nq_tiles);
    return launch_error("dq conversion kernel launch failed");
  }
  return "";
}

bool aligned(const void* ptr, int bytes, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % bytes != 0) return false;
  for (int64_t s : strides) {
    if ((s * 2) % bytes != 0) return false;
  }
  return true;
}

}  // namespace
}  // namespace flash

std::string flash_bwd(const FlashBwdParams& p, cudaStream_t stream) {
  using flash::aligned;
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) return "flash_bwd: dtype must be float16 or bfloat16";
  if (p.head_dim != 96 && p.head_dim != 128) {
    return "flash_bwd: head_dim " + std::to_string(p.head_dim) + " is not supported (96 or 128)";
  }
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.heads_q < 0 || p.heads_kv <= 0) {
    return "flash_bwd: invalid sizes";
  }
  if (p.heads_q % p.heads_kv != 0) return "flash_bwd: heads_q must be a multiple of heads_kv";
  if (p.seqlen_q >= INT_MAX / 2 || p.seqlen_k >= INT_MAX / 2) return "flash_bwd: sequence too long";
  if (!(p.softmax_scale > 0)) return "flash_bwd: softmax_scale must be > 0 (the Python side folds its sign into q)";
  if (p.window < 0) return "flash_bwd: window must be >= 0 (0: none)";
  if (p.batch == 0 || p.heads_q == 0) return "";
  const bool queries = p.seqlen_q > 0, keys = p.seqlen_k > 0;
  if ((queries && (!p.q || !p.out || !p.dout || !p.lse || !p.dq || !p.dq_accum || !p.row_info)) ||
      (keys && (!p.k || !p.v || !p.dk || !p.dv))) {
    return "flash_bwd: missing pointer";
  }
  if (!aligned(p.q, 16, {p.q_batch_stride, p.q_row_stride, p.q_head_stride}) ||
      !aligned(p.k, 16, {p.k_batch_stride, p.k_row_stride, p.k_head_stride}) ||
      !aligned(p.v, 16, {p.v_batch_stride, p.v_row_stride, p.v_head_stride}) ||
      !aligned(p.out, 16, {p.o_batch_stride, p.o_row_stride, p.o_head_stride}) ||
      !aligned(p.dout, 16, {p.do_batch_stride, p.do_row_stride, p.do_head_stride})) {
    return "flash_bwd: q, k, v, out and dout need 16-byte aligned rows (pointers, strides multiple of 8)";
  }
  if (!aligned(p.dq, 8, {p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride}) ||
      !aligned(p.dk, 4, {p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride}) ||
      !aligned(p.dv, 4, {p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride})) {
    return "flash_bwd: dq needs 8-byte aligned groups of 4 (strides multiple of 4), dk and dv 4-byte aligned pairs";
  }
  if (!aligned(p.dq_accum, 16, {}) || !aligned(p.row_info, 16, {})) {
    return "flash_bwd: the workspaces need 16-byte alignment";
  }
  if (p.q_sign != 1.0f && p.q_sign != -1.0f) return "flash_bwd: q_sign must be 1 or -1";
  if (p.rope.turns != nullptr) {
    const std::string err = check_rope(p.rope, p.head_dim, "flash_bwd: rope");
    if (!err.empty()) return err;
    if (!aligned(p.dk, 16, {p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride})) {
      return "flash_bwd: with rope, dk needs 16-byte aligned rows (its 16-byte stores)";
    }
  }
  return p.dtype == kFloat16 ? flash::launch<__half>(p, stream) : flash::launch<__nv_bfloat16>(p, stream);
}

}  // namespace scaled_rope
