// SPDX-License-Identifier: Apache-2.0
//! @file
//! heavy_hitter (H2O) against a direct re-implementation of its spec, its three signal sources,
//! GQA folding, per-head victims, budgets, multi-sequence batches, bad inputs, and planted heavy
//! hitters against sink_window under reference attention.
#include <kvcache/cache.hpp>
#include <kvcache/evict/heavy_hitter.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/reference/attention.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "catch.hpp"
#include "evict_support.hpp"

using namespace kvcache;
using evtest::kept;

namespace {

//! H2O's spec, slow and direct, over positions: acc per (head, position); keep the r newest plus
//! the top of the rest by (acc, then newer position).
struct h2o_oracle {
  std::vector<std::map<std::int32_t, float>> acc;
  std::int64_t next = 0;
  std::uint32_t prompt = 0, heavy = 0, recent = 0;
  float heavy_ratio = 0.1f, recent_ratio = 0.1f;
  bool absolute = false;

  explicit h2o_oracle(std::uint32_t heads) : acc(heads) {}
  void append(std::uint32_t n) {
    for (auto& a : acc)
      for (std::uint32_t i = 0; i < n; ++i) a[static_cast<std::int32_t>(next + i)] = 0.0f;
    next += n;
    if (!prompt) prompt = n;
  }
  //! values[qh][t] : position -> probability
  void observe(const std::vector<std::map<std::int32_t, float>>& values, std::uint32_t query_heads,
               std::uint32_t queries) {
    const std::uint32_t G = query_heads / static_cast<std::uint32_t>(acc.size());
    for (std::uint32_t qh = 0; qh < query_heads; ++qh)
      for (std::uint32_t t = 0; t < queries; ++t)
        for (const auto& [pos, p] : values[std::size_t{qh} * queries + t]) {
          auto it = acc[qh / G].find(pos);
          if (it != acc[qh / G].end()) it->second += p;
        }
  }
  std::uint32_t hh() const {
    return absolute ? heavy : std::max<std::uint32_t>(1, std::uint32_t(double(heavy_ratio) * prompt));
  }
  std::uint32_t rc() const {
    return absolute ? recent : std::max<std::uint32_t>(1, std::uint32_t(double(recent_ratio) * prompt));
  }
  void evict(std::uint32_t budget) {
    const std::uint32_t keep = std::min(budget, hh() + rc());
    for (auto& a : acc) {
      if (a.size() <= keep) continue;
      const std::uint32_t r = keep >= hh() + rc() ? rc() : keep * rc() / (hh() + rc());
      std::vector<std::pair<float, std::int32_t>> rest;
      std::size_t i = 0;
      for (auto it = a.rbegin(); it != a.rend(); ++it, ++i)  // newest first
        if (i >= r) rest.push_back({it->second, it->first});
      std::sort(rest.begin(), rest.end());  // (acc asc, position asc): evicted first
      const std::size_t drop = a.size() - keep;
      for (std::size_t j = 0; j < drop; ++j) a.erase(rest[j].second);
    }
  }
  std::set<std::int32_t> kept(std::uint32_t h) const {
    std::set<std::int32_t> s;
    for (const auto& [p, x] : acc[h]) s.insert(p);
    return s;
  }
};

//! Random dyadic probabilities for every (query head, query) over `positions`.
std::vector<std::map<std::int32_t, float>> random_values(std::mt19937& rng,
                                                         const std::set<std::int32_t>& positions,
                                                         std::uint32_t query_heads,
                                                         std::uint32_t queries) {
  std::vector<std::map<std::int32_t, float>> v(std::size_t{query_heads} * queries);
  for (auto& m : v)
    for (std::int32_t p : positions) m[p] = evtest::dyadic(rng);
  return v;
}

std::set<std::int32_t> all_live(const layer_view& v) {
  std::set<std::int32_t> s;
  for (std::uint32_t h = 0; h < v.kv_heads; ++h) {
    auto k = kept(v, h);
    s.insert(k.begin(), k.end());
  }
  return s;
}

//! Column sums `[query_heads][rows]` of `[query_heads][queries][rows]`.
std::vector<float> column_sums(const std::vector<float>& p, std::uint32_t qh, std::uint32_t q,
                               std::uint32_t rows) {
  std::vector<float> s(std::size_t{qh} * rows, 0.0f);
  for (std::uint32_t h = 0; h < qh; ++h)
    for (std::uint32_t t = 0; t < q; ++t)
      for (std::uint32_t r = 0; r < rows; ++r)
        s[std::size_t{h} * rows + r] += p[(std::size_t{h} * q + t) * rows + r];
  return s;
}

}  // namespace

TEST_CASE("heavy_hitter: kept sets equal the spec's, with budget changes and bad inputs",
          "[evict][h2o]") {
  constexpr std::uint32_t KV = 2, QH = 4, D = 4, P = 30, steps = 80;
  std::mt19937 rng(7);
  const auto cfg = evtest::config(1, KV, QH, D, 256);
  heavy_hitter_config hc;
  hc.heavy = 5;
  hc.recent = 4;
  cache<heap_memory, heavy_hitter<attention_signal>> a(cfg, heap_memory{}, heavy_hitter(hc));
  cache<heap_memory, heavy_hitter<attention_sum_signal>> b(cfg, heap_memory{},
                                                           heavy_hitter<attention_sum_signal>(hc));
  h2o_oracle o(KV);
  o.absolute = true;
  o.heavy = hc.heavy;
  o.recent = hc.recent;
  const seq_id sa = a.open().value(), sb = b.open().value();

  std::uint32_t budget = cfg.max_tokens;
  for (std::uint32_t step = 0; step <= steps; ++step) {
    const std::uint32_t n = step == 0 ? P : 1;
    const auto k = evtest::randn(rng, std::size_t{n} * KV * D), v = evtest::randn(rng, k.size());
    evtest::append(a, sa, 0, k, v, n);
    evtest::append(b, sb, 0, k, v, n);
    o.append(n);
    const layer_view va = evtest::view(a, sa, 0), vb = evtest::view(b, sb, 0);
    const auto vals = random_values(rng, all_live(va), QH, n);
    const auto pa = evtest::by_slot(va, QH, n, vals);
    const auto pb = evtest::by_slot(vb, QH, n, vals);
    const auto sums = column_sums(pb, QH, n, vb.rows);

    if (step % 7 == 3) {  // bad inputs: refused, nothing changes (checked by what follows)
      auto bad = pa;
      bad[bad.size() / 2] = std::numeric_limits<float>::quiet_NaN();
      status st = a.observe(sa, 0, attention_signal{bad.data(), QH, n, va.rows});
      CHECK(st.code() == errc::invalid_argument);
      CHECK(st.message().find("NaN") != std::string::npos);
      bad[bad.size() / 2] = -0.5f;
      CHECK(a.observe(sa, 0, attention_signal{bad.data(), QH, n, va.rows}).code() ==
            errc::invalid_argument);
      CHECK(a.observe(sa, 0, attention_signal{pa.data(), QH, n, va.rows + 1}).code() ==
            errc::shape_mismatch);
      CHECK(a.observe(sa, 0, attention_signal{pa.data(), QH / 2, n, va.rows}).code() ==
            errc::shape_mismatch);
      auto bad_sums = sums;
      bad_sums[0] = std::numeric_limits<float>::infinity();
      CHECK(b.observe(sb, 0, attention_sum_signal{bad_sums.data(), QH, vb.rows}).code() ==
            errc::invalid_argument);
      CHECK(b.observe(sb, 0, attention_sum_signal{nullptr, QH, vb.rows}).code() ==
            errc::invalid_argument);
      CHECK(evtest::kept(evtest::view(a, sa, 0), 0) == kept(va, 0));
    }
    REQUIRE(a.observe(sa, 0, attention_signal{pa.data(), QH, n, va.rows}).ok());
    REQUIRE(b.observe(sb, 0, attention_sum_signal{sums.data(), QH, vb.rows}).ok());
    o.observe(vals, QH, n);
    if (step > 0 && step % 10 == 0) {  // budgets change between steps (also below the window)
      budget = std::uniform_int_distribution<std::uint32_t>(3, 12)(rng);
      REQUIRE(a.set_budget(0, budget).ok());
      REQUIRE(b.set_budget(0, budget).ok());
    }
    REQUIRE(a.evict(sa, 0).ok());
    REQUIRE(b.evict(sb, 0).ok());
    o.evict(budget);
    const layer_view ea = evtest::view(a, sa, 0), eb = evtest::view(b, sb, 0);
    for (std::uint32_t h = 0; h < KV; ++h) {
      INFO("step " << step << " head " << h << " budget " << budget);
      REQUIRE(kept(ea, h) == o.kept(h));
      REQUIRE(kept(eb, h) == o.kept(h));
    }
  }
}

TEST_CASE("heavy_hitter: defaults keep 10% heavy + 10% recent of the prompt", "[evict][h2o]") {
  constexpr std::uint32_t KV = 2, QH = 2, D = 4, P = 100;
  std::mt19937 rng(3);
  const auto cfg = evtest::config(1, KV, QH, D, 200);
  cache<heap_memory, heavy_hitter<>> c(cfg);
  CHECK(c.policy().config().heavy_ratio == 0.1f);
  h2o_oracle o(KV);
  const seq_id s = c.open().value();
  for (std::uint32_t step = 0; step < 30; ++step) {
    const std::uint32_t n = step == 0 ? P : 1;
    const auto k = evtest::randn(rng, std::size_t{n} * KV * D);
    evtest::append(c, s, 0, k, k, n);
    o.append(n);
    const auto v = evtest::view(c, s, 0);
    const auto vals = random_values(rng, all_live(v), QH, n);
    const auto p = evtest::by_slot(v, QH, n, vals);
    REQUIRE(c.observe(s, 0, attention_signal{p.data(), QH, n, v.rows}).ok());
    o.observe(vals, QH, n);
    REQUIRE(c.evict(s, 0).ok());
    o.evict(cfg.max_tokens);
    const auto e = evtest::view(c, s, 0);
    for (std::uint32_t h = 0; h < KV; ++h) {
      REQUIRE(e.live[h] == 20);  // 10 heavy + 10 recent
      REQUIRE(kept(e, h) == o.kept(h));
    }
  }
  // FlexGen mode: one slot per step, the new token written into the victim's slot.
  CHECK(evtest::view(c, s, 0).rows == P);
}

TEST_CASE("heavy_hitter: query signal equals the engine's probabilities (FlashAttention path)",
          "[evict][h2o]") {
  constexpr std::uint32_t KV = 2, QH = 4, D = 8, P = 40;
  std::mt19937 rng(11);
  const auto cfg = evtest::config(1, KV, QH, D, 128);
  heavy_hitter_config hc;
  hc.heavy = 6;
  hc.recent = 6;
  cache<heap_memory, heavy_hitter<attention_signal>> a(cfg, heap_memory{}, heavy_hitter(hc));
  cache<heap_memory, heavy_hitter<query_signal>> b(cfg, heap_memory{},
                                                   heavy_hitter<query_signal>(hc));
  const seq_id sa = a.open().value(), sb = b.open().value();
  std::vector<float> out, probs;
  for (std::uint32_t step = 0; step < 40; ++step) {
    const std::uint32_t n = step == 0 ? P : 1;
    const auto k = evtest::randn(rng, std::size_t{n} * KV * D), q = evtest::randn(rng, std::size_t{n} * QH * D);
    evtest::append(a, sa, 0, k, k, n);
    evtest::append(b, sb, 0, k, k, n);
    const auto va = evtest::view(a, sa, 0);
    std::vector<std::int64_t> qpos(n);
    for (std::uint32_t i = 0; i < n; ++i) qpos[i] = va.next_position - n + i;
    out.resize(std::size_t{n} * QH * D);
    probs.resize(std::size_t{QH} * n * va.rows);
    REQUIRE(reference::attention(va, QH, q.data(), n, qpos.data(), out.data(), probs.data()).ok());
    REQUIRE(a.observe(sa, 0, attention_signal{probs.data(), QH, n, va.rows}).ok());
    REQUIRE(b.observe(sb, 0, query_signal{q.data(), dtype::f32, n}).ok());
    if (step == 5) {
      auto bad = q;
      bad[1] = std::numeric_limits<float>::quiet_NaN();
      CHECK(b.observe(sb, 0, query_signal{bad.data(), dtype::f32, n}).code() == errc::invalid_argument);
      CHECK(b.observe(sb, 0, query_signal{q.data(), dtype::f32, 10000}).code() == errc::shape_mismatch);
    }
    REQUIRE(a.evict(sa, 0).ok());
    REQUIRE(b.evict(sb, 0).ok());
    const auto ea = evtest::view(a, sa, 0), eb = evtest::view(b, sb, 0);
    for (std::uint32_t h = 0; h < KV; ++h) {
      INFO("step " << step << " head " << h);
      REQUIRE(kept(ea, h) == kept(eb, h));
    }
  }
}

TEST_CASE("heavy_hitter: GQA folds query heads per KV head; heads choose their own victims",
          "[evict][h2o]") {
  constexpr std::uint32_t KV = 2, QH = 4, D = 4;
  const auto cfg = evtest::config(1, KV, QH, D, 32);
  heavy_hitter_config hc;
  hc.heavy = 3;
  hc.recent = 2;
  cache<heap_memory, heavy_hitter<>> c(cfg, heap_memory{}, heavy_hitter(hc));
  const seq_id s = c.open().value();
  std::vector<float> k(8 * KV * D, 0.5f);
  evtest::append(c, s, 0, k, k, 8);
  // Query heads 0,1 (KV head 0) attend to positions 0..2; 2,3 (KV head 1) to 3..5. Head 0's
  // group splits its mass (0.6 + 0.0 vs 0.3 + 0.3): the sum decides.
  std::vector<float> p(std::size_t{QH} * 8, 0.0f);
  for (std::uint32_t pos = 0; pos < 3; ++pos) {
    p[0 * 8 + pos] = pos == 0 ? 0.6f : 0.3f;
    p[1 * 8 + pos] = pos == 0 ? 0.0f : 0.3f;
    p[2 * 8 + pos + 3] = 0.3f;
    p[3 * 8 + pos + 3] = 0.3f;
  }
  p[1 * 8 + 4] = 0.5f;  // one query head of group 0 likes position 4, less than the sum of others
  REQUIRE(c.observe(s, 0, attention_signal{p.data(), QH, 1, 8}).ok());
  REQUIRE(c.evict(s, 0).ok());
  auto v = evtest::view(c, s, 0);
  CHECK(kept(v, 0) == std::set<std::int32_t>{0, 1, 2, 6, 7});
  CHECK(kept(v, 1) == std::set<std::int32_t>{3, 4, 5, 6, 7});
  // The next token goes into each head's own hole: different rows per head.
  std::vector<float> k1(KV * D, 1.0f);
  evtest::append(c, s, 0, k1, k1, 1);
  v = evtest::view(c, s, 0);
  CHECK(v.rows == 8);
  std::uint32_t row0 = 99, row1 = 99;
  for (std::uint32_t r = 0; r < v.rows; ++r) {
    if (v.position(r, 0) == 8) row0 = r;
    if (v.position(r, 1) == 8) row1 = r;
  }
  CHECK(row0 >= 3);
  CHECK(row0 <= 5);
  CHECK(row1 <= 2);
}

TEST_CASE("heavy_hitter: budgets per layer and per head", "[evict][h2o]") {
  constexpr std::uint32_t KV = 2, QH = 2, D = 4;
  const auto cfg = evtest::config(2, KV, QH, D, 64);
  cache<heap_memory, heavy_hitter<>> c(cfg);  // ratios: 10% + 10% of 40 = 8
  const seq_id s = c.open().value();
  REQUIRE(c.set_budget(1, 6).ok());
  const std::uint32_t per_head[KV] = {7, 3};
  REQUIRE(c.set_budget(0, std::span<const std::uint32_t>(per_head)).ok());
  CHECK(c.budget(0, 1) == 3);
  const std::uint32_t bad[KV] = {7, 0};
  CHECK(c.set_budget(0, std::span<const std::uint32_t>(bad)).code() == errc::invalid_budget);
  CHECK(c.budget(0, 1) == 3);  // unchanged
  CHECK(c.set_budget(0, std::span<const std::uint32_t>(per_head, 1)).code() == errc::invalid_budget);
  std::vector<float> k(40 * KV * D, 0.25f), p(std::size_t{QH} * 40, 0.1f);
  for (std::uint32_t l = 0; l < 2; ++l) {
    evtest::append(c, s, l, k, k, 40);
    REQUIRE(c.observe(s, l, attention_signal{p.data(), QH, 1, 40}).ok());
  }
  REQUIRE(c.evict(s).ok());
  const auto v0 = evtest::view(c, s, 0), v1 = evtest::view(c, s, 1);
  CHECK(v0.live[0] == 7);
  CHECK(v0.live[1] == 3);
  CHECK(v1.live[0] == 6);
  CHECK(v1.live[1] == 6);
  CHECK(c.evict(s, 0, 4).code() == errc::invalid_argument);  // reserve above head 1's budget
}

TEST_CASE("heavy_hitter: sequences of one cache keep their own scores", "[evict][h2o]") {
  constexpr std::uint32_t KV = 2, QH = 4, D = 4, P = 24;
  std::mt19937 rng(5);
  const auto cfg = evtest::config(1, KV, QH, D, 64);
  heavy_hitter_config hc;
  hc.heavy = 4;
  hc.recent = 3;
  cache<heap_memory, heavy_hitter<>> c(cfg, heap_memory{}, heavy_hitter(hc));
  std::vector<seq_id> seqs{c.open().value(), c.open().value(), c.open().value()};
  std::vector<h2o_oracle> o(seqs.size(), h2o_oracle(KV));
  for (auto& x : o) {
    x.absolute = true;
    x.heavy = hc.heavy;
    x.recent = hc.recent;
  }
  for (std::uint32_t step = 0; step < 30; ++step)
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const std::uint32_t n = step == 0 ? P : 1;
      const auto k = evtest::randn(rng, std::size_t{n} * KV * D);
      evtest::append(c, seqs[i], 0, k, k, n);
      o[i].append(n);
      const auto v = evtest::view(c, seqs[i], 0);
      const auto vals = random_values(rng, all_live(v), QH, n);
      const auto p = evtest::by_slot(v, QH, n, vals);
      REQUIRE(c.observe(seqs[i], 0, attention_signal{p.data(), QH, n, v.rows}).ok());
      o[i].observe(vals, QH, n);
      REQUIRE(c.evict(seqs[i], 0).ok());
      o[i].evict(cfg.max_tokens);
      const auto e = evtest::view(c, seqs[i], 0);
      for (std::uint32_t h = 0; h < KV; ++h) REQUIRE(kept(e, h) == o[i].kept(h));
    }
}

// ---- planted heavy hitters under reference attention -------------------------------------------

namespace {

struct planted {
  static constexpr std::uint32_t KV = 2, QH = 4, D = 32, P = 200, T = 100;
  std::vector<float> k, v, q;  // [P+T][KV][D], [P+T][QH][D]
  std::set<std::int32_t> hitters;
  planted() {
    std::mt19937 rng(2024);
    const std::uint32_t N = P + T;
    k = evtest::randn(rng, std::size_t{N} * KV * D, 0.5f);
    v = evtest::randn(rng, k.size());
    q = evtest::randn(rng, std::size_t{N} * QH * D, 0.5f);
    const auto dir = evtest::randn(rng, std::size_t{KV} * D);
    for (std::int32_t p : {9, 37, 58, 91, 120, 133, 160, 177}) hitters.insert(p);
    for (std::uint32_t t = 0; t < N; ++t)
      for (std::uint32_t h = 0; h < KV; ++h) {
        const bool hit = hitters.count(static_cast<std::int32_t>(t)) > 0;
        for (std::uint32_t d = 0; d < D; ++d) {
          if (hit) k[(std::size_t{t} * KV + h) * D + d] += 1.5f * dir[h * D + d];
          for (std::uint32_t g = 0; g < QH / KV; ++g)
            q[(std::size_t{t} * QH + h * (QH / KV) + g) * D + d] += 1.5f * dir[h * D + d];
        }
      }
  }
};

//! Runs prefill + decode; returns the attention outputs `[T][QH][D]` of the decode steps.
template <class C>
std::vector<float> run(C& c, const planted& w, std::uint32_t budget) {
  constexpr auto KV = planted::KV, QH = planted::QH, D = planted::D, P = planted::P, T = planted::T;
  REQUIRE(c.set_budget(budget).ok());
  const seq_id s = c.open().value();
  std::vector<float> out(std::size_t{P} * QH * D), all(std::size_t{T} * QH * D), probs;
  auto kv = [&](std::uint32_t t0, std::uint32_t n, const std::vector<float>& src) {
    return std::vector<float>(src.begin() + std::ptrdiff_t{t0} * KV * D,
                              src.begin() + std::ptrdiff_t{t0 + n} * KV * D);
  };
  evtest::append(c, s, 0, kv(0, P, w.k), kv(0, P, w.v), P);
  auto view = evtest::view(c, s, 0);
  std::vector<std::int64_t> pos(P);
  for (std::uint32_t i = 0; i < P; ++i) pos[i] = i;
  probs.resize(std::size_t{QH} * P * view.rows);
  REQUIRE(reference::attention(view, QH, w.q.data(), P, pos.data(), out.data(), probs.data()).ok());
  if constexpr (C::template consumes<attention_signal>)
    REQUIRE(c.observe(s, 0, attention_signal{probs.data(), QH, P, view.rows}).ok());
  REQUIRE(c.evict(s, 0).ok());
  for (std::uint32_t t = P; t < P + T; ++t) {
    evtest::append(c, s, 0, kv(t, 1, w.k), kv(t, 1, w.v), 1);
    view = evtest::view(c, s, 0);
    probs.resize(std::size_t{QH} * view.rows);
    REQUIRE(reference::attention(view, QH, w.q.data() + std::size_t{t} * QH * D, 1, nullptr,
                                 all.data() + std::size_t{t - P} * QH * D, probs.data())
                .ok());
    if constexpr (C::template consumes<attention_signal>)
      REQUIRE(c.observe(s, 0, attention_signal{probs.data(), QH, 1, view.rows}).ok());
    REQUIRE(c.evict(s, 0).ok());
  }
  if constexpr (C::template consumes<attention_signal>) {
    view = evtest::view(c, s, 0);
    for (std::uint32_t h = 0; h < KV; ++h)
      for (std::int32_t p : w.hitters) {
        INFO("head " << h << " hitter " << p);
        CHECK(kept(view, h).count(p) == 1);
      }
  }
  return all;
}

double rel_error(const std::vector<float>& x, const std::vector<float>& truth) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    num += (double(x[i]) - truth[i]) * (double(x[i]) - truth[i]);
    den += double(truth[i]) * truth[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("heavy_hitter: planted heavy hitters are kept; lower error than sink_window at 20%",
          "[evict][h2o]") {
  const planted w;
  const auto cfg = evtest::config(1, planted::KV, planted::QH, planted::D, planted::P + planted::T);
  const std::uint32_t budget = planted::P / 5;  // 20% of the prompt: H2O's 10% heavy + 10% recent
  cache<heap_memory, keep_all> full(cfg);
  cache<heap_memory, heavy_hitter<>> h2o(cfg);
  cache<heap_memory, sink_window> sw(cfg, heap_memory{}, sink_window(4));
  const auto truth = run(full, w, cfg.max_tokens);
  const auto e_h2o = rel_error(run(h2o, w, budget), truth);
  const auto e_sw = rel_error(run(sw, w, budget), truth);
  INFO("relative L2 error: heavy_hitter " << e_h2o << ", sink_window " << e_sw);
  CHECK(e_h2o < e_sw);
  CHECK(e_h2o < 0.5 * e_sw);
}
