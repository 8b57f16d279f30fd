// SPDX-License-Identifier: Apache-2.0
//! @file
//! scale_aware (ScaleKV) against a direct re-implementation of its spec over several scales and
//! layers with a per-(next scale, layer) budget table; observation sets; bad inputs; budgets and
//! the attention selectivity classification.
#include <kvcache/cache.hpp>
#include <kvcache/evict/budget.hpp>
#include <kvcache/evict/scale_aware.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/memory/heap.hpp>

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

constexpr std::uint32_t KV = 2, QH = 4, D = 8, G = QH / KV, L = 2;
const std::vector<std::uint32_t> side{1, 2, 4, 8, 16};  // token maps 1x1 .. 16x16: 5 scales

//! ScaleKV's spec over positions, per (layer, head); keys/queries by position.
struct scalekv_oracle {
  scale_aware_config cfg;
  std::uint32_t layer = 0;
  bool reached = false;
  std::vector<std::set<std::int32_t>> live = std::vector<std::set<std::int32_t>>(KV);
  const std::vector<float>* keys = nullptr;  // [pos][KV][D]

  static std::vector<std::int32_t> obs(std::int64_t start, std::uint32_t s) {
    std::vector<std::int32_t> o;
    if (s < 4) {
      const std::uint32_t len = s * s, n = std::min(16u, len);
      for (std::uint32_t i = len - n; i < len; ++i) o.push_back(static_cast<std::int32_t>(start + i));
      return o;
    }
    const std::uint32_t p = s / 4;
    for (std::uint32_t i = 0; i < 4; ++i)
      for (std::uint32_t j = 0; j < 4; ++j)
        o.push_back(static_cast<std::int32_t>(start + (i * p + (p - 1) / 2) * s + j * p + (p - 1) / 2));
    std::sort(o.begin(), o.end());
    return o;
  }

  //! After scale `cur` (positions [start, start + len)) with its queries `q` `[len][QH][D]`.
  void after_scale(std::uint32_t cur, std::int64_t start, std::uint32_t len, const float* q) {
    for (auto& l : live)
      for (std::uint32_t i = 0; i < len; ++i) l.insert(static_cast<std::int32_t>(start + i));
    std::uint32_t n = 0;
    for (auto& l : live) n = std::max<std::uint32_t>(n, static_cast<std::uint32_t>(l.size()));
    if (!reached && n <= cfg.base_capacity) return;
    reached = true;
    const std::uint32_t row = cur + 1 >= cfg.scales ? cur : cur + 1;
    std::uint32_t cap = cfg.budgets.at(row, layer);
    if (!cap) cap = cfg.base_capacity;
    if (cur + 1 >= cfg.scales) reached = false;
    if (n <= cap) return;
    const auto o = obs(start, side[cur]);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    for (std::uint32_t h = 0; h < KV; ++h) {
      std::map<std::int32_t, float> score;
      for (std::int32_t p : live[h]) score[p] = 0.0f;
      for (std::int32_t op : o)
        for (std::uint32_t g = 0; g < G; ++g)
          for (std::int32_t p : live[h]) {
            const float* qq = q + (std::size_t(op - start) * QH + h * G + g) * D;
            const float* kk = keys->data() + (std::size_t(p) * KV + h) * D;
            float dot = 0.0f;
            for (std::uint32_t d = 0; d < D; ++d) dot += qq[d] * kk[d];
            score[p] += dot * scale;
          }
      std::vector<std::int32_t> order(live[h].begin(), live[h].end());
      std::vector<float> seq;
      for (std::int32_t p : order)
        seq.push_back(std::count(o.begin(), o.end(), p) ? -std::numeric_limits<float>::infinity()
                                                        : score[p] / static_cast<float>(G));
      std::vector<std::pair<float, std::int32_t>> cands;
      for (std::size_t i = 0; i < seq.size(); ++i) {
        float m = -std::numeric_limits<float>::infinity();
        for (std::size_t j = i >= 2 ? i - 2 : 0; j < std::min(seq.size(), i + 3); ++j) m = std::max(m, seq[j]);
        if (!std::count(o.begin(), o.end(), order[i])) cands.push_back({m, order[i]});
      }
      std::sort(cands.rbegin(), cands.rend());  // kept first
      std::set<std::int32_t> keep(o.begin(), o.end());
      for (std::size_t i = 0; i + o.size() < cap && i < cands.size(); ++i) keep.insert(cands[i].second);
      live[h] = keep;
    }
  }
};

}  // namespace

TEST_CASE("scale_aware: kept sets equal the spec's over scales and layers", "[evict][scalekv]") {
  std::mt19937 rng(17);
  scale_aware_config sc;
  sc.scales = 5;
  sc.base_capacity = 40;
  // rows = next scale: no entry until scale 4; then layer 0 is a drafter (60), layer 1 a refiner (30).
  sc.budgets = budget_table(L, {{0, 0}, {0, 0}, {0, 0}, {0, 0}, {60, 30}});
  std::uint32_t total = 0;
  for (auto s : side) total += s * s;
  const auto cfg = evtest::config(L, KV, QH, D, total);
  cache<heap_memory, scale_aware> c(cfg, heap_memory{}, scale_aware(sc));
  const seq_id s = c.open().value();
  std::vector<float> keys = evtest::randn(rng, std::size_t{total} * KV * D);
  std::vector<scalekv_oracle> o(L);
  for (std::uint32_t l = 0; l < L; ++l) {
    o[l].cfg = sc;
    o[l].layer = l;
    o[l].keys = &keys;
  }
  std::int64_t start = 0;
  for (std::uint32_t cur = 0; cur < side.size(); ++cur) {
    const std::uint32_t len = side[cur] * side[cur];
    const auto q = evtest::randn(rng, std::size_t{len} * QH * D);
    const std::vector<std::uint32_t> ids(len, cur);
    for (std::uint32_t l = 0; l < L; ++l) {
      const std::vector<float> k(keys.begin() + start * KV * D, keys.begin() + (start + len) * KV * D);
      evtest::append(c, s, l, k, k, len);
      REQUIRE(c.observe(s, l, scale_signal{ids.data(), len, side[cur], side[cur]},
                        query_signal{q.data(), dtype::f32, len})
                  .ok());
      REQUIRE(c.evict(s, l).ok());
      o[l].after_scale(cur, start, len, q.data());
      const auto v = evtest::view(c, s, l);
      for (std::uint32_t h = 0; h < KV; ++h) {
        INFO("scale " << cur << " layer " << l << " head " << h);
        REQUIRE(kept(v, h) == o[l].live[h]);
      }
    }
    start += len;
  }
  CHECK(evtest::view(c, s, 0).live[0] == 60);
  CHECK(evtest::view(c, s, 1).live[0] == 30);
}

TEST_CASE("scale_aware: observation tokens are the patch centres, or the last 16", "[evict][scalekv]") {
  scale_aware p;
  std::vector<std::int32_t> o;
  p.observation_positions(100, 64, 8, 8, o);  // 8x8: patches of 2x2, centres at (2i, 2j)
  REQUIRE(o.size() == 16);
  CHECK(o[0] == 100);
  CHECK(o[1] == 102);
  CHECK(o[4] == 100 + 2 * 8);
  p.observation_positions(0, 1024, 32, 32, o);  // 8x8 patches: centre (3, 3) of the first
  CHECK(o[0] == 3 * 32 + 3);
  p.observation_positions(0, 64, 4, 16, o);  // not square: the last 16
  CHECK(o.front() == 48);
  CHECK(o.back() == 63);
  p.observation_positions(0, 9, 0, 0, o);  // 3x3 is smaller than the grid: the last 9
  CHECK(o.size() == 9);
  CHECK(scale_aware_config{}.base_capacity == 650);
  CHECK(scale_aware_config{}.kernel == 5);
  CHECK(!scale_aware_config{}.softmax);
}

TEST_CASE("scale_aware: bad signals are refused and change nothing", "[evict][scalekv]") {
  scale_aware_config sc;
  sc.scales = 3;
  sc.base_capacity = 8;
  sc.softmax = true;  // the option: probabilities instead of raw logits
  const auto cfg = evtest::config(1, KV, QH, D, 64, 12);
  cache<heap_memory, scale_aware> c(cfg, heap_memory{}, scale_aware(sc));
  const seq_id s = c.open().value();
  std::mt19937 rng(1);
  const std::vector<std::uint32_t> one{0}, four(4, 1), sixteen(16, 2);
  auto k1 = evtest::randn(rng, KV * D), q1 = evtest::randn(rng, QH * D);
  evtest::append(c, s, 0, k1, k1, 1);
  REQUIRE(c.observe(s, 0, scale_signal{one.data(), 1}, query_signal{q1.data(), dtype::f32, 1}).ok());
  auto k4 = evtest::randn(rng, 4 * KV * D), q4 = evtest::randn(rng, 4 * QH * D);
  evtest::append(c, s, 0, k4, k4, 4);
  const std::vector<std::uint32_t> dec{1, 1, 0, 0};
  CHECK(c.observe(s, 0, scale_signal{dec.data(), 4}, query_signal{q4.data(), dtype::f32, 4}).code() ==
        errc::signal_mismatch);
  CHECK(c.observe(s, 0, scale_signal{four.data(), 4}, query_signal{q4.data(), dtype::f32, 3}).code() ==
        errc::shape_mismatch);
  CHECK(c.observe(s, 0, scale_signal{four.data(), 4, 1, 3}, query_signal{q4.data(), dtype::f32, 4})
            .code() == errc::shape_mismatch);
  CHECK(c.observe(s, 0, scale_signal{four.data(), 9}, query_signal{q4.data(), dtype::f32, 4}).code() ==
        errc::shape_mismatch);
  const std::vector<std::uint32_t> too_big(4, 7);
  CHECK(c.observe(s, 0, scale_signal{too_big.data(), 4}, query_signal{q4.data(), dtype::f32, 4})
            .code() == errc::signal_mismatch);
  REQUIRE(c.observe(s, 0, scale_signal{four.data(), 4, 2, 2}, query_signal{q4.data(), dtype::f32, 4})
              .ok());
  REQUIRE(c.evict(s, 0).ok());
  CHECK(evtest::view(c, s, 0).live[0] == 5);  // under the base: no compression
  auto k16 = evtest::randn(rng, 16 * KV * D), q16 = evtest::randn(rng, 16 * QH * D);
  evtest::append(c, s, 0, k16, k16, 16);
  auto bad = q16;
  bad[0] = std::numeric_limits<float>::quiet_NaN();
  CHECK(c.observe(s, 0, scale_signal{sixteen.data(), 16}, query_signal{bad.data(), dtype::f32, 16})
            .code() == errc::invalid_argument);
  REQUIRE(c.evict(s, 0).ok());
  CHECK(evtest::view(c, s, 0).live[0] == 21);  // nothing scored: nothing evicted
  REQUIRE(c.observe(s, 0, scale_signal{sixteen.data(), 16}, query_signal{q16.data(), dtype::f32, 16})
              .ok());
  REQUIRE(c.evict(s, 0).ok());
  const auto v = evtest::view(c, s, 0);
  for (std::uint32_t h = 0; h < KV; ++h) {
    // Cap min(cache budget 12, base 8) is below the 16 observation tokens (every token of a
    // 4x4 map is a patch centre): only they stay, as in the released code.
    CHECK(v.live[h] == 16);
    CHECK(*kept(v, h).begin() == 5);
  }
}

TEST_CASE("budgets: ratios, tables, ScaleKV's released table and roles", "[evict][budget]") {
  CHECK(budget_from_ratio(1000, 0.1) == 100);
  CHECK(budget_from_ratio(5, 0.1) == 1);
  const auto t8 = scalekv_infinity_8b_10pct();
  CHECK(t8.layers() == 40);
  CHECK(t8.at(7, 0) == 0);
  CHECK(t8.at(8, 0) == 909);
  CHECK(t8.at(8, 3) == 629);
  CHECK(t8.at(12, 2) == 6200);
  CHECK(t8.at(12, 39) == 200);
  CHECK(t8.at(20, 39) == 200);  // past the end: the last row
  for (std::size_t r = 8; r < t8.rows(); ++r) {
    std::uint64_t sum = 0;
    for (std::uint32_t l = 0; l < 40; ++l) sum += t8.at(r, l);
    CHECK(sum == 40u * 650u);  // the average stays 650
  }
  CHECK(refiner_budget(40, 3, 650, 1464) == 584);
  CHECK(refiner_budget(4, 4, 650, 10) == 0);

  // Apply a (layer x step) table to a cache; bad tables change nothing.
  const auto cfg = evtest::config(2, 2, 2, 4, 64);
  cache<heap_memory, sink_window> c(cfg, heap_memory{}, sink_window(2));
  const budget_table steps(2, {{32, 16}, {8, 0}});
  REQUIRE(steps.apply(c, 0).ok());
  CHECK(c.budget(0) == 32);
  CHECK(c.budget(1) == 16);
  REQUIRE(steps.apply(c, 5).ok());  // the last row: layer 1 has no entry and keeps 16
  CHECK(c.budget(0) == 8);
  CHECK(c.budget(1) == 16);
  CHECK(budget_table(2, {{100, 1}}).apply(c, 0).code() == errc::invalid_budget);
  CHECK(budget_table(3, {{1, 1, 1}}).apply(c, 0).code() == errc::invalid_budget);
  CHECK(c.budget(0) == 8);

  // sink_window goes through the same per-head budgets.
  const std::uint32_t ph[2] = {6, 4};
  REQUIRE(c.set_budget(0, std::span<const std::uint32_t>(ph)).ok());
  const seq_id s = c.open().value();
  std::vector<float> k(20 * 2 * 4, 1.0f);
  evtest::append(c, s, 0, k, k, 20);
  REQUIRE(c.evict(s, 0).ok());
  auto v = evtest::view(c, s, 0);
  CHECK(kept(v, 0) == std::set<std::int32_t>{0, 1, 16, 17, 18, 19});
  CHECK(kept(v, 1) == std::set<std::int32_t>{0, 1, 18, 19});
  REQUIRE(c.set_budget(0, 5).ok());  // a layer budget clears the per-head ones
  CHECK(c.budget(0, 0) == 5);
}

TEST_CASE("budgets: attention selectivity tells drafters from refiners", "[evict][budget][scalekv]") {
  // 8 slots: 0..5 earlier scales, 6..7 the current map.
  const std::uint8_t cur[8] = {0, 0, 0, 0, 0, 0, 1, 1};
  const float refiner[8] = {0, 0, 0, 0, 0, 0.05f, 0.5f, 0.45f};    // on the current map
  const float focused[8] = {0.9f, 0, 0, 0, 0, 0, 0.05f, 0.05f};   // one earlier token
  const float drafter[8] = {0.16f, 0.16f, 0.16f, 0.16f, 0.16f, 0.16f, 0.02f, 0.02f};  // spread
  const double a = attention_selectivity(refiner, 1, 8, cur);
  const double b = attention_selectivity(focused, 1, 8, cur);
  const double d = attention_selectivity(drafter, 1, 8, cur);
  CHECK(a > 0.9);
  CHECK(b > 0.9);
  CHECK(d < 0.1);
  const auto roles = classify_layers({a, d, b}, 1);
  CHECK(roles[1] == layer_role::drafter);
  CHECK(roles[0] == layer_role::refiner);
  const auto table = scale_budgets(3, 1, {roles}, {{900, refiner_budget(3, 1, 650, 900)}});
  CHECK(table.at(0, 1) == 0);
  CHECK(table.at(1, 1) == 900);
  CHECK(table.at(1, 0) == 525);
}
