// SPDX-License-Identifier: Apache-2.0
//! @file
//! cuda_vmm, the device kernels, cuda_passthrough and cache<cuda_vmm>: the host_vmm behaviours
//! (tests/memory/test_host_vmm.cpp) on the GPU, bytes checked on the device's side.
//!
//! Catch2 test cases; main() is tests/cuda/main.cpp (host compiler), which calls the two
//! functions at the end of this file to decide between running them and the no-device checks.

// nvcc flags `st = f();` (status is [[nodiscard]] and operator= returns status&), which the
// host headers (cache.hpp) use; they carry no nvcc pragmas, so suppress it here.
#if defined(__NVCC__)
#  pragma nv_diag_suppress 2810
#endif

#include <kvcache/cache.hpp>
#include <kvcache/core/chunk.hpp>
#include <kvcache/cuda/cuda_vmm.cuh>
#include <kvcache/cuda/kernels.cuh>
#include <kvcache/cuda/passthrough.cuh>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "support.hpp"

using kvcache::cuda_vmm;
using kvcache::cuda_vmm_config;
using kvcache::errc;
using kvcache::memory_stats;
using kvcache::range_id;
using kvcache::row_chunk;
using kvcache::status;
using kvcache::write_request;
namespace gpu = kvcache::gpu;
using kvtest::stats_diff;

namespace {

// ---- helpers ---------------------------------------------------------------------------------

// The device's granularity (2 MiB on current GPUs): the page size of every backend below.
std::size_t granularity() {
  static const std::size_t g = cuda_vmm(cuda_vmm_config{0, 0, 1, true}).granularity();
  return g;
}

cuda_vmm make_vmm(std::size_t pages, bool deferred = true) {
  return cuda_vmm(cuda_vmm_config{0, 0, pages, deferred});
}
range_id acquire(cuda_vmm& m, std::size_t capacity, std::size_t hint = 0) {
  auto r = m.acquire(capacity, hint);
  INFO((r.ok() ? std::string() : r.error().message()));
  REQUIRE(r.ok());
  return *r;
}
range_id fork(cuda_vmm& m, range_id parent, std::size_t bytes) {
  auto r = m.fork(parent, bytes);
  INFO((r.ok() ? std::string() : r.error().message()));
  REQUIRE(r.ok());
  return *r;
}
status prep(cuda_vmm& m, range_id r, std::size_t begin, std::size_t end) {
  const write_request q{r, begin, end};
  return m.prepare({&q, 1});
}
std::vector<cuda_vmm::page_id> pages_of(const cuda_vmm& m, range_id r) {
  std::vector<cuda_vmm::page_id> v;
  for (std::size_t i = 0; i < m.capacity(r) / m.granularity(); ++i) v.push_back(m.page_at(r, i));
  return v;
}

// Device bytes: fill with a value (a kernel: cudaMemset), check they all hold it.
void fill(std::byte* dev, std::size_t n, int value) {
  REQUIRE(cudaMemset(dev, value, n) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
}
bool holds(const std::byte* dev, std::size_t n, int value) {
  std::vector<unsigned char> h(n);
  if (cudaMemcpy(h.data(), dev, n, cudaMemcpyDeviceToHost) != cudaSuccess) return false;
  for (unsigned char c : h)
    if (c != static_cast<unsigned char>(value)) return false;
  return true;
}
std::vector<unsigned char> to_host(const void* dev, std::size_t n) {
  std::vector<unsigned char> h(n);
  REQUIRE(cudaMemcpy(h.data(), dev, n, cudaMemcpyDeviceToHost) == cudaSuccess);
  return h;
}
std::vector<unsigned char> pattern(std::size_t n, unsigned seed) {
  std::vector<unsigned char> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<unsigned char>((i * 131 + seed * 7 + (i >> 9)) & 0xff);
  return v;
}

// A device buffer (freed at scope exit).
struct dev_buf {
  std::byte* p = nullptr;
  std::size_t n = 0;
  explicit dev_buf(std::size_t bytes) : n(bytes) { REQUIRE(cudaMalloc(&p, bytes) == cudaSuccess); }
  dev_buf(const std::vector<unsigned char>& host) : dev_buf(host.size()) {
    REQUIRE(cudaMemcpy(p, host.data(), n, cudaMemcpyHostToDevice) == cudaSuccess);
  }
  dev_buf(const dev_buf&) = delete;
  dev_buf& operator=(const dev_buf&) = delete;
  ~dev_buf() { (void)cudaFree(p); }
};

// ---- cuda_vmm: the host_vmm behaviours ---------------------------------------------------------

TEST_CASE("cuda_vmm: page size must be a multiple of the granularity; pool not empty",
          "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto code_of = [](const cuda_vmm_config& c) {
    try {
      cuda_vmm m(c);
    } catch (const kvcache::error& e) {
      return e.code();
    }
    return errc::ok;
  };
  CHECK(code_of(cuda_vmm_config{0, ps + ps / 2, 4, true}) == errc::invalid_argument);
  CHECK(code_of(cuda_vmm_config{0, 0, 0, true}) == errc::invalid_argument);
  CHECK(code_of(cuda_vmm_config{1 << 20, 0, 4, true}) == errc::invalid_argument);  // no such device
  cuda_vmm big(cuda_vmm_config{0, 2 * ps, 2, true});
  CHECK(big.granularity() == 2 * ps);
  CHECK(big.stats().pages_total == 2);
  CHECK(big.pool_pages() == 2);
}

TEST_CASE("cuda_vmm: prepare maps whole pages, only as bytes are prepared", "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(16);
  CHECK(m.acquire(0).code() == errc::invalid_argument);
  const range_id r = acquire(m, 8 * ps - 1);
  CHECK(m.capacity(r) == 8 * ps);
  CHECK(m.backed_bytes(r) == 0);
  CHECK(m.stats().bytes_reserved == 8 * ps);
  std::byte* base = m.data(r);
  REQUIRE(prep(m, r, 0, 1).ok());
  CHECK(m.backed_bytes(r) == ps);
  CHECK(m.stats().pages_free == 15);
  CHECK(m.stats().map_calls == 1);
  fill(base, ps, 1);
  REQUIRE(prep(m, r, 17, ps).ok());  // backed already: no driver call
  CHECK(m.stats().map_calls == 1);
  REQUIRE(prep(m, r, ps - 1, ps + 1).ok());
  CHECK(m.backed_bytes(r) == 2 * ps);
  REQUIRE(prep(m, r, 3 * ps + 5, 3 * ps + 6).ok());
  CHECK(m.page_at(r, 2) == cuda_vmm::no_page);
  CHECK(m.page_at(r, 3) != cuda_vmm::no_page);
  REQUIRE(prep(m, r, 0, 8 * ps).ok());
  CHECK(m.backed_bytes(r) == 8 * ps);
  CHECK(m.stats().map_calls == 8);  // one cuMemMap per page
  CHECK(m.data(r) == base);
  CHECK(holds(base, ps, 1));
  fill(base + ps, 7 * ps, 2);
  CHECK(holds(base + ps, 7 * ps, 2));

  const auto before = m.stats();
  CHECK(prep(m, r, 0, 8 * ps + 1).code() == errc::capacity_exceeded);
  CHECK(prep(m, r, 10, 5).code() == errc::capacity_exceeded);
  CHECK(prep(m, 77, 0, 1).code() == errc::invalid_argument);
  CHECK(stats_diff(before, m.stats()).empty());
}

TEST_CASE("cuda_vmm: deferred reclamation reuses a released range with its pages and bytes",
          "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(8);
  const range_id one = acquire(m, 4 * ps), three = acquire(m, 4 * ps);
  REQUIRE(prep(m, one, 0, ps).ok());
  REQUIRE(prep(m, three, 0, 3 * ps).ok());
  fill(m.data(three), 3 * ps, 4);
  std::byte* base = m.data(three);
  m.release(three);
  m.release(one);
  const auto s = m.stats();
  CHECK(s.ranges_idle == 2);
  CHECK(s.pages_idle == 4);
  CHECK(s.pages_free == 4);
  CHECK(s.pages_unmapped_total == 0);
  CHECK(prep(m, three, 0, 1).code() == errc::invalid_argument);
  const range_id again = acquire(m, 4 * ps, 2 * ps);  // best fit: three covers 2 pages
  CHECK(again == three);
  CHECK(m.data(again) == base);
  CHECK(holds(base, 3 * ps, 4));
  REQUIRE(prep(m, again, 0, 3 * ps).ok());
  CHECK(m.stats().map_calls == s.map_calls);  // reuse maps nothing
  CHECK(m.stats().ranges_reused == 1);
  CHECK(acquire(m, 4 * ps, 2 * ps) == one);  // nothing else idle
}

TEST_CASE("cuda_vmm: acquire picks the best-fitting idle range", "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(16);
  const range_id one = acquire(m, 8 * ps), three = acquire(m, 8 * ps), five = acquire(m, 8 * ps);
  REQUIRE(prep(m, one, 0, 1 * ps).ok());
  REQUIRE(prep(m, three, 0, 3 * ps).ok());
  REQUIRE(prep(m, five, 0, 5 * ps).ok());
  m.release(three);
  m.release(five);
  m.release(one);
  SECTION("a hint picks the range with the fewest pages that still cover it") {
    CHECK(acquire(m, 8 * ps, 2 * ps) == three);
    CHECK(acquire(m, 8 * ps, 2 * ps) == five);
    CHECK(acquire(m, 8 * ps, 2 * ps) == one);
  }
  SECTION("no hint: the most mapped") {
    CHECK(acquire(m, 8 * ps) == five);
    CHECK(acquire(m, 8 * ps) == three);
    CHECK(acquire(m, 8 * ps) == one);
  }
  SECTION("a range of another capacity is never reused") {
    const range_id other = acquire(m, 4 * ps, ps);
    CHECK((other != one && other != three && other != five));
    CHECK(m.stats().ranges_reused == 0);
  }
  CHECK(m.stats().map_calls == 9);  // reuse never maps
}

TEST_CASE("cuda_vmm: without deferred reclamation, release unmaps", "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto n = make_vmm(8, false);
  const range_id r = acquire(n, 4 * ps);
  REQUIRE(prep(n, r, 0, 3 * ps).ok());
  n.release(r);
  CHECK(n.stats().pages_free == 8);
  CHECK(n.stats().pages_unmapped_total == 3);
  const range_id r2 = acquire(n, 4 * ps, 3 * ps);
  CHECK(r2 == r);
  CHECK(n.backed_bytes(r2) == 0);
  REQUIRE(prep(n, r2, 0, ps).ok());
  fill(n.data(r2), ps, 9);
  CHECK(holds(n.data(r2), ps, 9));
}

TEST_CASE("cuda_vmm: idle pages are reclaimed only when the pool runs short", "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(8);
  const range_id idle = acquire(m, 8 * ps);
  REQUIRE(prep(m, idle, 0, 6 * ps).ok());
  m.release(idle);
  const range_id r = acquire(m, 16 * ps);
  REQUIRE(prep(m, r, 0, 2 * ps).ok());
  CHECK(m.stats().pages_reclaimed == 0);
  REQUIRE(prep(m, r, 2 * ps, 4 * ps).ok());
  CHECK(m.stats().pages_reclaimed == 2);
  CHECK(m.stats().pages_idle == 4);
  CHECK(m.page_at(idle, 5) == cuda_vmm::no_page);  // top pages first
  CHECK(m.page_at(idle, 4) == cuda_vmm::no_page);
  CHECK(m.page_at(idle, 3) != cuda_vmm::no_page);
  fill(m.data(r), 4 * ps, 3);
  CHECK(holds(m.data(r), 4 * ps, 3));
  CHECK(m.reclaim_idle() == 4);
  CHECK(m.stats().pages_free == 4);
}

TEST_CASE("cuda_vmm: exhaustion fails with out_of_pages and changes nothing", "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 11);
  const range_id idle = acquire(m, 8 * ps);
  REQUIRE(prep(m, idle, 0, 2 * ps).ok());
  fill(m.data(idle), 2 * ps, 12);
  m.release(idle);
  const range_id c = acquire(m, 16 * ps);
  const auto before = m.stats();
  const auto ip = pages_of(m, idle), ap = pages_of(m, a);
  const status st = prep(m, c, 0, 6 * ps);
  CHECK(st.code() == errc::out_of_pages);
  CHECK(st.message().find("need 6 pages") != std::string::npos);
  CHECK(st.message().find("3 free") != std::string::npos);
  CHECK(st.message().find("2 reclaimable") != std::string::npos);
  CHECK(stats_diff(before, m.stats()).empty());
  CHECK(m.backed_bytes(c) == 0);
  CHECK(pages_of(m, idle) == ip);
  CHECK(pages_of(m, a) == ap);
  CHECK(holds(m.data(a), 3 * ps, 11));
  CHECK(holds(m.data(idle), 2 * ps, 12));
  const write_request two[] = {{a, 0, 4 * ps}, {c, 0, 5 * ps}};  // 1 + 5 > 5: none mapped
  CHECK(m.prepare(two).code() == errc::out_of_pages);
  CHECK(stats_diff(before, m.stats()).empty());
  REQUIRE(prep(m, c, 0, 5 * ps).ok());  // exactly free + reclaimable
  CHECK(m.stats().pages_free == 0);
  CHECK(m.stats().pages_reclaimed == 2);
  fill(m.data(c), 5 * ps, 13);
  CHECK(holds(m.data(a), 3 * ps, 11));
}

TEST_CASE("cuda_vmm: fork shares pages; the first write copies that page only", "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 7);
  const auto free0 = m.stats().pages_free;
  const range_id c = fork(m, a, 3 * ps);
  CHECK(m.data(c) != m.data(a));
  CHECK(holds(m.data(c), 3 * ps, 7));  // zero copy: the same physical pages
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(m.page_at(c, i) == m.page_at(a, i));
    CHECK(m.refs(m.page_at(a, i)) == 2);
  }
  CHECK(m.stats().pages_shared == 3);
  CHECK(m.stats().pages_free == free0);
  const auto shared = pages_of(m, a);

  REQUIRE(prep(m, c, ps + 10, ps + 20).ok());  // the child writes page 1: one copy
  CHECK(m.stats().cow_copies == 1);
  CHECK(m.stats().pages_free == free0 - 1);
  CHECK(m.page_at(c, 1) != shared[1]);
  CHECK(m.page_at(a, 1) == shared[1]);
  CHECK(m.page_at(c, 0) == shared[0]);
  CHECK(holds(m.data(c), 3 * ps, 7));  // the copy holds the same bytes
  fill(m.data(c) + ps + 10, 10, 99);
  CHECK(holds(m.data(a), 3 * ps, 7));  // the parent does not see it
  REQUIRE(prep(m, a, 0, 1).ok());      // the parent writes page 0, still shared
  CHECK(m.stats().cow_copies == 2);
  fill(m.data(a), ps, 55);
  CHECK(holds(m.data(c), ps, 7));
  CHECK(m.stats().pages_shared == 1);
}

TEST_CASE("cuda_vmm: a page is freed only when its last mapping goes", "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(6, /*deferred=*/false);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 3);
  const range_id c = fork(m, a, 3 * ps);
  m.release(a);  // unmaps a; its pages are still mapped in c
  CHECK(m.stats().pages_free == 3);
  CHECK(m.stats().pages_shared == 0);
  for (std::size_t i = 0; i < 3; ++i) CHECK(m.refs(m.page_at(c, i)) == 1);
  CHECK(holds(m.data(c), 3 * ps, 3));
  // Every free page goes to another range and is scribbled on: c's bytes are not among them.
  const range_id d = acquire(m, 8 * ps);
  REQUIRE(prep(m, d, 0, 3 * ps).ok());
  fill(m.data(d), 3 * ps, 200);
  CHECK(m.stats().pages_free == 0);
  CHECK(holds(m.data(c), 3 * ps, 3));
  REQUIRE(prep(m, c, 0, 3 * ps).ok());  // private now: no copy, no free page needed
  CHECK(m.stats().cow_copies == 0);
  m.release(c);
  CHECK(m.stats().pages_free == 3);
  m.release(d);
  CHECK(m.stats().pages_free == 6);
}

TEST_CASE("cuda_vmm: a copy-on-write that cannot get pages fails and changes nothing",
          "[cuda][vmm]") {
  const std::size_t ps = granularity();
  auto n = make_vmm(4);
  const range_id p = acquire(n, 4 * ps);
  REQUIRE(prep(n, p, 0, 3 * ps).ok());
  fill(n.data(p), 3 * ps, 5);
  const range_id k = fork(n, p, 3 * ps);
  const range_id d = acquire(n, 8 * ps);
  REQUIRE(prep(n, d, 0, ps).ok());
  const auto before = n.stats();
  CHECK(prep(n, k, 0, 2 * ps).code() == errc::out_of_pages);
  CHECK(stats_diff(before, n.stats()).empty());
  CHECK(holds(n.data(k), 3 * ps, 5));
  n.release(d);
  REQUIRE(prep(n, k, 0, ps).ok());  // d's page reclaimed for one copy
  CHECK(n.stats().cow_copies == 1);
  CHECK(holds(n.data(k), 3 * ps, 5));
  CHECK(holds(n.data(p), 3 * ps, 5));

  std::byte* base = n.data(p);  // and a moved backend keeps its ranges and bytes
  cuda_vmm moved(std::move(n));
  CHECK(moved.data(p) == base);
  CHECK(holds(moved.data(p), 3 * ps, 5));
  REQUIRE(prep(moved, p, 3 * ps, 4 * ps).ok());
  CHECK(moved.backed_bytes(p) == 4 * ps);
}

// ---- map ahead (vAttention's step_async) -------------------------------------------------------

TEST_CASE("cuda_vmm: map_ahead maps the next pages in the background; prepare then maps nothing",
          "[cuda][vmm][map_ahead]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(16);
  const range_id r = acquire(m, 8 * ps);
  REQUIRE(prep(m, r, 0, 10).ok());
  const write_request ahead{r, 10, 3 * ps + 1};  // pages 0..3: 1..3 missing
  REQUIRE(m.map_ahead({&ahead, 1}).ok());
  REQUIRE(m.sync().ok());
  const auto s = m.stats();
  CHECK(s.pages_mapped == 4);
  CHECK(s.pages_mapped_ahead == 3);
  CHECK(s.ahead_skipped == 0);
  CHECK(m.backed_bytes(r) == 4 * ps);
  fill(m.data(r), 4 * ps, 7);  // mapped on another thread, usable by this one's kernels
  CHECK(holds(m.data(r), 4 * ps, 7));
  const auto before = m.stats();
  REQUIRE(prep(m, r, 0, 4 * ps).ok());
  CHECK(stats_diff(before, m.stats()).empty());  // already mapped: no call
}

TEST_CASE("cuda_vmm: every call waits for the background step", "[cuda][vmm][map_ahead]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(32);
  const range_id a = acquire(m, 16 * ps);
  for (std::size_t round = 0; round < 12; ++round) {
    const write_request q{a, 0, (round + 1) * ps};
    REQUIRE(m.map_ahead({&q, 1}).ok());
    // No sync(): each call below must see the step finished, never half done.
    CHECK(m.backed_bytes(a) == (round + 1) * ps);
    CHECK(m.stats().pages_mapped == round + 1);
  }
  const write_request q{a, 0, 12 * ps};
  REQUIRE(m.map_ahead({&q, 1}).ok());  // nothing missing: no job
  const range_id c = fork(m, a, 12 * ps);  // right after a step
  CHECK(m.page_at(c, 11) == m.page_at(a, 11));
  m.release(c);
  const write_request q2{a, 12 * ps, 14 * ps};
  REQUIRE(m.map_ahead({&q2, 1}).ok());
  REQUIRE(prep(m, a, 0, 14 * ps).ok());  // waits, then finds everything mapped
  CHECK(m.stats().pages_mapped == 14);
  CHECK(m.stats().pages_mapped_ahead == 14);
  fill(m.data(a), 14 * ps, 8);
  CHECK(holds(m.data(a), 14 * ps, 8));
}

TEST_CASE("cuda_vmm: map_ahead refuses bad requests and is best effort when short",
          "[cuda][vmm][map_ahead]") {
  const std::size_t ps = granularity();
  auto m = make_vmm(4);
  const range_id a = acquire(m, 8 * ps);
  const range_id b = acquire(m, 8 * ps);
  const write_request beyond{a, 0, 9 * ps};
  CHECK(m.map_ahead({&beyond, 1}).code() == errc::capacity_exceeded);
  const write_request unknown{b + 7, 0, ps};
  CHECK(m.map_ahead({&unknown, 1}).code() == errc::invalid_argument);
  REQUIRE(prep(m, a, 0, 2 * ps).ok());
  const write_request qs[] = {{a, 0, 6 * ps}, {b, 0, ps}};  // a needs 4 more: skipped; b fits
  REQUIRE(m.map_ahead(qs).ok());
  REQUIRE(m.sync().ok());  // not an error: speculative
  CHECK(m.stats().ahead_skipped == 4);
  CHECK(m.stats().pages_mapped_ahead == 1);
  CHECK(m.backed_bytes(a) == 2 * ps);
  CHECK(m.backed_bytes(b) == ps);
  CHECK(prep(m, a, 0, 4 * ps).code() == errc::out_of_pages);  // synchronous: all or nothing
  CHECK(prep(m, a, 0, 3 * ps).ok());
}

TEST_CASE("cuda_vmm: destroying or moving a backend with a step in flight waits for it",
          "[cuda][vmm][map_ahead]") {
  const std::size_t ps = granularity();
  for (int round = 0; round < 6; ++round) {
    auto m = make_vmm(32);
    const range_id r = acquire(m, 32 * ps);
    const write_request q{r, 0, 32 * ps};
    REQUIRE(m.map_ahead({&q, 1}).ok());
    if (round % 2) {
      cuda_vmm moved(std::move(m));
      CHECK(moved.backed_bytes(r) == 32 * ps);
      fill(moved.data(r), 32 * ps, 3);
      CHECK(holds(moved.data(r), 32 * ps, 3));
    }
  }  // destroyed with the step running or done: no crash, and the pool is released
  // every pool of the loop gone: a pool of the same size can be created again
  auto again = make_vmm(32);
  CHECK(again.stats().pages_free == 32);
}

// ---- kernels ----------------------------------------------------------------------------------

TEST_CASE("kernels: copy_chunks, gather_rows and compact_rows match host copies",
          "[cuda][kernels]") {
  const std::size_t total = 1 << 20;
  const auto src = pattern(total, 1);
  dev_buf dsrc(src), ddst(total);
  REQUIRE(cudaMemset(ddst.p, 0, total) == cudaSuccess);

  // Chunks of mixed lengths and alignments (odd offsets take the byte path).
  std::vector<gpu::copy_chunk> chunks;
  std::size_t s_off = 0;
  for (std::size_t i = 0; i < 300; ++i) {
    const std::size_t len = (i % 3 == 0) ? 4096 : (i % 3 == 1 ? 1000 + i : 17);
    const std::size_t so = s_off + (i % 5 == 0 ? 3 : 0);
    const std::size_t dst_at = (i * 3000) % (total / 2) + (i % 7 == 0 ? 5 : 0);
    chunks.push_back({ddst.p + dst_at, dsrc.p + so, len});
    s_off = (s_off + len + 64) % (total / 2);
  }
  std::vector<unsigned char> expect(total, 0);
  std::vector<int> writers(total, 0);
  for (const auto& c : chunks) {
    const std::size_t d = static_cast<std::byte*>(c.dst) - ddst.p;
    const std::size_t from = static_cast<const std::byte*>(c.src) - dsrc.p;
    std::memcpy(expect.data() + d, src.data() + from, c.bytes);
    for (std::size_t b = 0; b < c.bytes; ++b) ++writers[d + b];
  }
  // Overlapping destinations race in the kernel: compare only bytes one chunk wrote.
  auto matches = [&](const std::vector<unsigned char>& got) {
    for (std::size_t i = 0; i < total; ++i)
      if (writers[i] <= 1 && got[i] != expect[i]) return false;
    return true;
  };

  SECTION("a list uploaded to device scratch") {
    dev_buf dchunks(chunks.size() * sizeof(gpu::copy_chunk));
    CHECK(gpu::copy_chunks(chunks, reinterpret_cast<gpu::copy_chunk*>(dchunks.p)).ok());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(matches(to_host(ddst.p, total)));
  }
  SECTION("by value, 128 at a time") {
    for (std::size_t at = 0; at < chunks.size(); at += gpu::chunk_batch::capacity) {
      gpu::chunk_batch b;
      for (; b.count < gpu::chunk_batch::capacity && at + b.count < chunks.size(); ++b.count)
        b.chunk[b.count] = chunks[at + b.count];
      CHECK(gpu::copy_chunks(b).ok());
    }
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(matches(to_host(ddst.p, total)));
  }
  SECTION("through a chunk_uploader: by value when short, uploaded when long") {
    gpu::chunk_uploader up;
    CHECK(up.copy(std::span(chunks).first(100)).ok());
    CHECK(up.launches() == 1);
    CHECK(up.uploads() == 0);
    CHECK(up.copy(chunks).ok());  // all 300 again: same bytes
    CHECK(up.copy(chunks).ok());  // back to back: waits for the staging
    CHECK(up.launches() == 3);
    CHECK(up.uploads() == 2);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(matches(to_host(ddst.p, total)));
    gpu::chunk_uploader moved(std::move(up));  // moves the scratch; the source holds none
    CHECK(moved.copy(chunks).ok());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(moved.uploads() == 3);
  }
  SECTION("add_pieces splits a big copy into aligned pieces") {
    std::vector<gpu::copy_chunk> pieces;
    gpu::add_pieces(pieces, ddst.p, dsrc.p, 100000, 32768);
    REQUIRE(pieces.size() == 4);
    CHECK(pieces[3].bytes == 100000 - 3 * 32768);
    CHECK(pieces[1].dst == static_cast<void*>(ddst.p + 32768));
    gpu::chunk_uploader up;
    CHECK(up.copy(pieces).ok());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const auto got = to_host(ddst.p, 100000);
    CHECK(std::memcmp(got.data(), src.data(), 100000) == 0);
  }
  CHECK(gpu::copy_chunks(nullptr, 3).code() == errc::invalid_argument);

  SECTION("gather_rows and compact_rows") {
    // Token-major, 4 heads x 128 B rows, 64 slots; each head keeps its own slots.
    const std::uint32_t heads = 4, slots = 64, rows = 20;
    const std::size_t rb = 128, slot_stride = heads * rb;
    std::vector<std::uint32_t> keep(heads * rows);
    for (std::uint32_t h = 0; h < heads; ++h)
      for (std::uint32_t i = 0; i < rows; ++i) keep[h * rows + i] = (i * 3 + h) % slots;
    dev_buf dkeep(keep.size() * 4);
    REQUIRE(cudaMemcpy(dkeep.p, keep.data(), keep.size() * 4, cudaMemcpyHostToDevice) ==
            cudaSuccess);
    const auto* dk = reinterpret_cast<const std::uint32_t*>(dkeep.p);
    const gpu::gather_shape g{rows, heads, rb, slot_stride, rb};
    CHECK(gpu::gather_rows(ddst.p, dsrc.p, dk, g).ok());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const auto got = to_host(ddst.p, rows * slot_stride);
    bool ok = true;
    for (std::uint32_t h = 0; h < heads; ++h)
      for (std::uint32_t i = 0; i < rows; ++i)
        ok = ok && std::memcmp(got.data() + i * slot_stride + h * rb,
                               src.data() + keep[h * rows + i] * slot_stride + h * rb, rb) == 0;
    CHECK(ok);
    CHECK(gpu::compact_rows(dsrc.p, dk, g, ddst.p).ok());  // in place, through scratch
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(to_host(dsrc.p, got.size()) == got);
    CHECK(gpu::gather_rows(nullptr, dsrc.p, dk, g).code() == errc::invalid_argument);
  }
}

// ---- cuda_passthrough ------------------------------------------------------------------------

TEST_CASE("cuda_passthrough: encode_chunks stores what per-chunk encode stores", "[cuda][quant]") {
  const kvcache::geometry g{1, 4, 4, 64, kvcache::dtype::f16};  // 128 B rows
  const std::size_t row = g.head_bytes();
  const std::size_t in_rows = 16384;  // 2 MiB of input
  const std::size_t out_bytes = 4u << 20;
  const auto k = pattern(in_rows * row, 2), v = pattern(in_rows * row, 3);
  dev_buf dk(k), dv(v), out_a(out_bytes), out_b(out_bytes), out_c(out_bytes);
  REQUIRE(cudaMemset(out_a.p, 0, out_bytes) == cudaSuccess);
  REQUIRE(cudaMemset(out_b.p, 0, out_bytes) == cudaSuccess);
  REQUIRE(cudaMemset(out_c.p, 0, out_bytes) == cudaSuccess);
  kvcache::cuda_passthrough q;

  // The cache's plans: dst offsets are multiples of the row; add one odd offset (byte path).
  std::vector<row_chunk> small = {
      {0, 0, 4}, {8 * row, 100, 1}, {64 * row, 7, 3}, {200 * row + 8, 50, 2}};
  std::vector<row_chunk> big = {{1 << 20, 0, 8192}};  // 1 MiB: 32 pieces
  for (std::size_t i = 0; i < 200; ++i) big.push_back({(3u << 20) + i * 2 * row, 9000 + i, 1});

  auto per_chunk = [&](const std::vector<unsigned char>& host, const std::vector<row_chunk>& cs,
                       std::byte* base) {
    for (const auto& c : cs) q.encode(host.data() + c.src * row, c.rows, g, base + c.dst, nullptr);
  };
  auto expect = [&](const std::vector<unsigned char>& host, const std::vector<row_chunk>& cs) {
    std::vector<unsigned char> e(out_bytes, 0);
    for (const auto& c : cs) std::memcpy(e.data() + c.dst, host.data() + c.src * row, c.rows * row);
    return e;
  };

  SECTION("a few chunks: one launch, by value") {
    q.encode_chunks(dk.p, small, g, out_a.p);
    CHECK(q.kernel_launches() == 1);
    CHECK(q.uploads() == 0);
    per_chunk(k, small, out_b.p);  // host input: cudaMemcpy per chunk
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const auto a = to_host(out_a.p, out_bytes);
    CHECK(a == to_host(out_b.p, out_bytes));
    CHECK(a == expect(k, small));
  }
  SECTION("many chunks and a big one: split, uploaded, one launch") {
    q.encode_chunks(dk.p, big, g, out_a.p);
    q.encode_chunks(dk.p, big, g, out_a.p);  // again at once: reuses the staging safely
    CHECK(q.kernel_launches() == 2);
    CHECK(q.uploads() == 2);
    per_chunk(k, big, out_b.p);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const auto a = to_host(out_a.p, out_bytes);
    CHECK(a == to_host(out_b.p, out_bytes));
    CHECK(a == expect(k, big));
  }
  SECTION("K and V in one launch") {
    q.encode_chunks(dk.p, dv.p, small, g, out_a.p, out_c.p);
    CHECK(q.kernel_launches() == 1);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(to_host(out_a.p, out_bytes) == expect(k, small));
    CHECK(to_host(out_c.p, out_bytes) == expect(v, small));
  }
  SECTION("host input falls back to a copy per chunk") {
    q.encode_chunks(k.data(), v.data(), big, g, out_a.p, out_c.p);
    CHECK(q.kernel_launches() == 0);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(to_host(out_a.p, out_bytes) == expect(k, big));
    CHECK(to_host(out_c.p, out_bytes) == expect(v, big));
  }
  SECTION("into a cuda_vmm range") {
    auto m = make_vmm(4);
    const range_id r = acquire(m, out_bytes);
    REQUIRE(prep(m, r, 0, out_bytes).ok());
    q.encode_chunks(dk.p, big, g, m.data(r));
    CHECK(q.kernel_launches() == 1);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const auto got = to_host(m.data(r), out_bytes);
    const auto e = expect(k, big);
    bool ok = true;
    for (const auto& c : big)
      ok = ok && std::memcmp(got.data() + c.dst, e.data() + c.dst, c.rows * row) == 0;
    CHECK(ok);
  }
  SECTION("decode reads the codes back") {
    q.encode_chunks(dk.p, small, g, out_a.p);
    std::vector<float> f(4 * g.head_dim), e(f.size());
    q.decode(out_a.p, nullptr, 4, g, f.data());
    for (std::size_t i = 0; i < e.size(); ++i)
      e[i] = kvcache::load_as_float(reinterpret_cast<const std::byte*>(k.data()), i, g.type);
    CHECK(std::memcmp(f.data(), e.data(), f.size() * sizeof(float)) == 0);  // bitwise: NaNs too
  }
}

// ---- cache<cuda_vmm, keep_all, cuda_passthrough> ------------------------------------------------

using cuda_cache = kvcache::cache<cuda_vmm, kvcache::keep_all, kvcache::cuda_passthrough>;

std::vector<unsigned char> view_bytes(const cuda_cache& c, kvcache::seq_id s, std::uint32_t layer,
                                      bool k) {
  auto v = c.view(s, layer);
  REQUIRE(v.ok());
  return to_host(k ? v->k : v->v, std::size_t{v->rows} * v->slot_stride);
}

TEST_CASE("cache<cuda_vmm>: append, view, fork and map_ahead on the device", "[cuda][cache]") {
  const std::size_t ps = granularity();
  kvcache::cache_config cfg;
  cfg.geo = {2, 4, 8, 64, kvcache::dtype::f16};  // 4 heads x 64 x 2 B = 512 B per token
  cfg.max_tokens = 8192;                          // 4 MiB per range: 2 pages
  const std::size_t tb = cfg.geo.token_bytes();
  cuda_cache cache(cfg, make_vmm(24));
  const std::uint32_t n = 5000;  // spans both pages
  const auto k = pattern(std::size_t{n} * tb, 4), v = pattern(std::size_t{n} * tb, 5);
  dev_buf dk(k), dv(v);
  auto tensor = [&](const void* p, std::uint32_t tokens) {
    return kvcache::kv_tensor{p, cfg.geo.type, tokens, cfg.geo.kv_heads, cfg.geo.head_dim};
  };
  auto s = cache.open(0);
  REQUIRE(s.ok());
  // Layer 0 from host memory, layer 1 from device memory: the same bytes in the cache.
  REQUIRE(cache.append(*s, 0, tensor(k.data(), n), tensor(v.data(), n)).ok());
  REQUIRE(cache.append(*s, 1, tensor(dk.p, n), tensor(dv.p, n)).ok());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  for (std::uint32_t l = 0; l < 2; ++l) {
    auto view = cache.view(*s, l);
    REQUIRE(view.ok());
    CHECK(view->rows == n);
    CHECK(view->slot_stride == tb);
    CHECK(view_bytes(cache, *s, l, true) == k);
    CHECK(view_bytes(cache, *s, l, false) == v);
  }
  CHECK(cache.memory().stats().pages_mapped == 2 * 2 * 2);

  SECTION("a fork shares the pages; appending to it copies only the page it writes") {
    auto f = cache.fork(*s);
    REQUIRE(f.ok());
    CHECK(cache.memory().stats().pages_shared == 8);
    const auto one = pattern(tb, 6);
    REQUIRE(cache.append(*f, 0, tensor(one.data(), 1), tensor(one.data(), 1)).ok());
    CHECK(cache.memory().stats().cow_copies == 2);  // page 1 of K and of V, layer 0
    CHECK(view_bytes(cache, *s, 0, true) == k);      // the parent unchanged
    auto fk = view_bytes(cache, *f, 0, true);
    REQUIRE(fk.size() == k.size() + tb);
    CHECK(std::memcmp(fk.data(), k.data(), k.size()) == 0);
    CHECK(std::memcmp(fk.data() + k.size(), one.data(), tb) == 0);
    REQUIRE(cache.close(*f).ok());
  }
  SECTION("map_ahead: decode appends across a page boundary map nothing themselves") {
    auto b = cache.open(0);
    REQUIRE(b.ok());
    const std::uint32_t per_page = static_cast<std::uint32_t>(ps / tb);  // 4096 tokens
    const std::uint32_t pre = per_page - 4;
    REQUIRE(cache.append(*b, 0, tensor(dk.p, pre), tensor(dv.p, pre)).ok());
    REQUIRE(cache.append(*b, 1, tensor(dk.p, pre), tensor(dv.p, pre)).ok());
    const kvcache::seq_id seqs[] = {*b};
    REQUIRE(cache.map_ahead(seqs, 8).ok());
    std::size_t sync_maps = 0;
    for (std::uint32_t t = 0; t < 12; ++t) {  // crosses into page 1 at step 4
      const auto before = cache.memory().stats().pages_mapped_total;
      const std::size_t at = std::size_t{pre + t} * tb;  // the next rows of the pattern
      for (std::uint32_t l = 0; l < 2; ++l)
        REQUIRE(cache.append(*b, l, tensor(dk.p + at, 1), tensor(dv.p + at, 1)).ok());
      sync_maps += cache.memory().stats().pages_mapped_total - before;
      REQUIRE(cache.map_ahead(seqs, 8).ok());  // the step's compute would run here
    }
    REQUIRE(cache.sync().ok());
    CHECK(sync_maps == 0);
    CHECK(cache.memory().stats().pages_mapped_ahead == 2 * 2);  // page 1 of 2 layers x K/V
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const std::size_t bytes = std::size_t{pre + 12} * tb;
    for (std::uint32_t l = 0; l < 2; ++l) {
      auto kb = view_bytes(cache, *b, l, true), vb = view_bytes(cache, *b, l, false);
      REQUIRE(kb.size() == bytes);
      CHECK(std::memcmp(kb.data(), k.data(), bytes) == 0);
      CHECK(std::memcmp(vb.data(), v.data(), bytes) == 0);
    }
    REQUIRE(cache.close(*b).ok());
  }
  REQUIRE(cache.close(*s).ok());
}

}  // namespace

// ---- for main.cpp ----------------------------------------------------------------------------

bool kvcache_cuda_test_device_available() { return gpu::device_available(); }

// Without a device the backend must refuse cleanly, with the documented error.
int kvcache_cuda_test_no_device_checks() {
  int failed = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      ++failed;
      std::printf("FAIL [no device]: %s\n", what);
    }
  };
  errc code = errc::ok;
  std::string what;
  try {
    cuda_vmm m;
  } catch (const kvcache::error& e) {
    code = e.code();
    what = e.what();
  }
  check(code == errc::system_error, "cuda_vmm construction raises system_error");
  check(what.find("no CUDA device") != std::string::npos, "the message says \"no CUDA device\"");
  auto drv = gpu::driver();
  check(!drv.ok() && drv.code() == errc::system_error, "driver() fails with system_error");
  check(!gpu::device_available(), "device_available() stays false");
  return failed;
}
