// SPDX-License-Identifier: Apache-2.0
//! @file
//! Device kernels of the cache's data movement, with host launchers returning `status`.
//!
//! - `copy_chunks`: scatter a batch of (dst, src, bytes) chunks (K/V rows of an append, whatever
//!   the slot plan). One block per chunk in a grid-stride loop over the chunk list; 16-byte
//!   vector copies when dst and src allow, byte copies otherwise. Three ways to pass the list:
//!   already in device memory; a `chunk_batch` of up to 128 chunks by value (a kernel parameter:
//!   no upload, nothing to keep alive); or through a `chunk_uploader` (pinned staging + device
//!   list, one cudaMemcpyAsync). `add_pieces` splits big chunks so that many blocks share them.
//!
//! The kernels are templates (of a defaulted dummy parameter): nvcc ignores `inline` on a
//! `__global__` function, so a plain kernel defined in a header is defined again by every TU that
//! includes it (a link error once two do); template instantiations are merged by the linker.
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
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

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
#pragma unroll 4
    for (std::size_t i = tid; i < nv; i += nthreads) dv[i] = sv[i];
    done = nv * 16;
  }
  for (std::size_t i = done + tid; i < n; i += nthreads) d[i] = s[i];
}

template <int = 0>  // a template: header-defined kernels are not inline (see above)
__global__ void copy_chunks_kernel(const copy_chunk* __restrict__ chunks, std::size_t count) {
  for (std::size_t c = blockIdx.x; c < count; c += gridDim.x) {
    const copy_chunk ch = chunks[c];
    copy_bytes(static_cast<std::byte*>(ch.dst), static_cast<const std::byte*>(ch.src), ch.bytes,
               threadIdx.x, blockDim.x);
  }
}

}  // namespace detail

//! Chunks passed by value as one kernel parameter (3 KiB, under the 4 KiB parameter limit of
//! every architecture): a launch needs no upload and no host buffer kept alive.
struct chunk_batch {
  static constexpr std::size_t capacity = 128;
  copy_chunk chunk[capacity];
  std::uint32_t count = 0;
};

namespace detail {

template <int = 0>
__global__ void copy_chunk_batch_kernel(const __grid_constant__ chunk_batch b) {
  for (std::uint32_t c = blockIdx.x; c < b.count; c += gridDim.x) {
    const copy_chunk ch = b.chunk[c];
    copy_bytes(static_cast<std::byte*>(ch.dst), static_cast<const std::byte*>(ch.src), ch.bytes,
               threadIdx.x, blockDim.x);
  }
}

// Block (x: rows in a grid-stride loop, y: head): row i of head h comes from slot slots[h*rows+i].
template <int = 0>
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
  detail::copy_chunks_kernel<><<<blocks, detail::copy_threads, 0, stream>>>(device_chunks, count);
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

//! Launches the copies of a by-value batch (count <= chunk_batch::capacity). Asynchronous on
//! `stream`; the batch may be reused as soon as this returns (the launch copies it).
inline status copy_chunks(const chunk_batch& batch, cudaStream_t stream = nullptr) {
  if (batch.count == 0) return {};
  if (batch.count > chunk_batch::capacity)
    return {errc::invalid_argument, "gpu::copy_chunks: batch of more than 128 chunks"};
  detail::copy_chunk_batch_kernel<><<<batch.count, detail::copy_threads, 0, stream>>>(batch);
  return runtime_status(cudaGetLastError(), "gpu::copy_chunks launch");
}

//! Bytes of one piece: chunks are split into pieces of at most this size (a multiple of 16, so
//! every piece of an aligned chunk stays aligned), each copied by one block.
inline constexpr std::size_t piece_bytes = 32 * 1024;

//! Appends the copy (dst, src, bytes) to `out` as pieces of at most `piece` bytes (a multiple of
//! 16), so that a large copy is spread over many blocks.
inline void add_pieces(std::vector<copy_chunk>& out, void* dst, const void* src, std::size_t bytes,
                       std::size_t piece = piece_bytes) {
  auto* d = static_cast<std::byte*>(dst);
  const auto* s = static_cast<const std::byte*>(src);
  for (std::size_t at = 0; at < bytes; at += piece)
    out.push_back({d + at, s + at, std::min(piece, bytes - at)});
}

//! Launches a host chunk list of any length: by value when it fits one `chunk_batch` (no
//! upload), else through pinned staging and a device list that it keeps and grows (one
//! cudaMemcpyAsync, then one launch). Everything on the stream given at construction.
//!
//! Synchronization: `copy` returns before the copies run (stream order). Before refilling its
//! pinned staging, an upload waits for the previous upload's copies to finish (an event), so
//! the host blocks only when two large lists (more than 128 pieces) follow each other faster
//! than the stream runs. The destructor waits for the last launch. One device, one stream:
//! do not share an uploader between threads.
class chunk_uploader {
 public:
  explicit chunk_uploader(cudaStream_t stream = nullptr) noexcept : stream_(stream) {}
  //! A copy starts with empty scratch (scratch is per object, never shared).
  chunk_uploader(const chunk_uploader& o) noexcept : stream_(o.stream_) {}
  chunk_uploader& operator=(const chunk_uploader& o) noexcept {
    if (this != &o) {
      destroy();
      stream_ = o.stream_;
    }
    return *this;
  }
  chunk_uploader(chunk_uploader&& o) noexcept { swap(o); }
  chunk_uploader& operator=(chunk_uploader&& o) noexcept {
    if (this != &o) {
      destroy();
      swap(o);
    }
    return *this;
  }
  ~chunk_uploader() { destroy(); }

  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
  //! Launches issued (tests: which path a list took).
  [[nodiscard]] std::size_t launches() const noexcept { return launches_; }
  [[nodiscard]] std::size_t uploads() const noexcept { return uploads_; }

  status copy(std::span<const copy_chunk> chunks) {
    if (chunks.empty()) return {};
    if (chunks.size() <= chunk_batch::capacity) {
      chunk_batch b;
      std::copy(chunks.begin(), chunks.end(), b.chunk);
      b.count = static_cast<std::uint32_t>(chunks.size());
      KVCACHE_TRY(copy_chunks(b, stream_));
      ++launches_;
      return {};
    }
    KVCACHE_TRY(reserve(chunks.size()));
    if (pending_)  // the previous upload may still read the staging
      KVCACHE_TRY(runtime_status(cudaEventSynchronize(done_), "gpu::chunk_uploader wait"));
    pending_ = false;
    std::memcpy(host_, chunks.data(), chunks.size_bytes());
    KVCACHE_TRY(runtime_status(cudaMemcpyAsync(device_, host_, chunks.size_bytes(),
                                               cudaMemcpyHostToDevice, stream_),
                               "gpu::chunk_uploader upload"));
    KVCACHE_TRY(copy_chunks(device_, chunks.size(), stream_));
    KVCACHE_TRY(runtime_status(cudaEventRecord(done_, stream_), "gpu::chunk_uploader record"));
    pending_ = true;
    ++launches_;
    ++uploads_;
    return {};
  }

 private:
  status reserve(std::size_t n) {
    if (n <= capacity_) return {};
    destroy();  // waits for the last launch: the old lists are no longer read
    n = std::max<std::size_t>(n, 2 * chunk_batch::capacity);
    status st = runtime_status(
        cudaMallocHost(reinterpret_cast<void**>(&host_), n * sizeof(copy_chunk)),
        "gpu::chunk_uploader cudaMallocHost");
    if (st.ok())
      st = runtime_status(cudaMalloc(reinterpret_cast<void**>(&device_), n * sizeof(copy_chunk)),
                          "gpu::chunk_uploader cudaMalloc");
    if (st.ok())
      st = runtime_status(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming),
                          "gpu::chunk_uploader cudaEventCreate");
    if (!st) {
      destroy();
      return st;
    }
    capacity_ = n;
    return {};
  }
  void destroy() noexcept {
    if (!host_ && !device_ && !done_) return;  // nothing held: no runtime call at all
    if (pending_) (void)cudaEventSynchronize(done_);
    if (done_) (void)cudaEventDestroy(done_);
    if (device_) (void)cudaFree(device_);
    if (host_) (void)cudaFreeHost(host_);
    (void)cudaGetLastError();  // teardown errors are not the next call's business
    done_ = nullptr;
    device_ = host_ = nullptr;
    capacity_ = 0;
    pending_ = false;
  }
  void swap(chunk_uploader& o) noexcept {
    std::swap(stream_, o.stream_);
    std::swap(host_, o.host_);
    std::swap(device_, o.device_);
    std::swap(capacity_, o.capacity_);
    std::swap(done_, o.done_);
    std::swap(pending_, o.pending_);
    std::swap(launches_, o.launches_);
    std::swap(uploads_, o.uploads_);
  }

  cudaStream_t stream_ = nullptr;
  copy_chunk* host_ = nullptr;    // pinned staging
  copy_chunk* device_ = nullptr;  // the list the kernel reads
  std::size_t capacity_ = 0;
  cudaEvent_t done_ = nullptr;    // recorded after the last upload's launch
  bool pending_ = false;
  std::size_t launches_ = 0;
  std::size_t uploads_ = 0;
};

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
  detail::gather_rows_kernel<><<<dim3(bx, g.heads), threads, 0, stream>>>(
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
