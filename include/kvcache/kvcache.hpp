// SPDX-License-Identifier: Apache-2.0
//! @file
//! The whole host library: the cache object, its policy families and the reference attention.
//! Device code (`kvcache/cuda/*.cuh`) is not included: only nvcc sees it.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/version.hpp>

#include <kvcache/core/chunk.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/signals.hpp>
#include <kvcache/core/slot_table.hpp>
#include <kvcache/core/view.hpp>

#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/memory/holding_tier.hpp>
#include <kvcache/memory/host_pages.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/memory/page_bookkeeping.hpp>
#include <kvcache/memory/tiered.hpp>
#include <kvcache/memory/vmm.hpp>

#include <kvcache/evict/budget.hpp>
#include <kvcache/evict/episodic.hpp>
#include <kvcache/evict/heavy_hitter.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/evict/policy.hpp>
#include <kvcache/evict/scale_aware.hpp>
#include <kvcache/evict/score.hpp>
#include <kvcache/evict/sentence.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/evict/snapkv.hpp>

#include <kvcache/quant/bitpack.hpp>
#include <kvcache/quant/dense.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>
#include <kvcache/quant/passthrough.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <kvcache/reference/attention.hpp>

#include <kvcache/cache.hpp>
#include <kvcache/check.hpp>
#include <kvcache/sequence.hpp>
