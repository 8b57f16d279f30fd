// SPDX-License-Identifier: Apache-2.0
//! @file
//! The cache object over both memory backends: round trips, layers, batches, forks, handles,
//! statistics, budgets, failures that change nothing, exhaustion, signals and eviction.
#include <kvcache/cache.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/quant/dense.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "support.hpp"

using kvcache::attention_signal;
using kvcache::cache;
using kvcache::cache_config;
using kvcache::dtype;
using kvcache::errc;
using kvcache::geometry;
using kvcache::heap_memory;
using kvcache::host_vmm;
using kvcache::keep_all;
using kvcache::kv_tensor;
using kvcache::layer_view;
using kvcache::layout;
using kvcache::seq_id;
using kvcache::sink_window;
using kvcache::status;
using kvtest::stats_diff;
using kvcache::round_up;

namespace {

const std::size_t ps = kvcache::os_page_size();

// ---- backends: one factory per memory type ------------------------------------------------

template <class M>
struct backend;

template <>
struct backend<host_vmm> {
  //! A pool of `pages` OS pages (0: a roomy 512).
  static host_vmm make(std::size_t pages = 0, bool deferred = true) {
    return host_vmm(kvcache::host_vmm_config{ps, pages ? pages : 512, deferred});
  }
};

template <>
struct backend<heap_memory> {
  //! A byte budget of `pages` OS pages (0: unlimited); geometric growth.
  static heap_memory make(std::size_t pages = 0, bool = true) {
    return heap_memory(kvcache::heap_memory_config{pages * ps, 2.0});
  }
};

template <class M>
constexpr bool is_vmm = std::is_same_v<M, host_vmm>;

template <class M, class P = keep_all>
cache<M, P> make_cache(const cache_config& cfg, std::size_t pages = 0, P policy = P{}) {
  return cache<M, P>(cfg, backend<M>::make(pages), std::move(policy));
}

cache_config config(std::uint32_t layers, std::uint32_t kv_heads, std::uint32_t query_heads,
                    std::uint32_t head_dim, dtype type, std::uint32_t max_tokens,
                    std::uint32_t budget = 0, layout order = layout::token_major) {
  cache_config c;
  c.geo = geometry{layers, kv_heads, query_heads, head_dim, type};
  c.max_tokens = max_tokens;
  c.budget = budget;
  c.order = order;
  return c;
}

// ---- token data: every (tag, position, head, K|V) row has its own bytes -----------------------

float element(std::uint32_t tag, std::int64_t pos, std::uint32_t head, std::uint32_t d, int kv) {
  std::uint64_t x = (std::uint64_t{tag} << 48) ^ (static_cast<std::uint64_t>(pos) << 20) ^
                    (std::uint64_t{head} << 12) ^ (std::uint64_t{d} << 1) ^ static_cast<std::uint64_t>(kv);
  x ^= x >> 31;
  x *= 0x9e3779b97f4a7c15ull;
  x ^= x >> 29;
  return static_cast<float>(static_cast<int>(x % 20001) - 10000) / 1000.0f;
}

std::vector<std::byte> row_bytes(const geometry& g, std::uint32_t tag, std::int64_t pos,
                                 std::uint32_t head, int kv) {
  std::vector<std::byte> r(g.head_bytes());
  for (std::uint32_t d = 0; d < g.head_dim; ++d)
    kvcache::store_from_float(r.data(), d, g.type, element(tag, pos, head, d, kv));
  return r;
}

struct token_block {
  std::vector<std::byte> k, v;
  std::uint32_t n = 0;
  kv_tensor kt(const geometry& g) const { return {k.data(), g.type, n, g.kv_heads, g.head_dim}; }
  kv_tensor vt(const geometry& g) const { return {v.data(), g.type, n, g.kv_heads, g.head_dim}; }
};

//! `[n][kv_heads][head_dim]` K and V of positions first .. first+n-1.
token_block make_tokens(const geometry& g, std::uint32_t tag, std::int64_t first, std::uint32_t n) {
  token_block b;
  b.n = n;
  const std::size_t hb = g.head_bytes();
  b.k.resize(std::size_t{n} * g.kv_heads * hb);
  b.v.resize(b.k.size());
  for (std::uint32_t i = 0; i < n; ++i)
    for (std::uint32_t h = 0; h < g.kv_heads; ++h) {
      const auto rk = row_bytes(g, tag, first + i, h, 0), rv = row_bytes(g, tag, first + i, h, 1);
      std::memcpy(b.k.data() + (std::size_t{i} * g.kv_heads + h) * hb, rk.data(), hb);
      std::memcpy(b.v.data() + (std::size_t{i} * g.kv_heads + h) * hb, rv.data(), hb);
    }
  return b;
}

template <class C>
layer_view view_of(const C& c, seq_id s, std::uint32_t layer) {
  auto v = c.view(s, layer);
  REQUIRE(v.ok());
  return *v;
}

template <class C>
seq_id open_seq(C& c, std::uint32_t expected = 0) {
  auto s = c.open(expected);
  REQUIRE(s.ok());
  return *s;
}

//! Appends n tokens (tagged `tag`) at the layer's next positions.
template <class C>
status append_tokens(C& c, seq_id s, std::uint32_t layer, std::uint32_t tag, std::uint32_t n) {
  auto v = c.view(s, layer);
  const std::int64_t first = v.ok() ? v->next_position : 0;
  const auto t = make_tokens(c.geo(), tag, first, n);
  return c.append(s, layer, t.kt(c.geo()), t.vt(c.geo()));
}

//! Live (slot, head) rows whose K or V bytes are not those of their position's token.
template <class TagFn>
  requires std::invocable<TagFn, std::int64_t>
std::size_t mismatches(const layer_view& v, const geometry& g, TagFn tag_of) {
  std::size_t bad = 0;
  for (std::uint32_t s = 0; s < v.rows; ++s)
    for (std::uint32_t h = 0; h < v.kv_heads; ++h) {
      const std::int32_t pos = v.position(s, h);
      if (pos < 0) continue;
      const auto k = row_bytes(g, tag_of(pos), pos, h, 0), vv = row_bytes(g, tag_of(pos), pos, h, 1);
      if (std::memcmp(v.k_row(s, h), k.data(), k.size()) != 0) ++bad;
      if (std::memcmp(v.v_row(s, h), vv.data(), vv.size()) != 0) ++bad;
    }
  return bad;
}
std::size_t mismatches(const layer_view& v, const geometry& g, std::uint32_t tag) {
  return mismatches(v, g, [tag](std::int64_t) { return tag; });
}

std::set<std::int32_t> kept(const layer_view& v, std::uint32_t head) {
  std::set<std::int32_t> s;
  for (std::uint32_t r = 0; r < v.rows; ++r)
    if (v.position(r, head) >= 0) s.insert(v.position(r, head));
  return s;
}

// ---- snapshots: everything an engine can observe ---------------------------------------------

struct layer_snap {
  std::uint32_t rows = 0;
  std::int64_t next = 0;
  bool dense = false;
  std::vector<std::int32_t> positions;
  std::vector<std::uint32_t> live;
  std::vector<std::byte> bytes;  // K and V rows of the live entries
  bool operator==(const layer_snap&) const = default;
};

struct snapshot {
  std::size_t sequences = 0;
  std::uint64_t entries_live = 0;
  std::size_t bytes_live = 0, bytes_used = 0, bytes_backed = 0;
  kvcache::memory_stats memory;
  std::vector<layer_snap> layers;
};

template <class C>
snapshot take_snapshot(const C& c, std::initializer_list<seq_id> seqs) {
  snapshot s;
  const auto st = c.stats();
  s.sequences = st.sequences;
  s.entries_live = st.entries_live;
  s.bytes_live = st.bytes_live;
  s.bytes_used = st.bytes_used;
  s.bytes_backed = st.bytes_backed;
  s.memory = st.memory;
  for (seq_id q : seqs)
    for (std::uint32_t l = 0; l < c.geo().layers; ++l) {
      const layer_view v = view_of(c, q, l);
      layer_snap ls;
      ls.rows = v.rows;
      ls.next = v.next_position;
      ls.dense = v.dense;
      ls.positions.assign(v.positions, v.positions + std::size_t{v.rows} * v.kv_heads);
      ls.live.assign(v.live, v.live + v.kv_heads);
      for (std::uint32_t r = 0; r < v.rows; ++r)
        for (std::uint32_t h = 0; h < v.kv_heads; ++h)
          if (v.position(r, h) >= 0) {
            ls.bytes.insert(ls.bytes.end(), v.k_row(r, h), v.k_row(r, h) + v.row_bytes);
            ls.bytes.insert(ls.bytes.end(), v.v_row(r, h), v.v_row(r, h) + v.row_bytes);
          }
      s.layers.push_back(std::move(ls));
    }
  return s;
}

//! "" when equal, else what differs.
std::string snapshot_diff(const snapshot& a, const snapshot& b) {
  std::string d = stats_diff(a.memory, b.memory);
  if (a.sequences != b.sequences) d += "sequences; ";
  if (a.entries_live != b.entries_live) d += "entries_live; ";
  if (a.bytes_live != b.bytes_live) d += "bytes_live; ";
  if (a.bytes_used != b.bytes_used) d += "bytes_used; ";
  if (a.bytes_backed != b.bytes_backed) d += "bytes_backed; ";
  if (a.layers.size() != b.layers.size()) return d + "layer count; ";
  for (std::size_t i = 0; i < a.layers.size(); ++i) {
    const auto &x = a.layers[i], &y = b.layers[i];
    if (x.rows != y.rows) d += "layer " + std::to_string(i) + " rows; ";
    if (x.next != y.next) d += "layer " + std::to_string(i) + " next_position; ";
    if (x.dense != y.dense) d += "layer " + std::to_string(i) + " dense; ";
    if (x.positions != y.positions) d += "layer " + std::to_string(i) + " positions; ";
    if (x.live != y.live) d += "layer " + std::to_string(i) + " live; ";
    if (x.bytes != y.bytes) d += "layer " + std::to_string(i) + " bytes; ";
  }
  return d;
}

// ---- a policy that consumes attention: evicts the slots with least accumulated probability ----

struct least_attention {
  using signals = kvcache::signal_list<attention_signal>;
  struct state {
    std::vector<std::vector<float>> score;  // [kv_head][slot]
    std::uint32_t group = 1;
  };
  std::size_t observed = 0;  //!< observe() calls that reached the policy

  [[nodiscard]] state make_state(const kvcache::policy_context& ctx) const {
    state st;
    st.score.assign(ctx.geo.kv_heads, std::vector<float>(ctx.capacity, 0.0f));
    st.group = ctx.geo.group_size();
    return st;
  }
  void on_append(state& st, const kvcache::slot_table&, const kvcache::placement& pl) {
    for (std::uint32_t i = 0; i < pl.tokens; ++i)
      for (std::uint32_t h = 0; h < pl.heads; ++h) st.score[h][pl.slots[i * pl.heads + h]] = 0.0f;
  }
  status observe(state& st, const kvcache::slot_table&, const attention_signal& a) {
    ++observed;
    for (std::uint32_t qh = 0; qh < a.query_heads; ++qh)
      for (std::uint32_t q = 0; q < a.queries; ++q)
        for (std::uint32_t s = 0; s < a.slots; ++s)
          st.score[qh / st.group][s] += a.probs[(std::size_t{qh} * a.queries + q) * a.slots + s];
    return {};
  }
  void select(state& st, const kvcache::slot_table& t, std::uint32_t head, std::uint32_t count,
              std::vector<std::uint32_t>& victims) {
    std::vector<bool> taken(t.rows(), false);
    for (; count > 0; --count) {
      std::uint32_t best = t.rows();
      for (std::uint32_t s = 0; s < t.rows(); ++s)
        if (t.position(s, head) != kvcache::slot_table::empty && !taken[s] &&
            (best == t.rows() || st.score[head][s] < st.score[head][best]))
          best = s;
      if (best == t.rows()) return;
      taken[best] = true;
      victims.push_back(best);
    }
  }
};
static_assert(kvcache::eviction_policy<least_attention>);

//! StreamingLLM's kept set after n tokens: [0, sinks) ∪ [n - (budget - sinks), n).
std::set<std::int32_t> streaming_kept(std::int64_t n, std::uint32_t budget, std::uint32_t sinks) {
  std::set<std::int32_t> s;
  for (std::int64_t p = 0; p < n; ++p)
    if (n <= budget || p < sinks || p >= n - (budget - sinks)) s.insert(static_cast<std::int32_t>(p));
  return s;
}

}  // namespace

// =============================================================================================

TEST_CASE("cache: the constructor validates its configuration", "[cache]") {
  using kvtest::thrown_code;
  using C = cache<heap_memory>;
  CHECK(thrown_code([] { C c(config(0, 2, 2, 8, dtype::f16, 16)); }) == errc::invalid_argument);
  CHECK(thrown_code([] { C c(config(1, 0, 2, 8, dtype::f16, 16)); }) == errc::invalid_argument);
  CHECK(thrown_code([] { C c(config(1, 2, 2, 0, dtype::f16, 16)); }) == errc::invalid_argument);
  std::string what;
  CHECK(thrown_code([] { C c(config(1, 2, 3, 8, dtype::f16, 16)); }, &what) == errc::invalid_argument);
  CHECK(what.find("query_heads") != std::string::npos);
  CHECK(thrown_code([] { C c(config(1, 2, 2, 8, dtype::f16, 0)); }) == errc::invalid_argument);
  CHECK(thrown_code([] { C c(config(1, 2, 2, 8, dtype::f16, 16, 17)); }, &what) == errc::invalid_budget);
  CHECK(what.find("17") != std::string::npos);
  CHECK(thrown_code([] {
          cache<host_vmm> c(config(1, 2, 2, 8, dtype::f16, 16), host_vmm(kvcache::host_vmm_config{ps + 1, 4}));
        }) == errc::invalid_argument);

  C full(config(3, 2, 2, 8, dtype::f16, 16));  // budget 0: max_tokens
  for (std::uint32_t l = 0; l < 3; ++l) CHECK(full.budget(l) == 16);
  C some(config(3, 2, 2, 8, dtype::f16, 16, 5));
  for (std::uint32_t l = 0; l < 3; ++l) CHECK(some.budget(l) == 5);

  // Range sizes: token_major rounds the whole range to a page; head_major each head's region.
  cache<host_vmm> tm(config(1, 3, 3, 8, dtype::f32, 100), backend<host_vmm>::make(4));
  CHECK(tm.range_bytes() == kvcache::round_up(100 * 3 * 32, ps));
  cache<host_vmm> hm(config(1, 3, 3, 8, dtype::f32, 100, 0, layout::head_major),
                     backend<host_vmm>::make(4));
  CHECK(hm.range_bytes() == 3 * kvcache::round_up(100 * 32, ps));
  CHECK(hm.sequences() == 0);
}

TEMPLATE_TEST_CASE("cache: append then view returns the bytes, positions and strides",
                   "[cache]", host_vmm, heap_memory) {
  const dtype type = GENERATE(dtype::f32, dtype::f16, dtype::bf16);
  const layout order = GENERATE(layout::token_major, layout::head_major);
  const auto cfg = config(2, 2, 4, 8, type, 64, 0, order);
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType>(cfg);
  const seq_id s = open_seq(c);
  CHECK(c.is_open(s));
  CHECK(c.sequences() == 1);

  layer_view v = view_of(c, s, 0);
  CHECK(v.rows == 0);
  CHECK(v.next_position == 0);
  CHECK(v.dense);

  // Prefill of 5 tokens.
  REQUIRE(append_tokens(c, s, 0, 1, 5).ok());
  v = view_of(c, s, 0);
  CHECK(v.rows == 5);
  CHECK(v.next_position == 5);
  CHECK(v.dense);
  CHECK(v.type == type);
  CHECK(v.order == order);
  CHECK(v.kv_heads == 2);
  CHECK(v.head_dim == 8);
  CHECK(v.row_bytes == g.head_bytes());
  CHECK(v.k_scales == nullptr);
  CHECK(v.v_scales == nullptr);
  CHECK(v.scale_bytes == 0);
  CHECK(v.k_scale(0, 0) == nullptr);
  CHECK(v.k != v.v);
  if (order == layout::token_major) {
    CHECK(v.slot_stride == 2 * g.head_bytes());
    CHECK(v.head_stride == g.head_bytes());
  } else {
    CHECK(v.slot_stride == g.head_bytes());
    CHECK(v.head_stride >= 64 * g.head_bytes());
    CHECK(v.head_stride % c.memory().granularity() == 0);  // each head's region page aligned
  }
  CHECK(v.offset(3, 1) == 3 * v.slot_stride + v.head_stride);
  CHECK(v.k_row(3, 1) == v.k + v.offset(3, 1));
  CHECK(v.v_row(4, 0) == v.v + v.offset(4, 0));
  std::size_t bad_positions = 0;
  for (std::uint32_t r = 0; r < 5; ++r)
    for (std::uint32_t h = 0; h < 2; ++h)
      if (v.position(r, h) != static_cast<std::int32_t>(r) || v.positions[r * 2 + h] != static_cast<std::int32_t>(r))
        ++bad_positions;
  CHECK(bad_positions == 0);
  CHECK(v.live[0] == 5);
  CHECK(v.live[1] == 5);
  CHECK(mismatches(v, g, 1) == 0);

  // Decode: one token at a time continues the positions.
  for (int i = 0; i < 3; ++i) REQUIRE(append_tokens(c, s, 0, 1, 1).ok());
  v = view_of(c, s, 0);
  CHECK(v.rows == 8);
  CHECK(v.next_position == 8);
  CHECK(v.position(7, 1) == 7);
  CHECK(v.live[1] == 8);
  CHECK(v.dense);
  CHECK(mismatches(v, g, 1) == 0);

  // A zero-token append is a no-op, even without data.
  const auto before = take_snapshot(c, {s});
  REQUIRE(c.append(s, 0, kv_tensor{nullptr, type, 0, 2, 8}, kv_tensor{nullptr, type, 0, 2, 8}).ok());
  CHECK(snapshot_diff(before, take_snapshot(c, {s})).empty());

  // The other layer is untouched.
  const layer_view other = view_of(c, s, 1);
  CHECK(other.rows == 0);
  CHECK(other.next_position == 0);
  CHECK(c.stats().entries_live == 8 * 2);
}

TEMPLATE_TEST_CASE("cache: layers are independent", "[cache]", host_vmm, heap_memory) {
  const layout order = GENERATE(layout::token_major, layout::head_major);
  const auto cfg = config(3, 2, 2, 16, dtype::f16, 32, 0, order);
  auto c = make_cache<TestType>(cfg);
  const seq_id s = open_seq(c);
  REQUIRE(append_tokens(c, s, 0, 10, 4).ok());
  REQUIRE(append_tokens(c, s, 1, 11, 7).ok());

  const layer_view l0 = view_of(c, s, 0), l1 = view_of(c, s, 1), l2 = view_of(c, s, 2);
  CHECK(l0.rows == 4);
  CHECK(l1.rows == 7);
  CHECK(l2.rows == 0);
  CHECK(l0.next_position == 4);
  CHECK(l1.next_position == 7);
  CHECK(l2.next_position == 0);
  CHECK(l0.k != l1.k);
  CHECK(mismatches(l0, cfg.geo, 10) == 0);
  CHECK(mismatches(l1, cfg.geo, 11) == 0);

  const auto before = take_snapshot(c, {s});
  REQUIRE(append_tokens(c, s, 0, 10, 3).ok());
  const auto after = take_snapshot(c, {s});
  CHECK(after.layers[1] == before.layers[1]);
  CHECK(after.layers[2] == before.layers[2]);
  CHECK(after.layers[0].rows == 7);
  CHECK(mismatches(view_of(c, s, 1), cfg.geo, 11) == 0);
  CHECK(mismatches(view_of(c, s, 0), cfg.geo, 10) == 0);
}

TEMPLATE_TEST_CASE("cache: a batch view lists the sequences of one layer", "[cache]", host_vmm,
                   heap_memory) {
  const layout order = GENERATE(layout::token_major, layout::head_major);
  const auto cfg = config(2, 2, 2, 8, dtype::f32, 32, 0, order);
  auto c = make_cache<TestType>(cfg);
  const seq_id a = open_seq(c), b = open_seq(c), e = open_seq(c);
  REQUIRE(append_tokens(c, a, 1, 1, 2).ok());
  REQUIRE(append_tokens(c, b, 1, 2, 5).ok());

  const seq_id list[] = {a, b, e, b};
  auto res = c.batch(list, 1);
  REQUIRE(res.ok());
  const kvcache::batch_view bv = *res;
  REQUIRE(bv.size() == 4);
  CHECK(bv.rows == std::vector<std::uint32_t>{2, 5, 0, 5});
  CHECK(bv.cu_rows == std::vector<std::int32_t>{0, 2, 7, 7, 12});
  CHECK(bv.kv_heads == 2);
  CHECK(bv.head_dim == 8);
  CHECK(bv.type == dtype::f32);
  CHECK(bv.order == order);
  CHECK(bv.row_bytes == cfg.geo.head_bytes());
  CHECK(bv.dense);
  for (std::size_t i = 0; i < 4; ++i) {
    const layer_view v = view_of(c, list[i], 1);
    CHECK(bv.k[i] == v.k);
    CHECK(bv.v[i] == v.v);
    CHECK(bv.positions[i] == v.positions);
    CHECK(bv.slot_stride == v.slot_stride);
    CHECK(bv.head_stride == v.head_stride);
  }
  // Reading through the pointer arrays gives each sequence's own bytes.
  std::size_t bad = 0;
  for (std::uint32_t r = 0; r < 5; ++r)
    for (std::uint32_t h = 0; h < 2; ++h) {
      const auto want = row_bytes(cfg.geo, 2, r, h, 1);
      if (std::memcmp(bv.v[1] + r * bv.slot_stride + h * bv.head_stride, want.data(), want.size()) != 0) ++bad;
    }
  CHECK(bad == 0);

  auto none = c.batch({}, 0);
  REQUIRE(none.ok());
  CHECK(none->size() == 0);
  CHECK(none->cu_rows == std::vector<std::int32_t>{0});

  REQUIRE(c.close(e).ok());
  CHECK(c.batch(list, 1).code() == errc::unknown_sequence);
  const seq_id two[] = {a, b};
  CHECK(c.batch(two, 2).code() == errc::layer_out_of_range);
}

TEMPLATE_TEST_CASE("cache: fork shares the parent's tokens; later appends stay apart", "[cache]",
                   host_vmm, heap_memory) {
  const layout order = GENERATE(layout::token_major, layout::head_major);
  const auto cfg = config(2, 2, 2, 16, dtype::f16, 64, 0, order);
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType>(cfg);
  const seq_id p = open_seq(c);
  REQUIRE(append_tokens(c, p, 0, 1, 5).ok());
  REQUIRE(append_tokens(c, p, 1, 1, 5).ok());
  const auto before = c.stats();

  auto forked = c.fork(p);
  REQUIRE(forked.ok());
  const seq_id ch = *forked;
  CHECK(ch != p);
  CHECK(c.is_open(ch));
  CHECK(c.sequences() == 2);
  for (std::uint32_t l = 0; l < 2; ++l) {
    const layer_view pv = view_of(c, p, l), cv = view_of(c, ch, l);
    CHECK(cv.rows == 5);
    CHECK(cv.next_position == 5);
    CHECK(std::equal(pv.positions, pv.positions + 10, cv.positions));
    CHECK(cv.k != pv.k);
    CHECK(mismatches(cv, g, 1) == 0);
  }

  // Pages each range's writes touch: token_major one growth frontier; head_major one per head.
  const std::size_t pages_per_write = order == layout::token_major ? 1 : g.kv_heads;
  if constexpr (is_vmm<TestType>) {
    const auto m = c.stats().memory;
    CHECK(m.pages_shared == before.bytes_backed / ps);  // every page of the parent, zero copy
    CHECK(m.cow_copies == 0);
    CHECK(m.pages_free == before.memory.pages_free);
  }

  // The child writes layer 0: only the pages it touches are copied.
  REQUIRE(append_tokens(c, ch, 0, 3, 3).ok());
  if constexpr (is_vmm<TestType>) CHECK(c.stats().memory.cow_copies == 2 * pages_per_write);
  // The parent writes layer 0 afterwards: its pages are private again, nothing to copy.
  REQUIRE(append_tokens(c, p, 0, 2, 2).ok());
  if constexpr (is_vmm<TestType>) CHECK(c.stats().memory.cow_copies == 2 * pages_per_write);
  // The parent writes layer 1 first this time: the parent copies.
  REQUIRE(append_tokens(c, p, 1, 2, 1).ok());
  if constexpr (is_vmm<TestType>) {
    CHECK(c.stats().memory.cow_copies == 4 * pages_per_write);
    CHECK(c.stats().memory.pages_shared == 0);
  }

  const auto parent_tag = [](std::int64_t pos) { return pos < 5 ? 1u : 2u; };
  const auto child_tag = [](std::int64_t pos) { return pos < 5 ? 1u : 3u; };
  const layer_view p0 = view_of(c, p, 0), c0 = view_of(c, ch, 0);
  const layer_view p1 = view_of(c, p, 1), c1 = view_of(c, ch, 1);
  CHECK(p0.rows == 7);
  CHECK(c0.rows == 8);
  CHECK(p1.rows == 6);
  CHECK(c1.rows == 5);
  CHECK(p0.next_position == 7);
  CHECK(c0.next_position == 8);
  CHECK(mismatches(p0, g, parent_tag) == 0);
  CHECK(mismatches(c0, g, child_tag) == 0);
  CHECK(mismatches(p1, g, parent_tag) == 0);
  CHECK(mismatches(c1, g, 1) == 0);

  // Closing the parent leaves the child whole.
  REQUIRE(c.close(p).ok());
  CHECK(mismatches(view_of(c, ch, 0), g, child_tag) == 0);
  CHECK(mismatches(view_of(c, ch, 1), g, 1) == 0);
  REQUIRE(append_tokens(c, ch, 1, 4, 2).ok());
  CHECK(mismatches(view_of(c, ch, 1), g, [](std::int64_t pos) { return pos < 5 ? 1u : 4u; }) == 0);
}

TEMPLATE_TEST_CASE("cache: closed and stale handles are unknown sequences", "[cache]", host_vmm,
                   heap_memory) {
  const auto cfg = config(2, 2, 2, 8, dtype::f16, 32);
  auto c = make_cache<TestType>(cfg);
  const seq_id s0 = open_seq(c);
  REQUIRE(append_tokens(c, s0, 0, 1, 3).ok());
  REQUIRE(append_tokens(c, s0, 1, 1, 3).ok());
  REQUIRE(c.close(s0).ok());
  CHECK(!c.is_open(s0));
  CHECK(c.sequences() == 0);

  const auto t = make_tokens(cfg.geo, 1, 0, 1);
  CHECK(c.close(s0).code() == errc::unknown_sequence);
  CHECK(c.append(s0, 0, t.kt(cfg.geo), t.vt(cfg.geo)).code() == errc::unknown_sequence);
  CHECK(c.view(s0, 0).code() == errc::unknown_sequence);
  CHECK(c.evict(s0).code() == errc::unknown_sequence);
  CHECK(c.evict(s0, 0).code() == errc::unknown_sequence);
  CHECK(c.fork(s0).code() == errc::unknown_sequence);
  CHECK(c.observe(s0, 0).code() == errc::unknown_sequence);
  const seq_id one[] = {s0};
  CHECK(c.batch(one, 0).code() == errc::unknown_sequence);
  CHECK(c.view(s0, 0).error().message().find("not open") != std::string::npos);

  // The index is reused by the next open, with a new generation.
  const auto before = c.stats().memory;
  const seq_id s1 = open_seq(c, 3);
  CHECK(s1.index == s0.index);
  CHECK(s1.generation != s0.generation);
  CHECK(c.is_open(s1));
  CHECK(!c.is_open(s0));
  const layer_view fresh = view_of(c, s1, 0);
  CHECK(fresh.rows == 0);  // nothing of the old sequence shows
  CHECK(fresh.next_position == 0);
  CHECK(c.view(s0, 0).code() == errc::unknown_sequence);
  CHECK(c.append(s0, 0, t.kt(cfg.geo), t.vt(cfg.geo)).code() == errc::unknown_sequence);
  CHECK(c.close(s0).code() == errc::unknown_sequence);
  CHECK(c.is_open(s1));  // the stale close did not close the new sequence

  CHECK(c.view(seq_id{}, 0).code() == errc::unknown_sequence);
  CHECK(c.view(seq_id{57, 0}, 0).code() == errc::unknown_sequence);
  CHECK(c.observe(s1, 0).ok());  // keep_all consumes nothing: observe() takes no signal

  if constexpr (is_vmm<TestType>) {
    // Deferred reclamation: the new sequence got the old ranges with their pages mapped.
    const auto m = c.stats().memory;
    CHECK(m.ranges_reused == before.ranges_reused + 4);
    REQUIRE(append_tokens(c, s1, 0, 2, 3).ok());
    REQUIRE(append_tokens(c, s1, 1, 2, 3).ok());
    CHECK(c.stats().memory.map_calls == m.map_calls);
    CHECK(mismatches(view_of(c, s1, 0), cfg.geo, 2) == 0);
  }
}

TEMPLATE_TEST_CASE("cache: statistics count live, used and backed bytes", "[cache]", host_vmm,
                   heap_memory) {
  const layout order = GENERATE(layout::token_major, layout::head_major);
  const auto cfg = config(2, 2, 2, 16, dtype::f16, 256, 0, order);
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType>(cfg);
  const std::uint32_t lengths[] = {1, 63, 64, 65, 130};
  std::vector<seq_id> seqs;
  for (std::uint32_t n : lengths) {
    seqs.push_back(open_seq(c));
    for (std::uint32_t l = 0; l < 2; ++l) REQUIRE(append_tokens(c, seqs.back(), l, 1, n).ok());
  }
  const std::size_t per_entry = 2 * g.head_bytes();  // K + V of one (token, head)
  std::uint64_t entries = 0;
  std::size_t tm_backed = 0, hm_backed = 0;
  for (std::uint32_t n : lengths) {
    entries += std::uint64_t{n} * g.kv_heads * g.layers;
    // per (sequence, layer) there are two ranges, K and V
    tm_backed += 2 * g.layers * kvcache::round_up(std::size_t{n} * g.token_bytes(), ps);
    hm_backed += 2 * g.layers * g.kv_heads * kvcache::round_up(std::size_t{n} * g.head_bytes(), ps);
  }
  const std::size_t ranges = 2 * g.layers * std::size(lengths);
  const auto st = c.stats();
  CHECK(st.sequences == 5);
  CHECK(st.entries_live == entries);
  CHECK(st.bytes_live == entries * per_entry);
  CHECK(st.bytes_used == st.bytes_live);  // no holes
  CHECK(st.bytes_backed >= st.bytes_used);
  CHECK(st.bytes_wasted() == st.bytes_backed - st.bytes_live);
  if constexpr (is_vmm<TestType>) {
    CHECK(st.memory.pages_mapped * ps == st.bytes_backed);
    if (order == layout::token_major) {
      // One growth frontier per range: less than one page of slack per range.
      CHECK(st.bytes_backed == tm_backed);
      CHECK(st.bytes_backed - st.bytes_used < ranges * ps);
    } else {
      // Every head's region is page aligned: up to one partly filled page per head.
      CHECK(st.bytes_backed == hm_backed);
      CHECK(st.bytes_backed - st.bytes_used < ranges * g.kv_heads * ps);
      CHECK(st.bytes_backed - st.bytes_used > tm_backed - st.bytes_used);  // the cost, measured
    }
  }

  // Closing a sequence drops it from the counts; its pages stay mapped, idle, for reuse.
  REQUIRE(c.close(seqs.back()).ok());
  const auto after = c.stats();
  CHECK(after.sequences == 4);
  CHECK(after.entries_live == entries - 130ull * g.kv_heads * g.layers);
  CHECK(after.bytes_backed < st.bytes_backed);
  if constexpr (is_vmm<TestType>) {
    CHECK(after.memory.pages_idle * ps == st.bytes_backed - after.bytes_backed);
    CHECK(after.memory.ranges_idle == 2 * g.layers);
  }
}

TEMPLATE_TEST_CASE("cache: budgets are checked and set per layer", "[cache]", host_vmm,
                   heap_memory) {
  const auto cfg = config(3, 1, 1, 8, dtype::f16, 16);
  auto c = make_cache<TestType>(cfg);
  CHECK(c.set_budget(0).code() == errc::invalid_budget);
  CHECK(c.set_budget(17).code() == errc::invalid_budget);
  CHECK(c.set_budget(1, 0).code() == errc::invalid_budget);
  CHECK(c.set_budget(1, 17).code() == errc::invalid_budget);
  CHECK(c.set_budget(3, 4).code() == errc::layer_out_of_range);
  for (std::uint32_t l = 0; l < 3; ++l) CHECK(c.budget(l) == 16);  // unchanged by failures

  REQUIRE(c.set_budget(1, 3).ok());
  CHECK(c.budget(0) == 16);
  CHECK(c.budget(1) == 3);
  CHECK(c.budget(2) == 16);
  REQUIRE(c.set_budget(4).ok());
  for (std::uint32_t l = 0; l < 3; ++l) CHECK(c.budget(l) == 4);
  REQUIRE(c.set_budget(16).ok());
  REQUIRE(c.set_budget(2, 1).ok());

  const seq_id s = open_seq(c);
  CHECK(c.evict(s, 2, 2).code() == errc::invalid_argument);  // reserve above the budget
  CHECK(c.evict(s, 2, 1).ok());
  CHECK(c.evict(s, 3).code() == errc::layer_out_of_range);
}

TEMPLATE_TEST_CASE("cache: failed operations leave the cache exactly as it was", "[cache]",
                   host_vmm, heap_memory) {
  const layout order = GENERATE(layout::token_major, layout::head_major);
  const auto cfg = config(2, 2, 2, 8, dtype::f32, 16, 0, order);
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType>(cfg);
  const seq_id a = open_seq(c), b = open_seq(c), x = open_seq(c);
  REQUIRE(append_tokens(c, a, 0, 1, 5).ok());
  REQUIRE(append_tokens(c, a, 1, 1, 5).ok());
  REQUIRE(append_tokens(c, b, 0, 2, 16).ok());  // full
  REQUIRE(append_tokens(c, b, 1, 2, 3).ok());
  REQUIRE(c.close(x).ok());
  const auto snap = take_snapshot(c, {a, b});

  const auto t1 = make_tokens(g, 9, 5, 1);
  const auto t2 = make_tokens(g, 9, 5, 2);
  const auto t3 = make_tokens(g, 9, 5, 3);
  const auto t12 = make_tokens(g, 9, 5, 12);
  auto expect = [&](status st, errc code) {
    CHECK(st.code() == code);
    CHECK(!st.message().empty());
    CHECK(snapshot_diff(snap, take_snapshot(c, {a, b})) == "");
  };

  SECTION("unknown or closed sequence") {
    expect(c.append(x, 0, t1.kt(g), t1.vt(g)), errc::unknown_sequence);
    expect(c.append(seq_id{}, 0, t1.kt(g), t1.vt(g)), errc::unknown_sequence);
    expect(c.close(x), errc::unknown_sequence);
    expect(c.evict(x), errc::unknown_sequence);
    expect(c.fork(x).error(), errc::unknown_sequence);
  }
  SECTION("layer out of range") {
    expect(c.append(a, 2, t1.kt(g), t1.vt(g)), errc::layer_out_of_range);
    expect(c.view(a, 2).error(), errc::layer_out_of_range);
    expect(c.evict(a, 2), errc::layer_out_of_range);
    expect(c.observe(a, 2), errc::layer_out_of_range);
  }
  SECTION("shape mismatch") {
    kv_tensor k = t1.kt(g), v = t1.vt(g);
    kv_tensor bad = k;
    bad.heads = 3;
    expect(c.append(a, 0, bad, v), errc::shape_mismatch);
    bad = v;
    bad.heads = 1;
    expect(c.append(a, 0, k, bad), errc::shape_mismatch);
    bad = k;
    bad.head_dim = 16;
    expect(c.append(a, 0, bad, v), errc::shape_mismatch);
    bad = k;
    bad.type = dtype::f16;
    expect(c.append(a, 0, bad, v), errc::shape_mismatch);
    bad = v;
    bad.type = dtype::bf16;
    expect(c.append(a, 0, k, bad), errc::shape_mismatch);
    // k and v token counts differ (both with valid data)
    expect(c.append(a, 0, t2.kt(g), t3.vt(g)), errc::shape_mismatch);
    CHECK(c.append(a, 0, t2.kt(g), t3.vt(g)).message().find("tokens") != std::string::npos);
  }
  SECTION("null data") {
    kv_tensor k = t1.kt(g), v = t1.vt(g);
    k.data = nullptr;
    expect(c.append(a, 0, k, v), errc::invalid_argument);
    k = t1.kt(g);
    v.data = nullptr;
    expect(c.append(a, 0, k, v), errc::invalid_argument);
  }
  SECTION("past the capacity") {
    const status st = c.append(b, 0, t1.kt(g), t1.vt(g));
    expect(st, errc::capacity_exceeded);
    CHECK(st.message().find("evict") != std::string::npos);
    // 12 tokens where 11 fit: none is appended.
    expect(c.append(a, 0, t12.kt(g), t12.vt(g)), errc::capacity_exceeded);
  }
  SECTION("bad budget or reserve") {
    expect(c.evict(a, 0, 17), errc::invalid_argument);
    expect(c.set_budget(0), errc::invalid_budget);
    expect(c.set_budget(0, 17), errc::invalid_budget);
    CHECK(c.budget(0) == 16);
  }
  // What fits still works afterwards.
  REQUIRE(c.append(a, 0, t1.kt(g), t1.vt(g)).ok());
  CHECK(mismatches(view_of(c, a, 0), g, [](std::int64_t pos) { return pos < 5 ? 1u : 9u; }) == 0);
}

TEMPLATE_TEST_CASE("cache: an exhausted pool fails the append and loses nothing", "[cache]",
                   host_vmm, heap_memory) {
  // 2 kv heads x 8 f32 = 64 bytes per token and range: a page holds ps / 64 tokens.
  const std::uint32_t per_page = static_cast<std::uint32_t>(ps / 64);
  const auto cfg = config(1, 2, 2, 8, dtype::f32, 4 * per_page);
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType>(cfg, /*pages=*/4);
  const seq_id a = open_seq(c), b = open_seq(c);
  REQUIRE(append_tokens(c, a, 0, 1, per_page).ok());  // K and V: one page each
  REQUIRE(append_tokens(c, b, 0, 2, per_page).ok());  // the pool is full
  const auto snap = take_snapshot(c, {a, b});

  status st = append_tokens(c, a, 0, 3, 1);  // a new page for K and for V
  CHECK(st.code() == errc::out_of_pages);
  CHECK(snapshot_diff(snap, take_snapshot(c, {a, b})) == "");
  st = append_tokens(c, a, 0, 3, 10);
  CHECK(st.code() == errc::out_of_pages);
  CHECK(snapshot_diff(snap, take_snapshot(c, {a, b})) == "");
  CHECK(mismatches(view_of(c, a, 0), g, 1) == 0);
  CHECK(view_of(c, a, 0).rows == per_page);

  // Another sequence ends: the same append now succeeds.
  REQUIRE(c.close(b).ok());
  REQUIRE(append_tokens(c, a, 0, 3, 1).ok());
  const layer_view v = view_of(c, a, 0);
  CHECK(v.rows == per_page + 1);
  CHECK(mismatches(v, g, [per_page](std::int64_t pos) { return pos < per_page ? 1u : 3u; }) == 0);
  if constexpr (is_vmm<TestType>) CHECK(c.stats().memory.pages_reclaimed == 2);
}

TEMPLATE_TEST_CASE("cache: observe checks the attention signal's shape", "[cache][evict]",
                   host_vmm, heap_memory) {
  using C = cache<TestType, least_attention>;
  static_assert(C::template consumes<attention_signal>);
  static_assert(!C::template consumes<kvcache::query_signal>);
  static_assert(!cache<TestType>::template consumes<attention_signal>);

  const auto cfg = config(1, 2, 4, 8, dtype::f32, 8);
  auto c = make_cache<TestType, least_attention>(cfg);
  const seq_id s = open_seq(c);
  REQUIRE(append_tokens(c, s, 0, 1, 4).ok());
  std::vector<float> probs(4 * 1 * 4, 0.25f);

  REQUIRE(c.observe(s, 0, attention_signal{probs.data(), 4, 1, 4}).ok());
  CHECK(c.policy().observed == 1);
  const auto snap = take_snapshot(c, {s});

  auto bad = [&](attention_signal a, errc code) {
    const status st = c.observe(s, 0, a);
    CHECK(st.code() == code);
    CHECK(c.policy().observed == 1);  // the policy never saw it
    CHECK(snapshot_diff(snap, take_snapshot(c, {s})) == "");
  };
  bad(attention_signal{probs.data(), 2, 1, 4}, errc::shape_mismatch);
  CHECK(c.observe(s, 0, attention_signal{probs.data(), 2, 1, 4}).message().find("[4][q >= 1][4") !=
        std::string::npos);
  bad(attention_signal{probs.data(), 4, 1, 3}, errc::shape_mismatch);
  bad(attention_signal{probs.data(), 4, 1, 5}, errc::shape_mismatch);
  bad(attention_signal{probs.data(), 4, 0, 4}, errc::shape_mismatch);
  bad(attention_signal{nullptr, 4, 1, 4}, errc::invalid_argument);
  CHECK(c.observe(seq_id{}, 0, attention_signal{probs.data(), 4, 1, 4}).code() ==
        errc::unknown_sequence);
  CHECK(c.observe(s, 1, attention_signal{probs.data(), 4, 1, 4}).code() ==
        errc::layer_out_of_range);
  CHECK(c.policy().observed == 1);
}

TEMPLATE_TEST_CASE("cache: keep_all never evicts", "[cache][evict]", host_vmm, heap_memory) {
  const auto cfg = config(2, 2, 2, 8, dtype::f16, 16, /*budget=*/4);
  auto c = make_cache<TestType>(cfg);
  const seq_id s = open_seq(c);
  REQUIRE(append_tokens(c, s, 0, 1, 10).ok());
  REQUIRE(append_tokens(c, s, 1, 1, 16).ok());
  const auto snap = take_snapshot(c, {s});
  REQUIRE(c.evict(s).ok());
  REQUIRE(c.evict(s, 0).ok());
  REQUIRE(c.evict(s, 1, 4).ok());
  CHECK(snapshot_diff(snap, take_snapshot(c, {s})) == "");
  const layer_view v = view_of(c, s, 0);
  CHECK(v.live[0] == 10);
  CHECK(v.dense);
  // Nothing is ever freed, so a full layer stays full.
  CHECK(append_tokens(c, s, 1, 1, 1).code() == errc::capacity_exceeded);
}

TEMPLATE_TEST_CASE("cache: sink_window keeps StreamingLLM's set, reusing victims' slots",
                   "[cache][evict]", host_vmm, heap_memory) {
  const layout order = GENERATE(layout::token_major, layout::head_major);
  const std::uint32_t sinks = 4, budget = 16;
  const auto cfg = config(2, 2, 2, 8, dtype::f16, 20, budget, order);
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType, sink_window>(cfg, 0, sink_window(sinks));
  CHECK(c.policy().sinks() == sinks);
  const seq_id s = open_seq(c);
  std::mt19937 rng(2024);

  SECTION("decode one token at a time, evicting ahead of each append") {
    const std::uint32_t steps = 40 + rng() % 80;
    std::size_t wrong_set = 0, wrong_rows = 0, wrong_bytes = 0, moved = 0, not_dense = 0;
    const std::byte* base = nullptr;
    for (std::uint32_t n = 1; n <= steps; ++n) {
      REQUIRE(c.evict(s, 0, 1).ok());
      REQUIRE(append_tokens(c, s, 0, 7, 1).ok());
      REQUIRE(c.evict(s, 0).ok());
      const layer_view v = view_of(c, s, 0);
      const auto want = streaming_kept(n, budget, sinks);
      for (std::uint32_t h = 0; h < 2; ++h) {
        if (kept(v, h) != want) ++wrong_set;
        if (v.live[h] != want.size()) ++wrong_set;
      }
      if (v.rows != std::min(n, budget)) ++wrong_rows;  // victims' slots are reused
      if (v.next_position != n) ++wrong_rows;
      if (!v.dense) ++not_dense;
      wrong_bytes += mismatches(v, g, 7u);  // kept tokens never move
      if (is_vmm<TestType> && base && v.k != base) ++moved;
      base = v.k;
    }
    CHECK(steps >= 40);
    CHECK(wrong_set == 0);
    CHECK(wrong_rows == 0);
    CHECK(wrong_bytes == 0);
    CHECK(moved == 0);
    CHECK(not_dense == 0);

    // After an eviction ahead of an append, the hole shows in the statistics and the view.
    REQUIRE(c.evict(s, 0, 1).ok());
    const auto st = c.stats();
    CHECK(st.bytes_used - st.bytes_live == g.kv_heads * 2 * g.head_bytes());
    const layer_view v = view_of(c, s, 0);
    CHECK(!v.dense);
    CHECK(v.live[0] == budget - 1);
    const seq_id one[] = {s};
    CHECK(!c.batch(one, 0)->dense);
    CHECK(c.batch(one, 1)->dense);
  }
  SECTION("prefill chunks of random sizes, evicting room for each") {
    std::size_t wrong_set = 0, wrong_rows = 0, wrong_bytes = 0;
    std::uint32_t n = 0;
    for (int step = 0; step < 30; ++step) {
      const std::uint32_t chunk = 1 + rng() % (budget - sinks);
      REQUIRE(c.evict(s, 1, chunk).ok());
      REQUIRE(append_tokens(c, s, 1, 8, chunk).ok());
      n += chunk;
      REQUIRE(c.evict(s, 1).ok());
      const layer_view v = view_of(c, s, 1);
      const auto want = streaming_kept(n, budget, sinks);
      for (std::uint32_t h = 0; h < 2; ++h)
        if (kept(v, h) != want) ++wrong_set;
      if (v.rows != std::min(n, budget)) ++wrong_rows;
      wrong_bytes += mismatches(v, g, 8u);
    }
    CHECK(n > budget);
    CHECK(wrong_set == 0);
    CHECK(wrong_rows == 0);
    CHECK(wrong_bytes == 0);
    CHECK(view_of(c, s, 0).rows == 0);  // layer 0 untouched
  }
}

TEMPLATE_TEST_CASE("cache: evict(seq) applies every layer's budget", "[cache][evict]", host_vmm,
                   heap_memory) {
  const std::uint32_t sinks = 2;
  const auto cfg = config(3, 2, 2, 8, dtype::bf16, 24);
  auto c = make_cache<TestType, sink_window>(cfg, 0, sink_window(sinks));
  REQUIRE(c.set_budget(0, 8).ok());
  REQUIRE(c.set_budget(1, 12).ok());
  const seq_id s = open_seq(c);
  for (std::uint32_t l = 0; l < 3; ++l) REQUIRE(append_tokens(c, s, l, 5, 20).ok());
  REQUIRE(c.evict(s).ok());
  const std::uint32_t budgets[] = {8, 12, 24};
  for (std::uint32_t l = 0; l < 3; ++l) {
    const layer_view v = view_of(c, s, l);
    const auto want = streaming_kept(20, budgets[l], sinks);
    CHECK(kept(v, 0) == want);
    CHECK(kept(v, 1) == want);
    CHECK(v.rows == 20);  // holes stay where they are
    CHECK(v.dense == (l == 2));
    CHECK(mismatches(v, cfg.geo, 5u) == 0);
  }
  const auto st = c.stats();
  CHECK(st.entries_live == (8 + 12 + 20) * 2u);
  CHECK(st.bytes_used == 3 * 20 * 2 * 2 * cfg.geo.head_bytes());
}

TEMPLATE_TEST_CASE("cache: fork copies the policy state", "[cache][evict]", host_vmm,
                   heap_memory) {
  const auto cfg = config(1, 2, 2, 8, dtype::f16, 12, 8);
  auto c = make_cache<TestType, sink_window>(cfg, 0, sink_window(2));
  const seq_id p = open_seq(c);
  for (int i = 0; i < 30; ++i) {
    REQUIRE(c.evict(p, 0, 1).ok());
    REQUIRE(append_tokens(c, p, 0, 1, 1).ok());
  }
  auto forked = c.fork(p);
  REQUIRE(forked.ok());
  const seq_id ch = *forked;
  for (int i = 0; i < 10; ++i) {
    REQUIRE(c.evict(ch, 0, 1).ok());
    REQUIRE(append_tokens(c, ch, 0, 2, 1).ok());
  }
  for (int i = 0; i < 5; ++i) {
    REQUIRE(c.evict(p, 0, 1).ok());
    REQUIRE(append_tokens(c, p, 0, 3, 1).ok());
  }
  const layer_view pv = view_of(c, p, 0), cv = view_of(c, ch, 0);
  CHECK(kept(pv, 0) == streaming_kept(35, 8, 2));
  CHECK(kept(pv, 1) == streaming_kept(35, 8, 2));
  CHECK(kept(cv, 0) == streaming_kept(40, 8, 2));
  CHECK(kept(cv, 1) == streaming_kept(40, 8, 2));
  CHECK(mismatches(pv, cfg.geo, [](std::int64_t pos) { return pos < 30 ? 1u : 3u; }) == 0);
  CHECK(mismatches(cv, cfg.geo, [](std::int64_t pos) { return pos < 30 ? 1u : 2u; }) == 0);
}

TEMPLATE_TEST_CASE("cache: heads evict different slots and write into their own holes",
                   "[cache][evict]", host_vmm, heap_memory) {
  const layout order = GENERATE(layout::token_major, layout::head_major);
  // 4 query heads on 2 kv heads: query heads 0,1 vote for kv head 0; 2,3 for kv head 1.
  const auto cfg = config(1, 2, 4, 8, dtype::f16, 8, /*budget=*/3, order);
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType, least_attention>(cfg);
  const seq_id s = open_seq(c);
  REQUIRE(append_tokens(c, s, 0, 1, 4).ok());

  // [query_heads][queries = 1][slots = 4]
  const std::vector<float> first = {0.40f, 0.05f, 0.30f, 0.25f,   // qh 0
                                    0.40f, 0.05f, 0.30f, 0.25f,   // qh 1
                                    0.30f, 0.40f, 0.05f, 0.25f,   // qh 2
                                    0.30f, 0.40f, 0.05f, 0.25f};  // qh 3
  REQUIRE(c.observe(s, 0, attention_signal{first.data(), 4, 1, 4}).ok());
  REQUIRE(c.evict(s, 0).ok());
  layer_view v = view_of(c, s, 0);
  CHECK(v.position(1, 0) == -1);  // head 0 dropped slot 1
  CHECK(v.position(2, 1) == -1);  // head 1 dropped slot 2
  CHECK(v.position(2, 0) == 2);
  CHECK(v.position(1, 1) == 1);
  CHECK(v.live[0] == 3);
  CHECK(v.live[1] == 3);
  CHECK(!v.dense);

  // The next token lands in a different row per head.
  REQUIRE(append_tokens(c, s, 0, 2, 1).ok());
  v = view_of(c, s, 0);
  CHECK(v.rows == 4);
  CHECK(v.dense);
  CHECK(v.position(1, 0) == 4);
  CHECK(v.position(2, 1) == 4);
  const auto tag1 = [](std::int64_t pos) { return pos < 4 ? 1u : 2u; };
  CHECK(mismatches(v, g, tag1) == 0);
  // Explicitly: each head's bytes of token 4 are in that head's slot, the other head's row keeps
  // its old token.
  CHECK(std::memcmp(v.k_row(1, 0), row_bytes(g, 2, 4, 0, 0).data(), v.row_bytes) == 0);
  CHECK(std::memcmp(v.k_row(2, 1), row_bytes(g, 2, 4, 1, 0).data(), v.row_bytes) == 0);
  CHECK(std::memcmp(v.v_row(2, 1), row_bytes(g, 2, 4, 1, 1).data(), v.row_bytes) == 0);
  CHECK(std::memcmp(v.k_row(1, 1), row_bytes(g, 1, 1, 1, 0).data(), v.row_bytes) == 0);
  CHECK(std::memcmp(v.k_row(2, 0), row_bytes(g, 1, 2, 0, 0).data(), v.row_bytes) == 0);

  // Second round: per head scores (first + second, new tokens reset to 0)
  //   head 0: slot0 1.8, slot1 0.2, slot2 1.0, slot3 0.9 -> victims 1, 3, 2; keeps position 0
  //   head 1: slot0 0.8, slot1 1.4, slot2 1.0, slot3 0.7 -> victims 3, 0, 2; keeps position 1
  const std::vector<float> second = {0.5f, 0.1f, 0.2f, 0.2f, 0.5f, 0.1f, 0.2f, 0.2f,
                                     0.1f, 0.3f, 0.5f, 0.1f, 0.1f, 0.3f, 0.5f, 0.1f};
  REQUIRE(c.observe(s, 0, attention_signal{second.data(), 4, 1, 4}).ok());
  REQUIRE(c.evict(s, 0, /*reserve=*/2).ok());  // down to budget - 2 = 1 per head
  v = view_of(c, s, 0);
  CHECK(kept(v, 0) == std::set<std::int32_t>{0});
  CHECK(kept(v, 1) == std::set<std::int32_t>{1});

  // Three tokens (positions 5, 6, 7) fill the holes, most recently freed first, per head.
  REQUIRE(append_tokens(c, s, 0, 3, 3).ok());
  v = view_of(c, s, 0);
  CHECK(v.rows == 4);
  const std::int32_t want[4][2] = {{0, 6}, {7, 1}, {5, 5}, {6, 7}};  // [slot][head]
  std::size_t wrong = 0;
  for (std::uint32_t r = 0; r < 4; ++r)
    for (std::uint32_t h = 0; h < 2; ++h)
      if (v.position(r, h) != want[r][h]) ++wrong;
  CHECK(wrong == 0);
  CHECK(mismatches(v, g, [](std::int64_t pos) { return pos < 4 ? 1u : pos == 4 ? 2u : 3u; }) == 0);
  CHECK(c.policy().observed == 2);
}

// Regression (was a bug in heap.hpp:74, seen through the cache): a head_major append sends one write request per
// (token, head) row, and heap_memory adds the growth of each request on its own, so an append
// that needs exactly the byte budget left fails with out_of_pages.
TEST_CASE("cache: heap_memory with a byte budget takes a head_major prefill that fits",
          "[cache][regression]") {
  const auto cfg = config(1, 2, 2, 8, dtype::f32, 4, 0, layout::head_major);
  cache<heap_memory> probe(cfg);
  // Exactly the two ranges (K and V) of one (sequence, layer), filled to max_tokens.
  cache<heap_memory> c(cfg, heap_memory(kvcache::heap_memory_config{2 * probe.range_bytes(), 1.0}));
  const seq_id s = open_seq(c);
  const status st = append_tokens(c, s, 0, 1, 4);
  CHECK(st.ok());
  CHECK(st.message() == "");
  CHECK(view_of(c, s, 0).rows == 4);
}

// Regression (was a bug in heap.hpp:107, seen through the cache): a head_major fork passes the whole range as the
// bytes to share, and heap_memory copies that many bytes from a parent block that (with exact
// growth) is smaller: a heap buffer over-read that AddressSanitizer reports here.
TEST_CASE("cache: heap_memory forks a head_major sequence within the parent's bytes",
          "[cache][regression]") {
  const auto cfg = config(1, 2, 2, 8, dtype::f32, 64, 0, layout::head_major);
  cache<heap_memory> c(cfg, heap_memory(kvcache::heap_memory_config{0, 1.0}));
  const seq_id p = open_seq(c);
  REQUIRE(append_tokens(c, p, 0, 1, 5).ok());
  auto ch = c.fork(p);
  REQUIRE(ch.ok());
  CHECK(mismatches(view_of(c, *ch, 0), cfg.geo, 1) == 0);
  CHECK(view_of(c, *ch, 0).rows == 5);
}

TEMPLATE_TEST_CASE("cache: map_ahead maps the next steps' pages so decode appends map nothing",
                   "[cache][map_ahead]", host_vmm, heap_memory) {
  // 2 kv heads x 8 f32 = 64 bytes per token: a page holds ps / 64 tokens.
  const std::uint32_t per_page = static_cast<std::uint32_t>(ps / 64);
  for (layout order : {layout::token_major, layout::head_major}) {
    CAPTURE(order == layout::token_major);
    const auto cfg = config(2, 2, 2, 8, dtype::f32, 4 * per_page, 0, order);
    const geometry& g = cfg.geo;
    auto c = make_cache<TestType>(cfg);
    const seq_id a = open_seq(c), b = open_seq(c);
    const seq_id both[] = {a, b};
    std::size_t sync_maps = 0;
    for (std::uint32_t t = 0; t < 2 * per_page + 3; ++t) {
      const auto before = c.stats().memory.pages_mapped_total;
      for (std::uint32_t l = 0; l < 2; ++l) {
        REQUIRE(append_tokens(c, a, l, 1, 1).ok());
        REQUIRE(append_tokens(c, b, l, 2, 1).ok());
      }
      const auto after = c.stats().memory;
      if (t > 0) sync_maps += after.pages_mapped_total - before;
      REQUIRE(c.map_ahead(both, 4).ok());  // the "compute" of this step would run here
    }
    REQUIRE(c.sync().ok());
    for (std::uint32_t l = 0; l < 2; ++l) {
      CHECK(mismatches(view_of(c, a, l), g, 1) == 0);
      CHECK(mismatches(view_of(c, b, l), g, 2) == 0);
    }
    if constexpr (is_vmm<TestType>) {
      CHECK(sync_maps == 0);  // every page after the first step was mapped ahead
      const auto s = c.stats().memory;
      CHECK(s.pages_mapped_ahead > 0);
      CHECK(s.pages_mapped_ahead + 2 * 2 * 2 * (order == layout::token_major ? 1 : 2) ==
            s.pages_mapped_total);
      // at most the look-ahead beyond what is held: one extra page per range and head
      CHECK(c.stats().bytes_backed <= c.stats().bytes_used + 2 * 2 * 2 * 2 * ps);
    }
  }

  auto c = make_cache<TestType>(config(1, 2, 2, 8, dtype::f32, 64));
  const seq_id a = open_seq(c);
  REQUIRE(c.close(a).ok());
  const seq_id stale[] = {a};
  CHECK(c.map_ahead(stale).code() == errc::unknown_sequence);
  CHECK(c.sync().ok());
}

// ---- one range per sequence for all layers (range_scope::per_sequence) ----------------------

TEMPLATE_TEST_CASE("cache: per_sequence ranges hold every layer in one K and one V range",
                   "[cache][per_sequence]", host_vmm, heap_memory) {
  // 3 layers x 2 kv heads x 8 f32 = 192 bytes per slot row.
  auto cfg = config(3, 2, 2, 8, dtype::f32, 256, 0);
  cfg.ranges = kvcache::range_scope::per_sequence;
  const geometry& g = cfg.geo;
  auto c = make_cache<TestType, sink_window>(cfg, 0, sink_window{2});
  const seq_id a = open_seq(c, 40);
  for (std::uint32_t l = 0; l < 3; ++l) REQUIRE(append_tokens(c, a, l, 10 + l, 30).ok());  // prefill
  for (int t = 0; t < 20; ++t)
    for (std::uint32_t l = 0; l < 3; ++l) REQUIRE(append_tokens(c, a, l, 10 + l, 1).ok());
  for (std::uint32_t l = 0; l < 3; ++l) {
    const layer_view v = view_of(c, a, l);
    CHECK(v.slot_stride == 3 * 2 * 8 * 4);
    CHECK(v.head_stride == 8 * 4);
    CHECK(v.rows == 50);
    CHECK(v.k == view_of(c, a, 0).k + l * 2 * 8 * 4);  // one range, the layer at its offset
    CHECK(mismatches(v, g, 10 + l) == 0);
  }
  if constexpr (is_vmm<TestType>) {
    CHECK(c.stats().memory.ranges_active == 2);
    CHECK(c.stats().bytes_backed == round_up(50 * 192, ps) * 2);
  }

  // eviction makes per-layer, per-head holes; refills land in the right layer's bytes
  REQUIRE(c.set_budget(1, 12).ok());
  REQUIRE(c.evict(a, 1).ok());
  REQUIRE(append_tokens(c, a, 1, 11, 5).ok());
  REQUIRE(append_tokens(c, a, 0, 10, 5).ok());
  for (std::uint32_t l = 0; l < 3; ++l) CHECK(mismatches(view_of(c, a, l), g, 10 + l) == 0);
  CHECK(view_of(c, a, 1).rows == 50);  // holes were reused
  CHECK(view_of(c, a, 0).rows == 55);

  // fork shares the one range; writes into the child stay apart
  auto f = c.fork(a);
  REQUIRE(f.ok());
  REQUIRE(append_tokens(c, *f, 2, 20, 3).ok());
  CHECK(mismatches(view_of(c, a, 2), g, 12) == 0);
  CHECK(mismatches(view_of(c, *f, 2), g, [](std::int64_t p) { return p < 50 ? 12u : 20u; }) == 0);
  CHECK(mismatches(view_of(c, *f, 0), g, 10) == 0);
  const seq_id both[] = {a, *f};
  REQUIRE(c.map_ahead(both, 8).ok());
  REQUIRE(c.sync().ok());
  auto b = c.batch(both, 1);
  REQUIRE(b.ok());
  CHECK(b->k[0] == view_of(c, a, 1).k);
  CHECK(b->k[1] == view_of(c, *f, 1).k);
  REQUIRE(c.close(a).ok());
  REQUIRE(c.close(*f).ok());
  if constexpr (is_vmm<TestType>) CHECK(c.stats().memory.ranges_active == 0);
  CHECK(c.stats().sequences == 0);
}

TEST_CASE("cache: per_sequence ranges map a page crossing once for all layers",
          "[cache][per_sequence]") {
  // 4 layers x 2 heads x 8 f32: 64 bytes per layer row, 256 per slot row.
  for (auto scope : {kvcache::range_scope::per_layer, kvcache::range_scope::per_sequence}) {
    auto cfg = config(4, 2, 2, 8, dtype::f32, 4 * static_cast<std::uint32_t>(ps / 64));
    cfg.ranges = scope;
    auto c = make_cache<host_vmm>(cfg);
    const seq_id a = open_seq(c);
    const std::uint32_t tokens = static_cast<std::uint32_t>(ps / 64) + 1;  // just past a page
    for (std::uint32_t t = 0; t < tokens; ++t)
      for (std::uint32_t l = 0; l < 4; ++l) REQUIRE(append_tokens(c, a, l, 1, 1).ok());
    const auto st = c.stats();
    if (scope == kvcache::range_scope::per_layer) {
      CHECK(st.memory.ranges_active == 8);
      CHECK(st.bytes_backed == 8 * 2 * ps);  // every range: one full page + one partly used
    } else {
      CHECK(st.memory.ranges_active == 2);
      CHECK(st.bytes_backed == 2 * 5 * ps);  // tokens * 256 bytes = 4 pages + 256: 5 pages each
    }
    CHECK(st.bytes_used == std::size_t{tokens} * 4 * 2 * 2 * 8 * 4);
  }
}

TEST_CASE("cache: per_sequence ranges refuse layouts and formats they cannot hold", "[cache][per_sequence]") {
  using kvtest::thrown_code;
  std::string what;
  auto cfg = config(2, 2, 2, 8, dtype::f32, 64, 0, layout::head_major);
  cfg.ranges = kvcache::range_scope::per_sequence;
  CHECK(thrown_code([&] { make_cache<host_vmm>(cfg); }, &what) == errc::invalid_argument);
  CHECK(what.find("token_major") != std::string::npos);
  cfg.order = layout::token_major;
  cfg.geo.type = dtype::f16;
  cfg.geo.head_dim = 64;
  CHECK(thrown_code(
            [&] {
              cache<host_vmm, keep_all, kvcache::kivi_per_token<4>> c(cfg, backend<host_vmm>::make());
            },
            &what) == errc::invalid_argument);
  CHECK(what.find("per_sequence") != std::string::npos);
  cache<host_vmm, keep_all, kvcache::q8_0> ok(cfg, backend<host_vmm>::make());  // in-band scales
  const seq_id s = open_seq(ok);
  std::vector<std::uint16_t> x(2 * 64, 0x3c00);
  const kv_tensor t{x.data(), dtype::f16, 1, 2, 64};
  REQUIRE(ok.append(s, 1, t, t).ok());
  std::vector<float> k(2 * 64), v(2 * 64);
  REQUIRE(kvcache::dequantize_dense(view_of(ok, s, 1), ok.quant(), k.data(), v.data()).ok());
  CHECK(k[0] == Approx(1.0f).epsilon(1e-3));  // q8_0: 127 x fp16(1/127)
  CHECK(v[127] == Approx(1.0f).epsilon(1e-3));
}

TEMPLATE_TEST_CASE("cache: map_ahead covers every range of a format (codes, metadata, residual)",
                   "[cache][map_ahead]", kvcache::passthrough, kvcache::q8_0, kvcache::fp8_e4m3,
                   kvcache::kivi_per_token<4>, (kvcache::kivi<4, 32, 64>)) {
  // 2 layers x 2 kv heads x 64 f16: a 4 KiB page holds 16 fp16 token rows per range.
  auto cfg = config(2, 2, 2, 64, dtype::f16, 512);
  cache<host_vmm, keep_all, TestType> c(cfg, backend<host_vmm>::make(2048));
  const seq_id a = open_seq(c);
  std::vector<std::uint16_t> x(2 * 64);
  std::size_t sync_maps = 0;
  for (std::uint32_t t = 0; t < 300; ++t) {
    for (std::size_t i = 0; i < x.size(); ++i)
      x[i] = kvcache::float_to_half(0.01f * static_cast<float>((t * 7 + i) % 97) - 0.4f);
    const kv_tensor kt{x.data(), dtype::f16, 1, 2, 64};
    const auto before = c.stats().memory.pages_mapped_total;
    for (std::uint32_t l = 0; l < 2; ++l) REQUIRE(c.append(a, l, kt, kt).ok());
    if (t > 0) sync_maps += c.stats().memory.pages_mapped_total - before;
    REQUIRE(c.map_ahead({&a, 1}, 80).ok());
  }
  REQUIRE(c.sync().ok());
  CHECK(sync_maps == 0);
  CHECK(c.stats().memory.pages_mapped_ahead > 0);
}
