// The torch side of the fused kernel: schema, argument checks, strides, device guard, stream.
//
// The Python wrapper (tp_softmax/_kernel.py) hands over validated, normalised arguments:
// mask / bias as 4-D views that broadcast to scores (never expanded in memory), slopes as
// [B|1, H] float32 of the local heads. Broadcasting here is `expand`, i.e. stride 0.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "kernels/softmax.h"

namespace {

using tp_softmax::BiasKind;
using tp_softmax::DType;
using tp_softmax::MaskKind;

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default:
      TORCH_CHECK_TYPE(false, "tp_softmax: scores must be float16, bfloat16 or float32, got ", t);
  }
}

void copy_strides(const at::Tensor& t, int64_t* dst) {
  for (int d = 0; d < t.dim(); ++d) dst[d] = t.stride(d);
}

// `t` as a [B, H, Q, K] view with stride 0 on broadcast dims; checks device and shape.
at::Tensor broadcast_view(const at::Tensor& t, const at::Tensor& scores, const char* name) {
  TORCH_CHECK(t.device() == scores.device(), "tp_softmax: ", name, " is on ", t.device(),
              " but scores is on ", scores.device());
  TORCH_CHECK(t.dim() == 4, "tp_softmax: ", name, " must be 4-D here, got shape ", t.sizes());
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(t.size(d) == 1 || t.size(d) == scores.size(d), "tp_softmax: ", name, " of shape ", t.sizes(),
                " does not broadcast to scores ", scores.sizes());
  return t.expand(scores.sizes());
}

void run(const at::Tensor& scores, const at::Tensor& out, const std::optional<at::Tensor>& mask,
         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& slopes, double layer_scale,
         bool causal, int64_t window) {
  TORCH_CHECK(scores.is_cuda(), "tp_softmax: scores must be a CUDA tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 4, "tp_softmax: scores must be 4-D [B, H, Q, K], got shape ", scores.sizes());
  TORCH_CHECK(scores.size(3) <= std::numeric_limits<int32_t>::max(),
              "tp_softmax: K must be below 2^31, got ", scores.size(3));
  TORCH_CHECK(window >= 0, "tp_softmax: window must be >= 0 (0 = none), got ", window);
  const c10::cuda::CUDAGuard guard(scores.device());

  tp_softmax::SoftmaxParams p{};
  p.dtype = kernel_dtype(scores.scalar_type());
  p.B = scores.size(0);
  p.H = scores.size(1);
  p.Q = scores.size(2);
  p.K = scores.size(3);
  p.in = scores.data_ptr();
  copy_strides(scores, p.in_stride);
  p.out = out.data_ptr();
  copy_strides(out, p.out_stride);

  at::Tensor mask_v, bias_v, slopes_v;
  p.mask_kind = MaskKind::kNone;
  if (mask.has_value()) {
    mask_v = broadcast_view(*mask, scores, "mask");
    if (mask_v.scalar_type() == at::kBool) p.mask_kind = MaskKind::kBool;
    else if (mask_v.scalar_type() == scores.scalar_type()) p.mask_kind = MaskKind::kSame;
    else if (mask_v.scalar_type() == at::kFloat) p.mask_kind = MaskKind::kFloat32;
    else TORCH_CHECK_TYPE(false, "tp_softmax: mask must be bool, float32 or scores' dtype, got ", mask_v.scalar_type());
    p.mask = mask_v.data_ptr();
    copy_strides(mask_v, p.mask_stride);
  }
  p.bias_kind = BiasKind::kNone;
  TORCH_CHECK(!(bias.has_value() && slopes.has_value()), "tp_softmax: give alibi or alibi_slopes, not both");
  if (bias.has_value()) {
    bias_v = broadcast_view(*bias, scores, "alibi");
    if (bias_v.scalar_type() == scores.scalar_type()) p.bias_kind = BiasKind::kSame;
    else if (bias_v.scalar_type() == at::kFloat) p.bias_kind = BiasKind::kFloat32;
    else TORCH_CHECK_TYPE(false, "tp_softmax: alibi must be float32 or scores' dtype, got ", bias_v.scalar_type());
    p.bias = bias_v.data_ptr();
    copy_strides(bias_v, p.bias_stride);
  }
  if (slopes.has_value()) {
    const at::Tensor& s = *slopes;
    TORCH_CHECK(s.device() == scores.device(), "tp_softmax: alibi_slopes is on ", s.device(),
                " but scores is on ", scores.device());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "tp_softmax: alibi_slopes must be float32, got ",
                     s.scalar_type());
    TORCH_CHECK(s.dim() == 2 && (s.size(0) == 1 || s.size(0) == p.B) && s.size(1) == p.H,
                "tp_softmax: alibi_slopes must be [B|1, H_local] here, got shape ", s.sizes());
    slopes_v = s.expand({p.B, p.H});
    p.bias_kind = BiasKind::kSlopes;
    p.slopes = slopes_v.data_ptr<float>();
    p.slopes_stride[0] = slopes_v.stride(0);
    p.slopes_stride[1] = slopes_v.stride(1);
  }
  p.layer_scale = static_cast<float>(layer_scale);
  p.causal = causal;
  p.window = window;
  const cudaError_t err = tp_softmax::launch_attention_softmax(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "tp_softmax: kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor attention_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& slopes,
                             double layer_scale, bool causal, int64_t window) {
  at::Tensor out = at::empty(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous));
  run(scores, out, mask, bias, slopes, layer_scale, causal, window);
  return out;
}

void attention_softmax_(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& slopes,
                        double layer_scale, bool causal, int64_t window) {
  run(scores, scores, mask, bias, slopes, layer_scale, causal, window);
}

std::string row_config(int64_t K, at::ScalarType dtype, bool two_operands) {
  char buf[160];
  return tp_softmax::describe_row_config(K, kernel_dtype(dtype), two_operands, buf, sizeof(buf));
}

}  // namespace

TORCH_LIBRARY(tp_softmax, m) {
  m.def("attention_softmax(Tensor scores, Tensor? mask, Tensor? bias, Tensor? slopes, float layer_scale, "
        "bool causal, int window) -> Tensor");
  m.def("attention_softmax_(Tensor(a!) scores, Tensor? mask, Tensor? bias, Tensor? slopes, float layer_scale, "
        "bool causal, int window) -> ()");
  m.def("row_config(int K, ScalarType dtype, bool two_operands=False) -> str", &row_config);
}

TORCH_LIBRARY_IMPL(tp_softmax, CUDA, m) {
  m.impl("attention_softmax", &attention_softmax);
  m.impl("attention_softmax_", &attention_softmax_);
}
