// SPDX-License-Identifier: Apache-2.0
//! @file
//! `tiered<Working, Holding>`: a memory backend with a holding tier behind it.
//!
//! The working tier is the backend attention reads (`host_vmm`; a CUDA backend on a GPU): it is
//! `Working` itself, so a tiered memory is a memory backend wherever `Working` is one. The
//! holding tier (`host_holding`: pageable host memory; pinned host memory for a GPU working tier,
//! cuda/holding.cuh) keeps what a tiered policy demoted, in groups, and carries the copies
//! between the tiers. The cache object does the moves (what goes where is its business and the
//! policy's); this type only puts the two tiers together:
//!
//! ```
//! kvcache::cache<kvcache::tiered<kvcache::host_vmm>, kvcache::sentence_kv> c(cfg,
//!     kvcache::tiered<kvcache::host_vmm>(kvcache::host_vmm(vm_cfg), kvcache::host_holding(cap)));
//! ```
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/holding_tier.hpp>

#include <utility>

KVCACHE_NAMESPACE_BEGIN

template <class Working, class Holding = host_holding>
class tiered : public Working {
 public:
  using working_type = Working;
  using holding_type = Holding;
  static constexpr bool has_holding_tier = true;

  explicit tiered(Working working = Working{}, Holding holding = Holding{})
      : Working(std::move(working)), holding_(std::move(holding)) {}

  [[nodiscard]] Working& working() noexcept { return *this; }
  [[nodiscard]] const Working& working() const noexcept { return *this; }
  [[nodiscard]] Holding& holding() noexcept { return holding_; }
  [[nodiscard]] const Holding& holding() const noexcept { return holding_; }

 private:
  Holding holding_;
};

//! True when memory M has a holding tier (`tiered<...>`).
template <class M>
concept has_holding_tier = requires(M& m) {
  requires static_cast<bool>(M::has_holding_tier);
  m.holding();
};

KVCACHE_NAMESPACE_END
