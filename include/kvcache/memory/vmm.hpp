// SPDX-License-Identifier: Apache-2.0
//! @file
//! `basic_vmm<Mapper>`: the virtual-memory backend logic (vAttention), written once over a
//! page mapper. `host_vmm` (memfd + mmap) and `cuda_vmm` (cuMemCreate + cuMemMap) are this
//! template over their mapper, so every behaviour below is tested on the host and holds on the GPU.
//!
//! - Ranges reserve address space up front and get pool pages mapped on demand (`prepare`).
//! - Deferred reclamation: a released range keeps its private pages mapped and is handed to the
//!   next acquisition that fits (vAttention's best fit), so steady-state serving maps nothing;
//!   pages are taken back from idle ranges only when the pool runs short, and only when that is
//!   then sure to be enough (the reclaimable count is exact).
//! - Fork maps the parent's physical pages into the child's range (zero copy); the first write
//!   into a page mapped more than once copies that page only (copy-on-write).
//! - Map ahead (vAttention's `step_async`): `map_ahead` maps the pages the next steps will need
//!   on a background thread, overlapping with the engine's compute; every other call first waits
//!   for it, and an error it met surfaces at the next `prepare`, `map_ahead` or `sync`.
//! - Every synchronous operation is all or nothing: on error the backend is as it was (idle
//!   ranges aside, which are only reclaimed when the operation is then sure to succeed).
//!
//! Thread safety: every member may be called from any thread; one internal mutex serializes
//! the bookkeeping (the pool is shared by all sequences of a cache, which open, grow, fork and
//! close from several threads). Each call first waits for the background step, which touches
//! the bookkeeping only while no call is inside. `data()` also takes the mutex (the range table
//! may grow under it), but a returned base stays valid for the range's life.
//!
//! A Mapper owns physical pages and address space, and issues the map calls:
//! ```
//! using address;                                     // std::byte* on the host, CUdeviceptr on CUDA
//! static constexpr const char* name;                 // for error messages
//! std::size_t page_size() const;  page_refs& refs(); const page_refs& refs() const;
//! result<address> reserve(std::size_t bytes);        // inaccessible address space
//! void unreserve(address, std::size_t bytes, const page_id* table);  // unmap all, free the space
//! status map(address base, std::size_t first, const page_id* pages, std::size_t count,
//!            std::size_t& calls);                    // pages[k] at page first+k; all or nothing
//! void unmap(address base, std::size_t first, const page_id* pages, std::size_t count);
//! status copy(page_id dst, page_id src);             // page contents, complete on return
//! status replace(address base, std::size_t index, page_id fresh, page_id old);  // all or nothing
//! static std::byte* pointer(address);
//! ```
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/page_bookkeeping.hpp>

#include <algorithm>
#include <atomic>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// nvcc's front end flags `st = f();` (status is [[nodiscard]] and operator= returns status&).
#if defined(__NVCC__)
#  pragma nv_diagnostic push
#  pragma nv_diag_suppress 2810
#endif

KVCACHE_NAMESPACE_BEGIN

namespace detail {
struct test_access;  // defined only by tests (a peer that may break invariants on purpose)
}  // namespace detail

template <class M>
concept page_mapper =
    requires(M& m, const M& cm, typename M::address a, std::size_t n, page_id p,
             const page_id* pages, std::size_t& calls) {
      { M::name } -> std::convertible_to<const char*>;
      { cm.page_size() } -> std::same_as<std::size_t>;
      { m.refs() } -> std::same_as<page_refs&>;
      { cm.refs() } -> std::same_as<const page_refs&>;
      { m.reserve(n) } -> std::same_as<result<typename M::address>>;
      { m.unreserve(a, n, pages) } -> std::same_as<void>;
      { m.map(a, n, pages, n, calls) } -> std::same_as<status>;
      { m.unmap(a, n, pages, n) } -> std::same_as<void>;
      { m.copy(p, p) } -> std::same_as<status>;
      { m.replace(a, n, p, p) } -> std::same_as<status>;
      { M::pointer(a) } -> std::same_as<std::byte*>;
    };

namespace detail {

//! One persistent background thread running one job at a time (the map-ahead step). Creating a
//! thread per step (as vAttention does) costs tens of microseconds; waking one costs a few.
class background_worker {
 public:
  background_worker() = default;
  background_worker(background_worker&&) noexcept = default;
  background_worker& operator=(background_worker&& o) noexcept {
    if (this != &o) {
      shutdown();
      s_ = std::move(o.s_);
    }
    return *this;
  }
  ~background_worker() { shutdown(); }

  //! True while a job is queued or running.
  [[nodiscard]] bool busy() const noexcept { return s_ && s_->busy.load(std::memory_order_acquire); }

  //! Runs `job` on the worker thread. Precondition: !busy(). Fails only if no thread can start.
  status post(std::function<void()> job) {
    if (!s_) {
      auto s = std::make_unique<shared>();
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
      try {
        s->thread = std::thread([p = s.get()] { p->loop(); });
      } catch (const std::system_error& e) {
        return {errc::system_error, std::string("map ahead: starting a thread: ") + e.what()};
      }
#else  // -fno-exceptions: a thread that cannot start terminates, as the standard library does
      s->thread = std::thread([p = s.get()] { p->loop(); });
#endif
      s_ = std::move(s);
    }
    {
      std::lock_guard<std::mutex> lock(s_->m);
      s_->job = std::move(job);
      s_->busy.store(true, std::memory_order_release);
    }
    s_->cv.notify_one();
    return {};
  }

  //! Blocks until no job is queued or running.
  void wait() const noexcept {
    if (!busy()) return;  // the common case: one atomic load, no lock
    std::unique_lock<std::mutex> lock(s_->m);
    s_->done.wait(lock, [&] { return !s_->busy.load(std::memory_order_acquire); });
  }

 private:
  struct shared {
    std::mutex m;
    std::condition_variable cv;
    std::condition_variable done;
    std::function<void()> job;
    std::atomic<bool> busy{false};
    bool stop = false;
    std::thread thread;

    void loop() {
      std::unique_lock<std::mutex> lock(m);
      for (;;) {
        cv.wait(lock, [&] { return stop || job; });
        if (!job) return;  // stop, nothing queued
        auto j = std::move(job);
        job = nullptr;
        lock.unlock();
        j();
        lock.lock();
        busy.store(false, std::memory_order_release);
        done.notify_all();
      }
    }
  };

  void shutdown() noexcept {
    if (!s_) return;
    wait();
    {
      std::lock_guard<std::mutex> lock(s_->m);
      s_->stop = true;
    }
    s_->cv.notify_one();
    s_->thread.join();
    s_.reset();
  }

  std::unique_ptr<shared> s_;
};

}  // namespace detail

template <page_mapper Mapper>
class basic_vmm {
 public:
  using mapper_type = Mapper;
  using address = typename Mapper::address;
  //! A range's data() is fixed for the range's life (callers may keep it; see cache.hpp).
  static constexpr bool stable_data = true;
  using page_id = kvcache::page_id;
  static constexpr page_id no_page = kvcache::no_page;

  explicit basic_vmm(Mapper mapper, bool deferred_reclamation = true)
      : mapper_(std::move(mapper)), deferred_(deferred_reclamation) {}

  basic_vmm(const basic_vmm&) = delete;
  basic_vmm& operator=(const basic_vmm&) = delete;
  basic_vmm(basic_vmm&& o) noexcept
      : mapper_((o.sync_quiet(), std::move(o.mapper_))),
        deferred_(o.deferred_),
        ranges_(std::exchange(o.ranges_, {})),
        idle_(std::move(o.idle_)),
        free_ids_(std::move(o.free_ids_)),
        stats_(o.stats_),
        ahead_error_(std::move(o.ahead_error_)) {}
  basic_vmm& operator=(basic_vmm&& o) noexcept {
    if (this != &o) {
      o.sync_quiet();
      teardown();
      mapper_ = std::move(o.mapper_);
      deferred_ = o.deferred_;
      ranges_ = std::exchange(o.ranges_, {});
      idle_ = std::move(o.idle_);
      free_ids_ = std::move(o.free_ids_);
      stats_ = o.stats_;
      ahead_error_ = std::move(o.ahead_error_);
    }
    return *this;
  }
  //! Waits for the background step, unmaps every range and frees its address space (the mapper
  //! then releases the pool).
  ~basic_vmm() { teardown(); }

  [[nodiscard]] std::size_t granularity() const noexcept { return mapper_.page_size(); }
  [[nodiscard]] const Mapper& mapper() const noexcept { return mapper_; }
  //! Mappings of pool page p (tests, invariant checks).
  [[nodiscard]] std::uint32_t refs(page_id p) const noexcept {
    const lock_type lock(mu_);
    sync_quiet();
    return mapper_.refs().refs(p);
  }

  //! Checks the bookkeeping (invariant checker, tests): every page's reference count equals its
  //! mappings over all ranges, free pages are exactly those with no reference and listed once,
  //! each range's mapped count matches its table, idle ranges are listed once and hold no shared
  //! page. O(pages + table entries): for checks, not for every step of a release build.
  [[nodiscard]] status check() const {
    const lock_type lock(mu_);
    sync_quiet();
    const auto& refs = mapper_.refs();
    const std::size_t ps = mapper_.page_size();
    auto bad = [&](const std::string& m) {
      return status{errc::invariant_violation, what("check") + m};
    };
    std::vector<std::uint32_t> maps(refs.pages(), 0);
    std::vector<std::uint8_t> listed(ranges_.size(), 0);
    for (range_id r : idle_) {
      if (r >= ranges_.size() || ranges_[r].bytes == 0 || ranges_[r].active)
        return bad("idle list names range " + std::to_string(r) + ", which is not an idle range");
      if (listed[r]++) return bad("range " + std::to_string(r) + " is in the idle list twice");
    }
    for (range_id r = 0; r < ranges_.size(); ++r) {
      const auto& rec = ranges_[r];
      if (rec.bytes == 0) continue;
      const auto at = [r] { return "range " + std::to_string(r) + ": "; };  // only on failure
      if (rec.bytes % ps != 0 || rec.table.size() != rec.bytes / ps)
        return bad(at() + "page table of " + std::to_string(rec.table.size()) + " entries for " +
                   std::to_string(rec.bytes) + " bytes");
      if (!rec.active && !listed[r]) return bad(at() + "inactive but not in the idle list (leaked)");
      std::size_t mapped = 0;
      for (std::size_t i = 0; i < rec.table.size(); ++i) {
        const page_id p = rec.table[i];
        if (p == no_page) continue;
        if (p >= refs.pages())
          return bad(at() + "page " + std::to_string(i) + " maps pool page " + std::to_string(p) +
                     " beyond the pool of " + std::to_string(refs.pages()));
        ++maps[p];
        ++mapped;
      }
      if (mapped != rec.mapped)
        return bad(at() + "counts " + std::to_string(rec.mapped) + " mapped pages, its table holds " +
                   std::to_string(mapped));
    }
    std::vector<std::uint8_t> is_free(refs.pages(), 0);
    for (page_id p : refs.free_list()) {
      if (p >= refs.pages()) return bad("free list holds page " + std::to_string(p) + " beyond the pool");
      if (is_free[p]++) return bad("pool page " + std::to_string(p) + " is in the free list twice");
    }
    for (page_id p = 0; p < refs.pages(); ++p) {
      const auto at = [p] { return "pool page " + std::to_string(p) + ": "; };
      if (refs.refs(p) != maps[p])
        return bad(at() + "reference count " + std::to_string(refs.refs(p)) + " but " +
                   std::to_string(maps[p]) + " mappings");
      if ((maps[p] == 0) != (is_free[p] != 0))
        return bad(at() + (maps[p] ? "mapped and in the free list (double free)"
                                 : "unmapped but not in the free list (leaked)"));
    }
    if (deferred_)  // release() unmaps the shared pages of a range that goes idle
      for (range_id r : idle_)
        for (page_id p : ranges_[r].table)
          if (p != no_page && maps[p] > 1)
            return bad("idle range " + std::to_string(r) + " holds shared pool page " +
                       std::to_string(p));
    return {};
  }
  //! True when r names a range acquired and not yet released.
  [[nodiscard]] bool active(range_id r) const noexcept {
    const lock_type lock(mu_);
    return r < ranges_.size() && ranges_[r].active;
  }
  //! True when every byte of [begin, end) of range r has a page mapped.
  [[nodiscard]] bool backed(range_id r, std::size_t begin, std::size_t end) const noexcept {
    const lock_type lock(mu_);
    sync_quiet();
    if (r >= ranges_.size() || end > ranges_[r].bytes) return false;
    if (begin >= end) return true;
    const std::size_t ps = mapper_.page_size();
    for (std::size_t i = begin / ps; i <= (end - 1) / ps; ++i)
      if (ranges_[r].table[i] == no_page) return false;
    return true;
  }

  //! A range of at least `capacity` bytes. Reuses the idle range of that capacity whose mapped
  //! pages best fit `hint` bytes (fewest pages that still cover it; else the most mapped).
  result<range_id> acquire(std::size_t capacity, std::size_t hint = 0) {
    const lock_type lock(mu_);
    return acquire_locked(capacity, hint);
  }

  //! Maps and privatizes the requested bytes of active ranges. All or nothing: when the pool
  //! (after reclaiming idle ranges) cannot supply every page needed, nothing changes. Returns
  //! first, unchanged, an error the background step met since the last synchronous call.
  status prepare(std::span<const write_request> reqs) {
    const lock_type lock(mu_);
    return prepare_locked(reqs);
  }

 private:
  result<range_id> acquire_locked(std::size_t capacity, std::size_t hint) {
    sync_quiet();
    if (capacity == 0) return status{errc::invalid_argument, what("acquire") + "capacity 0"};
    const std::size_t ps = mapper_.page_size();
    capacity = round_up(capacity, ps);
    const std::size_t want = (hint + ps - 1) / ps;
    const range_id best =
        best_fit(idle_, ranges_, capacity, want, [](const range_rec& r) { return r.bytes; });
    if (best != no_range) {
      idle_.erase(std::find(idle_.begin(), idle_.end(), best));
      ranges_[best].active = true;
      ++stats_.ranges_reused;
      return best;
    }
    auto base = mapper_.reserve(capacity);
    if (!base) return base.error();
    range_rec rec;
    rec.base = *base;
    rec.bytes = capacity;
    rec.table.assign(capacity / ps, no_page);
    rec.active = true;
    if (!free_ids_.empty()) {
      const range_id id = free_ids_.back();
      free_ids_.pop_back();
      ranges_[id] = std::move(rec);
      return id;
    }
    ranges_.push_back(std::move(rec));
    return static_cast<range_id>(ranges_.size() - 1);
  }

  status prepare_locked(std::span<const write_request> reqs) {
    KVCACHE_TRY(sync_locked());
    work_.clear();
    KVCACHE_TRY(collect(reqs, "prepare", /*shared_too=*/true));
    if (work_.empty()) return {};  // the steady state: everything mapped and private
    KVCACHE_TRY(reserve_free(work_.size()));

    status st;
    for (std::size_t a = 0; a < work_.size() && st.ok();) {
      auto& rec = ranges_[work_[a].range];
      if (rec.table[work_[a].index] != no_page) {  // copy-on-write, page by page
        st = cow(rec, work_[a].index);
        ++a;
        continue;
      }
      const std::size_t b = run_end(a);
      st = map_fresh(rec, work_[a].index, b - a);
      if (st.ok())
        for (std::size_t k = a; k < b; ++k) work_[k].fresh = true;
      a = b;
    }
    if (!st.ok()) {
      // Undo fresh maps of this call (copy-on-write copies hold equal bytes, so they may stay).
      for (const auto& w : work_)
        if (w.fresh) unmap_page(ranges_[w.range], w.index);
      return st;
    }
    return {};
  }

 public:

  //! Starts mapping the missing pages of the requested bytes on the background thread and
  //! returns at once (vAttention's step_async: call it before the step's compute, with the bytes
  //! the next steps will write). Best effort: a request the pool cannot cover even after
  //! reclaiming idle ranges is skipped (`ahead_skipped`); shared pages are left to `prepare`
  //! (their copy would compete with the engine's work). Bad requests are refused here.
  //! `max_pages` caps the pages of one step (0: no cap), in request order: with a look-ahead
  //! of a page's worth of tokens, a cap spreads the burst of a page crossing (every range at
  //! once) over several steps, so that a short step still hides it.
  status map_ahead(std::span<const write_request> reqs, std::size_t max_pages = 0) {
    const lock_type lock(mu_);
    KVCACHE_TRY(sync_locked());
    work_.clear();
    KVCACHE_TRY(collect(reqs, "map_ahead", /*shared_too=*/false));
    if (max_pages > 0 && work_.size() > max_pages) work_.resize(max_pages);
    if (work_.empty()) return {};
    ahead_.assign(work_.begin(), work_.end());
    return worker_.post([this] { run_ahead(); });
  }

  //! Waits for the background step; returns (and clears) the error it met, if any.
  status sync() {
    const lock_type lock(mu_);
    return sync_locked();
  }

  //! A new range sharing the parent's pages that cover its first `bytes` bytes, mapped at the
  //! same offsets (zero copy). Writes into them later copy the page (see `prepare`).
  result<range_id> fork(range_id parent, std::size_t bytes) {
    const lock_type lock(mu_);
    return fork_locked(parent, bytes);
  }

  //! Finishes a range. With deferred reclamation its private pages stay mapped for the next
  //! acquirer; pages it shares are unmapped (an idle sharer would hold its partner to
  //! copy-on-write, and count as unreclaimable, for a range nobody uses).
  void release(range_id r) {
    const lock_type lock(mu_);
    release_locked(r);
  }

 private:
  status sync_locked() {
    worker_.wait();
    if (ahead_error_.ok()) return {};  // every append passes here: no string moves when clean
    return std::exchange(ahead_error_, status{});
  }

  result<range_id> fork_locked(range_id parent, std::size_t bytes) {
    sync_quiet();
    if (parent >= ranges_.size() || !ranges_[parent].active)
      return status{errc::invalid_argument,
                    what("fork") + "range " + std::to_string(parent) + " is not active"};
    if (bytes > ranges_[parent].bytes)
      return status{errc::capacity_exceeded, what("fork") + "bytes beyond the parent's capacity"};
    auto child = acquire_locked(ranges_[parent].bytes, bytes);
    if (!child) return child;
    const std::size_t ps = mapper_.page_size();
    const std::size_t n = (bytes + ps - 1) / ps;
    auto& dst = ranges_[*child];
    for (std::size_t i = 0; i < n;) {
      const auto& src = ranges_[parent].table;
      if (src[i] == no_page || dst.table[i] == src[i]) {
        ++i;
        continue;
      }
      std::size_t j = i + 1;  // a run of parent pages the child lacks
      while (j < n && src[j] != no_page && dst.table[j] != src[j]) ++j;
      for (std::size_t k = i; k < j; ++k)  // a reused idle range may hold pages there
        if (dst.table[k] != no_page) unmap_page(dst, k);
      std::size_t calls = 0;
      status st = mapper_.map(dst.base, i, src.data() + i, j - i, calls);
      stats_.map_calls += calls;
      if (!st) {
        release_locked(*child);  // the child keeps what it mapped so far; the parent is untouched
        return st;
      }
      for (std::size_t k = i; k < j; ++k) {
        mapper_.refs().retain(src[k]);
        dst.table[k] = src[k];
      }
      dst.mapped += j - i;
      i = j;
    }
    return child;
  }

  void release_locked(range_id r) {
    sync_quiet();
    KVCACHE_ASSERT(r < ranges_.size() && ranges_[r].active);
    auto& rec = ranges_[r];
    rec.active = false;
    if (!deferred_) {
      unmap_from(rec, 0);
    } else {
      for (std::size_t i = 0; i < rec.table.size(); ++i)
        if (rec.table[i] != no_page && mapper_.refs().refs(rec.table[i]) > 1) unmap_page(rec, i);
    }
    idle_.push_back(r);
  }

 public:
  //! The range's base address (stable for the range's life; safe during the background step).
  [[nodiscard]] std::byte* data(range_id r) const noexcept {
    const lock_type lock(mu_);
    return Mapper::pointer(ranges_[r].base);
  }
  [[nodiscard]] std::size_t capacity(range_id r) const noexcept {
    const lock_type lock(mu_);
    return ranges_[r].bytes;
  }
  [[nodiscard]] std::size_t backed_bytes(range_id r) const noexcept {
    const lock_type lock(mu_);
    sync_quiet();
    return ranges_[r].mapped * mapper_.page_size();
  }
  //! The physical page behind page `index` of range r, or no_page (tests, invariant checks).
  [[nodiscard]] page_id page_at(range_id r, std::size_t index) const noexcept {
    const lock_type lock(mu_);
    sync_quiet();
    return ranges_[r].table[index];
  }

  //! Unmaps every page of every idle range (e.g. before measuring, or to shrink to the minimum).
  std::size_t reclaim_idle() {
    const lock_type lock(mu_);
    sync_quiet();
    std::size_t freed = 0;
    for (range_id r : idle_) freed += unmap_from(ranges_[r], 0);
    stats_.pages_reclaimed += freed;
    return freed;
  }

  //! Walks every range and pool page: for diagnostics, not for every decode step.
  [[nodiscard]] memory_stats stats() const {
    const lock_type lock(mu_);
    sync_quiet();
    memory_stats s = stats_;
    const auto& refs = mapper_.refs();
    s.page_size = mapper_.page_size();
    s.pages_total = refs.pages();
    s.pages_free = refs.free_pages();
    s.pages_mapped = s.pages_idle = s.ranges_active = s.ranges_idle = s.bytes_reserved = 0;
    for (const auto& rec : ranges_) {
      if (rec.bytes == 0) continue;
      s.bytes_reserved += rec.bytes;
      s.pages_mapped += rec.mapped;
      if (rec.active) {
        ++s.ranges_active;
      } else {
        ++s.ranges_idle;
        s.pages_idle += rec.mapped;
      }
    }
    s.pages_shared = refs.shared();
    return s;
  }

 protected:
  //! Unlocked: for a derived backend's own single-threaded setup.
  Mapper& mapper_mut() noexcept {
    sync_quiet();
    return mapper_;
  }

 private:
  friend struct detail::test_access;  // tests corrupt the bookkeeping to prove check() sees it
  using lock_type = std::lock_guard<std::mutex>;

  struct range_rec {
    address base{};
    std::size_t bytes = 0;
    std::vector<page_id> table;  // page index in range -> pool page (metadata out of band)
    std::size_t mapped = 0;
    bool active = false;
  };
  struct work_item {
    range_id range;
    std::size_t index;
    bool fresh = false;  // mapped by this call (for rollback)
    bool operator<(const work_item& o) const noexcept {
      return range != o.range ? range < o.range : index < o.index;
    }
    bool operator==(const work_item& o) const noexcept {
      return range == o.range && index == o.index;
    }
  };

  std::string what(const char* op) const { return std::string(Mapper::name) + "::" + op + ": "; }

  void sync_quiet() const noexcept { worker_.wait(); }

  // Pages of the requests that need mapping (or, with shared_too, copying), sorted and unique.
  status collect(std::span<const write_request> reqs, const char* op, bool shared_too) {
    const std::size_t ps = mapper_.page_size();
    for (const auto& q : reqs) {
      if (q.range >= ranges_.size() || !ranges_[q.range].active)
        return {errc::invalid_argument,
                what(op) + "range " + std::to_string(q.range) + " is not an active range"};
      auto& rec = ranges_[q.range];
      if (q.end > rec.bytes || q.begin > q.end)
        return {errc::capacity_exceeded,
                what(op) + "bytes [" + std::to_string(q.begin) + ", " + std::to_string(q.end) +
                    ") outside the range's capacity of " + std::to_string(rec.bytes)};
      if (q.begin == q.end) continue;
      for (std::size_t i = q.begin / ps, last = (q.end - 1) / ps; i <= last; ++i) {
        const page_id p = rec.table[i];
        if (p == no_page || (shared_too && mapper_.refs().refs(p) > 1))
          work_.push_back({q.range, i});
      }
    }
    if (work_.size() > 1) {
      std::sort(work_.begin(), work_.end());
      work_.erase(std::unique(work_.begin(), work_.end()), work_.end());
    }
    return {};
  }

  // End of the run of missing pages that starts at work_[a] (same range, consecutive indices).
  std::size_t run_end(std::size_t a) const {
    const auto& t = ranges_[work_[a].range].table;
    std::size_t b = a + 1;
    while (b < work_.size() && work_[b].range == work_[a].range &&
           work_[b].index == work_[b - 1].index + 1 && t[work_[b].index] == no_page)
      ++b;
    return b;
  }

  // The background step: maps missing pages range by range; a range's run the pool cannot
  // supply is skipped; a mapping error stops it and waits for the owner's next sync().
  void run_ahead() noexcept {
    for (std::size_t a = 0; a < ahead_.size();) {
      std::size_t b = a + 1;
      while (b < ahead_.size() && ahead_[b].range == ahead_[a].range) ++b;
      std::size_t missing = 0;  // the owner cannot have changed them, but recount: cheap
      for (std::size_t k = a; k < b; ++k)
        missing += ranges_[ahead_[k].range].table[ahead_[k].index] == no_page;
      if (missing > 0 && !reserve_free(missing).ok()) {
        stats_.ahead_skipped += missing;
        a = b;
        continue;
      }
      for (std::size_t k = a; k < b;) {
        auto& rec = ranges_[ahead_[k].range];
        std::size_t e = k + 1;
        while (e < b && ahead_[e].index == ahead_[e - 1].index + 1) ++e;
        status st = map_fresh(rec, ahead_[k].index, e - k);
        if (!st) {
          ahead_error_ = status{st.code(), "map ahead: " + st.message()};
          return;
        }
        stats_.pages_mapped_ahead += e - k;
        k = e;
      }
      a = b;
    }
  }

  // Makes at least n pages free, reclaiming idle ranges only if that is then enough.
  status reserve_free(std::size_t n) {
    auto& refs = mapper_.refs();
    if (refs.free_pages() >= n) return {};
    const std::size_t reclaimable = reclaimable_pages(idle_, ranges_, refs);
    if (refs.free_pages() + reclaimable < n)
      return {errc::out_of_pages,
              "page pool exhausted: need " + std::to_string(n) + " pages of " +
                  std::to_string(mapper_.page_size()) + " bytes, " +
                  std::to_string(refs.free_pages()) + " free and " + std::to_string(reclaimable) +
                  " reclaimable of " + std::to_string(refs.pages())};
    // Oldest idle range first, top pages first (they are the least likely to be reused).
    for (range_id r : idle_) {
      auto& rec = ranges_[r];
      for (std::size_t i = rec.table.size(); i-- > 0 && refs.free_pages() < n;)
        if (rec.table[i] != no_page) {
          unmap_page(rec, i);
          ++stats_.pages_reclaimed;
        }
      if (refs.free_pages() >= n) break;
    }
    KVCACHE_ASSERT(refs.free_pages() >= n);
    return {};
  }

  // Maps `count` free pages at page indices [first, first+count); all or nothing.
  // Precondition: that many pages are free. Fresh pages come off the free list in ascending
  // order, so the host mapper covers a run with one mmap.
  status map_fresh(range_rec& rec, std::size_t first, std::size_t count) {
    auto& refs = mapper_.refs();
    for (std::size_t k = 0; k < count; ++k) rec.table[first + k] = refs.take();
    std::size_t calls = 0;
    status st = mapper_.map(rec.base, first, rec.table.data() + first, count, calls);
    stats_.map_calls += calls;
    if (!st) {
      for (std::size_t k = 0; k < count; ++k) {
        refs.release(rec.table[first + k]);
        rec.table[first + k] = no_page;
      }
      return st;
    }
    rec.mapped += count;
    stats_.pages_mapped_total += count;
    return {};
  }

  // Copy-on-write of one page: copy through the pool, map the copy over the shared page.
  status cow(range_rec& rec, std::size_t index) {
    auto& refs = mapper_.refs();
    const page_id old = rec.table[index];
    const page_id fresh = refs.take();
    status st = mapper_.copy(fresh, old);
    if (st.ok()) st = mapper_.replace(rec.base, index, fresh, old);
    if (!st) {
      refs.release(fresh);
      return st;
    }
    ++stats_.map_calls;
    ++stats_.cow_copies;
    ++stats_.pages_mapped_total;
    rec.table[index] = fresh;
    refs.release(old);
    return {};
  }

  void unmap_page(range_rec& rec, std::size_t index) {
    mapper_.unmap(rec.base, index, rec.table.data() + index, 1);
    mapper_.refs().release(rec.table[index]);
    rec.table[index] = no_page;
    --rec.mapped;
    ++stats_.pages_unmapped_total;
  }

  // Unmaps all pages at index >= first; returns how many pages went back to the free list.
  std::size_t unmap_from(range_rec& rec, std::size_t first) {
    if (rec.mapped == 0 || first >= rec.table.size()) return 0;
    auto& refs = mapper_.refs();
    const std::size_t before = refs.free_pages();
    mapper_.unmap(rec.base, first, rec.table.data() + first, rec.table.size() - first);
    for (std::size_t i = first; i < rec.table.size(); ++i)
      if (rec.table[i] != no_page) {
        refs.release(rec.table[i]);
        rec.table[i] = no_page;
        --rec.mapped;
        ++stats_.pages_unmapped_total;
      }
    return refs.free_pages() - before;
  }

  void teardown() noexcept {
    sync_quiet();
    for (auto& rec : ranges_)
      if (rec.bytes != 0) mapper_.unreserve(rec.base, rec.bytes, rec.table.data());
    ranges_.clear();
  }

  mutable std::mutex mu_;  // the bookkeeping below; not moved (a moved-to backend has its own)
  Mapper mapper_;
  bool deferred_ = true;
  std::vector<range_rec> ranges_;  // torn down (teardown) before the mapper releases the pool
  std::vector<range_id> idle_;
  std::vector<range_id> free_ids_;
  std::vector<work_item> work_;   // scratch of prepare() and map_ahead()
  std::vector<work_item> ahead_;  // the background step's pages (owned by it while it runs)
  memory_stats stats_;
  status ahead_error_;
  detail::background_worker worker_;  // last: joined first on destruction
};

KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
