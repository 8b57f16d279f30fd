// SPDX-License-Identifier: Apache-2.0
//! @file
//! `sink_window`: StreamingLLM's attention sinks plus a sliding window (ALGORITHMS.md §2).
//!
//! Keeps the first `sinks` positions and the newest tokens; when a head holds more than its
//! budget, the oldest non-sink tokens go. With budget B the window is B - sinks, so the kept set
//! is StreamingLLM's `[0, start) ∪ [n - recent, n)` with start = sinks, recent = B - sinks.
//! Consumes no signal. Default sinks = 4 (the paper's start size).
//!
//! Positions: the cache stores keys as the engine gives them. StreamingLLM re-indexes positions
//! inside the cache (keys cached before RoPE, rotated at their slot index when loaded): an engine
//! that wants that must cache pre-RoPE keys and rotate by rank of `positions` itself.
#pragma once

#include <kvcache/evict/policy.hpp>

#include <deque>

KVCACHE_NAMESPACE_BEGIN

class sink_window {
 public:
  using signals = signal_list<>;

  //! Per head: the evictable (non-sink) slots in arrival order, oldest first.
  struct state {
    std::vector<std::deque<std::uint32_t>> fifo;
  };

  explicit sink_window(std::uint32_t sinks = 4) noexcept : sinks_(sinks) {}
  [[nodiscard]] std::uint32_t sinks() const noexcept { return sinks_; }

  [[nodiscard]] state make_state(const policy_context& ctx) const {
    return state{std::vector<std::deque<std::uint32_t>>(ctx.geo.kv_heads)};
  }

  void on_append(state& st, const slot_table&, const placement& pl) {
    for (std::uint32_t i = 0; i < pl.tokens; ++i) {
      if (pl.first_position + i < sinks_) continue;  // sinks are never evicted
      for (std::uint32_t h = 0; h < pl.heads; ++h) st.fifo[h].push_back(pl.slots[i * pl.heads + h]);
    }
  }

  //! The `count` oldest non-sink tokens of `head`. When fewer exist (budget below the sink
  //! count), only those go: sinks stay, as in StreamingLLM.
  void select(state& st, const slot_table&, std::uint32_t head, std::uint32_t count,
              std::vector<std::uint32_t>& victims) {
    auto& q = st.fifo[head];
    for (; count > 0 && !q.empty(); --count) {
      victims.push_back(q.front());
      q.pop_front();
    }
  }

 private:
  std::uint32_t sinks_;
};

static_assert(eviction_policy<sink_window>);

KVCACHE_NAMESPACE_END
