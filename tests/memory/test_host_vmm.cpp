// SPDX-License-Identifier: Apache-2.0
//! @file
//! host_vmm: pages mapped on demand, deferred reclamation with best-fit reuse, reclamation under
//! pressure, all-or-nothing exhaustion, fork with copy-on-write, and page reference counts.
#include <kvcache/memory/host_vmm.hpp>

#include <cstddef>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "support.hpp"

using kvcache::errc;
using kvcache::host_vmm;
using kvcache::host_vmm_config;
using kvcache::range_id;
using kvcache::status;
using kvcache::write_request;
using kvtest::fill;
using kvtest::holds;
using kvtest::stats_diff;

namespace {

const std::size_t ps = kvcache::os_page_size();

host_vmm make_vmm(std::size_t pages, bool deferred = true) {
  return host_vmm(host_vmm_config{ps, pages, deferred});
}

range_id acquire(host_vmm& m, std::size_t capacity, std::size_t hint = 0) {
  auto r = m.acquire(capacity, hint);
  REQUIRE(r.ok());
  return *r;
}

status prep(host_vmm& m, range_id r, std::size_t begin, std::size_t end) {
  const write_request q{r, begin, end};
  return m.prepare({&q, 1});
}

range_id fork(host_vmm& m, range_id parent, std::size_t bytes) {
  auto r = m.fork(parent, bytes);
  REQUIRE(r.ok());
  return *r;
}

std::vector<host_vmm::page_id> pages_of(const host_vmm& m, range_id r) {
  std::vector<host_vmm::page_id> v;
  for (std::size_t i = 0; i < m.capacity(r) / ps; ++i) v.push_back(m.page_at(r, i));
  return v;
}

}  // namespace

TEST_CASE("host_vmm: page size must be a positive multiple of the OS page", "[memory][host_vmm]") {
  using kvtest::thrown_code;
  std::string what;
  CHECK(thrown_code([] { host_vmm m(host_vmm_config{ps + ps / 2, 8}); }, &what) ==
        errc::invalid_argument);
  CHECK(what.find("page size") != std::string::npos);
  CHECK(thrown_code([] { host_vmm m(host_vmm_config{ps / 2, 8}); }) == errc::invalid_argument);
  CHECK(thrown_code([] { host_vmm m(host_vmm_config{ps, 0}); }) == errc::invalid_argument);
  host_vmm big(host_vmm_config{4 * ps, 2});
  CHECK(big.granularity() == 4 * ps);
  CHECK(big.stats().page_size == 4 * ps);
  CHECK(big.stats().pages_total == 2);
}

TEST_CASE("host_vmm: acquire reserves address space only", "[memory][host_vmm]") {
  auto m = make_vmm(8);
  CHECK(m.acquire(0).code() == errc::invalid_argument);
  const range_id r = acquire(m, 3 * ps + 1);
  CHECK(m.capacity(r) == 4 * ps);  // rounded up to whole pages
  CHECK(m.backed_bytes(r) == 0);
  CHECK(m.data(r) != nullptr);
  const auto s = m.stats();
  CHECK(s.pages_free == 8);
  CHECK(s.pages_mapped == 0);
  CHECK(s.ranges_active == 1);
  CHECK(s.ranges_idle == 0);
  CHECK(s.bytes_reserved == 4 * ps);
  CHECK(s.map_calls == 0);
  // Far more address space than the pool holds is fine: reserving costs no memory.
  const range_id big = acquire(m, 1000 * ps);
  CHECK(m.capacity(big) == 1000 * ps);
  CHECK(m.stats().pages_free == 8);
  CHECK(m.stats().bytes_reserved == 1004 * ps);
}

TEST_CASE("host_vmm: prepare maps whole pages, only as bytes are prepared", "[memory][host_vmm]") {
  auto m = make_vmm(16);
  const range_id r = acquire(m, 8 * ps);
  std::byte* base = m.data(r);

  REQUIRE(prep(m, r, 0, 1).ok());
  CHECK(m.backed_bytes(r) == ps);
  CHECK(m.stats().pages_free == 15);
  CHECK(m.stats().pages_mapped == 1);
  CHECK(m.stats().map_calls == 1);
  CHECK(m.stats().pages_mapped_total == 1);
  fill(base, ps, 1);  // the whole page is writable

  // Already backed: nothing to do, no system call.
  REQUIRE(prep(m, r, 0, ps).ok());
  REQUIRE(prep(m, r, 17, ps - 1).ok());
  CHECK(m.backed_bytes(r) == ps);
  CHECK(m.stats().map_calls == 1);

  // One byte over the page boundary maps exactly one more page.
  REQUIRE(prep(m, r, ps - 1, ps + 1).ok());
  CHECK(m.backed_bytes(r) == 2 * ps);
  CHECK(m.stats().map_calls == 2);

  // An empty request maps nothing; a byte in page 3 maps page 3 only.
  REQUIRE(prep(m, r, 3 * ps, 3 * ps).ok());
  CHECK(m.backed_bytes(r) == 2 * ps);
  REQUIRE(prep(m, r, 3 * ps + 5, 3 * ps + 6).ok());
  CHECK(m.backed_bytes(r) == 3 * ps);
  CHECK(m.page_at(r, 2) == host_vmm::no_page);
  CHECK(m.page_at(r, 3) != host_vmm::no_page);

  REQUIRE(prep(m, r, 0, 8 * ps).ok());
  CHECK(m.backed_bytes(r) == 8 * ps);
  CHECK(m.stats().pages_free == 8);
  CHECK(m.data(r) == base);     // nothing ever moves
  CHECK(holds(base, ps, 1));    // earlier bytes kept
  fill(base + ps, 7 * ps, 2);   // every page writable
  CHECK(holds(base + ps, 7 * ps, 2));

  // Out of the range or inverted: capacity_exceeded, nothing changed.
  const auto before = m.stats();
  CHECK(prep(m, r, 0, 8 * ps + 1).code() == errc::capacity_exceeded);
  CHECK(prep(m, r, 10, 5).code() == errc::capacity_exceeded);
  // Not an active range: invalid_argument.
  CHECK(prep(m, 77, 0, 1).code() == errc::invalid_argument);
  CHECK(stats_diff(before, m.stats()).empty());

  // A fresh run of pages that are contiguous in the pool file is one map call.
  const range_id r2 = acquire(m, 8 * ps);
  const auto calls = m.stats().map_calls;
  REQUIRE(prep(m, r2, 0, 4 * ps).ok());
  CHECK(m.stats().map_calls == calls + 1);
  CHECK(m.backed_bytes(r2) == 4 * ps);
}

TEST_CASE("host_vmm: deferred reclamation reuses a released range with its pages mapped",
          "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id r = acquire(m, 4 * ps);
  REQUIRE(prep(m, r, 0, 3 * ps).ok());
  std::byte* base = m.data(r);
  fill(base, 3 * ps, 4);

  m.release(r);
  auto s = m.stats();
  CHECK(s.ranges_active == 0);
  CHECK(s.ranges_idle == 1);
  CHECK(s.pages_idle == 3);
  CHECK(s.pages_free == 5);  // the pages stay with the idle range
  CHECK(prep(m, r, 0, 1).code() == errc::invalid_argument);  // released: not active
  CHECK(s.pages_unmapped_total == 0);

  const auto calls = s.map_calls;
  const range_id again = acquire(m, 4 * ps, 2 * ps);
  CHECK(again == r);
  CHECK(m.data(again) == base);
  CHECK(m.backed_bytes(again) == 3 * ps);
  s = m.stats();
  CHECK(s.ranges_reused == 1);
  CHECK(s.ranges_idle == 0);
  CHECK(s.pages_idle == 0);
  CHECK(s.map_calls == calls);
  // Writing within the pages it kept issues no map call either.
  REQUIRE(prep(m, again, 0, 3 * ps).ok());
  CHECK(m.stats().map_calls == calls);
  CHECK(m.stats().pages_free == 5);
}

TEST_CASE("host_vmm: acquire picks the best-fitting idle range", "[memory][host_vmm]") {
  auto m = make_vmm(16);
  const range_id one = acquire(m, 8 * ps), three = acquire(m, 8 * ps), five = acquire(m, 8 * ps);
  REQUIRE(prep(m, one, 0, 1 * ps).ok());
  REQUIRE(prep(m, three, 0, 3 * ps).ok());
  REQUIRE(prep(m, five, 0, 5 * ps).ok());
  // Release in an order unrelated to size.
  m.release(three);
  m.release(five);
  m.release(one);
  REQUIRE(m.stats().ranges_idle == 3);

  SECTION("a hint picks the range with the fewest pages that still cover it") {
    CHECK(acquire(m, 8 * ps, 2 * ps) == three);
    CHECK(acquire(m, 8 * ps, 2 * ps) == five);  // three is gone: five is the only one covering
    CHECK(acquire(m, 8 * ps, 2 * ps) == one);   // nothing covers: the most mapped left
  }
  SECTION("a hint of exactly the mapped bytes covers") {
    CHECK(acquire(m, 8 * ps, 1 * ps) == one);
    CHECK(acquire(m, 8 * ps, 3 * ps) == three);
    CHECK(acquire(m, 8 * ps, 5 * ps) == five);
  }
  SECTION("a hint a byte over a range's pages needs the next one up") {
    CHECK(acquire(m, 8 * ps, 3 * ps + 1) == five);
  }
  SECTION("no range covers the hint: the most mapped") {
    CHECK(acquire(m, 8 * ps, 7 * ps) == five);
  }
  SECTION("no hint: the most mapped") {
    CHECK(acquire(m, 8 * ps) == five);
    CHECK(acquire(m, 8 * ps) == three);
    CHECK(acquire(m, 8 * ps) == one);
  }
  SECTION("a range of another capacity is never reused") {
    const range_id other = acquire(m, 4 * ps, ps);
    CHECK(other != one);
    CHECK(other != three);
    CHECK(other != five);
    CHECK(m.stats().ranges_reused == 0);
    CHECK(m.stats().ranges_idle == 3);
  }
  CHECK(m.stats().map_calls == 3);  // reuse never maps
}

TEST_CASE("host_vmm: without deferred reclamation, release unmaps", "[memory][host_vmm]") {
  auto m = make_vmm(8, /*deferred=*/false);
  const range_id r = acquire(m, 4 * ps);
  REQUIRE(prep(m, r, 0, 3 * ps).ok());
  CHECK(m.stats().pages_free == 5);
  m.release(r);
  const auto s = m.stats();
  CHECK(s.pages_free == 8);
  CHECK(s.pages_mapped == 0);
  CHECK(s.pages_idle == 0);
  CHECK(s.pages_unmapped_total == 3);
  // The address range itself is still reused, empty.
  const range_id again = acquire(m, 4 * ps, 3 * ps);
  CHECK(again == r);
  CHECK(m.backed_bytes(again) == 0);
  CHECK(m.stats().ranges_reused == 1);
  REQUIRE(prep(m, again, 0, ps).ok());
  CHECK(m.backed_bytes(again) == ps);
}

TEST_CASE("host_vmm: idle pages are reclaimed only when the pool runs short",
          "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id idle = acquire(m, 8 * ps);
  REQUIRE(prep(m, idle, 0, 6 * ps).ok());
  m.release(idle);

  const range_id r = acquire(m, 16 * ps);  // another capacity: does not take the idle range
  REQUIRE(r != idle);
  REQUIRE(prep(m, r, 0, 2 * ps).ok());  // the two free pages suffice
  auto s = m.stats();
  CHECK(s.pages_reclaimed == 0);
  CHECK(s.pages_idle == 6);
  CHECK(s.pages_free == 0);

  REQUIRE(prep(m, r, 2 * ps, 4 * ps).ok());  // two more: taken from the idle range
  s = m.stats();
  CHECK(s.pages_reclaimed == 2);
  CHECK(s.pages_idle == 4);
  CHECK(s.pages_free == 0);
  CHECK(m.backed_bytes(r) == 4 * ps);
  CHECK(m.backed_bytes(idle) == 4 * ps);
  // Its top pages went first (the least likely to be reused).
  CHECK(m.page_at(idle, 5) == host_vmm::no_page);
  CHECK(m.page_at(idle, 4) == host_vmm::no_page);
  CHECK(m.page_at(idle, 3) != host_vmm::no_page);
  CHECK(m.page_at(idle, 0) != host_vmm::no_page);
}

TEST_CASE("host_vmm: exhaustion fails with out_of_pages and changes nothing",
          "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 11);
  const range_id idle = acquire(m, 8 * ps);
  REQUIRE(prep(m, idle, 0, 2 * ps).ok());
  fill(m.data(idle), 2 * ps, 12);
  m.release(idle);  // two reclaimable pages
  const range_id c = acquire(m, 16 * ps);
  REQUIRE(m.stats().pages_free == 3);

  const auto before = m.stats();
  const auto idle_pages = pages_of(m, idle);
  const auto a_pages = pages_of(m, a);
  const status st = prep(m, c, 0, 6 * ps);  // 6 > 3 free + 2 reclaimable
  CHECK(st.code() == errc::out_of_pages);
  // The message names the numbers.
  CHECK(st.message().find("need 6 pages") != std::string::npos);
  CHECK(st.message().find(std::to_string(ps) + " bytes") != std::string::npos);
  CHECK(st.message().find("3 free") != std::string::npos);
  CHECK(st.message().find("2 reclaimable") != std::string::npos);
  CHECK(st.message().find("of 8") != std::string::npos);
  // Nothing changed: counters, mappings (the idle range's too), bytes.
  CHECK(stats_diff(before, m.stats()).empty());
  CHECK(m.backed_bytes(c) == 0);
  CHECK(pages_of(m, idle) == idle_pages);
  CHECK(pages_of(m, a) == a_pages);
  CHECK(holds(m.data(a), 3 * ps, 11));
  CHECK(holds(m.data(idle), 2 * ps, 12));

  // Exactly free + reclaimable fits.
  REQUIRE(prep(m, c, 0, 5 * ps).ok());
  CHECK(m.stats().pages_free == 0);
  CHECK(m.stats().pages_reclaimed == 2);
  CHECK(m.backed_bytes(idle) == 0);
  CHECK(holds(m.data(a), 3 * ps, 11));
  fill(m.data(c), 5 * ps, 13);
  CHECK(holds(m.data(a), 3 * ps, 11));  // the reclaimed pages were not a's
  CHECK(prep(m, c, 5 * ps, 5 * ps + 1).code() == errc::out_of_pages);
}

TEST_CASE("host_vmm: one prepare of several requests is all or nothing", "[memory][host_vmm]") {
  auto m = make_vmm(4);
  const range_id a = acquire(m, 4 * ps), b = acquire(m, 4 * ps);

  SECTION("not enough pages for all: none is mapped") {
    const write_request reqs[] = {{a, 0, 2 * ps}, {b, 0, 3 * ps}};
    const auto before = m.stats();
    CHECK(m.prepare(reqs).code() == errc::out_of_pages);
    CHECK(stats_diff(before, m.stats()).empty());
    CHECK(m.backed_bytes(a) == 0);
    CHECK(m.backed_bytes(b) == 0);
    const write_request fits[] = {{a, 0, 2 * ps}, {b, 0, 2 * ps}};
    REQUIRE(m.prepare(fits).ok());
    CHECK(m.backed_bytes(a) == 2 * ps);
    CHECK(m.backed_bytes(b) == 2 * ps);
    CHECK(m.stats().pages_free == 0);
  }
  SECTION("a bad request anywhere: nothing is mapped") {
    const write_request beyond[] = {{a, 0, ps}, {b, 0, 4 * ps + 1}};
    CHECK(m.prepare(beyond).code() == errc::capacity_exceeded);
    const write_request inactive[] = {{a, 0, ps}, {b, 0, ps}, {99, 0, 1}};
    CHECK(m.prepare(inactive).code() == errc::invalid_argument);
    CHECK(m.backed_bytes(a) == 0);
    CHECK(m.backed_bytes(b) == 0);
    CHECK(m.stats().pages_free == 4);
    CHECK(m.stats().map_calls == 0);
  }
  SECTION("overlapping requests for one page need one page") {
    const write_request reqs[] = {{a, 0, 10}, {a, 5, ps}, {a, ps - 1, ps}, {b, 0, 3 * ps}};
    REQUIRE(m.prepare(reqs).ok());  // 1 + 3 pages of 4
    CHECK(m.backed_bytes(a) == ps);
    CHECK(m.backed_bytes(b) == 3 * ps);
  }
}

TEST_CASE("host_vmm: fork shares the parent's pages, zero copy", "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 7);
  const auto before = m.stats();

  const range_id c = fork(m, a, 3 * ps);
  CHECK(c != a);
  CHECK(m.data(c) != m.data(a));
  CHECK(m.capacity(c) == m.capacity(a));
  CHECK(holds(m.data(c), 3 * ps, 7));
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(m.page_at(c, i) == m.page_at(a, i));
    CHECK(m.pool().refs(m.page_at(a, i)) == 2);
  }
  CHECK(m.page_at(c, 3) == host_vmm::no_page);
  CHECK(m.backed_bytes(c) == 3 * ps);
  auto s = m.stats();
  CHECK(s.pages_shared == 3);
  CHECK(s.cow_copies == 0);
  CHECK(s.pages_free == before.pages_free);  // no page taken
  CHECK(s.pages_mapped == 6);
  CHECK(s.ranges_active == 2);

  // A fork of part of the range shares only the pages that cover that part.
  const range_id d = fork(m, a, ps + 1);
  CHECK(m.page_at(d, 0) == m.page_at(a, 0));
  CHECK(m.page_at(d, 1) == m.page_at(a, 1));
  CHECK(m.page_at(d, 2) == host_vmm::no_page);
  CHECK(m.pool().refs(m.page_at(a, 0)) == 3);
  CHECK(m.pool().refs(m.page_at(a, 2)) == 2);
  const range_id e = fork(m, a, 0);
  CHECK(m.backed_bytes(e) == 0);
  CHECK(m.stats().pages_free == before.pages_free);
  CHECK(m.stats().cow_copies == 0);

  // Reading shared bytes does not copy; a write to a fresh page of the child does not either.
  REQUIRE(prep(m, c, 3 * ps, 4 * ps).ok());
  CHECK(m.stats().cow_copies == 0);
  CHECK(m.page_at(c, 3) != m.page_at(a, 3));
}

TEST_CASE("host_vmm: the first write to a shared page copies that page only",
          "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 7);
  const range_id c = fork(m, a, 3 * ps);
  const auto shared = pages_of(m, a);
  const auto free0 = m.stats().pages_free;

  // Child writes into page 1.
  REQUIRE(prep(m, c, ps + 10, ps + 20).ok());
  auto s = m.stats();
  CHECK(s.cow_copies == 1);
  CHECK(s.pages_free == free0 - 1);
  CHECK(s.pages_shared == 2);
  CHECK(m.page_at(c, 0) == shared[0]);
  CHECK(m.page_at(c, 1) != shared[1]);
  CHECK(m.page_at(c, 2) == shared[2]);
  CHECK(m.page_at(a, 1) == shared[1]);  // the parent keeps its page
  CHECK(holds(m.data(c), 3 * ps, 7));   // the copy holds the same bytes
  fill(m.data(c) + ps + 10, 10, 99);
  CHECK(holds(m.data(a), 3 * ps, 7));  // the parent does not see the child's write

  // The parent's page 1 is now private to it: writing there copies nothing.
  REQUIRE(prep(m, a, ps, ps + 1).ok());
  CHECK(m.stats().cow_copies == 1);
  // The parent writes page 0, still shared: the parent copies.
  REQUIRE(prep(m, a, 0, 1).ok());
  CHECK(m.stats().cow_copies == 2);
  CHECK(m.page_at(a, 0) != shared[0]);
  CHECK(m.page_at(c, 0) == shared[0]);
  fill(m.data(a), ps, 55);
  CHECK(holds(m.data(c), ps, 7));  // the child does not see the parent's write
  CHECK(holds(m.data(c) + ps + 10, 10, 99));

  // Writes to pages already private copy nothing and map nothing.
  const auto calls = m.stats().map_calls;
  REQUIRE(prep(m, c, ps, 2 * ps).ok());
  REQUIRE(prep(m, a, 0, 2 * ps).ok());
  CHECK(m.stats().cow_copies == 2);
  CHECK(m.stats().map_calls == calls);
  CHECK(m.stats().pages_shared == 1);  // page 2 only
}

TEST_CASE("host_vmm: a page is freed only when its last mapping goes", "[memory][host_vmm]") {
  auto m = make_vmm(6, /*deferred=*/false);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 3);
  const range_id c = fork(m, a, 3 * ps);

  m.release(a);  // unmaps a; its pages are still mapped in c
  auto s = m.stats();
  CHECK(s.pages_free == 3);
  CHECK(s.pages_shared == 0);
  for (std::size_t i = 0; i < 3; ++i) CHECK(m.pool().refs(m.page_at(c, i)) == 1);
  CHECK(holds(m.data(c), 3 * ps, 3));

  // Every free page goes to another range and is scribbled on: c's bytes are not among them.
  const range_id d = acquire(m, 8 * ps);
  REQUIRE(prep(m, d, 0, 3 * ps).ok());
  fill(m.data(d), 3 * ps, 200);
  CHECK(m.stats().pages_free == 0);
  CHECK(holds(m.data(c), 3 * ps, 3));
  // c's pages are private now: writing copies nothing (and needs no free page).
  REQUIRE(prep(m, c, 0, 3 * ps).ok());
  CHECK(m.stats().cow_copies == 0);

  m.release(c);
  CHECK(m.stats().pages_free == 3);
  m.release(d);
  CHECK(m.stats().pages_free == 6);
}

TEST_CASE("host_vmm: a copy-on-write that cannot get pages fails and changes nothing",
          "[memory][host_vmm]") {
  auto m = make_vmm(4);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 5);
  const range_id c = fork(m, a, 3 * ps);
  const range_id d = acquire(m, 8 * ps);
  REQUIRE(prep(m, d, 0, ps).ok());  // the last free page
  REQUIRE(m.stats().pages_free == 0);

  const auto before = m.stats();
  const auto pa = pages_of(m, a), pc = pages_of(m, c);
  CHECK(prep(m, c, 0, 2 * ps).code() == errc::out_of_pages);  // two copies needed
  CHECK(prep(m, a, 0, 1).code() == errc::out_of_pages);       // the parent's side as well
  CHECK(stats_diff(before, m.stats()).empty());
  CHECK(pages_of(m, a) == pa);
  CHECK(pages_of(m, c) == pc);
  CHECK(holds(m.data(a), 3 * ps, 5));
  CHECK(holds(m.data(c), 3 * ps, 5));

  // Freeing d (idle, reclaimable) makes room for exactly one copy.
  m.release(d);
  CHECK(prep(m, c, 0, 2 * ps).code() == errc::out_of_pages);
  REQUIRE(prep(m, c, 0, ps).ok());
  CHECK(m.stats().pages_reclaimed == 1);
  CHECK(m.stats().cow_copies == 1);
  CHECK(m.page_at(c, 0) != pa[0]);
  CHECK(holds(m.data(c), 3 * ps, 5));
  CHECK(holds(m.data(a), 3 * ps, 5));
}

// Regression (was a bug in host_vmm.hpp, prepare/reserve_free): a page whose only other mapping is in an idle range
// is treated as shared (copy needed) and not reclaimable, so with a full pool the write fails
// with out_of_pages although reclaiming the idle mapping would make the page private and need no
// page at all. With room in the pool it costs a needless copy instead.
TEST_CASE("host_vmm: a page shared only with an idle range needs no copy under a full pool",
          "[memory][host_vmm][regression]") {
  auto m = make_vmm(4);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 5);
  const range_id c = fork(m, a, 3 * ps);
  m.release(c);  // deferred: the idle child still maps a's pages
  const range_id d = acquire(m, 8 * ps);
  REQUIRE(prep(m, d, 0, ps).ok());
  REQUIRE(m.stats().pages_free == 0);

  const status st = prep(m, a, 0, 1);
  CHECK(st.ok());
  CHECK(st.message() == "");
  CHECK(holds(m.data(a), 3 * ps, 5));
}

TEST_CASE("host_vmm: reclaim_idle unmaps every idle range", "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps), b = acquire(m, 4 * ps), live = acquire(m, 8 * ps);
  REQUIRE(prep(m, a, 0, 2 * ps).ok());
  REQUIRE(prep(m, b, 0, 3 * ps).ok());
  REQUIRE(prep(m, live, 0, ps).ok());
  fill(m.data(live), ps, 8);
  m.release(a);
  m.release(b);

  CHECK(m.reclaim_idle() == 5);
  auto s = m.stats();
  CHECK(s.pages_free == 7);
  CHECK(s.pages_idle == 0);
  CHECK(s.pages_reclaimed == 5);
  CHECK(s.pages_unmapped_total == 5);
  CHECK(m.backed_bytes(live) == ps);
  CHECK(holds(m.data(live), ps, 8));
  CHECK(m.reclaim_idle() == 0);  // nothing left

  // The idle ranges are still reusable, empty.
  const range_id again = acquire(m, 4 * ps, ps);
  CHECK((again == a || again == b));
  CHECK(m.backed_bytes(again) == 0);

  // An idle fork child: reclaiming drops its mappings but frees nothing the parent still maps.
  const range_id child = fork(m, live, ps);
  m.release(child);
  CHECK(m.reclaim_idle() == 0);
  CHECK(m.stats().pages_shared == 0);
  CHECK(m.backed_bytes(child) == 0);
  CHECK(holds(m.data(live), ps, 8));
}

TEST_CASE("host_vmm: fork into a reused idle range replaces its pages", "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id p = acquire(m, 4 * ps);
  REQUIRE(prep(m, p, 0, 2 * ps).ok());
  fill(m.data(p), 2 * ps, 2);
  const range_id old = acquire(m, 4 * ps);
  REQUIRE(prep(m, old, 0, 3 * ps).ok());
  fill(m.data(old), 3 * ps, 1);
  m.release(old);
  REQUIRE(m.stats().pages_free == 3);

  const range_id c = fork(m, p, 2 * ps);
  CHECK(c == old);  // best fit for 2 pages
  CHECK(m.stats().ranges_reused == 1);
  CHECK(m.page_at(c, 0) == m.page_at(p, 0));
  CHECK(m.page_at(c, 1) == m.page_at(p, 1));
  CHECK(m.stats().pages_free == 5);  // the two pages it replaced went back to the pool
  CHECK(m.stats().pages_shared == 2);
  CHECK(holds(m.data(c), 2 * ps, 2));
  CHECK(m.backed_bytes(c) == 3 * ps);  // its third page stays mapped, unshared
  CHECK(holds(m.data(c) + 2 * ps, ps, 1, 2 * ps));
}

TEST_CASE("host_vmm: fork argument errors change nothing", "[memory][host_vmm]") {
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, ps).ok());
  const range_id gone = acquire(m, 4 * ps);
  m.release(gone);
  const auto before = m.stats();
  CHECK(m.fork(99, 0).code() == errc::invalid_argument);
  CHECK(m.fork(gone, ps).code() == errc::invalid_argument);
  CHECK(m.fork(a, 4 * ps + 1).code() == errc::capacity_exceeded);
  CHECK(stats_diff(before, m.stats()).empty());
}

TEST_CASE("host_vmm: a moved backend keeps its ranges and bytes", "[memory][host_vmm]") {
  auto m = make_vmm(4);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 2 * ps).ok());
  fill(m.data(a), 2 * ps, 21);
  std::byte* base = m.data(a);
  const auto before = m.stats();
  host_vmm moved(std::move(m));
  CHECK(moved.data(a) == base);
  CHECK(holds(moved.data(a), 2 * ps, 21));
  CHECK(stats_diff(before, moved.stats()).empty());
  REQUIRE(prep(moved, a, 2 * ps, 3 * ps).ok());
  CHECK(moved.backed_bytes(a) == 3 * ps);
}

// ---- map ahead (vAttention's step_async) ---------------------------------------------------

TEST_CASE("host_vmm: map_ahead maps the next pages in the background; prepare then maps nothing",
          "[memory][host_vmm][map_ahead]") {
  host_vmm m = make_vmm(16);
  const range_id r = acquire(m, 8 * ps);
  REQUIRE(prep(m, r, 0, 10).ok());  // page 0
  const write_request ahead{r, 10, 3 * ps + 1};  // pages 0..3: 1..3 missing
  REQUIRE(m.map_ahead({&ahead, 1}).ok());
  REQUIRE(m.sync().ok());
  const auto s = m.stats();
  CHECK(s.pages_mapped == 4);
  CHECK(s.pages_mapped_ahead == 3);
  CHECK(s.ahead_skipped == 0);
  CHECK(m.backed_bytes(r) == 4 * ps);
  fill(m.data(r), 4 * ps, 7);  // the pages are usable
  CHECK(holds(m.data(r), 4 * ps, 7));
  const auto before = m.stats();
  REQUIRE(prep(m, r, 0, 4 * ps).ok());
  CHECK(stats_diff(before, m.stats()).empty());  // already mapped: no call
}

TEST_CASE("host_vmm: every call waits for the background step", "[memory][host_vmm][map_ahead]") {
  host_vmm m = make_vmm(64);
  const range_id a = acquire(m, 32 * ps);
  for (int round = 0; round < 20; ++round) {
    const write_request q{a, 0, std::size_t(round + 1) * ps};
    REQUIRE(m.map_ahead({&q, 1}).ok());
    // No sync(): each call below must see the step finished, never half done.
    CHECK(m.backed_bytes(a) == std::size_t(round + 1) * ps);
    CHECK(m.stats().pages_mapped == std::size_t(round + 1));
  }
  // acquire/fork/release/prepare after a step in flight
  const write_request q{a, 0, 24 * ps};
  REQUIRE(m.map_ahead({&q, 1}).ok());
  auto c = m.fork(a, 24 * ps);
  REQUIRE(c.ok());
  CHECK(m.page_at(*c, 23) == m.page_at(a, 23));
  REQUIRE(m.map_ahead({&q, 1}).ok());  // nothing missing: no job at all
  m.release(*c);
  const write_request q2{a, 24 * ps, 26 * ps};
  REQUIRE(m.map_ahead({&q2, 1}).ok());
  REQUIRE(prep(m, a, 0, 26 * ps).ok());
  CHECK(m.stats().pages_mapped == 26);
}

TEST_CASE("host_vmm: map_ahead refuses bad requests and changes nothing",
          "[memory][host_vmm][map_ahead]") {
  host_vmm m = make_vmm(8);
  const range_id r = acquire(m, 4 * ps);
  const auto before = m.stats();
  const write_request beyond{r, 0, 5 * ps};
  status st = m.map_ahead({&beyond, 1});
  CHECK(st.code() == errc::capacity_exceeded);
  CHECK(st.message().find("map_ahead") != std::string::npos);
  const write_request unknown{r + 7, 0, ps};
  CHECK(m.map_ahead({&unknown, 1}).code() == errc::invalid_argument);
  m.release(r);
  const write_request idle{r, 0, ps};
  CHECK(m.map_ahead({&idle, 1}).code() == errc::invalid_argument);
  CHECK(m.sync().ok());
  auto expected = before;
  expected.ranges_active = 0;
  expected.ranges_idle = 1;
  CHECK(stats_diff(expected, m.stats()).empty());
}

TEST_CASE("host_vmm: map_ahead is best effort when the pool runs short",
          "[memory][host_vmm][map_ahead]") {
  host_vmm m = make_vmm(4);
  const range_id a = acquire(m, 8 * ps);
  const range_id b = acquire(m, 8 * ps);
  REQUIRE(prep(m, a, 0, 2 * ps).ok());
  const write_request qs[] = {{a, 0, 6 * ps}, {b, 0, ps}};  // a needs 4 more: skipped; b fits
  REQUIRE(m.map_ahead(qs).ok());
  REQUIRE(m.sync().ok());  // not an error: speculative
  const auto s = m.stats();
  CHECK(s.ahead_skipped == 4);
  CHECK(s.pages_mapped_ahead == 1);
  CHECK(m.backed_bytes(a) == 2 * ps);
  CHECK(m.backed_bytes(b) == ps);
  // the synchronous path still reports exhaustion, all or nothing
  CHECK(prep(m, a, 0, 4 * ps).code() == errc::out_of_pages);
  CHECK(prep(m, a, 0, 3 * ps).ok());
}

TEST_CASE("host_vmm: map_ahead reclaims idle pages, and leaves shared pages to prepare",
          "[memory][host_vmm][map_ahead]") {
  host_vmm m = make_vmm(6);
  const range_id old = acquire(m, 4 * ps);
  REQUIRE(prep(m, old, 0, 4 * ps).ok());
  m.release(old);  // 4 pages idle
  const range_id a = acquire(m, 4 * ps, ps);  // reuses `old` with its 4 pages (best fit)
  CHECK(a == old);
  const range_id b = acquire(m, 4 * ps);
  const write_request q{b, 0, 4 * ps};
  REQUIRE(m.map_ahead({&q, 1}).ok());  // 2 free, 0 idle: skipped
  REQUIRE(m.sync().ok());
  CHECK(m.stats().ahead_skipped == 4);
  m.release(a);  // 4 idle pages again
  REQUIRE(m.map_ahead({&q, 1}).ok());
  REQUIRE(m.sync().ok());
  CHECK(m.backed_bytes(b) == 4 * ps);
  CHECK(m.stats().pages_reclaimed == 2);

  // a fork shares b's pages; map ahead over them copies nothing
  auto c = m.fork(b, 4 * ps);
  REQUIRE(c.ok());
  const auto before = m.stats();
  const write_request qc{*c, 0, 2 * ps};
  REQUIRE(m.map_ahead({&qc, 1}).ok());
  REQUIRE(m.sync().ok());
  CHECK(stats_diff(before, m.stats()).empty());
  CHECK(m.page_at(*c, 0) == m.page_at(b, 0));
}

TEST_CASE("host_vmm: destroying or moving a backend with a step in flight waits for it",
          "[memory][host_vmm][map_ahead]") {
  for (int round = 0; round < 10; ++round) {
    host_vmm m = make_vmm(64);
    const range_id r = acquire(m, 64 * ps);
    const write_request q{r, 0, 64 * ps};
    REQUIRE(m.map_ahead({&q, 1}).ok());
    if (round % 2) {
      host_vmm moved(std::move(m));
      CHECK(moved.backed_bytes(r) == 64 * ps);
      fill(moved.data(r), 64 * ps, 3);
      CHECK(holds(moved.data(r), 64 * ps, 3));
    }
  }  // destruction with or without the step done: no crash, no leak (ASan)
}

TEST_CASE("host_vmm: map_ahead with a page cap maps the first pages, the rest on later calls",
          "[memory][host_vmm][map_ahead]") {
  host_vmm m = make_vmm(16);
  const range_id a = acquire(m, 4 * ps), b = acquire(m, 4 * ps);
  const write_request qs[] = {{a, 0, 4 * ps}, {b, 0, 4 * ps}};
  REQUIRE(m.map_ahead(qs, 3).ok());
  REQUIRE(m.sync().ok());
  CHECK(m.backed_bytes(a) == 3 * ps);  // request order: a's first three pages
  CHECK(m.backed_bytes(b) == 0);
  REQUIRE(m.map_ahead(qs, 3).ok());
  REQUIRE(m.sync().ok());
  CHECK(m.backed_bytes(a) == 4 * ps);
  CHECK(m.backed_bytes(b) == 2 * ps);
  REQUIRE(m.map_ahead(qs, 0).ok());  // no cap
  REQUIRE(m.sync().ok());
  CHECK(m.backed_bytes(b) == 4 * ps);
  CHECK(m.stats().pages_mapped_ahead == 8);
  CHECK(m.stats().ahead_skipped == 0);
}
