// expect: token-grouped keys
// SPDX-License-Identifier: Apache-2.0
//! @file
//! A tiered policy moves (token, head) rows one by one; KIVI's keys are quantized across tokens,
//! so sentence_kv over kivi must not compile. With -DKVCACHE_EXPECT_COMPILES the format is q4_0.
#include <kvcache/cache.hpp>
#include <kvcache/evict/sentence.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/memory/tiered.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>

#ifdef KVCACHE_EXPECT_COMPILES
using format = kvcache::q4_0;
#else
using format = kvcache::kivi<4, 32, 128>;
#endif

std::size_t bytes(const kvcache::cache<kvcache::tiered<kvcache::host_vmm>, kvcache::sentence_kv, format>& c) {
  return c.range_bytes();
}
