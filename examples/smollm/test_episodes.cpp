// SPDX-License-Identifier: Apache-2.0
// Tests of episodes.hpp (what smollm_episodes adds to the engine) on a tiny random 2-layer Llama
// built in memory (no model file): the probe forward leaves the cache as it was and gives the
// patch the queries and hidden states of a normal forward; final hidden states come out of the
// engine unchanged otherwise; block-wise prefill with the episodic policy keeps the working tier
// under its bound; routing sends a question identical to a segment to that segment's episode.
// Exit status: 0 when every check passes.

#include "test_check.hpp"
#include "episodes.hpp"
#include "model.hpp"

#include <kvcache/kvcache.hpp>
#if __has_include(<kvcache/evict/episodic.hpp>)
#include <kvcache/evict/episodic.hpp>
#include <kvcache/memory/tiered.hpp>
#define SMOLLM_HAVE_EPISODIC 1
#endif

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using smollm_test::failures;

using namespace smollm;

std::vector<float> randn(std::size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> g(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

matrix mat(std::size_t rows, std::size_t cols, std::mt19937& rng, float scale) {
  matrix m;
  m.rows = rows;
  m.cols = cols;
  m.f32 = randn(rows * cols, rng, scale);
  return m;
}

std::vector<float> norm_weights(std::size_t n, std::mt19937& rng) {
  auto v = randn(n, rng, 0.1f);
  for (auto& x : v) x += 1.0f;
  return v;
}

// The tiny model of test_smollm.cpp (2 layers, hidden 128, 4 heads, 2 KV heads of 32), fp32
// weights built in memory.
weights tiny_weights(std::uint32_t seed) {
  std::mt19937 rng(seed);
  weights W;
  W.cfg = config{2, 128, 4, 2, 32, 64, 300, 128, 1e-5f, 10000.0f};
  const std::size_t H = 128, KV = 64, F = 64, V = 300;
  W.embd = mat(V, H, rng, 1.0f);
  W.out_norm = norm_weights(H, rng);
  W.layers.resize(2);
  for (auto& L : W.layers) {
    L.attn_norm = norm_weights(H, rng);
    L.wq = mat(H, H, rng, 0.12f);
    L.wk = mat(KV, H, rng, 0.12f);
    L.wv = mat(KV, H, rng, 0.15f);
    L.wo = mat(H, H, rng, 0.1f);
    L.ffn_norm = norm_weights(H, rng);
    L.w_gate = mat(F, H, rng, 0.15f);
    L.w_up = mat(F, H, rng, 0.15f);
    L.w_down = mat(H, F, rng, 0.2f);
  }
  return W;
}

std::vector<std::int32_t> random_tokens(std::size_t n, std::mt19937& rng) {
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = static_cast<std::int32_t>(rng() % 300);
  return t;
}

kvcache::cache_config cache_cfg(const weights& W, std::uint32_t max_tokens, std::uint32_t budget = 0) {
  kvcache::cache_config cfg;
  cfg.geo = kv_geometry(W.cfg);
  cfg.max_tokens = max_tokens;
  cfg.budget = budget;
  return cfg;
}

kvcache::host_vmm_config vmm_cfg(const kvcache::cache_config& cfg, std::size_t sequences) {
  kvcache::host_vmm_config vm;
  vm.page_size = 64 * 1024;
  vm.pool_pages = sequences * 2 * std::size_t{cfg.geo.layers} *
                  (std::size_t{cfg.max_tokens} * cfg.geo.token_bytes() / vm.page_size + 2);
  return vm;
}

// ---- 1. probe forward --------------------------------------------------------------------------

void test_probe() {
  const weights W = tiny_weights(11);
  std::mt19937 rng(3);
  const auto ctx = random_tokens(37, rng), patch = random_tokens(13, rng);
  thread_pool pool(2);
  engine e(W, pool);
  using cache_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all>;
  const auto cfg = cache_cfg(W, 64);
  cache_t kc(cfg, kvcache::host_vmm{vmm_cfg(cfg, 4)});

  // The context, by the episode sequence (append mode) in two steps.
  const kvcache::seq_id s = kc.open().value();
  episode_sequence<cache_t> seq(kc, s, W.cfg, pool);
  CHECK(e.forward(seq, ctx.data(), 20, nullptr).ok(), "context");
  CHECK(e.forward(seq, ctx.data() + 20, 17, nullptr).ok(), "context");
  CHECK(seq.position() == 37, "position %lld", static_cast<long long>(seq.position()));

  // The probe: the cache does not move (digest: K/V bytes, positions, policy state, gauges).
  const std::uint64_t before = kvcache::state_digest(kc);
  const auto stats_before = kc.stats();
  std::vector<float> probe_hidden(patch.size() * W.cfg.hidden);
  seq.set_mode(episode_sequence<cache_t>::mode::probe);
  CHECK(e.forward(seq, patch.data(), static_cast<std::uint32_t>(patch.size()), nullptr, false, probe_hidden.data())
            .ok(),
        "probe");
  engine::set_position(seq, 37);
  seq.set_mode(episode_sequence<cache_t>::mode::append);
  CHECK(kvcache::state_digest(kc) == before, "the probe changed the cache");
  CHECK(kc.stats().entries_live == stats_before.entries_live, "entries");
  CHECK(kvcache::check_invariants(kc).ok(), "invariants");
  std::vector<std::vector<float>> probe_q(W.cfg.layers);
  for (std::uint32_t l = 0; l < W.cfg.layers; ++l) probe_q[l] = seq.queries(l);
  // run_probe gives the same queries again (and leaves the position)
  CHECK(run_probe(e, seq, 37, patch).ok(), "run_probe");
  CHECK(seq.position() == 37 && kvcache::state_digest(kc) == before, "run_probe moved something");
  for (std::uint32_t l = 0; l < W.cfg.layers; ++l) CHECK(seq.queries(l) == probe_q[l], "run_probe queries, layer %u", l);

  // A normal forward of the patch after the same context (a fork, appended): same queries and
  // hidden states, bit for bit.
  const kvcache::seq_id f = kc.fork(s).value();
  {
    episode_sequence<cache_t> fs(kc, f, W.cfg, pool);
    engine::set_position(fs, 37);
    std::vector<float> hidden(patch.size() * W.cfg.hidden);
    CHECK(e.forward(fs, patch.data(), static_cast<std::uint32_t>(patch.size()), nullptr, false, hidden.data()).ok(),
          "patch appended");
    for (std::uint32_t l = 0; l < W.cfg.layers; ++l)
      CHECK(fs.queries(l) == probe_q[l], "layer %u: probe queries differ from a normal forward's", l);
    CHECK(hidden == probe_hidden, "probe hidden states differ from a normal forward's");
  }
  (void)kc.close(f);

  // The same normal forward through cache_sequence (the engine's usual path) with the whole text:
  // the episode sequence's append mode gives the same hidden states as cache_sequence (keep_all).
  {
    cache_sequence<cache_t> cs(kc, W.cfg, pool);
    std::vector<std::int32_t> all(ctx);
    all.insert(all.end(), patch.begin(), patch.end());
    std::vector<float> hidden(all.size() * W.cfg.hidden), logits(all.size() * W.cfg.vocab), logits2(logits.size());
    CHECK(e.forward(cs, all.data(), 37, logits.data(), true, hidden.data()).ok(), "cache_sequence");
    CHECK(e.forward(cs, all.data() + 37, 13, logits.data() + 37 * W.cfg.vocab, true,
                    hidden.data() + 37 * W.cfg.hidden)
              .ok(),
          "cache_sequence");
    CHECK(std::equal(probe_hidden.begin(), probe_hidden.end(), hidden.begin() + 37 * W.cfg.hidden),
          "cache_sequence's hidden states of the patch differ from the probe's");
    // hidden = null gives the same logits (the option changes nothing else)
    cache_sequence<cache_t> cs2(kc, W.cfg, pool);
    CHECK(e.forward(cs2, all.data(), 37, logits2.data(), true).ok(), "no hidden");
    CHECK(e.forward(cs2, all.data() + 37, 13, logits2.data() + 37 * W.cfg.vocab, true).ok(), "no hidden");
    CHECK(logits == logits2, "logits changed by asking for hidden states");
  }
  (void)kc.close(s);

  // embed(): mean of final hidden states, unit length, independent of the cache's other contents
  auto a = embed(e, kc, W.cfg, pool, std::span<const std::int32_t>(patch));
  CHECK(a.ok(), "embed");
  if (a) {
    double nn = 0;
    for (float x : *a) nn += double(x) * x;
    CHECK(std::fabs(nn - 1.0) < 1e-5, "embedding norm %g", nn);
    auto b = embed(e, kc, W.cfg, pool, std::span<const std::int32_t>(patch));
    CHECK(b.ok() && *a == *b, "embed is not deterministic");
  }
  std::printf("probe: cache digest unchanged, queries and hidden states equal a normal forward's\n");
}

// ---- the block-restricted mask of the layer profile ---------------------------------------------

// Layer 0's keys do not depend on attention: equal with and without the mask. Layer 1's keys of
// the first block (positions below block/2 + block/2 = block, where every query sees everything
// anyway) are equal too; later ones differ (their queries lost the middle of the text).
void test_block_mask() {
  const weights W = tiny_weights(8);
  std::mt19937 rng(2);
  const std::uint32_t N = 48, sinks = 4, block = 16, KD = W.cfg.kv_heads * W.cfg.head_dim;
  const auto text = random_tokens(N, rng);
  thread_pool pool(2);
  engine e(W, pool);
  using cache_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all>;
  const auto cfg = cache_cfg(W, N);
  auto run = [&](std::uint32_t blk) {
    cache_t kc(cfg, kvcache::host_vmm{vmm_cfg(cfg, 1)});
    const kvcache::seq_id s = kc.open().value();
    episode_sequence<cache_t> seq(kc, s, W.cfg, pool);
    seq.set_block_mask(sinks, blk);
    std::vector<std::vector<float>> keys(W.cfg.layers);
    for (std::uint32_t at = 0; at < N; at += block / 2) {
      CHECK(e.forward(seq, text.data() + at, block / 2, nullptr).ok(), "step at %u", at);
      for (std::uint32_t l = 0; l < W.cfg.layers; ++l) keys[l].insert(keys[l].end(), seq.keys(l).begin(), seq.keys(l).end());
    }
    // a step across a stride is refused
    CHECK(blk == 0 || !e.forward(seq, text.data(), block / 2 + 1, nullptr).ok(), "a step across a stride");
    return keys;
  };
  const auto full = run(0), masked = run(block);
  CHECK(full[0] == masked[0], "layer 0 keys differ under the mask");
  CHECK(std::equal(full[1].begin(), full[1].begin() + block * KD, masked[1].begin()), "layer 1, first block");
  CHECK(!std::equal(full[1].begin() + block * KD, full[1].end(), masked[1].begin() + block * KD),
        "layer 1 keys after the first block equal the full run's: the mask did nothing");
  std::printf("block mask: layer 0 keys equal, layer 1 keys differ after the first block\n");
}

#ifdef SMOLLM_HAVE_EPISODIC
//! A hash of a sequence's live entries: (layer, head, position, K and V bytes) in slot order.
template <class Cache>
std::uint64_t kv_digest(const Cache& kc, kvcache::seq_id s) {
  std::uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  const auto& g = kc.geo();
  std::vector<float> k(g.head_dim), v(g.head_dim);
  for (std::uint32_t l = 0; l < g.layers; ++l) {
    const auto view = kc.view(s, l).value();
    for (std::uint32_t slot = 0; slot < view.rows; ++slot)
      for (std::uint32_t hd = 0; hd < g.kv_heads; ++hd) {
        const std::int32_t p = view.positions[std::size_t{slot} * g.kv_heads + hd];
        if (p < 0) continue;
        kvcache::decode_key(view, kc.quant(), slot, hd, k.data());
        kvcache::decode_value(view, kc.quant(), slot, hd, v.data());
        mix(&l, sizeof l);
        mix(&hd, sizeof hd);
        mix(&p, sizeof p);
        mix(k.data(), k.size() * sizeof(float));
        mix(v.data(), v.size() * sizeof(float));
      }
  }
  return h;
}

// ---- 2. block-wise prefill under a budget ---------------------------------------------------------

// EpiCache's prefill of one episode: chunks appended, the patch probed (not cached), every layer
// scored and evicted to M per head (`pair`: M·Hk per layer). The working tier (pages in use)
// stays within what M·Hk + one chunk of slots per layer needs, far below keep_all's.
void test_block_prefill() {
  const weights W = tiny_weights(5);
  std::mt19937 rng(9);
  const std::uint32_t T = 160, chunk = 16, M = 12, P = 8;  // P: protected prefix (system prompt)
  const auto text = random_tokens(T, rng), patch = random_tokens(20, rng);
  thread_pool pool(2);
  engine e(W, pool);
  const std::uint32_t KH = W.cfg.kv_heads, L = W.cfg.layers;
  using mem_t = kvcache::tiered<kvcache::host_vmm>;
  using cache_t = kvcache::cache<mem_t, kvcache::episodic>;
  auto cfg = cache_cfg(W, M * KH + chunk, M);
  kvcache::host_vmm_config vm;
  vm.page_size = 4096;  // 16 slots of one layer's K (2 heads x 32 x fp32)
  vm.pool_pages = 256;
  vm.deferred_reclamation = false;
  cache_t kc(cfg, mem_t(kvcache::host_vmm{vm}, kvcache::host_holding{}),
             kvcache::episodic{kvcache::episodic_config{kvcache::episodic_level::pair, P}});
  const kvcache::seq_id s = kc.open().value();
  episode_sequence<cache_t> seq(kc, s, W.cfg, pool);
  const std::size_t slot_bytes = std::size_t{KH} * W.cfg.head_dim * sizeof(float);
  const std::size_t pages_per_range = ((M * KH + chunk) * slot_bytes + vm.page_size - 1) / vm.page_size;
  const std::size_t bound = 2 * L * pages_per_range * vm.page_size;  // K and V of every layer
  std::size_t peak = 0;
  for (std::uint32_t at = 0; at < T; at += chunk) {
    CHECK(e.forward(seq, text.data() + at, chunk, nullptr).ok(), "chunk at %u", at);
    const auto ms = kc.memory().stats();
    peak = std::max(peak, ms.pages_in_use() * ms.page_size);
    const std::uint64_t before = kvcache::state_digest(kc);
    CHECK(run_probe(e, seq, seq.position(), std::span<const std::int32_t>(patch)).ok(), "probe");
    CHECK(kvcache::state_digest(kc) == before, "the probe changed the cache at %u", at);
    CHECK(score_and_evict(seq, L).ok(), "score and evict at %u", at);
    for (std::uint32_t l = 0; l < L; ++l) {
      const auto v = kc.view(s, l).value();
      std::uint32_t live = 0;
      for (std::uint32_t h = 0; h < KH; ++h) live += v.live[h];
      CHECK(live <= std::min((at + chunk) * KH, M * KH), "layer %u holds %u entries after evict at %u", l, live, at);
      std::vector<bool> prefix(P * KH, false);
      for (std::uint32_t slot = 0; slot < v.rows; ++slot)
        for (std::uint32_t h = 0; h < KH; ++h) {
          const std::int32_t p = v.positions[std::size_t{slot} * KH + h];
          if (p >= 0 && p < static_cast<std::int32_t>(P)) prefix[static_cast<std::size_t>(p) * KH + h] = true;
        }
      CHECK(std::count(prefix.begin(), prefix.end(), true) == static_cast<long>(P * KH),
            "layer %u lost protected tokens at %u", l, at);
    }
  }
  CHECK(peak <= bound, "working tier peak %zu bytes above the bound %zu", peak, bound);
  CHECK(kvcache::check_invariants(kc).ok(), "invariants");
  // keep_all over the same text needs far more
  using all_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all>;
  auto acfg = cache_cfg(W, T);
  all_t akc(acfg, kvcache::host_vmm{vm});
  const kvcache::seq_id a = akc.open().value();
  episode_sequence<all_t> aseq(akc, a, W.cfg, pool);
  for (std::uint32_t at = 0; at < T; at += chunk) CHECK(e.forward(aseq, text.data() + at, chunk, nullptr).ok(), "keep_all");
  const auto ams = akc.memory().stats();
  const std::size_t all_bytes = ams.pages_in_use() * ams.page_size;
  CHECK(all_bytes > 2 * bound, "keep_all %zu bytes vs the bound %zu: the test is too small", all_bytes, bound);
  // hold/restore round trip: the episode's K/V come back byte for byte
  const std::uint64_t d0 = kv_digest(kc, s);
  CHECK(kc.hold(s).ok(), "hold");
  CHECK(kc.is_held(s), "is_held");
  const auto held = kc.memory().stats();
  CHECK(held.pages_in_use() == 0, "held: %zu working pages left", held.pages_in_use());
  CHECK(kc.restore(s).ok() && !kc.is_held(s), "restore");
  CHECK(kv_digest(kc, s) == d0, "restore did not bring the same K/V back");
  CHECK(run_probe(e, seq, seq.position(), std::span<const std::int32_t>(patch)).ok(), "probe after restore");
  std::printf("block prefill: working tier peak %zu bytes <= bound %zu (keep_all %zu)\n", peak, bound, all_bytes);
}

// ---- 3. routing ----------------------------------------------------------------------------------

// Segments drawn from four disjoint token ranges ("topics"), embedded by the engine: a question
// identical to a segment is routed to that segment's episode.
void test_routing() {
  const weights W = tiny_weights(21);
  std::mt19937 rng(4);
  thread_pool pool(2);
  engine e(W, pool);
  using cache_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all>;
  const auto cfg = cache_cfg(W, 64);
  cache_t kc(cfg, kvcache::host_vmm{vmm_cfg(cfg, 2)});
  const std::uint32_t topics = 4, per = 5, len = 16, n = topics * per;
  std::vector<std::vector<std::int32_t>> seg(n);
  std::vector<float> emb;
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::uint32_t t = i % topics;  // interleaved, as the conversation's turns
    for (std::uint32_t j = 0; j < len; ++j) seg[i].push_back(static_cast<std::int32_t>(t * 75 + rng() % 75));
    auto v = embed(e, kc, W.cfg, pool, std::span<const std::int32_t>(seg[i]));
    CHECK(v.ok(), "embed");
    if (v) emb.insert(emb.end(), v->begin(), v->end());
  }
  if (emb.size() != std::size_t{n} * W.cfg.hidden) return;
  auto eps = kvcache::cluster_episodes(emb, n, W.cfg.hidden, 4, 3, 42);
  CHECK(eps.ok(), "cluster_episodes");
  if (!eps) return;
  std::uint32_t same_topic = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    auto q = embed(e, kc, W.cfg, pool, std::span<const std::int32_t>(seg[i]));  // the question: segment i again
    CHECK(q.ok(), "embed question");
    if (!q) continue;
    auto r = kvcache::route(*eps, *q);
    CHECK(r.ok() && *r == eps->labels[i], "segment %u (episode %u) routed to %u", i, eps->labels[i], r.ok() ? *r : 99u);
    for (std::uint32_t j = 0; j < n; ++j) same_topic += j != i && j % topics == i % topics && eps->labels[j] == eps->labels[i];
  }
  std::printf("routing: %u segments routed to their own episode; %u of %u same-topic pairs share an episode\n", n,
              same_topic, n * (per - 1));
}
#endif

}  // namespace

int main() {
  test_probe();
  test_block_mask();
#ifdef SMOLLM_HAVE_EPISODIC
  test_block_prefill();
  test_routing();
#else
  std::printf("kvcache/evict/episodic.hpp not found: block-prefill and routing tests skipped\n");
#endif
  if (failures) std::printf("%d check(s) failed\n", failures);
  else std::printf("all smollm_episodes checks passed\n");
  return failures ? 1 : 0;
}
