// SPDX-License-Identifier: Apache-2.0
//! @file
//! `cuda_vmm`: the CUDA virtual-memory backend (vAttention): `basic_vmm` (memory/vmm.hpp:
//! on-demand mapping, deferred reclamation with best fit, fork with copy-on-write, map ahead on a
//! background thread) over a mapper of `cuMemCreate` pages. The logic is the one host_vmm runs
//! and the host tests check; this file only issues driver calls.
//!
//! | host_mapper                      | cuda_mapper                                          |
//! | -------------------------------- | ---------------------------------------------------- |
//! | memfd slice                      | `cuMemCreate` handle (pinned, device-resident)       |
//! | `mmap(PROT_NONE)` reservation    | `cuMemAddressReserve` (capacity rounded to the page) |
//! | `mmap(MAP_FIXED)` of a file run  | `cuMemMap` per page + one `cuMemSetAccess` per run   |
//! | pool view (whole file mapped)    | pool view: one reservation with every handle mapped  |
//! | `memcpy` for copy-on-write       | `cudaMemcpy` device to device, view to view          |
//!
//! - The pool's handles are created up front (cuMemCreate costs ~200 µs; map ~1.5 µs, set access
//!   ~36 µs on an A100), so `prepare` only maps, and `map_ahead` hides even that behind compute.
//! - `map_calls` counts `cuMemMap` calls: one per page (the driver maps one handle per call).
//! - `data()` is a device address: host code must not dereference it. Use `cuda_passthrough`
//!   (cuda/passthrough.cuh) as the quantizer of a `cache<cuda_vmm>`.
//!
//! Streams: copy-on-write copies run on the legacy default stream and are complete when
//! `prepare` returns (the host waits for them). Unmapping (release without deferral, reclamation, copy-on-write) does not
//! wait for kernels: the caller must not have kernels in flight that touch the pages it gives
//! up (synchronize before closing a sequence whose kernels may still run). Every driver call
//! first makes the backend's device current on the calling thread (the background step's too).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/cuda/driver.cuh>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/page_bookkeeping.hpp>
#include <kvcache/memory/vmm.hpp>

#include <cuda.h>
#include <cuda_runtime_api.h>

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

//! The CUDA page mapper: a pool of `cuMemCreate` handles, each also mapped once into a "pool
//! view" (a stable address per page, for copy-on-write copies).
class cuda_mapper {
 public:
  using address = CUdeviceptr;
  static constexpr const char* name = "cuda_vmm";

  //! Creates the pool. Raises `error(system_error, "no CUDA device")` without a device,
  //! invalid_argument on a bad config, out_of_pages when the device cannot hold the pool.
  explicit cuda_mapper(const cuda_vmm_config& cfg) : device_(cfg.device) {
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
    if (st.ok()) {
      auto v = reserve(cfg.pool_pages * page_size_);
      st = v.ok() ? status{} : v.error();
      if (v) view_ = *v;
    }
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
    refs_ = page_refs(handles_.size());
  }

  cuda_mapper(const cuda_mapper&) = delete;
  cuda_mapper& operator=(const cuda_mapper&) = delete;
  cuda_mapper(cuda_mapper&& o) noexcept { swap(o); }
  cuda_mapper& operator=(cuda_mapper&& o) noexcept {
    if (this != &o) {
      destroy();
      swap(o);
    }
    return *this;
  }
  //! Unmaps the view, frees its address space, releases every handle (ranges are gone by then).
  ~cuda_mapper() { destroy(); }

  [[nodiscard]] int device() const noexcept { return device_; }
  [[nodiscard]] std::size_t page_size() const noexcept { return page_size_; }
  [[nodiscard]] page_refs& refs() noexcept { return refs_; }
  [[nodiscard]] const page_refs& refs() const noexcept { return refs_; }
  //! The page's address in the pool view (device memory, valid for the mapper's lifetime).
  [[nodiscard]] std::byte* page_address(page_id p) const noexcept {
    return pointer(view_ + std::size_t{p} * page_size_);
  }
  static std::byte* pointer(address a) noexcept {
    return reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(a));
  }

  result<address> reserve(std::size_t bytes) {
    KVCACHE_TRY(make_current());
    CUdeviceptr base = 0;
    KVCACHE_TRY(drv_status(api_->mem_address_reserve(&base, bytes, page_size_, 0, 0),
                           "cuMemAddressReserve"));
    return base;
  }
  void unreserve(address base, std::size_t bytes, const page_id* table) noexcept {
    (void)make_current();
    for (std::size_t i = 0; i < bytes / page_size_; ++i)
      if (table[i] != no_page) (void)api_->mem_unmap(base + i * page_size_, page_size_);
    (void)api_->mem_address_free(base, bytes);
  }

  //! One cuMemMap per page, then one cuMemSetAccess for the run; all or nothing.
  status map(address base, std::size_t first, const page_id* pages, std::size_t count,
             std::size_t& calls) {
    KVCACHE_TRY(make_current());
    const std::size_t ps = page_size_;
    status st;
    std::size_t done = 0;
    for (; done < count; ++done) {
      st = drv_status(api_->mem_map(base + (first + done) * ps, ps, 0, handles_[pages[done]], 0),
                      "cuMemMap");
      if (!st) break;
      ++calls;
    }
    if (st.ok())
      st = drv_status(api_->mem_set_access(base + first * ps, count * ps, &access_, 1),
                      "cuMemSetAccess");
    if (!st)
      for (std::size_t k = 0; k < done; ++k) (void)api_->mem_unmap(base + (first + k) * ps, ps);
    return st;
  }
  void unmap(address base, std::size_t first, const page_id* pages, std::size_t count) noexcept {
    (void)make_current();
    for (std::size_t k = 0; k < count; ++k)
      if (pages[k] != no_page) {
        [[maybe_unused]] const CUresult r =
            api_->mem_unmap(base + (first + k) * page_size_, page_size_);
        KVCACHE_ASSERT(r == CUDA_SUCCESS);
      }
  }
  //! Complete on return: a device-to-device cudaMemcpy does not block the host, so the copy is
  //! issued on the legacy stream (ordered after the engine's work on blocking streams) and
  //! waited for, which also reports its errors here.
  status copy(page_id dst, page_id src) {
    KVCACHE_TRY(make_current());
    KVCACHE_TRY(gpu::runtime_status(cudaMemcpyAsync(page_address(dst), page_address(src),
                                                    page_size_, cudaMemcpyDeviceToDevice,
                                                    cudaStreamLegacy),
                                    "cudaMemcpyAsync(copy-on-write)"));
    return gpu::runtime_status(cudaStreamSynchronize(cudaStreamLegacy),
                               "cudaStreamSynchronize(copy-on-write)");
  }
  //! Unmap the shared page, map the copy in its place; on failure the shared page goes back.
  status replace(address base, std::size_t index, page_id fresh, page_id old) {
    KVCACHE_TRY(make_current());
    const std::size_t ps = page_size_;
    const CUdeviceptr va = base + index * ps;
    KVCACHE_TRY(drv_status(api_->mem_unmap(va, ps), "cuMemUnmap(copy-on-write)"));
    status st = drv_status(api_->mem_map(va, ps, 0, handles_[fresh], 0), "cuMemMap(copy-on-write)");
    if (st.ok()) st = drv_status(api_->mem_set_access(va, ps, &access_, 1), "cuMemSetAccess");
    if (!st) {
      (void)api_->mem_unmap(va, ps);
      [[maybe_unused]] const bool back = api_->mem_map(va, ps, 0, handles_[old], 0) == CUDA_SUCCESS &&
                                         api_->mem_set_access(va, ps, &access_, 1) == CUDA_SUCCESS;
      KVCACHE_ASSERT(back);
    }
    return st;
  }

 private:
  static void check_or_raise(const status& st) {
    if (!st) raise(st.code(), "cuda_vmm: " + st.message());
  }
  status drv_status(CUresult r, const char* what) const {
    return gpu::driver_status(*api_, r, what);
  }
  status make_current() const {
    return gpu::runtime_status(cudaSetDevice(device_), "cudaSetDevice");
  }

  void destroy() noexcept {
    if (api_ == nullptr) return;
    (void)make_current();
    for (std::size_t i = 0; i < view_mapped_; ++i)
      (void)api_->mem_unmap(view_ + i * page_size_, page_size_);
    if (view_bytes_) (void)api_->mem_address_free(view_, view_bytes_);
    for (auto h : handles_) (void)api_->mem_release(h);
    handles_.clear();
    view_ = 0;
    view_bytes_ = view_mapped_ = 0;
    api_ = nullptr;
  }

  void swap(cuda_mapper& o) noexcept {
    std::swap(api_, o.api_);
    std::swap(device_, o.device_);
    std::swap(page_size_, o.page_size_);
    std::swap(prop_, o.prop_);
    std::swap(access_, o.access_);
    std::swap(handles_, o.handles_);
    std::swap(refs_, o.refs_);
    std::swap(view_, o.view_);
    std::swap(view_bytes_, o.view_bytes_);
    std::swap(view_mapped_, o.view_mapped_);
  }

  const gpu::driver_api* api_ = nullptr;  // null: moved from (nothing to tear down)
  int device_ = 0;
  std::size_t page_size_ = 0;
  CUmemAllocationProp prop_{};
  CUmemAccessDesc access_{};
  std::vector<CUmemGenericAllocationHandle> handles_;  // page_id -> handle
  page_refs refs_;  // mappings per page (the view not counted) and the free list
  CUdeviceptr view_ = 0;  // every pool page mapped once, in page order (copy-on-write source)
  std::size_t view_bytes_ = 0;
  std::size_t view_mapped_ = 0;
};

static_assert(page_mapper<cuda_mapper>);

class cuda_vmm : public basic_vmm<cuda_mapper> {
 public:
  explicit cuda_vmm(const cuda_vmm_config& cfg = {})
      : basic_vmm(cuda_mapper(cfg), cfg.deferred_reclamation) {}

  [[nodiscard]] int device() const noexcept { return mapper().device(); }
  [[nodiscard]] std::size_t pool_pages() const noexcept { return mapper().refs().pages(); }
  //! The page's address in the pool view (device memory, valid for the backend's lifetime).
  [[nodiscard]] std::byte* page_address(page_id p) const noexcept {
    return mapper().page_address(p);
  }
};

static_assert(memory_backend<cuda_vmm>);

KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
