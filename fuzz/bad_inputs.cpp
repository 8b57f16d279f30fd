// SPDX-License-Identifier: Apache-2.0
//! @file
//! The bad-input table of docs/RELIABILITY.md, produced and checked by running each bad input:
//! every call must fail with a message, leave state_digest() and check_invariants() as they
//! were; every refused configuration must raise. Prints the table as markdown rows; exits 1 when
//! any row breaks the contract (scripts/check/fuzz runs it).
#include <kvcache/check.hpp>
#include <kvcache/kvcache.hpp>
#include <kvcache/sequence.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace kv = kvcache;

namespace {

int failures = 0;

std::string cell(std::string s) {  // markdown-safe
  for (auto& ch : s)
    if (ch == '|') ch = '/';
  return s;
}

void row(const char* call, const char* input, const kv::status& st, bool unchanged, bool inv_ok,
         const char* yes = "yes") {
  const bool good = !st && !st.message().empty() && unchanged && inv_ok;
  if (!good) ++failures;
  std::printf("| `%s` | %s | `%s` | %s | %s |\n", call, input, kv::to_string(st.code()),
              cell(st.message()).c_str(),
              good ? yes : (st ? "**NO: call succeeded**" : "**NO**"));
}

// Runs `call` on `c`, which must fail and change nothing.
template <class C>
void expect_refused(C& c, const char* call, const char* input, const std::function<kv::status()>& f) {
  const std::uint64_t before = kv::state_digest(c);
  const kv::status st = f();
  row(call, input, st, kv::state_digest(c) == before, kv::check_invariants(c).ok());
}

template <class F>
void expect_raise(const char* call, const char* input, F make) {
  try {
    make();
    row(call, input, kv::status{}, true, true);  // no exception: reported as a failure
  } catch (const kv::error& e) {
    const kv::status st{e.code(), e.what()};
    row(call, input, st, true, true, "n/a (raises; nothing built)");
  }
}

template <class C>
kv::status as_status(const kv::result<C>& r) {
  return r ? kv::status{} : r.error();
}

kv::geometry geo() { return kv::geometry{2, 2, 4, 32, kv::dtype::f32}; }

}  // namespace

int main() {
  std::printf("| call | bad input | error | message | cache unchanged |\n");
  std::printf("| --- | --- | --- | --- | --- |\n");

  // A cache with a little history: two sequences, one forked, tokens evicted, a small pool.
  using hh = kv::heavy_hitter<kv::attention_signal>;
  kv::cache<kv::host_vmm, hh, kv::passthrough> c({geo(), 64, 32}, kv::host_vmm({4096, 16, true}),
                                                 hh(kv::heavy_hitter_config{0, 0, 8, 8}));
  const auto& g = c.geo();
  const std::uint32_t H = g.kv_heads, D = g.head_dim;
  std::vector<float> kvbuf(std::size_t{70} * H * D, 0.5f);
  auto tensor = [&](std::uint32_t n) { return kv::kv_tensor{kvbuf.data(), kv::dtype::f32, n, H, D}; };
  const kv::seq_id a = c.open().value();
  c.append(a, 0, tensor(40), tensor(40)).check();
  c.append(a, 1, tensor(40), tensor(40)).check();
  const kv::seq_id b = c.fork(a).value();
  const kv::seq_id closed = c.open().value();
  c.close(closed).check();
  const std::uint32_t rows = c.view(a, 0).value().rows;
  std::vector<float> probs(std::size_t{g.query_heads} * 2 * (rows + 4), 0.01f);

  // ---- sequence ids and layers
  expect_refused(c, "append", "a closed sequence's id (stale generation)",
                 [&] { return c.append(closed, 0, tensor(1), tensor(1)); });
  expect_refused(c, "append", "an id never handed out", [&] {
    return c.append(kv::seq_id{77, 0}, 0, tensor(1), tensor(1));
  });
  expect_refused(c, "close", "the same id twice", [&] { return c.close(closed); });
  expect_refused(c, "fork", "a closed sequence", [&] { return as_status(c.fork(closed)); });
  expect_refused(c, "view", "layer == layers", [&] { return as_status(c.view(a, g.layers)); });
  expect_refused(c, "batch", "one stale id among good ones", [&] {
    const kv::seq_id ids[] = {a, closed, b};
    return as_status(c.batch(ids, 0));
  });
  expect_refused(c, "map_ahead", "one stale id among good ones", [&] {
    const kv::seq_id ids[] = {a, closed};
    return c.map_ahead(ids, 10);
  });

  // ---- append: shapes, types, data
  expect_refused(c, "append", "k with 3 heads (cache: 2)", [&] {
    auto k = tensor(2);
    k.heads = 3;
    return c.append(a, 0, k, tensor(2));
  });
  expect_refused(c, "append", "head_dim 16 (cache: 32)", [&] {
    auto v = tensor(2);
    v.head_dim = 16;
    return c.append(a, 0, tensor(2), v);
  });
  expect_refused(c, "append", "bf16 data into an f32 cache", [&] {
    auto k = tensor(2);
    k.type = kv::dtype::bf16;
    return c.append(a, 0, k, tensor(2));
  });
  expect_refused(c, "append", "k of 3 tokens, v of 2", [&] { return c.append(a, 0, tensor(3), tensor(2)); });
  expect_refused(c, "append", "null data with tokens > 0", [&] {
    auto k = tensor(2);
    k.data = nullptr;
    return c.append(a, 0, k, tensor(2));
  });
  expect_refused(c, "append", "more tokens than a head has room for (max_tokens 64, 40 cached)",
                 [&] { return c.append(a, 0, tensor(30), tensor(30)); });
  expect_refused(c, "append", "2^32-1 tokens", [&] {
    return c.append(a, 0, tensor(std::numeric_limits<std::uint32_t>::max()),
                    tensor(std::numeric_limits<std::uint32_t>::max()));
  });
  const kv::seq_id fresh = c.open().value();  // opening maps nothing
  expect_refused(c, "append", "a prefill the page pool cannot back (16 pages of 4 KiB, 12 in use)",
                 [&] { return c.append(fresh, 0, tensor(64), tensor(64)); });
  c.close(fresh).check();

  // ---- observe: signal shapes
  expect_refused(c, "observe", "attention over rows + 1 slots", [&] {
    return c.observe(a, 0, kv::attention_signal{probs.data(), g.query_heads, 1, rows + 1});
  });
  expect_refused(c, "observe", "attention with query_heads 3 (cache: 4)", [&] {
    return c.observe(a, 0, kv::attention_signal{probs.data(), 3, 1, rows});
  });
  expect_refused(c, "observe", "attention of 0 queries", [&] {
    return c.observe(a, 0, kv::attention_signal{probs.data(), g.query_heads, 0, rows});
  });
  expect_refused(c, "observe", "null probabilities", [&] {
    return c.observe(a, 0, kv::attention_signal{nullptr, g.query_heads, 1, rows});
  });
  expect_refused(c, "observe", "a NaN probability", [&] {
    auto p = probs;
    p[3] = std::numeric_limits<float>::quiet_NaN();
    return c.observe(a, 0, kv::attention_signal{p.data(), g.query_heads, 1, rows});
  });
  expect_refused(c, "observe", "a negative probability", [&] {
    auto p = probs;
    p[1] = -1.0f;
    return c.observe(a, 0, kv::attention_signal{p.data(), g.query_heads, 1, rows});
  });

  // ---- budgets and eviction
  expect_refused(c, "set_budget", "0 tokens", [&] { return c.set_budget(0u); });
  expect_refused(c, "set_budget", "max_tokens + 1", [&] { return c.set_budget(65u); });
  expect_refused(c, "set_budget(layer, tokens)", "layer out of range", [&] { return c.set_budget(9u, 8u); });
  expect_refused(c, "set_budget(layer, per_head)", "3 budgets for 2 kv heads", [&] {
    const std::uint32_t per[] = {8, 8, 8};
    return c.set_budget(0, std::span<const std::uint32_t>(per));
  });
  expect_refused(c, "set_budget(layer, per_head)", "one of them 0", [&] {
    const std::uint32_t per[] = {8, 0};
    return c.set_budget(0, std::span<const std::uint32_t>(per));
  });
  expect_refused(c, "evict", "reserve above the budget", [&] { return c.evict(a, 0, 33); });

  // ---- handles
  {
    kv::sequence<decltype(c)> h(c, c.open().value());
    kv::sequence<decltype(c)> moved = std::move(h);
    expect_refused(c, "sequence::append", "a moved-from handle",
                   [&] { return h.append(0, tensor(1), tensor(1)); });  // NOLINT(bugprone-use-after-move)
    (void)moved.close();
    expect_refused(c, "sequence::close", "a closed (empty) handle", [&] { return moved.close(); });
  }

  // ---- quantized formats: values they cannot store
  {
    kv::cache<kv::host_vmm, kv::keep_all, kv::q8_0> q({geo(), 64}, kv::host_vmm({4096, 24, true}));
    const kv::seq_id s = q.open().value();
    q.append(s, 0, tensor(4), tensor(4)).check();
    std::vector<float> bad(kvbuf.begin(), kvbuf.begin() + 2 * H * D);
    bad[5] = std::numeric_limits<float>::infinity();
    const kv::kv_tensor k{bad.data(), kv::dtype::f32, 2, H, D};
    expect_refused(q, "append (q8_0)", "an Inf element", [&] { return q.append(s, 0, k, tensor(2)); });
    bad[5] = 3.0e38f;  // finite, but its block's fp16 scale (amax / 127) would not be
    expect_refused(q, "append (q8_0)", "a finite 3e38 element", [&] { return q.append(s, 0, k, tensor(2)); });
  }
  {
    kv::cache<kv::host_vmm, kv::keep_all, kv::fp8_e4m3> q({geo(), 64}, kv::host_vmm({4096, 24, true}));
    const kv::seq_id s = q.open().value();
    std::vector<float> bad(kvbuf.begin(), kvbuf.begin() + 2 * H * D);
    bad[0] = std::numeric_limits<float>::quiet_NaN();
    const kv::kv_tensor v{bad.data(), kv::dtype::f32, 2, H, D};
    expect_refused(q, "append (fp8_e4m3)", "a NaN element", [&] { return q.append(s, 0, tensor(2), v); });
  }

  // ---- configurations (the constructor raises; there is no cache to leave unchanged)
  expect_raise("cache(cfg)", "query_heads not a multiple of kv_heads", [] {
    kv::cache<kv::heap_memory> x({kv::geometry{1, 2, 3, 32, kv::dtype::f16}, 8});
  });
  expect_raise("cache(cfg)", "max_tokens 0", [] {
    kv::cache<kv::heap_memory> x({geo(), 0});
  });
  expect_raise("cache(cfg)", "budget above max_tokens", [] {
    kv::cache<kv::heap_memory> x({geo(), 8, 9});
  });
  expect_raise("cache(cfg)", "q4_0 with head_dim 40 (blocks of 32)", [] {
    kv::cache<kv::heap_memory, kv::keep_all, kv::q4_0> x({kv::geometry{1, 1, 1, 40, kv::dtype::f16}, 8});
  });
  expect_raise("cache(cfg)", "kivi with per_sequence ranges", [] {
    kv::cache<kv::host_vmm, kv::keep_all, kv::kivi<2, 32, 32>> x(
        {geo(), 64, 0, kv::layout::token_major, kv::range_scope::per_sequence});
  });
  expect_raise("fp8_e4m3(scales)", "a zero scale", [] {
    kv::cache<kv::heap_memory, kv::keep_all, kv::fp8_e4m3> x(
        {geo(), 8}, kv::heap_memory{}, kv::keep_all{},
        kv::fp8_e4m3(kv::scale_granularity::per_layer, {1.0f, 0.0f}, {1.0f, 1.0f}));
  });
  expect_raise("host_vmm(cfg)", "page size not a multiple of the OS page", [] {
    kv::host_vmm m({1000, 4, true});
  });
  expect_raise("snapkv(cfg)", "window 0", [] { kv::snapkv<> p(kv::snapkv_config{0, 7}); });

  if (failures) std::fprintf(stderr, "bad_inputs: %d row(s) broke the contract\n", failures);
  return failures ? 1 : 0;
}
