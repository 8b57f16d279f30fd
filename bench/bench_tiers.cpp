// SPDX-License-Identifier: Apache-2.0
//! @file
//! The holding tier (memory/holding_tier.hpp) and the moves a tiered cache makes through it, on
//! the host, against plain memcpy of the same bytes in the same run.
//!
//! Geometry: SmolLM2-135M (30 layers, 3 KV heads, 9 query heads, head_dim 64). A tier row is
//! one (token, KV head): K and V codes, 2 * 64 * 2 = 256 bytes in fp16, 512 in fp32.
//!
//! Method: every transport benchmark is **paired** (as bench_append): each iteration times the
//! operation, then a plain memcpy of the same bytes between two buffers of its own, each on its
//! own clock reading. Manual time = the operation's. Counter `x_memcpy` = memcpy time / operation
//! time over the same instants (its throughput as a fraction of memcpy's; the ratio table's
//! "paired" column); `faults/op` = minor page faults per operation. Small groups repeat the
//! operation to >= 32 KiB per timed block; the time reported is per operation.
//!
//! (a) transport of `host_holding`, bytes = the group's (or episode's) bytes:
//!   memcpy/group/R/E        one memcpy of R rows (R x 256 B fp16 or 512 B fp32), contiguous
//!   memcpy_rows/group/R/E   the same rows copied as the cache copies them: a K half and a V half
//!                           per row, from random slots of a token-major layer (4096 slots x 3
//!                           heads); memcpy per half
//!   copy_in/group/R/E       the same halves through holding.copy_in into a held group
//!   copy_out/group/R/E      the reverse (a fetch): copy_out per half into random slots
//!   hold/group/R/E          extend (allocation) + copy_in per half + erase: a whole hold
//!   submit_wait/group/R/E   one op of the group's R contiguous rows (a prefetch's shape),
//!                           submitted to the tier's worker thread and waited for
//!   memcpy/episode/T        an EpiCache episode of T tokens (30 layers x K, V: 60 spans of
//!                           T x 3 heads x 128 B), one memcpy per span
//!   copy_in/episode/T       the 60 spans through copy_in (what cache.hold() issues)
//!   submit_wait/episode/T   the 60 spans as one batch on the worker, waited for
//! (b) cache_hold_restore/T: cache<tiered<host_vmm>, keep_all> (fp16, 30 layers) holding a
//!   T-token sequence: hold(seq) + restore(seq); bytes = 2 x the sequence's backed K/V bytes
//!   (out and back), x_memcpy against memcpy of those bytes. Includes what the moves cost beyond
//!   copying: the holding tier's allocation (fresh, zeroed memory per hold) and the working
//!   tier's range release/acquire and page mapping.
//! (c) observe + evict per layer-step (manual time), 8 layers, a 4096-token prompt with
//!   sentences of 10-40 tokens, budget 512 per head, then one token per decode step through every
//!   layer (one benchmark iteration = one layer-step):
//!   step/sentence_kv/prefetch     cache<tiered<host_vmm>, sentence_kv>, prefetch(seq, layer) after
//!                                 each layer-step (untimed: asynchronous, it overlaps the next
//!                                 layers' steps as it overlaps attention in an engine)
//!   step/sentence_kv/no_prefetch  the same without prefetch (every fetch is a miss)
//!   step/heavy_hitter/query       cache<host_vmm, heavy_hitter<query_signal>> (heavy 256, recent
//!                                 256): the same prompt, budget, max_tokens and queries; H2O
//!                                 recomputes softmax(q.K^T) over the view's rows itself
//!   step/heavy_hitter/sums        the same on attention_sum_signal: the engine's probabilities
//!                                 (reference::attention over the view, untimed) summed per key,
//!                                 H2O's cheapest input (bench_evict's (b))
//!   Counters of the sentence_kv steps: promoted_B / demoted_B = bytes moved per layer-step;
//!   hit_pct = fetched rows a prefetch had staged; waits/step = fetches that waited for a
//!   prefetch; copy_share = memcpy time of the step's moved bytes (right after it, contiguous) /
//!   the step's time: the share of a step that is copying at memcpy speed.
#include "ratio_reporter.hpp"

#include <kvcache/cache.hpp>
#include <kvcache/evict/heavy_hitter.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/evict/sentence.hpp>
#include <kvcache/memory/holding_tier.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/memory/tiered.hpp>
#include <kvcache/reference/attention.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <sys/resource.h>

namespace kv = kvcache;
using clk = std::chrono::steady_clock;

namespace {

constexpr std::uint32_t kLayers = 30, kKv = 3, kQh = 9, kDim = 64;
constexpr std::uint32_t kSlots = 4096;  // slots of the working layer the rows come from

void check(const kv::status& st, const char* what) {
  if (!st) {
    std::fprintf(stderr, "bench_tiers: %s: %s\n", what, st.message().c_str());
    std::abort();
  }
}
double secs(clk::time_point a, clk::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
std::vector<std::int32_t> iota_tags(std::size_t n) {
  std::vector<std::int32_t> t(n);
  std::iota(t.begin(), t.end(), 0);
  return t;
}
std::vector<std::byte> filled(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

// ---- (a) holding-tier transport ------------------------------------------------------------

//! A token-major working layer (K and V ranges, kSlots x kKv x code bytes each), a group of R
//! rows of head 0 at random slots, and a held copy of it.
struct group_world {
  std::size_t code;  // bytes of K (or V) of one (token, head)
  std::uint32_t rows;
  std::vector<std::byte> k, v, contiguous_src, contiguous_dst;
  std::vector<std::uint32_t> slots;
  kv::host_holding holding;
  std::byte* held = nullptr;
  group_world(std::uint32_t r, std::size_t elem)
      : code(std::size_t{kDim} * elem), rows(r),
        k(filled(kSlots * kKv * code, 1)), v(filled(kSlots * kKv * code, 2)),
        contiguous_src(filled(r * 2 * code, 3)), contiguous_dst(r * 2 * code) {
    std::vector<std::uint32_t> all(kSlots);
    std::iota(all.begin(), all.end(), 0u);
    std::shuffle(all.begin(), all.end(), std::mt19937(4));
    slots.assign(all.begin(), all.begin() + r);
    held = holding.extend({1, 1}, 2 * code, iota_tags(r)).value();
  }
  std::size_t bytes() const { return std::size_t{rows} * 2 * code; }
  std::byte* k_row(std::uint32_t i) { return k.data() + std::size_t{slots[i]} * kKv * code; }
  std::byte* v_row(std::uint32_t i) { return v.data() + std::size_t{slots[i]} * kKv * code; }
};

//! Minor page faults of the process so far (the worker thread's included).
long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

//! Paired timing (as bench_append): every iteration times `body` (`reps` times), then a plain
//! memcpy of the same bytes between two buffers of their own (`reps` times), each on its own
//! clock reading. Manual time = the body's; counter `x_memcpy` = memcpy time / body time over the
//! same instants (the body's throughput as a fraction of memcpy's; > 1: faster than memcpy).
template <class Body>
void paired(benchmark::State& st, std::size_t bytes, int reps, Body body) {
  std::vector<std::byte> a = filled(bytes, 9), b(bytes);
  double body_s = 0, base_s = 0;
  const long f0 = minor_faults();
  for (auto _ : st) {
    const auto t0 = clk::now();
    for (int i = 0; i < reps; ++i) body();
    const auto t1 = clk::now();
    for (int i = 0; i < reps; ++i) {
      std::memcpy(b.data(), a.data(), bytes);
      benchmark::ClobberMemory();
    }
    const auto t2 = clk::now();
    st.SetIterationTime(secs(t0, t1) / reps);  // time per operation
    body_s += secs(t0, t1);
    base_s += secs(t1, t2);
  }
  const double n = static_cast<double>(std::max<benchmark::IterationCount>(st.iterations(), 1));
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * bytes));
  st.counters["x_memcpy"] = body_s > 0 ? base_s / body_s : 0.0;
  st.counters["faults/op"] = static_cast<double>(minor_faults() - f0) / n / reps;
}

//! Group benchmarks repeat the body so that a timed block copies >= 32 KiB (clock reads stay
//! a few percent of it).
int group_reps(std::size_t bytes) { return static_cast<int>(std::max<std::size_t>(1, (32u << 10) / bytes)); }

template <class Body>
void group_bench(benchmark::State& st, std::uint32_t rows, std::size_t elem, Body body) {
  group_world w(rows, elem);
  paired(st, w.bytes(), group_reps(w.bytes()), [&] {
    body(w);
    benchmark::ClobberMemory();
  });
}

void memcpy_group(benchmark::State& st, std::uint32_t r, std::size_t e) {
  group_bench(st, r, e, [](group_world& w) {
    std::memcpy(w.contiguous_dst.data(), w.contiguous_src.data(), w.bytes());
  });
}
void memcpy_rows_group(benchmark::State& st, std::uint32_t r, std::size_t e) {
  group_bench(st, r, e, [](group_world& w) {
    for (std::uint32_t i = 0; i < w.rows; ++i) {
      std::byte* dst = w.held + std::size_t{i} * 2 * w.code;
      std::memcpy(dst, w.k_row(i), w.code);
      std::memcpy(dst + w.code, w.v_row(i), w.code);
    }
  });
}
void copy_in_group(benchmark::State& st, std::uint32_t r, std::size_t e) {
  group_bench(st, r, e, [](group_world& w) {
    for (std::uint32_t i = 0; i < w.rows; ++i) {
      std::byte* dst = w.held + std::size_t{i} * 2 * w.code;
      w.holding.copy_in(dst, w.k_row(i), w.code);
      w.holding.copy_in(dst + w.code, w.v_row(i), w.code);
    }
  });
}
void copy_out_group(benchmark::State& st, std::uint32_t r, std::size_t e) {
  group_bench(st, r, e, [](group_world& w) {
    for (std::uint32_t i = 0; i < w.rows; ++i) {
      const std::byte* src = w.held + std::size_t{i} * 2 * w.code;
      w.holding.copy_out(w.k_row(i), src, w.code);
      w.holding.copy_out(w.v_row(i), src + w.code, w.code);
    }
  });
}
void hold_group(benchmark::State& st, std::uint32_t r, std::size_t e) {
  const auto tags = iota_tags(r);
  group_bench(st, r, e, [&](group_world& w) {
    std::byte* dst = w.holding.extend({2, 7}, 2 * w.code, tags).value();
    for (std::uint32_t i = 0; i < w.rows; ++i) {
      w.holding.copy_in(dst + std::size_t{i} * 2 * w.code, w.k_row(i), w.code);
      w.holding.copy_in(dst + std::size_t{i} * 2 * w.code + w.code, w.v_row(i), w.code);
    }
    w.holding.erase({2, 7});
  });
}
void submit_wait_group(benchmark::State& st, std::uint32_t r, std::size_t e) {
  group_bench(st, r, e, [](group_world& w) {
    w.holding.wait(w.holding.submit({{w.contiguous_dst.data(), w.held, w.bytes()}}));
  });
}

//! An episode: 60 spans (30 layers x K, V) of T tokens x 3 heads x 128 bytes (fp16).
struct episode_world {
  std::size_t span;
  std::vector<std::byte> working, copy;
  kv::host_holding holding;
  std::vector<std::byte*> held;
  explicit episode_world(std::uint32_t tokens)
      : span(std::size_t{tokens} * kKv * kDim * 2),
        working(filled(span * 2 * kLayers, 5)), copy(span * 2 * kLayers) {
    const std::int32_t tag = 0;
    for (std::uint32_t i = 0; i < 2 * kLayers; ++i)
      held.push_back(holding.extend({1, i}, span, {&tag, 1}).value());
  }
  std::size_t bytes() const { return span * 2 * kLayers; }
};

template <class Body>
void episode_bench(benchmark::State& st, std::uint32_t tokens, Body body) {
  episode_world w(tokens);
  paired(st, w.bytes(), 1, [&] {
    body(w);
    benchmark::ClobberMemory();
  });
}
void memcpy_episode(benchmark::State& st, std::uint32_t t) {
  episode_bench(st, t, [](episode_world& w) {
    for (std::size_t i = 0; i < w.held.size(); ++i)
      std::memcpy(w.copy.data() + i * w.span, w.working.data() + i * w.span, w.span);
  });
}
void copy_in_episode(benchmark::State& st, std::uint32_t t) {
  episode_bench(st, t, [](episode_world& w) {
    for (std::size_t i = 0; i < w.held.size(); ++i)
      w.holding.copy_in(w.held[i], w.working.data() + i * w.span, w.span);
  });
}
void submit_wait_episode(benchmark::State& st, std::uint32_t t) {
  episode_bench(st, t, [](episode_world& w) {
    std::vector<kv::copy_op> ops;
    for (std::size_t i = 0; i < w.held.size(); ++i)
      ops.push_back({w.held[i], w.working.data() + i * w.span, w.span});
    w.holding.wait(w.holding.submit(std::move(ops)));
  });
}

// ---- (b) cache.hold + restore ----------------------------------------------------------------

kv::host_vmm_config vmm_config(std::size_t pages) {
  kv::host_vmm_config vm;
  vm.page_size = 64 * 1024;
  vm.pool_pages = pages;
  return vm;
}

//! fp16 K/V of `tokens` tokens x 3 heads, random.
std::vector<std::uint16_t> random_kv(std::uint32_t tokens, unsigned seed) {
  std::vector<std::uint16_t> v(std::size_t{tokens} * kKv * kDim);
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& x : v) x = kv::float_to_half(g(rng));
  return v;
}

void cache_hold_restore(benchmark::State& st, std::uint32_t tokens) {
  using mem = kv::tiered<kv::host_vmm>;
  kv::cache_config cfg;
  cfg.geo = kv::geometry{kLayers, kKv, kQh, kDim, kv::dtype::f16};
  cfg.max_tokens = tokens;
  const std::size_t pages = 2 * kLayers * (std::size_t{tokens} * kKv * kDim * 2 / 65536 + 2) + 64;
  kv::cache<mem> c(cfg, mem(kv::host_vmm(vmm_config(pages))));
  const kv::seq_id s = c.open(tokens).value();
  const auto data = random_kv(tokens, 6);
  const kv::kv_tensor t{data.data(), kv::dtype::f16, tokens, kKv, kDim};
  for (std::uint32_t l = 0; l < kLayers; ++l) check(c.append(s, l, t, t), "append");
  check(c.hold(s), "hold");  // prime: the holding tier's groups and the idle ranges exist once
  check(c.restore(s), "restore");
  const std::size_t seq_bytes = c.stats().tier.bytes_demoted;  // one hold's bytes
  paired(st, 2 * seq_bytes, 1, [&] {
    check(c.hold(s), "hold");
    check(c.restore(s), "restore");
  });
  st.counters["MiB_per_hold"] = static_cast<double>(seq_bytes) / 1048576.0;
}

// ---- (c) sentence_kv vs heavy_hitter per layer-step -------------------------------------------

constexpr std::uint32_t kPrompt = 4096, kBudget = 512, kQueries = 64, kStepLayers = 8;

//! The prompt's K/V (fp16 for the cache, fp32 for key_signal), sentence boundaries every 10-40
//! tokens, a pool of decode tokens (K/V, keys, queries, boundary flags) cycled through.
struct decode_data {
  std::vector<std::uint16_t> kv16;
  std::vector<float> kv32, q;
  std::vector<std::uint8_t> flags;  // prompt, then decode positions (cycled)
  explicit decode_data(std::uint32_t tokens) {
    kv16 = random_kv(tokens, 7);
    kv32.resize(kv16.size());
    for (std::size_t i = 0; i < kv16.size(); ++i) kv32[i] = kv::half_to_float(kv16[i]);
    std::mt19937 rng(8);
    std::normal_distribution<float> g(0.0f, 1.0f);
    q.resize(std::size_t{tokens} * kQh * kDim);
    for (auto& x : q) x = g(rng);
    flags.assign(tokens, 0);
    std::uniform_int_distribution<std::uint32_t> len(10, 40);
    for (std::uint32_t p = len(rng); p < tokens; p += len(rng)) flags[p] = 1;
  }
};

template <class Cache>
void append_tokens(Cache& c, kv::seq_id s, const decode_data& d, std::uint32_t layer,
                   std::uint32_t first, std::uint32_t n) {
  const std::size_t row = std::size_t{kKv} * kDim;
  const kv::kv_tensor t{d.kv16.data() + first * row, kv::dtype::f16, n, kKv, kDim};
  check(c.append(s, layer, t, t), "append");
}

// The engine's attention probabilities of the step (one query), for H2O on attention sums.
std::vector<float> g_probs, g_out;
std::uint32_t g_probs_rows = 0;

//! The engine's attention of query `qidx` over the layer's view (untimed: the step's model work),
//! its probabilities kept for an observe of attention_sum_signal.
template <class Cache>
void attend(Cache& c, kv::seq_id s, const decode_data& d, std::uint32_t layer, std::uint32_t qidx) {
  const kv::layer_view v = c.view(s, layer).value();
  g_probs.resize(std::size_t{kQh} * v.rows);
  g_out.resize(std::size_t{kQh} * kDim);
  g_probs_rows = v.rows;
  check(kv::reference::attention(v, kQh, d.q.data() + std::size_t{qidx} * kQh * kDim, 1, nullptr,
                                 g_out.data(), g_probs.data()),
        "attention");
}

template <class Cache>
kv::status observe(Cache& c, kv::seq_id s, const decode_data& d, std::uint32_t layer,
                   std::uint32_t first, std::uint32_t n, std::uint32_t qfirst, std::uint32_t qn) {
  const std::size_t row = std::size_t{kKv} * kDim;
  const kv::query_signal qs{d.q.data() + std::size_t{qfirst} * kQh * kDim, kv::dtype::f32, qn};
  if constexpr (Cache::template consumes<kv::attention_sum_signal>) {
    (void)first;
    (void)n;
    return c.observe(s, layer, kv::attention_sum_signal{g_probs.data(), kQh, g_probs_rows});
  } else if constexpr (Cache::template consumes<kv::key_signal>) {
    return c.observe(s, layer, qs, kv::key_signal{d.kv32.data() + first * row, kv::dtype::f32, n},
                     kv::boundary_signal{d.flags.data() + first, n});
  } else {
    return c.observe(s, layer, qs);
  }
}

//! Decode steps over kStepLayers layers: per token, every layer appends it, observes it and
//! evicts (observe + evict timed: one benchmark iteration per layer-step), then, for a tiered
//! cache with `prefetch`, prefetches that layer (untimed) so that the copies overlap the next
//! layers' steps, as they overlap the rest of the model in an engine.
template <class Cache>
void decode_steps(benchmark::State& st, Cache& c, bool prefetch) {
  const decode_data d(kPrompt + kQueries);
  const kv::seq_id s = c.open(kPrompt).value();
  for (std::uint32_t l = 0; l < kStepLayers; ++l) {
    append_tokens(c, s, d, l, 0, kPrompt);
    if constexpr (Cache::template consumes<kv::attention_sum_signal>) attend(c, s, d, l, kPrompt - 1);
    // sentence_kv observes the whole prompt (SnapKV scores it with the last 32 queries); H2O
    // with query_signal scores from the queries given: those last 32.
    if constexpr (Cache::has_tiers)
      check(observe(c, s, d, l, 0, kPrompt, 0, kPrompt), "observe prompt");
    else
      check(observe(c, s, d, l, 0, kPrompt, kPrompt - 32, 32), "observe prompt");
    check(c.evict(s, l), "evict prompt");
  }
  std::vector<std::byte> a(std::size_t{1} << 22), b(std::size_t{1} << 22);
  double step_s = 0, copy_s = 0;
  std::uint64_t steps = 0, i = 0;
  const auto t0 = c.stats().tier;
  for (auto _ : st) {
    // layer l of decode token t (K/V, key, query and flag from a pool of kQueries tokens; the
    // positions keep growing)
    const auto l = static_cast<std::uint32_t>(i % kStepLayers);
    const std::uint32_t tok = kPrompt + static_cast<std::uint32_t>((i / kStepLayers) % kQueries);
    ++i;
    append_tokens(c, s, d, l, tok, 1);
    if constexpr (Cache::template consumes<kv::attention_sum_signal>) attend(c, s, d, l, tok);
    const auto before = c.stats().tier;
    const auto s0 = clk::now();
    check(observe(c, s, d, l, tok, 1, tok, 1), "observe");
    check(c.evict(s, l), "evict");
    const auto s1 = clk::now();
    st.SetIterationTime(secs(s0, s1));
    step_s += secs(s0, s1);
    ++steps;
    if constexpr (Cache::has_tiers) {
      const auto after = c.stats().tier;
      const std::size_t moved = std::min<std::size_t>(
          a.size(), (after.bytes_demoted - before.bytes_demoted) +
                        (after.bytes_promoted - before.bytes_promoted));
      const auto m0 = clk::now();
      std::memcpy(b.data(), a.data(), moved);
      benchmark::ClobberMemory();
      copy_s += secs(m0, clk::now());
      if (prefetch) check(c.prefetch(s, l), "prefetch");
    }
  }
  if constexpr (Cache::has_tiers) {
    const auto t1 = c.stats().tier;
    const double n = static_cast<double>(std::max<std::uint64_t>(steps, 1));
    const auto hit = t1.rows_hit - t0.rows_hit, miss = t1.rows_missed - t0.rows_missed;
    st.counters["copy_share"] = step_s > 0 ? copy_s / step_s : 0.0;
    st.counters["promoted_B"] = static_cast<double>(t1.bytes_promoted - t0.bytes_promoted) / n;
    st.counters["demoted_B"] = static_cast<double>(t1.bytes_demoted - t0.bytes_demoted) / n;
    st.counters["hit_pct"] = hit + miss ? 100.0 * static_cast<double>(hit) / static_cast<double>(hit + miss) : 0.0;
    st.counters["waits/step"] = static_cast<double>(t1.prefetch_waits - t0.prefetch_waits) / n;
  }
  check(c.close(s), "close");
}

kv::cache_config step_config() {
  kv::cache_config cfg;
  cfg.geo = kv::geometry{kStepLayers, kKv, kQh, kDim, kv::dtype::f16};
  cfg.max_tokens = kPrompt + 1;
  cfg.budget = kBudget;
  return cfg;
}

void sentence_step(benchmark::State& st, bool prefetch) {
  using mem = kv::tiered<kv::host_vmm>;
  using C = kv::cache<mem, kv::sentence_kv>;
  C c(step_config(), mem(kv::host_vmm(vmm_config(4096))));
  decode_steps(st, c, prefetch);
}
template <class Source>
void heavy_hitter_step(benchmark::State& st) {
  kv::heavy_hitter_config hc;
  hc.heavy = kBudget / 2;
  hc.recent = kBudget / 2;
  using C = kv::cache<kv::host_vmm, kv::heavy_hitter<Source>>;
  C c(step_config(), kv::host_vmm(vmm_config(4096)), kv::heavy_hitter<Source>(hc));
  decode_steps(st, c, false);
}

std::string group_name(const char* what, std::uint32_t r, std::size_t e) {
  return std::string(what) + "/group/" + std::to_string(r) + "/" + (e == 2 ? "f16" : "f32");
}
std::string episode_name(const char* what, std::uint32_t t) {
  return std::string(what) + "/episode/" + std::to_string(t);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<kvcache_bench::ratio_pair> pairs;
  for (const std::uint32_t r : {20u, 100u})
    for (const std::size_t e : {std::size_t{2}, std::size_t{4}}) {
      const std::string base = group_name("memcpy", r, e);
      benchmark::RegisterBenchmark(base.c_str(), memcpy_group, r, e)->UseManualTime();
      benchmark::RegisterBenchmark(group_name("memcpy_rows", r, e).c_str(), memcpy_rows_group, r, e)->UseManualTime();
      benchmark::RegisterBenchmark(group_name("copy_in", r, e).c_str(), copy_in_group, r, e)->UseManualTime();
      benchmark::RegisterBenchmark(group_name("copy_out", r, e).c_str(), copy_out_group, r, e)->UseManualTime();
      benchmark::RegisterBenchmark(group_name("hold", r, e).c_str(), hold_group, r, e)->UseManualTime();
      benchmark::RegisterBenchmark(group_name("submit_wait", r, e).c_str(), submit_wait_group, r, e)->UseManualTime();
      for (const char* n : {"memcpy_rows", "copy_in", "copy_out", "hold", "submit_wait"})
        pairs.push_back({group_name(n, r, e), base});
      pairs.push_back({group_name("copy_in", r, e), group_name("memcpy_rows", r, e)});
    }
  for (const std::uint32_t t : {256u, 2048u}) {
    const std::string base = episode_name("memcpy", t);
    benchmark::RegisterBenchmark(base.c_str(), memcpy_episode, t)->UseManualTime();
    benchmark::RegisterBenchmark(episode_name("copy_in", t).c_str(), copy_in_episode, t)->UseManualTime();
    benchmark::RegisterBenchmark(episode_name("submit_wait", t).c_str(), submit_wait_episode, t)->UseManualTime();
    pairs.push_back({episode_name("copy_in", t), base});
    pairs.push_back({episode_name("submit_wait", t), base});
    benchmark::RegisterBenchmark(("cache_hold_restore/" + std::to_string(t)).c_str(),
                                 cache_hold_restore, t)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    pairs.push_back({"cache_hold_restore/" + std::to_string(t), base});
  }
  benchmark::RegisterBenchmark("step/heavy_hitter/query", heavy_hitter_step<kv::query_signal>)
      ->UseManualTime();
  benchmark::RegisterBenchmark("step/heavy_hitter/sums", heavy_hitter_step<kv::attention_sum_signal>)
      ->UseManualTime();
  benchmark::RegisterBenchmark("step/sentence_kv/prefetch", sentence_step, true)->UseManualTime();
  benchmark::RegisterBenchmark("step/sentence_kv/no_prefetch", sentence_step, false)->UseManualTime();
  for (const char* h : {"step/heavy_hitter/query", "step/heavy_hitter/sums"}) {
    pairs.push_back({"step/sentence_kv/prefetch", h});
    pairs.push_back({"step/sentence_kv/no_prefetch", h});
  }
  pairs.push_back({"step/sentence_kv/prefetch", "step/sentence_kv/no_prefetch"});
  return kvcache_bench::run_with_ratios(argc, argv, std::move(pairs), "x_memcpy");
}
