// Launching the kernel for one scores dtype: the mask / bias kinds and the row configuration
// become template parameters here (static_switch.h). Included by one .cu file per dtype so
// that the instantiations compile in parallel.
#pragma once

#include "softmax.h"
#include "softmax_kernel.cuh"
#include "static_switch.h"

namespace tp_softmax {
namespace detail {

template <typename T>
cudaError_t launch_typed(const SoftmaxParams& p, const RowConfig& cfg, bool aligned, int64_t groups,
                         cudaStream_t stream) {
  return MASK_KIND_SWITCH(p.mask_kind, MK, [&] {
    return BIAS_KIND_SWITCH(p.bias_kind, BK, [&] {
      return CHUNKS_SWITCH(cfg.chunks, CH, [&] {
        auto kernel = aligned ? attention_softmax_kernel<T, MK, BK, CH, true>
                              : attention_softmax_kernel<T, MK, BK, CH, false>;
        dim3 grid(static_cast<unsigned>(groups * cfg.cluster));
        dim3 block(cfg.block_threads);
        if (cfg.cluster == 1) {
          kernel<<<grid, block, 0, stream>>>(p, cfg.row_threads, cfg.cluster);
          return cudaGetLastError();
        }
        cudaLaunchConfig_t lc = {};
        lc.gridDim = grid;
        lc.blockDim = block;
        lc.dynamicSmemBytes = 0;
        lc.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = cfg.cluster;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        lc.attrs = attr;
        lc.numAttrs = 1;
        if (cfg.cluster > 8) {
          const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
          if (e != cudaSuccess) return e;
        }
        return cudaLaunchKernelEx(&lc, kernel, p, cfg.row_threads, cfg.cluster);
      });
    });
  });
}

}  // namespace detail
}  // namespace tp_softmax
