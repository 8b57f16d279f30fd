// SPDX-License-Identifier: Apache-2.0
//! @file
//! Helpers of the reliability tests: the test peer that reaches the cache's and backends'
//! internals (to break invariants on purpose), finite random K/V, and signals for each policy.
#pragma once

#include <kvcache/kvcache.hpp>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

KVCACHE_NAMESPACE_BEGIN
namespace detail {

//! Befriended by cache, basic_vmm and heap_memory: tests corrupt their bookkeeping through it to
//! prove that check_invariants sees each kind of corruption. Never used by the library.
struct test_access {
  template <class C>
  static auto& layer(C& c, seq_id s, std::uint32_t l) {
    return c.reg_.recs[s.index].layers[l];
  }
  template <class C>
  static auto& registry(C& c) {
    return c.reg_;
  }
  template <class M>
  static page_refs& refs(basic_vmm<M>& m) {
    return m.mapper_.refs();
  }
  static std::size_t& held(heap_memory& m) { return m.held_; }
};

}  // namespace detail
KVCACHE_NAMESPACE_END

namespace reltest {

namespace kv = kvcache;
using peer = kv::detail::test_access;

//! `[tokens][kv_heads][head_dim]` fp16 values in [-2, 2], and the tensor describing them.
struct kv_rows {
  std::vector<std::uint16_t> k, v;
  kv_rows(const kv::geometry& g, std::uint32_t tokens, std::mt19937& rng)
      : k(std::size_t{tokens} * g.kv_heads * g.head_dim), v(k.size()) {
    std::uniform_real_distribution<float> d(-2.0f, 2.0f);
    for (auto& x : k) x = kv::float_to_half(d(rng));
    for (auto& x : v) x = kv::float_to_half(d(rng));
  }
  [[nodiscard]] kv::kv_tensor kt(const kv::geometry& g) const {
    return {k.data(), kv::dtype::f16, static_cast<std::uint32_t>(k.size() / g.kv_heads / g.head_dim),
            g.kv_heads, g.head_dim};
  }
  [[nodiscard]] kv::kv_tensor vt(const kv::geometry& g) const {
    return {v.data(), kv::dtype::f16, static_cast<std::uint32_t>(v.size() / g.kv_heads / g.head_dim),
            g.kv_heads, g.head_dim};
  }
};

//! Random attention probabilities `[query_heads][queries][slots]` (0 on empty slots, rows summing
//! to 1 over the live ones), as an engine would report them.
inline std::vector<float> attention(const kv::layer_view& v, std::uint32_t query_heads,
                                    std::uint32_t queries, std::mt19937& rng) {
  std::vector<float> p(std::size_t{query_heads} * queries * v.rows, 0.0f);
  std::uniform_real_distribution<float> d(0.01f, 1.0f);
  const std::uint32_t group = query_heads / v.kv_heads;
  for (std::uint32_t qh = 0; qh < query_heads; ++qh)
    for (std::uint32_t q = 0; q < queries; ++q) {
      float* row = p.data() + (std::size_t{qh} * queries + q) * v.rows;
      float sum = 0;
      for (std::uint32_t s = 0; s < v.rows; ++s)
        if (v.positions[std::size_t{s} * v.kv_heads + qh / group] >= 0) sum += row[s] = d(rng);
      for (std::uint32_t s = 0; s < v.rows && sum > 0; ++s) row[s] /= sum;
    }
  return p;
}

}  // namespace reltest
