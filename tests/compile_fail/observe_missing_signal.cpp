// expect: lacks a signal
// SPDX-License-Identifier: Apache-2.0
//! @file
//! A policy that consumes attention probabilities: observe() without them must not compile.
//! With -DKVCACHE_EXPECT_COMPILES the corrected call (with the signal) is compiled instead.
#include <kvcache/cache.hpp>
#include <kvcache/memory/heap.hpp>

#include <cstdint>
#include <vector>

struct needs_attention {
  using signals = kvcache::signal_list<kvcache::attention_signal>;
  struct state {};
  state make_state(const kvcache::policy_context&) const { return {}; }
  void on_append(state&, const kvcache::slot_table&, const kvcache::placement&) {}
  kvcache::status observe(state&, const kvcache::slot_table&, const kvcache::attention_signal&) {
    return {};
  }
  void select(state&, const kvcache::slot_table&, std::uint32_t, std::uint32_t,
              std::vector<std::uint32_t>&) {}
};
static_assert(kvcache::eviction_policy<needs_attention>);

kvcache::status feed(kvcache::cache<kvcache::heap_memory, needs_attention>& c, kvcache::seq_id s) {
#ifdef KVCACHE_EXPECT_COMPILES
  const float p = 1.0f;
  return c.observe(s, 0, kvcache::attention_signal{&p, 1, 1, 1});
#else
  return c.observe(s, 0);
#endif
}
