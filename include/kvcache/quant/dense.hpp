// SPDX-License-Identifier: Apache-2.0
//! @file
//! Dequantize-to-dense (host): a layer view of any format to fp32 `[rows][kv_heads][head_dim]`,
//! for attention kernels that cannot dequantize in registers, and for checks. Empty slots are
//! decoded too (their bytes are whatever the slot last held); mask them with the view's positions.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/view.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

KVCACHE_NAMESPACE_BEGIN

//! The key of (slot, head) of `view` as `head_dim` floats, whatever the format: per-row codes
//! and metadata, or (token-grouped KIVI keys) the residual window's full-precision row or the
//! row's codes with its group's per-channel metadata.
template <quantizer Q>
void decode_key(const layer_view& view, const Q& quant, std::uint32_t slot, std::uint32_t head,
                float* dst) {
  const geometry g{1, view.kv_heads, view.kv_heads, view.head_dim, view.type};
  if constexpr (quant_token_grouped<Q>()) {
    if (view.k_in_residual(slot, head)) {
      detail::load_row(view.k_residual_row(slot, head), 0, view.head_dim, view.type, dst);
      return;
    }
    quant.decode_key_group(view.k_row(slot, head), view.slot_stride, 1, g,
                           view.k_group_meta(slot / Q::group, head), dst);
  } else {
    quant.decode(view.k_row(slot, head), view.k_scale(slot, head), 1, g, dst);
  }
}

//! The value of (slot, head) of `view` as `head_dim` floats.
template <quantizer Q>
void decode_value(const layer_view& view, const Q& quant, std::uint32_t slot, std::uint32_t head,
                  float* dst) {
  const geometry g{1, view.kv_heads, view.kv_heads, view.head_dim, view.type};
  quant.decode(view.v_row(slot, head), view.v_scale(slot, head), 1, g, dst);
}

//! Decodes K and V of `view` (made by a cache whose quantizer is `quant`) into `k` and `v`, each
//! `view.rows * view.kv_heads * view.head_dim` floats (either may be null to skip it). Fails with
//! shape_mismatch when the view's format is not the quantizer's.
template <quantizer Q>
status dequantize_dense(const layer_view& view, const Q& quant, float* k, float* v) {
  const geometry g{1, view.kv_heads, view.kv_heads, view.head_dim, view.type};
  if (std::strcmp(view.format, Q::name()) != 0 || view.row_bytes != quant.code_bytes(g))
    return {errc::shape_mismatch, std::string("dequantize_dense: the view stores '") + view.format +
                                      "' rows of " + std::to_string(view.row_bytes) +
                                      " bytes; the quantizer is '" + Q::name() + "'"};
  const std::size_t D = view.head_dim;
  for (std::uint32_t s = 0; s < view.rows; ++s)
    for (std::uint32_t h = 0; h < view.kv_heads; ++h) {
      const std::size_t o = (std::size_t{s} * view.kv_heads + h) * D;
      if (k) decode_key(view, quant, s, h, k + o);
      if (v) decode_value(view, quant, s, h, v + o);
    }
  return {};
}

KVCACHE_NAMESPACE_END
