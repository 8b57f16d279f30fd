// expect: memory_backend|constraints not satisfied
// SPDX-License-Identifier: Apache-2.0
//! @file
//! `int` is not a memory backend: naming cache<int> must not compile.
//! With -DKVCACHE_EXPECT_COMPILES a real backend is named instead.
#include <kvcache/cache.hpp>
#include <kvcache/memory/heap.hpp>

#ifdef KVCACHE_EXPECT_COMPILES
using memory = kvcache::heap_memory;
#else
using memory = int;
#endif

std::size_t bytes(const kvcache::cache<memory>& c) { return c.range_bytes(); }
