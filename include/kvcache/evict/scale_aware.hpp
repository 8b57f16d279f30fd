// SPDX-License-Identifier: Apache-2.0
//! @file
//! `scale_aware`: ScaleKV, scale-aware KV compression for visual autoregressive (next-scale)
//! models (ALGORITHMS.md §5; StargazerX0/ScaleKV `scale_kv.py`).
//!
//! Tokens carry a scale index (`scale_signal`). After each scale's forward, per layer, the engine
//! feeds the scale's ids (with its token-map grid) and the scale's queries (`query_signal`, one
//! per token of the scale, row-major over the map), then calls evict():
//! ```
//! if the cache never exceeded base (650) and n <= base: nothing (the "reached base" flag)
//! cap = budgets.at(s + 1, layer)  (the next scale's budget; the last scale reuses the previous)
//! if n <= cap: nothing
//! obs = 16 queries at the patch centres of a 4x4 grid over the HxW map
//!       (centre of patch (i, j): (i*H/4 + (H/4 - 1)/2, j*W/4 + (W/4 - 1)/2));
//!       a map that is not square or smaller than 4x4: the scale's last 16 tokens
//! score[j] = sum over obs of q·k_j/sqrt(D)   (raw logits, the released code; softmax optional)
//! obs keys -> -inf;  score = maxpool1d(score, 5, pad 2) in position order
//! keep = obs tokens + top-(cap - 16) of the others
//! ```
//! After the last scale (`scales - 1`) the flag resets so the next image starts fresh.
//! Defaults follow the released 10% setting: base 650 tokens (= the average per-layer budget),
//! no compression while the cache is under it, window 16, kernel 5, max pooling, raw logits.
//! Budgets: a `budget_table` (rows = next scale, see budget.hpp: `scalekv_infinity_8b_10pct()`
//! is the released Infinity-8B table; `scale_budgets()` builds one from drafter/refiner roles,
//! given as a table or computed with `attention_selectivity()`); without a table, every layer
//! gets the base. The cache's own budget still caps the result (min of the two).
//!
//! Deviations, on purpose:
//! - GQA: the G query heads of a KV head are **averaged** (Infinity is MHA; we follow kvpress).
//! - Scores are per sequence (the released code runs B = 1 per cache).
//! - Fallback observation set: the last min(16, len) tokens of the *current scale* (the released
//!   code takes the last 16 cache positions and clamps their query indices into the scale).
//! - Ties: equal pooled scores evict the older token first (score.hpp's ranking).
//! - Evicted tokens leave holes that later scales fill (no gather).
#pragma once

#include <kvcache/evict/budget.hpp>
#include <kvcache/evict/policy.hpp>
#include <kvcache/evict/score.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

struct scale_aware_config {
  std::uint32_t window = 16;          //!< observation queries (a sqrt(window) grid)
  std::uint32_t kernel = 5;           //!< pooling kernel
  pooling pool = pooling::max;        //!< released default
  bool softmax = false;               //!< false: raw logits (released code); true: probabilities
  std::uint32_t base_capacity = 650;  //!< no compression while the cache stays at most this
  std::uint32_t scales = 13;          //!< scales per image (Infinity 1024²: 13)
  budget_table budgets;               //!< rows = next scale; empty: base_capacity everywhere
};

class scale_aware {
 public:
  using signals = signal_list<scale_signal, query_signal>;

  struct state {
    std::uint32_t layer = 0;
    std::uint32_t query_heads = 0;
    std::int64_t next = 0;
    std::vector<std::uint32_t> scale_of;    //!< scale index per position
    std::vector<std::vector<float>> score;  //!< [kv_head][slot] pooled scores
    std::vector<std::int32_t> obs;          //!< observation positions (sorted)
    std::uint32_t cap = 0;                  //!< tokens kept after this scale
    bool reached_base = false;
    bool scored = false;
  };

  explicit scale_aware(scale_aware_config cfg = {}) : cfg_(std::move(cfg)) {
    if (cfg_.window == 0) raise(errc::invalid_argument, "scale_aware: window must be > 0");
  }
  [[nodiscard]] const scale_aware_config& config() const noexcept { return cfg_; }

  [[nodiscard]] state make_state(const policy_context& ctx) const {
    state st;
    st.layer = ctx.layer;
    st.query_heads = ctx.geo.query_heads;
    st.score.resize(ctx.geo.kv_heads);
    return st;
  }

  void on_append(state& st, const slot_table& t, const placement& pl) {
    for (auto& s : st.score)
      if (s.size() < t.rows()) s.resize(t.rows(), 0.0f);
    st.next = pl.first_position + pl.tokens;
    st.scored = false;
  }

  //! The budget after scale `scale` for this layer: the next scale's table entry, else the base.
  [[nodiscard]] std::uint32_t cap_after(std::uint32_t scale, std::uint32_t layer) const noexcept {
    const std::uint32_t row = scale + 1 >= cfg_.scales ? scale : scale + 1;
    const std::uint32_t b = cfg_.budgets.at(row, layer);
    return b ? b : cfg_.base_capacity;
  }

  //! Observation positions of a scale of `len` tokens starting at `start` (grid h x w; 0 = infer
  //! a square), sorted.
  void observation_positions(std::int64_t start, std::uint32_t len, std::uint32_t gh,
                             std::uint32_t gw, std::vector<std::int32_t>& out) const {
    out.clear();
    const auto g = static_cast<std::uint32_t>(std::lround(std::sqrt(double(cfg_.window))));
    if (gh == 0 || gw == 0) {
      const auto side = static_cast<std::uint32_t>(std::lround(std::sqrt(double(len))));
      if (side * side == len) gh = gw = side;
    }
    if (g * g == cfg_.window && gh == gw && gh >= g && gh * gw == len) {
      const std::uint32_t ph = gh / g, pw = gw / g;
      for (std::uint32_t i = 0; i < g; ++i)
        for (std::uint32_t j = 0; j < g; ++j) {
          const std::uint32_t hc = std::min(gh - 1, i * ph + (ph - 1) / 2);
          const std::uint32_t wc = std::min(gw - 1, j * pw + (pw - 1) / 2);
          out.push_back(static_cast<std::int32_t>(start + hc * gw + wc));
        }
      std::sort(out.begin(), out.end());
      out.erase(std::unique(out.begin(), out.end()), out.end());
      return;
    }
    const std::uint32_t n = std::min(cfg_.window, len);
    for (std::uint32_t i = len - n; i < len; ++i)
      out.push_back(static_cast<std::int32_t>(start + i));
  }

  status observe(state& st, const slot_table& t, const key_reader& keys, const scale_signal& sc,
                 const query_signal& q) {
    // ---- validate everything before changing anything
    if (sc.tokens == 0 || !sc.ids)
      return {errc::invalid_argument, "observe: scale_signal has no ids"};
    if (sc.tokens > st.next)
      return {errc::shape_mismatch, "observe: scale ids for " + std::to_string(sc.tokens) +
                                        " tokens but only " + std::to_string(st.next) +
                                        " were appended"};
    const std::int64_t first = st.next - sc.tokens;
    std::uint32_t prev = first > 0 && first <= static_cast<std::int64_t>(st.scale_of.size())
                             ? st.scale_of[static_cast<std::size_t>(first - 1)]
                             : 0;
    for (std::uint32_t i = 0; i < sc.tokens; ++i) {
      if (sc.ids[i] < prev)
        return {errc::signal_mismatch, "observe: scale ids must not decrease (token " +
                                           std::to_string(i) + " has scale " +
                                           std::to_string(sc.ids[i]) + " after scale " +
                                           std::to_string(prev) + ")"};
      prev = sc.ids[i];
    }
    const std::uint32_t cur = sc.ids[sc.tokens - 1];
    std::uint32_t len = 0;
    while (len < sc.tokens && sc.ids[sc.tokens - 1 - len] == cur) ++len;
    if (cur >= cfg_.scales)
      return {errc::signal_mismatch, "observe: scale " + std::to_string(cur) + " but the model has " +
                                         std::to_string(cfg_.scales) + " scales"};
    if ((sc.grid_h || sc.grid_w) && std::uint64_t{sc.grid_h} * sc.grid_w != len)
      return {errc::shape_mismatch, "observe: grid " + std::to_string(sc.grid_h) + "x" +
                                        std::to_string(sc.grid_w) + " but scale " +
                                        std::to_string(cur) + " has " + std::to_string(len) +
                                        " tokens"};
    if (q.queries != len)
      return {errc::shape_mismatch, "observe: " + std::to_string(q.queries) +
                                        " queries but scale " + std::to_string(cur) + " has " +
                                        std::to_string(len) + " tokens (one query per token)"};
    queries_to_float(q, st.query_heads, keys.head_dim, qf_);
    for (std::size_t i = 0; i < qf_.size(); ++i)
      if (!std::isfinite(qf_[i]))
        return {errc::invalid_argument, "observe: query value " + std::to_string(i) +
                                            " is not finite"};

    // ---- commit
    st.scale_of.resize(static_cast<std::size_t>(st.next), 0);
    for (std::uint32_t i = 0; i < sc.tokens; ++i)
      st.scale_of[static_cast<std::size_t>(first + i)] = sc.ids[i];
    st.scored = false;
    const std::uint32_t H = t.heads();
    std::uint32_t n = 0;
    for (std::uint32_t h = 0; h < H; ++h) n = std::max(n, t.live(h));
    if (!st.reached_base && n <= cfg_.base_capacity) return {};
    st.reached_base = true;
    st.cap = cap_after(cur, st.layer);
    if (cur + 1 >= cfg_.scales) st.reached_base = false;  // next image starts fresh
    if (n <= st.cap) return {};

    const std::int64_t start = st.next - len;
    observation_positions(start, len, sc.grid_h, sc.grid_w, st.obs);
    const std::uint32_t R = t.rows(), D = keys.head_dim, G = st.query_heads / H;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const float ninf = -std::numeric_limits<float>::infinity();
    // Observation rows in (observation, query head) order, scored in chunks of ~1M logits.
    const auto nq = static_cast<std::uint32_t>(st.obs.size()) * G;
    const std::uint32_t chunk =
        std::max<std::uint32_t>(1, std::min<std::uint32_t>(nq, (1u << 20) / std::max(R, 1u)));
    scr_.folded.resize(R);
    scr_.logits.resize(std::size_t{chunk} * R);
    scr_.qptr.resize(chunk);
    scr_.qmax.assign(chunk, std::numeric_limits<std::int64_t>::max());  // no causal mask
    for (std::uint32_t h = 0; h < H; ++h) {
      std::fill(scr_.folded.begin(), scr_.folded.end(), 0.0f);
      for (std::uint32_t c0 = 0; c0 < nq; c0 += chunk) {
        const std::uint32_t cn = std::min(chunk, nq - c0);
        for (std::uint32_t i = 0; i < cn; ++i) {
          const auto qi = static_cast<std::uint32_t>(st.obs[(c0 + i) / G] - start);
          const std::uint32_t g = (c0 + i) % G;
          scr_.qptr[i] = qf_.data() + (std::size_t{qi} * st.query_heads + h * G + g) * D;
        }
        block_logits(scr_.qptr.data(), scr_.qmax.data(), cn, keys, t, h, scale, scr_,
                     scr_.logits.data());
        for (std::uint32_t i = 0; i < cn; ++i) {
          float* l = scr_.logits.data() + std::size_t{i} * R;
          if (cfg_.softmax) softmax_inplace(l, R);
          for (std::uint32_t s = 0; s < R; ++s)
            if (t.position(s, h) >= 0) scr_.folded[s] += l[s];
        }
      }
      if (G > 1)
        for (auto& x : scr_.folded) x /= static_cast<float>(G);
      slots_in_position_order(t, h, st.next, scr_);
      scr_.seq.resize(scr_.order.size());
      for (std::size_t i = 0; i < scr_.order.size(); ++i) {
        const std::int32_t p = t.position(scr_.order[i], h);
        scr_.seq[i] = std::binary_search(st.obs.begin(), st.obs.end(), p) ? ninf
                                                                          : scr_.folded[scr_.order[i]];
      }
      pool_in_position_order(scr_, cfg_.kernel, cfg_.pool, st.score[h]);  // seq covers order
    }
    st.scored = true;
    return {};
  }

  //! After a scored scale: min(cache budget, the next scale's cap); otherwise no limit.
  [[nodiscard]] std::uint32_t target(const state& st, const slot_table&, std::uint32_t,
                                     std::uint32_t budget) const noexcept {
    return st.scored ? std::min(budget, st.cap) : std::numeric_limits<std::uint32_t>::max();
  }

  //! The `count` lowest-ranked non-observation tokens of `head`.
  void select(state& st, const slot_table& t, std::uint32_t head, std::uint32_t count,
              std::vector<std::uint32_t>& victims) {
    if (!st.scored) return;
    scr_.cands.clear();
    const auto& sc = st.score[head];
    for (std::uint32_t s = 0; s < t.rows(); ++s) {
      const std::int32_t p = t.position(s, head);
      if (p < 0 || std::binary_search(st.obs.begin(), st.obs.end(), p)) continue;
      scr_.cands.push_back({sc[s], p, s});
    }
    lowest_ranked(scr_.cands, count, victims);
  }

 private:
  scale_aware_config cfg_;
  score_scratch scr_;
  std::vector<float> qf_;
};

static_assert(eviction_policy<scale_aware>);

KVCACHE_NAMESPACE_END
