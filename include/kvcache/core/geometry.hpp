// SPDX-License-Identifier: Apache-2.0
//! @file
//! Model geometry (layers, heads, head dim, element type) and the in-range layout of K/V.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

KVCACHE_NAMESPACE_BEGIN

//! How slots and heads are ordered inside one (sequence, layer, K|V) range.
enum class layout : std::uint8_t {
  //! `[slot][kv_head][head_dim]`: one growth frontier, so at most one partly filled page per range.
  //! FlashAttention's KV-cache API and vAttention use it. The default.
  token_major,
  //! `[kv_head][slot][head_dim]`: each head's slots contiguous (per-head kernels, per-head budgets);
  //! each head's region is page aligned, which costs up to one partly filled page per head.
  head_major,
};

constexpr const char* to_string(layout l) noexcept {
  return l == layout::token_major ? "token_major" : "head_major";
}

//! The shape of the model whose K/V the cache holds.
struct geometry {
  std::uint32_t layers = 0;
  std::uint32_t kv_heads = 0;
  std::uint32_t query_heads = 0;  //!< a multiple of kv_heads (GQA group = query_heads / kv_heads)
  std::uint32_t head_dim = 0;
  dtype type = dtype::f16;

  [[nodiscard]] constexpr std::uint32_t group_size() const noexcept {
    return kv_heads ? query_heads / kv_heads : 0;
  }
  //! Bytes of one token's K (or V) for one head, unquantized.
  [[nodiscard]] constexpr std::size_t head_bytes() const noexcept {
    return std::size_t{head_dim} * size_of(type);
  }
  //! Bytes of one token's K (or V) over all KV heads of one layer, unquantized.
  [[nodiscard]] constexpr std::size_t token_bytes() const noexcept {
    return head_bytes() * kv_heads;
  }

  //! Checks the geometry; the message names the first bad field.
  [[nodiscard]] status validate() const {
    if (layers == 0) return {errc::invalid_argument, "geometry: layers must be > 0"};
    if (kv_heads == 0) return {errc::invalid_argument, "geometry: kv_heads must be > 0"};
    if (head_dim == 0) return {errc::invalid_argument, "geometry: head_dim must be > 0"};
    if (query_heads == 0 || query_heads % kv_heads != 0)
      return {errc::invalid_argument, "geometry: query_heads (" + std::to_string(query_heads) +
                                          ") must be a positive multiple of kv_heads (" +
                                          std::to_string(kv_heads) + ")"};
    return {};
  }
};

KVCACHE_NAMESPACE_END
