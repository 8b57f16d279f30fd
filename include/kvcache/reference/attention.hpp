// SPDX-License-Identifier: Apache-2.0
//! @file
//! Host reference attention over a cache view: softmax(q·Kᵀ/√d)·V with GQA, masking empty slots
//! and (causally) keys at later positions. Slow and plain on purpose: tests, the demo and engines
//! checking their integration compare against it. Quantized views are decoded on the fly: pass
//! the cache's quantizer (`cache.quant()`) as `quant` (fp8, q8_0, q4_0, kivi_per_token, ...).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/view.hpp>
#include <kvcache/quant/dense.hpp>
#include <kvcache/quant/passthrough.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

KVCACHE_NAMESPACE_BEGIN
namespace reference {

struct attention_options {
  float scale = 0.0f;  //!< 0 means 1/sqrt(head_dim)
  bool causal = true;  //!< mask keys whose position is after the query's
};

//! Decodes the view's K and V to fp32 `[rows][kv_heads][head_dim]` (empty slots decode too).
//! Any per-row format works: codes through `quant.decode`, with the metadata the view points at
//! (`k_scale(slot, head)`: per-row scales and zeros, or the layer's / head's shared fp8 scale).
//! kvcache::dequantize_dense (quant/dense.hpp) is the same, checked against the view's format.
template <quantizer Q = passthrough>
void dequantize(const layer_view& v, std::vector<float>& k, std::vector<float>& vv, const Q& quant = {}) {
  const std::size_t D = v.head_dim;
  k.resize(std::size_t{v.rows} * v.kv_heads * D);
  vv.resize(k.size());
  for (std::uint32_t s = 0; s < v.rows; ++s)
    for (std::uint32_t h = 0; h < v.kv_heads; ++h) {
      const std::size_t o = (std::size_t{s} * v.kv_heads + h) * D;
      decode_key(v, quant, s, h, k.data() + o);  // token-grouped keys (KIVI) included
      decode_value(v, quant, s, h, vv.data() + o);
    }
}

//! @param q      `[queries][query_heads][head_dim]` fp32 (after RoPE)
//! @param query_positions  `[queries]` position of each query; null = every query sees every key
//! @param out    `[queries][query_heads][head_dim]` fp32
//! @param probs  optional `[query_heads][queries][rows]` fp32, the layout of attention_signal
template <quantizer Q = passthrough>
status attention(const layer_view& v, std::uint32_t query_heads, const float* q,
                 std::uint32_t queries, const std::int64_t* query_positions, float* out,
                 float* probs = nullptr, const Q& quant = {}, attention_options opt = {}) {
  if (v.kv_heads == 0 || query_heads == 0 || query_heads % v.kv_heads != 0)
    return {errc::shape_mismatch, "reference::attention: query_heads " +
                                      std::to_string(query_heads) +
                                      " is not a positive multiple of kv_heads " +
                                      std::to_string(v.kv_heads)};
  if ((queries > 0 && (!q || !out)))
    return {errc::invalid_argument, "reference::attention: null query or output"};
  const std::uint32_t D = v.head_dim, H = v.kv_heads, G = query_heads / H, R = v.rows;
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  thread_local std::vector<float> K, V, p;  // reused: this runs once per layer per step
  dequantize(v, K, V, quant);
  p.resize(R);
  for (std::uint32_t t = 0; t < queries; ++t) {
    const std::int64_t qpos =
        query_positions ? query_positions[t] : std::numeric_limits<std::int64_t>::max();
    for (std::uint32_t qh = 0; qh < query_heads; ++qh) {
      const std::uint32_t h = qh / G;
      const float* qv = q + (std::size_t{t} * query_heads + qh) * D;
      float mx = -std::numeric_limits<float>::infinity();
      for (std::uint32_t s = 0; s < R; ++s) {
        const std::int32_t pos = v.position(s, h);
        if (pos < 0 || (opt.causal && pos > qpos)) {
          p[s] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float* kv = K.data() + (std::size_t{s} * H + h) * D;
        float dot = 0.0f;
        for (std::uint32_t d = 0; d < D; ++d) dot += qv[d] * kv[d];
        p[s] = dot * scale;
        mx = std::max(mx, p[s]);
      }
      float sum = 0.0f;
      for (std::uint32_t s = 0; s < R; ++s) {
        p[s] = std::isinf(p[s]) && p[s] < 0 ? 0.0f : std::exp(p[s] - mx);
        sum += p[s];
      }
      float* o = out + (std::size_t{t} * query_heads + qh) * D;
      for (std::uint32_t d = 0; d < D; ++d) o[d] = 0.0f;
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      for (std::uint32_t s = 0; s < R; ++s) {
        p[s] *= inv;
        if (p[s] == 0.0f) continue;
        const float* vv = V.data() + (std::size_t{s} * H + h) * D;
        for (std::uint32_t d = 0; d < D; ++d) o[d] += p[s] * vv[d];
      }
      if (probs)
        for (std::uint32_t s = 0; s < R; ++s) probs[(std::size_t{qh} * queries + t) * R + s] = p[s];
    }
  }
  return {};
}

}  // namespace reference
KVCACHE_NAMESPACE_END
