// SPDX-License-Identifier: Apache-2.0
// smollm_episodes: EpiCache (ALGORITHMS.md §4, kvcache/evict/episodic.hpp) on a constructed long
// conversation, with SmolLM2-135M on the CPU. See docs/FIDELITY.md, "EpiCache on an interleaved
// conversation", for the setup, a run and its reading.
//
// The conversation: a short system prompt, then "turns" that are KJV passages (64-128 tokens of
// whole verses) from four books of distinct content, interleaved by a seeded shuffle:
//   Genesis (narrative: patriarchs, genealogies), Psalms (poetry: praise, lament, "O LORD"),
//   Matthew (gospel: Jesus, disciples, parables), Revelation (apocalyptic: angels, seals, beasts).
// Segments are the turns (conv_window = 1: windows of consecutive turns would mix books).
// Embedding: the mean of the segment's final hidden states (after the output norm) with the
// segment run alone, L2-normalised (the paper: Qwen3-Embedding / MiniLM; here the model itself);
// `--center` first subtracts the segments' mean embedding (from questions too), which separates
// the books better (measured: docs/FIDELITY.md); `--token-embed` (mean input embeddings) is worse.
// cluster_episodes (E = 4), a patch per episode (instruction + its medoid segments), then per
// episode a fork of the system prompt's sequence and a block-wise prefill of the whole history:
// after each chunk the patch is run as a probe (not cached) and every layer is scored and evicted
// to M tokens per head (`pair`). Episodes are then held in the holding tier; a question restores
// the one it is routed to. Questions: passages of each book that are not in the history; the
// score is the perplexity of the next tokens after the question.
#include "episodes.hpp"
#include "gguf.hpp"
#include "model.hpp"
#include "tokenizer.hpp"

#include <kvcache/evict/episodic.hpp>
#include <kvcache/kvcache.hpp>
#include <kvcache/memory/tiered.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace smollm;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string cache_dir() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  return (xdg && *xdg ? std::string(xdg) : std::string(home ? home : ".") + "/.cache") + "/kvcache/";
}

void die(const kvcache::status& st, const char* what) {
  if (!st) {
    std::fprintf(stderr, "smollm_episodes: %s: %s\n", what, st.message().c_str());
    std::exit(1);
  }
}

struct options {
  std::string model = cache_dir() + "SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string text = cache_dir() + "kjv.txt";
  unsigned threads = 2;
  std::uint32_t per_book = 12;   // history turns per book
  std::uint32_t questions = 4;   // questions per book
  std::uint32_t budget = 512;    // M: tokens per KV head per layer
  std::uint32_t chunk = 256;     // block-wise prefill chunk
  std::uint32_t episodes = 4;    // E
  std::uint32_t n_medoid = 4;    // medoid segments per patch
  std::uint32_t cont = 64;       // continuation tokens scored
  std::uint64_t seed = 42;
  double alpha = 0;              // layer budgets: 0 = uniform M (no sensitivity profile)
  bool uniform = false;          // pair_uniform instead of pair
  bool recall = false;           // also questions taken from history turns
  bool hold = true;              // demote episodes to the holding tier between uses
  bool token_embed = false;      // embeddings: mean of input token embeddings (no forward pass)
  bool center = false;           // subtract the segments' mean embedding before clustering/routing
  bool cluster_only = false;     // stop after the clustering
};

// ---- the KJV: verse counts per book (the file is one verse per line, Genesis 1:1 first) --------

struct book {
  const char* name;
  std::uint32_t verses;
};
constexpr book kjv_books[] = {
    {"Genesis", 1533}, {"Exodus", 1213}, {"Leviticus", 859}, {"Numbers", 1288}, {"Deuteronomy", 959},
    {"Joshua", 658}, {"Judges", 618}, {"Ruth", 85}, {"1 Samuel", 810}, {"2 Samuel", 695}, {"1 Kings", 816},
    {"2 Kings", 719}, {"1 Chronicles", 942}, {"2 Chronicles", 822}, {"Ezra", 280}, {"Nehemiah", 406},
    {"Esther", 167}, {"Job", 1070}, {"Psalms", 2461}, {"Proverbs", 915}, {"Ecclesiastes", 222},
    {"Song of Solomon", 117}, {"Isaiah", 1292}, {"Jeremiah", 1364}, {"Lamentations", 154}, {"Ezekiel", 1273},
    {"Daniel", 357}, {"Hosea", 197}, {"Joel", 73}, {"Amos", 146}, {"Obadiah", 21}, {"Jonah", 48}, {"Micah", 105},
    {"Nahum", 47}, {"Habakkuk", 56}, {"Zephaniah", 53}, {"Haggai", 38}, {"Zechariah", 211}, {"Malachi", 55},
    {"Matthew", 1071}, {"Mark", 678}, {"Luke", 1151}, {"John", 879}, {"Acts", 1007}, {"Romans", 433},
    {"1 Corinthians", 437}, {"2 Corinthians", 257}, {"Galatians", 149}, {"Ephesians", 155},
    {"Philippians", 104}, {"Colossians", 95}, {"1 Thessalonians", 89}, {"2 Thessalonians", 47},
    {"1 Timothy", 113}, {"2 Timothy", 83}, {"Titus", 46}, {"Philemon", 25}, {"Hebrews", 303}, {"James", 108},
    {"1 Peter", 105}, {"2 Peter", 61}, {"1 John", 105}, {"2 John", 13}, {"3 John", 14}, {"Jude", 25},
    {"Revelation", 404}};

//! [first line, end line) of a book in the file.
std::pair<std::uint32_t, std::uint32_t> book_lines(const std::string& name) {
  std::uint32_t at = 0;
  for (const auto& b : kjv_books) {
    if (name == b.name) return {at, at + b.verses};
    at += b.verses;
  }
  return {0, 0};
}

const char* const chosen_books[] = {"Genesis", "Psalms", "Matthew", "Revelation"};

struct passage {
  std::uint32_t book = 0;            // index into chosen_books
  std::uint32_t first = 0, end = 0;  // verse lines [first, end)
  std::vector<std::int32_t> tokens;  // the turn (or the question)
  std::vector<std::int32_t> cont;    // questions: the continuation
};

std::uint32_t uniform_below(std::mt19937_64& g, std::uint32_t n) { return n ? static_cast<std::uint32_t>(g() % n) : 0; }

// ---- measurement helpers ------------------------------------------------------------------------

//! Mean negative log-likelihood (nats) of `cont` after `prompt`, teacher-forced in one step.
kvcache::result<double> score(engine& e, kv_sequence& seq, const std::vector<std::int32_t>& prompt,
                              const std::vector<std::int32_t>& cont, std::uint32_t vocab) {
  std::vector<std::int32_t> all(prompt);
  all.insert(all.end(), cont.begin(), cont.end());
  std::vector<float> logits(all.size() * std::size_t{vocab});
  KVCACHE_TRY(e.forward(seq, all.data(), static_cast<std::uint32_t>(all.size()), logits.data(), true));
  double nll = 0;
  for (std::size_t i = prompt.size(); i < all.size(); ++i) {
    const float* lg = logits.data() + (i - 1) * vocab;
    const float mx = *std::max_element(lg, lg + vocab);
    double sum = 0;
    for (std::uint32_t v = 0; v < vocab; ++v) sum += std::exp(double(lg[v]) - mx);
    nll += mx + std::log(sum) - lg[all[i]];
  }
  return nll / double(cont.size());
}

struct mem_sample {
  std::size_t working = 0;  // physical working-tier bytes (pages in use x page size)
  std::size_t live = 0;     // K+V bytes of live entries of the sequences sampled
  std::size_t shared = 0;   // pages mapped in more than one range
};

//! The memory backend's gauges (not cache::stats(), which walks every sequence) and the live
//! entries of `seqs` (from their views).
template <class Cache>
mem_sample sample(const Cache& kc, std::initializer_list<kvcache::seq_id> seqs = {}) {
  const auto ms = kc.memory().stats();
  mem_sample m{ms.pages_in_use() * ms.page_size, 0, ms.pages_shared};
  const auto& g = kc.geo();
  for (const auto s : seqs)
    for (std::uint32_t l = 0; l < g.layers; ++l) {
      const auto v = kc.view(s, l);
      if (!v) continue;
      for (std::uint32_t h = 0; h < g.kv_heads; ++h) m.live += std::size_t{v->live[h]} * 2 * g.head_dim * sizeof(float);
    }
  return m;
}

double mib(std::size_t b) { return double(b) / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "smollm_episodes: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto num = [&] { return static_cast<std::uint32_t>(std::stoul(next())); };
    if (a == "--model") o.model = next();
    else if (a == "--text") o.text = next();
    else if (a == "--threads") o.threads = num();
    else if (a == "--per-book") o.per_book = num();
    else if (a == "--questions") o.questions = num();
    else if (a == "--budget") o.budget = num();
    else if (a == "--chunk") o.chunk = num();
    else if (a == "--episodes") o.episodes = num();
    else if (a == "--n-medoid") o.n_medoid = num();
    else if (a == "--cont") o.cont = num();
    else if (a == "--seed") o.seed = num();
    else if (a == "--alpha") o.alpha = std::stod(next());
    else if (a == "--pair-uniform") o.uniform = true;
    else if (a == "--recall") o.recall = true;
    else if (a == "--no-hold") o.hold = false;
    else if (a == "--center") o.center = true;
    else if (a == "--token-embed") o.token_embed = true;
    else if (a == "--cluster-only") o.cluster_only = true;
    else {
      std::fprintf(stderr,
                   "usage: smollm_episodes [--model GGUF] [--text kjv.txt] [--threads 2] [--per-book 12] "
                   "[--questions 4] [--budget M=512] [--chunk 256] [--episodes 4] [--n-medoid 4] [--cont 64] "
                   "[--seed 42] [--alpha A] [--pair-uniform] [--recall] [--no-hold] [--center] [--token-embed] "
                   "[--cluster-only]\n");
      return 2;
    }
  }
  const double t_start = now_s();
  auto f = gguf::file::open(o.model);
  if (!f) die(f.error(), "model (fetch it with scripts/fetch-model)");
  tokenizer tok;
  die(tok.init(*f), "tokenizer");
  auto wr = load(*f, weight_format::f16);
  if (!wr) die(wr.error(), "weights");
  const weights& W = *wr;
  const config& C = W.cfg;
  thread_pool pool(o.threads);
  engine e(W, pool);

  // ---- the conversation ----
  std::vector<std::string> lines;
  {
    std::ifstream in(o.text);
    if (!in) die({kvcache::errc::system_error, "cannot read " + o.text}, "text");
    for (std::string l; std::getline(in, l);) lines.push_back(l);
  }
  if (lines.size() != 31102) die({kvcache::errc::invalid_argument, "expected the KJV, one verse per line (31102)"}, "text");
  std::mt19937_64 rng(o.seed);
  std::vector<passage> turns, questions;
  const std::uint32_t B = 4, K = o.per_book + o.questions;
  for (std::uint32_t b = 0; b < B; ++b) {
    const auto [first, end] = book_lines(chosen_books[b]);
    std::printf("%-10s lines %u..%u: %.60s\n", chosen_books[b], first + 1, end, lines[first].c_str());
    // K strata of the book; `questions` of them (seeded) are questions, the others history turns
    std::vector<std::uint32_t> qstrata(K);
    for (std::uint32_t k = 0; k < K; ++k) qstrata[k] = k;
    for (std::uint32_t k = K - 1; k > 0; --k) std::swap(qstrata[k], qstrata[uniform_below(rng, k + 1)]);
    qstrata.resize(o.questions);
    const std::uint32_t span = (end - first) / K;
    for (std::uint32_t k = 0; k < K; ++k) {
      const bool is_q = std::find(qstrata.begin(), qstrata.end(), k) != qstrata.end();
      passage p;
      p.book = b;
      p.first = first + k * span + uniform_below(rng, std::max(1u, span / 3));
      std::string text;
      std::uint32_t v = p.first;
      // whole verses until >= 64 tokens (a turn stops before passing 128 where it can)
      while (v < end) {
        const std::string t2 = text + lines[v] + "\n";
        const auto n = tok.encode(t2).size();
        if (n > 128 && !text.empty()) break;
        text = t2;
        ++v;
        if (n >= 64) break;
      }
      p.end = v;
      p.tokens = tok.encode(is_q ? text : text + "\n");
      if (is_q) {  // the continuation: the verses after the question, its first `cont` tokens
        std::string ct;
        while (v < end && tok.encode(ct).size() < o.cont) ct += lines[v++] + "\n";
        p.cont = tok.encode(ct);
        p.cont.resize(std::min<std::size_t>(p.cont.size(), o.cont));
        questions.push_back(std::move(p));
      } else {
        turns.push_back(std::move(p));
      }
    }
  }
  for (std::size_t i = turns.size() - 1; i > 0; --i)  // the seeded interleaving
    std::swap(turns[i], turns[uniform_below(rng, static_cast<std::uint32_t>(i + 1))]);
  // at least 64 tokens (a page of one layer's K: see vm.page_size), so that its first page stays
  // shared by every fork (the partly filled last page is copied on a fork's first append)
  const std::string sys_text =
      "You are a careful listener. The user reads aloud, passage after passage, from several books of the King "
      "James Bible: the passages of different books are interleaved. Remember who did what, where, and what was "
      "said in each passage, so that you can continue any of them or answer questions about them later.\n\n";
  const std::vector<std::int32_t> sys = tok.encode(sys_text);
  std::vector<std::int32_t> history(sys);
  for (const auto& t : turns) history.insert(history.end(), t.tokens.begin(), t.tokens.end());
  const auto T = static_cast<std::uint32_t>(history.size()), S = static_cast<std::uint32_t>(sys.size());
  std::printf("conversation: system prompt %u tokens + %zu turns = %u tokens; %zu questions\n", S, turns.size(), T,
              questions.size());

  // ---- embeddings, episodes, patches ----
  double t0 = now_s();
  using emb_cache_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all>;
  kvcache::cache_config ecfg;
  ecfg.geo = kv_geometry(C);
  ecfg.max_tokens = 512;
  kvcache::host_vmm_config evm;
  evm.pool_pages = 2 * std::size_t{C.layers} * (std::size_t{ecfg.max_tokens} * ecfg.geo.token_bytes() / evm.page_size + 2);
  emb_cache_t ekc(ecfg, kvcache::host_vmm{evm});
  // a text's embedding: mean-pooled final hidden states of the text run alone (embed()), or with
  // --token-embed the mean of its tokens' input embeddings (a bag of words, for comparison)
  auto embed_text = [&](const std::vector<std::int32_t>& t) -> kvcache::result<std::vector<float>> {
    if (!o.token_embed) return embed(e, ekc, C, pool, std::span<const std::int32_t>(t));
    std::vector<float> v(C.hidden, 0.0f), row(C.hidden);
    for (auto id : t) {
      W.embd.row(static_cast<std::size_t>(id), row.data());
      for (std::uint32_t d = 0; d < C.hidden; ++d) v[d] += row[d] / float(t.size());
    }
    return v;
  };
  std::vector<float> emb(turns.size() * std::size_t{C.hidden});
  for (std::size_t i = 0; i < turns.size(); ++i) {
    auto v = embed_text(turns[i].tokens);
    if (!v) die(v.error(), "embed");
    std::copy(v->begin(), v->end(), emb.begin() + static_cast<std::ptrdiff_t>(i * C.hidden));
  }
  // --center: the mean embedding of the segments is subtracted (from questions too) before the
  // L2 normalisation: mean-pooled hidden states share a large common direction
  std::vector<float> mean_emb(C.hidden, 0.0f);
  if (o.center) {
    for (std::size_t i = 0; i < turns.size(); ++i)
      for (std::uint32_t d = 0; d < C.hidden; ++d) mean_emb[d] += emb[i * C.hidden + d] / float(turns.size());
    for (std::size_t i = 0; i < turns.size(); ++i)
      for (std::uint32_t d = 0; d < C.hidden; ++d) emb[i * C.hidden + d] -= mean_emb[d];
  }
  auto eps = kvcache::cluster_episodes(emb, static_cast<std::uint32_t>(turns.size()), C.hidden, o.episodes,
                                       o.n_medoid, o.seed);
  if (!eps) die(eps.error(), "cluster_episodes");
  const double t_embed = now_s() - t0;
  const std::uint32_t E = o.episodes;
  std::vector<std::uint32_t> majority(E);
  std::uint32_t pure = 0;
  for (std::uint32_t ep = 0; ep < E; ++ep) {
    std::uint32_t cnt[4] = {};
    for (auto m : eps->episodes[ep].members) ++cnt[turns[m].book];
    majority[ep] = static_cast<std::uint32_t>(std::max_element(cnt, cnt + 4) - cnt);
    pure += cnt[majority[ep]];
    std::printf("episode %u: %zu segments (Genesis %u, Psalms %u, Matthew %u, Revelation %u): majority %s; medoids",
                ep, eps->episodes[ep].members.size(), cnt[0], cnt[1], cnt[2], cnt[3], chosen_books[majority[ep]]);
    for (auto m : eps->episodes[ep].medoids) std::printf(" %u(%c)", m, chosen_books[turns[m].book][0]);
    std::printf("\n");
  }
  std::printf("clustering purity: %u/%zu segments in their episode's majority book (embeddings %.1f s)\n", pure,
              turns.size(), t_embed);
  if (o.cluster_only) {
    std::uint32_t ok = 0;
    for (const auto& q : questions) {
      auto qe = embed_text(q.tokens);
      if (!qe) die(qe.error(), "embed question");
      for (std::uint32_t d = 0; d < C.hidden; ++d) (*qe)[d] -= mean_emb[d];
      auto rt = kvcache::route(*eps, *qe);
      if (!rt) die(rt.error(), "route");
      ok += majority[*rt] == q.book;
    }
    std::printf("routing accuracy: %u/%zu new passages\n", ok, questions.size());
    return 0;
  }
  const std::string instruction =
      "Extract essential information from the conversation above: names, places, events with dates, and what was "
      "said.\n\n";
  const std::vector<std::int32_t> instr = tok.encode(instruction);
  std::vector<std::vector<std::int32_t>> patch(E + 1);
  for (std::uint32_t ep = 0; ep < E; ++ep) {
    patch[ep] = instr;
    for (auto m : eps->episodes[ep].medoids) patch[ep].insert(patch[ep].end(), turns[m].tokens.begin(), turns[m].tokens.end());
  }
  {  // the non-episodic patch: the most central segments of every episode (as many in all as one
     // episode's medoids), in chronological order
    std::vector<std::uint32_t> pick;
    for (std::uint32_t r = 0; pick.size() < o.n_medoid; ++r) {
      bool any = false;
      for (std::uint32_t ep = 0; ep < E && pick.size() < o.n_medoid; ++ep)
        if (r < eps->episodes[ep].members.size()) {
          pick.push_back(eps->episodes[ep].members[r]);
          any = true;
        }
      if (!any) break;
    }
    std::sort(pick.begin(), pick.end());
    patch[E] = instr;
    for (auto m : pick) patch[E].insert(patch[E].end(), turns[m].tokens.begin(), turns[m].tokens.end());
  }
  for (std::uint32_t p = 0; p <= E; ++p) std::printf("patch %u: %zu tokens\n", p, patch[p].size());

  // ---- layer budgets (ALGORITHMS.md §4 step 5): alpha 0 = M for every layer ----
  std::vector<std::uint32_t> budgets(C.layers, o.budget);
  double t_profile = 0;
  if (o.alpha != 0) {
    // Sensitivity s_l: keys of a full causal run vs a block-restricted one (sinks + blocks with
    // 50% overlap), cosine per 100-token window, mean over windows and KV heads. Scaled down from
    // the reference (128 sinks + 4096-token blocks on ~16K BookSum tokens) to 2048 KJV tokens
    // from Exodus 1:1 (a book not in the conversation): 16 sinks + 512-token blocks.
    t0 = now_s();
    const std::uint32_t N = 2048, sinks = 16, block = 512, D = C.head_dim;
    std::string text;
    for (std::uint32_t v = book_lines("Exodus").first; tok.encode(text).size() < N; ++v) text += lines[v] + "\n";
    auto sample_ids = tok.encode(text);
    sample_ids.resize(N);
    using prof_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all>;
    auto run = [&](std::uint32_t blk) {
      kvcache::cache_config pcfg;
      pcfg.geo = kv_geometry(C);
      pcfg.max_tokens = N;
      kvcache::host_vmm_config pvm;
      pvm.pool_pages = 2 * std::size_t{C.layers} * (std::size_t{N} * pcfg.geo.token_bytes() / pvm.page_size + 2);
      prof_t pkc(pcfg, kvcache::host_vmm{pvm});
      const kvcache::seq_id ps = pkc.open().value();
      std::vector<std::vector<float>> keys(C.layers);
      episode_sequence<prof_t> sq(pkc, ps, C, pool);
      sq.set_block_mask(sinks, blk);
      for (std::uint32_t at = 0; at < N; at += block / 2) {
        die(e.forward(sq, sample_ids.data() + at, block / 2, nullptr), "profile");
        for (std::uint32_t l = 0; l < C.layers; ++l) keys[l].insert(keys[l].end(), sq.keys(l).begin(), sq.keys(l).end());
      }
      return keys;
    };
    const auto full = run(0), masked = run(block);
    std::vector<double> sens(C.layers, 0.0);
    std::vector<float> a(std::size_t{N} * D), b(a.size());
    for (std::uint32_t l = 0; l < C.layers; ++l) {
      for (std::uint32_t h = 0; h < C.kv_heads; ++h) {
        for (std::uint32_t t = 0; t < N; ++t)
          for (std::uint32_t d = 0; d < D; ++d) {
            a[std::size_t{t} * D + d] = full[l][(std::size_t{t} * C.kv_heads + h) * D + d];
            b[std::size_t{t} * D + d] = masked[l][(std::size_t{t} * C.kv_heads + h) * D + d];
          }
        sens[l] += kvcache::key_window_similarity(a.data(), b.data(), N, D, 100) / C.kv_heads;
      }
    }
    auto lb = kvcache::layer_budgets(sens, o.budget, o.alpha);
    if (!lb) die(lb.error(), "layer_budgets");
    budgets = *lb;
    t_profile = now_s() - t0;
    std::printf("layer sensitivity (key similarity, block-restricted vs full) and budgets M_l (alpha %g), %.1f s:\n",
                o.alpha, t_profile);
    for (std::uint32_t l = 0; l < C.layers; ++l) std::printf("  layer %2u: s %.4f  M_l %u\n", l, sens[l], budgets[l]);
  }
  const std::uint32_t max_budget = *std::max_element(budgets.begin(), budgets.end());

  // ---- the episodic cache: the system prompt, E episodes and the non-episodic one, all forks ----
  using mem_t = kvcache::tiered<kvcache::host_vmm>;
  using epi_cache_t = kvcache::cache<mem_t, kvcache::episodic>;
  const std::uint32_t KH = C.kv_heads, M = o.budget, qmax = 256;
  kvcache::cache_config cfg;
  cfg.geo = kv_geometry(C);
  // `pair` lets one head keep up to M·Hk tokens (its share of the layer's global cut)
  cfg.max_tokens = std::min(T, max_budget * KH) + std::max(o.chunk, qmax);
  cfg.budget = M;
  kvcache::host_vmm_config vm;
  vm.page_size = 48 * 1024;  // 64 slots of one layer's K (3 heads x 64 x fp32)
  vm.deferred_reclamation = false;  // released pages go back to the pool: pages in use = live ranges
  vm.pool_pages = (E + 3) * 2 * std::size_t{C.layers} *
                  (std::size_t{cfg.max_tokens} * cfg.geo.token_bytes() / vm.page_size + 2);
  kvcache::episodic_config pc;
  pc.level = o.uniform ? kvcache::episodic_level::pair_uniform : kvcache::episodic_level::pair;
  pc.protected_prefix = S;
  epi_cache_t kc(cfg, mem_t(kvcache::host_vmm{vm}, kvcache::host_holding{}), kvcache::episodic{pc});
  die(kvcache::apply_layer_budgets(kc, budgets), "layer budgets");
  const std::size_t page = vm.page_size;

  const kvcache::seq_id sys_id = kc.open().value();
  {
    episode_sequence<epi_cache_t> s(kc, sys_id, C, pool);
    die(e.forward(s, sys.data(), S, nullptr), "system prompt");
  }
  const mem_sample m_sys = sample(kc);
  std::printf("system prompt: %u tokens, %.2f MiB working tier (%zu pages of %zu KiB)\n", S, mib(m_sys.working),
              m_sys.working / page, page / 1024);

  struct prefill_report {
    std::size_t peak_working = 0, peak_live = 0, final_working = 0, final_live = 0;
    std::size_t shared_after_fork = 0, shared_after = 0, held = 0;
    double secs = 0;
  };
  std::vector<kvcache::seq_id> ep_id(E + 1);
  std::vector<prefill_report> rep(E + 1);
  const double t_prefill0 = now_s();
  for (std::uint32_t p = 0; p <= E; ++p) {
    const double tp = now_s();
    const mem_sample base = sample(kc);  // the system prompt's sequence (others held)
    auto fk = kc.fork(sys_id);
    if (!fk) die(fk.error(), "fork");
    ep_id[p] = *fk;
    prefill_report& r = rep[p];
    const mem_sample after_fork = sample(kc);
    r.shared_after_fork = after_fork.shared;
    if (after_fork.working != base.working)
      std::printf("  note: the fork mapped %zu new pages\n", (after_fork.working - base.working) / page);
    episode_sequence<epi_cache_t> s(kc, ep_id[p], C, pool);
    engine::set_position(s, S);
    for (std::uint32_t at = S; at < T; at += o.chunk) {
      const std::uint32_t n = std::min(o.chunk, T - at);
      die(e.forward(s, history.data() + at, n, nullptr), "block prefill");
      const mem_sample m = sample(kc, {ep_id[p]});  // the peak: the chunk appended, not yet evicted
      r.peak_working = std::max(r.peak_working, m.working - base.working);
      r.peak_live = std::max(r.peak_live, m.live);
      die(run_probe(e, s, s.position(), std::span<const std::int32_t>(patch[p])), "probe");
      die(score_and_evict(s, C.layers), "score and evict");
    }
    const mem_sample fin = sample(kc, {ep_id[p]});
    r.final_working = fin.working - base.working;
    r.final_live = fin.live;
    r.shared_after = fin.shared;
    if (o.hold) die(kc.hold(ep_id[p]), "hold");
    r.held = kc.memory().holding().stats().bytes_held;
    r.secs = now_s() - tp;
    std::printf("%s %u: prefill %.1f s; working tier peak +%.2f MiB (live %.2f), after evict +%.2f MiB "
                "(live %.2f); shared pages after fork %zu, after prefill %zu; held in all %.2f MiB\n",
                p < E ? "episode" : "non-episodic", p, r.secs, mib(r.peak_working), mib(r.peak_live),
                mib(r.final_working), mib(r.final_live), r.shared_after_fork, r.shared_after, mib(r.held));
  }
  const double t_prefill = now_s() - t_prefill0;
  const auto tier = kc.memory().holding().stats();
  std::printf("after the prefills: working tier %.2f MiB, holding tier %.2f MiB (peak %.2f)\n",
              mib(sample(kc).working), mib(tier.bytes_held), mib(tier.peak_bytes_held));

  // ---- keep-all over the full history (chunked prefill, no probe) ----
  using all_cache_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all>;
  kvcache::cache_config acfg;
  acfg.geo = kv_geometry(C);
  acfg.max_tokens = T + qmax;
  kvcache::host_vmm_config avm;
  avm.page_size = vm.page_size;
  avm.deferred_reclamation = false;
  avm.pool_pages = 3 * 2 * std::size_t{C.layers} * (std::size_t{acfg.max_tokens} * acfg.geo.token_bytes() / page + 2);
  all_cache_t akc(acfg, kvcache::host_vmm{avm});
  const kvcache::seq_id all_id = akc.open().value();
  std::size_t all_peak = 0;
  double t_all = now_s();
  {
    episode_sequence<all_cache_t> s(akc, all_id, C, pool);
    for (std::uint32_t at = 0; at < T; at += o.chunk) {
      const std::uint32_t n = std::min(o.chunk, T - at);
      die(e.forward(s, history.data() + at, n, nullptr), "keep_all prefill");
      all_peak = std::max(all_peak, sample(akc).working);
    }
  }
  t_all = now_s() - t_all;
  const std::size_t all_live = sample(akc, {all_id}).live;
  std::printf("keep_all: prefill %.1f s, working tier peak %.2f MiB (live %.2f)\n", t_all, mib(all_peak), mib(all_live));

  // ---- questions ----
  // variants: 0 routed, 1 non-episodic, 2 keep_all, 3 oracle, 4 system prompt only (no history)
  const char* const vname[] = {"routed episode", "non-episodic, same M", "keep_all", "oracle episode",
                               "no history"};
  double nll[5] = {}, nll_book[4][5] = {};
  std::uint32_t routed_ok = 0, nq_book[4] = {};
  double t_q = now_s();
  auto run_on = [&](auto& cache, kvcache::seq_id parent, std::int64_t pos, const passage& q) -> double {
    using cache_type = std::remove_reference_t<decltype(cache)>;
    bool was_held = false;
    if constexpr (requires { cache.hold(parent); }) {
      was_held = cache.is_held(parent);
      if (was_held) die(cache.restore(parent), "restore");
    }
    auto fk = cache.fork(parent);
    if (!fk) die(fk.error(), "fork for a question");
    double v = 0;
    {
      episode_sequence<cache_type> s(cache, *fk, C, pool);
      engine::set_position(s, pos);
      auto r = score(e, s, q.tokens, q.cont, C.vocab);
      if (!r) die(r.error(), "score");
      v = *r;
    }
    die(cache.close(*fk), "close");
    if constexpr (requires { cache.hold(parent); })
      if (was_held) die(cache.hold(parent), "hold");
    return v;
  };
  std::vector<passage> qs = questions;
  if (o.recall) {  // questions from history turns: the first half asks, the rest is scored
    for (std::uint32_t b = 0; b < 4; ++b) {
      std::uint32_t taken = 0;
      for (const auto& t : turns)
        if (t.book == b && taken < o.questions && t.tokens.size() >= 64) {
          passage q = t;
          q.tokens.assign(t.tokens.begin(), t.tokens.begin() + 32);
          q.cont.assign(t.tokens.begin() + 32, t.tokens.begin() + std::min<std::size_t>(t.tokens.size(), 32 + o.cont));
          q.first = ~0u;  // marks a recall question (printed as lines 0..end of its turn)
          qs.push_back(std::move(q));
          ++taken;
        }
    }
  }
  double rnll[5] = {};
  std::uint32_t rq = 0, rrouted_ok = 0;
  for (const auto& q : qs) {
    const bool recall = q.first == ~0u;
    auto qe = embed_text(q.tokens);
    if (!qe) die(qe.error(), "embed question");
    for (std::uint32_t d = 0; d < C.hidden; ++d) (*qe)[d] -= mean_emb[d];
    auto rt = kvcache::route(*eps, *qe);
    if (!rt) die(rt.error(), "route");
    const std::uint32_t routed = *rt;
    // the oracle: the episode holding most segments of the question's book
    std::uint32_t oracle = 0, best = 0;
    for (std::uint32_t ep = 0; ep < E; ++ep) {
      std::uint32_t c = 0;
      for (auto m : eps->episodes[ep].members) c += turns[m].book == q.book;
      if (c > best) best = c, oracle = ep;
    }
    double v[5];
    v[0] = run_on(kc, ep_id[routed], T, q);
    v[1] = run_on(kc, ep_id[E], T, q);
    v[2] = run_on(akc, all_id, T, q);
    v[3] = oracle == routed ? v[0] : run_on(kc, ep_id[oracle], T, q);
    v[4] = run_on(kc, sys_id, S, q);
    const bool ok = majority[routed] == q.book;
    std::printf("%s %-10s lines %u..%u: routed to %u (%s)%s; ppl routed %.3f, non-episodic %.3f, keep_all %.3f, "
                "oracle %.3f, no history %.3f\n",
                recall ? "recall  " : "question", chosen_books[q.book], recall ? 0 : q.first + 1, q.end, routed,
                chosen_books[majority[routed]], ok ? "" : " WRONG", std::exp(v[0]), std::exp(v[1]), std::exp(v[2]),
                std::exp(v[3]), std::exp(v[4]));
    if (recall) {
      ++rq;
      rrouted_ok += ok;
      for (int i = 0; i < 5; ++i) rnll[i] += v[i];
    } else {
      routed_ok += ok;
      ++nq_book[q.book];
      for (int i = 0; i < 5; ++i) nll[i] += v[i], nll_book[q.book][i] += v[i];
    }
  }
  t_q = now_s() - t_q;
  const auto nq = static_cast<std::uint32_t>(questions.size());

  // ---- the summary ----
  std::size_t ep_peak = 0, ep_final = 0;
  for (std::uint32_t p = 0; p <= E; ++p) ep_peak = std::max(ep_peak, rep[p].peak_working), ep_final = std::max(ep_final, rep[p].final_working);
  std::printf("\nM = %u tokens per KV head per layer (%s), history %u tokens: compression %.1fx; chunk %u; "
              "n_medoid %u; E %u; alpha %g%s; embeddings %s%s\n",
              M, o.uniform ? "pair_uniform" : "pair", T, double(T) / M, o.chunk, o.n_medoid, E, o.alpha,
              o.alpha == 0 ? " (uniform M)" : " (layer budgets above)",
              o.token_embed ? "mean token embeddings" : "mean final hidden states", o.center ? ", centered" : "");
  std::printf("routing accuracy: %u/%u new passages", routed_ok, nq);
  if (rq) std::printf(", %u/%u recall questions", rrouted_ok, rq);
  std::printf("\n| cache | continuation ppl (%u new passages, %u tokens each) |%s\n| --- | --- |%s\n", nq, o.cont,
              rq ? " recall ppl |" : "", rq ? " --- |" : "");
  for (int i = 0; i < 5; ++i) {
    std::printf("| %s | %.4f |", vname[i], std::exp(nll[i] / nq));
    if (rq) std::printf(" %.4f |", std::exp(rnll[i] / rq));
    std::printf("\n");
  }
  std::printf("per book (routed / non-episodic / keep_all / oracle / no history):\n");
  for (std::uint32_t b = 0; b < 4; ++b)
    if (nq_book[b])
      std::printf("  %-10s %.3f / %.3f / %.3f / %.3f / %.3f\n", chosen_books[b], std::exp(nll_book[b][0] / nq_book[b]),
                  std::exp(nll_book[b][1] / nq_book[b]), std::exp(nll_book[b][2] / nq_book[b]),
                  std::exp(nll_book[b][3] / nq_book[b]), std::exp(nll_book[b][4] / nq_book[b]));
  std::printf("working tier during block prefill: peak %.2f MiB per episode above the system prompt's %.2f MiB "
              "(%.2f MiB after evict); keep_all prefill peak %.2f MiB\n",
              mib(ep_peak), mib(m_sys.working), mib(ep_final), mib(all_peak));
  std::printf("holding tier: %.2f MiB for %u episodes + the non-episodic cache (peak %.2f MiB)\n", mib(tier.bytes_held),
              E, mib(tier.peak_bytes_held));
  std::printf("time: embeddings + clustering %.1f s, block prefills %.1f s (%u sequences), keep_all prefill %.1f s, "
              "questions %.1f s, total %.1f s\n",
              t_embed, t_prefill, E + 1, t_all, t_q, now_s() - t_start);
  return 0;
}
