// Row configuration, alignment checks and dispatch to the per-dtype launchers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdio>

#include "softmax.h"

namespace tp_softmax {
namespace detail {
template <typename T>
cudaError_t launch_typed(const SoftmaxParams& p, const RowConfig& cfg, bool aligned, cudaStream_t stream);
}  // namespace detail

namespace {

int elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

RowConfig choose_row_config(int64_t K, DType dtype, bool two_operands) {
  const int64_t kPerThread = two_operands ? 4 : 8;  // chunks of a row per thread and block
  constexpr int64_t kBlock = 256;                   // threads per block
  const int64_t kSlice = kPerThread * kBlock;       // chunks per block: 32 KiB (16 KiB)
  const int64_t kWide = kPerThread * kWideThreads;  // chunks per wide block: 64 KiB (32 KiB)
  const int64_t chunks = ceil_div(K, 16 / elem_size(dtype));  // 16-byte chunks of a row
  const int cpt = static_cast<int>(kPerThread);
  // Rows up to one slice: 256 / rt rows per block, rt threads per row.
  if (chunks <= kSlice) return {cpt, static_cast<int>(next_pow2(ceil_div(chunks, kPerThread))), 1, 256, 0, false};
  // Up to two slices: one block of kWideThreads threads, one an SM (against a cluster of two
  // 256-thread blocks: long-32k +0.011, 20000 keys +0.03; docs/perf.md, v27).
  if (chunks <= kWide) return {cpt, kWideThreads, 1, kWideThreads, 0, false};
  // Up to 16 slices: a cluster of 256-thread blocks shares the row, one slice each (4, 8 or 16:
  // two blocks an SM keep more rows in flight than one wide block an SM; v27).
  if (chunks <= 16 * kSlice) return {cpt, 256, static_cast<int>(next_pow2(ceil_div(chunks, kSlice))), 256, 0, false};
  // Up to 16 wide slices: a cluster of 16 wide blocks (against the long-row kernel below:
  // 524288 bf16 keys 0.58 to 0.70; v27).
  if (chunks <= 16 * kWide) return {cpt, kWideThreads, 16, kWideThreads, 0, false};
  // Longer: a cluster of blocks of 512 threads, one chunk a thread in each 8 KiB piece; the
  // smallest cluster of 4, 8 or 16 blocks whose blocks hold their part of the row in shared
  // memory (one block an SM: smaller clusters leave fewer SMs idle), else 16 and two reads.
  int cluster = 4;
  int64_t pieces = ceil_div(chunks, int64_t{kLongRowThreads} * cluster);
  while (pieces > kLongRowMaxPieces && cluster < kLongRowMaxCluster) {
    cluster *= 2;
    pieces = ceil_div(chunks, int64_t{kLongRowThreads} * cluster);
  }
  return {0, kLongRowThreads, cluster, kLongRowThreads, static_cast<int>(pieces), pieces <= kLongRowMaxPieces};
}

const char* describe_row_config(int64_t K, DType dtype, bool two_operands, char* buf, int len) {
  const RowConfig c = choose_row_config(K, dtype, two_operands);
  if (c.chunks > 0)
    snprintf(buf, len, "one read (staged): %d thread(s)/row x %d chunk(s), cluster %d, %d threads/block%s%s",
             c.row_threads, c.chunks, c.cluster, c.block_threads,
             warp_specialised(c.chunks, true, cluster_kernel(c)) ? " + a producer warp (16-byte aligned rows)" : "",
             bulk_stores(c.chunks, c.row_threads, true, cluster_kernel(c), 0)
                 ? "; outputs sent by bulk copies (16-byte aligned rows without a window)"
                 : "");
  else if (c.staged)
    snprintf(buf, len,
             "one read (long rows): cluster %d x %d threads, %d piece(s) of 8 KiB a block staged in shared memory "
             "(rows not 16-byte aligned: read twice, same order)",
             c.cluster, c.row_threads, c.pieces);
  else
    snprintf(buf, len, "two reads (streaming): cluster %d x %d threads", c.cluster, c.row_threads);
  return buf;
}

cudaError_t launch_attention_softmax(const SoftmaxParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.Q < 0 || p.K < 0 || p.window < 0) return cudaErrorInvalidValue;
  const int64_t rows = p.B * p.H * p.Q;
  if (rows == 0 || p.K == 0) return cudaSuccess;
  if (p.in == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  if (p.mask_kind != MaskKind::kNone && p.mask == nullptr) return cudaErrorInvalidValue;
  if (bias_is_tensor(p.bias_kind) && p.bias == nullptr)
    return cudaErrorInvalidValue;
  if (p.bias_kind == BiasKind::kSlopes && p.slopes == nullptr) return cudaErrorInvalidValue;

  SoftmaxParams kp = p;
  kp.q_magic = ~uint64_t{0} / static_cast<uint64_t>(p.Q);
  kp.h_magic = ~uint64_t{0} / static_cast<uint64_t>(p.H);
  kp.rows32 = rows < (int64_t{1} << 31);
  kp.q_magic32 = kp.rows32 ? ~uint32_t{0} / static_cast<uint32_t>(p.Q) : 0;
  kp.h_magic32 = kp.rows32 ? ~uint32_t{0} / static_cast<uint32_t>(p.H) : 0;
  const RowConfig cfg = choose_row_config(p.K, p.dtype, reads_two_operands(p.mask_kind, p.bias_kind));
  const int es = elem_size(p.dtype);
  const int vec = 16 / es;
  bool aligned = p.K % vec == 0 && p.in_stride[3] == 1 && p.out_stride[3] == 1 &&
                 rows_vectorisable(p.in, p.in_stride, vec, es) && rows_vectorisable(p.out, p.out_stride, vec, es);
  if (p.mask_kind != MaskKind::kNone) {
    const int mes = p.mask_kind == MaskKind::kBool ? 1 : p.mask_kind == MaskKind::kSame ? es : 4;
    aligned = aligned && rows_vectorisable(p.mask, p.mask_stride, vec, mes);
  }
  if (bias_is_tensor(p.bias_kind)) {
    const int bes = p.bias_kind == BiasKind::kSame ? es : 4;
    aligned = aligned && rows_vectorisable(p.bias, p.bias_stride, vec, bes);
  }

  switch (p.dtype) {
    case DType::kFloat16:
      return detail::launch_typed<__half>(kp, cfg, aligned, stream);
    case DType::kBFloat16:
      return detail::launch_typed<__nv_bfloat16>(kp, cfg, aligned, stream);
    case DType::kFloat32:
      return detail::launch_typed<float>(kp, cfg, aligned, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tp_softmax
