// SPDX-License-Identifier: Apache-2.0
//! @file
//! cuda_holding (cuda/holding.cuh): the pinned pool, byte-exact round trips device -> pinned ->
//! device, asynchronous batches and their tickets, stats, moves, errors, and the two-tier GPU
//! memory `tiered<cuda_vmm, cuda_holding>`.
//!
//! Its own main() (tests/CMakeLists.txt gives it an executable and the CTest test
//! kvcache.cuda.test_cuda_holding): no Catch2 here, so this TU is the only nvcc cost. Without a
//! device it checks that construction refuses cleanly, prints "SKIPPED: no CUDA device" and
//! returns 0 (CTest reports a skip). With `--bandwidth` (scripts/gpu-check) it also prints
//! pinned vs pageable host<->device copy bandwidth measured in the same run.

#if defined(__NVCC__)
#  pragma nv_diag_suppress 2810
#endif

#include <kvcache/cache.hpp>
#include <kvcache/cuda/cuda_vmm.cuh>
#include <kvcache/cuda/driver.cuh>
#include <kvcache/cuda/holding.cuh>
#include <kvcache/cuda/passthrough.cuh>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/memory/backend.hpp>
#include <kvcache/memory/tiered.hpp>

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

using kvcache::copy_op;
using kvcache::cuda_holding;
using kvcache::cuda_holding_config;
using kvcache::errc;
using kvcache::hold_key;
using kvcache::pinned_pool;
using kvcache::pinned_pool_config;

namespace {

int g_failed = 0, g_checks = 0;
const char* g_case = "";

#define CHECK(cond)                                                                        \
  do {                                                                                     \
    ++g_checks;                                                                            \
    if (!(cond)) {                                                                         \
      ++g_failed;                                                                          \
      std::printf("FAIL [%s] %s:%d: %s\n", g_case, __FILE__, __LINE__, #cond);             \
    }                                                                                      \
  } while (0)
std::string message_of(const kvcache::status& st) { return st.message(); }
template <class T>
std::string message_of(const kvcache::result<T>& r) {
  return r.ok() ? std::string() : r.error().message();
}

#define CHECK_OK(expr)                                                                     \
  do {                                                                                     \
    const auto& _st = (expr);                                                              \
    ++g_checks;                                                                            \
    if (!_st.ok()) {                                                                       \
      ++g_failed;                                                                          \
      std::printf("FAIL [%s] %s:%d: %s: %s\n", g_case, __FILE__, __LINE__, #expr,          \
                  message_of(_st).c_str());                                                  \
    }                                                                                      \
  } while (0)

#define REQUIRE_DEV(buf)                                                                   \
  do {                                                                                     \
    ++g_checks;                                                                            \
    if ((buf).p == nullptr) {                                                              \
      ++g_failed;                                                                          \
      std::printf("FAIL [%s] %s:%d: cudaMalloc of %zu bytes\n", g_case, __FILE__, __LINE__, \
                  (buf).bytes);                                                            \
      return;                                                                              \
    }                                                                                      \
  } while (0)

struct test_case {
  const char* name;
  void (*fn)();
};

// A pattern that differs per byte and per seed.
std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  std::uint32_t x = 0x9e3779b9u * (seed + 1);
  for (auto& b : v) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<std::byte>(x);
  }
  return v;
}

// A device buffer (cudaMalloc), freed on scope exit.
struct device_buffer {
  explicit device_buffer(std::size_t n) : bytes(n) {
    if (cudaMalloc(&p, n) != cudaSuccess) p = nullptr;
  }
  ~device_buffer() { (void)cudaFree(p); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  std::byte* data() const { return static_cast<std::byte*>(p); }
  void upload(const std::vector<std::byte>& v) { (void)cudaMemcpy(p, v.data(), v.size(), cudaMemcpyHostToDevice); }
  std::vector<std::byte> download() const {
    std::vector<std::byte> v(bytes);
    (void)cudaMemcpy(v.data(), p, bytes, cudaMemcpyDeviceToHost);
    return v;
  }
  void* p = nullptr;
  std::size_t bytes;
};

bool is_pinned(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

std::vector<std::int32_t> tags(std::uint32_t n, std::int32_t first = 0) {
  std::vector<std::int32_t> t(n);
  for (std::uint32_t i = 0; i < n; ++i) t[i] = first + static_cast<std::int32_t>(i);
  return t;
}

// ---- cases ------------------------------------------------------------------------------------

void pool_classes_and_reuse() {
  pinned_pool pool(pinned_pool_config{std::size_t{1} << 20, 0});  // 1 MiB chunks: classes to 128 KiB
  CHECK(pool.block_size(0) == 512);
  CHECK(pool.block_size(513) == 1024);
  CHECK(pool.block_size(128 << 10) == (128u << 10));
  CHECK(pool.block_size((128 << 10) + 1) == (128u << 10) + 512);  // large: own cudaHostAlloc
  void* a = pool.allocate(7000);
  void* b = pool.allocate(100);
  CHECK(a != nullptr && b != nullptr && a != b);
  CHECK(reinterpret_cast<std::uintptr_t>(a) % pinned_pool::min_block == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(b) % pinned_pool::min_block == 0);
  CHECK(is_pinned(a) && is_pinned(b));
  std::memset(a, 0x5a, 7000);
  std::memset(b, 0x33, 100);
  CHECK(static_cast<unsigned char*>(a)[6999] == 0x5a);
  auto st = pool.stats();
  CHECK(st.host_allocs == 1);  // one chunk
  CHECK(st.pinned_bytes == (1u << 20));
  CHECK(st.in_use_bytes == 8192 + 512);
  pool.deallocate(a, 7000);
  void* c = pool.allocate(8000);  // same class: the freed block comes back
  CHECK(c == a);
  // Fill the chunk (7 blocks of 128 KiB left: one was split for a, b): a second chunk is pinned
  // only when the first is used up.
  std::vector<void*> blocks;
  for (int i = 0; i < 7; ++i) blocks.push_back(pool.allocate(128 << 10));
  CHECK(pool.stats().host_allocs == 1);
  blocks.push_back(pool.allocate(128 << 10));
  CHECK(pool.stats().host_allocs == 2);
  void* large = pool.allocate(1 << 20);  // above chunk/8: its own allocation
  CHECK(large != nullptr && is_pinned(large));
  CHECK(pool.stats().host_allocs == 3);
  pool.deallocate(large, 1 << 20);
  CHECK(pool.stats().pinned_bytes == (2u << 20));
  for (void* p : blocks) pool.deallocate(p, 128 << 10);
  pool.deallocate(c, 8000);
  pool.deallocate(b, 100);
  CHECK(pool.stats().in_use_bytes == 0);
  CHECK(pool.stats().host_allocs == 3);  // nothing more pinned

  // Reservation pins up front; a bad chunk size is refused.
  pinned_pool reserved(pinned_pool_config{std::size_t{1} << 20, 3u << 20});
  CHECK(reserved.stats().pinned_bytes == (3u << 20) && reserved.stats().host_allocs == 3);
  errc code = errc::ok;
  try {
    pinned_pool bad(pinned_pool_config{3000, 0});
  } catch (const kvcache::error& e) {
    code = e.code();
  }
  CHECK(code == errc::invalid_argument);
}

void round_trip_byte_exact() {
  for (const bool use_pool : {true, false}) {
    cuda_holding_config cfg;
    cfg.use_pool = use_pool;
    cuda_holding h(cfg);
    // A working tier of 1000 rows of 768 bytes (3 KV heads x 64 x fp16 x K+V) on the device.
    constexpr std::size_t row = 768, rows = 1000;
    const auto src = pattern(row * rows, use_pool ? 1 : 2);
    device_buffer dev(row * rows);
    REQUIRE_DEV(dev);
    dev.upload(src);
    // Hold rows 10..59 (a sentence) one by one, then rows 500..999 in one copy.
    const hold_key k1{7, 1}, k2{7, 2};
    auto r1 = h.extend(k1, row, tags(50, 10));
    CHECK_OK(r1);
    if (!r1.ok()) return;
    CHECK(is_pinned(*r1));
    for (std::size_t i = 0; i < 50; ++i) h.copy_in(*r1 + i * row, dev.data() + (10 + i) * row, row);
    auto r2 = h.extend(k2, row, tags(500, 500));
    CHECK_OK(r2);
    if (!r2.ok()) return;
    CHECK_OK(h.try_copy_in(*r2, dev.data() + 500 * row, 500 * row));
    // Pinned bytes readable on the host: equal to the source.
    const auto g1 = h.find(k1);
    CHECK(g1.count == 50 && g1.row_bytes == row && g1.tags[0] == 10 && g1.tags[49] == 59);
    CHECK(std::memcmp(g1.rows, src.data() + 10 * row, 50 * row) == 0);
    const auto g2 = h.find(k2);
    CHECK(g2.count == 500 && std::memcmp(g2.rows, src.data() + 500 * row, 500 * row) == 0);
    // Extending a group moves its bytes (vector growth): they stay equal.
    auto r3 = h.extend(k1, row, tags(200, 100));
    CHECK_OK(r3);
    CHECK(std::memcmp(h.find(k1).rows, src.data() + 10 * row, 50 * row) == 0);
    // Clear the device, copy back, compare byte-exact.
    (void)cudaMemset(dev.data(), 0, row * rows);
    for (std::size_t i = 0; i < 50; ++i) h.copy_out(dev.data() + (10 + i) * row, h.find(k1).rows + i * row, row);
    CHECK_OK(h.try_copy_out(dev.data() + 500 * row, h.find(k2).rows, 500 * row));
    const auto back = dev.download();
    CHECK(std::memcmp(back.data() + 10 * row, src.data() + 10 * row, 50 * row) == 0);
    CHECK(std::memcmp(back.data() + 500 * row, src.data() + 500 * row, 500 * row) == 0);
    CHECK(std::to_integer<int>(back[0]) == 0);  // not held, not restored
    CHECK_OK(h.check());
    CHECK_OK(h.transport_status());
  }
}

void async_batches_and_tickets() {
  cuda_holding h;
  constexpr std::size_t row = 512, n = 4096;  // 2 MiB
  const auto src = pattern(row * n, 3);
  device_buffer dev(row * n), dev2(row * n);
  REQUIRE_DEV(dev);
  REQUIRE_DEV(dev2);
  dev.upload(src);
  auto r = h.extend({1, 0}, row, tags(n));
  CHECK_OK(r);
  if (!r.ok()) return;
  std::byte* held = *r;
  CHECK(h.submit({}) == 0);
  CHECK(h.done(0));
  // Batch 1: device -> pinned in 64 ops of 64 rows; batch 2: pinned -> dev2 (stream order: after
  // batch 1); batch 3: one more copy back, of the first row only.
  std::vector<copy_op> in, out;
  for (std::size_t i = 0; i < n; i += 64) in.push_back({held + i * row, dev.data() + i * row, 64 * row});
  for (std::size_t i = 0; i < n; i += 64) out.push_back({dev2.data() + i * row, held + i * row, 64 * row});
  const auto t1 = h.submit(std::move(in));
  const auto t2 = h.submit(std::move(out));
  const auto t3 = h.submit({{dev2.data(), held, row}});
  CHECK(t1 > 0 && t2 == t1 + 1 && t3 == t2 + 1);
  h.wait(t3);  // waits for every earlier batch too
  CHECK(h.done(t1) && h.done(t2) && h.done(t3));
  CHECK(std::memcmp(held, src.data(), row * n) == 0);
  CHECK(dev2.download() == src);
  h.wait(t1);  // already done: returns at once
  CHECK_OK(h.try_wait(t2));
  // done() polls without blocking; a ticket becomes done eventually.
  const auto t4 = h.submit({{dev2.data(), held, row * n}});
  while (!h.done(t4)) {
  }
  CHECK(h.done(t4));
  // Many batches: events are recycled (tickets keep counting).
  std::uint64_t last = 0;
  for (int i = 0; i < 300; ++i) last = h.submit({{held, dev.data() + (i % n) * row, row}});
  h.wait(last);
  CHECK(last == t4 + 300);
  CHECK_OK(h.transport_status());
}

void stats_and_owners() {
  cuda_holding h(std::size_t{1} << 20);  // capacity 1 MiB
  constexpr std::size_t row = 256;
  CHECK(h.capacity() == (1u << 20));
  auto r = h.extend({1, 0}, row, tags(100));
  CHECK_OK(r);
  CHECK_OK(h.extend({1, 1}, row, tags(20)));
  CHECK_OK(h.extend({2, 0}, row, tags(40)));
  auto st = h.stats();
  const std::size_t per = row + sizeof(std::int32_t);
  CHECK(st.groups == 3);
  CHECK(st.bytes_held == 160 * per);
  CHECK(h.bytes() == 160 * per);
  CHECK_OK(h.copy_owner(1, 3));
  CHECK(h.stats().groups == 5);
  CHECK(h.find({3, 0}).count == 100);
  CHECK(is_pinned(h.find({3, 0}).rows));
  CHECK(h.erase_owner(1) == 120 * per);
  CHECK(h.erase({2, 0}) == 40 * per);
  st = h.stats();
  CHECK(st.groups == 2 && st.bytes_held == 120 * per && st.peak_bytes_held == 280 * per);
  // Capacity: refused whole, nothing changes.
  auto big = h.extend({9, 0}, row, tags(5000));
  CHECK(!big.ok() && big.code() == errc::capacity_exceeded);
  CHECK(h.stats().groups == 2);
  CHECK(h.pinned().in_use_bytes > 0 && h.pinned().host_allocs >= 1);
  CHECK_OK(h.check());
  h.erase_owner(3);
  CHECK(h.pinned().in_use_bytes == 0);
}

void moves_keep_groups_and_transport() {
  cuda_holding a;
  constexpr std::size_t row = 128;
  const auto src = pattern(row * 10, 4);
  auto r = a.extend({5, 5}, row, tags(10));
  CHECK_OK(r);
  if (!r.ok()) return;
  std::memcpy(*r, src.data(), src.size());
  device_buffer dev(row * 10);
  REQUIRE_DEV(dev);
  const auto t = a.submit({{dev.data(), *r, row * 10}});
  cuda_holding b(std::move(a));  // a batch in flight moves with the tier
  b.wait(t);
  CHECK(b.done(t));
  CHECK(dev.download() == src);
  CHECK(b.find({5, 5}).count == 10);
  cuda_holding c;
  c = std::move(b);
  CHECK(c.find({5, 5}).count == 10);
  c.copy_out(dev.data(), c.find({5, 5}).rows, row);
  CHECK_OK(c.transport_status());
}

void errors_are_clear() {
  // A device that does not exist: a system_error naming the call.
  errc code = errc::ok;
  std::string what;
  try {
    cuda_holding_config cfg;
    cfg.device = 4096;
    cuda_holding h(cfg);
  } catch (const kvcache::error& e) {
    code = e.code();
    what = e.what();
  }
  CHECK(code == errc::system_error);
  CHECK(what.find("cudaSetDevice") != std::string::npos);
  (void)cudaSetDevice(0);
  // A row size mismatch is basic_holding's refusal (the tier's rules are unchanged).
  cuda_holding h;
  CHECK_OK(h.extend({1, 1}, 64, tags(1)));
  auto bad = h.extend({1, 1}, 32, tags(1));
  CHECK(!bad.ok() && bad.code() == errc::invalid_argument);
  CHECK(h.try_copy_in(nullptr, nullptr, 0).ok());  // zero bytes: nothing issued
}

void two_tier_gpu_memory() {
  using gpu_tiers = kvcache::tiered<kvcache::cuda_vmm, cuda_holding>;
  static_assert(kvcache::memory_backend<gpu_tiers>);
  static_assert(kvcache::has_holding_tier<gpu_tiers>);
  gpu_tiers m(kvcache::cuda_vmm(kvcache::cuda_vmm_config{0, 0, 2, true}), cuda_holding{});
  auto range = m.acquire(m.granularity(), 0);
  CHECK_OK(range);
  if (!range.ok()) return;
  const kvcache::write_request q{*range, 0, 4096};
  CHECK_OK(m.prepare({&q, 1}));
  std::byte* working = m.data(*range);
  const auto src = pattern(4096, 5);
  (void)cudaMemcpy(working, src.data(), src.size(), cudaMemcpyHostToDevice);
  // Demote 16 rows of 256 bytes, clear them in the working tier, promote them back.
  auto held = m.holding().extend({1, 0}, 256, tags(16));
  CHECK_OK(held);
  if (!held.ok()) return;
  m.holding().copy_in(*held, working, 4096);
  (void)cudaMemset(working, 0, 4096);
  const auto t = m.holding().submit({{working, *held, 4096}});
  m.holding().wait(t);
  std::vector<std::byte> back(4096);
  (void)cudaMemcpy(back.data(), working, 4096, cudaMemcpyDeviceToHost);
  CHECK(back == src);
  CHECK_OK(m.holding().check());
  m.release(*range);
}

// A cache on the two-tier GPU memory: hold() moves a sequence's device bytes to pinned memory
// and gives its pages back; restore() brings them back byte for byte.
void cache_hold_restore() {
  using gpu_tiers = kvcache::tiered<kvcache::cuda_vmm, cuda_holding>;
  using gpu_cache = kvcache::cache<gpu_tiers, kvcache::keep_all, kvcache::cuda_passthrough>;
  static_assert(gpu_cache::has_tiers);
  kvcache::cache_config cfg;
  cfg.geo = {2, 3, 9, 64, kvcache::dtype::f16};  // 3 heads x 64 x 2 B = 384 B per token
  cfg.max_tokens = 8192;                          // 3 MiB per range: 2 pages
  const std::size_t tb = cfg.geo.token_bytes();
  // Without deferred reclamation a released range unmaps its pages: hold() leaves none mapped.
  gpu_cache c(cfg, gpu_tiers(kvcache::cuda_vmm(kvcache::cuda_vmm_config{0, 0, 16, false}), cuda_holding{}));
  const std::uint32_t n = 6000;  // spans both pages of each range
  const auto k = pattern(std::size_t{n} * tb, 11), v = pattern(std::size_t{n} * tb, 12);
  auto tensor = [&](const void* p) {
    return kvcache::kv_tensor{p, cfg.geo.type, n, cfg.geo.kv_heads, cfg.geo.head_dim};
  };
  auto s = c.open(0);
  CHECK_OK(s);
  if (!s.ok()) return;
  for (std::uint32_t l = 0; l < 2; ++l) CHECK_OK(c.append(*s, l, tensor(k.data()), tensor(v.data())));
  (void)cudaDeviceSynchronize();
  CHECK(c.memory().stats().pages_mapped == 2 * 2 * 2);  // 2 layers x K, V x 2 pages
  CHECK_OK(c.hold(*s));
  CHECK(c.is_held(*s));
  const auto held = c.stats().tier;
  CHECK(held.bytes_demoted >= 2 * 2 * std::size_t{n} * tb);  // 2 layers x K, V (backed bytes)
  CHECK(c.memory().holding().stats().groups > 0);
  CHECK(c.memory().stats().pages_mapped == 0);
  CHECK(!c.view(*s, 0).ok());  // refused while held
  CHECK_OK(c.restore(*s));
  CHECK(!c.is_held(*s));
  CHECK(c.stats().tier.bytes_promoted == held.bytes_demoted);
  CHECK(c.memory().holding().stats().groups == 0);
  for (std::uint32_t l = 0; l < 2; ++l) {
    auto view = c.view(*s, l);
    CHECK_OK(view);
    if (!view.ok()) continue;
    CHECK(view->rows == n && view->slot_stride == tb);
    std::vector<std::byte> kb(std::size_t{n} * tb), vb(kb.size());
    (void)cudaMemcpy(kb.data(), view->k, kb.size(), cudaMemcpyDeviceToHost);
    (void)cudaMemcpy(vb.data(), view->v, vb.size(), cudaMemcpyDeviceToHost);
    CHECK(kb == k);
    CHECK(vb == v);
  }
  CHECK_OK(c.memory().holding().check());
  CHECK_OK(c.close(*s));
}

// ---- bandwidth (scripts/gpu-check: --bandwidth) ----------------------------------------------

double seconds_per_copy(void* dst, const void* src, std::size_t n, int reps) {
  (void)cudaMemcpy(dst, src, n, cudaMemcpyDefault);  // warm
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) (void)cudaMemcpy(dst, src, n, cudaMemcpyDefault);
  (void)cudaDeviceSynchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

void bandwidth() {
  std::printf("\nHost<->device copy bandwidth: pinned (cuda_holding) vs pageable, same run\n");
  std::printf("%-10s %-4s %12s %12s %8s\n", "bytes", "dir", "pinned GiB/s", "pageable", "ratio");
  cuda_holding h;
  for (const std::size_t n : {std::size_t{16} << 10, std::size_t{256} << 10, std::size_t{4} << 20,
                              std::size_t{64} << 20}) {
    auto held = h.extend({0, n}, n, tags(1));
    if (!held.ok()) continue;
    std::vector<std::byte> pageable(n, std::byte{1});
    device_buffer dev(n);
    if (!dev.p) continue;
    const int reps = n >= (std::size_t{4} << 20) ? 20 : 200;
    const double gib = static_cast<double>(n) / (1 << 30);
    for (const bool h2d : {true, false}) {
      const double tp = h2d ? seconds_per_copy(dev.p, *held, n, reps)
                            : seconds_per_copy(*held, dev.p, n, reps);
      const double tq = h2d ? seconds_per_copy(dev.p, pageable.data(), n, reps)
                            : seconds_per_copy(pageable.data(), dev.p, n, reps);
      std::printf("%-10zu %-4s %12.2f %12.2f %8.3f\n", n, h2d ? "H2D" : "D2H", gib / tp, gib / tq,
                  tq / tp);
    }
    h.erase({0, n});
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool bw = false;
  for (int i = 1; i < argc; ++i) bw |= std::strcmp(argv[i], "--bandwidth") == 0;
  if (!kvcache::gpu::device_available()) {
    // Without a device: construction must refuse with system_error "... no CUDA device".
    errc code = errc::ok;
    std::string what;
    try {
      cuda_holding h;
    } catch (const kvcache::error& e) {
      code = e.code();
      what = e.what();
    }
    g_case = "no device";
    CHECK(code == errc::system_error);
    CHECK(what.find("no CUDA device") != std::string::npos);
    if (g_failed) {
      std::printf("FAILED: %d no-device check(s)\n", g_failed);
      return 1;
    }
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  const test_case cases[] = {
      {"pinned_pool: size classes, reuse, reservation", pool_classes_and_reuse},
      {"cuda_holding: device -> pinned -> device round trips are byte-exact", round_trip_byte_exact},
      {"cuda_holding: async batches, tickets in stream order, events recycled", async_batches_and_tickets},
      {"cuda_holding: stats, owners, capacity, pinned gauges", stats_and_owners},
      {"cuda_holding: moves keep groups and batches in flight", moves_keep_groups_and_transport},
      {"cuda_holding: clear errors", errors_are_clear},
      {"tiered<cuda_vmm, cuda_holding>: demote and promote rows", two_tier_gpu_memory},
      {"cache<tiered<cuda_vmm, cuda_holding>>: hold and restore a sequence byte for byte", cache_hold_restore},
  };
  for (const auto& c : cases) {
    g_case = c.name;
    const int before = g_failed;
    c.fn();
    std::printf("%s %s\n", g_failed == before ? "ok  " : "FAIL", c.name);
  }
  if (bw) bandwidth();
  std::printf("%d checks, %d failed\n", g_checks, g_failed);
  return g_failed ? 1 : 0;
}
