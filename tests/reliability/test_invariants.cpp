// SPDX-License-Identifier: Apache-2.0
// The invariant checker: it passes after long random operation sequences over every policy and
// quantizer (and every failed call leaves state_digest unchanged), and it catches each kind of
// corruption we plant through the test peer.
#include "catch.hpp"
#include "reliability/support.hpp"

#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

namespace kv = kvcache;
using reltest::peer;
using reltest::kv_rows;

namespace {

constexpr std::uint32_t kLayers = 2, kHeads = 2, kQHeads = 4, kDim = 32;
kv::geometry geo() { return {kLayers, kHeads, kQHeads, kDim, kv::dtype::f16}; }
// 4 KiB pages and a small pool: forks share pages, appends copy them, and the pool runs out
kv::host_vmm small_pool(std::size_t pages = 48) {
  return kv::host_vmm(kv::host_vmm_config{kv::os_page_size(), pages, true});
}

template <class P>
P make_policy() {
  if constexpr (std::is_same_v<P, kv::sink_window>) return kv::sink_window(2);
  else if constexpr (std::is_same_v<P, kv::heavy_hitter<>>) return kv::heavy_hitter<>(kv::heavy_hitter_config{0.1f, 0.1f, 4, 4});
  else if constexpr (std::is_same_v<P, kv::snapkv<kv::attention_signal>>)
    return kv::snapkv<kv::attention_signal>(kv::snapkv_config{4, 3, kv::pooling::max});
  else return P{};
}

//! Random calls, good and bad, on one cache; after each, the invariants hold, and a call that
//! failed left the digest where it was.
template <class C>
struct random_driver {
  C& c;
  std::mt19937 rng;
  std::vector<kv::seq_id> seqs;
  std::vector<kv::seq_id> closed;
  int failed = 0, succeeded = 0;

  std::uint32_t pick(std::uint32_t n) { return static_cast<std::uint32_t>(rng() % n); }

  kv::status one_op(std::string& what) {
    const auto g = c.geo();
    const std::uint32_t op = pick(14);
    if (seqs.empty() || op == 0) {
      what = "open";
      if (seqs.size() >= 5) return {};
      auto s = c.open(pick(3) * 8);
      if (s) seqs.push_back(*s);
      return s ? kv::status{} : s.error();
    }
    const std::uint32_t i = pick(static_cast<std::uint32_t>(seqs.size()));
    const kv::seq_id s = seqs[i];
    const std::uint32_t layer = pick(kLayers);
    switch (op) {
      case 1: case 2: case 3: case 4: {  // the common case
        what = "append";
        kv_rows r(g, 1 + pick(pick(4) == 0 ? 20 : 4), rng);
        return c.append(s, layer, r.kt(g), r.vt(g));
      }
      case 5: {
        what = "evict layer";
        return c.evict(s, layer, pick(c.budget(layer) + 3));  // reserve beyond the budget: refused
      }
      case 6: what = "evict"; return c.evict(s);
      case 7: {
        what = "observe";
        if constexpr (C::template consumes<kv::attention_signal>) {
          const auto v = c.view(s, layer).value();
          const std::uint32_t q = 1 + pick(3);
          auto p = reltest::attention(v, g.query_heads, q, rng);
          if (pick(8) == 0 && !p.empty()) p[pick(static_cast<std::uint32_t>(p.size()))] = -1.0f;  // refused
          return c.observe(s, layer, kv::attention_signal{p.data(), g.query_heads, q, v.rows + (pick(10) == 0)});
        } else {
          return {};
        }
      }
      case 8: {
        what = "close";
        kv::status st = c.close(s);
        seqs.erase(seqs.begin() + i);
        closed.push_back(s);
        return st;
      }
      case 9: {
        what = "fork";
        if (seqs.size() >= 5) return {};
        auto f = c.fork(s);
        if (f) seqs.push_back(*f);
        return f ? kv::status{} : f.error();
      }
      case 10: {  // hostile shapes
        what = "bad append";
        kv_rows r(g, 2, rng);
        kv::kv_tensor k = r.kt(g), v = r.vt(g);
        switch (pick(4)) {
          case 0: k.heads += 1; break;
          case 1: v.data = nullptr; break;
          case 2: k.type = kv::dtype::f32; break;
          default: v.tokens = 1; break;
        }
        return c.append(s, layer, k, v);
      }
      case 11: {
        what = "set_budget";
        return c.set_budget(layer, pick(c.config().max_tokens + 2));  // 0 and max+1: refused
      }
      case 12: {
        what = "stale id";
        if (closed.empty()) return {};
        kv_rows r(g, 1, rng);
        return c.append(closed[pick(static_cast<std::uint32_t>(closed.size()))], layer, r.kt(g), r.vt(g));
      }
      default: {
        what = "map_ahead";
        return c.map_ahead(seqs, 1 + pick(8), pick(4));
      }
    }
  }

  void run(int steps) {
    for (int n = 0; n < steps; ++n) {
      const std::uint64_t before = kv::state_digest(c);
      std::string what;
      const kv::status st = one_op(what);
      INFO("step " << n << ": " << what << " -> " << kv::to_string(st.code()) << " " << st.message());
      if (!st) {
        ++failed;
        REQUIRE(kv::state_digest(c) == before);
      } else {
        ++succeeded;
      }
      const kv::status inv = kv::check_invariants(c);
      INFO(inv.message());
      REQUIRE(inv.ok());
    }
  }
};

template <class P, class Q, class M = kv::host_vmm, kv::layout Order = kv::layout::token_major,
          kv::range_scope Scope = kv::range_scope::per_layer>
struct combo {
  using policy = P;
  using quant = Q;
  using memory = M;
  static constexpr kv::layout order = Order;
  static constexpr kv::range_scope scope = Scope;
};

template <class M>
M make_memory() {
  if constexpr (std::is_same_v<M, kv::heap_memory>) return kv::heap_memory(kv::heap_memory_config{64 * 1024, 2.0});
  else return small_pool();
}

}  // namespace

// Every policy with passthrough, every quantizer with a policy that evicts (slot reuse), and the
// heap backend, head_major layout and per-sequence ranges once each.
TEMPLATE_TEST_CASE("invariants hold after long random operation sequences, and failed calls change nothing",
                   "[reliability][invariants]",
                   (combo<kv::keep_all, kv::passthrough>), (combo<kv::sink_window, kv::passthrough>),
                   (combo<kv::heavy_hitter<>, kv::passthrough>),
                   (combo<kv::snapkv<kv::attention_signal>, kv::passthrough>),
                   (combo<kv::heavy_hitter<>, kv::fp8_e4m3>), (combo<kv::sink_window, kv::q8_0>),
                   (combo<kv::heavy_hitter<>, kv::q4_0>), (combo<kv::sink_window, kv::kivi_per_token<4>>),
                   (combo<kv::heavy_hitter<>, kv::kivi<2, 32, 32>>),
                   (combo<kv::heavy_hitter<>, kv::passthrough, kv::heap_memory>),
                   (combo<kv::sink_window, kv::kivi_per_token<2>, kv::host_vmm, kv::layout::head_major>),
                   (combo<kv::sink_window, kv::q8_0, kv::host_vmm, kv::layout::token_major,
                          kv::range_scope::per_sequence>)) {
  using C = kv::cache<typename TestType::memory, typename TestType::policy, typename TestType::quant>;
  C c(kv::cache_config{geo(), 48, 24, TestType::order, TestType::scope}, make_memory<typename TestType::memory>(),
      make_policy<typename TestType::policy>());
  random_driver<C> d{c, std::mt19937(7), {}, {}};
  d.run(400);
  // the walk went both ways: some calls failed (and changed nothing), most succeeded
  CHECK(d.failed > 20);
  CHECK(d.succeeded > 200);
  for (auto s : d.seqs) REQUIRE(c.close(s).ok());
  REQUIRE(kv::check_invariants(c).ok());
  CHECK(c.stats().memory.ranges_active == 0);
}

TEST_CASE("state_digest: equal for equal histories, moves with any observable change",
          "[reliability][invariants]") {
  using C = kv::cache<kv::host_vmm, kv::heavy_hitter<>>;
  C a({geo(), 32, 16}, small_pool(), make_policy<kv::heavy_hitter<>>());
  C b({geo(), 32, 16}, small_pool(), make_policy<kv::heavy_hitter<>>());
  std::mt19937 ra(3), rb(3);
  const auto sa = a.open().value(), sb = b.open().value();
  for (int i = 0; i < 3; ++i) {
    kv_rows x(geo(), 4, ra), y(geo(), 4, rb);
    REQUIRE(a.append(sa, 0, x.kt(geo()), x.vt(geo())).ok());
    REQUIRE(b.append(sb, 0, y.kt(geo()), y.vt(geo())).ok());
  }
  CHECK(kv::state_digest(a) == kv::state_digest(b));

  const std::uint64_t d0 = kv::state_digest(a);
  SECTION("a byte of a live entry") {
    const auto v = a.view(sa, 0).value();
    const_cast<std::byte*>(v.k_row(3, 1))[5] ^= std::byte{1};
    CHECK(kv::state_digest(a) != d0);
  }
  SECTION("a budget") {
    REQUIRE(a.set_budget(1, 7).ok());
    CHECK(kv::state_digest(a) != d0);
  }
  SECTION("a policy score") {
    std::mt19937 r(1);
    const auto v = a.view(sa, 0).value();
    const auto p = reltest::attention(v, kQHeads, 1, r);
    REQUIRE(a.observe(sa, 0, kv::attention_signal{p.data(), kQHeads, 1, v.rows}).ok());
    CHECK(kv::state_digest(a) != d0);
  }
  SECTION("an eviction") {
    REQUIRE(a.set_budget(0, 4).ok());
    const std::uint64_t d1 = kv::state_digest(a);
    REQUIRE(a.evict(sa, 0).ok());
    CHECK(kv::state_digest(a) != d1);
  }
  SECTION("a sequence opened, then closed") {
    const auto s2 = a.open().value();
    const std::uint64_t d1 = kv::state_digest(a);
    CHECK(d1 != d0);
    REQUIRE(a.close(s2).ok());
    CHECK(kv::state_digest(a) == d0);  // the reused idle ranges are not observable
  }
}

// ---- the checker catches what we break ------------------------------------------------------

namespace {

// A cache with two sequences holding tokens in both layers, one forked (shared pages).
template <class P, class Q = kv::passthrough>
struct planted {
  kv::cache<kv::host_vmm, P, Q> c;
  kv::seq_id s, f;
  planted() : c({geo(), 48, 24}, small_pool(64), make_policy<P>()) {
    std::mt19937 rng(11);
    s = c.open().value();
    for (std::uint32_t l = 0; l < kLayers; ++l) {
      kv_rows r(geo(), 40, rng);
      REQUIRE(c.append(s, l, r.kt(geo()), r.vt(geo())).ok());
    }
    REQUIRE(c.evict(s).ok());  // holes
    f = c.fork(s).value();
    REQUIRE(kv::check_invariants(c).ok());
  }
  kv::status broken() const { return kv::check_invariants(c); }
};

void expect_violation(const kv::status& st, const std::string& words) {
  INFO(st.message());
  CHECK(st.code() == kv::errc::invariant_violation);
  CHECK(st.message().find(words) != std::string::npos);
}

}  // namespace

TEST_CASE("check_invariants catches a corrupt slot table", "[reliability][invariants]") {
  planted<kv::heavy_hitter<>> p;
  auto& L = peer::layer(p.c, p.s, 1);
  SECTION("a position held twice") {
    std::uint32_t live = 0;
    while (L.table.position(live, 1) < 0) ++live;
    L.table.place(1, L.table.position(live, 1));
    expect_violation(p.broken(), "held by two slots");
    CHECK(p.broken().message().find("layer 1 head 1") != std::string::npos);
  }
  SECTION("a position never appended") {
    L.table.place(0, 1000);
    expect_violation(p.broken(), "outside the 40 appended");
  }
}

TEST_CASE("check_invariants catches page accounting errors (refcounts, double free, leaks)",
          "[reliability][invariants]") {
  planted<kv::keep_all> p;
  auto& L = peer::layer(p.c, p.f, 0);
  const kv::page_id page = p.c.memory().page_at(L.k, 0);
  REQUIRE(page != kv::no_page);
  REQUIRE(p.c.memory().refs(page) == 2);  // shared by the parent and the fork
  auto& refs = peer::refs(p.c.memory());
  SECTION("a reference too many") {
    refs.retain(page);
    expect_violation(p.broken(), "reference count 3 but 2 mappings");
  }
  SECTION("a page freed while mapped (double free)") {
    REQUIRE(!refs.release(page));
    REQUIRE(refs.release(page));  // now in the free list, yet mapped twice
    expect_violation(p.broken(), "pool page " + std::to_string(page));
  }
  SECTION("a range acquired behind the cache's back (leak)") {
    REQUIRE(p.c.memory().acquire(p.c.range_bytes()).ok());
    expect_violation(p.broken(), "leaked");
  }
  SECTION("a range released while a sequence uses it") {
    p.c.memory().release(L.v);
    expect_violation(p.broken(), "is not active");
  }
  SECTION("the sequence table frees a record twice") {
    REQUIRE(p.c.close(p.f).ok());
    auto& reg = peer::registry(p.c);
    reg.free.push_back(reg.free.back());
    expect_violation(p.broken(), "freed twice");
  }
}

TEST_CASE("check_invariants catches policy state out of step with the slot table",
          "[reliability][invariants]") {
  SECTION("H2O scores shorter than the rows") {
    planted<kv::heavy_hitter<>> p;
    peer::layer(p.c, p.s, 0).state.acc[1].resize(3);
    expect_violation(p.broken(), "sized 3 for");
  }
  SECTION("H2O score NaN on a live slot") {
    planted<kv::heavy_hitter<>> p;
    auto& L = peer::layer(p.c, p.s, 0);
    std::uint32_t live = 0;
    while (L.table.position(live, 0) < 0) ++live;
    L.state.acc[0][live] = std::numeric_limits<float>::quiet_NaN();
    expect_violation(p.broken(), "is NaN");
  }
  SECTION("sink_window queueing a slot twice") {
    planted<kv::sink_window> p;
    auto& q = peer::layer(p.c, p.f, 1).state.fifo[0];
    q.push_back(q.front());
    expect_violation(p.broken(), "twice");
  }
}

TEST_CASE("check_invariants catches non-finite quantization scales", "[reliability][invariants]") {
  SECTION("per-row scales (KIVI per token)") {
    planted<kv::sink_window, kv::kivi_per_token<4>> p;
    const auto v = p.c.view(p.s, 0).value();
    std::uint32_t slot = 0;
    while (v.positions[slot * kHeads] < 0) ++slot;
    std::memset(const_cast<std::byte*>(v.v_scale(slot, 0)), 0xff, v.scale_bytes);  // NaN
    expect_violation(p.broken(), "V decodes to a non-finite value");
  }
  SECTION("shared scales (fp8)") {
    planted<kv::sink_window, kv::fp8_e4m3> p;
    auto* sc = const_cast<float*>(kv::quant_shared_scales(p.c.quant(), 1, kv::kv_part::k));
    REQUIRE(sc);
    sc[0] = std::numeric_limits<float>::infinity();
    const auto st = p.broken();
    expect_violation(st, "layer 1");
  }
}

TEST_CASE("check_invariants catches heap backend accounting errors", "[reliability][invariants]") {
  kv::cache<kv::heap_memory> c({geo(), 16}, kv::heap_memory{});
  std::mt19937 rng(5);
  const auto s = c.open().value();
  kv_rows r(geo(), 5, rng);
  REQUIRE(c.append(s, 0, r.kt(geo()), r.vt(geo())).ok());
  REQUIRE(kv::check_invariants(c).ok());
  peer::held(c.memory()) += 64;
  expect_violation(kv::check_invariants(c), "bytes held");
}

// With KVCACHE_CHECK_INVARIANTS (on for this suite) a call that ends in a broken state aborts,
// printing what broke. Run in a child process, which we let abort.
TEST_CASE("KVCACHE_CHECK_INVARIANTS aborts the call that leaves a violation, saying what",
          "[reliability][invariants]") {
#if defined(KVCACHE_CHECK_INVARIANTS)
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(fds[1], 2);
    ::close(fds[0]);
    std::signal(SIGABRT, SIG_DFL);  // not Catch's handler: the parent judges how the child ended
    std::freopen("/dev/null", "w", stdout);
    {
      planted<kv::keep_all> p;
      auto& L = peer::layer(p.c, p.s, 0);
      std::uint32_t live = 0;
      while (L.table.position(live, 0) < 0) ++live;
      L.table.place(0, L.table.position(live, 0));  // a position twice
      std::mt19937 rng(1);
      kv_rows r(geo(), 1, rng);
      (void)p.c.append(p.s, 1, r.kt(geo()), r.vt(geo()));  // another layer: fine
      (void)p.c.append(p.s, 0, r.kt(geo()), r.vt(geo()));  // this one: abort
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string err;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) err.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int wstatus = 0;
  REQUIRE(::waitpid(pid, &wstatus, 0) == pid);
  INFO(err);
  CHECK(WIFSIGNALED(wstatus));
  CHECK(WTERMSIG(wstatus) == SIGABRT);
  CHECK(err.find("after append: invariant violated: sequence 0/0 layer 0 head 0: position") != std::string::npos);
#else
  SUCCEED("KVCACHE_CHECK_INVARIANTS is off in this build");
#endif
}
