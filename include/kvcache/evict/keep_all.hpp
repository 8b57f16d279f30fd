// SPDX-License-Identifier: Apache-2.0
//! @file
//! `keep_all`: the full cache. Never evicts; consumes no signal. The truth other policies are
//! measured against.
#pragma once

#include <kvcache/evict/policy.hpp>

KVCACHE_NAMESPACE_BEGIN

struct keep_all {
  using signals = signal_list<>;
  struct state {};

  [[nodiscard]] state make_state(const policy_context&) const noexcept { return {}; }
  void on_append(state&, const slot_table&, const placement&) noexcept {}
  //! Never called with count > 0: the cache skips eviction for policies that never evict.
  void select(state&, const slot_table&, std::uint32_t, std::uint32_t,
              std::vector<std::uint32_t>&) noexcept {}
  static constexpr bool never_evicts = true;
};

static_assert(eviction_policy<keep_all>);

KVCACHE_NAMESPACE_END
