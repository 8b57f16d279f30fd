// SPDX-License-Identifier: Apache-2.0
//! @file
//! Eviction cost per decode step against the reference attention step over the same cache.
//!
//! One layer, 8 KV heads, 32 query heads (GQA 4), head dim 128, fp16, n cached tokens
//! (1k, 4k, 16k, 32k). Every iteration runs, on the same cache and the same instant:
//!   attention  reference::attention for one decode query (with the probabilities out), timed;
//!   policy     the policy's work for that step: observe() (score update) + evict() (victim
//!              choice), timed apart (manual time = this).
//! The counter `pct_attn` = 100 * policy time / attention time over the same iterations (paired,
//! so machine drift cancels). Target: <= 5% on the host for the per-step policies.
//!
//! Policies:
//!   h2o_probs   heavy_hitter<attention_signal>: the step's [32][n] probabilities
//!   h2o_sums    heavy_hitter<attention_sum_signal>: their per-key sums (a fused kernel's output)
//!   h2o_query   heavy_hitter<query_signal>: only the query; probabilities recomputed vs keys
//!   sink_window StreamingLLM (no signal)
//!   snapkv      one-shot at the end of prefill (32 window queries, budget min(2048, n/2)):
//!               paid once per prompt, shown against one decode attention step
//!   scalekv     once per scale: a 32x32 map's 1024 queries (16 observed), cap n/2; paid once per
//!               scale, shown against one single-query attention step
//! FlexGen mode for the per-step policies: budget n, max_tokens n + 1, each step appends into the
//! slot the previous step freed.
#include "ratio_reporter.hpp"

#include <kvcache/cache.hpp>
#include <kvcache/evict/heavy_hitter.hpp>
#include <kvcache/evict/scale_aware.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/evict/snapkv.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/reference/attention.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace kv = kvcache;
using clk = std::chrono::steady_clock;

namespace {

constexpr std::uint32_t kKv = 8, kQh = 32, kDim = 128;

kv::cache_config config(std::uint32_t max_tokens, std::uint32_t budget) {
  kv::cache_config c;
  c.geo = kv::geometry{1, kKv, kQh, kDim, kv::dtype::f16};
  c.max_tokens = max_tokens;
  c.budget = budget;
  return c;
}

void check(const kv::status& st, const char* what) {
  if (!st) {
    std::fprintf(stderr, "bench_evict: %s: %s\n", what, st.message().c_str());
    std::abort();
  }
}

//! Random fp16 K/V rows and fp32 queries, generated once.
struct data {
  std::vector<std::uint16_t> kv;  // [chunk][kKv][kDim]
  std::vector<float> q;           // [queries][kQh][kDim]
  explicit data(std::uint32_t chunk, std::uint32_t queries) {
    std::mt19937 rng(1);
    std::normal_distribution<float> g(0.0f, 1.0f);
    kv.resize(std::size_t{chunk} * kKv * kDim);
    for (auto& x : kv) x = kv::float_to_half(g(rng));
    q.resize(std::size_t{queries} * kQh * kDim);
    for (auto& x : q) x = g(rng);
  }
};

template <class C>
void fill(C& c, kv::seq_id s, std::uint32_t n, const data& d, std::uint32_t chunk) {
  for (std::uint32_t done = 0; done < n;) {
    const std::uint32_t t = std::min(chunk, n - done);
    const kv::kv_tensor kt{d.kv.data(), kv::dtype::f16, t, kKv, kDim};
    check(c.append(s, 0, kt, kt), "append");
    done += t;
  }
}

double secs(clk::time_point a, clk::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct totals {
  double policy = 0, attention = 0;
  void report(benchmark::State& st) const {
    st.counters["pct_attn"] = attention > 0 ? 100.0 * policy / attention : 0.0;
    st.counters["attn_ms"] = attention / static_cast<double>(st.iterations()) * 1e3;
  }
};

//! The per-decode-step policies (FlexGen steady state).
template <class Policy>
void per_step(benchmark::State& st, std::uint32_t n, Policy policy) {
  using C = kv::cache<kv::heap_memory, Policy>;
  C c(config(n + 1, n), kv::heap_memory{}, std::move(policy));
  const data d(4096, 1);
  const kv::seq_id s = c.open(n + 1).value();
  fill(c, s, n, d, 4096);
  std::vector<float> out(std::size_t{kQh} * kDim), probs;
  const kv::kv_tensor one{d.kv.data(), kv::dtype::f16, 1, kKv, kDim};
  totals t;
  for (auto _ : st) {
    check(c.append(s, 0, one, one), "append");
    const kv::layer_view v = c.view(s, 0).value();
    probs.resize(std::size_t{kQh} * v.rows);
    const auto a0 = clk::now();
    check(kv::reference::attention(v, kQh, d.q.data(), 1, nullptr, out.data(), probs.data()),
          "attention");
    const auto a1 = clk::now();
    benchmark::DoNotOptimize(out.data());
    if constexpr (C::template consumes<kv::attention_signal>)
      check(c.observe(s, 0, kv::attention_signal{probs.data(), kQh, 1, v.rows}), "observe");
    if constexpr (C::template consumes<kv::attention_sum_signal>)
      check(c.observe(s, 0, kv::attention_sum_signal{probs.data(), kQh, v.rows}), "observe");
    if constexpr (C::template consumes<kv::query_signal>)
      check(c.observe(s, 0, kv::query_signal{d.q.data(), kv::dtype::f32, 1}), "observe");
    check(c.evict(s, 0), "evict");
    const auto a2 = clk::now();
    t.attention += secs(a0, a1);
    t.policy += secs(a1, a2);
    st.SetIterationTime(secs(a1, a2));
  }
  t.report(st);
}

//! SnapKV: the one-shot compression of an n-token prompt.
void snapkv_once(benchmark::State& st, std::uint32_t n) {
  const std::uint32_t C = std::min(2048u, n / 2), w = 32;
  kv::cache<kv::heap_memory, kv::snapkv<>> c(config(n, C));
  const data d(4096, w);
  std::vector<float> out(std::size_t{kQh} * kDim), probs;
  totals t;
  for (auto _ : st) {
    const kv::seq_id s = c.open(n).value();
    fill(c, s, n, d, 4096);
    const kv::layer_view v = c.view(s, 0).value();
    probs.resize(std::size_t{kQh} * v.rows);
    const auto a0 = clk::now();
    check(kv::reference::attention(v, kQh, d.q.data(), 1, nullptr, out.data(), probs.data()),
          "attention");
    const auto a1 = clk::now();
    check(c.observe(s, 0, kv::query_signal{d.q.data(), kv::dtype::f32, w}), "observe");
    check(c.evict(s, 0), "evict");
    const auto a2 = clk::now();
    t.attention += secs(a0, a1);
    t.policy += secs(a1, a2);
    st.SetIterationTime(secs(a1, a2));
    check(c.close(s), "close");
  }
  t.report(st);
}

//! ScaleKV: compression after a scale whose 32x32 map (1024 tokens) ends the n cached tokens.
void scalekv_once(benchmark::State& st, std::uint32_t n) {
  const std::uint32_t len = std::min(1024u, n / 4), side = len == 1024 ? 32 : 16;
  kv::scale_aware_config sc;
  sc.budgets = kv::budget_table::uniform(1, n / 2);
  kv::cache<kv::heap_memory, kv::scale_aware> c(config(n, n), kv::heap_memory{},
                                                 kv::scale_aware(sc));
  const data d(4096, len);
  std::vector<std::uint32_t> ids(n, 0);
  std::fill(ids.end() - len, ids.end(), 9u);
  std::vector<float> out(std::size_t{kQh} * kDim), probs;
  totals t;
  for (auto _ : st) {
    const kv::seq_id s = c.open(n).value();
    fill(c, s, n, d, 4096);
    const kv::layer_view v = c.view(s, 0).value();
    probs.resize(std::size_t{kQh} * v.rows);
    const auto a0 = clk::now();
    check(kv::reference::attention(v, kQh, d.q.data(), 1, nullptr, out.data(), probs.data()),
          "attention");
    const auto a1 = clk::now();
    check(c.observe(s, 0, kv::scale_signal{ids.data(), n, side, side},
                    kv::query_signal{d.q.data(), kv::dtype::f32, len}),
          "observe");
    check(c.evict(s, 0), "evict");
    const auto a2 = clk::now();
    t.attention += secs(a0, a1);
    t.policy += secs(a1, a2);
    st.SetIterationTime(secs(a1, a2));
    check(c.close(s), "close");
  }
  t.report(st);
}

std::string tokens_name(std::uint32_t n) { return std::to_string(n / 1024) + "k"; }

}  // namespace

int main(int argc, char** argv) {
  std::vector<kvcache_bench::ratio_pair> pairs;
  for (std::uint32_t n : {1024u, 4096u, 16384u, 32768u}) {
    const std::string p = "evict/" + tokens_name(n) + "/";
    const int iters = n <= 1024 ? 200 : n <= 4096 ? 50 : n <= 16384 ? 12 : 6;
    auto reg = [&](const std::string& name, auto fn) {
      benchmark::RegisterBenchmark((p + name).c_str(), fn)
          ->UseManualTime()
          ->Iterations(iters)
          ->Unit(benchmark::kMicrosecond);
    };
    const kv::heavy_hitter_config hc{0.1f, 0.1f, n / 2, n / 2};
    reg("h2o_probs", [=](benchmark::State& s) { per_step(s, n, kv::heavy_hitter<>(hc)); });
    reg("h2o_sums", [=](benchmark::State& s) {
      per_step(s, n, kv::heavy_hitter<kv::attention_sum_signal>(hc));
    });
    reg("h2o_query", [=](benchmark::State& s) {
      per_step(s, n, kv::heavy_hitter<kv::query_signal>(hc));
    });
    reg("sink_window", [=](benchmark::State& s) { per_step(s, n, kv::sink_window(4)); });
    reg("snapkv", [=](benchmark::State& s) { snapkv_once(s, n); });
    reg("scalekv", [=](benchmark::State& s) { scalekv_once(s, n); });
  }
  return kvcache_bench::run_with_ratios(argc, argv, std::move(pairs));
}
