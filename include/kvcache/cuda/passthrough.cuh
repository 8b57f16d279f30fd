// SPDX-License-Identifier: Apache-2.0
//! @file
//! `cuda_passthrough`: `passthrough` for device-resident codes (a `cache<cuda_vmm>`): K/V are
//! stored exactly as given. `decode` reads the codes back to the host.
//!
//! Two ways to store an append:
//! - `encode` (the quantizer interface, one call per chunk): `cudaMemcpy(cudaMemcpyDefault)`, so
//!   the engine's input may be host or device memory.
//! - `encode_chunks` (optional, batched: the cache calls it when present): every chunk of an
//!   append, K and V together, in one `copy_chunks` launch (chunks split into 32 KiB pieces; the
//!   piece list goes by value as a kernel parameter when it has at most 128 pieces, else through
//!   pinned staging and one upload kept in the quantizer as scratch, see gpu::chunk_uploader).
//!   Input that is not device memory of the current device (host memory, another device) falls
//!   back to `encode` per chunk.
//!
//! Synchronization: everything runs in stream order on one stream, the legacy default stream
//! unless one is given at construction. Device-to-device copies (either path) are asynchronous
//! to the host: the engine must not overwrite its K/V input before the copies have run (stream
//! order does it for work on the same stream or the legacy default stream); host input is
//! staged before `encode` returns. The codes are the current device's memory (a cache<cuda_vmm>
//! on that device).
//!
//! The quantizer interface has no status: a runtime error here (a device fault) raises
//! `kvcache::error(system_error)`. One quantizer per cache; not thread-safe (its scratch).
//! nvcc only.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/chunk.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/cuda/driver.cuh>
#include <kvcache/cuda/kernels.cuh>
#include <kvcache/quant/quantizer.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>
#include <vector>

// nvcc's front end flags `st = f();` (status is [[nodiscard]] and operator= returns status&).
#if defined(__NVCC__)
#  pragma nv_diagnostic push
#  pragma nv_diag_suppress 2810
#endif

KVCACHE_NAMESPACE_BEGIN

class cuda_passthrough {
 public:
  cuda_passthrough() = default;
  //! Copies of `encode_chunks` run on `stream` (the per-chunk `encode` stays on the legacy
  //! default stream). Use a blocking stream (not cudaStreamNonBlocking): cuda_vmm's
  //! copy-on-write copies run on the legacy default stream, which orders them only with
  //! blocking streams, before the append that writes into the copied page.
  explicit cuda_passthrough(cudaStream_t stream) : batch_(stream) {}

  static constexpr const char* name() noexcept { return "none (device)"; }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept { return g.head_bytes(); }
  [[nodiscard]] std::size_t scale_bytes(const geometry&) const noexcept { return 0; }

  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* /*scales*/, quant_context = {}) const {
    check(cudaMemcpy(codes, src, rows * g.head_bytes(), cudaMemcpyDefault),
          "cuda_passthrough::encode");
  }

  //! One tensor's chunks: row_chunk{dst, src, rows} copies rows [src, src+rows) of `src`
  //! (`[tokens][kv_heads]` rows of g.head_bytes()) to `codes_base + dst`. One launch.
  void encode_chunks(const void* src, std::span<const row_chunk> chunks, const geometry& g,
                     std::byte* codes_base) {
    if (chunks.empty()) return;
    if (!gpu::on_current_device(src)) {
      per_chunk(src, chunks, g, codes_base);
      return;
    }
    pieces_.clear();
    add(src, chunks, g, codes_base);
    check(batch_.copy(pieces_));
  }

  //! An append's K and V (the same chunks into their two ranges): one launch for both.
  void encode_chunks(const void* k_src, const void* v_src, std::span<const row_chunk> chunks,
                     const geometry& g, std::byte* k_base, std::byte* v_base) {
    if (chunks.empty()) return;
    if (!gpu::on_current_device(k_src) || !gpu::on_current_device(v_src)) {
      per_chunk(k_src, chunks, g, k_base);
      per_chunk(v_src, chunks, g, v_base);
      return;
    }
    pieces_.clear();
    add(k_src, chunks, g, k_base);
    add(v_src, chunks, g, v_base);
    check(batch_.copy(pieces_));
  }

  void decode(const std::byte* codes, const std::byte* /*scales*/, std::size_t rows,
              const geometry& g, float* dst) const {
    std::vector<std::byte> host(rows * g.head_bytes());
    check(cudaMemcpy(host.data(), codes, host.size(), cudaMemcpyDefault),
          "cuda_passthrough::decode");
    for (std::size_t i = 0, n = rows * g.head_dim; i < n; ++i)
      dst[i] = load_as_float(host.data(), i, g.type);
  }

  //! Kernel launches and uploads of `encode_chunks` so far (tests: which path an append took).
  [[nodiscard]] std::size_t kernel_launches() const noexcept { return batch_.launches(); }
  [[nodiscard]] std::size_t uploads() const noexcept { return batch_.uploads(); }

 private:
  static void check(cudaError_t e, const char* what) {
    const status st = gpu::runtime_status(e, what);
    if (!st) raise(st.code(), st.message());
  }
  static void check(const status& st) {
    if (!st) raise(st.code(), "cuda_passthrough::encode_chunks: " + st.message());
  }
  void per_chunk(const void* src, std::span<const row_chunk> chunks, const geometry& g,
                 std::byte* base) const {
    const auto* s = static_cast<const std::byte*>(src);
    for (const auto& c : chunks)
      encode(s + c.src * g.head_bytes(), c.rows, g, base + c.dst, nullptr);
  }
  void add(const void* src, std::span<const row_chunk> chunks, const geometry& g, std::byte* base) {
    const auto* s = static_cast<const std::byte*>(src);
    const std::size_t row = g.head_bytes();
    for (const auto& c : chunks)
      gpu::add_pieces(pieces_, base + c.dst, s + c.src * row, c.rows * row);
  }

  gpu::chunk_uploader batch_;             // pinned staging + device piece list (large appends)
  std::vector<gpu::copy_chunk> pieces_;  // host scratch: the current append's pieces
};

static_assert(quantizer<cuda_passthrough>);

KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
