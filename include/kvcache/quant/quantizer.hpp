// SPDX-License-Identifier: Apache-2.0
//! @file
//! The quantizer concept: how one (token, head) row of K or V is stored. A quantizer knows
//! neither which tokens stay nor where bytes live.
//!
//! A quantizer `Q` provides, for a geometry g:
//! - `code_bytes(g)`: bytes of one stored (token, head) row in the K/V range;
//! - `scale_bytes(g)`: bytes of its out-of-band metadata (scales, zeros) per row; 0 when none;
//! - `encode(src, rows, g, codes, scales)`: `rows` consecutive rows of g.type elements to codes;
//! - `decode(codes, scales, rows, g, dst)`: back to fp32 (reference attention, dense helpers).
//! Token-grouped formats (KIVI keys) will extend this with a residual window (quantization issue).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/geometry.hpp>

#include <concepts>
#include <cstddef>

KVCACHE_NAMESPACE_BEGIN

template <class Q>
concept quantizer = requires(const Q& q, const geometry& g, const void* src, std::byte* dst,
                             const std::byte* csrc, float* out, std::size_t rows) {
  { q.code_bytes(g) } -> std::same_as<std::size_t>;
  { q.scale_bytes(g) } -> std::same_as<std::size_t>;
  { q.encode(src, rows, g, dst, dst) } -> std::same_as<void>;
  { q.decode(csrc, csrc, rows, g, out) } -> std::same_as<void>;
  { Q::name() } -> std::convertible_to<const char*>;
};

KVCACHE_NAMESPACE_END
