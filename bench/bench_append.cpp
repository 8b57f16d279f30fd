// SPDX-License-Identifier: Apache-2.0
//! @file
//! Append throughput with request churn.
//!
//! C = 4 sequences are alive at once, staggered in length. Each step appends `chunk` tokens
//! (1: decode, 512: prefill chunks) to every layer of every sequence; a sequence that reached the
//! target length is closed and a new one opened in its place. The world (cache + sequences)
//! persists across Google Benchmark's calls of one benchmark, and is primed (C sequences grown to
//! the target and closed) before the staggered start, so what is timed is the steady state.
//!
//! Each step of a measured world is followed by one step of the group's memcpy world, timed
//! apart: the counter x_memcpy is the world's throughput relative to memcpy over the same
//! instants (robust on a shared machine), and the ratio table's "paired" column divides those.
//!
//! Compared in the same run, on the same bytes (K+V appended):
//!   memcpy      raw memcpy into preallocated, prefaulted buffers (the bandwidth ceiling)
//!   heap        cache<heap_memory>, realloc growth x2 (the baseline), with glibc's malloc
//!               thresholds pinned at their initial values (mmap threshold 128 KiB): K/V blocks
//!               are mmapped, grown by mremap and unmapped on free, so fresh pages fault in
//!   heap_brk    the same with the thresholds pinned where glibc's dynamic rule takes them in a
//!               long-running process (mmap 32 MiB, trim 64 MiB): blocks below 32 MiB come from
//!               the brk heap and are recycled (fewer faults, but realloc copies)
//!   vmm_64K/2M  cache<host_vmm>, 64 KiB / 2 MiB pages, pool sized for the working set,
//!               deferred reclamation on (the steady state maps nothing)
//!   vmm_*_nodefer  the same with deferred reclamation off (released ranges are unmapped)
#include "ratio_reporter.hpp"

#include <kvcache/cache.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/memory/host_vmm.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/resource.h>

namespace kv = kvcache;
using kvcache_bench::ratio_pair;

namespace {

constexpr std::uint32_t kLayers = 4, kKvHeads = 8, kQueryHeads = 32, kHeadDim = 128;
constexpr std::size_t kTokenBytes = std::size_t{kKvHeads} * kHeadDim * 2;  // fp16: 2 KiB
constexpr std::uint32_t kConcurrent = 4;
constexpr std::uint32_t kMaxTokens = 32768;  // reserved per range (the max context)

kv::geometry geo() { return {kLayers, kKvHeads, kQueryHeads, kHeadDim, kv::dtype::f16}; }

[[noreturn]] void die(const kv::status& st, const char* what) {
  std::fprintf(stderr, "bench_append: %s: %s: %s\n", what, kv::to_string(st.code()),
               st.message().c_str());
  std::abort();
}

struct world {
  virtual ~world() = default;
  virtual void step() = 0;
  virtual std::size_t map_calls() const { return 0; }
  std::size_t bytes_per_step = 0;
};

//! Fills K/V sources of `chunk` tokens with a non-trivial pattern.
struct sources {
  std::vector<std::uint16_t> k, v;
  explicit sources(std::uint32_t chunk) : k(std::size_t{chunk} * kKvHeads * kHeadDim),
                                          v(k.size()) {
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = static_cast<std::uint16_t>(0x3c00 + (i & 0x3ff));
      v[i] = static_cast<std::uint16_t>(0xbc00 + (i & 0x3ff));
    }
  }
};

template <class Memory>
struct cache_world final : world {
  static constexpr std::uint32_t kPrimeChunk = 512;
  kv::cache<Memory> c;
  sources src;
  std::uint32_t target, chunk;
  std::vector<kv::seq_id> seqs;
  std::vector<std::uint32_t> len;

  //! `prime`: C sequences are first grown to the target and closed, so that every sequence
  //! opened from then on finds released memory - the serving steady state. Deferred
  //! reclamation: ranges still mapped; heap: blocks recycled by glibc, or pages recently freed
  //! to the kernel (on a VM, memory not touched for a while can be far slower to fault in).
  //! Skipped without deferred reclamation, where it changes nothing but the set-up time.
  cache_world(Memory mem, std::uint32_t target_, std::uint32_t chunk_, bool prime)
      : c(kv::cache_config{geo(), kMaxTokens, 0, kv::layout::token_major}, std::move(mem)),
        src(kPrimeChunk), target(target_), chunk(chunk_) {
    bytes_per_step = std::size_t{kConcurrent} * kLayers * 2 * chunk * kTokenBytes;
    seqs.resize(kConcurrent);
    len.assign(kConcurrent, 0);
    for (std::uint32_t i = 0; prime && i < kConcurrent; ++i) {
      seqs[i] = open();
      grow(i, target);
    }
    for (std::uint32_t i = 0; prime && i < kConcurrent; ++i)
      if (auto st = c.close(seqs[i]); !st) die(st, "close");
    // Staggered start: slot i is i/C of the way to the target.
    const std::uint32_t steps = target / chunk;
    for (std::uint32_t i = 0; i < kConcurrent; ++i) {
      seqs[i] = open();
      len[i] = 0;
      grow(i, steps * i / kConcurrent * chunk);
    }
  }
  kv::seq_id open() {
    auto s = c.open();
    if (!s) die(s.error(), "open");
    return s.value();
  }
  //! Appends n tokens to every layer of slot i, in appends of at most `per` tokens.
  void grow(std::uint32_t i, std::uint32_t n, std::uint32_t per = kPrimeChunk) {
    for (std::uint32_t done = 0; done < n;) {
      const std::uint32_t t = std::min(per, n - done);
      const kv::kv_tensor kt{src.k.data(), kv::dtype::f16, t, kKvHeads, kHeadDim};
      const kv::kv_tensor vt{src.v.data(), kv::dtype::f16, t, kKvHeads, kHeadDim};
      for (std::uint32_t l = 0; l < kLayers; ++l)
        if (auto st = c.append(seqs[i], l, kt, vt); !st) die(st, "append");
      done += t;
    }
    len[i] += n;
  }
  void step() override {
    for (std::uint32_t i = 0; i < kConcurrent; ++i) {
      if (len[i] >= target) {
        if (auto st = c.close(seqs[i]); !st) die(st, "close");
        seqs[i] = open();
        len[i] = 0;
      }
      grow(i, chunk, chunk);
    }
  }
  std::size_t map_calls() const override { return c.memory().stats().map_calls; }
};

//! Backs [p, p + bytes) with memory now (one call instead of a fault per page).
void prefault(std::byte* p, std::size_t bytes) {
  if (::madvise(p, bytes, MADV_POPULATE_WRITE) != 0) std::memset(p, 1, bytes);
}

//! glibc malloc thresholds, pinned (pinning also turns glibc's dynamic adjustment off, so a
//! heap benchmark does not depend on what ran before it in the process).
void pin_malloc(std::size_t mmap_threshold, std::size_t trim_threshold) {
  ::mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_threshold));
  ::mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim_threshold));
}
constexpr std::size_t kMiB = 1024 * 1024;
void pin_malloc_default() { pin_malloc(32 * kMiB, 64 * kMiB); }  // heap_brk, and everyone else

//! The ceiling: the same copies into buffers allocated and prefaulted once.
struct memcpy_world final : world {
  sources src;
  std::uint32_t target, chunk;
  std::size_t buf_bytes;
  std::byte* base = nullptr;
  std::vector<std::uint32_t> len;

  memcpy_world(std::uint32_t target_, std::uint32_t chunk_)
      : src(chunk_), target(target_), chunk(chunk_) {
    buf_bytes = std::size_t{target} * kTokenBytes;
    const std::size_t total = buf_bytes * kConcurrent * kLayers * 2;
    void* p = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base = static_cast<std::byte*>(p);
    prefault(base, total);
    bytes_per_step = std::size_t{kConcurrent} * kLayers * 2 * chunk * kTokenBytes;
    const std::uint32_t steps = target / chunk;
    for (std::uint32_t i = 0; i < kConcurrent; ++i) len.push_back(steps * i / kConcurrent * chunk);
  }
  ~memcpy_world() override { ::munmap(base, buf_bytes * kConcurrent * kLayers * 2); }
  void step() override {
    const std::size_t n = std::size_t{chunk} * kTokenBytes;
    for (std::uint32_t i = 0; i < kConcurrent; ++i) {
      if (len[i] >= target) len[i] = 0;
      for (std::uint32_t l = 0; l < kLayers; ++l) {
        std::byte* k = base + ((std::size_t{i} * kLayers + l) * 2) * buf_bytes;
        std::byte* v = k + buf_bytes;
        std::memcpy(k + std::size_t{len[i]} * kTokenBytes, src.k.data(), n);
        std::memcpy(v + std::size_t{len[i]} * kTokenBytes, src.v.data(), n);
      }
      benchmark::ClobberMemory();
      len[i] += chunk;
    }
  }
};

//! cache<heap_memory> with glibc's initial malloc thresholds (restored on destruction).
struct heap_mmap_world final : world {
  std::unique_ptr<world> inner;
  heap_mmap_world(std::uint32_t target, std::uint32_t chunk) {
    pin_malloc(128 * 1024, 128 * 1024);
    // Give back the top of the heap that earlier worlds left (up to the 64 MiB trim threshold):
    // glibc only mmaps a block when no free heap memory can hold it.
    ::malloc_trim(0);
    inner = std::make_unique<cache_world<kv::heap_memory>>(
        kv::heap_memory(kv::heap_memory_config{0, 2.0}), target, chunk, true);
    bytes_per_step = inner->bytes_per_step;
  }
  ~heap_mmap_world() override {
    inner.reset();
    pin_malloc_default();
  }
  void step() override { inner->step(); }
};

enum class backend { memcpy, heap, heap_brk, vmm };
struct variant {
  std::string name;
  backend kind;
  std::size_t page = 0;
  bool deferred = true;
};

std::unique_ptr<world> make_world(const variant& v, std::uint32_t target, std::uint32_t chunk) {
  switch (v.kind) {
    case backend::memcpy: return std::make_unique<memcpy_world>(target, chunk);
    case backend::heap: return std::make_unique<heap_mmap_world>(target, chunk);
    case backend::heap_brk:
      return std::make_unique<cache_world<kv::heap_memory>>(
          kv::heap_memory(kv::heap_memory_config{0, 2.0}), target, chunk, true);
    case backend::vmm: {
      // Working set: C live sequences at the target length, plus one released set in flight.
      const std::size_t pages_per_range = (std::size_t{target} * kTokenBytes + v.page - 1) / v.page;
      const std::size_t pool = (kConcurrent + 1) * kLayers * 2 * pages_per_range;
      kv::host_vmm m(kv::host_vmm_config{v.page, pool, v.deferred});
      // The physical pool is created ahead of time (as vAttention pre-creates its handles):
      // allocate the memfd's pages now (fallocate is ~4x faster than faulting them in here).
      if (::fallocate(m.pool().fd(), 0, 0, static_cast<off_t>(pool * v.page)) != 0)
        prefault(m.pool().address(0), pool * v.page);
      return std::make_unique<cache_world<kv::host_vmm>>(std::move(m), target, chunk, v.deferred);
    }
  }
  return nullptr;
}

// The worlds persist across the calls Google Benchmark makes for one benchmark (iteration
// estimation, repetitions), so set-up and priming are paid once. One memcpy world per group
// (mode, target) serves as the group's "memcpy" benchmark and as the paired baseline of the
// others; at most one other world is alive beside it.
std::unique_ptr<world> g_world, g_base;
std::string g_key, g_group;

long minor_faults() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

using clk = std::chrono::steady_clock;

void run(benchmark::State& state, const std::string& group, const std::string& key,
         const variant& v, std::uint32_t target, std::uint32_t chunk) {
  if (g_group != group) {
    g_world.reset();
    g_key.clear();
    g_base.reset();
    g_base = std::make_unique<memcpy_world>(target, chunk);
    g_group = group;
  }
  const bool paired = v.kind != backend::memcpy;
  if (paired && g_key != key) {
    g_world.reset();
    g_world = make_world(v, target, chunk);
    g_key = key;
  }
  world& w = paired ? *g_world : *g_base;
  world& base = *g_base;
  const std::size_t maps0 = w.map_calls();
  const long faults0 = minor_faults();
  // Each step of the measured world is followed by a step of the memcpy world (paired, not
  // timed as the benchmark's time): both see the same machine state, so their ratio is immune
  // to the drift of a shared machine that separate runs suffer from.
  double own = 0, ref = 0;
  for (auto _ : state) {
    const auto t0 = clk::now();
    w.step();
    const auto t1 = clk::now();
    if (paired) {
      base.step();
      ref += std::chrono::duration<double>(clk::now() - t1).count();
    }
    const double dt = std::chrono::duration<double>(t1 - t0).count();
    own += dt;
    state.SetIterationTime(dt);
  }
  const auto steps = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * w.bytes_per_step));
  // Throughput relative to memcpy, measured step by step alongside it.
  state.counters["x_memcpy"] = paired ? ref / own : 1.0;
  // Page faults per step (first touch of fresh memory; MAP_POPULATE prefaults count too).
  state.counters["faults/step"] = static_cast<double>(minor_faults() - faults0) / steps;
  if (v.kind == backend::vmm)
    state.counters["maps/step"] = static_cast<double>(w.map_calls() - maps0) / steps;
}

std::string tokens_name(std::uint32_t t) { return std::to_string(t / 1024) + "k"; }

}  // namespace

int main(int argc, char** argv) {
  const std::vector<variant> variants = {
      {"memcpy", backend::memcpy},
      {"heap", backend::heap},
      {"heap_brk", backend::heap_brk},
      {"vmm_64K", backend::vmm, 64 * 1024, true},
      {"vmm_2M", backend::vmm, 2 * 1024 * 1024, true},
      {"vmm_64K_nodefer", backend::vmm, 64 * 1024, false},
      {"vmm_2M_nodefer", backend::vmm, 2 * 1024 * 1024, false},
  };
  std::vector<ratio_pair> pairs;
  // The heap (mmap) benchmarks of every group run first: glibc mmaps a block only when no free
  // heap memory can hold it, and the other worlds (heap_brk above all) leave free heap memory
  // behind. This costs one more set-up of each group's memcpy world.
  for (const bool heap_pass : {true, false})
    for (const auto& mode : {std::pair<std::string, std::uint32_t>{"decode", 1u},
                             {"prefill512", 512u}})
      for (std::uint32_t target : {1024u, 4096u, 16384u, 32768u}) {
        const std::uint32_t chunk = mode.second;  // a plain local: lambdas capture it (clang 14)
        const std::string prefix = "append/" + mode.first + "/" + tokens_name(target) + "/";
        for (const auto& v : variants) {
          if ((v.kind == backend::heap) != heap_pass) continue;
          const std::string name = prefix + v.name;
          benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) {
            run(s, prefix, name, v, target, chunk);
          })->UseManualTime()->Unit(benchmark::kMicrosecond);
        }
        if (heap_pass) continue;
        for (const char* vm : {"vmm_64K", "vmm_2M"}) {
          pairs.push_back({prefix + vm, prefix + "heap"});
          pairs.push_back({prefix + vm, prefix + "heap_brk"});
          pairs.push_back({prefix + vm, prefix + "memcpy"});
          pairs.push_back({prefix + vm, prefix + vm + "_nodefer"});
        }
        pairs.push_back({prefix + "heap", prefix + "memcpy"});
        pairs.push_back({prefix + "heap_brk", prefix + "memcpy"});
      }
  pin_malloc_default();
  const int rc = kvcache_bench::run_with_ratios(argc, argv, std::move(pairs), "x_memcpy");
  g_world.reset();
  g_base.reset();
  return rc;
}
