// The one-read kernel: rows staged in shared memory by the bulk copy engine.
//
// A persistent grid of 256-thread blocks (two per SM) walks over tiles of rows. A tile is
// 32 KiB of scores: R = 256 / rt rows of rt * 8 sixteen-byte chunks each (rt threads per row,
// a power of two up to 256), or, for rows longer than 32 KiB, one 32 KiB slice of a row for
// each block of a thread-block cluster of up to 16 blocks. Warp 0 copies the visible part of
// each row of a tile into one of three shared-memory stages with `cp.async.bulk`, completing on
// the stage's mbarrier, so three tiles are in flight while a tile is computed. Thread `lane` of
// a row takes chunks c * rt + lane (c < 8) of its slice: it forms their logits once (kept in
// registers when the row has at most one mask / bias tensor), reduces an online max / sum, and
// writes the outputs with 16-byte stores; hidden chunks (causal, window) are never read and are
// written as zeros.
//
// The reduction order is fixed by (chunk slot, element, lane butterfly, warp order, cluster rank
// order), which depends only on rt and the cluster size, so only on K and the dtype. Rows that
// cannot be read with 16-byte vectors (unaligned, strided) take the same kernel with ALIGNED =
// false: each thread reads its own chunks element by element, and the logits, hence the bits,
// are the same.
#pragma once

#include "common.cuh"

namespace tp_softmax {
namespace detail {

constexpr int kStagedThreads = 256;
constexpr int kStagedSmemBytes = 96 * 1024;  // dynamic shared memory (aligned path): the stages
constexpr int kMaxStages = 6;

// C chunks per thread: 8 (32 KiB tiles, 3 stages), or 4 (16 KiB tiles, 6 stages) for rows that
// read a mask or bias tensor (their operand loads and 8 chunks of logits would not fit in the
// 128 registers of two blocks per SM).
template <int C>
struct TileGeometry {
  static constexpr int kTileBytes = kStagedThreads * C * 16;
  static constexpr int kStages = kStagedSmemBytes / kTileBytes;
  static_assert(kStages >= 2 && kStages <= kMaxStages, "stage count");
};

struct StagedScratch {
  unsigned long long full[kMaxStages];  // one mbarrier per stage
  float warp_max[2][kStagedThreads / 32];
  float warp_sum[2][kStagedThreads / 32];
  ClusterExchange xc;                   // cluster rows
};

// ---- PTX: bulk copies ---------------------------------------------------------------------------
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// Global -> shared, `bytes` a multiple of 16, both addresses 16-byte aligned.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}

__device__ __forceinline__ uint4 lds128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }

// A tile's geometry, the same for the producer (warp 0) and every thread. A row slot holds
// C * rt chunks in C pieces of rt: without a cluster, piece c is chunks [c * rt, (c + 1) * rt) of
// the row; in a cluster of n blocks, block q holds the row's pieces c * n + q (pieces interleaved
// across the blocks, so causal rows load them evenly).
struct TileShape {
  int rt;       // threads of a block per row (chunks per piece), a power of two
  int rt_shift; // log2(rt)
  int rows;     // rows per tile (kStagedThreads / rt)
  int slot;     // chunks of a row slot in a stage (rt * C)
  int pieces;   // pieces per row slot that are copied separately (C in a cluster, else 1)
  int cluster;  // blocks per row
  int rank;     // this block's rank in its cluster
  int nchunks;  // chunks of a row

  // Global chunk index of slot position `l` (0 <= l < slot) of this block.
  __device__ __forceinline__ int chunk_of(int l) const {
    return (((l >> rt_shift) * cluster + rank) << rt_shift) + (l & (rt - 1));
  }
};

// The visible chunks [c0, c1) of piece `pc` of a row slot (local start `l0`); false if none.
__device__ __forceinline__ bool piece_chunks(const RowSpan<int>& sp, const TileShape& ts, int V, int pc, int& c0,
                                            int& c1, int& l0) {
  if (sp.lo > sp.hi) return false;
  const int len = ts.pieces == 1 ? ts.slot : ts.rt;
  l0 = pc * len;
  const int g0 = ts.chunk_of(l0);
  const int lo_c = sp.lo / V, hi_c = sp.hi / V + 1;
  const int end = g0 + len < ts.nchunks ? g0 + len : ts.nchunks;
  c0 = lo_c > g0 ? lo_c : g0;
  c1 = hi_c < end ? hi_c : end;
  l0 += c0 - g0;
  return c0 < c1;
}

__device__ __forceinline__ void prefetch_l2(const void* begin, const void* end) {
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(begin) + 15) & ~uintptr_t{15};
  const uintptr_t hi = reinterpret_cast<uintptr_t>(end) & ~uintptr_t{15};
  if (hi > lo)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(static_cast<uint32_t>(hi - lo))
                 : "memory");
}

// Warp 0: copy the visible chunks of tile `t` into the stage at `stage` (completing on `bar`), and
// prefetch into L2 the visible parts of the tile's mask / bias rows where each row has its own.
// (Operands reach this kernel only with stride 1 along K: rows_vectorisable.)
template <typename T, MaskKind MK, BiasKind BK>
__device__ __forceinline__ void issue_tile(const SoftmaxParams& P, const TileShape& ts, int64_t t, int64_t rows,
                                           uint8_t* stage, uint32_t bar) {
  constexpr int V = 16 / sizeof(T);
  using R = Row<T, MK, BK, int>;
  const uint64_t policy = evict_first_policy();
  const int lane = threadIdx.x & 31;
  const int jobs = ts.rows * ts.pieces;  // (row, piece) pairs; pieces is 1 or rows is 1
  uint32_t bytes = 0;
  for (int j = lane; j < jobs; j += 32) {
    const int rr = ts.pieces == 1 ? j : 0, pc = ts.pieces == 1 ? 0 : j;
    const int64_t row = t * ts.rows + rr;
    if (row >= rows) break;
    int c0, c1, l0;
    if (piece_chunks(RowSpan<int>(P, row), ts, V, pc, c0, c1, l0))
      bytes += static_cast<uint32_t>(c1 - c0) * 16u;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) bytes += __shfl_xor_sync(0xffffffffu, bytes, off);
  if (lane == 0) mbar_arrive_expect_tx(bar, bytes);
  __syncwarp();
  for (int j = lane; j < jobs; j += 32) {
    const int rr = ts.pieces == 1 ? j : 0, pc = ts.pieces == 1 ? 0 : j;
    const int64_t row = t * ts.rows + rr;
    if (row >= rows) break;
    const R r(P, row);
    int c0, c1, l0;
    if (!piece_chunks(r, ts, V, pc, c0, c1, l0)) continue;
    const uint32_t dst = smem_u32(stage + (static_cast<size_t>(rr) * ts.slot + l0) * 16);
    bulk_copy(dst, r.in + static_cast<int64_t>(c0) * V, static_cast<uint32_t>(c1 - c0) * 16u, bar, policy);
    // Operand rows of their own (not broadcast over queries): prefetch the visible part into L2.
    // A row broadcast over queries is read by many tiles and stays in L2; prefetching it again
    // for every tile cost more than it saved (docs/perf.md, v10).
    if constexpr (R::kMask) {
      if (P.mask_stride[2] != 0)
        prefetch_l2(r.mask + static_cast<int64_t>(c0) * V, r.mask + static_cast<int64_t>(c1) * V);
    }
    if constexpr (R::kBias) {
      if (P.bias_stride[2] != 0)
        prefetch_l2(r.bias + static_cast<int64_t>(c0) * V, r.bias + static_cast<int64_t>(c1) * V);
    }
  }
}

// ---- the kernel ----------------------------------------------------------------------------------
// Grid: units of `cluster` blocks; unit u takes tiles u, u + units, ... (`ntiles` in all).
// CLUSTER: rows longer than one slice, shared by a cluster of `cluster` (2 to 16) blocks; else
// `cluster` is 1 (a template parameter so that rows of one block carry none of the exchange).
template <typename T, MaskKind MK, BiasKind BK, int C, bool ALIGNED, bool CLUSTER>
__global__ void __launch_bounds__(kStagedThreads, 2)
staged_softmax_kernel(const SoftmaxParams P, int rt, int cluster_arg, int64_t ntiles) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kTileBytes = TileGeometry<C>::kTileBytes;
  constexpr int kStages = TileGeometry<C>::kStages;
  using R = Row<T, MK, BK, int>;
  // The logits stay in registers between the reduction and the write (C * V floats: 64 at most,
  // and 32 where mask / bias chunks need registers too), so a stage is released as soon as it is
  // read.
  static_assert(C == 8 || C == 4, "chunks per thread");

  extern __shared__ __align__(128) uint8_t stage_mem[];
  __shared__ StagedScratch sh;
  __shared__ TileShape ts_shared;

  const int cluster = cluster_arg;  // 1 without CLUSTER (kept a runtime value: ptxas allocates better)
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  TileShape ts;
  ts.rt = rt;
  ts.rt_shift = __ffs(rt) - 1;
  ts.rows = kStagedThreads >> ts.rt_shift;
  ts.slot = rt * C;
  ts.pieces = cluster > 1 ? C : 1;
  ts.cluster = cluster;
  ts.rank = cluster > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  ts.nchunks = static_cast<int>((P.K + V - 1) / V);
  const int lane = tid & (rt - 1);
  const int row_in_tile = tid >> ts.rt_shift;
  const int64_t rows = P.B * P.H * P.Q;
  const int64_t unit = blockIdx.x / cluster;
  const int64_t nunits = gridDim.x / cluster;

  if (tid == 0) {
    if constexpr (ALIGNED) {
      for (int s = 0; s < kStages; ++s) mbar_init(smem_u32(&sh.full[s]), 1);
      ts_shared = ts;  // warp 0 reads the tile shape from here, not from registers held all along
    }
    if (CLUSTER) sh.xc.init();
    mbar_fence_init();
  }
  // The other blocks of a cluster push into this block's barriers: they must see them set up.
  if (CLUSTER) {
    cg::this_cluster().sync();
  } else if (ALIGNED) {
    __syncthreads();
  }
  if constexpr (ALIGNED) {
    if (warp == 0) {
      for (int s = 0; s < kStages; ++s) {
        const int64_t t = unit + s * nunits;
        if (t < ntiles) issue_tile<T, MK, BK>(P, ts_shared, t, rows, stage_mem + s * kTileBytes, smem_u32(&sh.full[s]));
      }
    }
  }

  int k = 0;
  for (int64_t t = unit; t < ntiles; t += nunits, ++k) {
    const int s = k % kStages;
    // Slot position c * rt + lane holds chunk c * ch_step + ch_base of the row (recomputed per
    // tile from the launch parameters rather than held in registers across the loop).
    const int ch_base = ts.rank * rt + lane;
    const int ch_step = cluster * rt;
    const int64_t row = t * ts.rows + row_in_tile;
    const bool active = row < rows;
    const R r(P, active ? row : 0);
    const uint8_t* my_slot = stage_mem + s * kTileBytes + static_cast<size_t>(row_in_tile) * ts.slot * 16;

    bool vis[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int ch = c * ch_step + ch_base;
      vis[c] = active && ch < ts.nchunks && r.visible(ch * V, V);
    }

    if constexpr (ALIGNED) mbar_wait(smem_u32(&sh.full[s]), static_cast<uint32_t>((k / kStages) & 1));

    // Logits, kept in registers; then the thread's partial: its max over all its chunks, then
    // e = exp(x - max) in place and their sum. Max and sum run in 4 independent accumulators
    // (element e goes to e % 4), combined in a fixed order: short dependency chains.
    constexpr int A = 4;
    float kept[C][V];
    float acc[A];
#pragma unroll
    for (int a = 0; a < A; ++a) acc[a] = neg_inf();
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (!vis[c]) continue;
      const int j0 = (c * ch_step + ch_base) * V;
      if constexpr (ALIGNED) {
        float sv[V];
        unpack_chunk<T>(lds128(my_slot + static_cast<size_t>(c * rt + lane) * 16), sv);
        chunk_logits_along_k<T, MK, BK, V, int>(P, r, j0, sv, kept[c]);
      } else {
        chunk_logits_strided<T, MK, BK, V, int>(P, r, j0, kept[c]);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e % A] = fmaxf(acc[e % A], kept[c][e]);
    }
    MS st{fmaxf(fmaxf(acc[0], acc[1]), fmaxf(acc[2], acc[3])), 0.0f};
    {
      const float shift = (st.m == neg_inf() ? 0.0f : st.m) * kLog2e;
#pragma unroll
      for (int a = 0; a < A; ++a) acc[a] = 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (!vis[c]) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          kept[c][e] = fast_exp2(fmaf(kept[c][e], kLog2e, -shift));
          acc[e % A] += kept[c][e];
        }
      }
      st.s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
    const float local_max = st.m;

    // Reduce: lanes, then the warps of the row (rt > 32), then the blocks of the cluster.
    st = lane_reduce_ms(st, rt < 32 ? rt : 32);
    const bool block_rows = rt > 32;
    const int par = k & 1;
    if (block_rows && (tid & 31) == 0) {
      sh.warp_max[par][warp] = st.m;
      sh.warp_sum[par][warp] = st.s;
    }
    if (block_rows || ALIGNED) __syncthreads();
    if constexpr (ALIGNED) {
      // Every thread is done with stage s: refill it.
      const int64_t t2 = t + kStages * nunits;
      if (warp == 0 && t2 < ntiles)
        issue_tile<T, MK, BK>(P, ts_shared, t2, rows, stage_mem + s * kTileBytes, smem_u32(&sh.full[s]));
    }
    if (block_rows) st = combine_warps(sh.warp_max[par], sh.warp_sum[par], row_in_tile * (rt >> 5), rt >> 5);
    if constexpr (CLUSTER) st = sh.xc.combine(st, cluster, k);

    // Write: every chunk of the slice, zeros where hidden.
    const Normaliser norm(st);
    // Kept e = exp(x - local_max): out = e * exp(local_max - max) / sum.
    const float factor =
        fast_exp2((local_max - (st.m == neg_inf() ? 0.0f : st.m)) * kLog2e) * norm.inv;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int ch = c * ch_step + ch_base;
      if (!active || ch >= ts.nchunks) continue;
      float y[V];
      if (vis[c]) {
#pragma unroll
        for (int e = 0; e < V; ++e) y[e] = kept[c][e] * factor;
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) y[e] = norm.hidden;
      }
      if constexpr (ALIGNED) {
        store_streaming(r.out + ch * V, pack_chunk<T>(y));
      } else {
        store_strided<T, V, int>(r.out, P.out_stride[3], ch * V, static_cast<int>(P.K), y);
      }
    }
  }
  // No block of a cluster may exit while another can still write to its shared memory.
  if (CLUSTER) cg::this_cluster().sync();
}

}  // namespace detail
}  // namespace tp_softmax
