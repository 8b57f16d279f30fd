// SPDX-License-Identifier: Apache-2.0
//! @file
//! snapkv against a direct re-implementation of its spec (max and avg pooling), its query path
//! against the engine's probabilities, no eviction during decode, and bad inputs.
#include <kvcache/cache.hpp>
#include <kvcache/evict/snapkv.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/reference/attention.hpp>

#include <algorithm>
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

//! SnapKV's spec over positions for one KV head: votes = mean over the group of the sum over
//! window rows; pooled over the prefix; top-(C - w) by (score, newer) plus the window.
std::set<std::int32_t> snapkv_oracle(const std::vector<std::vector<float>>& probs_by_pos,  // [G*w][n]
                                     std::uint32_t G, std::uint32_t w, std::uint32_t n,
                                     std::uint32_t C, std::uint32_t kernel, pooling pool) {
  std::set<std::int32_t> keep;
  if (n <= C) {
    for (std::uint32_t p = 0; p < n; ++p) keep.insert(static_cast<std::int32_t>(p));
    return keep;
  }
  const std::uint32_t prefix = n - w;
  std::vector<float> votes(prefix, 0.0f);
  for (std::uint32_t g = 0; g < G; ++g)
    for (std::uint32_t t = 0; t < w; ++t)
      for (std::uint32_t p = 0; p < prefix; ++p) votes[p] += probs_by_pos[g * w + t][p];
  for (auto& x : votes) x *= 1.0f / static_cast<float>(G);
  std::vector<float> pooled(prefix);
  const std::int64_t r = kernel / 2;
  for (std::int64_t i = 0; i < prefix; ++i) {
    float m = -std::numeric_limits<float>::infinity(), s = 0.0f;
    for (std::int64_t j = i - r; j <= i + r; ++j) {
      if (j < 0 || j >= prefix) continue;  // max: padding never wins; avg: zeros
      m = std::max(m, votes[static_cast<std::size_t>(j)]);
      s += votes[static_cast<std::size_t>(j)];
    }
    pooled[static_cast<std::size_t>(i)] = pool == pooling::max ? m : s / static_cast<float>(kernel);
  }
  std::vector<std::pair<float, std::int32_t>> order;
  for (std::uint32_t p = 0; p < prefix; ++p) order.push_back({pooled[p], static_cast<std::int32_t>(p)});
  std::sort(order.rbegin(), order.rend());  // (score desc, position desc): kept first
  for (std::uint32_t i = 0; i < C - w && i < order.size(); ++i) keep.insert(order[i].second);
  for (std::uint32_t p = prefix; p < n; ++p) keep.insert(static_cast<std::int32_t>(p));
  return keep;
}

}  // namespace

TEST_CASE("snapkv: kept sets equal the spec's (max and avg pooling); decode does not evict",
          "[evict][snapkv]") {
  constexpr std::uint32_t KV = 2, QH = 4, D = 4, P = 150, C = 80;
  const int cfgp = GENERATE(0, 1, 2);
  const auto seed = static_cast<unsigned>(cfgp + 1);
  snapkv_config sc;  // LongBench default: w 32, k 7, max
  if (cfgp == 1) sc = snapkv_config{64, 5, pooling::avg};  // the original class default
  if (cfgp == 2) sc = snapkv_config{16, 7, pooling::max};
  CHECK(snapkv_config{}.window == 32);
  std::mt19937 rng(seed);
  const auto cfg = evtest::config(1, KV, QH, D, 256, C);
  cache<heap_memory, snapkv<attention_signal>> c(cfg, heap_memory{}, snapkv<attention_signal>(sc));
  const seq_id s = c.open().value();
  const auto k = evtest::randn(rng, std::size_t{P} * KV * D);
  evtest::append(c, s, 0, k, k, P);
  const std::uint32_t w = sc.window;
  std::vector<std::map<std::int32_t, float>> vals(std::size_t{QH} * w);
  for (std::uint32_t qh = 0; qh < QH; ++qh)
    for (std::uint32_t t = 0; t < w; ++t)
      for (std::uint32_t p = 0; p <= P - w + t; ++p)  // causal within the window
        vals[std::size_t{qh} * w + t][static_cast<std::int32_t>(p)] = evtest::dyadic(rng);
  const auto v = evtest::view(c, s, 0);
  const auto probs = evtest::by_slot(v, QH, w, vals);
  // Nothing is evicted before the window is scored.
  REQUIRE(c.evict(s, 0).ok());
  CHECK(evtest::view(c, s, 0).live[0] == P);
  REQUIRE(c.observe(s, 0, attention_signal{probs.data(), QH, w, v.rows}).ok());
  REQUIRE(c.evict(s, 0).ok());
  const auto e = evtest::view(c, s, 0);
  for (std::uint32_t h = 0; h < KV; ++h) {
    std::vector<std::vector<float>> by_pos(2 * w, std::vector<float>(P, 0.0f));
    for (std::uint32_t g = 0; g < 2; ++g)
      for (std::uint32_t t = 0; t < w; ++t)
        for (const auto& [p, x] : vals[std::size_t{h * 2 + g} * w + t])
          by_pos[g * w + t][static_cast<std::size_t>(p)] = x;
    INFO("config " << cfgp << " head " << h);
    CHECK(kept(e, h) == snapkv_oracle(by_pos, 2, w, P, C, sc.kernel, sc.pool));
    CHECK(e.live[h] == C);
  }
  // Decode: appended with no eviction, into the holes first.
  for (std::uint32_t t = 0; t < 10; ++t) {
    const auto k1 = evtest::randn(rng, KV * D);
    evtest::append(c, s, 0, k1, k1, 1);
    REQUIRE(c.evict(s, 0).ok());
  }
  const auto d = evtest::view(c, s, 0);
  CHECK(d.live[0] == C + 10);
  CHECK(d.rows == P);
}

TEST_CASE("snapkv: queries scored against the cached keys equal the engine's probabilities",
          "[evict][snapkv]") {
  constexpr std::uint32_t KV = 2, QH = 4, D = 8, P = 120, C = 48, w = 32;
  std::mt19937 rng(9);
  const auto cfg = evtest::config(1, KV, QH, D, 256, C);
  cache<heap_memory, snapkv<attention_signal>> a(cfg);
  cache<heap_memory, snapkv<query_signal>> b(cfg);
  const seq_id sa = a.open().value(), sb = b.open().value();
  const auto k = evtest::randn(rng, std::size_t{P} * KV * D), q = evtest::randn(rng, std::size_t{P} * QH * D);
  evtest::append(a, sa, 0, k, k, P);
  evtest::append(b, sb, 0, k, k, P);
  const auto v = evtest::view(a, sa, 0);
  std::vector<std::int64_t> pos(w);
  for (std::uint32_t i = 0; i < w; ++i) pos[i] = P - w + i;
  std::vector<float> out(std::size_t{w} * QH * D), probs(std::size_t{QH} * w * v.rows);
  const float* qw = q.data() + std::size_t{P - w} * QH * D;
  REQUIRE(reference::attention(v, QH, qw, w, pos.data(), out.data(), probs.data()).ok());
  REQUIRE(a.observe(sa, 0, attention_signal{probs.data(), QH, w, v.rows}).ok());

  // Bad inputs first: refused, and nothing scored (evict still keeps everything).
  auto bad = q;
  bad[3] = std::numeric_limits<float>::infinity();
  CHECK(b.observe(sb, 0, query_signal{bad.data(), dtype::f32, P}).code() == errc::invalid_argument);
  CHECK(b.observe(sb, 0, query_signal{q.data(), dtype::f32, P + 1}).code() == errc::shape_mismatch);
  CHECK(b.observe(sb, 0, query_signal{nullptr, dtype::f32, 4}).code() == errc::invalid_argument);
  REQUIRE(b.evict(sb, 0).ok());
  CHECK(evtest::view(b, sb, 0).live[0] == P);

  // The engine may pass the whole prompt's queries: only the last w are used.
  REQUIRE(b.observe(sb, 0, query_signal{q.data(), dtype::f32, P}).ok());
  REQUIRE(a.evict(sa, 0).ok());
  REQUIRE(b.evict(sb, 0).ok());
  const auto ea = evtest::view(a, sa, 0), eb = evtest::view(b, sb, 0);
  for (std::uint32_t h = 0; h < KV; ++h) {
    CHECK(kept(ea, h) == kept(eb, h));
    CHECK(eb.live[h] == C);
    for (std::int32_t p = P - w; p < static_cast<std::int32_t>(P); ++p) CHECK(kept(eb, h).count(p) == 1);
  }
}

TEST_CASE("snapkv: a prompt within the budget is kept whole", "[evict][snapkv]") {
  const auto cfg = evtest::config(1, 2, 2, 4, 64, 40);
  cache<heap_memory, snapkv<>> c(cfg);
  const seq_id s = c.open().value();
  std::vector<float> k(30 * 2 * 4, 0.5f), q(30 * 2 * 4, 0.25f);
  evtest::append(c, s, 0, k, k, 30);
  REQUIRE(c.observe(s, 0, query_signal{q.data(), dtype::f32, 30}).ok());
  REQUIRE(c.evict(s, 0).ok());
  CHECK(evtest::view(c, s, 0).live[0] == 30);
}

TEST_CASE("softmax of query-key logits never yields NaN (NaN keys, overflowed logits)", "[snapkv][score]") {
  // The query path of SnapKV and H2O scores keys by softmax(q·Kᵀ/√D); passthrough stores NaN
  // keys as given and large finite keys overflow q·k to ±inf. A NaN probability would make the
  // scores unordered for victim selection.
  constexpr float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto sum_of = [](const std::vector<float>& x) {
    float s = 0.0f;
    for (float v : x) s += v;
    return s;
  };
  std::vector<float> a{1.0f, nan, 2.0f, -inf};
  softmax_inplace(a.data(), 4);
  CHECK(a[1] == 0.0f);
  CHECK(a[3] == 0.0f);
  CHECK(a[2] > a[0]);
  CHECK(sum_of(a) == Approx(1.0f));

  std::vector<float> b{inf, 3.0f, inf, nan};
  softmax_inplace(b.data(), 4);
  CHECK(b == std::vector<float>{0.5f, 0.0f, 0.5f, 0.0f});

  std::vector<float> c{nan, nan};
  softmax_inplace(c.data(), 2);
  CHECK(c == std::vector<float>{0.0f, 0.0f});
}
