// SPDX-License-Identifier: Apache-2.0
//! @file
//! Page map / unmap latency of `host_vmm`, by page size (64 KiB ... 2 MiB), per page (time) and
//! per byte (bytes/s). Only the operation itself is timed (manual timing around it); set-up and
//! tear-down of each iteration are not.
//!
//!   vmm_map_touch       prepare() maps one page of a recycled pool page into a range, then one
//!                       write per OS page (first touch). The serving steady state without
//!                       deferred reclamation: pool pages were used before, so no zeroing.
//!   vmm_cold_map_touch  the same on a fresh pool (the kernel allocates and zeroes the page).
//!   vmm_unmap           release() with deferred reclamation off: the page is unmapped and goes
//!                       back to the pool.
//!   anon_mmap_touch     baseline: mmap(MAP_ANONYMOUS) of the same size + the same touches.
//!   anon_munmap         baseline: munmap of that touched region.
//!
//! And the steady state: prepare() of one page that is already mapped and private (what every
//! append costs once pages are in place), against heap_memory::prepare() of a block that is
//! already large enough.
#include "ratio_reporter.hpp"

#include <kvcache/memory/heap.hpp>
#include <kvcache/memory/host_vmm.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <sys/mman.h>

namespace kv = kvcache;
using kvcache_bench::ratio_pair;

namespace {

using clk = std::chrono::steady_clock;

void check(const kv::status& st, const char* what) {
  if (st) return;
  std::fprintf(stderr, "bench_map: %s: %s\n", what, st.message().c_str());
  std::abort();
}
template <class T>
T value(kv::result<T> r, const char* what) {
  if (!r) check(r.error(), what);
  return r.value();
}

//! One write per OS page: the first touch that faults a page in (or finds it mapped).
void touch(std::byte* p, std::size_t bytes) {
  const std::size_t os = kv::os_page_size();
  for (std::size_t i = 0; i < bytes; i += os) *reinterpret_cast<volatile char*>(p + i) = 1;
}

double seconds(clk::time_point a, clk::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

//! A host_vmm whose single range is one page, and whose pool pages have all been used once.
struct one_page_vmm {
  kv::host_vmm m;
  kv::range_id r;
  kv::write_request req;
  explicit one_page_vmm(std::size_t ps) : m(kv::host_vmm_config{ps, 2, false}) {
    r = value(m.acquire(ps), "acquire");
    req = {r, 0, ps};
    for (int i = 0; i < 2; ++i) {  // use both pool pages once (shmem allocates them)
      check(m.prepare({&req, 1}), "prepare");
      touch(m.data(r), ps);
      m.release(r);
      r = value(m.acquire(ps), "acquire");
    }
  }
};

void vmm_map_touch(benchmark::State& state, std::size_t ps) {
  one_page_vmm w(ps);
  for (auto _ : state) {
    const auto t0 = clk::now();
    check(w.m.prepare({&w.req, 1}), "prepare");
    touch(w.m.data(w.r), ps);
    const auto t1 = clk::now();
    state.SetIterationTime(seconds(t0, t1));
    w.m.release(w.r);  // unmaps (deferred reclamation off)
    w.r = value(w.m.acquire(ps), "acquire");  // the same range again, nothing mapped
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ps));
}

void vmm_cold_map_touch(benchmark::State& state, std::size_t ps) {
  for (auto _ : state) {
    kv::host_vmm m(kv::host_vmm_config{ps, 1, false});  // fresh pool: its page was never used
    const kv::range_id r = value(m.acquire(ps), "acquire");
    const kv::write_request req{r, 0, ps};
    const auto t0 = clk::now();
    check(m.prepare({&req, 1}), "prepare");
    touch(m.data(r), ps);
    const auto t1 = clk::now();
    state.SetIterationTime(seconds(t0, t1));
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ps));
}

void vmm_unmap(benchmark::State& state, std::size_t ps) {
  one_page_vmm w(ps);
  for (auto _ : state) {
    check(w.m.prepare({&w.req, 1}), "prepare");
    touch(w.m.data(w.r), ps);
    const auto t0 = clk::now();
    w.m.release(w.r);
    const auto t1 = clk::now();
    state.SetIterationTime(seconds(t0, t1));
    w.r = value(w.m.acquire(ps), "acquire");
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ps));
}

std::byte* anon_map(std::size_t bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::abort();
  return static_cast<std::byte*>(p);
}

void anon_mmap_touch(benchmark::State& state, std::size_t ps) {
  for (auto _ : state) {
    const auto t0 = clk::now();
    std::byte* p = anon_map(ps);
    touch(p, ps);
    const auto t1 = clk::now();
    state.SetIterationTime(seconds(t0, t1));
    ::munmap(p, ps);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ps));
}

void anon_munmap(benchmark::State& state, std::size_t ps) {
  for (auto _ : state) {
    std::byte* p = anon_map(ps);
    touch(p, ps);
    const auto t0 = clk::now();
    ::munmap(p, ps);
    const auto t1 = clk::now();
    state.SetIterationTime(seconds(t0, t1));
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ps));
}

// ---- steady state: prepare() with nothing to do ------------------------------------------------

void vmm_prepare_mapped(benchmark::State& state) {
  const std::size_t ps = 64 * 1024;
  kv::host_vmm m(kv::host_vmm_config{ps, 4, true});
  const kv::range_id r = value(m.acquire(4 * ps), "acquire");
  kv::write_request req{r, 0, 4 * ps};
  check(m.prepare({&req, 1}), "prepare");
  std::size_t i = 0;
  for (auto _ : state) {
    req = {r, i * ps, (i + 1) * ps};  // one whole mapped page
    benchmark::DoNotOptimize(m.prepare({&req, 1}));
    i = (i + 1) & 3;
  }
}

void heap_prepare_held(benchmark::State& state) {
  const std::size_t ps = 64 * 1024;
  kv::heap_memory m;
  const kv::range_id r = value(m.acquire(4 * ps), "acquire");
  kv::write_request req{r, 0, 4 * ps};
  check(m.prepare({&req, 1}), "prepare");
  std::size_t i = 0;
  for (auto _ : state) {
    req = {r, i * ps, (i + 1) * ps};
    benchmark::DoNotOptimize(m.prepare({&req, 1}));
    i = (i + 1) & 3;
  }
}

std::string size_name(std::size_t ps) {
  return ps >= 1024 * 1024 ? std::to_string(ps >> 20) + "M" : std::to_string(ps >> 10) + "K";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<ratio_pair> pairs;
  using fn = void (*)(benchmark::State&, std::size_t);
  const std::pair<const char*, fn> cases[] = {
      {"vmm_map_touch", vmm_map_touch},     {"vmm_cold_map_touch", vmm_cold_map_touch},
      {"anon_mmap_touch", anon_mmap_touch}, {"vmm_unmap", vmm_unmap},
      {"anon_munmap", anon_munmap},
  };
  for (std::size_t ps : {64u << 10, 128u << 10, 256u << 10, 512u << 10, 1u << 20, 2u << 20}) {
    const std::string prefix = "map/" + size_name(ps) + "/";
    for (const auto& [name, f] : cases)
      benchmark::RegisterBenchmark((prefix + name).c_str(), f, ps)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    pairs.push_back({prefix + "vmm_map_touch", prefix + "anon_mmap_touch"});
    pairs.push_back({prefix + "vmm_cold_map_touch", prefix + "anon_mmap_touch"});
    pairs.push_back({prefix + "vmm_unmap", prefix + "anon_munmap"});
  }
  benchmark::RegisterBenchmark("prepare_steady/vmm_64K_mapped_page", vmm_prepare_mapped);
  benchmark::RegisterBenchmark("prepare_steady/heap_held_block", heap_prepare_held);
  pairs.push_back({"prepare_steady/vmm_64K_mapped_page", "prepare_steady/heap_held_block"});
  return kvcache_bench::run_with_ratios(argc, argv, std::move(pairs));
}
