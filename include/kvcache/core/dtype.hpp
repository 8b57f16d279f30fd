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

#if defined(__F16C__) && !defined(__CUDA_ARCH__) && !defined(KVCACHE_NO_SIMD)
#  include <immintrin.h>
#  define KVCACHE_DTYPE_F16C 1
#elif defined(__SSE2__) && !defined(__CUDA_ARCH__) && !defined(KVCACHE_NO_SIMD)
#  include <emmintrin.h>
#  define KVCACHE_DTYPE_SSE2 1
#endif

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

//! binary32 -> binary16, round to nearest even; overflow to inf, NaN stays NaN (quiet, payload
//! dropped). Branch-free (the cases are merged with selects) so loops over it vectorize:
//! normals round the mantissa to 10 bits (ties to even) and rebias the exponent; subnormals are
//! rounded by adding 0.5f (the magic number that puts 2^-24 at the last mantissa bit).
KVCACHE_HOST_DEVICE std::uint16_t float_to_half(float f) noexcept {
  const std::uint32_t x = detail::bit_cast<std::uint32_t>(f);
  const std::uint32_t abs = x & 0x7fffffffu;
  const auto a = static_cast<std::int32_t>(abs);  // < 2^31: signed compares are exact
  const auto norm = static_cast<std::int32_t>((abs + 0xfffu + ((abs >> 13) & 1u) - (112u << 23)) >> 13);
  const std::int32_t sub =
      detail::bit_cast<std::int32_t>(detail::bit_cast<float>(abs) + 0.5f) - 0x3f000000;
  // masks, not ?: (which g++ turns into branches here)
  const std::int32_t is_sub = -static_cast<std::int32_t>(a < 0x38800000);  // below 2^-14
  const std::int32_t is_inf = -static_cast<std::int32_t>(a >= 0x477ff000);  // rounds to inf, inf, NaN
  const std::int32_t is_nan = -static_cast<std::int32_t>(a > 0x7f800000);
  std::int32_t r = (sub & is_sub) | (norm & ~is_sub);
  r = (r & ~is_inf) | (0x7c00 & is_inf);
  r |= 0x200 & is_nan;
  return static_cast<std::uint16_t>(static_cast<std::uint32_t>(r) | ((x >> 16) & 0x8000u));
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

namespace detail {
//! True where halves_to_floats has a SIMD path (F16C's vcvtph2ps, else SSE2): callers use it for
//! f16 input instead of a scalar-per-element loop.
#if defined(KVCACHE_DTYPE_F16C) || defined(KVCACHE_DTYPE_SSE2)
inline constexpr bool simd_halves = true;
#else
inline constexpr bool simd_halves = false;
#endif
//! n fp16 values (raw bits, any alignment) at src to fp32, as half_to_float. With F16C:
//! vcvtph2ps (it differs only in quieting a signalling NaN); with SSE2: half_to_float's bit math
//! (the exponent rebased by a multiply by 2^112, inf/NaN by a mask), 8 values per step.
inline void halves_to_floats(const void* src, std::size_t n, float* dst) noexcept {
  const auto* p = static_cast<const unsigned char*>(src);
  std::size_t i = 0;
#if defined(KVCACHE_DTYPE_F16C)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i))));
#elif defined(KVCACHE_DTYPE_SSE2)
  const __m128i zero = _mm_setzero_si128(), emm = _mm_set1_epi32(0x7fff), lim = _mm_set1_epi32(0x7bff),
                inf = _mm_set1_epi32(0x7f800000);
  const __m128 mul = _mm_set1_ps(0x1p112f);
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i));
    for (int k = 0; k < 2; ++k) {
      const __m128i u = k ? _mm_unpackhi_epi16(h, zero) : _mm_unpacklo_epi16(h, zero);
      const __m128i em = _mm_and_si128(u, emm);
      const __m128i sign = _mm_slli_epi32(_mm_xor_si128(u, em), 16);
      __m128i b = _mm_castps_si128(_mm_mul_ps(_mm_castsi128_ps(_mm_slli_epi32(em, 13)), mul));
      b = _mm_or_si128(b, _mm_and_si128(_mm_cmpgt_epi32(em, lim), inf));  // inf/NaN: payload kept
      _mm_storeu_ps(dst + i + 4 * k, _mm_castsi128_ps(_mm_or_si128(b, sign)));
    }
  }
#endif
  for (; i < n; ++i) {
    std::uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    dst[i] = half_to_float(h);
  }
}
}  // namespace detail

KVCACHE_NAMESPACE_END
