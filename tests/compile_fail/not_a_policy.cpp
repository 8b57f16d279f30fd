// expect: eviction_policy|constraints not satisfied
// SPDX-License-Identifier: Apache-2.0
//! @file
//! `int` is not an eviction policy: naming cache<host_vmm, int> must not compile.
//! With -DKVCACHE_EXPECT_COMPILES a real policy is named instead.
#include <kvcache/cache.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/memory/host_vmm.hpp>

#ifdef KVCACHE_EXPECT_COMPILES
using policy = kvcache::keep_all;
#else
using policy = int;
#endif

std::size_t bytes(const kvcache::cache<kvcache::host_vmm, policy>& c) { return c.range_bytes(); }
