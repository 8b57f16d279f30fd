// SPDX-License-Identifier: Apache-2.0
//! @file
//! Device victim selection for the attention-score policies (evict/score.hpp's `lowest_ranked`
//! on the GPU): per KV head, the slots ordered from lowest to highest rank, by a CUB segmented
//! radix sort of one 64-bit key per (head, slot).
//!
//! Key = (orderable bits of the score) << 32 | position, so the radix order is exactly the host
//! ranking: lower score first, and on equal scores the older position first. Slots that are empty
//! or protected (recent window, observation tokens, sinks) get the all-ones key and sort last.
//! The caller takes the first `count` slots of each head as its victims (the host's candidate
//! count bounds `count`). Scores must be finite (the policies validate them on the host).
//! nvcc only.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>

#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

KVCACHE_NAMESPACE_BEGIN
namespace gpu {

namespace detail {

//! Monotone map float -> uint32: a < b (finite) iff bits(a) < bits(b).
__host__ __device__ inline std::uint32_t orderable_bits(float f) noexcept {
  std::uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <int = 0>  // a template: header-defined kernels are not inline
__global__ void rank_keys_kernel(const float* __restrict__ scores,
                                 const std::int32_t* __restrict__ positions,
                                 const std::uint8_t* __restrict__ protect, std::uint32_t heads,
                                 std::uint32_t rows, std::uint64_t* __restrict__ keys,
                                 std::uint32_t* __restrict__ slots, int* __restrict__ offsets) {
  const std::size_t n = std::size_t{heads} * rows;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const std::uint32_t h = static_cast<std::uint32_t>(i / rows), s = static_cast<std::uint32_t>(i % rows);
    const std::size_t at = std::size_t{s} * heads + h;  // positions/protect are [rows][heads]
    const std::int32_t p = positions[at];
    const bool candidate = p >= 0 && !(protect && protect[at]);
    keys[i] = candidate ? (std::uint64_t{orderable_bits(scores[i])} << 32) | static_cast<std::uint32_t>(p)
                        : ~std::uint64_t{0};
    slots[i] = s;
    if (s == 0) offsets[h] = static_cast<int>(h * rows);
    if (i == 0) offsets[heads] = static_cast<int>(n);
  }
}

}  // namespace detail

//! Device buffers for select_ranked(), grown on demand and reused (no allocation per step once
//! warm). Not copyable.
class select_buffers {
 public:
  select_buffers() = default;
  select_buffers(const select_buffers&) = delete;
  select_buffers& operator=(const select_buffers&) = delete;
  ~select_buffers() { release(); }

  //! Room for `heads` x `rows` entries.
  status reserve(std::uint32_t heads, std::uint32_t rows) {
    const std::size_t n = std::size_t{heads} * rows;
    if (n > 0x7fffffffu) return {errc::invalid_argument, "select: more than 2^31 entries"};
    std::size_t temp = 0;
    if (cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairs(
            nullptr, temp, static_cast<const std::uint64_t*>(nullptr), static_cast<std::uint64_t*>(nullptr),
            static_cast<const std::uint32_t*>(nullptr), static_cast<std::uint32_t*>(nullptr),
            static_cast<int>(n), static_cast<int>(heads), static_cast<const int*>(nullptr),
            static_cast<const int*>(nullptr));
        e != cudaSuccess)
      return fail("cub temp size", e);
    if (n <= cap_ && heads <= heads_cap_ && temp <= temp_bytes_) return {};
    release();
    const std::size_t bytes = n * (2 * sizeof(std::uint64_t) + 2 * sizeof(std::uint32_t)) +
                              (heads + 1) * sizeof(int) + temp + 64;
    if (cudaError_t e = cudaMalloc(&base_, bytes); e != cudaSuccess) return fail("cudaMalloc", e);
    auto* p = static_cast<std::byte*>(base_);
    keys_in = reinterpret_cast<std::uint64_t*>(p);
    keys_out = keys_in + n;
    slots_in = reinterpret_cast<std::uint32_t*>(keys_out + n);
    slots_out = slots_in + n;
    offsets = reinterpret_cast<int*>(slots_out + n);
    temp_ = reinterpret_cast<std::byte*>(offsets + heads + 1);
    temp_ += (64 - reinterpret_cast<std::uintptr_t>(temp_) % 64) % 64;
    cap_ = n;
    heads_cap_ = heads;
    temp_bytes_ = temp;
    return {};
  }

  std::uint64_t* keys_in = nullptr;
  std::uint64_t* keys_out = nullptr;
  std::uint32_t* slots_in = nullptr;
  std::uint32_t* slots_out = nullptr;  //!< result: `[heads][rows]` slots, lowest rank first
  int* offsets = nullptr;
  [[nodiscard]] void* temp() const noexcept { return temp_; }
  [[nodiscard]] std::size_t temp_bytes() const noexcept { return temp_bytes_; }

 private:
  static status fail(const char* what, cudaError_t e) {
    return {errc::system_error, std::string("select: ") + what + ": " + cudaGetErrorString(e)};
  }
  void release() noexcept {
    if (base_) cudaFree(base_);
    base_ = nullptr;
    cap_ = heads_cap_ = temp_bytes_ = 0;
  }
  void* base_ = nullptr;
  std::byte* temp_ = nullptr;
  std::size_t cap_ = 0, heads_cap_ = 0, temp_bytes_ = 0;
};

//! Orders every head's candidate slots by rank, lowest first, into `buf.slots_out`
//! (`[heads][rows]`; non-candidates at the end of each head's segment). Asynchronous on `stream`.
//! @param scores    device `[heads][rows]` fp32 (finite)
//! @param positions device `[rows][heads]` positions, -1 = empty (the slot table's layout)
//! @param protect   device `[rows][heads]` nonzero = never a victim; may be null
inline status select_ranked(const float* scores, const std::int32_t* positions,
                            const std::uint8_t* protect, std::uint32_t heads, std::uint32_t rows,
                            select_buffers& buf, cudaStream_t stream = nullptr) {
  if (heads == 0 || rows == 0) return {};
  KVCACHE_TRY(buf.reserve(heads, rows));
  const std::size_t n = std::size_t{heads} * rows;
  const unsigned threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((n + threads - 1) / threads, 65535));
  detail::rank_keys_kernel<<<blocks, threads, 0, stream>>>(scores, positions, protect, heads, rows,
                                                           buf.keys_in, buf.slots_in, buf.offsets);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
    return {errc::system_error, std::string("select: rank kernel: ") + cudaGetErrorString(e)};
  std::size_t temp = buf.temp_bytes();
  if (cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairs(
          buf.temp(), temp, buf.keys_in, buf.keys_out, buf.slots_in, buf.slots_out,
          static_cast<int>(n), static_cast<int>(heads), buf.offsets, buf.offsets + 1, 0, 64,
          stream);
      e != cudaSuccess)
    return {errc::system_error, std::string("select: segmented sort: ") + cudaGetErrorString(e)};
  return {};
}

}  // namespace gpu
KVCACHE_NAMESPACE_END
