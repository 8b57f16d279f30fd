// SPDX-License-Identifier: Apache-2.0
//! @file
//! Quantize (validate + encode, what append does per row) and dequantize (decode to fp32)
//! throughput per format, on one core, against memcpy of the same fp16 bytes in the same run.
//!
//! Throughput is counted in bytes of the fp16 K tensor in both directions (the input of quantize,
//! the dense equivalent of what dequantize produces), so every ratio is against the same memcpy:
//!   ratio = (fp16 bytes / s of the format) / (memcpy bytes / s)
//! The tensor is 16384 tokens x 8 KV heads x 128 dims (32 MiB of fp16), larger than the last-level
//! cache, so memcpy runs at memory bandwidth (a cache-resident memcpy is a much higher bar). KIVI keys are quantized per channel in groups of 32 tokens.
#include "ratio_reporter.hpp"

#include <kvcache/cache.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>
#include <kvcache/quant/passthrough.hpp>
#include <kvcache/reference/attention.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace kv = kvcache;
using kvcache_bench::ratio_pair;

namespace {

constexpr std::uint32_t kTokens = 16384, kHeads = 8, kDim = 128;
constexpr std::size_t kRows = std::size_t{kTokens} * kHeads;
constexpr std::size_t kElems = kRows * kDim;
constexpr std::size_t kBytes = kElems * 2;  // fp16

const kv::geometry& geo() {
  static const kv::geometry g{1, kHeads, kHeads * 4, kDim, kv::dtype::f16};
  return g;
}

const std::vector<std::uint16_t>& input() {
  static const std::vector<std::uint16_t> x = [] {
    std::vector<std::uint16_t> v(kElems);
    std::mt19937 rng(5);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (std::size_t i = 0; i < v.size(); ++i)
      v[i] = kv::float_to_half(n(rng) * (i % kDim == 3 ? 8.0f : 1.0f));
    return v;
  }();
  return x;
}

void prefault(std::vector<std::byte>& b) { std::memset(b.data(), 1, b.size()); }

void bm_memcpy(benchmark::State& st) {
  const auto& x = input();
  std::vector<std::byte> dst(kBytes);
  prefault(dst);
  for (auto _ : st) {
    std::memcpy(dst.data(), x.data(), kBytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kBytes));
}

template <class Q>
void bm_quantize(benchmark::State& st) {
  Q q;
  const auto& g = geo();
  if (!kv::quant_bind(q, g)) std::abort();
  const auto& x = input();
  std::vector<std::byte> codes(kRows * q.code_bytes(g)), meta(kRows * q.scale_bytes(g) + 1);
  prefault(codes);
  prefault(meta);
  for (auto _ : st) {
    if (!kv::quant_validate(q, x.data(), kElems, g.type)) std::abort();
    q.encode(x.data(), kRows, g, codes.data(), meta.data(), {0, kv::kv_part::k, 0});
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kBytes));
}

template <class Q>
void bm_dequantize(benchmark::State& st) {
  Q q;
  const auto& g = geo();
  if (!kv::quant_bind(q, g)) std::abort();
  const auto& x = input();
  std::vector<std::byte> codes(kRows * q.code_bytes(g)), meta(kRows * q.scale_bytes(g) + 1);
  q.encode(x.data(), kRows, g, codes.data(), meta.data(), {0, kv::kv_part::k, 0});
  const float* shared = kv::quant_shared_scales(q, 0, kv::kv_part::k);
  const std::byte* scales = shared ? reinterpret_cast<const std::byte*>(shared) : meta.data();
  std::vector<float> out(kElems);
  std::memset(out.data(), 0, kElems * sizeof(float));
  for (auto _ : st) {
    q.decode(codes.data(), scales, kRows, g, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kBytes));
}

// KIVI keys: per head, groups of 32 tokens quantized per channel (the rows of one head are
// kHeads rows apart in the token-major input).
template <unsigned Bits>
void bm_kivi_keys_quantize(benchmark::State& st) {
  const auto& x = input();
  constexpr std::size_t G = 32, row_code = kDim * Bits / 8;
  std::vector<std::byte> codes(kRows * row_code), meta(kTokens / G * kHeads * 4 * kDim);
  prefault(codes);
  prefault(meta);
  std::vector<float> block(G * kDim);
  for (auto _ : st) {
    if (!kv::detail::check_finite("kivi", x.data(), kElems, kv::dtype::f16, kv::kivi_input_limit)) std::abort();
    for (std::size_t t0 = 0; t0 < kTokens; t0 += G)
      for (std::size_t h = 0; h < kHeads; ++h) {
        for (std::size_t t = 0; t < G; ++t)
          kv::detail::load_row(x.data(), ((t0 + t) * kHeads + h) * kDim, kDim, kv::dtype::f16, block.data() + t * kDim);
        kv::kivi_encode_channels<Bits>(block.data(), G, kDim, codes.data() + (t0 * kHeads + h) * row_code,
                                       kHeads * row_code, meta.data() + (t0 / G * kHeads + h) * 4 * kDim);
      }
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kBytes));
}

template <unsigned Bits>
void bm_kivi_keys_dequantize(benchmark::State& st) {
  const auto& x = input();
  constexpr std::size_t G = 32, row_code = kDim * Bits / 8;
  std::vector<std::byte> codes(kRows * row_code), meta(kTokens / G * kHeads * 4 * kDim);
  std::vector<float> block(G * kDim), out(kElems);
  for (std::size_t t0 = 0; t0 < kTokens; t0 += G)
    for (std::size_t h = 0; h < kHeads; ++h) {
      for (std::size_t t = 0; t < G; ++t)
        kv::detail::load_row(x.data(), ((t0 + t) * kHeads + h) * kDim, kDim, kv::dtype::f16, block.data() + t * kDim);
      kv::kivi_encode_channels<Bits>(block.data(), G, kDim, codes.data() + (t0 * kHeads + h) * row_code,
                                     kHeads * row_code, meta.data() + (t0 / G * kHeads + h) * 4 * kDim);
    }
  std::memset(out.data(), 0, kElems * sizeof(float));
  for (auto _ : st) {
    for (std::size_t t0 = 0; t0 < kTokens; t0 += G)
      for (std::size_t h = 0; h < kHeads; ++h)
        kv::kivi_decode_channels<Bits>(codes.data() + (t0 * kHeads + h) * row_code, kHeads * row_code, G, kDim,
                                       meta.data() + (t0 / G * kHeads + h) * 4 * kDim,
                                       out.data() + t0 * kHeads * kDim + h * G * kDim);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kBytes));
}

// One decode step of the host reference attention (32 query heads, GQA 4) over a 4096-token
// layer view of format Q, which it dequantizes on the fly; compared with the fp16 view.
template <class Q>
void bm_attention(benchmark::State& st) {
  constexpr std::uint32_t T = 4096;
  const kv::geometry g{1, kHeads, kHeads * 4, kDim, kv::dtype::f16};
  kv::cache<kv::heap_memory, kv::keep_all, Q> c({g, T});
  auto s = c.open().value();
  const auto& x = input();
  const kv::kv_tensor k{x.data(), kv::dtype::f16, T, kHeads, kDim};
  const kv::kv_tensor v{x.data() + std::size_t{T} * kHeads * kDim, kv::dtype::f16, T, kHeads, kDim};
  if (!c.append(s, 0, k, v)) std::abort();
  const auto view = c.view(s, 0).value();
  std::vector<float> q(std::size_t{g.query_heads} * kDim, 0.01f), out(q.size());
  for (auto _ : st) {
    if (!kv::reference::attention(view, g.query_heads, q.data(), 1, nullptr, out.data(), nullptr, c.quant()))
      std::abort();
    benchmark::DoNotOptimize(out.data());
  }
}

}  // namespace

BENCHMARK(bm_attention<kv::passthrough>)->Name("attention/f16")->UseRealTime();
BENCHMARK(bm_attention<kv::fp8_e4m3>)->Name("attention/fp8_e4m3")->UseRealTime();
BENCHMARK(bm_attention<kv::q8_0>)->Name("attention/q8_0")->UseRealTime();
BENCHMARK(bm_attention<kv::q4_0>)->Name("attention/q4_0")->UseRealTime();
BENCHMARK(bm_attention<kv::kivi_per_token<4>>)->Name("attention/kivi4_values")->UseRealTime();
BENCHMARK(bm_attention<kv::kivi_per_token<2>>)->Name("attention/kivi2_values")->UseRealTime();
BENCHMARK(bm_memcpy)->Name("memcpy")->UseRealTime();
#define KV_FORMAT(Q, NAME)                                                                   \
  BENCHMARK(bm_quantize<Q>)->Name("quantize/" NAME)->UseRealTime();                          \
  BENCHMARK(bm_dequantize<Q>)->Name("dequantize/" NAME)->UseRealTime();
KV_FORMAT(kv::passthrough, "f16")
KV_FORMAT(kv::fp8_e4m3, "fp8_e4m3")
KV_FORMAT(kv::q8_0, "q8_0")
KV_FORMAT(kv::q4_0, "q4_0")
KV_FORMAT(kv::kivi_per_token<8>, "kivi8_values")
KV_FORMAT(kv::kivi_per_token<4>, "kivi4_values")
KV_FORMAT(kv::kivi_per_token<3>, "kivi3_values")
KV_FORMAT(kv::kivi_per_token<2>, "kivi2_values")
BENCHMARK(bm_kivi_keys_quantize<4>)->Name("quantize/kivi4_keys")->UseRealTime();
BENCHMARK(bm_kivi_keys_dequantize<4>)->Name("dequantize/kivi4_keys")->UseRealTime();
BENCHMARK(bm_kivi_keys_quantize<2>)->Name("quantize/kivi2_keys")->UseRealTime();
BENCHMARK(bm_kivi_keys_dequantize<2>)->Name("dequantize/kivi2_keys")->UseRealTime();

int main(int argc, char** argv) {
  std::vector<ratio_pair> pairs;
  for (const char* f : {"f16", "fp8_e4m3", "q8_0", "q4_0", "kivi8_values", "kivi4_values",
                        "kivi3_values", "kivi2_values", "kivi4_keys", "kivi2_keys"}) {
    pairs.push_back({std::string("quantize/") + f, "memcpy"});
    pairs.push_back({std::string("dequantize/") + f, "memcpy"});
  }
  for (const char* f : {"fp8_e4m3", "q8_0", "q4_0", "kivi4_values", "kivi2_values"})
    pairs.push_back({std::string("attention/") + f, "attention/f16"});
  return kvcache_bench::run_with_ratios(argc, argv, std::move(pairs));
}
