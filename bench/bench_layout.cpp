// SPDX-License-Identifier: Apache-2.0
//! @file
//! What head_major costs against token_major on `host_vmm`, and what one range per sequence for
//! all layers (range_scope::per_sequence, vAttention's "megacache") saves.
//!
//! Each iteration grows one sequence to `len` tokens by decode appends (1 token per layer per
//! step) and closes it; deferred reclamation keeps the ranges mapped, so after the first
//! iteration nothing is mapped (the steady state). Reported per (sequence, layer, K|V) range, for
//! a sequence of `len` tokens (deterministic counters, bytes; k = 1024):
//!   backed   memory mapped behind the range
//!   used     bytes below the frontiers (len x kv_heads x head_dim x 2 bytes)
//!   wasted   backed - used: token_major wastes at most one partly filled page per range,
//!            head_major one per KV head (each head's region is page aligned)
//!            per_sequence one per sequence for all layers (K and V)
//!   cold_maps  mmap calls of the first growth (before deferred reclamation has pages to reuse)
//! and the append throughput (K+V bytes/s), whose ratios head_major / token_major and
//! per_sequence / token_major are printed, also paired (x_token_major: each iteration is
//! followed by a token_major one).
#include "ratio_reporter.hpp"

#include <kvcache/cache.hpp>
#include <kvcache/memory/host_vmm.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace kv = kvcache;
using kvcache_bench::ratio_pair;

namespace {

constexpr std::uint32_t kLayers = 4, kKvHeads = 8, kHeadDim = 128, kMaxTokens = 16384;
constexpr std::size_t kHeadBytes = std::size_t{kHeadDim} * 2;  // fp16
constexpr std::size_t kRanges = std::size_t{kLayers} * 2;       // per sequence (K and V)

void check(const kv::status& st, const char* what) {
  if (st) return;
  std::fprintf(stderr, "bench_layout: %s: %s\n", what, st.message().c_str());
  std::abort();
}

//! A cache<host_vmm> in one layout; grow() appends `len` tokens to a new sequence.
struct layout_cache {
  kv::cache<kv::host_vmm> c;
  std::vector<std::uint16_t> src = std::vector<std::uint16_t>(std::size_t{kKvHeads} * kHeadDim, 0x3c00);
  std::uint32_t len;

  static std::size_t pages_per_range(kv::layout order, std::size_t ps, std::uint32_t len) {
    return order == kv::layout::token_major
               ? (len * kHeadBytes * kKvHeads + ps - 1) / ps + 1  // per_sequence: +1 per layer
               : (len * kHeadBytes + ps - 1) / ps * kKvHeads;  // each head's region page aligned
  }
  layout_cache(kv::layout order, kv::range_scope scope, std::size_t ps, std::uint32_t len_)
      : c(kv::cache_config{{kLayers, kKvHeads, 32, kHeadDim, kv::dtype::f16}, kMaxTokens, 0, order,
                           scope},
          kv::host_vmm(kv::host_vmm_config{ps, 2 * kRanges * pages_per_range(order, ps, len_),
                                           true})),
        len(len_) {
    check(c.close(grow()), "close");  // maps the pages once; from now on nothing is mapped
    cold_map_calls = c.stats().memory.map_calls;
  }
  std::size_t cold_map_calls = 0;  // mmap calls of the first (cold) growth
  kv::seq_id grow() {
    auto s = c.open();
    if (!s) check(s.error(), "open");
    const kv::kv_tensor k{src.data(), kv::dtype::f16, 1, kKvHeads, kHeadDim}, v = k;
    for (std::uint32_t t = 0; t < len; ++t)
      for (std::uint32_t l = 0; l < kLayers; ++l) check(c.append(s.value(), l, k, v), "append");
    return s.value();
  }
  void cycle() { check(c.close(grow()), "close"); }
};

// The variants of one (page size, length) stay alive while its benchmarks run.
enum class variant { token_major, head_major, per_sequence };
std::unique_ptr<layout_cache> g_token, g_head, g_seq;
std::string g_group;

using clk = std::chrono::steady_clock;

void run(benchmark::State& state, const std::string& group, variant which, std::size_t ps,
         std::uint32_t len) {
  if (g_group != group) {
    g_token.reset();
    g_head.reset();
    g_seq.reset();
    using kv::layout, kv::range_scope;
    g_token = std::make_unique<layout_cache>(layout::token_major, range_scope::per_layer, ps, len);
    g_head = std::make_unique<layout_cache>(layout::head_major, range_scope::per_layer, ps, len);
    g_seq = std::make_unique<layout_cache>(layout::token_major, range_scope::per_sequence, ps, len);
    g_group = group;
  }
  layout_cache& own = which == variant::token_major ? *g_token
                      : which == variant::head_major ? *g_head
                                                     : *g_seq;
  const bool paired = which != variant::token_major;
  // other variants' iterations are each followed by a token_major one (timed apart):
  // x_token_major is the throughput ratio over the same instants.
  double t_own = 0, t_ref = 0;
  for (auto _ : state) {
    const auto t0 = clk::now();
    own.cycle();
    const auto t1 = clk::now();
    if (paired) {
      g_token->cycle();
      t_ref += std::chrono::duration<double>(clk::now() - t1).count();
    }
    const double dt = std::chrono::duration<double>(t1 - t0).count();
    t_own += dt;
    state.SetIterationTime(dt);
  }
  state.SetBytesProcessed(
      static_cast<std::int64_t>(state.iterations() * len * kRanges * kKvHeads * kHeadBytes));
  state.counters["x_token_major"] = paired ? t_ref / t_own : 1.0;

  const kv::seq_id s = own.grow();
  const kv::cache_stats st = own.c.stats();
  check(own.c.close(s), "close");
  const double backed = static_cast<double>(st.bytes_backed) / kRanges;
  const double used = static_cast<double>(st.bytes_used) / kRanges;
  using C = benchmark::Counter;
  state.counters["backed"] = C(backed, C::kDefaults, C::kIs1024);
  state.counters["used"] = C(used, C::kDefaults, C::kIs1024);
  state.counters["wasted"] = C(backed - used, C::kDefaults, C::kIs1024);
  state.counters["wasted_%"] = 100 * (backed - used) / backed;
  state.counters["cold_maps"] = static_cast<double>(own.cold_map_calls);
}

std::string size_name(std::size_t ps) {
  return ps >= 1024 * 1024 ? std::to_string(ps >> 20) + "M" : std::to_string(ps >> 10) + "K";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<ratio_pair> pairs;
  for (std::size_t ps : {std::size_t{64} << 10, std::size_t{2} << 20})
    for (std::uint32_t len : {100u, 1000u, 4096u, 16384u}) {
      const std::string prefix =
          "layout/" + size_name(ps) + "/" + std::to_string(len) + "tok/";
      const std::pair<const char*, variant> variants[] = {{"token_major", variant::token_major},
                                                          {"head_major", variant::head_major},
                                                          {"per_sequence", variant::per_sequence}};
      for (const auto& [name, which] : variants)
        benchmark::RegisterBenchmark((prefix + name).c_str(), run, prefix, which, ps, len)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      pairs.push_back({prefix + "head_major", prefix + "token_major"});
      pairs.push_back({prefix + "per_sequence", prefix + "token_major"});
    }
  const int rc = kvcache_bench::run_with_ratios(argc, argv, std::move(pairs), "x_token_major");
  g_token.reset();
  g_head.reset();
  g_seq.reset();
  return rc;
}
