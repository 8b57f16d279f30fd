// SPDX-License-Identifier: Apache-2.0
//! @file
//! The Llama forward pass on the CPU (SmolLM2-135M and any GGUF `llama` model of its shape), with
//! its K/V in a `kvcache::cache`.
//!
//! - Weights are dequantized at load to fp32 (135M parameters: ~540 MB) or fp16 (~270 MB, the
//!   tool's default: half the bytes streamed per decoded token), so every matmul is a plain loop the compiler vectorizes (AVX2+FMA clone where the CPU has it), split over a
//!   small thread pool.
//! - RoPE: llama.cpp's converter permutes HF's Q/K weights so that ggml's "normal" RoPE (rotating
//!   adjacent pairs (x[2i], x[2i+1]) by pos·base^(-2i/d)) is right for `llama` files; that is what
//!   runs here (the NeoX half-split variant gives nonsense on this file: checked by perplexity).
//! - Attention: for each layer, the step's K/V (after RoPE) are appended to the cache, then the
//!   step's queries attend over the layer's view: every slot below `rows`, masked where the slot
//!   is empty (position -1) or causally later than the query. Passthrough fp32 views are read in
//!   place; quantized ones are decoded to fp32 first (kvcache::decode_key / decode_value).
//! - Signals: what the policy declares (`Cache::consumes<S>`): the attention probabilities the
//!   step computes anyway, or the step's queries; then evict().
//! - `engine` runs a batch of sequences through the weights in one pass (each weight matrix read
//!   once per step for all rows); each sequence is a `kv_sequence`, the type-erased face of a
//!   `cache_sequence<Cache>`, so one batch can mix policies and quantizers.
#pragma once

#include "gguf.hpp"

#include <kvcache/kvcache.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace smollm {

// ---- kernels -----------------------------------------------------------------------------------

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SMOLLM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SMOLLM_CLONES
#endif

// 8 floats in a GCC/Clang vector (AVX in the x86-64-v3 clone, two SSE registers otherwise).
// Unaligned, and (as GCC documents for vector types) aliasing float. Macros rather than helper
// functions, so that each target clone inlines its own code (no vector arguments across an ABI).
typedef float v8f __attribute__((vector_size(32), aligned(4)));
#define SMOLLM_LOAD8(p) (*reinterpret_cast<const v8f*>(p))
#define SMOLLM_HSUM(v) ((((v)[0] + (v)[4]) + ((v)[1] + (v)[5])) + (((v)[2] + (v)[6]) + ((v)[3] + (v)[7])))

//! Dot products of one weight row (n values, a multiple of 8) with `nx` inputs (`x` rows `ld`
//! apart), into y[t*ldy]. Every input is summed in the same order (two chains, even and odd
//! 8-blocks) whether it is in a group of four or not: a row's result does not depend on the batch.
SMOLLM_CLONES inline void dot_rows(const float* __restrict w, const float* __restrict x, std::size_t ld,
                                   std::size_t n, std::size_t nx, float* __restrict y, std::size_t ldy) {
  std::size_t t = 0;
  for (; t + 4 <= nx; t += 4) {  // four inputs share each load of the weight row
    v8f a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
    const float* x0 = x + t * ld;
    const float* x1 = x0 + ld;
    const float* x2 = x1 + ld;
    const float* x3 = x2 + ld;
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const v8f wa = SMOLLM_LOAD8(w + i), wb = SMOLLM_LOAD8(w + i + 8);
      a0 += wa * SMOLLM_LOAD8(x0 + i);
      b0 += wb * SMOLLM_LOAD8(x0 + i + 8);
      a1 += wa * SMOLLM_LOAD8(x1 + i);
      b1 += wb * SMOLLM_LOAD8(x1 + i + 8);
      a2 += wa * SMOLLM_LOAD8(x2 + i);
      b2 += wb * SMOLLM_LOAD8(x2 + i + 8);
      a3 += wa * SMOLLM_LOAD8(x3 + i);
      b3 += wb * SMOLLM_LOAD8(x3 + i + 8);
    }
    for (; i < n; i += 8) {
      const v8f wa = SMOLLM_LOAD8(w + i);
      a0 += wa * SMOLLM_LOAD8(x0 + i);
      a1 += wa * SMOLLM_LOAD8(x1 + i);
      a2 += wa * SMOLLM_LOAD8(x2 + i);
      a3 += wa * SMOLLM_LOAD8(x3 + i);
    }
    a0 += b0;
    a1 += b1;
    a2 += b2;
    a3 += b3;
    y[t * ldy] = SMOLLM_HSUM(a0);
    y[(t + 1) * ldy] = SMOLLM_HSUM(a1);
    y[(t + 2) * ldy] = SMOLLM_HSUM(a2);
    y[(t + 3) * ldy] = SMOLLM_HSUM(a3);
  }
  for (; t < nx; ++t) {
    v8f a{}, b{};
    const float* xt = x + t * ld;
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      a += SMOLLM_LOAD8(w + i) * SMOLLM_LOAD8(xt + i);
      b += SMOLLM_LOAD8(w + i + 8) * SMOLLM_LOAD8(xt + i + 8);
    }
    for (; i < n; i += 8) a += SMOLLM_LOAD8(w + i) * SMOLLM_LOAD8(xt + i);
    a += b;
    y[t * ldy] = SMOLLM_HSUM(a);
  }
}

//! dot_rows with an fp16 weight row: F16C+AVX2+FMA where the CPU has them (vcvtph2ps converts 8
//! halves per instruction), else the row converted to fp32 first.
#if defined(__x86_64__) && defined(__GNUC__)
#define SMOLLM_HAS_F16C_PATH 1
__attribute__((target("avx2,fma,f16c"))) inline void dot_rows_h_f16c(
    const std::uint16_t* __restrict w, const float* __restrict x, std::size_t ld, std::size_t n, std::size_t nx,
    float* __restrict y, std::size_t ldy) {
  // macros, not lambdas: a lambda would not inherit this function's target
#define wload(i) _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (i))))
#define hsum(v) SMOLLM_HSUM(v)
  std::size_t t = 0;
  for (; t + 4 <= nx; t += 4) {  // same summation order as the single-input loop below
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const float* x0 = x + t * ld;
    const float* x1 = x0 + ld;
    const float* x2 = x1 + ld;
    const float* x3 = x2 + ld;
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256 wa = wload(i), wb = wload(i + 8);
      a0 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x0 + i), a0);
      b0 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x0 + i + 8), b0);
      a1 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x1 + i), a1);
      b1 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x1 + i + 8), b1);
      a2 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x2 + i), a2);
      b2 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x2 + i + 8), b2);
      a3 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x3 + i), a3);
      b3 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x3 + i + 8), b3);
    }
    for (; i < n; i += 8) {
      const __m256 wa = wload(i);
      a0 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x0 + i), a0);
      a1 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x1 + i), a1);
      a2 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x2 + i), a2);
      a3 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x3 + i), a3);
    }
    y[t * ldy] = hsum(_mm256_add_ps(a0, b0));
    y[(t + 1) * ldy] = hsum(_mm256_add_ps(a1, b1));
    y[(t + 2) * ldy] = hsum(_mm256_add_ps(a2, b2));
    y[(t + 3) * ldy] = hsum(_mm256_add_ps(a3, b3));
  }
  for (; t < nx; ++t) {
    __m256 a = _mm256_setzero_ps(), b = a;
    const float* xt = x + t * ld;
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      a = _mm256_fmadd_ps(wload(i), _mm256_loadu_ps(xt + i), a);
      b = _mm256_fmadd_ps(wload(i + 8), _mm256_loadu_ps(xt + i + 8), b);
    }
    for (; i < n; i += 8) a = _mm256_fmadd_ps(wload(i), _mm256_loadu_ps(xt + i), a);
    y[t * ldy] = hsum(_mm256_add_ps(a, b));
  }
#undef wload
#undef hsum
}
#endif

inline void dot_rows_h(const std::uint16_t* w, const float* x, std::size_t ld, std::size_t n, std::size_t nx,
                       float* y, std::size_t ldy) {
#ifdef SMOLLM_HAS_F16C_PATH
  // every AVX2 CPU has F16C (clang 14's __builtin_cpu_supports does not know "f16c")
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (f16c) {
    dot_rows_h_f16c(w, x, ld, n, nx, y, ldy);
    return;
  }
#endif
  thread_local std::vector<float> row;
  row.resize(n);
  for (std::size_t i = 0; i < n; ++i) row[i] = kvcache::half_to_float(w[i]);
  dot_rows(row.data(), x, ld, n, nx, y, ldy);
}

//! Attention of one query row over `R` slots of one KV head: scores (masked where `pos` says so),
//! softmax, weighted sum of values; `p` gets the probabilities. D is a multiple of 8.
template <std::uint32_t DD>
SMOLLM_CLONES inline void attend_row_d(const float* __restrict q, const float* K, const float* V,
                                     std::size_t stride, const std::int32_t* pos, std::size_t pos_stride,
                                     std::int64_t qpos, std::uint32_t R, std::uint32_t D, float scale,
                                     float* __restrict p, float* __restrict out) {
  if constexpr (DD != 0) D = DD;  // a constant: the loops below unroll, accumulators stay in registers
  float mx = -INFINITY;
  for (std::uint32_t s = 0; s < R; ++s) {
    const std::int32_t kp = pos[s * pos_stride];
    if (kp < 0 || kp > qpos) {
      p[s] = -INFINITY;
      continue;
    }
    const float* k = K + s * stride;
    v8f a{}, b{};  // two chains
    std::uint32_t i = 0;
    for (; i + 16 <= D; i += 16) {
      a += SMOLLM_LOAD8(q + i) * SMOLLM_LOAD8(k + i);
      b += SMOLLM_LOAD8(q + i + 8) * SMOLLM_LOAD8(k + i + 8);
    }
    if (i < D) a += SMOLLM_LOAD8(q + i) * SMOLLM_LOAD8(k + i);
    a += b;
    p[s] = SMOLLM_HSUM(a) * scale;
    mx = std::max(mx, p[s]);
  }
  // exp(p - mx) eight at a time: Cephes' expf (range reduction by ln 2, degree-5 polynomial,
  // max relative error ~2e-7); masked slots (-inf) come out as 0.
  float sum = 0;
  std::uint32_t s = 0;
  for (; s + 8 <= R; s += 8) {
    v8f x = SMOLLM_LOAD8(p + s) - mx;
    typedef int v8i __attribute__((vector_size(32), aligned(4)));
    const v8i dead = x < -87.0f;
    x = x < -87.0f ? v8f{} - 87.0f : x;
    const v8f fx = x * 1.44269504088896341f;
    v8f n = __builtin_convertvector(__builtin_convertvector(fx + (fx < 0 ? -0.5f : 0.5f), v8i), v8f);
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8f y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x +
             1.6666665459e-1f) * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8f scale;
    std::memcpy(&scale, &e, sizeof scale);
    y = y * scale;
    y = dead ? v8f{} : y;
    *reinterpret_cast<v8f*>(p + s) = y;
    sum += SMOLLM_HSUM(y);
  }
  for (; s < R; ++s) {
    p[s] = p[s] == -INFINITY ? 0.0f : std::exp(p[s] - mx);
    sum += p[s];
  }
  const float inv = sum > 0 ? 1.0f / sum : 0.0f;
  constexpr std::uint32_t NA = DD ? DD / 8 : 16;  // accumulators (D <= 128 for the runtime path)
  v8f acc[NA] = {};
  for (s = 0; s < R; ++s) {
    p[s] *= inv;
    if (p[s] == 0.0f) continue;
    const float* v = V + s * stride;
    const float w = p[s];
    for (std::uint32_t i = 0; i < D / 8; ++i) acc[i] += w * SMOLLM_LOAD8(v + 8 * i);
  }
  for (std::uint32_t i = 0; i < D / 8; ++i) *reinterpret_cast<v8f*>(out + 8 * i) = acc[i];
}

//! attend_row_d for any head_dim (a multiple of 8, at most 128), specialized for 64 and 128.
//! Slots at the end that are later than the query (the later tokens of a multi-token step) are
//! left out, so a query sees the same slots in the same vector blocks whatever the step size:
//! `--chunk 64` gives bit-for-bit the logits of token-by-token decoding (until a policy evicts).
inline void attend_row(const float* q, const float* K, const float* V, std::size_t stride, const std::int32_t* pos,
                       std::size_t pos_stride, std::int64_t qpos, std::uint32_t R, std::uint32_t D, float scale,
                       float* p, float* out) {
  const std::uint32_t all = R;
  while (R > 0 && pos[(R - 1) * pos_stride] > qpos) --R;
  std::fill(p + R, p + all, 0.0f);
  if (D == 64) attend_row_d<64>(q, K, V, stride, pos, pos_stride, qpos, R, D, scale, p, out);
  else if (D == 128) attend_row_d<128>(q, K, V, stride, pos, pos_stride, qpos, R, D, scale, p, out);
  else attend_row_d<0>(q, K, V, stride, pos, pos_stride, qpos, R, D, scale, p, out);
}

//! A tiny fork-join pool: run(n, f) calls f(i) for i in [0, n) over the caller and the workers.
class thread_pool {
 public:
  explicit thread_pool(unsigned threads) {
    for (unsigned i = 1; i < std::max(1u, threads); ++i) workers_.emplace_back([this] { loop(); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    stop_ = true;
    gen_.fetch_add(1);
    gen_.notify_all();
    for (auto& w : workers_) w.join();
  }
  [[nodiscard]] unsigned size() const noexcept { return static_cast<unsigned>(workers_.size()) + 1; }
  void run(unsigned n, const std::function<void(unsigned)>& f) {
    if (workers_.empty() || n <= 1) {
      for (unsigned i = 0; i < n; ++i) f(i);
      return;
    }
    job_ = &f;
    n_ = n;
    next_.store(0);
    pending_.store(static_cast<unsigned>(workers_.size()));
    gen_.fetch_add(1);
    gen_.notify_all();
    work();
    for (int spin = 0; pending_.load() != 0; ++spin)
      if (spin > 4096) std::this_thread::yield();
  }

 private:
  void work() {
    for (unsigned i; (i = next_.fetch_add(1)) < n_;) (*job_)(i);
  }
  void loop() {
    std::uint64_t seen = 0;
    for (;;) {
      // spin a little (the next matmul is microseconds away), then sleep on the futex
      for (int spin = 0; gen_.load() == seen && spin < 20000; ++spin) {
      }
      gen_.wait(seen);
      seen = gen_.load();
      if (stop_) return;
      work();
      pending_.fetch_sub(1);
    }
  }
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned n_ = 0;
  std::atomic<unsigned> next_{0}, pending_{0};
  std::atomic<std::uint64_t> gen_{0};
  std::atomic<bool> stop_{false};
};

// ---- the model ---------------------------------------------------------------------------------

struct config {
  std::uint32_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn = 0, vocab = 0;
  std::uint32_t context = 0;
  float eps = 1e-5f;
  float rope_base = 10000.0f;
};

//! A weight matrix `[rows][cols]`, stored as fp32 or fp16 (one of the two vectors is filled).
struct matrix {
  std::vector<float> f32;
  std::vector<std::uint16_t> f16;
  std::size_t rows = 0, cols = 0;
  [[nodiscard]] float operator()(std::size_t r, std::size_t i) const noexcept {
    return f16.empty() ? f32[r * cols + i] : kvcache::half_to_float(f16[r * cols + i]);
  }
  void row(std::size_t r, float* dst) const noexcept {
    for (std::size_t i = 0; i < cols; ++i) dst[i] = (*this)(r, i);
  }
};

struct layer_weights {
  std::vector<float> attn_norm, ffn_norm;
  matrix wq, wk, wv, wo, w_gate, w_up, w_down;
};

//! How the engine keeps the (dequantized) weights: fp32, or fp16 (half the bytes to stream per
//! token; the rounding is far below the Q4_1 quantization error of the file).
enum class weight_format { f32, f16 };

struct weights {
  config cfg;
  matrix embd;    //!< [vocab][hidden]
  matrix output;  //!< [vocab][hidden]; empty when tied to embd
  std::vector<float> out_norm;
  std::vector<layer_weights> layers;
  [[nodiscard]] const matrix& lm_head() const noexcept { return output.rows ? output : embd; }
};

//! Reads the hyperparameters and dequantizes every tensor of a `llama` GGUF, checking shapes.
inline kvcache::result<weights> load(const gguf::file& f, weight_format format = weight_format::f32) {
  weights W;
  config& c = W.cfg;
  const gguf::value* arch = f.find("general.architecture");
  if (!arch || arch->s != "llama")
    return kvcache::status{kvcache::errc::invalid_argument,
                           "model: general.architecture is '" + (arch ? arch->s : std::string("?")) +
                               "', this engine runs 'llama'"};
  auto u32 = [&](const char* key, std::optional<double> fb = {}) -> kvcache::result<std::uint32_t> {
    auto v = f.number(std::string("llama.") + key, fb);
    if (!v) return v.error();
    return static_cast<std::uint32_t>(*v);
  };
  auto get = [&](const char* key, std::uint32_t& dst, std::optional<double> fb = {}) -> kvcache::status {
    auto v = u32(key, fb);
    if (!v) return v.error();
    dst = *v;
    return {};
  };
  KVCACHE_TRY(get("block_count", c.layers));
  KVCACHE_TRY(get("embedding_length", c.hidden));
  KVCACHE_TRY(get("attention.head_count", c.heads));
  KVCACHE_TRY(get("attention.head_count_kv", c.kv_heads, c.heads));
  KVCACHE_TRY(get("feed_forward_length", c.ffn));
  KVCACHE_TRY(get("context_length", c.context, 2048));
  if (c.heads == 0 || c.kv_heads == 0 || c.heads % c.kv_heads || c.hidden % c.heads || c.layers == 0)
    return kvcache::status{kvcache::errc::invalid_argument, "model: inconsistent head counts"};
  c.head_dim = c.hidden / c.heads;
  if (c.head_dim % 8 || c.head_dim > 128 || c.hidden % 8 || c.ffn % 8)  // kernels: vectors of 8 floats
    return kvcache::status{kvcache::errc::invalid_argument,
                           "model: head_dim (at most 128), hidden and feed_forward_length must be multiples of 8"};
  std::uint32_t rope_dim = c.head_dim;
  KVCACHE_TRY(get("rope.dimension_count", rope_dim, c.head_dim));
  if (rope_dim != c.head_dim)
    return kvcache::status{kvcache::errc::invalid_argument, "model: partial RoPE is not supported"};
  if (auto e = f.number("llama.attention.layer_norm_rms_epsilon", 1e-5)) c.eps = static_cast<float>(*e);
  if (auto b = f.number("llama.rope.freq_base", 10000.0)) c.rope_base = static_cast<float>(*b);
  if (f.find("llama.rope.scaling.type") && f.find("llama.rope.scaling.type")->s != "none")
    return kvcache::status{kvcache::errc::invalid_argument, "model: RoPE scaling is not supported"};

  auto tensor = [&](const std::string& name, std::vector<float>& dst, std::uint64_t cols,
                    std::uint64_t rows) -> kvcache::status {
    const gguf::tensor_info* t = f.tensor(name);
    if (!t) return {kvcache::errc::invalid_argument, "model: missing tensor " + name};
    if (t->row_length() != cols || t->rows() != rows)
      return {kvcache::errc::shape_mismatch, "model: tensor " + name + " is [" + std::to_string(t->row_length()) +
                                                 " x " + std::to_string(t->rows()) + "], expected [" +
                                                 std::to_string(cols) + " x " + std::to_string(rows) + "]"};
    return f.read_f32(*t, dst);
  };
  auto mat = [&](const std::string& name, matrix& m, std::uint64_t cols, std::uint64_t rows) -> kvcache::status {
    KVCACHE_TRY(tensor(name, m.f32, cols, rows));
    m.rows = rows;
    m.cols = cols;
    if (format == weight_format::f16) {
      m.f16.resize(m.f32.size());
      for (std::size_t i = 0; i < m.f32.size(); ++i) m.f16[i] = kvcache::float_to_half(m.f32[i]);
      std::vector<float>().swap(m.f32);
    }
    return {};
  };
  const gguf::tensor_info* te = f.tensor("token_embd.weight");
  if (!te) return kvcache::status{kvcache::errc::invalid_argument, "model: missing tensor token_embd.weight"};
  c.vocab = static_cast<std::uint32_t>(te->rows());
  const std::uint64_t H = c.hidden, KV = std::uint64_t{c.kv_heads} * c.head_dim, F = c.ffn;
  KVCACHE_TRY(mat("token_embd.weight", W.embd, H, c.vocab));
  KVCACHE_TRY(tensor("output_norm.weight", W.out_norm, H, 1));
  if (f.tensor("output.weight")) KVCACHE_TRY(mat("output.weight", W.output, H, c.vocab));
  W.layers.resize(c.layers);
  for (std::uint32_t l = 0; l < c.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    auto& L = W.layers[l];
    KVCACHE_TRY(tensor(p + "attn_norm.weight", L.attn_norm, H, 1));
    KVCACHE_TRY(mat(p + "attn_q.weight", L.wq, H, H));
    KVCACHE_TRY(mat(p + "attn_k.weight", L.wk, H, KV));
    KVCACHE_TRY(mat(p + "attn_v.weight", L.wv, H, KV));
    KVCACHE_TRY(mat(p + "attn_output.weight", L.wo, H, H));
    KVCACHE_TRY(tensor(p + "ffn_norm.weight", L.ffn_norm, H, 1));
    KVCACHE_TRY(mat(p + "ffn_gate.weight", L.w_gate, H, F));
    KVCACHE_TRY(mat(p + "ffn_up.weight", L.w_up, H, F));
    KVCACHE_TRY(mat(p + "ffn_down.weight", L.w_down, F, H));
  }
  return W;
}

//! The geometry of the model's K/V (fp32: the engine computes in fp32).
inline kvcache::geometry kv_geometry(const config& c) {
  return kvcache::geometry{c.layers, c.kv_heads, c.heads, c.head_dim, kvcache::dtype::f32};
}

//! RMSNorm of `n` rows of `dim` values: y = x / sqrt(mean(x²) + eps) * w.
inline void rmsnorm(const float* x, const float* w, float* y, std::size_t n, std::size_t dim, float eps) {
  for (std::size_t t = 0; t < n; ++t) {
    const float* xr = x + t * dim;
    float* yr = y + t * dim;
    double ss = 0;
    for (std::size_t i = 0; i < dim; ++i) ss += double(xr[i]) * xr[i];
    const float r = 1.0f / std::sqrt(static_cast<float>(ss / double(dim)) + eps);
    for (std::size_t i = 0; i < dim; ++i) yr[i] = xr[i] * r * w[i];
  }
}

//! ggml's normal RoPE on `heads` rows of `dim`: pairs (2i, 2i+1) rotated by pos·inv_freq[i],
//! inv_freq[i] = base^(-2i/dim), precomputed once per model.
inline void rope(float* x, std::uint32_t heads, std::uint32_t dim, std::int64_t pos,
                 const double* inv_freq) {
  for (std::uint32_t i = 0; i < dim / 2; ++i) {
    const double theta = double(pos) * inv_freq[i];
    const float cs = static_cast<float>(std::cos(theta)), sn = static_cast<float>(std::sin(theta));
    for (std::uint32_t h = 0; h < heads; ++h) {
      float* p = x + std::size_t{h} * dim + 2 * i;
      const float a = p[0], b = p[1];
      p[0] = a * cs - b * sn;
      p[1] = a * sn + b * cs;
    }
  }
}

//! Time spent, in seconds (for tokens/s and the share of step time inside kvcache).
struct timing {
  double total = 0;      //!< whole forward steps (engine::time)
  double cache = 0;      //!< inside kvcache calls: append, view, observe, evict
  double attention = 0;  //!< attention over the cache's view, quantized K/V decoded included
  std::uint64_t tokens = 0;
};

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

//! One sequence's K/V as the forward pass sees them: the part of a step that touches the cache.
//! Type-erased, so that one batch can hold sequences of caches of different types (the tool's
//! --sweep runs a policy or quantizer per sequence, all through the same weight reads).
class kv_sequence {
 public:
  kv_sequence() = default;
  kv_sequence(const kv_sequence&) = delete;
  kv_sequence& operator=(const kv_sequence&) = delete;
  virtual ~kv_sequence() = default;

  //! Layer `l` of a step of `n` tokens at positions position() ..: appends their K/V
  //! (`[n][kv_heads][head_dim]` fp32, after RoPE), attends the queries (`[n][heads][head_dim]`)
  //! over the layer's view into `out` (shaped as the queries), feeds the policy, evicts.
  virtual kvcache::status attend(std::uint32_t l, std::uint32_t n, const float* q, const float* k, const float* v,
                                 float* out) = 0;
  [[nodiscard]] virtual kvcache::cache_stats stats() const = 0;
  //! True when the policy moves tokens between a working and a holding tier (SentenceKV): it is
  //! fed before the step's attention, and needs the step's token ids (set_step_tokens).
  [[nodiscard]] virtual bool tiered() const noexcept { return false; }
  [[nodiscard]] std::int64_t position() const noexcept { return pos_; }
  timing time;  //!< this sequence's attention and kvcache calls

  //! The ids of the tokens that end a sentence (`kvcache::sentence_boundary_ids` of the
  //! tokenizer), for policies that consume a `boundary_signal`.
  void set_boundary_ids(std::vector<std::int32_t> ids) { boundary_ids_ = std::move(ids); }
  //! The token ids of the next step (`n` of them, copied), for the boundary flags: the driver
  //! calls it before each engine::forward (the engine itself sees only embeddings' ids).
  void set_step_tokens(const std::int32_t* ids, std::uint32_t n) {
    step_tokens_.assign(ids, ids + n);
    step_pos_ = pos_;
  }

 protected:
  //! Boundary flags of the step's `n` tokens into `flags`; an error when the driver did not
  //! give this step's token ids.
  kvcache::status step_boundaries(std::uint32_t n, std::vector<std::uint8_t>& flags) const {
    if (step_pos_ != pos_ || step_tokens_.size() != n)
      return {kvcache::errc::invalid_argument,
              "kv_sequence: this policy needs the step's token ids (set_step_tokens before engine::forward)"};
    flags.assign(n, 0);
    for (std::uint32_t i = 0; i < n; ++i)
      flags[i] = std::find(boundary_ids_.begin(), boundary_ids_.end(), step_tokens_[i]) != boundary_ids_.end();
    return {};
  }

 private:
  friend class engine;  // advances the position after each step
  std::int64_t pos_ = 0;
  std::int64_t step_pos_ = -1;  // position() when set_step_tokens was called
  std::vector<std::int32_t> step_tokens_, boundary_ids_;
};

//! A sequence of a `kvcache::cache`: how an engine drives the library, one layer at a time.
template <class Cache>
class cache_sequence final : public kv_sequence {
 public:
  //! A new sequence in `kc`, which outlives it.
  cache_sequence(Cache& kc, const config& c, thread_pool& pool)
      : kc_(kc), c_(c), pool_(pool), seq_(kc_.open().value()) {}
  //! A new sequence in a cache of its own.
  cache_sequence(std::unique_ptr<Cache> kc, const config& c, thread_pool& pool)
      : owned_(std::move(kc)), kc_(*owned_), c_(c), pool_(pool), seq_(kc_.open().value()) {}
  ~cache_sequence() override { (void)kc_.close(seq_); }

  [[nodiscard]] Cache& cache() noexcept { return kc_; }
  [[nodiscard]] kvcache::seq_id id() const noexcept { return seq_; }
  [[nodiscard]] kvcache::cache_stats stats() const override { return kc_.stats(); }
  [[nodiscard]] bool tiered() const noexcept override { return is_tiered; }

  kvcache::status attend(std::uint32_t l, std::uint32_t n, const float* q, const float* k, const float* v,
                         float* out) override {
    if constexpr (is_tiered) return attend_tiered(l, n, q, k, v, out);
    else return attend_then_evict(l, n, q, k, v, out);
  }

 private:
  static constexpr bool is_tiered = kvcache::tiered_policy<typename Cache::policy_type>;

  //! Append, attend over the view, then feed the policy (what the step computed) and evict.
  kvcache::status attend_then_evict(std::uint32_t l, std::uint32_t n, const float* q, const float* k,
                                    const float* v, float* out) {
    const std::uint32_t D = c_.head_dim, KH = c_.kv_heads;
    auto t0 = std::chrono::steady_clock::now();
    const kvcache::kv_tensor kt{k, kvcache::dtype::f32, n, KH, D};
    const kvcache::kv_tensor vt{v, kvcache::dtype::f32, n, KH, D};
    KVCACHE_TRY(kc_.append(seq_, l, kt, vt));
    auto vr = kc_.view(seq_, l);
    if (!vr) return vr.error();
    const kvcache::layer_view view = *vr;
    time.cache += seconds_since(t0);
    attention(view, n, q, out);
    t0 = std::chrono::steady_clock::now();
    // the signal the policy declares: the probabilities just computed (H2O), or the queries (SnapKV)
    constexpr bool want_probs = Cache::template consumes<kvcache::attention_signal>;
    const std::uint32_t QH = c_.heads, R = view.rows;
    if constexpr (want_probs) {
      KVCACHE_TRY(kc_.observe(seq_, l, kvcache::attention_signal{probs_.data(), QH, n, R}));
    } else if constexpr (Cache::template consumes<kvcache::query_signal>) {
      KVCACHE_TRY(kc_.observe(seq_, l, kvcache::query_signal{q, kvcache::dtype::f32, n}));
    }
    KVCACHE_TRY(kc_.evict(seq_, l));
    time.cache += seconds_since(t0);
    return {};
  }

  //! A tiered policy (SentenceKV) picks what this step's queries attend to: append, feed it the
  //! step's queries, keys and sentence boundaries, evict (demote, drop, promote), then attend over
  //! the view, then prefetch what its next evict of this layer will probably promote (staged in
  //! the background while the rest of the step runs).
  kvcache::status attend_tiered(std::uint32_t l, std::uint32_t n, const float* q, const float* k, const float* v,
                                float* out) {
    const std::uint32_t D = c_.head_dim, KH = c_.kv_heads;
    auto t0 = std::chrono::steady_clock::now();
    if constexpr (Cache::template consumes<kvcache::boundary_signal>) KVCACHE_TRY(step_boundaries(n, flags_));
    const kvcache::kv_tensor kt{k, kvcache::dtype::f32, n, KH, D};
    const kvcache::kv_tensor vt{v, kvcache::dtype::f32, n, KH, D};
    KVCACHE_TRY(kc_.append(seq_, l, kt, vt));
    // exactly the signals the policy declares, from these three
    auto pick = [](const auto& sig) {
      if constexpr (Cache::template consumes<std::decay_t<decltype(sig)>>) return std::tuple(sig);
      else return std::tuple<>();
    };
    const auto sigs = std::tuple_cat(pick(kvcache::query_signal{q, kvcache::dtype::f32, n}),
                                     pick(kvcache::key_signal{k, kvcache::dtype::f32, n}),
                                     pick(kvcache::boundary_signal{flags_.data(), n}));
    if constexpr (std::tuple_size_v<std::decay_t<decltype(sigs)>> != 0)
      KVCACHE_TRY(std::apply([&](const auto&... s) { return kc_.observe(seq_, l, s...); }, sigs));
    KVCACHE_TRY(kc_.evict(seq_, l));
    auto vr = kc_.view(seq_, l);
    if (!vr) return vr.error();
    time.cache += seconds_since(t0);
    attention(*vr, n, q, out);
    t0 = std::chrono::steady_clock::now();
    KVCACHE_TRY(kc_.prefetch(seq_, l));
    time.cache += seconds_since(t0);
    return {};
  }

  //! The step's queries over a layer's view into `out` (probs_ filled when the policy consumes
  //! attention probabilities); timed as attention.
  void attention(const kvcache::layer_view& view, std::uint32_t n, const float* q, float* out) {
    const std::uint32_t D = c_.head_dim, QH = c_.heads, KH = c_.kv_heads, G = QH / KH;
    const auto t0 = std::chrono::steady_clock::now();
    const std::uint32_t R = view.rows;
    // K/V as fp32 [rows][kv_heads][D]: in place for fp32 passthrough, else decoded.
    const float* K;
    const float* V;
    std::size_t kstride;  // floats between slots
    constexpr bool in_place = std::is_same_v<typename Cache::quantizer_type, kvcache::passthrough>;
    if (in_place && view.order == kvcache::layout::token_major && view.type == kvcache::dtype::f32) {
      K = reinterpret_cast<const float*>(view.k);
      V = reinterpret_cast<const float*>(view.v);
      kstride = view.slot_stride / sizeof(float);
    } else {
      kd_.resize(std::size_t{R} * KH * D);
      vd_.resize(kd_.size());
      pool_.run(2, [&](unsigned half) {
        for (std::uint32_t s = half; s < R; s += 2)
          for (std::uint32_t h = 0; h < KH; ++h) {
            const std::size_t o = (std::size_t{s} * KH + h) * D;
            kvcache::decode_key(view, kc_.quant(), s, h, kd_.data() + o);
            kvcache::decode_value(view, kc_.quant(), s, h, vd_.data() + o);
          }
      });
      K = kd_.data();
      V = vd_.data();
      kstride = std::size_t{KH} * D;
    }
    constexpr bool want_probs = Cache::template consumes<kvcache::attention_signal>;
    if (want_probs) probs_.assign(std::size_t{QH} * n * R, 0.0f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const std::size_t QD = std::size_t{QH} * D;
    const std::int64_t pos = position();
    pool_.run(QH, [&](unsigned qh) {
      thread_local std::vector<float> p;
      p.resize(R);
      const std::uint32_t h = qh / G;
      for (std::uint32_t t = 0; t < n; ++t) {
        attend_row(q + t * QD + std::size_t{qh} * D, K + std::size_t{h} * D, V + std::size_t{h} * D, kstride,
                   view.positions + h, KH, pos + t, R, D, scale, p.data(), out + t * QD + std::size_t{qh} * D);
        if (want_probs)
          std::copy_n(p.data(), R, probs_.begin() + static_cast<std::ptrdiff_t>((std::size_t{qh} * n + t) * R));
      }
    });
    time.attention += seconds_since(t0);
  }

  std::unique_ptr<Cache> owned_;  // null when the cache is shared
  Cache& kc_;
  const config& c_;
  thread_pool& pool_;
  kvcache::seq_id seq_;
  std::vector<float> kd_, vd_, probs_;
  std::vector<std::uint8_t> flags_;  // the step's sentence boundaries (tiered policies)
};

//! The forward pass over a batch of sequences: every weight matrix is read once per step for all
//! of the batch's rows (decode is bound by those reads: N rows cost little more than one), while
//! each sequence attends over its own cache. A row's result does not depend on the batch it is in.
class engine {
 public:
  engine(const weights& w, thread_pool& pool) : w_(w), pool_(pool) {
    const config& c = w_.cfg;
    inv_freq_.resize(c.head_dim / 2);
    for (std::uint32_t i = 0; i < c.head_dim / 2; ++i)
      inv_freq_[i] = std::pow(double(c.rope_base), -2.0 * i / c.head_dim);
  }
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  timing time;  //!< whole steps (the sequences' attention included); tokens counts rows

  //! One step: sequence `seqs[s]` consumes `tokens[s*n .. s*n+n)` at its position. `logits`:
  //! `[seqs][n][vocab]` when `all_logits`, else each sequence's last token `[seqs][vocab]`; may be null.
  //! `hidden`, when not null, gets every row's final hidden state (after the output norm, what the
  //! LM head reads), `[seqs][n][hidden]` (segment embeddings: episodes.cpp mean-pools them).
  kvcache::status forward(std::span<kv_sequence* const> seqs, const std::int32_t* tokens, std::uint32_t n,
                          float* logits, bool all_logits = false, float* hidden = nullptr) {
    const auto t_start = std::chrono::steady_clock::now();
    const config& c = w_.cfg;
    const std::size_t H = c.hidden, QD = std::size_t{c.heads} * c.head_dim,
                      KD = std::size_t{c.kv_heads} * c.head_dim, F = c.ffn;
    const std::size_t S = seqs.size(), rows = S * n;  // row s*n+t: token t of sequence s
    for (std::size_t r = 0; r < rows; ++r)
      if (tokens[r] < 0 || static_cast<std::uint32_t>(tokens[r]) >= c.vocab)
        return {kvcache::errc::invalid_argument, "forward: token id " + std::to_string(tokens[r]) + " out of range"};
    x_.resize(rows * H);
    xn_.resize(rows * H);
    q_.resize(rows * QD);
    k_.resize(rows * KD);
    v_.resize(rows * KD);
    att_.resize(rows * QD);
    gate_.resize(rows * F);
    up_.resize(rows * F);
    for (std::size_t r = 0; r < rows; ++r) w_.embd.row(static_cast<std::size_t>(tokens[r]), x_.data() + r * H);
    for (std::uint32_t l = 0; l < c.layers; ++l) {
      const layer_weights& L = w_.layers[l];
      rmsnorm(x_.data(), L.attn_norm.data(), xn_.data(), rows, H, c.eps);
      matmul(L.wq, QD, H, xn_.data(), rows, q_.data());
      matmul(L.wk, KD, H, xn_.data(), rows, k_.data());
      matmul(L.wv, KD, H, xn_.data(), rows, v_.data());
      for (std::size_t s = 0; s < S; ++s)
        for (std::uint32_t t = 0; t < n; ++t) {
          const std::size_t r = s * n + t;
          rope(q_.data() + r * QD, c.heads, c.head_dim, seqs[s]->position() + t, inv_freq_.data());
          rope(k_.data() + r * KD, c.kv_heads, c.head_dim, seqs[s]->position() + t, inv_freq_.data());
        }
      for (std::size_t s = 0; s < S; ++s) {
        const std::size_t r = s * n;
        KVCACHE_TRY(seqs[s]->attend(l, n, q_.data() + r * QD, k_.data() + r * KD, v_.data() + r * KD,
                                    att_.data() + r * QD));
      }
      matmul(L.wo, H, H, att_.data(), rows, xn_.data());
      for (std::size_t i = 0; i < rows * H; ++i) x_[i] += xn_[i];
      rmsnorm(x_.data(), L.ffn_norm.data(), xn_.data(), rows, H, c.eps);
      matmul(L.w_gate, F, H, xn_.data(), rows, gate_.data());
      matmul(L.w_up, F, H, xn_.data(), rows, up_.data());
      for (std::size_t i = 0; i < rows * F; ++i) {
        const float g = gate_[i];
        gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];  // SwiGLU: silu(gate) * up
      }
      matmul(L.w_down, H, F, gate_.data(), rows, xn_.data());
      for (std::size_t i = 0; i < rows * H; ++i) x_[i] += xn_[i];
    }
    for (kv_sequence* s : seqs) {
      s->pos_ += n;
      s->time.tokens += n;
    }
    if (hidden) rmsnorm(x_.data(), w_.out_norm.data(), hidden, rows, H, c.eps);
    if (logits) {
      // the rows that need logits, gathered so that the LM head reads its weights once
      const std::uint32_t first = all_logits ? 0 : n - 1, m = all_logits ? n : 1;
      for (std::size_t s = 0; s < S; ++s)
        rmsnorm(x_.data() + (s * n + first) * H, w_.out_norm.data(), xn_.data() + s * m * H, m, H, c.eps);
      matmul(w_.lm_head(), c.vocab, H, xn_.data(), S * m, logits);
    }
    time.tokens += rows;
    time.total += seconds_since(t_start);
    return {};
  }

  //! forward() of one sequence.
  kvcache::status forward(kv_sequence& seq, const std::int32_t* tokens, std::uint32_t n, float* logits,
                          bool all_logits = false, float* hidden = nullptr) {
    kv_sequence* one[] = {&seq};
    return forward(one, tokens, n, logits, all_logits, hidden);
  }

  //! Moves `seq` to `pos` (its next token's position): a probe (episodes.hpp) that views another
  //! sequence's cache without appending starts each pass at that sequence's position.
  static void set_position(kv_sequence& seq, std::int64_t pos) noexcept { seq.pos_ = pos; }

  //! y[t][o] = W[o]·x[t] for W `[rows][cols]`, x `[n][cols]`, y `[n][rows]`, split over the pool.
  void matmul(const matrix& W, std::size_t rows, std::size_t cols, const float* x, std::size_t n, float* y) {
    const unsigned parts = std::min<unsigned>(pool_.size() * 4, static_cast<unsigned>((rows + 15) / 16));
    const std::size_t per = (rows + parts - 1) / parts;
    pool_.run(parts, [&](unsigned p) {
      const std::size_t r0 = p * per, r1 = std::min(rows, r0 + per);
      if (W.f16.empty())
        for (std::size_t r = r0; r < r1; ++r) dot_rows(W.f32.data() + r * cols, x, cols, cols, n, y + r, rows);
      else
        for (std::size_t r = r0; r < r1; ++r) dot_rows_h(W.f16.data() + r * cols, x, cols, cols, n, y + r, rows);
    });
  }

 private:
  const weights& w_;
  thread_pool& pool_;
  std::vector<double> inv_freq_;
  std::vector<float> x_, xn_, q_, k_, v_, att_, gate_, up_;
};

}  // namespace smollm
