// SPDX-License-Identifier: Apache-2.0
// The thread-safety contract (cache.hpp, docs/RELIABILITY.md): several threads open, grow, fork,
// evict and close sequences of one cache over one shared page pool at once; each thread checks
// that its own sequences hold exactly its own tokens (no bytes of another thread's sequence),
// and the invariant checker passes at the end. ThreadSanitizer runs these: kvcache_tests "[concurrency]".
#include "catch.hpp"
#include "reliability/support.hpp"

#include <atomic>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace kv = kvcache;

namespace {

constexpr std::uint32_t kLayers = 2, kHeads = 2, kQHeads = 4, kDim = 32;
constexpr int kThreads = 4;
kv::geometry geo() { return {kLayers, kHeads, kQHeads, kDim, kv::dtype::f16}; }

//! The fp16 bits of K (v = false) or V of (thread, sequence serial, position, head, element):
//! finite (1.0 to 2.0), and different for every owner, so a row of another sequence is seen.
std::uint16_t stamp(std::uint32_t owner, std::uint32_t pos, std::uint32_t h, std::uint32_t d, bool v) {
  std::uint32_t x = owner * 0x9e3779b1u ^ pos * 0x85ebca6bu ^ h * 0xc2b2ae35u ^ d * 0x27d4eb2fu ^ (v ? 0x165667b1u : 0);
  x ^= x >> 15;
  x *= 0x2c1b3c6du;
  x ^= x >> 12;
  return static_cast<std::uint16_t>(0x3c00u | (x & 0x3ffu));
}

//! One thread's sequences: the cache's id, the owner stamp, and the positions appended per layer.
struct owned {
  kv::seq_id id;
  std::uint32_t owner;
  std::uint32_t next[kLayers] = {};
};

template <class C>
kv::status append_stamped(C& c, owned& s, std::uint32_t layer, std::uint32_t n) {
  std::vector<std::uint16_t> k(std::size_t{n} * kHeads * kDim), v(k.size());
  for (std::uint32_t t = 0; t < n; ++t)
    for (std::uint32_t h = 0; h < kHeads; ++h)
      for (std::uint32_t d = 0; d < kDim; ++d) {
        const std::size_t i = (std::size_t{t} * kHeads + h) * kDim + d;
        k[i] = stamp(s.owner, s.next[layer] + t, h, d, false);
        v[i] = stamp(s.owner, s.next[layer] + t, h, d, true);
      }
  const kv::kv_tensor kt{k.data(), kv::dtype::f16, n, kHeads, kDim}, vt{v.data(), kv::dtype::f16, n, kHeads, kDim};
  kv::status st = c.append(s.id, layer, kt, vt);
  if (st) s.next[layer] += n;
  return st;
}

//! Every live entry of the sequence carries its owner's stamp for its position (passthrough).
template <class C>
bool holds_own_tokens(const C& c, const owned& s, std::string& why) {
  for (std::uint32_t l = 0; l < kLayers; ++l) {
    const auto v = c.view(s.id, l).value();
    for (std::uint32_t slot = 0; slot < v.rows; ++slot)
      for (std::uint32_t h = 0; h < kHeads; ++h) {
        const std::int32_t p = v.positions[std::size_t{slot} * kHeads + h];
        if (p < 0) continue;
        if (static_cast<std::uint32_t>(p) >= s.next[l]) {
          why = "position " + std::to_string(p) + " never appended";
          return false;
        }
        for (std::uint32_t d = 0; d < kDim; ++d) {
          std::uint16_t kx, vx;
          std::memcpy(&kx, v.k_row(slot, h) + 2 * d, 2);
          std::memcpy(&vx, v.v_row(slot, h) + 2 * d, 2);
          if (kx != stamp(s.owner, static_cast<std::uint32_t>(p), h, d, false) ||
              vx != stamp(s.owner, static_cast<std::uint32_t>(p), h, d, true)) {
            why = "layer " + std::to_string(l) + " slot " + std::to_string(slot) + " head " + std::to_string(h) +
                  " holds bytes not written to this sequence";
            return false;
          }
        }
      }
  }
  return true;
}

//! Each thread: open, grow (prefill then decode steps), fork and grow the fork, evict, map
//! ahead, close; pool exhaustion is expected and answered by closing. Returns the failures seen.
template <class C>
void churn(C& c, int thread, int rounds, std::atomic<int>& failures, std::atomic<int>& exhausted,
           std::string& first_failure) {
  std::mt19937 rng(static_cast<std::uint32_t>(thread) * 101 + 7);
  std::vector<owned> mine;
  std::uint32_t serial = 0;
  auto fail = [&](const std::string& why) {
    if (failures.fetch_add(1) == 0) first_failure = "thread " + std::to_string(thread) + ": " + why;
  };
  auto close_one = [&] {
    const std::size_t i = rng() % mine.size();
    if (kv::status st = c.close(mine[i].id); !st) fail("close: " + st.message());
    mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(i));
  };
  for (int r = 0; r < rounds; ++r) {
    const std::uint32_t op = rng() % 8;
    if (mine.empty() || op == 0) {
      auto s = c.open(16);
      if (!s) fail("open: " + s.error().message());
      else mine.push_back({*s, (static_cast<std::uint32_t>(thread) << 16) | serial++});
      continue;
    }
    owned& s = mine[rng() % mine.size()];
    if (op == 1 && mine.size() < 4) {  // fork: same tokens, so the child keeps the parent's stamps
      auto f = c.fork(s.id);
      if (!f) {
        fail("fork: " + f.error().message());
        continue;
      }
      owned child = s;
      child.id = *f;
      mine.push_back(child);
    } else if (op == 2 && mine.size() > 1) {
      close_one();
    } else if (op == 3) {
      if (kv::status st = c.evict(s.id); !st) fail("evict: " + st.message());
    } else if (op == 4) {
      const kv::seq_id ids[] = {s.id};
      if (kv::status st = c.map_ahead(ids, 4); !st) fail("map_ahead: " + st.message());
    } else {
      const std::uint32_t layer = rng() % kLayers;
      if (s.next[layer] >= 40) {  // room left: max_tokens 64 with sink_window's budget of 32
        close_one();
        continue;
      }
      kv::status st = append_stamped(c, s, layer, op == 5 ? 8 : 1);
      if (st.code() == kv::errc::out_of_pages) {
        exhausted.fetch_add(1);
        close_one();  // free pages for the others, as an engine would preempt
      } else if (!st) {
        fail("append: " + st.message());
      }
    }
    std::string why;
    for (const auto& o : mine)
      if (!holds_own_tokens(c, o, why)) {
        fail(why);
        break;
      }
  }
  for (const auto& o : mine)
    if (kv::status st = c.close(o.id); !st) fail("close: " + st.message());
}

template <class C>
void run_threads(C& c, int rounds) {
  std::atomic<int> failures{0}, exhausted{0};
  std::vector<std::string> first(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] { churn(c, t, rounds, failures, exhausted, first[static_cast<std::size_t>(t)]); });
  for (auto& t : threads) t.join();
  std::string all;
  for (const auto& f : first) all += f.empty() ? "" : f + "\n";
  INFO(all);
  CHECK(failures.load() == 0);
  CHECK(exhausted.load() > 0);  // the pool is small on purpose: exhaustion raced too
  const kv::status inv = kv::check_invariants(c);
  INFO(inv.message());
  REQUIRE(inv.ok());
  CHECK(c.sequences() == 0);
  CHECK(c.stats().memory.ranges_active == 0);
}

kv::host_vmm small_pool() { return kv::host_vmm(kv::host_vmm_config{kv::os_page_size(), 40, true}); }

}  // namespace

// keep_all + passthrough are empty classes: appends of different sequences run in parallel with
// only the pool's mutex between them; sink_window (a sink count) has its calls serialized.
TEMPLATE_TEST_CASE("concurrency: threads open, grow, fork, evict and close sequences of one cache",
                   "[reliability][concurrency]", kv::keep_all, kv::sink_window) {
  using C = kv::cache<kv::host_vmm, TestType>;
  STATIC_REQUIRE(C::serializes_calls == !std::is_empty_v<TestType>);
  C c({geo(), 64, 32}, small_pool(), TestType{});
  run_threads(c, 300);
}

TEST_CASE("concurrency: a stateful quantizer and policy are serialized by the cache",
          "[reliability][concurrency]") {
  // H2O's scratch and fp8's calibrated scales are shared by all sequences
  using C = kv::cache<kv::host_vmm, kv::heavy_hitter<>, kv::fp8_e4m3>;
  STATIC_REQUIRE(C::serializes_calls);
  C c({geo(), 64, 32}, small_pool(), kv::heavy_hitter<>(kv::heavy_hitter_config{0.1f, 0.1f, 4, 4}));
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<std::uint32_t>(t));
      for (int r = 0; r < 40; ++r) {
        auto s = c.open_sequence();
        if (!s) continue;
        for (int step = 0; step < 12; ++step) {
          const std::uint32_t layer = rng() % kLayers;
          reltest::kv_rows rows(geo(), 2, rng);
          const kv::status st = s->append(layer, rows.kt(geo()), rows.vt(geo()));
          if (!st) {
            failures += st.code() != kv::errc::out_of_pages;
            break;
          }
          const auto v = s->view(layer).value();
          const auto p = reltest::attention(v, kQHeads, 1, rng);
          failures += !s->observe(layer, kv::attention_signal{p.data(), kQHeads, 1, v.rows}).ok();
          failures += !s->evict(layer).ok();
        }
        if (r % 3 == 0)
          if (auto f = s->fork()) {  // copy-on-write of the first write, racing with the others
            reltest::kv_rows one(geo(), 1, rng);
            const kv::status st = f->append(0, one.kt(geo()), one.vt(geo()));
            failures += !st && st.code() != kv::errc::out_of_pages;
          }
      }  // handles close as they go out of scope, concurrently
    });
  for (auto& t : threads) t.join();
  CHECK(failures.load() == 0);
  REQUIRE(kv::check_invariants(c).ok());
  CHECK(c.sequences() == 0);
}

TEST_CASE("concurrency: the page pool shared by threads calling the backend directly",
          "[reliability][concurrency]") {
  kv::host_vmm m(kv::host_vmm_config{kv::os_page_size(), 64, true});
  const std::size_t ps = kv::os_page_size();
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<std::uint32_t>(t) + 50);
      std::vector<kv::range_id> mine;
      for (int r = 0; r < 300; ++r) {
        const std::uint32_t op = rng() % 5;
        if (mine.empty() || op == 0) {
          auto a = m.acquire(8 * ps, (rng() % 8) * ps);
          if (a) mine.push_back(*a);
        } else if (op == 1 && mine.size() < 6) {
          auto f = m.fork(mine[rng() % mine.size()], (rng() % 8) * ps);
          if (f) mine.push_back(*f);
        } else if (op == 2) {
          const std::size_t i = rng() % mine.size();
          m.release(mine[i]);
          mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(i));
        } else {
          const kv::range_id id = mine[rng() % mine.size()];
          const std::size_t b = (rng() % 8) * ps, e = std::min(b + (1 + rng() % 3) * ps, 8 * ps);
          const kv::write_request q{id, b, e};
          const kv::status st = m.prepare({&q, 1});
          if (st) std::memset(m.data(id) + b, t, e - b);  // our pages are private after prepare
          else failures += st.code() != kv::errc::out_of_pages;
          if (op == 4) failures += !m.map_ahead({&q, 1}).ok();
        }
      }
      for (auto id : mine) m.release(id);
    });
  for (auto& t : threads) t.join();
  CHECK(failures.load() == 0);
  const kv::status st = m.check();
  INFO(st.message());
  REQUIRE(st.ok());
  CHECK(m.stats().ranges_active == 0);
}
