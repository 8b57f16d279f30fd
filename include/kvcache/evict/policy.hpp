// SPDX-License-Identifier: Apache-2.0
//! @file
//! The eviction-policy concept. A policy chooses victim slots from metadata and signals; it
//! never touches K/V memory or storage formats (the cache object does).
//!
//! A policy `P` provides:
//! - `using signals = signal_list<...>`: what the engine must feed through `cache::observe`;
//! - `typename P::state`: its per (sequence, layer) state, copyable (forks copy it);
//! - `state make_state(const policy_context&) const`;
//! - `void on_append(state&, const slot_table&, const placement&)`: tokens were just placed;
//! - `status observe(state&, const slot_table&, const Signal&)` for each Signal in `signals`;
//! - `void select(state&, const slot_table&, uint32_t head, uint32_t count, std::vector<uint32_t>&
//!   victims)`: append exactly `count` live slots of `head` to evict, and forget them.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/signals.hpp>
#include <kvcache/core/slot_table.hpp>

#include <concepts>
#include <cstdint>
#include <span>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

//! What a policy knows when it builds a (sequence, layer) state.
struct policy_context {
  geometry geo;
  std::uint32_t layer = 0;
  std::uint32_t capacity = 0;  //!< slots per head
};

//! Where the tokens of one append went: token i of head h is in `slots[i * heads + h]`, and has
//! original position `first_position + i`.
struct placement {
  std::span<const std::uint32_t> slots;
  std::uint32_t heads = 0;
  std::uint32_t tokens = 0;
  std::int64_t first_position = 0;
};

template <class P>
concept eviction_policy =
    std::copy_constructible<typename P::state> &&
    requires(const P& cp, P& p, typename P::state& st, const slot_table& t, const placement& pl,
             const policy_context& ctx, std::vector<std::uint32_t>& out) {
      typename P::signals;
      { cp.make_state(ctx) } -> std::same_as<typename P::state>;
      { p.on_append(st, t, pl) } -> std::same_as<void>;
      { p.select(st, t, std::uint32_t{}, std::uint32_t{}, out) } -> std::same_as<void>;
    };

KVCACHE_NAMESPACE_END
