// SPDX-License-Identifier: Apache-2.0
//! @file
//! Device kernels of the cache's data movement, with host launchers returning `status`.
//!
//! - `copy_chunks`: scatter a batch of (dst, src, bytes) chunks (K/V rows of an append, whatever
//!   the slot plan). One block per chunk in a grid-stride loop over the chunk list; 16-byte
//!   vector copies when dst, src and bytes allow, byte copies otherwise.
//! - `gather_rows` / `compact_rows`: copy the kept slots of one range (per head) to a dense
//!   prefix, for policies that drop many tokens at once (DESIGN §2).
//! nvcc only.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/cuda/driver.cuh>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

// nvcc's front end flags `st = f();` (status is [[nodiscard]] and operator= returns status&).
#if defined(__NVCC__)
#  pragma nv_diagnostic push
#  pragma nv_diag_suppress 2810
#endif

KVCACHE_NAMESPACE_BEGIN
namespace gpu {

//! One contiguous copy: `bytes` from `src` to `dst` (device-accessible, not overlapping).
struct copy_chunk {
  void* dst = nullptr;
  const void* src = nullptr;
  std::size_t bytes = 0;
};

namespace detail {

inline constexpr unsigned copy_threads = 256;
inline constexpr unsigned max_blocks = 65535;

__device__ inline void copy_bytes(std::byte* __restrict__ d, const std::byte* __restrict__ s,
                                  std::size_t n, unsigned tid, unsigned nthreads) {
  const bool vec = ((reinterpret_cast<std::uintptr_t>(d) | reinterpret_cast<std::uintptr_t>(s)) & 15u) == 0;
  std::size_t done = 0;
  if (vec) {
    const std::size_t nv = n / 16;
    auto* dv = reinterpret_cast<uint4*>(d);
    const auto* sv = reinterpret_cast<const uint4*>(s);
    for (std::size_t i = tid; i < nv; i += nthreads) dv[i] = sv[i];
    done = nv * 16;
  }
  for (std::size_t i = done + tid; i < n; i += nthreads) d[i] = s[i];
}

__global__ void copy_chunks_kernel(const copy_chunk* __restrict__ chunks, std::size_t count) {
  for (std::size_t c = blockIdx.x; c < count; c += gridDim.x) {
    const copy_chunk ch = chunks[c];
    copy_bytes(static_cast<std::byte*>(ch.dst), static_cast<const std::byte*>(ch.src), ch.bytes,
               threadIdx.x, blockDim.x);
  }
}

// Block (x: rows in a grid-stride loop, y: head): row i of head h comes from slot slots[h*rows+i].
__global__ void gather_rows_kernel(std::byte* __restrict__ dst, const std::byte* __restrict__ src,
                                   const std::uint32_t* __restrict__ slots, std::uint32_t rows,
                                   std::size_t row_bytes, std::size_t slot_stride,
                                   std::size_t head_stride) {
  const unsigned h = blockIdx.y;
  for (std::size_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const std::size_t from = std::size_t{slots[std::size_t{h} * rows + i]} * slot_stride;
    const std::size_t to = i * slot_stride;
    copy_bytes(dst + to + h * head_stride, src + from + h * head_stride, row_bytes, threadIdx.x,
               blockDim.x);
  }
}

}  // namespace detail

//! Launches the copies of a chunk list already in device memory. Asynchronous on `stream`.
inline status copy_chunks(const copy_chunk* device_chunks, std::size_t count,
                          cudaStream_t stream = nullptr) {
  if (count == 0) return {};
  if (device_chunks == nullptr)
    return {errc::invalid_argument, "gpu::copy_chunks: null chunk list"};
  const auto blocks = static_cast<unsigned>(std::min<std::size_t>(count, detail::max_blocks));
  detail::copy_chunks_kernel<<<blocks, detail::copy_threads, 0, stream>>>(device_chunks, count);
  return runtime_status(cudaGetLastError(), "gpu::copy_chunks launch");
}

//! Uploads a host chunk list into `device_scratch` (room for chunks.size() entries) and launches
//! the copies, both on `stream`. The host list must stay alive until the upload completes
//! (pageable host memory: cudaMemcpyAsync returns once it has been staged).
inline status copy_chunks(std::span<const copy_chunk> chunks, copy_chunk* device_scratch,
                          cudaStream_t stream = nullptr) {
  if (chunks.empty()) return {};
  if (device_scratch == nullptr)
    return {errc::invalid_argument, "gpu::copy_chunks: null device scratch"};
  KVCACHE_TRY(runtime_status(cudaMemcpyAsync(device_scratch, chunks.data(),
                                             chunks.size_bytes(), cudaMemcpyHostToDevice, stream),
                             "gpu::copy_chunks upload"));
  return copy_chunks(device_scratch, chunks.size(), stream);
}

//! Shape of a gather: `heads` groups of `rows` kept slots each; a (slot, head) row is
//! `row_bytes` at `slot * slot_stride + head * head_stride` (token-major: slot_stride = heads x
//! row bytes, head_stride = row bytes; head-major: slot_stride = row bytes, head_stride = the
//! per-head region).
struct gather_shape {
  std::uint32_t rows = 0;
  std::uint32_t heads = 1;
  std::size_t row_bytes = 0;
  std::size_t slot_stride = 0;
  std::size_t head_stride = 0;
};

//! For every head h and i < rows: row (i, h) of `dst` = row (slots[h*rows + i], h) of `src`.
//! `slots` is in device memory; dst and src must not overlap (see compact_rows for in place).
inline status gather_rows(std::byte* dst, const std::byte* src, const std::uint32_t* slots,
                          const gather_shape& g, cudaStream_t stream = nullptr) {
  if (g.rows == 0 || g.heads == 0 || g.row_bytes == 0) return {};
  if (!dst || !src || !slots) return {errc::invalid_argument, "gpu::gather_rows: null pointer"};
  if (g.heads > 65535)
    return {errc::invalid_argument, "gpu::gather_rows: more than 65535 heads"};
  const auto bx = static_cast<unsigned>(std::min<std::size_t>(g.rows, detail::max_blocks));
  const unsigned threads = g.row_bytes >= 16 * 128 ? 256 : g.row_bytes >= 16 * 32 ? 64 : 32;
  detail::gather_rows_kernel<<<dim3(bx, g.heads), threads, 0, stream>>>(
      dst, src, slots, g.rows, g.row_bytes, g.slot_stride, g.head_stride);
  return runtime_status(cudaGetLastError(), "gpu::gather_rows launch");
}

//! In-place compaction: the kept slots of `base` move to the dense prefix [0, rows) of each head,
//! through `scratch`: device memory of at least `(heads-1) * head_stride + (rows-1) *
//! slot_stride + row_bytes` bytes (token-major: `rows * slot_stride`). Asynchronous on `stream`.
inline status compact_rows(std::byte* base, const std::uint32_t* slots, const gather_shape& g,
                           std::byte* scratch, cudaStream_t stream = nullptr) {
  if (g.rows == 0 || g.heads == 0 || g.row_bytes == 0) return {};
  if (!scratch) return {errc::invalid_argument, "gpu::compact_rows: null scratch"};
  KVCACHE_TRY(gather_rows(scratch, base, slots, g, stream));
  // Copy back the gathered prefix of every head: one 2D copy (heads x prefix) where the
  // prefixes are apart (head-major), else one span covering them all (token-major).
  const std::size_t width = (std::size_t{g.rows} - 1) * g.slot_stride + g.row_bytes;
  if (g.heads > 1 && width <= g.head_stride)
    return runtime_status(cudaMemcpy2DAsync(base, g.head_stride, scratch, g.head_stride, width,
                                            g.heads, cudaMemcpyDeviceToDevice, stream),
                          "gpu::compact_rows copy back");
  return runtime_status(cudaMemcpyAsync(base, scratch, (g.heads - 1) * g.head_stride + width,
                                        cudaMemcpyDeviceToDevice, stream),
                        "gpu::compact_rows copy back");
}

}  // namespace gpu
KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
