// How fast can the data movement of a case go on this card, with no arithmetic at all?
//
// For a [B, H, Q, K] case, each copy below moves exactly the bytes of the case's floor (the
// operands aside): each row reads the 16-byte chunks that hold its visible keys (causal and
// window, bottom-right aligned as the op's) and writes every chunk of its output (the chunks it
// read, zeros elsewhere).
//   masked4, masked8    a warp a row at a time, rows in order, 4 or 8 chunks a lane loaded before
//                       they are stored, streaming cache hints (masked4p, masked8p: none)
//   flat2, flat4        the order of a device copy: the grid's threads on consecutive chunks of
//                       the flattened output, 2 or 4 chunks a thread a pass (K and Q powers of
//                       two; flat4p: no hints)
//   bulk6               bulk copies through shared memory, as the op moves its rows (tma_masked)
//   bulkcp              cases that read every key: the plain copy of their bytes by bulk copies
//                       (tma_copy)
//   clu, clu-meet       the same, rows longer than 32 KiB: with the op's structure for such rows,
//                       a slice a block of a cluster; clu-meet with a cluster barrier a row
//                       (cluster_copy)
//   read, write         the reads alone and the writes alone of masked8 (flat-rd, flat-wr: of
//                       flat4); GB/s of their own bytes, no efficiency
//   copy                a device copy (cudaMemcpyAsync) of half the floor's bytes, as
//                       launch/bench.py's "copy"
// Each copy's output is checked first (a patterned input, poisoned outputs, a spread of rows).
// Each time is the median of CUDA-event timings over rotating buffer sets (more than 512 MiB in
// all), every timed call queued behind a short spin so that the host's launch latency is not in
// it (probe_util.cuh); the efficiency is floor / (copy bandwidth) / time, as in the bench, with
// the copy bandwidth of a 1024 MiB copy measured in the same run.
//
// Build and run on the GPU machine (seconds):
//   nvcc -std=c++17 -O3 -arch=sm_90 -Icsrc/kernels scripts/pattern_probe.cu -o /tmp/pattern_probe
//   /tmp/pattern_probe                      the causal cases of the public table, and bert
//   /tmp/pattern_probe NAME B H Q K BYTES [causal] [window=N]    one case
//   /tmp/pattern_probe --engine             does the device copy need the SMs (engine_check)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "common.cuh"  // the kernels' bulk-copy and mbarrier helpers (-Icsrc/kernels)
#include "probe_util.cuh"

using namespace tp_softmax::detail;  // bulk copies, mbarriers, cluster barriers

struct Shape {
  int64_t rows, Q, K;
  int elem;        // bytes an element
  bool causal;
  int64_t window;  // 0: none
};

// The visible keys of row i (query i of Q): [lo, hi); hi <= lo when none.
__host__ __device__ inline void visible_span(const Shape& s, int64_t i, int64_t* lo, int64_t* hi) {
  const int64_t p = i + s.K - s.Q;  // the last key the query may see
  *hi = s.causal ? (p + 1 < s.K ? p + 1 : s.K) : s.K;
  *lo = s.window > 0 && p - s.window + 1 > 0 ? p - s.window + 1 : 0;
}

enum Mode { kCopy = 0, kRead = 1, kWrite = 2 };

// Loads and stores: with streaming hints (ld.global.cs / st.global.cs, as the op's stores), or
// without (PLAIN).
template <bool PLAIN>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if constexpr (PLAIN) return *p;
  else return __ldcs(p);
}
template <bool PLAIN>
__device__ __forceinline__ void store16(uint4* p, uint4 v) {
  if constexpr (PLAIN) *p = v;
  else __stcs(p, v);
}

// A warp a row; U chunks a lane in flight: a warp moves 32 * U * 16 bytes of a row at once.
template <int U, int MODE, bool PLAIN = false>
__global__ void __launch_bounds__(256) masked_copy(const uint4* __restrict__ in, uint4* __restrict__ out,
                                                   Shape s, int* sink) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int vpc = 16 / s.elem;
  const int64_t nch = s.K / vpc;
  uint32_t acc = 0;
  for (int64_t row = warp; row < s.rows; row += nwarps) {
    int64_t lo, hi;
    visible_span(s, row % s.Q, &lo, &hi);
    const int64_t c_lo = lo / vpc, c_hi = hi > lo ? (hi + vpc - 1) / vpc : c_lo;  // chunks to read
    const uint4* src = in + row * nch;
    uint4* dst = out + row * nch;
    for (int64_t c0 = 0; c0 < nch; c0 += 32 * U) {
      uint4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * 32 + lane;
        v[u] = make_uint4(0, 0, 0, 0);
        if (MODE != kWrite && c >= c_lo && c < c_hi) v[u] = load16<PLAIN>(src + c);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * 32 + lane;
        if (MODE == kRead) {
          acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        } else if (c < nch) {
          store16<PLAIN>(dst + c, v[u]);
        }
      }
    }
  }
  if (MODE == kRead && acc == 0x9e3779b9u) atomicAdd(sink, 1);  // keeps the loads
}

// The same bytes, in the order of a device copy: the threads of the grid take consecutive chunks
// of the flattened [rows, K] output, U a thread a pass (16-byte chunks of whole rows; nch and Q
// powers of two, so that a chunk's row and query are shifts and masks).
template <int U, int MODE, bool PLAIN = false>
__global__ void __launch_bounds__(256) flat_copy(const uint4* __restrict__ in, uint4* __restrict__ out, Shape s,
                                                 int nch_log2, int q_log2, int* sink) {
  const int vpc = 16 / s.elem;
  const int64_t total = s.rows << nch_log2;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * U;
  uint32_t acc = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * U; base < total; base += step) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t g = base + u * blockDim.x + threadIdx.x;
      v[u] = make_uint4(0, 0, 0, 0);
      if (MODE != kWrite && g < total) {
        const int64_t row = g >> nch_log2;
        const int64_t c = g & ((int64_t(1) << nch_log2) - 1);
        int64_t lo, hi;
        visible_span(s, row & ((int64_t(1) << q_log2) - 1), &lo, &hi);
        if (hi > lo && c >= lo / vpc && c < (hi + vpc - 1) / vpc) v[u] = load16<PLAIN>(in + g);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t g = base + u * blockDim.x + threadIdx.x;
      if (MODE == kRead) {
        acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
      } else if (g < total) {
        store16<PLAIN>(out + g, v[u]);
      }
    }
  }
  if (MODE == kRead && acc == 0x9e3779b9u) atomicAdd(sink, 1);  // keeps the loads
}

struct Case {
  std::string name;
  int64_t B, H, Q, K;
  int elem;
  bool causal;
  int64_t window;
};

static int log2_exact(int64_t v) {  // -1 unless a power of two
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return (int64_t(1) << l) == v ? l : -1;
}

// Launches variant (FLAT, U, MODE) on every resident block slot of the GPU.
template <bool FLAT, int U, int MODE, bool PLAIN = false>
static void launch_variant(const uint4* in, uint4* out, const Shape& s, int* sink) {
  const int sms = sm_count();
  int per_sm = 0;
  if constexpr (FLAT) {
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, flat_copy<U, MODE, PLAIN>, 256, 0));
    flat_copy<U, MODE, PLAIN><<<sms * per_sm, 256>>>(in, out, s, log2_exact(s.K * s.elem / 16), log2_exact(s.Q), sink);
  } else {
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, masked_copy<U, MODE, PLAIN>, 256, 0));
    masked_copy<U, MODE, PLAIN><<<sms * per_sm, 256>>>(in, out, s, sink);
  }
  CHECK(cudaGetLastError());
}

template <bool FLAT, int U, bool PLAIN = false>
static double time_mode(int mode, const std::vector<uint4*>& ins, const std::vector<uint4*>& outs, const Shape& s,
                        int* sink, int reps) {
  return time_launches(
      [&](int i) {
        const uint4* in = ins[i % ins.size()];
        uint4* out = outs[i % outs.size()];
        if (mode == kCopy) launch_variant<FLAT, U, kCopy, PLAIN>(in, out, s, sink);
        else if (mode == kRead) launch_variant<FLAT, U, kRead, PLAIN>(in, out, s, sink);
        else launch_variant<FLAT, U, kWrite, PLAIN>(in, out, s, sink);
      },
      reps, 3);
}

static double time_memcpy(size_t bytes, int reps, const std::vector<uint4*>& ins, const std::vector<uint4*>& outs) {
  return time_launches(
      [&](int i) {
        CHECK(cudaMemcpyAsync(outs[i % outs.size()], ins[i % ins.size()], bytes, cudaMemcpyDeviceToDevice));
      },
      reps, 2);
}

// A plain copy of `n` 16-byte chunks, each block its own contiguous slab, U chunks a thread a pass.
template <int U>
__global__ void __launch_bounds__(256) slab_copy(const uint4* __restrict__ in, uint4* __restrict__ out, int64_t n) {
  const int64_t per = (n + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per, hi = lo + per < n ? lo + per : n;
  for (int64_t base = lo; base < hi; base += int64_t(blockDim.x) * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t g = base + u * blockDim.x + threadIdx.x;
      if (g < hi) v[u] = in[g];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t g = base + u * blockDim.x + threadIdx.x;
      if (g < hi) out[g] = v[u];
    }
  }
}

constexpr int kPiece = 32768;
// The ring of S stages: the next one, and the parity of its mbarrier's phase once past the last.
template <int S>
__device__ __forceinline__ void next_stage(int& s, uint32_t& phase) {
  if (++s == S) {
    s = 0;
    phase ^= 1u;
  }
}

// A plain copy by the bulk copy engine, as the op moves its rows: pieces of `kPiece` bytes, piece
// p to block p % blocks; one thread a block keeps S pieces in flight (global -> shared with an
// mbarrier each), sends each piece on from shared memory with a bulk store, and refills its stage
// once that store has read it.
template <int S>
__global__ void tma_copy(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t pieces) {
  extern __shared__ __align__(128) uint8_t stage[];
  __shared__ __align__(8) uint64_t full[S];
  if (threadIdx.x != 0) return;
  const uint64_t pol = l2_policy<true>();
  for (int s = 0; s < S; ++s) mbar_init(smem_u32(&full[s]), 1);
  mbar_fence_init();
  const int64_t nb = gridDim.x;
  auto issue = [&](int s, int64_t p) {
    mbar_arrive_expect_tx(smem_u32(&full[s]), kPiece);
    bulk_copy(smem_u32(stage + s * kPiece), in + p * kPiece, kPiece, smem_u32(&full[s]), pol);
  };
  for (int s = 0; s < S; ++s)
    if (blockIdx.x + s * nb < pieces) issue(s, blockIdx.x + s * nb);
  uint32_t phase = 0;
  int s = 0;
  for (int64_t p = blockIdx.x; p < pieces; p += nb) {
    mbar_wait(smem_u32(&full[s]), phase);
    bulk_store(out + p * kPiece, smem_u32(stage + s * kPiece), kPiece, pol);
    bulk_commit();
    const int64_t next = p + S * nb;
    if (next < pieces) {
      bulk_wait_read();
      issue(s, next);
    }
    next_stage<S>(s, phase);
  }
  bulk_wait();
}

// The masked copy by the bulk copy engine, as the op moves its rows: pieces of `rpp` whole rows
// (at most 32 rows and kPiece bytes), piece p to block p % blocks, one warp a block with S pieces
// in flight, lane r for row r of a piece. Each row's visible chunks come into the stage by one bulk
// copy; its output leaves by bulk stores, the visible chunks from the stage and the hidden ones
// from a row of zeros kept in shared memory. The stage is refilled once those stores have read it.
template <int S>
__global__ void __launch_bounds__(32) tma_masked(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, Shape s,
                                                 int rpp) {
  extern __shared__ __align__(128) uint8_t stage[];
  __shared__ __align__(8) uint64_t full[S];
  const int lane = threadIdx.x;
  const int64_t rb = s.K * s.elem;  // bytes a row
  uint8_t* zeros = stage + S * kPiece;
  for (int64_t i = lane; i < rb / 16; i += 32) reinterpret_cast<uint4*>(zeros)[i] = make_uint4(0, 0, 0, 0);
  tp_softmax::detail::fence_proxy_async_smem();
  if (lane == 0) {
    for (int i = 0; i < S; ++i) mbar_init(smem_u32(&full[i]), 1);
    mbar_fence_init();
  }
  __syncwarp();
  const uint64_t pol = l2_policy<true>();
  const int vpc = 16 / s.elem;
  const int64_t nch = s.K / vpc, nb = gridDim.x, pieces = (s.rows + rpp - 1) / rpp;
  // This lane's row of piece p and its visible chunks [c_lo, c_hi); false past the last row.
  auto my_row = [&](int64_t p, int64_t* row, int64_t* c_lo, int64_t* c_hi) {
    *row = p * rpp + lane;
    if (lane >= rpp || *row >= s.rows) return false;
    int64_t lo, hi;
    visible_span(s, *row % s.Q, &lo, &hi);
    *c_lo = hi > lo ? lo / vpc : 0;
    *c_hi = hi > lo ? (hi + vpc - 1) / vpc : 0;
    return true;
  };
  auto issue = [&](int st, int64_t p) {
    int64_t row, c_lo = 0, c_hi = 0;
    const bool mine = my_row(p, &row, &c_lo, &c_hi);
    const uint32_t tx = __reduce_add_sync(0xffffffffu, mine ? static_cast<uint32_t>(c_hi - c_lo) * 16u : 0u);
    if (lane == 0) mbar_arrive_expect_tx(smem_u32(&full[st]), tx);
    __syncwarp();
    if (mine && c_hi > c_lo)
      bulk_copy(smem_u32(stage + st * kPiece + lane * rb + c_lo * 16), in + row * rb + c_lo * 16,
                static_cast<uint32_t>(c_hi - c_lo) * 16u, smem_u32(&full[st]), pol);
  };
  for (int st = 0; st < S; ++st)
    if (blockIdx.x + st * nb < pieces) issue(st, blockIdx.x + st * nb);
  uint32_t phase = 0;
  int st = 0;
  for (int64_t p = blockIdx.x; p < pieces; p += nb) {
    mbar_wait(smem_u32(&full[st]), phase);
    int64_t row, c_lo, c_hi;
    if (my_row(p, &row, &c_lo, &c_hi)) {
      uint8_t* dst = out + row * rb;
      if (c_hi > c_lo) {
        if (c_lo > 0) bulk_store(dst, smem_u32(zeros), static_cast<uint32_t>(c_lo) * 16u, pol);
        bulk_store(dst + c_lo * 16, smem_u32(stage + st * kPiece + lane * rb + c_lo * 16),
                   static_cast<uint32_t>(c_hi - c_lo) * 16u, pol);
        if (c_hi < nch) bulk_store(dst + c_hi * 16, smem_u32(zeros), static_cast<uint32_t>(nch - c_hi) * 16u, pol);
      } else {
        bulk_store(dst, smem_u32(zeros), static_cast<uint32_t>(rb), pol);
      }
      bulk_commit();
    }
    const int64_t next = p + S * nb;
    if (next < pieces) {
      bulk_wait_read();
      __syncwarp();
      issue(st, next);
    }
    next_stage<S>(st, phase);
  }
  bulk_wait();
}

// tma_masked with 6 pieces in flight, one block an SM (rows of at most kPiece bytes).
static void launch_bulk(const uint4* in, uint4* out, const Shape& s) {
  const int sms = sm_count();
  const int64_t rb = s.K * s.elem;
  const int smem = static_cast<int>(6 * kPiece + rb);
  CHECK(cudaFuncSetAttribute(tma_masked<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  tma_masked<6><<<sms, 32, smem>>>(reinterpret_cast<const uint8_t*>(in), reinterpret_cast<uint8_t*>(out), s,
                                   static_cast<int>(kPiece / rb < 32 ? kPiece / rb : 32));
  CHECK(cudaGetLastError());
}

// A plain copy of `bytes` (a multiple of kPiece) by tma_copy, one block an SM, 6 pieces in flight.
static void launch_bulk_plain(const uint4* in, uint4* out, size_t bytes) {
  const int sms = sm_count();
  CHECK(cudaFuncSetAttribute(tma_copy<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, 6 * kPiece));
  tma_copy<6><<<sms, 32, 6 * kPiece>>>(reinterpret_cast<const uint8_t*>(in), reinterpret_cast<uint8_t*>(out),
                                       static_cast<int64_t>(bytes / kPiece));
  CHECK(cudaGetLastError());
}

// A plain copy with the op's structure for rows longer than a block's slice, and no arithmetic:
// the blocks of a cluster each take a slice of a row (rank r the r-th), cluster c the rows c,
// c + clusters, ...; one warp a block, S slices in flight (global -> shared with an mbarrier
// each, shared -> global by a bulk store, the stage refilled once that store has read it). With
// `meet`, the blocks of the cluster meet at a cluster barrier for each row once their slice has
// come in and before they store it, as the op's blocks do to combine their partials.
template <int S>
__global__ void __launch_bounds__(32) cluster_copy(const uint8_t* __restrict__ in, uint8_t* __restrict__ out,
                                                   int64_t rows, int64_t rb, int meet) {
  extern __shared__ __align__(128) uint8_t stage[];
  __shared__ __align__(8) uint64_t full[S];
  const int lane = threadIdx.x;
  const int cs = static_cast<int>(cooperative_groups::this_cluster().num_blocks());
  const int rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
  const uint32_t slice = static_cast<uint32_t>(rb / cs);
  const int64_t cid = blockIdx.x / cs, ncl = gridDim.x / cs;
  if (lane == 0) {
    for (int i = 0; i < S; ++i) mbar_init(smem_u32(&full[i]), 1);
    mbar_fence_init();
  }
  __syncwarp();
  const uint64_t pol = l2_policy<true>();
  auto issue = [&](int st, int64_t row) {
    if (lane != 0) return;
    mbar_arrive_expect_tx(smem_u32(&full[st]), slice);
    bulk_copy(smem_u32(stage + st * slice), in + row * rb + rank * int64_t(slice), slice, smem_u32(&full[st]), pol);
  };
  for (int st = 0; st < S; ++st)
    if (cid + st * ncl < rows) issue(st, cid + st * ncl);
  uint32_t phase = 0;
  int st = 0;
  for (int64_t row = cid; row < rows; row += ncl) {
    mbar_wait(smem_u32(&full[st]), phase);
    if (meet) {
      cluster_arrive_relaxed();
      cluster_wait();
    }
    if (lane == 0) {
      bulk_store(out + row * rb + rank * int64_t(slice), smem_u32(stage + st * slice), slice, pol);
      bulk_commit();
      if (row + S * ncl < rows) {
        bulk_wait_read();
        issue(st, row + S * ncl);
      }
    }
    next_stage<S>(st, phase);
  }
  if (lane == 0) bulk_wait();
}

// The cluster size of cluster_copy for rows of `rb` bytes, as the op's for such rows: the
// smallest power of two from 2 to 16 whose slices are at most kPiece bytes (0: none).
static int cluster_blocks(int64_t rb) {
  for (int cs = 2; cs <= 16; cs *= 2)
    if (rb % (16 * cs) == 0 && rb / cs <= kPiece) return cs;
  return 0;
}

// cluster_copy of `rows` rows of `rb` bytes, 3 slices in flight a block, as many clusters as fit.
static void launch_cluster_copy(const uint4* in, uint4* out, int64_t rows, int64_t rb, bool meet) {
  const int cs = cluster_blocks(rb);
  const int smem = static_cast<int>(3 * (rb / cs));
  CHECK(cudaFuncSetAttribute(cluster_copy<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CHECK(cudaFuncSetAttribute(cluster_copy<3>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cs;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.blockDim = dim3(32);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cfg.gridDim = dim3(cs);
  int clusters = 0;
  CHECK(cudaOccupancyMaxActiveClusters(&clusters, cluster_copy<3>, &cfg));
  cfg.gridDim = dim3(cs * clusters);
  CHECK(cudaLaunchKernelEx(&cfg, cluster_copy<3>, reinterpret_cast<const uint8_t*>(in), reinterpret_cast<uint8_t*>(out),
                           rows, rb, meet ? 1 : 0));
}

// Chunk i holds (i, 3i + 1, ~i, i ^ 0x5a5a5a5a) in its low bits: a copy that moves a chunk to the
// wrong place shows.
__host__ __device__ inline uint4 chunk_pattern(int64_t i) {
  const uint32_t v = static_cast<uint32_t>(i);
  return make_uint4(v, 3 * v + 1, ~v, v ^ 0x5a5a5a5au);
}
__global__ void fill_pattern(uint4* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = chunk_pattern(i);
}


// Does cudaMemcpyAsync (device to device) need the SMs? A 1024 MiB copy timed alone, then again
// on another stream while a kernel holds every thread slot of every SM and spins for 20x as long
// as the copy took; a copy that needs the SMs waits for that kernel. Also a 1024 MiB copy by the
// the same bytes by kernels of a few designs: 16-byte loads and stores in the flat order or a slab
// a block, and bulk copies through shared memory, as the op moves its rows.
static int engine_check() {
  const size_t bytes = size_t(1) << 30;
  uint4 *a, *b;
  CHECK(cudaMalloc(&a, bytes));
  CHECK(cudaMalloc(&b, bytes));
  fill_pattern<<<1024, 256>>>(a, bytes / 16);
  CHECK(cudaGetLastError());
  std::vector<uint4*> ins{a}, outs{b};
  const double alone = time_memcpy(bytes, 10, ins, outs);
  const int sms = sm_count();
  int per_sm;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, probe_spin, 1024, 0));
  cudaStream_t hs, cs;
  CHECK(cudaStreamCreateWithFlags(&hs, cudaStreamNonBlocking));
  CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  const uint64_t spin_ns = static_cast<uint64_t>(alone * 1e6 * 20);
  probe_spin<<<sms * per_sm, 1024, 0, hs>>>(spin_ns);
  CHECK(cudaGetLastError());
  // (the host waits a copy's time, so that the spinning kernel holds every SM)
  std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(alone * 1e3) + 100));
  CHECK(cudaEventRecord(e0, cs));
  CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, cs));
  CHECK(cudaEventRecord(e1, cs));
  CHECK(cudaDeviceSynchronize());
  float during;
  CHECK(cudaEventElapsedTime(&during, e0, e1));
  std::printf("engine check: 1024 MiB device copy alone %.4f ms (%.1f GB/s read + written)\n", alone,
              2.0 * bytes / (alone * 1e-3) * 1e-9);
  std::printf("engine check: the same copy while %d x 1024 threads spin for %.1f ms: %.4f ms -> %s\n",
              sms * per_sm, spin_ns * 1e-6, during,
              during < 2 * alone ? "it does not wait for the SMs (copy engine)" : "it waited for the SMs");
  // The same 1024 MiB by kernels of a few designs, each checked against the input.
  Shape flat{int64_t(bytes / 4096), int64_t(bytes / 4096), 2048, 2, false, 0};
  const int64_t n16 = bytes / 16;
  CHECK(cudaFuncSetAttribute(tma_copy<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, 6 * kPiece));
  CHECK(cudaFuncSetAttribute(tma_copy<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, 3 * kPiece));
  int slab_per_sm;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&slab_per_sm, slab_copy<4>, 256, 0));
  struct Design {
    const char* name;
    std::function<void()> run;
  };
  const uint8_t* a8 = reinterpret_cast<const uint8_t*>(a);
  uint8_t* b8 = reinterpret_cast<uint8_t*>(b);
  std::vector<Design> designs = {
      {"flat, 4 chunks a thread", [&] { launch_variant<true, 4, kCopy, true>(a, b, flat, nullptr); }},
      {"flat, 8 chunks a thread", [&] { launch_variant<true, 8, kCopy, true>(a, b, flat, nullptr); }},
      {"slab a block, 4 chunks a thread", [&] { slab_copy<4><<<sms * slab_per_sm, 256>>>(a, b, n16); }},
      {"bulk copies, 1 block an SM x 6 pieces of 32 KiB",
       [&] { tma_copy<6><<<sms, 32, 6 * kPiece>>>(a8, b8, bytes / kPiece); }},
      {"bulk copies, 2 blocks an SM x 3 pieces of 32 KiB",
       [&] { tma_copy<3><<<2 * sms, 32, 3 * kPiece>>>(a8, b8, bytes / kPiece); }},
  };
  std::vector<uint4> got(256);
  for (const Design& d : designs) {
    CHECK(cudaMemset(b, 0xff, bytes));
    d.run();
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    for (size_t off = 0; off < bytes; off += bytes / 61 / 4096 * 4096) {
      CHECK(cudaMemcpy(got.data(), b8 + off, 4096, cudaMemcpyDeviceToHost));
      for (int i = 0; i < 256; ++i) {
        const uint4 w = chunk_pattern(static_cast<int64_t>(off / 16) + i);
        if (got[i].x != w.x || got[i].y != w.y || got[i].z != w.z || got[i].w != w.w) {
          std::fprintf(stderr, "engine check: %s: wrong bytes at %zu\n", d.name, off + 16 * i);
          return 1;
        }
      }
    }
    const double ms = time_launches([&](int) { d.run(); }, 10, 2);
    std::printf("engine check: 1024 MiB copied by a kernel, %-48s %.4f ms (%.1f GB/s, %.3f of the device copy)\n",
                d.name, ms, 2.0 * bytes / (ms * 1e-3) * 1e-9, alone / ms);
  }
  CHECK(cudaFree(a));
  CHECK(cudaFree(b));
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && !std::strcmp(argv[1], "--engine")) return engine_check();
  std::vector<Case> cases;
  if (argc >= 7) {
    Case c{argv[1], std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5]),
           std::atoi(argv[6]), false, 0};
    for (int i = 7; i < argc; ++i) {
      if (!std::strcmp(argv[i], "causal")) c.causal = true;
      else if (!std::strncmp(argv[i], "window=", 7)) c.window = std::atoll(argv[i] + 7);
      else { std::fprintf(stderr, "unknown flag %s\n", argv[i]); return 2; }
    }
    if (c.elem != 2 && c.elem != 4) { std::fprintf(stderr, "BYTES: 2 or 4\n"); return 2; }
    cases.push_back(c);
  } else if (argc == 1) {
    // The local shapes of the public table's cases (launch/benchlib.py); operands left out.
    cases = {{"bloom176b-prefill-tp2", 1, 56, 2048, 2048, 2, true, 0},
             {"gpt-prefill-b8", 8, 16, 1024, 1024, 2, true, 0},
             {"bert-b32-s512", 32, 16, 512, 512, 2, false, 0},
             {"long-8k", 1, 16, 8192, 8192, 2, true, 0},
             {"window-4k-w1k", 2, 16, 4096, 4096, 2, true, 1024},
             {"fp32-alibi-s512", 4, 16, 512, 512, 4, true, 0}};
  } else {
    std::fprintf(stderr, "usage: %s [NAME B H Q K BYTES [causal] [window=N]]\n", argv[0]);
    return 2;
  }
  int dev;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  const int reps = 30;

  // The copy bandwidth, as the bench measures it: a 1024 MiB copy, bytes read + written.
  const size_t kCopyBytes = size_t(1) << 30;
  std::vector<uint4*> cin(2), cout_(2);
  for (auto& p : cin) CHECK(cudaMalloc(&p, kCopyBytes));
  for (auto& p : cout_) CHECK(cudaMalloc(&p, kCopyBytes));
  const double copy_ms = time_memcpy(kCopyBytes, 10, cin, cout_);
  const double bw = 2.0 * kCopyBytes / (copy_ms * 1e-3);  // bytes / s
  for (auto p : cin) CHECK(cudaFree(p));
  for (auto p : cout_) CHECK(cudaFree(p));
  int* sink;
  CHECK(cudaMalloc(&sink, sizeof(int)));

  std::printf("pattern probe: %s, copy bandwidth %.1f GB/s (1024 MiB a copy)\n", prop.name, bw * 1e-9);
  std::printf("%-22s %-8s %9s %8s %6s   (eff = floor at the copy bandwidth / time)\n", "case", "mode", "ms",
              "GB/s", "eff");
  for (const Case& c : cases) {
    Shape s{c.B * c.H * c.Q, c.Q, c.K, c.elem, c.causal, c.window};
    if ((c.K * c.elem) % 16 != 0) {
      std::fprintf(stderr, "%s: rows not whole 16-byte chunks\n", c.name.c_str());
      return 2;
    }
    int64_t visible = 0;
    for (int64_t i = 0; i < c.Q; ++i) {
      int64_t lo, hi;
      visible_span(s, i, &lo, &hi);
      visible += std::max<int64_t>(0, hi - lo);
    }
    const double read_bytes = double(visible) * c.B * c.H * c.elem;
    const double write_bytes = double(s.rows) * c.K * c.elem;
    const double floor_bytes = read_bytes + write_bytes;
    const size_t bytes = size_t(s.rows) * c.K * c.elem;
    const int sets = static_cast<int>(std::max<size_t>(1, ((size_t(512) << 20) + 2 * bytes - 1) / (2 * bytes)));
    std::vector<uint4*> ins(sets), outs(sets);
    for (auto& p : ins) {
      CHECK(cudaMalloc(&p, bytes));
      fill_pattern<<<1024, 256>>>(p, bytes / 16);
      CHECK(cudaGetLastError());
    }
    for (auto& p : outs) CHECK(cudaMalloc(&p, bytes));
    // The copies move what they should: a patterned input, poisoned outputs, then every chunk of a
    // spread of rows checked (the chunks of visible keys hold the input's, the others zeros).
    const bool flat = log2_exact(c.K * c.elem / 16) >= 0 && log2_exact(c.Q) >= 0;
    const bool bulk = c.K * c.elem <= kPiece;
    const bool plain = !c.causal && c.window == 0 && bytes % kPiece == 0;
    const int64_t rb = c.K * c.elem;
    const bool clustered = plain && rb > kPiece && cluster_blocks(rb) > 0;
    const char* names[] = {"masked", "flat", "bulk", "bulk plain", "cluster", "cluster, meeting"};
    for (int variant = 0; variant < 6; ++variant) {
      if ((variant == 1 && !flat) || (variant == 2 && !bulk) || (variant == 3 && !plain) ||
          (variant >= 4 && !clustered))
        continue;
      CHECK(cudaMemset(outs[0], 0xff, bytes));
      if (variant == 0) launch_variant<false, 4, kCopy>(ins[0], outs[0], s, sink);
      else if (variant == 1) launch_variant<true, 4, kCopy>(ins[0], outs[0], s, sink);
      else if (variant == 2) launch_bulk(ins[0], outs[0], s);
      else if (variant == 3) launch_bulk_plain(ins[0], outs[0], bytes);
      else launch_cluster_copy(ins[0], outs[0], s.rows, rb, variant == 5);
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      const int64_t nch = c.K * c.elem / 16, vpc = 16 / c.elem;
      std::vector<uint4> h(nch);
      for (int64_t r = 0; r < s.rows; r += std::max<int64_t>(1, s.rows / 257)) {
        CHECK(cudaMemcpy(h.data(), outs[0] + r * nch, h.size() * 16, cudaMemcpyDeviceToHost));
        int64_t lo, hi;
        visible_span(s, r % s.Q, &lo, &hi);
        const int64_t c_lo = lo / vpc, c_hi = hi > lo ? (hi + vpc - 1) / vpc : c_lo;
        for (int64_t ch = 0; ch < nch; ++ch) {
          const uint4 w = ch >= c_lo && ch < c_hi ? chunk_pattern(r * nch + ch) : make_uint4(0, 0, 0, 0);
          if (h[ch].x != w.x || h[ch].y != w.y || h[ch].z != w.z || h[ch].w != w.w) {
            std::fprintf(stderr, "%s: %s copy: row %lld chunk %lld wrong\n", c.name.c_str(), names[variant],
                         (long long)r, (long long)ch);
            return 1;
          }
        }
      }
    }
    auto row = [&](const char* mode, double ms, double moved) {
      const bool whole = std::strstr(mode, "read") == nullptr && std::strstr(mode, "write") == nullptr &&
                         std::strstr(mode, "-rd") == nullptr && std::strstr(mode, "-wr") == nullptr;
      std::printf("%-22s %-8s %9.4f %8.1f ", c.name.c_str(), mode, ms, moved / (ms * 1e-3) * 1e-9);
      if (whole) std::printf("%6.3f\n", floor_bytes / bw / (ms * 1e-3));
      else std::printf("%6s\n", "-");
    };
    const double mc = time_memcpy(static_cast<size_t>(floor_bytes / 2) / 16 * 16, reps, ins, outs);
    row("copy", mc, floor_bytes);
    row("masked4", time_mode<false, 4>(kCopy, ins, outs, s, sink, reps), floor_bytes);
    row("masked8", time_mode<false, 8>(kCopy, ins, outs, s, sink, reps), floor_bytes);
    row("masked4p", time_mode<false, 4, true>(kCopy, ins, outs, s, sink, reps), floor_bytes);
    row("masked8p", time_mode<false, 8, true>(kCopy, ins, outs, s, sink, reps), floor_bytes);
    row("read", time_mode<false, 8>(kRead, ins, outs, s, sink, reps), read_bytes);
    row("write", time_mode<false, 8>(kWrite, ins, outs, s, sink, reps), write_bytes);
    if (bulk)
      row("bulk6", time_launches([&](int i) { launch_bulk(ins[i % ins.size()], outs[i % outs.size()], s); }, reps, 3),
          floor_bytes);
    if (plain)  // every key read: a plain copy
      row("bulkcp", time_launches([&](int i) { launch_bulk_plain(ins[i % ins.size()], outs[i % outs.size()], bytes); },
                                  reps, 3),
          floor_bytes);
    if (clustered) {
      for (int meet = 0; meet < 2; ++meet)
        row(meet ? "clu-meet" : "clu",
            time_launches(
                [&](int i) { launch_cluster_copy(ins[i % ins.size()], outs[i % outs.size()], s.rows, rb, meet); },
                reps, 3),
            floor_bytes);
    }
    if (flat) {
      row("flat2", time_mode<true, 2>(kCopy, ins, outs, s, sink, reps), floor_bytes);
      row("flat4", time_mode<true, 4>(kCopy, ins, outs, s, sink, reps), floor_bytes);
      row("flat4p", time_mode<true, 4, true>(kCopy, ins, outs, s, sink, reps), floor_bytes);
      row("flat-rd", time_mode<true, 4>(kRead, ins, outs, s, sink, reps), read_bytes);
      row("flat-wr", time_mode<true, 4>(kWrite, ins, outs, s, sink, reps), write_bytes);
    }
    for (auto p : ins) CHECK(cudaFree(p));
    for (auto p : outs) CHECK(cudaFree(p));
  }
  CHECK(cudaFree(sink));
  return 0;
}
