// SPDX-License-Identifier: Apache-2.0
//! @file
//! `episodic`: EpiCache, episodic KV caching for long conversations (ALGORITHMS.md §4; Apple,
//! arXiv 2509.17396, reference code apple/ml-epicache@b742661).
//!
//! What this header holds, and what stays with the engine:
//! - **The eviction policy** `episodic`, used during the block-wise prefill of one episode:
//!   ```
//!   for each chunk:  append(chunk) to every layer
//!                    observe(probe_signal = the episode's patch queries) per layer
//!                    evict(seq)
//!   score[h][tok] = max over (query heads of h's GQA group, patch queries) of
//!                   softmax(q · K_h^T / sqrt(D))[tok]        # over h's cached live tokens only
//!   pair (default): per layer, keep the global top-(M_l · Hk) over all heads' tokens
//!                   -> uneven per-head lengths (layer_view::live[h])
//!   pair_uniform:   keep the top-M_l tokens of each head
//!   ```
//!   M_l is the cache's budget of the layer (`cache::set_budget(layer, M_l)`, or
//!   `apply_layer_budgets`). Scores are recomputed from scratch at every observe (no
//!   accumulation across chunks, as KVzip/EpiCache do). Without a fresh observe since the last
//!   append, `target()` answers "no limit": decode never evicts (spec step 6).
//! - **Episodes**: `kmeans` (k-means++ init, Lloyd, best of n_init, as sklearn's KMeans),
//!   `cluster_episodes` (L2-normalised window embeddings -> E episodes, members by similarity to
//!   the centroid, medoid windows in chronological order) and `route` (the episode of a
//!   question). Segmenting utterances, the embedding model, the patched prompt's text and its
//!   forward pass are the engine's.
//! - **Layer budgets**: `layer_budgets` (sensitivity -> M_l), `key_window_similarity` (the
//!   sensitivity s_l of one layer from two runs' keys) and `apply_layer_budgets` (any cache).
//!
//! **Protected prefix (the system prompt).** Positions below `episodic_config::protected_prefix`
//! are never evicted. They **count against the budget**: the cache's budget bounds the tokens a
//! head holds, and in the reference code the system prompt sits in the flattened cache whose
//! size is M·Hk. So `pair` keeps all protected tokens and then the best unprotected tokens up to
//! M_l·Hk in total; `pair_uniform` keeps a head's protected tokens and its best unprotected ones
//! up to M_l. When the protected tokens alone exceed the budget, target() answers the protected
//! count (nothing protected is evicted; every unprotected token is).
//!
//! **Sizing.** Tokens appended since the last evict() stay until the next one, so a head holds
//! up to (its kept tokens + one chunk) rows: `max_tokens` >= M_l + chunk for `pair_uniform`,
//! and up to M_l·Hk + chunk for `pair` (a head may win more than M_l of the global cut; in
//! practice it stays near M_l). With a page-backed memory the reservation costs only address
//! space; the pages backed follow the rows actually reached.
//!
//! **Ranking.** score.hpp's rule: higher score outranks, equal scores keep the newer position.
//! For `pair`'s global cut across heads, equal (score, position) keep the higher head index (any
//! fixed order keeps the per-head sets consistent with per-head selection). The global cut is
//! computed once per scoring and budget, at the first target() after an observe, and cached in
//! the state.
//!
//! **Determinism of the clustering.** No std distributions (their output differs between
//! standard libraries): uniform doubles are `(mt19937_64() >> 11) * 2^-53`, in [0, 1). One
//! generator seeded with `seed` serves all n_init runs in order (as sklearn's one RandomState).
//! Same inputs and seed give bitwise the same result with any standard library.
//!
//! Deviations from ALGORITHMS.md §4 / the reference code, on purpose:
//! - Scores are computed in fp32 from the probe queries against the cached keys (the reference
//!   takes the softmax in the model dtype, bf16). The probe/patch queries are whatever the engine
//!   feeds (instruction + postfix + medoid text): the policy never sees tokens.
//! - The protected prefix is explicit (`protected_prefix`); the reference's flattened `pair` path
//!   scores the system prompt like any token (it usually survives by its attention). §4 says the
//!   system prompt is never evicted: we guarantee it.
//! - Ties are broken deterministically (see Ranking); torch.topk leaves them unspecified.
//! - Per-head budgets (`set_budget(layer, per_head)`) with `pair`: the head's own budget times Hk
//!   is the global cut used for that head (the level expects one budget per layer).
//! - k-means: sklearn's algorithm ("lloyd"), greedy k-means++ with 2 + floor(ln k) local trials,
//!   relative tolerance 1e-4 of the mean feature variance on the summed squared centre shift,
//!   or exact convergence (labels unchanged), whichever comes first; after a tolerance stop the
//!   labels are recomputed against the final centres (sklearn does the same). Random draws
//!   differ from NumPy's, so the clusters equal sklearn's only where the data leaves no choice.
//!   Empty clusters take the points farthest from their centres (sklearn's rule), skipping
//!   points that are alone in their cluster; a cluster left empty keeps its previous centre.
//!   Distances and centres are computed in double; centroids are returned as float.
//! - Zero-norm embeddings stay zero when normalised (F.normalize / sklearn's normalize do that).
//! - `route` takes the argmax of the **cosine** similarity (§4 step 6). The reference code takes
//!   `dot(question, centroid)` with unnormalised k-means centroids, which favours tight clusters.
//!   Ties: the lowest episode index (np.argmax).
//! - `layer_budgets`: the floor is max(1, M/4) as in the reference's allocate_layer_budget
//!   (M/4 alone can be 0). The reference does not re-normalise after the floor; §4 and this
//!   library do, so that the total is exactly M·L (see layer_budgets()).
//! - `key_window_similarity`: the last, partial window counts as a window (ceil division, as
//!   the reference's layer_profile.py does); cosine as torch's cosine_similarity, eps 1e-8.
#pragma once

#include <kvcache/evict/policy.hpp>
#include <kvcache/evict/score.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

// ---- the eviction policy -----------------------------------------------------------------------

//! How the budget of a layer is spread over its KV heads.
enum class episodic_level : std::uint8_t {
  pair,          //!< global top-(M·Hk) over all heads' tokens: uneven per-head lengths (default)
  pair_uniform,  //!< top-M per head
};

struct episodic_config {
  episodic_level level = episodic_level::pair;
  //! Positions below are never evicted (the system prompt); they count against the budget.
  std::uint32_t protected_prefix = 0;
};

//! EpiCache's scoring and eviction for the block-wise prefill of one episode (see the file
//! comment). Consumes `probe_signal`: the patched prompt's queries `[queries][query_heads]
//! [head_dim]` (after RoPE), which attend to every cached token and are never cached.
class episodic {
 public:
  using signals = signal_list<probe_signal>;

  struct state {
    std::vector<std::vector<float>> score;  //!< [kv_head][slot] scores of the last observe
    //! `pair`: the KV head of each unprotected live token at the last observe, best first.
    std::vector<std::uint32_t> rank_heads;
    std::vector<std::uint32_t> protected_live;  //!< [kv_head] live protected tokens at scoring
    std::int64_t next = 0;                      //!< positions appended so far
    bool scored = false;                        //!< scored and not yet followed by an append
    std::uint32_t query_heads = 0;
    // `pair`'s global cut for `cut_budget` per head: computed by the first target() after a
    // scoring (target() is const), reused by the other heads and by later evict() calls.
    mutable std::vector<std::uint32_t> cut;
    mutable std::uint32_t cut_budget = 0;
    mutable bool cut_valid = false;
  };

  explicit episodic(episodic_config cfg = {}) : cfg_(cfg) {
    if (cfg_.level != episodic_level::pair && cfg_.level != episodic_level::pair_uniform)
      raise(errc::invalid_argument, "episodic: level must be pair or pair_uniform");
  }
  [[nodiscard]] const episodic_config& config() const noexcept { return cfg_; }

  [[nodiscard]] state make_state(const policy_context& ctx) const {
    state st;
    st.score.resize(ctx.geo.kv_heads);
    st.protected_live.assign(ctx.geo.kv_heads, 0u);
    st.query_heads = ctx.geo.query_heads;
    return st;
  }

  void on_append(state& st, const slot_table& t, const placement& pl) {
    for (auto& s : st.score)
      if (s.size() < t.rows()) s.resize(t.rows(), 0.0f);
    st.next = pl.first_position + pl.tokens;
    st.scored = false;  // a new chunk (or decode): no eviction until the next scoring
    st.cut_valid = false;
  }

  //! Scores every live token of every KV head against the probe queries (see the file
  //! comment). Refuses, with the state unchanged: 0 queries, null data, an unknown element
  //! type, a non-finite query value.
  status observe(state& st, const slot_table& t, const key_reader& keys, const probe_signal& p) {
    const std::uint32_t H = t.heads(), QH = st.query_heads, D = keys.head_dim, R = t.rows();
    if (p.queries == 0)
      return {errc::invalid_argument,
              "observe: probe_signal has 0 queries; EpiCache scores the cache with the patched "
              "prompt's queries ([queries][" + std::to_string(QH) + " query heads][" +
                  std::to_string(D) + "])"};
    if (!p.data)
      return {errc::invalid_argument, "observe: probe_signal data is null (" +
                                          std::to_string(p.queries) + " queries)"};
    if (p.type != dtype::f32 && p.type != dtype::f16 && p.type != dtype::bf16)
      return {errc::invalid_argument,
              "observe: probe_signal has an unknown element type (" +
                  std::to_string(static_cast<int>(p.type)) + ")"};
    if (H == 0 || QH % H != 0)
      return {errc::shape_mismatch, "observe: " + std::to_string(QH) + " query heads over " +
                                        std::to_string(H) + " kv heads"};
    queries_to_float(query_signal{p.data, p.type, p.queries}, QH, D, qf_);
    for (std::size_t i = 0; i < qf_.size(); ++i)
      if (!std::isfinite(qf_[i])) {
        const std::size_t per_q = std::size_t{QH} * D;
        return {errc::invalid_argument,
                std::string("observe: probe query value ") + (std::isnan(qf_[i]) ? "NaN" : "inf") +
                    " at [query " + std::to_string(i / per_q) + "][head " +
                    std::to_string(i % per_q / D) + "][dim " + std::to_string(i % D) +
                    "] (index " + std::to_string(i) + "); probe queries must be finite"};
      }
    // Valid: from here on the state changes.
    const std::uint32_t G = QH / H, nq = p.queries * G;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const std::uint32_t chunk =
        std::max<std::uint32_t>(1, std::min<std::uint32_t>(nq, (1u << 20) / std::max(R, 1u)));
    scr_.qptr.resize(chunk);
    scr_.qmax.assign(chunk, std::numeric_limits<std::int64_t>::max());  // no causal mask
    scr_.logits.resize(std::size_t{chunk} * R);
    for (std::uint32_t h = 0; h < H; ++h) {
      auto& sc = st.score[h];
      sc.assign(std::max<std::size_t>(sc.size(), R), 0.0f);
      for (std::uint32_t c0 = 0; c0 < nq; c0 += chunk) {
        const std::uint32_t cn = std::min(chunk, nq - c0);
        for (std::uint32_t i = 0; i < cn; ++i) {  // rows in (group member, probe query) order
          const std::uint32_t g = (c0 + i) / p.queries, qi = (c0 + i) % p.queries;
          scr_.qptr[i] = qf_.data() + (std::size_t{qi} * QH + h * G + g) * D;
        }
        block_logits(scr_.qptr.data(), scr_.qmax.data(), cn, keys, t, h, scale, scr_,
                     scr_.logits.data());
        for (std::uint32_t i = 0; i < cn; ++i) {
          float* l = scr_.logits.data() + std::size_t{i} * R;
          softmax_inplace(l, R);  // empty slots (-inf) get 0
          for (std::uint32_t s = 0; s < R; ++s) sc[s] = std::max(sc[s], l[s]);
        }
      }
    }
    // Protected tokens per head, and (pair) the global order of the unprotected ones.
    const std::int64_t prot = cfg_.protected_prefix;
    entries_.clear();
    for (std::uint32_t h = 0; h < H; ++h) {
      std::uint32_t n = 0;
      for (std::uint32_t s = 0; s < R; ++s) {
        const std::int32_t pos = t.position(s, h);
        if (pos < 0) continue;
        if (pos < prot) {
          ++n;
        } else if (cfg_.level == episodic_level::pair) {
          entries_.push_back({st.score[h][s], pos, h});
        }
      }
      st.protected_live[h] = n;
    }
    st.rank_heads.clear();
    if (cfg_.level == episodic_level::pair) {
      std::sort(entries_.begin(), entries_.end(), [](const entry_t& a, const entry_t& b) {
        if (a.score != b.score) return a.score > b.score;
        if (a.position != b.position) return a.position > b.position;
        return a.head > b.head;
      });
      st.rank_heads.reserve(entries_.size());
      for (const auto& e : entries_) st.rank_heads.push_back(e.head);
    }
    st.scored = true;
    st.cut_valid = false;
    return {};
  }

  //! After a scoring: the tokens `head` keeps (its share of the global cut for `pair`, the
  //! budget for `pair_uniform`; never below its protected tokens). Otherwise no limit.
  [[nodiscard]] std::uint32_t target(const state& st, const slot_table&, std::uint32_t head,
                                     std::uint32_t budget) const {
    if (!st.scored) return std::numeric_limits<std::uint32_t>::max();
    if (cfg_.level == episodic_level::pair_uniform)
      return std::max(budget, st.protected_live[head]);
    if (!st.cut_valid || st.cut_budget != budget) {
      const std::size_t H = st.protected_live.size();
      const std::uint64_t total = std::uint64_t{budget} * H;
      std::uint64_t prot = 0;
      for (auto n : st.protected_live) prot += n;
      const std::uint64_t rest = total > prot ? total - prot : 0;
      st.cut = st.protected_live;
      const std::size_t take = static_cast<std::size_t>(std::min<std::uint64_t>(rest, st.rank_heads.size()));
      for (std::size_t i = 0; i < take; ++i) ++st.cut[st.rank_heads[i]];
      st.cut_budget = budget;
      st.cut_valid = true;
    }
    return st.cut[head];
  }

  //! The `count` lowest-ranked unprotected live tokens of `head` (score.hpp's ranking).
  void select(state& st, const slot_table& t, std::uint32_t head, std::uint32_t count,
              std::vector<std::uint32_t>& victims) {
    if (!st.scored) return;
    scr_.cands.clear();
    const auto& sc = st.score[head];
    const std::int64_t prot = cfg_.protected_prefix;
    for (std::uint32_t s = 0; s < t.rows(); ++s) {
      const std::int32_t p = t.position(s, head);
      if (p >= 0 && p >= prot) scr_.cands.push_back({sc[s], p, s});
    }
    lowest_ranked(scr_.cands, count, victims);
  }

 private:
  struct entry_t {  // an unprotected live token, for pair's global order
    float score;
    std::int32_t position;
    std::uint32_t head;
  };
  episodic_config cfg_;
  score_scratch scr_;
  std::vector<float> qf_;
  std::vector<entry_t> entries_;
};

static_assert(eviction_policy<episodic>);

// ---- k-means -----------------------------------------------------------------------------------

struct kmeans_result {
  std::vector<float> centroids;         //!< `[k][dim]`
  std::vector<std::uint32_t> labels;    //!< `[n]` cluster of each point
  double inertia = 0.0;                 //!< sum of squared distances to the assigned centroid
  std::uint32_t iterations = 0;         //!< Lloyd iterations of the best run
  std::uint32_t best_run = 0;           //!< which of the n_init runs won (lowest inertia, first)
  std::vector<std::uint32_t> seeds;     //!< `[k]` points the best run's k-means++ picked, in order
  std::vector<double> run_inertia;      //!< `[n_init]` final inertia of every run
};

namespace episodic_detail {

//! A uniform double in [0, 1) from the top 53 bits of one draw (no std distribution).
inline double uniform01(std::mt19937_64& g) {
  return static_cast<double>(g() >> 11) * 0x1.0p-53;
}

inline double sq_dist(const float* a, const double* c, std::uint32_t dim) {
  double s = 0.0;
  for (std::uint32_t d = 0; d < dim; ++d) {
    const double x = static_cast<double>(a[d]) - c[d];
    s += x * x;
  }
  return s;
}
inline double sq_dist(const float* a, const float* b, std::uint32_t dim) {
  double s = 0.0;
  for (std::uint32_t d = 0; d < dim; ++d) {
    const double x = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s += x * x;
  }
  return s;
}

inline status check_points(const char* fn, std::span<const float> x, std::uint32_t n,
                           std::uint32_t dim) {
  if (n == 0) return {errc::invalid_argument, std::string(fn) + ": no points (n == 0)"};
  if (dim == 0) return {errc::invalid_argument, std::string(fn) + ": dim == 0"};
  if (x.size() != std::uint64_t{n} * dim)
    return {errc::shape_mismatch, std::string(fn) + ": " + std::to_string(x.size()) +
                                      " values for n = " + std::to_string(n) + " points of dim " +
                                      std::to_string(dim) + " (expected " +
                                      std::to_string(std::uint64_t{n} * dim) + ")"};
  for (std::size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i]))
      return {errc::invalid_argument, std::string(fn) + ": value " +
                                          (std::isnan(x[i]) ? "NaN" : "inf") + " at point " +
                                          std::to_string(i / dim) + ", dim " +
                                          std::to_string(i % dim) + "; inputs must be finite"};
  return {};
}

//! sklearn's greedy k-means++ (`_kmeans_plusplus`): the first centre uniformly at random,
//! then each next centre the best (lowest potential) of 2 + floor(ln k) candidates drawn with
//! probability proportional to the squared distance to the nearest centre so far. Returns the
//! indices of the chosen points. Inputs already validated.
inline std::vector<std::uint32_t> kmeans_plusplus(const float* x, std::uint32_t n, std::uint32_t dim,
                                                  std::uint32_t k, std::mt19937_64& rng) {
  const std::uint32_t trials = 2 + static_cast<std::uint32_t>(std::log(static_cast<double>(k)));
  std::vector<std::uint32_t> picks;
  picks.reserve(k);
  const auto first = std::min<std::uint64_t>(
      n - 1, static_cast<std::uint64_t>(uniform01(rng) * static_cast<double>(n)));
  picks.push_back(static_cast<std::uint32_t>(first));
  std::vector<double> closest(n), cum(n), cand_d(std::size_t{trials} * n);
  double pot = 0.0;
  for (std::uint32_t i = 0; i < n; ++i) {
    closest[i] = sq_dist(x + std::size_t{i} * dim, x + first * dim, dim);
    pot += closest[i];
  }
  std::vector<std::uint32_t> cand(trials);
  for (std::uint32_t c = 1; c < k; ++c) {
    double run = 0.0;
    for (std::uint32_t i = 0; i < n; ++i) cum[i] = run += closest[i];
    for (std::uint32_t t = 0; t < trials; ++t) {
      const double r = uniform01(rng) * pot;
      // numpy searchsorted (side left): the first i with cum[i] >= r, clipped to n - 1
      const auto it = std::lower_bound(cum.begin(), cum.end(), r);
      cand[t] = static_cast<std::uint32_t>(std::min<std::ptrdiff_t>(it - cum.begin(), n - 1));
    }
    std::uint32_t best = 0;
    double best_pot = std::numeric_limits<double>::infinity();
    for (std::uint32_t t = 0; t < trials; ++t) {
      double p = 0.0;
      double* d = cand_d.data() + std::size_t{t} * n;
      for (std::uint32_t i = 0; i < n; ++i) {
        d[i] = std::min(closest[i], sq_dist(x + std::size_t{i} * dim, x + std::size_t{cand[t]} * dim, dim));
        p += d[i];
      }
      if (p < best_pot) {  // np.argmin: the first minimum
        best_pot = p;
        best = t;
      }
    }
    std::copy_n(cand_d.data() + std::size_t{best} * n, n, closest.data());
    pot = best_pot;
    picks.push_back(cand[best]);
  }
  return picks;
}

struct lloyd_out {
  std::vector<double> centers;
  std::vector<std::uint32_t> labels;
  double inertia = 0.0;
  std::uint32_t iterations = 0;
};

//! Nearest centre of each point (first on ties); returns the distances in `dist`.
inline void assign(const float* x, std::uint32_t n, std::uint32_t dim, std::uint32_t k,
                   const std::vector<double>& centers, std::vector<std::uint32_t>& labels,
                   std::vector<double>& dist) {
  for (std::uint32_t i = 0; i < n; ++i) {
    double bd = std::numeric_limits<double>::infinity();
    std::uint32_t bl = 0;
    for (std::uint32_t c = 0; c < k; ++c) {
      const double d = sq_dist(x + std::size_t{i} * dim, centers.data() + std::size_t{c} * dim, dim);
      if (d < bd) {
        bd = d;
        bl = c;
      }
    }
    labels[i] = bl;
    dist[i] = bd;
  }
}

//! sklearn's `_kmeans_single_lloyd` from the given centres.
inline lloyd_out lloyd(const float* x, std::uint32_t n, std::uint32_t dim, std::uint32_t k,
                       std::vector<double> centers, std::uint32_t max_iter, double tol) {
  lloyd_out o;
  std::vector<std::uint32_t> labels(n), old(n, std::numeric_limits<std::uint32_t>::max());
  std::vector<double> dist(n), sums(std::size_t{k} * dim), fresh(std::size_t{k} * dim);
  std::vector<std::uint64_t> count(k);
  std::vector<std::uint32_t> by_dist(n);
  bool strict = false;
  for (std::uint32_t it = 0; it < max_iter; ++it) {
    assign(x, n, dim, k, centers, labels, dist);
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
    for (std::uint32_t i = 0; i < n; ++i) {
      ++count[labels[i]];
      for (std::uint32_t d = 0; d < dim; ++d)
        sums[std::size_t{labels[i]} * dim + d] += x[std::size_t{i} * dim + d];
    }
    // Empty clusters take the points farthest from their (old) centre, farthest first
    // (sklearn's _relocate_empty_clusters_dense; labels stay as they are).
    if (std::find(count.begin(), count.end(), 0u) != count.end()) {
      std::iota(by_dist.begin(), by_dist.end(), 0u);
      std::stable_sort(by_dist.begin(), by_dist.end(),
                       [&](std::uint32_t a, std::uint32_t b) { return dist[a] > dist[b]; });
      std::size_t next = 0;
      for (std::uint32_t c = 0; c < k; ++c) {
        if (count[c] != 0) continue;
        while (next < n && count[labels[by_dist[next]]] <= 1) ++next;  // would empty another
        if (next == n) break;
        const std::uint32_t i = by_dist[next++];
        const std::uint32_t from = labels[i];
        for (std::uint32_t d = 0; d < dim; ++d) {
          const double v = x[std::size_t{i} * dim + d];
          sums[std::size_t{from} * dim + d] -= v;
          sums[std::size_t{c} * dim + d] = v;
        }
        --count[from];
        count[c] = 1;
      }
    }
    double shift = 0.0;
    for (std::uint32_t c = 0; c < k; ++c)
      for (std::uint32_t d = 0; d < dim; ++d) {
        const std::size_t j = std::size_t{c} * dim + d;
        fresh[j] = count[c] ? sums[j] / static_cast<double>(count[c]) : centers[j];
        const double s = fresh[j] - centers[j];
        shift += s * s;
      }
    centers.swap(fresh);
    o.iterations = it + 1;
    if (labels == old) {
      strict = true;
      break;
    }
    if (shift <= tol) break;
    old = labels;
  }
  if (!strict) assign(x, n, dim, k, centers, labels, dist);
  double inertia = 0.0;
  for (std::uint32_t i = 0; i < n; ++i)
    inertia += sq_dist(x + std::size_t{i} * dim, centers.data() + std::size_t{labels[i]} * dim, dim);
  o.centers = std::move(centers);
  o.labels = std::move(labels);
  o.inertia = inertia;
  return o;
}

inline double cosine(const float* a, const float* b, std::uint32_t dim) {
  double ab = 0.0, aa = 0.0, bb = 0.0;
  for (std::uint32_t d = 0; d < dim; ++d) {
    ab += static_cast<double>(a[d]) * b[d];
    aa += static_cast<double>(a[d]) * a[d];
    bb += static_cast<double>(b[d]) * b[d];
  }
  return aa > 0.0 && bb > 0.0 ? ab / (std::sqrt(aa) * std::sqrt(bb)) : 0.0;
}

}  // namespace episodic_detail

//! K-means of `n` points `x` `[n][dim]` into `k` clusters, as sklearn's KMeans(n_clusters=k,
//! n_init, max_iter, tol=1e-4, random_state=seed) with algorithm "lloyd" (see the file comment
//! for the exact rules): k-means++ init, Lloyd iterations until the labels stop changing or the
//! summed squared centre shift is <= 1e-4 x the mean per-feature variance, the run of lowest
//! inertia kept (the first on ties). Errors: n == 0, dim == 0, k == 0, k > n, n_init == 0,
//! max_iter == 0, x.size() != n·dim, a non-finite value.
inline result<kmeans_result> kmeans(std::span<const float> x, std::uint32_t n, std::uint32_t dim,
                                    std::uint32_t k, std::uint64_t seed = 42,
                                    std::uint32_t n_init = 10, std::uint32_t max_iter = 300) {
  KVCACHE_TRY(episodic_detail::check_points("kmeans", x, n, dim));
  if (k == 0) return status{errc::invalid_argument, "kmeans: k == 0 clusters"};
  if (k > n)
    return status{errc::invalid_argument, "kmeans: k = " + std::to_string(k) +
                                              " clusters for only n = " + std::to_string(n) +
                                              " points (k must be <= n)"};
  if (n_init == 0) return status{errc::invalid_argument, "kmeans: n_init == 0"};
  if (max_iter == 0) return status{errc::invalid_argument, "kmeans: max_iter == 0"};
  // sklearn's _tolerance: tol x the mean of the per-feature variances
  double var_sum = 0.0;
  for (std::uint32_t d = 0; d < dim; ++d) {
    double m = 0.0;
    for (std::uint32_t i = 0; i < n; ++i) m += x[std::size_t{i} * dim + d];
    m /= n;
    double v = 0.0;
    for (std::uint32_t i = 0; i < n; ++i) {
      const double e = x[std::size_t{i} * dim + d] - m;
      v += e * e;
    }
    var_sum += v / n;
  }
  const double tol = 1e-4 * var_sum / dim;
  std::mt19937_64 rng(seed);
  kmeans_result best;
  best.run_inertia.reserve(n_init);
  for (std::uint32_t r = 0; r < n_init; ++r) {
    auto picks = episodic_detail::kmeans_plusplus(x.data(), n, dim, k, rng);
    std::vector<double> centers(std::size_t{k} * dim);
    for (std::uint32_t c = 0; c < k; ++c)
      for (std::uint32_t d = 0; d < dim; ++d)
        centers[std::size_t{c} * dim + d] = x[std::size_t{picks[c]} * dim + d];
    auto run = episodic_detail::lloyd(x.data(), n, dim, k, std::move(centers), max_iter, tol);
    best.run_inertia.push_back(run.inertia);
    if (r == 0 || run.inertia < best.inertia) {
      best.inertia = run.inertia;
      best.labels = std::move(run.labels);
      best.centroids.assign(run.centers.begin(), run.centers.end());
      best.iterations = run.iterations;
      best.best_run = r;
      best.seeds = std::move(picks);
    }
  }
  return best;
}

// ---- episodes ----------------------------------------------------------------------------------

struct episode {
  std::vector<float> centroid;          //!< `[dim]` k-means centroid of the normalised embeddings
  std::vector<std::uint32_t> members;   //!< segment indices, most similar to the centroid first
  std::vector<float> similarity;        //!< cosine similarity of each member to the centroid
  //! The top n_medoid members, re-sorted chronologically (ascending segment index): the
  //! segments whose text makes the episode's patched prompt, in this order.
  std::vector<std::uint32_t> medoids;
};

struct episode_set {
  std::uint32_t dim = 0;
  std::vector<episode> episodes;
  std::vector<std::uint32_t> labels;  //!< `[n]` episode of each segment
  double inertia = 0.0;
};

//! EpiCache's step 2-3: L2-normalises the segment embeddings `[n][dim]` (zero rows stay zero),
//! k-means (seed, n_init 10) into `E` episodes, each with its centroid, its members sorted by
//! cosine similarity to it (descending; ties: lower segment index first) and its medoid
//! segments: the top `n_medoid` members (all when fewer) sorted by segment index.
//! Errors: those of kmeans (E == 0, E > n, ...) and n_medoid == 0.
inline result<episode_set> cluster_episodes(std::span<const float> embeddings, std::uint32_t n,
                                            std::uint32_t dim, std::uint32_t E = 4,
                                            std::uint32_t n_medoid = 8, std::uint64_t seed = 42) {
  KVCACHE_TRY(episodic_detail::check_points("cluster_episodes", embeddings, n, dim));
  if (E == 0) return status{errc::invalid_argument, "cluster_episodes: E == 0 episodes"};
  if (E > n)
    return status{errc::invalid_argument, "cluster_episodes: E = " + std::to_string(E) +
                                              " episodes for only n = " + std::to_string(n) +
                                              " segments (E must be <= n)"};
  if (n_medoid == 0) return status{errc::invalid_argument, "cluster_episodes: n_medoid == 0"};
  std::vector<float> xn(embeddings.begin(), embeddings.end());
  for (std::uint32_t i = 0; i < n; ++i) {
    float* row = xn.data() + std::size_t{i} * dim;
    double s = 0.0;
    for (std::uint32_t d = 0; d < dim; ++d) s += static_cast<double>(row[d]) * row[d];
    if (s > 0.0) {
      const double inv = 1.0 / std::sqrt(s);
      for (std::uint32_t d = 0; d < dim; ++d) row[d] = static_cast<float>(row[d] * inv);
    }
  }
  auto km = kmeans(xn, n, dim, E, seed);
  if (!km) return km.error();
  episode_set out;
  out.dim = dim;
  out.labels = km->labels;
  out.inertia = km->inertia;
  out.episodes.resize(E);
  for (std::uint32_t e = 0; e < E; ++e) {
    auto& ep = out.episodes[e];
    ep.centroid.assign(km->centroids.begin() + std::ptrdiff_t{e} * dim,
                       km->centroids.begin() + std::ptrdiff_t{e + 1} * dim);
    std::vector<std::pair<double, std::uint32_t>> m;
    for (std::uint32_t i = 0; i < n; ++i)
      if (km->labels[i] == e)
        m.push_back({episodic_detail::cosine(xn.data() + std::size_t{i} * dim, ep.centroid.data(), dim), i});
    std::stable_sort(m.begin(), m.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (const auto& [s, i] : m) {
      ep.members.push_back(i);
      ep.similarity.push_back(static_cast<float>(s));
    }
    ep.medoids.assign(ep.members.begin(),
                      ep.members.begin() + std::min<std::ptrdiff_t>(n_medoid, std::ssize(ep.members)));
    std::sort(ep.medoids.begin(), ep.medoids.end());
  }
  return out;
}

//! EpiCache's step 6: the episode whose centroid has the highest cosine similarity to the
//! question's embedding (ties: the lowest index). Errors: an empty set, a wrong dimension, a
//! non-finite value.
inline result<std::uint32_t> route(const episode_set& set, std::span<const float> question_embedding) {
  if (set.episodes.empty()) return status{errc::invalid_argument, "route: no episodes"};
  if (question_embedding.size() != set.dim)
    return status{errc::shape_mismatch, "route: question embedding has " +
                                            std::to_string(question_embedding.size()) +
                                            " values, the episodes' dimension is " +
                                            std::to_string(set.dim)};
  for (std::size_t d = 0; d < question_embedding.size(); ++d)
    if (!std::isfinite(question_embedding[d]))
      return status{errc::invalid_argument,
                    "route: question embedding value " + std::to_string(d) + " is not finite"};
  std::uint32_t best = 0;
  double bs = -std::numeric_limits<double>::infinity();
  for (std::uint32_t e = 0; e < set.episodes.size(); ++e) {
    const double s = episodic_detail::cosine(question_embedding.data(),
                                             set.episodes[e].centroid.data(), set.dim);
    if (s > bs) {
      bs = s;
      best = e;
    }
  }
  return best;
}

// ---- layer budgets -----------------------------------------------------------------------------

//! EpiCache's step 5: per-layer budgets M_l from the sensitivity s_l of each layer (the key
//! similarity of a block-restricted run to the full run: lower = more sensitive = more budget).
//! ```
//! s' = (s - min) / (max - min);  w_l = (1 - s'_l)^alpha
//! M_l = max(int(w_l · M · L / sum(w)), max(1, M / 4))     # int() truncates, M/4 integer
//! ```
//! then re-normalised so that sum(M_l) == M·L exactly:
//! - total above M·L (the floor added tokens): the excess is taken from the layers above the
//!   floor, proportionally to their excess over it: layer l gives floor(excess · (M_l - f) /
//!   sum(M_j - f)), and the remaining units go one each to the largest fractional parts of
//!   those shares (ties: the lowest layer index). No layer goes below the floor.
//! - total below M·L (int() truncation, at most L - 1 tokens): one token each to the layers not
//!   raised by the floor with the largest fractional part of w_l·M·L/sum(w) (ties: lowest index).
//! max == min, or alpha == 0: every layer gets M. Errors: no layers, M == 0, M·L above 2^32 - 1,
//! a non-finite sensitivity, alpha negative or non-finite.
inline result<std::vector<std::uint32_t>> layer_budgets(std::span<const double> sensitivity,
                                                        std::uint32_t M, double alpha = 1.1) {
  const std::size_t L = sensitivity.size();
  if (L == 0) return status{errc::invalid_argument, "layer_budgets: no layers (empty sensitivity)"};
  if (M == 0) return status{errc::invalid_budget, "layer_budgets: M == 0 tokens per layer"};
  if (std::uint64_t{M} * L > std::numeric_limits<std::uint32_t>::max())
    return status{errc::invalid_budget, "layer_budgets: M·L = " + std::to_string(M) + " x " +
                                            std::to_string(L) + " exceeds 2^32 - 1"};
  if (!std::isfinite(alpha) || alpha < 0.0)
    return status{errc::invalid_argument,
                  "layer_budgets: alpha = " + std::to_string(alpha) + " must be finite and >= 0"};
  for (std::size_t l = 0; l < L; ++l)
    if (!std::isfinite(sensitivity[l]))
      return status{errc::invalid_argument, "layer_budgets: sensitivity of layer " +
                                                std::to_string(l) + " is not finite"};
  const auto [mn_it, mx_it] = std::minmax_element(sensitivity.begin(), sensitivity.end());
  const double mn = *mn_it, mx = *mx_it;
  std::vector<std::uint32_t> out(L, M);
  if (!(mx > mn) || alpha == 0.0) return out;
  std::vector<double> w(L), raw(L);
  double wsum = 0.0;
  for (std::size_t l = 0; l < L; ++l) {
    const double s = (sensitivity[l] - mn) / (mx - mn);
    w[l] = std::pow(1.0 - s, alpha);
    wsum += w[l];
  }
  const std::uint64_t T = std::uint64_t{M} * L;
  const std::uint64_t f = std::max<std::uint64_t>(1, M / 4);
  std::vector<std::uint64_t> b(L);
  std::uint64_t total = 0;
  for (std::size_t l = 0; l < L; ++l) {
    raw[l] = w[l] * static_cast<double>(M) * static_cast<double>(L) / wsum;
    b[l] = std::max<std::uint64_t>(static_cast<std::uint64_t>(raw[l]), f);
    total += b[l];
  }
  // layers ordered by a fractional part, largest first, then lowest index
  auto by_fraction = [](std::vector<std::pair<double, std::size_t>>& v) {
    std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
  };
  if (total > T) {
    const std::uint64_t excess = total - T;
    std::uint64_t over = 0;
    for (std::size_t l = 0; l < L; ++l) over += b[l] - f;
    std::vector<std::pair<double, std::size_t>> fr;
    std::uint64_t taken = 0;
    for (std::size_t l = 0; l < L; ++l) {
      if (b[l] == f) continue;
      const double share = static_cast<double>(excess) * static_cast<double>(b[l] - f) /
                           static_cast<double>(over);
      const auto whole = std::min<std::uint64_t>(static_cast<std::uint64_t>(share), b[l] - f);
      b[l] -= whole;
      taken += whole;
      fr.push_back({share - static_cast<double>(whole), l});
    }
    by_fraction(fr);
    // one unit per layer in that order (a second round only if rounding left more to take)
    for (bool progress = true; taken < excess && progress;) {
      progress = false;
      for (std::size_t i = 0; i < fr.size() && taken < excess; ++i)
        if (b[fr[i].second] > f) {
          --b[fr[i].second];
          ++taken;
          progress = true;
        }
    }
  } else if (total < T) {
    std::uint64_t deficit = T - total;
    std::vector<std::pair<double, std::size_t>> fr;
    for (std::size_t l = 0; l < L; ++l)
      if (raw[l] >= static_cast<double>(f)) fr.push_back({raw[l] - std::floor(raw[l]), l});
    if (fr.empty()) fr.push_back({0.0, 0});  // cannot happen: the top layer has raw >= M >= f
    by_fraction(fr);
    for (std::size_t i = 0; deficit > 0; i = (i + 1) % fr.size(), --deficit) ++b[fr[i].second];
  }
  for (std::size_t l = 0; l < L; ++l) out[l] = static_cast<std::uint32_t>(b[l]);
  return out;
}

//! The sensitivity s_l of one layer (for one KV head): keys `a` (full causal attention) and `b`
//! (block-restricted mask) of the same `tokens`, each `[tokens][width]` contiguous (row i of
//! token i; width = head_dim for one head, as the reference profiles per head). Cut into
//! windows of `window` tokens (the last one partial), each window's keys flattened and compared
//! by cosine similarity (torch's: x·y / (max(|x|, 1e-8) · max(|y|, 1e-8))); returns the mean over
//! windows. s_l is the mean of this over the layer's KV heads (the caller's; every head has the
//! same windows, so that equals the reference's mean over heads and windows).
//! Returns NaN for tokens == 0, width == 0, window == 0 or a null pointer (layer_budgets refuses
//! it).
inline double key_window_similarity(const float* a, const float* b, std::uint32_t tokens,
                                    std::size_t width, std::uint32_t window = 100) {
  if (!a || !b || tokens == 0 || width == 0 || window == 0)
    return std::numeric_limits<double>::quiet_NaN();
  const std::uint32_t windows = (tokens + window - 1) / window;
  double acc = 0.0;
  for (std::uint32_t w = 0; w < windows; ++w) {
    const std::size_t t0 = std::size_t{w} * window, t1 = std::min<std::size_t>(t0 + window, tokens);
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (std::size_t i = t0 * width; i < t1 * width; ++i) {
      ab += static_cast<double>(a[i]) * b[i];
      aa += static_cast<double>(a[i]) * a[i];
      bb += static_cast<double>(b[i]) * b[i];
    }
    constexpr double eps = 1e-8;
    acc += ab / (std::max(std::sqrt(aa), eps) * std::max(std::sqrt(bb), eps));
  }
  return acc / windows;
}

//! Sets `budgets[l]` as the budget of layer l of any cache (`set_budget(layer, tokens)`). All are
//! checked first (one per layer, each in [1, max_tokens]): on error nothing changed.
template <class Cache>
status apply_layer_budgets(Cache& c, std::span<const std::uint32_t> budgets) {
  const std::uint32_t L = c.geo().layers;
  if (budgets.size() != L)
    return {errc::invalid_budget, "apply_layer_budgets: " + std::to_string(budgets.size()) +
                                      " budgets for " + std::to_string(L) + " layers"};
  for (std::uint32_t l = 0; l < L; ++l)
    if (budgets[l] == 0 || budgets[l] > c.config().max_tokens)
      return {errc::invalid_budget, "apply_layer_budgets: layer " + std::to_string(l) +
                                        " budget " + std::to_string(budgets[l]) +
                                        " must be in [1, max_tokens = " +
                                        std::to_string(c.config().max_tokens) + "]"};
  for (std::uint32_t l = 0; l < L; ++l) KVCACHE_TRY(c.set_budget(l, budgets[l]));
  return {};
}

KVCACHE_NAMESPACE_END
