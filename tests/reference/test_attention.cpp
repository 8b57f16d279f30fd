// SPDX-License-Identifier: Apache-2.0
//! @file
//! reference::attention against a dense softmax written out here in double precision: GQA
//! folding, causal masking by query position, empty slots, the probabilities' layout.
#include <kvcache/reference/attention.hpp>

#include <kvcache/cache.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/memory/heap.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"

using kvcache::errc;
using kvcache::layer_view;

namespace {

//! K/V in fp32 `[rows][heads][dim]` (token-major) with positions `[rows][heads]`, -1 = empty.
struct dense_kv {
  std::uint32_t rows = 0, heads = 0, dim = 0;
  std::vector<float> k, v;
  std::vector<std::int32_t> pos;

  float key(std::uint32_t s, std::uint32_t h, std::uint32_t d) const { return k[(std::size_t{s} * heads + h) * dim + d]; }
  float val(std::uint32_t s, std::uint32_t h, std::uint32_t d) const { return v[(std::size_t{s} * heads + h) * dim + d]; }

  layer_view view() {
    layer_view lv;
    lv.k = reinterpret_cast<std::byte*>(k.data());
    lv.v = reinterpret_cast<std::byte*>(v.data());
    lv.slot_stride = std::size_t{heads} * dim * sizeof(float);
    lv.head_stride = std::size_t{dim} * sizeof(float);
    lv.row_bytes = lv.head_stride;
    lv.type = kvcache::dtype::f32;
    lv.kv_heads = heads;
    lv.head_dim = dim;
    lv.rows = rows;
    lv.positions = pos.data();
    return lv;
  }
};

dense_kv random_kv(std::uint32_t rows, std::uint32_t heads, std::uint32_t dim, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  dense_kv kv{rows, heads, dim, {}, {}, {}};
  kv.k.resize(std::size_t{rows} * heads * dim);
  kv.v.resize(kv.k.size());
  for (auto& x : kv.k) x = u(rng);
  for (auto& x : kv.v) x = u(rng);
  // Slot order is arbitrary: positions are a per-head permutation of 0..rows-1.
  kv.pos.resize(std::size_t{rows} * heads);
  for (std::uint32_t h = 0; h < heads; ++h) {
    std::vector<std::int32_t> p(rows);
    for (std::uint32_t s = 0; s < rows; ++s) p[s] = static_cast<std::int32_t>(s);
    std::shuffle(p.begin(), p.end(), rng);
    for (std::uint32_t s = 0; s < rows; ++s) kv.pos[std::size_t{s} * heads + h] = p[s];
  }
  return kv;
}

//! The dense computation, in double: out `[queries][query_heads][dim]`, probs `[qh][t][rows]`.
void direct(const dense_kv& kv, std::uint32_t query_heads, const std::vector<float>& q,
            std::uint32_t queries, const std::int64_t* qpos, bool causal, double scale,
            std::vector<double>& out, std::vector<double>& probs) {
  const std::uint32_t G = query_heads / kv.heads, D = kv.dim, R = kv.rows;
  out.assign(std::size_t{queries} * query_heads * D, 0.0);
  probs.assign(std::size_t{query_heads} * queries * R, 0.0);
  for (std::uint32_t t = 0; t < queries; ++t)
    for (std::uint32_t qh = 0; qh < query_heads; ++qh) {
      const std::uint32_t h = qh / G;
      std::vector<double> w(R, 0.0);
      std::vector<bool> visible(R, false);
      double mx = -std::numeric_limits<double>::infinity();
      for (std::uint32_t s = 0; s < R; ++s) {
        const std::int32_t p = kv.pos[std::size_t{s} * kv.heads + h];
        if (p < 0 || (causal && qpos && p > qpos[t])) continue;
        double dot = 0.0;
        for (std::uint32_t d = 0; d < D; ++d)
          dot += static_cast<double>(q[(std::size_t{t} * query_heads + qh) * D + d]) * kv.key(s, h, d);
        w[s] = dot * scale;
        visible[s] = true;
        mx = std::max(mx, w[s]);
      }
      double sum = 0.0;
      for (std::uint32_t s = 0; s < R; ++s) {
        w[s] = visible[s] ? std::exp(w[s] - mx) : 0.0;
        sum += w[s];
      }
      for (std::uint32_t s = 0; s < R; ++s) {
        const double p = sum > 0 ? w[s] / sum : 0.0;
        probs[(std::size_t{qh} * queries + t) * R + s] = p;
        for (std::uint32_t d = 0; d < D; ++d)
          out[(std::size_t{t} * query_heads + qh) * D + d] += p * kv.val(s, h, d);
      }
    }
}

std::vector<float> random_queries(std::uint32_t queries, std::uint32_t query_heads,
                                  std::uint32_t dim, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> q(std::size_t{queries} * query_heads * dim);
  for (auto& x : q) x = u(rng);
  return q;
}

//! Elements where the library and the direct computation differ by more than float rounding.
std::size_t differences(const std::vector<float>& got, const std::vector<double>& want) {
  std::size_t bad = got.size() == want.size() ? 0 : 1;
  for (std::size_t i = 0; i < got.size() && i < want.size(); ++i)
    if (!(got[i] == Approx(want[i]).epsilon(1e-4).margin(1e-5))) ++bad;
  return bad;
}

}  // namespace

TEST_CASE("reference::attention matches a dense softmax (GQA, causal, empty slots)",
          "[reference]") {
  const std::uint32_t group = GENERATE(1u, 2u, 4u);
  const std::uint32_t H = 2, D = 16, R = 12, T = 3, QH = H * group;
  std::mt19937 rng(100 + group);
  dense_kv kv = random_kv(R, H, D, rng);
  // Evicted slots: different ones per head.
  kv.pos[std::size_t{3} * H + 0] = -1;
  kv.pos[std::size_t{7} * H + 1] = -1;
  kv.pos[std::size_t{8} * H + 1] = -1;
  const auto q = random_queries(T, QH, D, rng);
  const std::int64_t qpos[T] = {5, 9, 11};

  std::vector<float> out(std::size_t{T} * QH * D, -7.0f), probs(std::size_t{QH} * T * R, -7.0f);
  REQUIRE(kvcache::reference::attention(kv.view(), QH, q.data(), T, qpos, out.data(), probs.data()).ok());

  std::vector<double> want_out, want_probs;
  direct(kv, QH, q, T, qpos, true, 1.0 / std::sqrt(double{D}), want_out, want_probs);
  CHECK(differences(out, want_out) == 0);
  CHECK(differences(probs, want_probs) == 0);

  // Per (query head, query): a distribution over the visible slots of its kv head, zero elsewhere.
  std::size_t bad_sum = 0, leaked = 0;
  for (std::uint32_t qh = 0; qh < QH; ++qh)
    for (std::uint32_t t = 0; t < T; ++t) {
      double sum = 0.0;
      for (std::uint32_t s = 0; s < R; ++s) {
        const float p = probs[(std::size_t{qh} * T + t) * R + s];
        const std::int32_t pos = kv.pos[std::size_t{s} * H + qh / group];
        if ((pos < 0 || pos > qpos[t]) && p != 0.0f) ++leaked;
        sum += p;
      }
      if (std::fabs(sum - 1.0) > 1e-5) ++bad_sum;
    }
  CHECK(bad_sum == 0);
  CHECK(leaked == 0);

  // Without probabilities requested the output is the same.
  std::vector<float> out2(out.size(), 0.0f);
  REQUIRE(kvcache::reference::attention(kv.view(), QH, q.data(), T, qpos, out2.data()).ok());
  CHECK(out2 == out);
}

TEST_CASE("reference::attention: non-causal and position-less queries see every live key",
          "[reference]") {
  const std::uint32_t H = 2, D = 8, R = 6, T = 2, QH = 4;
  std::mt19937 rng(7);
  dense_kv kv = random_kv(R, H, D, rng);
  kv.pos[std::size_t{2} * H + 1] = -1;
  const auto q = random_queries(T, QH, D, rng);
  const std::int64_t qpos[T] = {0, 1};  // causal would hide almost everything
  std::vector<float> out(std::size_t{T} * QH * D), probs(std::size_t{QH} * T * R);
  std::vector<double> want_out, want_probs;
  direct(kv, QH, q, T, nullptr, false, 1.0 / std::sqrt(double{D}), want_out, want_probs);

  kvcache::reference::attention_options opt;
  opt.causal = false;
  REQUIRE(kvcache::reference::attention(kv.view(), QH, q.data(), T, qpos, out.data(), probs.data(),
                                        kvcache::passthrough{}, opt).ok());
  CHECK(differences(out, want_out) == 0);
  CHECK(differences(probs, want_probs) == 0);

  REQUIRE(kvcache::reference::attention(kv.view(), QH, q.data(), T, nullptr, out.data(), probs.data()).ok());
  CHECK(differences(out, want_out) == 0);
  CHECK(differences(probs, want_probs) == 0);

  // A custom scale.
  opt.scale = 0.5f;
  direct(kv, QH, q, T, nullptr, false, 0.5, want_out, want_probs);
  REQUIRE(kvcache::reference::attention(kv.view(), QH, q.data(), T, nullptr, out.data(), probs.data(),
                                        kvcache::passthrough{}, opt).ok());
  CHECK(differences(out, want_out) == 0);
  CHECK(differences(probs, want_probs) == 0);
}

TEST_CASE("reference::attention: a query that sees no key gets zeros", "[reference]") {
  std::mt19937 rng(9);
  dense_kv kv = random_kv(4, 1, 4, rng);
  const auto q = random_queries(1, 1, 4, rng);
  const std::int64_t qpos[1] = {-1};
  std::vector<float> out(4, 5.0f), probs(4, 5.0f);
  REQUIRE(kvcache::reference::attention(kv.view(), 1, q.data(), 1, qpos, out.data(), probs.data()).ok());
  CHECK(out == std::vector<float>(4, 0.0f));
  CHECK(probs == std::vector<float>(4, 0.0f));
}

TEST_CASE("reference::attention over a cache view after eviction (f16, head_major)",
          "[reference]") {
  const std::uint32_t H = 2, QH = 4, D = 8, N = 10;
  kvcache::cache_config cfg;
  cfg.geo = kvcache::geometry{1, H, QH, D, kvcache::dtype::f16};
  cfg.max_tokens = 12;
  cfg.budget = 6;
  cfg.order = kvcache::layout::head_major;
  kvcache::cache<kvcache::heap_memory, kvcache::sink_window> c(cfg, kvcache::heap_memory{},
                                                              kvcache::sink_window(2));
  auto s = c.open();
  REQUIRE(s.ok());

  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<std::uint16_t> k(std::size_t{N} * H * D), v(k.size());
  for (auto& x : k) x = kvcache::float_to_half(u(rng));
  for (auto& x : v) x = kvcache::float_to_half(u(rng));
  const kvcache::kv_tensor kt{k.data(), kvcache::dtype::f16, N, H, D};
  const kvcache::kv_tensor vt{v.data(), kvcache::dtype::f16, N, H, D};
  REQUIRE(c.append(*s, 0, kt, vt).ok());
  REQUIRE(c.evict(*s, 0).ok());  // keeps positions 0, 1 and 6..9: four empty slots per head
  auto view = c.view(*s, 0);
  REQUIRE(view.ok());
  REQUIRE(view->rows == N);
  REQUIRE(!view->dense);

  // The same keys and values, decoded by hand, in a dense fp32 copy with the view's positions.
  dense_kv kv{N, H, D, {}, {}, {}};
  kv.k.resize(k.size());
  kv.v.resize(v.size());
  kv.pos.assign(view->positions, view->positions + std::size_t{N} * H);
  for (std::size_t i = 0; i < k.size(); ++i) {
    kv.k[i] = kvcache::half_to_float(k[i]);  // prefill: slot s holds position s
    kv.v[i] = kvcache::half_to_float(v[i]);
  }
  std::size_t empty = 0;
  for (auto p : kv.pos) empty += p < 0;
  CHECK(empty == 2 * 4);

  // dequantize() gives the fp32 [rows][heads][dim] of the view.
  std::vector<float> dk, dv;
  kvcache::reference::dequantize(*view, dk, dv);
  CHECK(dk == kv.k);
  CHECK(dv == kv.v);

  const std::uint32_t T = 2;
  const auto q = random_queries(T, QH, D, rng);
  const std::int64_t qpos[T] = {7, 9};
  std::vector<float> out(std::size_t{T} * QH * D), probs(std::size_t{QH} * T * N);
  REQUIRE(kvcache::reference::attention(*view, QH, q.data(), T, qpos, out.data(), probs.data()).ok());
  std::vector<double> want_out, want_probs;
  direct(kv, QH, q, T, qpos, true, 1.0 / std::sqrt(double{D}), want_out, want_probs);
  CHECK(differences(out, want_out) == 0);
  CHECK(differences(probs, want_probs) == 0);
  // Evicted positions 2..5 get no probability.
  std::size_t leaked = 0;
  for (std::uint32_t qh = 0; qh < QH; ++qh)
    for (std::uint32_t t = 0; t < T; ++t)
      for (std::uint32_t r = 2; r < 6; ++r) leaked += probs[(std::size_t{qh} * T + t) * N + r] != 0.0f;
  CHECK(leaked == 0);
}

TEST_CASE("reference::attention: shape and argument errors", "[reference]") {
  std::mt19937 rng(3);
  dense_kv kv = random_kv(4, 2, 4, rng);
  const auto q = random_queries(1, 4, 4, rng);
  std::vector<float> out(16);
  CHECK(kvcache::reference::attention(kv.view(), 3, q.data(), 1, nullptr, out.data()).code() ==
        errc::shape_mismatch);
  CHECK(kvcache::reference::attention(kv.view(), 0, q.data(), 1, nullptr, out.data()).code() ==
        errc::shape_mismatch);
  CHECK(kvcache::reference::attention(kv.view(), 1, q.data(), 1, nullptr, out.data()).code() ==
        errc::shape_mismatch);  // fewer query heads than kv heads
  CHECK(kvcache::reference::attention(kv.view(), 4, nullptr, 1, nullptr, out.data()).code() ==
        errc::invalid_argument);
  CHECK(kvcache::reference::attention(kv.view(), 4, q.data(), 1, nullptr, nullptr).code() ==
        errc::invalid_argument);
  CHECK(kvcache::reference::attention(kv.view(), 4, nullptr, 0, nullptr, nullptr).ok());
  const auto st = kvcache::reference::attention(kv.view(), 3, q.data(), 1, nullptr, out.data());
  CHECK(st.message().find("3") != std::string::npos);
}
