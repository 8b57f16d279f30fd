// expect: give the cache tiered memory
// SPDX-License-Identifier: Apache-2.0
//! @file
//! SentenceKV moves tokens between a working and a holding tier: a cache over plain host_vmm must
//! not compile. With -DKVCACHE_EXPECT_COMPILES the memory is tiered<host_vmm>.
#include <kvcache/cache.hpp>
#include <kvcache/evict/sentence.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/memory/tiered.hpp>

#ifdef KVCACHE_EXPECT_COMPILES
using memory = kvcache::tiered<kvcache::host_vmm>;
#else
using memory = kvcache::host_vmm;
#endif

std::size_t bytes(const kvcache::cache<memory, kvcache::sentence_kv>& c) { return c.range_bytes(); }
