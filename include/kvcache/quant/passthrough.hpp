// SPDX-License-Identifier: Apache-2.0
//! @file
//! `passthrough`: stores K/V exactly as given (fp32, fp16 or bf16); no scales.
#pragma once

#include <kvcache/core/dtype.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cstring>

KVCACHE_NAMESPACE_BEGIN

struct passthrough {
  static constexpr const char* name() noexcept { return "none"; }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept { return g.head_bytes(); }
  [[nodiscard]] std::size_t scale_bytes(const geometry&) const noexcept { return 0; }

  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* /*scales*/, quant_context = {}) const noexcept {
    std::memcpy(codes, src, rows * g.head_bytes());
  }
  void decode(const std::byte* codes, const std::byte* /*scales*/, std::size_t rows,
              const geometry& g, float* dst) const noexcept {
    detail::load_row(codes, 0, rows * g.head_dim, g.type, dst);  // one vectorized loop per type
  }
};

static_assert(quantizer<passthrough>);

KVCACHE_NAMESPACE_END
