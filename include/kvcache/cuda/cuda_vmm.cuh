// SPDX-License-Identifier: Apache-2.0
//! @file
//! `cuda_vmm`: the CUDA virtual-memory backend (vAttention), with the semantics of `host_vmm`.
//!
//! | host_vmm                         | cuda_vmm                                             |
//! | -------------------------------- | ---------------------------------------------------- |
//! | memfd slice                      | `cuMemCreate` handle (pinned, device-resident)       |
//! | `mmap(PROT_NONE)` reservation    | `cuMemAddressReserve` (capacity rounded to the page) |
//! | `mmap(MAP_FIXED)` of a file run  | `cuMemMap` per page + one `cuMemSetAccess` per run   |
//! | pool view (whole file mapped)    | pool view: one reservation with every handle mapped  |
//! | `memcpy` for copy-on-write       | `cudaMemcpy` device to device, view to view          |
//!
//! - The pool's handles are created up front (cuMemCreate costs ~200 µs; map ~1.5 µs, set access
//!   ~36 µs on an A100), so `prepare` only maps.
//! - Deferred reclamation, best-fit reuse, exact reclaimable counting, all-or-nothing `prepare`,
//!   fork with copy-on-write: as `host_vmm` (see there). The bookkeeping is a copy of host_vmm's
//!   (follow-up: factor the shared range/page-table logic into memory/ once both are stable).
//! - `map_calls` counts `cuMemMap` calls: one per page (the driver maps one handle per call).
//! - `data()` is a device address: host code must not dereference it. Use `cuda_passthrough`
//!   (cuda/passthrough.cuh) as the quantizer of a `cache<cuda_vmm>`.
//!
//! Streams: copy-on-write copies run on the legacy default stream and are complete when
//! `prepare` returns. Unmapping (release without deferral, reclamation, copy-on-write) does not
//! wait for kernels: the caller must not have kernels in flight that touch the pages it gives
//! up (synchronize before closing a sequence whose kernels may still run).
//! Not thread-safe: one owner (the cache object) serializes calls. Each call makes the backend's
//! device current on the calling thread where it talks to the driver.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/cuda/driver.cuh>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/page_bookkeeping.hpp>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

// nvcc's front end flags `st = f();` (status is [[nodiscard]] and operator= returns status&).
#if defined(__NVCC__)
#  pragma nv_diagnostic push
#  pragma nv_diag_suppress 2810
#endif

KVCACHE_NAMESPACE_BEGIN

//! Construction parameters of `cuda_vmm`.
struct cuda_vmm_config {
  int device = 0;
  //! 0: the driver's minimum granularity (2 MiB on current GPUs); else a multiple of it.
  std::size_t page_size = 0;
  //! Physical pages created up front (the memory budget): 32 x 2 MiB = 64 MiB by default.
  std::size_t pool_pages = 32;
  bool deferred_reclamation = true;  //!< keep a released range's pages mapped for reuse
};

class cuda_vmm {
 public:
  using page_id = kvcache::page_id;
  static constexpr page_id no_page = kvcache::no_page;

  //! Creates the pool. Raises `error(system_error, "no CUDA device")` without a device,
  //! invalid_argument on a bad config, out_of_pages when the device cannot hold the pool.
  explicit cuda_vmm(const cuda_vmm_config& cfg = {})
      : device_(cfg.device), deferred_(cfg.deferred_reclamation) {
    auto drv = gpu::driver();
    if (!drv) raise(drv.code(), drv.error().message());
    api_ = *drv;
    int count = 0;
    if (status st = gpu::runtime_status(cudaGetDeviceCount(&count), "cudaGetDeviceCount"); !st)
      raise(st.code(), st.message());
    if (cfg.device < 0 || cfg.device >= count)
      raise(errc::invalid_argument, "cuda_vmm: device " + std::to_string(cfg.device) + " of " +
                                        std::to_string(count));
    if (cfg.pool_pages == 0) raise(errc::invalid_argument, "cuda_vmm: pool of 0 pages");
    if (cfg.pool_pages >= no_page) raise(errc::invalid_argument, "cuda_vmm: too many pages");
    check_or_raise(make_current());

    prop_ = CUmemAllocationProp{};
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = cfg.device;
    access_ = CUmemAccessDesc{};
    access_.location = prop_.location;
    access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    std::size_t gran = 0;
    check_or_raise(drv_status(api_->mem_get_allocation_granularity(
                                  &gran, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                              "cuMemGetAllocationGranularity"));
    page_size_ = cfg.page_size ? cfg.page_size : gran;
    if (gran == 0 || page_size_ % gran != 0)
      raise(errc::invalid_argument, "cuda_vmm: page size " + std::to_string(cfg.page_size) +
                                        " is not a positive multiple of the device granularity (" +
                                        std::to_string(gran) + " bytes)");

    // The pool: every handle created now, each mapped once into the pool view.
    handles_.reserve(cfg.pool_pages);
    status st;
    for (std::size_t i = 0; i < cfg.pool_pages && st.ok(); ++i) {
      CUmemGenericAllocationHandle h{};
      st = drv_status(api_->mem_create(&h, page_size_, &prop_, 0), "cuMemCreate(pool page)");
      if (st.ok()) handles_.push_back(h);
    }
    if (st.ok()) st = reserve_va(view_, cfg.pool_pages * page_size_);
    if (st.ok()) {
      view_bytes_ = cfg.pool_pages * page_size_;
      for (std::size_t i = 0; i < handles_.size() && st.ok(); ++i) {
        st = drv_status(api_->mem_map(view_ + i * page_size_, page_size_, 0, handles_[i], 0),
                        "cuMemMap(pool view)");
        if (st.ok()) view_mapped_ = i + 1;
      }
    }
    if (st.ok())
      st = drv_status(api_->mem_set_access(view_, view_bytes_, &access_, 1),
                      "cuMemSetAccess(pool view)");
    if (!st) {
      destroy();
      raise(st.code(), "cuda_vmm: creating a pool of " + std::to_string(cfg.pool_pages) +
                           " pages of " + std::to_string(page_size_) + " bytes: " + st.message());
    }
    pool_ = page_refs(handles_.size());
  }

  cuda_vmm(const cuda_vmm&) = delete;
  cuda_vmm& operator=(const cuda_vmm&) = delete;
  cuda_vmm(cuda_vmm&& o) noexcept { swap(o); }
  cuda_vmm& operator=(cuda_vmm&& o) noexcept {
    if (this != &o) {
      destroy();
      swap(o);
    }
    return *this;
  }
  //! Unmaps every range and the view, frees the address space, releases every handle.
  ~cuda_vmm() { destroy(); }

  [[nodiscard]] int device() const noexcept { return device_; }
  [[nodiscard]] std::size_t granularity() const noexcept { return page_size_; }
  [[nodiscard]] std::size_t pool_pages() const noexcept { return handles_.size(); }
  [[nodiscard]] std::uint32_t refs(page_id p) const noexcept { return pool_.refs(p); }
  //! The page's address in the pool view (device memory, valid for the backend's lifetime).
  [[nodiscard]] std::byte* page_address(page_id p) const noexcept {
    return as_ptr(view_ + std::size_t{p} * page_size_);
  }

  //! A range of at least `capacity` bytes; reuses the best-fitting idle range (as host_vmm).
  result<range_id> acquire(std::size_t capacity, std::size_t hint = 0) {
    if (capacity == 0) return status{errc::invalid_argument, "cuda_vmm::acquire: capacity 0"};
    const std::size_t ps = page_size_;
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
    KVCACHE_TRY(make_current());
    range_rec rec;
    KVCACHE_TRY(reserve_va(rec.base, capacity));
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

  //! Maps and privatizes the requested bytes of active ranges; all or nothing (as host_vmm).
  status prepare(std::span<const write_request> reqs) {
    const std::size_t ps = page_size_;
    work_.clear();
    for (const auto& q : reqs) {
      if (q.range >= ranges_.size() || !ranges_[q.range].active)
        return {errc::invalid_argument, "cuda_vmm::prepare: range " + std::to_string(q.range) +
                                            " is not an active range"};
      auto& rec = ranges_[q.range];
      if (q.end > rec.bytes || q.begin > q.end)
        return {errc::capacity_exceeded,
                "cuda_vmm::prepare: bytes [" + std::to_string(q.begin) + ", " +
                    std::to_string(q.end) + ") outside the range's capacity of " +
                    std::to_string(rec.bytes)};
      if (q.begin == q.end) continue;
      for (std::size_t i = q.begin / ps, last = (q.end - 1) / ps; i <= last; ++i) {
        const page_id p = rec.table[i];
        if (p == no_page || pool_.refs(p) > 1) work_.push_back({q.range, i});
      }
    }
    if (work_.empty()) return {};  // the steady state: everything mapped and private
    std::sort(work_.begin(), work_.end());
    work_.erase(std::unique(work_.begin(), work_.end()), work_.end());
    KVCACHE_TRY(make_current());
    KVCACHE_TRY(reserve_free(work_.size()));

    status st;
    for (std::size_t a = 0; a < work_.size() && st.ok();) {
      auto& rec = ranges_[work_[a].range];
      if (rec.table[work_[a].index] != no_page) {  // copy-on-write, page by page
        st = cow(rec, work_[a].index);
        ++a;
        continue;
      }
      std::size_t b = a + 1;  // a run of missing pages: one cuMemSetAccess
      while (b < work_.size() && work_[b].range == work_[a].range &&
             work_[b].index == work_[b - 1].index + 1 && rec.table[work_[b].index] == no_page)
        ++b;
      st = map_fresh(rec, work_[a].index, b - a);
      a = b;
    }
    if (!st.ok()) {
      // Undo fresh maps of this call (COW copies hold equal bytes, so they may stay).
      for (std::size_t a = 0; a < work_.size(); ++a) {
        auto& rec = ranges_[work_[a].range];
        if (work_[a].fresh && rec.table[work_[a].index] != no_page) unmap_page(rec, work_[a].index);
      }
      return st;
    }
    return {};
  }

  //! A new range sharing the parent's pages over its first `bytes` bytes (zero copy).
  result<range_id> fork(range_id parent, std::size_t bytes) {
    if (parent >= ranges_.size() || !ranges_[parent].active)
      return status{errc::invalid_argument,
                    "cuda_vmm::fork: range " + std::to_string(parent) + " is not active"};
    if (bytes > ranges_[parent].bytes)
      return status{errc::capacity_exceeded, "cuda_vmm::fork: bytes beyond the parent's capacity"};
    auto child = acquire(ranges_[parent].bytes, bytes);
    if (!child) return child;
    KVCACHE_TRY(make_current());
    const std::size_t ps = page_size_;
    const std::size_t n = (bytes + ps - 1) / ps;
    for (std::size_t i = 0; i < n;) {
      if (ranges_[parent].table[i] == no_page) {
        ++i;
        continue;
      }
      auto& src = ranges_[parent];
      auto& dst = ranges_[*child];
      std::size_t j = i;  // a run of parent pages: mapped one by one, one cuMemSetAccess
      status st;
      for (; j < n && src.table[j] != no_page && st.ok(); ++j) {
        if (dst.table[j] == src.table[j]) continue;
        if (dst.table[j] != no_page) unmap_page(dst, j);
        st = drv_status(api_->mem_map(dst.base + j * ps, ps, 0, handles_[src.table[j]], 0),
                        "cuMemMap(fork)");
        if (!st) break;
        ++stats_.map_calls;
        pool_.retain(src.table[j]);
        dst.table[j] = src.table[j];
        ++dst.mapped;
      }
      if (st.ok() && j > i)
        st = drv_status(api_->mem_set_access(dst.base + i * ps, (j - i) * ps, &access_, 1),
                        "cuMemSetAccess(fork)");
      if (!st) {
        release(*child);  // the parent is untouched
        return st;
      }
      i = j;
    }
    return child;
  }

  //! Finishes a range. With deferred reclamation its private pages stay mapped for reuse.
  void release(range_id r) {
    KVCACHE_ASSERT(r < ranges_.size() && ranges_[r].active);
    auto& rec = ranges_[r];
    rec.active = false;
    (void)make_current();
    if (!deferred_) {
      unmap_from(rec, 0);
    } else {
      for (std::size_t i = 0; i < rec.table.size(); ++i)
        if (rec.table[i] != no_page && pool_.refs(rec.table[i]) > 1) unmap_page(rec, i);
    }
    idle_.push_back(r);
  }

  [[nodiscard]] std::byte* data(range_id r) const noexcept { return as_ptr(ranges_[r].base); }
  [[nodiscard]] std::size_t capacity(range_id r) const noexcept { return ranges_[r].bytes; }
  [[nodiscard]] std::size_t backed_bytes(range_id r) const noexcept {
    return ranges_[r].mapped * page_size_;
  }
  //! The physical page behind page `index` of range r, or no_page (tests, invariant checks).
  [[nodiscard]] page_id page_at(range_id r, std::size_t index) const noexcept {
    return ranges_[r].table[index];
  }

  //! Unmaps every page of every idle range.
  std::size_t reclaim_idle() {
    (void)make_current();
    std::size_t freed = 0;
    for (range_id r : idle_) freed += unmap_from(ranges_[r], 0);
    stats_.pages_reclaimed += freed;
    return freed;
  }

  //! Walks every range and pool page: for diagnostics, not for every decode step.
  [[nodiscard]] memory_stats stats() const {
    memory_stats s = stats_;
    s.page_size = page_size_;
    s.pages_total = handles_.size();
    s.pages_free = pool_.free_pages();
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
    s.pages_shared = pool_.shared();
    return s;
  }

 private:
  struct range_rec {
    CUdeviceptr base = 0;
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

  static std::byte* as_ptr(CUdeviceptr p) noexcept {
    return reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(p));
  }
  static void check_or_raise(const status& st) {
    if (!st) raise(st.code(), "cuda_vmm: " + st.message());
  }
  status drv_status(CUresult r, const char* what) const {
    return gpu::driver_status(*api_, r, what);
  }
  status make_current() const {
    return gpu::runtime_status(cudaSetDevice(device_), "cudaSetDevice");
  }
  status reserve_va(CUdeviceptr& base, std::size_t bytes) {
    return drv_status(api_->mem_address_reserve(&base, bytes, page_size_, 0, 0),
                      "cuMemAddressReserve");
  }

  page_id take() noexcept { return pool_.take(); }
  void put(page_id p) noexcept { pool_.release(p); }

  // Makes at least n pages free, reclaiming idle ranges only if that is then enough.
  status reserve_free(std::size_t n) {
    if (pool_.free_pages() >= n) return {};
    const std::size_t reclaimable = reclaimable_pages(idle_, ranges_, pool_);
    if (pool_.free_pages() + reclaimable < n)
      return {errc::out_of_pages,
              "page pool exhausted: need " + std::to_string(n) + " pages of " +
                  std::to_string(page_size_) + " bytes, " + std::to_string(pool_.free_pages()) +
                  " free and " + std::to_string(reclaimable) + " reclaimable of " +
                  std::to_string(handles_.size())};
    for (range_id r : idle_) {  // oldest idle range first, top pages first
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

  // Maps `count` fresh pages at [first, first+count): one cuMemMap each, one cuMemSetAccess.
  status map_fresh(range_rec& rec, std::size_t first, std::size_t count) {
    const std::size_t ps = page_size_;
    status st;
    std::size_t done = 0;
    for (; done < count; ++done) {
      const std::size_t i = first + done;
      const page_id p = take();
      st = drv_status(api_->mem_map(rec.base + i * ps, ps, 0, handles_[p], 0), "cuMemMap");
      if (!st) {
        put(p);
        break;
      }
      ++stats_.map_calls;
      rec.table[i] = p;
    }
    if (st.ok())
      st = drv_status(api_->mem_set_access(rec.base + first * ps, count * ps, &access_, 1),
                      "cuMemSetAccess");
    if (!st) {
      for (std::size_t k = first; k < first + done; ++k) {
        (void)api_->mem_unmap(rec.base + k * ps, ps);
        put(rec.table[k]);
        rec.table[k] = no_page;
      }
      return st;
    }
    rec.mapped += count;
    stats_.pages_mapped_total += count;
    const auto r = static_cast<range_id>(&rec - ranges_.data());
    for (std::size_t k = first; k < first + count; ++k) {
      auto it = std::lower_bound(work_.begin(), work_.end(), work_item{r, k});
      if (it != work_.end() && it->range == r && it->index == k) it->fresh = true;
    }
    return {};
  }

  // Copy-on-write of one page: copy view to view, then map the copy in place of the shared page.
  status cow(range_rec& rec, std::size_t index) {
    const std::size_t ps = page_size_;
    const page_id old = rec.table[index];
    const page_id fresh = take();
    status st = gpu::runtime_status(
        cudaMemcpy(page_address(fresh), page_address(old), ps, cudaMemcpyDeviceToDevice),
        "cudaMemcpy(copy-on-write)");
    const CUdeviceptr va = rec.base + index * ps;
    if (st.ok()) st = drv_status(api_->mem_unmap(va, ps), "cuMemUnmap(copy-on-write)");
    if (!st) {
      put(fresh);
      return st;
    }
    st = drv_status(api_->mem_map(va, ps, 0, handles_[fresh], 0), "cuMemMap(copy-on-write)");
    if (st.ok()) st = drv_status(api_->mem_set_access(va, ps, &access_, 1), "cuMemSetAccess");
    if (!st) {  // put the shared page back where it was
      (void)api_->mem_unmap(va, ps);
      const bool back = api_->mem_map(va, ps, 0, handles_[old], 0) == CUDA_SUCCESS &&
                        api_->mem_set_access(va, ps, &access_, 1) == CUDA_SUCCESS;
      KVCACHE_ASSERT(back);
      (void)back;
      put(fresh);
      return st;
    }
    ++stats_.map_calls;
    ++stats_.cow_copies;
    ++stats_.pages_mapped_total;
    rec.table[index] = fresh;
    put(old);
    return {};
  }

  void unmap_page(range_rec& rec, std::size_t index) {
    const CUresult r = api_->mem_unmap(rec.base + index * page_size_, page_size_);
    KVCACHE_ASSERT(r == CUDA_SUCCESS);
    (void)r;
    put(rec.table[index]);
    rec.table[index] = no_page;
    --rec.mapped;
    ++stats_.pages_unmapped_total;
  }

  // Unmaps all pages at index >= first; returns how many pages went back to the free list.
  std::size_t unmap_from(range_rec& rec, std::size_t first) {
    const std::size_t before = pool_.free_pages();
    for (std::size_t i = first; i < rec.table.size() && rec.mapped > 0; ++i)
      if (rec.table[i] != no_page) unmap_page(rec, i);
    return pool_.free_pages() - before;
  }

  void destroy() noexcept {
    if (api_ == nullptr) return;
    (void)make_current();
    for (auto& rec : ranges_) {
      if (rec.bytes == 0) continue;
      for (std::size_t i = 0; i < rec.table.size(); ++i)
        if (rec.table[i] != no_page) (void)api_->mem_unmap(rec.base + i * page_size_, page_size_);
      (void)api_->mem_address_free(rec.base, rec.bytes);
    }
    ranges_.clear();
    for (std::size_t i = 0; i < view_mapped_; ++i)
      (void)api_->mem_unmap(view_ + i * page_size_, page_size_);
    if (view_bytes_) (void)api_->mem_address_free(view_, view_bytes_);
    for (auto h : handles_) (void)api_->mem_release(h);
    handles_.clear();
    view_ = 0;
    view_bytes_ = view_mapped_ = 0;
    api_ = nullptr;
  }

  void swap(cuda_vmm& o) noexcept {
    std::swap(api_, o.api_);
    std::swap(device_, o.device_);
    std::swap(page_size_, o.page_size_);
    std::swap(deferred_, o.deferred_);
    std::swap(prop_, o.prop_);
    std::swap(access_, o.access_);
    std::swap(handles_, o.handles_);
    std::swap(pool_, o.pool_);
    std::swap(view_, o.view_);
    std::swap(view_bytes_, o.view_bytes_);
    std::swap(view_mapped_, o.view_mapped_);
    std::swap(ranges_, o.ranges_);
    std::swap(idle_, o.idle_);
    std::swap(free_ids_, o.free_ids_);
    std::swap(work_, o.work_);
    std::swap(stats_, o.stats_);
  }

  const gpu::driver_api* api_ = nullptr;  // null: moved from (nothing to tear down)
  int device_ = 0;
  std::size_t page_size_ = 0;
  bool deferred_ = true;
  CUmemAllocationProp prop_{};
  CUmemAccessDesc access_{};
  std::vector<CUmemGenericAllocationHandle> handles_;  // page_id -> handle
  page_refs pool_;  // mappings per page (the view not counted) and the free list
  CUdeviceptr view_ = 0;  // every pool page mapped once, in page order (copy-on-write source)
  std::size_t view_bytes_ = 0;
  std::size_t view_mapped_ = 0;
  std::vector<range_rec> ranges_;
  std::vector<range_id> idle_;
  std::vector<range_id> free_ids_;
  std::vector<work_item> work_;  // scratch of prepare(), kept to avoid allocating per call
  memory_stats stats_;
};

static_assert(memory_backend<cuda_vmm>);

KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
