// SPDX-License-Identifier: Apache-2.0
//! @file
//! `snapkv`: SnapKV, one-shot compression of the prompt at the end of prefill (ALGORITHMS.md §2).
//!
//! The engine appends the prompt, feeds the queries of its last `w` tokens (`query_signal`; or
//! their attention probabilities, `snapkv<attention_signal>`), and calls evict(). Per KV head:
//! ```
//! A     = softmax(Q[-w:] K^T / sqrt(D)), causal by position, fp32
//! votes = sum over the w rows of A, over the prefix tokens (before the window)
//! votes = pool1d(votes, kernel k, pad k/2, stride 1)     # over the prefix, in position order
//! keep  = top-(C - w) of votes over the prefix, plus the whole window
//! ```
//! with C the cache's budget for the layer (LongBench: 1024/2048/4096). Decode tokens are then
//! appended with no eviction (target() answers "no limit" until the next scoring).
//! Defaults are the LongBench configs: w = 32, k = 7, max pooling. The class default of the
//! original (w = 64, k = 5, avg) is `snapkv_config{64, 5, pooling::avg}`.
//!
//! Deviations, on purpose:
//! - GQA: the G query heads' probabilities are **averaged** per KV head and the cache stays per
//!   KV head, as NVIDIA kvpress does (the original repeat_kv's the cache G times).
//! - Slots are not moved after the compression: the dropped tokens become holes that decode
//!   tokens fill (the original gathers a dense cache). Pooling runs over the live prefix tokens
//!   in position order, which is the original's sequence order.
//! - Ties: equal pooled votes evict the older token first (score.hpp's ranking).
//! - Prompts not longer than the budget are left as they are (as the original does).
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

struct snapkv_config {
  std::uint32_t window = 32;    //!< observation window w (last prompt queries)
  std::uint32_t kernel = 7;     //!< pooling kernel
  pooling pool = pooling::max;  //!< LongBench configs: max pooling
};

//! @tparam Source query_signal (default: probabilities recomputed against the cached keys) or
//!                attention_signal (the engine's probabilities of the window's queries).
template <class Source = query_signal>
class snapkv {
  static_assert(std::is_same_v<Source, query_signal> || std::is_same_v<Source, attention_signal>,
                "snapkv: Source must be query_signal or attention_signal");

 public:
  using signals = signal_list<Source>;

  struct state {
    std::vector<std::vector<float>> score;  //!< [kv_head][slot] pooled votes of the prefix
    std::int64_t next = 0;
    std::int64_t window_start = 0;  //!< first position of the observation window
    bool scored = false;            //!< scored and not yet followed by an append
    std::uint32_t query_heads = 0;
  };

  explicit snapkv(snapkv_config cfg = {}) : cfg_(cfg) {
    if (cfg_.window == 0) raise(errc::invalid_argument, "snapkv: window must be > 0");
  }
  [[nodiscard]] const snapkv_config& config() const noexcept { return cfg_; }

  [[nodiscard]] state make_state(const policy_context& ctx) const {
    state st;
    st.score.resize(ctx.geo.kv_heads);
    st.query_heads = ctx.geo.query_heads;
    return st;
  }

  void on_append(state& st, const slot_table& t, const placement& pl) {
    for (auto& s : st.score)
      if (s.size() < t.rows()) s.resize(t.rows(), 0.0f);
    st.next = pl.first_position + pl.tokens;
    st.scored = false;  // decode tokens: the compression (if any) is over
  }

  status observe(state& st, const slot_table& t, const key_reader& keys, const Source& sig) {
    const std::uint32_t H = t.heads(), R = t.rows();
    std::uint32_t w = 0;
    if constexpr (std::is_same_v<Source, query_signal>) {
      if (sig.queries > st.next)
        return {errc::shape_mismatch, "observe: " + std::to_string(sig.queries) +
                                          " window queries but only " + std::to_string(st.next) +
                                          " tokens were appended"};
      w = std::min(cfg_.window, sig.queries);
      queries_to_float(sig, st.query_heads, keys.head_dim, qf_);
      for (std::size_t i = 0; i < qf_.size(); ++i)
        if (!std::isfinite(qf_[i]))
          return {errc::invalid_argument,
                  "observe: query value " + std::to_string(i) + " is not finite"};
      probabilities_from_queries(qf_.data(), sig.queries, st.query_heads, t, st.next, keys,
                                 head_fold::mean, scr_, sig.queries - w);
    } else {
      if (sig.queries > st.next)
        return {errc::shape_mismatch, "observe: attention of " + std::to_string(sig.queries) +
                                          " window queries but only " + std::to_string(st.next) +
                                          " tokens were appended"};
      w = std::min(cfg_.window, sig.queries);
      KVCACHE_TRY(fold_probabilities(sig.probs, sig.query_heads, sig.queries, sig.slots, H,
                                     head_fold::mean, scr_.folded, "attention",
                                     sig.queries - w));
    }
    // Valid: from here on the state changes.
    st.window_start = st.next - w;
    for (std::uint32_t h = 0; h < H; ++h) {
      slots_in_position_order(t, h, st.next, scr_);
      const float* votes = scr_.folded.data() + std::size_t{h} * R;
      scr_.seq.clear();
      for (std::uint32_t s : scr_.order) {
        if (t.position(s, h) >= st.window_start) break;  // order is by position
        scr_.seq.push_back(votes[s]);
      }
      pool_in_position_order(scr_, cfg_.kernel, cfg_.pool, st.score[h]);
    }
    st.scored = true;
    return {};
  }

  //! The cache's budget right after scoring; otherwise no limit (SnapKV compresses once).
  [[nodiscard]] std::uint32_t target(const state& st, const slot_table&, std::uint32_t,
                                     std::uint32_t budget) const noexcept {
    return st.scored ? budget : std::numeric_limits<std::uint32_t>::max();
  }

  //! The `count` lowest-ranked prefix tokens of `head` (the window is never evicted).
  void select(state& st, const slot_table& t, std::uint32_t head, std::uint32_t count,
              std::vector<std::uint32_t>& victims) {
    if (!st.scored) return;
    scr_.cands.clear();
    const auto& sc = st.score[head];
    for (std::uint32_t s = 0; s < t.rows(); ++s) {
      const std::int32_t p = t.position(s, head);
      if (p >= 0 && p < st.window_start) scr_.cands.push_back({sc[s], p, s});
    }
    lowest_ranked(scr_.cands, count, victims);
  }

 private:
  snapkv_config cfg_;
  score_scratch scr_;
  std::vector<float> qf_;
};

snapkv()->snapkv<query_signal>;
snapkv(snapkv_config)->snapkv<query_signal>;

static_assert(eviction_policy<snapkv<query_signal>>);
static_assert(eviction_policy<snapkv<attention_signal>>);

KVCACHE_NAMESPACE_END
