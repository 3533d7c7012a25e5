// Instantiations for __nv_bfloat16 scores.
#include "launch_typed.cuh"

namespace tp_softmax {
namespace detail {
template cudaError_t launch_typed<__nv_bfloat16>(const SoftmaxParams&, const RowConfig&, bool, cudaStream_t);
}  // namespace detail
}  // namespace tp_softmax
