// Pieces shared by the kernels: element conversion, row geometry, forming a logit, the online
// max / sum state and its fixed-order reductions. Knows nothing of torch.
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
// A chunk's bool mask bytes are held as 32-bit words (mask_byte_set tests them there).
template <int N>
struct alignas(N) Vec<uint8_t, N> {
  static_assert(N % 4 == 0, "whole 32-bit words");
  uint32_t w[N / 4];
};

// N values as float32. bfloat16 pairs are widened within their 32-bit word: the low element
// shifted up, the high one masked (one instruction each, where converting element by element
// extracted the high half first: two). Exact either way, so the bits are the same.
template <typename T, int N>
__device__ __forceinline__ void widen(const Vec<T, N>& v, float (&x)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) x[e] = to_float(v.v[e]);
}
template <int N>
__device__ __forceinline__ void widen(const Vec<__nv_bfloat16, N>& v, float (&x)[N]) {
  static_assert(N % 2 == 0, "whole 32-bit words");
  const uint32_t* w = reinterpret_cast<const uint32_t*>(v.v);
#pragma unroll
  for (int e = 0; e < N; e += 2) {
    x[e] = __uint_as_float(w[e / 2] << 16);
    x[e + 1] = __uint_as_float(w[e / 2] & 0xffff0000u);
  }
}

// Elements j0 .. j0 + N - 1 of a row read one by one (stride `step`); j >= K reads as 0.
template <typename T, int N, typename Pos>
__device__ __forceinline__ void load_strided(const T* row, int64_t step, Pos j0, Pos K, float (&dst)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const Pos j = j0 + e;
    dst[e] = j < K ? to_float(row[j * step]) : 0.0f;
  }
}

template <typename T, int N, typename Pos>
__device__ __forceinline__ void store_strided(T* row, int64_t step, Pos j0, Pos K, const float (&src)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const Pos j = j0 + e;
    if (j < K) row[j * step] = from_float<T>(src[e]);
  }
}

// A mask or bias operand read one element at a time (a broadcast operand, stride 0, reads its
// one element). Bool masks read as 1.0 / 0.0.
template <typename T, int N, typename Pos>
__device__ __forceinline__ void load_operand_strided(const T* row, int64_t step, Pos j0, Pos K, float (&dst)[N]) {
  if (step == 0) {
    const float v = to_float(row[0]);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = v;
  } else {
    load_strided<T, N, Pos>(row, step, j0, K, dst);
  }
}

template <int N, typename Pos>
__device__ __forceinline__ void load_bool_strided(const uint8_t* row, int64_t step, Pos j0, Pos K, float (&dst)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const Pos j = j0 + e;
    dst[e] = (step == 0 || j < K) && row[step == 0 ? 0 : j * step] != 0 ? 1.0f : 0.0f;
  }
}

// The high half of a * b: 32 or 64 bits.
__device__ __forceinline__ uint32_t mul_hi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
__device__ __forceinline__ uint64_t mul_hi(uint64_t a, uint64_t b) { return __umul64hi(a, b); }

// n = q * d + r for unsigned n < 2^(bits - 1) and d >= 1, with magic = floor((2^bits - 1) / d):
// the estimate mul_hi(n, magic) is q or q - 1 (no division routine in the kernel).
template <typename U>
__device__ __forceinline__ void divmod(U n, U d, U magic, U& q, U& r) {
  q = mul_hi(n, magic);
  r = n - q * d;
  if (r >= d) {
    ++q;
    r -= d;
  }
}

// Rows of a launch whose every row sees every key (rows_whole) and whose rows lie K elements apart
// in the scores and in the outputs (rows_linear): row r starts at element r * K of both.
struct LinearRows {};

// Where row `row` of the scores starts, and which keys it sees (lo <= j <= hi; none if lo > hi).
template <typename Pos>
struct RowSpan {
  int64_t b, h, i;
  Pos p, lo, hi;  // p: absolute position of the query

  // A row of LinearRows: every key visible; b, h and i are not worked out (rows without operands
  // do not use them).
  __device__ __forceinline__ RowSpan(const SoftmaxParams& P, LinearRows)
      : b(0), h(0), i(0), p(static_cast<Pos>(P.K - 1)), lo(0), hi(static_cast<Pos>(P.K - 1)) {}

  __device__ __forceinline__ RowSpan(const SoftmaxParams& P, int64_t row) {
    if (P.rows32) {  // fewer than 2^31 rows: 32-bit multiplications instead of 64-bit ones
      split_row<uint32_t>(static_cast<uint32_t>(row), static_cast<uint32_t>(P.Q), static_cast<uint32_t>(P.H),
                          P.q_magic32, P.h_magic32);
    } else {
      split_row<uint64_t>(static_cast<uint64_t>(row), static_cast<uint64_t>(P.Q), static_cast<uint64_t>(P.H),
                          P.q_magic, P.h_magic);
    }
    p = static_cast<Pos>(i + P.K - P.Q);
    hi = hi_at(P, p);
    const Pos first = p - static_cast<Pos>(P.window) + 1;
    lo = (P.window > 0 && first > 0) ? first : 0;
  }

  // b, h and i of `row` = (b * H + h) * Q + i, in U-bit arithmetic (magic numbers of that width).
  template <typename U>
  __device__ __forceinline__ void split_row(U row, U Q, U H, U q_magic, U h_magic) {
    U bh, bu, hu, iu;
    divmod<U>(row, Q, q_magic, bh, iu);
    divmod<U>(bh, H, h_magic, bu, hu);
    b = static_cast<int64_t>(bu);
    h = static_cast<int64_t>(hu);
    i = static_cast<int64_t>(iu);
  }

  // The last key a query at position p sees.
  __device__ __forceinline__ static Pos hi_at(const SoftmaxParams& P, Pos p) {
    const Pos K = static_cast<Pos>(P.K);
    return P.causal ? (p < K - 1 ? p : K - 1) : K - 1;
  }
};

// One row: its span and where its operands start.
template <typename T, MaskKind MK, BiasKind BK, typename Pos>
struct Row : RowSpan<Pos> {
  using MaskT = typename std::conditional<MK == MaskKind::kBool, uint8_t,
                typename std::conditional<MK == MaskKind::kSame, T, float>::type>::type;
  using BiasT = typename std::conditional<BK == BiasKind::kSame, T, float>::type;
  static constexpr bool kMask = MK != MaskKind::kNone;
  static constexpr bool kBias = bias_is_tensor(BK);
  const T* in;
  T* out;
  const MaskT* mask;
  const BiasT* bias;
  float slope;

  __device__ __forceinline__ Row(const SoftmaxParams& P, int64_t row) : RowSpan<Pos>(P, row) {
    const int64_t b = this->b, h = this->h, i = this->i;
    in = static_cast<const T*>(P.in) + (b * P.in_stride[0] + h * P.in_stride[1] + i * P.in_stride[2]);
    out = static_cast<T*>(P.out) + (b * P.out_stride[0] + h * P.out_stride[1] + i * P.out_stride[2]);
    mask = nullptr;
    bias = nullptr;
    slope = 0.0f;
    if constexpr (kMask)
      mask = static_cast<const MaskT*>(P.mask) +
             (b * P.mask_stride[0] + h * P.mask_stride[1] + i * P.mask_stride[2]);
    if constexpr (kBias)
      bias = static_cast<const BiasT*>(P.bias) +
             (b * P.bias_stride[0] + h * P.bias_stride[1] + i * P.bias_stride[2]);
    if constexpr (BK == BiasKind::kSlopes) slope = P.slopes[b * P.slopes_stride[0] + h * P.slopes_stride[1]];
  }

  // Row `row` of LinearRows, for rows without mask, bias or slopes.
  __device__ __forceinline__ Row(const SoftmaxParams& P, int64_t row, LinearRows) : RowSpan<Pos>(P, LinearRows{}) {
    static_assert(!kMask && BK == BiasKind::kNone, "linear rows carry no operands");
    in = static_cast<const T*>(P.in) + row * P.K;
    out = static_cast<T*>(P.out) + row * P.K;
    mask = nullptr;
    bias = nullptr;
    slope = 0.0f;
  }

  __device__ __forceinline__ bool visible(Pos j0, int n) const { return j0 <= this->hi && j0 + n - 1 >= this->lo; }
};

// The logit of a key before hiding: every path forms it with this one sequence of correctly
// rounded float32 operations (no contraction by the compiler), so the values do not depend on
// how the inputs were read. The scale and the first additive operand tensor (the bias, else an
// additive mask) are one fused multiply-add, s * scale + b rounded once: exactly s + b when
// scale is 1. `m`: the additive mask value, or for a bool mask 1.0 (attend) / 0.0.
//
// RAW (rows that read no mask / bias values to add, MK none or bool and no bias: raw_logits) leaves
// the score unscaled; the kernel applies the scale where it takes the exponent (staged kernel).
template <MaskKind MK, BiasKind BK>
constexpr bool raw_logits = (MK == MaskKind::kNone || MK == MaskKind::kBool) && BK == BiasKind::kNone;

template <MaskKind MK, BiasKind BK, typename Pos, bool RAW = false>
__device__ __forceinline__ float form_value(float s, float scale, float b, float m, float slope, Pos p, Pos j) {
  static_assert(!RAW || raw_logits<MK, BK>, "raw logits only without added operands");
  constexpr bool kAddMask = MK != MaskKind::kNone && MK != MaskKind::kBool;
  constexpr bool kFuseMask = kAddMask && BK == BiasKind::kNone;  // no bias: the mask goes in the fma
  float v;
  if constexpr (bias_is_tensor(BK)) {
    v = __fmaf_rn(s, scale, b);
  } else if constexpr (BK == BiasKind::kSlopes) {
    const Pos d = p - j;
    v = __fmaf_rn(-slope, static_cast<float>(d < 0 ? -d : d), __fmul_rn(s, scale));
  } else if constexpr (kFuseMask) {
    v = __fmaf_rn(s, scale, m);
  } else {
    v = RAW ? s : __fmul_rn(s, scale);
  }
  if constexpr (MK == MaskKind::kBool) {
    v = m != 0.0f ? v : neg_inf();
  } else if constexpr (kAddMask && !kFuseMask) {
    v = __fadd_rn(v, m);
  }
  return v;
}

// Causal / window hiding for a chunk that straddles lo or hi (chunks fully inside skip it).
// VOTE: the whole warp runs here, and hides where one of its lanes' chunks straddles (a branch
// that is the same in every lane).
template <int V, typename Pos, bool VOTE = false>
__device__ __forceinline__ void hide_outside(float (&x)[V], Pos j0, Pos lo, Pos hi) {
  const bool straddles = j0 < lo || j0 + V - 1 > hi;
  if (VOTE ? __any_sync(0xffffffffu, straddles) : straddles) {
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (j0 + e < lo || j0 + e > hi) x[e] = neg_inf();
  }
}

// x for the V keys of chunk j0 read element by element with strides (hidden keys -inf).
template <typename T, MaskKind MK, BiasKind BK, int V, typename Pos, bool RAW = false>
__device__ __forceinline__ void chunk_logits_strided(const SoftmaxParams& P, const Row<T, MK, BK, Pos>& r, Pos j0,
                                                     float (&x)[V]) {
  using R = Row<T, MK, BK, Pos>;
  const Pos K = static_cast<Pos>(P.K);
  float s[V], b[V], m[V];
  load_strided<T, V, Pos>(r.in, P.in_stride[3], j0, K, s);
  if constexpr (R::kBias) load_operand_strided<typename R::BiasT, V, Pos>(r.bias, P.bias_stride[3], j0, K, b);
  if constexpr (MK == MaskKind::kBool) {
    load_bool_strided<V, Pos>(r.mask, P.mask_stride[3], j0, K, m);
  } else if constexpr (R::kMask) {
    load_operand_strided<typename R::MaskT, V, Pos>(r.mask, P.mask_stride[3], j0, K, m);
  }
#pragma unroll
  for (int e = 0; e < V; ++e)
    x[e] = form_value<MK, BK, Pos, RAW>(s[e], P.layer_scale, R::kBias ? b[e] : 0.0f, R::kMask ? m[e] : 0.0f,
                                        r.slope, r.p, j0 + e);
  hide_outside<V, Pos>(x, j0, r.lo, r.hi);
}

// Whether byte e of a chunk's bool mask is set, tested within its 32-bit word: one logic
// instruction with a predicate result a key, where widening each byte to a value first took
// about four (the select it feeds is the same, so are the bits).
template <int V>
__device__ __forceinline__ bool mask_byte_set(const Vec<uint8_t, V>& m, int e) {
  return (m.w[e >> 2] & (0xffu << (8 * (e & 3)))) != 0u;
}

// x for the V keys of chunk j0 from the scores `sv` and the chunk's operand values `m` / `b`
// (already read: the mask and bias elements of keys j0 .. j0 + V - 1). HIDE = false: the caller
// knows the row sees every key (no causal or window hiding to test).
template <typename T, MaskKind MK, BiasKind BK, int V, typename Pos, bool RAW = false, bool HIDE = true,
          bool VOTE = false>
__device__ __forceinline__ void chunk_logits_vals(const SoftmaxParams& P, const Row<T, MK, BK, Pos>& r, Pos j0,
                                                  const float (&sv)[V],
                                                  const Vec<typename Row<T, MK, BK, Pos>::MaskT, V>& m,
                                                  const Vec<typename Row<T, MK, BK, Pos>::BiasT, V>& b, float (&x)[V]) {
  using R = Row<T, MK, BK, Pos>;
  float bf[V], mf[V];
  if constexpr (R::kBias) widen(b, bf);
  if constexpr (R::kMask && MK != MaskKind::kBool) widen(m, mf);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float bb = R::kBias ? bf[e] : 0.0f;
    float mm = 0.0f;
    if constexpr (MK == MaskKind::kBool) {
      mm = mask_byte_set<V>(m, e) ? 1.0f : 0.0f;
    } else if constexpr (R::kMask) {
      mm = mf[e];
    }
    x[e] = form_value<MK, BK, Pos, RAW>(sv[e], P.layer_scale, bb, mm, r.slope, r.p, j0 + e);
  }
  if constexpr (HIDE) hide_outside<V, Pos, VOTE>(x, j0, r.lo, r.hi);
}

// The V operand elements at `p` (global or shared memory) as one vector.
template <int V, typename OT>
__device__ __forceinline__ Vec<OT, V> read_vec(const OT* p) {
  return *reinterpret_cast<const Vec<OT, V>*>(p);
}

// The same with the chunk's operands read here as one vector each from `mc` / `bc` (global or
// shared memory).
template <typename T, MaskKind MK, BiasKind BK, int V, typename Pos, bool RAW = false, bool VOTE = false>
__device__ __forceinline__ void chunk_logits_from(const SoftmaxParams& P, const Row<T, MK, BK, Pos>& r, Pos j0,
                                                  const float (&sv)[V], const typename Row<T, MK, BK, Pos>::MaskT* mc,
                                                  const typename Row<T, MK, BK, Pos>::BiasT* bc, float (&x)[V]) {
  using R = Row<T, MK, BK, Pos>;
  Vec<typename R::MaskT, V> m;
  Vec<typename R::BiasT, V> b;
  if constexpr (R::kMask) m = read_vec<V>(mc);
  if constexpr (R::kBias) b = read_vec<V>(bc);
  chunk_logits_vals<T, MK, BK, V, Pos, RAW, true, VOTE>(P, r, j0, sv, m, b, x);
}

// x for the V keys of chunk j0 from the scores `sv` already read and 16-byte (bool: V-byte)
// reads of operands that run along K with stride 1 (the aligned kernels' operands).
template <typename T, MaskKind MK, BiasKind BK, int V, typename Pos>
__device__ __forceinline__ void chunk_logits_along_k(const SoftmaxParams& P, const Row<T, MK, BK, Pos>& r, Pos j0,
                                                     const float (&sv)[V], float (&x)[V]) {
  chunk_logits_from<T, MK, BK, V, Pos>(P, r, j0, sv, r.mask + j0, r.bias + j0, x);
}

// 16 bytes read once / written once: evict-first in the caches.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Issued only where `pred` holds (a predicated store: the values are formed either way).
__device__ __forceinline__ void store_streaming_if(bool pred, void* p, uint4 v) {
  asm volatile(
      "{\n"
      ".reg .pred q;\n"
      "setp.ne.b32 q, %5, 0;\n"
      "@q st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};\n"
      "}\n" ::"l"(p),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(static_cast<int>(pred))
      : "memory");
}
__device__ __forceinline__ void store_streaming(void* p, uint4 v) { store_streaming_if(true, p, v); }

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

template <typename T>
__device__ __forceinline__ void unpack_chunk(uint4 u, float (&x)[16 / sizeof(T)]) {
  union {
    uint4 u;
    Vec<T, 16 / sizeof(T)> v;
  } o;
  o.u = u;
  widen(o.v, x);
}

// The larger of each pair of 16-bit values of T in two 32-bit words, in one instruction (max.f16x2 /
// max.bf16x2; as fmaxf, a NaN gives the other value). Exact, as fmaxf of the widened values: the
// largest of a row's raw 16-bit scores is one of them.
template <typename T>
__device__ __forceinline__ uint32_t max_pairs(uint32_t a, uint32_t b) {
  static_assert(sizeof(T) == 2, "16-bit pairs");
  uint32_t d;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
}

// Two -inf of the 16-bit type T in one word.
template <typename T>
__device__ __forceinline__ uint32_t neg_inf_pair() {
  float v[16 / sizeof(T)];
#pragma unroll
  for (int e = 0; e < 16 / static_cast<int>(sizeof(T)); ++e) v[e] = neg_inf();
  return pack_chunk<T>(v).x;
}

// The larger of a word's two 16-bit values of T, as float32.
template <typename T>
__device__ __forceinline__ float max_of_pair(uint32_t w) {
  Vec<T, 2> v;
  static_assert(sizeof(v) == sizeof(w), "one word");
  __builtin_memcpy(&v, &w, sizeof(w));
  float x[2];
  widen(v, x);
  return fmaxf(x[0], x[1]);
}

// ---- the online max / sum and its reductions in a fixed order -----------------------------
// The xor butterfly leaves the same bits in every lane (ms_combine is commutative).

// Running max m and sum s of exp(x - m).
struct MS {
  float m, s;
};

// The value exponents are taken relative to: the maximum m, or 0 where every x is -inf.
__device__ __forceinline__ float ms_shift(float m) { return m == neg_inf() ? 0.0f : m; }

// exp(x - m) is taken as exp2(fmaf(x, log2 e, -shift)) with shift = m * log2 e rounded: one
// multiply-add a key, exact but for shift's rounding d = m * log2 e - shift, the same for every key
// of the row, so that the normalisation cancels 2^d as long as it stays within float32's range.
// |d| <= ulp(shift) / 2 <= 32 where |shift| < 2^29. Rows whose largest logit is larger than that
// (|m| >= 2^29 / log2 e, about 3.7e8; only huge scores or scales reach it) take the difference
// first: their logits become x - m, and the same multiply-add with a shift of 0 gives
// exp2((x - m) * log2 e). With the multiply-add on x, 2^d over- or underflowed and the row came out
// as zeros or NaN. (In the one-read kernel the difference is a pass of its own over the kept
// logits, taken only by such rows, rather than a second exponent loop: the code stays about as
// long. The long-row kernel takes such a row's sum again once its maximum is known, and chooses
// its outputs' loop once a row: tested in every chunk, the test cost its rows 3 to 5 % on an H200,
// docs/perf.md, "v36".)
constexpr float kExactShiftFrom = 536870912.0f;  // 2^29
__device__ __forceinline__ bool needs_exact_shift(float shift) { return fabsf(shift) >= kExactShiftFrom; }

// A row of huge logits (needs_exact_shift): its V logits become y - m, and the shift to take their
// exponents with, exp2(fmaf(y, log2 e, -shift)), is 0.
template <int V>
__device__ __forceinline__ float difference_first(float (&y)[V], float m) {
#pragma unroll
  for (int e = 0; e < V; ++e) y[e] = __fsub_rn(y[e], m);
  return 0.0f;
}

__device__ __forceinline__ MS ms_combine(MS a, MS b) {
  const float m = fmaxf(a.m, b.m);
  const float ms = ms_shift(m);
  // Written out, as the compiler had contracted it (b's product rounded, a's fused into the sum):
  // the choice is no longer the compiler's in each kernel.
  const float ea = fast_exp2((a.m - ms) * kLog2e), eb = fast_exp2((b.m - ms) * kLog2e);
  return {m, __fmaf_rn(a.s, ea, __fmul_rn(b.s, eb))};
}

// Adds the V logits of one chunk to the running state (fmaxf ignores NaN; the sum does not).
// EXACT: a row of huge logits takes the difference to the running maximum first (a test each
// chunk). Without it such a row's sum comes out wrong (2^d out of range): the long-row kernel's
// staged rows find such rows from the reduced maximum and take their sum again (reduce_row,
// streaming_kernel.cuh), so that an ordinary chunk runs the instructions it ran before huge rows
// were taken apart (tested each chunk, the test cost k1m 3 to 5 % on an H200, docs/perf.md, "v36").
template <bool EXACT, int V>
__device__ __forceinline__ void ms_add_chunk(MS& st, const float (&x)[V]) {
  float cm = x[0];
#pragma unroll
  for (int e = 1; e < V; ++e) cm = fmaxf(cm, x[e]);
  if (cm > st.m) {
    st.s *= fast_exp2((st.m - cm) * kLog2e);
    st.m = cm;
  }
  float y[V];
#pragma unroll
  for (int e = 0; e < V; ++e) y[e] = x[e];
  float shift = ms_shift(st.m) * kLog2e;
  if (EXACT && needs_exact_shift(shift)) shift = difference_first(y, st.m);
#pragma unroll
  for (int e = 0; e < V; ++e) st.s += fast_exp2(fmaf(y[e], kLog2e, -shift));
}

// The sum of exp(x - m) over V logits of a row of huge logits, with m the row's maximum.
template <int V>
__device__ __forceinline__ float huge_chunk_sum(float (&x)[V], float m) {
  const float sh = difference_first(x, m);
  float s = 0.0f;
#pragma unroll
  for (int e = 0; e < V; ++e) s += fast_exp2(fmaf(x[e], kLog2e, -sh));
  return s;
}

__device__ __forceinline__ MS lane_reduce_ms(MS v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) {
    MS o{__shfl_xor_sync(0xffffffffu, v.m, off, width), __shfl_xor_sync(0xffffffffu, v.s, off, width)};
    v = ms_combine(v, o);
  }
  return v;
}

// The maximum and the sum over the `width` lanes of a row (a power of two up to 32; a row's lanes
// are an aligned group of the warp). The butterfly is unrolled and entered at the step that
// `width` needs: one branch, then a shuffle and an operation a step. Every lane ends with the same
// value: fmaxf and + are commutative. (fmaxf ignores NaN; the sum does not.)
template <typename Op>
__device__ __forceinline__ float lane_butterfly(float v, int width, Op op) {
  switch (width) {
    case 32: v = op(v, __shfl_xor_sync(0xffffffffu, v, 16)); [[fallthrough]];
    case 16: v = op(v, __shfl_xor_sync(0xffffffffu, v, 8)); [[fallthrough]];
    case 8: v = op(v, __shfl_xor_sync(0xffffffffu, v, 4)); [[fallthrough]];
    case 4: v = op(v, __shfl_xor_sync(0xffffffffu, v, 2)); [[fallthrough]];
    case 2: v = op(v, __shfl_xor_sync(0xffffffffu, v, 1)); [[fallthrough]];
    default: break;
  }
  return v;
}
__device__ __forceinline__ float lane_max(float v, int width) {
  return lane_butterfly(v, width, [](float a, float b) { return fmaxf(a, b); });
}
__device__ __forceinline__ float lane_sum(float v, int width) {
  return lane_butterfly(v, width, [](float a, float b) { return a + b; });
}

// The partials of warps w0 .. w0 + n - 1 (written to shared memory before a barrier), combined
// in warp order.
__device__ __forceinline__ MS combine_warps(const float* warp_max, const float* warp_sum, int w0, int n) {
  MS v{warp_max[w0], warp_sum[w0]};
  for (int w = 1; w < n; ++w) v = ms_combine(v, {warp_max[w0 + w], warp_sum[w0 + w]});
  return v;
}

// The rows a cluster shares reduce the partials of their warps, and those of the cluster's blocks,
// taking the maximum M first (fmaxf: exact, in any order), then rescaling each partial's sum to
// it at once, s * exp(m - M), and adding those in order: one exp per partial, off the chain of
// additions, instead of a chain of pairwise merges with two exps each (k256k: 16 blocks of 8
// warps a row). Rows of one block keep combine_warps' merges: the maximum-first form cost BLOOM
// prefill 1 to 3 % in four calls (docs/perf.md). This is combine_warps in that form (each warp's
// pair read once) for a row that has all of its block's kWarps warps.
template <int kWarps>  // the row's block: 8 or 16 warps
__device__ __forceinline__ MS combine_warps_max_first(const float* warp_max, const float* warp_sum) {
  float wm[kWarps], ws[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    wm[w] = warp_max[w];
    ws[w] = warp_sum[w];
  }
  float m = wm[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, wm[w]);
  const float shift = ms_shift(m);
  // The products and sums written out (__fmul_rn, __fmaf_rn): left to the compiler, which product
  // of `s + ws * e` it fuses into the addition changed with the code around it, and the bits with it.
  float s = __fmul_rn(ws[0], fast_exp2((wm[0] - shift) * kLog2e));
#pragma unroll
  for (int w = 1; w < kWarps; ++w) s = __fmaf_rn(ws[w], fast_exp2((wm[w] - shift) * kLog2e), s);
  return {m, s};
}

// ---- mbarriers and the exchange of cluster partials ------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// Raises the transaction count of the barrier's current phase (the bytes a copy will complete).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// The cluster barrier in two halves: arrive, and later wait for every thread of the cluster to
// have arrived. Every thread of the cluster arrives once, then waits, each in warp-uniform control
// flow. The arrive is relaxed: it releases nothing itself. The mbarrier inits are released by
// fence.mbarrier_init before it (mbar_fence_init), without the GPU-wide memory barrier
// (MEMBAR.ALL.GPU) that ptxas puts before a releasing arrive.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// ---- PTX: bulk copies ---------------------------------------------------------------------------
// L2 cache policies for the bulk copies: evict first (scores and operand rows read once) or
// normal (operand rows shared by the tiles of a group). The policy is a literal in the asm.
template <bool kEvictFirst>
__device__ __forceinline__ uint64_t l2_policy() {
  uint64_t policy;
  if constexpr (kEvictFirst) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
  }
  return policy;
}

// Global -> shared, `bytes` a multiple of 16, both addresses 16-byte aligned.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}

// 16 bytes of shared memory.
__device__ __forceinline__ uint4 lds128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void sts128(uint8_t* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// Shared -> global by the bulk copy engine, `bytes` a multiple of 16, both addresses 16-byte
// aligned, in this thread's current bulk group (evict-first in L2, as the 16-byte stores).
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes, uint64_t policy) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group.L2::cache_hint [%0], [%1], %2, %3;" ::"l"(dst), "r"(src),
               "r"(bytes), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Until this thread's bulk groups have read their shared memory (they may still be writing).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// Until this thread's bulk groups are complete.
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// This thread's writes to shared memory, visible to the bulk copy engine (the async proxy).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Store (m, s) into the shared memory of block `rank` of the cluster, at the address that
// `local` has in this block, completing 8 bytes on that block's mbarrier at the address `bar` has
// here.
__device__ __forceinline__ void push_partial(uint32_t local, uint32_t bar, uint32_t rank, float m, float s) {
  asm volatile(
      "{\n"
      ".reg .b32 ra, rb;\n"
      "mapa.shared::cluster.u32 ra, %0, %2;\n"
      "mapa.shared::cluster.u32 rb, %1, %2;\n"
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [ra], {%3, %4}, [rb];\n"
      "}\n" ::"r"(local),
      "r"(bar), "r"(rank), "f"(m), "f"(s)
      : "memory");
}

// The blocks of a cluster that share a row exchange their partials (max, sum) without a
// cluster-wide barrier: every block pushes its partial into the other blocks' shared memory
// (st.async, completing on their barrier for the row's parity) and waits for theirs, then every
// thread combines them in rank order (the same bits in every thread and block). A slot of one
// parity is written again two rows later, only by a block that has received this block's partial
// of the row between, which this block sends after reading the slot (it reads it before the next
// row's block-wide barrier). Set up by one thread (init, then fence.mbarrier_init and a cluster
// barrier); the blocks must not exit before a final cluster barrier.
constexpr int kMaxCluster = 16;

struct ClusterExchange {
  unsigned long long bar[2];     // by row parity: the other blocks' partials have arrived
  float2 part[2][kMaxCluster];  // by row parity and rank: (max, sum)

  __device__ __forceinline__ void init() {
    for (int p = 0; p < 2; ++p) mbar_init(smem_u32(&bar[p]), 1);
  }

  // `st`: this block's partial, the same in every thread; `rank`: the block's rank in the cluster;
  // `k`: the row's ordinal in this block.
  __device__ __forceinline__ MS combine(MS st, int cluster, int rank, int k) {
    const int par = k & 1;
    const uint32_t b = smem_u32(&bar[par]);
    const int tid = threadIdx.x;
    if (tid < cluster && tid != rank) push_partial(smem_u32(&part[par][rank]), b, tid, st.m, st.s);
    if (tid == 0) mbar_arrive_expect_tx(b, static_cast<uint32_t>(cluster - 1) * 8u);
    mbar_wait(b, static_cast<uint32_t>((k >> 1) & 1));
    // Over the smallest of 4, 8 or 16 lanes that holds every rank (a cluster has 4, 8 or 16 blocks).
    if (cluster <= 4) return reduce_ranks<4>(st, cluster, rank, par);
    if (cluster <= 8) return reduce_ranks<8>(st, cluster, rank, par);
    return reduce_ranks<kMaxCluster>(st, cluster, rank, par);
  }

  // Lane l takes rank q = l % N's partial ((-inf, 0) past the ranks), so that each group of N
  // lanes holds them all; the warp takes their maximum within its groups (the same in every lane),
  // then adds the rescaled sums in rank order. Past the ranks `scaled` is +0, and s + 0 = s: the
  // sum of N terms has the bits of the sum over the ranks alone, for every N >= cluster. (No
  // partial's maximum is NaN: fmaxf from -inf leaves NaN out.)
  template <int N>
  __device__ __forceinline__ MS reduce_ranks(MS st, int cluster, int rank, int par) const {
    const int q = threadIdx.x & (N - 1);
    MS q_part{neg_inf(), 0.0f};
    if (q < cluster) {
      const float2 v = part[par][q];
      q_part = q == rank ? st : MS{v.x, v.y};
    }
    float m = q_part.m;
#pragma unroll
    for (int off = N / 2; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float scaled = q_part.s * fast_exp2((q_part.m - ms_shift(m)) * kLog2e);
    float s = __shfl_sync(0xffffffffu, scaled, 0);
#pragma unroll
    for (int i = 1; i < N; ++i) s += __shfl_sync(0xffffffffu, scaled, i);
    return {m, s};
  }
};

// The normalised outputs of one row from its reduced state: y = exp(x - max) / sum; a row with no
// visible key gives zeros (and a NaN row NaN).
struct Normaliser {
  float m, shift, inv, hidden;
  bool huge;  // needs_exact_shift(shift): apply_as<true>, which takes the difference first
  __device__ __forceinline__ explicit Normaliser(MS tot) {
    // (ms_shift written out: through the helper, ptxas schedules the two-read kernel differently)
    m = tot.m == neg_inf() ? 0.0f : tot.m;
    shift = m * kLog2e;
    huge = needs_exact_shift(shift);
    inv = tot.s == 0.0f ? 0.0f : 1.0f / tot.s;  // NaN stays NaN
    hidden = 0.0f * inv;                         // 0, or NaN for a NaN row
  }
  // The outputs of V logits, in place; HUGE: the row is huge (a caller that takes the test once a
  // row, with a loop for each answer: tested each chunk, ptxas issues the differences predicated
  // for every chunk of every row).
  template <bool HUGE, int V>
  __device__ __forceinline__ void apply_as(float (&y)[V]) const {
    outputs(y, HUGE ? difference_first(y, m) : shift);
  }
  // The same with the test each chunk.
  template <int V>
  __device__ __forceinline__ void apply(float (&y)[V]) const {
    float sh = shift;
    if (huge) sh = difference_first(y, m);
    outputs(y, sh);
  }
  // y = exp2(y * log2 e - sh) / sum, in place.
  template <int V>
  __device__ __forceinline__ void outputs(float (&y)[V], float sh) const {
#pragma unroll
    for (int e = 0; e < V; ++e) y[e] = fast_exp2(fmaf(y[e], kLog2e, -sh)) * inv;
  }
  // A hidden chunk's output, packed once: a chunk that chooses per key between its product and
  // `hidden` compiles to moves of `hidden` and the products issued under a predicate, hidden or
  // not (docs/perf.md, v23); with this, each branch has a store of its own.
  template <typename T, int V>
  __device__ __forceinline__ uint4 hidden_chunk() const {
    float h[V];
#pragma unroll
    for (int e = 0; e < V; ++e) h[e] = hidden;
    return pack_chunk<T>(h);
  }
};

}  // namespace detail
}  // namespace tp_softmax
