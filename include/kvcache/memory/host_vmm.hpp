// SPDX-License-Identifier: Apache-2.0
//! @file
//! `host_vmm`: the host virtual-memory backend (vAttention on the CPU): `basic_vmm` (vmm.hpp:
//! on-demand mapping, deferred reclamation with best fit, fork with copy-on-write, map ahead)
//! over memfd pages mapped with mmap.
//!
//! Linux limit: every run of file-discontiguous pages is a VMA, and vm.max_map_count (65530 by
//! default) caps those per process; larger pages or a raised limit help with many ranges.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/host_pages.hpp>
#include <kvcache/memory/page_bookkeeping.hpp>
#include <kvcache/memory/vmm.hpp>

#include <cstddef>
#include <cstring>
#include <utility>

KVCACHE_NAMESPACE_BEGIN

//! Construction parameters of `host_vmm`.
struct host_vmm_config {
  std::size_t page_size = 64 * 1024;  //!< a multiple of the OS page (64 KiB ... 2 MiB typical)
  std::size_t pool_pages = 1024;      //!< physical pages in the pool (the memory budget)
  bool deferred_reclamation = true;   //!< keep a released range's pages mapped for reuse
};

//! The host page mapper: pool pages are slices of one memfd file; a run of pages that are
//! consecutive in the file is mapped with one mmap call.
class host_mapper {
 public:
  using address = std::byte*;
  static constexpr const char* name = "host_vmm";

  host_mapper(std::size_t page_size, std::size_t pages) : pool_(page_size, pages) {}

  [[nodiscard]] std::size_t page_size() const noexcept { return pool_.page_size(); }
  [[nodiscard]] page_refs& refs() noexcept { return pool_.bookkeeping(); }
  [[nodiscard]] const page_refs& refs() const noexcept { return pool_.bookkeeping(); }
  [[nodiscard]] const host_page_pool& pool() const noexcept { return pool_; }
  static std::byte* pointer(address a) noexcept { return a; }

  result<address> reserve(std::size_t bytes) { return reserve_address_space(bytes); }
  void unreserve(address base, std::size_t bytes, const page_id*) noexcept {
    ::munmap(base, bytes);  // drops the mappings with the reservation
  }

  status map(address base, std::size_t first, const page_id* pages, std::size_t count,
             std::size_t& calls) {
    const std::size_t ps = pool_.page_size();
    for (std::size_t i = 0; i < count;) {
      std::size_t j = i + 1;
      while (j < count && pages[j] == pages[j - 1] + 1) ++j;
      status st = map_file_pages(base + (first + i) * ps, (j - i) * ps, pool_.fd(),
                                 pool_.offset(pages[i]));
      if (!st) {
        if (i > 0) (void)unmap_pages(base + first * ps, i * ps);  // all or nothing
        return st;
      }
      ++calls;
      i = j;
    }
    return {};
  }
  void unmap(address base, std::size_t first, const page_id*, std::size_t count) noexcept {
    const std::size_t ps = pool_.page_size();
    [[maybe_unused]] status st = unmap_pages(base + first * ps, count * ps);  // one call
    KVCACHE_ASSERT(st.ok());  // replacing a mapping with PROT_NONE fails only on ENOMEM
  }
  status copy(page_id dst, page_id src) {
    std::memcpy(pool_.address(dst), pool_.address(src), pool_.page_size());
    return {};
  }
  //! MAP_FIXED replaces the old page in place: on failure the old mapping may be gone, so it is
  //! mapped back (which reuses the VMA the failed call could not split).
  status replace(address base, std::size_t index, page_id fresh, page_id old) {
    const std::size_t ps = pool_.page_size();
    status st = map_file_pages(base + index * ps, ps, pool_.fd(), pool_.offset(fresh));
    if (!st) (void)map_file_pages(base + index * ps, ps, pool_.fd(), pool_.offset(old));
    return st;
  }

 private:
  host_page_pool pool_;
};

static_assert(page_mapper<host_mapper>);

class host_vmm : public basic_vmm<host_mapper> {
 public:
  explicit host_vmm(const host_vmm_config& cfg = {})
      : basic_vmm(host_mapper(cfg.page_size, cfg.pool_pages), cfg.deferred_reclamation) {}

  //! The physical page pool (its fd, page addresses and reference counts).
  [[nodiscard]] const host_page_pool& pool() const noexcept { return mapper().pool(); }
};

static_assert(memory_backend<host_vmm>);

KVCACHE_NAMESPACE_END
