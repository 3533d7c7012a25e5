// The two-read kernel, for rows too long to hold on chip (more than 16 x 32 KiB): a cluster of
// blocks shares a row; the row is read once for the online max / sum and again for the write.
#pragma once

#include "common.cuh"

namespace tp_softmax {
namespace detail {

constexpr int kStreamThreads = 512;

// Per-warp partials, double-buffered by row parity so one barrier per reduction suffices, and the
// exchange of the cluster's block partials.
struct StreamScratch {
  float warp_max[2][32];
  float warp_sum[2][32];
  ClusterExchange xc;
};

// Reduce over the threads of a row: lanes (butterfly), warps of the block (in order), blocks of
// the cluster (in rank order). Every thread gets the same bits. `k`: the row's ordinal here.
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
  if (cluster > 1) v = sh.xc.combine(v, cluster, k);
  return v;
}

// Grid: groups of `cluster` blocks of kStreamThreads, each group striding over rows; the G threads
// of a group take chunk c * G + g of the row.
// ALIGNED: scores and operands are read as 16-byte vectors (the same values); operands
// broadcast along K (stride 0) take ALIGNED = false (rows_vectorisable).
template <typename T, MaskKind MK, BiasKind BK, bool ALIGNED>
__global__ void __launch_bounds__(kStreamThreads, 1)
streaming_softmax_kernel(const SoftmaxParams P, int cluster) {
  constexpr int V = 16 / sizeof(T);
  constexpr int U = 4;  // chunks loaded together before the arithmetic
  using Pos = int64_t;
  __shared__ StreamScratch sh;

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
    MS st{neg_inf(), 0.0f};
    for (Pos ch0 = g; ch0 < nchunks; ch0 += U * G) {
      float x[U][V];
      bool ok[U];
      gather(ch0, x, ok);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ok[u]) ms_add_chunk<V>(st, x[u]);
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
#pragma unroll
        for (int e = 0; e < V; ++e) y[u][e] = vis[u] ? norm(y[u][e]) : norm.hidden;
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
