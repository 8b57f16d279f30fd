// SPDX-License-Identifier: Apache-2.0
//! @file
//! CUDA memory: growing a K range to 32k tokens with cuda_vmm (cold and with deferred reuse)
//! against cudaMalloc+copy doubling and a preallocated maximum; cuMemMap latency per page
//! against cudaMalloc; the append (chunk scatter) and gather kernels against one cudaMemcpy D2D
//! of the same bytes. Ratios are printed at the end of the run. Without a device it says so
//! and exits 0.
#include <kvcache/cuda/cuda_vmm.cuh>
#include <kvcache/cuda/kernels.cuh>

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "ratio_reporter.hpp"

namespace {

using kvcache::cuda_vmm;
using kvcache::cuda_vmm_config;
using kvcache::range_id;
using kvcache::write_request;
namespace gpu = kvcache::gpu;

// Llama-3-8B-like layer: 8 KV heads x 128 x fp16 = 2 KiB per token; 32k tokens = 64 MiB.
constexpr std::size_t token_bytes = 8 * 128 * 2;
constexpr std::size_t max_tokens = 32 * 1024;
constexpr std::size_t step_tokens = 16;  // tokens appended per step while growing
constexpr std::size_t max_bytes = max_tokens * token_bytes;

void check(cudaError_t e, benchmark::State& state) {
  if (e != cudaSuccess) state.SkipWithError(cudaGetErrorName(e));
}

// A device buffer the appended rows come from.
std::byte* source() {
  static std::byte* src = [] {
    std::byte* p = nullptr;
    cudaMalloc(&p, step_tokens * token_bytes);
    cudaMemset(p, 1, step_tokens * token_bytes);
    return p;
  }();
  return src;
}

cuda_vmm& vmm() {
  static cuda_vmm m(cuda_vmm_config{0, 0, max_bytes / (2u << 20) + 8, true});
  return m;
}

// Grows one range step by step to 32k tokens. cold: every page mapped anew each iteration.
void grow_vmm(benchmark::State& state, bool cold) {
  auto& m = vmm();
  std::byte* src = source();
  for (auto _ : state) {
    auto r = m.acquire(max_bytes, 0);
    if (!r) {
      state.SkipWithError(r.error().message().c_str());
      return;
    }
    std::byte* base = m.data(*r);
    for (std::size_t t = 0; t < max_tokens; t += step_tokens) {
      const write_request q{*r, t * token_bytes, (t + step_tokens) * token_bytes};
      if (auto st = m.prepare({&q, 1}); !st) {
        state.SkipWithError(st.message().c_str());
        return;
      }
      cudaMemcpyAsync(base + t * token_bytes, src, step_tokens * token_bytes,
                      cudaMemcpyDeviceToDevice);
    }
    check(cudaDeviceSynchronize(), state);
    m.release(*r);
    if (cold) m.reclaim_idle();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * max_bytes));
}
void BM_grow_vmm_cold(benchmark::State& state) { grow_vmm(state, true); }
void BM_grow_vmm_reuse(benchmark::State& state) { grow_vmm(state, false); }

// realloc-style growth: cudaMalloc twice the size, copy, free the old buffer.
void BM_grow_cudamalloc_doubling(benchmark::State& state) {
  std::byte* src = source();
  for (auto _ : state) {
    std::size_t cap = 2u << 20;
    std::byte* buf = nullptr;
    check(cudaMalloc(&buf, cap), state);
    for (std::size_t t = 0; t < max_tokens; t += step_tokens) {
      const std::size_t need = (t + step_tokens) * token_bytes;
      if (need > cap) {
        std::byte* bigger = nullptr;
        check(cudaMalloc(&bigger, 2 * cap), state);
        cudaMemcpyAsync(bigger, buf, t * token_bytes, cudaMemcpyDeviceToDevice);
        cudaFree(buf);
        buf = bigger;
        cap *= 2;
      }
      cudaMemcpyAsync(buf + t * token_bytes, src, step_tokens * token_bytes,
                      cudaMemcpyDeviceToDevice);
    }
    check(cudaDeviceSynchronize(), state);
    cudaFree(buf);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * max_bytes));
}

// The upper bound: the maximum allocated once, outside the timing.
void BM_grow_prealloc(benchmark::State& state) {
  std::byte* src = source();
  std::byte* buf = nullptr;
  check(cudaMalloc(&buf, max_bytes), state);
  for (auto _ : state) {
    for (std::size_t t = 0; t < max_tokens; t += step_tokens)
      cudaMemcpyAsync(buf + t * token_bytes, src, step_tokens * token_bytes,
                      cudaMemcpyDeviceToDevice);
    check(cudaDeviceSynchronize(), state);
  }
  cudaFree(buf);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * max_bytes));
}

// Mapping N pages (cuMemMap each + one cuMemSetAccess) vs cudaMalloc of the same bytes.
constexpr std::size_t map_pages = 32;
void BM_map_pages(benchmark::State& state) {
  auto& m = vmm();
  const std::size_t ps = m.granularity();
  for (auto _ : state) {
    auto r = m.acquire(map_pages * ps, 0);  // the idle range, emptied below: no driver call
    if (!r) {
      state.SkipWithError(r.error().message().c_str());
      break;
    }
    const write_request q{*r, 0, map_pages * ps};
    const auto t0 = std::chrono::steady_clock::now();
    const auto st = m.prepare({&q, 1});
    const auto t1 = std::chrono::steady_clock::now();
    m.release(*r);  // unmapped outside the timing
    m.reclaim_idle();
    if (!st) {
      state.SkipWithError(st.message().c_str());
      break;
    }
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * map_pages));  // pages/s
}
void BM_cudamalloc_pages(benchmark::State& state) {
  const std::size_t bytes = map_pages * vmm().granularity();
  for (auto _ : state) {
    std::byte* p = nullptr;
    const auto t0 = std::chrono::steady_clock::now();
    check(cudaMalloc(&p, bytes), state);
    const auto t1 = std::chrono::steady_clock::now();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
    cudaFree(p);
  }
}

// Append: scatter token rows (2 KiB) to every other slot of a range; gather: 4 heads' kept
// slots to a dense prefix. Both against one cudaMemcpy D2D of the same bytes.
constexpr std::size_t rows = 8192;
struct copy_bufs {
  std::byte* src = nullptr;
  std::byte* dst = nullptr;
  gpu::copy_chunk* chunks = nullptr;
  std::uint32_t* slots = nullptr;
  cudaEvent_t e0{}, e1{};
  copy_bufs() {
    cudaMalloc(&src, 2 * rows * token_bytes);
    cudaMalloc(&dst, 2 * rows * token_bytes);
    cudaMalloc(&chunks, rows * sizeof(gpu::copy_chunk));
    cudaMalloc(&slots, 8 * rows * sizeof(std::uint32_t));
    std::vector<gpu::copy_chunk> c(rows);
    for (std::size_t i = 0; i < rows; ++i)
      c[i] = {dst + 2 * i * token_bytes, src + i * token_bytes, token_bytes};
    cudaMemcpy(chunks, c.data(), rows * sizeof(gpu::copy_chunk), cudaMemcpyHostToDevice);
    std::vector<std::uint32_t> s(8 * rows);
    for (std::uint32_t h = 0; h < 8; ++h)
      for (std::uint32_t i = 0; i < rows; ++i) s[h * rows + i] = 2 * i + (h & 1);
    cudaMemcpy(slots, s.data(), s.size() * sizeof(std::uint32_t), cudaMemcpyHostToDevice);
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
  }
};
copy_bufs& bufs() {
  static copy_bufs b;
  return b;
}

template <class F>
void timed(benchmark::State& state, F&& f, std::size_t bytes) {
  auto& b = bufs();
  for (auto _ : state) {
    cudaEventRecord(b.e0);
    f();
    cudaEventRecord(b.e1);
    check(cudaEventSynchronize(b.e1), state);
    float ms = 0;
    cudaEventElapsedTime(&ms, b.e0, b.e1);
    state.SetIterationTime(ms * 1e-3);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}
void BM_append_kernel(benchmark::State& state) {
  auto& b = bufs();
  timed(state, [&] { (void)gpu::copy_chunks(b.chunks, rows); }, rows * token_bytes);
}
void BM_gather_kernel(benchmark::State& state) {
  auto& b = bufs();
  // token-major, 8 heads x 256 B rows, slot stride 2 KiB: every head keeps half its slots
  const gpu::gather_shape g{static_cast<std::uint32_t>(rows), 8, 256, token_bytes, 256};
  timed(state, [&] { (void)gpu::gather_rows(b.dst, b.src, b.slots, g); }, rows * token_bytes);
}
void BM_memcpy_d2d(benchmark::State& state) {
  auto& b = bufs();
  timed(state, [&] { cudaMemcpyAsync(b.dst, b.src, rows * token_bytes, cudaMemcpyDeviceToDevice); },
        rows * token_bytes);
}

}  // namespace

BENCHMARK(BM_grow_vmm_cold)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_grow_vmm_reuse)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_grow_cudamalloc_doubling)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_grow_prealloc)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_map_pages)->Unit(benchmark::kMicrosecond)->UseManualTime();
BENCHMARK(BM_cudamalloc_pages)->Unit(benchmark::kMicrosecond)->UseManualTime();
BENCHMARK(BM_append_kernel)->Unit(benchmark::kMicrosecond)->UseManualTime();
BENCHMARK(BM_gather_kernel)->Unit(benchmark::kMicrosecond)->UseManualTime();
BENCHMARK(BM_memcpy_d2d)->Unit(benchmark::kMicrosecond)->UseManualTime();

int main(int argc, char** argv) {
  if (!gpu::device_available()) {
    std::printf("SKIPPED: no CUDA device (bench_cuda needs a GPU)\n");
    return 0;
  }
  return kvcache_bench::run_with_ratios(
      argc, argv,
      {{"BM_grow_vmm_cold", "BM_grow_cudamalloc_doubling"},
       {"BM_grow_vmm_cold", "BM_grow_prealloc"},
       {"BM_grow_vmm_reuse", "BM_grow_prealloc"},
       {"BM_map_pages", "BM_cudamalloc_pages"},
       {"BM_append_kernel", "BM_memcpy_d2d"},
       {"BM_gather_kernel", "BM_memcpy_d2d"}});
}
