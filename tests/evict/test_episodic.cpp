// SPDX-License-Identifier: Apache-2.0
//! @file
//! EpiCache (include/kvcache/evict/episodic.hpp): the policy's scores against a plain
//! re-implementation (max softmax over the GQA group and the probe queries), pair / pair_uniform
//! kept sets, the protected prefix, no eviction during decode, block-wise prefill of E forked
//! episodes through a real host_vmm cache (shared prefix pages, bounded working memory, kept sets
//! equal to an independent simulation), k-means (known answer, determinism, k-means++ picks),
//! episodes and routing, layer budgets, and bad inputs.
#include <kvcache/cache.hpp>
#include <kvcache/check.hpp>
#include <kvcache/evict/episodic.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/memory/host_vmm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "catch.hpp"
#include "evict_support.hpp"

using namespace kvcache;

namespace {

// ---- an independent model of the policy, over positions ----------------------------------------

//! Keys of every (layer, position, kv head), `[pos][kv_head][dim]` per layer.
struct token_keys {
  std::uint32_t H = 0, D = 0;
  std::vector<float> k;  // [pos][H][D]
  const float* at(std::int32_t pos, std::uint32_t h) const {
    return k.data() + (std::size_t(pos) * H + h) * D;
  }
};

//! score[pos] for one KV head: max over (group member g, probe p) of softmax over `live` of
//! q·k/sqrt(D), in double. probes: `[P][QH][D]`.
std::map<std::int32_t, double> oracle_scores(const token_keys& keys, const std::set<std::int32_t>& live,
                                             const std::vector<float>& probes, std::uint32_t P,
                                             std::uint32_t QH, std::uint32_t h) {
  const std::uint32_t H = keys.H, D = keys.D, G = QH / H;
  std::map<std::int32_t, double> score;
  for (auto pos : live) score[pos] = 0.0;
  for (std::uint32_t g = 0; g < G; ++g)
    for (std::uint32_t p = 0; p < P; ++p) {
      const float* q = probes.data() + (std::size_t(p) * QH + h * G + g) * D;
      std::vector<double> logit;
      for (auto pos : live) {
        double dot = 0;
        for (std::uint32_t d = 0; d < D; ++d) dot += double(q[d]) * keys.at(pos, h)[d];
        logit.push_back(dot / std::sqrt(double(D)));
      }
      const double mx = *std::max_element(logit.begin(), logit.end());
      double sum = 0;
      for (double& x : logit) sum += (x = std::exp(x - mx));
      std::size_t i = 0;
      for (auto pos : live) score[pos] = std::max(score[pos], logit[i++] / sum);
    }
  return score;
}

//! One scoring + eviction of EpiCache's spec over the kept positions of every head of a layer.
void oracle_evict(std::vector<std::set<std::int32_t>>& kept, const token_keys& keys,
                  const std::vector<float>& probes, std::uint32_t P, std::uint32_t QH,
                  std::uint32_t budget, episodic_level level, std::int32_t protect) {
  const std::uint32_t H = keys.H;
  struct cand {
    double score;
    std::int32_t pos;
    std::uint32_t head;
  };
  std::vector<std::vector<cand>> per_head(H);
  std::vector<cand> all;
  std::vector<std::uint32_t> prot(H, 0);
  for (std::uint32_t h = 0; h < H; ++h) {
    const auto sc = oracle_scores(keys, kept[h], probes, P, QH, h);
    for (auto [pos, s] : sc) {
      if (pos < protect) {
        ++prot[h];
        continue;
      }
      per_head[h].push_back({s, pos, h});
      all.push_back({s, pos, h});
    }
  }
  auto better = [](const cand& a, const cand& b) {  // kept first: score, newer, higher head
    if (a.score != b.score) return a.score > b.score;
    if (a.pos != b.pos) return a.pos > b.pos;
    return a.head > b.head;
  };
  std::vector<std::set<std::int32_t>> out(H);
  for (std::uint32_t h = 0; h < H; ++h)
    for (auto pos : kept[h])
      if (pos < protect) out[h].insert(pos);
  if (level == episodic_level::pair) {
    std::uint64_t prot_total = 0;
    for (auto n : prot) prot_total += n;
    const std::uint64_t total = std::uint64_t(budget) * H;
    const std::uint64_t rest = total > prot_total ? total - prot_total : 0;
    std::sort(all.begin(), all.end(), better);
    for (std::size_t i = 0; i < all.size() && i < rest; ++i) out[all[i].head].insert(all[i].pos);
  } else {
    for (std::uint32_t h = 0; h < H; ++h) {
      auto& v = per_head[h];
      std::sort(v.begin(), v.end(), better);
      const std::uint32_t rest = budget > prot[h] ? budget - prot[h] : 0;
      for (std::size_t i = 0; i < v.size() && i < rest; ++i) out[h].insert(v[i].pos);
    }
  }
  kept = out;
}

//! True when `msg` contains every one of `parts` (Catch2 v2/v3 name their matchers differently).
bool has(const std::string& msg, std::initializer_list<const char*> parts) {
  for (const char* p : parts)
    if (msg.find(p) == std::string::npos) return false;
  return true;
}

std::vector<float> randn(std::mt19937& rng, std::size_t n, float sd = 1.0f) {
  return evtest::randn(rng, n, sd);
}

// ---- direct use of the policy over a slot table --------------------------------------------------

//! Keys stored by (slot, head), as the cache would: `[cap][H][D]`.
struct slot_keys {
  std::uint32_t H = 0, D = 0;
  std::vector<float> k;
  static void read(const void* ctx, std::uint32_t head, std::uint32_t first, std::uint32_t count,
                   float* out) {
    const auto& s = *static_cast<const slot_keys*>(ctx);
    for (std::uint32_t i = 0; i < count; ++i)
      std::copy_n(s.k.data() + (std::size_t(first + i) * s.H + head) * s.D, s.D, out + std::size_t(i) * s.D);
  }
};

struct direct_policy {
  geometry geo;
  slot_table t;
  slot_keys sk;
  token_keys tk;
  episodic pol;
  episodic::state st;
  std::int64_t next = 0;

  direct_policy(geometry g, std::uint32_t cap, std::uint32_t tokens, std::mt19937& rng, episodic_config cfg)
      : geo(g), t(g.kv_heads, cap), pol(cfg) {
    sk.H = tk.H = g.kv_heads;
    sk.D = tk.D = g.head_dim;
    sk.k.assign(std::size_t(cap) * g.kv_heads * g.head_dim, 0.0f);
    tk.k = randn(rng, std::size_t(tokens) * g.kv_heads * g.head_dim, 1.5f);
    st = pol.make_state(policy_context{g, 0, cap});
  }
  void place(std::uint32_t n) {  // the next n positions, every head (holes first)
    std::vector<std::uint32_t> slots(std::size_t(n) * geo.kv_heads);
    for (std::uint32_t i = 0; i < n; ++i)
      for (std::uint32_t h = 0; h < geo.kv_heads; ++h) {
        const auto pos = static_cast<std::int32_t>(next + i);
        const std::uint32_t s = t.place(h, pos);
        slots[std::size_t(i) * geo.kv_heads + h] = s;
        std::copy_n(tk.at(pos, h), geo.head_dim, sk.k.data() + (std::size_t(s) * geo.kv_heads + h) * geo.head_dim);
      }
    pol.on_append(st, t, placement{slots, geo.kv_heads, n, next});
    next += n;
  }
  key_reader keys() const { return key_reader{t.rows(), geo.head_dim, &sk, &slot_keys::read}; }
  std::set<std::int32_t> live(std::uint32_t h) const {
    std::set<std::int32_t> s;
    for (std::uint32_t r = 0; r < t.rows(); ++r)
      if (t.position(r, h) >= 0) s.insert(t.position(r, h));
    return s;
  }
  void evict(std::uint32_t budget) {  // what cache::evict_layer does
    for (std::uint32_t h = 0; h < geo.kv_heads; ++h) {
      const std::uint32_t target = pol.target(st, t, h, budget);
      if (t.live(h) <= target) continue;
      std::vector<std::uint32_t> v;
      pol.select(st, t, h, t.live(h) - target, v);
      REQUIRE(v.size() == t.live(h) - target);
      for (auto s : v) t.vacate(h, s);
    }
  }
};

struct shape {
  std::uint32_t H, QH, D;
};

}  // namespace

TEST_CASE("episodic: scores equal a plain max-softmax over the GQA group and the probes",
          "[episodic]") {
  const shape sh = GENERATE(shape{1, 1, 16}, shape{2, 4, 16}, shape{2, 8, 32}, shape{4, 4, 64},
                            shape{3, 6, 24});
  const auto level = GENERATE(episodic_level::pair, episodic_level::pair_uniform);
  std::mt19937 rng(sh.H * 100 + sh.QH * 10 + sh.D + (level == episodic_level::pair ? 0u : 7u));
  const geometry g{1, sh.H, sh.QH, sh.D, dtype::f32};
  const std::uint32_t P = 5, budget = 40, chunk = 30;
  direct_policy dp(g, 256, 400, rng, episodic_config{level, 6});
  std::vector<std::set<std::int32_t>> kept(sh.H);
  for (int step = 0; step < 5; ++step) {
    dp.place(chunk);
    for (std::uint32_t h = 0; h < sh.H; ++h)
      for (std::uint32_t i = 0; i < chunk; ++i) kept[h].insert(static_cast<std::int32_t>(dp.next - chunk + i));
    const auto probes = randn(rng, std::size_t(P) * sh.QH * sh.D, 1.5f);
    REQUIRE(dp.pol.observe(dp.st, dp.t, dp.keys(), probe_signal{probes.data(), dtype::f32, P}).ok());
    // scores of every live slot, against the plain re-implementation
    for (std::uint32_t h = 0; h < sh.H; ++h) {
      const auto want = oracle_scores(dp.tk, dp.live(h), probes, P, sh.QH, h);
      for (std::uint32_t s = 0; s < dp.t.rows(); ++s) {
        const auto pos = dp.t.position(s, h);
        if (pos < 0) continue;
        const double w = want.at(pos);
        REQUIRE(dp.st.score[h][s] == Approx(w).epsilon(1e-5).margin(1e-9));
      }
    }
    dp.evict(budget);
    oracle_evict(kept, dp.tk, probes, P, sh.QH, budget, level, 6);
    std::uint64_t total = 0;
    for (std::uint32_t h = 0; h < sh.H; ++h) {
      REQUIRE(dp.live(h) == kept[h]);
      for (std::int32_t p = 0; p < 6; ++p) CHECK(kept[h].count(p) == 1);  // protected
      total += kept[h].size();
      if (level == episodic_level::pair_uniform) CHECK(kept[h].size() == std::min<std::size_t>(budget, static_cast<std::size_t>(dp.next)));
    }
    if (level == episodic_level::pair) CHECK(total == std::min<std::uint64_t>(std::uint64_t(budget) * sh.H, static_cast<std::uint64_t>(dp.next) * sh.H));
  }
}

TEST_CASE("episodic: pair keeps a global top over heads (uneven live[h]); pair_uniform per head; "
          "protected prefix; no eviction during decode",
          "[episodic]") {
  constexpr std::uint32_t H = 2, QH = 4, D = 16, P = 4, B = 24, S = 8;
  const auto level = GENERATE(episodic_level::pair, episodic_level::pair_uniform);
  std::mt19937 rng(level == episodic_level::pair ? 11 : 12);
  cache<heap_memory, episodic> c(evtest::config(1, H, QH, D, 256, B), heap_memory{},
                                 episodic(episodic_config{level, S}));
  const seq_id s = c.open().value();
  token_keys tk{H, D, {}};
  std::vector<std::set<std::int32_t>> kept(H);
  bool uneven = false;
  std::int32_t next = 0;
  for (int step = 0; step < 4; ++step) {
    const std::uint32_t n = 20;
    // head 1's keys are larger: its softmax is peakier, so it wins more of the global cut
    auto k = randn(rng, std::size_t(n) * H * D);
    for (std::uint32_t i = 0; i < n; ++i)
      for (std::uint32_t d = 0; d < D; ++d) k[(std::size_t(i) * H + 1) * D + d] *= 3.0f;
    tk.k.insert(tk.k.end(), k.begin(), k.end());
    evtest::append(c, s, 0, k, k, n);
    for (auto& kh : kept)
      for (std::uint32_t i = 0; i < n; ++i) kh.insert(next + static_cast<std::int32_t>(i));
    next += static_cast<std::int32_t>(n);
    const auto probes = randn(rng, std::size_t(P) * QH * D);
    REQUIRE(c.observe(s, 0, probe_signal{probes.data(), dtype::f32, P}).ok());
    REQUIRE(c.evict(s).ok());
    oracle_evict(kept, tk, probes, P, QH, B, level, S);
    const auto v = evtest::view(c, s, 0);
    std::uint32_t total = 0;
    for (std::uint32_t h = 0; h < H; ++h) {
      REQUIRE(evtest::kept(v, h) == kept[h]);
      CHECK(v.live[h] == kept[h].size());
      for (std::int32_t p = 0; p < static_cast<std::int32_t>(S); ++p) CHECK(kept[h].count(p) == 1);
      total += v.live[h];
      if (level == episodic_level::pair_uniform) CHECK(v.live[h] == std::min<std::uint32_t>(B, next));
    }
    CHECK(total == std::min<std::uint32_t>(B * H, static_cast<std::uint32_t>(next) * H));
    uneven = uneven || v.live[0] != v.live[1];
  }
  CHECK(uneven == (level == episodic_level::pair));
  // decode: appends with no fresh observe are never evicted
  const auto before = evtest::view(c, s, 0);
  const std::uint32_t l0 = before.live[0], l1 = before.live[1];
  for (int t = 0; t < 5; ++t) {
    const auto k = randn(rng, std::size_t(H) * D);
    evtest::append(c, s, 0, k, k, 1);
    REQUIRE(c.evict(s).ok());
  }
  const auto after = evtest::view(c, s, 0);
  CHECK(after.live[0] == l0 + 5);
  CHECK(after.live[1] == l1 + 5);
}

TEST_CASE("episodic: ties keep the newer token, then the higher head (exact equal scores)",
          "[episodic]") {
  // Keys repeat every 4 positions and are the same in every head, and every head's group sees
  // the same probe queries: scores tie within a head (same key) and across heads (same
  // position), so only the tie rules decide the kept sets.
  const geometry g{1, 2, 4, 16, dtype::f32};
  const auto level = GENERATE(episodic_level::pair, episodic_level::pair_uniform);
  std::mt19937 rng(31);
  direct_policy dp(g, 128, 64, rng, episodic_config{level, 0});
  const auto base = randn(rng, 4 * 16);
  for (std::int32_t p = 0; p < 64; ++p)
    for (std::uint32_t h = 0; h < 2; ++h)
      std::copy_n(base.data() + (p % 4) * 16, 16, dp.tk.k.data() + (std::size_t(p) * 2 + h) * 16);
  const auto q = randn(rng, 2 * 16);  // one query per group member, shared by the heads
  std::vector<float> probes(4 * 16);
  for (std::uint32_t qh = 0; qh < 4; ++qh) std::copy_n(q.data() + (qh % 2) * 16, 16, probes.data() + qh * 16);
  std::vector<std::set<std::int32_t>> kept(2);
  for (int step = 0; step < 3; ++step) {
    dp.place(13);
    for (auto& kh : kept)
      for (std::int32_t i = 0; i < 13; ++i) kh.insert(static_cast<std::int32_t>(dp.next) - 13 + i);
    REQUIRE(dp.pol.observe(dp.st, dp.t, dp.keys(), probe_signal{probes.data(), dtype::f32, 1}).ok());
    dp.evict(7);  // pair: 14 over 2 heads
    oracle_evict(kept, dp.tk, probes, 1, 4, 7, level, 0);
    for (std::uint32_t h = 0; h < 2; ++h) REQUIRE(dp.live(h) == kept[h]);
  }
}

TEST_CASE("episodic: a protected prefix above the budget is kept whole", "[episodic]") {
  std::mt19937 rng(5);
  const geometry g{1, 2, 4, 16, dtype::f32};
  for (auto level : {episodic_level::pair, episodic_level::pair_uniform}) {
    direct_policy dp(g, 128, 100, rng, episodic_config{level, 30});
    dp.place(50);
    const auto probes = randn(rng, std::size_t(3) * 4 * 16);
    REQUIRE(dp.pol.observe(dp.st, dp.t, dp.keys(), probe_signal{probes.data(), dtype::f32, 3}).ok());
    dp.evict(20);  // below the 30 protected tokens: every unprotected one goes
    for (std::uint32_t h = 0; h < 2; ++h) {
      std::set<std::int32_t> want;
      for (std::int32_t p = 0; p < 30; ++p) want.insert(p);
      CHECK(dp.live(h) == want);
      CHECK(dp.pol.target(dp.st, dp.t, h, 20) == 30);
    }
  }
}

TEST_CASE("episodic: block-wise prefill of E forked episodes through a host_vmm cache",
          "[episodic]") {
  // Geometry: 2 layers, 2 kv heads, 4 query heads, head_dim 64, fp32: a slot row (all heads of
  // one layer) is 2*64*4 = 512 bytes, so a 64 KiB page holds 128 rows. The system prompt is 128
  // tokens: exactly the first page of each of the 4 ranges (2 layers x K, V) of a sequence.
  constexpr std::uint32_t L = 2, H = 2, QH = 4, D = 64, S = 128, E = 3, C = 64, CHUNKS = 8, P = 6;
  constexpr std::size_t page = 64 * 1024, row = std::size_t(H) * D * 4, ranges = 2 * L;
  static_assert(S * row == page);
  const std::vector<std::uint32_t> M = {192, 160};  // per-layer budgets (apply_layer_budgets)
  const auto level = GENERATE(episodic_level::pair, episodic_level::pair_uniform);
  std::mt19937 rng(level == episodic_level::pair ? 21 : 22);

  cache_config cfg = evtest::config(L, H, QH, D, 1024);
  using cache_t = cache<host_vmm, episodic>;
  cache_t c(cfg, host_vmm(host_vmm_config{page, 512}), episodic(episodic_config{level, S}));
  REQUIRE(apply_layer_budgets(c, M).ok());
  CHECK(c.budget(0) == 192);
  CHECK(c.budget(1) == 160);

  // the conversation: the same tokens for every episode; keys per layer
  std::vector<token_keys> tk(L, token_keys{H, D, {}});
  for (auto& t : tk) t.k = randn(rng, std::size_t(S + C * CHUNKS) * H * D);
  auto rows_of = [&](std::uint32_t l, std::uint32_t first, std::uint32_t n) {
    return std::vector<float>(tk[l].k.begin() + std::ptrdiff_t(first) * H * D,
                              tk[l].k.begin() + std::ptrdiff_t(first + n) * H * D);
  };

  const seq_id root = c.open().value();
  for (std::uint32_t l = 0; l < L; ++l) evtest::append(c, root, l, rows_of(l, 0, S), rows_of(l, 0, S), S);
  const std::size_t prefix_pages = c.stats().memory.pages_in_use();
  CHECK(prefix_pages == ranges);  // one page per range
  std::vector<seq_id> ep;
  for (std::uint32_t e = 0; e < E; ++e) ep.push_back(c.fork(root).value());
  {
    const auto st = c.stats();
    CHECK(st.memory.pages_shared == ranges);            // the prefix, mapped once
    CHECK(st.memory.pages_in_use() == prefix_pages);    // not (E + 1) copies
    CHECK(st.bytes_backed == (E + 1) * ranges * page);  // each range sees its page
  }

  // each episode's probe queries (its patched prompt), per layer
  std::vector<std::vector<std::vector<float>>> probes(E, std::vector<std::vector<float>>(L));
  for (auto& pe : probes)
    for (auto& pl : pe) pl = randn(rng, std::size_t(P) * QH * D, 1.5f);

  for (std::uint32_t e = 0; e < E; ++e) {
    const std::size_t backed0 = c.stats().bytes_backed;  // every other sequence stays as it is
    std::size_t peak = ranges * page;                     // this episode's ranges: the prefix
    std::vector<std::vector<std::set<std::int32_t>>> kept(L, std::vector<std::set<std::int32_t>>(H));
    for (auto& kl : kept)
      for (auto& kh : kl)
        for (std::int32_t p = 0; p < static_cast<std::int32_t>(S); ++p) kh.insert(p);
    std::uint32_t max_rows = S;  // the rows any head may reach: before eviction, kept + chunk
    for (std::uint32_t ch = 0; ch < CHUNKS; ++ch) {
      const std::uint32_t first = S + ch * C;
      for (std::uint32_t l = 0; l < L; ++l) {
        std::uint32_t most = 0;
        for (const auto& kh : kept[l]) most = std::max<std::uint32_t>(most, static_cast<std::uint32_t>(kh.size()));
        max_rows = std::max(max_rows, most + C);
        evtest::append(c, ep[e], l, rows_of(l, first, C), rows_of(l, first, C), C);
        peak = std::max(peak, ranges * page + (c.stats().bytes_backed - backed0));
      }
      for (std::uint32_t l = 0; l < L; ++l)
        REQUIRE(c.observe(ep[e], l, probe_signal{probes[e][l].data(), dtype::f32, P}).ok());
      REQUIRE(c.evict(ep[e]).ok());
      for (std::uint32_t l = 0; l < L; ++l) {
        for (auto& kh : kept[l])
          for (std::uint32_t i = 0; i < C; ++i) kh.insert(static_cast<std::int32_t>(first + i));
        oracle_evict(kept[l], tk[l], probes[e][l], P, QH, M[l], level, S);
        const auto v = evtest::view(c, ep[e], l);
        for (std::uint32_t h = 0; h < H; ++h) {
          REQUIRE(evtest::kept(v, h) == kept[l][h]);  // (c) the simulation's kept set
          for (std::int32_t p = 0; p < static_cast<std::int32_t>(S); ++p) REQUIRE(kept[l][h].count(p) == 1);
        }
      }
    }
    // (b) working memory: every range of this episode holds at most max_rows rows, where
    // max_rows = max over chunks and heads of (tokens kept before the chunk + chunk) <=
    // M·Hk + C (pair) or M + C (pair_uniform); rounded up to pages, for the 4 ranges.
    const std::uint32_t bound_rows = level == episodic_level::pair ? M[0] * H + C : M[0] + C;
    CHECK(max_rows <= bound_rows);
    const std::size_t bound = ranges * ((std::size_t(max_rows) * row + page - 1) / page) * page;
    CHECK(peak <= bound);
    CHECK(peak < ranges * ((std::size_t(S + C * CHUNKS) * row + page - 1) / page) * page);  // < no eviction
    // decode: no eviction without a fresh scoring
    const auto before = evtest::view(c, ep[e], 0);  // live points into the cache: copy it
    const std::vector<std::uint32_t> live0(before.live, before.live + H);
    const auto k1 = randn(rng, std::size_t(H) * D);
    for (std::uint32_t l = 0; l < L; ++l) evtest::append(c, ep[e], l, k1, k1, 1);
    REQUIRE(c.evict(ep[e]).ok());
    const auto after = evtest::view(c, ep[e], 0);
    for (std::uint32_t h = 0; h < H; ++h) CHECK(after.live[h] == live0[h] + 1);
  }
  // (a) the prefix pages are still mapped once (protected tokens are never overwritten)
  const auto st = c.stats();
  CHECK(st.memory.pages_shared == ranges);
  // bytes_backed counts every range's pages (E + 1 times the shared prefix pages): separate
  // copies would need bytes_backed / page pages; the pool holds E * ranges fewer
  CHECK(st.memory.pages_in_use() * page == st.bytes_backed - E * ranges * page);
  CHECK(check_invariants(c).ok());
}

TEST_CASE("episodic: bad probes are refused with the cache unchanged", "[episodic]") {
  std::mt19937 rng(3);
  cache<heap_memory, episodic> c(evtest::config(1, 2, 4, 16, 64, 16), heap_memory{},
                                 episodic(episodic_config{episodic_level::pair, 2}));
  const seq_id s = c.open().value();
  const auto k = randn(rng, std::size_t(20) * 2 * 16);
  evtest::append(c, s, 0, k, k, 20);
  auto probes = randn(rng, std::size_t(3) * 4 * 16);
  REQUIRE(c.observe(s, 0, probe_signal{probes.data(), dtype::f32, 3}).ok());
  const auto digest = state_digest(c);

  auto zero = c.observe(s, 0, probe_signal{probes.data(), dtype::f32, 0});
  CHECK(zero.code() == errc::invalid_argument);
  CHECK(state_digest(c) == digest);

  auto null = c.observe(s, 0, probe_signal{nullptr, dtype::f32, 3});
  CHECK(!null.ok());
  CHECK(state_digest(c) == digest);

  probes[std::size_t(2) * 4 * 16 + 16 + 5] = std::numeric_limits<float>::quiet_NaN();
  auto nan = c.observe(s, 0, probe_signal{probes.data(), dtype::f32, 3});
  CHECK(nan.code() == errc::invalid_argument);
  CHECK(has(nan.message(), {"NaN", "query 2", "head 1", "dim 5"}));
  CHECK(state_digest(c) == digest);
  probes[7] = std::numeric_limits<float>::infinity();
  CHECK(c.observe(s, 0, probe_signal{probes.data(), dtype::f32, 3}).code() == errc::invalid_argument);
  CHECK(state_digest(c) == digest);
  // the earlier scoring still stands: evict() cuts to the budget
  REQUIRE(c.evict(s).ok());
  const auto v = evtest::view(c, s, 0);
  CHECK(v.live[0] + v.live[1] == 32);
  CHECK(check_invariants(c).ok());

  CHECK_THROWS_AS(episodic(episodic_config{static_cast<episodic_level>(9), 0}), kvcache::error);
}

// ---- k-means -----------------------------------------------------------------------------------

namespace {

double u01(std::mt19937_64& g) { return double(g() >> 11) * 0x1.0p-53; }

double d2(const std::vector<float>& x, std::uint32_t dim, std::uint32_t i, std::uint32_t j) {
  double s = 0;
  for (std::uint32_t d = 0; d < dim; ++d) {
    const double e = double(x[i * dim + d]) - x[j * dim + d];
    s += e * e;
  }
  return s;
}

//! Greedy k-means++ written out plainly (sklearn's _kmeans_plusplus with our uniform draws).
std::vector<std::uint32_t> slow_kmeanspp(const std::vector<float>& x, std::uint32_t n, std::uint32_t dim,
                                         std::uint32_t k, std::mt19937_64& g) {
  const std::uint32_t trials = 2 + std::uint32_t(std::log(double(k)));
  std::vector<std::uint32_t> c;
  c.push_back(std::min<std::uint32_t>(n - 1, std::uint32_t(u01(g) * n)));
  auto nearest = [&](std::uint32_t i, const std::vector<std::uint32_t>& cs) {
    double m = std::numeric_limits<double>::infinity();
    for (auto j : cs) m = std::min(m, d2(x, dim, i, j));
    return m;
  };
  while (c.size() < k) {
    double pot = 0;
    for (std::uint32_t i = 0; i < n; ++i) pot += nearest(i, c);
    std::vector<std::uint32_t> cand;
    for (std::uint32_t t = 0; t < trials; ++t) {
      const double r = u01(g) * pot;
      double cum = 0;
      std::uint32_t pick = n - 1;
      for (std::uint32_t i = 0; i < n; ++i) {
        cum += nearest(i, c);
        if (cum >= r) {
          pick = i;
          break;
        }
      }
      cand.push_back(pick);
    }
    double best = std::numeric_limits<double>::infinity();
    std::uint32_t bi = 0;
    for (auto cd : cand) {
      auto cs = c;
      cs.push_back(cd);
      double p = 0;
      for (std::uint32_t i = 0; i < n; ++i) p += nearest(i, cs);
      if (p < best) {
        best = p;
        bi = cd;
      }
    }
    c.push_back(bi);
  }
  return c;
}

//! Three well-separated 2-D blobs of 20 points each (points 3i + b are in blob b).
std::vector<float> blobs() {
  const float cx[3] = {0.0f, 10.0f, -10.0f}, cy[3] = {0.0f, 10.0f, 10.0f};
  std::vector<float> x;
  for (int i = 0; i < 20; ++i)
    for (int b = 0; b < 3; ++b) {
      x.push_back(cx[b] + 0.1f * float((i * 7 + b * 3) % 11 - 5));
      x.push_back(cy[b] + 0.1f * float((i * 5 + b) % 9 - 4));
    }
  return x;
}

}  // namespace

TEST_CASE("episodic: kmeans finds well-separated blobs, deterministically", "[episodic]") {
  const auto x = blobs();
  const std::uint32_t n = 60, dim = 2;
  auto r = kmeans(x, n, dim, 3);
  REQUIRE(r.ok());
  // the partition is the blobs' (up to the order of the clusters)
  for (std::uint32_t i = 0; i < n; ++i) CHECK(r->labels[i] == r->labels[i % 3]);
  CHECK(std::set<std::uint32_t>{r->labels[0], r->labels[1], r->labels[2]}.size() == 3);
  double want_inertia = 0;
  for (std::uint32_t b = 0; b < 3; ++b) {
    double mx = 0, my = 0;
    for (std::uint32_t i = b; i < n; i += 3) mx += x[i * 2], my += x[i * 2 + 1];
    mx /= 20, my /= 20;
    const std::uint32_t c = r->labels[b];
    CHECK(r->centroids[c * 2] == Approx(mx).margin(1e-5));
    CHECK(r->centroids[c * 2 + 1] == Approx(my).margin(1e-5));
    for (std::uint32_t i = b; i < n; i += 3)
      want_inertia += (x[i * 2] - mx) * (x[i * 2] - mx) + (x[i * 2 + 1] - my) * (x[i * 2 + 1] - my);
  }
  CHECK(r->inertia == Approx(want_inertia).epsilon(1e-9));
  // the best of the runs, and the same twice
  CHECK(r->run_inertia.size() == 10);
  for (double ri : r->run_inertia) CHECK(r->inertia <= ri);
  CHECK(r->run_inertia[r->best_run] == r->inertia);
  auto r2 = kmeans(x, n, dim, 3);
  REQUIRE(r2.ok());
  CHECK(r2->labels == r->labels);
  CHECK(r2->centroids == r->centroids);
  CHECK(r2->inertia == r->inertia);
  CHECK(r2->seeds == r->seeds);
}

TEST_CASE("episodic: kmeans++ picks equal a slow re-implementation; best inertia of the inits",
          "[episodic]") {
  std::mt19937 rng(9);
  const std::uint32_t n = 80, dim = 5;
  const auto x = randn(rng, std::size_t(n) * dim);
  for (std::uint32_t k : {1u, 2u, 4u, 7u}) {
    const std::uint64_t seed = 42 + k;
    auto r = kmeans(x, n, dim, k, seed, 6);
    REQUIRE(r.ok());
    std::mt19937_64 g(seed);  // one generator for all runs, in order
    std::vector<std::vector<std::uint32_t>> picks;
    for (int run = 0; run < 6; ++run) picks.push_back(slow_kmeanspp(x, n, dim, k, g));
    CHECK(r->seeds == picks[r->best_run]);
    for (double ri : r->run_inertia) CHECK(r->inertia <= ri);
    CHECK(*std::min_element(r->run_inertia.begin(), r->run_inertia.end()) == r->inertia);
    // each single init (n_init = 1) is a run of the same stream: run 0 equals the first
    auto one = kmeans(x, n, dim, k, seed, 1);
    REQUIRE(one.ok());
    CHECK(one->seeds == picks[0]);
    CHECK(one->inertia == r->run_inertia[0]);
    CHECK(r->inertia <= one->inertia);
    // converged: each point is at its nearest centroid (or the run hit the tolerance)
    std::uint32_t misplaced = 0;
    for (std::uint32_t i = 0; i < n; ++i) {
      double best = std::numeric_limits<double>::infinity();
      std::uint32_t bl = 0;
      for (std::uint32_t c = 0; c < k; ++c) {
        double s = 0;
        for (std::uint32_t d = 0; d < dim; ++d) {
          const double e = double(x[i * dim + d]) - r->centroids[c * dim + d];
          s += e * e;
        }
        if (s < best) best = s, bl = c;
      }
      misplaced += bl != r->labels[i];
    }
    CHECK(misplaced == 0);
  }
}

TEST_CASE("episodic: kmeans refuses bad inputs with the numbers", "[episodic]") {
  const std::vector<float> x(12, 1.0f);
  auto k0 = kmeans(x, 6, 2, 0);
  CHECK(k0.code() == errc::invalid_argument);
  auto big = kmeans(x, 6, 2, 7);
  CHECK(big.code() == errc::invalid_argument);
  CHECK(has(big.error().message(), {"k = 7", "n = 6"}));
  CHECK(kmeans(std::span<const float>{}, 0, 2, 1).code() == errc::invalid_argument);
  auto dims = kmeans(x, 5, 2, 2);
  CHECK(dims.code() == errc::shape_mismatch);
  CHECK(has(dims.error().message(), {"12 values", "n = 5"}));
  auto y = x;
  y[5] = std::numeric_limits<float>::quiet_NaN();
  auto nan = kmeans(y, 6, 2, 2);
  CHECK(nan.code() == errc::invalid_argument);
  CHECK(has(nan.error().message(), {"point 2"}));
  CHECK(kmeans(x, 6, 2, 2, 42, 0).code() == errc::invalid_argument);
  // identical points, k > distinct points: still k clusters' worth of output, inertia 0
  auto same = kmeans(x, 6, 2, 3);
  REQUIRE(same.ok());
  CHECK(same->inertia == 0.0);
  CHECK(same->centroids.size() == 6);
}

// ---- episodes ----------------------------------------------------------------------------------

TEST_CASE("episodic: cluster_episodes groups topics, orders members and medoids; route",
          "[episodic]") {
  std::mt19937 rng(17);
  const std::uint32_t dim = 8, n = 32, E = 4;
  // segment i is about topic (i / 2) % 4: topics alternate in pairs along the conversation;
  // embeddings are the topic's axis plus noise, at arbitrary scales (normalisation removes it)
  std::vector<float> emb(std::size_t(n) * dim);
  std::normal_distribution<float> noise(0.0f, 0.08f);
  for (std::uint32_t i = 0; i < n; ++i) {
    const float scale = 0.5f + float(i % 5);
    for (std::uint32_t d = 0; d < dim; ++d)
      emb[i * dim + d] = scale * ((d == (i / 2) % 4 ? 1.0f : 0.0f) + noise(rng));
  }
  auto es = cluster_episodes(emb, n, dim, E, 3);
  REQUIRE(es.ok());
  REQUIRE(es->episodes.size() == E);
  std::set<std::uint32_t> seen_topics;
  for (std::uint32_t e = 0; e < E; ++e) {
    const auto& ep = es->episodes[e];
    REQUIRE(ep.members.size() == 8);
    const std::uint32_t topic = (ep.members[0] / 2) % 4;
    seen_topics.insert(topic);
    for (auto m : ep.members) CHECK((m / 2) % 4 == topic);
    for (std::size_t i = 1; i < ep.similarity.size(); ++i) CHECK(ep.similarity[i - 1] >= ep.similarity[i]);
    // similarity = cosine of the normalised embedding with the centroid
    for (std::size_t i = 0; i < ep.members.size(); ++i) {
      const float* v = emb.data() + ep.members[i] * dim;
      double vv = 0, cc = 0, vc = 0;
      for (std::uint32_t d = 0; d < dim; ++d)
        vv += double(v[d]) * v[d], cc += double(ep.centroid[d]) * ep.centroid[d], vc += double(v[d]) * ep.centroid[d];
      CHECK(ep.similarity[i] == Approx(vc / std::sqrt(vv * cc)).epsilon(1e-5));
    }
    std::vector<std::uint32_t> top(ep.members.begin(), ep.members.begin() + 3);
    std::sort(top.begin(), top.end());
    CHECK(ep.medoids == top);
    for (std::uint32_t i = 0; i < n; ++i) CHECK((es->labels[i] == e) == ((i / 2) % 4 == topic));
  }
  CHECK(seen_topics.size() == 4);
  // routing: a question about topic t goes to the episode holding topic t
  for (std::uint32_t t = 0; t < 4; ++t) {
    std::vector<float> q(dim, 0.05f);
    q[t] = 3.0f;
    auto r = route(*es, q);
    REQUIRE(r.ok());
    CHECK((es->episodes[*r].members[0] / 2) % 4 == t);
  }
  // n_medoid above an episode's size takes all of it
  auto all = cluster_episodes(emb, n, dim, E, 100);
  REQUIRE(all.ok());
  for (const auto& ep : all->episodes) {
    auto m = ep.members;
    std::sort(m.begin(), m.end());
    CHECK(ep.medoids == m);
  }
  // determinism
  auto again = cluster_episodes(emb, n, dim, E, 3);
  REQUIRE(again.ok());
  CHECK(again->labels == es->labels);
  for (std::uint32_t e = 0; e < E; ++e) CHECK(again->episodes[e].centroid == es->episodes[e].centroid);

  // bad inputs
  CHECK(cluster_episodes(emb, n, dim, 0).code() == errc::invalid_argument);
  auto many = cluster_episodes(emb, n, dim, 33);
  CHECK(many.code() == errc::invalid_argument);
  CHECK(has(many.error().message(), {"E = 33", "n = 32"}));
  CHECK(cluster_episodes(emb, n, dim + 1).code() == errc::shape_mismatch);
  CHECK(cluster_episodes(emb, n, dim, E, 0).code() == errc::invalid_argument);
  const std::vector<float> wrong(dim + 1, 1.0f);
  auto bad = route(*es, wrong);
  CHECK(bad.code() == errc::shape_mismatch);
  CHECK(has(bad.error().message(), {"9 values", "dimension is 8"}));
  CHECK(route(episode_set{}, wrong).code() == errc::invalid_argument);
  std::vector<float> qn(dim, 0.0f);
  qn[1] = std::numeric_limits<float>::quiet_NaN();
  CHECK(route(*es, qn).code() == errc::invalid_argument);
}

// ---- layer budgets -----------------------------------------------------------------------------

namespace {
std::uint64_t sum(const std::vector<std::uint32_t>& v) {
  return std::accumulate(v.begin(), v.end(), std::uint64_t{0});
}
}  // namespace

TEST_CASE("episodic: layer_budgets follows the formula (hand examples)", "[episodic]") {
  SECTION("the floor pushes the total above M·L: the excess comes off proportionally") {
    const std::vector<double> s = {0.9, 0.7, 0.5, 0.8};
    const std::uint32_t M = 100;
    // s' = (s - 0.5) / 0.4 = {1, 0.5, 0, 0.75}; w = (1 - s')^1.1
    const double w0 = 0.0, w1 = std::pow(0.5, 1.1), w2 = 1.0, w3 = std::pow(0.25, 1.1);
    const double W = w0 + w1 + w2 + w3;
    // raw = w · 400 / W = {0, 110.80, 237.51, 51.69}; int() -> {0, 110, 237, 51}
    CHECK(int(w1 * 400 / W) == 110);
    CHECK(int(w2 * 400 / W) == 237);
    CHECK(int(w3 * 400 / W) == 51);
    // floor 25 -> {25, 110, 237, 51} = 423: excess 23 over the floor's excess {0, 85, 212, 26}
    // (sum 323): shares 23·85/323 = 6.05, 23·212/323 = 15.10, 23·26/323 = 1.85 -> 6, 15, 1 and
    // the last unit to the largest fraction (layer 3: .85) -> {25, 104, 222, 49}
    // the same, step by step
    const double w[4] = {w0, w1, w2, w3};
    std::vector<std::uint32_t> want(4);
    for (int l = 0; l < 4; ++l) want[l] = std::max<std::uint32_t>(std::uint32_t(w[l] * 400 / W), M / 4);
    CHECK(want == std::vector<std::uint32_t>{25, 110, 237, 51});
    const std::uint32_t excess = std::uint32_t(sum(want)) - 400;
    std::uint32_t over = 0;
    for (auto x : want) over += x - 25;
    CHECK(excess == 23);
    CHECK(over == 323);
    double frac[4] = {};
    std::uint32_t taken = 0;
    for (int l = 0; l < 4; ++l) {
      const double share = double(excess) * (want[l] - 25) / over;
      frac[l] = share - std::floor(share);
      want[l] -= std::uint32_t(share);
      taken += std::uint32_t(share);
    }
    CHECK(taken == 22);
    const int largest = int(std::max_element(frac, frac + 4) - frac);
    CHECK(largest == 3);
    want[largest] -= 1;
    CHECK(want == std::vector<std::uint32_t>{25, 104, 222, 49});
    auto b = layer_budgets(s, M, 1.1);
    REQUIRE(b.ok());
    CHECK(*b == want);
    CHECK(sum(*b) == 400);
  }
  SECTION("truncation leaves the total below M·L: units to the largest fractions") {
    const std::vector<double> s = {0.0, 0.1, 0.2, 0.3, 1.0};
    const std::uint32_t M = 4;
    // s' = s; w = 1 - s' (alpha 1) = {1, .9, .8, .7, 0}, sum 3.4; raw = 20 w / 3.4 =
    // {5.88, 5.29, 4.71, 4.12, 0} -> {5, 5, 4, 4, 0}; floor max(1, 4/4) = 1 -> total 19 < 20:
    // one unit to the largest fraction among unfloored layers (layer 0: .88)
    auto b = layer_budgets(s, M, 1.0);
    REQUIRE(b.ok());
    CHECK(*b == std::vector<std::uint32_t>{6, 5, 4, 4, 1});
  }
  SECTION("two layers") {
    auto b = layer_budgets(std::vector<double>{0.2, 0.1}, 10, 2.0);
    REQUIRE(b.ok());
    // s' = {1, 0}; raw = {0, 20}; floor 2 -> {2, 20}; excess 2 from layer 1 -> {2, 18}
    CHECK(*b == std::vector<std::uint32_t>{2, 18});
  }
  SECTION("equal sensitivities, alpha 0: every layer gets M") {
    CHECK(*layer_budgets(std::vector<double>{0.3, 0.3, 0.3}, 77) == std::vector<std::uint32_t>{77, 77, 77});
    CHECK(*layer_budgets(std::vector<double>{0.1, 0.9, 0.5}, 77, 0.0) == std::vector<std::uint32_t>{77, 77, 77});
    CHECK(*layer_budgets(std::vector<double>{0.5}, 8) == std::vector<std::uint32_t>{8});
  }
}

TEST_CASE("episodic: layer_budgets sums to M·L, respects the floor, favours sensitive layers",
          "[episodic]") {
  std::mt19937 rng(123);
  std::uniform_real_distribution<double> us(0.0, 1.0);
  for (int trial = 0; trial < 500; ++trial) {
    const std::uint32_t L = 1 + rng() % 40, M = 1 + rng() % 9000;
    const double alpha = trial % 7 == 0 ? 0.0 : 3.0 * us(rng);
    std::vector<double> s(L);
    for (auto& x : s) x = us(rng);
    auto b = layer_budgets(s, M, alpha);
    REQUIRE(b.ok());
    REQUIRE(b->size() == L);
    CHECK(sum(*b) == std::uint64_t(M) * L);
    for (auto x : *b) CHECK(x >= std::max(1u, M / 4));
    // lower similarity never gets less than higher similarity
    for (std::uint32_t i = 0; i < L; ++i)
      for (std::uint32_t j = 0; j < L; ++j)
        if (s[i] < s[j]) CHECK((*b)[i] + 1 >= (*b)[j]);
  }
}

TEST_CASE("episodic: layer_budgets, key_window_similarity and apply_layer_budgets bad inputs",
          "[episodic]") {
  CHECK(layer_budgets(std::vector<double>{}, 10).code() == errc::invalid_argument);
  CHECK(layer_budgets(std::vector<double>{0.1, 0.2}, 0).code() == errc::invalid_budget);
  auto nan = layer_budgets(std::vector<double>{0.1, std::nan(""), 0.3}, 10);
  CHECK(nan.code() == errc::invalid_argument);
  CHECK(has(nan.error().message(), {"layer 1"}));
  CHECK(layer_budgets(std::vector<double>{0.1, 0.2}, 10, -1.0).code() == errc::invalid_argument);
  CHECK(layer_budgets(std::vector<double>{0.1, 0.2}, 10, INFINITY).code() == errc::invalid_argument);

  // key_window_similarity: windows of 100 tokens, the last partial
  std::mt19937 rng(4);
  const std::uint32_t T = 150;
  const std::size_t W = 8;
  const auto a = randn(rng, T * W);
  CHECK(key_window_similarity(a.data(), a.data(), T, W) == Approx(1.0));
  auto neg = a;
  for (auto& x : neg) x = -x;
  CHECK(key_window_similarity(a.data(), neg.data(), T, W) == Approx(-1.0));
  // first window identical, second window orthogonal-ish: b = a on [0,100), 0 on [100,150)
  auto b = a;
  std::fill(b.begin() + 100 * W, b.end(), 0.0f);
  CHECK(key_window_similarity(a.data(), b.data(), T, W) == Approx(0.5));
  // scaling one run changes nothing (cosine)
  auto sc = a;
  for (auto& x : sc) x *= 3.0f;
  CHECK(key_window_similarity(a.data(), sc.data(), T, W, 40) == Approx(1.0));
  CHECK(std::isnan(key_window_similarity(a.data(), a.data(), 0, W)));
  CHECK(std::isnan(key_window_similarity(a.data(), a.data(), T, W, 0)));

  cache<heap_memory, episodic> c(evtest::config(3, 2, 4, 16, 64, 32));
  const std::vector<std::uint32_t> few = {10, 20};
  auto e1 = apply_layer_budgets(c, few);
  CHECK(e1.code() == errc::invalid_budget);
  CHECK(has(e1.message(), {"2 budgets for 3 layers"}));
  const std::vector<std::uint32_t> zero = {10, 0, 20}, over = {10, 20, 65};
  CHECK(apply_layer_budgets(c, zero).code() == errc::invalid_budget);
  auto e3 = apply_layer_budgets(c, over);
  CHECK(e3.code() == errc::invalid_budget);
  CHECK(has(e3.message(), {"layer 2", "65"}));
  for (std::uint32_t l = 0; l < 3; ++l) CHECK(c.budget(l) == 32);  // nothing changed
  const std::vector<std::uint32_t> ok = {10, 20, 64};
  REQUIRE(apply_layer_budgets(c, ok).ok());
  CHECK(c.budget(0) == 10);
  CHECK(c.budget(1) == 20);
  CHECK(c.budget(2) == 64);
}
