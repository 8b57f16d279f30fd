// SPDX-License-Identifier: Apache-2.0
//! @file
//! Host building blocks of virtual memory: a pool of physical pages in a memfd file, and
//! reserved virtual ranges that pages are mapped into (the host analogue of cuMemCreate,
//! cuMemAddressReserve and cuMemMap).
//!
//! A page is a slice of one memfd file, so the same physical page can be mapped at several
//! addresses (fork without copying). The whole file is also mapped once as the pool's own
//! "view", which gives every page a stable address for copy-on-write copies.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/memory/page_bookkeeping.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

KVCACHE_NAMESPACE_BEGIN

//! The OS page size (the host's mapping granularity).
inline std::size_t os_page_size() noexcept {
  static const std::size_t size = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

namespace detail {
inline std::string errno_text(const char* what, int err) {
  return std::string(what) + " failed: " + std::strerror(err);
}
}  // namespace detail

//! Physical pages: slices of one memfd file, with reference counts (one per mapping) and a
//! free list. Not thread-safe by itself: its owner serializes access.
class host_page_pool {
 public:
  using page_id = kvcache::page_id;

  //! `page_size` must be a positive multiple of the OS page; `pages` > 0. Raises on bad input or
  //! when the OS refuses the memfd. Memory is committed by the kernel on first touch.
  host_page_pool(std::size_t page_size, std::size_t pages) : page_size_(page_size), pages_(pages) {
    if (page_size == 0 || page_size % os_page_size() != 0)
      raise(errc::invalid_argument, "host_page_pool: page size " + std::to_string(page_size) +
                                        " is not a positive multiple of the OS page (" +
                                        std::to_string(os_page_size()) + " bytes)");
    if (pages == 0) raise(errc::invalid_argument, "host_page_pool: pool of 0 pages");
    if (pages >= 0xffffffffu) raise(errc::invalid_argument, "host_page_pool: too many pages");
    fd_ = ::memfd_create("kvcache-pool", MFD_CLOEXEC);
    if (fd_ < 0) raise(errc::system_error, detail::errno_text("memfd_create", errno));
    const auto bytes = static_cast<off_t>(page_size * pages);
    if (::ftruncate(fd_, bytes) != 0) {
      const int err = errno;
      ::close(fd_);
      raise(errc::system_error, detail::errno_text("ftruncate(pool)", err));
    }
    void* view = ::mmap(nullptr, page_size * pages, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (view == MAP_FAILED) {
      const int err = errno;
      ::close(fd_);
      raise(errc::system_error, detail::errno_text("mmap(pool view)", err));
    }
    view_ = static_cast<std::byte*>(view);
    refs_ = page_refs(pages);  // fresh runs come out file-contiguous (fewer mmaps)
  }

  host_page_pool(const host_page_pool&) = delete;
  host_page_pool& operator=(const host_page_pool&) = delete;
  host_page_pool(host_page_pool&& o) noexcept { swap(o); }
  host_page_pool& operator=(host_page_pool&& o) noexcept {
    host_page_pool tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~host_page_pool() {
    if (view_) ::munmap(view_, page_size_ * pages_);
    if (fd_ >= 0) ::close(fd_);
  }

  [[nodiscard]] std::size_t page_size() const noexcept { return page_size_; }
  [[nodiscard]] std::size_t pages() const noexcept { return pages_; }
  [[nodiscard]] std::size_t free_pages() const noexcept { return refs_.free_pages(); }
  [[nodiscard]] int fd() const noexcept { return fd_; }
  [[nodiscard]] off_t offset(page_id p) const noexcept {
    return static_cast<off_t>(std::size_t{p} * page_size_);
  }
  //! The page's address in the pool view (valid for the pool's lifetime).
  [[nodiscard]] std::byte* address(page_id p) const noexcept { return view_ + offset(p); }
  [[nodiscard]] std::uint32_t refs(page_id p) const noexcept { return refs_.refs(p); }
  [[nodiscard]] const page_refs& bookkeeping() const noexcept { return refs_; }
  [[nodiscard]] page_refs& bookkeeping() noexcept { return refs_; }

  //! Takes a free page with one reference. Precondition: free_pages() > 0.
  page_id take() noexcept { return refs_.take(); }
  void retain(page_id p) noexcept { refs_.retain(p); }
  //! Drops one reference; returns true when the page went back to the free list.
  bool release(page_id p) noexcept { return refs_.release(p); }

  //! Gives the memory of free pages back to the OS (their contents are lost; they stay in the
  //! pool). Returns the number of bytes punched out.
  std::size_t trim() noexcept {
    std::size_t bytes = 0;
    for (page_id p : refs_.free_list())
      if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset(p),
                      static_cast<off_t>(page_size_)) == 0)
        bytes += page_size_;
    return bytes;
  }

 private:
  void swap(host_page_pool& o) noexcept {
    std::swap(page_size_, o.page_size_);
    std::swap(pages_, o.pages_);
    std::swap(fd_, o.fd_);
    std::swap(view_, o.view_);
    std::swap(refs_, o.refs_);
  }

  std::size_t page_size_ = 0;
  std::size_t pages_ = 0;
  int fd_ = -1;
  std::byte* view_ = nullptr;
  page_refs refs_;
};

//! Reserves `bytes` of inaccessible address space (no memory); system_error when the OS refuses.
inline result<std::byte*> reserve_address_space(std::size_t bytes) noexcept {
  void* p = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return status{errc::system_error, detail::errno_text("mmap(reserve)", errno)};
  return static_cast<std::byte*>(p);
}
//! Maps `len` bytes of file `fd` at `file_offset` to `at` (page aligned), read-write, shared,
//! populated (the page tables are filled now, not on first touch during a step).
[[nodiscard]] inline status map_file_pages(std::byte* at, std::size_t len, int fd,
                                           off_t file_offset) noexcept {
  void* p = ::mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd,
                   file_offset);
  if (p == MAP_FAILED)
    return {errc::system_error,
            detail::errno_text("mmap(map page)", errno) +
                (errno == ENOMEM ? " (vm.max_map_count reached? scattered pages each need a VMA)"
                                 : "")};
  return {};
}
//! Replaces `[at, at+len)` with an inaccessible reservation again (one call, mapped or not).
[[nodiscard]] inline status unmap_pages(std::byte* at, std::size_t len) noexcept {
  void* p = ::mmap(at, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                   -1, 0);
  if (p == MAP_FAILED) return {errc::system_error, detail::errno_text("mmap(unmap page)", errno)};
  return {};
}

//! A reserved, initially inaccessible range of virtual addresses into which pool pages are
//! mapped at page-aligned offsets. Reserving costs address space only.
class host_virtual_range {
 public:
  host_virtual_range() = default;
  //! Reserves `bytes` of address space (no memory); fails with system_error when the OS refuses.
  static result<host_virtual_range> reserve(std::size_t bytes) noexcept {
    auto p = reserve_address_space(bytes);
    if (!p) return p.error();
    host_virtual_range r;
    r.base_ = *p;
    r.bytes_ = bytes;
    return r;
  }
  host_virtual_range(const host_virtual_range&) = delete;
  host_virtual_range& operator=(const host_virtual_range&) = delete;
  host_virtual_range(host_virtual_range&& o) noexcept
      : base_(std::exchange(o.base_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  host_virtual_range& operator=(host_virtual_range&& o) noexcept {
    if (this != &o) {
      reset();
      base_ = std::exchange(o.base_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~host_virtual_range() { reset(); }

  [[nodiscard]] std::byte* base() const noexcept { return base_; }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }

  //! Maps `len` bytes of the file at `file_offset` to `base + offset`, read-write, shared.
  [[nodiscard]] status map(std::size_t offset, std::size_t len, int fd, off_t file_offset) noexcept {
    return map_file_pages(base_ + offset, len, fd, file_offset);
  }
  //! Replaces `[offset, offset+len)` with an inaccessible reservation again.
  [[nodiscard]] status unmap(std::size_t offset, std::size_t len) noexcept {
    return unmap_pages(base_ + offset, len);
  }

 private:
  void reset() noexcept {
    if (base_) ::munmap(base_, bytes_);
    base_ = nullptr;
    bytes_ = 0;
  }
  std::byte* base_ = nullptr;
  std::size_t bytes_ = 0;
};

KVCACHE_NAMESPACE_END
