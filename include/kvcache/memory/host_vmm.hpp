// SPDX-License-Identifier: Apache-2.0
//! @file
//! `host_vmm`: the host virtual-memory backend (vAttention on the CPU).
//!
//! - Ranges reserve address space up front and get pool pages mapped on demand.
//! - Deferred reclamation: a released range keeps its pages mapped and is handed to the next
//!   acquisition that fits (best fit), so steady-state serving maps nothing; pages are taken back
//!   from idle ranges only when the pool runs short.
//! - Fork maps the parent's physical pages into the child's range (zero copy); the first write
//!   into a page mapped more than once copies that page only (copy-on-write).
//! - Every operation is all or nothing: on error the backend is as it was (idle ranges aside,
//!   which are only ever reclaimed when the operation is then sure to succeed).
//!
//! Not thread-safe: one owner (the cache object) serializes calls.
//! Linux limit: every run of file-discontiguous pages is a VMA, and vm.max_map_count (65530 by
//! default) caps those per process; larger pages or a raised limit help with many ranges.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/host_pages.hpp>
#include <kvcache/memory/page_bookkeeping.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

//! Construction parameters of `host_vmm`.
struct host_vmm_config {
  std::size_t page_size = 64 * 1024;  //!< a multiple of the OS page (64 KiB ... 2 MiB typical)
  std::size_t pool_pages = 1024;      //!< physical pages in the pool (the memory budget)
  bool deferred_reclamation = true;   //!< keep a released range's pages mapped for reuse
};

class host_vmm {
 public:
  using page_id = kvcache::page_id;
  static constexpr page_id no_page = kvcache::no_page;

  explicit host_vmm(const host_vmm_config& cfg = {})
      : pool_(cfg.page_size, cfg.pool_pages), deferred_(cfg.deferred_reclamation) {}

  host_vmm(host_vmm&&) noexcept = default;
  host_vmm& operator=(host_vmm&&) noexcept = default;

  [[nodiscard]] std::size_t granularity() const noexcept { return pool_.page_size(); }
  [[nodiscard]] const host_page_pool& pool() const noexcept { return pool_; }

  //! A range of at least `capacity` bytes. Reuses the idle range of that capacity whose mapped
  //! pages best fit `hint` bytes (fewest pages that still cover it; else the most mapped).
  result<range_id> acquire(std::size_t capacity, std::size_t hint = 0) {
    if (capacity == 0) return status{errc::invalid_argument, "host_vmm::acquire: capacity 0"};
    const std::size_t ps = pool_.page_size();
    capacity = round_up(capacity, ps);
    const std::size_t want = (hint + ps - 1) / ps;
    const range_id best =
        best_fit(idle_, ranges_, capacity, want, [](const range_rec& r) { return r.va.size(); });
    if (best != no_range) {
      idle_.erase(std::find(idle_.begin(), idle_.end(), best));
      ranges_[best].active = true;
      ++stats_.ranges_reused;
      return best;
    }
    auto va = host_virtual_range::reserve(capacity);
    if (!va) return va.error();
    range_rec rec;
    rec.va = std::move(*va);
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

  //! Maps and privatizes the requested bytes of active ranges. All or nothing: when the pool
  //! (after reclaiming idle ranges) cannot supply every page needed, nothing changes.
  status prepare(std::span<const write_request> reqs) {
    const std::size_t ps = pool_.page_size();
    work_.clear();
    for (const auto& q : reqs) {
      if (q.range >= ranges_.size() || !ranges_[q.range].active)
        return {errc::invalid_argument, "host_vmm::prepare: range " + std::to_string(q.range) +
                                            " is not an active range"};
      auto& rec = ranges_[q.range];
      if (q.end > rec.va.size() || q.begin > q.end)
        return {errc::capacity_exceeded,
                "host_vmm::prepare: bytes [" + std::to_string(q.begin) + ", " +
                    std::to_string(q.end) + ") outside the range's capacity of " +
                    std::to_string(rec.va.size())};
      if (q.begin == q.end) continue;
      for (std::size_t i = q.begin / ps, last = (q.end - 1) / ps; i <= last; ++i) {
        const page_id p = rec.table[i];
        if (p == no_page || pool_.refs(p) > 1) work_.push_back({q.range, i});
      }
    }
    if (work_.empty()) return {};  // the steady state: everything mapped and private
    std::sort(work_.begin(), work_.end());
    work_.erase(std::unique(work_.begin(), work_.end()), work_.end());
    KVCACHE_TRY(reserve_free(work_.size()));

    // Fresh pages first, in runs that are contiguous both in the range and in the file.
    std::size_t done = 0;
    status st;
    for (std::size_t a = 0; a < work_.size() && st.ok();) {
      auto& rec = ranges_[work_[a].range];
      if (rec.table[work_[a].index] != no_page) {  // copy-on-write, page by page
        st = cow(rec, work_[a].index);
        if (st.ok()) ++done;
        ++a;
        continue;
      }
      std::size_t b = a + 1;
      while (b < work_.size() && work_[b].range == work_[a].range &&
             work_[b].index == work_[b - 1].index + 1 && rec.table[work_[b].index] == no_page)
        ++b;
      st = map_fresh(rec, work_[a].index, b - a);
      if (st.ok()) done += b - a;
      a = b;
    }
    if (!st.ok()) {
      // Undo fresh maps of this call (COW copies hold equal bytes, so they may stay).
      for (std::size_t a = 0; a < work_.size(); ++a) {
        auto& rec = ranges_[work_[a].range];
        if (work_[a].fresh && rec.table[work_[a].index] != no_page)
          unmap_page(rec, work_[a].index);
      }
      return st;
    }
    (void)done;
    return {};
  }

  //! A new range sharing the parent's pages that cover its first `bytes` bytes, mapped at the
  //! same offsets (zero copy). Writes into them later copy the page (see `prepare`).
  result<range_id> fork(range_id parent, std::size_t bytes) {
    if (parent >= ranges_.size() || !ranges_[parent].active)
      return status{errc::invalid_argument,
                    "host_vmm::fork: range " + std::to_string(parent) + " is not active"};
    if (bytes > ranges_[parent].va.size())
      return status{errc::capacity_exceeded, "host_vmm::fork: bytes beyond the parent's capacity"};
    auto child = acquire(ranges_[parent].va.size(), bytes);
    if (!child) return child;
    const std::size_t ps = pool_.page_size();
    const std::size_t n = (bytes + ps - 1) / ps;
    auto& src = ranges_[parent];
    auto& dst = ranges_[*child];
    for (std::size_t i = 0; i < n;) {
      if (src.table[i] == no_page) {
        ++i;
        continue;
      }
      std::size_t j = i + 1;  // run of file-contiguous parent pages: one mmap call
      while (j < n && src.table[j] != no_page && src.table[j] == src.table[j - 1] + 1) ++j;
      status st = dst.va.map(i * ps, (j - i) * ps, pool_.fd(), pool_.offset(src.table[i]));
      if (!st) {
        release(*child);  // the child keeps what it mapped so far; the parent is untouched
        return st;
      }
      ++stats_.map_calls;
      for (std::size_t k = i; k < j; ++k) {
        if (dst.table[k] != no_page) {
          pool_.release(dst.table[k]);
          --dst.mapped;
        }
        pool_.retain(src.table[k]);
        dst.table[k] = src.table[k];
        ++dst.mapped;
      }
      i = j;
    }
    return child;
  }

  //! Finishes a range. With deferred reclamation its pages stay mapped for the next acquirer.
  void release(range_id r) {
    KVCACHE_ASSERT(r < ranges_.size() && ranges_[r].active);
    auto& rec = ranges_[r];
    rec.active = false;
    if (!deferred_) {
      unmap_from(rec, 0);
    } else {
      // Idle ranges keep private pages only: a shared one would hold its sharer to copy-on-write
      // (and count as unreclaimable) for a range nobody uses.
      for (std::size_t i = 0; i < rec.table.size(); ++i)
        if (rec.table[i] != no_page && pool_.refs(rec.table[i]) > 1) unmap_page(rec, i);
    }
    idle_.push_back(r);
  }

  [[nodiscard]] std::byte* data(range_id r) const noexcept { return ranges_[r].va.base(); }
  [[nodiscard]] std::size_t capacity(range_id r) const noexcept { return ranges_[r].va.size(); }
  [[nodiscard]] std::size_t backed_bytes(range_id r) const noexcept {
    return ranges_[r].mapped * pool_.page_size();
  }
  //! The physical page behind page `index` of range r, or no_page (tests, invariant checks).
  [[nodiscard]] page_id page_at(range_id r, std::size_t index) const noexcept {
    return ranges_[r].table[index];
  }

  //! Unmaps every page of every idle range (e.g. before measuring, or to shrink to the minimum).
  std::size_t reclaim_idle() {
    std::size_t freed = 0;
    for (range_id r : idle_) freed += unmap_from(ranges_[r], 0);
    stats_.pages_reclaimed += freed;
    return freed;
  }

  //! Walks every range and pool page: for diagnostics, not for every decode step.
  [[nodiscard]] memory_stats stats() const {
    memory_stats s = stats_;
    s.page_size = pool_.page_size();
    s.pages_total = pool_.pages();
    s.pages_free = pool_.free_pages();
    s.pages_mapped = s.pages_idle = s.ranges_active = s.ranges_idle = s.bytes_reserved = 0;
    for (std::size_t r = 0; r < ranges_.size(); ++r) {
      const auto& rec = ranges_[r];
      if (rec.va.size() == 0) continue;
      s.bytes_reserved += rec.va.size();
      s.pages_mapped += rec.mapped;
      if (rec.active) {
        ++s.ranges_active;
      } else {
        ++s.ranges_idle;
        s.pages_idle += rec.mapped;
      }
    }
    s.pages_shared = pool_.bookkeeping().shared();
    return s;
  }

 private:
  struct range_rec {
    host_virtual_range va;
    std::vector<page_id> table;  // page index in range -> physical page (metadata out of band)
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

  // Makes at least n pages free, reclaiming idle ranges only if that is then enough.
  status reserve_free(std::size_t n) {
    if (pool_.free_pages() >= n) return {};
    const std::size_t reclaimable = reclaimable_pages(idle_, ranges_, pool_.bookkeeping());
    if (pool_.free_pages() + reclaimable < n)
      return {errc::out_of_pages,
              "page pool exhausted: need " + std::to_string(n) + " pages of " +
                  std::to_string(pool_.page_size()) + " bytes, " +
                  std::to_string(pool_.free_pages()) + " free and " + std::to_string(reclaimable) +
                  " reclaimable of " + std::to_string(pool_.pages())};
    // Oldest idle range first, top pages first (they are the least likely to be reused).
    for (range_id r : idle_) {
      auto& rec = ranges_[r];
      for (std::size_t i = rec.table.size(); i-- > 0 && pool_.free_pages() < n;)
        if (rec.table[i] != no_page) {
          unmap_page(rec, i);
          ++stats_.pages_reclaimed;
        }
      if (pool_.free_pages() >= n) break;
    }
    KVCACHE_ASSERT(pool_.free_pages() >= n);
    return {};
  }

  status map_fresh(range_rec& rec, std::size_t first, std::size_t count) {
    const std::size_t ps = pool_.page_size();
    for (std::size_t i = first; i < first + count;) {
      // take a run of file-contiguous pages from the free list
      const page_id p0 = pool_.take();
      std::size_t j = i + 1;
      rec.table[i] = p0;
      while (j < first + count && pool_.free_pages() > 0) {
        const page_id next = pool_.take();
        if (next != rec.table[j - 1] + 1) {
          pool_.release(next);  // back on top of the free list; taken again next round
          break;
        }
        rec.table[j++] = next;
      }
      status st = rec.va.map(i * ps, (j - i) * ps, pool_.fd(), pool_.offset(p0));
      if (!st) {
        for (std::size_t k = i; k < j; ++k) {
          pool_.release(rec.table[k]);
          rec.table[k] = no_page;
        }
        return st;
      }
      ++stats_.map_calls;
      rec.mapped += j - i;
      stats_.pages_mapped_total += j - i;
      for (std::size_t k = i; k < j; ++k) mark_fresh(rec, k);
      i = j;
    }
    return {};
  }

  void mark_fresh(const range_rec& rec, std::size_t index) {
    const auto r = static_cast<range_id>(&rec - ranges_.data());
    auto it = std::lower_bound(work_.begin(), work_.end(), work_item{r, index});
    if (it != work_.end() && it->range == r && it->index == index) it->fresh = true;
  }

  // Copy-on-write of one page: copy through the pool view, map the copy over the shared page.
  status cow(range_rec& rec, std::size_t index) {
    const std::size_t ps = pool_.page_size();
    const page_id old = rec.table[index];
    const page_id fresh = pool_.take();
    std::memcpy(pool_.address(fresh), pool_.address(old), ps);
    status st = rec.va.map(index * ps, ps, pool_.fd(), pool_.offset(fresh));
    if (!st) {
      pool_.release(fresh);
      return st;
    }
    ++stats_.map_calls;
    ++stats_.cow_copies;
    ++stats_.pages_mapped_total;
    rec.table[index] = fresh;
    pool_.release(old);
    return {};
  }

  void unmap_page(range_rec& rec, std::size_t index) {
    const std::size_t ps = pool_.page_size();
    status st = rec.va.unmap(index * ps, ps);
    KVCACHE_ASSERT(st.ok());  // replacing a mapping with PROT_NONE cannot fail short of ENOMEM
    (void)st;
    pool_.release(rec.table[index]);
    rec.table[index] = no_page;
    --rec.mapped;
    ++stats_.pages_unmapped_total;
  }

  // Unmaps all pages at index >= first; returns how many pages went back to the free list.
  std::size_t unmap_from(range_rec& rec, std::size_t first) {
    const std::size_t before = pool_.free_pages();
    if (rec.mapped == 0) return 0;
    const std::size_t ps = pool_.page_size();
    if (first < rec.table.size()) {
      status st = rec.va.unmap(first * ps, (rec.table.size() - first) * ps);  // one call
      KVCACHE_ASSERT(st.ok());
      (void)st;
    }
    for (std::size_t i = first; i < rec.table.size(); ++i)
      if (rec.table[i] != no_page) {
        pool_.release(rec.table[i]);
        rec.table[i] = no_page;
        --rec.mapped;
        ++stats_.pages_unmapped_total;
      }
    return pool_.free_pages() - before;
  }

  host_page_pool pool_;
  bool deferred_ = true;
  std::vector<range_rec> ranges_;  // declared after pool_: unmapped before the pool goes
  std::vector<range_id> idle_;
  std::vector<range_id> free_ids_;
  std::vector<work_item> work_;  // scratch of prepare(), kept to avoid allocating per call
  memory_stats stats_;
};

static_assert(memory_backend<host_vmm>);

KVCACHE_NAMESPACE_END
