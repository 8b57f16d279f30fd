// SPDX-License-Identifier: Apache-2.0
// Pool exhaustion during append, fork and copy-on-write: a clear out_of_pages error, the cache
// unchanged (state_digest), no token already cached lost or altered, nothing half mapped, and
// the same call succeeds once pages are freed.
#include "catch.hpp"
#include "reliability/support.hpp"

#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace kv = kvcache;

namespace {

constexpr std::uint32_t kLayers = 2, kHeads = 2, kQHeads = 4, kDim = 32;
kv::geometry geo() { return {kLayers, kHeads, kQHeads, kDim, kv::dtype::f16}; }
// one layer's token row: 2 heads x 32 x fp16 = 128 bytes: a 4 KiB page holds 32 tokens of a range
constexpr std::uint32_t kTokensPerPage = 32;

kv::host_vmm pool(std::size_t pages) {
  return kv::host_vmm(kv::host_vmm_config{kv::os_page_size(), pages, true});
}

//! What was appended to each (sequence, layer), by position: the source rows, to prove that no
//! cached token is lost or altered by a failed call.
template <class C>
struct ledger {
  explicit ledger(C& cache) : c(cache) {}
  C& c;
  std::mt19937 rng{17};
  std::map<std::pair<std::uint32_t, std::uint32_t>, std::vector<reltest::kv_rows>> rows;  // (seq, layer)

  kv::status append(kv::seq_id s, std::uint32_t layer, std::uint32_t n) {
    reltest::kv_rows r(geo(), n, rng);
    kv::status st = c.append(s, layer, r.kt(geo()), r.vt(geo()));
    if (st) rows[{s.index, layer}].push_back(std::move(r));
    return st;
  }
  //! Copies the history of `from` to `to` (a fork holds the same tokens).
  void forked(kv::seq_id from, kv::seq_id to) {
    for (std::uint32_t l = 0; l < kLayers; ++l) rows[{to.index, l}] = rows[{from.index, l}];
  }
  //! Every appended token is live with its bytes (keep_all, passthrough), and nothing else is.
  void verify(kv::seq_id s) {
    for (std::uint32_t l = 0; l < kLayers; ++l) {
      const auto v = c.view(s, l).value();
      std::vector<const std::uint16_t*> kpos, vpos;  // by position: the source rows
      for (const auto& r : rows[{s.index, l}])
        for (std::size_t t = 0; t < r.k.size() / (kHeads * kDim); ++t) {
          kpos.push_back(r.k.data() + t * kHeads * kDim);
          vpos.push_back(r.v.data() + t * kHeads * kDim);
        }
      std::size_t live = 0;
      for (std::uint32_t slot = 0; slot < v.rows; ++slot)
        for (std::uint32_t h = 0; h < kHeads; ++h) {
          const std::int32_t p = v.positions[std::size_t{slot} * kHeads + h];
          if (p < 0) continue;
          ++live;
          REQUIRE(static_cast<std::size_t>(p) < kpos.size());
          INFO("sequence " << s.index << " layer " << l << " position " << p << " head " << h);
          REQUIRE(std::memcmp(v.k_row(slot, h), kpos[p] + h * kDim, kDim * 2) == 0);
          REQUIRE(std::memcmp(v.v_row(slot, h), vpos[p] + h * kDim, kDim * 2) == 0);
        }
      CHECK(live == kpos.size() * kHeads);
    }
  }
};

void expect_exhausted(const kv::status& st) {
  INFO(st.message());
  CHECK(st.code() == kv::errc::out_of_pages);
  CHECK(st.message().find("exhausted") != std::string::npos);
}

}  // namespace

TEST_CASE("exhaustion during append: refused whole, nothing lost, works once pages are freed",
          "[reliability][exhaustion]") {
  // 9 pages: two sequences of one full page per range (8), one page left over
  kv::cache<kv::host_vmm> c({geo(), 128}, pool(9));
  ledger<decltype(c)> led(c);
  const auto a = c.open().value(), b = c.open().value();
  for (std::uint32_t l = 0; l < kLayers; ++l) {
    REQUIRE(led.append(a, l, kTokensPerPage).ok());
    REQUIRE(led.append(b, l, kTokensPerPage).ok());
  }
  REQUIRE(c.stats().memory.pages_free == 1);

  // the next token needs a K page and a V page; only one is free: neither is mapped
  const std::uint64_t before = kv::state_digest(c);
  const auto mem_before = c.stats().memory;
  expect_exhausted(led.append(a, 0, 1));
  CHECK(kv::state_digest(c) == before);
  CHECK(c.stats().memory.pages_free == 1);
  CHECK(c.stats().memory.pages_mapped_total == mem_before.pages_mapped_total);
  REQUIRE(kv::check_invariants(c).ok());
  led.verify(a);
  led.verify(b);

  SECTION("a prefill that does not fit is refused as a whole") {
    expect_exhausted(led.append(b, 1, 40));
    CHECK(kv::state_digest(c) == before);
    led.verify(b);
  }
  SECTION("closing a sequence frees its pages (reclaimed from the idle range)") {
    REQUIRE(c.close(b).ok());
    REQUIRE(led.append(a, 0, 1).ok());
    REQUIRE(led.append(a, 1, kTokensPerPage).ok());
    CHECK(c.stats().memory.pages_reclaimed >= 3);
    REQUIRE(kv::check_invariants(c).ok());
    led.verify(a);
  }
  SECTION("map_ahead skips what the pool cannot supply, without error") {
    const kv::seq_id both[] = {a, b};
    REQUIRE(c.map_ahead(both, 4).ok());
    REQUIRE(c.sync().ok());
    CHECK(c.stats().memory.ahead_skipped > 0);
    expect_exhausted(led.append(a, 0, 1));
    led.verify(a);
  }
}

TEST_CASE("exhaustion during append with metadata ranges (KIVI scales): all or nothing",
          "[reliability][exhaustion]") {
  // codes, K scales and V scales live in separate ranges: a token needs pages in several ranges
  kv::cache<kv::host_vmm, kv::keep_all, kv::kivi_per_token<4>> c({geo(), 256}, pool(6));
  std::mt19937 rng(3);
  const auto a = c.open().value();
  kv::status st;
  std::uint32_t appended = 0;
  while ((st = [&] {
           reltest::kv_rows r(geo(), 8, rng);
           return c.append(a, appended % kLayers, r.kt(geo()), r.vt(geo()));
         }()))
    ++appended;
  REQUIRE(appended > 0);
  expect_exhausted(st);
  const std::uint64_t before = kv::state_digest(c);
  const auto free_before = c.stats().memory.pages_free;
  reltest::kv_rows r(geo(), 8, rng);
  expect_exhausted(c.append(a, appended % kLayers, r.kt(geo()), r.vt(geo())));
  CHECK(kv::state_digest(c) == before);
  CHECK(c.stats().memory.pages_free == free_before);
  REQUIRE(kv::check_invariants(c).ok());
}

TEST_CASE("exhaustion at copy-on-write after a fork: the fork shares, the first write is refused "
          "until pages are freed, the parent never changes",
          "[reliability][exhaustion]") {
  // parent: 20 tokens per layer (each range's page partly used); filler takes the rest
  kv::cache<kv::host_vmm> c({geo(), 128}, pool(8));
  ledger<decltype(c)> led(c);
  const auto parent = c.open().value(), filler = c.open().value();
  for (std::uint32_t l = 0; l < kLayers; ++l) {
    REQUIRE(led.append(parent, l, 20).ok());
    REQUIRE(led.append(filler, l, 20).ok());
  }
  REQUIRE(c.stats().memory.pages_free == 0);

  // fork: zero copy, so it needs no page even now
  const auto child = c.fork(parent).value();
  led.forked(parent, child);
  CHECK(c.stats().memory.pages_free == 0);
  CHECK(c.stats().memory.pages_shared == 4);
  REQUIRE(kv::check_invariants(c).ok());

  // the child's next token goes into a shared page: it must be copied, and no page is free
  const std::uint64_t before = kv::state_digest(c);
  expect_exhausted(led.append(child, 0, 1));
  CHECK(kv::state_digest(c) == before);
  CHECK(c.stats().memory.cow_copies == 0);
  led.verify(parent);
  led.verify(child);

  REQUIRE(c.close(filler).ok());  // its pages go idle, reclaimable
  REQUIRE(led.append(child, 0, 1).ok());
  CHECK(c.stats().memory.cow_copies == 2);  // K and V of layer 0
  REQUIRE(kv::check_invariants(c).ok());
  led.verify(parent);  // still 20 tokens, bytes untouched
  led.verify(child);   // 21 in layer 0
  CHECK(c.view(parent, 0).value().rows == 20);
  CHECK(c.view(child, 0).value().rows == 21);
}

TEST_CASE("exhaustion during fork (copying backend): refused, no range leaked, works once freed",
          "[reliability][exhaustion]") {
  // heap_memory copies on fork; its byte budget fits the parent, a filler and 3 of the 4
  // ranges of a copy: the fork fails at its last range, after copying three
  const std::size_t row = std::size_t{kHeads} * kDim * 2;
  kv::cache<kv::heap_memory> c({geo(), 64},
                               kv::heap_memory(kv::heap_memory_config{11 * 16 * row, 1.0}));
  ledger<decltype(c)> led(c);
  const auto parent = c.open().value(), filler = c.open().value();
  for (std::uint32_t l = 0; l < kLayers; ++l) {
    REQUIRE(led.append(parent, l, 16).ok());
    REQUIRE(led.append(filler, l, 16).ok());
  }
  const std::uint64_t before = kv::state_digest(c);
  const auto active = c.stats().memory.ranges_active;
  auto f = c.fork(parent);
  REQUIRE(!f);
  expect_exhausted(f.error());
  CHECK(kv::state_digest(c) == before);
  CHECK(c.stats().memory.ranges_active == active);  // the copies made before the failure: released
  CHECK(c.sequences() == 2);
  REQUIRE(kv::check_invariants(c).ok());
  led.verify(parent);

  REQUIRE(c.close(filler).ok());
  const auto child = c.fork(parent).value();
  led.forked(parent, child);
  REQUIRE(kv::check_invariants(c).ok());
  led.verify(child);
  led.verify(parent);
}

TEST_CASE("exhaustion: a pool drained by many sequences recovers fully once they close",
          "[reliability][exhaustion]") {
  kv::cache<kv::host_vmm> c({geo(), 256}, pool(16));
  ledger<decltype(c)> led(c);
  std::vector<kv::seq_id> seqs;
  // grow sequences until the pool refuses; every refusal leaves the cache as it was
  for (int i = 0; i < 64; ++i) {
    if (seqs.empty() || i % 3 == 0) seqs.push_back(c.open().value());
    const auto s = seqs[static_cast<std::size_t>(i) % seqs.size()];
    const std::uint64_t before = kv::state_digest(c);
    const kv::status st = led.append(s, static_cast<std::uint32_t>(i) % kLayers, 7);
    if (!st) {
      CHECK(st.code() == kv::errc::out_of_pages);
      CHECK(kv::state_digest(c) == before);
    }
  }
  CHECK(c.stats().memory.pages_free == 0);
  for (auto s : seqs) led.verify(s);
  for (auto s : seqs) REQUIRE(c.close(s).ok());
  CHECK(c.memory().reclaim_idle() == 16);
  const auto m = c.stats().memory;
  CHECK(m.pages_free == m.pages_total);
  REQUIRE(kv::check_invariants(c).ok());
}
