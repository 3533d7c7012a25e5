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

// A switch over the four kinds of one enum: none, then the three that read an operand (K1 to K3).
#define TP_SOFTMAX_KIND_SWITCH(VALUE, KIND, K1, K2, K3, NAME, ...)          \
  [&] {                                                                     \
    switch (VALUE) {                                                        \
      TP_SOFTMAX_CASE(::tp_softmax::KIND::kNone, NAME, __VA_ARGS__)         \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::KIND::K1, NAME, __VA_ARGS__)    \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::KIND::K2, NAME, __VA_ARGS__)    \
      TP_SOFTMAX_OPERAND_CASE(::tp_softmax::KIND::K3, NAME, __VA_ARGS__)    \
      default: return cudaErrorInvalidValue;                                \
    }                                                                       \
  }()

#define MASK_KIND_SWITCH(VALUE, NAME, ...) \
  TP_SOFTMAX_KIND_SWITCH(VALUE, MaskKind, kBool, kSame, kFloat32, NAME, __VA_ARGS__)
#define BIAS_KIND_SWITCH(VALUE, NAME, ...) \
  TP_SOFTMAX_KIND_SWITCH(VALUE, BiasKind, kSlopes, kSame, kFloat32, NAME, __VA_ARGS__)
