// SPDX-License-Identifier: Apache-2.0
//! @file
//! The fuzz driver: decodes bytes into a cache configuration and a sequence of API calls, runs
//! them on `cache<host_vmm, Policy, Quant>` with a small page pool (so exhaustion happens), and
//! aborts when the cache breaks its contract:
//!  - check_invariants() fails after any call;
//!  - a call that returns an error changed state_digest() (errors must leave the cache as it was);
//!  - an error carries no message;
//!  - a stored row changed while its token stayed live (another token's data served: the bug of
//!    slot or page reuse), or passthrough stored something else than what was appended.
//! Out-of-bounds reads and writes, use-after-free and UB are ASan's and UBSan's to report.
//!
//! Input layout: [policy][quant][config bytes...] then ops, each an opcode byte followed by the
//! bytes it reads. A reader past the end yields zeros, so every input is valid.
#pragma once

#include <kvcache/check.hpp>
#include <kvcache/kvcache.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <tuple>
#include <vector>

namespace kvfuzz {

namespace kv = kvcache;

class reader {
 public:
  reader(const std::uint8_t* p, std::size_t n) : p_(p), n_(n) {}
  std::uint8_t u8() { return i_ < n_ ? p_[i_++] : 0; }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  std::uint32_t u32() { return u16() | (std::uint32_t{u16()} << 16); }
  [[nodiscard]] bool done() const { return i_ >= n_; }

 private:
  const std::uint8_t* p_;
  std::size_t n_;
  std::size_t i_ = 0;
};

// splitmix64: bulk data (K/V, probabilities, queries) from one seed byte.
struct rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(next() >> 40) / static_cast<float>(1u << 24);
  }
};

inline std::uint64_t fnv(const void* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

[[noreturn]] inline void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "kvfuzz: %s: %s\n", what, detail.c_str());
  std::fflush(stderr);
  std::abort();
}

//! A hostile float now and then: NaN, +-Inf, huge, denormal, negative zero.
inline float special(std::uint64_t r) {
  switch (r % 6) {
    case 0: return std::numeric_limits<float>::quiet_NaN();
    case 1: return std::numeric_limits<float>::infinity();
    case 2: return -std::numeric_limits<float>::infinity();
    case 3: return 3.0e38f;
    case 4: return 1.0e-42f;
    default: return -0.0f;
  }
}

//! `count` elements of `t`, uniform in [lo, hi), with `specials` hostile values sprinkled in.
inline std::vector<std::byte> make_data(rng& g, std::size_t count, kv::dtype t, float lo, float hi,
                                        std::size_t specials = 0) {
  std::vector<std::byte> buf(count * kv::size_of(t) + 1);  // +1: never a zero-size vector
  for (std::size_t i = 0; i < count; ++i) kv::store_from_float(buf.data(), i, t, g.uniform(lo, hi));
  for (std::size_t j = 0; j < specials && count; ++j)
    kv::store_from_float(buf.data(), g.next() % count, t, special(g.next()));
  return buf;
}

template <class P>
struct policy_traits;

template <class Policy, class Quant>
class driver {
 public:
  // Tiered memory (host_vmm plus a holding tier): everything host_vmm does, and hold/restore.
  using cache_t = kv::cache<kv::tiered<kv::host_vmm>, Policy, Quant>;
  // Token-grouped keys (KIVI) are requantized when their group's window moves or a slot of the
  // group is refilled: only their values stay byte-stable.
  static constexpr bool keys_stable = !kv::quant_token_grouped<Quant>();
  static constexpr bool raw = std::is_same_v<Quant, kv::passthrough>;

  driver(cache_t& c, reader& in) : c_(c), in_(in) {}

  void run() {
    check("construction", kv::status{});
    while (!in_.done()) step();
    // Closing everything must leave a consistent cache too.
    for (const auto& s : ids_)
      if (c_.is_open(s)) check("close (final)", c_.close(s));
  }

 private:
  struct row_key {
    std::uint32_t seq, gen, layer, head;
    std::int32_t pos;
    auto operator<=>(const row_key&) const = default;
  };

  const kv::geometry& geo() const { return c_.geo(); }

  kv::seq_id pick_id() {
    const std::uint8_t b = in_.u8();
    if (b >= 0xF0 || ids_.empty()) {  // a forged handle: random index, random generation
      return kv::seq_id{in_.u8() % 8u, in_.u8() % 4u};
    }
    return ids_[b % ids_.size()];
  }
  std::uint32_t pick_layer() {
    const std::uint8_t b = in_.u8();
    return b >= 0xF8 ? geo().layers + (b & 7u) : b % geo().layers;  // sometimes out of range
  }
  // Token counts: mostly small, sometimes beyond max_tokens or absurd.
  std::uint32_t pick_tokens() {
    const std::uint8_t b = in_.u8();
    if (b < 232) return b % 40u;
    if (b < 240) return b % 4u + 64u;
    if (b == 255) return std::numeric_limits<std::uint32_t>::max();
    return c_.config().max_tokens + (b - 240u);
  }

  // Every call goes through here: invariants hold, errors name what was wrong and change nothing.
  void check(const char* op, const kv::status& st, std::optional<std::uint64_t> before = {}) {
    if (const kv::status inv = kv::check_invariants(c_); !inv)
      fail("invariant broken", std::string("after ") + op + " (" +
                                   (st ? std::string("ok") : st.message()) + "): " + inv.message());
    if (st) return;
    if (st.message().empty()) fail("error without a message", op);
    if (before && *before != kv::state_digest(c_))
      fail("an error changed the cache", std::string(op) + ": " + st.message());
  }

  void step() {
    const std::uint8_t op = in_.u8();
    switch (op % 16) {
      case 0: return do_open();
      case 1: return do_close();
      case 2: return do_fork();
      case 3:
      case 4:
      case 5: return do_append();
      case 6:
      case 7: return do_observe();
      case 8: return do_evict();
      case 9: return do_budget();
      case 10: return do_view();
      case 11: return do_map_ahead();
      case 12: return do_batch();
      case 13: {
        const auto d = kv::state_digest(c_);
        check("sync", c_.sync(), d);
        return;
      }
      case 14: {
        (void)c_.stats();
        (void)c_.memory().reclaim_idle();  // unmaps idle pages only: must not disturb live data
        check("reclaim_idle", kv::status{});
        return verify_all();
      }
      case 15: return do_tier();
      default: return do_append();
    }
  }

  // A whole sequence to the holding tier, or back (a restored sequence holds its rows
  // unchanged), or a prefetch of a tiered policy's next fetches.
  void do_tier() {
    const kv::seq_id s = pick_id();
    const std::uint8_t b = in_.u8();
    const auto d = kv::state_digest(c_);
    if (b % 4 == 0) {
      const std::uint32_t layer = pick_layer();
      const kv::status st = c_.prefetch(s, layer);
      if (st) {  // the copies run on; an error changed nothing
        check("prefetch", st);
      } else {
        check("prefetch", st, d);
      }
      return;
    }
    if (c_.is_held(s)) {
      const kv::status st = c_.restore(s);
      check("restore", st, d);
      if (st) verify_seq(s);
    } else {
      check("hold", c_.hold(s), d);
    }
  }

  void do_open() {
    const std::uint32_t expected = in_.u8() < 200 ? in_.u8() : in_.u32();
    const auto d = kv::state_digest(c_);
    auto r = c_.open(expected);
    check("open", r ? kv::status{} : r.error(), d);
    if (r) ids_.push_back(*r);
  }

  void do_close() {
    const kv::seq_id s = pick_id();
    const auto d = kv::state_digest(c_);
    check("close", c_.close(s), d);
  }

  void do_fork() {
    const kv::seq_id p = pick_id();
    const auto d = kv::state_digest(c_);
    auto r = c_.fork(p);
    check("fork", r ? kv::status{} : r.error(), d);
    if (!r) return;
    ids_.push_back(*r);
    // The child holds the parent's tokens: same rows, same bytes.
    std::vector<std::pair<row_key, std::pair<std::uint64_t, std::uint64_t>>> copy;
    for (auto it = rows_.lower_bound({p.index, p.generation, 0, 0, INT32_MIN});
         it != rows_.end() && it->first.seq == p.index && it->first.gen == p.generation; ++it) {
      row_key k = it->first;
      k.seq = r->index;
      k.gen = r->generation;
      copy.emplace_back(k, it->second);
    }
    for (auto& [k, h] : copy) rows_[k] = h;
    for (std::uint32_t l = 0; l < geo().layers; ++l)  // the child's policy state is the parent's
      if (const auto it = observed_.find({p.index, p.generation, l}); it != observed_.end())
        observed_[{r->index, r->generation, l}] = it->second;
    verify_seq(p);
    verify_seq(*r);
  }

  void do_append() {
    const kv::seq_id s = pick_id();
    const std::uint32_t layer = pick_layer();
    std::uint32_t n = pick_tokens();
    const std::uint8_t mode = in_.u8();
    rng g{in_.u8() * 0x100000001ull + 7};
    const auto& G = geo();
    kv::dtype t = G.type;
    std::uint32_t heads = G.kv_heads, dim = G.head_dim, nv = n;
    std::size_t specials = 0;
    bool null_data = false;
    switch (mode % 24) {  // hostile shapes and values, one at a time
      case 16: heads = heads + 1 + mode / 24 % 3; break;
      case 17: dim = mode / 24 % 2 ? dim / 2 : dim + 1; break;
      case 18: t = static_cast<kv::dtype>((static_cast<int>(t) + 1 + mode / 24 % 2) % 3); break;
      case 19: null_data = true; break;
      case 20: nv = n + 1; break;
      case 21: specials = 1 + mode / 24 % 3; break;
      case 22: heads = 0; break;
      default: break;
    }
    // Buffers hold at most max_tokens tokens: a larger count must be refused before any read.
    const std::uint32_t cap = c_.config().max_tokens;
    const std::size_t kel = std::size_t{std::min(n, cap)} * heads * dim;
    const std::size_t vel = std::size_t{std::min(nv, cap)} * heads * dim;
    const float span = mode / 24 % 4 == 3 ? 60000.0f : 4.0f;
    auto kb = make_data(g, kel, t, -span, span, specials);
    auto vb = make_data(g, vel, t, -span, span, specials);
    const kv::kv_tensor k{null_data ? nullptr : kb.data(), t, n, heads, dim};
    const kv::kv_tensor v{null_data ? nullptr : vb.data(), t, nv, heads, dim};
    const auto before_view = live_view(s, layer);
    const auto d = kv::state_digest(c_);
    const kv::status st = c_.append(s, layer, k, v);
    check("append", st, d);
    if (!st || n == 0) return;
    // Record the rows just written (positions first .. first + n - 1) and check they hold the data.
    const auto vw = c_.view(s, layer);
    if (!vw) fail("view after append", vw.error().message());
    const std::int64_t first = vw->next_position - n;
    if (!before_view || before_view->next_position != first)
      fail("append", "next_position did not advance by the tokens appended");
    const std::size_t hb = G.head_bytes();
    for (std::uint32_t r = 0; r < vw->rows; ++r)
      for (std::uint32_t h = 0; h < G.kv_heads; ++h) {
        const std::int32_t pos = vw->position(r, h);
        if (pos < first) continue;
        const std::size_t i = static_cast<std::size_t>(pos - first);
        if (raw) {  // passthrough stores the appended bytes as they are
          const std::byte* src_k = kb.data() + (i * G.kv_heads + h) * hb;
          const std::byte* src_v = vb.data() + (i * G.kv_heads + h) * hb;
          if (std::memcmp(row_k(*vw, r, h), src_k, hb) || std::memcmp(row_v(*vw, r, h), src_v, hb))
            fail("stored row differs from the appended one",
                 "layer " + std::to_string(layer) + " head " + std::to_string(h) + " position " +
                     std::to_string(pos));
        }
        rows_[{s.index, s.generation, layer, h, pos}] = row_hash(*vw, r, h);
      }
  }

  // Signals: right shapes mostly, wrong ones (and hostile values) by the mode byte.
  void do_observe() {
    const kv::seq_id s = pick_id();
    const std::uint32_t layer = pick_layer();
    const std::uint8_t mode = in_.u8();
    rng g{in_.u8() * 0x1000193ull + 3};
    const auto vw = live_view(s, layer);
    const std::uint32_t rows = vw ? vw->rows : in_.u8();
    const std::int64_t seen = vw ? vw->next_position : in_.u8();
    const auto okey = std::make_tuple(s.index, s.generation, layer);
    const auto last = observed_.find(okey);
    pending_ = seen - (last == observed_.end() ? 0 : last->second);  // appended since the last observe
    auto sig = policy_traits<Policy>::make(*this, g, mode, rows, seen);
    const auto d = kv::state_digest(c_);
    const kv::status st = std::apply(
        [&](const auto&... x) { return c_.observe(s, layer, x...); }, sig.signals());
    check("observe", st, d);
    if (st) observed_[okey] = seen;
  }

  void do_evict() {
    const kv::seq_id s = pick_id();
    const std::uint8_t b = in_.u8();
    const auto d = kv::state_digest(c_);
    if (b & 1) {
      check("evict(all)", c_.evict(s), d);
    } else {
      const std::uint32_t layer = pick_layer();
      const std::uint32_t reserve = b & 2 ? in_.u8() % 8u : (b & 4 ? in_.u32() : 0u);
      check("evict", c_.evict(s, layer, reserve), d);
    }
    if (c_.is_open(s) && !c_.is_held(s)) verify_seq(s);
  }

  std::uint32_t pick_budget() {
    const std::uint8_t b = in_.u8();
    if (b < 200) return b % (c_.config().max_tokens + 1);  // 0 included: refused
    if (b < 250) return c_.config().max_tokens + (b - 199);
    return b == 255 ? std::numeric_limits<std::uint32_t>::max() : in_.u32();
  }

  void do_budget() {
    const std::uint8_t b = in_.u8();
    const auto d = kv::state_digest(c_);
    switch (b % 3) {
      case 0: check("set_budget", c_.set_budget(pick_budget()), d); break;
      case 1: {
        const std::uint32_t layer = pick_layer();
        check("set_budget(layer)", c_.set_budget(layer, pick_budget()), d);
        break;
      }
      default: {
        const std::uint32_t layer = pick_layer();
        std::uint32_t n = geo().kv_heads;
        if (b / 3 % 4 == 3) n = in_.u8() % 6u;  // wrong count
        std::vector<std::uint32_t> per(n + 1);
        for (std::uint32_t i = 0; i < n; ++i) per[i] = pick_budget();
        check("set_budget(per head)",
              c_.set_budget(layer, std::span<const std::uint32_t>(per.data(), n)), d);
      }
    }
  }

  void do_view() {
    const kv::seq_id s = pick_id();
    const std::uint32_t layer = pick_layer();
    const auto d = kv::state_digest(c_);
    auto r = c_.view(s, layer);
    check("view", r ? kv::status{} : r.error(), d);
    if (r) touch(*r);
    if (c_.is_open(s) && !c_.is_held(s)) verify_seq(s);
  }

  void do_batch() {
    std::vector<kv::seq_id> seqs(in_.u8() % 4u);
    for (auto& s : seqs) s = pick_id();
    const std::uint32_t layer = pick_layer();
    const auto d = kv::state_digest(c_);
    auto r = c_.batch(seqs, layer);
    check("batch", r ? kv::status{} : r.error(), d);
    if (!r) return;
    if (r->rows.size() != seqs.size()) fail("batch", "one entry per sequence expected");
    for (std::size_t i = 0; i < seqs.size(); ++i) {  // the batch agrees with each layer view
      const auto one = c_.view(seqs[i], layer);
      if (!one || one->rows != r->rows[i] || one->k != r->k[i] || one->v != r->v[i])
        fail("batch", "entry " + std::to_string(i) + " disagrees with view()");
    }
  }

  void do_map_ahead() {
    std::vector<kv::seq_id> seqs(in_.u8() % 4u);
    for (auto& s : seqs) s = pick_id();
    const std::uint32_t steps = in_.u8() % 40u;
    const std::size_t max_pages = in_.u8() % 4u;
    const auto d = kv::state_digest(c_);
    const kv::status st = c_.map_ahead(seqs, steps, max_pages);
    // Success starts background work that changes the mapping; only an error must change nothing
    // (state_digest waits for the background step, as every observer does).
    check("map_ahead", st, d);
  }

  // ---- row bookkeeping ----------------------------------------------------------------------

  std::optional<kv::layer_view> live_view(kv::seq_id s, std::uint32_t layer) {
    if (!c_.is_open(s) || c_.is_held(s) || layer >= geo().layers) return std::nullopt;
    auto r = c_.view(s, layer);
    if (!r) fail("view of an open sequence", r.error().message());
    return *r;
  }
  static const std::byte* row_k(const kv::layer_view& v, std::uint32_t r, std::uint32_t h) {
    return v.k + std::size_t{r} * v.slot_stride + std::size_t{h} * v.head_stride;
  }
  static const std::byte* row_v(const kv::layer_view& v, std::uint32_t r, std::uint32_t h) {
    return v.v + std::size_t{r} * v.slot_stride + std::size_t{h} * v.head_stride;
  }
  std::pair<std::uint64_t, std::uint64_t> row_hash(const kv::layer_view& v, std::uint32_t r,
                                                   std::uint32_t h) const {
    std::uint64_t kh = 0, vh = fnv(row_v(v, r, h), v.row_bytes);
    if constexpr (keys_stable) kh = fnv(row_k(v, r, h), v.row_bytes);
    if (v.scale_bytes) {  // per-row metadata (KIVI value scales): as stable as the codes
      vh ^= fnv(v.v_scales + std::size_t{r} * v.scale_slot_stride + std::size_t{h} * v.scale_head_stride,
                v.scale_bytes) * 31;
      if constexpr (keys_stable)
        kh ^= fnv(v.k_scales + std::size_t{r} * v.scale_slot_stride +
                      std::size_t{h} * v.scale_head_stride,
                  v.scale_bytes) * 31;
    }
    return {kh, vh};
  }
  // Reads every byte a kernel may read through the view (ASan/SEGV if any is not mapped).
  void touch(const kv::layer_view& v) {
    volatile unsigned char sink = 0;
    for (std::uint32_t r = 0; r < v.rows; ++r)
      for (std::uint32_t h = 0; h < v.kv_heads; ++h) {
        sink = sink ^ static_cast<unsigned char>(fnv(row_k(v, r, h), v.row_bytes));
        sink = sink ^ static_cast<unsigned char>(fnv(row_v(v, r, h), v.row_bytes));
      }
    (void)sink;
  }
  // Every live row of every layer still holds the bytes recorded when its token was appended.
  void verify_seq(kv::seq_id s) {
    for (std::uint32_t l = 0; l < geo().layers; ++l) {
      const auto v = live_view(s, l);
      if (!v) fail("verify", "sequence not open");
      for (std::uint32_t r = 0; r < v->rows; ++r)
        for (std::uint32_t h = 0; h < geo().kv_heads; ++h) {
          const std::int32_t pos = v->position(r, h);
          if (pos < 0) continue;
          const auto it = rows_.find({s.index, s.generation, l, h, pos});
          if (it == rows_.end())
            fail("unknown live token", "layer " + std::to_string(l) + " head " +
                                           std::to_string(h) + " position " + std::to_string(pos));
          if (it->second != row_hash(*v, r, h))
            fail("a live row changed (another token's data?)",
                 "sequence " + std::to_string(s.index) + " layer " + std::to_string(l) + " head " +
                     std::to_string(h) + " position " + std::to_string(pos) + " slot " +
                     std::to_string(r));
        }
    }
  }
  void verify_all() {
    for (const auto& s : ids_)
      if (c_.is_open(s) && !c_.is_held(s)) verify_seq(s);
  }

  template <class>
  friend struct policy_traits;

  cache_t& c_;
  reader& in_;
  std::vector<kv::seq_id> ids_;  // every id handed out, closed ones included (stale handles)
  // per (sequence, generation, layer): tokens appended when it was last observed, and for the
  // observe being built, the tokens appended since (signals of the last append: sentence_kv)
  std::map<std::tuple<std::uint32_t, std::uint32_t, std::uint32_t>, std::int64_t> observed_;
  std::int64_t pending_ = 0;
  std::map<row_key, std::pair<std::uint64_t, std::uint64_t>> rows_;
};

// ---- signals per policy ---------------------------------------------------------------------

struct no_signals {
  std::tuple<> signals() const { return {}; }
};

// attention_signal / attention_sum_signal: probabilities `[query_heads][queries][slots]`.
struct attention_maker {
  std::vector<float> buf;
  std::uint32_t qh = 0, q = 0, slots = 0;
  bool null = false;
  void build(rng& g, std::uint8_t mode, std::uint32_t query_heads, std::uint32_t rows,
             std::uint32_t queries) {
    qh = query_heads;
    slots = rows;
    q = queries;
    switch (mode % 16) {
      case 10: qh = qh + 1; break;
      case 11: slots = slots + 1 + mode / 16 % 3; break;
      case 12: slots = slots ? slots - 1 : 0; break;
      case 13: q = 0; break;
      case 14: null = true; break;
      default: break;
    }
    buf.assign(std::size_t{qh} * std::max(q, 1u) * slots + 1, 0.0f);
    for (auto& x : buf) x = g.uniform(0.0f, 1.0f);
    if (mode % 16 == 15 && buf.size() > 1) buf[g.next() % (buf.size() - 1)] = special(g.next());
  }
};

struct query_maker {
  std::vector<std::byte> buf;
  kv::query_signal sig;
  void build(rng& g, std::uint8_t mode, const kv::geometry& geo, std::uint32_t queries) {
    sig.type = mode / 16 % 4 == 3 ? kv::dtype::f16 : kv::dtype::f32;
    if (mode / 16 % 4 == 2) sig.type = kv::dtype::bf16;
    sig.queries = queries;
    buf = make_data(g, std::size_t{queries} * geo.query_heads * geo.head_dim, sig.type, -3.0f, 3.0f,
                    mode % 16 == 9 ? 1 : 0);
    sig.data = mode % 16 == 8 ? nullptr : buf.data();
  }
};

inline std::uint32_t pick_queries(rng& g, std::uint8_t mode, std::int64_t seen) {
  // mostly within what was appended; sometimes more (refused)
  const std::uint32_t s = static_cast<std::uint32_t>(std::min<std::int64_t>(seen, 64));
  if (mode % 16 == 7) return s + 1 + static_cast<std::uint32_t>(g.next() % 3);
  return s ? 1 + static_cast<std::uint32_t>(g.next() % s) : 1;
}

template <>
struct policy_traits<kv::keep_all> {
  template <class D>
  static no_signals make(D&, rng&, std::uint8_t, std::uint32_t, std::int64_t) { return {}; }
};
template <>
struct policy_traits<kv::sink_window> : policy_traits<kv::keep_all> {};

template <>
struct policy_traits<kv::heavy_hitter<kv::attention_signal>> {
  struct sig_t {
    attention_maker a;
    std::tuple<kv::attention_signal> signals() const {
      return {kv::attention_signal{a.null ? nullptr : a.buf.data(), a.qh, a.q, a.slots}};
    }
  };
  template <class D>
  static sig_t make(D& d, rng& g, std::uint8_t mode, std::uint32_t rows, std::int64_t) {
    sig_t s;
    s.a.build(g, mode, d.geo().query_heads, rows, 1 + static_cast<std::uint32_t>(g.next() % 3));
    return s;
  }
};

template <>
struct policy_traits<kv::heavy_hitter<kv::attention_sum_signal>> {
  struct sig_t {
    attention_maker a;
    std::tuple<kv::attention_sum_signal> signals() const {
      return {kv::attention_sum_signal{a.null ? nullptr : a.buf.data(), a.qh, a.slots}};
    }
  };
  template <class D>
  static sig_t make(D& d, rng& g, std::uint8_t mode, std::uint32_t rows, std::int64_t) {
    sig_t s;
    s.a.build(g, mode == 13 ? 0 : mode, d.geo().query_heads, rows, 1);
    return s;
  }
};

template <>
struct policy_traits<kv::snapkv<kv::query_signal>> {
  struct sig_t {
    query_maker q;
    std::tuple<kv::query_signal> signals() const { return {q.sig}; }
  };
  template <class D>
  static sig_t make(D& d, rng& g, std::uint8_t mode, std::uint32_t, std::int64_t seen) {
    sig_t s;
    s.q.build(g, mode, d.geo(), pick_queries(g, mode, seen));
    return s;
  }
};

template <>
struct policy_traits<kv::snapkv<kv::attention_signal>> {
  struct sig_t {
    attention_maker a;
    std::tuple<kv::attention_signal> signals() const {
      return {kv::attention_signal{a.null ? nullptr : a.buf.data(), a.qh, a.q, a.slots}};
    }
  };
  template <class D>
  static sig_t make(D& d, rng& g, std::uint8_t mode, std::uint32_t rows, std::int64_t seen) {
    sig_t s;
    s.a.build(g, mode, d.geo().query_heads, rows, pick_queries(g, mode, seen));
    return s;
  }
};

template <>
struct policy_traits<kv::scale_aware> {
  struct sig_t {
    std::vector<std::uint32_t> ids;
    kv::scale_signal sc;
    query_maker q;
    std::tuple<kv::scale_signal, kv::query_signal> signals() const { return {sc, q.sig}; }
  };
  template <class D>
  static sig_t make(D& d, rng& g, std::uint8_t mode, std::uint32_t, std::int64_t seen) {
    sig_t s;
    // the tokens of the last append, split into scales of growing grids (1, 4, 9, ... tokens)
    const std::uint32_t tokens = pick_queries(g, mode, seen);
    s.ids.resize(tokens + 1);
    std::uint32_t scale = static_cast<std::uint32_t>(g.next() % 3), left = 1;
    for (std::uint32_t i = 0; i < tokens; ++i) {
      s.ids[i] = scale;
      if (--left == 0) {
        ++scale;
        left = scale * scale + 1;
      }
    }
    if (mode % 16 == 6 && tokens) s.ids[g.next() % tokens] = 0xFFFFFFF0u;  // absurd scale id
    const std::uint32_t side = static_cast<std::uint32_t>(g.next() % 5);
    s.sc = kv::scale_signal{mode % 16 == 5 ? nullptr : s.ids.data(), tokens, side, side};
    if (mode % 16 == 4) s.sc.grid_w = side + 1;  // grid not matching the scale's tokens
    s.q.build(g, mode, d.geo(), mode % 16 == 3 ? tokens + 1 : tokens);
    return s;
  }
};


// sentence_kv: queries, keys and boundary flags of the tokens appended since the last observe.
template <>
struct policy_traits<kv::sentence_kv> {
  struct sig_t {
    query_maker q, k;
    std::vector<std::uint8_t> flags;
    kv::boundary_signal b;
    std::tuple<kv::query_signal, kv::key_signal, kv::boundary_signal> signals() const {
      return {q.sig, kv::key_signal{k.sig.data, k.sig.type, k.sig.queries}, b};
    }
  };
  template <class D>
  static sig_t make(D& d, rng& g, std::uint8_t mode, std::uint32_t, std::int64_t) {
    sig_t s;
    std::uint32_t n = static_cast<std::uint32_t>(std::clamp<std::int64_t>(d.pending_, 0, 4096));
    if (mode % 16 == 7) n += 1 + static_cast<std::uint32_t>(g.next() % 3);  // more than appended
    s.q.build(g, mode, d.geo(), n);
    kv::geometry kg = d.geo();  // keys: [tokens][kv_heads][head_dim], one row per "query head"
    kg.query_heads = kg.kv_heads;
    s.k.build(g, mode % 16 == 8 || mode % 16 == 9 ? 0 : mode, kg, mode % 16 == 6 ? n + 1 : n);
    s.flags.resize(n + 1);
    for (auto& f : s.flags) f = g.next() % 5 == 0;
    s.b = kv::boundary_signal{mode % 16 == 5 ? nullptr : s.flags.data(), mode % 16 == 4 ? n + 1 : n};
    return s;
  }
};

// ---- setup: cache configuration, policy and quantizer from the first bytes -----------------

struct setup {
  kv::cache_config cfg;
  kv::host_vmm_config mem;
  std::uint8_t policy = 0, p1 = 0, p2 = 0, qparam = 0;
};

//! The first bytes: small shapes, a small pool (4 KiB .. 64 KiB pages, 2 .. 49 of them).
inline setup decode_setup(reader& in) {
  setup s;
  s.policy = in.u8();
  in.u8();  // the quantizer index, read by the caller
  auto& g = s.cfg.geo;
  g.layers = 1 + in.u8() % 3u;
  g.kv_heads = 1 + in.u8() % 3u;
  g.query_heads = g.kv_heads * (1 + in.u8() % 2u);
  const std::uint8_t hd = in.u8();
  g.head_dim = hd % 8 < 5 ? 32 : hd % 8 < 7 ? 64 : 1 + hd / 8u;  // sometimes one formats refuse
  g.type = static_cast<kv::dtype>(in.u8() % 3);
  s.cfg.max_tokens = 1 + in.u8();
  s.cfg.budget = in.u8() % (s.cfg.max_tokens + 1);
  const std::uint8_t lay = in.u8();
  s.cfg.order = lay % 4 == 3 ? kv::layout::head_major : kv::layout::token_major;
  s.cfg.ranges = lay / 4 % 4 == 3 ? kv::range_scope::per_sequence : kv::range_scope::per_layer;
  static constexpr std::size_t pages[] = {4096, 16384, 65536};
  s.mem.page_size = pages[lay / 16 % 3];
  s.mem.deferred_reclamation = lay / 64 % 2 == 0;
  s.mem.pool_pages = 2 + in.u8() % 48u;
  s.p1 = in.u8();
  s.p2 = in.u8();
  s.qparam = in.u8();
  return s;
}

template <class Q>
Q make_quant(std::uint8_t) {
  return Q{};
}
template <>
inline kv::fp8_e4m3 make_quant<kv::fp8_e4m3>(std::uint8_t b) {
  return kv::fp8_e4m3(b & 1 ? kv::scale_granularity::per_head : kv::scale_granularity::per_layer);
}

// Construction may raise (a refused configuration: it must say why); the calls after it must
// not (errors are returned), so the driver runs outside the try.
template <class Policy, class Quant, class Make>
void run_one(const setup& s, reader& in, Make make_policy) {
  using cache_t = typename driver<Policy, Quant>::cache_t;
  std::optional<cache_t> c;
  // a holding tier of 8 KiB now and then: hold() must refuse cleanly when it is full
  const std::size_t holding = s.qparam & 0x10 ? 8192 : kv::host_holding::unlimited;
  try {
    c.emplace(s.cfg, kv::tiered<kv::host_vmm>(kv::host_vmm(s.mem), kv::host_holding(holding)),
              make_policy(), make_quant<Quant>(s.qparam));
  } catch (const kv::error& e) {
    if (std::string(e.what()).empty()) fail("construction", "error without a message");
    return;
  }
  driver<Policy, Quant>(*c, in).run();
}

//! Every policy (and signal source) over one quantizer.
template <class Quant>
void run_quant(const setup& s, reader& in) {
  const std::uint8_t a = s.p1, b = s.p2;
  if (s.policy >= 224) {  // sentence_kv (tiered: per-row formats only)
    if constexpr (!kv::quant_token_grouped<Quant>()) {
      kv::sentence_kv_config sc;
      sc.start = a % 5u;
      sc.recent = b % 5u;
      sc.length_threshold = a / 8u % 2u;
      sc.semantic_factor = a / 16u % 3u;  // 0 is refused
      sc.snap.window = b / 8u % 6u;       // 0 is refused
      sc.snap.kernel = 1 + b / 64u % 3u;
      sc.max_sentence_tokens = a / 64u * 3u;
      sc.prefetch_rows = b % 7u;
      return run_one<kv::sentence_kv, Quant>(s, in, [&] { return kv::sentence_kv(sc); });
    }
  }
  switch (s.policy % 7) {
    case 0: return run_one<kv::keep_all, Quant>(s, in, [] { return kv::keep_all{}; });
    case 1:
      return run_one<kv::sink_window, Quant>(s, in, [&] { return kv::sink_window(a % 9u); });
    case 2:
    case 3: {
      kv::heavy_hitter_config hc;
      if (a & 1) {  // absolute counts
        hc.heavy = a / 2u % 16u;
        hc.recent = b % 16u;
      } else {
        hc.heavy_ratio = static_cast<float>(a % 64u) / 64.0f;
        hc.recent_ratio = static_cast<float>(b % 64u) / 64.0f;
      }
      if (s.policy % 7 == 2)
        return run_one<kv::heavy_hitter<kv::attention_signal>, Quant>(
            s, in, [&] { return kv::heavy_hitter<kv::attention_signal>(hc); });
      return run_one<kv::heavy_hitter<kv::attention_sum_signal>, Quant>(
          s, in, [&] { return kv::heavy_hitter<kv::attention_sum_signal>(hc); });
    }
    case 4:
    case 5: {
      kv::snapkv_config sc;
      sc.window = a % 12u;  // 0 is refused
      sc.kernel = 1 + b % 7u;
      sc.pool = b & 0x80 ? kv::pooling::avg : kv::pooling::max;
      if (s.policy % 7 == 4)
        return run_one<kv::snapkv<kv::query_signal>, Quant>(
            s, in, [&] { return kv::snapkv<kv::query_signal>(sc); });
      return run_one<kv::snapkv<kv::attention_signal>, Quant>(
          s, in, [&] { return kv::snapkv<kv::attention_signal>(sc); });
    }
    default: {
      kv::scale_aware_config sc;
      sc.window = a % 20u;  // 0 is refused
      sc.kernel = 1 + b % 5u;
      sc.softmax = b & 0x40;
      sc.base_capacity = 1 + (a * 7u + b) % 64u;
      sc.scales = 2 + b / 8u % 12u;
      return run_one<kv::scale_aware, Quant>(s, in, [&] { return kv::scale_aware(sc); });
    }
  }
}

}  // namespace kvfuzz
