// SPDX-License-Identifier: Apache-2.0
//! @file
//! Shared machinery of the attention-score policies (H2O, SnapKV, ScaleKV): folding query heads
//! onto their KV head, validating scores, computing probabilities from queries against the cached
//! keys (for engines whose kernel never materializes them, e.g. FlashAttention), 1-D pooling, and
//! choosing the lowest-ranked slots of a head.
//!
//! **Ranking (all policies).** A token outranks another when its score is higher, or the scores
//! are equal and its position is higher (newer). Victims are the lowest-ranked candidates, so
//! on equal scores the older token goes first. Every selection here follows this total order, so
//! kept sets are deterministic and testable against a direct re-implementation.
//!
//! Hot paths allocate nothing once warm: scratch lives in `score_scratch`, reused across calls.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/signals.hpp>
#include <kvcache/core/slot_table.hpp>
#include <kvcache/evict/policy.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

//! How query heads of a GQA group fold onto their KV head.
enum class head_fold : std::uint8_t {
  sum,   //!< H2O: accumulated attention is additive
  mean,  //!< SnapKV/ScaleKV, as NVIDIA kvpress does (SnapKV issue #22)
};

//! 1-D pooling of a score sequence (in position order), kernel k, padding k/2, stride 1.
enum class pooling : std::uint8_t {
  none,
  max,  //!< PyTorch max_pool1d: padding never wins (acts as -inf)
  avg,  //!< PyTorch avg_pool1d, count_include_pad=True: zeros padded, always divided by k
};

//! One selectable slot of a head.
struct scored_slot {
  float score;
  std::int32_t position;
  std::uint32_t slot;
};

//! True when a ranks below b (a is evicted first): lower score, then older position.
inline bool ranks_below(const scored_slot& a, const scored_slot& b) noexcept {
  return a.score < b.score || (a.score == b.score && a.position < b.position);
}

//! Scratch reused across calls (kept in a policy object; never shared between threads).
struct score_scratch {
  std::vector<float> keys;     //!< decoded keys of one head (or of a block of rows)
  std::vector<float> keys_t;   //!< a block of keys transposed, `[head_dim][64]`
  std::vector<const float*> qptr;
  std::vector<std::int64_t> qmax;
  std::vector<float> folded;   //!< `[kv_heads][rows]` folded scores of one step
  std::vector<float> logits;   //!< `[rows]`
  std::vector<std::uint32_t> order;  //!< live slots of a head in position order
  std::vector<float> seq;      //!< scores in position order, and pooled
  std::vector<float> pooled;
  std::vector<scored_slot> cands;
  std::vector<std::int32_t> slot_of_pos;
};

namespace evict_detail {

//! True when x is a usable score: finite and not negative (NaN fails too).
inline bool good_score(float x) noexcept {
  return x >= 0.0f && x <= std::numeric_limits<float>::max();
}

inline status bad_value(const char* what, std::size_t at, float x) {
  return {errc::invalid_argument, std::string("observe: ") + what + " has a " +
                                      (std::isnan(x) ? "NaN" : (x < 0 ? "negative" : "infinite")) +
                                      " value (" + std::to_string(x) + ") at index " +
                                      std::to_string(at) + "; scores must be finite and >= 0"};
}

}  // namespace evict_detail

//! Folds `[query_heads][queries][slots]` probabilities onto `[kv_heads][slots]` (sum or mean over
//! the group and summed over the queries) into `out`, validating every value first-and-only-pass:
//! returns invalid_argument naming the first bad value (NaN, negative, infinite); `out` is then
//! unspecified but nothing else changed.
inline status fold_probabilities(const float* p, std::uint32_t query_heads, std::uint32_t queries,
                                 std::uint32_t slots, std::uint32_t kv_heads, head_fold fold,
                                 std::vector<float>& out, const char* what = "attention",
                                 std::uint32_t first_query = 0) {
  const std::uint32_t G = query_heads / kv_heads;
  out.assign(std::size_t{kv_heads} * slots, 0.0f);
  bool bad = false;
  for (std::uint32_t qh = 0; qh < query_heads; ++qh) {
    float* o = out.data() + std::size_t{qh / G} * slots;
    for (std::uint32_t t = first_query; t < queries; ++t) {
      const float* row = p + (std::size_t{qh} * queries + t) * slots;
      bool b = false;
      for (std::uint32_t s = 0; s < slots; ++s) {
        const float x = row[s];
        b |= !(x >= 0.0f && x <= std::numeric_limits<float>::max());
        o[s] += x;
      }
      bad |= b;
    }
  }
  if (bad) {
    const std::size_t n = std::size_t{query_heads} * queries * slots;
    for (std::size_t i = 0; i < n; ++i)
      if (!evict_detail::good_score(p[i])) return evict_detail::bad_value(what, i, p[i]);
  }
  if (fold == head_fold::mean && G > 1) {
    const float inv = 1.0f / static_cast<float>(G);
    for (auto& x : out) x *= inv;
  }
  return {};
}

//! The plain form of block_logits() for one query: logits q·k·scale over rows [0, rows) of the decoded keys in `scr.keys` into `out`; rows whose
//! slot is empty in `head`, or holds a position after `max_position`, get -inf.
inline void query_logits(const float* q, std::uint32_t head_dim, const slot_table& t,
                         std::uint32_t head, std::int64_t max_position, float scale,
                         const std::vector<float>& keys, float* out) {
  const std::uint32_t R = t.rows();
  const float ninf = -std::numeric_limits<float>::infinity();
  for (std::uint32_t s = 0; s < R; ++s) {
    const std::int32_t pos = t.position(s, head);
    if (pos < 0 || pos > max_position) {
      out[s] = ninf;
      continue;
    }
    const float* k = keys.data() + std::size_t{s} * head_dim;
    float dot = 0.0f;
    for (std::uint32_t d = 0; d < head_dim; ++d) dot += q[d] * k[d];
    out[s] = dot * scale;
  }
}

//! In-place softmax over `n` logits (-inf entries become 0). fp32, max-subtracted.
//! Never yields NaN, so scores built from it stay ordered: a NaN logit (a key the engine stored
//! as NaN, which passthrough accepts) gets no weight, and when logits overflowed to +inf those
//! share the mass equally (found by fuzz/: NaN scores broke victim selection's ordering).
inline void softmax_inplace(float* x, std::uint32_t n) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  float mx = -inf;
  for (std::uint32_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) x[i] = -inf;
    mx = std::max(mx, x[i]);
  }
  if (!(mx > -inf)) {
    std::fill_n(x, n, 0.0f);
    return;
  }
  if (mx == inf) {
    std::uint32_t top = 0;
    for (std::uint32_t i = 0; i < n; ++i) top += x[i] == inf;
    const float share = 1.0f / static_cast<float>(top);
    for (std::uint32_t i = 0; i < n; ++i) x[i] = x[i] == inf ? share : 0.0f;
    return;
  }
  float sum = 0.0f;
  for (std::uint32_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);  // exp(-inf) = 0
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (std::uint32_t i = 0; i < n; ++i) x[i] *= inv;
}

//! Converts query_signal data to fp32 `[queries][query_heads][head_dim]`.
inline void queries_to_float(const query_signal& q, std::uint32_t query_heads,
                             std::uint32_t head_dim, std::vector<float>& out) {
  const std::size_t n = std::size_t{q.queries} * query_heads * head_dim;
  out.resize(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = load_as_float(q.data, i, q.type);
}

//! Logits `out[p][s] = (q_p · k_s) * scale` for `nq` query rows `qs[p]` against rows [0, rows)
//! of `head`; slots that are empty, or hold a position after `max_pos[p]`, get -inf.
//! Keys are decoded in blocks of 64 rows and transposed, so the inner loop runs across rows
//! (vectorized) while each row's dot product still sums over d in order: the result is bitwise
//! the same as the plain per-row loop (query_logits(), reference::attention) and is read from
//! cache once per block for all query rows.
inline void block_logits(const float* const* qs, const std::int64_t* max_pos, std::uint32_t nq,
                         const key_reader& keys, const slot_table& t, std::uint32_t head,
                         float scale, score_scratch& scr, float* out) {
  constexpr std::uint32_t B = 64;
  const std::uint32_t D = keys.head_dim, R = t.rows(), H = t.heads();
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::int32_t* pos = t.positions();
  scr.keys.resize(std::size_t{B} * D);
  scr.keys_t.assign(std::size_t{B} * D, 0.0f);
  for (std::uint32_t b0 = 0; b0 < R; b0 += B) {
    const std::uint32_t bn = std::min(B, R - b0);
    keys.read(head, b0, bn, scr.keys.data());
    float* kt = scr.keys_t.data();
    for (std::uint32_t j = 0; j < bn; ++j)
      for (std::uint32_t d = 0; d < D; ++d) kt[std::size_t{d} * B + j] = scr.keys[std::size_t{j} * D + d];
    for (std::uint32_t j = bn; j < B; ++j)
      for (std::uint32_t d = 0; d < D; ++d) kt[std::size_t{d} * B + j] = 0.0f;
    for (std::uint32_t p = 0; p < nq; ++p) {
      const float* q = qs[p];
      float acc[B] = {};
      for (std::uint32_t d = 0; d < D; ++d) {
        const float qd = q[d];
        const float* row = kt + std::size_t{d} * B;
        for (std::uint32_t j = 0; j < B; ++j) acc[j] += qd * row[j];
      }
      float* o = out + std::size_t{p} * R + b0;
      for (std::uint32_t j = 0; j < bn; ++j) {
        const std::int32_t ps = pos[std::size_t{b0 + j} * H + head];
        o[j] = (ps < 0 || ps > max_pos[p]) ? ninf : acc[j] * scale;
      }
    }
  }
}

//! Signal (c): the attention probabilities of the step recomputed from its queries against the
//! cached keys (softmax(q·Kᵀ/√D), causal by position: query t of the signal sits at position
//! `next_position - queries + t`), folded per KV head into `scr.folded` `[kv_heads][rows]`. This
//! is what makes H2O usable with FlashAttention. Queries must already be fp32 (`qf`).
//! Only queries [first_query, queries) are used (SnapKV's window).
inline void probabilities_from_queries(const float* qf, std::uint32_t queries,
                                       std::uint32_t query_heads, const slot_table& t,
                                       std::int64_t next_position, const key_reader& keys,
                                       head_fold fold, score_scratch& scr,
                                       std::uint32_t first_query = 0) {
  const std::uint32_t H = t.heads(), G = query_heads / H, D = keys.head_dim, R = t.rows();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  scr.folded.assign(std::size_t{H} * R, 0.0f);
  // Query rows in (query head, query) order, as fold_probabilities() folds an engine's
  // probabilities: both give bitwise the same scores for the same probabilities. Rows are
  // scored in chunks (one pass over the keys per chunk) of at most ~1M logits.
  const std::uint32_t nq = (queries - first_query) * G;
  const std::uint32_t chunk = std::max<std::uint32_t>(1, std::min<std::uint32_t>(nq, (1u << 20) / std::max(R, 1u)));
  scr.qptr.resize(chunk);
  scr.qmax.resize(chunk);
  scr.logits.resize(std::size_t{chunk} * R);
  for (std::uint32_t h = 0; h < H; ++h) {
    float* o = scr.folded.data() + std::size_t{h} * R;
    for (std::uint32_t c0 = 0; c0 < nq; c0 += chunk) {
      const std::uint32_t cn = std::min(chunk, nq - c0);
      for (std::uint32_t i = 0; i < cn; ++i) {
        const std::uint32_t g = (c0 + i) / (queries - first_query);
        const std::uint32_t qi = first_query + (c0 + i) % (queries - first_query);
        scr.qptr[i] = qf + (std::size_t{qi} * query_heads + h * G + g) * D;
        scr.qmax[i] = next_position - queries + qi;
      }
      block_logits(scr.qptr.data(), scr.qmax.data(), cn, keys, t, h, scale, scr,
                   scr.logits.data());
      for (std::uint32_t i = 0; i < cn; ++i) {
        float* l = scr.logits.data() + std::size_t{i} * R;
        softmax_inplace(l, R);
        for (std::uint32_t s = 0; s < R; ++s) o[s] += l[s];
      }
    }
    if (fold == head_fold::mean && G > 1) {
      const float inv = 1.0f / static_cast<float>(G);
      for (std::uint32_t s = 0; s < R; ++s) o[s] *= inv;
    }
  }
}

//! Pools `in[0, n)` into `out[0, n)`: kernel k (odd), padding k/2, stride 1. For max, padded
//! cells never win; for avg, they count as zeros and the divisor is always k (PyTorch defaults,
//! which SnapKV and ScaleKV use). k <= 1 or pooling::none copies.
inline void pool1d(const float* in, std::size_t n, std::uint32_t k, pooling p, float* out) {
  if (p == pooling::none || k <= 1) {
    std::copy_n(in, n, out);
    return;
  }
  const std::size_t r = k / 2;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t lo = i >= r ? i - r : 0, hi = std::min(n, i + r + 1);
    if (p == pooling::max) {
      float m = in[lo];
      for (std::size_t j = lo + 1; j < hi; ++j) m = std::max(m, in[j]);
      out[i] = m;
    } else {
      float s = 0.0f;
      for (std::size_t j = lo; j < hi; ++j) s += in[j];
      out[i] = s / static_cast<float>(k);
    }
  }
}

//! Live slots of `head` in position order, into scr.order (counting sort by position).
inline void slots_in_position_order(const slot_table& t, std::uint32_t head,
                                    std::int64_t next_position, score_scratch& scr) {
  scr.slot_of_pos.assign(static_cast<std::size_t>(next_position), -1);
  for (std::uint32_t s = 0; s < t.rows(); ++s) {
    const std::int32_t p = t.position(s, head);
    if (p >= 0) scr.slot_of_pos[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(s);
  }
  scr.order.clear();
  for (std::int32_t s : scr.slot_of_pos)
    if (s >= 0) scr.order.push_back(static_cast<std::uint32_t>(s));
}

//! Pools scr.seq (scores of the first scr.seq.size() slots of scr.order, i.e. in position order)
//! with `pool1d` and writes the result back to those slots of `out` (indexed by slot): pooling
//! runs along positions, as the papers' 1-D pools over the sequence do.
inline void pool_in_position_order(score_scratch& scr, std::uint32_t kernel, pooling p,
                                   std::vector<float>& out) {
  scr.pooled.resize(scr.seq.size());
  pool1d(scr.seq.data(), scr.seq.size(), kernel, p, scr.pooled.data());
  for (std::size_t i = 0; i < scr.seq.size(); ++i) out[scr.order[i]] = scr.pooled[i];
}

//! Appends to `victims` the `count` lowest-ranked entries of `cands` (all of them when fewer),
//! in ascending rank. O(n) selection (nth_element), then a sort of the victims only.
inline void lowest_ranked(std::vector<scored_slot>& cands, std::size_t count,
                          std::vector<std::uint32_t>& victims) {
  count = std::min(count, cands.size());
  if (count == 0) return;
  if (count < cands.size())
    std::nth_element(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(count - 1),
                     cands.end(), ranks_below);
  std::sort(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(count), ranks_below);
  for (std::size_t i = 0; i < count; ++i) victims.push_back(cands[i].slot);
}

KVCACHE_NAMESPACE_END
