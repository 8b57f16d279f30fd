// SPDX-License-Identifier: Apache-2.0
//! @file
//! `heap_memory`: the baseline backend. Each range is one malloc'd block grown with realloc
//! (geometric growth, so appends cost amortized O(1) copies), freed on release; fork copies.
//! No pages, no sharing, no reuse beyond what malloc itself does. Benchmarks measure the
//! virtual-memory backends against it.
//!
//! Thread safety: every member may be called from any thread (one internal mutex). A range's
//! data() moves when prepare() grows it: only the range's user may prepare it, and re-reads data().
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/memory/backend.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

namespace detail {
struct test_access;  // defined only by tests (a peer that may break invariants on purpose)
}  // namespace detail

struct heap_memory_config {
  //! Upper bound on bytes held by all ranges together (out_of_pages past it); 0 = unlimited.
  std::size_t max_bytes = 0;
  //! Growth factor of realloc (>= 1); 1 grows to exactly what is asked (the naive concat cache).
  double growth = 2.0;
};

class heap_memory {
 public:
  explicit heap_memory(const heap_memory_config& cfg = {}) : cfg_(cfg) {
    if (!(cfg.growth >= 1.0)) raise(errc::invalid_argument, "heap_memory: growth must be >= 1");
  }
  heap_memory(const heap_memory&) = delete;
  heap_memory& operator=(const heap_memory&) = delete;
  heap_memory(heap_memory&& o) noexcept
      : cfg_(o.cfg_), ranges_(std::move(o.ranges_)), free_ids_(std::move(o.free_ids_)),
        held_(o.held_), stats_(o.stats_) {
    o.ranges_.clear();
  }
  heap_memory& operator=(heap_memory&&) = delete;
  ~heap_memory() {
    for (auto& r : ranges_) std::free(r.data);
  }

  [[nodiscard]] std::size_t granularity() const noexcept { return 1; }

  result<range_id> acquire(std::size_t capacity, std::size_t hint = 0) {
    const lock_type lock(mu_);
    return acquire_locked(capacity, hint);
  }
  //! Grows blocks to cover the requests (moving their data: re-read data() afterwards).
  //! The byte budget is checked against the exact need; growth beyond it is geometric only as
  //! far as the budget's slack allows.
  status prepare(std::span<const write_request> reqs) {
    const lock_type lock(mu_);
    return prepare_locked(reqs);
  }
  result<range_id> fork(range_id parent, std::size_t bytes) {
    const lock_type lock(mu_);
    return fork_locked(parent, bytes);
  }
  void release(range_id r) {
    const lock_type lock(mu_);
    release_locked(r);
  }

  [[nodiscard]] std::byte* data(range_id r) const noexcept {
    const lock_type lock(mu_);
    return ranges_[r].data;
  }
  [[nodiscard]] std::size_t capacity(range_id r) const noexcept {
    const lock_type lock(mu_);
    return ranges_[r].capacity;
  }
  [[nodiscard]] std::size_t backed_bytes(range_id r) const noexcept {
    const lock_type lock(mu_);
    return ranges_[r].size;
  }
  //! True when r names a range acquired and not yet released.
  [[nodiscard]] bool active(range_id r) const noexcept {
    const lock_type lock(mu_);
    return r < ranges_.size() && ranges_[r].active;
  }
  //! True when bytes [begin, end) of range r are allocated.
  [[nodiscard]] bool backed(range_id r, std::size_t begin, std::size_t end) const noexcept {
    const lock_type lock(mu_);
    return r < ranges_.size() && (begin >= end || end <= ranges_[r].size);
  }

  [[nodiscard]] memory_stats stats() const {
    const lock_type lock(mu_);
    memory_stats s = stats_;
    s.page_size = 1;
    s.pages_total = cfg_.max_bytes ? cfg_.max_bytes : held_;
    s.pages_free = s.pages_total - held_;
    s.pages_mapped = held_;
    for (const auto& r : ranges_)
      if (r.active) ++s.ranges_active;
    return s;
  }

  //! Checks the bookkeeping (invariant checker, tests): bytes held equal the blocks' sizes and
  //! stay within the budget, sizes within capacities, released records free and listed once.
  [[nodiscard]] status check() const {
    const lock_type lock(mu_);
    auto bad = [](const std::string& m) {
      return status{errc::invariant_violation, "heap_memory::check: " + m};
    };
    std::size_t held = 0;
    std::vector<std::uint8_t> listed(ranges_.size(), 0);
    for (range_id r : free_ids_) {
      if (r >= ranges_.size() || ranges_[r].active || ranges_[r].data)
        return bad("free list names range " + std::to_string(r) + ", which is in use");
      if (listed[r]++) return bad("range " + std::to_string(r) + " is in the free list twice");
    }
    for (range_id r = 0; r < ranges_.size(); ++r) {
      const auto& rec = ranges_[r];
      if (!rec.active) {
        if (!listed[r]) return bad("range " + std::to_string(r) + " is released but not listed (leaked)");
        continue;
      }
      if (rec.size > rec.capacity || (rec.size != 0) != (rec.data != nullptr))
        return bad("range " + std::to_string(r) + " holds " + std::to_string(rec.size) +
                   " bytes of a capacity of " + std::to_string(rec.capacity));
      held += rec.size;
    }
    if (held != held_)
      return bad("counts " + std::to_string(held_) + " bytes held, the blocks hold " +
                 std::to_string(held));
    if (cfg_.max_bytes && held_ > cfg_.max_bytes)
      return bad(std::to_string(held_) + " bytes held over the budget of " +
                 std::to_string(cfg_.max_bytes));
    return {};
  }

 private:
  friend struct detail::test_access;  // tests corrupt the bookkeeping to prove check() sees it
  using lock_type = std::lock_guard<std::mutex>;

  result<range_id> acquire_locked(std::size_t capacity, std::size_t hint) {
    (void)hint;
    if (capacity == 0) return status{errc::invalid_argument, "heap_memory::acquire: capacity 0"};
    range_rec rec{nullptr, capacity, 0, true};
    if (!free_ids_.empty()) {
      const range_id id = free_ids_.back();
      free_ids_.pop_back();
      ranges_[id] = rec;
      return id;
    }
    ranges_.push_back(rec);
    return static_cast<range_id>(ranges_.size() - 1);
  }

  status prepare_locked(std::span<const write_request> reqs) {
    grow_.clear();  // (range, largest end) per range needing growth
    for (const auto& q : reqs) {
      if (q.range >= ranges_.size() || !ranges_[q.range].active)
        return {errc::invalid_argument,
                "heap_memory::prepare: range " + std::to_string(q.range) + " is not active"};
      const auto& rec = ranges_[q.range];
      if (q.end > rec.capacity || q.begin > q.end)
        return {errc::capacity_exceeded, "heap_memory::prepare: bytes beyond the capacity of " +
                                             std::to_string(rec.capacity)};
      if (q.end <= rec.size) continue;
      auto it = std::find_if(grow_.begin(), grow_.end(), [&](auto& g) { return g.first == q.range; });
      if (it == grow_.end()) grow_.emplace_back(q.range, q.end);
      else it->second = std::max(it->second, q.end);
    }
    if (grow_.empty()) return {};
    std::size_t need = 0;
    for (auto [r, end] : grow_) need += end - ranges_[r].size;
    if (cfg_.max_bytes && held_ + need > cfg_.max_bytes)
      return {errc::out_of_pages, "heap_memory: byte budget exhausted: need " +
                                      std::to_string(need) + " more bytes, " +
                                      std::to_string(cfg_.max_bytes - held_) + " left"};
    for (auto [r, end] : grow_) {
      auto& rec = ranges_[r];
      std::size_t n = grown_size(rec, end);
      const std::size_t exact = end - rec.size;
      need -= exact;  // now: what the other ranges still need exactly
      if (cfg_.max_bytes) n = std::min(n, rec.size + (cfg_.max_bytes - held_ - need));
      void* p = std::realloc(rec.data, n);
      if (!p) return {errc::out_of_pages, "heap_memory: realloc failed"};  // earlier growth kept
      held_ += n - rec.size;
      rec.data = static_cast<std::byte*>(p);
      rec.size = n;
      ++stats_.map_calls;
    }
    return {};
  }

  result<range_id> fork_locked(range_id parent, std::size_t bytes) {
    if (parent >= ranges_.size() || !ranges_[parent].active)
      return status{errc::invalid_argument, "heap_memory::fork: range is not active"};
    const std::size_t cap = ranges_[parent].capacity;
    if (bytes > cap) return status{errc::capacity_exceeded, "heap_memory::fork: beyond capacity"};
    bytes = std::min(bytes, ranges_[parent].size);  // only what the parent holds
    auto child = acquire_locked(cap, 0);
    if (!child) return child;
    write_request q{*child, 0, bytes};
    if (status st = prepare_locked({&q, 1}); !st) {
      release_locked(*child);
      return st;
    }
    if (bytes) std::memcpy(ranges_[*child].data, ranges_[parent].data, bytes);
    stats_.cow_copies += bytes ? 1 : 0;
    return child;
  }

  void release_locked(range_id r) {
    KVCACHE_ASSERT(r < ranges_.size() && ranges_[r].active);
    auto& rec = ranges_[r];
    std::free(rec.data);
    held_ -= rec.size;
    rec = range_rec{};
    free_ids_.push_back(r);
  }

  struct range_rec {
    std::byte* data = nullptr;
    std::size_t capacity = 0;
    std::size_t size = 0;
    bool active = false;
  };
  std::size_t grown_size(const range_rec& rec, std::size_t need) const noexcept {
    const auto geometric = static_cast<std::size_t>(static_cast<double>(rec.size) * cfg_.growth);
    return std::min(rec.capacity, std::max(need, geometric));
  }

  mutable std::mutex mu_;  // everything below; not moved (a moved-to backend has its own)
  heap_memory_config cfg_;
  std::vector<range_rec> ranges_;
  std::vector<range_id> free_ids_;
  std::vector<std::pair<range_id, std::size_t>> grow_;  // scratch of prepare()
  std::size_t held_ = 0;
  memory_stats stats_;
};

static_assert(memory_backend<heap_memory>);

KVCACHE_NAMESPACE_END
