// SPDX-License-Identifier: Apache-2.0
// The kvcache demo: an engine-like decode loop under a memory budget.
//
// A synthetic model (random Q/K/V with planted structure: attention sinks, a few "heavy hitter"
// tokens every query is drawn to, and a recency bias) runs a prefill and then token-by-token
// decode through kvcache. Each configuration (memory backend × eviction policy × quantizer ×
// budget) sees the same token stream; the table shows what it kept, the memory it held, its speed,
// and how far its attention output drifts from the keep-all cache's.
//
//   demo [--prompt N] [--decode N] [--layers N] [--budget R]   (R: budget as a fraction of tokens)

#include <kvcache/kvcache.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kvcache;
using clock_type = std::chrono::steady_clock;

struct options {
  std::uint32_t prompt = 512;
  std::uint32_t decode = 1024;
  std::uint32_t layers = 4;
  std::uint32_t kv_heads = 4;
  std::uint32_t query_heads = 8;
  std::uint32_t head_dim = 64;
  double budget = 0.25;
};

// The synthetic model: deterministic in (token, layer), so every configuration sees the same data.
class synthetic_model {
 public:
  explicit synthetic_model(const options& o) : o_(o) {
    std::mt19937_64 rng(42);
    std::normal_distribution<float> n(0.0f, 1.0f);
    dir_.resize(std::size_t{o.layers} * o.kv_heads * o.head_dim);
    for (std::size_t i = 0; i < dir_.size(); i += o.head_dim) {
      float norm = 0.0f;
      for (std::uint32_t d = 0; d < o.head_dim; ++d) norm += (dir_[i + d] = n(rng)) * dir_[i + d];
      for (std::uint32_t d = 0; d < o.head_dim; ++d) dir_[i + d] /= std::sqrt(norm);
    }
  }
  // Tokens every query is drawn to: the first few (sinks) and about 3% of the others.
  static bool heavy(std::uint32_t t) { return t < 4 || (t * 2654435761u) % 100 < 3; }

  // K and V of tokens [t0, t0+n) for one layer, `[n][kv_heads][head_dim]` fp16.
  void kv(std::uint32_t layer, std::uint32_t t0, std::uint32_t n, std::vector<std::uint16_t>& k,
          std::vector<std::uint16_t>& v) const {
    const std::uint32_t H = o_.kv_heads, D = o_.head_dim;
    k.resize(std::size_t{n} * H * D);
    v.resize(k.size());
    for (std::uint32_t i = 0; i < n; ++i) {
      const std::uint32_t t = t0 + i;
      std::mt19937_64 rng(seed(t, layer, 1));
      std::normal_distribution<float> g(0.0f, 1.0f);
      for (std::uint32_t h = 0; h < H; ++h) {
        const float* dir = direction(layer, h);
        for (std::uint32_t d = 0; d < D; ++d) {
          float kk = 0.7f * g(rng) + (heavy(t) ? 2.0f * dir[d] * std::sqrt(float(D)) / 4 : 0.0f);
          kk += recency(t, d);
          const std::size_t at = (std::size_t{i} * H + h) * D + d;
          k[at] = float_to_half(kk);
          v[at] = float_to_half(g(rng));
        }
      }
    }
  }
  // Query of token t for one layer, `[query_heads][head_dim]` fp32.
  void query(std::uint32_t layer, std::uint32_t t, std::vector<float>& q) const {
    const std::uint32_t D = o_.head_dim, G = o_.query_heads / o_.kv_heads;
    q.resize(std::size_t{o_.query_heads} * D);
    std::mt19937_64 rng(seed(t, layer, 2));
    std::normal_distribution<float> g(0.0f, 1.0f);
    for (std::uint32_t qh = 0; qh < o_.query_heads; ++qh) {
      const float* dir = direction(layer, qh / G);
      for (std::uint32_t d = 0; d < D; ++d)
        q[std::size_t{qh} * D + d] =
            0.7f * g(rng) + 1.0f * dir[d] * std::sqrt(float(D)) / 4 + recency(t, d);
    }
  }

 private:
  // A slowly turning component shared by keys and queries: recent keys score higher.
  float recency(std::uint32_t t, std::uint32_t d) const {
    if (d >= 2) return 0.0f;
    const float a = static_cast<float>(t) / 40.0f;
    return 2.0f * (d == 0 ? std::cos(a) : std::sin(a));
  }
  const float* direction(std::uint32_t layer, std::uint32_t h) const {
    return &dir_[(std::size_t{layer} * o_.kv_heads + h) * o_.head_dim];
  }
  static std::uint64_t seed(std::uint32_t t, std::uint32_t layer, std::uint32_t what) {
    return (std::uint64_t{t} << 20) ^ (std::uint64_t{layer} << 4) ^ what;
  }
  options o_;
  std::vector<float> dir_;
};

struct row {
  std::string memory, policy, quant;
  std::uint32_t budget = 0;
  std::uint64_t seen = 0;
  double kept = 0;  // mean live tokens per (layer, head) at the end
  std::size_t bytes_backed = 0;
  std::size_t peak_backed = 0;
  double tok_per_s = 0;
  double cache_us_per_tok = 0;  // time inside kvcache calls per decoded token
  double err_mean = 0, err_max = 0;
};

// Attention outputs of the keep-all run, the truth the others are compared with.
std::vector<float> truth;

template <class Cache>
row run(const char* memory_name, const char* policy_name, Cache& kc, const synthetic_model& model,
        const options& o, std::uint32_t budget, bool record_truth) {
  row r{memory_name, policy_name, Cache::quantizer_type::name(), budget};
  const std::uint32_t D = o.head_dim, QH = o.query_heads;
  const std::size_t out_per_layer = std::size_t{QH} * D;
  std::vector<std::uint16_t> k, v;
  std::vector<float> q, out(out_per_layer), probs;
  double cache_s = 0, err_sum = 0;
  std::size_t err_n = 0;
  auto timed = [&](auto&& f) {
    const auto t0 = clock_type::now();
    f();
    cache_s += std::chrono::duration<double>(clock_type::now() - t0).count();
  };

  seq_id s;
  timed([&] { s = kc.open(o.prompt).value(); });
  // Prefill: the whole prompt per layer, then evict to the budget. Score-based policies get
  // their signal first: H2O the prompt's attention probabilities, SnapKV the last 32 queries.
  for (std::uint32_t l = 0; l < o.layers; ++l) {
    model.kv(l, 0, o.prompt, k, v);
    const kv_tensor kt{k.data(), dtype::f16, o.prompt, o.kv_heads, D};
    const kv_tensor vt{v.data(), dtype::f16, o.prompt, o.kv_heads, D};
    timed([&] { kc.append(s, l, kt, vt).check(); });
    if constexpr (Cache::template consumes<attention_signal>) {
      const layer_view view = kc.view(s, l).value();
      std::vector<float> qs(std::size_t{o.prompt} * QH * D), outs(qs.size());
      std::vector<std::int64_t> qpos(o.prompt);
      for (std::uint32_t t = 0; t < o.prompt; ++t) {
        model.query(l, t, q);
        std::copy(q.begin(), q.end(), qs.begin() + std::ptrdiff_t{t} * QH * D);
        qpos[t] = t;
      }
      probs.resize(std::size_t{QH} * o.prompt * view.rows);
      reference::attention(view, QH, qs.data(), o.prompt, qpos.data(), outs.data(), probs.data(),
                           kc.quant())
          .check();
      timed([&] {
        kc.observe(s, l, attention_signal{probs.data(), QH, o.prompt, view.rows}).check();
      });
    } else if constexpr (Cache::template consumes<query_signal>) {
      const std::uint32_t w = std::min<std::uint32_t>(32, o.prompt);
      std::vector<float> qs(std::size_t{w} * QH * D);
      for (std::uint32_t i = 0; i < w; ++i) {
        model.query(l, o.prompt - w + i, q);
        std::copy(q.begin(), q.end(), qs.begin() + std::ptrdiff_t{i} * QH * D);
      }
      timed([&] { kc.observe(s, l, query_signal{qs.data(), dtype::f32, w}).check(); });
    }
    timed([&] { kc.evict(s, l).check(); });
  }
  const auto start = clock_type::now();
  for (std::uint32_t t = o.prompt; t < o.prompt + o.decode; ++t) {
    for (std::uint32_t l = 0; l < o.layers; ++l) {
      model.kv(l, t, 1, k, v);
      const kv_tensor kt{k.data(), dtype::f16, 1, o.kv_heads, D};
      const kv_tensor vt{v.data(), dtype::f16, 1, o.kv_heads, D};
      layer_view view;
      timed([&] {
        kc.append(s, l, kt, vt).check();
        view = kc.view(s, l).value();
      });
      model.query(l, t, q);
      const bool want_probs = Cache::template consumes<attention_signal>;
      if (want_probs) probs.resize(std::size_t{QH} * view.rows);
      reference::attention(view, QH, q.data(), 1, nullptr, out.data(),
                           want_probs ? probs.data() : nullptr, kc.quant())
          .check();
      timed([&] {
        if constexpr (Cache::template consumes<attention_signal>)
          kc.observe(s, l, attention_signal{probs.data(), QH, 1, view.rows}).check();
        kc.evict(s, l).check();
      });
      const std::size_t at = (std::size_t{t - o.prompt} * o.layers + l) * out_per_layer;
      if (record_truth) {
        std::memcpy(&truth[at], out.data(), out_per_layer * sizeof(float));
      } else {
        double num = 0, den = 0;
        for (std::size_t i = 0; i < out_per_layer; ++i) {
          const double d = out[i] - truth[at + i];
          num += d * d;
          den += double(truth[at + i]) * truth[at + i];
        }
        const double e = std::sqrt(num / (den > 0 ? den : 1));
        err_sum += e;
        r.err_max = std::max(r.err_max, e);
        ++err_n;
      }
    }
    r.peak_backed = std::max(r.peak_backed, kc.stats().bytes_backed);
  }
  const double secs = std::chrono::duration<double>(clock_type::now() - start).count();
  const auto st = kc.stats();
  r.seen = o.prompt + o.decode;
  r.kept = double(st.entries_live) / (double(o.layers) * o.kv_heads);
  r.bytes_backed = st.bytes_backed;
  r.tok_per_s = o.decode / secs;
  r.cache_us_per_tok = cache_s * 1e6 / (o.prompt + o.decode);
  r.err_mean = err_n ? err_sum / err_n : 0.0;
  kc.close(s).check();
  return r;
}

// A visual-autoregressive stream for the ScaleKV row: token maps of 1x1 .. 32x32 (Infinity's
// schedule up to 1024 tokens per scale, 2521 tokens), each appended per layer with its queries.
// Each scale first attends over the cache (error: its last 16 queries against keep-all's), then
// the cache is compressed for the next scale.
constexpr std::uint32_t kSides[] = {1, 2, 4, 6, 8, 12, 16, 20, 24, 32};

template <class Cache>
row run_scales(const char* policy_name, Cache& kc, const synthetic_model& model, const options& o,
               std::uint32_t budget, std::vector<float>& truth_s, bool record_truth) {
  row r{"host_vmm", policy_name, Cache::quantizer_type::name(), budget};
  const std::uint32_t D = o.head_dim, QH = o.query_heads, W = 16;
  std::vector<std::uint16_t> k, v;
  std::vector<float> q, qs, out(std::size_t{W} * QH * D);
  double cache_s = 0, err_sum = 0;
  std::size_t err_n = 0;
  const auto start = clock_type::now();
  const seq_id s = kc.open().value();
  std::uint32_t first = 0, at = 0;
  for (std::uint32_t sc = 0; sc < std::size(kSides); ++sc) {
    const std::uint32_t len = kSides[sc] * kSides[sc];
    const std::vector<std::uint32_t> ids(len, sc);
    for (std::uint32_t l = 0; l < o.layers; ++l) {
      model.kv(l, first, len, k, v);
      qs.resize(std::size_t{len} * QH * D);
      for (std::uint32_t i = 0; i < len; ++i) {
        model.query(l, first + i, q);
        std::copy(q.begin(), q.end(), qs.begin() + std::ptrdiff_t{i} * QH * D);
      }
      const kv_tensor kt{k.data(), dtype::f16, len, o.kv_heads, D};
      const kv_tensor vt{v.data(), dtype::f16, len, o.kv_heads, D};
      auto t0 = clock_type::now();
      kc.append(s, l, kt, vt).check();
      const layer_view view = kc.view(s, l).value();
      cache_s += std::chrono::duration<double>(clock_type::now() - t0).count();
      const std::uint32_t nq = std::min(W, len);
      reference::attention(view, QH, qs.data() + std::size_t{len - nq} * QH * D, nq, nullptr,
                           out.data(), nullptr, kc.quant())
          .check();
      const std::size_t n_out = std::size_t{nq} * QH * D;
      if (record_truth) {
        truth_s.insert(truth_s.end(), out.begin(), out.begin() + std::ptrdiff_t(n_out));
      } else {
        double num = 0, den = 0;
        for (std::size_t i = 0; i < n_out; ++i) {
          const double d = out[i] - truth_s[at + i];
          num += d * d;
          den += double(truth_s[at + i]) * truth_s[at + i];
        }
        const double e = std::sqrt(num / (den > 0 ? den : 1));
        err_sum += e;
        r.err_max = std::max(r.err_max, e);
        ++err_n;
      }
      at += static_cast<std::uint32_t>(n_out);
      t0 = clock_type::now();
      if constexpr (Cache::template consumes<scale_signal>)
        kc.observe(s, l, scale_signal{ids.data(), len, kSides[sc], kSides[sc]},
                   query_signal{qs.data(), dtype::f32, len})
            .check();
      kc.evict(s, l).check();
      cache_s += std::chrono::duration<double>(clock_type::now() - t0).count();
    }
    first += len;
    r.peak_backed = std::max(r.peak_backed, kc.stats().bytes_backed);
  }
  const double secs = std::chrono::duration<double>(clock_type::now() - start).count();
  const auto st = kc.stats();
  r.seen = first;
  r.kept = double(st.entries_live) / (double(o.layers) * o.kv_heads);
  r.bytes_backed = st.bytes_backed;
  r.tok_per_s = first / secs;
  r.cache_us_per_tok = cache_s * 1e6 / first;
  r.err_mean = err_n ? err_sum / err_n : 0.0;
  kc.close(s).check();
  return r;
}

void print(const std::vector<row>& rows) {
  std::printf("\n%-9s %-12s %-6s %7s %7s %8s %11s %11s %9s %11s %10s %10s\n", "memory", "policy",
              "quant", "budget", "seen", "kept", "held MiB", "peak MiB", "tok/s", "cache us/tok",
              "err mean", "err max");
  for (const auto& r : rows)
    std::printf("%-9s %-12s %-6s %7u %7llu %8.1f %11.2f %11.2f %9.0f %11.2f %10.4f %10.4f\n",
                r.memory.c_str(), r.policy.c_str(), r.quant.c_str(), r.budget,
                static_cast<unsigned long long>(r.seen), r.kept, r.bytes_backed / 1048576.0,
                r.peak_backed / 1048576.0, r.tok_per_s, r.cache_us_per_tok, r.err_mean, r.err_max);
}

// One row per quantizer (keep_all, so the error is the format's alone): K+V bytes per token over
// all layers (codes and out-of-band scales), and the attention error against the fp16 cache.
struct quant_row {
  std::string name;
  double bytes_per_token = 0, ratio = 0;
  row r;
};

template <class Q>
void add_quant_row(std::vector<quant_row>& out, const std::string& name, Q quant,
                   const cache_config& cfg, const host_vmm_config& vm, const synthetic_model& model,
                   const options& o) {
  cache<host_vmm, keep_all, Q> kc(cfg, host_vmm{vm}, keep_all{}, std::move(quant));
  quant_row q;
  q.name = name;
  const auto& g = cfg.geo;
  q.bytes_per_token = 2.0 * g.layers * g.kv_heads * double(kc.quant().code_bytes(g) + kc.quant().scale_bytes(g));
  q.ratio = q.bytes_per_token / (2.0 * g.layers * g.token_bytes());
  q.r = run("host_vmm", "keep_all", kc, model, o, cfg.max_tokens, false);
  out.push_back(q);
}

void print_quant(const std::vector<quant_row>& rows) {
  std::printf("\n%-22s %12s %9s %9s %11s %10s %10s\n", "quantizer", "bytes/token", "vs fp16",
              "tok/s", "cache us/tok", "err mean", "err max");
  for (const auto& q : rows)
    std::printf("%-22s %12.0f %8.3fx %9.0f %11.2f %10.4f %10.4f\n", q.name.c_str(), q.bytes_per_token,
                q.ratio, q.r.tok_per_s, q.r.cache_us_per_tok, q.r.err_mean, q.r.err_max);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const double x = std::atof(argv[i + 1]);
    if (a == "--prompt") o.prompt = static_cast<std::uint32_t>(x);
    else if (a == "--decode") o.decode = static_cast<std::uint32_t>(x);
    else if (a == "--layers") o.layers = static_cast<std::uint32_t>(x);
    else if (a == "--budget") o.budget = x;
    else {
      std::fprintf(stderr, "usage: demo [--prompt N] [--decode N] [--layers N] [--budget R]\n");
      return 2;
    }
  }
  if (o.prompt == 0 || o.decode == 0 || o.layers == 0 || !(o.budget > 0 && o.budget <= 1)) {
    std::fprintf(stderr, "demo: prompt, decode and layers must be > 0, budget in (0, 1]\n");
    return 2;
  }
  const std::uint32_t total = o.prompt + o.decode;
  cache_config cfg;
  cfg.geo = geometry{o.layers, o.kv_heads, o.query_heads, o.head_dim, dtype::f16};
  cfg.max_tokens = total;
  const auto budget_at = [&](double ratio) {
    return std::max<std::uint32_t>(8, static_cast<std::uint32_t>(ratio * total));
  };
  const std::uint32_t budget = budget_at(o.budget);
  // The pool: 64 KiB pages, enough for the keep-all run with room to spare.
  host_vmm_config vm;
  vm.page_size = 64 * 1024;
  vm.pool_pages = 2 * o.layers * (round_up(std::size_t{total} * cfg.geo.token_bytes(), vm.page_size) /
                                  vm.page_size + 1);

  std::printf("kvcache demo: %u layers, %u KV heads (%u query heads), head dim %u, fp16; prompt %u + "
              "decode %u tokens; budget %.0f%% = %u tokens per head\n",
              o.layers, o.kv_heads, o.query_heads, o.head_dim, o.prompt, o.decode, o.budget * 100,
              budget);
  std::printf("synthetic attention: 4 sinks, ~3%% heavy-hitter tokens, recency bias; err = relative "
              "L2 of the attention output vs keep-all, over every decode step and layer\n");

  synthetic_model model(o);
  truth.assign(std::size_t{o.decode} * o.layers * o.query_heads * o.head_dim, 0.0f);
  std::vector<row> rows;
  {
    cache<host_vmm, keep_all> kc(cfg, host_vmm{vm});
    rows.push_back(run("host_vmm", "keep_all", kc, model, o, total, true));
  }
  {
    cache<heap_memory, keep_all> kc(cfg);
    rows.push_back(run("heap", "keep_all", kc, model, o, total, false));
  }
  for (double ratio : {o.budget, o.budget / 2.5}) {
    cache_config c = cfg;
    c.budget = budget_at(ratio);
    cache<host_vmm, sink_window> kc(c, host_vmm{vm}, sink_window{4});
    rows.push_back(run("host_vmm", "sink_window", kc, model, o, c.budget, false));
  }
  {
    // H2O at the same budget: half heavy hitters, half recent (the paper's split).
    cache_config c = cfg;
    c.budget = budget_at(o.budget);
    heavy_hitter_config hc;
    hc.heavy = c.budget - c.budget / 2;
    hc.recent = c.budget / 2;
    cache<host_vmm, heavy_hitter<>> kc(c, host_vmm{vm}, heavy_hitter(hc));
    rows.push_back(run("host_vmm", "heavy_hitter", kc, model, o, c.budget, false));
  }
  {
    // SnapKV compresses the prompt once to the budget (LongBench defaults); decode then grows.
    cache_config c = cfg;
    c.budget = std::min(budget_at(o.budget), o.prompt);
    cache<host_vmm, snapkv<>> kc(c, host_vmm{vm}, snapkv());
    rows.push_back(run("host_vmm", "snapkv", kc, model, o, c.budget, false));
  }
  {
    // ScaleKV on a visual-autoregressive stream (its own keep-all truth): released defaults,
    // 650 tokens per layer on average (no table: every layer gets the base).
    std::uint32_t scale_tokens = 0;
    for (std::uint32_t sd : kSides) scale_tokens += sd * sd;
    cache_config c = cfg;
    c.max_tokens = scale_tokens;
    host_vmm_config vs = vm;
    vs.pool_pages = 2 * o.layers *
                    (round_up(std::size_t{scale_tokens} * cfg.geo.token_bytes(), vs.page_size) /
                         vs.page_size + 1);
    std::vector<float> truth_s;
    cache<host_vmm, keep_all> full(c, host_vmm{vs});
    rows.push_back(run_scales("keep_all/VAR", full, model, o, scale_tokens, truth_s, true));
    scale_aware_config sc;
    sc.scales = static_cast<std::uint32_t>(std::size(kSides));
    cache<host_vmm, scale_aware> kc(c, host_vmm{vs}, scale_aware(sc));
    rows.push_back(run_scales("scale_aware", kc, model, o, sc.base_capacity, truth_s, false));
  }
  print(rows);
  std::printf("\nheld = physical K/V memory backing the sequence at the end; peak = its maximum "
              "during decode; kept = live tokens per (layer, head).\ntok/s = whole decode loop "
              "(reference attention included); cache us/tok = time inside kvcache calls, prefill "
              "included, each row starting from a fresh pool (first touch of its pages).\n");

  // Quantizers (keep_all): memory per token and the attention error each format costs.
  std::vector<quant_row> qrows;
  add_quant_row(qrows, "none (fp16)", passthrough{}, cfg, vm, model, o);
  add_quant_row(qrows, "fp8_e4m3 (per layer)", fp8_e4m3{}, cfg, vm, model, o);
  add_quant_row(qrows, "fp8_e4m3 (per head)", fp8_e4m3{scale_granularity::per_head}, cfg, vm, model, o);
  add_quant_row(qrows, "q8_0", q8_0{}, cfg, vm, model, o);
  add_quant_row(qrows, "q4_0", q4_0{}, cfg, vm, model, o);
  add_quant_row(qrows, "kivi_per_token<8,32>", kivi_per_token<8>{}, cfg, vm, model, o);
  add_quant_row(qrows, "kivi_per_token<4,32>", kivi_per_token<4>{}, cfg, vm, model, o);
  add_quant_row(qrows, "kivi_per_token<3,32>", kivi_per_token<3>{}, cfg, vm, model, o);
  add_quant_row(qrows, "kivi_per_token<2,32>", kivi_per_token<2>{}, cfg, vm, model, o);
  add_quant_row(qrows, "kivi<4,32,128>", kivi<4, 32, 128>{}, cfg, vm, model, o);
  add_quant_row(qrows, "kivi<2,32,128>", kivi<2, 32, 128>{}, cfg, vm, model, o);
  print_quant(qrows);
  std::printf("\nbytes/token = K+V codes and scales of one token over all layers and KV heads; err = "
              "relative L2 of the attention output vs the fp16 keep-all cache (dequantized on the "
              "fly by reference::attention). kivi<b,g,r>: keys per channel (the newest r at fp16 in "
              "a residual window, not counted in bytes/token), values per token.\n");
  return 0;
}
