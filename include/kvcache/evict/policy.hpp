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
//!
//! Optional members, detected by the cache with `requires`:
//! - `status observe(state&, const slot_table&, const key_reader&, const S&...)` with the
//!   policy's signals in the order of `signals`: one call per `cache::observe`, with read access
//!   to the cached keys (policies that score queries against keys: SnapKV, ScaleKV, H2O fed only
//!   queries). Preferred over the per-signal form when present. It must validate everything
//!   before it changes the state (a failed observe leaves the state as it was).
//! - `std::uint32_t target(const state&, const slot_table&, std::uint32_t head,
//!   std::uint32_t budget) const`: the tokens `head` keeps at evict(), given the cache's budget
//!   for it. Policies whose budget comes from their own rules (H2O's ratio of the prompt, ScaleKV's
//!   per-scale table, SnapKV compressing once) answer here; the cache evicts down to it.
//! - `static constexpr bool never_evicts`: the cache skips eviction entirely.
//!
//! Tiered policies (SentenceKV) move tokens between the working tier and a holding tier instead
//! of dropping them; the cache's memory must then be `tiered<...>` (memory/tiered.hpp). They
//! provide, instead of (or besides) `select`:
//! - `void plan(state&, const slot_table&, const key_reader&, std::uint32_t head,
//!   std::uint32_t budget, tier_plan& out)`: at evict(), what `head` holds, drops and fetches
//!   (see tier_plan); after it the head has at most `budget` live tokens. `out` arrives cleared;
//!   the key reader reads the working tier's keys (as in the joint observe).
//! - optionally `void predict(const state&, const slot_table&, std::uint32_t head,
//!   std::uint32_t budget, std::vector<group_rows>& out) const`: held rows the next plan() will
//!   probably fetch, for `cache::prefetch` (most likely first; rows already resident excluded).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/signals.hpp>
#include <kvcache/core/slot_table.hpp>

#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
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

//! Read access to the cached keys of one (sequence, layer), decoded to fp32, built by the cache
//! from its quantizer so that policies never see storage formats. `read(head, first, count, out)`
//! writes rows [first, first+count) of `head` as `[count][head_dim]` floats (empty slots decode
//! whatever bytes they hold: mask them with the slot table).
struct key_reader {
  std::uint32_t rows = 0;
  std::uint32_t head_dim = 0;
  const void* ctx = nullptr;
  void (*fn)(const void* ctx, std::uint32_t head, std::uint32_t first, std::uint32_t count,
             float* out) = nullptr;

  void read(std::uint32_t head, std::uint32_t first, std::uint32_t count, float* out) const {
    fn(ctx, head, first, count, out);
  }
};

//! Rows [first, first + count) of one group that the holding tier keeps for a (sequence, layer,
//! head): a sentence, in the order its rows were held.
struct group_rows {
  std::uint32_t group = 0;
  std::uint32_t first = 0;
  std::uint32_t count = 0;
  friend bool operator==(const group_rows&, const group_rows&) = default;
};

//! What a tiered policy asks of the cache for one head at evict(). The cache checks the plan
//! whole (live slots, held rows, room) and then applies it in this order:
//! 1. `hold`: copy the row of each slot to the end of its group in the holding tier (the slot
//!    stays live: a token leaving the recent window whose sentence is also selected);
//! 2. `drop`: vacate these live slots (no copy: held already, or pruned for good);
//! 3. `fetch`: copy these held rows back into free slots of the head, each placed at its original
//!    position (the tag it was held with). A fetched row must not be live already.
struct tier_plan {
  struct hold_row {
    std::uint32_t slot = 0;
    std::uint32_t group = 0;
  };
  std::vector<hold_row> hold;
  std::vector<std::uint32_t> drop;
  std::vector<group_rows> fetch;
  void clear() noexcept {
    hold.clear();
    drop.clear();
    fetch.clear();
  }
};

namespace detail {
template <class P>
concept selects_victims = requires(P& p, typename P::state& st, const slot_table& t,
                                   std::vector<std::uint32_t>& out) {
  { p.select(st, t, std::uint32_t{}, std::uint32_t{}, out) } -> std::same_as<void>;
};
}  // namespace detail

//! True when P moves tokens between tiers (has `plan`).
template <class P>
concept tiered_policy = requires(P& p, typename P::state& st, const slot_table& t,
                                 const key_reader& keys, tier_plan& out) {
  { p.plan(st, t, keys, std::uint32_t{}, std::uint32_t{}, out) } -> std::same_as<void>;
};
//! True when a tiered policy can tell what its next plan will fetch (`predict`).
template <class P>
concept predicts_fetches =
    requires(const P& p, const typename P::state& st, const slot_table& t, std::vector<group_rows>& out) {
      { p.predict(st, t, std::uint32_t{}, std::uint32_t{}, out) } -> std::same_as<void>;
    };

template <class P>
concept eviction_policy =
    std::copy_constructible<typename P::state> &&
    requires(const P& cp, P& p, typename P::state& st, const slot_table& t, const placement& pl,
             const policy_context& ctx) {
      typename P::signals;
      { cp.make_state(ctx) } -> std::same_as<typename P::state>;
      { p.on_append(st, t, pl) } -> std::same_as<void>;
    } && (detail::selects_victims<P> || tiered_policy<P>);

namespace detail {

//! True when P has the joint `observe(state&, const slot_table&, const key_reader&, const N&...)`
//! over its signals `List`, in list order.
template <class P, class List>
struct has_joint_observe : std::false_type {};
template <class P, class... N>
struct has_joint_observe<P, signal_list<N...>>
    : std::bool_constant<requires(P& p, typename P::state& st, const slot_table& t,
                                  const key_reader& kr, const N&... sigs) {
        { p.observe(st, t, kr, sigs...) } -> std::same_as<status>;
      }> {};

//! True when P has `target(const state&, const slot_table&, uint32_t head, uint32_t budget)`.
template <class P>
concept has_target = requires(const P& p, const typename P::state& st, const slot_table& t) {
  { p.target(st, t, std::uint32_t{}, std::uint32_t{}) } -> std::convertible_to<std::uint32_t>;
};

//! The argument of type N among `first, rest...` (exactly one has it: the cache checks).
template <class N, class First, class... Rest>
constexpr const N& pick_signal(const First& first, const Rest&... rest) noexcept {
  if constexpr (std::is_same_v<N, First>) {
    return first;
  } else {
    return pick_signal<N>(rest...);
  }
}

}  // namespace detail

KVCACHE_NAMESPACE_END
