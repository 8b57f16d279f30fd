// SPDX-License-Identifier: Apache-2.0
//! @file
//! How much page-mapping time `map_ahead` (vAttention's step_async) hides behind compute, on the
//! host backend. A decode loop over a `cache<host_vmm>` of a Llama-3-8B-like model (32 layers,
//! 8 KV heads x 128 x fp16 = 2 KiB per token and layer, 64 KiB pages = 32 tokens per page):
//! every step appends one token to each layer, then "computes" (a busy wait of `compute_us`,
//! standing in for the step's attention and MLPs). Every 32 steps all 64 K/V ranges cross into
//! a new page at once: 64 pages to map.
//!
//!   sync   pages are mapped inside append (prepare), on the decode thread;
//!   ahead  after its appends each step calls map_ahead(seq, lookahead, cap) before computing
//!          (cap: pages per step, 0 = none; a cap with a page's worth of look-ahead spreads
//!          the 64-page burst of a crossing over 8 steps);
//!   floor  the ranges are already mapped (a reused idle sequence): no mapping at all.
//!
//! The three run interleaved, round by round, so they see the same machine; per-step medians
//! give `hidden = (sync - ahead) / (sync - floor)`: the share of mapping time taken off the
//! decode thread (target on a GPU: >= 90%). Needs a second core for the background thread.
#include <kvcache/cache.hpp>
#include <kvcache/memory/host_vmm.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace kv = kvcache;

namespace {

using clk = std::chrono::steady_clock;

constexpr std::uint32_t layers = 32, kv_heads = 8, head_dim = 128;
constexpr std::uint32_t steps_per_round = 256;  // 8 page crossings per range
constexpr std::size_t page = 64 * 1024;

void check(const kv::status& st, const char* what) {
  if (st) return;
  std::fprintf(stderr, "bench_map_ahead: %s: %s\n", what, st.message().c_str());
  std::abort();
}

void spin_for(double us) {
  const auto end = clk::now() + std::chrono::duration<double, std::micro>(us);
  while (clk::now() < end) {
  }
}

using cache_t = kv::cache<kv::host_vmm>;

cache_t make_cache(bool deferred) {
  kv::cache_config cfg;
  cfg.geo = kv::geometry{layers, kv_heads, kv_heads, head_dim, kv::dtype::f16};
  cfg.max_tokens = steps_per_round;
  const std::size_t range_pages = steps_per_round * cfg.geo.token_bytes() / page;
  return cache_t(cfg, kv::host_vmm(kv::host_vmm_config{page, 2 * layers * range_pages, deferred}));
}

enum class mode { sync, ahead, floor };

// One round: a fresh sequence decodes steps_per_round tokens. Returns seconds per step.
double round(cache_t& c, mode m, double compute_us, std::uint32_t lookahead, std::size_t cap,
             const std::vector<std::byte>& token) {
  auto s = c.open(steps_per_round);
  check(s.ok() ? kv::status{} : s.error(), "open");
  const kv::seq_id seq = *s;
  const kv::kv_tensor t{token.data(), kv::dtype::f16, 1, kv_heads, head_dim};
  const auto t0 = clk::now();
  for (std::uint32_t step = 0; step < steps_per_round; ++step) {
    for (std::uint32_t l = 0; l < layers; ++l) check(c.append(seq, l, t, t), "append");
    if (m == mode::ahead) check(c.map_ahead({&seq, 1}, lookahead, cap), "map_ahead");
    spin_for(compute_us);
  }
  check(c.sync(), "sync");
  const auto t1 = clk::now();
  check(c.close(seq), "close");
  return std::chrono::duration<double>(t1 - t0).count() / steps_per_round;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void map_ahead_hiding(benchmark::State& state) {
  const double compute_us = static_cast<double>(state.range(0));
  const auto lookahead = static_cast<std::uint32_t>(state.range(1));
  const auto cap = static_cast<std::size_t>(state.range(2));
  std::vector<std::byte> token(kv_heads * head_dim * 2, std::byte{1});
  cache_t sync_c = make_cache(false), ahead_c = make_cache(false), floor_c = make_cache(true);
  for (auto* c : {&sync_c, &ahead_c, &floor_c})  // warm: every pool page used once
    round(*c, mode::sync, 0, lookahead, cap, token);
  const auto warm = ahead_c.stats().memory;
  std::vector<double> ts, ta, tf;
  for (auto _ : state) {
    ts.push_back(round(sync_c, mode::sync, compute_us, lookahead, cap, token));
    ta.push_back(round(ahead_c, mode::ahead, compute_us, lookahead, cap, token));
    tf.push_back(round(floor_c, mode::floor, compute_us, lookahead, cap, token));
  }
  const double s = median(ts), a = median(ta), f = median(tf);
  state.counters["sync_us"] = s * 1e6;
  state.counters["ahead_us"] = a * 1e6;
  state.counters["floor_us"] = f * 1e6;
  state.counters["map_us"] = (s - f) * 1e6;  // mapping cost per step on the decode thread
  state.counters["hidden"] = s > f ? (s - a) / (s - f) : 0.0;
  // share of the timed rounds' pages mapped in the background (the first page of each range
  // is mapped by the first append, before any look-ahead: at most 7/8 here)
  const auto m = ahead_c.stats().memory;
  const double total = double(m.pages_mapped_total - warm.pages_mapped_total);
  state.counters["ahead_share"] =
      total > 0 ? double(m.pages_mapped_ahead - warm.pages_mapped_ahead) / total : 0.0;
}

}  // namespace

// {compute per step (us), look-ahead (steps), pages per step (0: no cap)}
BENCHMARK(map_ahead_hiding)
    ->Args({0, 10, 0})
    ->Args({200, 10, 0})
    ->Args({200, 32, 8})
    ->Args({1000, 10, 0})
    ->Args({1000, 32, 8})
    ->Args({5000, 10, 0})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(9);

BENCHMARK_MAIN();
