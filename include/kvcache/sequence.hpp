// SPDX-License-Identifier: Apache-2.0
//! @file
//! `kvcache::sequence<Cache>`: an owning, move-only handle of one open sequence of a cache.
//!
//! `cache.open_sequence()` and `handle.fork()` make one; the destructor closes the sequence, so
//! an engine that keeps its sequences in handles cannot leak one (or its ranges and pages) nor
//! close one twice. A moved-from, closed or released handle is empty: every call on it returns
//! `errc::unknown_sequence` saying so, and destroying it does nothing. The handle forwards the
//! per-sequence calls (append, observe, evict, view, fork) with its id.
//!
//! A handle must not outlive its cache (as an iterator must not outlive its container). Like a
//! raw id, a handle is used by one thread at a time; handles of one cache may be created,
//! moved and destroyed on different threads at once (see cache.hpp, thread safety).
#pragma once

#include <kvcache/cache.hpp>
#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/view.hpp>

#include <cstdint>
#include <string>
#include <utility>

KVCACHE_NAMESPACE_BEGIN

//! @tparam Cache a `kvcache::cache<Memory, Eviction, Quant>`
template <class Cache>
class sequence {
 public:
  using cache_type = Cache;

  //! An empty handle.
  sequence() noexcept = default;
  //! Takes ownership of the open sequence `id` of `c` (e.g. one opened with `c.open()`).
  sequence(Cache& c, seq_id id) noexcept : cache_(&c), id_(id) {}

  sequence(const sequence&) = delete;
  sequence& operator=(const sequence&) = delete;
  sequence(sequence&& o) noexcept : cache_(std::exchange(o.cache_, nullptr)), id_(o.id_) {}
  sequence& operator=(sequence&& o) noexcept {
    if (this != &o) {
      reset();
      cache_ = std::exchange(o.cache_, nullptr);
      id_ = o.id_;
    }
    return *this;
  }
  //! Closes the sequence (its ranges go back to the memory backend).
  ~sequence() { reset(); }

  //! True when the handle owns a sequence that is still open.
  [[nodiscard]] bool is_open() const noexcept { return cache_ && cache_->is_open(id_); }
  explicit operator bool() const noexcept { return is_open(); }
  //! The raw id (for batch views and map_ahead); meaningful while is_open().
  [[nodiscard]] seq_id id() const noexcept { return id_; }
  [[nodiscard]] Cache* owner() const noexcept { return cache_; }

  //! Closes now; the handle becomes empty. An empty handle gets unknown_sequence.
  status close() {
    if (!cache_) return empty_error("close");
    status st = cache_->close(id_);
    cache_ = nullptr;
    return st;
  }
  //! Gives up ownership without closing: the caller now manages the raw id.
  [[nodiscard]] seq_id release() noexcept {
    cache_ = nullptr;
    return id_;
  }

  //! A new handle on a fork of this sequence (copy-on-write pages, copied slot maps and state).
  result<sequence> fork() const {
    if (!cache_) return empty_error("fork");
    auto child = cache_->fork(id_);
    if (!child) return child.error();
    return sequence(*cache_, *child);
  }

  status append(std::uint32_t layer, const kv_tensor& k, const kv_tensor& v) {
    if (!cache_) return empty_error("append");
    return cache_->append(id_, layer, k, v);
  }
  template <class... S>
  status observe(std::uint32_t layer, const S&... sigs) {
    if (!cache_) return empty_error("observe");
    return cache_->observe(id_, layer, sigs...);
  }
  status evict(std::uint32_t layer, std::uint32_t reserve = 0) {
    if (!cache_) return empty_error("evict");
    return cache_->evict(id_, layer, reserve);
  }
  status evict() {
    if (!cache_) return empty_error("evict");
    return cache_->evict(id_);
  }
  result<layer_view> view(std::uint32_t layer) const {
    if (!cache_) return empty_error("view");
    return cache_->view(id_, layer);
  }
  //! Tiered memory (cache.hpp, "tiers"): stage a tiered policy's next fetches of `layer`.
  status prefetch(std::uint32_t layer) {
    if (!cache_) return empty_error("prefetch");
    return cache_->prefetch(id_, layer);
  }
  //! Tiered memory: move the whole sequence to the holding tier, and back.
  status hold()
    requires Cache::has_tiers
  {
    if (!cache_) return empty_error("hold");
    return cache_->hold(id_);
  }
  status restore()
    requires Cache::has_tiers
  {
    if (!cache_) return empty_error("restore");
    return cache_->restore(id_);
  }
  [[nodiscard]] bool held() const noexcept { return cache_ && cache_->is_held(id_); }

 private:
  static status empty_error(const char* op) {
    return {errc::unknown_sequence,
            std::string("sequence::") + op + ": the handle is empty (moved from, closed or released)"};
  }
  void reset() noexcept {
    // A sequence already closed through its raw id is simply gone: nothing to report.
    if (Cache* c = std::exchange(cache_, nullptr)) (void)c->close(id_);
  }

  Cache* cache_ = nullptr;
  seq_id id_{};
};

KVCACHE_NAMESPACE_END
