// The fused attention softmax kernel: one templated kernel for every dtype, mask kind,
// bias kind and row configuration. Knows nothing of torch.
//
// A row of K keys is cut into 16-byte chunks of V = 16 / sizeof(T) elements. The G threads
// that share a row (row_threads of one block, times the blocks of a cluster) take chunk
// c * G + g in slot c. With CHUNKS > 0 every slot's raw scores stay in registers: the row is
// read once (online max / sum, then the normalised write from registers). With CHUNKS == 0
// (rows too long for the chip) the row is read twice: the same online pass, then the write.
//
// The reduction order is fixed by (chunk slot, element, lane butterfly, warp order, cluster
// rank order): it depends only on the row configuration, which depends only on K and the
// dtype (and, for keeping float32 logits, on the flags). Vector and scalar loads produce the same values, so neither alignment nor strides
// change the bits.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "softmax.h"

namespace tp_softmax {
namespace detail {

namespace cg = cooperative_groups;

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxBlockThreads = 512;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x with the special-function unit (relative error ~2^-22; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// ALIGNED: the N elements are contiguous, aligned to N * sizeof(T) and all < K. Otherwise
// elements are read one by one (stride `step`), and j >= K reads as 0.
template <bool ALIGNED, typename T, int N, typename Pos>
__device__ __forceinline__ void load_row(const T* row, int64_t step, Pos j0, Pos K, float (&dst)[N]) {
  if constexpr (ALIGNED) {
    const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(row + j0);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = to_float(v.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const Pos j = j0 + e;
      dst[e] = j < K ? to_float(row[j * step]) : 0.0f;
    }
  }
}

template <bool ALIGNED, typename T, int N, typename Pos>
__device__ __forceinline__ void store_row(T* row, int64_t step, Pos j0, Pos K, const float (&src)[N]) {
  if constexpr (ALIGNED) {
    Vec<T, N> v;
#pragma unroll
    for (int e = 0; e < N; ++e) v.v[e] = from_float<T>(src[e]);
    *reinterpret_cast<Vec<T, N>*>(row + j0) = v;
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const Pos j = j0 + e;
      if (j < K) row[j * step] = from_float<T>(src[e]);
    }
  }
}

template <bool ALIGNED, int N, typename Pos>
__device__ __forceinline__ void load_bool(const uint8_t* row, int64_t step, Pos j0, Pos K, bool (&dst)[N]) {
  if (step == 0) {
    const bool b = row[0] != 0;
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = b;
  } else if constexpr (ALIGNED) {
    const Vec<uint8_t, N> v = *reinterpret_cast<const Vec<uint8_t, N>*>(row + j0);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = v.v[e] != 0;
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const Pos j = j0 + e;
      dst[e] = j < K ? row[j * step] != 0 : false;
    }
  }
}

// A broadcast (stride-0) operand reads its one element once.
template <bool ALIGNED, typename T, int N, typename Pos>
__device__ __forceinline__ void load_operand(const T* row, int64_t step, Pos j0, Pos K, float (&dst)[N]) {
  if (step == 0) {
    const float v = to_float(row[0]);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = v;
  } else {
    load_row<ALIGNED, T, N, Pos>(row, step, j0, K, dst);
  }
}

// n = q * d + r for 0 <= n < 2^63 and d >= 1, with magic = floor((2^64 - 1) / d): the
// estimate __umul64hi(n, magic) is q or q - 1 (no 64-bit division routine in the kernel).
__device__ __forceinline__ void divmod(int64_t n, int64_t d, uint64_t magic, int64_t& q, int64_t& r) {
  uint64_t qq = __umul64hi(static_cast<uint64_t>(n), magic);
  uint64_t rr = static_cast<uint64_t>(n) - qq * static_cast<uint64_t>(d);
  if (rr >= static_cast<uint64_t>(d)) {
    ++qq;
    rr -= static_cast<uint64_t>(d);
  }
  q = static_cast<int64_t>(qq);
  r = static_cast<int64_t>(rr);
}

// One row: where its operands start, and which keys it sees (lo <= j <= hi).
template <typename T, MaskKind MK, BiasKind BK, typename Pos>
struct Row {
  using MaskT = typename std::conditional<MK == MaskKind::kBool, uint8_t,
                typename std::conditional<MK == MaskKind::kSame, T, float>::type>::type;
  using BiasT = typename std::conditional<BK == BiasKind::kSame, T, float>::type;
  const T* in;
  T* out;
  const MaskT* mask;
  const BiasT* bias;
  float slope;
  Pos p, lo, hi;  // p: absolute position of the query

  __device__ __forceinline__ Row(const SoftmaxParams& P, int64_t row) {
    int64_t b, h, i;
    divmod(row, P.Q, P.q_magic, b, i);  // b holds b * H + h for now
    divmod(b, P.H, P.h_magic, b, h);
    in = static_cast<const T*>(P.in) + (b * P.in_stride[0] + h * P.in_stride[1] + i * P.in_stride[2]);
    out = static_cast<T*>(P.out) + (b * P.out_stride[0] + h * P.out_stride[1] + i * P.out_stride[2]);
    mask = nullptr;
    bias = nullptr;
    slope = 0.0f;
    if constexpr (MK != MaskKind::kNone)
      mask = static_cast<const MaskT*>(P.mask) +
             (b * P.mask_stride[0] + h * P.mask_stride[1] + i * P.mask_stride[2]);
    if constexpr (BK == BiasKind::kSame || BK == BiasKind::kFloat32)
      bias = static_cast<const BiasT*>(P.bias) +
             (b * P.bias_stride[0] + h * P.bias_stride[1] + i * P.bias_stride[2]);
    if constexpr (BK == BiasKind::kSlopes) slope = P.slopes[b * P.slopes_stride[0] + h * P.slopes_stride[1]];
    const Pos K = static_cast<Pos>(P.K);
    p = static_cast<Pos>(i + P.K - P.Q);
    hi = P.causal ? (p < K - 1 ? p : K - 1) : K - 1;
    const Pos first = p - static_cast<Pos>(P.window) + 1;
    lo = (P.window > 0 && first > 0) ? first : 0;
  }

  __device__ __forceinline__ bool visible(Pos j0, int n) const { return j0 <= hi && j0 + n - 1 >= lo; }
};

// x for the V keys of chunk j0 (hidden keys -inf).
template <bool ALIGNED, typename T, MaskKind MK, BiasKind BK, int V, typename Pos>
__device__ __forceinline__ void chunk_logits(const SoftmaxParams& P, const Row<T, MK, BK, Pos>& r, Pos j0,
                                             float (&x)[V]) {
  using R = Row<T, MK, BK, Pos>;
  const Pos K = static_cast<Pos>(P.K);
  load_row<ALIGNED, T, V, Pos>(r.in, P.in_stride[3], j0, K, x);
#pragma unroll
  for (int e = 0; e < V; ++e) x[e] *= P.layer_scale;
  if constexpr (BK == BiasKind::kSame || BK == BiasKind::kFloat32) {
    float b[V];
    load_operand<ALIGNED, typename R::BiasT, V, Pos>(r.bias, P.bias_stride[3], j0, K, b);
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] += b[e];
  } else if constexpr (BK == BiasKind::kSlopes) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const Pos d = r.p - (j0 + e);
      x[e] += -r.slope * static_cast<float>(d < 0 ? -d : d);
    }
  }
  if constexpr (MK == MaskKind::kBool) {
    bool keep[V];
    load_bool<ALIGNED, V, Pos>(r.mask, P.mask_stride[3], j0, K, keep);
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = keep[e] ? x[e] : neg_inf();
  } else if constexpr (MK == MaskKind::kSame || MK == MaskKind::kFloat32) {
    float m[V];
    load_operand<ALIGNED, typename R::MaskT, V, Pos>(r.mask, P.mask_stride[3], j0, K, m);
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] += m[e];
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const Pos j = j0 + e;
    if (j < r.lo || j > r.hi) x[e] = neg_inf();
  }
}

// ---- the aligned fast path: all loads of a thread first, then the arithmetic -------------------

// 16 bytes of scores, read once: evict-first in the caches.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void store_streaming(void* p, uint4 v) {
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

// The raw scores of one chunk, loaded before any arithmetic of the thread. Masks and biases
// (usually broadcast, so mostly cache hits) are read when the chunk's logits are formed.
template <typename T, MaskKind MK, BiasKind BK, int V>
struct RawChunk {
  using R = Row<T, MK, BK, int>;
  static constexpr bool kMask = MK != MaskKind::kNone;
  static constexpr bool kBias = BK == BiasKind::kSame || BK == BiasKind::kFloat32;
  union {
    uint4 u;
    Vec<T, V> v;
  } s;

  __device__ __forceinline__ void load(const R& r, int j0) { s.u = load_streaming(r.in + j0); }

  // x for the chunk; `mask0` / `bias0`: the row's value when the operand is broadcast along K.
  __device__ __forceinline__ void logits(const SoftmaxParams& P, const R& r, int j0, bool mask_along_k,
                                         bool bias_along_k, float mask0, float bias0, float (&x)[V]) const {
    Vec<typename R::MaskT, V> m;
    Vec<typename R::BiasT, V> b;
    if constexpr (kMask) {
      if (mask_along_k) m = *reinterpret_cast<const Vec<typename R::MaskT, V>*>(r.mask + j0);
    }
    if constexpr (kBias) {
      if (bias_along_k) b = *reinterpret_cast<const Vec<typename R::BiasT, V>*>(r.bias + j0);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float v = to_float(s.v.v[e]) * P.layer_scale;
      if constexpr (kBias) v += bias_along_k ? to_float(b.v[e]) : bias0;
      if constexpr (BK == BiasKind::kSlopes) {
        const int d = r.p - (j0 + e);
        v += -r.slope * static_cast<float>(d < 0 ? -d : d);
      }
      if constexpr (MK == MaskKind::kBool) {
        v = (mask_along_k ? m.v[e] != 0 : mask0 != 0.0f) ? v : neg_inf();
      } else if constexpr (kMask) {
        v += mask_along_k ? to_float(m.v[e]) : mask0;
      }
      const int j = j0 + e;
      x[e] = (j < r.lo || j > r.hi) ? neg_inf() : v;
    }
  }
};

template <typename T>
__device__ __forceinline__ uint4 pack_chunk(const float (&y)[16 / sizeof(T)]) {
  union {
    uint4 u;
    Vec<T, 16 / sizeof(T)> v;
  } o;
#pragma unroll
  for (int e = 0; e < 16 / static_cast<int>(sizeof(T)); ++e) o.v.v[e] = from_float<T>(y[e]);
  return o.u;
}

// ---- reductions with a fixed order -------------------------------------------------------
// The xor butterfly leaves the same bits in every lane (ms_combine is commutative).

// Online softmax state: running max m and sum s of exp(x - m).
struct MS {
  float m, s;
};

__device__ __forceinline__ MS ms_combine(MS a, MS b) {
  const float m = fmaxf(a.m, b.m);
  const float ms = m == neg_inf() ? 0.0f : m;
  return {m, a.s * fast_exp2((a.m - ms) * kLog2e) + b.s * fast_exp2((b.m - ms) * kLog2e)};
}

__device__ __forceinline__ MS lane_reduce_ms(MS v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) {
    MS o{__shfl_xor_sync(0xffffffffu, v.m, off, width), __shfl_xor_sync(0xffffffffu, v.s, off, width)};
    v = ms_combine(v, o);
  }
  return v;
}

// Shared state of a block: per-warp partials and the block's partial for its cluster,
// double-buffered by row parity so one barrier per reduction suffices.
struct SharedScratch {
  float warp_max[2][32];
  float warp_sum[2][32];
  float block_max[2];
  float block_sum[2];
};

// Reduce over the G threads of a row: lanes (butterfly), warps of the block (in order),
// blocks of the cluster (in rank order). Every thread gets the same bits.
__device__ __forceinline__ MS row_reduce_ms(MS v, int row_threads, int cluster, SharedScratch& sh,
                                            int parity) {
  const int width = row_threads < 32 ? row_threads : 32;
  v = lane_reduce_ms(v, width);
  if (row_threads > 32) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
      sh.warp_max[parity][warp] = v.m;
      sh.warp_sum[parity][warp] = v.s;
    }
    __syncthreads();
    const int nw = row_threads >> 5;
    v = {sh.warp_max[parity][0], sh.warp_sum[parity][0]};
    for (int w = 1; w < nw; ++w) v = ms_combine(v, {sh.warp_max[parity][w], sh.warp_sum[parity][w]});
  }
  if (cluster > 1) {
    cg::cluster_group cl = cg::this_cluster();
    if (threadIdx.x == 0) {
      sh.block_max[parity] = v.m;
      sh.block_sum[parity] = v.s;
    }
    cl.sync();
    v = {*cl.map_shared_rank(&sh.block_max[parity], 0), *cl.map_shared_rank(&sh.block_sum[parity], 0)};
    for (int c = 1; c < cluster; ++c)
      v = ms_combine(v, {*cl.map_shared_rank(&sh.block_max[parity], c),
                         *cl.map_shared_rank(&sh.block_sum[parity], c)});
  }
  return v;
}

// ---- the kernel ------------------------------------------------------------------------------
// Launch: block_threads threads per block; a row has row_threads threads of a block
// (row_threads <= 32: block_threads / row_threads rows per block) times `cluster` blocks.
// Grid: groups of `cluster` blocks, each group striding over rows.
// ALIGNED: K is a multiple of V and every operand that varies along K is read with 16-byte
// (bool: V-byte) vectors; the values, and so the bits, are the same either way.
// Launch bounds per variant: up to 4 chunks per thread run in blocks of at most 256 threads,
// 3 blocks per SM (80 registers) unless both a mask and a bias tensor are read (2 blocks, 128);
// 8 chunks and the streaming path in blocks of up to 512 threads with up to 128 registers.
// choose_row_config keeps to these block sizes.
template <int CHUNKS, MaskKind MK, BiasKind BK>
struct Bounds {
  static constexpr bool kSmall = CHUNKS > 0 && CHUNKS <= 4;
  static constexpr bool kTwoOperands =
      MK != MaskKind::kNone && (BK == BiasKind::kSame || BK == BiasKind::kFloat32);
  static constexpr int threads = kSmall ? 256 : kMaxBlockThreads;
  static constexpr int min_blocks = kSmall ? (kTwoOperands ? 2 : 3) : 1;
};

template <typename T, MaskKind MK, BiasKind BK, int CHUNKS, bool ALIGNED>
__global__ void __launch_bounds__(Bounds<CHUNKS, MK, BK>::threads, Bounds<CHUNKS, MK, BK>::min_blocks)
attention_softmax_kernel(const SoftmaxParams P,
                                                                             int row_threads, int cluster) {
  constexpr int V = 16 / sizeof(T);
  // Register variants hold at most 64 * 512 * 16 keys: 32-bit positions suffice.
  using Pos = typename std::conditional<(CHUNKS > 0), int, int64_t>::type;
  __shared__ SharedScratch sh;

  const int lane = threadIdx.x % row_threads;
  const int rows_per_block = blockDim.x / row_threads;
  const int row_in_block = threadIdx.x / row_threads;
  const int crank = cluster > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  const Pos g = static_cast<Pos>(crank) * row_threads + lane;  // thread's index in the row
  const Pos G = static_cast<Pos>(row_threads) * cluster;
  const Pos K = static_cast<Pos>(P.K);
  const int64_t rows = P.B * P.H * P.Q;
  const int64_t group = blockIdx.x / cluster;
  const int64_t ngroups = gridDim.x / cluster;

  int parity = 0;
  for (int64_t base = group * rows_per_block; base < rows; base += ngroups * rows_per_block) {
    const int64_t row = base + row_in_block;
    const bool active = row < rows;
    const Row<T, MK, BK, Pos> r(P, active ? row : 0);

    if constexpr (CHUNKS > 0) {
      // One read: the raw 16-byte chunks of scores stay in registers (4 registers each, whatever
      // the dtype); logits are formed twice from them (online max / sum, then the write), so a
      // thread holds its chunks at half the registers of float32 logits.
      RawChunk<T, MK, BK, V> raw[CHUNKS];
      bool ok[CHUNKS];
      // With both a mask and a bias tensor, re-reading them for the write costs more than keeping
      // the float32 logits (short rows only: 32 of them per thread).
      constexpr bool kKeep = Bounds<CHUNKS, MK, BK>::kTwoOperands && CHUNKS <= 4;
      float kept[kKeep ? CHUNKS : 1][V];
      float mask0 = 0.0f, bias0 = 0.0f;
      const bool mask_k = MK != MaskKind::kNone && P.mask_stride[3] != 0;
      const bool bias_k = (BK == BiasKind::kSame || BK == BiasKind::kFloat32) && P.bias_stride[3] != 0;
      if constexpr (ALIGNED) {
        if constexpr (MK == MaskKind::kBool) {
          if (active && !mask_k) mask0 = r.mask[0] != 0 ? 1.0f : 0.0f;
        } else if constexpr (MK != MaskKind::kNone) {
          if (active && !mask_k) mask0 = to_float(r.mask[0]);
        }
        if constexpr (BK == BiasKind::kSame || BK == BiasKind::kFloat32) {
          if (active && !bias_k) bias0 = to_float(r.bias[0]);
        }
      }
      // Every load of the thread before the first use.
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const Pos j0 = (c * G + g) * V;
        ok[c] = active && j0 < K && r.visible(j0, V);
        if constexpr (ALIGNED) {
          if (ok[c]) raw[c].load(r, j0);
        }
      }
      MS st{neg_inf(), 0.0f};
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (!ok[c]) continue;
        const Pos j0 = (c * G + g) * V;
        float x[V];
        if constexpr (ALIGNED) {
          raw[c].logits(P, r, j0, mask_k, bias_k, mask0, bias0, x);
        } else {
          chunk_logits<ALIGNED, T, MK, BK, V, Pos>(P, r, j0, x);
        }
        if constexpr (kKeep) {
#pragma unroll
          for (int e = 0; e < V; ++e) kept[c][e] = x[e];
        }
        float cm = x[0];
#pragma unroll
        for (int e = 1; e < V; ++e) cm = fmaxf(cm, x[e]);
        if (cm > st.m) {
          st.s *= fast_exp2((st.m - cm) * kLog2e);
          st.m = cm;
        }
        const float shift = (st.m == neg_inf() ? 0.0f : st.m) * kLog2e;
#pragma unroll
        for (int e = 0; e < V; ++e) st.s += fast_exp2(fmaf(x[e], kLog2e, -shift));
      }
      const MS tot = row_reduce_ms(st, row_threads, cluster, sh, parity);
      const float shift = (tot.m == neg_inf() ? 0.0f : tot.m) * kLog2e;
      const float inv = tot.s == 0.0f ? 0.0f : 1.0f / tot.s;  // NaN stays NaN
      const float hidden = 0.0f * inv;                         // 0, or NaN for a NaN row
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const Pos j0 = (c * G + g) * V;
        if (!(active && j0 < K)) continue;
        float y[V];
        if (ok[c]) {
          if constexpr (kKeep) {
#pragma unroll
            for (int e = 0; e < V; ++e) y[e] = kept[c][e];
          } else if constexpr (ALIGNED) {
            raw[c].logits(P, r, j0, mask_k, bias_k, mask0, bias0, y);
          } else {
            chunk_logits<ALIGNED, T, MK, BK, V, Pos>(P, r, j0, y);
          }
#pragma unroll
          for (int e = 0; e < V; ++e) y[e] = fast_exp2(fmaf(y[e], kLog2e, -shift)) * inv;
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) y[e] = hidden;
        }
        if constexpr (ALIGNED) {
          store_streaming(r.out + j0, pack_chunk<T>(y));
        } else {
          store_row<ALIGNED, T, V, Pos>(r.out, P.out_stride[3], j0, K, y);
        }
      }
    } else {
      const Pos nchunks = (K + V - 1) / V;
      constexpr int U = 4;  // chunks loaded together before the arithmetic
      MS st{neg_inf(), 0.0f};
      if (active) {
        for (Pos ch0 = g; ch0 < nchunks; ch0 += U * G) {
          float x[U][V];
          bool ok[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const Pos j0 = (ch0 + u * G) * V;
            ok[u] = ch0 + u * G < nchunks && r.visible(j0, V);
            if (ok[u]) chunk_logits<ALIGNED, T, MK, BK, V, Pos>(P, r, j0, x[u]);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (!ok[u]) continue;
            float cm = x[u][0];
#pragma unroll
            for (int e = 1; e < V; ++e) cm = fmaxf(cm, x[u][e]);
            if (cm > st.m) {
              st.s *= fast_exp2((st.m - cm) * kLog2e);
              st.m = cm;
            }
            const float shift = (st.m == neg_inf() ? 0.0f : st.m) * kLog2e;
#pragma unroll
            for (int e = 0; e < V; ++e) st.s += fast_exp2(fmaf(x[u][e], kLog2e, -shift));
          }
        }
      }
      const MS tot = row_reduce_ms(st, row_threads, cluster, sh, parity);
      const float shift = (tot.m == neg_inf() ? 0.0f : tot.m) * kLog2e;
      const float inv = tot.s == 0.0f ? 0.0f : 1.0f / tot.s;
      const float hidden = 0.0f * inv;
      if (active) {
        for (Pos ch0 = g; ch0 < nchunks; ch0 += U * G) {
          float y[U][V];
          bool vis[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const Pos j0 = (ch0 + u * G) * V;
            vis[u] = ch0 + u * G < nchunks && r.visible(j0, V);
            if (vis[u]) chunk_logits<ALIGNED, T, MK, BK, V, Pos>(P, r, j0, y[u]);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const Pos ch = ch0 + u * G;
            if (ch >= nchunks) continue;
#pragma unroll
            for (int e = 0; e < V; ++e) y[u][e] = vis[u] ? fast_exp2(fmaf(y[u][e], kLog2e, -shift)) * inv : hidden;
            store_row<ALIGNED, T, V, Pos>(r.out, P.out_stride[3], ch * V, K, y[u]);
          }
        }
      }
    }
    parity ^= 1;
  }
  // No block of a cluster may exit while another can still read its shared memory.
  if (cluster > 1) cg::this_cluster().sync();
}

}  // namespace detail
}  // namespace tp_softmax
