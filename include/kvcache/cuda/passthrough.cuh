// SPDX-License-Identifier: Apache-2.0
//! @file
//! `cuda_passthrough`: `passthrough` for device-resident codes (a `cache<cuda_vmm>`): K/V are
//! stored exactly as given, copied with `cudaMemcpy(cudaMemcpyDefault)`, so the engine's input
//! may be host or device memory. `decode` reads the codes back to the host.
//!
//! The quantizer interface has no status: a runtime error here (a device fault) raises
//! `kvcache::error(system_error)`. The copy is synchronous (legacy default stream).
//! nvcc only.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/cuda/driver.cuh>
#include <kvcache/quant/quantizer.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

// nvcc's front end flags `st = f();` (status is [[nodiscard]] and operator= returns status&).
#if defined(__NVCC__)
#  pragma nv_diagnostic push
#  pragma nv_diag_suppress 2810
#endif

KVCACHE_NAMESPACE_BEGIN

struct cuda_passthrough {
  static constexpr const char* name() noexcept { return "none (device)"; }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept { return g.head_bytes(); }
  [[nodiscard]] std::size_t scale_bytes(const geometry&) const noexcept { return 0; }

  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* /*scales*/) const {
    const status st = gpu::runtime_status(
        cudaMemcpy(codes, src, rows * g.head_bytes(), cudaMemcpyDefault), "cuda_passthrough::encode");
    if (!st) raise(st.code(), st.message());
  }
  void decode(const std::byte* codes, const std::byte* /*scales*/, std::size_t rows,
              const geometry& g, float* dst) const {
    std::vector<std::byte> host(rows * g.head_bytes());
    const status st = gpu::runtime_status(
        cudaMemcpy(host.data(), codes, host.size(), cudaMemcpyDefault), "cuda_passthrough::decode");
    if (!st) raise(st.code(), st.message());
    for (std::size_t i = 0, n = rows * g.head_dim; i < n; ++i)
      dst[i] = load_as_float(host.data(), i, g.type);
  }
};

static_assert(quantizer<cuda_passthrough>);

KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
