// SPDX-License-Identifier: Apache-2.0
//! @file
//! q8_0 / q4_0 byte-exact against a slow transcription of llama.cpp's reference quantizers
//! (quantize_row_q8_0_ref / quantize_row_q4_0_ref, ggml-quants.c) written here.
#include <kvcache/quant/ggml_blocks.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"

namespace kv = kvcache;

namespace {

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

// ggml's layouts, spelled out
struct ref_q8_0 { std::uint16_t d; std::int8_t qs[32]; };
struct ref_q4_0 { std::uint16_t d; std::uint8_t qs[16]; };

std::uint16_t fp32_to_fp16(float f) { return kv::float_to_half(f); }  // RNE, as GGML_FP32_TO_FP16

// quantize_row_q8_0_ref
void ref_quantize_q8_0(const float* x, ref_q8_0* y, std::int64_t k) {
  const int nb = static_cast<int>(k / 32);
  for (int i = 0; i < nb; i++) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) {
      const float v = x[i * 32 + j];
      amax = MAX(amax, fabsf(v));
    }
    const float d = amax / ((1 << 7) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int j = 0; j < 32; ++j) {
      const float x0 = x[i * 32 + j] * id;
      y[i].qs[j] = static_cast<std::int8_t>(roundf(x0));
    }
  }
}

// quantize_row_q4_0_ref
void ref_quantize_q4_0(const float* x, ref_q4_0* y, std::int64_t k) {
  static const int qk = 32;
  const int nb = static_cast<int>(k / qk);
  for (int i = 0; i < nb; i++) {
    float amax = 0.0f;
    float max = 0.0f;
    for (int j = 0; j < qk; j++) {
      const float v = x[i * qk + j];
      if (amax < fabsf(v)) {
        amax = fabsf(v);
        max = v;
      }
    }
    const float d = max / -8;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int j = 0; j < qk / 2; ++j) {
      const float x0 = x[i * qk + 0 + j] * id;
      const float x1 = x[i * qk + qk / 2 + j] * id;
      const std::uint8_t xi0 = static_cast<std::uint8_t>(MIN(15, static_cast<std::int8_t>(x0 + 8.5f)));
      const std::uint8_t xi1 = static_cast<std::uint8_t>(MIN(15, static_cast<std::int8_t>(x1 + 8.5f)));
      y[i].qs[j] = xi0;
      y[i].qs[j] |= static_cast<std::uint8_t>(xi1 << 4);
    }
  }
}

// Blocks that probe the formulas' corners, then random ones.
std::vector<float> test_rows(std::size_t random_blocks, unsigned seed) {
  std::vector<float> x;
  auto block = [&](auto f) { for (int j = 0; j < 32; ++j) x.push_back(f(j)); };
  block([](int) { return 0.0f; });                                       // all zero: d = 0
  block([](int j) { return j == 0 ? 127.0f : (j % 2 ? 2.5f : -2.5f); });  // q8 ties: half away
  block([](int j) { return j == 5 ? 127.0f : 0.5f * static_cast<float>(j - 16); });
  block([](int j) { return j == 3 ? -8.0f : -3.5f + 0.25f * static_cast<float>(j); });  // q4: d = 1
  block([](int j) { return j == 2 ? 4.0f : (j == 9 ? -4.0f : 0.1f * static_cast<float>(j)); });  // q4 tie: first wins
  block([](int j) { return j == 9 ? 4.0f : (j == 2 ? -4.0f : 0.1f * static_cast<float>(j)); });
  block([](int j) { return j == 31 ? 1e-30f : 0.0f; });                  // tiny: d underflows fp16
  block([](int j) { return 60000.0f * std::sin(static_cast<float>(j)); });  // large
  block([](int j) { return static_cast<float>(j) / 3.0f; });
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (std::size_t b = 0; b < random_blocks; ++b) {
    const float scale = std::ldexp(1.0f, static_cast<int>(rng() % 20) - 10);
    const bool outlier = rng() % 4 == 0;
    for (int j = 0; j < 32; ++j) x.push_back(scale * (b % 2 ? n(rng) : u(rng)) * (outlier && j == 7 ? 50.0f : 1.0f));
  }
  return x;
}

}  // namespace

TEST_CASE("q8_0: byte-exact with llama.cpp's reference quantizer", "[quant][ggml]") {
  const std::vector<float> x = test_rows(4000, 11);
  const std::size_t blocks = x.size() / 32;
  std::vector<ref_q8_0> ref(blocks);
  ref_quantize_q8_0(x.data(), ref.data(), static_cast<std::int64_t>(x.size()));
  std::vector<std::byte> out(blocks * 34);
  const kv::geometry g{1, 1, 1, 32, kv::dtype::f32};
  kv::q8_0 q;
  REQUIRE(q.code_bytes(g) == 34);
  q.encode(x.data(), blocks, g, out.data(), nullptr);
  for (std::size_t b = 0; b < blocks; ++b) {
    INFO("block " << b);
    REQUIRE(std::memcmp(out.data() + b * 34, &ref[b], 34) == 0);
  }
  // the tie block: 2.5 -> 3, -2.5 -> -3 (roundf), not to even
  CHECK(static_cast<std::int8_t>(out[34 + 2 + 1]) == 3);
  CHECK(static_cast<std::int8_t>(out[34 + 2 + 2]) == -3);
  // decode: q * d, error <= d/2 (+ fp16 rounding of d)
  std::vector<float> y(x.size());
  q.decode(out.data(), nullptr, blocks, g, y.data());
  for (std::size_t b = 0; b < blocks; ++b) {
    const float d = kv::half_to_float(ref[b].d);
    for (int j = 0; j < 32; ++j) REQUIRE(y[b * 32 + j] == static_cast<float>(ref[b].qs[j]) * d);
  }
}

TEST_CASE("q4_0: byte-exact with llama.cpp's reference quantizer", "[quant][ggml]") {
  const std::vector<float> x = test_rows(4000, 12);
  const std::size_t blocks = x.size() / 32;
  std::vector<ref_q4_0> ref(blocks);
  ref_quantize_q4_0(x.data(), ref.data(), static_cast<std::int64_t>(x.size()));
  std::vector<std::byte> out(blocks * 18);
  const kv::geometry g{1, 1, 1, 64, kv::dtype::f32};  // two blocks per row
  kv::q4_0 q;
  REQUIRE(q.code_bytes(g) == 36);
  q.encode(x.data(), blocks / 2, g, out.data(), nullptr);
  for (std::size_t b = 0; b + 1 < blocks; ++b) {
    INFO("block " << b);
    REQUIRE(std::memcmp(out.data() + b * 18, &ref[b], 18) == 0);
  }
  // first-wins on |max| ties keeps the sign of the first: block 4 has +4 first, block 5 -4 first
  CHECK(kv::half_to_float(ref[4].d) == -0.5f);
  CHECK(kv::half_to_float(ref[5].d) == 0.5f);
  std::vector<float> y(x.size());
  q.decode(out.data(), nullptr, blocks / 2, g, y.data());
  for (std::size_t b = 0; b + 1 < blocks; ++b) {
    const float d = kv::half_to_float(ref[b].d);
    for (int j = 0; j < 16; ++j) {
      REQUIRE(y[b * 32 + j] == static_cast<float>((ref[b].qs[j] & 15) - 8) * d);
      REQUIRE(y[b * 32 + j + 16] == static_cast<float>((ref[b].qs[j] >> 4) - 8) * d);
    }
  }
}

TEST_CASE("q8_0/q4_0: f16 input is widened exactly; shapes and NaN are refused", "[quant][ggml]") {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 2.0f);
  std::vector<std::uint16_t> h(4 * 64);
  std::vector<float> f(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) {
    h[i] = kv::float_to_half(n(rng));
    f[i] = kv::half_to_float(h[i]);
  }
  const kv::geometry g16{1, 2, 2, 64, kv::dtype::f16}, g32{1, 2, 2, 64, kv::dtype::f32};
  std::vector<std::byte> a(4 * 2 * 34), b(a.size());
  kv::q8_0{}.encode(h.data(), 4, g16, a.data(), nullptr);
  kv::q8_0{}.encode(f.data(), 4, g32, b.data(), nullptr);
  CHECK(a == b);
  std::vector<std::byte> c(4 * 2 * 18), d(c.size());
  kv::q4_0{}.encode(h.data(), 4, g16, c.data(), nullptr);
  kv::q4_0{}.encode(f.data(), 4, g32, d.data(), nullptr);
  CHECK(c == d);

  CHECK(kv::q8_0{}.bind({1, 1, 1, 48, kv::dtype::f16}).code() == kv::errc::invalid_argument);
  CHECK(kv::q4_0{}.bind({1, 1, 1, 64, kv::dtype::f16}));
  f[70] = std::numeric_limits<float>::infinity();
  CHECK(kv::q4_0{}.validate(f.data(), f.size(), kv::dtype::f32).code() == kv::errc::invalid_argument);
}

TEST_CASE("q8_0/q4_0: finite input whose fp16 block scale would overflow is refused", "[quant][ggml]") {
  // d = amax / 127 (q8_0) or amax / 8 (q4_0) is stored as fp16 (max 65504): beyond that the
  // block would decode to Inf/NaN. Just inside the bound encodes and decodes finite.
  std::vector<float> x(64, 1.0f);
  x[5] = 65504.0f * 127.0f * 1.01f;
  const auto r8 = kv::q8_0{}.validate(x.data(), x.size(), kv::dtype::f32);
  CHECK(r8.code() == kv::errc::invalid_argument);
  CHECK(r8.message().find("range") != std::string::npos);
  x[5] = 65504.0f * 8.0f * 1.01f;
  CHECK(kv::q8_0{}.validate(x.data(), x.size(), kv::dtype::f32));  // fine for q8_0
  CHECK(kv::q4_0{}.validate(x.data(), x.size(), kv::dtype::f32).code() == kv::errc::invalid_argument);
  x[5] = 65504.0f * 8.0f * 0.99f;
  REQUIRE(kv::q4_0{}.validate(x.data(), x.size(), kv::dtype::f32));
  const kv::geometry g{1, 1, 1, 64, kv::dtype::f32};
  std::vector<std::byte> codes(2 * 18);
  kv::q4_0{}.encode(x.data(), 1, g, codes.data(), nullptr);
  std::vector<float> back(64);
  for (int b = 0; b < 2; ++b) kv::ggml::dequantize_block_q4_0(codes.data() + b * 18, back.data() + b * 32);
  for (float v : back) CHECK(std::isfinite(v));
}

TEST_CASE("q8_0/q4_0: the batched encode equals the per-block functions, f16 and bf16 too", "[quant][ggml]") {
  // rows of 3 blocks (batches of 8 blocks cross rows and end early), ties, zero blocks, and
  // blocks whose largest |x| appears with both signs (q4_0 keeps the first)
  std::mt19937 rng(43);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const std::size_t rows = 37, D = 96, N = rows * D;
  std::vector<float> x(N);
  for (std::size_t i = 0; i < N; ++i) x[i] = n(rng) * ((i / 32) % 5 == 0 ? 100.0f : 1.0f);
  for (std::size_t j = 0; j < 32; ++j) x[64 + j] = 0.0f;                                    // zero block
  for (std::size_t j = 0; j < 32; ++j) x[128 + j] = (static_cast<float>(j % 9) - 4.0f) * 0.5f;  // ties
  x[200] = -7.0f, x[210] = 7.0f, x[230] = 7.0f;                                               // ±max
  x[260] = 7.0f, x[270] = -7.0f;
  for (kv::dtype t : {kv::dtype::f32, kv::dtype::f16, kv::dtype::bf16}) {
    std::vector<std::uint16_t> h(N);
    std::vector<float> w(x);
    if (t != kv::dtype::f32)
      for (std::size_t i = 0; i < N; ++i) {
        h[i] = t == kv::dtype::f16 ? kv::float_to_half(x[i]) : kv::float_to_bf16(x[i]);
        w[i] = kv::load_as_float(h.data(), i, t);
      }
    const void* src = t == kv::dtype::f32 ? static_cast<const void*>(x.data()) : h.data();
    const kv::geometry g{1, 1, 1, static_cast<std::uint32_t>(D), t};
    std::vector<std::byte> out(N / 32 * 34), ref(N / 32 * 34);
    kv::q8_0{}.encode(src, rows, g, out.data(), nullptr);
    for (std::size_t b = 0; b < N / 32; ++b) kv::ggml::quantize_block_q8_0(w.data() + b * 32, ref.data() + b * 34);
    CHECK(std::memcmp(out.data(), ref.data(), N / 32 * 34) == 0);
    kv::q4_0{}.encode(src, rows, g, out.data(), nullptr);
    for (std::size_t b = 0; b < N / 32; ++b) kv::ggml::quantize_block_q4_0(w.data() + b * 32, ref.data() + b * 18);
    CHECK(std::memcmp(out.data(), ref.data(), N / 32 * 18) == 0);
    std::vector<float> y(N), yr(N);
    kv::q4_0{}.decode(out.data(), nullptr, rows, g, y.data());
    for (std::size_t b = 0; b < N / 32; ++b) kv::ggml::dequantize_block_q4_0(out.data() + b * 18, yr.data() + b * 32);
    CHECK(std::memcmp(y.data(), yr.data(), N * 4) == 0);
  }
}
