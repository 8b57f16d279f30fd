// SPDX-License-Identifier: Apache-2.0
//! @file
//! FP8 E4M3FN against a conversion written here from the format's definition: all 256 codes, the
//! rounding edges (midpoints, ties to even, saturation), specials; the quantizer's scales.
#include <kvcache/quant/fp8_e4m3.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "catch.hpp"

namespace kv = kvcache;

namespace {

// The E4M3FN definition: bias 7, subnormals m/8 * 2^-6, S.1111.111 is NaN, no infinities.
double ref_value(std::uint8_t c) {
  const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}

// Nearest finite code (ties to the even code), saturating beyond 448, NaN -> 0x7f|sign.
std::uint8_t ref_encode(float x) {
  const std::uint8_t sign = std::signbit(x) ? 0x80 : 0;
  if (std::isnan(x)) return 0x7f | sign;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return 0x7e | sign;
  std::uint8_t best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (int c = 0; c <= 0x7e; ++c) {
    const double err = std::fabs(ref_value(static_cast<std::uint8_t>(c)) - a);
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best = static_cast<std::uint8_t>(c);
      best_err = err;
    }
  }
  return best | sign;
}

std::uint32_t bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

}  // namespace

TEST_CASE("fp8 e4m3: all 256 codes decode to the definition and encode back", "[quant][fp8]") {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const float f = kv::e4m3_to_float(code);
    const double r = ref_value(code);
    INFO("code " << c);
    if (std::isnan(r)) {
      CHECK(std::isnan(f));
      CHECK(kv::float_to_e4m3(f) == (0x7f | (c & 0x80)));
      continue;
    }
    CHECK(static_cast<double>(f) == r);
    CHECK(std::signbit(f) == ((c & 0x80) != 0));
    CHECK(kv::float_to_e4m3(f) == code);
  }
  CHECK(kv::e4m3_to_float(0x7e) == 448.0f);
  CHECK(kv::e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
}

TEST_CASE("fp8 e4m3: rounding edges, ties to even, saturation, specials", "[quant][fp8]") {
  std::vector<float> probes;
  for (int c = 0; c < 0x7e; ++c) {  // every pair of neighbours, both signs
    const float lo = kv::e4m3_to_float(static_cast<std::uint8_t>(c));
    const float hi = kv::e4m3_to_float(static_cast<std::uint8_t>(c + 1));
    const float mid = (lo + hi) / 2;  // exact: at most 5 significant bits
    REQUIRE(static_cast<double>(mid) == (static_cast<double>(lo) + hi) / 2);
    for (float p : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f), lo, hi,
                    std::nextafter(hi, 0.0f), std::nextafter(lo, 1e9f)}) {
      probes.push_back(p);
      probes.push_back(-p);
    }
  }
  for (float p : {448.0f, 449.0f, 463.99f, 464.0f, 464.01f, 480.0f, 1e6f, 3.4e38f,
                  std::numeric_limits<float>::infinity(), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), 0.0f, 1e-30f, std::ldexp(1.0f, -10),
                  std::nextafter(std::ldexp(1.0f, -10), 1.0f), std::ldexp(3.0f, -11)}) {
    probes.push_back(p);
    probes.push_back(-p);
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 200000; ++i) {  // random bit patterns over the whole float range
    std::uint32_t b = rng();
    float f;
    std::memcpy(&f, &b, 4);
    if (!std::isnan(f)) probes.push_back(f);
  }
  std::uniform_real_distribution<float> near(-500.0f, 500.0f);
  for (int i = 0; i < 100000; ++i) probes.push_back(near(rng));
  for (float p : probes) {
    INFO("x = " << p << " (bits " << bits(p) << ")");
    REQUIRE(kv::float_to_e4m3(p) == ref_encode(p));
  }
  // ties go to the even code
  CHECK(kv::float_to_e4m3(1.0625f) == 0x38);   // between 1 (0x38) and 1.125 (0x39)
  CHECK(kv::float_to_e4m3(1.1875f) == 0x3a);   // between 1.125 (0x39) and 1.25 (0x3a)
  CHECK(kv::float_to_e4m3(std::ldexp(1.0f, -10)) == 0x00);  // half the smallest subnormal
  CHECK(kv::float_to_e4m3(std::ldexp(3.0f, -10)) == 0x02);
  // saturation instead of NaN/overflow, NaN stays NaN
  CHECK(kv::float_to_e4m3(std::numeric_limits<float>::infinity()) == 0x7e);
  CHECK(kv::float_to_e4m3(-std::numeric_limits<float>::infinity()) == 0xfe);
  CHECK(kv::float_to_e4m3(std::numeric_limits<float>::quiet_NaN()) == 0x7f);
  CHECK(kv::float_to_e4m3(-0.0f) == 0x80);
}

TEST_CASE("fp8 e4m3 quantizer: scales per layer and per head, given or from the first append", "[quant][fp8]") {
  const kv::geometry g{2, 2, 4, 8, kv::dtype::f32};
  std::vector<float> x(2 * 2 * 8);  // [tokens 2][heads 2][8]
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = (i % 8 == 3 ? 10.0f : 1.0f) * ((i / 8) + 1) * (i % 2 ? -1.0f : 1.0f);
  std::vector<std::uint8_t> codes(x.size());
  std::vector<float> back(8);

  SECTION("per layer, from the first append: amax/448, then fixed") {
    kv::fp8_e4m3 q;
    REQUIRE(q.bind(g));
    CHECK(q.scale(1, kv::kv_part::v) == 0.0f);
    q.calibrate(x.data(), 2, g, {1, kv::kv_part::v, 0});
    CHECK(q.scale(1, kv::kv_part::v) == 40.0f / 448.0f);
    CHECK(q.scale(1, kv::kv_part::k) == 0.0f);
    CHECK(q.scale(0, kv::kv_part::v) == 0.0f);
    std::vector<float> y(x.size(), 1000.0f);
    q.calibrate(y.data(), 2, g, {1, kv::kv_part::v, 0});  // no change
    CHECK(q.scale(1, kv::kv_part::v) == 40.0f / 448.0f);
    q.encode(x.data(), 4, g, reinterpret_cast<std::byte*>(codes.data()), nullptr, {1, kv::kv_part::v, 0});
    const float s = q.scale(1, kv::kv_part::v);
    for (std::size_t i = 0; i < x.size(); ++i) CHECK(codes[i] == kv::float_to_e4m3(x[i] / s));
    q.decode(reinterpret_cast<std::byte*>(codes.data()) + 24, reinterpret_cast<const std::byte*>(q.shared_scales(1, kv::kv_part::v)), 1, g, back.data());
    for (std::size_t i = 0; i < 8; ++i) CHECK(std::fabs(back[i] - x[24 + i]) <= std::fabs(x[24 + i]) / 16 + 1e-6f);
    CHECK(q.shared_scale_head_stride() == 0);
  }
  SECTION("per head, from the first append; encode starting at head 1") {
    kv::fp8_e4m3 q(kv::scale_granularity::per_head);
    REQUIRE(q.bind(g));
    q.calibrate(x.data(), 2, g, {0, kv::kv_part::k, 0});
    const float s0 = q.scale(0, kv::kv_part::k, 0), s1 = q.scale(0, kv::kv_part::k, 1);
    CHECK(s0 == 30.0f / 448.0f);  // head 0 rows are 0 and 2: amax 10*3
    CHECK(s1 == 40.0f / 448.0f);
    CHECK(q.shared_scale_head_stride() == sizeof(float));
    q.encode(x.data() + 8, 2, g, reinterpret_cast<std::byte*>(codes.data()), nullptr, {0, kv::kv_part::k, 1});
    for (std::size_t i = 0; i < 8; ++i) CHECK(codes[i] == kv::float_to_e4m3(x[8 + i] / s1));
    for (std::size_t i = 0; i < 8; ++i) CHECK(codes[8 + i] == kv::float_to_e4m3(x[16 + i] / s0));
  }
  SECTION("given scales are checked against the geometry") {
    kv::fp8_e4m3 ok(kv::scale_granularity::per_layer, {0.5f, 0.25f}, {1.0f, 2.0f});
    CHECK(ok.bind(g));
    CHECK(ok.scale(1, kv::kv_part::k) == 0.25f);
    kv::fp8_e4m3 wrong(kv::scale_granularity::per_head, {0.5f, 0.25f}, {1.0f, 2.0f});
    CHECK(wrong.bind(g).code() == kv::errc::shape_mismatch);
    kv::fp8_e4m3 bad(kv::scale_granularity::per_layer, {0.5f, -1.0f}, {1.0f, 2.0f});
    CHECK(bad.bind(g).code() == kv::errc::invalid_argument);
  }
  SECTION("an all-zero first append gets scale 1; NaN/Inf input is rejected by validate") {
    kv::fp8_e4m3 q;
    std::vector<float> z(x.size(), 0.0f);
    q.calibrate(z.data(), 2, g, {0, kv::kv_part::k, 0});
    CHECK(q.scale(0, kv::kv_part::k) == 1.0f);
    CHECK(q.validate(x.data(), x.size(), kv::dtype::f32));
    z[5] = std::numeric_limits<float>::quiet_NaN();
    auto st = q.validate(z.data(), z.size(), kv::dtype::f32);
    CHECK(st.code() == kv::errc::invalid_argument);
    CHECK(st.message().find("element 5") != std::string::npos);
    const std::uint16_t h[3] = {0x3c00, 0x7c00, 0};
    CHECK(q.validate(h, 3, kv::dtype::f16).code() == kv::errc::invalid_argument);
    const std::uint16_t hb[3] = {0x3f80, 0xff80, 0};  // bf16 -inf
    CHECK(q.validate(hb, 3, kv::dtype::bf16).code() == kv::errc::invalid_argument);
    const std::uint16_t fine[2] = {0x7bff, 0xfbff};  // f16 max, -max
    CHECK(q.validate(fine, 2, kv::dtype::f16));
  }
}

TEST_CASE("fp8 e4m3 quantizer: the batched encode equals e4m3_encode on every value", "[quant][fp8]") {
  // The host encode multiplies by 1/scale and re-encodes by division the blocks where that could
  // differ (SSE2 or portable loop): compare with e4m3_encode (x / scale) on random values, values
  // at and beside every rounding midpoint times the scale, and scales whose reciprocal is not normal.
  std::mt19937 rng(41);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const std::uint32_t D = 40;  // not a multiple of 32: tails
  for (float scale : {1.0f, 0.0123f, 3.7f, 1e-3f, 448.0f / 3.0f, 1e-39f, 1e38f, 0x1p-125f, 0x1p125f}) {
    std::vector<float> x;
    for (int c = 0; c < 0x7e; ++c) {
      const float lo = kv::e4m3_to_float(static_cast<std::uint8_t>(c));
      const float mid = (lo + kv::e4m3_to_float(static_cast<std::uint8_t>(c + 1))) / 2;
      for (float p : {mid, lo}) {
        const float v = p * scale;
        for (float w : {v, std::nextafter(v, 0.0f), std::nextafter(v, 1e38f), -v}) x.push_back(w);
      }
    }
    while (x.size() % D) x.push_back(n(rng) * scale * 100);
    for (int i = 0; i < 4000; ++i) x.push_back(n(rng) * scale * (i % 7 == 0 ? 1000.0f : 10.0f));
    while (x.size() % D) x.push_back(0.0f);
    const std::uint32_t tokens = static_cast<std::uint32_t>(x.size() / D);
    for (kv::dtype t : {kv::dtype::f32, kv::dtype::f16, kv::dtype::bf16}) {
      // inputs of type t; the expectation is computed from the widened values
      std::vector<std::uint16_t> h(x.size());
      std::vector<float> w(x);
      if (t != kv::dtype::f32)
        for (std::size_t i = 0; i < x.size(); ++i) {
          h[i] = t == kv::dtype::f16 ? kv::float_to_half(x[i]) : kv::float_to_bf16(x[i]);
          w[i] = kv::load_as_float(h.data(), i, t);
        }
      const void* src = t == kv::dtype::f32 ? static_cast<const void*>(x.data()) : h.data();
      const kv::geometry g{1, 1, 1, D, t};
      kv::fp8_e4m3 q(kv::scale_granularity::per_layer, {scale}, {scale});
      REQUIRE(q.bind(g));
      std::vector<std::byte> codes(x.size());
      q.encode(src, tokens, g, codes.data(), nullptr, {0, kv::kv_part::k, 0});
      for (std::size_t i = 0; i < x.size(); ++i) {
        INFO("scale " << scale << " dtype " << kv::to_string(t) << " value " << w[i] << " index " << i);
        REQUIRE(static_cast<std::uint8_t>(codes[i]) == kv::e4m3_encode(w[i], scale));
      }
    }
  }
}
