// SPDX-License-Identifier: Apache-2.0
//! @file
//! fp16/bf16 <-> fp32 conversions against their definitions, and the typed load/store helpers.
//!
//! The references here are written from the IEEE definitions (value = ±m·2^e in double, round to
//! the nearest representable value, ties to the even bit pattern, overflow at max + ulp/2), not
//! from the library's bit tricks.
#include <kvcache/core/dtype.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"

using kvcache::dtype;

namespace {

// ---- references from the definitions -----------------------------------------------------

// Value of a binary16 pattern.
double half_value(std::uint16_t h) {
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  double v;
  if (e == 0)
    v = std::ldexp(static_cast<double>(m), -24);
  else if (e == 0x1f)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(static_cast<double>(1024 + m), e - 25);
  return (h & 0x8000) ? -v : v;
}

// Value of a bfloat16 pattern: sign, 8-bit exponent (bias 127), 7-bit mantissa.
double bf16_value(std::uint16_t b) {
  const int e = (b >> 7) & 0xff;
  const int m = b & 0x7f;
  double v;
  if (e == 0)
    v = std::ldexp(static_cast<double>(m), -133);  // subnormal: m * 2^(1-127-7)
  else if (e == 0xff)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(static_cast<double>(128 + m), e - 134);
  return (b & 0x8000) ? -v : v;
}

// Round the finite non-negative value `a` to the format whose positive patterns are
// [0, inf_pattern], ordered by value; `value(inf_pattern)` is taken as `inf_as` (the next power
// of two after the largest finite value), so overflow falls out of the same nearest-even rule.
template <class ValueFn>
std::uint16_t round_ref(double a, std::uint16_t inf_pattern, double inf_as, ValueFn value) {
  auto val = [&](std::uint32_t p) { return p == inf_pattern ? inf_as : value(static_cast<std::uint16_t>(p)); };
  if (a >= inf_as) return inf_pattern;
  std::uint32_t lo = 0, hi = inf_pattern;  // val(lo) <= a < val(hi)
  while (hi - lo > 1) {
    const std::uint32_t mid = (lo + hi) / 2;
    if (val(mid) <= a)
      lo = mid;
    else
      hi = mid;
  }
  const double dlo = a - val(lo), dhi = val(hi) - a;  // exact in double
  if (dlo < dhi) return static_cast<std::uint16_t>(lo);
  if (dhi < dlo) return static_cast<std::uint16_t>(hi);
  return static_cast<std::uint16_t>((lo & 1u) == 0 ? lo : hi);  // tie: even pattern
}

std::uint16_t float_to_half_ref(float f) {
  const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  return static_cast<std::uint16_t>(
      sign | round_ref(std::fabs(static_cast<double>(f)), 0x7c00, 65536.0, half_value));
}

std::uint16_t float_to_bf16_ref(float f) {
  const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  return static_cast<std::uint16_t>(
      sign | round_ref(std::fabs(static_cast<double>(f)), 0x7f80, std::ldexp(1.0, 128), bf16_value));
}

bool half_is_nan(std::uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool bf16_is_nan(std::uint16_t b) { return (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0; }

constexpr std::uint64_t none = ~std::uint64_t{0};

float from_bits(std::uint32_t x) { return std::bit_cast<float>(x); }

// Inputs that probe rounding: for each positive pattern p below inf, its value, the midpoint to
// p+1 and the floats just around both; plus the same negated, plus random float bit patterns.
template <class ValueFn>
std::vector<float> probe_inputs(std::uint16_t inf_pattern, double inf_as, ValueFn value) {
  std::vector<float> in;
  in.reserve(std::size_t{inf_pattern} * 10 + 600000);
  auto val = [&](std::uint32_t p) { return p == inf_pattern ? inf_as : value(static_cast<std::uint16_t>(p)); };
  for (std::uint32_t p = 0; p < inf_pattern; ++p) {
    const float v = static_cast<float>(val(p));
    const float mid = static_cast<float>((val(p) + val(p + 1)) / 2);  // exact in float
    for (float x : {v, mid}) {
      for (float y : {x, std::nextafter(x, 0.0f), std::nextafter(x, std::numeric_limits<float>::infinity())}) {
        in.push_back(y);
        in.push_back(-y);
      }
    }
  }
  std::mt19937 rng(12345);
  for (int i = 0; i < 500000; ++i) {
    const float f = from_bits(static_cast<std::uint32_t>(rng()));
    if (!std::isnan(f)) in.push_back(f);
  }
  for (float f : {0.0f, -0.0f, std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()})
    in.push_back(f);
  return in;
}

}  // namespace

TEST_CASE("dtype: sizes and names", "[core][dtype]") {
  CHECK(kvcache::size_of(dtype::f32) == 4);
  CHECK(kvcache::size_of(dtype::f16) == 2);
  CHECK(kvcache::size_of(dtype::bf16) == 2);
  CHECK(std::string(kvcache::to_string(dtype::f32)) == "f32");
  CHECK(std::string(kvcache::to_string(dtype::f16)) == "f16");
  CHECK(std::string(kvcache::to_string(dtype::bf16)) == "bf16");
}

TEST_CASE("half_to_float is exact for all 65536 patterns", "[core][dtype]") {
  long first_bad = -1;
  for (std::uint32_t h = 0; h <= 0xffff && first_bad < 0; ++h) {
    const auto p = static_cast<std::uint16_t>(h);
    const float f = kvcache::half_to_float(p);
    const double want = half_value(p);
    if (half_is_nan(p)) {
      if (!std::isnan(f) || std::signbit(f) != static_cast<bool>(p & 0x8000)) first_bad = h;
    } else if (static_cast<double>(f) != want || std::signbit(f) != static_cast<bool>(p & 0x8000)) {
      first_bad = h;  // signbit: -0 must stay -0
    }
  }
  CHECK(first_bad == -1);
}

TEST_CASE("every half pattern round-trips through float (NaNs stay NaN)", "[core][dtype]") {
  long first_bad = -1;
  std::size_t nans = 0;
  for (std::uint32_t h = 0; h <= 0xffff && first_bad < 0; ++h) {
    const auto p = static_cast<std::uint16_t>(h);
    const std::uint16_t back = kvcache::float_to_half(kvcache::half_to_float(p));
    if (half_is_nan(p)) {
      ++nans;
      if (!half_is_nan(back) || (back & 0x8000) != (p & 0x8000)) first_bad = h;
    } else if (back != p) {
      first_bad = h;
    }
  }
  CHECK(first_bad == -1);
  CHECK(nans == 2 * 1023);
}

TEST_CASE("float_to_half rounds to nearest, ties to even, as defined", "[core][dtype]") {
  SECTION("hand-picked edges") {
    const float one = 1.0f;
    CHECK(kvcache::float_to_half(one) == 0x3c00);
    // ulp of half at 1 is 2^-10: 1 + 2^-11 is a tie between 0x3c00 (even) and 0x3c01.
    CHECK(kvcache::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);
    // 1 + 3*2^-11 is a tie between 0x3c01 (odd) and 0x3c02 = 1 + 2^-9 (even).
    CHECK(kvcache::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
    CHECK(kvcache::half_to_float(0x3c02) == 1.0f + std::ldexp(1.0f, -9));
    // Just above the tie rounds up.
    CHECK(kvcache::float_to_half(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3c01);
    CHECK(kvcache::float_to_half(std::nextafter(1.0f + std::ldexp(1.0f, -11), 0.0f)) == 0x3c00);
    // Largest finite half 65504; 65520 = 65504 + ulp/2 is a tie with "65536" -> inf (even).
    CHECK(kvcache::float_to_half(65504.0f) == 0x7bff);
    CHECK(kvcache::float_to_half(std::nextafter(65520.0f, 0.0f)) == 0x7bff);
    CHECK(kvcache::float_to_half(65520.0f) == 0x7c00);
    CHECK(kvcache::float_to_half(-65520.0f) == 0xfc00);
    CHECK(kvcache::float_to_half(1e10f) == 0x7c00);
    CHECK(kvcache::float_to_half(std::numeric_limits<float>::max()) == 0x7c00);
    CHECK(kvcache::float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
    CHECK(kvcache::float_to_half(-std::numeric_limits<float>::infinity()) == 0xfc00);
    // Subnormals: smallest 2^-24; 2^-25 is a tie between 0 (even) and 1.
    CHECK(kvcache::float_to_half(std::ldexp(1.0f, -24)) == 0x0001);
    CHECK(kvcache::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);
    CHECK(kvcache::float_to_half(-std::ldexp(1.0f, -25)) == 0x8000);
    CHECK(kvcache::float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
    CHECK(kvcache::float_to_half(3 * std::ldexp(1.0f, -25)) == 0x0002);  // tie 1|2 -> 2
    CHECK(kvcache::float_to_half(5 * std::ldexp(1.0f, -25)) == 0x0002);  // tie 2|3 -> 2
    CHECK(kvcache::float_to_half(std::ldexp(1.0f, -14)) == 0x0400);      // smallest normal
    // Halfway between the largest subnormal 0x3ff (odd) and 2^-14: rounds up into the normals.
    CHECK(kvcache::float_to_half(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -25)) == 0x0400);
    CHECK(kvcache::float_to_half(std::numeric_limits<float>::denorm_min()) == 0x0000);
    CHECK(kvcache::float_to_half(0.0f) == 0x0000);
    CHECK(kvcache::float_to_half(-0.0f) == 0x8000);
    CHECK(kvcache::float_to_half(-2.5f) == 0xc100);
    CHECK(half_is_nan(kvcache::float_to_half(std::numeric_limits<float>::quiet_NaN())));
    CHECK(half_is_nan(kvcache::float_to_half(from_bits(0x7f800001u))));  // payload in low bits only
    CHECK(kvcache::float_to_half(from_bits(0xff800001u)) & 0x8000);
  }
  SECTION("against the reference on every value, midpoint and neighbour, plus random floats") {
    const auto in = probe_inputs(0x7c00, 65536.0, half_value);
    CHECK(in.size() > 800000);
    // The float bits of the first input that converts differently (none: all match).
    std::uint64_t first_bad_bits = none;
    for (float f : in)
      if (kvcache::float_to_half(f) != float_to_half_ref(f)) {
        first_bad_bits = std::bit_cast<std::uint32_t>(f);
        break;
      }
    CHECK(first_bad_bits == none);
  }
}

TEST_CASE("bf16: exact widening, round trip, nearest-even narrowing", "[core][dtype]") {
  SECTION("bf16_to_float is exact for all 65536 patterns and round-trips") {
    long first_bad = -1;
    for (std::uint32_t b = 0; b <= 0xffff && first_bad < 0; ++b) {
      const auto p = static_cast<std::uint16_t>(b);
      const float f = kvcache::bf16_to_float(p);
      const std::uint16_t back = kvcache::float_to_bf16(f);
      if (bf16_is_nan(p)) {
        if (!std::isnan(f) || !bf16_is_nan(back) || (back & 0x8000) != (p & 0x8000)) first_bad = b;
      } else if (static_cast<double>(f) != bf16_value(p) || back != p ||
                 std::signbit(f) != static_cast<bool>(p & 0x8000)) {
        first_bad = b;
      }
    }
    CHECK(first_bad == -1);
  }
  SECTION("hand-picked edges") {
    CHECK(kvcache::float_to_bf16(1.0f) == 0x3f80);
    // ulp at 1 is 2^-7: 1 + 2^-8 ties to 0x3f80 (even); 1 + 3*2^-8 ties to 0x3f82 (even).
    CHECK(kvcache::float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
    CHECK(kvcache::float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
    CHECK(kvcache::float_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)) == 0x3f81);
    // Overflow: the largest finite bf16 is 0x7f7f; float bits 0x7f7f8000 are the tie -> inf.
    CHECK(kvcache::float_to_bf16(from_bits(0x7f7f7fffu)) == 0x7f7f);
    CHECK(kvcache::float_to_bf16(from_bits(0x7f7f8000u)) == 0x7f80);
    CHECK(kvcache::float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
    CHECK(kvcache::float_to_bf16(-std::numeric_limits<float>::max()) == 0xff80);
    CHECK(kvcache::float_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
    // Subnormals are kept (bf16 has float's exponent range).
    CHECK(kvcache::float_to_bf16(from_bits(0x00010000u)) == 0x0001);
    CHECK(kvcache::float_to_bf16(from_bits(0x00008000u)) == 0x0000);  // tie -> even 0
    CHECK(kvcache::float_to_bf16(from_bits(0x00018000u)) == 0x0002);  // tie 1|2 -> 2
    CHECK(kvcache::float_to_bf16(-0.0f) == 0x8000);
    CHECK(bf16_is_nan(kvcache::float_to_bf16(std::numeric_limits<float>::quiet_NaN())));
    CHECK(bf16_is_nan(kvcache::float_to_bf16(from_bits(0x7f800001u))));  // would truncate to inf
    CHECK(bf16_is_nan(kvcache::float_to_bf16(from_bits(0xffbfffffu))));
    CHECK((kvcache::float_to_bf16(from_bits(0xffbfffffu)) & 0x8000) != 0);
  }
  SECTION("against the reference on every value, midpoint and neighbour, plus random floats") {
    const auto in = probe_inputs(0x7f80, std::ldexp(1.0, 128), bf16_value);
    std::uint64_t first_bad_bits = none;
    for (float f : in)
      if (kvcache::float_to_bf16(f) != float_to_bf16_ref(f)) {
        first_bad_bits = std::bit_cast<std::uint32_t>(f);
        break;
      }
    CHECK(first_bad_bits == none);
  }
}

TEST_CASE("load_as_float / store_from_float address element i in the given type", "[core][dtype]") {
  const float values[] = {1.0f, -2.5f, 0.333333f, 65504.0f, 1e-6f, -0.0f, 3.0e38f};
  const dtype type = GENERATE(dtype::f32, dtype::f16, dtype::bf16);
  const std::size_t n = std::size(values);
  const std::size_t es = kvcache::size_of(type);
  std::vector<unsigned char> buf(n * es + 8, 0xAB);  // guard bytes at the end

  for (std::size_t i = 0; i < n; ++i) kvcache::store_from_float(buf.data(), i, type, values[i]);
  for (std::size_t i = n * es; i < buf.size(); ++i) CHECK(buf[i] == 0xAB);  // nothing beyond n

  for (std::size_t i = 0; i < n; ++i) {
    const float got = kvcache::load_as_float(buf.data(), i, type);
    float want = values[i];
    if (type == dtype::f16) want = kvcache::half_to_float(kvcache::float_to_half(values[i]));
    if (type == dtype::bf16) want = kvcache::bf16_to_float(kvcache::float_to_bf16(values[i]));
    CHECK(std::bit_cast<std::uint32_t>(got) == std::bit_cast<std::uint32_t>(want));
    // The stored bits are the conversion's bits, at offset i * size.
    if (type == dtype::f32) {
      float raw;
      std::memcpy(&raw, buf.data() + i * 4, 4);
      CHECK(std::bit_cast<std::uint32_t>(raw) == std::bit_cast<std::uint32_t>(values[i]));
    } else {
      std::uint16_t raw;
      std::memcpy(&raw, buf.data() + i * 2, 2);
      CHECK(raw == (type == dtype::f16 ? kvcache::float_to_half(values[i])
                                       : kvcache::float_to_bf16(values[i])));
    }
  }
  // Overwriting one element leaves its neighbours alone.
  kvcache::store_from_float(buf.data(), 2, type, 7.0f);
  CHECK(kvcache::load_as_float(buf.data(), 2, type) == 7.0f);
  CHECK(kvcache::load_as_float(buf.data(), 1, type) == -2.5f);
  CHECK(kvcache::load_as_float(buf.data(), 3, type) ==
        (type == dtype::bf16 ? 65536.0f : 65504.0f));  // bf16 rounds 65504 to 2^16
}
