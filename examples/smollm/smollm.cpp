// SPDX-License-Identifier: Apache-2.0
// smollm: SmolLM2-135M (any GGUF `llama` model of that kind) decoding on the CPU with its K/V in a
// kvcache::cache. Fetch the model with scripts/fetch-model.
//
//   smollm [--model PATH] --prompt TEXT [--max-new N] [--chat]        greedy generation
//   smollm [--model PATH] --ppl FILE [--window N] [--chunk C] [--kl]  teacher-forced perplexity
//          (--kl: also the KL divergence from a keep-all fp32 cache run in lockstep)
//   smollm [--model PATH] --bench-decode N [--context C]              decode speed at context C
//   smollm [--model PATH] --info                                      metadata and tensors
// common: --policy keep_all|sink_window|heavy_hitter|snapkv  --budget R (ratio of the tokens)
//         | --budget-tokens N   --quant none|fp8|q8_0|q4_0|kivi8|kivi4|kivi2   --threads N
//         --weights f16|f32 (how the dequantized weights are kept; default f16)

#include "gguf.hpp"
#include "model.hpp"
#include "tokenizer.hpp"

#include <kvcache/kvcache.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace smollm;

struct options {
  std::string model, prompt, ppl_file, policy = "keep_all", quant = "none";
  std::uint32_t max_new = 64, window = 512, chunk = 1, bench = 0, context = 1024, budget_tokens = 0;
  unsigned threads = 0;
  double budget = 1.0;
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

// log-softmax of the target: log p(target)
double log_prob(const float* logits, std::uint32_t vocab, std::int32_t target) {
  float mx = logits[0];
  for (std::uint32_t i = 1; i < vocab; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (std::uint32_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - mx);
  return double(logits[target]) - mx - std::log(sum);
}

// KL(p || q) of the softmaxes of two logit rows, in nats
double kl_div(const float* p_logits, const float* q_logits, std::uint32_t vocab) {
  const float pm = *std::max_element(p_logits, p_logits + vocab), qm = *std::max_element(q_logits, q_logits + vocab);
  double ps = 0, qs = 0;
  for (std::uint32_t i = 0; i < vocab; ++i) {
    ps += std::exp(double(p_logits[i]) - pm);
    qs += std::exp(double(q_logits[i]) - qm);
  }
  const double lps = std::log(ps), lqs = std::log(qs);
  double kl = 0;
  for (std::uint32_t i = 0; i < vocab; ++i) {
    const double lp = double(p_logits[i]) - pm - lps, lq = double(q_logits[i]) - qm - lqs;
    kl += std::exp(lp) * (lp - lq);
  }
  return std::max(0.0, kl);
}

struct job {
  const options& o;
  const weights& w;
  const tokenizer& tok;
  thread_pool& pool;
  std::vector<std::int32_t> ids;  // the text (ppl) or the prompt
  std::uint32_t total = 0;        // tokens the run will append
};

template <class Cache>
int run_with(job& j, Cache& kc, std::uint32_t budget) {
  const options& o = j.o;
  const std::uint32_t V = j.w.cfg.vocab;
  engine<Cache> e(j.w, kc, j.pool);
  std::printf("policy %s, quant %s, budget %u of %u tokens, chunk %u, threads %u\n", o.policy.c_str(),
              Cache::quantizer_type::name(), budget, j.total, o.chunk, j.pool.size());
  if (!o.ppl_file.empty()) {
    const std::uint32_t n = std::min<std::uint32_t>(o.window, static_cast<std::uint32_t>(j.ids.size()));
    std::vector<float> logits(std::size_t{o.chunk} * V), ref_logits;
    // --kl: a keep-all fp32 cache runs in lockstep; KL(p_keep_all || p_this) per predicted token
    using ref_cache = kvcache::cache<kvcache::host_vmm, kvcache::keep_all, kvcache::passthrough>;
    std::unique_ptr<ref_cache> rc;
    std::unique_ptr<engine<ref_cache>> re;
    if (o.kl) {
      kvcache::cache_config rcfg;
      rcfg.geo = kc.geo();
      rcfg.max_tokens = n;
      kvcache::host_vmm_config vm;
      vm.pool_pages = 6 * std::size_t{rcfg.geo.layers} * (std::size_t{n} * rcfg.geo.token_bytes() / vm.page_size + 2);
      rc = std::make_unique<ref_cache>(rcfg, kvcache::host_vmm{vm});
      re = std::make_unique<engine<ref_cache>>(j.w, *rc, j.pool);
      ref_logits.resize(logits.size());
    }
    double nll = 0, kl = 0, kl_max = 0;
    std::uint32_t scored = 0, top1 = 0;
    const double t0 = now_s();
    double ref_s = 0;
    for (std::uint32_t at = 0; at < n; at += o.chunk) {
      const std::uint32_t m = std::min(o.chunk, n - at);
      if (auto st = e.forward(j.ids.data() + at, m, logits.data(), true); !st) {
        std::fprintf(stderr, "smollm: %s\n", st.message().c_str());
        return 1;
      }
      if (re) {
        const double r0 = now_s();
        re->forward(j.ids.data() + at, m, ref_logits.data(), true).check();
        ref_s += now_s() - r0;
      }
      for (std::uint32_t t = 0; t < m && at + t + 1 < n; ++t, ++scored) {
        const float* l = logits.data() + std::size_t{t} * V;
        nll -= log_prob(l, V, j.ids[at + t + 1]);
        if (re) {
          const float* r = ref_logits.data() + std::size_t{t} * V;
          const double d = kl_div(r, l, V);
          kl += d;
          kl_max = std::max(kl_max, d);
          top1 += std::max_element(r, r + V) - r == std::max_element(l, l + V) - l;
        }
      }
    }
    const double secs = now_s() - t0 - ref_s;
    const auto st = kc.stats();
    std::printf("perplexity %.4f  (mean nll %.5f over %u predicted tokens)\n", std::exp(nll / scored),
                nll / scored, scored);
    if (re)
      std::printf("vs keep_all fp32: mean KL %.5f nats (max %.4f), top-1 agreement %.1f%%\n", kl / scored, kl_max,
                  100.0 * top1 / scored);
    std::printf("KV held at the end: %.2f MiB live, %.2f MiB backed; %.1f tok/s; time in kvcache %.1f%%, "
                "attention %.1f%%\n",
                st.bytes_live / 1048576.0, st.bytes_backed / 1048576.0, n / secs,
                100.0 * e.time.cache / e.time.total, 100.0 * e.time.attention / e.time.total);
    return 0;
  }
  if (o.bench) {  // prefill `context` tokens (the prompt repeated), then decode `bench` tokens
    std::vector<std::int32_t> ctx;
    while (ctx.size() < o.context) ctx.insert(ctx.end(), j.ids.begin(), j.ids.end());
    ctx.resize(o.context);
    std::vector<float> logits(V);
    double t0 = now_s();
    for (std::uint32_t at = 0; at < o.context; at += 64) {
      const std::uint32_t m = std::min<std::uint32_t>(64, o.context - at);
      e.forward(ctx.data() + at, m, logits.data()).check();
    }
    const double prefill = now_s() - t0;
    e.time = {};
    std::int32_t next = 0;
    t0 = now_s();
    for (std::uint32_t i = 0; i < o.bench; ++i) {
      next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      e.forward(&next, 1, logits.data()).check();
    }
    const double secs = now_s() - t0;
    std::printf("prefill %u tokens: %.1f tok/s; decode %u tokens at context %u..%u: %.1f tok/s "
                "(%.2f ms/token; kvcache %.1f%%, attention %.1f%%)\n",
                o.context, o.context / prefill, o.bench, o.context, o.context + o.bench, o.bench / secs,
                1e3 * secs / o.bench, 100.0 * e.time.cache / e.time.total,
                100.0 * e.time.attention / e.time.total);
    return 0;
  }
  // generation
  std::vector<float> logits(V);
  const double t0 = now_s();
  if (auto st = e.forward(j.ids.data(), static_cast<std::uint32_t>(j.ids.size()), logits.data()); !st) {
    std::fprintf(stderr, "smollm: %s\n", st.message().c_str());
    return 1;
  }
  const double t1 = now_s();
  std::uint32_t produced = 0;
  for (; produced < o.max_new; ++produced) {
    std::int32_t next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    if (next == j.tok.eos || j.tok.piece(next) == "<|im_end|>") break;
    std::fputs(j.tok.decode(next).c_str(), stdout);
    std::fflush(stdout);
    if (produced + 1 == o.max_new) {
      ++produced;
      break;
    }
    if (auto st = e.forward(&next, 1, logits.data()); !st) {
      std::fprintf(stderr, "\nsmollm: %s\n", st.message().c_str());
      return 1;
    }
  }
  const double t2 = now_s();
  std::printf("\n[prompt %zu tokens: %.1f tok/s; %u generated: %.1f tok/s]\n", j.ids.size(),
              j.ids.size() / (t1 - t0), produced, produced > 1 ? (produced - 1) / (t2 - t1) : 0.0);
  return 0;
}

template <class Policy, class Quant>
int run_cache(job& j, Policy policy, Quant quant) {
  const options& o = j.o;
  const kvcache::geometry geo = kv_geometry(j.w.cfg);
  std::uint32_t budget = o.budget_tokens ? o.budget_tokens
                                         : static_cast<std::uint32_t>(std::ceil(o.budget * j.total));
  budget = std::clamp<std::uint32_t>(budget, 1, j.total);
  kvcache::cache_config cfg;
  cfg.geo = geo;
  const bool evicts = o.policy != "keep_all" && budget < j.total;
  // the most tokens one forward() appends before it evicts
  const std::uint32_t step = !o.ppl_file.empty() ? o.chunk
                             : o.bench           ? std::max<std::uint32_t>(64, 1)
                                                 : static_cast<std::uint32_t>(j.ids.size());
  cfg.max_tokens = evicts ? std::min(j.total, budget + step) : j.total;
  cfg.budget = evicts ? budget : 0;
  kvcache::host_vmm_config vm;
  vm.page_size = 64 * 1024;
  vm.pool_pages = 6 * std::size_t{geo.layers} *
                  (std::size_t{cfg.max_tokens} * geo.token_bytes() / vm.page_size + 2);
  kvcache::cache<kvcache::host_vmm, Policy, Quant> kc(cfg, kvcache::host_vmm{vm}, std::move(policy),
                                                      std::move(quant));
  return run_with(j, kc, evicts ? budget : j.total);
}

template <class Policy>
int pick_quant(job& j, Policy p) {
  const std::string& q = j.o.quant;
  if (q == "none") return run_cache(j, p, kvcache::passthrough{});
  if (q == "fp8") {  // scale 1 (vLLM's default k/v_scale): the library's default calibrates from
                     // the first append, a single token when decoding token by token
    const std::vector<float> ones(j.w.cfg.layers, 1.0f);
    return run_cache(j, p, kvcache::fp8_e4m3{kvcache::scale_granularity::per_layer, ones, ones});
  }
  if (q == "q8_0") return run_cache(j, p, kvcache::q8_0{});
  if (q == "q4_0") return run_cache(j, p, kvcache::q4_0{});
  if (q == "kivi8") return run_cache(j, p, kvcache::kivi<8, 32, 128>{});
  if (q == "kivi4") return run_cache(j, p, kvcache::kivi<4, 32, 128>{});
  if (q == "kivi2") return run_cache(j, p, kvcache::kivi<2, 32, 128>{});
  std::fprintf(stderr, "smollm: unknown --quant %s (none|fp8|q8_0|q4_0|kivi8|kivi4|kivi2)\n", q.c_str());
  return 2;
}

int pick_policy(job& j) {
  const options& o = j.o;
  const std::uint32_t budget = o.budget_tokens ? o.budget_tokens
                                               : static_cast<std::uint32_t>(std::ceil(o.budget * j.total));
  if (o.policy == "keep_all") return pick_quant(j, kvcache::keep_all{});
  if (o.policy == "sink_window") return pick_quant(j, kvcache::sink_window{4});
  if (o.policy == "heavy_hitter") {  // H2O's split: half heavy hitters, half recent
    kvcache::heavy_hitter_config hc;
    hc.heavy = std::max<std::uint32_t>(1, budget - budget / 2);
    hc.recent = std::max<std::uint32_t>(1, budget / 2);
    return pick_quant(j, kvcache::heavy_hitter<kvcache::attention_signal>(hc));
  }
  if (o.policy == "snapkv") return pick_quant(j, kvcache::snapkv<kvcache::query_signal>());
  std::fprintf(stderr, "smollm: unknown --policy %s (keep_all|sink_window|heavy_hitter|snapkv)\n",
               o.policy.c_str());
  return 2;
}

int usage() {
  std::fprintf(stderr,
               "usage: smollm [--model PATH] (--prompt TEXT [--max-new N] [--chat] | --ppl FILE [--window N] "
               "[--chunk C] [--kl] | --bench-decode N [--context C] | --info)\n"
               "              [--policy keep_all|sink_window|heavy_hitter|snapkv] [--budget R | "
               "--budget-tokens N]\n"
               "              [--quant none|fp8|q8_0|q4_0|kivi8|kivi4|kivi2] [--threads N]\n");
  return 2;
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
    else if (a == "--window") o.window = num();
    else if (a == "--chunk") o.chunk = std::max<std::uint32_t>(1, num());
    else if (a == "--bench-decode") o.bench = num();
    else if (a == "--context") o.context = std::max<std::uint32_t>(1, num());
    else if (a == "--policy") o.policy = val();
    else if (a == "--budget") o.budget = std::atof(val().c_str());
    else if (a == "--budget-tokens") o.budget_tokens = num();
    else if (a == "--quant") o.quant = val();
    else if (a == "--threads") o.threads = num();
    else if (a == "--info") o.info = true;
    else if (a == "--kl") o.kl = true;
    else if (a == "--weights") {
      const std::string wf = val();
      if (wf != "f16" && wf != "f32") return usage();
      o.weights_f32 = wf == "f32";
    }
    else return usage();
  }
  if (!(o.budget > 0 && o.budget <= 1)) {
    std::fprintf(stderr, "smollm: --budget is a ratio in (0, 1]\n");
    return 2;
  }
  if (o.prompt.empty() && o.ppl_file.empty() && !o.bench && !o.info) return usage();

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
  job j{o, *w, tok, pool, {}, 0};
  if (!o.ppl_file.empty()) {
    std::ifstream in(o.ppl_file, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "smollm: cannot read %s\n", o.ppl_file.c_str());
      return 1;
    }
    // tokenize a prefix of the file that is long enough for the window
    std::string text;
    std::vector<char> buf(std::size_t{o.window} * 8 + 4096);
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    text.assign(buf.data(), static_cast<std::size_t>(in.gcount()));
    if (in.gcount() == static_cast<std::streamsize>(buf.size())) {  // cut at a line end
      const auto nl = text.rfind('\n');
      if (nl != std::string::npos) text.resize(nl + 1);
    }
    j.ids = tok.encode(text);
    if (j.ids.size() < 2) {
      std::fprintf(stderr, "smollm: %s has fewer than 2 tokens\n", o.ppl_file.c_str());
      return 1;
    }
    if (j.ids.size() < o.window)
      std::fprintf(stderr, "smollm: the text has only %zu tokens\n", j.ids.size());
    o.window = std::min<std::uint32_t>(o.window, static_cast<std::uint32_t>(j.ids.size()));
    j.total = o.window;
    j.ids.resize(o.window);
  } else {
    std::string p = o.prompt.empty() ? "In the beginning God created the heaven and the earth." : o.prompt;
    if (o.chat) p = "<|im_start|>user\n" + p + "<|im_end|>\n<|im_start|>assistant\n";
    j.ids = tok.encode(p, /*parse_special=*/true);
    if (j.ids.empty()) j.ids.push_back(tok.bos >= 0 ? tok.bos : 0);
    j.total = o.bench ? o.context + o.bench : static_cast<std::uint32_t>(j.ids.size()) + o.max_new;
  }
  return pick_policy(j);
}
