// Turn runtime choices into compile-time template parameters.
//
//   MASK_KIND_SWITCH(p.mask_kind, MK, [&] { run<MK>(...); });
//
// Each macro declares a `constexpr` of the given name inside the lambda's scope, so one
// templated kernel serves every combination without copies per flag.
#pragma once

#include "softmax.h"

#define TP_SOFTMAX_CASE(ENUM_VALUE, NAME, ...) \
  case ENUM_VALUE: {                            \
    constexpr auto NAME = ENUM_VALUE;           \
    return __VA_ARGS__();                       \
  }

// Cases other than "none": compiled out in a build of the rows without mask or bias only
// (TP_SOFTMAX_PLAIN_ROWS_ONLY, scripts/timeline_probe.cu: a build of a few kernels).
#ifdef TP_SOFTMAX_PLAIN_ROWS_ONLY
#define TP_SOFTMAX_OPERAND_CASE(ENUM_VALUE, NAME, ...)
#else
#define TP_SOFTMAX_OPERAND_CASE(ENUM_VALUE, NAME, ...) TP_SOFTMAX_CASE(ENUM_VALUE, NAME, __VA_ARGS__)
#endif

#define MASK_KIND_SWITCH(VALUE, NAME, ...)                                          \
  [&] {                                                                             \
    switch (VALUE) {                                                                \
      TP_SOFTMAX_CASE(::tp_softmax::MaskKind::kNone, NAME, __VA_ARGS__)             \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::MaskKind::kBool, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::MaskKind::kSame, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::MaskKind::kFloat32, NAME, __VA_ARGS__)  \
      default: return cudaErrorInvalidValue;                                        \
    }                                                                               \
  }()

#define BIAS_KIND_SWITCH(VALUE, NAME, ...)                                          \
  [&] {                                                                             \
    switch (VALUE) {                                                                \
      TP_SOFTMAX_CASE(::tp_softmax::BiasKind::kNone, NAME, __VA_ARGS__)             \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::BiasKind::kSlopes, NAME, __VA_ARGS__)   \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::BiasKind::kSame, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::BiasKind::kFloat32, NAME, __VA_ARGS__)  \
      default: return cudaErrorInvalidValue;                                        \
    }                                                                               \
  }()
