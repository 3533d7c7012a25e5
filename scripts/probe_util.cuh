// What the GPU probes in scripts/ share: error checks and medians of CUDA-event timings.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// The median (of an even count, the mean of the middle two); 0 for none.
template <typename V>
static double median(std::vector<V> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? double(v[n / 2]) : 0.5 * (double(v[n / 2 - 1]) + double(v[n / 2]));
}

// The SMs of the current device (asked once).
static int sm_count() {
  static int sms = [] {
    int dev, n;
    CHECK(cudaGetDevice(&dev));
    CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }();
  return sms;
}

// Every thread of the grid spins on the global timer for `ns` nanoseconds.
__global__ void probe_spin(uint64_t ns) {
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

// The median in ms of `reps` calls of launch(i) (i counts from `warm`), each between two CUDA
// events on the default stream, after `warm` untimed calls. Before each timed call one thread
// spins for 50 us, so that the events and the call are queued behind it: the time is the GPU's
// from the end of the spin, without the host's launch latency in it.
static double time_launches(const std::function<void(int)>& launch, int reps, int warm) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < warm; ++i) launch(i);
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    probe_spin<<<1, 1>>>(50000);
    CHECK(cudaEventRecord(a));
    launch(warm + i);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return median(t);
}
