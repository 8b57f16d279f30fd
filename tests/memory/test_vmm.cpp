// SPDX-License-Identifier: Apache-2.0
//! @file
//! basic_vmm over a fault-injecting mapper: the rollback paths (a map call that fails halfway,
//! a copy-on-write that cannot copy, a fork that cannot map, a background step that fails) leave
//! the bookkeeping exactly as it was, and background errors surface once, at the next sync call.
//! host_vmm and cuda_vmm are this template; their own tests cover the real mappers.
#include <kvcache/memory/vmm.hpp>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "catch.hpp"
#include "support.hpp"

using kvcache::errc;
using kvcache::no_page;
using kvcache::page_id;
using kvcache::range_id;
using kvcache::status;
using kvcache::write_request;
using kvtest::stats_diff;

namespace {

constexpr std::size_t page = 4096;

// What the test controls and observes; shared with the mapper the backend owns.
struct control {
  int fail_map_in = -1;   // the n-th map call from now fails (0 = the next one); -1 never
  bool fail_copy = false;
  int maps = 0, unmaps = 0, copies = 0, replaces = 0;
};

// Address space is plain heap memory; mapping only counts calls (no data is shared: these tests
// check bookkeeping, the host_vmm tests check bytes).
class fault_mapper {
 public:
  using address = std::byte*;
  static constexpr const char* name = "fault_vmm";

  fault_mapper(std::size_t pages, std::shared_ptr<control> c) : refs_(pages), c_(std::move(c)) {}

  std::size_t page_size() const noexcept { return page; }
  kvcache::page_refs& refs() noexcept { return refs_; }
  const kvcache::page_refs& refs() const noexcept { return refs_; }
  static std::byte* pointer(address a) noexcept { return a; }

  kvcache::result<address> reserve(std::size_t bytes) { return new std::byte[bytes]; }
  void unreserve(address a, std::size_t, const page_id*) noexcept { delete[] a; }
  status map(address, std::size_t, const page_id*, std::size_t count, std::size_t& calls) {
    if (c_->fail_map_in == 0) {
      c_->fail_map_in = -1;
      return {errc::system_error, "injected map failure"};
    }
    if (c_->fail_map_in > 0) --c_->fail_map_in;
    c_->maps += static_cast<int>(count);
    ++calls;
    return {};
  }
  void unmap(address, std::size_t, const page_id*, std::size_t) noexcept { ++c_->unmaps; }
  status copy(page_id, page_id) {
    if (c_->fail_copy) return {errc::system_error, "injected copy failure"};
    ++c_->copies;
    return {};
  }
  status replace(address, std::size_t, page_id, page_id) {
    ++c_->replaces;
    return {};
  }

 private:
  kvcache::page_refs refs_;
  std::shared_ptr<control> c_;
};

using fault_vmm = kvcache::basic_vmm<fault_mapper>;
static_assert(kvcache::memory_backend<fault_vmm>);

status prep(fault_vmm& m, range_id r, std::size_t begin, std::size_t end) {
  const write_request q{r, begin, end};
  return m.prepare({&q, 1});
}

}  // namespace

TEST_CASE("basic_vmm: a map call failing halfway through prepare undoes the whole call",
          "[memory][vmm]") {
  auto c = std::make_shared<control>();
  fault_vmm m(fault_mapper(16, c));
  auto a = m.acquire(8 * page);
  auto b = m.acquire(8 * page);
  REQUIRE((a.ok() && b.ok()));
  REQUIRE(prep(m, *a, 0, page).ok());
  const auto before = m.stats();
  c->fail_map_in = 1;  // a's run maps, b's run fails
  const write_request qs[] = {{*a, 0, 4 * page}, {*b, 0, 2 * page}};
  status st = m.prepare(qs);
  CHECK(st.code() == errc::system_error);
  CHECK(st.message() == "injected map failure");
  // pages went out and came back: only the cumulative counters moved
  auto after = m.stats();
  CHECK(after.pages_unmapped_total == before.pages_unmapped_total + 3);
  after.map_calls = before.map_calls;
  after.pages_mapped_total = before.pages_mapped_total;
  after.pages_unmapped_total = before.pages_unmapped_total;
  CHECK(stats_diff(before, after).empty());
  CHECK(m.page_at(*a, 1) == no_page);
  CHECK(m.backed_bytes(*a) == page);
  CHECK(m.stats().pages_free == 15);
  REQUIRE(m.prepare(qs).ok());  // the same call succeeds once the fault is gone
  CHECK(m.stats().pages_free == 10);
}

TEST_CASE("basic_vmm: a copy-on-write whose copy fails changes nothing", "[memory][vmm]") {
  auto c = std::make_shared<control>();
  fault_vmm m(fault_mapper(8, c));
  auto a = m.acquire(4 * page);
  REQUIRE(a.ok());
  REQUIRE(prep(m, *a, 0, 2 * page).ok());
  auto f = m.fork(*a, 2 * page);
  REQUIRE(f.ok());
  const auto before = m.stats();
  c->fail_copy = true;
  CHECK(prep(m, *f, 0, 10).code() == errc::system_error);
  CHECK(stats_diff(before, m.stats()).empty());
  CHECK(m.page_at(*f, 0) == m.page_at(*a, 0));
  c->fail_copy = false;
  REQUIRE(prep(m, *f, 0, 10).ok());
  CHECK(m.page_at(*f, 0) != m.page_at(*a, 0));
  CHECK(c->copies == 1);
  CHECK(c->replaces == 1);
}

TEST_CASE("basic_vmm: a fork that cannot map leaves the parent untouched", "[memory][vmm]") {
  auto c = std::make_shared<control>();
  fault_vmm m(fault_mapper(8, c));
  auto a = m.acquire(4 * page);
  REQUIRE(a.ok());
  REQUIRE(prep(m, *a, 0, 3 * page).ok());
  c->fail_map_in = 0;
  auto f = m.fork(*a, 3 * page);
  CHECK(f.code() == errc::system_error);
  const auto s = m.stats();
  CHECK(s.ranges_active == 1);
  CHECK(s.pages_shared == 0);
  for (std::size_t i = 0; i < 3; ++i) CHECK(m.refs(m.page_at(*a, i)) == 1);
}

TEST_CASE("basic_vmm: a background failure surfaces once, at the next synchronous call",
          "[memory][vmm][map_ahead]") {
  auto c = std::make_shared<control>();
  fault_vmm m(fault_mapper(16, c));
  auto a = m.acquire(8 * page);
  REQUIRE(a.ok());
  c->fail_map_in = 0;
  const write_request q{*a, 0, 4 * page};
  REQUIRE(m.map_ahead({&q, 1}).ok());  // returns before the step runs
  status st = prep(m, *a, 0, page);
  CHECK(st.code() == errc::system_error);
  CHECK(st.message().find("map ahead") != std::string::npos);
  CHECK(m.backed_bytes(*a) == 0);        // the failed run was undone
  CHECK(m.stats().pages_free == 16);
  CHECK(prep(m, *a, 0, page).ok());      // reported once; the retry maps
  CHECK(m.sync().ok());

  SECTION("or at sync()") {
    c->fail_map_in = 0;
    const write_request q2{*a, page, 3 * page};
    REQUIRE(m.map_ahead({&q2, 1}).ok());
    CHECK(m.sync().code() == errc::system_error);
    CHECK(m.sync().ok());
  }
  SECTION("or at the next map_ahead") {
    c->fail_map_in = 0;
    const write_request q2{*a, page, 3 * page};
    REQUIRE(m.map_ahead({&q2, 1}).ok());
    CHECK(m.map_ahead({&q2, 1}).code() == errc::system_error);
    REQUIRE(m.map_ahead({&q2, 1}).ok());
    CHECK(m.sync().ok());
    CHECK(m.backed_bytes(*a) == 3 * page);
  }
}

TEST_CASE("basic_vmm: map_ahead issues map calls only for missing pages", "[memory][vmm][map_ahead]") {
  auto c = std::make_shared<control>();
  fault_vmm m(fault_mapper(32, c));
  auto a = m.acquire(16 * page);
  REQUIRE(a.ok());
  for (std::size_t step = 1; step <= 16; ++step) {
    const write_request now{*a, 0, step * page - 1};
    REQUIRE(m.prepare({&now, 1}).ok());
    const write_request next{*a, 0, std::min<std::size_t>(step + 2, 16) * page};
    REQUIRE(m.map_ahead({&next, 1}).ok());
  }
  REQUIRE(m.sync().ok());
  CHECK(c->maps == 16);  // each page mapped exactly once, by whichever came first
  const auto s = m.stats();
  CHECK(s.pages_mapped_ahead >= 14);
  CHECK(s.pages_mapped_total == 16);
}
