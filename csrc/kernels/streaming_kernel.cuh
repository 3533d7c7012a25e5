// The kernel of long rows (more than 16 x 64 KiB; 16 x 32 KiB with two operand tensors, in chunks of
// 16 bytes: choose_row_config): a cluster of 4, 8 or 16 blocks of 512 threads
// shares a row. Where the row is 16-byte aligned and a block's part of it fits in shared memory (up to
// kMaxSlots pieces of 8 KiB), the bulk copy engine stages that part once and both passes (the
// online max / sum, then the write) read it from there; otherwise the row is read twice from global
// memory. Either way each thread takes the same chunks in the same order, so the bits are the same.
#pragma once

#include "common.cuh"

namespace tp_softmax {
namespace detail {

constexpr int kStreamThreads = kLongRowThreads;
// A piece: kStreamThreads chunks of a row in one block, one chunk a thread (8 KiB). A block's part
// of a row is `pieces` of them, pieces m * G + rank * kStreamThreads + [0, kStreamThreads) (G the
// threads of the cluster). The pieces of the block's rows pass through a ring of kMaxSlots pieces
// of shared memory, in order, each with its own mbarrier.
constexpr int kPieceBytes = kStreamThreads * 16;
constexpr int kMaxSlots = kLongRowMaxPieces;  // 216 KiB of shared memory a block

// Per-warp partials, double-buffered by row parity so one barrier per reduction suffices, and the
// exchange of the cluster's block partials.
struct StreamScratch {
  float warp_max[2][32];
  float warp_sum[2][32];
  ClusterExchange xc;
};

// Reduce over the threads of a row: lanes (butterfly), warps of the block (in order), blocks of
// the cluster (in rank order). Every thread gets the same bits. `k`: the reduction's ordinal in this
// block (rows take one or two: reduce_row).
__device__ __forceinline__ MS block_cluster_reduce_ms(MS v, int cluster, StreamScratch& sh, int k) {
  v = lane_reduce_ms(v, 32);
  const int warp = threadIdx.x >> 5;
  const int parity = k & 1;
  if ((threadIdx.x & 31) == 0) {
    sh.warp_max[parity][warp] = v.m;
    sh.warp_sum[parity][warp] = v.s;
  }
  __syncthreads();
  v = combine_warps(sh.warp_max[parity], sh.warp_sum[parity], 0, blockDim.x >> 5);
  if (cluster > 1) v = sh.xc.combine(v, cluster, static_cast<int>(cg::this_cluster().block_rank()), k);
  return v;
}

// The row's maximum and sum from every thread's running state. A row of huge logits
// (needs_exact_shift of the maximum: the same answer in every thread of the cluster) takes its sum
// again, `huge_sum(m)` being this thread's part as exp(x - m) summed over its chunks in their
// order, and reduces it as the first; ordinary rows run none of it. `nx`: the reductions this block
// has done (the scratch and the cluster's exchange alternate between two buffers by its parity).
template <typename HugeSum>
__device__ __forceinline__ MS reduce_row(MS st, int cluster, StreamScratch& sh, int& nx, HugeSum&& huge_sum) {
  MS tot = block_cluster_reduce_ms(st, cluster, sh, nx++);
  if (needs_exact_shift(ms_shift(tot.m) * kLog2e))
    tot = block_cluster_reduce_ms(MS{tot.m, huge_sum(tot.m)}, cluster, sh, nx++);
  return tot;
}

// Runs a row's write loop `write(huge)` with huge a std::integral_constant<bool>: the test for a
// row of huge logits (Normaliser::huge) once a row, and a loop of its own for each answer.
template <typename Write>
__device__ __forceinline__ void write_row(const Normaliser& norm, Write&& write) {
  if (norm.huge) {
    write(std::true_type{});
  } else {
    write(std::false_type{});
  }
}

// The rows of a block of the long-row kernel staged: unit u (of `nunits` clusters) takes rows
// u, u + nunits, ...; position q of the block's ring order is piece q % pieces of its
// (q / pieces)-th row, in slot q % slots, whose mbarrier completes once per position (a copy of the
// piece's visible chunks, or none). Warp 0 issues the first `slots` positions, then, once every
// thread has written out a row, the `pieces` positions `slots` after the row's: the ring holds
// the pieces of the next rows (up to `slots` - `pieces` of them) while a row is reduced and
// written. (Refilling every piece, or every four, as soon as they are written out, each time after
// a block barrier, made k1m 38 % and 7 % slower: docs/perf.md, v18.)
template <typename T, MaskKind MK, BiasKind BK>
__device__ __forceinline__ void staged_rows(const SoftmaxParams& P, int cluster, int pieces, StreamScratch& sh) {
  constexpr int V = 16 / sizeof(T);
  constexpr int slots = kMaxSlots;  // the whole ring, however few pieces a row has
  using Pos = int64_t;
  using R = Row<T, MK, BK, Pos>;
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ unsigned long long full[kMaxSlots];

  const int tid = threadIdx.x;
  const int crank = cluster > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  const Pos G = static_cast<Pos>(kStreamThreads) * cluster;
  const Pos g = static_cast<Pos>(crank) * kStreamThreads + tid;
  const Pos nchunks = (static_cast<Pos>(P.K) + V - 1) / V;
  const int64_t rows = P.B * P.H * P.Q;
  const int64_t unit = blockIdx.x / cluster, nunits = gridDim.x / cluster;
  const int64_t my_rows = unit < rows ? (rows - 1 - unit) / nunits + 1 : 0;
  const int64_t total = my_rows * pieces;  // positions of the ring order

  if (tid == 0) {
    for (int s = 0; s < slots; ++s) mbar_init(smem_u32(&full[s]), 1);
    if (cluster > 1) sh.xc.init();
    mbar_fence_init();
  }
  if (cluster > 1) {
    cg::this_cluster().sync();  // the other blocks push into this block's barriers
  } else {
    __syncthreads();
  }

  // Warp 0, one lane a position: the visible chunks of the piece into its slot.
  auto issue = [&](int64_t q) {
    const int64_t kk = q / pieces;
    const int m = static_cast<int>(q - kk * pieces);
    const int s = static_cast<int>(q % slots);
    const uint32_t bar = smem_u32(&full[s]);
    const R r(P, unit + kk * nunits);
    const Pos g0 = static_cast<Pos>(m) * G + static_cast<Pos>(crank) * kStreamThreads;
    Pos c0 = r.lo / V, c1 = r.hi / V + 1;
    c0 = c0 > g0 ? c0 : g0;
    const Pos end = g0 + kStreamThreads < nchunks ? g0 + kStreamThreads : nchunks;
    c1 = c1 < end ? c1 : end;
    const uint32_t bytes = r.lo <= r.hi && c0 < c1 ? static_cast<uint32_t>(c1 - c0) * 16u : 0u;
    mbar_arrive_expect_tx(bar, bytes);
    if (bytes != 0)
      bulk_copy(smem_u32(ring + static_cast<size_t>(s) * kPieceBytes + (c0 - g0) * 16), r.in + c0 * V, bytes, bar,
                l2_policy<true>());
  };
  if (tid < 32)
    for (int64_t q = tid; q < (total < slots ? total : slots); q += 32) issue(q);

  int k = 0;   // rows done by this block
  int nx = 0;  // its reductions (reduce_row)
  for (int64_t row = unit; row < rows; row += nunits, ++k) {
    const R r(P, row);
    const int64_t q0 = static_cast<int64_t>(k) * pieces;
    const int s0 = static_cast<int>(q0 % slots);
    const uint32_t par0 = static_cast<uint32_t>((q0 / slots) & 1);
    // 16-bit rows: U = 4 pieces at a time, their waits, then their shared-memory reads, then the
    // arithmetic, so that the reads of the 4 chunks are in flight together (the waits and the
    // stores are asm with a memory clobber: nothing moves across them). The chunks still enter
    // the online max / sum one by one, in order: the same bits as one at a time. Float32 rows
    // (half the keys a byte) keep one piece at a time: batched, k256kf32 lost 0.03 and k512kf32
    // 0.05 of efficiency (docs/perf.md, v19), and even the batched loop at U = 1 lost 0.02 on
    // both against this one (f32m, after v21).
    constexpr int U = sizeof(T) == 2 ? 4 : 1;
    MS st{neg_inf(), 0.0f};
    // The logits of this thread's chunk of the piece in slot s, whose first key is j0.
    auto logits = [&](int s, Pos j0, float (&x)[V]) {
      float sv[V];
      unpack_chunk<T>(lds128(ring + static_cast<size_t>(s) * kPieceBytes + tid * 16), sv);
      chunk_logits_along_k<T, MK, BK, V, Pos>(P, r, j0, sv, x);
    };
    // A row of huge logits: this thread's sum again, one staged piece at a time (reduce_row).
    auto huge_sum = [&](float m) {
      float sum = 0.0f;
      int s = s0;
      for (int i = 0; i < pieces; ++i) {
        const Pos ch = g + i * G;
        if (ch < nchunks && r.visible(ch * V, V)) {
          float x[V];
          logits(s, ch * V, x);
          sum += huge_chunk_sum(x, m);
        }
        if (++s == slots) s = 0;
      }
      return sum;
    };
    if constexpr (U == 1) {
      {
        int s = s0;
        uint32_t par = par0;
        for (int m = 0; m < pieces; ++m) {
          const Pos ch = g + m * G;
          if (ch < nchunks && r.visible(ch * V, V)) {
            mbar_wait(smem_u32(&full[s]), par);
            float x[V];
            logits(s, ch * V, x);
            ms_add_chunk<false, V>(st, x);
          }
          if (++s == slots) {
            s = 0;
            par ^= 1u;
          }
        }
      }
      const Normaliser norm(reduce_row(st, cluster, sh, nx, huge_sum));
      const uint4 hidden_chunk = norm.hidden_chunk<T, V>();
      auto write = [&](auto huge) {
        int s = s0;
        for (int m = 0; m < pieces; ++m) {
          const Pos ch = g + m * G;
          if (ch < nchunks) {
            if (r.visible(ch * V, V)) {
              float y[V];
              logits(s, ch * V, y);
              norm.apply_as<decltype(huge)::value>(y);
              store_streaming(r.out + ch * V, pack_chunk<T>(y));
            } else {
              store_streaming(r.out + ch * V, hidden_chunk);
            }
          }
          if (++s == slots) s = 0;
        }
      };
      write_row(norm, write);
    } else {
      int s = s0;
      uint32_t par = par0;
      for (int m0 = 0; m0 < pieces; m0 += U) {
        bool vis[U];
        int su[U];
        uint4 raw[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const Pos ch = g + (m0 + u) * G;
          vis[u] = m0 + u < pieces && ch < nchunks && r.visible(ch * V, V);
          su[u] = s;
          if (vis[u]) mbar_wait(smem_u32(&full[s]), par);
          if (++s == slots) {
            s = 0;
            par ^= 1u;
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (vis[u]) raw[u] = lds128(ring + static_cast<size_t>(su[u]) * kPieceBytes + tid * 16);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!vis[u]) continue;
          float sv[V], x[V];
          unpack_chunk<T>(raw[u], sv);
          chunk_logits_along_k<T, MK, BK, V, Pos>(P, r, (g + (m0 + u) * G) * V, sv, x);
          ms_add_chunk<false, V>(st, x);
        }
      }
      const Normaliser norm(reduce_row(st, cluster, sh, nx, huge_sum));
      const uint4 hidden_chunk = norm.hidden_chunk<T, V>();
      auto write = [&](auto huge) {
        int s = s0;
        for (int m0 = 0; m0 < pieces; m0 += U) {
          bool have[U], vis[U];
          uint4 raw[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const Pos ch = g + (m0 + u) * G;
            have[u] = m0 + u < pieces && ch < nchunks;
            vis[u] = have[u] && r.visible(ch * V, V);
            if (vis[u]) raw[u] = lds128(ring + static_cast<size_t>(s) * kPieceBytes + tid * 16);
            if (++s == slots) s = 0;
          }
          uint4 packed[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (!have[u]) continue;
            if (vis[u]) {
              float sv[V], y[V];
              unpack_chunk<T>(raw[u], sv);
              chunk_logits_along_k<T, MK, BK, V, Pos>(P, r, (g + (m0 + u) * G) * V, sv, y);
              norm.apply_as<decltype(huge)::value>(y);
              packed[u] = pack_chunk<T>(y);
            } else {
              packed[u] = hidden_chunk;
            }
          }
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (have[u]) store_streaming(r.out + (g + (m0 + u) * G) * V, packed[u]);
        }
      };
      write_row(norm, write);
    }
    __syncthreads();  // every thread has read the row's pieces
    if (tid < 32)
      for (int64_t q = q0 + slots + tid; q < q0 + slots + pieces && q < total; q += 32) issue(q);
  }
  // No block of a cluster may exit while another can still write to its shared memory.
  if (cluster > 1) cg::this_cluster().sync();
}

// Grid: groups of `cluster` blocks of kStreamThreads, each group striding over rows; the G threads
// of a group take chunk c * G + g of the row.
// ALIGNED: scores and operands are read as 16-byte vectors (the same values); operands
// broadcast along K (stride 0) take ALIGNED = false (rows_vectorisable).
// STAGED (16-byte aligned rows only): the block's parts of its rows pass through the ring of
// kMaxSlots >= `pieces` slots in shared memory.
template <typename T, MaskKind MK, BiasKind BK, bool ALIGNED, bool STAGED>
__global__ void __launch_bounds__(kStreamThreads, 1)
streaming_softmax_kernel(const SoftmaxParams P, int cluster, int pieces) {
  static_assert(ALIGNED || !STAGED, "staged rows are 16-byte aligned");
  __shared__ StreamScratch sh;
  if constexpr (STAGED) {
    staged_rows<T, MK, BK>(P, cluster, pieces, sh);
    return;
  }
  constexpr int V = 16 / sizeof(T);
  constexpr int U = 4;  // chunks loaded together before the arithmetic
  using Pos = int64_t;

  const int crank = cluster > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  const Pos g = static_cast<Pos>(crank) * blockDim.x + threadIdx.x;
  const Pos G = static_cast<Pos>(blockDim.x) * cluster;
  const Pos K = static_cast<Pos>(P.K);
  const Pos nchunks = (K + V - 1) / V;
  const int64_t rows = P.B * P.H * P.Q;
  using R = Row<T, MK, BK, Pos>;
  if (cluster > 1) {
    if (threadIdx.x == 0) {
      sh.xc.init();
      mbar_fence_init();
    }
    cg::this_cluster().sync();  // the other blocks push into this block's barriers
  }
  int k = 0;  // rows done by this block
  for (int64_t row = blockIdx.x / cluster; row < rows; row += gridDim.x / cluster) {
    const R r(P, row);
    auto logits = [&](Pos j0, float (&x)[V]) {
      if constexpr (ALIGNED) {
        float sv[V];
        unpack_chunk<T>(load_streaming(r.in + j0), sv);
        chunk_logits_along_k<T, MK, BK, V, Pos>(P, r, j0, sv, x);
      } else {
        chunk_logits_strided<T, MK, BK, V, Pos>(P, r, j0, x);
      }
    };
    // The logits of the U chunks ch0 + u * G (vis[u]: the chunk exists and has a visible key).
    auto gather = [&](Pos ch0, float (&x)[U][V], bool (&vis)[U]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const Pos j0 = (ch0 + u * G) * V;
        vis[u] = ch0 + u * G < nchunks && r.visible(j0, V);
        if (vis[u]) logits(j0, x[u]);
      }
    };
    // Rows read twice test for huge logits in each chunk of both passes, as in v35: that test cost
    // them nothing measurable (k1mu), and with the staged rows' second sum (reduce_row) and a loop
    // for each answer these variants spilled (docs/perf.md, "v36" and "v37").
    MS st{neg_inf(), 0.0f};
    for (Pos ch0 = g; ch0 < nchunks; ch0 += U * G) {
      float x[U][V];
      bool ok[U];
      gather(ch0, x, ok);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ok[u]) ms_add_chunk<true, V>(st, x[u]);
    }
    const Normaliser norm(block_cluster_reduce_ms(st, cluster, sh, k));
    for (Pos ch0 = g; ch0 < nchunks; ch0 += U * G) {
      float y[U][V];
      bool vis[U];
      gather(ch0, y, vis);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const Pos ch = ch0 + u * G;
        if (ch >= nchunks) continue;
        if (vis[u]) {
          norm.apply(y[u]);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) y[u][e] = norm.hidden;
        }
        if constexpr (ALIGNED) {
          store_streaming(r.out + ch * V, pack_chunk<T>(y[u]));
        } else {
          store_strided<T, V, Pos>(r.out, P.out_stride[3], ch * V, K, y[u]);
        }
      }
    }
    ++k;
  }
  // No block of a cluster may exit while another can still write to its shared memory.
  if (cluster > 1) cg::this_cluster().sync();
}

}  // namespace detail
}  // namespace tp_softmax
