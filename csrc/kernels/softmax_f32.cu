// Instantiations for float scores.
#include "launch_typed.cuh"

namespace tp_softmax {
namespace detail {
template cudaError_t launch_typed<float>(const SoftmaxParams&, const RowConfig&, bool, cudaStream_t);
}  // namespace detail
}  // namespace tp_softmax
