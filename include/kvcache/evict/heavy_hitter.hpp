// SPDX-License-Identifier: Apache-2.0
//! @file
//! `heavy_hitter`: H2O, the Heavy-Hitter Oracle (ALGORITHMS.md §1).
//!
//! State per (sequence, layer, KV head): `acc[slot]`, fp32, the attention the token in that slot
//! has received since it was appended (a slot that takes a new token restarts at 0, then gets
//! that step's mass: "new slots start at it"). Each observe() adds the step's attention, folded
//! per KV head. At evict(), each head keeps the `recent` newest tokens plus the top-`heavy` of
//! the others by `acc`, on its own (heads keep different sets).
//!
//! Both of H2O's modes come out of the same rule:
//! - **FlexGen (one slot per decode step)**: budget = heavy + recent, max_tokens >= budget + 1.
//!   After each decode token is appended and observed, evict() removes one token per head (the
//!   argmin of `acc` outside the recent window: one O(n) scan, no sort) and the next append writes
//!   into that slot. No data moves, no compaction.
//! - **Keep top-k after prefill**: append the prompt, observe its attention, evict(): each head
//!   drops the `n - budget` lowest-ranked non-recent tokens (nth_element, O(n)). The holes are
//!   reused by later appends (no compaction).
//!
//! Signals (template parameter `Source`, one of):
//! - `attention_signal`: the step's probabilities `[query_heads][q][slots]` (H2O's input);
//! - `attention_sum_signal`: their per-key sums, if the kernel emits them (same result);
//! - `query_signal`: only the step's queries; the probabilities are recomputed against the
//!   cached keys, causally by position (probabilities_from_queries): what makes H2O usable with
//!   FlashAttention. Costs a q·K pass, about half of an attention step.
//!
//! Defaults: heavy = recent = 10% of the prompt (the paper's "20% budget"), the prompt being the
//! tokens of the first append of the (sequence, layer); `heavy`/`recent` set to nonzero counts
//! override the ratios. The tokens kept are min(cache budget, heavy + recent); when the cache's
//! budget is the smaller, it is split in the heavy:recent proportion (half/half by default).
//!
//! Deviations from the reference code, on purpose:
//! - Scores are **per sequence** (the original sums over the batch, which is wrong for B > 1).
//! - GQA: the G query heads of a KV head are **summed** into its `acc`; selection per KV head
//!   (the original needs Hk = H; this is the extension ALGORITHMS.md gives).
//! - Ties: equal scores evict the older token first (score.hpp's ranking); torch.topk leaves
//!   ties unspecified.
//! - The "recent" window is the `recent` newest *live* tokens of the head (the same set as the
//!   original's last `recent` slots while the budget never shrinks below it).
//! - Scores are validated (finite, >= 0); a bad signal is refused with the state unchanged.
#pragma once

#include <kvcache/evict/policy.hpp>
#include <kvcache/evict/score.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

struct heavy_hitter_config {
  float heavy_ratio = 0.1f;   //!< heavy hitters, as a fraction of the prompt
  float recent_ratio = 0.1f;  //!< recent window, as a fraction of the prompt
  std::uint32_t heavy = 0;    //!< absolute heavy-hitter count (with `recent`, overrides ratios)
  std::uint32_t recent = 0;   //!< absolute recent-window size
};

//! @tparam Source the signal it scores from: attention_signal (default), attention_sum_signal
//!                or query_signal.
template <class Source = attention_signal>
class heavy_hitter {
  static_assert(std::is_same_v<Source, attention_signal> ||
                    std::is_same_v<Source, attention_sum_signal> ||
                    std::is_same_v<Source, query_signal>,
                "heavy_hitter: Source must be attention_signal, attention_sum_signal or query_signal");

 public:
  using signals = signal_list<Source>;

  struct state {
    std::vector<std::vector<float>> acc;  //!< [kv_head][slot], fp32 accumulated attention
    std::int64_t next = 0;                //!< positions appended so far
    std::uint32_t prompt = 0;             //!< tokens of the first append (0: none yet)
    std::uint32_t query_heads = 0;
  };

  explicit heavy_hitter(heavy_hitter_config cfg = {}) : cfg_(cfg) {}
  [[nodiscard]] const heavy_hitter_config& config() const noexcept { return cfg_; }

  [[nodiscard]] state make_state(const policy_context& ctx) const {
    state st;
    st.acc.resize(ctx.geo.kv_heads);
    st.query_heads = ctx.geo.query_heads;
    return st;
  }

  void on_append(state& st, const slot_table& t, const placement& pl) {
    for (auto& a : st.acc)
      if (a.size() < t.rows()) a.resize(t.rows(), 0.0f);
    for (std::uint32_t i = 0; i < pl.tokens; ++i)
      for (std::uint32_t h = 0; h < pl.heads; ++h) st.acc[h][pl.slots[i * pl.heads + h]] = 0.0f;
    st.next = pl.first_position + pl.tokens;
    if (st.prompt == 0) st.prompt = pl.tokens;
  }

  //! Adds the step's attention to every live slot's score. Validates first: a bad value leaves
  //! the scores unchanged.
  status observe(state& st, const slot_table& t, const key_reader& keys, const Source& sig) {
    const std::uint32_t H = t.heads(), R = t.rows();
    if constexpr (std::is_same_v<Source, attention_signal>) {
      KVCACHE_TRY(fold_probabilities(sig.probs, sig.query_heads, sig.queries, sig.slots, H,
                                     head_fold::sum, scr_.folded, "attention"));
    } else if constexpr (std::is_same_v<Source, attention_sum_signal>) {
      KVCACHE_TRY(fold_probabilities(sig.sums, sig.query_heads, 1, sig.slots, H, head_fold::sum,
                                     scr_.folded, "attention sums"));
    } else {
      if (sig.queries > st.next)
        return {errc::shape_mismatch, "observe: " + std::to_string(sig.queries) +
                                          " queries but only " + std::to_string(st.next) +
                                          " tokens were appended"};
      queries_to_float(sig, st.query_heads, keys.head_dim, qf_);
      for (std::size_t i = 0; i < qf_.size(); ++i)
        if (!std::isfinite(qf_[i]))
          return {errc::invalid_argument,
                  "observe: query value " + std::to_string(i) + " is not finite"};
      probabilities_from_queries(qf_.data(), sig.queries, st.query_heads, t, st.next, keys,
                                 head_fold::sum, scr_);
    }
    for (std::uint32_t h = 0; h < H; ++h) {
      float* a = st.acc[h].data();
      const float* f = scr_.folded.data() + std::size_t{h} * R;
      for (std::uint32_t s = 0; s < R; ++s) a[s] += f[s];
    }
    return {};
  }

  //! Heavy + recent for this sequence's prompt; 0 when no prompt has been seen.
  [[nodiscard]] std::uint32_t heavy_of(const state& st) const noexcept {
    if (cfg_.heavy || cfg_.recent) return cfg_.heavy;
    return ratio(cfg_.heavy_ratio, st.prompt);
  }
  [[nodiscard]] std::uint32_t recent_of(const state& st) const noexcept {
    if (cfg_.heavy || cfg_.recent) return cfg_.recent;
    return ratio(cfg_.recent_ratio, st.prompt);
  }

  //! Tokens a head keeps: min(cache budget, heavy + recent).
  [[nodiscard]] std::uint32_t target(const state& st, const slot_table&, std::uint32_t,
                                     std::uint32_t budget) const noexcept {
    if (st.prompt == 0) return budget;
    const std::uint64_t own = std::uint64_t{heavy_of(st)} + recent_of(st);
    return static_cast<std::uint32_t>(std::min<std::uint64_t>(budget, std::max<std::uint64_t>(own, 1)));
  }

  //! Evicts the `count` lowest-ranked tokens of `head` outside its recent window.
  void select(state& st, const slot_table& t, std::uint32_t head, std::uint32_t count,
              std::vector<std::uint32_t>& victims) {
    const std::uint32_t live = t.live(head);
    if (count == 0 || live == 0) return;
    const std::uint32_t kept = live > count ? live - count : 0;
    const std::uint32_t r = recent_window(st, kept);
    const std::uint32_t R = t.rows(), H = t.heads();
    const std::int32_t* pos = t.positions();
    const float* a = st.acc[head].data();
    const std::int64_t cutoff = st.next - r;
    std::uint32_t in_recent = 0;
    if (count == 1) {  // FlexGen: argmin over the non-recent region, one scan
      float best = std::numeric_limits<float>::infinity();
      std::int32_t best_pos = std::numeric_limits<std::int32_t>::max();
      std::uint32_t best_slot = 0;
      bool found = false;
      for (std::uint32_t s = 0; s < R; ++s) {
        const std::int32_t p = pos[std::size_t{s} * H + head];
        if (p < 0) continue;
        if (p >= cutoff) {
          ++in_recent;
          continue;
        }
        if (a[s] < best || (a[s] == best && p < best_pos) || !found) {
          best = a[s];
          best_pos = p;
          best_slot = s;
          found = true;
        }
      }
      if (in_recent == std::min(r, live)) {
        if (found) victims.push_back(best_slot);
        return;
      }
    }
    // General path (drop-many, or a recent window with holes after a budget change).
    scr_.cands.clear();
    in_recent = 0;
    for (std::uint32_t s = 0; s < R; ++s) {
      const std::int32_t p = pos[std::size_t{s} * H + head];
      if (p < 0) continue;
      if (p >= cutoff) ++in_recent;
      scr_.cands.push_back({a[s], p, s});
    }
    std::int64_t thr = cutoff;
    if (in_recent != std::min(r, live)) {  // the r newest live tokens are not [next - r, next)
      if (r == 0) {
        thr = std::numeric_limits<std::int64_t>::max();
      } else {
        auto newest_first = [](const scored_slot& x, const scored_slot& y) {
          return x.position > y.position;
        };
        std::nth_element(scr_.cands.begin(), scr_.cands.begin() + (r - 1), scr_.cands.end(),
                         newest_first);
        thr = scr_.cands[r - 1].position;
      }
    }
    std::erase_if(scr_.cands, [thr](const scored_slot& c) { return c.position >= thr; });
    lowest_ranked(scr_.cands, count, victims);
  }

 private:
  static std::uint32_t ratio(float r, std::uint32_t prompt) noexcept {
    return std::max<std::uint32_t>(1, static_cast<std::uint32_t>(static_cast<double>(r) * prompt));
  }
  //! The recent window for `kept` tokens: `recent`, or its share of `kept` when the budget is
  //! below heavy + recent.
  std::uint32_t recent_window(const state& st, std::uint32_t kept) const noexcept {
    const std::uint64_t hh = heavy_of(st), rc = recent_of(st);
    if (st.prompt == 0 && !(cfg_.heavy || cfg_.recent)) return 0;
    if (hh + rc == 0) return 0;
    if (kept >= hh + rc) return static_cast<std::uint32_t>(rc);
    return static_cast<std::uint32_t>(std::uint64_t{kept} * rc / (hh + rc));
  }

  heavy_hitter_config cfg_;
  score_scratch scr_;
  std::vector<float> qf_;
};

heavy_hitter()->heavy_hitter<attention_signal>;
heavy_hitter(heavy_hitter_config)->heavy_hitter<attention_signal>;

static_assert(eviction_policy<heavy_hitter<attention_signal>>);
static_assert(eviction_policy<heavy_hitter<attention_sum_signal>>);
static_assert(eviction_policy<heavy_hitter<query_signal>>);

KVCACHE_NAMESPACE_END
