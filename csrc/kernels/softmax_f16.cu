// Instantiations for __half scores.
#include "launch_typed.cuh"

namespace tp_softmax {
namespace detail {
template cudaError_t launch_typed<__half>(const SoftmaxParams&, const RowConfig&, bool, cudaStream_t);
}  // namespace detail
}  // namespace tp_softmax
