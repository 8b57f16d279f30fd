// expect: lacks a signal
// SPDX-License-Identifier: Apache-2.0
//! @file
//! scale_aware needs the scale ids with the queries: observe() with the queries alone must not
//! compile. With -DKVCACHE_EXPECT_COMPILES the corrected call (both signals) is compiled instead.
#include <kvcache/cache.hpp>
#include <kvcache/evict/scale_aware.hpp>
#include <kvcache/memory/heap.hpp>

#include <cstdint>

kvcache::status feed(kvcache::cache<kvcache::heap_memory, kvcache::scale_aware>& c,
                     kvcache::seq_id s) {
  const float q = 1.0f;
#ifdef KVCACHE_EXPECT_COMPILES
  const std::uint32_t id = 0;
  return c.observe(s, 0, kvcache::query_signal{&q, kvcache::dtype::f32, 1},
                   kvcache::scale_signal{&id, 1});
#else
  return c.observe(s, 0, kvcache::query_signal{&q, kvcache::dtype::f32, 1});
#endif
}
