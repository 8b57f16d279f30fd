// SPDX-License-Identifier: Apache-2.0
//! @file
//! `kvcache::cache<Memory, Eviction, Quantizer>`: the cache object an engine embeds.
//!
//! Per (sequence, layer), K and V each live in one contiguous range of their own, reserved for
//! `max_tokens` slots and backed on demand by the memory backend. The eviction policy picks
//! victim slots; the next tokens are written into them (no data moves). The quantizer decides
//! how a (token, head) row is stored.
//!
//! Errors: every operation returns a `status` (or `result<T>`) naming what was wrong, and a
//! failed operation leaves the cache exactly as it was. The constructor raises on a bad config.
//!
//! Thread safety (docs/RELIABILITY.md):
//! - one sequence is used by one thread at a time (append, observe, evict, view, fork of it as
//!   the parent, close); different sequences may be used by different threads at once;
//! - open, fork and close may run concurrently with each other and with operations on other
//!   sequences: records live in stable storage (never relocated) and a short lock guards only
//!   taking and freeing them, so the per-token calls take no cache-wide lock;
//! - the memory backend (page pool) is shared and thread-safe (its own mutex);
//! - a policy or quantizer object is shared by every sequence; one that is not an empty class
//!   (scratch buffers, calibrated scales) and does not declare `concurrent_calls = true` has its
//!   mutating calls serialized by a cache mutex (see `concurrent_calls_v`);
//! - configuration and whole-cache reads (set_budget, stats, batch over sequences in use
//!   elsewhere, check_invariants, state_digest) need the sequences they read to be quiet.
//!
//! Ownership: `open_sequence()` returns a move-only `sequence` handle that closes on destruction
//! (sequence.hpp); raw `seq_id`s remain for engines that manage ids themselves (stale ids are
//! detected by generation). Ranges and pages never leave the cache: each is released exactly once.
//!
//! With `KVCACHE_CHECK_INVARIANTS` defined (the whole program alike), every mutating call ends
//! with an invariant check of what it touched (check.hpp) and aborts on a violation.
#pragma once

#include <kvcache/check.hpp>
#include <kvcache/config.hpp>
#include <kvcache/core/chunk.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/signals.hpp>
#include <kvcache/core/slot_table.hpp>
#include <kvcache/core/view.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/evict/policy.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/tiered.hpp>
#include <kvcache/quant/dense.hpp>
#include <kvcache/quant/passthrough.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

//! What one K (or V) range of the memory backend holds.
enum class range_scope : std::uint8_t {
  //! One range per (sequence, layer): `[slot][kv_head][head_dim]`. A page crossing of a decode
  //! step touches 2L ranges, and each range holds its own partly used last page.
  per_layer,
  //! One range per sequence for all layers: `[slot][layer][kv_head][head_dim]` (vAttention's
  //! "megacache"); a layer's view is strided by the whole slot row. A sequence holds 2 partly
  //! used pages instead of 2L, and a prefill maps each tensor in one run. token_major only, and
  //! for formats without out-of-band metadata ranges (passthrough, fp8, q8_0, q4_0).
  per_sequence,
};

//! Shape and sizes of a cache.
struct cache_config {
  geometry geo;
  //! Slots reserved per (sequence, layer, head): the most tokens a head can hold at once,
  //! including the tokens of an append that exceed the budget until the next evict().
  std::uint32_t max_tokens = 0;
  //! Tokens each head keeps after evict(), for every layer (set_budget() changes it per layer);
  //! 0 means max_tokens.
  std::uint32_t budget = 0;
  layout order = layout::token_major;
  range_scope ranges = range_scope::per_layer;
};

//! A sequence handle. Stale handles (closed, or from another generation) are detected.
struct seq_id {
  std::uint32_t index = std::numeric_limits<std::uint32_t>::max();
  std::uint32_t generation = 0;
  friend bool operator==(const seq_id&, const seq_id&) = default;
};

//! K or V of the tokens to append: `[tokens][heads][head_dim]` elements of `type`, contiguous.
struct kv_tensor {
  const void* data = nullptr;
  dtype type = dtype::f16;
  std::uint32_t tokens = 0;
  std::uint32_t heads = 0;
  std::uint32_t head_dim = 0;
};

//! Of the working tier (held sequences count in `tier` only).
struct cache_stats {
  memory_stats memory;
  std::size_t sequences = 0;
  std::uint64_t entries_live = 0;  //!< live (token, head) entries over all sequences and layers
  std::size_t bytes_live = 0;      //!< K+V bytes of live entries (codes and scales)
  std::size_t bytes_used = 0;      //!< K+V bytes below the frontiers (live entries and holes)
  std::size_t bytes_backed = 0;    //!< K+V bytes of memory backing the open sequences' ranges
  //! Tiered memory (tiered<...>): the holding tier's gauges and the moves between the tiers;
  //! zeros otherwise.
  tier_stats tier;
  //! Backed bytes not holding a live entry: the partly filled last page(s), holes, and pages
  //! kept mapped ahead.
  [[nodiscard]] std::size_t bytes_wasted() const noexcept {
    return bytes_backed > bytes_live ? bytes_backed - bytes_live : 0;
  }
};

namespace detail {
template <class>
inline constexpr bool dependent_false = false;

template <class Policy, class Signal, bool = Policy::signals::template contains<Signal>>
struct signal_is_consumed : std::true_type {};
template <class Policy, class Signal>
struct signal_is_consumed<Policy, Signal, false> : std::false_type {
  static_assert(dependent_false<Signal>,
                "kvcache: observe() was given a signal that the eviction policy does not consume "
                "(see Policy::signals); do not compute or feed it");
};

template <class Needed, class... Given>
struct signal_is_given : std::true_type {
  static_assert((std::is_same_v<Needed, Given> || ...),
                "kvcache: observe() lacks a signal that the eviction policy needs "
                "(see Policy::signals); pass it");
};
template <class List, class... Given>
struct all_signals_given;
template <class... Needed, class... Given>
struct all_signals_given<signal_list<Needed...>, Given...>
    : std::bool_constant<(signal_is_given<Needed, Given...>::value && ...)> {};

template <class P, class = void>
struct never_evicts : std::false_type {};
template <class P>
struct never_evicts<P, std::void_t<decltype(P::never_evicts)>> : std::bool_constant<P::never_evicts> {};

//! Records that never move: segments of 64, 64, 128, 256, ... records, each allocated once. A
//! new record (which may add a segment) therefore never relocates one another thread is using,
//! and a lookup is two loads and no lock. Callers serialize grow().
template <class T>
class stable_table {
 public:
  stable_table() = default;
  stable_table(stable_table&& o) noexcept : size_(o.size_.exchange(0, std::memory_order_relaxed)) {
    for (std::size_t i = 0; i < segments; ++i)
      seg_[i].store(o.seg_[i].exchange(nullptr, std::memory_order_relaxed), std::memory_order_relaxed);
  }
  stable_table& operator=(stable_table&&) = delete;
  ~stable_table() {
    for (auto& s : seg_) delete[] s.load(std::memory_order_relaxed);
  }

  [[nodiscard]] std::uint32_t size() const noexcept { return size_.load(std::memory_order_acquire); }
  //! Precondition: i < size().
  [[nodiscard]] T& operator[](std::uint32_t i) const noexcept {
    const std::uint64_t j = std::uint64_t{i} + first;
    const unsigned s = static_cast<unsigned>(std::bit_width(j)) - first_bits - 1;
    return seg_[s].load(std::memory_order_acquire)[j - (first << s)];
  }
  //! Adds a default-constructed record and returns its index.
  std::uint32_t grow() {
    const std::uint32_t i = size_.load(std::memory_order_relaxed);
    const std::uint64_t j = std::uint64_t{i} + first;
    const unsigned s = static_cast<unsigned>(std::bit_width(j)) - first_bits - 1;
    if (j == (first << s)) seg_[s].store(new T[first << s], std::memory_order_release);
    size_.store(i + 1, std::memory_order_release);
    return i;
  }

 private:
  static constexpr unsigned first_bits = 6;
  static constexpr std::uint64_t first = std::uint64_t{1} << first_bits;  // records in segment 0
  static constexpr std::size_t segments = 27;  // 64 * (2^27 - 1) > 2^32 records
  std::atomic<std::uint32_t> size_{0};
  std::array<std::atomic<T*>, segments> seg_{};
};

//! The sequence records of a cache and what guards their structure.
template <class Rec>
struct seq_registry {
  stable_table<Rec> recs;
  std::vector<std::uint32_t> free;  // closed records, reused last in first out (under m)
  std::atomic<std::size_t> open{0};
  std::mutex m;  // taking, adding and freeing records (not per-token calls)
  seq_registry() = default;
  seq_registry(seq_registry&& o) noexcept
      : recs(std::move(o.recs)), free(std::move(o.free)),
        open(o.open.exchange(0, std::memory_order_relaxed)) {}
};

//! A mutex that a moved-to object gets afresh (mutexes do not move).
struct fresh_mutex {
  mutable std::mutex m;
  fresh_mutex() = default;
  fresh_mutex(fresh_mutex&&) noexcept {}
};
struct no_lock {};

//! The cache's counters of moves between tiers (atomics: sequences move concurrently).
struct tier_counters {
  std::atomic<std::uint64_t> demoted{0}, promoted{0}, prefetched{0}, hit{0}, missed{0}, waits{0};
  tier_counters() = default;
  tier_counters(tier_counters&& o) noexcept
      : demoted(o.demoted.load()), promoted(o.promoted.load()), prefetched(o.prefetched.load()),
        hit(o.hit.load()), missed(o.missed.load()), waits(o.waits.load()) {}
  void add(std::atomic<std::uint64_t>& c, std::uint64_t n) noexcept { c.fetch_add(n, std::memory_order_relaxed); }
};

template <class T>
concept declares_concurrent_calls = requires { requires static_cast<bool>(T::concurrent_calls); };
}  // namespace detail

//! True when the cache may call a policy's or quantizer's mutating members (select, observe,
//! on_append, encode, calibrate) for different sequences at once: empty classes, and types
//! that declare `static constexpr bool concurrent_calls = true` (their per-call scratch is
//! per state or per thread). Otherwise the cache serializes those calls with one mutex.
template <class T>
inline constexpr bool concurrent_calls_v = std::is_empty_v<T> || detail::declares_concurrent_calls<T>;

template <class Cache>
class sequence;  // sequence.hpp: the owning handle

//! @tparam Memory   where bytes live: `host_vmm`, `heap_memory` (or a CUDA backend)
//! @tparam Eviction which tokens stay: `keep_all`, `sink_window`, ...
//! @tparam Quant    how a token's K/V is stored: `passthrough`, ...
template <memory_backend Memory, eviction_policy Eviction = keep_all, quantizer Quant = passthrough>
class cache {
 public:
  using memory_type = Memory;
  using policy_type = Eviction;
  using quantizer_type = Quant;
  using signals = typename Eviction::signals;
  //! True when the policy consumes signal S (engines can skip computing what is not consumed).
  template <class S>
  static constexpr bool consumes = signals::template contains<S>;

  //! True when calls into the policy or quantizer are serialized (see concurrent_calls_v).
  static constexpr bool serializes_calls = !(concurrent_calls_v<Eviction> && concurrent_calls_v<Quant>);

  //! True when the memory has a holding tier behind the working tier (`tiered<...>`): hold(),
  //! restore() and tiered policies (SentenceKV) are available.
  static constexpr bool has_tiers = has_holding_tier<Memory>;
  static_assert(!tiered_policy<Eviction> || has_holding_tier<Memory>,
                "kvcache: this eviction policy moves tokens between a working and a holding tier; "
                "give the cache tiered memory: kvcache::tiered<Memory> (memory/tiered.hpp)");
  static_assert(!tiered_policy<Eviction> || !quant_token_grouped<Quant>(),
                "kvcache: a tiered policy moves (token, head) rows one by one; token-grouped keys "
                "(KIVI) are quantized across tokens and cannot move that way: use a per-row format");

  explicit cache(const cache_config& cfg, Memory memory = Memory{}, Eviction policy = Eviction{},
                 Quant quant = Quant{})
      : cfg_(cfg), memory_(std::move(memory)), policy_(std::move(policy)), quant_(std::move(quant)) {
    if (status st = cfg.geo.validate(); !st) raise(st.code(), "cache: " + st.message());
    if (cfg.max_tokens == 0) raise(errc::invalid_argument, "cache: max_tokens must be > 0");
    if (cfg.budget > cfg.max_tokens)
      raise(errc::invalid_budget, "cache: budget " + std::to_string(cfg.budget) +
                                      " exceeds max_tokens " + std::to_string(cfg.max_tokens));
    if (cfg.max_tokens > std::numeric_limits<std::int32_t>::max())
      raise(errc::invalid_argument, "cache: max_tokens above 2^31-1");
    if (status st = quant_bind(quant_, cfg.geo); !st) raise(st.code(), "cache: " + st.message());
    code_bytes_ = quant_.code_bytes(cfg.geo);
    const std::size_t gran = memory_.granularity();
    if (cfg.ranges == range_scope::per_sequence) {
      if (cfg.order != layout::token_major)
        raise(errc::invalid_argument, "cache: range_scope::per_sequence needs the token_major layout");
      if (quant_.scale_bytes(cfg.geo) != 0 || quant_token_grouped<Quant>())
        raise(errc::invalid_argument,
              std::string("cache: range_scope::per_sequence takes formats without metadata "
                          "ranges; ") + Quant::name() + " has them");
    }
    if (cfg.order == layout::token_major) {
      layer_stride_ = code_bytes_ * cfg.geo.kv_heads;
      slot_stride_ = cfg.ranges == range_scope::per_sequence ? layer_stride_ * cfg.geo.layers
                                                             : layer_stride_;
      head_stride_ = code_bytes_;
      range_bytes_ = round_up(std::size_t{cfg.max_tokens} * slot_stride_, gran);
    } else {
      slot_stride_ = code_bytes_;
      head_stride_ = round_up(std::size_t{cfg.max_tokens} * code_bytes_, gran);  // page aligned
      range_bytes_ = head_stride_ * cfg.geo.kv_heads;
    }
    // Out-of-band per-row metadata (KIVI scales and zeros): a range of its own per (sequence,
    // layer, K|V), laid out like the codes with scale_bytes per row.
    scale_bytes_ = quant_.scale_bytes(cfg.geo);
    if (scale_bytes_) {
      if (cfg.order == layout::token_major) {
        scale_slot_stride_ = scale_bytes_ * cfg.geo.kv_heads;
        scale_head_stride_ = scale_bytes_;
      } else {
        scale_slot_stride_ = scale_bytes_;
        scale_head_stride_ = std::size_t{cfg.max_tokens} * scale_bytes_;
      }
      scale_range_bytes_ =
          round_up(std::size_t{cfg.max_tokens} * cfg.geo.kv_heads * scale_bytes_, gran);
    }
    if constexpr (quant_token_grouped<Quant>()) {  // KIVI keys: a full-precision residual window
      if (cfg.order != layout::token_major)
        raise(errc::invalid_argument, std::string("cache: ") + Quant::name() +
                                          " (token-grouped keys) needs the token_major layout");
      residual_bytes_ = round_up(std::size_t{Quant::residual} * cfg.geo.token_bytes(), gran);
    }
    budget_.assign(cfg.geo.layers, cfg.budget ? cfg.budget : cfg.max_tokens);
    tier_row_bytes_ = 2 * (code_bytes_ + scale_bytes_);
    stage_bytes_ = round_up(std::size_t{cfg.max_tokens} * cfg.geo.kv_heads * tier_row_bytes_, gran);
  }

  cache(const cache&) = delete;
  cache& operator=(const cache&) = delete;
  cache(cache&&) noexcept = default;

  [[nodiscard]] const cache_config& config() const noexcept { return cfg_; }
  [[nodiscard]] const geometry& geo() const noexcept { return cfg_.geo; }
  [[nodiscard]] Memory& memory() noexcept { return memory_; }
  [[nodiscard]] const Memory& memory() const noexcept { return memory_; }
  [[nodiscard]] Eviction& policy() noexcept { return policy_; }
  [[nodiscard]] const Quant& quant() const noexcept { return quant_; }
  [[nodiscard]] std::size_t range_bytes() const noexcept { return range_bytes_; }

  // ---- budgets ---------------------------------------------------------------------------

  //! Tokens each head of `layer` keeps after evict() (clears the layer's per-head budgets).
  status set_budget(std::uint32_t layer, std::uint32_t tokens) {
    [[maybe_unused]] const invariant_guard guard(*this, "set_budget");
    KVCACHE_TRY(check_layer(layer));
    KVCACHE_TRY(check_budget(tokens));
    budget_[layer] = tokens;
    if (!head_budget_.empty())
      std::fill_n(head_budget_.begin() + std::size_t{layer} * cfg_.geo.kv_heads, cfg_.geo.kv_heads, 0u);
    return {};
  }
  //! The same budget for every layer (clears per-head budgets).
  status set_budget(std::uint32_t tokens) {
    [[maybe_unused]] const invariant_guard guard(*this, "set_budget");
    KVCACHE_TRY(check_budget(tokens));
    budget_.assign(budget_.size(), tokens);
    head_budget_.clear();
    return {};
  }
  //! Per-head budgets of one layer, `[kv_heads]` (all checked before any is set).
  status set_budget(std::uint32_t layer, std::span<const std::uint32_t> per_head) {
    [[maybe_unused]] const invariant_guard guard(*this, "set_budget");
    KVCACHE_TRY(check_layer(layer));
    if (per_head.size() != cfg_.geo.kv_heads)
      return {errc::invalid_budget, "set_budget: " + std::to_string(per_head.size()) +
                                        " per-head budgets for " +
                                        std::to_string(cfg_.geo.kv_heads) + " kv heads"};
    for (std::uint32_t b : per_head) KVCACHE_TRY(check_budget(b));
    if (head_budget_.empty())
      head_budget_.assign(std::size_t{cfg_.geo.layers} * cfg_.geo.kv_heads, 0u);
    std::copy(per_head.begin(), per_head.end(),
              head_budget_.begin() + std::size_t{layer} * cfg_.geo.kv_heads);
    return {};
  }
  [[nodiscard]] std::uint32_t budget(std::uint32_t layer) const noexcept { return budget_[layer]; }
  //! The budget of one head of `layer`: its own if set, else the layer's.
  [[nodiscard]] std::uint32_t budget(std::uint32_t layer, std::uint32_t head) const noexcept {
    if (!head_budget_.empty())
      if (const std::uint32_t b = head_budget_[std::size_t{layer} * cfg_.geo.kv_heads + head]) return b;
    return budget_[layer];
  }

  // ---- sequences -------------------------------------------------------------------------

  //! Opens a sequence. `expected_tokens` (e.g. the prompt length) guides the best-fit reuse of
  //! ranges released by finished sequences; 0 = unknown (reuse the most mapped).
  result<seq_id> open(std::uint32_t expected_tokens = 0) {
    [[maybe_unused]] invariant_guard guard(*this, "open");
    const std::size_t expected = std::min(expected_tokens, cfg_.max_tokens);
    const std::size_t hint = cfg_.order == layout::token_major
                                 ? expected * slot_stride_
                                 : cfg_.geo.kv_heads * round_up(expected * code_bytes_,
                                                                memory_.granularity());
    std::vector<layer_rec> layers(cfg_.geo.layers);
    for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l) {
      auto& L = layers[l];
      L.layer = l;
      L.table = slot_table(cfg_.geo.kv_heads, cfg_.max_tokens);
      L.state = policy_.make_state(policy_context{cfg_.geo, l, cfg_.max_tokens});
      if constexpr (quant_token_grouped<Quant>()) L.qend.assign(cfg_.geo.kv_heads, 0u);
    }
    KVCACHE_TRY(acquire_ranges(layers, hint));
    return guard.track(install(std::move(layers)));
  }

  //! Closes a sequence; its ranges go back to the memory backend (kept mapped for reuse where the
  //! backend defers reclamation). A held sequence's rows leave the holding tier.
  status close(seq_id s) {
    [[maybe_unused]] const invariant_guard guard(*this, "close");
    KVCACHE_TRY(check_seq(s, "close"));
    auto& rec = reg_.recs[s.index];
    for (auto& L : rec.layers) wait_stage(L);
    release_ranges(rec.layers);  // each range exactly once: release_ranges forgets their ids
    rec.layers.clear();
    if constexpr (has_tiers) memory_.holding().erase_owner(owner_of(s));
    rec.held = rec.rows_held = false;
    rec.spans.clear();
    const std::lock_guard<std::mutex> lock(reg_.m);
    rec.open.store(false, std::memory_order_release);
    rec.generation.fetch_add(1, std::memory_order_release);  // stale ids stop matching
    reg_.free.push_back(s.index);
    reg_.open.fetch_sub(1, std::memory_order_relaxed);
    return {};
  }


  //! Opens a sequence owned by a handle that closes it on destruction (sequence.hpp).
  result<sequence<cache>> open_sequence(std::uint32_t expected_tokens = 0) {
    auto id = open(expected_tokens);
    if (!id) return id.error();
    return sequence<cache>(*this, *id);
  }

  //! A new sequence holding the same tokens as `parent`, sharing its memory where the backend
  //! can (copy-on-write pages); policy state and slot maps are copied.
  result<seq_id> fork(seq_id parent) {
    [[maybe_unused]] invariant_guard guard(*this, "fork");
    KVCACHE_TRY(check_active(parent, "fork"));
    std::vector<layer_rec> layers;
    layers.reserve(cfg_.geo.layers);
    const auto& parent_layers = reg_.recs[parent.index].layers;
    std::uint32_t top_rows = 0;  // shared ranges: the rows any layer uses
    for (const auto& P : parent_layers) top_rows = std::max(top_rows, P.table.rows());
    for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l) {
      const auto& P = parent_layers[l];
      if (l > 0 && shares_ranges()) {
        layer_rec L;
        L.k = layers[0].k;
        L.v = layers[0].v;
        L.off = P.off;
        L.layer = l;
        L.table = P.table;
        L.state = P.state;
        L.seen = P.seen;
        layers.push_back(std::move(L));
        continue;
      }
      const std::size_t used =
          cfg_.order == layout::token_major
              ? std::size_t{shares_ranges() ? top_rows : P.table.rows()} * slot_stride_
              : range_bytes_;
      layer_rec L;
      auto k = memory_.fork(P.k, used);
      if (k) L.k = *k;
      auto v = k ? memory_.fork(P.v, used) : result<range_id>(k.error());
      if (v) L.v = *v;
      if (!k || !v) {
        layers.push_back(std::move(L));
        release_ranges(layers);
        return k ? v.error() : k.error();
      }
      if (scale_bytes_) {
        const std::size_t sused = cfg_.order == layout::token_major
                                      ? std::size_t{P.table.rows()} * scale_slot_stride_
                                      : scale_range_bytes_;
        auto ks = memory_.fork(P.ks, sused);
        if (ks) L.ks = *ks;
        auto vs = ks ? memory_.fork(P.vs, sused) : result<range_id>(ks.error());
        if (vs) L.vs = *vs;
        if (!ks || !vs) {
          layers.push_back(std::move(L));
          release_ranges(layers);
          return ks ? vs.error() : ks.error();
        }
      }
      if constexpr (quant_token_grouped<Quant>()) {
        auto kr = memory_.fork(P.kr, residual_bytes_);
        if (!kr) {
          layers.push_back(std::move(L));
          release_ranges(layers);
          return kr.error();
        }
        L.kr = *kr;
        L.qend = P.qend;
      }
      L.layer = l;
      L.table = P.table;
      L.state = P.state;
      L.seen = P.seen;
      layers.push_back(std::move(L));
    }
    bind_bases(layers);
    const seq_id child = guard.track(install(std::move(layers)));
    if constexpr (has_tiers) {  // the parent's held rows (sentences) are the child's too
      if (status st = memory_.holding().copy_owner(owner_of(parent), owner_of(child)); !st) {
        (void)close(child);
        return status{st.code(), "fork: " + st.message()};
      }
    }
    return child;
  }

  [[nodiscard]] bool is_open(seq_id s) const noexcept {
    if (s.index >= reg_.recs.size()) return false;
    const auto& r = reg_.recs[s.index];
    return r.open.load(std::memory_order_acquire) &&
           r.generation.load(std::memory_order_relaxed) == s.generation;
  }
  [[nodiscard]] std::size_t sequences() const noexcept {
    return reg_.open.load(std::memory_order_relaxed);
  }

  //! True when the memory backend maps ahead on a background thread (`map_ahead` does work).
  static constexpr bool maps_ahead = requires(Memory& m, std::span<const write_request> r) {
    { m.map_ahead(r, std::size_t{}) } -> std::same_as<status>;
    { m.sync() } -> std::same_as<status>;
  };

  //! vAttention's step_async: starts mapping, on the backend's background thread, the pages that
  //! the next `steps` tokens of every layer of `seqs` will be written to, and returns at once.
  //! Call it once per decode iteration before the step's compute; the next append waits for it
  //! (usually long done) and finds its pages mapped. A mapping error surfaces at the next append
  //! (or `sync`). `max_pages` (0: no cap) bounds the pages mapped per call: with `steps` of
  //! about a page's worth of tokens it spreads the burst of a page crossing (every layer's
  //! ranges at once) over several steps (see basic_vmm::map_ahead). vAttention's defaults: 10
  //! steps, no cap. A no-op for backends without map ahead (heap).
  status map_ahead(std::span<const seq_id> seqs, std::uint32_t steps = 10,
                   std::size_t max_pages = 0) {
    for (const auto& s : seqs) KVCACHE_TRY(check_active(s, "map_ahead"));
    if constexpr (maps_ahead) {
      const std::lock_guard<std::mutex> lock(ahead_.m);  // its scratch (engines call it once a step)
      ahead_requests_.clear();
      for (const auto& s : seqs)
        for (const auto& L : reg_.recs[s.index].layers) ahead_requests(L, steps, ahead_requests_);
      return memory_.map_ahead(ahead_requests_, max_pages);
    } else {
      (void)steps;
      (void)max_pages;
      return {};
    }
  }
  //! Waits for the background mapping step; returns the error it met, if any.
  status sync() {
    if constexpr (maps_ahead) return memory_.sync();
    else return {};
  }

  // ---- tokens ----------------------------------------------------------------------------

  //! Appends the K/V of `k.tokens` tokens (prefill or decode) to one layer. Each head writes into
  //! its evicted slots first, then at its frontier. Fails with capacity_exceeded when a head has
  //! fewer free slots than tokens (call evict() first), out_of_pages when memory runs out.
  status append(seq_id s, std::uint32_t layer, const kv_tensor& k, const kv_tensor& v) {
    [[maybe_unused]] const invariant_guard guard(*this, "append", s, layer);
    KVCACHE_TRY(check_active(s, "append"));
    KVCACHE_TRY(check_layer(layer));
    KVCACHE_TRY(check_tensor(k, "k"));
    KVCACHE_TRY(check_tensor(v, "v"));
    if (k.tokens != v.tokens)
      return {errc::shape_mismatch, "append: k has " + std::to_string(k.tokens) +
                                        " tokens but v has " + std::to_string(v.tokens)};
    const std::uint32_t n = k.tokens;
    if (n == 0) return {};
    auto& rec = reg_.recs[s.index];
    auto& L = rec.layers[layer];
    auto& sc = rec.sc;  // this sequence's scratch: appends to other sequences may run meanwhile
    const std::uint32_t H = cfg_.geo.kv_heads;
    if (L.seen + n > std::numeric_limits<std::int32_t>::max())
      return {errc::capacity_exceeded, "append: positions beyond 2^31-1"};
    for (std::uint32_t h = 0; h < H; ++h)
      if (L.table.room(h) < n)
        return {errc::capacity_exceeded,
                "append: " + std::to_string(n) + " tokens to layer " + std::to_string(layer) +
                    " but kv head " + std::to_string(h) + " has room for " +
                    std::to_string(L.table.room(h)) + " (max_tokens " +
                    std::to_string(cfg_.max_tokens) + "); evict() first or raise max_tokens"};
    // Formats that cannot store NaN/Inf faithfully refuse them here, before anything changes.
    const std::size_t elements = std::size_t{n} * H * cfg_.geo.head_dim;
    if (status st = quant_validate(quant_, k.data, elements, k.type); !st)
      return {st.code(), "append: k of layer " + std::to_string(layer) + ": " + st.message()};
    if (status st = quant_validate(quant_, v.data, elements, v.type); !st)
      return {st.code(), "append: v of layer " + std::to_string(layer) + ": " + st.message()};

    // Plan where every (token, head) goes, and the contiguous copies that puts them there.
    // Fast path: token-major with no holes and one frontier: one copy into consecutive rows.
    const bool rows_path = cfg_.order == layout::token_major && L.table.aligned();
    sc.assign.resize(std::size_t{n} * H);
    if (rows_path) {
      const std::uint32_t f = L.table.frontier(0);
      for (std::uint32_t i = 0; i < n; ++i)
        std::fill_n(sc.assign.begin() + std::size_t{i} * H, H, f + i);
      if (!shares_ranges()) {
        sc.chunks.assign(1, chunk{std::size_t{f} * slot_stride_, 0, std::size_t{n} * H});
      } else {  // rows of one layer are a slot stride apart: a chunk per token
        sc.chunks.clear();
        for (std::uint32_t i = 0; i < n; ++i)
          sc.chunks.push_back({(std::size_t{f} + i) * slot_stride_ + L.off, std::size_t{i} * H, H});
      }
    } else {
      for (std::uint32_t i = 0; i < n; ++i)
        for (std::uint32_t h = 0; h < H; ++h) sc.assign[std::size_t{i} * H + h] = L.table.peek(h, i);
      plan_chunks(sc, n, L.off);
    }
    sc.requests.clear();
    for (const auto& c : sc.chunks) {
      const std::size_t end = c.dst + c.rows * code_bytes_;
      sc.requests.push_back({L.k, c.dst, end});
      sc.requests.push_back({L.v, c.dst, end});
      if (scale_bytes_) {
        const std::size_t sb = scale_offset(c.dst), se = sb + c.rows * scale_bytes_;
        sc.requests.push_back({L.ks, sb, se});
        sc.requests.push_back({L.vs, sb, se});
      }
    }
    if constexpr (quant_token_grouped<Quant>()) {
      // the residual window, and the key metadata of every group the append can complete
      sc.requests.push_back({L.kr, 0, std::size_t{Quant::residual} * cfg_.geo.token_bytes()});
      std::uint32_t top = 0;
      for (std::uint32_t h = 0; h < H; ++h) top = std::max(top, L.table.frontier(h) + n);
      const std::size_t groups = std::min<std::size_t>(top, cfg_.max_tokens) / Quant::group;
      if (groups)
        sc.requests.push_back(
            {L.ks, 0, std::min(scale_range_bytes_, groups * H * Quant::key_meta_bytes(cfg_.geo))});
    }
    KVCACHE_TRY(memory_.prepare(sc.requests));  // the only step that can fail: nothing changed yet

    std::byte* kb = base(L.k, L.kp);
    std::byte* vb = base(L.v, L.vp);
    std::byte* ksb = scale_bytes_ ? base(L.ks, L.ksp) : nullptr;
    std::byte* vsb = scale_bytes_ ? base(L.vs, L.vsp) : nullptr;
    const std::size_t src_row = cfg_.geo.head_bytes();
    const auto* ks = static_cast<const std::byte*>(k.data);
    const auto* vs = static_cast<const std::byte*>(v.data);
    // a quantizer or policy with state of its own is shared by all sequences
    [[maybe_unused]] const auto serial = serialize();
    // formats with calibrated state (fp8 scales from the first append) see the whole append
    quant_calibrate(quant_, k.data, n, cfg_.geo, quant_context{layer, kv_part::k, 0});
    quant_calibrate(quant_, v.data, n, cfg_.geo, quant_context{layer, kv_part::v, 0});
    // A batched path (one kernel launch for every chunk of K and V: cuda_passthrough) where
    // the quantizer has one and there is no metadata to place.
    constexpr bool batched = requires(Quant& q, const std::byte* p, std::span<const row_chunk> c,
                                      const geometry& g, std::byte* b) {
      q.encode_chunks(p, p, c, g, b, b);
    };
    if constexpr (batched && !quant_token_grouped<Quant>()) {
      if (!scale_bytes_) {
        quant_.encode_chunks(ks, vs, std::span<const row_chunk>(sc.chunks), cfg_.geo, kb, vb);
        sc.chunks.clear();  // done: skip the per-chunk loop
      }
    }
    for (const auto& c : sc.chunks) {
      const std::uint32_t h0 = head_of(c.dst);
      const std::size_t so = scale_offset(c.dst);
      if constexpr (!quant_token_grouped<Quant>())
        quant_.encode(ks + c.src * src_row, c.rows, cfg_.geo, kb + c.dst, ksb ? ksb + so : nullptr,
                      quant_context{layer, kv_part::k, h0});
      quant_.encode(vs + c.src * src_row, c.rows, cfg_.geo, vb + c.dst, vsb ? vsb + so : nullptr,
                    quant_context{layer, kv_part::v, h0});
    }
    if constexpr (quant_token_grouped<Quant>()) write_grouped_keys(L, sc, ks, n);
    const std::int64_t first = L.seen;
    if (rows_path) {
      L.table.place_rows(n, static_cast<std::int32_t>(first));
    } else {
      for (std::uint32_t i = 0; i < n; ++i)
        for (std::uint32_t h = 0; h < H; ++h) {
          [[maybe_unused]] const std::uint32_t slot =
              L.table.place(h, static_cast<std::int32_t>(first + i));
          KVCACHE_ASSERT(slot == sc.assign[std::size_t{i} * H + h]);
        }
    }
    L.seen += n;
    if constexpr (quant_token_grouped<Quant>()) flush_key_groups(L, sc);
    policy_.on_append(L.state, L.table, placement{sc.assign, H, n, first});
    return {};
  }

  //! Feeds the policy the signals it consumes, for one layer. The arguments must be exactly the
  //! policy's `signals` (checked at compile time).
  template <class... S>
  status observe(seq_id s, std::uint32_t layer, const S&... sigs) {
    static_assert((is_signal<S> && ...), "kvcache: observe() takes kvcache signal structs only");
    static_assert((detail::signal_is_consumed<Eviction, S>::value && ...));
    static_assert(detail::all_signals_given<signals, S...>::value);
    [[maybe_unused]] const invariant_guard guard(*this, "observe", s, layer);
    KVCACHE_TRY(check_active(s, "observe"));
    KVCACHE_TRY(check_layer(layer));
    auto& L = reg_.recs[s.index].layers[layer];
    status st;
    ((st.ok() ? (st = check_signal(L, sigs)) : st), ...);
    KVCACHE_TRY(st);
    [[maybe_unused]] const auto serial = serialize();
    if constexpr (detail::has_joint_observe<Eviction, signals>::value) {
      // One call with every signal (in the policy's order) and read access to the cached keys.
      const key_reader_ctx ctx{make_view(L), &quant_,
                               geometry{1, cfg_.geo.kv_heads, cfg_.geo.kv_heads, cfg_.geo.head_dim,
                                        cfg_.geo.type}};
      const key_reader keys{L.table.rows(), cfg_.geo.head_dim, &ctx, &read_keys};
      return observe_joint(L, keys, signals{}, sigs...);
    } else {
      ((st.ok() ? (st = policy_.observe(L.state, L.table, sigs)) : st), ...);
      return st;
    }
  }

  //! Evicts, per head, until at most `budget(layer) - reserve` tokens remain (`reserve` makes
  //! room ahead of an append, StreamingLLM's evict_for_space).
  //! Per-head budgets (set_budget(layer, per_head)) apply the same way. Policies with their own
  //! rule (`target()`: H2O's ratio of the prompt, ScaleKV's per-scale table, SnapKV's one-shot
  //! compression) choose each head's target given its budget; the cache evicts down to it.
  status evict(seq_id s, std::uint32_t layer, std::uint32_t reserve = 0) {
    [[maybe_unused]] invariant_guard guard(*this, "evict", s, layer);
    KVCACHE_TRY(check_active(s, "evict"));
    KVCACHE_TRY(check_layer(layer));
    for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h)
      if (reserve > budget(layer, h))
        return {errc::invalid_argument, "evict: reserve " + std::to_string(reserve) +
                                            " exceeds the budget " +
                                            std::to_string(budget(layer, h)) + " of kv head " +
                                            std::to_string(h)};
    auto& rec = reg_.recs[s.index];
    rec.sc.short_heads = 0;
    if constexpr (tiered_policy<Eviction>) {
      KVCACHE_TRY(evict_tiered(s, rec, layer, layer + 1, reserve));
    } else {
      [[maybe_unused]] const auto serial = serialize();
      evict_layer(rec.layers[layer], rec.sc, layer, reserve);
    }
    guard.evicted(reserve);
    return {};
  }
  //! evict() on every layer.
  status evict(seq_id s) {
    [[maybe_unused]] invariant_guard guard(*this, "evict", s);
    KVCACHE_TRY(check_active(s, "evict"));
    auto& rec = reg_.recs[s.index];
    rec.sc.short_heads = 0;
    if constexpr (tiered_policy<Eviction>) {
      KVCACHE_TRY(evict_tiered(s, rec, 0, cfg_.geo.layers, 0));
    } else {
      [[maybe_unused]] const auto serial = serialize();
      for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l) evict_layer(rec.layers[l], rec.sc, l, 0);
    }
    guard.evicted(0);
    return {};
  }

  // ---- tiers (tiered memory: memory/tiered.hpp) --------------------------------------------

  //! SpeContext-style prefetch for a tiered policy that predicts its fetches (SentenceKV): stages
  //! the held rows the policy expects its next evict() of `layer` to fetch, copying them from
  //! the holding tier into a staging range of the working tier on the holding tier's worker, and
  //! returns at once. Call it after the layer's attention: the copies overlap the rest of the
  //! step, and the next evict() of the layer takes staged rows from the stage (hits) and the
  //! others from the holding tier (misses, synchronous). A no-op for other policies.
  status prefetch(seq_id s, std::uint32_t layer) {
    KVCACHE_TRY(check_active(s, "prefetch"));
    KVCACHE_TRY(check_layer(layer));
    if constexpr (has_tiers && predicts_fetches<Eviction>) {
      auto& rec = reg_.recs[s.index];
      auto& L = rec.layers[layer];
      auto& sc = rec.sc;
      auto& ho = memory_.holding();
      wait_stage(L);
      L.staged.clear();
      std::size_t bytes = 0;
      {
        [[maybe_unused]] const auto serial = serialize();
        for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) {
          sc.predicted.clear();
          policy_.predict(L.state, L.table, h, budget(layer, h), sc.predicted);
          std::uint32_t room = budget(layer, h);  // stage at most a budget's worth per head
          for (const group_rows& g : sc.predicted) {
            const auto held = ho.find(row_key(s, layer, h, g.group));
            if (g.first >= held.count || room == 0) continue;
            const std::uint32_t n = std::min({g.count, held.count - g.first, room});
            L.staged.push_back({h, g.group, g.first, n, bytes});
            bytes += std::size_t{n} * tier_row_bytes_;
            room -= n;
          }
        }
      }
      if (bytes == 0) return {};
      if (L.stage == no_range) {
        auto r = memory_.acquire(stage_bytes_, bytes);
        if (!r) {
          L.staged.clear();
          return r.error();
        }
        L.stage = *r;
      }
      const write_request req{L.stage, 0, bytes};
      if (status st = memory_.prepare(std::span<const write_request>(&req, 1)); !st) {
        L.staged.clear();
        return st;
      }
      std::byte* stage = memory_.data(L.stage);
      sc.ops.clear();
      for (const auto& st : L.staged) {
        const auto held = ho.find(row_key(s, layer, st.head, st.group));
        sc.ops.push_back({stage + st.offset, held.rows + std::size_t{st.first} * tier_row_bytes_,
                          std::size_t{st.count} * tier_row_bytes_});
      }
      L.stage_ticket = ho.submit(sc.ops);
      tc_.add(tc_.prefetched, bytes);
    } else {
      (void)s;
    }
    return {};
  }

  //! Moves a whole sequence out of the working tier into the holding tier (an EpiCache episode
  //! that is not in use): the used bytes of its ranges are copied there, as a few large copies,
  //! or, where eviction left many holes (live rows under 3/4 of those bytes) and the format is
  //! per row, only its live (token, head) rows; the ranges go back to the memory backend, their
  //! pages to the pool. Its slot tables and policy state stay; calls
  //! that read or write its K/V refuse it until restore(). close() drops it where it is.
  status hold(seq_id s)
    requires has_holding_tier<Memory>
  {
    [[maybe_unused]] const invariant_guard guard(*this, "hold", s);
    KVCACHE_TRY(check_active(s, "hold"));
    auto& rec = reg_.recs[s.index];
    auto& ho = memory_.holding();
    for (auto& L : rec.layers) wait_stage(L);
    const std::size_t free = ho.capacity() - std::min(ho.capacity(), ho.bytes());
    const auto too_big = [&](std::size_t need) {
      return status{errc::capacity_exceeded,
                    "hold: sequence " + std::to_string(s.index) + " needs " + std::to_string(need) +
                        " bytes of the holding tier, which has " + std::to_string(free) + " free"};
    };
    std::vector<held_span> spans;  // the used extents of the ranges, holes included
    backed_spans(rec, spans);
    std::size_t extent_bytes = 0;
    for (const auto& sp : spans) extent_bytes += sp.end - sp.begin + sizeof(std::int32_t);
    std::uint64_t rows = 0;
    for (const auto& L : rec.layers) rows += L.table.live_total();
    const std::size_t rb = tier_row_bytes_, row_bytes = rows * (rb + sizeof(std::int32_t));
    // Per-row formats with many holes (eviction): the live rows only, a group per (layer, head),
    // each row tagged with its slot. Otherwise the extents: a few large copies.
    if (!quant_token_grouped<Quant>() && row_bytes * 4 <= extent_bytes * 3) {
      if (row_bytes > free) return too_big(row_bytes);
      auto& tags = rec.sc.tags;
      for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l)
        for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) {
          const auto& L = rec.layers[l];
          tags.clear();
          for (std::uint32_t slot = 0; slot < L.table.rows(); ++slot)
            if (L.table.position(slot, h) != slot_table::empty) tags.push_back(static_cast<std::int32_t>(slot));
          if (tags.empty()) continue;
          auto dst = ho.extend(live_key(s, l, h), rb, tags);
          if (!dst) {  // a host allocation failed: undo what was held
            for (std::uint32_t j = 0; j <= l; ++j)
              for (std::uint32_t g = 0; g < cfg_.geo.kv_heads; ++g) ho.erase(live_key(s, j, g));
            return {dst.error().code(), "hold: " + dst.error().message()};
          }
          for (std::size_t i = 0; i < tags.size(); ++i)
            gather_row(L, static_cast<std::uint32_t>(tags[i]), h, *dst + i * rb);
        }
      tc_.add(tc_.demoted, rows * rb);
      release_ranges(rec.layers);
      rec.spans.clear();
      rec.held = rec.rows_held = true;
      return {};
    }
    const std::size_t need = extent_bytes;
    if (need > free) return too_big(need);
    const std::int32_t tag = 0;
    for (std::size_t i = 0; i < spans.size(); ++i) {
      const auto& sp = spans[i];
      auto dst = ho.extend(span_key(s, i), sp.end - sp.begin, std::span<const std::int32_t>(&tag, 1));
      if (!dst) {
        for (std::size_t j = 0; j < i; ++j) ho.erase(span_key(s, j));
        return {dst.error().code(), "hold: " + dst.error().message()};
      }
      ho.copy_in(*dst, memory_.data(range_of(rec.layers[sp.layer], sp.part)) + sp.begin,
                 sp.end - sp.begin);
    }
    tc_.add(tc_.demoted, need - spans.size() * sizeof(std::int32_t));
    release_ranges(rec.layers);
    rec.spans = std::move(spans);
    rec.held = true;
    rec.rows_held = false;
    return {};
  }

  //! Brings a held sequence back into fresh working-tier ranges, byte for byte where it was.
  //! Fails (out_of_pages, ...) with the sequence still held.
  status restore(seq_id s)
    requires has_holding_tier<Memory>
  {
    [[maybe_unused]] const invariant_guard guard(*this, "restore", s);
    KVCACHE_TRY(check_seq(s, "restore"));
    auto& rec = reg_.recs[s.index];
    if (!rec.held)
      return {errc::invalid_argument,
              "restore: sequence " + std::to_string(s.index) + " is not held (hold() it first)"};
    auto& ho = memory_.holding();
    auto& sc = rec.sc;
    if (rec.rows_held) {
      KVCACHE_TRY(acquire_ranges(rec.layers, std::size_t{rec.layers[0].table.rows()} * slot_stride_));
      sc.requests.clear();
      for (const auto& L : rec.layers) row_requests(L, 0, L.table.rows(), sc.requests);
      if (status st = memory_.prepare(sc.requests); !st) {
        release_ranges(rec.layers);
        return st;
      }
      std::size_t bytes = 0;
      for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l)
        for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) {
          const auto held = ho.find(live_key(s, l, h));
          for (std::uint32_t i = 0; i < held.count; ++i)
            scatter_row(rec.layers[l], static_cast<std::uint32_t>(held.tags[i]), h,
                        held.rows + std::size_t{i} * tier_row_bytes_);
          bytes += std::size_t{held.count} * tier_row_bytes_;
          ho.erase(live_key(s, l, h));
        }
      tc_.add(tc_.promoted, bytes);
      rec.held = rec.rows_held = false;
      return {};
    }
    std::size_t hint = 0;  // best fit for what layer 0's K used
    for (const auto& sp : rec.spans)
      if (sp.layer == 0 && sp.part == 0) hint = std::max(hint, sp.end);
    KVCACHE_TRY(acquire_ranges(rec.layers, hint));
    sc.requests.clear();
    for (const auto& sp : rec.spans)
      sc.requests.push_back({range_of(rec.layers[sp.layer], sp.part), sp.begin, sp.end});
    if (status st = memory_.prepare(sc.requests); !st) {
      release_ranges(rec.layers);
      return st;
    }
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < rec.spans.size(); ++i) {
      const auto& sp = rec.spans[i];
      const auto held = ho.find(span_key(s, i));
      KVCACHE_ASSERT(held.count == 1 && held.row_bytes == sp.end - sp.begin);
      ho.copy_out(memory_.data(range_of(rec.layers[sp.layer], sp.part)) + sp.begin, held.rows,
                  sp.end - sp.begin);
      bytes += sp.end - sp.begin;
    }
    for (std::size_t i = 0; i < rec.spans.size(); ++i) ho.erase(span_key(s, i));
    tc_.add(tc_.promoted, bytes);
    rec.spans.clear();
    rec.held = false;
    return {};
  }

  //! True when the sequence is open and held in the holding tier.
  [[nodiscard]] bool is_held(seq_id s) const noexcept { return is_open(s) && reg_.recs[s.index].held; }

  // ---- views -----------------------------------------------------------------------------

  result<layer_view> view(seq_id s, std::uint32_t layer) const {
    KVCACHE_TRY(check_active(s, "view"));
    KVCACHE_TRY(check_layer(layer));
    return make_view(reg_.recs[s.index].layers[layer]);
  }

  //! One layer of many sequences (pointer arrays + lengths, as varlen kernels take them).
  result<batch_view> batch(std::span<const seq_id> seqs, std::uint32_t layer) const {
    KVCACHE_TRY(check_layer(layer));
    for (const auto& s : seqs) KVCACHE_TRY(check_active(s, "batch"));
    batch_view b;
    fill_format(b);
    b.cu_rows.push_back(0);
    for (const auto& s : seqs) {
      const auto& L = reg_.recs[s.index].layers[layer];
      b.k.push_back(memory_.data(L.k) + L.off);
      b.v.push_back(memory_.data(L.v) + L.off);
      if (const auto [ksc, vsc] = scale_data(L); ksc) {
        b.k_scales.push_back(ksc);
        b.v_scales.push_back(vsc);
      }
      b.rows.push_back(L.table.rows());
      b.positions.push_back(L.table.positions());
      b.cu_rows.push_back(b.cu_rows.back() + static_cast<std::int32_t>(L.table.rows()));
      b.dense = b.dense && L.table.dense();
    }
    return b;
  }

  [[nodiscard]] cache_stats stats() const {
    cache_stats st;
    st.memory = memory_.stats();
    st.sequences = sequences();
    const std::size_t per_entry = 2 * (code_bytes_ + quant_.scale_bytes(cfg_.geo));
    for (std::uint32_t i = 0; i < reg_.recs.size(); ++i) {
      const auto& rec = reg_.recs[i];
      if (!rec.open.load(std::memory_order_acquire) || rec.held) continue;  // held: in tier
      for (const auto& L : rec.layers) {
        st.entries_live += L.table.live_total();
        std::uint64_t below = 0;
        for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) below += L.table.frontier(h);
        st.bytes_used += below * per_entry;
        if (L.off == 0) st.bytes_backed += memory_.backed_bytes(L.k) + memory_.backed_bytes(L.v);
        if (scale_bytes_) st.bytes_backed += memory_.backed_bytes(L.ks) + memory_.backed_bytes(L.vs);
        if (L.kr != no_range) st.bytes_backed += memory_.backed_bytes(L.kr);
        if (L.stage != no_range) st.bytes_backed += memory_.backed_bytes(L.stage);
      }
    }
    st.bytes_live = st.entries_live * per_entry;
    if constexpr (has_tiers) {
      st.tier = memory_.holding().stats();
      st.tier.bytes_demoted = tc_.demoted.load(std::memory_order_relaxed);
      st.tier.bytes_promoted = tc_.promoted.load(std::memory_order_relaxed);
      st.tier.bytes_prefetched = tc_.prefetched.load(std::memory_order_relaxed);
      st.tier.rows_hit = tc_.hit.load(std::memory_order_relaxed);
      st.tier.rows_missed = tc_.missed.load(std::memory_order_relaxed);
      st.tier.prefetch_waits = tc_.waits.load(std::memory_order_relaxed);
    }
    return st;
  }

 private:
  // A run of backed bytes [begin, end) of one range of a layer (part: 0 K, 1 V, 2 K metadata,
  // 3 V metadata, 4 key residual), held by hold() as one group.
  struct held_span {
    std::uint32_t layer = 0;
    std::uint32_t part = 0;
    std::size_t begin = 0;
    std::size_t end = 0;
  };
  struct staged_rows {
    std::uint32_t head = 0;
    std::uint32_t group = 0;
    std::uint32_t first = 0;
    std::uint32_t count = 0;
    std::size_t offset = 0;
  };
  struct layer_rec {
    range_id k = no_range;
    range_id v = no_range;
    range_id ks = no_range;  // out-of-band metadata of K and V (only when scale_bytes_ > 0)
    range_id vs = no_range;
    std::uint32_t layer = 0;  // index of this layer (shared per-layer scales)
    std::size_t off = 0;      // byte offset of the layer in k and v (range_scope::per_sequence)
    range_id kr = no_range;   // token-grouped keys: full-precision residual window
    // base addresses of k, v, ks, vs where the backend never moves them (stable_bases): the
    // append path then skips the backend's lock
    std::byte* kp = nullptr;
    std::byte* vp = nullptr;
    std::byte* ksp = nullptr;
    std::byte* vsp = nullptr;
    std::vector<std::uint32_t> qend;  // token-grouped keys: per head, slots below are quantized
    // tiers: a prefetch's staging range in the working tier, what it holds, its copy batch
    range_id stage = no_range;
    std::vector<staged_rows> staged;
    std::uint64_t stage_ticket = 0;
    slot_table table;
    typename Eviction::state state{};
    std::int64_t seen = 0;
  };
  using chunk = row_chunk;
  // Rows [first, first + count) of a held group of `head`, staged at byte `offset` of the stage.

  // Per sequence, so that calls on different sequences share no buffer; kept between calls so
  // the hot path does not allocate.
  struct scratch {
    std::vector<std::uint32_t> assign;
    std::vector<chunk> chunks;
    std::vector<write_request> requests;
    std::vector<std::uint32_t> victims;
    std::vector<float> key_group;  // one key group in fp32 (token-grouped keys)
    std::uint32_t short_heads = 0;  // heads the last evict() left above target (policy declined)
    tier_plan plan;                 // tiered policies: one head's plan
    std::vector<group_rows> predicted;
    std::vector<copy_op> ops;
    std::vector<std::int32_t> tags;
    std::vector<std::uint32_t> seen;
  };
  struct seq_rec {
    std::vector<layer_rec> layers;
    std::atomic<std::uint32_t> generation{0};
    std::atomic<bool> open{false};
    bool held = false;  // in the holding tier (hold()): no working-tier ranges until restore()
    std::vector<held_span> spans;  // while held by extents: where each held byte span goes back
    bool rows_held = false;        // held as live rows (per (layer, head) groups), not extents
    scratch sc;
  };
  friend struct detail::cache_access;  // check_invariants, state_digest (check.hpp)
  friend struct detail::test_access;   // tests that break invariants on purpose

  // Runs the invariant check of what a mutating call touched when it returns (on success and
  // on error alike), with KVCACHE_CHECK_INVARIANTS; an empty object otherwise.
  struct invariant_guard {
#if defined(KVCACHE_CHECK_INVARIANTS)
    const cache& c;
    const char* op;
    seq_id s{};
    std::uint32_t layer = ~std::uint32_t{0};  // all layers
    bool evict = false;
    std::uint32_t reserve = 0;
    invariant_guard(const cache& c_, const char* op_, seq_id s_ = {},
                    std::uint32_t layer_ = ~std::uint32_t{0}) noexcept
        : c(c_), op(op_), s(s_), layer(layer_) {}
    invariant_guard(const invariant_guard&) = delete;
    ~invariant_guard() { detail::cache_access::verify(c, op, s, layer, evict, reserve); }
    seq_id track(seq_id id) noexcept { return s = id; }
    void evicted(std::uint32_t r) noexcept { evict = true, reserve = r; }
#else
    constexpr invariant_guard(const cache&, const char*, seq_id = {}, std::uint32_t = 0) noexcept {}
    static constexpr seq_id track(seq_id id) noexcept { return id; }
    static constexpr void evicted(std::uint32_t) noexcept {}
#endif
  };

  // Held around calls into a policy or quantizer that keeps state shared by all sequences.
  [[nodiscard]] auto serialize() const {
    if constexpr (serializes_calls) return std::unique_lock<std::mutex>(serial_.m);
    else return detail::no_lock{};
  }

  [[nodiscard]] bool shares_ranges() const noexcept {
    return cfg_.ranges == range_scope::per_sequence;
  }

  //! True when a range's base address is fixed for its life (virtual-memory backends), so the
  //! cache may keep it instead of asking the backend (a mutex) on every append.
  static constexpr bool stable_bases = requires { requires static_cast<bool>(Memory::stable_data); };

  // Acquires every layer's K/V (and metadata, residual) ranges and binds their base addresses;
  // on failure releases what it took and returns the error.
  status acquire_ranges(std::vector<layer_rec>& layers, std::size_t hint) {
    for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l) {
      auto& L = layers[l];
      if (l > 0 && shares_ranges()) {  // the layers of a sequence share its two ranges
        L.k = layers[0].k;
        L.v = layers[0].v;
        L.off = l * layer_stride_;
        continue;
      }
      auto k = memory_.acquire(range_bytes_, hint);
      if (k) L.k = *k;
      auto v = k ? memory_.acquire(range_bytes_, hint) : result<range_id>(k.error());
      if (v) L.v = *v;
      if (!k || !v) {
        release_ranges(layers);
        return k ? v.error() : k.error();
      }
      if (scale_bytes_) {  // out-of-band metadata: a range of its own beside each of K and V
        const std::size_t shint = hint / code_bytes_ * scale_bytes_;
        auto ks = memory_.acquire(scale_range_bytes_, shint);
        if (ks) L.ks = *ks;
        auto vs = ks ? memory_.acquire(scale_range_bytes_, shint) : result<range_id>(ks.error());
        if (vs) L.vs = *vs;
        if (!ks || !vs) {
          release_ranges(layers);
          return ks ? vs.error() : ks.error();
        }
      }
      if constexpr (quant_token_grouped<Quant>()) {
        auto kr = memory_.acquire(residual_bytes_, residual_bytes_);
        if (!kr) {
          release_ranges(layers);
          return kr.error();
        }
        L.kr = *kr;
      }
    }
    bind_bases(layers);
    return {};
  }

  void bind_bases(std::vector<layer_rec>& layers) const {
    if constexpr (stable_bases) {
      for (auto& L : layers) {
        L.kp = memory_.data(L.k);
        L.vp = memory_.data(L.v);
        if (L.ks != no_range) L.ksp = memory_.data(L.ks);
        if (L.vs != no_range) L.vsp = memory_.data(L.vs);
      }
    } else {
      (void)layers;
    }
  }
  [[nodiscard]] std::byte* base(range_id r, std::byte* kept) const noexcept {
    if constexpr (stable_bases) return kept;
    else return (void)kept, memory_.data(r);
  }

  // Publishes a record for the layers; its id keeps the record's generation (bumped at close).
  seq_id install(std::vector<layer_rec>&& layers) {
    const std::lock_guard<std::mutex> lock(reg_.m);
    std::uint32_t i;
    if (!reg_.free.empty()) {
      i = reg_.free.back();
      reg_.free.pop_back();
    } else {
      i = reg_.recs.grow();
    }
    auto& rec = reg_.recs[i];
    rec.layers = std::move(layers);
    rec.open.store(true, std::memory_order_release);  // after the layers: readers see them
    reg_.open.fetch_add(1, std::memory_order_relaxed);
    return seq_id{i, rec.generation.load(std::memory_order_relaxed)};
  }

  void release_ranges(std::vector<layer_rec>& layers) {
    for (auto& L : layers) {
      wait_stage(L);
      if (L.stage != no_range) memory_.release(L.stage);
      L.stage = no_range;
      L.staged.clear();
      if (L.off != 0) {  // a layer of shared ranges: layer 0 owns them
        L.k = L.v = no_range;
        continue;
      }
      if (L.k != no_range) memory_.release(L.k);
      if (L.v != no_range) memory_.release(L.v);
      if (L.ks != no_range) memory_.release(L.ks);
      if (L.vs != no_range) memory_.release(L.vs);
      if (L.kr != no_range) memory_.release(L.kr);
      L.k = L.v = L.ks = L.vs = L.kr = no_range;
    }
  }

  // Bytes the next `steps` tokens of one layer may be written to: the rows above each head's
  // frontier (holes are below it, hence mapped already).
  void ahead_requests(const layer_rec& L, std::uint32_t steps, std::vector<write_request>& out) {
    const auto rows_end = [&](std::uint32_t frontier) {
      return std::min<std::size_t>(std::size_t{frontier} + steps, cfg_.max_tokens);
    };
    auto add = [&](std::size_t begin, std::size_t end) {
      if (begin >= end) return;
      out.push_back({L.k, begin, end});
      out.push_back({L.v, begin, end});
      if (scale_bytes_) {  // per-row metadata, laid out like the codes
        if (!quant_token_grouped<Quant>())
          out.push_back({L.ks, scale_offset(begin), scale_offset(end)});
        out.push_back({L.vs, scale_offset(begin), scale_offset(end)});
      }
    };
    if constexpr (quant_token_grouped<Quant>()) {  // KIVI: the key metadata of the next groups
      const std::size_t groups = rows_end(L.table.rows()) / Quant::group;
      if (groups)
        out.push_back({L.ks, 0,
                             std::min(scale_range_bytes_,
                                      groups * cfg_.geo.kv_heads * Quant::key_meta_bytes(cfg_.geo))});
    }
    if (cfg_.order == layout::token_major) {
      // a layer's row is layer_stride_ bytes at slot * slot_stride_ + off (the same when ranges
      // are per layer: off 0, layer_stride_ == slot_stride_)
      const std::size_t r0 = L.table.rows(), r1 = rows_end(L.table.rows());
      if (r1 > r0) add(r0 * slot_stride_ + L.off, (r1 - 1) * slot_stride_ + L.off + layer_stride_);
    } else {
      for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) {
        const std::size_t base = h * head_stride_;
        add(base + std::size_t{L.table.frontier(h)} * code_bytes_,
            base + rows_end(L.table.frontier(h)) * code_bytes_);
      }
    }
  }

  // Contiguous copies for the planned assignment, merged where both sides are contiguous.
  void plan_chunks(scratch& sc, std::uint32_t n, std::size_t off) {
    sc.chunks.clear();
    const std::uint32_t H = cfg_.geo.kv_heads;
    auto add = [&](std::size_t dst, std::size_t src, std::size_t rows) {
      if (!sc.chunks.empty()) {
        auto& c = sc.chunks.back();
        if (c.dst + c.rows * code_bytes_ == dst && c.src + c.rows == src) {
          c.rows += rows;
          return;
        }
      }
      sc.chunks.push_back({dst, src, rows});
    };
    for (std::uint32_t i = 0; i < n; ++i) {
      const std::uint32_t* a = &sc.assign[std::size_t{i} * H];
      bool same = cfg_.order == layout::token_major;
      for (std::uint32_t h = 1; same && h < H; ++h) same = a[h] == a[0];
      if (same) {
        add(std::size_t{a[0]} * slot_stride_ + off, std::size_t{i} * H, H);  // whole slot row
        continue;
      }
      for (std::uint32_t h = 0; h < H; ++h)
        add(std::size_t{a[h]} * slot_stride_ + h * head_stride_ + off, std::size_t{i} * H + h, 1);
    }
  }

  // ---- tiers --------------------------------------------------------------------------------

  // Holding-tier names: the owner is the sequence (index and generation); a tiered policy's
  // group lives under (layer, head, group); hold()'s spans under a flag bit and their index.
  static std::uint64_t owner_of(seq_id s) noexcept {
    return (std::uint64_t{s.generation} << 32) | s.index;
  }
  static hold_key row_key(seq_id s, std::uint32_t layer, std::uint32_t head, std::uint32_t group) noexcept {
    return {owner_of(s), (std::uint64_t{layer} << 40) | (std::uint64_t{head} << 32) | group};
  }
  static hold_key span_key(seq_id s, std::size_t i) noexcept {
    return {owner_of(s), (std::uint64_t{1} << 63) | i};
  }
  static hold_key live_key(seq_id s, std::uint32_t layer, std::uint32_t head) noexcept {
    return {owner_of(s), (std::uint64_t{3} << 62) | (std::uint64_t{layer} << 32) | head};
  }
  static range_id range_of(const layer_rec& L, std::uint32_t part) noexcept {
    const range_id r[] = {L.k, L.v, L.ks, L.vs, L.kr};
    return r[part];
  }

  // Waits for the layer's prefetch copies, if any are in flight.
  void wait_stage(layer_rec& L) {
    if constexpr (has_tiers) {
      if (!L.stage_ticket) return;
      auto& ho = memory_.holding();
      if (!ho.done(L.stage_ticket)) tc_.add(tc_.waits, 1);
      ho.wait(L.stage_ticket);
      L.stage_ticket = 0;
    } else {
      (void)L;
    }
  }

  // The bytes of a sequence's ranges that hold data: the used extents (rows below the
  // frontiers, metadata, residual window), without the parts of pages the backend has not backed
  // (a layer of shared ranges may use fewer rows than another).
  void backed_spans(const seq_rec& rec, std::vector<held_span>& out) const {
    const std::size_t gran = memory_.granularity();
    const std::uint32_t H = cfg_.geo.kv_heads;
    std::uint32_t top_rows = 0;
    for (const auto& L : rec.layers) top_rows = std::max(top_rows, L.table.rows());
    auto add = [&](const layer_rec& L, std::uint32_t part, std::size_t b, std::size_t e) {
      const range_id r = range_of(L, part);
      if (r == no_range || b >= e) return;
      e = std::min(e, memory_.capacity(r));
      for (std::size_t p = b; p < e;) {  // page by page: a shared range may miss some pages
        const std::size_t q = std::min((p / gran + 1) * gran, e);
        bool backed = true;
        if constexpr (requires(const Memory& m) { { m.backed(r, p, q) } -> std::same_as<bool>; })
          backed = memory_.backed(r, p, q);
        if (backed) {
          if (!out.empty() && out.back().layer == L.layer && out.back().part == part && out.back().end == p)
            out.back().end = q;
          else
            out.push_back({L.layer, part, p, q});
        }
        p = q;
      }
    };
    for (const auto& L : rec.layers) {
      if (L.off != 0) continue;  // layers > 0 of shared ranges: layer 0 owns them
      const slot_table& t = L.table;
      if (cfg_.order == layout::token_major) {
        const std::size_t rows = shares_ranges() ? top_rows : t.rows();
        add(L, 0, 0, rows * slot_stride_);
        add(L, 1, 0, rows * slot_stride_);
        if (scale_bytes_) {
          std::size_t ks = rows * scale_slot_stride_;
          if constexpr (quant_token_grouped<Quant>())
            ks = std::max(ks, std::min(scale_range_bytes_,
                                       rows / Quant::group * H * Quant::key_meta_bytes(cfg_.geo)));
          add(L, 2, 0, ks);
          add(L, 3, 0, rows * scale_slot_stride_);
        }
      } else {
        for (std::uint32_t h = 0; h < H; ++h) {
          const std::size_t f = t.frontier(h);
          add(L, 0, h * head_stride_, h * head_stride_ + f * code_bytes_);
          add(L, 1, h * head_stride_, h * head_stride_ + f * code_bytes_);
        }
        for (std::uint32_t h = 0; h < H && scale_bytes_; ++h) {
          const std::size_t f = t.frontier(h);
          add(L, 2, h * scale_head_stride_, h * scale_head_stride_ + f * scale_bytes_);
          add(L, 3, h * scale_head_stride_, h * scale_head_stride_ + f * scale_bytes_);
        }
      }
      if constexpr (quant_token_grouped<Quant>())
        if (L.seen > 0) add(L, 4, 0, std::size_t{Quant::residual} * cfg_.geo.token_bytes());
    }
  }

  // Requests backing rows [r0, r1) of every head of one layer (K, V and per-row metadata).
  void row_requests(const layer_rec& L, std::size_t r0, std::size_t r1,
                    std::vector<write_request>& out) const {
    if (r0 >= r1) return;
    auto add = [&](std::size_t b, std::size_t e) {
      out.push_back({L.k, b, e});
      out.push_back({L.v, b, e});
      if (scale_bytes_) {
        out.push_back({L.ks, scale_offset(b), scale_offset(e)});
        out.push_back({L.vs, scale_offset(b), scale_offset(e)});
      }
    };
    if (cfg_.order == layout::token_major) {
      add(r0 * slot_stride_ + L.off, (r1 - 1) * slot_stride_ + L.off + layer_stride_);
    } else {
      for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h)
        add(h * head_stride_ + r0 * code_bytes_, h * head_stride_ + r1 * code_bytes_);
    }
  }

  // Tiered policies at evict(): the resources first, for every layer evicted (room in the
  // holding tier for every live row, the most a plan can hold; working-tier pages for the rows a
  // head can reach within its budget), so that nothing changes when they fail; then each head's
  // plan.
  status evict_tiered(seq_id s, seq_rec& rec, std::uint32_t first, std::uint32_t last,
                      std::uint32_t reserve) {
    if constexpr (tiered_policy<Eviction>) {
      auto& sc = rec.sc;
      auto& ho = memory_.holding();
      sc.requests.clear();
      std::uint64_t live = 0;
      for (std::uint32_t l = first; l < last; ++l) {
        auto& L = rec.layers[l];
        wait_stage(L);
        std::uint32_t top = L.table.rows();
        for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) top = std::max(top, budget(l, h));
        row_requests(L, 0, std::min(top, cfg_.max_tokens), sc.requests);
        live += L.table.live_total();
      }
      const std::size_t need = live * (tier_row_bytes_ + sizeof(std::int32_t));
      const std::size_t free = ho.capacity() - std::min(ho.capacity(), ho.bytes());
      if (need > free)
        return {errc::capacity_exceeded,
                "evict: the holding tier has " + std::to_string(free) + " bytes free; a plan over " +
                    std::to_string(live) + " live rows may hold up to " + std::to_string(need)};
      KVCACHE_TRY(memory_.prepare(sc.requests));
      [[maybe_unused]] const auto serial = serialize();
      for (std::uint32_t l = first; l < last; ++l) KVCACHE_TRY(plan_layer(s, rec.layers[l], sc, l, reserve));
    } else {
      (void)s, (void)rec, (void)first, (void)last, (void)reserve;
    }
    return {};
  }

  status plan_layer(seq_id s, layer_rec& L, scratch& sc, std::uint32_t layer, std::uint32_t reserve) {
    if constexpr (tiered_policy<Eviction>) {
      const geometry one_head{1, cfg_.geo.kv_heads, cfg_.geo.kv_heads, cfg_.geo.head_dim, cfg_.geo.type};
      for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) {
        const std::uint32_t b = budget(layer, h), target = b > reserve ? b - reserve : 0;
        const key_reader_ctx ctx{make_view(L), &quant_, one_head};  // afresh: the table moves on
        const key_reader keys{L.table.rows(), cfg_.geo.head_dim, &ctx, &read_keys};
        sc.plan.clear();
        policy_.plan(L.state, L.table, keys, h, target, sc.plan);
        KVCACHE_TRY(check_plan(s, L, sc.plan, layer, h, target, sc.seen));
        KVCACHE_TRY(apply_plan(s, L, sc, layer, h));
      }
      L.staged.clear();  // consumed (or outdated): the next prefetch stages afresh
    } else {
      (void)s, (void)L, (void)sc, (void)layer, (void)reserve;
    }
    return {};
  }

  // A plan that would break the cache is a bug in the policy: refused before it is applied.
  status check_plan(seq_id s, const layer_rec& L, const tier_plan& P, std::uint32_t layer,
                    std::uint32_t h, std::uint32_t target, std::vector<std::uint32_t>& seen) const {
    const auto bad = [&](const std::string& what) {
      return status{errc::invariant_violation, "evict: the policy's plan for layer " +
                                                   std::to_string(layer) + " kv head " +
                                                   std::to_string(h) + " " + what};
    };
    const slot_table& t = L.table;
    const auto live = [&](std::uint32_t slot) {
      return slot < t.rows() && t.position(slot, h) != slot_table::empty;
    };
    for (const auto& r : P.hold)
      if (!live(r.slot)) return bad("holds slot " + std::to_string(r.slot) + ", which is not live");
    for (std::uint32_t slot : P.drop)
      if (!live(slot)) return bad("drops slot " + std::to_string(slot) + ", which is not live");
    if (P.drop.size() > 1) {  // each once
      seen.assign(P.drop.begin(), P.drop.end());
      std::sort(seen.begin(), seen.end());
      if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) return bad("drops a slot twice");
    }
    std::uint64_t fetched = 0;
    const auto& ho = memory_.holding();
    for (const auto& f : P.fetch) {
      std::uint64_t rows = ho.find(row_key(s, layer, h, f.group)).count;
      for (const auto& r : P.hold) rows += r.group == f.group;
      if (std::uint64_t{f.first} + f.count > rows)
        return bad("fetches rows [" + std::to_string(f.first) + ", " +
                   std::to_string(std::uint64_t{f.first} + f.count) + ") of group " +
                   std::to_string(f.group) + ", which holds " + std::to_string(rows));
      fetched += f.count;
    }
    const std::uint64_t after = t.live(h) - P.drop.size() + fetched;
    if (after > target || fetched > t.room(h) + P.drop.size())
      return bad("leaves " + std::to_string(after) + " live tokens, over its target " +
                 std::to_string(target));
    return {};
  }

  status apply_plan(seq_id s, layer_rec& L, scratch& sc, std::uint32_t layer, std::uint32_t h) {
    auto& ho = memory_.holding();
    const tier_plan& P = sc.plan;
    const std::size_t rb = tier_row_bytes_;
    for (std::size_t i = 0; i < P.hold.size();) {  // runs of one group: one extend each
      std::size_t j = i;
      sc.tags.clear();
      for (; j < P.hold.size() && P.hold[j].group == P.hold[i].group; ++j)
        sc.tags.push_back(L.table.position(P.hold[j].slot, h));
      auto dst = ho.extend(row_key(s, layer, h, P.hold[i].group), rb, sc.tags);
      if (!dst) return {dst.error().code(), "evict: " + dst.error().message()};
      for (std::size_t k = i; k < j; ++k) gather_row(L, P.hold[k].slot, h, *dst + (k - i) * rb);
      tc_.add(tc_.demoted, (j - i) * rb);
      i = j;
    }
    for (std::uint32_t slot : P.drop) L.table.vacate(h, slot);
    std::uint64_t hit = 0, missed = 0;
    for (const auto& f : P.fetch) {
      const auto held = ho.find(row_key(s, layer, h, f.group));
      for (std::uint32_t i = f.first; i < f.first + f.count; ++i) {
        const std::byte* src = staged_row(L, h, f.group, i);
        ++(src ? hit : missed);
        if (!src) src = held.rows + std::size_t{i} * rb;
        scatter_row(L, L.table.place(h, held.tags[i]), h, src);
      }
    }
    tc_.add(tc_.promoted, (hit + missed) * rb);
    tc_.add(tc_.hit, hit);
    tc_.add(tc_.missed, missed);
    return {};
  }

  // Row i of (head, group) in the layer's stage, or null when the last prefetch did not stage it.
  const std::byte* staged_row(const layer_rec& L, std::uint32_t h, std::uint32_t group,
                              std::uint32_t i) const {
    for (const auto& st : L.staged)
      if (st.head == h && st.group == group && i >= st.first && i - st.first < st.count)
        return memory_.data(L.stage) + st.offset + std::size_t{i - st.first} * tier_row_bytes_;
    return nullptr;
  }
  // A (slot, head) row between the working tier and a holding-tier record laid out as
  // [K codes][V codes][K metadata][V metadata].
  void gather_row(const layer_rec& L, std::uint32_t slot, std::uint32_t h, std::byte* dst) {
    auto& ho = memory_.holding();
    const std::size_t o = std::size_t{slot} * slot_stride_ + h * head_stride_ + L.off;
    ho.copy_in(dst, base(L.k, L.kp) + o, code_bytes_);
    ho.copy_in(dst + code_bytes_, base(L.v, L.vp) + o, code_bytes_);
    if (scale_bytes_) {
      const std::size_t so = std::size_t{slot} * scale_slot_stride_ + h * scale_head_stride_;
      ho.copy_in(dst + 2 * code_bytes_, base(L.ks, L.ksp) + so, scale_bytes_);
      ho.copy_in(dst + 2 * code_bytes_ + scale_bytes_, base(L.vs, L.vsp) + so, scale_bytes_);
    }
  }
  void scatter_row(const layer_rec& L, std::uint32_t slot, std::uint32_t h, const std::byte* src) {
    auto& ho = memory_.holding();
    const std::size_t o = std::size_t{slot} * slot_stride_ + h * head_stride_ + L.off;
    ho.copy_out(base(L.k, L.kp) + o, src, code_bytes_);
    ho.copy_out(base(L.v, L.vp) + o, src + code_bytes_, code_bytes_);
    if (scale_bytes_) {
      const std::size_t so = std::size_t{slot} * scale_slot_stride_ + h * scale_head_stride_;
      ho.copy_out(base(L.ks, L.ksp) + so, src + 2 * code_bytes_, scale_bytes_);
      ho.copy_out(base(L.vs, L.vsp) + so, src + 2 * code_bytes_ + scale_bytes_, scale_bytes_);
    }
  }

  void evict_layer(layer_rec& L, scratch& sc, std::uint32_t layer, std::uint32_t reserve) {
    if constexpr (detail::never_evicts<Eviction>::value) {
      (void)L;
      (void)sc;
      (void)layer;
      (void)reserve;
    } else {
      for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) {
        std::uint32_t target = budget(layer, h);
        if constexpr (detail::has_target<Eviction>) target = policy_.target(L.state, L.table, h, target);
        target = target > reserve ? target - reserve : 0;
        const std::uint32_t live = L.table.live(h);
        if (live <= target) continue;
        sc.victims.clear();
        policy_.select(L.state, L.table, h, live - target, sc.victims);
        KVCACHE_ASSERT(sc.victims.size() <= live - target);
        sc.short_heads += sc.victims.size() < live - target;  // e.g. sinks that never go
        for (std::uint32_t slot : sc.victims) L.table.vacate(h, slot);
      }
    }
  }

  // The storage format, common to layer and batch views.
  template <class View>
  void fill_format(View& v) const noexcept {
    v.slot_stride = slot_stride_;
    v.head_stride = head_stride_;
    v.row_bytes = code_bytes_;
    v.type = cfg_.geo.type;
    v.order = cfg_.order;
    v.kv_heads = cfg_.geo.kv_heads;
    v.head_dim = cfg_.geo.head_dim;
    v.format = Quant::name();
    v.bits = quant_bits<Quant>();
    v.group = quant_group<Quant>();
    if (scale_bytes_) {
      v.scale_bytes = scale_bytes_;
      v.scale_slot_stride = scale_slot_stride_;
      v.scale_head_stride = scale_head_stride_;
    } else {
      v.scale_head_stride = quant_shared_scale_head_stride(quant_);  // slot stride 0: shared
    }
  }

  // Metadata of K and V of one layer: the per-row range, or the quantizer's shared scales.
  std::pair<const std::byte*, const std::byte*> scale_data(const layer_rec& L) const {
    if (scale_bytes_) return {memory_.data(L.ks), memory_.data(L.vs)};
    return {reinterpret_cast<const std::byte*>(quant_shared_scales(quant_, L.layer, kv_part::k)),
            reinterpret_cast<const std::byte*>(quant_shared_scales(quant_, L.layer, kv_part::v))};
  }
  // Where the metadata of the row at code offset `dst` lives, and that row's KV head.
  [[nodiscard]] std::size_t scale_offset(std::size_t dst) const noexcept {
    if (!scale_bytes_) return 0;
    if (cfg_.order == layout::token_major) return dst / code_bytes_ * scale_bytes_;
    return dst / head_stride_ * scale_head_stride_ + dst % head_stride_ / code_bytes_ * scale_bytes_;
  }
  [[nodiscard]] std::uint32_t head_of(std::size_t dst) const noexcept {
    return static_cast<std::uint32_t>(cfg_.order == layout::token_major
                                          ? dst / code_bytes_ % cfg_.geo.kv_heads
                                          : dst / head_stride_);
  }

  // Token-grouped keys (KIVI), token_major: a key whose slot is in the residual window is stored
  // at full precision there; a key refilling a slot of a quantized group requantizes the group.
  void write_grouped_keys(layer_rec& L, scratch& sc, const std::byte* src, std::uint32_t n) {
    if constexpr (quant_token_grouped<Quant>()) {
      const std::uint32_t H = cfg_.geo.kv_heads, G = Quant::group, R = Quant::residual;
      const std::size_t hb = cfg_.geo.head_bytes(), D = cfg_.geo.head_dim;
      std::byte* res = memory_.data(L.kr);
      std::byte* kb = memory_.data(L.k);
      std::byte* meta = memory_.data(L.ks);
      for (std::uint32_t i = 0; i < n; ++i)
        for (std::uint32_t h = 0; h < H; ++h) {
          const std::uint32_t s = sc.assign[std::size_t{i} * H + h];
          const std::byte* row = src + (std::size_t{i} * H + h) * hb;
          // an append crossing windows: the window below is full, quantize it before reusing
          // its residual rows
          while (s >= L.qend[h] + R) flush_window(L, sc, h);
          if (s >= L.qend[h]) {
            std::memcpy(res + (std::size_t{s % R} * H + h) * hb, row, hb);
            continue;
          }
          const std::uint32_t g = s / G;
          std::byte* codes = kb + std::size_t{g} * G * slot_stride_ + h * head_stride_;
          std::byte* m = meta + (std::size_t{g} * H + h) * Quant::key_meta_bytes(cfg_.geo);
          sc.key_group.resize(std::size_t{G} * D);
          quant_.decode_key_group(codes, slot_stride_, G, cfg_.geo, m, sc.key_group.data());
          detail::load_row(row, 0, D, cfg_.geo.type, sc.key_group.data() + std::size_t{s - g * G} * D);
          quant_.encode_key_group(sc.key_group.data(), cfg_.geo, codes, slot_stride_, m);
        }
    } else {
      (void)L, (void)sc, (void)src, (void)n;
    }
  }
  // Quantizes, per head, each residual window whose slots have all been filled.
  void flush_key_groups(layer_rec& L, scratch& sc) {
    if constexpr (quant_token_grouped<Quant>()) {
      for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h)
        while (L.table.frontier(h) >= L.qend[h] + Quant::residual) flush_window(L, sc, h);
    } else {
      (void)L, (void)sc;
    }
  }
  // Quantizes the residual window [qend, qend + R) of head h per channel, group by group.
  void flush_window(layer_rec& L, scratch& sc, std::uint32_t h) {
    if constexpr (quant_token_grouped<Quant>()) {
      const std::uint32_t H = cfg_.geo.kv_heads, G = Quant::group, R = Quant::residual;
      const std::size_t hb = cfg_.geo.head_bytes(), D = cfg_.geo.head_dim;
      const std::byte* res = memory_.data(L.kr);
      std::byte* kb = memory_.data(L.k);
      std::byte* meta = memory_.data(L.ks);
      sc.key_group.resize(std::size_t{G} * D);
      for (std::uint32_t g = L.qend[h] / G; g < (L.qend[h] + R) / G; ++g) {
        for (std::uint32_t j = 0; j < G; ++j)
          detail::load_row(res + (std::size_t{(g * G + j) % R} * H + h) * hb, 0, D, cfg_.geo.type,
                           sc.key_group.data() + std::size_t{j} * D);
        quant_.encode_key_group(sc.key_group.data(), cfg_.geo,
                                kb + std::size_t{g} * G * slot_stride_ + h * head_stride_,
                                slot_stride_,
                                meta + (std::size_t{g} * H + h) * Quant::key_meta_bytes(cfg_.geo));
      }
      L.qend[h] += R;
    } else {
      (void)L, (void)sc, (void)h;
    }
  }

  layer_view make_view(const layer_rec& L) const {
    layer_view v;
    fill_format(v);
    v.k = memory_.data(L.k) + L.off;
    v.v = memory_.data(L.v) + L.off;
    std::tie(v.k_scales, v.v_scales) = scale_data(L);
    if constexpr (quant_token_grouped<Quant>()) {
      v.k_residual = memory_.data(L.kr);
      v.k_quantized = L.qend.data();
      v.residual = Quant::residual;
    }
    v.rows = L.table.rows();
    v.positions = L.table.positions();
    v.live = L.table.live_data();
    v.next_position = L.seen;
    v.dense = L.table.dense();
    return v;
  }

  status check_seq(seq_id s, const char* op) const {
    if (!is_open(s))
      return {errc::unknown_sequence, std::string(op) + ": sequence " + std::to_string(s.index) +
                                          "/" + std::to_string(s.generation) +
                                          " is not open (never opened, closed, or stale)"};
    return {};
  }
  // check_seq, and the sequence is in the working tier (not held).
  status check_active(seq_id s, const char* op) const {
    KVCACHE_TRY(check_seq(s, op));
    if (reg_.recs[s.index].held)
      return {errc::invalid_argument, std::string(op) + ": sequence " + std::to_string(s.index) +
                                          " is held in the holding tier; restore() it first"};
    return {};
  }
  status check_layer(std::uint32_t layer) const {
    if (layer >= cfg_.geo.layers)
      return {errc::layer_out_of_range, "layer " + std::to_string(layer) + " out of range (" +
                                            std::to_string(cfg_.geo.layers) + " layers)"};
    return {};
  }
  status check_budget(std::uint32_t tokens) const {
    if (tokens == 0 || tokens > cfg_.max_tokens)
      return {errc::invalid_budget, "budget " + std::to_string(tokens) +
                                        " must be in [1, max_tokens = " +
                                        std::to_string(cfg_.max_tokens) + "]"};
    return {};
  }
  status check_tensor(const kv_tensor& t, const char* name) const {
    const auto& g = cfg_.geo;
    if (t.heads != g.kv_heads || t.head_dim != g.head_dim)
      return {errc::shape_mismatch, std::string("append: ") + name + " is [" +
                                        std::to_string(t.tokens) + "][" + std::to_string(t.heads) +
                                        "][" + std::to_string(t.head_dim) + "], expected [n][" +
                                        std::to_string(g.kv_heads) + "][" +
                                        std::to_string(g.head_dim) + "]"};
    if (t.type != g.type)
      return {errc::shape_mismatch, std::string("append: ") + name + " has element type " +
                                        to_string(t.type) + ", the cache stores " +
                                        to_string(g.type)};
    if (t.tokens > 0 && t.data == nullptr)
      return {errc::invalid_argument, std::string("append: ") + name + " data is null"};
    return {};
  }

  status check_signal(const layer_rec& L, const attention_signal& a) const {
    if (a.query_heads != cfg_.geo.query_heads || a.slots != L.table.rows() || a.queries == 0)
      return {errc::shape_mismatch,
              "observe: attention is [" + std::to_string(a.query_heads) + "][" +
                  std::to_string(a.queries) + "][" + std::to_string(a.slots) + "], expected [" +
                  std::to_string(cfg_.geo.query_heads) + "][q >= 1][" +
                  std::to_string(L.table.rows()) + " slots of the current view]"};
    if (!a.probs) return {errc::invalid_argument, "observe: attention probabilities are null"};
    return {};
  }
  status check_signal(const layer_rec&, const query_signal& q) const {
    if (q.queries == 0 || !q.data) return {errc::invalid_argument, "observe: no queries given"};
    return {};
  }
  status check_signal(const layer_rec&, const probe_signal& q) const {
    if (q.queries == 0 || !q.data) return {errc::invalid_argument, "observe: no probe queries given"};
    return {};
  }
  status check_signal(const layer_rec& L, const attention_sum_signal& a) const {
    if (a.query_heads != cfg_.geo.query_heads || a.slots != L.table.rows())
      return {errc::shape_mismatch,
              "observe: attention sums are [" + std::to_string(a.query_heads) + "][" +
                  std::to_string(a.slots) + "], expected [" + std::to_string(cfg_.geo.query_heads) +
                  "][" + std::to_string(L.table.rows()) + " slots of the current view]"};
    if (!a.sums) return {errc::invalid_argument, "observe: attention sums are null"};
    return {};
  }

  // Key access for policies that score queries against the cached keys (key_reader).
  struct key_reader_ctx {
    layer_view view;
    const Quant* quant;
    geometry one_head;  // decode() works on rows of one head
  };
  static void read_keys(const void* p, std::uint32_t head, std::uint32_t first, std::uint32_t count,
                        float* out) {
    const auto& c = *static_cast<const key_reader_ctx*>(p);
    const std::size_t D = c.one_head.head_dim;
    for (std::uint32_t i = 0; i < count; ++i)  // any format, KIVI's grouped keys included
      decode_key(c.view, *c.quant, first + i, head, out + i * D);
  }
  template <class... Needed, class... S>
  status observe_joint(layer_rec& L, const key_reader& keys, signal_list<Needed...>,
                       const S&... sigs) {
    return policy_.observe(L.state, L.table, keys, detail::pick_signal<Needed>(sigs...)...);
  }
  template <class Sig>
  status check_signal(const layer_rec& L, const Sig& sig) const {
    // token-wise signals describe the tokens of the last append
    if (sig.tokens > L.seen)
      return {errc::shape_mismatch, "observe: signal covers " + std::to_string(sig.tokens) +
                                        " tokens but only " + std::to_string(L.seen) +
                                        " were appended"};
    const void* data = nullptr;
    if constexpr (requires { sig.data; }) data = sig.data;
    else if constexpr (requires { sig.flags; }) data = sig.flags;
    else data = sig.ids;
    if (sig.tokens > 0 && !data) return {errc::invalid_argument, "observe: signal data is null"};
    return {};
  }

  cache_config cfg_;
  Memory memory_;
  [[no_unique_address]] Eviction policy_;
  [[no_unique_address]] Quant quant_;
  std::size_t code_bytes_ = 0;
  std::size_t scale_bytes_ = 0;  // out-of-band metadata per row (0: none, or held by the quantizer)
  std::size_t scale_slot_stride_ = 0;
  std::size_t scale_head_stride_ = 0;
  std::size_t scale_range_bytes_ = 0;
  std::size_t residual_bytes_ = 0;  // token-grouped keys: the residual window's range
  std::size_t layer_stride_ = 0;  // bytes of one layer in a slot row (token_major)
  std::size_t slot_stride_ = 0;
  std::size_t head_stride_ = 0;
  std::size_t range_bytes_ = 0;
  std::vector<std::uint32_t> budget_;
  std::vector<std::uint32_t> head_budget_;  // [layer][kv_head], 0 = the layer's; empty = none set
  detail::seq_registry<seq_rec> reg_;
  detail::fresh_mutex serial_;  // calls into a policy/quantizer with shared state (serialize())
  detail::fresh_mutex ahead_;   // map_ahead's scratch
  detail::tier_counters tc_;    // moves between tiers (stats().tier)
  std::size_t tier_row_bytes_ = 0;  // a (token, head) row moved between tiers: K, V codes, metadata
  std::size_t stage_bytes_ = 0;     // capacity of a layer's prefetch staging range
  std::vector<write_request> ahead_requests_;
};

KVCACHE_NAMESPACE_END

#include <kvcache/sequence.hpp>  // the owning handle, defined once cache is complete
