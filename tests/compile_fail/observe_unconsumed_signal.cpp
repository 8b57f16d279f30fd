// expect: does not consume
// SPDX-License-Identifier: Apache-2.0
//! @file
//! keep_all consumes no signal: feeding it attention probabilities must not compile (an engine
//! must not compute what its policy ignores). With -DKVCACHE_EXPECT_COMPILES the corrected call
//! (no signal) is compiled instead, to show the failure is for this reason only.
#include <kvcache/cache.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/memory/heap.hpp>

kvcache::status feed(kvcache::cache<kvcache::heap_memory, kvcache::keep_all>& c, kvcache::seq_id s) {
#ifdef KVCACHE_EXPECT_COMPILES
  return c.observe(s, 0);
#else
  const float p = 1.0f;
  return c.observe(s, 0, kvcache::attention_signal{&p, 1, 1, 1});
#endif
}
