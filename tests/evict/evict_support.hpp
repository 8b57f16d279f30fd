// SPDX-License-Identifier: Apache-2.0
//! @file
//! Helpers shared by the eviction tests: random token data, probabilities laid out by slot,
//! kept sets, and a tiny cache factory.
#pragma once

#include <kvcache/cache.hpp>
#include <kvcache/memory/heap.hpp>

#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "catch.hpp"

namespace evtest {

using namespace kvcache;

inline cache_config config(std::uint32_t layers, std::uint32_t kv_heads, std::uint32_t query_heads,
                           std::uint32_t head_dim, std::uint32_t max_tokens,
                           std::uint32_t budget = 0) {
  cache_config c;
  c.geo = geometry{layers, kv_heads, query_heads, head_dim, dtype::f32};
  c.max_tokens = max_tokens;
  c.budget = budget;
  return c;
}

//! `[n][heads][dim]` fp32 normal values.
inline std::vector<float> randn(std::mt19937& rng, std::size_t n, float sd = 1.0f) {
  std::normal_distribution<float> g(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

template <class C>
void append(C& c, seq_id s, std::uint32_t layer, const std::vector<float>& k,
            const std::vector<float>& v, std::uint32_t n) {
  const auto& g = c.geo();
  const kv_tensor kt{k.data(), dtype::f32, n, g.kv_heads, g.head_dim};
  const kv_tensor vt{v.data(), dtype::f32, n, g.kv_heads, g.head_dim};
  REQUIRE(c.append(s, layer, kt, vt).ok());
}

template <class C>
layer_view view(const C& c, seq_id s, std::uint32_t layer) {
  auto v = c.view(s, layer);
  REQUIRE(v.ok());
  return *v;
}

inline std::set<std::int32_t> kept(const layer_view& v, std::uint32_t head) {
  std::set<std::int32_t> s;
  for (std::uint32_t r = 0; r < v.rows; ++r)
    if (v.position(r, head) >= 0) s.insert(v.position(r, head));
  return s;
}

//! Lays out per-position values `[query_heads][queries][position]` by the slots of `v`:
//! `[query_heads][queries][rows]`, 0 on empty slots (the attention_signal layout).
inline std::vector<float> by_slot(const layer_view& v, std::uint32_t query_heads,
                                  std::uint32_t queries,
                                  const std::vector<std::map<std::int32_t, float>>& per_qh_q) {
  const std::uint32_t G = query_heads / v.kv_heads;
  std::vector<float> p(std::size_t{query_heads} * queries * v.rows, 0.0f);
  for (std::uint32_t qh = 0; qh < query_heads; ++qh)
    for (std::uint32_t t = 0; t < queries; ++t)
      for (std::uint32_t s = 0; s < v.rows; ++s) {
        const std::int32_t pos = v.position(s, qh / G);
        if (pos < 0) continue;
        const auto& m = per_qh_q[std::size_t{qh} * queries + t];
        auto it = m.find(pos);
        if (it != m.end()) p[(std::size_t{qh} * queries + t) * v.rows + s] = it->second;
      }
  return p;
}

//! Values in {0, 1/16, ..., 1}: sums of a few hundred stay exact in fp32, so any summation
//! order gives the same scores, and ties are frequent (exercising the tie rule).
inline float dyadic(std::mt19937& rng) {
  return static_cast<float>(std::uniform_int_distribution<int>(0, 16)(rng)) / 16.0f;
}

}  // namespace evtest
