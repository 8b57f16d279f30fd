// SPDX-License-Identifier: Apache-2.0
//! @file
//! Device victim selection (cuda/select.cuh) against the host's (evict/score.hpp lowest_ranked):
//! random scores with many ties, empty and protected slots, several heads; the first `count`
//! slots of each head must be exactly the host's victims, in the same order. Own main(): without
//! a device it prints "SKIPPED: no CUDA device" and exits 0.
#include <kvcache/cuda/select.cuh>
#include <kvcache/evict/score.hpp>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

int failures = 0;
#define CHECK_CU(expr)                                                                   \
  do {                                                                                   \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) {                                     \
      std::printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      return ++failures, void();                                                         \
    }                                                                                    \
  } while (0)

void case_random(std::uint32_t heads, std::uint32_t rows, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<float> scores(std::size_t{heads} * rows);
  std::vector<std::int32_t> pos(std::size_t{rows} * heads);
  std::vector<std::uint8_t> prot(pos.size());
  for (auto& x : scores) x = static_cast<float>(std::uniform_int_distribution<int>(-8, 16)(rng)) / 4;
  for (std::uint32_t s = 0; s < rows; ++s)
    for (std::uint32_t h = 0; h < heads; ++h) {
      const bool empty = std::uniform_int_distribution<int>(0, 9)(rng) == 0;
      pos[std::size_t{s} * heads + h] = empty ? -1 : static_cast<std::int32_t>((s * 7919u + h) % 100000u);
      prot[std::size_t{s} * heads + h] = std::uniform_int_distribution<int>(0, 7)(rng) == 0;
    }
  float* d_scores;
  std::int32_t* d_pos;
  std::uint8_t* d_prot;
  CHECK_CU(cudaMalloc(&d_scores, scores.size() * sizeof(float)));
  CHECK_CU(cudaMalloc(&d_pos, pos.size() * sizeof(std::int32_t)));
  CHECK_CU(cudaMalloc(&d_prot, prot.size()));
  CHECK_CU(cudaMemcpy(d_scores, scores.data(), scores.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CU(cudaMemcpy(d_pos, pos.data(), pos.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
  CHECK_CU(cudaMemcpy(d_prot, prot.data(), prot.size(), cudaMemcpyHostToDevice));
  kvcache::gpu::select_buffers buf;
  if (auto st = kvcache::gpu::select_ranked(d_scores, d_pos, d_prot, heads, rows, buf); !st) {
    std::printf("FAIL select_ranked: %s\n", st.message().c_str());
    ++failures;
    return;
  }
  std::vector<std::uint32_t> dev(scores.size());
  CHECK_CU(cudaMemcpy(dev.data(), buf.slots_out, dev.size() * sizeof(std::uint32_t), cudaMemcpyDeviceToHost));
  for (std::uint32_t h = 0; h < heads; ++h) {
    std::vector<kvcache::scored_slot> cands;
    for (std::uint32_t s = 0; s < rows; ++s) {
      const std::size_t at = std::size_t{s} * heads + h;
      if (pos[at] >= 0 && !prot[at]) cands.push_back({scores[std::size_t{h} * rows + s], pos[at], s});
    }
    const std::size_t count = cands.size() / 2 + 1;
    std::vector<std::uint32_t> host;
    kvcache::lowest_ranked(cands, count, host);
    for (std::size_t i = 0; i < host.size(); ++i)
      if (dev[std::size_t{h} * rows + i] != host[i]) {
        std::printf("FAIL heads %u rows %u head %u: victim %zu is slot %u on the device, %u on the host\n",
                    heads, rows, h, i, dev[std::size_t{h} * rows + i], host[i]);
        ++failures;
        break;
      }
  }
  cudaFree(d_scores);
  cudaFree(d_pos);
  cudaFree(d_prot);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    // The launcher still compiles and links: a host without a device must refuse cleanly.
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  case_random(1, 1, 1);
  case_random(8, 1024, 2);
  case_random(8, 32768, 3);
  case_random(3, 1000, 4);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_cuda_evict: all passed\n");
  return 0;
}
