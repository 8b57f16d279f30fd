// expect: does not consume
// SPDX-License-Identifier: Apache-2.0
//! @file
//! heavy_hitter<query_signal> scores from queries (the FlashAttention path): feeding it attention
//! probabilities must not compile. With -DKVCACHE_EXPECT_COMPILES the corrected call (the
//! queries) is compiled instead, to show the failure is for this reason only.
#include <kvcache/cache.hpp>
#include <kvcache/evict/heavy_hitter.hpp>
#include <kvcache/memory/heap.hpp>

using h2o_q = kvcache::heavy_hitter<kvcache::query_signal>;

kvcache::status feed(kvcache::cache<kvcache::heap_memory, h2o_q>& c, kvcache::seq_id s) {
  const float p = 1.0f;
#ifdef KVCACHE_EXPECT_COMPILES
  return c.observe(s, 0, kvcache::query_signal{&p, kvcache::dtype::f32, 1});
#else
  return c.observe(s, 0, kvcache::attention_signal{&p, 1, 1, 1});
#endif
}
