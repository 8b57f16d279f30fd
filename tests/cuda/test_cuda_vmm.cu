// SPDX-License-Identifier: Apache-2.0
//! @file
//! cuda_vmm, the device kernels and cache<cuda_vmm>: the host_vmm behaviours on the GPU.
//!
//! A plain main(), not Catch2 (its v2 single header is slow and noisy under nvcc). Without a
//! device it checks that the backend refuses cleanly, prints "SKIPPED: no CUDA device" and
//! returns 0 (CTest reports the test as skipped); with one, it returns the number of failed checks.
#include <kvcache/cache.hpp>
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

using kvcache::cuda_vmm;
using kvcache::cuda_vmm_config;
using kvcache::errc;
using kvcache::memory_stats;
using kvcache::range_id;
using kvcache::status;
using kvcache::write_request;

namespace {

int failures = 0;
const char* current = "";

#define CHECK(cond)                                                                          \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      ++failures;                                                                            \
      std::printf("FAIL [%s] %s:%d: %s\n", current, __FILE__, __LINE__, #cond);              \
    }                                                                                        \
  } while (0)
// A check whose failure makes the rest of the case meaningless.
#define REQUIRE(cond)                                                                        \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      ++failures;                                                                            \
      std::printf("FAIL [%s] %s:%d: %s (case abandoned)\n", current, __FILE__, __LINE__,     \
                  #cond);                                                                    \
      return;                                                                                \
    }                                                                                        \
  } while (0)

bool same(const memory_stats& a, const memory_stats& b) {
  return a.page_size == b.page_size && a.pages_total == b.pages_total &&
         a.pages_free == b.pages_free && a.pages_mapped == b.pages_mapped &&
         a.pages_idle == b.pages_idle && a.pages_shared == b.pages_shared &&
         a.ranges_active == b.ranges_active && a.ranges_idle == b.ranges_idle &&
         a.bytes_reserved == b.bytes_reserved && a.map_calls == b.map_calls &&
         a.pages_mapped_total == b.pages_mapped_total &&
         a.pages_unmapped_total == b.pages_unmapped_total &&
         a.pages_reclaimed == b.pages_reclaimed && a.cow_copies == b.cow_copies &&
         a.ranges_reused == b.ranges_reused;
}

// Device bytes: fill with a value, check they all hold it.
void fill(std::byte* dev, std::size_t n, int value) {
  if (cudaMemset(dev, value, n) != cudaSuccess) {
    ++failures;
    std::printf("FAIL [%s] cudaMemset\n", current);
  }
  cudaDeviceSynchronize();
}
bool holds(const std::byte* dev, std::size_t n, int value) {
  std::vector<unsigned char> h(n);
  if (cudaMemcpy(h.data(), dev, n, cudaMemcpyDeviceToHost) != cudaSuccess) return false;
  for (unsigned char c : h)
    if (c != static_cast<unsigned char>(value)) return false;
  return true;
}

std::size_t ps = 0;  // the device's granularity (2 MiB)

cuda_vmm make_vmm(std::size_t pages, bool deferred = true) {
  return cuda_vmm(cuda_vmm_config{0, 0, pages, deferred});
}
range_id acquire(cuda_vmm& m, std::size_t capacity, std::size_t hint = 0) {
  auto r = m.acquire(capacity, hint);
  if (!r) {
    std::printf("acquire failed: %s\n", r.error().message().c_str());
    std::abort();
  }
  return *r;
}
status prep(cuda_vmm& m, range_id r, std::size_t begin, std::size_t end) {
  const write_request q{r, begin, end};
  return m.prepare({&q, 1});
}
std::vector<cuda_vmm::page_id> pages_of(const cuda_vmm& m, range_id r) {
  std::vector<cuda_vmm::page_id> v;
  for (std::size_t i = 0; i < m.capacity(r) / ps; ++i) v.push_back(m.page_at(r, i));
  return v;
}

void test_config() {
  current = "config";
  errc code = errc::ok;
  try {
    cuda_vmm m(cuda_vmm_config{0, ps + ps / 2, 4, true});
  } catch (const kvcache::error& e) {
    code = e.code();
  }
  CHECK(code == errc::invalid_argument);
  code = errc::ok;
  try {
    cuda_vmm m(cuda_vmm_config{0, 0, 0, true});
  } catch (const kvcache::error& e) {
    code = e.code();
  }
  CHECK(code == errc::invalid_argument);
  cuda_vmm big(cuda_vmm_config{0, 2 * ps, 2, true});
  CHECK(big.granularity() == 2 * ps);
  CHECK(big.stats().pages_total == 2);
}

void test_map_on_demand() {
  current = "map on demand";
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
  CHECK(same(before, m.stats()));
}

void test_reuse() {
  current = "deferred reuse";
  auto m = make_vmm(8);
  const range_id one = acquire(m, 4 * ps), three = acquire(m, 4 * ps);
  REQUIRE(prep(m, one, 0, ps).ok());
  REQUIRE(prep(m, three, 0, 3 * ps).ok());
  fill(m.data(three), 3 * ps, 4);
  std::byte* base = m.data(three);
  m.release(three);
  m.release(one);
  auto s = m.stats();
  CHECK(s.ranges_idle == 2);
  CHECK(s.pages_idle == 4);
  CHECK(s.pages_free == 4);
  CHECK(s.pages_unmapped_total == 0);
  CHECK(prep(m, three, 0, 1).code() == errc::invalid_argument);
  const auto calls = s.map_calls;
  const range_id again = acquire(m, 4 * ps, 2 * ps);  // best fit: three covers 2 pages
  CHECK(again == three);
  CHECK(m.data(again) == base);
  CHECK(holds(base, 3 * ps, 4));
  REQUIRE(prep(m, again, 0, 3 * ps).ok());
  CHECK(m.stats().map_calls == calls);
  CHECK(m.stats().ranges_reused == 1);
  CHECK(acquire(m, 4 * ps, 2 * ps) == one);  // nothing else idle

  current = "release without deferral";
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

void test_reclamation() {
  current = "reclamation";
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
  CHECK(m.page_at(idle, 5) == cuda_vmm::no_page);
  CHECK(m.page_at(idle, 4) == cuda_vmm::no_page);
  CHECK(m.page_at(idle, 3) != cuda_vmm::no_page);
  fill(m.data(r), 4 * ps, 3);
  CHECK(holds(m.data(r), 4 * ps, 3));
  CHECK(m.reclaim_idle() == 4);
  CHECK(m.stats().pages_free == 4);
}

void test_exhaustion() {
  current = "exhaustion";
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
  CHECK(same(before, m.stats()));
  CHECK(m.backed_bytes(c) == 0);
  CHECK(pages_of(m, idle) == ip);
  CHECK(pages_of(m, a) == ap);
  CHECK(holds(m.data(a), 3 * ps, 11));
  CHECK(holds(m.data(idle), 2 * ps, 12));
  const write_request two[] = {{a, 0, 4 * ps}, {c, 0, 5 * ps}};  // 1 + 5 > 5: none mapped
  CHECK(m.prepare(two).code() == errc::out_of_pages);
  CHECK(same(before, m.stats()));
  REQUIRE(prep(m, c, 0, 5 * ps).ok());  // exactly free + reclaimable
  CHECK(m.stats().pages_free == 0);
  CHECK(m.stats().pages_reclaimed == 2);
  fill(m.data(c), 5 * ps, 13);
  CHECK(holds(m.data(a), 3 * ps, 11));
}

void test_fork_cow() {
  current = "fork + copy-on-write";
  auto m = make_vmm(8);
  const range_id a = acquire(m, 4 * ps);
  REQUIRE(prep(m, a, 0, 3 * ps).ok());
  fill(m.data(a), 3 * ps, 7);
  const auto free0 = m.stats().pages_free;
  auto cr = m.fork(a, 3 * ps);
  REQUIRE(cr.ok());
  const range_id c = *cr;
  CHECK(m.data(c) != m.data(a));
  CHECK(holds(m.data(c), 3 * ps, 7));
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(m.page_at(c, i) == m.page_at(a, i));
    CHECK(m.refs(m.page_at(a, i)) == 2);
  }
  CHECK(m.stats().pages_shared == 3);
  CHECK(m.stats().pages_free == free0);
  const auto shared = pages_of(m, a);

  REQUIRE(prep(m, c, ps + 10, ps + 20).ok());  // child writes page 1: one copy
  CHECK(m.stats().cow_copies == 1);
  CHECK(m.stats().pages_free == free0 - 1);
  CHECK(m.page_at(c, 1) != shared[1]);
  CHECK(m.page_at(a, 1) == shared[1]);
  CHECK(holds(m.data(c), 3 * ps, 7));  // the copy holds the same bytes
  fill(m.data(c) + ps + 10, 10, 99);
  CHECK(holds(m.data(a), 3 * ps, 7));  // the parent does not see it
  REQUIRE(prep(m, a, 0, 1).ok());      // the parent writes page 0, still shared
  CHECK(m.stats().cow_copies == 2);
  fill(m.data(a), ps, 55);
  CHECK(holds(m.data(c), ps, 7));
  CHECK(m.stats().pages_shared == 1);

  current = "copy-on-write under a full pool";
  auto n = make_vmm(4);
  const range_id p = acquire(n, 4 * ps);
  REQUIRE(prep(n, p, 0, 3 * ps).ok());
  fill(n.data(p), 3 * ps, 5);
  auto kr = n.fork(p, 3 * ps);
  REQUIRE(kr.ok());
  const range_id k = *kr;
  const range_id d = acquire(n, 8 * ps);
  REQUIRE(prep(n, d, 0, ps).ok());
  const auto before = n.stats();
  CHECK(prep(n, k, 0, 2 * ps).code() == errc::out_of_pages);
  CHECK(same(before, n.stats()));
  CHECK(holds(n.data(k), 3 * ps, 5));
  n.release(d);
  REQUIRE(prep(n, k, 0, ps).ok());  // d's page reclaimed for one copy
  CHECK(n.stats().cow_copies == 1);
  CHECK(holds(n.data(k), 3 * ps, 5));
  CHECK(holds(n.data(p), 3 * ps, 5));

  current = "moved backend";
  std::byte* base = n.data(p);
  cuda_vmm moved(std::move(n));
  CHECK(moved.data(p) == base);
  CHECK(holds(moved.data(p), 3 * ps, 5));
}

// cache<cuda_vmm>: append host K/V, read the view back from the device.
void test_cache() {
  current = "cache<cuda_vmm>";
  using cache_t = kvcache::cache<cuda_vmm, kvcache::keep_all, kvcache::cuda_passthrough>;
  kvcache::cache_config cfg;
  cfg.geo = {2, 4, 8, 64, kvcache::dtype::f16};  // 4 heads x 64 x 2 B = 512 B per token
  cfg.max_tokens = 8192;                          // 4 MiB per range: 2 pages
  cache_t cache(cfg, make_vmm(16));
  auto s = cache.open(0);
  REQUIRE(s.ok());
  const std::uint32_t n = 5000;  // spans both pages
  const std::size_t bytes = std::size_t{n} * cfg.geo.token_bytes();
  std::vector<unsigned char> k(bytes), v(bytes);
  for (std::size_t i = 0; i < bytes; ++i) {
    k[i] = static_cast<unsigned char>(i * 7 + 1);
    v[i] = static_cast<unsigned char>(i * 13 + 3);
  }
  const kvcache::kv_tensor kt{k.data(), cfg.geo.type, n, cfg.geo.kv_heads, cfg.geo.head_dim};
  const kvcache::kv_tensor vt{v.data(), cfg.geo.type, n, cfg.geo.kv_heads, cfg.geo.head_dim};
  for (std::uint32_t l = 0; l < cfg.geo.layers; ++l) REQUIRE(cache.append(*s, l, kt, vt).ok());
  auto view = cache.view(*s, 1);
  REQUIRE(view.ok());
  CHECK(view->rows == n);
  CHECK(view->slot_stride == cfg.geo.token_bytes());
  std::vector<unsigned char> back(bytes);
  CHECK(cudaMemcpy(back.data(), view->k, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(back == k);
  CHECK(cudaMemcpy(back.data(), view->v, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(back == v);
  CHECK(cache.memory().stats().pages_mapped == 2 * 2 * 2);
  // A fork shares the pages; appending to it copies only the page it writes.
  auto f = cache.fork(*s);
  REQUIRE(f.ok());
  CHECK(cache.memory().stats().pages_shared == 8);
  const kvcache::kv_tensor one_k{k.data(), cfg.geo.type, 1, cfg.geo.kv_heads, cfg.geo.head_dim};
  REQUIRE(cache.append(*f, 0, one_k, one_k).ok());
  CHECK(cache.memory().stats().cow_copies == 2);  // page 1 of K and of V, layer 0
  auto pv = cache.view(*s, 0);
  REQUIRE(pv.ok());
  CHECK(cudaMemcpy(back.data(), pv->k, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(back == k);
  CHECK(pv->rows == n);
  REQUIRE(cache.close(*s).ok());
  REQUIRE(cache.close(*f).ok());
}

void test_kernels() {
  current = "kernels";
  namespace gpu = kvcache::gpu;
  const std::size_t total = 1 << 20;
  std::vector<unsigned char> src(total);
  for (std::size_t i = 0; i < total; ++i) src[i] = static_cast<unsigned char>(i * 31 + 7);
  std::byte *dsrc = nullptr, *ddst = nullptr;
  REQUIRE(cudaMalloc(&dsrc, total) == cudaSuccess);
  REQUIRE(cudaMalloc(&ddst, total) == cudaSuccess);
  cudaMemcpy(dsrc, src.data(), total, cudaMemcpyHostToDevice);
  cudaMemset(ddst, 0, total);

  // Chunks of mixed alignment and size, scattered; the host does the same with memcpy.
  std::vector<gpu::copy_chunk> chunks;
  std::vector<unsigned char> expect(total, 0);
  std::size_t s_off = 0, d_off = total / 2;
  for (std::size_t i = 0; i < 200; ++i) {
    const std::size_t len = (i % 3 == 0) ? 4096 : (i % 3 == 1 ? 1000 + i : 17);
    const std::size_t so = s_off + (i % 5 == 0 ? 3 : 0);
    const std::size_t dst_at = (d_off + i * 1024) % (total / 2) + (i % 7 == 0 ? 5 : 0);
    chunks.push_back({ddst + dst_at, dsrc + so, len});
    s_off = (s_off + len + 64) % (total / 2);
  }
  // The host reference: the same copies in order (overlaps are checked below only where one
  // chunk wrote).
  for (const auto& c : chunks) {
    const auto* from = src.data() + (static_cast<const std::byte*>(c.src) - dsrc);
    std::memcpy(expect.data() + (static_cast<std::byte*>(c.dst) - ddst), from, c.bytes);
  }
  gpu::copy_chunk* dchunks = nullptr;
  REQUIRE(cudaMalloc(&dchunks, chunks.size() * sizeof(gpu::copy_chunk)) == cudaSuccess);
  CHECK(gpu::copy_chunks(chunks, dchunks).ok());
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<unsigned char> got(total);
  cudaMemcpy(got.data(), ddst, total, cudaMemcpyDeviceToHost);
  // Overlapping destinations race in the kernel; compare only bytes written by one chunk.
  std::vector<int> writers(total, 0);
  for (const auto& c : chunks)
    for (std::size_t b = 0; b < c.bytes; ++b) ++writers[(static_cast<std::byte*>(c.dst) - ddst) + b];
  bool ok = true;
  for (std::size_t i = 0; i < total; ++i)
    if (writers[i] <= 1 && got[i] != expect[i]) ok = false;
  CHECK(ok);

  // Gather: token-major, 4 heads x 128 B rows, 64 slots; each head keeps its own slots.
  const std::uint32_t heads = 4, slots = 64, rows = 20;
  const std::size_t rb = 128, slot_stride = heads * rb;
  std::vector<std::uint32_t> keep(heads * rows);
  for (std::uint32_t h = 0; h < heads; ++h)
    for (std::uint32_t i = 0; i < rows; ++i) keep[h * rows + i] = (i * 3 + h) % slots;
  std::uint32_t* dkeep = nullptr;
  REQUIRE(cudaMalloc(&dkeep, keep.size() * 4) == cudaSuccess);
  cudaMemcpy(dkeep, keep.data(), keep.size() * 4, cudaMemcpyHostToDevice);
  const gpu::gather_shape g{rows, heads, rb, slot_stride, rb};
  cudaMemset(ddst, 0, total);
  CHECK(gpu::gather_rows(ddst, dsrc, dkeep, g).ok());
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  cudaMemcpy(got.data(), ddst, rows * slot_stride, cudaMemcpyDeviceToHost);
  ok = true;
  for (std::uint32_t h = 0; h < heads; ++h)
    for (std::uint32_t i = 0; i < rows; ++i)
      if (std::memcmp(got.data() + i * slot_stride + h * rb,
                      src.data() + keep[h * rows + i] * slot_stride + h * rb, rb) != 0)
        ok = false;
  CHECK(ok);
  // In place, through scratch.
  CHECK(gpu::compact_rows(dsrc, dkeep, g, ddst).ok());
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<unsigned char> compacted(rows * slot_stride);
  cudaMemcpy(compacted.data(), dsrc, compacted.size(), cudaMemcpyDeviceToHost);
  CHECK(std::memcmp(compacted.data(), got.data(), compacted.size()) == 0);
  CHECK(gpu::gather_rows(nullptr, dsrc, dkeep, g).code() == errc::invalid_argument);
  cudaFree(dkeep);
  cudaFree(dchunks);
  cudaFree(dsrc);
  cudaFree(ddst);
}

}  // namespace

int main() {
  if (!kvcache::gpu::device_available()) {
    // No device: the backend must refuse cleanly, with the documented error.
    current = "no device";
    errc code = errc::ok;
    std::string what;
    try {
      cuda_vmm m;
    } catch (const kvcache::error& e) {
      code = e.code();
      what = e.what();
    }
    CHECK(code == errc::system_error);
    CHECK(what.find("no CUDA device") != std::string::npos);
    CHECK(kvcache::gpu::driver().code() == errc::system_error);
    if (failures) return 1;
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  auto drv = kvcache::gpu::driver();
  if (!drv) {
    std::printf("FAIL: driver entry points: %s\n", drv.error().message().c_str());
    return 1;
  }
  ps = cuda_vmm(cuda_vmm_config{0, 0, 1, true}).granularity();
  std::printf("device granularity: %zu bytes\n", ps);
  try {
    test_config();
    test_map_on_demand();
    test_reuse();
    test_reclamation();
    test_exhaustion();
    test_fork_cow();
    test_cache();
    test_kernels();
  } catch (const kvcache::error& e) {
    ++failures;
    std::printf("FAIL [%s]: exception: %s\n", current, e.what());
  }
  std::printf("%s: %d failed check(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
