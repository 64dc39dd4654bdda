// FlashAttention-2 style forward for sm_80+ over already rotated q and k (see flash_fwd.h for the semantics).
//
// One CTA of 4 warps takes a tile of kBlockM = 128 query rows of one (batch, q head); warp w owns rows 32w..32w+31
// as two m16 tiles, so every K and V fragment read from shared memory feeds two mma.sync (half the shared-memory
// traffic per FLOP of 16 rows per warp) and every key tile fetched from L2 serves 128 queries. Keys stream through
// shared memory in tiles of kBlockN = 64 rows: K(j) and V(j) each have one buffer, loaded with cp.async so that
// V(j) arrives while S = Q K(j)^T is computed and K(j+1) arrives while O += P V(j) is computed. CTAs are numbered
// heaviest query tile first over all heads (causal work grows with the tile index), so the last wave is light.
// S and O live in registers as mma.sync.m16n8k16 accumulators (fp32); the online softmax works in log2 units with
// log2(e) folded into the per-row scale, so exponentials are single ex2.approx instructions. Shared tiles are
// rows of D halves with 16-byte chunks XOR-swizzled by (row & 7), which makes ldmatrix conflict-free.
//
// Every key tile is classified from the (min, max) positions of the query tile and of the key tile: skipped when
// no pair is allowed (causal, window), processed without per-element masks when every pair is allowed, and for
// ReRoPE computed with the near pair (every delta < w), the far pair (every delta >= w) or both (straddling: the
// tile is visited twice, near keys with the near pair then far keys with the far pair, each pass masked to its
// keys). With default positions the key tile range is also cut analytically; with explicit positions a prepass
// writes each key tile's (min, max).
#include "flash_fwd.h"
#include "flash_common.cuh"
#include "rope_device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <string>

namespace scaled_rope {
namespace {

using namespace flash;

constexpr int kBlockM = 128;
constexpr int kBlockN = kFlashBlockN;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMT = kBlockM / (16 * kWarps);  // m16 tiles per warp
constexpr int kRows = 2 * kMT;                 // query rows per thread: g and g + 8 of each m16 tile
constexpr int kNB = kBlockN / 8;               // n8 blocks of S per warp
// CTAs per SM the register budget is sized for: 2 gives 255 registers, what D = 128 needs for its 32 x 128 output
// accumulator (128 registers) and 32 x 64 scores (64) per thread without spills.
constexpr int kMinBlocks = 2;

// ---- PTX wrappers (mma.sync, ldmatrix) ----------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- shared-memory tiles --------------------------------------------------------------------------------------
// A tile is [rows][D] elements at a 256-byte aligned shared address; 16-byte chunk c of row r is stored at chunk
// c ^ (r & 7). Since the row pitch is a multiple of 128 bytes and chunk indices of one ldmatrix differ by a
// compile-time constant, a fragment address is (tile + per-thread offset) ^ constant: one LOP per ldmatrix.
template <int D>
constexpr int kRowBytes = D * 2;

// ROWS x D tile from global (row stride in elements); rows >= rows_valid are zero-filled and never read.
// Thread tid copies chunk tid % (D/8) of rows tid / (D/8) + i * kRowsPerPass: its chunk, its swizzle (row & 7)
// and its source offset stay fixed, so a pass only adds constants.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* gmem, int64_t row_stride, int rows_valid) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(ROWS % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "tile must split evenly over the threads");
  const int row = static_cast<int>(threadIdx.x) / kChunks;
  const int chunk = static_cast<int>(threadIdx.x) % kChunks;
  const uint32_t dst = tile + row * kRowBytes<D> + ((chunk ^ (row & 7)) << 4);
  const T* src = gmem + row * row_stride + chunk * 8;
  const int64_t step = kRowsPerPass * row_stride;
#pragma unroll
  for (int i = 0; i < ROWS / kRowsPerPass; ++i) {
    const bool valid = row + i * kRowsPerPass < rows_valid;
    cp_async_16(dst + i * kRowsPerPass * kRowBytes<D>, valid ? src + i * step : gmem, valid);
  }
}

// Per-thread byte offsets (within a tile) of the row each lane hands to ldmatrix.x4 for chunk pair 0.
// A operand (Q, first m16 tile of warp w; the second is 16 rows further): matrices (rows 0-7 | 8-15) x (chunk 0 | 1).
template <int D>
__device__ __forceinline__ uint32_t a_frag_offset(int warp, int lane) {
  return (warp * 16 * kMT + (lane & 15)) * kRowBytes<D> + (((lane >> 4) ^ (lane & 7)) << 4);
}
// B operand from K rows (non-transposed): matrices (keys 0-7, chunk 0), (0-7, 1), (8-15, 0), (8-15, 1).
template <int D>
__device__ __forceinline__ uint32_t k_frag_offset(int lane) {
  return ((lane & 7) + ((lane >> 4) << 3)) * kRowBytes<D> + ((((lane >> 3) & 1) ^ (lane & 7)) << 4);
}
// B operand from V rows (transposed): matrices (keys 0-7, chunk 0), (8-15, 0), (0-7, 1), (8-15, 1).
template <int D>
__device__ __forceinline__ uint32_t v_frag_offset(int lane) {
  return (lane & 15) * kRowBytes<D> + (((lane >> 4) ^ (lane & 7)) << 4);
}

// ---- warp-level products ----------------------------------------------------------------------------------------
// s = Q[32 rows of this warp] K^T over all kBlockN keys. q, k: tile + fragment offset.
template <typename T, int D>
__device__ __forceinline__ void gemm_qk(float (&s)[kMT][kNB][4], uint32_t q, uint32_t k) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[mt][nb][i] = 0.0f;
    }
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], (q ^ (kk << 5)) + mt * 16 * kRowBytes<D>);
    const uint32_t k_kk = k ^ (kk << 5);
#pragma unroll
    for (int np = 0; np < kBlockN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, k_kk + np * 16 * kRowBytes<D>);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// o += P V with P = the probabilities in s (rounded to T); v: V tile + fragment offset.
template <typename T, int D>
__device__ __forceinline__ void gemm_pv(float (&o)[kMT][D / 8][4], const float (&s)[kMT][kNB][4], uint32_t v) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, (v ^ (dp << 5)) + kk * 16 * kRowBytes<D>);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(o[mt][2 * dp], a[mt], b[0], b[1]);
        mma_16816<T>(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// ---- kernels ----------------------------------------------------------------------------------------------------
// (min, max) of the explicit key positions of every key tile: grid B * n_tiles, kBlockN threads.
__global__ void __launch_bounds__(kBlockN) k_tile_minmax_kernel(const int32_t* __restrict__ k_positions,
                                                                int64_t batch_stride, int seqlen_k, int n_tiles,
                                                                int32_t* __restrict__ minmax) {
  static_assert(kBlockN == 64, "two warps per key tile");
  __shared__ int partial[2][2];
  const int64_t b = blockIdx.x / n_tiles;
  const int j = static_cast<int>(blockIdx.x % n_tiles);
  const int col = j * kBlockN + static_cast<int>(threadIdx.x);
  int lo = INT_MAX, hi = INT_MIN;
  if (col < seqlen_k) lo = hi = k_positions[b * batch_stride + col];
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) {
    partial[0][warp] = lo;
    partial[1][warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    minmax[(b * n_tiles + j) * 2] = min(partial[0][0], partial[0][1]);
    minmax[(b * n_tiles + j) * 2 + 1] = max(partial[1][0], partial[1][1]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) flash_fwd_kernel(const FlashFwdParams p, int num_q_tiles,
                                                                         int section_heads) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int q_range[2][kWarps];
  // Position of every query row of the tile: read back per key tile rather than held in registers, which the
  // 32 x 128 accumulator needs (and only 544 bytes of static shared memory, so that two ReRoPE CTAs of 112 KB
  // still fit an H100 SM).
  __shared__ int row_pos[kBlockM];
  // tiles at 256-byte aligned shared addresses (the launch adds 256 bytes of slack)
  const uint32_t sQ = (smem_u32(smem_raw) + 255u) & ~255u;
  const uint32_t sK = sQ + kBlockM * kRowBytes<D>;
  const uint32_t sV = sK + kBlockN * kRowBytes<D>;
  const uint32_t sQf = sV + kBlockN * kRowBytes<D>;  // ReRoPE only
  const uint32_t sKf = sQf + kBlockM * kRowBytes<D>;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;  // mma fragment row group and column pair
  const TileIndex tile = tile_order(blockIdx.x, num_q_tiles, p.batch * p.heads_q, section_heads);
  const int64_t bh = tile.bh;
  const int q_tile = tile.q_tile;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int seqlen_q = static_cast<int>(p.seqlen_q), seqlen_k = static_cast<int>(p.seqlen_k);
  const int m0 = q_tile * kBlockM;
  const bool rerope = p.rerope_window > 0;
  // every |delta| < 2^31, so larger windows are the same as INT_MAX
  const int window = p.window > 0 ? static_cast<int>(min(p.window, static_cast<int64_t>(INT_MAX))) : 0;
  const int rerope_w = rerope ? static_cast<int>(min(p.rerope_window, static_cast<int64_t>(INT_MAX))) : 0;
  const int32_t* k_pos = p.k_positions ? p.k_positions + b * p.k_positions_batch_stride : nullptr;

  // This thread's rows: r = 2 * mt + i is tile row 32 * warp + 16 * mt + g + 8 * i, which holds the accumulator
  // elements [2i] and [2i + 1] of every n8 block of m16 tile mt. The t == 0 thread of each row writes row_pos; the
  // barrier at the top of the key loop publishes it before any read.
  auto tile_row = [&](int r) { return warp * 16 * kMT + (r >> 1) * 16 + g + 8 * (r & 1); };
  int pos[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + tile_row(r);
    const bool valid = row < seqlen_q;
    if (p.q_positions) {
      pos[r] = valid ? p.q_positions[b * p.q_positions_batch_stride + row] : 0;
    } else {
      pos[r] = seqlen_k - seqlen_q + row;
    }
    if (t == 0) row_pos[tile_row(r)] = pos[r];
  }
  // Logit scale of a row in log2 units: softmax_scale * log2(e), times the log-n factor of its position.
  const float base_scale = p.softmax_scale * kLog2e;
  auto row_scale = [&](int r) -> float {
    if (p.logn_base <= 0.0f) return base_scale;
    const float position = static_cast<float>(row_pos[tile_row(r)]);
    return base_scale * fmaxf(1.0f, logf(position + 1.0f) / logf(p.logn_base));
  };

  // Query positions of the tile's valid rows: [q_min, q_max].
  int q_min = INT_MAX, q_max = INT_MIN;
  if (p.q_positions) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (m0 + tile_row(r) < seqlen_q) {
        q_min = min(q_min, pos[r]);
        q_max = max(q_max, pos[r]);
      }
    }
    cta_min_max(q_min, q_max, q_range);
  } else {
    q_min = seqlen_k - seqlen_q + m0;
    q_max = seqlen_k - seqlen_q + min(m0 + kBlockM, seqlen_q) - 1;
  }

  // Key tiles to visit: [j_begin, j_end), cut analytically for default key positions (key j at position j).
  const int n_tiles = (seqlen_k + kBlockN - 1) / kBlockN;
  const TileRange range =
      k_pos ? TileRange{0, n_tiles} : default_key_tiles(q_min, q_max, n_tiles, kBlockN, p.causal, window);
  const int j_begin = range.begin, j_end = range.end;

  auto classify = [&](int j) -> TileClass {
    int k_min, k_max;
    if (k_pos) {
      const int2 mm = reinterpret_cast<const int2*>(p.k_tile_minmax)[b * n_tiles + j];
      k_min = mm.x;
      k_max = mm.y;
    } else {
      k_min = j * kBlockN;
      k_max = min(j * kBlockN + kBlockN, seqlen_k) - 1;
    }
    return classify_span(q_min, q_max, k_min, k_max, (j + 1) * kBlockN > seqlen_k, p.causal, window, rerope_w);
  };
  auto next_tile = [&](int j, TileClass& c) -> int {
    for (; j < j_end; ++j) {
      c = classify(j);
      if (c.mode) return j;
    }
    return j_end;
  };

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* qf_base = rerope ? static_cast<const T*>(p.q_far) + b * p.q_batch_stride + h * p.q_head_stride : nullptr;
  const int64_t k_off = b * p.k_batch_stride + hk * p.k_head_stride;
  const T* k_base = static_cast<const T*>(p.k) + k_off;
  const T* kf_base =
      rerope ? static_cast<const T*>(p.k_far) + b * p.k_far_batch_stride + hk * p.k_far_head_stride : nullptr;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  auto load_keys = [&](int j, int mode) {
    const int64_t n0 = static_cast<int64_t>(j) * kBlockN;
    const int rows = seqlen_k - j * kBlockN;
    if (mode & kNear) load_tile<T, D, kBlockN>(sK, k_base + n0 * p.k_row_stride, p.k_row_stride, rows);
    if (mode & kFar) load_tile<T, D, kBlockN>(sKf, kf_base + n0 * p.k_far_row_stride, p.k_far_row_stride, rows);
  };
  // Position of key column `col` of the sequence (0 beyond seqlen_k: such columns are always masked).
  auto key_position = [&](int col) -> int {
    if (!k_pos) return col;
    return col < seqlen_k ? k_pos[col] : 0;
  };

  TileClass cur{0, false};
  int j = next_tile(j_begin, cur);

  // Prologue: Q (and far Q) with the first key tile in one group.
  const int q_rows = seqlen_q - m0;
  load_tile<T, D, kBlockM>(sQ, q_base + m0 * p.q_row_stride, p.q_row_stride, q_rows);
  if (rerope) load_tile<T, D, kBlockM>(sQf, qf_base + m0 * p.q_row_stride, p.q_row_stride, q_rows);
  if (j < j_end) load_keys(j, cur.mode);
  cp_async_commit();

  float o[kMT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][db][i] = 0.0f;
    }
  }
  float row_max[kRows], row_sum[kRows];  // log2 units; this thread's partial sums (columns 2t, 2t+1 of each block)
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
  }

  uint32_t a_frag = a_frag_offset<D>(warp, lane);
  uint32_t k_frag = k_frag_offset<D>(lane);
  uint32_t v_frag = v_frag_offset<D>(lane);
  while (j < j_end) {
    TileClass nxt{0, false};
    const int j_next = next_tile(j + 1, nxt);
    const int n0 = j * kBlockN;
    // A tile straddling the ReRoPE window is visited twice, as two masked tiles: near keys (delta < w) with the
    // near pair, then far keys with the far pair; the online softmax merges them (one extra P V on few tiles).
    const bool straddle = cur.mode == (kNear | kFar);
#pragma unroll 1
    for (int pass = 0; pass < (straddle ? 2 : 1); ++pass) {
      // Opaque to the compiler: keeps it from hoisting every fragment address out of the loop into registers.
      asm volatile("" : "+r"(a_frag), "+r"(k_frag), "+r"(v_frag));
      const bool far = straddle ? pass == 1 : cur.mode == kFar;
      const bool last_pass = !straddle || pass == 1;

      cp_async_wait_all();
      __syncthreads();  // K(j) visible; every warp is done with V(j - 1)
      if (pass == 0) {
        load_tile<T, D, kBlockN>(sV, v_base + static_cast<int64_t>(n0) * p.v_row_stride, p.v_row_stride,
                                 seqlen_k - n0);
        cp_async_commit();
      }

      float s[kMT][kNB][4];
      gemm_qk<T, D>(s, (far ? sQf : sQ) + a_frag, (far ? sKf : sK) + k_frag);

      // Scale to log2 units, then mask (after scaling, so that a negative softmax_scale cannot flip -inf).
      float scale[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) scale[r] = row_scale(r);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int i = 0; i < 4; ++i) s[mt][nb][i] *= scale[2 * mt + (i >> 1)];
        }
      }
      if (cur.elementwise || straddle) {
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n0 + nb * 8 + 2 * t + e;
            const int key = key_position(col);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              const int delta = row_pos[tile_row(r)] - key;
              const bool allowed = col < seqlen_k && (!p.causal || delta >= 0) && (!window || delta < window) &&
                                   (!straddle || (delta >= rerope_w) == far);
              if (!allowed) s[r >> 1][nb][2 * (r & 1) + e] = -INFINITY;
            }
          }
        }
      }

      // Online softmax; a row with nothing allowed so far keeps max -inf and uses 0 as its reference.
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int mt = r >> 1, c = 2 * (r & 1);
        float mx = row_max[r];
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][c], s[mt][nb][c + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float ref = mx == -INFINITY ? 0.0f : mx;
        const float alpha = ex2(row_max[r] - ref);
        row_max[r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pr = ex2(s[mt][nb][c + e] - ref);
            s[mt][nb][c + e] = pr;
            sum += pr;
          }
        }
        row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
        for (int db = 0; db < D / 8; ++db) {
          o[mt][db][c] *= alpha;
          o[mt][db][c + 1] *= alpha;
        }
      }

      cp_async_wait_all();
      __syncthreads();  // V(j) visible; every warp is done with K(j) (after the last pass)
      if (last_pass && j_next < j_end) {
        load_keys(j_next, nxt.mode);
        cp_async_commit();
      }
      gemm_pv<T, D>(o, s, sV + v_frag);
    }
    j = j_next;
    cur = nxt;
  }

  cp_async_wait_all();  // with no key tile the prologue's Q copy is still in flight

  // Epilogue: normalise, write out (input dtype) and lse (natural log); empty rows give 0 and -inf.
  T* out_base = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
  float* lse_base = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int mt = r >> 1, c = 2 * (r & 1);
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = m0 + tile_row(r);
    if (row >= seqlen_q) continue;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* out_row = out_base + row * p.o_row_stride;
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
      *reinterpret_cast<uint32_t*>(out_row + db * 8 + 2 * t) = pack2<T>(o[mt][db][c] * inv, o[mt][db][c + 1] * inv);
    }
    if (t == 0) lse_base[row] = sum > 0.0f ? (row_max[r] + log2f(sum)) * kLn2 : -INFINITY;
  }
}

// ---- host side --------------------------------------------------------------------------------------------------
std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return "";
  return std::string("flash_fwd: ") + what + ": " + cudaGetErrorString(err);
}

template <typename T, int D>
std::string launch(const FlashFwdParams& p, cudaStream_t stream) {
  const bool rerope = p.rerope_window > 0;
  const size_t smem = sizeof(T) * D * (kBlockM + 2 * kBlockN + (rerope ? kBlockM + kBlockN : 0)) + 256;
  auto kernel = flash_fwd_kernel<T, D>;
  if (smem > 48 * 1024) {
    // Shared-memory carveout at its maximum, so that the occupancy the sizes allow (2 CTAs) is what runs.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           static_cast<int>(cudaSharedmemCarveoutMaxShared));
    if (err == cudaSuccess) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      return std::string("flash_fwd: cannot reserve shared memory: ") + cudaGetErrorString(err);
    }
  }
  const int64_t num_q_tiles = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t blocks = num_q_tiles * p.batch * p.heads_q;
  if (blocks > INT_MAX) return "flash_fwd: batch * heads_q * ceil(seqlen_q / 128) is too large";
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, static_cast<int>(num_q_tiles),
                                                             l2_section_heads(p));
  return launch_error("attention kernel launch failed");
}

bool aligned16(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  return true;
}

}  // namespace

std::string flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) return "flash_fwd: dtype must be float16 or bfloat16";
  if (p.head_dim != 64 && p.head_dim != 96 && p.head_dim != 128) {
    return "flash_fwd: head_dim " + std::to_string(p.head_dim) + " is not supported (64, 96 or 128)";
  }
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.heads_q < 0 || p.heads_kv <= 0) {
    return "flash_fwd: invalid sizes";
  }
  if (p.heads_q % p.heads_kv != 0) return "flash_fwd: heads_q must be a multiple of heads_kv";
  if (p.seqlen_q >= INT_MAX / 2 || p.seqlen_k >= INT_MAX / 2) return "flash_fwd: sequence too long";
  // The sm_90a kernel folds the scale into the exponent after taking row maxima of the raw scores.
  if (!(p.softmax_scale > 0)) return "flash_fwd: softmax_scale must be > 0 (the Python side folds its sign into q)";
  if (p.batch == 0 || p.seqlen_q == 0 || p.heads_q == 0) return "";
  const bool rerope = p.rerope_window > 0;
  const bool keys = p.seqlen_k > 0;  // without keys every row is empty and k, v are never read
  if (!p.q || !p.out || !p.lse || (keys && (!p.k || !p.v)) || (rerope && (!p.q_far || (keys && !p.k_far))) ||
      (keys && p.k_positions && !p.k_tile_minmax)) {
    return "flash_fwd: missing pointer";
  }
  if (!aligned16(p.q, {p.q_batch_stride, p.q_row_stride, p.q_head_stride}) ||
      !aligned16(p.k, {p.k_batch_stride, p.k_row_stride, p.k_head_stride}) ||
      !aligned16(p.v, {p.v_batch_stride, p.v_row_stride, p.v_head_stride}) ||
      (rerope && (!aligned16(p.q_far, {}) ||
                  !aligned16(p.k_far, {p.k_far_batch_stride, p.k_far_row_stride, p.k_far_head_stride})))) {
    return "flash_fwd: q, k, v (and the far pair) need 16-byte aligned rows (pointers, strides multiple of 8)";
  }
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0 || p.o_batch_stride % 2 || p.o_row_stride % 2 ||
      p.o_head_stride % 2) {
    return "flash_fwd: out needs 4-byte aligned pairs (even strides)";
  }

  if (p.q_rope.turns != nullptr) {
    const std::string err = check_rope(p.q_rope, p.head_dim, "flash_fwd: q_rope");
    if (!err.empty()) return err;
    if (rerope) return "flash_fwd: q_rope (on-chip rotation of q) does not take ReRoPE; rotate q beforehand";
    if (p.q_rope_sign != 1.0f && p.q_rope_sign != -1.0f) return "flash_fwd: q_rope_sign must be 1 or -1";
  }

  if (keys && p.k_positions) {
    const int64_t n_tiles = (p.seqlen_k + kBlockN - 1) / kBlockN;
    if (n_tiles * p.batch > INT_MAX) return "flash_fwd: batch * ceil(seqlen_k / 64) is too large";
    k_tile_minmax_kernel<<<static_cast<unsigned>(n_tiles * p.batch), kBlockN, 0, stream>>>(
        p.k_positions, p.k_positions_batch_stride, static_cast<int>(p.seqlen_k), static_cast<int>(n_tiles),
        p.k_tile_minmax);
    const std::string err = launch_error("key tile prepass launch failed");
    if (!err.empty()) return err;
  }
  bool launched = false;
  const std::string err = flash::flash_fwd_sm90(p, stream, &launched);
  if (launched) return err;
  if (p.q_rope.turns != nullptr) {
    return "flash_fwd: q_rope (on-chip rotation of q) needs the sm_90a kernel (a compute capability 9.x device, an "
           "extension built with sm_90a, SCALED_ROPE_FLASH_SM80 unset)";
  }
  if (p.head_dim == 96) {
    return "flash_fwd: head_dim 96 runs on the sm_90a kernel only (a compute capability 9.x device, an extension built "
           "with sm_90a, SCALED_ROPE_FLASH_SM80 unset)";
  }
  if (p.dtype == kFloat16) {
    return p.head_dim == 64 ? launch<__half, 64>(p, stream) : launch<__half, 128>(p, stream);
  }
  return p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}

}  // namespace scaled_rope
