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

// Chunks (16 bytes of scores each) held per thread: 1, 2, 4, 8, or 0 for the streaming
// (two-read) path.
#define CHUNKS_SWITCH(VALUE, NAME, ...)                                     \
  [&] {                                                                     \
    if ((VALUE) == 1) { constexpr int NAME = 1; return __VA_ARGS__(); }     \
    if ((VALUE) == 2) { constexpr int NAME = 2; return __VA_ARGS__(); }     \
    if ((VALUE) == 4) { constexpr int NAME = 4; return __VA_ARGS__(); }     \
    if ((VALUE) == 8) { constexpr int NAME = 8; return __VA_ARGS__(); }     \
    if ((VALUE) == 0) { constexpr int NAME = 0; return __VA_ARGS__(); }     \
    return cudaErrorInvalidValue;                                           \
  }()
