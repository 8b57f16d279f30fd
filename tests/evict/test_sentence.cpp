// SPDX-License-Identifier: Apache-2.0
//! @file
//! sentence_kv driven directly (a slot table, keys and a fake holding tier owned by the test)
//! against a slow re-implementation of ALGORITHMS.md §3 written over positions: sentence grouping
//! with the cap, the SnapKV prune (kvcache::snapkv itself is the oracle), mean keys, selection
//! order and cut, first-token mode, GQA averaging, budgets below sinks + recent; predict(); bad
//! inputs leave the state as it was; the boundary helpers; and an engine loop through
//! cache<tiered<host_vmm>, sentence_kv> checked against the same spec, byte for byte.
#include <kvcache/cache.hpp>
#include <kvcache/check.hpp>
#include <kvcache/evict/sentence.hpp>
#include <kvcache/evict/snapkv.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/memory/tiered.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "catch.hpp"

using namespace kvcache;

namespace {

//! One (sequence, layer): slot table, fp32 keys by slot, and a holding tier of groups per head.
struct rig {
  std::uint32_t H, QH, D, cap;
  sentence_kv pol;
  slot_table t;
  sentence_kv::state st;
  std::vector<float> kslot;                      // [cap][H][D]
  std::vector<std::vector<float>> key_of_pos;    // [position][H*D] as appended
  struct held {
    std::int32_t pos;
    std::vector<float> key;
  };
  std::map<std::pair<std::uint32_t, std::uint32_t>, std::vector<held>> store;  // (head, group)
  std::int64_t n = 0;
  std::uint64_t holds = 0, fetches = 0;

  rig(std::uint32_t h, std::uint32_t qh, std::uint32_t d, std::uint32_t capacity,
      sentence_kv_config cfg)
      : H(h), QH(qh), D(d), cap(capacity), pol(cfg), t(h, capacity),
        kslot(std::size_t{capacity} * h * d, 0.0f) {
    st = pol.make_state(policy_context{geometry{1, H, QH, D, dtype::f32}, 0, cap});
  }

  static void read(const void* ctx, std::uint32_t head, std::uint32_t first, std::uint32_t count,
                   float* out) {
    const auto& r = *static_cast<const rig*>(ctx);
    for (std::uint32_t i = 0; i < count; ++i)
      for (std::uint32_t d = 0; d < r.D; ++d)
        out[std::size_t{i} * r.D + d] = r.kslot[(std::size_t{first + i} * r.H + head) * r.D + d];
  }
  [[nodiscard]] key_reader reader() const { return key_reader{t.rows(), D, this, &read}; }
  float* krow(std::uint32_t slot, std::uint32_t head) {
    return kslot.data() + (std::size_t{slot} * H + head) * D;
  }

  //! Appends c tokens with keys `[c][H][D]`.
  void append(const std::vector<float>& k, std::uint32_t c) {
    std::vector<std::uint32_t> slots(std::size_t{c} * H);
    for (std::uint32_t i = 0; i < c; ++i) {
      key_of_pos.emplace_back(k.begin() + std::size_t{i} * H * D, k.begin() + std::size_t{i + 1} * H * D);
      for (std::uint32_t h = 0; h < H; ++h) {
        const std::uint32_t s = t.place(h, static_cast<std::int32_t>(n + i));
        slots[std::size_t{i} * H + h] = s;
        std::copy_n(k.data() + (std::size_t{i} * H + h) * D, D, krow(s, h));
      }
    }
    pol.on_append(st, t, placement{slots, H, c, n});
    n += c;
  }

  status observe(const std::vector<float>& q, const std::vector<float>& k,
                 const std::vector<std::uint8_t>& f, std::uint32_t c) {
    return pol.observe(st, t, reader(), query_signal{q.data(), dtype::f32, c},
                       key_signal{k.data(), dtype::f32, c}, boundary_signal{f.data(), c});
  }

  [[nodiscard]] std::set<std::int32_t> live(std::uint32_t h) const {
    std::set<std::int32_t> s;
    for (std::uint32_t r = 0; r < t.rows(); ++r)
      if (t.position(r, h) >= 0) s.insert(t.position(r, h));
    return s;
  }

  //! Applies a plan the way the cache does, checking it whole.
  void apply(std::uint32_t h, const tier_plan& p) {
    for (const auto& hr : p.hold) {
      REQUIRE(hr.slot < t.rows());
      const std::int32_t pos = t.position(hr.slot, h);
      REQUIRE(pos >= 0);
      const float* k = krow(hr.slot, h);
      REQUIRE(std::vector<float>(k, k + D) ==
              std::vector<float>(key_of_pos[static_cast<std::size_t>(pos)].begin() + h * D,
                                 key_of_pos[static_cast<std::size_t>(pos)].begin() + (h + 1) * D));
      store[{h, hr.group}].push_back({pos, std::vector<float>(k, k + D)});
      ++holds;
    }
    std::set<std::uint32_t> dropped;
    for (std::uint32_t s : p.drop) {
      REQUIRE(s < t.rows());
      REQUIRE(t.position(s, h) >= 0);
      REQUIRE(dropped.insert(s).second);
      t.vacate(h, s);
    }
    for (const auto& g : p.fetch) {
      REQUIRE(g.count > 0);
      auto it = store.find({h, g.group});
      REQUIRE(it != store.end());
      REQUIRE(std::size_t{g.first} + g.count <= it->second.size());
      for (std::uint32_t r = g.first; r < g.first + g.count; ++r) {
        const auto& row = it->second[r];
        REQUIRE(live(h).count(row.pos) == 0);  // a fetched row is not live already
        REQUIRE(t.room(h) > 0);
        const std::uint32_t s = t.place(h, row.pos);
        std::copy(row.key.begin(), row.key.end(), krow(s, h));
        // The K bytes fetched are those appended for that position.
        CHECK(row.key == std::vector<float>(key_of_pos[static_cast<std::size_t>(row.pos)].begin() + h * D,
                                            key_of_pos[static_cast<std::size_t>(row.pos)].begin() + (h + 1) * D));
        ++fetches;
      }
    }
  }

  std::vector<tier_plan> evict(std::uint32_t budget) {
    std::vector<tier_plan> plans(H);
    for (std::uint32_t h = 0; h < H; ++h) {
      pol.plan(st, t, reader(), h, budget, plans[h]);
      apply(h, plans[h]);
      CHECK(t.live(h) <= budget);
    }
    return plans;
  }
};

//! ALGORITHMS.md §3 over positions, plainly (fixed budget: tokens age out in position order).
struct spec {
  sentence_kv_config cfg;
  std::uint32_t H, QH, D, G;
  std::uint32_t P = 0;
  std::vector<std::vector<float>> K, Q;  // [position][H*D], [position][QH*D]
  std::vector<std::uint8_t> flag;
  std::vector<std::set<std::int32_t>> kept_prompt;  // per head: prompt positions retained

  spec(sentence_kv_config c, std::uint32_t h, std::uint32_t qh, std::uint32_t d)
      : cfg(c), H(h), QH(qh), D(d), G(qh / h) {}

  void add(const std::vector<float>& k, const std::vector<float>& q,
           const std::vector<std::uint8_t>& f, std::uint32_t c) {
    for (std::uint32_t i = 0; i < c; ++i) {
      K.emplace_back(k.begin() + std::size_t{i} * H * D, k.begin() + std::size_t{i + 1} * H * D);
      Q.emplace_back(q.begin() + std::size_t{i} * QH * D, q.begin() + std::size_t{i + 1} * QH * D);
      flag.push_back(f[i]);
    }
  }
  [[nodiscard]] std::int32_t n() const { return static_cast<std::int32_t>(K.size()); }

  //! The prune at the first plan (n = P), with kvcache::snapkv as the oracle of SnapKV's kept set.
  void prune(std::uint32_t budget) {
    P = static_cast<std::uint32_t>(n());
    kept_prompt.assign(H, {});
    const std::uint32_t w = cfg.snap.window;
    const std::uint64_t C = std::uint64_t{cfg.semantic_factor} * budget;
    std::vector<std::set<std::int32_t>> snap_keep(H);
    if (P >= w && P > C) {
      snapkv<query_signal> sk(cfg.snap);
      auto sst = sk.make_state(policy_context{geometry{1, H, QH, D, dtype::f32}, 0, P});
      slot_table tt(H, P);
      tt.place_rows(P, 0);
      std::vector<std::uint32_t> slots(std::size_t{P} * H);
      for (std::uint32_t i = 0; i < P; ++i)
        for (std::uint32_t h = 0; h < H; ++h) slots[std::size_t{i} * H + h] = i;
      sk.on_append(sst, tt, placement{slots, H, P, 0});
      struct ctx_t {
        const spec* s;
      } ctx{this};
      const key_reader kr{P, D, &ctx, [](const void* c, std::uint32_t head, std::uint32_t first,
                                         std::uint32_t count, float* out) {
                            const spec& s = *static_cast<const ctx_t*>(c)->s;
                            for (std::uint32_t i = 0; i < count; ++i)
                              for (std::uint32_t d = 0; d < s.D; ++d)
                                out[std::size_t{i} * s.D + d] = s.K[first + i][head * s.D + d];
                          }};
      std::vector<float> q;
      for (std::uint32_t p = 0; p < P; ++p) q.insert(q.end(), Q[p].begin(), Q[p].end());
      REQUIRE(sk.observe(sst, tt, kr, query_signal{q.data(), dtype::f32, P}).ok());
      for (std::uint32_t h = 0; h < H; ++h) {
        const std::uint32_t target = sk.target(sst, tt, h, static_cast<std::uint32_t>(C));
        std::vector<std::uint32_t> victims;
        sk.select(sst, tt, h, P - target, victims);
        std::set<std::int32_t> keep;
        for (std::uint32_t p = 0; p < P; ++p) keep.insert(static_cast<std::int32_t>(p));
        for (std::uint32_t v : victims) keep.erase(tt.position(v, h));
        for (std::uint32_t p = 0; p < P; ++p)  // sinks and the recent window always stay
          if (p < cfg.start || p + cfg.recent >= P) keep.insert(static_cast<std::int32_t>(p));
        kept_prompt[h] = keep;
      }
    } else {
      for (std::uint32_t h = 0; h < H; ++h)
        for (std::uint32_t p = 0; p < P; ++p) kept_prompt[h].insert(static_cast<std::int32_t>(p));
    }
  }
  [[nodiscard]] bool retained(std::uint32_t h, std::int32_t p) const {
    return p >= static_cast<std::int32_t>(P) || kept_prompt[h].count(p) != 0;
  }

  //! Sentences (closed ones, in id order) and the open one's positions.
  void sentences(std::vector<std::vector<std::int32_t>>& closed, std::vector<std::int32_t>& open) const {
    closed.clear();
    open.clear();
    std::vector<std::int32_t> cur;
    const std::uint32_t cap = cfg.max_sentence_tokens;
    for (std::int32_t p = 0; p < n(); ++p) {
      cur.push_back(p);
      if (flag[static_cast<std::size_t>(p)] || cur.size() == cap) {
        closed.push_back(cur);
        cur.clear();
      }
      if (p + 1 == static_cast<std::int32_t>(P) && !cur.empty()) {  // the prompt's tail closes
        closed.push_back(cur);
        cur.clear();
      }
    }
    open = cur;
  }

  [[nodiscard]] std::vector<float> mu(std::uint32_t h, const std::vector<std::int32_t>& s) const {
    std::vector<float> a(D, 0.0f);
    std::uint32_t c = 0;
    for (std::int32_t p : s) {
      if (!retained(h, p)) continue;
      for (std::uint32_t d = 0; d < D; ++d) a[d] += K[static_cast<std::size_t>(p)][h * D + d];
      ++c;
    }
    for (auto& x : a) x = c ? x / static_cast<float>(c) : 0.0f;
    return a;
  }

  //! The working set of head h after a plan with budget B.
  [[nodiscard]] std::set<std::int32_t> working(std::uint32_t h, std::uint32_t B) const {
    std::int64_t sinks = cfg.start, recent = cfg.recent;
    if (B < sinks + recent + 1) {
      sinks = std::min<std::int64_t>(cfg.start, B / 2);
      recent = B - sinks;
    }
    const std::int64_t N = n();
    const std::int64_t lo = std::min(sinks, N), hi = std::max(lo, N - recent);
    std::set<std::int32_t> W;
    for (std::int64_t p = 0; p < lo; ++p) W.insert(static_cast<std::int32_t>(p));
    for (std::int64_t p = hi; p < N; ++p)
      if (retained(h, static_cast<std::int32_t>(p))) W.insert(static_cast<std::int32_t>(p));
    const std::uint32_t fixed = static_cast<std::uint32_t>(W.size());
    const std::uint32_t room = B > fixed ? B - fixed : 0;
    std::vector<std::vector<std::int32_t>> closed;
    std::vector<std::int32_t> open;
    sentences(closed, open);
    if (room == 0 || open.size() <= cfg.length_threshold) return W;  // first-token mode
    std::vector<float> qbar(D);
    for (std::uint32_t d = 0; d < D; ++d) {
      float a = 0.0f;
      for (std::uint32_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (std::int32_t p : open) s += Q[static_cast<std::size_t>(p)][(h * G + g) * D + d];
        a += s;
      }
      qbar[d] = a / (static_cast<float>(open.size()) * static_cast<float>(G));
    }
    struct cand {
      float sim;
      std::uint32_t id;
      std::vector<std::int32_t> rows;
    };
    std::vector<cand> cands;
    for (std::uint32_t s = 0; s < closed.size(); ++s) {
      cand c{0.0f, s, {}};
      for (std::int32_t p : closed[s])
        if (retained(h, p) && p >= lo && p < hi) c.rows.push_back(p);
      if (c.rows.empty()) continue;
      const auto m = mu(h, closed[s]);
      for (std::uint32_t d = 0; d < D; ++d) c.sim += m[d] * qbar[d];
      cands.push_back(c);
    }
    std::sort(cands.begin(), cands.end(), [](const cand& a, const cand& b) {
      return a.sim != b.sim ? a.sim > b.sim : a.id > b.id;
    });
    std::uint32_t taken = 0;
    for (const auto& c : cands)
      for (std::int32_t p : c.rows)
        if (taken < room) {
          W.insert(p);
          ++taken;
        }
    return W;
  }
};

std::vector<float> values(std::mt19937& rng, std::size_t n, bool dyadic) {
  std::vector<float> v(n);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_int_distribution<int> u(-8, 8);
  for (auto& x : v) x = dyadic ? static_cast<float>(u(rng)) / 4.0f : g(rng);
  return v;
}
std::vector<std::uint8_t> flags(std::mt19937& rng, std::size_t n, double p) {
  std::bernoulli_distribution b(p);
  std::vector<std::uint8_t> f(n);
  for (auto& x : f) x = b(rng) ? 1 : 0;
  return f;
}

//! Checks the rig against the spec after an evict with budget B.
void compare(const rig& r, const spec& s, std::uint32_t B) {
  std::vector<std::vector<std::int32_t>> closed;
  std::vector<std::int32_t> open;
  s.sentences(closed, open);
  REQUIRE(r.st.sentences() == closed.size());
  CHECK(r.st.open_tokens == open.size());
  for (std::uint32_t h = 0; h < r.H; ++h) {
    INFO("head " << h << " n " << s.n() << " budget " << B);
    CHECK(r.live(h) == s.working(h, B));
    for (std::uint32_t id = 0; id < closed.size(); ++id) {
      if (r.st.held_rows(id, h) == 0) continue;
      const auto m = s.mu(h, closed[id]);
      std::vector<float> got(r.D);
      for (std::uint32_t d = 0; d < r.D; ++d) got[d] = r.st.mean_key(id, h, d);
      CHECK(got == m);
    }
  }
}

struct scenario {
  sentence_kv_config cfg;
  std::uint32_t H, QH, D, P, B, steps;
  double pb;
  bool dyadic;
};

void run(const scenario& sc, unsigned seed) {
  std::mt19937 rng(seed);
  rig r(sc.H, sc.QH, sc.D, sc.P + sc.steps * 3 + 8, sc.cfg);
  spec s(sc.cfg, sc.H, sc.QH, sc.D);
  auto k = values(rng, std::size_t{sc.P} * sc.H * sc.D, sc.dyadic);
  auto q = values(rng, std::size_t{sc.P} * sc.QH * sc.D, sc.dyadic);
  auto f = flags(rng, sc.P, sc.pb);
  r.append(k, sc.P);
  REQUIRE(r.observe(q, k, f, sc.P).ok());
  s.add(k, q, f, sc.P);
  s.prune(sc.B);
  r.evict(sc.B);
  compare(r, s, sc.B);
  for (std::uint32_t step = 0; step < sc.steps; ++step) {
    const std::uint32_t c = rng() % 6 == 0 ? 1 + rng() % 3 : 1;
    k = values(rng, std::size_t{c} * sc.H * sc.D, sc.dyadic);
    q = values(rng, std::size_t{c} * sc.QH * sc.D, sc.dyadic);
    f = flags(rng, c, sc.pb);
    r.append(k, c);
    REQUIRE(r.observe(q, k, f, c).ok());
    s.add(k, q, f, c);
    const auto plans = r.evict(sc.B);
    compare(r, s, sc.B);
    // predict(): never a live row
    for (std::uint32_t h = 0; h < sc.H; ++h) {
      std::vector<group_rows> pr;
      r.pol.predict(r.st, r.t, h, sc.B, pr);
      const auto L = r.live(h);
      for (const auto& g : pr) {
        const auto& grp = r.store.at({h, g.group});
        REQUIRE(std::size_t{g.first} + g.count <= grp.size());
        for (std::uint32_t i = g.first; i < g.first + g.count; ++i) CHECK(L.count(grp[i].pos) == 0);
      }
    }
  }
  CHECK(r.holds > 0);
  if (sc.B > sc.cfg.start + sc.cfg.recent) CHECK(r.fetches > 0);  // retrieval happened
}

}  // namespace

TEST_CASE("sentence_kv: concept, defaults, boundary strings", "[sentence]") {
  STATIC_REQUIRE(eviction_policy<sentence_kv>);
  STATIC_REQUIRE(tiered_policy<sentence_kv>);
  STATIC_REQUIRE(predicts_fetches<sentence_kv>);
  STATIC_REQUIRE(sentence_kv::concurrent_calls);
  const sentence_kv_config c;
  CHECK(c.start == 32);
  CHECK(c.recent == 32);
  CHECK(c.length_threshold == 1);
  CHECK(c.semantic_factor == 3);
  CHECK(c.snap.window == 32);
  CHECK(c.snap.kernel == 7);
  CHECK(c.snap.pool == pooling::max);
  CHECK(c.max_sentence_tokens == 100);
  const auto b = sentence_boundary_strings();
  CHECK(b == std::vector<std::string>{".", "!", "?", ". ", "! ", "? ", "...", "\n\n", "\n\n\n",
                                      "\u3002", "\uFF01", "\uFF1F", "\u3002\u3002"});
}

TEST_CASE("sentence_kv: boundary ids from a fake vocabulary, and flags", "[sentence]") {
  const std::map<std::string, long> vocab{{".", 13}, {"!", 0}, {"?", 30}, {". ", 13},
                                          {"...", 1131}, {"\n\n", 271}, {"\u3002", 1811},
                                          {"\uFF01", -1}};
  std::vector<std::string> asked;
  const auto ids = sentence_boundary_ids([&](std::string_view s) -> long {
    asked.emplace_back(s);
    auto it = vocab.find(std::string(s));
    return it == vocab.end() ? -1 : it->second;  // unknown: negative, filtered out
  });
  CHECK(asked == sentence_boundary_strings());
  CHECK(ids == std::vector<std::int32_t>{0, 13, 30, 271, 1131, 1811});
  const std::vector<std::int32_t> toks{5, 13, 7, 0, 271, 272, 1131, -1, 30};
  std::vector<std::uint8_t> fl(toks.size(), 9);
  boundary_flags(toks, ids, fl.data());
  CHECK(fl == std::vector<std::uint8_t>{0, 1, 0, 1, 1, 0, 1, 0, 1});
  // Any order of boundary ids works.
  const std::vector<std::int32_t> unsorted{1131, 13};
  boundary_flags(toks, unsorted, fl.data());
  CHECK(fl == std::vector<std::uint8_t>{0, 1, 0, 0, 0, 0, 1, 0, 0});
  CHECK(sentence_boundary_ids([](std::string_view) { return -1; }).empty());
}

TEST_CASE("sentence_kv: sentences end after boundaries, at the cap, and at the prompt's end",
          "[sentence]") {
  sentence_kv_config cfg;
  cfg.start = 2;
  cfg.recent = 2;
  cfg.max_sentence_tokens = 6;
  rig r(1, 1, 2, 128, cfg);
  // Prompt of 25 tokens, a boundary at 3: [0,4) [4,10) [10,16) [16,22) [22,25)
  std::vector<float> k(25 * 2, 0.5f), q(25 * 2, 0.25f);
  std::vector<std::uint8_t> f(25, 0);
  f[3] = 1;
  r.append(k, 25);
  REQUIRE(r.observe(q, k, f, 25).ok());
  CHECK(r.st.sentences() == 5);
  const std::vector<std::uint32_t> want{0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                        3, 3, 3, 3, 3, 3, 4, 4, 4};
  CHECK(std::vector<std::uint32_t>(r.st.sentence_of.begin(), r.st.sentence_of.begin() + 25) == want);
  CHECK(r.st.open_tokens == 0);
  // Decode without boundaries: a sentence closes every 6 tokens; a boundary closes early.
  std::vector<float> k1(2, 1.0f), q1(2, 1.0f);
  std::vector<std::uint8_t> f0(1, 0), f1(1, 1);
  for (int i = 0; i < 13; ++i) {
    r.append(k1, 1);
    REQUIRE(r.observe(q1, k1, i == 8 ? f1 : f0, 1).ok());
  }
  // decode tokens 25..30 -> sentence 5 (cap), 31..33 -> 6 (boundary at i = 8), 34..37 open (7)
  CHECK(r.st.sentences() == 7);
  CHECK(r.st.open_tokens == 4);
  CHECK(r.st.sentence_of[30] == 5);
  CHECK(r.st.sentence_of[31] == 6);
  CHECK(r.st.sentence_of[33] == 6);
  CHECK(r.st.sentence_of[34] == 7);
}

TEST_CASE("sentence_kv: matches the spec over positions (random data, boundaries, budgets)",
          "[sentence]") {
  const unsigned seed = GENERATE(range(1u, 61u));
  std::mt19937 pick(seed * 7919u);
  scenario sc;
  sc.cfg.start = 4;
  sc.cfg.recent = 4;
  sc.cfg.snap = snapkv_config{8, 3, seed % 5 == 0 ? pooling::avg : pooling::max};
  sc.cfg.max_sentence_tokens = 6 + seed % 4;
  sc.cfg.length_threshold = seed % 7 == 0 ? 2 : 1;
  sc.cfg.semantic_factor = seed % 3 == 0 ? 2 : 3;
  sc.H = 2;
  sc.QH = seed % 4 == 0 ? 2 : 4;  // G = 1 or 2
  sc.D = 4;
  sc.P = 3 + pick() % 60;
  const std::uint32_t budgets[] = {5, 8, 9, 12, 16, 24, 40};  // 5, 8: below start + recent + 1
  sc.B = budgets[pick() % 7];
  sc.steps = 40;
  sc.pb = seed % 6 == 0 ? 0.0 : 0.15;
  sc.dyadic = seed % 2 == 0;
  INFO("seed " << seed << " P " << sc.P << " B " << sc.B);
  run(sc, seed);
}

TEST_CASE("sentence_kv: the authors' defaults on a longer prompt match the spec", "[sentence]") {
  const unsigned seed = GENERATE(101u, 102u, 103u);
  scenario sc;
  sc.H = 2;
  sc.QH = 8;
  sc.D = 8;
  sc.P = 300;
  sc.B = seed == 103u ? 80 : 100;  // C = 240 (prune) or 300 (no prune)
  sc.steps = 60;
  sc.pb = 0.08;
  sc.dyadic = seed != 102u;
  run(sc, seed);
}

TEST_CASE("sentence_kv: the prune keeps SnapKV's set plus sinks; first-token mode; retrieval",
          "[sentence]") {
  sentence_kv_config cfg;  // defaults: start 32, recent 32, w 32
  constexpr std::uint32_t H = 2, QH = 4, D = 4, P = 200, B = 40;  // C = 120
  std::mt19937 rng(5);
  rig r(H, QH, D, 512, cfg);
  spec s(cfg, H, QH, D);
  auto k = values(rng, std::size_t{P} * H * D, false), q = values(rng, std::size_t{P} * QH * D, false);
  auto f = flags(rng, P, 0.05);
  r.append(k, P);
  REQUIRE(r.observe(q, k, f, P).ok());
  s.add(k, q, f, P);
  s.prune(B);
  r.evict(B);  // first-token mode: sinks + recent only; B < 64 + 1 shrinks to 20 + 20
  for (std::uint32_t h = 0; h < H; ++h) {
    std::set<std::int32_t> held;
    for (const auto& [key, rows] : r.store)
      if (key.first == h)
        for (const auto& row : rows) held.insert(row.pos);
    std::set<std::int32_t> both = held;
    const auto L = r.live(h);
    both.insert(L.begin(), L.end());
    CHECK(both == s.kept_prompt[h]);  // retained = held ∪ live; the rest was pruned
    // SnapKV's C = 120 (C - w by votes plus the window), plus the sinks it did not keep.
    CHECK(s.kept_prompt[h].size() >= 120);
    CHECK(s.kept_prompt[h].size() <= 152);
    CHECK(s.kept_prompt[h].size() < P);
    CHECK(L.size() == 40);
  }
}

TEST_CASE("sentence_kv: predict() gives what the next plan fetches", "[sentence]") {
  sentence_kv_config cfg;
  cfg.start = 2;
  cfg.recent = 2;
  cfg.max_sentence_tokens = 100;
  cfg.prefetch_rows = 4;
  constexpr std::uint32_t H = 1, QH = 2, D = 4, B = 12;
  std::mt19937 rng(11);
  rig r(H, QH, D, 256, cfg);
  // Prompt: 10 sentences of 5 tokens.
  constexpr std::uint32_t P = 50;
  auto k = values(rng, std::size_t{P} * H * D, false), q = values(rng, std::size_t{P} * QH * D, false);
  std::vector<std::uint8_t> f(P, 0);
  for (std::uint32_t i = 4; i < P; i += 5) f[i] = 1;
  r.append(k, P);
  REQUIRE(r.observe(q, k, f, P).ok());
  r.evict(B);
  std::vector<group_rows> pr;
  r.pol.predict(r.st, r.t, 0, B, pr);
  CHECK(pr.empty());  // the next step is a first token: no retrieval
  // First token of a sentence: first-token mode, then predict the selection of its query.
  auto q1 = values(rng, QH * D, false);
  auto k1 = values(rng, H * D, false);
  std::vector<std::uint8_t> f0(1, 0);
  r.append(k1, 1);
  REQUIRE(r.observe(q1, k1, f0, 1).ok());
  auto p1 = r.evict(B);
  CHECK(p1[0].fetch.empty());
  pr.clear();
  r.pol.predict(r.st, r.t, 0, B, pr);
  REQUIRE(!pr.empty());
  std::set<std::pair<std::uint32_t, std::uint32_t>> predicted;
  std::uint32_t npred = 0;
  for (const auto& g : pr)
    for (std::uint32_t i = g.first; i < g.first + g.count; ++i) {
      predicted.insert({g.group, i});
      ++npred;
    }
  CHECK(npred == predicted.size());
  // The next token repeats the query: the mean query is unchanged, so the plan fetches a
  // subset of the prediction (the cut), and the prediction reaches prefetch_rows beyond it.
  r.append(k1, 1);
  REQUIRE(r.observe(q1, k1, f0, 1).ok());
  auto p2 = r.evict(B);
  std::uint32_t nfetch = 0;
  for (const auto& g : p2[0].fetch)
    for (std::uint32_t i = g.first; i < g.first + g.count; ++i) {
      CHECK(predicted.count({g.group, i}) == 1);
      ++nfetch;
    }
  CHECK(nfetch > 0);
  CHECK(npred <= nfetch + cfg.prefetch_rows + 1);
  CHECK(npred >= nfetch);
  // Now in retrieval mode: the prediction is beyond the cut, never live.
  pr.clear();
  r.pol.predict(r.st, r.t, 0, B, pr);
  const auto L = r.live(0);
  std::uint32_t beyond = 0;
  for (const auto& g : pr)
    for (std::uint32_t i = g.first; i < g.first + g.count; ++i) {
      CHECK(L.count(r.store.at({0u, g.group})[i].pos) == 0);
      ++beyond;
    }
  CHECK(beyond <= cfg.prefetch_rows);
  CHECK(beyond > 0);
}

TEST_CASE("sentence_kv: budgets that change keep the plan valid", "[sentence]") {
  const unsigned seed = GENERATE(range(1u, 21u));
  std::mt19937 rng(seed);
  sentence_kv_config cfg;
  cfg.start = 4;
  cfg.recent = 4;
  cfg.snap = snapkv_config{8, 3, pooling::max};
  cfg.max_sentence_tokens = 7;
  constexpr std::uint32_t H = 2, QH = 4, D = 4;
  const std::uint32_t P = 10 + rng() % 40;
  rig r(H, QH, D, 512, cfg);
  auto k = values(rng, std::size_t{P} * H * D, true), q = values(rng, std::size_t{P} * QH * D, true);
  auto f = flags(rng, P, 0.15);
  r.append(k, P);
  REQUIRE(r.observe(q, k, f, P).ok());
  const std::uint32_t budgets[] = {3, 6, 9, 12, 20, 30};
  r.evict(budgets[rng() % 6]);
  for (int step = 0; step < 60; ++step) {
    k = values(rng, H * D, true);
    q = values(rng, QH * D, true);
    f = flags(rng, 1, 0.15);
    r.append(k, 1);
    REQUIRE(r.observe(q, k, f, 1).ok());
    const std::uint32_t B = budgets[rng() % 6];
    r.evict(B);  // checks live <= B and every fetched row's keys
    std::int64_t sinks = cfg.start, recent = cfg.recent;
    if (B < sinks + recent + 1) {
      sinks = std::min<std::int64_t>(cfg.start, B / 2);
      recent = B - sinks;
    }
    for (std::uint32_t h = 0; h < H; ++h) {
      const auto L = r.live(h);
      for (std::int64_t p = 0; p < sinks; ++p) CHECK(L.count(static_cast<std::int32_t>(p)) == 1);
      CHECK(L.count(static_cast<std::int32_t>(r.n - 1)) == 1);  // the newest token
    }
  }
  CHECK(r.fetches > 0);
}

TEST_CASE("sentence_kv: bad signals are refused and leave the state as it was", "[sentence]") {
  sentence_kv_config cfg;
  cfg.start = 4;
  cfg.recent = 4;
  cfg.snap = snapkv_config{8, 3, pooling::max};
  constexpr std::uint32_t H = 2, QH = 4, D = 4, P = 40, B = 14;
  std::mt19937 rng(3);
  rig a(H, QH, D, 256, cfg), b(H, QH, D, 256, cfg);
  auto k = values(rng, std::size_t{P} * H * D, true), q = values(rng, std::size_t{P} * QH * D, true);
  auto f = flags(rng, P, 0.2);
  // A bad prompt observe first: the prompt is still unseen afterwards.
  a.append(k, P);
  b.append(k, P);
  auto qn = q;
  qn[17] = std::numeric_limits<float>::quiet_NaN();
  CHECK(a.observe(qn, k, f, P).code() == errc::invalid_argument);
  CHECK(!a.st.prompt_seen);
  REQUIRE(a.observe(q, k, f, P).ok());
  REQUIRE(b.observe(q, k, f, P).ok());
  auto same = [&](const std::vector<tier_plan>& x, const std::vector<tier_plan>& y) {
    REQUIRE(x.size() == y.size());
    for (std::size_t h = 0; h < x.size(); ++h) {
      REQUIRE(x[h].hold.size() == y[h].hold.size());
      for (std::size_t i = 0; i < x[h].hold.size(); ++i) {
        CHECK(x[h].hold[i].slot == y[h].hold[i].slot);
        CHECK(x[h].hold[i].group == y[h].hold[i].group);
      }
      CHECK(x[h].drop == y[h].drop);
      CHECK(x[h].fetch == y[h].fetch);
    }
  };
  same(a.evict(B), b.evict(B));
  for (int step = 0; step < 30; ++step) {
    k = values(rng, H * D, true);
    q = values(rng, QH * D, true);
    f = flags(rng, 1, 0.2);
    a.append(k, 1);
    b.append(k, 1);
    if (step % 3 == 0) {
      // mismatched counts
      CHECK(a.pol.observe(a.st, a.t, a.reader(), query_signal{q.data(), dtype::f32, 1},
                          key_signal{k.data(), dtype::f32, 1}, boundary_signal{f.data(), 2})
                .code() == errc::shape_mismatch);
      // all three cover more tokens than were appended
      std::vector<float> q2(2 * QH * D, 0.5f), k2(2 * H * D, 0.5f);
      std::vector<std::uint8_t> f2(2, 1);
      const auto st2 = a.observe(q2, k2, f2, 2);
      CHECK(st2.code() == errc::shape_mismatch);
      CHECK(st2.message().find('2') != std::string::npos);
      // non-finite query and key, null data
      auto qb = q;
      qb[5] = std::numeric_limits<float>::quiet_NaN();
      CHECK(a.observe(qb, k, f, 1).code() == errc::invalid_argument);
      auto kb = k;
      kb[2] = std::numeric_limits<float>::infinity();
      CHECK(a.observe(q, kb, f, 1).code() == errc::invalid_argument);
      CHECK(a.pol.observe(a.st, a.t, a.reader(), query_signal{nullptr, dtype::f32, 1},
                          key_signal{k.data(), dtype::f32, 1}, boundary_signal{f.data(), 1})
                .code() == errc::invalid_argument);
    }
    REQUIRE(a.observe(q, k, f, 1).ok());
    REQUIRE(b.observe(q, k, f, 1).ok());
    // observing the same tokens twice is refused too
    if (step % 5 == 0) CHECK(a.observe(q, k, f, 1).code() == errc::shape_mismatch);
    same(a.evict(B), b.evict(B));
    CHECK(a.st.sentences() == b.st.sentences());
    CHECK(a.st.open_tokens == b.st.open_tokens);
  }
  CHECK_THROWS_AS(sentence_kv(sentence_kv_config{32, 32, 1, 3, snapkv_config{0, 7, pooling::max}}),
                  kvcache::error);
}

TEST_CASE("sentence_kv: evict before observe keeps sinks + recent; the prompt observed later",
          "[sentence]") {
  sentence_kv_config cfg;
  cfg.start = 4;
  cfg.recent = 4;
  cfg.snap = snapkv_config{8, 3, pooling::max};
  constexpr std::uint32_t H = 2, QH = 2, D = 4, P = 30, B = 12;
  std::mt19937 rng(21);
  rig r(H, QH, D, 128, cfg);
  auto k = values(rng, std::size_t{P} * H * D, true), q = values(rng, std::size_t{P} * QH * D, true);
  auto f = flags(rng, P, 0.2);
  r.append(k, P);
  const auto plans = r.evict(B);
  for (std::uint32_t h = 0; h < H; ++h) {
    CHECK(plans[h].hold.empty());  // no sentence yet: nothing can be held
    std::set<std::int32_t> want{0, 1, 2, 3};
    for (std::int32_t p = P - 4; p < static_cast<std::int32_t>(P); ++p) want.insert(p);
    CHECK(r.live(h) == want);
  }
  REQUIRE(r.observe(q, k, f, P).ok());
  CHECK(r.st.prompt_seen);
  r.evict(B);
  for (int step = 0; step < 20; ++step) {
    k = values(rng, H * D, true);
    q = values(rng, QH * D, true);
    f = flags(rng, 1, 0.2);
    r.append(k, 1);
    REQUIRE(r.observe(q, k, f, 1).ok());
    r.evict(B);  // valid plans, live <= B, fetched keys as appended
  }
  CHECK(r.fetches > 0);
  CHECK(r.live(0).count(static_cast<std::int32_t>(P - 9)) == 0);  // dropped before observed: gone
}

TEST_CASE("sentence_kv: an engine loop through cache<tiered<host_vmm>, sentence_kv>",
          "[sentence][tiers]") {
  const unsigned seed = GENERATE(1u, 2u, 3u, 4u);
  std::mt19937 rng(seed);
  constexpr std::uint32_t L = 2, H = 2, QH = 4, D = 8;
  sentence_kv_config pc;
  pc.start = 4;
  pc.recent = 4;
  pc.snap = snapkv_config{8, 3, pooling::max};
  pc.max_sentence_tokens = 8;
  pc.prefetch_rows = 8;
  pc.semantic_factor = seed % 2 == 1 ? 2 : 3;  // seeds 1 and 4 prune the prompt
  const std::uint32_t B = seed == 4u ? 7u : 16u + 4u * seed;  // 7: below start + recent + 1
  cache_config cfg;
  cfg.geo = geometry{L, H, QH, D, dtype::f32};
  cfg.max_tokens = 256;
  cfg.budget = B;
  using tiered_vmm = tiered<host_vmm>;
  cache<tiered_vmm, sentence_kv> c(
      cfg, tiered_vmm(host_vmm(host_vmm_config{64 * 1024, 256, true}), host_holding()),
      sentence_kv(pc));
  const seq_id s = c.open().value();
  std::vector<spec> sp(L, spec(pc, H, QH, D));
  std::vector<std::vector<std::vector<float>>> kpos(L), vpos(L);  // [layer][position][H*D]
  auto step = [&](std::uint32_t n, bool first) {
    for (std::uint32_t l = 0; l < L; ++l) {
      const auto k = values(rng, std::size_t{n} * H * D, seed % 2 == 0);
      const auto v = values(rng, k.size(), false);
      const auto q = values(rng, std::size_t{n} * QH * D, seed % 2 == 0);
      const auto f = flags(rng, n, 0.15);
      REQUIRE(c.append(s, l, kv_tensor{k.data(), dtype::f32, n, H, D},
                       kv_tensor{v.data(), dtype::f32, n, H, D}));
      for (std::uint32_t i = 0; i < n; ++i) {
        kpos[l].emplace_back(k.begin() + std::size_t{i} * H * D, k.begin() + std::size_t{i + 1} * H * D);
        vpos[l].emplace_back(v.begin() + std::size_t{i} * H * D, v.begin() + std::size_t{i + 1} * H * D);
      }
      const auto st = c.observe(s, l, query_signal{q.data(), dtype::f32, n},
                                key_signal{k.data(), dtype::f32, n}, boundary_signal{f.data(), n});
      REQUIRE(st.ok());
      sp[l].add(k, q, f, n);
      if (first) sp[l].prune(B);
      const auto ev = c.evict(s, l);
      INFO(ev.message());
      REQUIRE(ev.ok());
      const layer_view view = c.view(s, l).value();
      for (std::uint32_t h = 0; h < H; ++h) {
        std::set<std::int32_t> live;
        for (std::uint32_t slot = 0; slot < view.rows; ++slot) {
          const std::int32_t p = view.position(slot, h);
          if (p < 0) continue;
          live.insert(p);
          std::vector<float> kr(D), vr(D);
          decode_key(view, c.quant(), slot, h, kr.data());
          decode_value(view, c.quant(), slot, h, vr.data());
          const auto& ka = kpos[l][static_cast<std::size_t>(p)];
          const auto& va = vpos[l][static_cast<std::size_t>(p)];
          CHECK(kr == std::vector<float>(ka.begin() + h * D, ka.begin() + (h + 1) * D));
          CHECK(vr == std::vector<float>(va.begin() + h * D, va.begin() + (h + 1) * D));
        }
        INFO("layer " << l << " head " << h << " n " << sp[l].n());
        CHECK(live == sp[l].working(h, B));
      }
      REQUIRE(c.prefetch(s, l));  // after the layer's attention: stage the next fetches
    }
  };
  step(40 + 5 * seed, true);
  for (int t = 0; t < 50; ++t) step(t % 9 == 8 ? 2 : 1, false);
  CHECK(check_invariants(c));
  // A fork carries the policy state and the held rows: fed the same tokens, it keeps the same
  // working sets with the same bytes.
  const seq_id f = c.fork(s).value();
  for (int t = 0; t < 12; ++t)
    for (std::uint32_t l = 0; l < L; ++l) {
      const auto k = values(rng, std::size_t{H} * D, false), v = values(rng, k.size(), false);
      const auto q = values(rng, std::size_t{QH} * D, false);
      const auto fl = flags(rng, 1, 0.2);
      for (const seq_id x : {s, f}) {
        REQUIRE(c.append(x, l, kv_tensor{k.data(), dtype::f32, 1, H, D}, kv_tensor{v.data(), dtype::f32, 1, H, D}));
        REQUIRE(c.observe(x, l, query_signal{q.data(), dtype::f32, 1}, key_signal{k.data(), dtype::f32, 1},
                          boundary_signal{fl.data(), 1}));
        REQUIRE(c.evict(x, l));
      }
      const layer_view vs = c.view(s, l).value(), vf = c.view(f, l).value();
      for (std::uint32_t h = 0; h < H; ++h) {
        std::map<std::int32_t, std::vector<float>> ks, kf;
        for (std::uint32_t slot = 0; slot < vs.rows; ++slot)
          if (vs.position(slot, h) >= 0) {
            std::vector<float> row(D);
            decode_key(vs, c.quant(), slot, h, row.data());
            ks[vs.position(slot, h)] = row;
          }
        for (std::uint32_t slot = 0; slot < vf.rows; ++slot)
          if (vf.position(slot, h) >= 0) {
            std::vector<float> row(D);
            decode_key(vf, c.quant(), slot, h, row.data());
            kf[vf.position(slot, h)] = row;
          }
        CHECK(ks == kf);
      }
    }
  CHECK(check_invariants(c));
  const auto ts = c.stats().tier;
  CHECK(ts.bytes_demoted > 0);
  if (B > 9) {
    CHECK(ts.bytes_promoted > 0);
    CHECK(ts.rows_hit > 0);  // predict() staged rows that the next plan fetched
  }
}
