// SPDX-License-Identifier: Apache-2.0
// Ownership: the RAII sequence handle (closes once, on destruction or close(); moved-from,
// closed and released handles are detected), and the cache's error paths releasing every range
// exactly once (a backend that counts acquisitions and releases, and fails on demand).
#include "catch.hpp"
#include "reliability/support.hpp"

#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace kv = kvcache;

namespace {

constexpr std::uint32_t kLayers = 3, kHeads = 2, kQHeads = 4, kDim = 32;
kv::geometry geo() { return {kLayers, kHeads, kQHeads, kDim, kv::dtype::f16}; }
using vmm_cache = kv::cache<kv::host_vmm>;
vmm_cache make_cache() {
  return vmm_cache({geo(), 64}, kv::host_vmm(kv::host_vmm_config{kv::os_page_size(), 64, true}));
}

void expect_empty_handle(const kv::status& st, const char* op) {
  INFO(st.message());
  CHECK(st.code() == kv::errc::unknown_sequence);
  CHECK(st.message().find(std::string("sequence::") + op + ": the handle is empty") != std::string::npos);
}

}  // namespace

TEST_CASE("sequence handle: closes on destruction, forwards calls, detects empty handles",
          "[reliability][handles]") {
  auto c = make_cache();
  std::mt19937 rng(1);
  reltest::kv_rows r(geo(), 5, rng);
  kv::seq_id raw;
  {
    auto h = c.open_sequence(8).value();
    REQUIRE(h.is_open());
    raw = h.id();
    REQUIRE(h.append(0, r.kt(geo()), r.vt(geo())).ok());
    CHECK(h.view(0).value().rows == 5);
    REQUIRE(h.evict().ok());
    CHECK(c.sequences() == 1);
    CHECK(c.stats().memory.ranges_active == 2 * kLayers);
  }
  CHECK(c.sequences() == 0);
  CHECK(!c.is_open(raw));
  CHECK(c.stats().memory.ranges_active == 0);
  REQUIRE(kv::check_invariants(c).ok());

  SECTION("moved from: empty, and its destruction leaves the new owner's sequence open") {
    auto a = c.open_sequence().value();
    const kv::seq_id id = a.id();
    auto b = std::move(a);
    CHECK(!a.is_open());
    CHECK(b.is_open());
    expect_empty_handle(a.append(0, r.kt(geo()), r.vt(geo())), "append");
    expect_empty_handle(a.evict(0), "evict");
    expect_empty_handle(a.view(0).error(), "view");
    expect_empty_handle(a.fork().error(), "fork");
    expect_empty_handle(a.close(), "close");
    { auto sink = std::move(a); }  // destroying an empty handle closes nothing
    CHECK(c.is_open(id));
    REQUIRE(b.append(1, r.kt(geo()), r.vt(geo())).ok());
  }
  SECTION("move assignment closes the sequence the target held") {
    auto a = c.open_sequence().value(), b = c.open_sequence().value();
    const kv::seq_id old = b.id();
    b = std::move(a);
    CHECK(!c.is_open(old));
    CHECK(b.is_open());
    CHECK(c.sequences() == 1);
    b = std::move(b);  // self move: nothing happens
    CHECK(b.is_open());
  }
  SECTION("close() closes once; the handle is then empty") {
    auto a = c.open_sequence().value();
    REQUIRE(a.close().ok());
    CHECK(c.sequences() == 0);
    expect_empty_handle(a.close(), "close");
    expect_empty_handle(a.append(0, r.kt(geo()), r.vt(geo())), "append");
  }
  SECTION("closed through its raw id: the handle sees a stale sequence and does not close twice") {
    auto a = c.open_sequence().value();
    REQUIRE(c.close(a.id()).ok());
    CHECK(!a.is_open());
    CHECK(a.append(0, r.kt(geo()), r.vt(geo())).code() == kv::errc::unknown_sequence);
    auto other = c.open_sequence().value();  // reuses the record, with a new generation
    CHECK(other.id().index == a.id().index);
    CHECK(!a.is_open());
    a = kv::sequence<vmm_cache>{};  // destroying it must not close `other`
    CHECK(other.is_open());
    REQUIRE(kv::check_invariants(c).ok());
  }
  SECTION("release() hands the raw id over without closing") {
    auto a = c.open_sequence().value();
    const kv::seq_id id = a.release();
    expect_empty_handle(a.append(0, r.kt(geo()), r.vt(geo())), "append");
    CHECK(c.is_open(id));
    kv::sequence<vmm_cache> adopted(c, id);  // and a handle can adopt one
    REQUIRE(adopted.append(0, r.kt(geo()), r.vt(geo())).ok());
  }
  SECTION("fork() gives an independent handle") {
    auto a = c.open_sequence().value();
    REQUIRE(a.append(0, r.kt(geo()), r.vt(geo())).ok());
    auto f = a.fork().value();
    REQUIRE(f.append(0, r.kt(geo()), r.vt(geo())).ok());
    CHECK(a.view(0).value().rows == 5);
    CHECK(f.view(0).value().rows == 10);
    { auto gone = std::move(a); }
    CHECK(f.view(0).value().rows == 10);
    CHECK(c.sequences() == 1);
  }
  REQUIRE(kv::check_invariants(c).ok());
}

TEST_CASE("sequence handles: churn of many handles leaks no range and no page",
          "[reliability][handles]") {
  auto c = make_cache();
  std::mt19937 rng(9);
  std::vector<kv::sequence<vmm_cache>> live;
  for (int i = 0; i < 300; ++i) {
    const std::uint32_t op = rng() % 4;
    if (op == 0 || live.empty()) {
      if (auto h = c.open_sequence()) live.push_back(std::move(*h));
    } else if (op == 1) {
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(rng() % live.size()));
    } else if (op == 2) {
      if (auto f = live[rng() % live.size()].fork()) live.push_back(std::move(*f));
    } else {
      reltest::kv_rows r(geo(), 1 + rng() % 6, rng);
      (void)live[rng() % live.size()].append(rng() % kLayers, r.kt(geo()), r.vt(geo()));  // may run out
    }
    if (live.size() > 8) live.erase(live.begin());
  }
  REQUIRE(kv::check_invariants(c).ok());
  live.clear();
  CHECK(c.sequences() == 0);
  CHECK(c.stats().memory.ranges_active == 0);
  c.memory().reclaim_idle();
  const auto m = c.stats().memory;
  CHECK(m.pages_free == m.pages_total);
  REQUIRE(kv::check_invariants(c).ok());
}

// ---- every range released exactly once, on every error path ----------------------------------

namespace {

//! What the counting backend saw, shared with the test (the backend moves into the cache).
struct range_ledger {
  std::map<kv::range_id, int> live;  // 1 while acquired
  int acquired = 0, released = 0, bad_releases = 0;
  int fail_in = -1;  // the fail_in-th next acquire/fork fails (-1: never)
  std::size_t live_count() const {
    std::size_t n = 0;
    for (auto [r, c] : live) n += c != 0;
    return n;
  }
};

//! heap_memory that records every acquisition and release, and fails one on demand.
class counting_memory {
 public:
  explicit counting_memory(range_ledger& l) : l_(&l) {}

  kv::result<kv::range_id> acquire(std::size_t n, std::size_t hint) {
    if (fail_now()) return kv::status{kv::errc::out_of_pages, "counting_memory: injected acquire failure"};
    return track(inner_.acquire(n, hint));
  }
  kv::result<kv::range_id> fork(kv::range_id r, std::size_t n) {
    if (fail_now()) return kv::status{kv::errc::out_of_pages, "counting_memory: injected fork failure"};
    return track(inner_.fork(r, n));
  }
  void release(kv::range_id r) {
    if (l_->live[r] != 1) {
      ++l_->bad_releases;  // a double release, or of a range never acquired
      return;
    }
    l_->live[r] = 0;
    ++l_->released;
    inner_.release(r);
  }
  kv::status prepare(std::span<const kv::write_request> q) { return inner_.prepare(q); }
  [[nodiscard]] std::byte* data(kv::range_id r) const { return inner_.data(r); }
  [[nodiscard]] std::size_t capacity(kv::range_id r) const { return inner_.capacity(r); }
  [[nodiscard]] std::size_t backed_bytes(kv::range_id r) const { return inner_.backed_bytes(r); }
  [[nodiscard]] std::size_t granularity() const { return inner_.granularity(); }
  [[nodiscard]] kv::memory_stats stats() const { return inner_.stats(); }
  [[nodiscard]] kv::status check() const { return inner_.check(); }

 private:
  bool fail_now() { return l_->fail_in >= 0 && l_->fail_in-- == 0; }
  kv::result<kv::range_id> track(kv::result<kv::range_id> r) {
    if (r) {
      ++l_->acquired;
      if (l_->live[*r]++ != 0) ++l_->bad_releases;  // handed out twice
    }
    return r;
  }
  kv::heap_memory inner_;
  range_ledger* l_;
};
static_assert(kv::memory_backend<counting_memory>);

}  // namespace

TEST_CASE("open and fork failing at any range release what they took, exactly once",
          "[reliability][handles]") {
  // 3 layers x (K, V, K scales, V scales): 12 ranges per sequence, so 12 places to fail
  range_ledger led;
  kv::cache<counting_memory, kv::keep_all, kv::kivi_per_token<4>> c({geo(), 32}, counting_memory(led));
  std::mt19937 rng(4);
  const auto parent = c.open().value();
  for (std::uint32_t l = 0; l < kLayers; ++l) {
    reltest::kv_rows r(geo(), 9, rng);
    REQUIRE(c.append(parent, l, r.kt(geo()), r.vt(geo())).ok());
  }
  const std::size_t per_seq = led.live_count();
  REQUIRE(per_seq == 4 * kLayers);
  for (int at = 0; at < static_cast<int>(per_seq); ++at) {
    INFO("failing the acquisition number " << at);
    const std::uint64_t before = kv::state_digest(c);
    led.fail_in = at;
    auto o = c.open();
    REQUIRE(!o);
    CHECK(o.error().message().find("injected acquire failure") != std::string::npos);
    CHECK(kv::state_digest(c) == before);
    CHECK(led.live_count() == per_seq);  // everything the failed open took went back
    led.fail_in = at;
    auto f = c.fork(parent);
    REQUIRE(!f);
    CHECK(f.error().message().find("injected fork failure") != std::string::npos);
    CHECK(kv::state_digest(c) == before);
    CHECK(led.live_count() == per_seq);
    REQUIRE(kv::check_invariants(c).ok());
  }
  led.fail_in = -1;
  // and the successful paths: every range acquired is released once, at close
  auto f = c.fork(parent).value();
  REQUIRE(c.close(f).ok());
  REQUIRE(c.close(parent).ok());
  CHECK(led.live_count() == 0);
  CHECK(led.bad_releases == 0);
  CHECK(led.released == led.acquired);
  REQUIRE(kv::check_invariants(c).ok());
}
