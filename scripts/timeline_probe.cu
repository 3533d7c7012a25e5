// Where the time of one launch of the one-read kernel goes, block by block.
//
// Rows without mask or bias (B x H x Q rows of K keys, contiguous): the kernel is built with its
// timeline hooks (staged_kernel.cuh, TP_SOFTMAX_TIMELINE), so thread 0 of every block notes the
// global timer when it enters, when its set-up is done, when its first tile's copies and all its
// first copies are issued, for each tile when its data has arrived / the block's own partial is
// formed / the row's is (cluster exchange included) / its stores are issued, and when it leaves.
// Printed: the launch timed with CUDA events against a device copy of the same bytes (rotating
// buffers, medians), then medians over 40 recorded launches of when the blocks reach those points
// and how much of the span they are resident, for launches that follow another kernel and
// launches that follow a launch of the same kernel; per tile, the means of the block's own part
// of the exchange column (its partial) and of the wait for the other blocks' partials.
//
// Build and run on the GPU machine (a few kernels only, about half a minute):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DTP_SOFTMAX_TIMELINE \
//     -DTP_SOFTMAX_PLAIN_ROWS_ONLY -Icsrc/kernels scripts/timeline_probe.cu \
//     csrc/kernels/softmax_launch.cu -o /tmp/timeline_probe
//   /tmp/timeline_probe ROWS K [bf16|fp16|fp32]        e.g. 256 65536 bf16 (decode-b8-k64k)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "launch_typed.cuh"
#include "probe_util.cuh"

namespace tp_softmax {
namespace detail {
template cudaError_t launch_typed<__half>(const SoftmaxParams&, const RowConfig&, bool, cudaStream_t);
template cudaError_t launch_typed<__nv_bfloat16>(const SoftmaxParams&, const RowConfig&, bool, cudaStream_t);
template cudaError_t launch_typed<float>(const SoftmaxParams&, const RowConfig&, bool, cudaStream_t);
}  // namespace detail
}  // namespace tp_softmax

using namespace tp_softmax;
using detail::kTimelineSlots;
using detail::kTimelineTiles;


__global__ void fill_random(uint16_t* p, size_t n16, uint32_t seed, bool f32) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n16; i += size_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float u = (h & 0xffffff) / 16777216.0f * 8.0f - 4.0f;  // uniform in [-4, 4)
    if (f32) {
      reinterpret_cast<float*>(p)[i] = u;
    } else {
      p[i] = seed & 1 ? __bfloat16_as_ushort(__float2bfloat16(u)) : __half_as_ushort(__float2half(u));
    }
  }
}

// The q-quantile, and the mean (of marks 0.256 us apart, a mean resolves shorter spans than a
// median does).
static double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * (v.size() - 1) + 0.5)];
}
static double mean(const std::vector<double>& v) {
  double t = 0;
  for (double x : v) t += x;
  return v.empty() ? 0.0 : t / v.size();
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s ROWS K [bf16|fp16|fp32]\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atoll(argv[1]), K = std::atoll(argv[2]);
  const std::string dt = argc > 3 ? argv[3] : "bf16";
  const DType dtype = dt == "fp32" ? DType::kFloat32 : dt == "fp16" ? DType::kFloat16 : DType::kBFloat16;
  const size_t es = dtype == DType::kFloat32 ? 4 : 2;
  const size_t bytes = static_cast<size_t>(rows * K) * es;
  // Rotating buffers: at least 3 sets and 256 MiB of inputs, so no launch finds its rows in L2.
  const int sets = static_cast<int>(std::max<size_t>(3, (size_t{256} << 20) / bytes + 1));
  std::vector<void*> in(sets), out(sets);
  for (int i = 0; i < sets; ++i) {
    CHECK(cudaMalloc(&in[i], bytes));
    CHECK(cudaMalloc(&out[i], bytes));
    fill_random<<<1024, 256>>>(static_cast<uint16_t*>(in[i]), bytes / 2 / (es / 2), 1234u + 2u * i + (dt == "bf16"),
                               dtype == DType::kFloat32);
  }
  CHECK(cudaDeviceSynchronize());
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));

  auto params = [&](int i) {
    SoftmaxParams p = {};
    p.dtype = dtype;
    p.B = rows;
    p.H = 1;
    p.Q = 1;
    p.K = K;
    p.in = in[i];
    p.out = out[i];
    const int64_t st[4] = {K, K, K, 1};
    std::memcpy(p.in_stride, st, sizeof st);
    std::memcpy(p.out_stride, st, sizeof st);
    p.mask_kind = MaskKind::kNone;
    p.bias_kind = BiasKind::kNone;
    p.layer_scale = 1.0f;
    return p;
  };
  char desc[256];
  std::printf("%s, %d SMs; %lld rows x %lld keys %s: %s\n", prop.name, prop.multiProcessorCount,
              static_cast<long long>(rows), static_cast<long long>(K), dt.c_str(),
              describe_row_config(K, dtype, false, desc, sizeof desc));

  // Device-side timings: a spin kernel holds the stream while the host queues a chunk.
  cudaEvent_t ev0[64], ev1[64];
  for (int i = 0; i < 64; ++i) {
    CHECK(cudaEventCreate(&ev0[i]));
    CHECK(cudaEventCreate(&ev1[i]));
  }
  auto time_us = [&](auto&& fn) {
    std::vector<double> t;
    for (int i = 0; i < 10; ++i) fn(i % sets);
    for (int rep = 0; rep < 8; ++rep) {
      probe_spin<<<1, 1>>>(10'000'000);  // 10 ms (probe_util.cuh)
      for (int i = 0; i < 64; ++i) {
        CHECK(cudaEventRecord(ev0[i]));
        fn((rep * 64 + i) % sets);
        CHECK(cudaEventRecord(ev1[i]));
      }
      CHECK(cudaDeviceSynchronize());
      for (int i = 0; i < 64; ++i) {
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, ev0[i], ev1[i]));
        t.push_back(ms * 1e3);
      }
    }
    return median(t);
  };
  auto softmax = [&](int i) { CHECK(launch_attention_softmax(params(i), nullptr)); };
  auto copy = [&](int i) { CHECK(cudaMemcpyAsync(out[i], in[i], bytes, cudaMemcpyDeviceToDevice)); };

  // The copy bandwidth (bytes read + written) of 1 GiB copies, as the benchmark's floor.
  void *big0, *big1;
  const size_t big = size_t{1} << 30;
  CHECK(cudaMalloc(&big0, big));
  CHECK(cudaMalloc(&big1, big));
  CHECK(cudaMemset(big0, 0, big));
  std::vector<double> tb;
  for (int i = 0; i < 12; ++i) {
    CHECK(cudaEventRecord(ev0[0]));
    CHECK(cudaMemcpyAsync(i % 2 ? big0 : big1, i % 2 ? big1 : big0, big, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(ev1[0]));
    CHECK(cudaEventSynchronize(ev1[0]));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, ev0[0], ev1[0]));
    if (i >= 2) tb.push_back(ms * 1e3);
  }
  CHECK(cudaFree(big0));
  CHECK(cudaFree(big1));
  const double gbs = 2.0 * big / median(tb) / 1e3;
  const double floor_us = 2.0 * bytes / gbs / 1e3;
  const double t_soft = time_us(softmax), t_copy = time_us(copy);
  std::printf("copy bandwidth %.1f GB/s (1 GiB copies): floor %.2f us\n", gbs, floor_us);
  std::printf("events, median:  softmax %.2f us (eff %.3f)   copy of the same bytes %.2f us (eff %.3f)\n", t_soft,
              floor_us / t_soft, t_copy, floor_us / t_copy);

  // The timelines of recorded launches: each one right after a short spin kernel ("after another
  // kernel") and right after a launch of the same kernel ("after itself", as in a run of layers).
  const int kMaxBlocks = 4096, kLaunches = 40;
  const size_t per_launch = static_cast<size_t>(kMaxBlocks) * kTimelineSlots;
  unsigned long long *d_a, *d_b, *d_null = nullptr;
  CHECK(cudaMalloc(&d_a, sizeof(unsigned long long) * per_launch * kLaunches));
  CHECK(cudaMalloc(&d_b, sizeof(unsigned long long) * per_launch * kLaunches));
  CHECK(cudaMemset(d_a, 0, sizeof(unsigned long long) * per_launch * kLaunches));
  CHECK(cudaMemset(d_b, 0, sizeof(unsigned long long) * per_launch * kLaunches));
  for (int L = 0; L < kLaunches; ++L) {
    unsigned long long* pa = d_a + L * per_launch;
    unsigned long long* pb = d_b + L * per_launch;
    CHECK(cudaMemcpyToSymbolAsync(detail::timeline, &d_null, sizeof d_null));
    softmax((2 * L) % sets);  // not recorded: the stream's copies settle
    CHECK(cudaMemcpyToSymbolAsync(detail::timeline, &pa, sizeof pa));
    probe_spin<<<1, 1>>>(1'000'000);
    softmax((2 * L + 1) % sets);
    CHECK(cudaMemcpyToSymbolAsync(detail::timeline, &pb, sizeof pb));
    softmax((2 * L) % sets);
    CHECK(cudaDeviceSynchronize());
  }
  std::vector<unsigned long long> tl(per_launch * kLaunches);
  auto report = [&](const char* title, const unsigned long long* dev) {
    CHECK(cudaMemcpy(tl.data(), dev, tl.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
    std::vector<double> s_entry_max, s_setup, s_iss0, s_issued, s_first_med, s_first_max, s_done_min, s_done_med,
        s_done_max, s_resident, s_gran;
    std::vector<std::vector<double>> s_wait(kTimelineTiles), s_xchg(kTimelineTiles), s_write(kTimelineTiles),
        s_stall(kTimelineTiles), s_xwait(kTimelineTiles), s_wphase(kTimelineTiles), s_local(kTimelineTiles),
        s_peers(kTimelineTiles);
    int nblocks = 0, nsms = 0, ntiles_seen = 0;
    for (int L = 0; L < kLaunches; ++L) {
      auto at = [&](int b, int s) { return tl[L * per_launch + static_cast<size_t>(b) * kTimelineSlots + s]; };
      int n = 0;
      while (n < kMaxBlocks && at(n, detail::kTlEntry) != 0) ++n;
      if (n == 0) continue;
      unsigned long long t0 = ~0ull;
      for (int b = 0; b < n; ++b) t0 = std::min(t0, at(b, detail::kTlEntry));
      auto rel = [&](unsigned long long v) { return (static_cast<double>(v) - static_cast<double>(t0)) / 1e3; };
      std::vector<double> entry, setup, iss0, issued, first, done, all;
      std::vector<int> sm_blocks(1024, 0);
      double resident = 0;
      for (int b = 0; b < n; ++b) {
        entry.push_back(rel(at(b, detail::kTlEntry)));
        setup.push_back(rel(at(b, detail::kTlSetup)));
        if (at(b, detail::kTlIssued0) != 0) iss0.push_back(rel(at(b, detail::kTlIssued0)));
        issued.push_back(rel(at(b, detail::kTlIssued)));
        first.push_back(rel(at(b, detail::kTlTile)));
        done.push_back(rel(at(b, detail::kTlDone)));
        resident += done.back() - entry.back();
        ++sm_blocks[at(b, detail::kTlSm) & 1023];
        for (int s = 1; s < kTimelineSlots; ++s)
          if (at(b, s) != 0) all.push_back(static_cast<double>(at(b, s)));
        unsigned long long prev = at(b, detail::kTlIssued);
        for (int k = 0; k < kTimelineTiles; ++k) {
          const unsigned long long w = at(b, detail::kTlTile + 4 * k), own = at(b, detail::kTlTile + 4 * k + 1),
                                   x = at(b, detail::kTlTile + 4 * k + 2), wr = at(b, detail::kTlTile + 4 * k + 3);
          if (w == 0) break;
          ntiles_seen = std::max(ntiles_seen, k + 1);
          s_wait[k].push_back(rel(w));
          s_xchg[k].push_back(rel(x));
          s_write[k].push_back(rel(wr));
          s_stall[k].push_back((static_cast<double>(w) - static_cast<double>(prev)) / 1e3);
          s_xwait[k].push_back((static_cast<double>(x) - static_cast<double>(w)) / 1e3);
          s_local[k].push_back((static_cast<double>(own) - static_cast<double>(w)) / 1e3);
          s_peers[k].push_back((static_cast<double>(x) - static_cast<double>(own)) / 1e3);
          s_wphase[k].push_back((static_cast<double>(wr) - static_cast<double>(x)) / 1e3);
          prev = wr;
        }
      }
      std::sort(all.begin(), all.end());
      double gran = 1e30;
      for (size_t i = 1; i < all.size(); ++i)
        if (all[i] > all[i - 1]) gran = std::min(gran, all[i] - all[i - 1]);
      const double span = *std::max_element(done.begin(), done.end());
      nblocks = n;
      nsms = static_cast<int>(std::count_if(sm_blocks.begin(), sm_blocks.end(), [](int c) { return c > 0; }));
      s_entry_max.push_back(*std::max_element(entry.begin(), entry.end()));
      s_setup.push_back(median(setup));
      s_iss0.push_back(median(iss0));
      s_issued.push_back(median(issued));
      s_first_med.push_back(median(first));
      s_first_max.push_back(*std::max_element(first.begin(), first.end()));
      s_done_min.push_back(*std::min_element(done.begin(), done.end()));
      s_done_med.push_back(median(done));
      s_done_max.push_back(span);
      s_resident.push_back(resident / (n * span));
      s_gran.push_back(gran / 1e3);
    }
    std::printf("timeline, %s: %d launches, %d blocks on %d SMs; global timer step %.3f us (smallest seen)\n", title,
                kLaunches, nblocks, nsms, median(s_gran));
    std::printf("  (us from the first block's entry; medians over the launches)\n");
    std::printf("  last block enters        %7.2f\n", median(s_entry_max));
    std::printf("  set-up done              %7.2f (median block)\n", median(s_setup));
    std::printf("  first tile's copies      %7.2f (median block)\n", median(s_iss0));
    std::printf("  all first copies issued  %7.2f (median block)\n", median(s_issued));
    std::printf("  first tile arrived       %7.2f (median block)  %7.2f (last block)\n", median(s_first_med),
                median(s_first_max));
    std::printf("  blocks done              %7.2f (first)  %7.2f (median)  %7.2f (last)\n", median(s_done_min),
                median(s_done_med), median(s_done_max));
    std::printf("  resident block time / (blocks x span): %.3f\n", median(s_resident));
    std::printf("  tile  blocks  arrived(med,p90)  combined(med)  stored(med)   wait for data  exchange  stores (med, p90)"
                "   own partial  other blocks (mean, p90)\n");
    for (int k = 0; k < ntiles_seen; ++k)
      std::printf("  %4d  %6zu  %7.2f %7.2f   %7.2f       %7.2f      %5.2f %5.2f   %5.2f %5.2f   %5.2f %5.2f"
                  "   %5.2f %5.2f   %5.2f %5.2f\n", k,
                  s_wait[k].size() / kLaunches, median(s_wait[k]), pct(s_wait[k], 0.9), median(s_xchg[k]),
                  median(s_write[k]), median(s_stall[k]), pct(s_stall[k], 0.9), median(s_xwait[k]),
                  pct(s_xwait[k], 0.9), median(s_wphase[k]), pct(s_wphase[k], 0.9), mean(s_local[k]),
                  pct(s_local[k], 0.9), mean(s_peers[k]), pct(s_peers[k], 0.9));
  };
  report("after another kernel", d_a);
  report("after itself", d_b);
  CHECK(cudaMemcpyToSymbol(detail::timeline, &d_a, sizeof d_a));
  // The hooks' own cost: the same launch timed with the timeline on.
  const double t_on = time_us(softmax);
  std::printf("events with the timeline recording: %.2f us (off: %.2f us)\n", t_on, t_soft);
  return 0;
}
