// SPDX-License-Identifier: Apache-2.0
//! @file
//! Element types of K/V as engines hand them over, and scalar conversions to and from fp32.
//! Host code stores fp16/bf16 as raw 16-bit patterns so no compiler extension is needed.
#pragma once

#include <kvcache/config.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

KVCACHE_NAMESPACE_BEGIN

namespace detail {
//! std::bit_cast is a host-only constexpr function to nvcc; memcpy works on both sides.
template <class To, class From>
KVCACHE_HOST_DEVICE To bit_cast(const From& from) noexcept {
#if defined(__CUDACC__)
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
#else
  return std::bit_cast<To>(from);
#endif
}
}  // namespace detail

//! Element type of K/V tensors.
enum class dtype : std::uint8_t { f32, f16, bf16 };

constexpr std::size_t size_of(dtype t) noexcept { return t == dtype::f32 ? 4 : 2; }

constexpr const char* to_string(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::f16: return "f16";
    case dtype::bf16: return "bf16";
  }
  return "?";
}

//! IEEE binary16 -> binary32 (exact; subnormals, inf and NaN kept). Branch-light so loops
//! over rows vectorize: the exponent is rebased by one multiply by 2^112, which is exact for
//! normals and subnormals alike.
KVCACHE_HOST_DEVICE float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t em = h & 0x7fffu;
  std::uint32_t bits = detail::bit_cast<std::uint32_t>(detail::bit_cast<float>(em << 13) * 0x1p112f);
  if (em >= 0x7c00u) bits = 0x7f800000u | ((em & 0x3ffu) << 13);  // inf, NaN (payload kept)
  return detail::bit_cast<float>(bits | sign);
}

//! binary32 -> binary16, round to nearest even; overflow to inf, NaN stays NaN.
KVCACHE_HOST_DEVICE std::uint16_t float_to_half(float f) noexcept {
  const std::uint32_t x = detail::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u)  // inf or NaN
    return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {  // subnormal or zero in half
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal
    const std::uint32_t e = abs >> 23;
    const std::uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;  // 14 - (e - 127) + 10 - 23 + 23
    std::uint32_t q = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1);
    const std::uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
  std::uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);  // round mantissa to 10 bits, ties to even
  r -= (127 - 15) << 23;
  return static_cast<std::uint16_t>(sign | (r >> 13));
}

//! bfloat16 -> binary32 (exact).
KVCACHE_HOST_DEVICE float bf16_to_float(std::uint16_t b) noexcept {
  return detail::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

//! binary32 -> bfloat16, round to nearest even; NaN stays NaN.
KVCACHE_HOST_DEVICE std::uint16_t float_to_bf16(float f) noexcept {
  const std::uint32_t x = detail::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

//! Reads element i of a tensor of type t as fp32.
inline float load_as_float(const void* base, std::size_t i, dtype t) noexcept {
  const auto* p = static_cast<const std::byte*>(base);
  switch (t) {
    case dtype::f32: {
      float f;
      std::memcpy(&f, p + i * 4, 4);
      return f;
    }
    case dtype::f16: {
      std::uint16_t h;
      std::memcpy(&h, p + i * 2, 2);
      return half_to_float(h);
    }
    case dtype::bf16: {
      std::uint16_t h;
      std::memcpy(&h, p + i * 2, 2);
      return bf16_to_float(h);
    }
  }
  return 0.0f;
}

//! Writes fp32 value f as element i of a tensor of type t.
inline void store_from_float(void* base, std::size_t i, dtype t, float f) noexcept {
  auto* p = static_cast<std::byte*>(base);
  switch (t) {
    case dtype::f32: std::memcpy(p + i * 4, &f, 4); return;
    case dtype::f16: {
      const std::uint16_t h = float_to_half(f);
      std::memcpy(p + i * 2, &h, 2);
      return;
    }
    case dtype::bf16: {
      const std::uint16_t h = float_to_bf16(f);
      std::memcpy(p + i * 2, &h, 2);
      return;
    }
  }
}

KVCACHE_NAMESPACE_END
