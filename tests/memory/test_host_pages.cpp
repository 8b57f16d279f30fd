// SPDX-License-Identifier: Apache-2.0
//! @file
//! host_page_pool (memfd pages, refcounts, free list) and host_virtual_range (reserve/map/unmap).
#include <kvcache/memory/host_pages.hpp>

#include <cstddef>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "catch.hpp"
#include "support.hpp"

using kvcache::errc;
using kvcache::host_page_pool;
using kvcache::host_virtual_range;

using kvtest::thrown_code;

namespace {

const std::size_t ps = kvcache::os_page_size();

}  // namespace

TEST_CASE("host_page_pool rejects bad sizes with invalid_argument", "[memory][host_pages]") {
  REQUIRE(ps >= 4096);
  REQUIRE(ps % 4096 == 0);
  std::string what;
  CHECK(thrown_code([] { (void)host_page_pool(ps + ps / 2, 4); }, &what) == errc::invalid_argument);
  CHECK(what.find(std::to_string(ps + ps / 2)) != std::string::npos);  // names the bad size
  CHECK(thrown_code([] { (void)host_page_pool(ps / 2, 4); }) == errc::invalid_argument);
  CHECK(thrown_code([] { (void)host_page_pool(0, 4); }) == errc::invalid_argument);
  CHECK(thrown_code([] { (void)host_page_pool(ps, 0); }) == errc::invalid_argument);
  CHECK(!thrown_code([] { (void)host_page_pool(ps, 1); }).has_value());
  CHECK(!thrown_code([] { (void)host_page_pool(4 * ps, 3); }).has_value());
}

TEST_CASE("host_page_pool: take, retain and release count references", "[memory][host_pages]") {
  host_page_pool pool(ps, 4);
  CHECK(pool.page_size() == ps);
  CHECK(pool.pages() == 4);
  CHECK(pool.free_pages() == 4);
  CHECK(pool.fd() >= 0);

  // Fresh pages come out in ascending file order (contiguous runs need fewer mmaps).
  const auto a = pool.take();
  const auto b = pool.take();
  CHECK(a == 0);
  CHECK(b == 1);
  CHECK(pool.free_pages() == 2);
  CHECK(pool.refs(a) == 1);
  CHECK(pool.refs(b) == 1);
  CHECK(pool.offset(b) == static_cast<off_t>(ps));
  CHECK(pool.address(b) == pool.address(a) + ps);

  pool.retain(a);
  pool.retain(a);
  CHECK(pool.refs(a) == 3);
  CHECK(!pool.release(a));
  CHECK(!pool.release(a));
  CHECK(pool.free_pages() == 2);  // still referenced
  CHECK(pool.refs(a) == 1);
  CHECK(pool.release(a));  // the last reference: back to the free list
  CHECK(pool.refs(a) == 0);
  CHECK(pool.free_pages() == 3);

  // The free list is a stack: the page just released is the next one taken.
  CHECK(pool.take() == a);
  CHECK(pool.take() == 2);
  CHECK(pool.take() == 3);
  CHECK(pool.free_pages() == 0);
  CHECK(pool.release(b));
  CHECK(pool.take() == b);
}

TEST_CASE("host_page_pool: page addresses are stable slices of one file", "[memory][host_pages]") {
  host_page_pool pool(ps, 3);
  const auto p = pool.take();
  std::memset(pool.address(p), 0x5a, ps);
  const auto q = pool.take();
  std::memset(pool.address(q), 0x33, ps);
  CHECK(static_cast<unsigned char>(pool.address(p)[ps - 1]) == 0x5a);
  CHECK(static_cast<unsigned char>(pool.address(q)[0]) == 0x33);

  // A move keeps the same file and view.
  std::byte* addr = pool.address(p);
  host_page_pool moved(std::move(pool));
  CHECK(moved.address(p) == addr);
  CHECK(moved.pages() == 3);
  CHECK(moved.free_pages() == 1);
  CHECK(static_cast<unsigned char>(moved.address(p)[7]) == 0x5a);

  // trim() punches out the free pages only; their memory reads as zero afterwards.
  const auto r = moved.take();
  std::memset(moved.address(r), 0x77, ps);
  CHECK(moved.release(r));
  const std::size_t trimmed = moved.trim();
  CHECK(trimmed == ps);  // one free page
  CHECK(static_cast<unsigned char>(moved.address(r)[0]) == 0);
  CHECK(static_cast<unsigned char>(moved.address(p)[0]) == 0x5a);  // held pages keep their data
}

TEST_CASE("host_virtual_range: reserve, map the same page twice, unmap", "[memory][host_pages]") {
  CHECK(host_virtual_range::reserve(0).code() == errc::system_error);  // mmap of 0 bytes: EINVAL

  host_page_pool pool(ps, 4);
  auto reserved = host_virtual_range::reserve(4 * ps);
  REQUIRE(reserved.ok());
  host_virtual_range va = std::move(*reserved);
  REQUIRE(va.base() != nullptr);
  CHECK(va.size() == 4 * ps);

  const auto p = pool.take();
  const auto q = pool.take();
  // Page p at offsets 0 and 2*ps of the range, and visible in the pool view too.
  REQUIRE(va.map(0, ps, pool.fd(), pool.offset(p)).ok());
  REQUIRE(va.map(2 * ps, ps, pool.fd(), pool.offset(p)).ok());
  REQUIRE(va.map(ps, ps, pool.fd(), pool.offset(q)).ok());

  std::byte* first = va.base();
  std::byte* second = va.base() + 2 * ps;
  std::memcpy(first + 100, "hello", 5);
  CHECK(std::memcmp(second + 100, "hello", 5) == 0);
  std::memcpy(second + ps - 5, "world", 5);
  CHECK(std::memcmp(first + ps - 5, "world", 5) == 0);
  CHECK(std::memcmp(pool.address(p) + 100, "hello", 5) == 0);
  std::memcpy(pool.address(p), "pool!", 5);
  CHECK(std::memcmp(first, "pool!", 5) == 0);
  CHECK(std::memcmp(second, "pool!", 5) == 0);
  // q is a different page.
  std::memset(va.base() + ps, 0x11, ps);
  CHECK(std::memcmp(first + 100, "hello", 5) == 0);
  CHECK(static_cast<unsigned char>(pool.address(q)[ps - 1]) == 0x11);

  // Unmap the second mapping: the page survives in the pool and in the first mapping; mapping q
  // there instead shows q's bytes.
  REQUIRE(va.unmap(2 * ps, ps).ok());
  CHECK(std::memcmp(first + 100, "hello", 5) == 0);
  REQUIRE(va.map(2 * ps, ps, pool.fd(), pool.offset(q)).ok());
  CHECK(static_cast<unsigned char>(second[100]) == 0x11);

  // A multi-page mapping of a file-contiguous run.
  REQUIRE(va.map(0, 2 * ps, pool.fd(), pool.offset(p)).ok());  // p, q are pages 0, 1
  CHECK(std::memcmp(va.base() + 100, "hello", 5) == 0);
  CHECK(static_cast<unsigned char>(va.base()[ps + 3]) == 0x11);

  // Moving the range moves ownership of the reservation.
  std::byte* base = va.base();
  host_virtual_range moved(std::move(va));
  CHECK(va.base() == nullptr);
  CHECK(va.size() == 0);
  CHECK(moved.base() == base);
  CHECK(std::memcmp(moved.base() + 100, "hello", 5) == 0);
  host_virtual_range assigned;
  assigned = std::move(moved);
  CHECK(assigned.base() == base);
  CHECK(assigned.size() == 4 * ps);
}
