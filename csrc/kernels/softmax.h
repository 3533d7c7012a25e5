// Fused attention softmax: the kernel's host interface. Knows nothing of torch.
//
// For each row (b, h, i) of scores [B, H, Q, K] (any strides), with p = i + K - Q:
//   x[j] = s[j] * layer_scale + bias[j] + mask[j]       (float32)
//   x[j] = -inf  where mask is false, or j is hidden: causal (j > p) or window (j <= p - w)
//   out[j] = exp(x[j] - max) / sum;   rows with no visible key are all zeros
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tp_softmax {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };
// Mask element types: none, bool (one byte, nonzero = attend), additive in the scores'
// dtype, additive float32. Other float masks are converted to float32 by the caller.
enum class MaskKind : int { kNone = 0, kBool = 1, kSame = 2, kFloat32 = 3 };
// Bias: none, ALiBi computed from float32 slopes, a tensor in the scores' dtype, float32.
enum class BiasKind : int { kNone = 0, kSlopes = 1, kSame = 2, kFloat32 = 3 };

#ifdef __CUDACC__
#define TP_SOFTMAX_HOST_DEVICE __host__ __device__
#else
#define TP_SOFTMAX_HOST_DEVICE
#endif

// The bias is read from a tensor (not computed from slopes).
TP_SOFTMAX_HOST_DEVICE constexpr bool bias_is_tensor(BiasKind k) {
  return k == BiasKind::kSame || k == BiasKind::kFloat32;
}
// Both a mask and a bias tensor are read: rows then take 4 chunks per thread (choose_row_config).
TP_SOFTMAX_HOST_DEVICE constexpr bool reads_two_operands(MaskKind m, BiasKind b) {
  return m != MaskKind::kNone && bias_is_tensor(b);
}
// Some rows longer than one 256-thread block's slice (8 or 4 chunks a thread) run on blocks of
// this many threads, one an SM: one block, or a cluster of 16 (choose_row_config).
constexpr int kWideThreads = 512;

// Rows of 4 chunks a thread (two operand tensors) that one 256-thread block holds, 16-byte
// aligned, run in warp-specialised blocks: a producer warp beside the 256 compute threads
// (staged_kernel.cuh). `clustered`: rows of several blocks, or of one wide block.
TP_SOFTMAX_HOST_DEVICE constexpr bool warp_specialised(int chunks, bool aligned, bool clustered) {
  return chunks == 4 && aligned && !clustered;
}

// Every row of `ptr` (element strides `stride`, [B, H, Q, K]) can be read as aligned vectors of
// `vec` elements. Operands broadcast along K (stride 0) do not qualify: the aligned kernels read
// every operand along K, and the strided ones give the same values, hence the same bits.
inline bool rows_vectorisable(const void* ptr, const int64_t* stride, int vec, int elem_bytes) {
  if (stride[3] != 1) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % (static_cast<uintptr_t>(vec) * elem_bytes) != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (stride[d] % vec != 0) return false;
  return true;
}

struct SoftmaxParams {
  DType dtype;
  int64_t B, H, Q, K;
  const void* in;            // scores
  int64_t in_stride[4];      // in elements
  void* out;                 // may equal `in` (in place) with the same strides
  int64_t out_stride[4];
  MaskKind mask_kind;
  const void* mask;          // strides: 0 on broadcast dims
  int64_t mask_stride[4];
  BiasKind bias_kind;
  const void* bias;          // alibi of the local heads, strides as mask
  int64_t bias_stride[4];
  const float* slopes;       // [B|1, H] local heads, strides (b, h)
  int64_t slopes_stride[2];
  float layer_scale;
  bool causal;
  int64_t window;            // 0 = no window
  // Filled in by launch_attention_softmax: floor((2^64 - 1) / Q) and / H, for division by
  // multiplication in the kernel; with fewer than 2^31 rows (rows32), also floor((2^32 - 1) / Q)
  // and / H, for the same in 32 bits.
  uint64_t q_magic, h_magic;
  uint32_t q_magic32, h_magic32;
  bool rows32;
};

// Every row sees every key: no causal hiding (or one query, which sees them all) and no window
// shorter than K.
inline bool rows_whole(const SoftmaxParams& p) {
  return (!p.causal || p.Q <= 1) && (p.window == 0 || p.window >= p.K);
}

// Row r = (b * H + h) * Q + i starts at element r * K of the scores and of the outputs (strides
// of dimensions of size 1 do not matter).
inline bool rows_linear(const SoftmaxParams& p) {
  auto linear = [&](const int64_t* st) {
    return st[3] == 1 && (p.Q == 1 || st[2] == p.K) && (p.H == 1 || st[1] == p.Q * p.K) &&
           (p.B == 1 || st[0] == p.H * p.Q * p.K);
  };
  return linear(p.in_stride) && linear(p.out_stride);
}

// How one row is computed. Depends only on K, the dtype and whether both a mask and a bias
// tensor are read (never on B, H, Q, strides or pointers): the same row gives the same bits
// alone, in a batch, or sharded.
struct RowConfig {
  int chunks;          // 16-byte chunks of a row per thread (8, or 4 when both a mask and a bias
                       // tensor are read: one read, staged); 0 = streaming path
  int row_threads;     // threads of one block working on a row (1 .. 256, or kWideThreads)
  int cluster;         // blocks of a thread-block cluster sharing a row (1 .. 16)
  int block_threads;   // threads per block
  int pieces;          // long rows (chunks == 0): 8 KiB pieces of a row per block
  bool staged;         // long rows: read once, staged in shared memory (16-byte aligned rows;
                       // others take the same order with two reads), else read twice
};

// The staged rows of `c` run on the cluster kernel: shared by several blocks, or on one wide block.
TP_SOFTMAX_HOST_DEVICE constexpr bool cluster_kernel(const RowConfig& c) {
  return c.cluster > 1 || c.block_threads == kWideThreads;
}

// Staged rows whose outputs are written into the stage they were read from and sent to global
// memory by bulk copies, instead of 16-byte stores from every thread: aligned rows of 16 to 64
// threads, in blocks without a cluster or producer warp, without a window. (Measured on an H100:
// it gains on those rows and loses on the others; docs/perf.md, "v31". Only where the outputs go
// changes, never their values.)
TP_SOFTMAX_HOST_DEVICE constexpr bool bulk_stores(int chunks, int row_threads, bool aligned, bool clustered,
                                                  int64_t window) {
  return aligned && !clustered && !warp_specialised(chunks, aligned, clustered) && row_threads >= 16 &&
         row_threads <= 64 && window == 0;
}

// Long rows (more than 16 x 64 KiB, or 16 x 32 KiB with two operand tensors): clusters of up to
// kLongRowMaxCluster blocks of kLongRowThreads share a row; a block's part of a row is staged in
// shared memory when it has at most kLongRowMaxPieces pieces of kLongRowThreads 16-byte chunks.
constexpr int kLongRowMaxCluster = 16;
constexpr int kLongRowThreads = 512;
constexpr int kLongRowMaxPieces = 27;

RowConfig choose_row_config(int64_t K, DType dtype, bool two_operands);

// Launches on `stream`; returns the first CUDA error (invalid arguments included).
cudaError_t launch_attention_softmax(const SoftmaxParams& p, cudaStream_t stream);

// Describes the configuration for K and dtype (for reports and tests).
const char* describe_row_config(int64_t K, DType dtype, bool two_operands, char* buf, int len);

}  // namespace tp_softmax
