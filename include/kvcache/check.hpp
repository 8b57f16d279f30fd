// SPDX-License-Identifier: Apache-2.0
//! @file
//! The invariant checker and the state digest of a `cache` (docs/RELIABILITY.md, Invariants).
//!
//! - `check_invariants(c)`: ok, or `errc::invariant_violation` naming the first broken invariant
//!   and where (sequence, layer, head, slot, range, page). It walks everything: every slot table,
//!   every policy state, every live entry decoded, the memory backend's page bookkeeping.
//! - `state_digest(c)`: a 64-bit hash of everything an engine can observe (open sequence ids,
//!   positions, K/V bytes and scales of live entries, policy scores, budgets, cache and memory
//!   gauges). Tests compare it before and after a call that failed: it must not move.
//! - With `KVCACHE_CHECK_INVARIANTS` defined (for the whole program: it changes inline function
//!   bodies), every mutating call of the cache ends with a check of what it touched (that
//!   sequence, the memory backend, budgets after evict) and aborts, printing the violation, if it
//!   fails: a violation is a bug in kvcache, never bad input. Without it the check costs nothing.
//!
//! Both functions read the whole cache: no other thread may mutate it meanwhile.
//! This header does not include cache.hpp (cache.hpp includes it); the templates reach the
//! cache's internals through `detail::cache_access`, which the cache befriends.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/slot_table.hpp>
#include <kvcache/core/view.hpp>
#include <kvcache/evict/policy.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/quant/dense.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

namespace detail {

struct test_access;  // defined only by tests (a peer that may break invariants on purpose)

//! 64-bit FNV-1a over the bytes fed, each value prefixed by its size so that fields cannot
//! slide into each other.
class digest_builder {
 public:
  void bytes(const void* p, std::size_t n) noexcept {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h_ = (h_ ^ b[i]) * 0x100000001b3ull;
  }
  template <class T>
  void value(const T& v) noexcept {
    static_assert(std::is_trivially_copyable_v<T>);
    bytes(&v, sizeof v);
  }
  template <class T>
  void range(const T* p, std::size_t n) noexcept {
    value(n);
    if (n) bytes(p, n * sizeof(T));
  }
  [[nodiscard]] std::uint64_t get() const noexcept { return h_; }

 private:
  std::uint64_t h_ = 0xcbf29ce484222325ull;
};

// Optional backend members, used where a backend has them.
template <class M>
concept backend_self_check = requires(const M& m) {
  { m.check() } -> std::same_as<status>;
};
template <class M>
concept backend_knows_active = requires(const M& m, range_id r) {
  { m.active(r) } -> std::same_as<bool>;
};
template <class M>
concept backend_knows_backed = requires(const M& m, range_id r, std::size_t n) {
  { m.backed(r, n, n) } -> std::same_as<bool>;
};

template <class P>
inline constexpr bool policy_never_evicts = requires { requires static_cast<bool>(P::never_evicts); };

inline status violation(const std::string& where, const std::string& what) {
  return {errc::invariant_violation, "invariant violated: " + where + ": " + what};
}

//! A slot table against its sequence: the frontier bounds the rows, every slot below a head's
//! frontier is live or a hole (exactly one), holes are listed once, positions are in
//! [0, next) and appear at most once per head, and counts agree.
inline status check_slot_table(const slot_table& t, std::uint32_t heads, std::uint32_t capacity,
                               std::int64_t next, const std::string& at) {
  if (t.heads() != heads || t.capacity() != capacity)
    return violation(at, "slot table for " + std::to_string(t.heads()) + " heads x " +
                             std::to_string(t.capacity()) + " slots, expected " +
                             std::to_string(heads) + " x " + std::to_string(capacity));
  std::uint32_t top = 0;
  for (std::uint32_t h = 0; h < heads; ++h) top = std::max(top, t.frontier(h));
  if (t.rows() != top || top > capacity)
    return violation(at, "rows " + std::to_string(t.rows()) + " but the highest frontier is " +
                             std::to_string(top) + " (capacity " + std::to_string(capacity) + ")");
  std::vector<std::uint8_t> hole;
  std::vector<std::int32_t> seen_pos;
  for (std::uint32_t h = 0; h < heads; ++h) {
    const auto ah = [&] { return at + " head " + std::to_string(h); };  // only on failure
    const std::uint32_t f = t.frontier(h);
    hole.assign(f, 0);
    for (std::uint32_t s : t.holes(h)) {
      if (s >= f) return violation(ah(), "hole " + std::to_string(s) + " at or above the frontier " + std::to_string(f));
      if (hole[s]++) return violation(ah(), "slot " + std::to_string(s) + " listed as a hole twice");
      if (t.position(s, h) != slot_table::empty)
        return violation(ah(), "slot " + std::to_string(s) + " is a hole but holds position " +
                                 std::to_string(t.position(s, h)));
    }
    seen_pos.clear();
    for (std::uint32_t s = 0; s < t.rows(); ++s) {
      const std::int32_t p = t.position(s, h);
      if (p == slot_table::empty) {
        if (s < f && !hole[s])
          return violation(ah(), "slot " + std::to_string(s) + " below the frontier is empty but not a hole (lost)");
        continue;
      }
      if (s >= f)
        return violation(ah(), "slot " + std::to_string(s) + " above the frontier " + std::to_string(f) +
                                 " holds position " + std::to_string(p));
      if (p < 0 || p >= next)
        return violation(ah(), "slot " + std::to_string(s) + " holds position " + std::to_string(p) +
                                 ", outside the " + std::to_string(next) + " appended");
      seen_pos.push_back(p);
    }
    if (seen_pos.size() != t.live(h))
      return violation(ah(), "live count " + std::to_string(t.live(h)) + " but " +
                               std::to_string(seen_pos.size()) + " slots hold a position");
    if (t.live(h) + t.holes(h).size() != f)
      return violation(ah(), std::to_string(t.live(h)) + " live + " + std::to_string(t.holes(h).size()) +
                               " holes != frontier " + std::to_string(f));
    std::sort(seen_pos.begin(), seen_pos.end());
    const auto dup = std::adjacent_find(seen_pos.begin(), seen_pos.end());
    if (dup != seen_pos.end())
      return violation(ah(), "position " + std::to_string(*dup) + " is held by two slots");
  }
  return {};
}

//! Per-(head, slot) scores of a policy state (H2O's `acc`, SnapKV/ScaleKV `score`): one vector
//! per head, covering every row, no NaN on a live slot.
inline status check_scores(const std::vector<std::vector<float>>& v, const slot_table& t,
                           const char* name, const std::string& at) {
  if (v.size() != t.heads())
    return violation(at, std::string("policy ") + name + " for " + std::to_string(v.size()) +
                             " heads, expected " + std::to_string(t.heads()));
  for (std::uint32_t h = 0; h < t.heads(); ++h) {
    if (t.rows() > 0 && v[h].size() < t.rows())
      return violation(at + " head " + std::to_string(h),
                       std::string("policy ") + name + " sized " + std::to_string(v[h].size()) +
                           " for " + std::to_string(t.rows()) + " slots");
    for (std::uint32_t s = 0; s < t.rows(); ++s)
      if (t.position(s, h) != slot_table::empty && std::isnan(v[h][s]))
        return violation(at + " head " + std::to_string(h) + " slot " + std::to_string(s),
                         std::string("policy ") + name + " is NaN");
  }
  return {};
}

//! What can be checked of a policy state, found by the fields the shipped policies use.
template <class Policy, class State>
status check_policy_state(const Policy& policy, const State& st, const slot_table& t,
                          const std::string& at) {
  if constexpr (requires { { st.acc } -> std::convertible_to<const std::vector<std::vector<float>>&>; })
    KVCACHE_TRY(check_scores(st.acc, t, "accumulated attention", at));
  if constexpr (requires { { st.score } -> std::convertible_to<const std::vector<std::vector<float>>&>; })
    KVCACHE_TRY(check_scores(st.score, t, "scores", at));
  if constexpr (requires { st.fifo[0].size(); st.fifo.size(); }) {  // sink_window's eviction order
    if (st.fifo.size() != t.heads())
      return violation(at, "policy queue for " + std::to_string(st.fifo.size()) + " heads");
    std::vector<std::uint8_t> listed;
    for (std::uint32_t h = 0; h < t.heads(); ++h) {
      const auto ah = [&] { return at + " head " + std::to_string(h); };
      listed.assign(t.rows(), 0);
      for (std::uint32_t s : st.fifo[h]) {
        if (s >= t.rows() || t.position(s, h) == slot_table::empty)
          return violation(ah(), "policy queue names slot " + std::to_string(s) + ", which is not live");
        if (listed[s]++) return violation(ah(), "policy queue names slot " + std::to_string(s) + " twice");
      }
      if constexpr (requires { { policy.sinks() } -> std::convertible_to<std::uint32_t>; }) {
        std::uint32_t sinks = 0;  // live sinks are never queued
        for (std::uint32_t s = 0; s < t.rows(); ++s) {
          const std::int32_t p = t.position(s, h);
          sinks += p != slot_table::empty && static_cast<std::uint32_t>(p) < policy.sinks();
        }
        if (st.fifo[h].size() + sinks != t.live(h))
          return violation(ah(), "policy queue holds " + std::to_string(st.fifo[h].size()) + " slots + " +
                                   std::to_string(sinks) + " sinks, but " + std::to_string(t.live(h)) +
                                   " are live");
      }
    }
  }
  return {};
}

template <class State>
void digest_policy_state(digest_builder& d, const State& st) {
  auto nested = [&](const auto& vv) {
    d.value(vv.size());
    for (const auto& v : vv) d.range(v.data(), v.size());
  };
  if constexpr (requires { st.acc[0].data(); }) nested(st.acc);
  if constexpr (requires { st.score[0].data(); }) nested(st.score);
  if constexpr (requires { st.fifo[0].size(); }) {
    d.value(st.fifo.size());
    for (const auto& q : st.fifo) {
      d.value(q.size());
      for (auto s : q) d.value(s);
    }
  }
  if constexpr (requires { st.scale_of.data(); }) d.range(st.scale_of.data(), st.scale_of.size());
  if constexpr (requires { st.obs.data(); }) d.range(st.obs.data(), st.obs.size());
  if constexpr (requires { d.value(st.next); }) d.value(st.next);
  if constexpr (requires { d.value(st.prompt); }) d.value(st.prompt);
  if constexpr (requires { d.value(st.window_start); }) d.value(st.window_start);
  if constexpr (requires { d.value(st.scored); }) d.value(st.scored);
  if constexpr (requires { d.value(st.cap); }) d.value(st.cap);
}

//! The cache's internals, for check_invariants, state_digest and the per-call check.
struct cache_access {
  //! Everything: every open sequence in full (decoding live entries), the record table, range
  //! ownership against the backend, budgets, shared scales, the backend's own check.
  template <class C>
  static status check_all(const C& c) {
    const auto& reg = c.reg_;
    std::size_t open = 0;
    std::vector<range_id> owned;
    std::vector<std::uint8_t> freed(reg.recs.size(), 0);
    for (std::uint32_t i : reg.free) {
      if (i >= reg.recs.size() || reg.recs[i].open.load())
        return violation("sequence table", "free list names record " + std::to_string(i) + ", which is open");
      if (freed[i]++) return violation("sequence table", "record " + std::to_string(i) + " freed twice");
    }
    for (std::uint32_t i = 0; i < reg.recs.size(); ++i) {
      const auto& rec = reg.recs[i];
      if (!rec.open.load()) {
        if (!freed[i]) return violation("sequence table", "closed record " + std::to_string(i) + " is not reusable (leaked)");
        if (!rec.layers.empty())
          return violation("sequence " + std::to_string(i), "closed but still holds layers");
        continue;
      }
      ++open;
      KVCACHE_TRY(check_sequence(c, i, all_layers, /*decode=*/true));
      for (const auto& L : rec.layers) {
        if (L.stage != no_range) owned.push_back(L.stage);
        if (L.off != 0) continue;  // layers > 0 of shared ranges: layer 0 owns them
        const range_id rs[] = {L.k, L.v, L.ks, L.vs, L.kr};  // (nvcc takes no braced list here)
        for (range_id r : rs)
          if (r != no_range) owned.push_back(r);
      }
    }
    if (open != reg.open.load())
      return violation("sequence table", "counts " + std::to_string(reg.open.load()) + " open sequences, " +
                                             std::to_string(open) + " records are open");
    std::sort(owned.begin(), owned.end());
    if (const auto d = std::adjacent_find(owned.begin(), owned.end()); d != owned.end())
      return violation("memory", "range " + std::to_string(*d) + " is owned by two (sequence, layer, K|V) slots");
    const memory_stats ms = c.memory_.stats();
    if (ms.ranges_active != owned.size())
      return violation("memory", std::to_string(ms.ranges_active) + " active ranges but the open sequences own " +
                                     std::to_string(owned.size()) + (ms.ranges_active > owned.size() ? " (leaked)" : ""));
    KVCACHE_TRY(check_memory(c));
    const auto& cfg = c.cfg_;
    for (std::uint32_t l = 0; l < cfg.geo.layers; ++l) {
      if (c.budget_[l] == 0 || c.budget_[l] > cfg.max_tokens)
        return violation("layer " + std::to_string(l), "budget " + std::to_string(c.budget_[l]) +
                                                           " outside [1, " + std::to_string(cfg.max_tokens) + "]");
      for (std::uint32_t h = 0; h < cfg.geo.kv_heads && !c.head_budget_.empty(); ++h)
        if (c.head_budget_[std::size_t{l} * cfg.geo.kv_heads + h] > cfg.max_tokens)
          return violation("layer " + std::to_string(l) + " head " + std::to_string(h), "budget above max_tokens");
      const kv_part parts[] = {kv_part::k, kv_part::v};
      for (kv_part part : parts) {  // scales the quantizer holds (fp8)
        const float* sc = quant_shared_scales(c.quant_, l, part);
        if (!sc) continue;
        const std::size_t stride = quant_shared_scale_head_stride(c.quant_);
        const std::uint32_t n = stride ? cfg.geo.kv_heads : 1;
        for (std::uint32_t h = 0; h < n; ++h) {
          float x;
          std::memcpy(&x, reinterpret_cast<const std::byte*>(sc) + h * stride, sizeof x);
          if (!std::isfinite(x))
            return violation("layer " + std::to_string(l) + (part == kv_part::k ? " K" : " V") + " head " +
                                 std::to_string(h),
                             "shared quantization scale is not finite");
        }
      }
    }
    return {};
  }

  static constexpr std::uint32_t all_layers = ~std::uint32_t{0};

  template <class C>
  static status check_memory(const C& c) {
    if constexpr (C::has_tiers) KVCACHE_TRY(c.memory_.holding().check());
    if constexpr (backend_self_check<typename C::memory_type>) return c.memory_.check();
    else return {};
  }

  //! One open sequence (record `i`): layers, slot tables, policy states, ranges and their
  //! backing, and (with `decode`) that every live entry decodes to finite values.
  template <class C>
  static status check_sequence(const C& c, std::uint32_t i, std::uint32_t only_layer, bool decode) {
    using Q = typename C::quantizer_type;
    const auto& rec = c.reg_.recs[i];
    const auto& cfg = c.cfg_;
    const auto& g = cfg.geo;
    const std::string where = "sequence " + std::to_string(i) + "/" + std::to_string(rec.generation.load());
    if (rec.layers.size() != g.layers)
      return violation(where, std::to_string(rec.layers.size()) + " layers, expected " + std::to_string(g.layers));
    std::vector<float> row(g.head_dim);
    for (std::uint32_t l = 0; l < g.layers; ++l) {
      if (only_layer != all_layers && l != only_layer) continue;
      const auto& L = rec.layers[l];
      const std::string at = where + " layer " + std::to_string(l);
      if (L.layer != l) return violation(at, "record says layer " + std::to_string(L.layer));
      KVCACHE_TRY(check_slot_table(L.table, g.kv_heads, cfg.max_tokens, L.seen, at));
      KVCACHE_TRY(check_policy_state(c.policy_, L.state, L.table, at));
      if (rec.held) {  // in the holding tier: no working-tier range until restore()
        const range_id rs[] = {L.k, L.v, L.ks, L.vs, L.kr, L.stage};
        for (range_id r : rs)
          if (r != no_range) return violation(at, "held in the holding tier but owns range " + std::to_string(r));
        continue;
      }
      // ranges: present, active, of the expected capacity, backed below the frontiers
      const bool shared = L.off != 0;
      if (shared && (L.k != rec.layers[0].k || L.v != rec.layers[0].v))
        return violation(at, "does not use its sequence's shared ranges");
      const range_id kv_ranges[] = {L.k, L.v};
      for (range_id r : kv_ranges) {
        if (r == no_range) return violation(at, "K or V range missing");
        if constexpr (backend_knows_active<typename C::memory_type>)
          if (!c.memory_.active(r)) return violation(at, "range " + std::to_string(r) + " is not active (released while in use)");
        if (c.memory_.capacity(r) < c.range_bytes_)
          return violation(at, "range " + std::to_string(r) + " of " + std::to_string(c.memory_.capacity(r)) +
                                   " bytes, expected " + std::to_string(c.range_bytes_));
      }
      if constexpr (C::stable_bases)
        if (L.kp != c.memory_.data(L.k) || L.vp != c.memory_.data(L.v) ||
            (L.vs != no_range && (L.ksp != (L.ks != no_range ? c.memory_.data(L.ks) : nullptr) ||
                                  L.vsp != c.memory_.data(L.vs))))
          return violation(at, "a kept base address differs from the backend's");
      if (!shared && (c.scale_bytes_ != 0) != (L.vs != no_range))
        return violation(at, "metadata ranges do not match the format");
      if (!shared && quant_token_grouped<Q>() != (L.kr != no_range))
        return violation(at, "residual range does not match the format");
      if constexpr (quant_token_grouped<Q>()) {
        if (L.qend.size() != g.kv_heads) return violation(at, "quantized marks for the wrong head count");
        for (std::uint32_t h = 0; h < g.kv_heads; ++h)
          if (L.qend[h] % Q::residual != 0 || L.qend[h] > L.table.frontier(h))
            return violation(at + " head " + std::to_string(h),
                             "quantized up to slot " + std::to_string(L.qend[h]) + " with frontier " +
                                 std::to_string(L.table.frontier(h)));
      }
      if constexpr (backend_knows_backed<typename C::memory_type>) {
        auto backed = [&](range_id r, std::size_t b, std::size_t e, const char* what) -> status {
          if (r == no_range || c.memory_.backed(r, b, e)) return {};
          return violation(at, std::string(what) + " bytes [" + std::to_string(b) + ", " + std::to_string(e) +
                                   ") of range " + std::to_string(r) + " hold entries but are not backed");
        };
        if (cfg.order == layout::token_major) {
          const std::size_t rows = L.table.rows();
          if (rows) {
            const std::size_t b = L.off, e = (rows - 1) * c.slot_stride_ + L.off + c.layer_stride_;
            KVCACHE_TRY(backed(L.k, b, e, "K"));
            KVCACHE_TRY(backed(L.v, b, e, "V"));
            if (c.scale_bytes_) {
              if (!quant_token_grouped<Q>()) KVCACHE_TRY(backed(L.ks, 0, rows * c.scale_slot_stride_, "K metadata"));
              KVCACHE_TRY(backed(L.vs, 0, rows * c.scale_slot_stride_, "V metadata"));
            }
          }
        } else {
          for (std::uint32_t h = 0; h < g.kv_heads; ++h) {
            const std::size_t f = L.table.frontier(h);
            if (!f) continue;
            KVCACHE_TRY(backed(L.k, h * c.head_stride_, h * c.head_stride_ + f * c.code_bytes_, "K"));
            KVCACHE_TRY(backed(L.v, h * c.head_stride_, h * c.head_stride_ + f * c.code_bytes_, "V"));
            if (c.scale_bytes_) {
              const std::size_t sb = h * c.scale_head_stride_, se = sb + f * c.scale_bytes_;
              KVCACHE_TRY(backed(L.ks, sb, se, "K metadata"));
              KVCACHE_TRY(backed(L.vs, sb, se, "V metadata"));
            }
          }
        }
      }
      // Formats that refuse non-finite input (validate()) must decode finite values; one without
      // (passthrough) stores whatever the engine appended, NaN included.
      constexpr bool validates = requires(const Q& q) { q.validate(nullptr, std::size_t{}, dtype{}); };
      if (!decode || !validates) continue;
      // every live entry decodes to finite values (input is validated finite; a NaN or infinite
      // scale, or codes written over, show up here)
      const layer_view v = c.make_view(L);
      for (std::uint32_t s = 0; s < L.table.rows(); ++s)
        for (std::uint32_t h = 0; h < g.kv_heads; ++h) {
          if (L.table.position(s, h) == slot_table::empty) continue;
          for (int part = 0; part < 2; ++part) {
            if (part == 0) decode_key(v, c.quant_, s, h, row.data());
            else decode_value(v, c.quant_, s, h, row.data());
            for (float x : row)
              if (!std::isfinite(x))
                return violation(at + " head " + std::to_string(h) + " slot " + std::to_string(s),
                                 std::string(part == 0 ? "K" : "V") + " decodes to a non-finite value (scale or codes corrupt)");
          }
        }
    }
    return {};
  }

  //! After evict: every head of the evicted layer(s) within its target, unless the policy gave
  //! fewer victims than asked (sink_window keeps its sinks).
  template <class C>
  static status check_budgets(const C& c, std::uint32_t i, std::uint32_t only_layer, std::uint32_t reserve) {
    const auto& rec = c.reg_.recs[i];
    if (rec.sc.short_heads) return {};
    for (std::uint32_t l = 0; l < c.cfg_.geo.layers; ++l) {
      if (only_layer != all_layers && l != only_layer) continue;
      const auto& L = rec.layers[l];
      for (std::uint32_t h = 0; h < c.cfg_.geo.kv_heads; ++h) {
        std::uint32_t target = c.budget(l, h);
        if constexpr (has_target<typename C::policy_type>) target = c.policy_.target(L.state, L.table, h, target);
        target = target > reserve ? target - reserve : 0;
        if (L.table.live(h) > target && !policy_never_evicts<typename C::policy_type>)
          return violation("sequence " + std::to_string(i) + " layer " + std::to_string(l) + " head " + std::to_string(h),
                           std::to_string(L.table.live(h)) + " live entries after evict, over the target " +
                               std::to_string(target));
      }
    }
    return {};
  }

  //! The per-call check (KVCACHE_CHECK_INVARIANTS): what the call touched, never other
  //! sequences (other threads may be using them). Aborts on a violation.
  template <class C, class Id>
  static void verify(const C& c, const char* op, Id s, std::uint32_t layer, bool evicted, std::uint32_t reserve) {
    status st;
    if (c.is_open(s)) {
      st = check_sequence(c, s.index, layer, /*decode=*/false);
      if (st && evicted) st = check_budgets(c, s.index, layer, reserve);
    }
    if (st) st = check_memory(c);
    if (st) return;
    std::fprintf(stderr, "kvcache: after %s: %s (a kvcache bug: KVCACHE_CHECK_INVARIANTS aborts)\n", op,
                 st.message().c_str());
    std::abort();
  }

  template <class C>
  static std::uint64_t digest(const C& c) {
    using Q = typename C::quantizer_type;
    digest_builder d;
    const auto& reg = c.reg_;
    const auto& g = c.cfg_.geo;
    d.value(reg.open.load());
    std::vector<float> row(g.head_dim);
    for (std::uint32_t i = 0; i < reg.recs.size(); ++i) {
      const auto& rec = reg.recs[i];
      if (!rec.open.load()) continue;
      d.value(i);
      d.value(rec.generation.load());
      for (const auto& L : rec.layers) {
        const slot_table& t = L.table;
        d.value(L.seen);
        d.value(t.rows());
        for (std::uint32_t h = 0; h < t.heads(); ++h) {
          d.value(t.live(h));
          d.value(t.frontier(h));
          d.range(t.holes(h).data(), t.holes(h).size());  // their order is the next slots' order
        }
        d.range(t.positions(), std::size_t{t.rows()} * t.heads());
        if constexpr (quant_token_grouped<Q>()) d.range(L.qend.data(), L.qend.size());
        digest_policy_state(d, L.state);
        d.value(rec.held);
        if (rec.held) continue;  // its bytes are in the holding tier (gauged below)
        const layer_view v = c.make_view(L);
        for (std::uint32_t s = 0; s < t.rows(); ++s)
          for (std::uint32_t h = 0; h < t.heads(); ++h) {
            if (t.position(s, h) == slot_table::empty) continue;
            if constexpr (!quant_token_grouped<Q>()) d.bytes(v.k_row(s, h), v.row_bytes);
            d.bytes(v.v_row(s, h), v.row_bytes);
            if (v.scale_bytes && !quant_token_grouped<Q>()) d.bytes(v.k_scale(s, h), v.scale_bytes);
            if (v.scale_bytes) d.bytes(v.v_scale(s, h), v.scale_bytes);
            decode_key(v, c.quant_, s, h, row.data());  // whatever the format keeps beside
            d.range(row.data(), row.size());
            decode_value(v, c.quant_, s, h, row.data());
            d.range(row.data(), row.size());
          }
      }
    }
    d.range(c.budget_.data(), c.budget_.size());
    d.range(c.head_budget_.data(), c.head_budget_.size());
    const auto st = c.stats();
    d.value(st.sequences);
    d.value(st.entries_live);
    d.value(st.bytes_live);
    d.value(st.bytes_used);
    d.value(st.bytes_backed);
    // Gauges of the pool, not its cumulative counters (work attempted) nor its idle ranges
    // (deferred reclamation: memory kept for reuse that no engine call can observe).
    const memory_stats& m = st.memory;
    d.value(m.page_size);
    d.value(m.pages_total);
    d.value(m.pages_in_use() - m.pages_idle);
    d.value(m.pages_mapped - m.pages_idle);
    d.value(m.pages_shared);
    d.value(m.ranges_active);
    d.value(st.tier.bytes_held);
    d.value(st.tier.groups);
    return d.get();
  }
};

}  // namespace detail

//! ok, or errc::invariant_violation naming the first broken invariant of `c` and where.
//! Reads the whole cache: no other thread may mutate it meanwhile.
template <class Cache>
status check_invariants(const Cache& c) {
  return detail::cache_access::check_all(c);
}

//! A hash of everything observable in `c` (see the file comment): equal before and after a call
//! that failed. Reads the whole cache: no other thread may mutate it meanwhile.
template <class Cache>
std::uint64_t state_digest(const Cache& c) {
  return detail::cache_access::digest(c);
}

KVCACHE_NAMESPACE_END
