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

#ifdef TP_SOFTMAX_PLAIN_ROWS_ONLY
// Rows without mask or bias only (scripts/timeline_probe.cu: a build of a few kernels).
#define MASK_KIND_SWITCH(VALUE, NAME, ...)                                  \
  [&] {                                                                     \
    switch (VALUE) {                                                        \
      TP_SOFTMAX_CASE(::tp_softmax::MaskKind::kNone, NAME, __VA_ARGS__)     \
      default: return cudaErrorInvalidValue;                                \
    }                                                                       \
  }()
#define BIAS_KIND_SWITCH(VALUE, NAME, ...)                                  \
  [&] {                                                                     \
    switch (VALUE) {                                                        \
      TP_SOFTMAX_CASE(::tp_softmax::BiasKind::kNone, NAME, __VA_ARGS__)     \
      default: return cudaErrorInvalidValue;                                \
    }                                                                       \
  }()
#else
#define MASK_KIND_SWITCH(VALUE, NAME, ...)                                  \
  [&] {                                                                     \
    switch (VALUE) {                                                        \
      TP_SOFTMAX_CASE(::tp_softmax::MaskKind::kNone, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_CASE(::tp_softmax::MaskKind::kBool, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_CASE(::tp_softmax::MaskKind::kSame, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_CASE(::tp_softmax::MaskKind::kFloat32, NAME, __VA_ARGS__)  \
      default: return cudaErrorInvalidValue;                                \
    }                                                                       \
  }()

#define BIAS_KIND_SWITCH(VALUE, NAME, ...)                                  \
  [&] {                                                                     \
    switch (VALUE) {                                                        \
      TP_SOFTMAX_CASE(::tp_softmax::BiasKind::kNone, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_CASE(::tp_softmax::BiasKind::kSlopes, NAME, __VA_ARGS__)   \
      TP_SOFTMAX_CASE(::tp_softmax::BiasKind::kSame, NAME, __VA_ARGS__)     \
      TP_SOFTMAX_CASE(::tp_softmax::BiasKind::kFloat32, NAME, __VA_ARGS__)  \
      default: return cudaErrorInvalidValue;                                \
    }                                                                       \
  }()
#endif
