// Launching the kernels for one scores dtype: the mask / bias kinds and the alignment become
// template parameters here (static_switch.h). Included by one .cu file per dtype so that the
// instantiations compile in parallel.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "softmax.h"
#include "staged_kernel.cuh"
#include "static_switch.h"
#include "streaming_kernel.cuh"

namespace tp_softmax {
namespace detail {

// A launch of `blocks` blocks in clusters of `cluster` (1-D); `attr` holds the cluster attribute.
inline cudaLaunchConfig_t cluster_launch_config(int64_t blocks, int threads, int smem, int cluster,
                                                cudaStream_t stream, cudaLaunchAttribute (&attr)[1]) {
  cudaLaunchConfig_t lc = {};
  lc.gridDim = dim3(static_cast<unsigned>(blocks));
  lc.blockDim = dim3(static_cast<unsigned>(threads));
  lc.dynamicSmemBytes = static_cast<size_t>(smem);
  lc.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  lc.attrs = attr;
  lc.numAttrs = 1;
  return lc;
}

// Blocks of `kernel` (in units of `cluster`) that are resident at once on the current device;
// the function attributes are set on the first call per kernel, device, cluster size and dynamic
// shared memory size.
inline cudaError_t resident_units(const void* kernel, int threads, int smem, int cluster, int64_t& units,
                                  int max_smem = kStagedSmemBudget) {
  struct Entry {
    const void* kernel;
    int device, cluster, smem;
    int64_t units;
  };
  static std::mutex mu;
  static Entry cache[256];
  static int used = 0;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < used; ++i)
    if (cache[i].kernel == kernel && cache[i].device == dev && cache[i].cluster == cluster && cache[i].smem == smem) {
      units = cache[i].units;
      return cudaSuccess;
    }
  if (smem > 0) {
    // The largest size any launch of the kernel asks for (the layout depends on the operands).
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
    if (e != cudaSuccess) return e;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
    if (e != cudaSuccess) return e;
  }
  if (cluster > 8) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return e;
  }
  if (cluster > 1) {
    // Blocks of one cluster may share an SM: more clusters are resident than when each block of a
    // cluster takes an SM of its own (the spread policy).
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeClusterSchedulingPolicyPreference,
                             cudaClusterSchedulingPolicyLoadBalancing);
    if (e != cudaSuccess) return e;
  }
  int sms = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  int n = 0;
  if (cluster == 1) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
    if (e != cudaSuccess) return e;
    n *= sms;
  } else {
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t lc = cluster_launch_config(int64_t{cluster} * sms, threads, smem, cluster, nullptr, attr);
    e = cudaOccupancyMaxActiveClusters(&n, kernel, &lc);
    if (e != cudaSuccess) return e;
  }
  if (n < 1) n = 1;  // the launch then reports why it cannot run
  units = n;
  if (std::getenv("TP_SOFTMAX_LAUNCH_INFO") != nullptr)
    std::fprintf(stderr, "tp_softmax launch: device %d, %d SMs, cluster %d, %d threads, %d B dynamic smem: %lld units resident\n",
                 dev, sms, cluster, threads, smem, static_cast<long long>(units));
  if (used < 256) cache[used++] = {kernel, dev, cluster, smem, units};
  return cudaSuccess;
}

template <typename... Args>
cudaError_t launch_clustered(void (*kernel)(Args...), int64_t blocks, int threads, int smem, int cluster,
                             cudaStream_t stream, Args... args) {
  if (cluster == 1) {
    kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t lc = cluster_launch_config(blocks, threads, smem, cluster, stream, attr);
  return cudaLaunchKernelEx(&lc, kernel, args...);
}

// Rows without added operands keep raw logits (the staged kernel's RAW) for a scale > 0 whose
// product with log2(e) is finite; others scale each score.
inline bool raw_scale(float scale) {
  return scale > 0.0f && scale * kLog2e <= 3.4028234663852886e38f;
}

template <typename T>
cudaError_t launch_typed(const SoftmaxParams& p, const RowConfig& cfg, bool aligned, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.Q;
  return MASK_KIND_SWITCH(p.mask_kind, MK, [&] {
    return BIAS_KIND_SWITCH(p.bias_kind, BK, [&] {
      if (cfg.chunks == 0) {
        const bool staged = aligned && cfg.staged;
        auto kernel = staged    ? streaming_softmax_kernel<T, MK, BK, true, true>
                      : aligned ? streaming_softmax_kernel<T, MK, BK, true, false>
                                : streaming_softmax_kernel<T, MK, BK, false, false>;
        const int smem = staged ? kMaxSlots * kPieceBytes : 0;  // the whole ring, however few pieces a row has
        int64_t units = 0;  // resident clusters; they stride over the rows
        const cudaError_t e =
            resident_units(reinterpret_cast<const void*>(kernel), cfg.block_threads, smem, cfg.cluster, units, smem);
        if (e != cudaSuccess) return e;
        if (units > rows) units = rows;
        if (std::getenv("TP_SOFTMAX_LAUNCH_INFO") != nullptr)
          std::fprintf(stderr, "tp_softmax long rows: %s, %d piece(s) a block, %lld clusters of %d\n",
                       staged ? "staged" : "two reads", cfg.pieces, static_cast<long long>(units), cfg.cluster);
        return launch_clustered(kernel, units * cfg.cluster, cfg.block_threads, smem, cfg.cluster, stream, p,
                                cfg.cluster, cfg.pieces);
      }
      constexpr int C = reads_two_operands(MK, BK) ? 4 : 8;  // as choose_row_config
      if (cfg.chunks != C) return cudaErrorInvalidValue;
      const bool wide = cfg.block_threads == kWideThreads;  // alone or in a cluster
      const bool clustered = cluster_kernel(cfg);
      auto pick = [&](auto raw) {
        constexpr bool RAW = decltype(raw)::value;
        return aligned ? (wide        ? staged_softmax_kernel<T, MK, BK, C, true, true, true, RAW>
                          : clustered ? staged_softmax_kernel<T, MK, BK, C, true, true, false, RAW>
                                      : staged_softmax_kernel<T, MK, BK, C, true, false, false, RAW>)
                       : (wide        ? staged_softmax_kernel<T, MK, BK, C, false, true, true, RAW>
                          : clustered ? staged_softmax_kernel<T, MK, BK, C, false, true, false, RAW>
                                      : staged_softmax_kernel<T, MK, BK, C, false, false, false, RAW>);
      };
      auto kernel = pick(std::false_type{});
      if constexpr (raw_logits<MK, BK>) {
        if (raw_scale(p.layer_scale)) kernel = pick(std::true_type{});
      }
      // Cluster rows (and rows of one wide block) without operands, every row seeing every key and
      // lying K elements apart: the WHOLE kernels, which neither work out a row's span nor test
      // its keys' visibility (the same arithmetic, so the same bits).
      bool whole = false;
      if constexpr (MK == MaskKind::kNone && BK == BiasKind::kNone) {
        whole = aligned && clustered && rows_whole(p) && rows_linear(p);
        if (whole) {
          auto pick_whole = [&](auto raw) {
            constexpr bool RAW = decltype(raw)::value;
            return wide ? staged_softmax_kernel<T, MK, BK, C, true, true, true, RAW, true>
                        : staged_softmax_kernel<T, MK, BK, C, true, true, false, RAW, true>;
          };
          kernel = raw_scale(p.layer_scale) ? pick_whole(std::true_type{}) : pick_whole(std::false_type{});
        }
      }
      const StageLayout L = !aligned ? StageLayout{0, 0, kOpGlobal, kOpGlobal, 0, 0, 0, 0}
                            : wide   ? staged_layout<T, MK, BK, C, true>(p, cfg.row_threads, cfg.cluster)
                                     : staged_layout<T, MK, BK, C, false>(p, cfg.row_threads, cfg.cluster);
      const int threads = warp_specialised(C, aligned, clustered) ? kWsThreads : cfg.block_threads;
      const int smem = L.stages * (L.stage_bytes + L.table_bytes);
      if (aligned && std::getenv("TP_SOFTMAX_LAUNCH_INFO") != nullptr) {
        static const char* const kModes[] = {"global", "per row", "per head", "per batch"};
        std::fprintf(stderr, "tp_softmax staged layout: mask %s, bias %s, %d stages of %d B%s%s\n",
                     MK == MaskKind::kNone ? "none" : kModes[L.mask_mode + 1],
                     bias_is_tensor(BK) ? kModes[L.bias_mode + 1] : "none", L.stages, L.stage_bytes,
                     L.whole_tile ? ", one copy per tile" : "", whole ? ", whole linear rows" : "");
      }
      const int64_t rows_per_tile = cfg.block_threads / cfg.row_threads;  // compute threads / rt
      const int64_t ntiles = (rows + rows_per_tile - 1) / rows_per_tile;
      int64_t units = 0;
      const cudaError_t e = resident_units(reinterpret_cast<const void*>(kernel), threads, smem, cfg.cluster, units,
                                           wide ? kWideSmemBudget : kStagedSmemBudget);
      if (e != cudaSuccess) return e;
      if (units > ntiles) units = ntiles;
      return launch_clustered(kernel, units * cfg.cluster, threads, smem, cfg.cluster, stream, p, cfg.row_threads,
                              cfg.cluster, ntiles, L);
    });
  });
}

}  // namespace detail
}  // namespace tp_softmax
