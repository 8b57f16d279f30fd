// SPDX-License-Identifier: Apache-2.0
//! @file
//! `sentence_kv`: SentenceKV (ALGORITHMS.md §3) as a tiered policy: sentence-level retrieval of
//! the KV from a holding tier, scored by one mean key per sentence kept in the working tier.
//!
//! **Signals** (one joint observe per step and layer, in this order): `query_signal`,
//! `key_signal`, `boundary_signal`. All three describe the same tokens: exactly those appended
//! since the previous observe (the engine appends, then observes them, then evicts; anything
//! else is `shape_mismatch`), so the prompt's observe carries all P queries (SnapKV uses the last
//! `snap.window` of them). Queries and keys must be finite. A failed observe changes nothing.
//! The helpers `sentence_boundary_ids()` and `boundary_flags()` below turn token ids into the
//! boundary flags (the original matches the tokenizer's ids of the boundary strings).
//!
//! **Prompt** (the first observe of a (sequence, layer) state; appends before it may be chunked,
//! but it must cover the whole prompt of P tokens):
//! - the prompt is cut into sentences: a sentence ends *after* each boundary token, or when it
//!   reaches `max_sentence_tokens`; the trailing unfinished part is closed as a sentence too;
//! - if P >= `snap.window`, SnapKV scores the prefix with the last `window` queries (score.hpp,
//!   bitwise what `kvcache::snapkv` computes); at the next plan() of each KV head with budget B,
//!   when P > C = `semantic_factor` × B, the prefix tokens SnapKV would evict (keeping its top
//!   C − window by pooled votes plus the window, ranking as score.hpp) are *pruned*: dropped
//!   without being held, for good;
//! - the retained tokens are the rest; per (sentence, KV head), `mu` = mean of the retained keys
//!   (as cached, after RoPE, read through the key_reader at that plan), in position order.
//!
//! **Decode** (later observes, one or more tokens, in order), per token: its query joins the
//! open-sentence buffer (a running sum per query head), its key (key_signal, fp32) the open
//! sentence's running key sum; on a boundary (or at `max_sentence_tokens`) the sentence closes
//! with mu = the mean of all its keys, and the buffer is cleared. Sentence ids increase by one per
//! sentence (prompt sentences first); the id is the holding tier's group of the (sequence,
//! layer, head).
//!
//! **plan(head h, budget B)**, with n = tokens appended: sinks = positions < start, recent =
//! positions >= n − recent, middle = the rest. Every live retained token of the middle that is
//! not held yet is held in its sentence's group (tokens age out of the recent window in position
//! order; a per-head processed range of positions tracks this). Then:
//! - first-token mode, when the buffer holds <= `length_threshold` queries (the first token of a
//!   sentence, the boundary token itself, and right after the prompt): working set = sinks ∪ recent;
//! - otherwise qbar = the mean of the buffered queries over the tokens and the G query heads of
//!   h's group; sim(s) = <mu[h, s], qbar> (raw dot product) over the closed sentences with held
//!   rows; sentences are walked by descending sim and their held rows collected in row (hold)
//!   order, positions in the middle only, until B − |sinks| − |recent| tokens: the last sentence
//!   may be cut part-way (its first rows). Working set = sinks ∪ recent ∪ selected.
//! Output: hold (as above), drop = live middle slots outside the working set plus pruned slots,
//! fetch = selected rows not live (runs of consecutive rows of one group).
//!
//! **predict()**: under the current buffer's qbar, the rows the walk above reaches that are not
//! live, up to `prefetch_rows` rows beyond the cut (so with one buffered query — the first-token
//! step — the whole selection the next step would fetch; with more, the next-ranked rows beyond
//! the cut), most likely first. Nothing while the next plan is certain to be first-token mode.
//!
//! Defaults are the authors' scripts: start 32, recent 32, length_threshold 1, semantic_factor 3
//! (the class default of the original is 5), SnapKV w = 32, k = 7, max pooling.
//!
//! Deviations from ALGORITHMS.md §3 (and the authors' code), on purpose:
//! - Real offload instead of a boolean mask: tokens outside the working set leave the working tier
//!   (held in sentence groups, or pruned for good) and come back by fetch.
//! - Over-long sentences are capped: a sentence reaching `max_sentence_tokens` (default 100, the
//!   authors' minimum index-list length; 0 = no cap) closes, in the prompt and in decode. The
//!   original pads/truncates the per-sentence index lists instead.
//! - The trailing unfinished part of the prompt is closed as a sentence (so every prompt token can
//!   be retrieved); decode sentences start after the prompt.
//! - Sinks [0, start) and the recent window at the prune are always retained (resident), even
//!   when SnapKV would evict them, and count in mu; the original's mask attends them anyway, its
//!   mu excludes what SnapKV dropped. The SnapKV prune happens at the first plan() (it needs the
//!   cache's budget: C = semantic_factor × that plan's budget), per KV head, over the prompt's
//!   positions (P − C victims, as kvcache::snapkv evicts from a cache holding the prompt).
//! - GQA: statistics are per KV head; qbar is averaged over the G query heads of the group
//!   (ALGORITHMS.md's first GQA option; the original repeat_kv's and works per query head).
//! - Ties of sim: the newer sentence (higher id) ranks first (score.hpp ranks newer tokens first on
//!   equal scores). A NaN sim (overflowed keys) ranks last.
//! - Budgets below start + recent + 1: keep min(start, B/2) sinks and B − that recent tokens, no
//!   retrieval. Should a larger budget come back, held sink/recent tokens are fetched back.
//! - The selection room is B minus the sinks and recent tokens actually kept (the original fixes
//!   it at B − 64; the same whenever n >= start + recent and no recent token was pruned).
//! - Engines observe before they evict. A token that leaves the recent window before it was
//!   observed has no sentence yet: it is dropped without being held (before the first observe,
//!   plan() is StreamingLLM's sinks + recent), so that the head still fits its budget.
//!
//! Cost per decode step and head: O(S·D) similarity plus a sort over S (S = closed sentences with
//! held rows), O(rows) over the head's slots; all scratch lives in the state and is reused, so
//! once warm a step allocates only when the state grows (new sentences, more positions).
//! Different states may be used from different threads at once (`concurrent_calls`); predict()
//! uses the state's scratch too, so it must not run concurrently with another call on the same
//! state.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/signals.hpp>
#include <kvcache/core/slot_table.hpp>
#include <kvcache/evict/policy.hpp>
#include <kvcache/evict/score.hpp>
#include <kvcache/evict/snapkv.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

struct sentence_kv_config {
  std::uint32_t start = 32;             //!< attention sinks: positions [0, start) stay resident
  std::uint32_t recent = 32;            //!< the newest `recent` tokens stay resident
  std::uint32_t length_threshold = 1;   //!< buffers of at most this many queries: no retrieval
  std::uint32_t semantic_factor = 3;    //!< SnapKV keeps semantic_factor × budget prompt tokens
  snapkv_config snap{};                 //!< the prompt's SnapKV scoring (w 32, k 7, max)
  std::uint32_t max_sentence_tokens = 100;  //!< a sentence reaching this closes (0: no cap)
  std::uint32_t prefetch_rows = 64;     //!< predict(): rows beyond the current cut
};

//! The boundary strings of the authors' scripts: `. ! ? ". " "! " "? " ... \n\n \n\n\n 。 ！ ？ 。。`.
inline std::vector<std::string> sentence_boundary_strings() {
  return {".", "!", "?", ". ", "! ", "? ", "...", "\n\n", "\n\n\n",
          "\xE3\x80\x82", "\xEF\xBC\x81", "\xEF\xBC\x9F", "\xE3\x80\x82\xE3\x80\x82"};
}

//! The token ids of the boundary strings: `token_id_of(std::string_view)` returns a string's id,
//! or a negative value when the tokenizer has no single token for it (filtered out, as the
//! original drops unk/None). Sorted, without duplicates.
//! @tparam Lookup callable as `token_id_of(std::string_view)`, returning an integer id
template <class Lookup>
std::vector<std::int32_t> sentence_boundary_ids(Lookup&& token_id_of) {
  std::vector<std::int32_t> ids;
  for (const std::string& s : sentence_boundary_strings()) {
    const auto id = static_cast<std::int64_t>(token_id_of(std::string_view(s)));
    if (id >= 0 && id <= std::numeric_limits<std::int32_t>::max())
      ids.push_back(static_cast<std::int32_t>(id));
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

//! `flags[i] = 1` when `token_ids[i]` is one of `boundary_ids` (any order), else 0: the
//! boundary_signal of those tokens. `flags` has room for token_ids.size() bytes.
inline void boundary_flags(std::span<const std::int32_t> token_ids,
                           std::span<const std::int32_t> boundary_ids, std::uint8_t* flags) {
  for (std::size_t i = 0; i < token_ids.size(); ++i)
    flags[i] = std::find(boundary_ids.begin(), boundary_ids.end(), token_ids[i]) !=
                       boundary_ids.end()
                   ? 1
                   : 0;
}

class sentence_kv {
 public:
  using signals = signal_list<query_signal, key_signal, boundary_signal>;
  //! All scratch is in the state: different sequences may run at once.
  static constexpr bool concurrent_calls = true;

  //! Held rows of one (sentence, head): a linked list through the head's entries, in row order.
  struct held_list {
    std::int32_t first = -1;
    std::int32_t last = -1;
    std::uint32_t rows = 0;
  };

  //! Reused buffers (no meaning across calls).
  struct scratch {
    score_scratch snap;
    std::vector<float> qf, kf;             // converted signals
    std::vector<std::uint64_t> where;      // [position] epoch << 32 | slot, for live positions
    std::vector<std::uint32_t> sel;        // [position] epoch when selected
    std::vector<std::uint32_t> live_slots; // live slots of the head, in slot order
    std::vector<std::uint8_t> pruned;      // [prompt position] during a prune
    std::vector<std::uint32_t> victims;
    std::vector<float> acc, row, qbar;
    std::vector<std::uint32_t> cnt;
    struct ranked {
      float sim;
      std::uint32_t id;
    };
    std::vector<std::vector<ranked>> order;  // [kv_head] the last ranking
    std::vector<std::uint64_t> ranked_at;    // [kv_head] `changes` when it was made
    std::uint32_t epoch = 0;
  };

  //! Per (sequence, layer).
  struct state {
    std::uint32_t kv_heads = 0, query_heads = 0, head_dim = 0;
    std::int64_t next = 0;      //!< tokens appended (next position)
    std::int64_t observed = 0;  //!< tokens grouped into sentences
    bool prompt_seen = false;
    std::uint32_t prompt_tokens = 0;
    // Sentences: ids [0, closed) are closed, `closed` is the open one.
    std::uint32_t closed = 0;
    std::vector<std::uint32_t> sentence_of;  //!< [position] sentence id
    //! [kv_head] mean keys, in blocks of 8 sentences: [s / 8][head_dim][s % 8], so that the
    //! similarity runs across 8 sentences at once while each dot product still sums over d in order.
    std::vector<std::vector<float>> mu;
    std::vector<std::uint64_t> changes;  //!< [kv_head] bumped whenever its ranking may change
    std::vector<held_list> lists;            //!< [sentence][kv_head]
    std::vector<std::vector<std::int32_t>> held_pos;   //!< [kv_head][entry] position
    std::vector<std::vector<std::int32_t>> held_next;  //!< [kv_head][entry] next of its list
    std::vector<std::int64_t> done_lo, done_hi;        //!< [kv_head] positions processed for hold
    // The open sentence: buffered queries and keys as running sums.
    std::uint32_t open_tokens = 0;
    std::vector<float> qsum;  //!< [query_heads][head_dim]
    std::vector<float> ksum;  //!< [kv_heads][head_dim]
    // The prompt's SnapKV votes, until every head has pruned.
    bool snap_scored = false;
    std::uint32_t prefix = 0;                  //!< prompt positions before the window
    std::vector<float> votes;                  //!< [kv_head][prefix] pooled votes by position
    std::vector<std::uint8_t> prune_pending;   //!< [kv_head]
    mutable scratch scr;

    //! Sentences closed so far (the open one excluded).
    [[nodiscard]] std::uint32_t sentences() const noexcept { return closed; }
    //! Element d of the mean key of (sentence, head) (meaningful once closed and, for prompt
    //! sentences, after the head's first plan).
    [[nodiscard]] float& mean_key(std::uint32_t sentence, std::uint32_t head, std::uint32_t d) noexcept {
      return mu[head][(std::size_t{sentence / 8} * head_dim + d) * 8 + sentence % 8];
    }
    [[nodiscard]] float mean_key(std::uint32_t sentence, std::uint32_t head, std::uint32_t d) const noexcept {
      return mu[head][(std::size_t{sentence / 8} * head_dim + d) * 8 + sentence % 8];
    }
    //! Held rows of (sentence, head).
    [[nodiscard]] std::uint32_t held_rows(std::uint32_t sentence, std::uint32_t head) const noexcept {
      return lists[std::size_t{sentence} * kv_heads + head].rows;
    }
  };

  explicit sentence_kv(sentence_kv_config cfg = {}) : cfg_(cfg) {
    if (cfg_.snap.window == 0) raise(errc::invalid_argument, "sentence_kv: snap.window must be > 0");
    if (cfg_.semantic_factor == 0)
      raise(errc::invalid_argument, "sentence_kv: semantic_factor must be > 0");
  }
  [[nodiscard]] const sentence_kv_config& config() const noexcept { return cfg_; }

  [[nodiscard]] state make_state(const policy_context& ctx) const {
    state st;
    st.kv_heads = ctx.geo.kv_heads;
    st.query_heads = ctx.geo.query_heads;
    st.head_dim = ctx.geo.head_dim;
    st.held_pos.resize(st.kv_heads);
    st.mu.resize(st.kv_heads);
    st.changes.assign(st.kv_heads, 1);
    st.scr.order.resize(st.kv_heads);
    st.scr.ranked_at.assign(st.kv_heads, 0);
    st.held_next.resize(st.kv_heads);
    st.done_lo.assign(st.kv_heads, 0);
    st.done_hi.assign(st.kv_heads, 0);
    st.prune_pending.assign(st.kv_heads, 0);
    st.qsum.assign(std::size_t{st.query_heads} * st.head_dim, 0.0f);
    st.ksum.assign(std::size_t{st.kv_heads} * st.head_dim, 0.0f);
    return st;
  }

  void on_append(state& st, const slot_table&, const placement& pl) {
    st.next = pl.first_position + pl.tokens;
  }

  status observe(state& st, const slot_table& t, const key_reader& keys, const query_signal& q,
                 const key_signal& k, const boundary_signal& b) {
    auto& sc = st.scr;
    const std::uint32_t c = q.queries, H = st.kv_heads, QH = st.query_heads, D = st.head_dim;
    if (k.tokens != c || b.tokens != c)
      return {errc::shape_mismatch, "observe: query_signal covers " + std::to_string(c) +
                                        " tokens, key_signal " + std::to_string(k.tokens) +
                                        ", boundary_signal " + std::to_string(b.tokens) +
                                        "; they must describe the same tokens"};
    if (c == 0) return {errc::invalid_argument, "observe: the signals cover no tokens"};
    const std::int64_t pending = st.next - st.observed;
    if (c != pending)
      return {errc::shape_mismatch, "observe: the signals cover " + std::to_string(c) +
                                        " tokens but " + std::to_string(pending) +
                                        " were appended since the last observe (" +
                                        std::to_string(st.next) + " in all)"};
    if (!q.data || !k.data || !b.flags)
      return {errc::invalid_argument, "observe: query, key or boundary data is null"};
    if (keys.head_dim != D)
      return {errc::shape_mismatch, "observe: the key reader has head_dim " +
                                        std::to_string(keys.head_dim) + ", the state " +
                                        std::to_string(D)};
    queries_to_float(q, QH, D, sc.qf);
    for (std::size_t i = 0; i < sc.qf.size(); ++i)
      if (!std::isfinite(sc.qf[i]))
        return {errc::invalid_argument,
                "observe: query value " + std::to_string(i) + " is not finite"};
    const std::size_t nk = std::size_t{c} * H * D;
    sc.kf.resize(nk);
    for (std::size_t i = 0; i < nk; ++i) {
      sc.kf[i] = load_as_float(k.data, i, k.type);
      if (!std::isfinite(sc.kf[i]))
        return {errc::invalid_argument,
                "observe: key value " + std::to_string(i) + " is not finite"};
    }
    // Valid: from here on the state changes.
    for (auto& ch : st.changes) ++ch;
    const auto first = static_cast<std::size_t>(st.observed);
    st.sentence_of.resize(first + c);
    if (!st.prompt_seen) {
      observe_prompt(st, t, keys, b.flags, c);
    } else {
      for (std::uint32_t i = 0; i < c; ++i) {
        st.sentence_of[first + i] = st.closed;
        const float* qi = sc.qf.data() + std::size_t{i} * QH * D;
        const float* ki = sc.kf.data() + std::size_t{i} * H * D;
        for (std::size_t j = 0; j < std::size_t{QH} * D; ++j) st.qsum[j] += qi[j];
        for (std::size_t j = 0; j < std::size_t{H} * D; ++j) st.ksum[j] += ki[j];
        ++st.open_tokens;
        if (b.flags[i] != 0 || st.open_tokens == cfg_.max_sentence_tokens) close_open(st);
      }
    }
    st.observed += c;
    return {};
  }

  //! What `head` holds, drops and fetches so that it keeps at most `budget` tokens (see the file
  //! comment). `out` is appended to (the cache passes it cleared).
  void plan(state& st, const slot_table& t, const key_reader& keys, std::uint32_t head,
            std::uint32_t budget, tier_plan& out) {
    auto& sc = st.scr;
    const bounds bd = bounds_of(st, budget);
    const std::uint32_t ep = stamp_live(st, t, head);
    const bool pruning = st.prune_pending[head] != 0;
    if (pruning) prune_head(st, keys, head, budget, ep);
    auto pruned = [&](std::int64_t p) {
      return pruning && p < st.prompt_tokens && sc.pruned[static_cast<std::size_t>(p)] != 0;
    };
    hold_aged(st, head, bd, ep, pruned, out);
    // Sinks and recent tokens: resident ones stay; held ones come back (after a budget shrink).
    std::uint32_t fixed = 0;
    auto keep_fixed = [&](std::int64_t p) {
      if (is_live(st, p, ep)) {
        fixed += !pruned(p);
      } else if (p < st.observed) {
        const std::uint32_t s = st.sentence_of[static_cast<std::size_t>(p)];
        const std::int32_t row = row_of(st, head, s, p);
        if (row >= 0) {
          add_fetch(out.fetch, s, static_cast<std::uint32_t>(row));
          ++fixed;
        }
      }
    };
    for (std::int64_t p = 0; p < bd.mid_lo; ++p) keep_fixed(p);
    for (std::int64_t p = bd.mid_hi; p < st.next; ++p) keep_fixed(p);
    const std::uint32_t room = budget > fixed ? budget - fixed : 0;
    if (room > 0 && st.open_tokens > cfg_.length_threshold && st.open_tokens > 0) {
      rank(st, head);
      walk(st, head, bd, ep, room, &out.fetch, true);
    }
    for (std::uint32_t s : sc.live_slots) {
      const std::int32_t p = t.position(s, head);
      const bool middle = p >= bd.mid_lo && p < bd.mid_hi;
      if (pruned(p) || (middle && sc.sel[static_cast<std::size_t>(p)] != ep)) out.drop.push_back(s);
    }
  }

  //! Held rows of `head` the next plan() will probably fetch, most likely first, none live.
  void predict(const state& st, const slot_table& t, std::uint32_t head, std::uint32_t budget,
               std::vector<group_rows>& out) const {
    if (!st.prompt_seen || st.prune_pending[head] != 0 || st.open_tokens == 0 ||
        st.open_tokens + 1 <= cfg_.length_threshold)
      return;
    const bounds bd = bounds_of(st, budget);
    const std::uint32_t ep = stamp_live(st, t, head);
    std::uint32_t fixed = 0;
    for (std::int64_t p = 0; p < bd.mid_lo; ++p) fixed += is_live(st, p, ep);
    for (std::int64_t p = bd.mid_hi; p < st.next; ++p) fixed += is_live(st, p, ep);
    const std::uint32_t room = budget > fixed ? budget - fixed : 0;
    if (room == 0) return;
    rank(st, head);
    walk(st, head, bd, ep, room + cfg_.prefetch_rows, &out, false);
  }

 private:
  struct bounds {
    std::int64_t mid_lo = 0;  // sinks are [0, mid_lo)
    std::int64_t mid_hi = 0;  // recent are [mid_hi, next)
  };

  [[nodiscard]] bounds bounds_of(const state& st, std::uint32_t budget) const noexcept {
    std::uint64_t sinks = cfg_.start, recent = cfg_.recent;
    if (std::uint64_t{budget} < sinks + recent + 1) {
      sinks = std::min<std::uint64_t>(cfg_.start, budget / 2);
      recent = budget - sinks;
    }
    bounds b;
    b.mid_lo = std::min<std::int64_t>(static_cast<std::int64_t>(sinks), st.next);
    b.mid_hi = std::max(st.next - static_cast<std::int64_t>(recent), b.mid_lo);
    return b;
  }

  //! Marks the live positions of `head` (scr.where) with a fresh epoch, which it returns.
  static std::uint32_t stamp_live(const state& st, const slot_table& t, std::uint32_t head) {
    auto& sc = st.scr;
    const auto n = static_cast<std::size_t>(st.next);
    if (sc.where.size() < n) sc.where.resize(n, 0);
    if (sc.sel.size() < n) sc.sel.resize(n, 0);
    if (++sc.epoch == 0) {
      std::fill(sc.where.begin(), sc.where.end(), 0);
      std::fill(sc.sel.begin(), sc.sel.end(), 0);
      sc.epoch = 1;
    }
    const std::uint64_t tag = std::uint64_t{sc.epoch} << 32;
    const std::uint32_t R = t.rows();
    sc.live_slots.clear();
    for (std::uint32_t s = 0; s < R; ++s) {
      const std::int32_t p = t.position(s, head);
      if (p >= 0 && p < st.next) {
        sc.where[static_cast<std::size_t>(p)] = tag | s;
        sc.live_slots.push_back(s);
      }
    }
    return sc.epoch;
  }
  static bool is_live(const state& st, std::int64_t p, std::uint32_t ep) noexcept {
    return (st.scr.where[static_cast<std::size_t>(p)] >> 32) == ep;
  }
  static std::uint32_t slot_of(const state& st, std::int64_t p) noexcept {
    return static_cast<std::uint32_t>(st.scr.where[static_cast<std::size_t>(p)]);
  }

  //! Opens a new (empty) sentence: its mu entries and held lists.
  static void new_sentence(state& st) {
    const std::size_t s = st.lists.size() / st.kv_heads;  // its id
    if (s % 8 == 0)
      for (auto& m : st.mu) m.resize(m.size() + std::size_t{st.head_dim} * 8, 0.0f);
    st.lists.resize(st.lists.size() + st.kv_heads);
  }

  //! Closes the open sentence with mu = mean of its keys, clears the buffer, opens the next.
  void close_open(state& st) const {
    const float cnt = static_cast<float>(st.open_tokens);
    for (std::uint32_t h = 0; h < st.kv_heads; ++h)
      for (std::uint32_t d = 0; d < st.head_dim; ++d)
        st.mean_key(st.closed, h, d) = st.ksum[std::size_t{h} * st.head_dim + d] / cnt;
    std::fill(st.ksum.begin(), st.ksum.end(), 0.0f);
    std::fill(st.qsum.begin(), st.qsum.end(), 0.0f);
    st.open_tokens = 0;
    ++st.closed;
    new_sentence(st);
  }

  void observe_prompt(state& st, const slot_table& t, const key_reader& keys,
                      const std::uint8_t* flags, std::uint32_t P) {
    auto& sc = st.scr;
    const std::uint32_t H = st.kv_heads;
    st.prompt_seen = true;
    st.prompt_tokens = P;
    new_sentence(st);
    std::uint32_t len = 0;
    for (std::uint32_t i = 0; i < P; ++i) {
      st.sentence_of[i] = st.closed;
      ++len;
      if (flags[i] != 0 || len == cfg_.max_sentence_tokens) {
        ++st.closed;
        new_sentence(st);
        len = 0;
      }
    }
    if (len > 0) {
      ++st.closed;
      new_sentence(st);
    }
    std::fill(st.prune_pending.begin(), st.prune_pending.end(), 1);
    const std::uint32_t w = cfg_.snap.window;
    if (P < w) return;
    // SnapKV's votes, exactly as kvcache::snapkv computes them, kept by position.
    probabilities_from_queries(sc.qf.data(), P, st.query_heads, t, st.next, keys, head_fold::mean,
                               sc.snap, P - w);
    st.snap_scored = true;
    st.prefix = P - w;
    st.votes.assign(std::size_t{H} * st.prefix, 0.0f);
    const std::uint32_t R = t.rows();
    for (std::uint32_t h = 0; h < H; ++h) {
      slots_in_position_order(t, h, st.next, sc.snap);
      const float* v = sc.snap.folded.data() + std::size_t{h} * R;
      sc.snap.seq.clear();
      for (std::uint32_t s : sc.snap.order) {
        if (t.position(s, h) >= static_cast<std::int32_t>(st.prefix)) break;  // by position
        sc.snap.seq.push_back(v[s]);
      }
      sc.snap.pooled.resize(sc.snap.seq.size());
      pool1d(sc.snap.seq.data(), sc.snap.seq.size(), cfg_.snap.kernel, cfg_.snap.pool,
             sc.snap.pooled.data());
      for (std::size_t i = 0; i < sc.snap.seq.size(); ++i)
        st.votes[std::size_t{h} * st.prefix +
                 static_cast<std::size_t>(t.position(sc.snap.order[i], h))] = sc.snap.pooled[i];
    }
  }

  //! The head's first plan after the prompt: SnapKV's victims (scr.pruned), and the prompt
  //! sentences' mean keys over the retained tokens.
  void prune_head(state& st, const key_reader& keys, std::uint32_t head, std::uint32_t budget,
                  std::uint32_t ep) const {
    auto& sc = st.scr;
    const std::uint32_t P = st.prompt_tokens, D = st.head_dim;
    ++st.changes[head];
    sc.pruned.assign(P, 0);
    const std::uint64_t C = std::uint64_t{cfg_.semantic_factor} * budget;
    if (st.snap_scored && P > C) {
      auto& cands = sc.snap.cands;
      cands.clear();
      const float* v = st.votes.data() + std::size_t{head} * st.prefix;
      for (std::uint32_t p = 0; p < st.prefix; ++p)
        if (is_live(st, p, ep))
          cands.push_back({v[p], static_cast<std::int32_t>(p), slot_of(st, p)});
      sc.victims.clear();
      lowest_ranked(cands, static_cast<std::size_t>(P - C), sc.victims);
      // Sinks and the recent window stay (deviation, see the file comment).
      const std::int64_t recent_from = st.next - static_cast<std::int64_t>(cfg_.recent);
      for (std::size_t i = 0; i < sc.victims.size(); ++i) {
        // lowest_ranked() sorted the victims first in cands: their positions are there.
        const std::int64_t p = cands[i].position;
        if (p >= cfg_.start && p < recent_from) sc.pruned[static_cast<std::size_t>(p)] = 1;
      }
    }
    // mu of the prompt sentences: mean of the retained keys, in position order.
    std::uint32_t S = 0;
    if (P > 0) S = st.sentence_of[P - 1] + 1;
    sc.acc.assign(std::size_t{S} * D, 0.0f);
    sc.cnt.assign(S, 0);
    sc.row.resize(D);
    for (std::uint32_t p = 0; p < P; ++p) {
      if (!is_live(st, p, ep) || sc.pruned[p] != 0) continue;
      keys.read(head, slot_of(st, p), 1, sc.row.data());
      const std::uint32_t s = st.sentence_of[p];
      float* a = sc.acc.data() + std::size_t{s} * D;
      for (std::uint32_t d = 0; d < D; ++d) a[d] += sc.row[d];
      ++sc.cnt[s];
    }
    for (std::uint32_t s = 0; s < S; ++s) {
      const float* a = sc.acc.data() + std::size_t{s} * D;
      const float cnt = static_cast<float>(sc.cnt[s]);
      for (std::uint32_t d = 0; d < D; ++d) st.mean_key(s, head, d) = sc.cnt[s] ? a[d] / cnt : 0.0f;
    }
    st.prune_pending[head] = 0;
    if (std::find(st.prune_pending.begin(), st.prune_pending.end(), 1) == st.prune_pending.end()) {
      std::vector<float>().swap(st.votes);  // every head pruned: the votes are done with
    }
  }

  //! Holds every live, retained, observed token of [mid_lo, mid_hi) not processed before (an
  //! unobserved one is dropped by the plan, for good).
  template <class Pruned>
  void hold_aged(state& st, std::uint32_t head, const bounds& bd, std::uint32_t ep,
                 const Pruned& pruned, tier_plan& out) const {
    if (bd.mid_hi <= bd.mid_lo) return;
    auto& lo = st.done_lo[head];
    auto& hi = st.done_hi[head];
    auto process = [&](std::int64_t a, std::int64_t b) {
      for (std::int64_t p = a; p < b; ++p) {
        if (p >= st.observed || !is_live(st, p, ep) || pruned(p)) continue;
        const std::uint32_t s = st.sentence_of[static_cast<std::size_t>(p)];
        append_held(st, head, s, static_cast<std::int32_t>(p));
        out.hold.push_back({slot_of(st, p), s});
        ++st.changes[head];
      }
    };
    if (lo >= hi) {
      process(bd.mid_lo, bd.mid_hi);
      lo = bd.mid_lo;
      hi = bd.mid_hi;
      return;
    }
    // The processed positions stay one interval: the hull (tokens in a gap are held early,
    // which only copies them).
    const std::int64_t nlo = std::min(lo, bd.mid_lo), nhi = std::max(hi, bd.mid_hi);
    process(nlo, lo);
    process(hi, nhi);
    lo = nlo;
    hi = nhi;
  }

  static void append_held(state& st, std::uint32_t head, std::uint32_t s, std::int32_t p) {
    auto& pos = st.held_pos[head];
    auto& nxt = st.held_next[head];
    const auto e = static_cast<std::int32_t>(pos.size());
    pos.push_back(p);
    nxt.push_back(-1);
    auto& l = st.lists[std::size_t{s} * st.kv_heads + head];
    if (l.last >= 0) nxt[static_cast<std::size_t>(l.last)] = e;
    else l.first = e;
    l.last = e;
    ++l.rows;
  }

  //! The row of position p in its sentence's group for `head`, or -1 when not held.
  static std::int32_t row_of(const state& st, std::uint32_t head, std::uint32_t s, std::int64_t p) {
    const auto& l = st.lists[std::size_t{s} * st.kv_heads + head];
    std::int32_t row = 0;
    for (std::int32_t e = l.first; e >= 0; e = st.held_next[head][static_cast<std::size_t>(e)], ++row)
      if (st.held_pos[head][static_cast<std::size_t>(e)] == p) return row;
    return -1;
  }

  static void add_fetch(std::vector<group_rows>& out, std::uint32_t group, std::uint32_t row) {
    if (!out.empty() && out.back().group == group && out.back().first + out.back().count == row)
      ++out.back().count;
    else
      out.push_back({group, row, 1});
  }

  //! Ranks the closed sentences with held rows of `head` by <mu, qbar> (scr.order[head]),
  //! descending; ties: the newer sentence first. Reused while nothing it depends on changed
  //! (predict() after plan()).
  static void rank(const state& st, std::uint32_t head) {
    auto& sc = st.scr;
    if (sc.ranked_at[head] == st.changes[head]) return;
    const std::uint32_t D = st.head_dim, G = st.query_heads / st.kv_heads, H = st.kv_heads;
    sc.qbar.resize(D);
    const float div = static_cast<float>(st.open_tokens) * static_cast<float>(G);
    for (std::uint32_t d = 0; d < D; ++d) {
      float a = 0.0f;
      for (std::uint32_t g = 0; g < G; ++g) a += st.qsum[(std::size_t{head} * G + g) * D + d];
      sc.qbar[d] = a / div;
    }
    auto& order = sc.order[head];
    order.clear();
    for (std::uint32_t b0 = 0; b0 < st.closed; b0 += 8) {
      const std::uint32_t bn = std::min<std::uint32_t>(8, st.closed - b0);
      bool any = false;
      for (std::uint32_t j = 0; j < bn; ++j) any |= st.lists[std::size_t{b0 + j} * H + head].rows != 0;
      if (!any) continue;
      // 8 dot products at once, each summed over d in order (bitwise the plain loop's result).
      const float* m = st.mu[head].data() + std::size_t{b0 / 8} * D * 8;
      float acc[8] = {};
      for (std::uint32_t d = 0; d < D; ++d) {
        const float q = sc.qbar[d];
        for (std::uint32_t j = 0; j < 8; ++j) acc[j] += m[std::size_t{d} * 8 + j] * q;
      }
      for (std::uint32_t j = 0; j < bn; ++j) {
        if (st.lists[std::size_t{b0 + j} * H + head].rows == 0) continue;
        const float sim = std::isnan(acc[j]) ? -std::numeric_limits<float>::infinity() : acc[j];
        order.push_back({sim, b0 + j});
      }
    }
    std::sort(order.begin(), order.end(), [](const scratch::ranked& a, const scratch::ranked& b) {
      return a.sim > b.sim || (a.sim == b.sim && a.id > b.id);
    });
    sc.ranked_at[head] = st.changes[head];
  }

  //! Walks the ranked sentences' held rows (middle positions only) until `limit` are taken.
  //! `selecting`: marks them (scr.sel) and emits the non-live ones to `fetch` (plan); otherwise
  //! only emits the non-live ones (predict).
  static void walk(const state& st, std::uint32_t head, const bounds& bd, std::uint32_t ep,
                   std::uint32_t limit, std::vector<group_rows>* fetch, bool selecting) {
    auto& sc = st.scr;
    std::uint32_t taken = 0;
    for (const auto& r : sc.order[head]) {
      const auto& l = st.lists[std::size_t{r.id} * st.kv_heads + head];
      std::uint32_t row = 0;
      for (std::int32_t e = l.first; e >= 0 && taken < limit;
           e = st.held_next[head][static_cast<std::size_t>(e)], ++row) {
        const std::int64_t p = st.held_pos[head][static_cast<std::size_t>(e)];
        if (p < bd.mid_lo || p >= bd.mid_hi) continue;
        ++taken;
        if (selecting) sc.sel[static_cast<std::size_t>(p)] = ep;
        if (!is_live(st, p, ep)) add_fetch(*fetch, r.id, row);
      }
      if (taken >= limit) break;
    }
  }

  sentence_kv_config cfg_;
};

static_assert(eviction_policy<sentence_kv>);
static_assert(tiered_policy<sentence_kv>);
static_assert(predicts_fetches<sentence_kv>);

KVCACHE_NAMESPACE_END
