// SPDX-License-Identifier: Apache-2.0
// smollm: SmolLM2-135M (any GGUF `llama` model of that kind) decoding on the CPU with its K/V in a
// kvcache::cache. Fetch the model with scripts/fetch-model.
//
//   smollm [--model PATH] --prompt TEXT [--max-new N] [--chat]        greedy generation
//   smollm [--model PATH] --ppl FILE [--window N] [--chunk C] [--kl]  teacher-forced perplexity
//          (--kl: also the KL divergence from a keep-all fp32 cache run in lockstep)
//          --token-ids FILE: whitespace-separated decimal token ids instead of the text (implies --ppl)
//          --dump-logits FILE: raw little-endian float32 [predicted positions][vocab]; row i = the
//          logits after consuming token i (predicting token i+1), every row the perplexity scores
//   smollm [--model PATH] --ppl FILE --sweep "SPEC;SPEC;..."           many configurations at once
//          SPEC = policy[@budget][/quant], budget a ratio (0.25) or tokens (128t); all run in
//          lockstep over the same text, batched through the weights, against one keep-all reference
//   smollm [--model PATH] --bench-decode N [--context C]              decode speed at context C
//   smollm [--model PATH] --info                                      metadata and tensors
//   smollm [--model PATH] --tokenize FILE                             the token ids of all of FILE
// common: --policy keep_all|sink_window|heavy_hitter|snapkv|sentence_kv  --budget R (ratio of the tokens)
//         | --budget-tokens N   --quant none|fp8|q8_0|q4_0|kivi8|kivi4|kivi2   --threads N
//         --weights f16|f32 (how the dequantized weights are kept; default f16)
// sentence_kv (SentenceKV: sentences demoted to a holding tier, the best-scoring ones promoted back
// for each step) runs in a kvcache::tiered<host_vmm>; its budget is the working tier's tokens per
// head, like the other policies'. Its rows also report the bytes promoted per token and the share
// of promoted rows that a prefetch had staged. The paper's defaults (32 sinks, 32 recent, no
// retrieval for a sentence's first token, sentences capped at 100 tokens) can be changed per row:
// "sentence_kv:start=N,recent=N,threshold=N,max_sentence=N@0.2".

#include "gguf.hpp"
#include "model.hpp"
#include "tokenizer.hpp"

#include <kvcache/kvcache.hpp>
#include <kvcache/evict/sentence.hpp>
#include <kvcache/memory/tiered.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <thread>
#include <vector>

namespace {

using namespace smollm;

//! One cache configuration: a policy with its budget, and a quantizer.
struct variant {
  std::string policy = "keep_all", quant = "none";
  double ratio = 1.0;            // budget as a ratio of the tokens of the run ...
  std::uint32_t tokens = 0;      // ... or in tokens (when not 0)
  [[nodiscard]] bool reference() const { return policy == "keep_all" && quant == "none"; }
  [[nodiscard]] std::string name() const {
    std::string s = policy;
    if (policy != "keep_all") {
      char b[32];
      if (tokens) std::snprintf(b, sizeof b, "@%ut", tokens);
      else std::snprintf(b, sizeof b, "@%g", ratio);
      s += b;
    }
    return quant == "none" ? s : s + "/" + quant;
  }
  //! The budget in tokens for a run that appends `total` tokens.
  [[nodiscard]] std::uint32_t budget(std::uint32_t total) const {
    const auto b = tokens ? tokens : static_cast<std::uint32_t>(std::ceil(ratio * total));
    return std::clamp<std::uint32_t>(b, 1, total);
  }
};

struct options {
  std::string model, prompt, ppl_file, sweep;
  std::string token_ids, dump_logits;  // --ppl: token ids instead of the text; raw logits out
  std::string tokenize;                // --tokenize: print the ids of this file, one per line
  variant v;
  std::uint32_t max_new = 64, window = 512, chunk = 1, bench = 0, context = 1024;
  unsigned threads = 0;
  std::vector<std::int32_t> boundary_ids;  // the tokenizer's sentence ends (sentence_kv)
  bool chat = false, info = false, weights_f32 = false, kl = false;
};

std::string default_model() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  const std::string base = xdg && *xdg ? std::string(xdg) : std::string(home ? home : ".") + "/.cache";
  return base + "/kvcache/SmolLM2-135M-Instruct.Q4_1.gguf";
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// log of the softmax's denominator: log sum exp(logits)
double log_sum_exp(const float* logits, std::uint32_t vocab) {
  const float mx = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (std::uint32_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - mx);
  return mx + std::log(sum);
}

// ---- building a cache and a sequence for a variant ---------------------------------------------

//! What every cache of a run must hold.
struct run_shape {
  const weights& w;
  thread_pool& pool;
  std::uint32_t total = 0;  // tokens the run appends
  std::uint32_t step = 1;   // the most tokens one forward() appends before the policy evicts
  const std::vector<std::int32_t>* boundary_ids = nullptr;  // sentence ends (sentence_kv)
};

template <class Policy, class Quant>
std::unique_ptr<kv_sequence> make_sequence(const run_shape& rs, const variant& v, Policy policy, Quant quant) {
  // tiered policies (sentence_kv) demote to a holding tier behind the working tier
  constexpr bool tiered = kvcache::tiered_policy<Policy>;
  using memory_t = std::conditional_t<tiered, kvcache::tiered<kvcache::host_vmm>, kvcache::host_vmm>;
  using cache_t = kvcache::cache<memory_t, Policy, Quant>;
  const std::uint32_t budget = v.budget(rs.total);
  const bool evicts = v.policy != "keep_all" && budget < rs.total;
  kvcache::cache_config cfg;
  cfg.geo = kv_geometry(rs.w.cfg);
  cfg.max_tokens = evicts ? std::min(rs.total, budget + rs.step) : rs.total;  // room for one step past the budget
  cfg.budget = evicts ? budget : 0;
  kvcache::host_vmm_config vm;
  vm.page_size = 64 * 1024;
  vm.pool_pages = 6 * std::size_t{cfg.geo.layers} *
                  (std::size_t{cfg.max_tokens} * cfg.geo.token_bytes() / vm.page_size + 2);
  auto kc = std::make_unique<cache_t>(cfg, memory_t{kvcache::host_vmm{vm}}, std::move(policy), std::move(quant));
  auto seq = std::make_unique<cache_sequence<cache_t>>(std::move(kc), rs.w.cfg, rs.pool);
  if (rs.boundary_ids) seq->set_boundary_ids(*rs.boundary_ids);
  return seq;
}

template <class Policy>
kvcache::result<std::unique_ptr<kv_sequence>> pick_quant(const run_shape& rs, const variant& v, Policy p) {
  const std::string& q = v.quant;
  if (q == "none") return make_sequence(rs, v, p, kvcache::passthrough{});
  if (q == "fp8") {  // scale 1 (vLLM's default k/v_scale): the library's default calibrates from
                     // the first append, a single token when decoding token by token
    const std::vector<float> ones(rs.w.cfg.layers, 1.0f);
    return make_sequence(rs, v, p, kvcache::fp8_e4m3{kvcache::scale_granularity::per_layer, ones, ones});
  }
  if (q == "q8_0") return make_sequence(rs, v, p, kvcache::q8_0{});
  if (q == "q4_0") return make_sequence(rs, v, p, kvcache::q4_0{});
  if (q == "kivi8") return make_sequence(rs, v, p, kvcache::kivi<8, 32, 128>{});
  if (q == "kivi4") return make_sequence(rs, v, p, kvcache::kivi<4, 32, 128>{});
  if (q == "kivi2") return make_sequence(rs, v, p, kvcache::kivi<2, 32, 128>{});
  return kvcache::status{kvcache::errc::invalid_argument,
                         "unknown quantizer '" + q + "' (none|fp8|q8_0|q4_0|kivi8|kivi4|kivi2)"};
}

//! A sequence in a new cache of the variant's policy, budget and quantizer.
kvcache::result<std::unique_ptr<kv_sequence>> new_sequence(const run_shape& rs, const variant& v) {
  if (v.policy == "keep_all") return pick_quant(rs, v, kvcache::keep_all{});
  if (v.policy == "sink_window") return pick_quant(rs, v, kvcache::sink_window{4});
  if (v.policy == "heavy_hitter") {  // H2O's split: half heavy hitters, half recent
    const std::uint32_t budget = v.budget(rs.total);
    kvcache::heavy_hitter_config hc;
    hc.heavy = std::max<std::uint32_t>(1, budget - budget / 2);
    hc.recent = std::max<std::uint32_t>(1, budget / 2);
    return pick_quant(rs, v, kvcache::heavy_hitter<kvcache::attention_signal>(hc));
  }
  if (v.policy == "snapkv") return pick_quant(rs, v, kvcache::snapkv<kvcache::query_signal>());
  if (v.policy == "sentence_kv" || v.policy.rfind("sentence_kv:", 0) == 0) {
    // the paper's defaults, or "sentence_kv:start=N,recent=N,threshold=N,max_sentence=N"; the
    // budget is the cache's
    if (v.quant != "none")
      return kvcache::status{kvcache::errc::invalid_argument, "sentence_kv runs with quantizer none only"};
    kvcache::sentence_kv_config sc;
    std::stringstream opts(v.policy.size() > 12 ? v.policy.substr(12) : std::string());
    for (std::string kv; std::getline(opts, kv, ',');) {
      const auto eq = kv.find('=');
      char* end = nullptr;
      const unsigned long x = eq == std::string::npos ? 0 : std::strtoul(kv.c_str() + eq + 1, &end, 10);
      const std::string key = kv.substr(0, eq);
      if (eq == std::string::npos || end == kv.c_str() + eq + 1 || *end != '\0')
        return kvcache::status{kvcache::errc::invalid_argument, "sentence_kv option '" + kv + "' is not key=N"};
      if (key == "start") sc.start = static_cast<std::uint32_t>(x);
      else if (key == "recent") sc.recent = static_cast<std::uint32_t>(x);
      else if (key == "threshold") sc.length_threshold = static_cast<std::uint32_t>(x);
      else if (key == "max_sentence") sc.max_sentence_tokens = static_cast<std::uint32_t>(x);
      else
        return kvcache::status{kvcache::errc::invalid_argument,
                               "sentence_kv option '" + key + "' (start|recent|threshold|max_sentence)"};
    }
    return make_sequence(rs, v, kvcache::sentence_kv{sc}, kvcache::passthrough{});
  }
  return kvcache::status{kvcache::errc::invalid_argument,
                         "unknown policy '" + v.policy + "' (keep_all|sink_window|heavy_hitter|snapkv|sentence_kv)"};
}

//! "policy[@budget][/quant]": budget a ratio in (0, 1] or a token count ("128t").
kvcache::result<variant> parse_variant(const std::string& spec) {
  variant v;
  std::string s = spec;
  if (const auto slash = s.find('/'); slash != std::string::npos) {
    v.quant = s.substr(slash + 1);
    s.resize(slash);
  }
  if (const auto at = s.find('@'); at != std::string::npos) {
    const std::string b = s.substr(at + 1);
    s.resize(at);
    char* end = nullptr;
    const double x = std::strtod(b.c_str(), &end);
    if (end != b.c_str() && std::string(end) == "t" && x >= 1) v.tokens = static_cast<std::uint32_t>(x);
    else if (end != b.c_str() && *end == '\0' && x > 0 && x <= 1) v.ratio = x;
    else
      return kvcache::status{kvcache::errc::invalid_argument,
                             "'" + spec + "': the budget after @ is a ratio in (0, 1] or a token count like 128t"};
  }
  v.policy = s;
  return v;
}

// ---- perplexity ---------------------------------------------------------------------------------

//! The holding tier's traffic of a tiered cache over a run of `n` tokens, in one line;
//! `working`: the mean tokens per head its attention saw.
std::string tier_line(const kvcache::cache_stats& st, std::uint32_t n, double working) {
  const auto& t = st.tier;
  const std::uint64_t fetched = t.rows_hit + t.rows_missed;
  char b[512];
  std::snprintf(b, sizeof b,
                "mean working set %.1f tokens per head; holding tier: %.1f KiB/token demoted, %.1f KiB/token "
                "promoted, %.1f KiB/token prefetched; promoted rows %llu, %.1f%% staged by a prefetch (%llu "
                "waits); held %.2f MiB at the end, peak %.2f MiB, %zu groups",
                working, t.bytes_demoted / 1024.0 / n, t.bytes_promoted / 1024.0 / n,
                t.bytes_prefetched / 1024.0 / n, static_cast<unsigned long long>(fetched),
                fetched ? 100.0 * t.rows_hit / fetched : 0.0, static_cast<unsigned long long>(t.prefetch_waits),
                t.bytes_held / 1048576.0, t.peak_bytes_held / 1048576.0, t.groups);
  return b;
}

//! A variant's running totals over the predicted tokens.
struct score {
  double nll = 0, kl = 0, kl_max = 0;
  std::uint32_t top1 = 0, n = 0;
};

//! Teacher-forced perplexity of `ids` for every variant at once: each variant gets a sequence in
//! its own cache, all of them consume the same tokens in one batch per step, and the keep-all
//! fp32 sequence (one of them, or an extra one when `kl` asks for it) is the reference for KL.
int perplexity(const options& o, const weights& w, thread_pool& pool, const std::vector<std::int32_t>& ids,
               const std::vector<variant>& variants, bool table) {
  const std::uint32_t n = static_cast<std::uint32_t>(ids.size()), V = w.cfg.vocab;
  const run_shape rs{w, pool, n, o.chunk, &o.boundary_ids};
  std::vector<std::unique_ptr<kv_sequence>> seqs;
  for (const variant& v : variants) {
    auto s = new_sequence(rs, v);
    if (!s) {
      std::fprintf(stderr, "smollm: %s: %s\n", v.name().c_str(), s.error().message().c_str());
      return 2;
    }
    seqs.push_back(std::move(*s));
  }
  std::size_t ref = std::find_if(variants.begin(), variants.end(), [](const variant& v) { return v.reference(); }) -
                    variants.begin();
  const bool with_kl = o.kl || table;
  if (with_kl && ref == variants.size()) seqs.push_back(std::move(new_sequence(rs, variant{}).value()));
  if (!with_kl) ref = seqs.size();  // none

  std::vector<kv_sequence*> batch;
  for (auto& s : seqs) batch.push_back(s.get());
  const std::size_t S = batch.size();

  // --dump-logits: raw float32 rows [predicted positions][vocab] of the first variant
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> dump(nullptr, &std::fclose);
  if (!o.dump_logits.empty()) {
    static_assert(std::endian::native == std::endian::little, "--dump-logits writes little-endian float32");
    dump.reset(std::fopen(o.dump_logits.c_str(), "wb"));
    if (!dump) {
      std::fprintf(stderr, "smollm: cannot create %s\n", o.dump_logits.c_str());
      return 1;
    }
  }

  engine e(w, pool);
  std::vector<std::int32_t> step_tokens(S * o.chunk);
  std::vector<float> logits(S * o.chunk * std::size_t{V});
  std::vector<double> ref_p(V);  // the reference's next-token probabilities, one row at a time
  std::vector<score> sc(S);
  std::vector<double> live_sum(S);  // tiered sequences: live entries after each step (what attention saw)
  std::uint32_t steps = 0;
  const double t0 = now_s();
  for (std::uint32_t at = 0; at < n; at += o.chunk) {
    const std::uint32_t m = std::min(o.chunk, n - at);
    for (std::size_t s = 0; s < S; ++s) {
      std::copy_n(ids.data() + at, m, step_tokens.data() + s * m);
      batch[s]->set_step_tokens(step_tokens.data() + s * m, m);
    }
    if (auto st = e.forward(batch, step_tokens.data(), m, logits.data(), true); !st) {
      std::fprintf(stderr, "smollm: %s\n", st.message().c_str());
      return 1;
    }
    ++steps;
    for (std::size_t s = 0; s < S; ++s)
      if (batch[s]->tiered()) live_sum[s] += double(batch[s]->stats().entries_live);
    if (table && (at + m) / 256 != at / 256)  // a long sweep says how far it is
      std::fprintf(stderr, "smollm: %u of %u tokens, %.0f s\n", at + m, n, now_s() - t0);
    auto row = [&](std::size_t s, std::uint32_t t) { return logits.data() + (s * m + t) * V; };
    for (std::uint32_t t = 0; t < m && at + t + 1 < n; ++t) {
      const std::int32_t target = ids[at + t + 1];
      if (dump && std::fwrite(row(0, t), sizeof(float), V, dump.get()) != V) {
        std::fprintf(stderr, "smollm: cannot write %s\n", o.dump_logits.c_str());
        return 1;
      }
      // KL(p_ref || q) = sum p_ref (log p_ref - log q): the reference's terms once per row
      double ref_plogp = 0, ref_lse = 0;
      std::ptrdiff_t ref_top = 0;
      if (ref < S) {
        const float* r = row(ref, t);
        ref_lse = log_sum_exp(r, V);
        for (std::uint32_t i = 0; i < V; ++i) {
          ref_p[i] = std::exp(double(r[i]) - ref_lse);
          ref_plogp += ref_p[i] * (double(r[i]) - ref_lse);
        }
        ref_top = std::max_element(r, r + V) - r;
      }
      pool.run(static_cast<unsigned>(S), [&](unsigned s) {
        const float* l = row(s, t);
        const double lse = log_sum_exp(l, V);
        score& c = sc[s];
        c.nll -= double(l[target]) - lse;
        ++c.n;
        if (ref < S) {
          double cross = 0;  // sum p_ref log q
          for (std::uint32_t i = 0; i < V; ++i) cross += ref_p[i] * (double(l[i]) - lse);
          const double d = std::max(0.0, ref_plogp - cross);
          c.kl += d;
          c.kl_max = std::max(c.kl_max, d);
          c.top1 += std::max_element(l, l + V) - l == ref_top;
        }
      });
    }
  }
  const double wall = now_s() - t0;
  // Step time of one sequence: its own attention and kvcache calls, plus its share of the
  // batch's common work (matmuls, norms, RoPE), which a batch of one would pay alone.
  double own_sum = 0;
  for (auto* s : batch) own_sum += s->time.attention + s->time.cache;
  const double common = std::max(0.0, e.time.total - own_sum) / double(S);
  auto step_s = [&](std::size_t s) { return common + batch[s]->time.attention + batch[s]->time.cache; };
  auto working = [&](std::size_t s) { return live_sum[s] / (double(steps) * w.cfg.layers * w.cfg.kv_heads); };

  if (!table) {  // one variant: the lines a script reads
    const score& c = sc[0];
    const auto st = batch[0]->stats();
    std::printf("perplexity %.4f  (mean nll %.5f over %u predicted tokens)\n", std::exp(c.nll / c.n), c.nll / c.n,
                c.n);
    if (ref < S)
      std::printf("vs keep_all fp32: mean KL %.5f nats (max %.4f), top-1 agreement %.1f%%\n", c.kl / c.n, c.kl_max,
                  100.0 * c.top1 / c.n);
    std::printf("KV held at the end: %.2f MiB live, %.2f MiB backed; %.1f tok/s; time in kvcache %.1f%%, "
                "attention %.1f%%\n",
                st.bytes_live / 1048576.0, st.bytes_backed / 1048576.0, n / step_s(0),
                100.0 * batch[0]->time.cache / step_s(0), 100.0 * batch[0]->time.attention / step_s(0));
    if (batch[0]->tiered()) std::printf("%s\n", tier_line(st, n, working(0)).c_str());
    return 0;
  }
  const double ref_ppl = std::exp(sc[ref].nll / sc[ref].n);
  std::printf("%u tokens (%u predicted), chunk %u, %zu sequences in lockstep, %u threads: %.1f s, %.1f tok/s "
              "for the batch\n\n",
              n, sc[0].n, o.chunk, S, pool.size(), wall, double(n) * S / wall);
  // tiered policies (sentence_kv): two more columns, the holding tier's traffic
  const bool any_tiered = std::any_of(batch.begin(), batch.end(), [](const kv_sequence* s) { return s->tiered(); });
  std::printf("| configuration | budget | perplexity | Δ vs keep_all | mean KL (nats) | top-1 agree | KV live "
              "(MiB) | tok/s* | in kvcache* |%s\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |%s\n",
              any_tiered ? " promoted (KiB/token) | prefetch hits |" : "", any_tiered ? " --- | --- |" : "");
  for (std::size_t s = 0; s < variants.size(); ++s) {
    const score& c = sc[s];
    const double ppl = std::exp(c.nll / c.n);
    const auto st = batch[s]->stats();
    const variant& v = variants[s];
    std::printf("| %s | %u | %.4f | %+.1f%% | %.4f | %.1f%% | %.2f | %.1f | %.2f%% |", v.name().c_str(),
                v.policy == "keep_all" ? n : v.budget(n), ppl, 100.0 * (ppl / ref_ppl - 1), c.kl / c.n,
                100.0 * c.top1 / c.n, st.bytes_live / 1048576.0, n / step_s(s),
                100.0 * batch[s]->time.cache / step_s(s));
    if (any_tiered) {
      const auto& t = st.tier;
      const std::uint64_t fetched = t.rows_hit + t.rows_missed;
      if (!batch[s]->tiered()) std::printf(" — | — |");
      else if (fetched == 0) std::printf(" %.1f | — |", t.bytes_promoted / 1024.0 / n);
      else std::printf(" %.1f | %.1f%% |", t.bytes_promoted / 1024.0 / n, 100.0 * t.rows_hit / fetched);
    }
    std::printf("\n");
  }
  std::printf("\n* per sequence: its own attention and kvcache time plus 1/%zu of the batch's shared matmuls; "
              "measure a lone run with --ppl or --bench-decode for real tokens/s.\n",
              S);
  if (any_tiered) {
    std::printf("promoted: bytes copied from the holding tier back to the working tier (all layers and heads) per "
                "token; prefetch hits: promoted rows a prefetch had staged, of all promoted rows.\n");
    for (std::size_t s = 0; s < variants.size(); ++s)
      if (batch[s]->tiered())
        std::printf("%s: %s\n", variants[s].name().c_str(), tier_line(batch[s]->stats(), n, working(s)).c_str());
  }
  std::fflush(stdout);
  return 0;
}

// ---- generation and decode speed ----------------------------------------------------------------

int generate(const options& o, const weights& w, thread_pool& pool, const tokenizer& tok,
             const std::vector<std::int32_t>& prompt) {
  const std::uint32_t total = static_cast<std::uint32_t>(prompt.size()) + o.max_new;
  auto seq = new_sequence(run_shape{w, pool, total, static_cast<std::uint32_t>(prompt.size()), &o.boundary_ids}, o.v);
  if (!seq) {
    std::fprintf(stderr, "smollm: %s\n", seq.error().message().c_str());
    return 2;
  }
  engine e(w, pool);
  std::vector<float> logits(w.cfg.vocab);
  const double t0 = now_s();
  (*seq)->set_step_tokens(prompt.data(), static_cast<std::uint32_t>(prompt.size()));
  if (auto st = e.forward(**seq, prompt.data(), static_cast<std::uint32_t>(prompt.size()), logits.data()); !st) {
    std::fprintf(stderr, "smollm: %s\n", st.message().c_str());
    return 1;
  }
  const double t1 = now_s();
  std::uint32_t produced = 0;
  for (; produced < o.max_new; ++produced) {
    std::int32_t next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    if (next == tok.eos || tok.piece(next) == "<|im_end|>") break;
    std::fputs(tok.decode(next).c_str(), stdout);
    std::fflush(stdout);
    if (produced + 1 == o.max_new) {
      ++produced;
      break;
    }
    (*seq)->set_step_tokens(&next, 1);
    if (auto st = e.forward(**seq, &next, 1, logits.data()); !st) {
      std::fprintf(stderr, "\nsmollm: %s\n", st.message().c_str());
      return 1;
    }
  }
  const double t2 = now_s();
  std::printf("\n[prompt %zu tokens: %.1f tok/s; %u generated: %.1f tok/s]\n", prompt.size(),
              prompt.size() / (t1 - t0), produced, produced > 1 ? (produced - 1) / (t2 - t1) : 0.0);
  return 0;
}

// prefill `context` tokens (the prompt repeated), then decode `bench` tokens greedily
int bench_decode(const options& o, const weights& w, thread_pool& pool, const std::vector<std::int32_t>& prompt) {
  auto seq = new_sequence(run_shape{w, pool, o.context + o.bench, 64, &o.boundary_ids}, o.v);
  if (!seq) {
    std::fprintf(stderr, "smollm: %s\n", seq.error().message().c_str());
    return 2;
  }
  kv_sequence& s = **seq;
  engine e(w, pool);
  std::vector<std::int32_t> ctx;
  while (ctx.size() < o.context) ctx.insert(ctx.end(), prompt.begin(), prompt.end());
  ctx.resize(o.context);
  std::vector<float> logits(w.cfg.vocab);
  double t0 = now_s();
  for (std::uint32_t at = 0; at < o.context; at += 64) {
    const std::uint32_t m = std::min<std::uint32_t>(64, o.context - at);
    s.set_step_tokens(ctx.data() + at, m);
    e.forward(s, ctx.data() + at, m, logits.data()).check();
  }
  const double prefill = now_s() - t0;
  e.time = {};
  s.time = {};
  t0 = now_s();
  for (std::uint32_t i = 0; i < o.bench; ++i) {
    const auto next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    s.set_step_tokens(&next, 1);
    e.forward(s, &next, 1, logits.data()).check();
  }
  const double secs = now_s() - t0;
  std::printf("prefill %u tokens: %.1f tok/s; decode %u tokens at context %u..%u: %.1f tok/s "
              "(%.2f ms/token; kvcache %.1f%%, attention %.1f%%)\n",
              o.context, o.context / prefill, o.bench, o.context, o.context + o.bench, o.bench / secs,
              1e3 * secs / o.bench, 100.0 * s.time.cache / e.time.total, 100.0 * s.time.attention / e.time.total);
  return 0;
}

// ---- input --------------------------------------------------------------------------------------

// --token-ids: whitespace-separated decimal token ids, each below the vocabulary size
kvcache::result<std::vector<std::int32_t>> read_token_ids(const std::string& path, std::uint32_t vocab) {
  std::ifstream in(path);
  if (!in) return kvcache::status{kvcache::errc::system_error, "cannot read --token-ids file " + path};
  std::vector<std::int32_t> ids;
  std::string word;
  while (in >> word) {
    char* end = nullptr;
    const long long v = std::strtoll(word.c_str(), &end, 10);
    if (*end != '\0' || v < 0 || v >= vocab)
      return kvcache::status{kvcache::errc::invalid_argument,
                             path + ": '" + word + "' is not a token id below " + std::to_string(vocab)};
    ids.push_back(static_cast<std::int32_t>(v));
  }
  return ids;
}

// the tokens of a prefix of a text file long enough for `window` tokens
kvcache::result<std::vector<std::int32_t>> read_text(const std::string& path, std::uint32_t window,
                                                     const tokenizer& tok) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return kvcache::status{kvcache::errc::system_error, "cannot read " + path};
  std::string text;
  std::vector<char> buf(std::size_t{window} * 8 + 4096);
  in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  text.assign(buf.data(), static_cast<std::size_t>(in.gcount()));
  if (in.gcount() == static_cast<std::streamsize>(buf.size())) {  // cut at a line end
    const auto nl = text.rfind('\n');
    if (nl != std::string::npos) text.resize(nl + 1);
  }
  return tok.encode(text);
}

int usage(std::FILE* to = stderr) {
  std::fprintf(to,
               "usage: smollm [--model PATH] (--prompt TEXT [--max-new N] [--chat] | --ppl FILE [--window N] "
               "[--chunk C] [--kl] [--token-ids FILE] [--dump-logits FILE] [--sweep SPECS] | --bench-decode N "
               "[--context C] | --info | --tokenize FILE)\n"
               "              [--policy keep_all|sink_window|heavy_hitter|snapkv|sentence_kv] [--budget R | "
               "--budget-tokens N]\n"
               "              [--quant none|fp8|q8_0|q4_0|kivi8|kivi4|kivi2] [--threads N] [--weights f16|f32]\n"
               "  --sweep \"keep_all;heavy_hitter@0.25;snapkv@128t;keep_all/kivi4\": SPEC = "
               "policy[@budget][/quant], all in lockstep (see the header of smollm.cpp)\n");
  return to == stderr ? 2 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  o.model = default_model();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "smollm: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto num = [&]() { return static_cast<std::uint32_t>(std::strtoul(val().c_str(), nullptr, 10)); };
    if (a == "--model") o.model = val();
    else if (a == "--prompt") o.prompt = val();
    else if (a == "--max-new") o.max_new = num();
    else if (a == "--chat") o.chat = true;
    else if (a == "--ppl") o.ppl_file = val();
    else if (a == "--token-ids") o.token_ids = val();
    else if (a == "--dump-logits") o.dump_logits = val();
    else if (a == "--sweep") o.sweep = val();
    else if (a == "--window") o.window = num();
    else if (a == "--chunk") o.chunk = std::max<std::uint32_t>(1, num());
    else if (a == "--bench-decode") o.bench = num();
    else if (a == "--context") o.context = std::max<std::uint32_t>(1, num());
    else if (a == "--policy") o.v.policy = val();
    else if (a == "--budget") o.v.ratio = std::atof(val().c_str());
    else if (a == "--budget-tokens") o.v.tokens = num();
    else if (a == "--quant") o.v.quant = val();
    else if (a == "--threads") o.threads = num();
    else if (a == "--info") o.info = true;
    else if (a == "--tokenize") o.tokenize = val();
    else if (a == "--kl") o.kl = true;
    else if (a == "--weights") {
      const std::string wf = val();
      if (wf != "f16" && wf != "f32") return usage();
      o.weights_f32 = wf == "f32";
    } else if (a == "-h" || a == "--help") return usage(stdout);
    else return usage();
  }
  if (!(o.v.ratio > 0 && o.v.ratio <= 1)) {
    std::fprintf(stderr, "smollm: --budget is a ratio in (0, 1]\n");
    return 2;
  }
  if (!o.token_ids.empty() && o.ppl_file.empty()) o.ppl_file = o.token_ids;  // --token-ids implies --ppl
  if ((!o.dump_logits.empty() || !o.sweep.empty()) && o.ppl_file.empty()) {
    std::fprintf(stderr, "smollm: --dump-logits and --sweep need --ppl or --token-ids\n");
    return 2;
  }
  if (!o.dump_logits.empty() && !o.sweep.empty()) {
    std::fprintf(stderr, "smollm: --dump-logits is for one configuration, not --sweep\n");
    return 2;
  }
  std::vector<variant> variants;
  if (!o.sweep.empty()) {
    std::stringstream ss(o.sweep);
    for (std::string spec; std::getline(ss, spec, ';');) {
      if (spec.empty()) continue;
      auto v = parse_variant(spec);
      if (!v) {
        std::fprintf(stderr, "smollm: --sweep %s\n", v.error().message().c_str());
        return 2;
      }
      variants.push_back(*v);
    }
    if (variants.empty()) {
      std::fprintf(stderr, "smollm: --sweep has no configuration\n");
      return 2;
    }
  }
  if (o.prompt.empty() && o.ppl_file.empty() && !o.bench && !o.info && o.tokenize.empty()) return usage();

  auto f = gguf::file::open(o.model);
  if (!f) {
    std::fprintf(stderr, "smollm: %s\n%s", f.error().message().c_str(),
                 f.error().code() == kvcache::errc::system_error ? "(fetch it with scripts/fetch-model)\n" : "");
    return 1;
  }
  if (o.info) {
    for (const auto& [k, v] : f->meta) {
      std::printf("%-45s ", k.c_str());
      if (v.type == gguf::vtype::string) std::printf("%.60s\n", v.s.c_str());
      else if (v.type == gguf::vtype::array) std::printf("[%zu]\n", v.size());
      else std::printf("%g\n", v.f);
    }
    for (const auto& t : f->tensors)
      std::printf("%-32s %-5s [%llu x %llu]\n", t.name.c_str(), gguf::file::type_name(t.type).c_str(),
                  static_cast<unsigned long long>(t.row_length()), static_cast<unsigned long long>(t.rows()));
    return 0;
  }
  tokenizer tok;
  if (auto st = tok.init(*f); !st) {
    std::fprintf(stderr, "smollm: %s\n", st.message().c_str());
    return 1;
  }
  if (!o.tokenize.empty()) {  // the tokenizer only (e.g. to compare ids with llama.cpp's)
    std::ifstream in(o.tokenize, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "smollm: cannot read %s\n", o.tokenize.c_str());
      return 1;
    }
    const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    for (const auto id : tok.encode(text)) std::printf("%d\n", static_cast<int>(id));
    return 0;
  }
  // SentenceKV's sentence ends: the boundary strings that are one token of this vocabulary
  o.boundary_ids = kvcache::sentence_boundary_ids([&](std::string_view piece) -> std::int32_t {
    const auto ids = tok.encode(std::string(piece));
    return ids.size() == 1 ? ids[0] : -1;
  });
  const double t0 = now_s();
  auto w = load(*f, o.weights_f32 ? weight_format::f32 : weight_format::f16);
  if (!w) {
    std::fprintf(stderr, "smollm: %s\n", w.error().message().c_str());
    return 1;
  }
  std::fprintf(stderr, "smollm: loaded %s (%u layers, hidden %u, %u/%u heads, vocab %u) in %.1f s\n",
               o.model.c_str(), w->cfg.layers, w->cfg.hidden, w->cfg.heads, w->cfg.kv_heads, w->cfg.vocab,
               now_s() - t0);
  thread_pool pool(o.threads ? o.threads : std::max(1u, std::thread::hardware_concurrency()));

  if (!o.ppl_file.empty()) {
    auto ids = o.token_ids.empty() ? read_text(o.ppl_file, o.window, tok) : read_token_ids(o.token_ids, w->cfg.vocab);
    if (!ids) {
      std::fprintf(stderr, "smollm: %s\n", ids.error().message().c_str());
      return 1;
    }
    if (ids->size() < 2) {
      std::fprintf(stderr, "smollm: %s has fewer than 2 tokens\n", o.ppl_file.c_str());
      return 1;
    }
    if (ids->size() < o.window) std::fprintf(stderr, "smollm: the text has only %zu tokens\n", ids->size());
    ids->resize(std::min<std::size_t>(o.window, ids->size()));
    const auto n = static_cast<std::uint32_t>(ids->size());
    if (variants.empty()) {
      std::printf("policy %s, quant %s, budget %u of %u tokens, chunk %u, threads %u\n", o.v.policy.c_str(),
                  o.v.quant.c_str(), o.v.policy == "keep_all" ? n : o.v.budget(n), n, o.chunk, pool.size());
      return perplexity(o, *w, pool, *ids, {o.v}, false);
    }
    return perplexity(o, *w, pool, *ids, variants, true);
  }
  std::string p = o.prompt.empty() ? "In the beginning God created the heaven and the earth." : o.prompt;
  if (o.chat) p = "<|im_start|>user\n" + p + "<|im_end|>\n<|im_start|>assistant\n";
  std::vector<std::int32_t> prompt = tok.encode(p, /*parse_special=*/true);
  if (prompt.empty()) prompt.push_back(tok.bos >= 0 ? tok.bos : 0);
  return o.bench ? bench_decode(o, *w, pool, prompt) : generate(o, *w, pool, tok, prompt);
}
