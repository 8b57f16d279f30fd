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
//! Thread safety: none inside one cache object; use one cache per thread, or serialize.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/signals.hpp>
#include <kvcache/core/slot_table.hpp>
#include <kvcache/core/view.hpp>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/evict/policy.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/quant/passthrough.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

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

struct cache_stats {
  memory_stats memory;
  std::size_t sequences = 0;
  std::uint64_t entries_live = 0;  //!< live (token, head) entries over all sequences and layers
  std::size_t bytes_live = 0;      //!< K+V bytes of live entries (codes and scales)
  std::size_t bytes_used = 0;      //!< K+V bytes below the frontiers (live entries and holes)
  std::size_t bytes_backed = 0;    //!< K+V bytes of memory backing the open sequences' ranges
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
}  // namespace detail

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
    code_bytes_ = quant_.code_bytes(cfg.geo);
    const std::size_t gran = memory_.granularity();
    if (cfg.order == layout::token_major) {
      slot_stride_ = code_bytes_ * cfg.geo.kv_heads;
      head_stride_ = code_bytes_;
      range_bytes_ = round_up(std::size_t{cfg.max_tokens} * slot_stride_, gran);
    } else {
      slot_stride_ = code_bytes_;
      head_stride_ = round_up(std::size_t{cfg.max_tokens} * code_bytes_, gran);  // page aligned
      range_bytes_ = head_stride_ * cfg.geo.kv_heads;
    }
    budget_.assign(cfg.geo.layers, cfg.budget ? cfg.budget : cfg.max_tokens);
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

  //! Tokens each head of `layer` keeps after evict().
  status set_budget(std::uint32_t layer, std::uint32_t tokens) {
    KVCACHE_TRY(check_layer(layer));
    KVCACHE_TRY(check_budget(tokens));
    budget_[layer] = tokens;
    return {};
  }
  //! The same budget for every layer.
  status set_budget(std::uint32_t tokens) {
    KVCACHE_TRY(check_budget(tokens));
    budget_.assign(budget_.size(), tokens);
    return {};
  }
  [[nodiscard]] std::uint32_t budget(std::uint32_t layer) const noexcept { return budget_[layer]; }

  // ---- sequences -------------------------------------------------------------------------

  //! Opens a sequence. `expected_tokens` (e.g. the prompt length) guides the best-fit reuse of
  //! ranges released by finished sequences; 0 = unknown (reuse the most mapped).
  result<seq_id> open(std::uint32_t expected_tokens = 0) {
    const std::size_t expected = std::min(expected_tokens, cfg_.max_tokens);
    const std::size_t hint = cfg_.order == layout::token_major
                                 ? expected * slot_stride_
                                 : cfg_.geo.kv_heads * round_up(expected * code_bytes_,
                                                                memory_.granularity());
    seq_rec rec;
    rec.layers.resize(cfg_.geo.layers);
    for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l) {
      auto& L = rec.layers[l];
      auto k = memory_.acquire(range_bytes_, hint);
      if (k) L.k = *k;
      auto v = k ? memory_.acquire(range_bytes_, hint) : result<range_id>(k.error());
      if (v) L.v = *v;
      if (!k || !v) {
        release_ranges(rec);
        return k ? v.error() : k.error();
      }
      L.table = slot_table(cfg_.geo.kv_heads, cfg_.max_tokens);
      L.state = policy_.make_state(policy_context{cfg_.geo, l, cfg_.max_tokens});
    }
    return install(std::move(rec));
  }

  //! Closes a sequence; its ranges go back to the memory backend (kept mapped for reuse where the
  //! backend defers reclamation).
  status close(seq_id s) {
    KVCACHE_TRY(check_seq(s, "close"));
    auto& rec = seqs_[s.index];
    release_ranges(rec);
    rec.layers.clear();
    rec.open = false;
    ++rec.generation;
    free_seqs_.push_back(s.index);
    --open_count_;
    return {};
  }

  //! A new sequence holding the same tokens as `parent`, sharing its memory where the backend
  //! can (copy-on-write pages); policy state and slot maps are copied.
  result<seq_id> fork(seq_id parent) {
    KVCACHE_TRY(check_seq(parent, "fork"));
    seq_rec rec;
    rec.layers.reserve(cfg_.geo.layers);
    for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l) {
      const auto& P = seqs_[parent.index].layers[l];
      const std::size_t used = cfg_.order == layout::token_major
                                   ? std::size_t{P.table.rows()} * slot_stride_
                                   : range_bytes_;
      layer_rec L;
      auto k = memory_.fork(P.k, used);
      if (k) L.k = *k;
      auto v = k ? memory_.fork(P.v, used) : result<range_id>(k.error());
      if (v) L.v = *v;
      if (!k || !v) {
        rec.layers.push_back(std::move(L));
        release_ranges(rec);
        return k ? v.error() : k.error();
      }
      L.table = P.table;
      L.state = P.state;
      L.seen = P.seen;
      rec.layers.push_back(std::move(L));
    }
    return install(std::move(rec));
  }

  [[nodiscard]] bool is_open(seq_id s) const noexcept {
    return s.index < seqs_.size() && seqs_[s.index].open && seqs_[s.index].generation == s.generation;
  }
  [[nodiscard]] std::size_t sequences() const noexcept { return open_count_; }

  // ---- tokens ----------------------------------------------------------------------------

  //! Appends the K/V of `k.tokens` tokens (prefill or decode) to one layer. Each head writes into
  //! its evicted slots first, then at its frontier. Fails with capacity_exceeded when a head has
  //! fewer free slots than tokens (call evict() first), out_of_pages when memory runs out.
  status append(seq_id s, std::uint32_t layer, const kv_tensor& k, const kv_tensor& v) {
    KVCACHE_TRY(check_seq(s, "append"));
    KVCACHE_TRY(check_layer(layer));
    KVCACHE_TRY(check_tensor(k, "k"));
    KVCACHE_TRY(check_tensor(v, "v"));
    if (k.tokens != v.tokens)
      return {errc::shape_mismatch, "append: k has " + std::to_string(k.tokens) +
                                        " tokens but v has " + std::to_string(v.tokens)};
    const std::uint32_t n = k.tokens;
    if (n == 0) return {};
    auto& L = seqs_[s.index].layers[layer];
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

    // Plan where every (token, head) goes, and the contiguous copies that puts them there.
    // Fast path: token-major with no holes and one frontier: one copy into consecutive rows.
    const bool rows_path = cfg_.order == layout::token_major && L.table.aligned();
    assign_.resize(std::size_t{n} * H);
    if (rows_path) {
      const std::uint32_t f = L.table.frontier(0);
      for (std::uint32_t i = 0; i < n; ++i)
        std::fill_n(assign_.begin() + std::size_t{i} * H, H, f + i);
      chunks_.assign(1, chunk{std::size_t{f} * slot_stride_, 0, std::size_t{n} * H});
    } else {
      for (std::uint32_t i = 0; i < n; ++i)
        for (std::uint32_t h = 0; h < H; ++h) assign_[std::size_t{i} * H + h] = L.table.peek(h, i);
      plan_chunks(n);
    }
    requests_.clear();
    for (const auto& c : chunks_) {
      const std::size_t end = c.dst + c.rows * code_bytes_;
      requests_.push_back({L.k, c.dst, end});
      requests_.push_back({L.v, c.dst, end});
    }
    KVCACHE_TRY(memory_.prepare(requests_));  // the only step that can fail: nothing changed yet

    std::byte* kb = memory_.data(L.k);
    std::byte* vb = memory_.data(L.v);
    const std::size_t src_row = cfg_.geo.head_bytes();
    const auto* ks = static_cast<const std::byte*>(k.data);
    const auto* vs = static_cast<const std::byte*>(v.data);
    for (const auto& c : chunks_) {
      quant_.encode(ks + c.src * src_row, c.rows, cfg_.geo, kb + c.dst, nullptr);
      quant_.encode(vs + c.src * src_row, c.rows, cfg_.geo, vb + c.dst, nullptr);
    }
    const std::int64_t first = L.seen;
    if (rows_path) {
      L.table.place_rows(n, static_cast<std::int32_t>(first));
    } else {
      for (std::uint32_t i = 0; i < n; ++i)
        for (std::uint32_t h = 0; h < H; ++h) {
          [[maybe_unused]] const std::uint32_t slot =
              L.table.place(h, static_cast<std::int32_t>(first + i));
          KVCACHE_ASSERT(slot == assign_[std::size_t{i} * H + h]);
        }
    }
    L.seen += n;
    policy_.on_append(L.state, L.table, placement{assign_, H, n, first});
    return {};
  }

  //! Feeds the policy the signals it consumes, for one layer. The arguments must be exactly the
  //! policy's `signals` (checked at compile time).
  template <class... S>
  status observe(seq_id s, std::uint32_t layer, const S&... sigs) {
    static_assert((is_signal<S> && ...), "kvcache: observe() takes kvcache signal structs only");
    static_assert((detail::signal_is_consumed<Eviction, S>::value && ...));
    static_assert(detail::all_signals_given<signals, S...>::value);
    KVCACHE_TRY(check_seq(s, "observe"));
    KVCACHE_TRY(check_layer(layer));
    auto& L = seqs_[s.index].layers[layer];
    status st;
    ((st.ok() ? (st = check_signal(L, sigs)) : st), ...);
    KVCACHE_TRY(st);
    ((st.ok() ? (st = policy_.observe(L.state, L.table, sigs)) : st), ...);
    return st;
  }

  //! Evicts, per head, until at most `budget(layer) - reserve` tokens remain (`reserve` makes
  //! room ahead of an append, StreamingLLM's evict_for_space).
  status evict(seq_id s, std::uint32_t layer, std::uint32_t reserve = 0) {
    KVCACHE_TRY(check_seq(s, "evict"));
    KVCACHE_TRY(check_layer(layer));
    if (reserve > budget_[layer])
      return {errc::invalid_argument, "evict: reserve " + std::to_string(reserve) +
                                          " exceeds the budget " + std::to_string(budget_[layer])};
    evict_layer(seqs_[s.index].layers[layer], budget_[layer] - reserve);
    return {};
  }
  //! evict() on every layer.
  status evict(seq_id s) {
    KVCACHE_TRY(check_seq(s, "evict"));
    for (std::uint32_t l = 0; l < cfg_.geo.layers; ++l)
      evict_layer(seqs_[s.index].layers[l], budget_[l]);
    return {};
  }

  // ---- views -----------------------------------------------------------------------------

  result<layer_view> view(seq_id s, std::uint32_t layer) const {
    KVCACHE_TRY(check_seq(s, "view"));
    KVCACHE_TRY(check_layer(layer));
    return make_view(seqs_[s.index].layers[layer]);
  }

  //! One layer of many sequences (pointer arrays + lengths, as varlen kernels take them).
  result<batch_view> batch(std::span<const seq_id> seqs, std::uint32_t layer) const {
    KVCACHE_TRY(check_layer(layer));
    for (const auto& s : seqs) KVCACHE_TRY(check_seq(s, "batch"));
    batch_view b;
    fill_format(b);
    b.cu_rows.push_back(0);
    for (const auto& s : seqs) {
      const auto& L = seqs_[s.index].layers[layer];
      b.k.push_back(memory_.data(L.k));
      b.v.push_back(memory_.data(L.v));
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
    st.sequences = open_count_;
    const std::size_t per_entry = 2 * (code_bytes_ + quant_.scale_bytes(cfg_.geo));
    for (const auto& rec : seqs_) {
      if (!rec.open) continue;
      for (const auto& L : rec.layers) {
        st.entries_live += L.table.live_total();
        std::uint64_t below = 0;
        for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) below += L.table.frontier(h);
        st.bytes_used += below * per_entry;
        st.bytes_backed += memory_.backed_bytes(L.k) + memory_.backed_bytes(L.v);
      }
    }
    st.bytes_live = st.entries_live * per_entry;
    return st;
  }

 private:
  struct layer_rec {
    range_id k = no_range;
    range_id v = no_range;
    slot_table table;
    typename Eviction::state state{};
    std::int64_t seen = 0;
  };
  struct seq_rec {
    std::vector<layer_rec> layers;
    std::uint32_t generation = 0;
    bool open = false;
  };
  struct chunk {
    std::size_t dst;  // byte offset in the range
    std::size_t src;  // index of the first (token, head) row in the input
    std::size_t rows;
  };

  seq_id install(seq_rec&& rec) {
    rec.open = true;
    ++open_count_;
    if (!free_seqs_.empty()) {
      const std::uint32_t i = free_seqs_.back();
      free_seqs_.pop_back();
      rec.generation = seqs_[i].generation;
      seqs_[i] = std::move(rec);
      return seq_id{i, seqs_[i].generation};
    }
    seqs_.push_back(std::move(rec));
    return seq_id{static_cast<std::uint32_t>(seqs_.size() - 1), 0};
  }

  void release_ranges(seq_rec& rec) {
    for (auto& L : rec.layers) {
      if (L.k != no_range) memory_.release(L.k);
      if (L.v != no_range) memory_.release(L.v);
      L.k = L.v = no_range;
    }
  }

  // Contiguous copies for the planned assignment, merged where both sides are contiguous.
  void plan_chunks(std::uint32_t n) {
    chunks_.clear();
    const std::uint32_t H = cfg_.geo.kv_heads;
    auto add = [&](std::size_t dst, std::size_t src, std::size_t rows) {
      if (!chunks_.empty()) {
        auto& c = chunks_.back();
        if (c.dst + c.rows * code_bytes_ == dst && c.src + c.rows == src) {
          c.rows += rows;
          return;
        }
      }
      chunks_.push_back({dst, src, rows});
    };
    for (std::uint32_t i = 0; i < n; ++i) {
      const std::uint32_t* a = &assign_[std::size_t{i} * H];
      bool same = cfg_.order == layout::token_major;
      for (std::uint32_t h = 1; same && h < H; ++h) same = a[h] == a[0];
      if (same) {
        add(std::size_t{a[0]} * slot_stride_, std::size_t{i} * H, H);  // whole slot row
        continue;
      }
      for (std::uint32_t h = 0; h < H; ++h)
        add(std::size_t{a[h]} * slot_stride_ + h * head_stride_, std::size_t{i} * H + h, 1);
    }
  }

  void evict_layer(layer_rec& L, std::uint32_t target) {
    if constexpr (detail::never_evicts<Eviction>::value) {
      (void)L;
      (void)target;
    } else {
      for (std::uint32_t h = 0; h < cfg_.geo.kv_heads; ++h) {
        const std::uint32_t live = L.table.live(h);
        if (live <= target) continue;
        victims_.clear();
        policy_.select(L.state, L.table, h, live - target, victims_);
        KVCACHE_ASSERT(victims_.size() <= live - target);
        for (std::uint32_t slot : victims_) L.table.vacate(h, slot);
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
  }

  layer_view make_view(const layer_rec& L) const {
    layer_view v;
    fill_format(v);
    v.k = memory_.data(L.k);
    v.v = memory_.data(L.v);
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
  template <class Sig>
  status check_signal(const layer_rec& L, const Sig& sig) const {
    // token-wise signals describe the tokens of the last append
    if (sig.tokens > L.seen)
      return {errc::shape_mismatch, "observe: signal covers " + std::to_string(sig.tokens) +
                                        " tokens but only " + std::to_string(L.seen) +
                                        " were appended"};
    return {};
  }

  cache_config cfg_;
  Memory memory_;
  [[no_unique_address]] Eviction policy_;
  [[no_unique_address]] Quant quant_;
  std::size_t code_bytes_ = 0;
  std::size_t slot_stride_ = 0;
  std::size_t head_stride_ = 0;
  std::size_t range_bytes_ = 0;
  std::vector<std::uint32_t> budget_;
  std::vector<seq_rec> seqs_;
  std::vector<std::uint32_t> free_seqs_;
  std::size_t open_count_ = 0;
  // scratch kept between calls so the hot path does not allocate
  std::vector<std::uint32_t> assign_;
  std::vector<chunk> chunks_;
  std::vector<write_request> requests_;
  std::vector<std::uint32_t> victims_;
};

KVCACHE_NAMESPACE_END
