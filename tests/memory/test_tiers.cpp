// SPDX-License-Identifier: Apache-2.0
//! @file
//! Two-tier memory: the holding tier on its own, whole sequences held and restored byte for byte
//! (every format and layout), rows moved by a tiered policy (held, dropped, fetched back at their
//! positions, prefetched on the worker while appends go on), forks carrying held rows, and bad
//! input: clear errors with the cache unchanged.
#include <kvcache/cache.hpp>
#include <kvcache/check.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/memory/tiered.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "catch.hpp"

using namespace kvcache;

namespace {

using tiered_vmm = tiered<host_vmm>;

tiered_vmm make_memory(std::size_t pages = 256, std::size_t holding_cap = host_holding::unlimited) {
  return tiered_vmm(host_vmm(host_vmm_config{64 * 1024, pages, true}), host_holding(holding_cap));
}

cache_config config(layout order = layout::token_major, range_scope ranges = range_scope::per_layer,
                    std::uint32_t budget = 0) {
  cache_config c;
  c.geo = geometry{2, 2, 4, 32, dtype::f32};
  c.max_tokens = 512;
  c.budget = budget;
  c.order = order;
  c.ranges = ranges;
  return c;
}

std::vector<float> randn(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

//! Appends n random tokens to every layer; the first error, or ok (no Catch macro: threads call it).
template <class C>
status try_append(C& c, seq_id s, std::uint32_t n, std::mt19937& rng) {
  const auto& g = c.geo();
  for (std::uint32_t l = 0; l < g.layers; ++l) {
    const auto k = randn(rng, std::size_t{n} * g.kv_heads * g.head_dim);
    const auto v = randn(rng, k.size());
    KVCACHE_TRY(c.append(s, l, kv_tensor{k.data(), dtype::f32, n, g.kv_heads, g.head_dim},
                         kv_tensor{v.data(), dtype::f32, n, g.kv_heads, g.head_dim}));
  }
  return {};
}
template <class C>
void append_tokens(C& c, seq_id s, std::uint32_t n, std::mt19937& rng) {
  REQUIRE(try_append(c, s, n, rng));
}

//! Every live (layer, head, position) of a sequence: its K and V decoded.
template <class C>
std::map<std::tuple<std::uint32_t, std::uint32_t, std::int32_t>, std::vector<float>> contents(const C& c, seq_id s) {
  std::map<std::tuple<std::uint32_t, std::uint32_t, std::int32_t>, std::vector<float>> out;
  const auto& g = c.geo();
  for (std::uint32_t l = 0; l < g.layers; ++l) {
    const layer_view v = c.view(s, l).value();
    for (std::uint32_t slot = 0; slot < v.rows; ++slot)
      for (std::uint32_t h = 0; h < g.kv_heads; ++h) {
        const std::int32_t p = v.position(slot, h);
        if (p < 0) continue;
        std::vector<float> row(2 * g.head_dim);
        decode_key(v, c.quant(), slot, h, row.data());
        decode_value(v, c.quant(), slot, h, row.data() + g.head_dim);
        out[{l, h, p}] = row;
      }
  }
  return out;
}

//! A tiered policy for testing the cache's moves: tokens older than the last `recent` are held in
//! group position / 8 (rows in position order), then dropped unless their group is wanted;
//! wanted groups are fetched back. `predict` names `next` (the groups the test will want next).
struct group_mover {
  using signals = signal_list<>;
  struct state {
    std::int64_t next = 0;
    std::vector<std::int64_t> watermark;  // per head: positions below are held
  };
  std::uint32_t recent = 4;
  std::set<std::uint32_t> want, next;

  [[nodiscard]] state make_state(const policy_context& ctx) const {
    state st;
    st.watermark.assign(ctx.geo.kv_heads, 0);
    return st;
  }
  void on_append(state& st, const slot_table&, const placement& pl) { st.next = pl.first_position + pl.tokens; }

  void plan(state& st, const slot_table& t, const key_reader&, std::uint32_t h, std::uint32_t,
            tier_plan& out) {
    const std::int64_t old_end = std::max<std::int64_t>(0, st.next - recent);
    std::vector<std::pair<std::int32_t, std::uint32_t>> old;  // (position, slot)
    std::set<std::int32_t> live;
    for (std::uint32_t s = 0; s < t.rows(); ++s) {
      const std::int32_t p = t.position(s, h);
      if (p < 0) continue;
      live.insert(p);
      if (p < old_end) old.push_back({p, s});
    }
    std::sort(old.begin(), old.end());
    for (auto [p, s] : old) {
      if (p >= st.watermark[h]) out.hold.push_back({s, static_cast<std::uint32_t>(p / 8)});
      if (!want.count(static_cast<std::uint32_t>(p / 8))) out.drop.push_back(s);
    }
    st.watermark[h] = std::max(st.watermark[h], old_end);
    for (std::uint32_t g : want) {  // rows of g below the watermark that are not live, as runs
      const std::int64_t end = std::min<std::int64_t>(8, st.watermark[h] - std::int64_t{g} * 8);
      for (std::int64_t i = 0; i < end;) {
        if (live.count(static_cast<std::int32_t>(g * 8 + i))) {
          ++i;
          continue;
        }
        std::int64_t j = i;
        while (j < end && !live.count(static_cast<std::int32_t>(g * 8 + j))) ++j;
        out.fetch.push_back({g, static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(j - i)});
        i = j;
      }
    }
  }
  void predict(const state& st, const slot_table&, std::uint32_t h, std::uint32_t,
               std::vector<group_rows>& out) const {
    for (std::uint32_t g : next) {
      const std::int64_t end = std::min<std::int64_t>(8, st.watermark[h] - std::int64_t{g} * 8);
      if (end > 0) out.push_back({g, 0, static_cast<std::uint32_t>(end)});
    }
  }
};
static_assert(eviction_policy<group_mover>);
static_assert(tiered_policy<group_mover>);
static_assert(predicts_fetches<group_mover>);

//! Live positions per (layer, head).
template <class C>
std::set<std::int32_t> live_positions(const C& c, seq_id s, std::uint32_t l, std::uint32_t h) {
  const layer_view v = c.view(s, l).value();
  std::set<std::int32_t> out;
  for (std::uint32_t slot = 0; slot < v.rows; ++slot)
    if (v.position(slot, h) >= 0) out.insert(v.position(slot, h));
  return out;
}

}  // namespace

TEST_CASE("holding tier: groups of tagged rows, capacity, owners", "[tiers]") {
  host_holding ho(1000);
  const std::vector<std::int32_t> tags{5, 6, 7};
  auto p = ho.extend({1, 2}, 16, tags);
  REQUIRE(p);
  for (int i = 0; i < 48; ++i) (*p)[i] = std::byte(i);
  auto g = ho.find({1, 2});
  CHECK(g.count == 3);
  CHECK(g.row_bytes == 16);
  CHECK(g.tags[2] == 7);
  CHECK(g.rows[47] == std::byte(47));
  CHECK(ho.bytes() == 3 * (16 + 4));
  // a row size that differs from the group's, and more than the capacity: refused, unchanged
  CHECK(ho.extend({1, 2}, 8, tags).error().code() == errc::invalid_argument);
  const std::vector<std::int32_t> many(60, 0);
  CHECK(ho.extend({1, 3}, 16, many).error().code() == errc::capacity_exceeded);
  CHECK(ho.bytes() == 60);
  CHECK(ho.find({1, 3}).count == 0);
  REQUIRE(ho.copy_owner(1, 9));
  CHECK(ho.find({9, 2}).count == 3);
  CHECK(std::memcmp(ho.find({9, 2}).rows, ho.find({1, 2}).rows, 48) == 0);
  CHECK(ho.copy_owner(1, 9).code() == errc::invalid_argument);  // would overwrite
  CHECK(ho.erase_owner(1) == 60);
  CHECK(ho.stats().groups == 1);
  CHECK(ho.stats().peak_bytes_held == 120);
  CHECK(ho.check());
  // the worker copies in order; wait() sees them done
  std::vector<std::byte> a(1 << 16, std::byte{3}), b(1 << 16);
  const auto t = ho.submit({copy_op{b.data(), a.data(), a.size()}});
  ho.wait(t);
  CHECK(ho.done(t));
  CHECK(b == a);
}

TEMPLATE_TEST_CASE("hold and restore a sequence byte for byte", "[tiers]", passthrough, fp8_e4m3, q8_0,
                   q4_0, (kivi<4, 32, 128>), (kivi<2, 32, 64>)) {
  std::mt19937 rng(7);
  const bool per_row = !quant_token_grouped<TestType>();
  std::vector<cache_config> cfgs{config()};
  if (per_row) cfgs.push_back(config(layout::head_major));
  if (std::is_same_v<TestType, passthrough>) cfgs.push_back(config(layout::token_major, range_scope::per_sequence));
  for (const auto& cfg : cfgs) {
    cache<tiered_vmm, keep_all, TestType> c(cfg, make_memory());
    auto s = c.open().value();
    auto other = c.open().value();
    append_tokens(c, s, 150, rng);
    append_tokens(c, other, 40, rng);
    const auto before = contents(c, s);
    const auto pages = c.stats().memory.pages_in_use() - c.stats().memory.pages_idle;
    const auto live = c.stats().entries_live;
    const std::size_t before_held = c.stats().tier.bytes_held;
    REQUIRE(c.hold(s));
    CHECK(c.is_held(s));
    CHECK(check_invariants(c));
    const auto t = c.stats().tier;
    CHECK(t.bytes_held > 0);
    CHECK(t.bytes_demoted < t.bytes_held);
    // no holes: the used extents, at least every live row's bytes
    const std::size_t rb = 2 * (TestType{}.code_bytes(c.geo()) + TestType{}.scale_bytes(c.geo()));
    if (per_row) CHECK(t.bytes_held - before_held >= (live - c.stats().entries_live) * rb);
    CHECK(c.stats().memory.pages_in_use() - c.stats().memory.pages_idle < pages);  // pages went back
    // reads and writes of a held sequence are refused; other sequences go on
    CHECK(c.view(s, 0).error().code() == errc::invalid_argument);
    CHECK(c.view(s, 0).error().message().find("held") != std::string::npos);
    CHECK(c.evict(s).code() == errc::invalid_argument);
    CHECK(c.fork(s).error().code() == errc::invalid_argument);
    CHECK(c.hold(s).code() == errc::invalid_argument);
    append_tokens(c, other, 3, rng);
    REQUIRE(c.restore(s));
    CHECK_FALSE(c.is_held(s));
    CHECK(c.restore(s).code() == errc::invalid_argument);
    CHECK(contents(c, s) == before);
    CHECK(c.stats().tier.bytes_held == 0);
    CHECK(c.stats().tier.bytes_promoted == c.stats().tier.bytes_demoted);
    CHECK(check_invariants(c));
    append_tokens(c, s, 9, rng);  // the restored sequence takes appends again
    CHECK(check_invariants(c));
    // a held sequence closes where it is
    REQUIRE(c.hold(s));
    REQUIRE(c.close(s));
    CHECK(c.stats().tier.bytes_held == 0);
    CHECK(check_invariants(c));
  }
}

TEST_CASE("hold keeps the live rows only when eviction left holes", "[tiers]") {
  std::mt19937 rng(13);
  cache<tiered_vmm, sink_window> c(config(layout::token_major, range_scope::per_layer, 16), make_memory(),
                                   sink_window(4));
  auto s = c.open().value();
  append_tokens(c, s, 100, rng);
  REQUIRE(c.evict(s));  // 16 live per head, 84 holes below the frontier
  const auto before = contents(c, s);
  REQUIRE(c.hold(s));
  const std::size_t rb = 2 * c.geo().head_bytes();
  CHECK(c.stats().tier.bytes_held == std::size_t{2 * 2 * 16} * (rb + 4));
  CHECK(c.stats().tier.bytes_demoted == std::size_t{2 * 2 * 16} * rb);
  REQUIRE(c.restore(s));
  CHECK(contents(c, s) == before);
  append_tokens(c, s, 5, rng);  // into the holes, as before the round trip
  CHECK(check_invariants(c));
  for (std::uint32_t h = 0; h < 2; ++h) CHECK(live_positions(c, s, 1, h).size() == 21);
}

TEST_CASE("hold fails cleanly when the holding tier is full; restore when the pool is", "[tiers]") {
  std::mt19937 rng(3);
  cache<tiered_vmm> small(config(), make_memory(256, 4096));
  auto s = small.open().value();
  append_tokens(small, s, 100, rng);
  const auto d = state_digest(small);
  const auto st = small.hold(s);
  CHECK(st.code() == errc::capacity_exceeded);
  CHECK(st.message().find("holding tier") != std::string::npos);
  CHECK(state_digest(small) == d);
  CHECK_FALSE(small.is_held(s));

  // restore into a pool another sequence has filled meanwhile: out_of_pages, still held
  cache<tiered_vmm> c(config(), make_memory(8));
  auto a = c.open().value();
  append_tokens(c, a, 100, rng);
  REQUIRE(c.hold(a));
  auto b = c.open().value();
  append_tokens(c, b, 400, rng);  // takes the pages a gave back
  const auto d2 = state_digest(c);
  CHECK(c.restore(a).code() == errc::out_of_pages);
  CHECK(c.is_held(a));
  CHECK(state_digest(c) == d2);
  CHECK(check_invariants(c));
  REQUIRE(c.close(b));
  REQUIRE(c.restore(a));
  CHECK(check_invariants(c));
}

TEMPLATE_TEST_CASE("a tiered policy moves rows: held, dropped, fetched back at their positions", "[tiers]",
                   passthrough, fp8_e4m3, q4_0) {
  std::mt19937 rng(11);
  for (layout order : {layout::token_major, layout::head_major}) {
    cache<tiered_vmm, group_mover, TestType> c(config(order, range_scope::per_layer, 40), make_memory());
    auto s = c.open().value();
    append_tokens(c, s, 60, rng);
    const auto all = contents(c, s);  // every token, before anything moved
    c.policy().want = {};
    REQUIRE(c.evict(s));
    for (std::uint32_t h = 0; h < 2; ++h) CHECK(live_positions(c, s, 0, h).size() == 4);  // recent only
    const auto t1 = c.stats().tier;
    CHECK(t1.bytes_demoted == std::uint64_t{2 * 2 * 56} * (2 * (TestType{}.code_bytes(c.geo()) +
                                                                TestType{}.scale_bytes(c.geo()))));
    CHECK(check_invariants(c));
    c.policy().want = {1, 5};  // positions 8-15 and 40-47 come back
    REQUIRE(c.evict(s));
    std::set<std::int32_t> expect{56, 57, 58, 59};
    for (int p = 8; p < 16; ++p) expect.insert(p);
    for (int p = 40; p < 48; ++p) expect.insert(p);
    for (std::uint32_t l = 0; l < 2; ++l)
      for (std::uint32_t h = 0; h < 2; ++h) CHECK(live_positions(c, s, l, h) == expect);
    const auto now = contents(c, s);
    for (const auto& [key, row] : now) CHECK(all.at(key) == row);  // the same bytes, decoded
    CHECK(c.stats().tier.rows_missed == 2 * 2 * 16);
    CHECK(c.stats().tier.rows_hit == 0);
    CHECK(check_invariants(c));
    // a fork carries the held rows: it can fetch what the parent held
    auto f = c.fork(s).value();
    c.policy().want = {2};
    REQUIRE(c.evict(f));
    expect = {56, 57, 58, 59};
    for (int p = 16; p < 24; ++p) expect.insert(p);
    CHECK(live_positions(c, f, 1, 1) == expect);
    for (const auto& [key, row] : contents(c, f)) CHECK(all.at(key) == row);
    CHECK(check_invariants(c));
  }
}

TEST_CASE("prefetch stages predicted rows while appends go on; evict takes them as hits", "[tiers][concurrency]") {
  std::mt19937 rng(5);
  cache<tiered_vmm, group_mover> c(config(layout::token_major, range_scope::per_layer, 64), make_memory());
  auto s = c.open().value();
  auto other = c.open().value();
  append_tokens(c, s, 100, rng);
  REQUIRE(c.evict(s));
  const auto all_before = c.stats().tier;
  CHECK(all_before.bytes_demoted > 0);
  // record what positions 0..95 held, through a fork that fetches everything back
  c.policy().next = {3, 7};
  for (int round = 0; round < 20; ++round) {
    REQUIRE(c.prefetch(s, 0));
    REQUIRE(c.prefetch(s, 1));
    // appends to the same sequence and another, on this thread and another, while the worker copies
    status other_st;
    std::thread t([&] {
      std::mt19937 r2(round);
      other_st = try_append(c, other, 2, r2);
    });
    const status st = try_append(c, s, 1, rng);
    t.join();
    REQUIRE(st);
    REQUIRE(other_st);
    c.policy().want = {3, 7};
    REQUIRE(c.evict(s));
    c.policy().want = {};
    REQUIRE(c.evict(s));
  }
  const auto st = c.stats().tier;
  CHECK(st.rows_hit == 20 * 2 * 2 * 16);  // every fetched row was staged
  CHECK(st.rows_missed == 0);
  CHECK(st.bytes_prefetched == st.rows_hit * 2 * c.geo().head_bytes());
  CHECK(check_invariants(c));
  // staged rows equal held rows: compare what a hit fetch placed with a fresh miss fetch of a fork
  REQUIRE(c.prefetch(s, 0));
  c.policy().want = {3};
  REQUIRE(c.evict(s, 0));
  auto f = c.fork(s).value();
  c.policy().want = {};
  REQUIRE(c.evict(f, 0));
  c.policy().want = {3};
  REQUIRE(c.evict(f, 0));  // from the holding tier
  const layer_view vs = c.view(s, 0).value(), vf = c.view(f, 0).value();
  std::map<std::pair<int, std::uint32_t>, std::vector<float>> rs, rf;
  for (std::uint32_t slot = 0; slot < vs.rows; ++slot)
    for (std::uint32_t h = 0; h < 2; ++h)
      if (vs.position(slot, h) >= 24 && vs.position(slot, h) < 32) {
        std::vector<float> row(32);
        decode_key(vs, c.quant(), slot, h, row.data());
        rs[{vs.position(slot, h), h}] = row;
      }
  for (std::uint32_t slot = 0; slot < vf.rows; ++slot)
    for (std::uint32_t h = 0; h < 2; ++h)
      if (vf.position(slot, h) >= 24 && vf.position(slot, h) < 32) {
        std::vector<float> row(32);
        decode_key(vf, c.quant(), slot, h, row.data());
        rf[{vf.position(slot, h), h}] = row;
      }
  CHECK(rs.size() == 16);
  CHECK(rs == rf);
}

TEST_CASE("tiered evict refuses cleanly: holding tier too small, plans that break the cache", "[tiers]") {
  std::mt19937 rng(9);
  cache<tiered_vmm, group_mover> c(config(layout::token_major, range_scope::per_layer, 40),
                                   make_memory(256, 2000));
  auto s = c.open().value();
  append_tokens(c, s, 60, rng);
  const auto d = state_digest(c);
  const auto st = c.evict(s);
  CHECK(st.code() == errc::capacity_exceeded);
  CHECK(st.message().find("holding tier") != std::string::npos);
  CHECK(state_digest(c) == d);
  CHECK(check_invariants(c));
  CHECK(c.prefetch(seq_id{}, 0).code() == errc::unknown_sequence);
  CHECK(c.prefetch(s, 7).code() == errc::layer_out_of_range);
}
