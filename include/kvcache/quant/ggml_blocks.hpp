// SPDX-License-Identifier: Apache-2.0
//! @file
//! llama.cpp (ggml) `q8_0` and `q4_0` blocks, byte-exact with ggml's reference quantizer
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref` in ggml-quants.c; structs in ggml-common.h),
//! so a cache can be exchanged with llama.cpp and compared against it.
//!
//! Blocks run along head_dim for each (token, head) row, for K and V alike (32 values per block,
//! so head_dim % 32 == 0); the fp16 scale `d` is in band, at the start of each block, as ggml
//! lays it out:
//! - `q8_0`: `{fp16 d; int8 qs[32]}` = 34 B (8.5 bits/value). d = amax/127, q = roundf(x/d)
//!   (computed as x·(1/d), half away from zero, as the reference does), x ≈ q·d.
//! - `q4_0`: `{fp16 d; uint8 qs[16]}` = 18 B (4.5 bits/value). m = the element of largest |x|
//!   (the first one on ties), keeping its sign; d = m/-8; q = min(15, trunc(x·(1/d) + 8.5)); byte j
//!   holds element j in its low nibble and element j+16 in its high nibble; x ≈ (q-8)·d.
//! f16/bf16 input is widened to fp32 first (exact), as llama.cpp does before quantizing.
//! ggml's SIMD quantizers (quantize_row_q8_0 on AVX, ...) round ties to even and can differ from
//! the reference in the last bit; this follows the reference.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

// SSE2 kernels for x86-64's baseline build; with AVX2 (-march=native) g++ vectorizes the portable
// loops 8 wide, which is faster. KVCACHE_NO_SIMD forces the portable loops (tests use it).
#if defined(__SSE2__) && !defined(__AVX2__) && !defined(__CUDA_ARCH__) && !defined(KVCACHE_NO_SIMD)
#  include <emmintrin.h>
#  define KVCACHE_GGML_SSE2 1
#endif

KVCACHE_NAMESPACE_BEGIN

namespace ggml {

inline constexpr std::size_t qk8_0 = 32;
inline constexpr std::size_t qk4_0 = 32;

//! ggml-common.h `block_q8_0`.
struct block_q8_0 {
  std::uint16_t d;  //!< fp16 bits
  std::int8_t qs[qk8_0];
};
static_assert(sizeof(block_q8_0) == 34, "kvcache: block_q8_0 must be 34 bytes, as in ggml");

//! ggml-common.h `block_q4_0`.
struct block_q4_0 {
  std::uint16_t d;  //!< fp16 bits
  std::uint8_t qs[qk4_0 / 2];
};
static_assert(sizeof(block_q4_0) == 18, "kvcache: block_q4_0 must be 18 bytes, as in ggml");

//! A block's scale: d (as fp32 and as the stored fp16 bits) and the multiplier 1/d (0 if d is 0).
struct block_scale {
  float d, id;
  std::uint16_t dh;
};
//! q8_0: d = amax / 127 from the block's largest |x|. Shared by the host and device encoders.
KVCACHE_HOST_DEVICE block_scale q8_0_scale(float amax) noexcept {
  const float d = detail::div_rn(amax, 127.0f);
  return {d, d != 0.0f ? detail::div_rn(1.0f, d) : 0.0f, float_to_half(d)};
}
//! q8_0 code of x: roundf(x·id) (half away from zero) of v in [-127, 127], branch-free:
//! trunc(|v| + 0.5) is exact except when |v| + 0.5 rounds up (|v| = 0.49999997...), which the
//! compare corrects.
KVCACHE_HOST_DEVICE std::int8_t q8_0_code(float x, float id) noexcept {
  const float v = detail::mul_rn(x, id);
  const float a = detail::bit_cast<float>(detail::bit_cast<std::uint32_t>(v) & 0x7fffffffu);
  std::int32_t t = static_cast<std::int32_t>(detail::add_rn(a, 0.5f));
  t -= static_cast<std::int32_t>(detail::add_rn(static_cast<float>(t), -a) > 0.5f);
  const std::int32_t neg = -static_cast<std::int32_t>(v < 0.0f);
  return static_cast<std::int8_t>((t ^ neg) - neg);
}
//! q4_0: d = m / -8 from the block's element of largest |x| (m keeps its sign).
KVCACHE_HOST_DEVICE block_scale q4_0_scale(float m) noexcept {
  const float d = detail::div_rn(m, -8.0f);
  return {d, d != 0.0f ? detail::div_rn(1.0f, d) : 0.0f, float_to_half(d)};
}
//! q4_0 code of x: min(15, trunc(x·id + 8.5)), as the reference's (int8_t) cast.
KVCACHE_HOST_DEVICE std::int32_t q4_0_code(float x, float id) noexcept {
  const std::int32_t a = static_cast<std::int32_t>(detail::add_rn(detail::mul_rn(x, id), 8.5f));
  return a < 15 ? a : 15;
}

//! One q8_0 block of 32 fp32 values into 34 bytes at `out` (any alignment).
inline void quantize_block_q8_0(const float* x, std::byte* out) noexcept {
  const float amax = detail::bit_cast<float>(detail::max_abs_bits(x, qk8_0, dtype::f32));
  const block_scale s = q8_0_scale(amax);
  const float id = s.id;
  const std::uint16_t dh = s.dh;
  std::memcpy(out, &dh, 2);
  std::int8_t q[qk8_0];
  for (std::size_t j = 0; j < qk8_0; ++j) q[j] = q8_0_code(x[j], id);
  std::memcpy(out + 2, q, qk8_0);
}

//! One q4_0 block of 32 fp32 values into 18 bytes at `out` (any alignment).
inline void quantize_block_q4_0(const float* x, std::byte* out) noexcept {
  const std::uint32_t amax = detail::max_abs_bits(x, qk4_0, dtype::f32);
  // the first element reaching amax, with its sign (the reference keeps the first on ties);
  // an index min-reduction, which vectorizes
  std::int32_t first = static_cast<std::int32_t>(qk4_0);
  for (std::size_t j = 0; j < qk4_0; ++j) {
    const std::uint32_t a = detail::bit_cast<std::uint32_t>(x[j]) & 0x7fffffffu;
    const std::int32_t cand = a == amax ? static_cast<std::int32_t>(j) : static_cast<std::int32_t>(qk4_0);
    first = cand < first ? cand : first;
  }
  const float mx = amax == 0 ? 0.0f : x[first];
  const block_scale s = q4_0_scale(mx);
  const float id = s.id;
  const std::uint16_t dh = s.dh;
  std::memcpy(out, &dh, 2);
  std::uint8_t qs[qk4_0 / 2];
  for (std::size_t j = 0; j < qk4_0 / 2; ++j) {
    const std::int32_t qa = q4_0_code(x[j], id), qb = q4_0_code(x[j + 16], id);
    qs[j] = static_cast<std::uint8_t>(qa | (qb << 4));
  }
  std::memcpy(out + 2, qs, qk4_0 / 2);
}

inline void dequantize_block_q8_0(const std::byte* in, float* y) noexcept {
  std::uint16_t dh;
  std::memcpy(&dh, in, 2);
  const float d = half_to_float(dh);
  std::int8_t q[qk8_0];
  std::memcpy(q, in + 2, qk8_0);
  for (std::size_t j = 0; j < qk8_0; ++j) y[j] = static_cast<float>(q[j]) * d;
}

inline void dequantize_block_q4_0(const std::byte* in, float* y) noexcept {
  std::uint16_t dh;
  std::memcpy(&dh, in, 2);
  const float d = half_to_float(dh);
  std::uint8_t qs[qk4_0 / 2];
  std::memcpy(qs, in + 2, qk4_0 / 2);
  for (std::size_t j = 0; j < qk4_0 / 2; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// ---- host fast paths: whole rows of blocks, the same bytes as the per-block functions above ----
// Batches of 8 blocks: load (widening f16/bf16), per-block |x| max as an integer max (vectorizes),
// the 8 scales together (their divisions and fp16 roundings vectorize: float_to_half is
// branch-free), then the codes with fixed 32-value loops.

//! roundf(x·id) as q8_0_code, for |x·id| < 2^22: trunc(v + copysign(0.49999997, v)) (adding the
//! largest float below 0.5 never carries a non-half fraction over an integer, and carries every
//! exact half: checked against roundf for all |v| < 2^23).
inline std::int32_t q8_0_code_fast(float x, float id) noexcept {
  const float v = x * id;
  const float h = detail::bit_cast<float>((detail::bit_cast<std::uint32_t>(v) & 0x80000000u) | 0x3effffffu);
  return static_cast<std::int32_t>(v + h);
}

inline constexpr std::size_t fast_batch = 8;

#if defined(KVCACHE_GGML_SSE2)
// SSE2 (x86-64's baseline) kernels for one block of 32 fp32 values, the same bytes as the loops.

//! max_abs_bits of the block (an integer max: NaN patterns order above inf, as there) and the
//! index of the first element reaching it (q4_0's tie rule).
inline void block_amax_sse2(const float* x, std::int32_t& amax, std::int32_t& first) noexcept {
  const __m128i absm = _mm_set1_epi32(0x7fffffff);
  __m128i a[8], m = _mm_setzero_si128();
  for (int k = 0; k < 8; ++k) {
    a[k] = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(x + 4 * k)), absm);
    const __m128i gt = _mm_cmpgt_epi32(a[k], m);
    m = _mm_or_si128(_mm_and_si128(gt, a[k]), _mm_andnot_si128(gt, m));
  }
  // horizontal max: swap halves, then neighbours (shuffle immediates must be constants)
  const auto fold = [&m](__m128i o) {
    const __m128i gt = _mm_cmpgt_epi32(o, m);
    m = _mm_or_si128(_mm_and_si128(gt, o), _mm_andnot_si128(gt, m));
  };
  fold(_mm_shuffle_epi32(m, 0x4e));
  fold(_mm_shuffle_epi32(m, 0xb1));
  amax = _mm_cvtsi128_si32(m);
  unsigned bits = 0;
  for (int k = 0; k < 8; ++k)
    bits |= static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(a[k], m)))) << (4 * k);
  first = __builtin_ctz(bits | 0x80000000u);  // always reached
}

//! float_to_half of 4 lanes (the same branch-free formulas), as 32-bit lanes.
inline __m128i float_to_half_sse2(__m128 f) noexcept {
  const __m128i x = _mm_castps_si128(f);
  const __m128i a = _mm_and_si128(x, _mm_set1_epi32(0x7fffffff));
  const __m128i norm = _mm_srli_epi32(
      _mm_sub_epi32(_mm_add_epi32(_mm_add_epi32(a, _mm_set1_epi32(0xfff)),
                                  _mm_and_si128(_mm_srli_epi32(a, 13), _mm_set1_epi32(1))),
                    _mm_set1_epi32(112 << 23)),
      13);
  const __m128i sub = _mm_sub_epi32(_mm_castps_si128(_mm_add_ps(_mm_castsi128_ps(a), _mm_set1_ps(0.5f))),
                                    _mm_set1_epi32(0x3f000000));
  const __m128i is_sub = _mm_cmplt_epi32(a, _mm_set1_epi32(0x38800000));
  const __m128i is_inf = _mm_cmpgt_epi32(a, _mm_set1_epi32(0x477fefff));
  const __m128i is_nan = _mm_cmpgt_epi32(a, _mm_set1_epi32(0x7f800000));
  __m128i r = _mm_or_si128(_mm_and_si128(is_sub, sub), _mm_andnot_si128(is_sub, norm));
  r = _mm_or_si128(_mm_andnot_si128(is_inf, r), _mm_and_si128(is_inf, _mm_set1_epi32(0x7c00)));
  r = _mm_or_si128(r, _mm_and_si128(is_nan, _mm_set1_epi32(0x200)));
  return _mm_or_si128(r, _mm_and_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(0x8000)));
}

//! The block_scale of 8 blocks from their numerators: d = num / div (q8_0: amax / 127; q4_0:
//! m / -8), id = 1/d or 0, dh = float_to_half(d): the divisions of q8_0_scale / q4_0_scale.
inline void block_scales_sse2(const float* num, float div, float* id, std::uint16_t* dh) noexcept {
  for (int k = 0; k < 8; k += 4) {
    const __m128 d = _mm_div_ps(_mm_loadu_ps(num + k), _mm_set1_ps(div));
    const __m128 nz = _mm_cmpneq_ps(d, _mm_setzero_ps());
    _mm_storeu_ps(id + k, _mm_and_ps(_mm_div_ps(_mm_set1_ps(1.0f), _mm_or_ps(_mm_and_ps(nz, d), _mm_andnot_ps(nz, _mm_set1_ps(1.0f)))), nz));
    const __m128i h = float_to_half_sse2(d);
    const __m128i h16 = _mm_packs_epi32(_mm_srai_epi32(_mm_slli_epi32(h, 16), 16), h);  // exact 16-bit lanes
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dh + k), h16);
  }
}

//! q8_0_code_fast of 32 values (NaN lanes give 0, as the scalar conversion does).
inline void q8_0_codes_sse2(const float* x, float id, std::int8_t* q) noexcept {
  const __m128 idv = _mm_set1_ps(id), sgn = _mm_set1_ps(-0.0f), h = _mm_set1_ps(0.49999997f);
  const __m128i bad = _mm_set1_epi32(INT32_MIN);
  for (int j = 0; j < 32; j += 16) {
    __m128i c[4];
    for (int k = 0; k < 4; ++k) {
      const __m128 v = _mm_mul_ps(_mm_loadu_ps(x + j + 4 * k), idv);
      const __m128i t = _mm_cvttps_epi32(_mm_add_ps(v, _mm_or_ps(_mm_and_ps(v, sgn), h)));
      c[k] = _mm_andnot_si128(_mm_cmpeq_epi32(t, bad), t);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                     _mm_packs_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3])));
  }
}

//! The 16 q4_0 code bytes of 32 values: min(15, trunc(x·id + 8.5)), element j low, j+16 high.
inline void q4_0_codes_sse2(const float* x, float id, std::uint8_t* qs) noexcept {
  const __m128 idv = _mm_set1_ps(id), c85 = _mm_set1_ps(8.5f);
  const __m128i fifteen = _mm_set1_epi16(15);
  __m128i half[2];
  for (int j = 0; j < 2; ++j) {
    __m128i c[4];
    for (int k = 0; k < 4; ++k)
      c[k] = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(_mm_loadu_ps(x + 16 * j + 4 * k), idv), c85));
    half[j] = _mm_packus_epi16(_mm_min_epi16(_mm_packs_epi32(c[0], c[1]), fifteen),
                               _mm_min_epi16(_mm_packs_epi32(c[2], c[3]), fifteen));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), _mm_or_si128(half[0], _mm_slli_epi16(half[1], 4)));
}
#endif

//! Block |x| maxima (as fp32 bit patterns) of nb blocks of 32 at x.
inline void block_amax(const float* __restrict x, std::size_t nb, std::int32_t* __restrict am) noexcept {
  for (std::size_t i = 0; i < nb; ++i) {
    std::int32_t m = 0;
    for (std::size_t j = 0; j < 32; ++j) {
      const std::int32_t a = detail::bit_cast<std::int32_t>(x[i * 32 + j]) & 0x7fffffff;
      m = a > m ? a : m;
    }
    am[i] = m;
  }
}

//! `blocks` q8_0 blocks of the values of type t at src, byte-exact with quantize_block_q8_0.
inline void quantize_blocks_q8_0(const void* src, std::size_t blocks, dtype t, std::byte* out) noexcept {
  constexpr std::size_t B = fast_batch;
  alignas(16) float x[B * 32];
  for (std::size_t b0 = 0; b0 < blocks; b0 += B) {
    const std::size_t nb = blocks - b0 < B ? blocks - b0 : B;
    if (detail::simd_halves && t == dtype::f16)
      detail::halves_to_floats(static_cast<const std::byte*>(src) + b0 * 64, nb * 32, x);
    else detail::load_row(src, b0 * 32, nb * 32, t, x);
    std::int32_t am[B] = {};
#if defined(KVCACHE_GGML_SSE2)
    for (std::size_t i = 0; i < nb; ++i) {
      std::int32_t first;
      block_amax_sse2(x + i * 32, am[i], first);
    }
#else
    block_amax(x, nb, am);
#endif
    float id[B];
    std::uint16_t dh[B];
#if defined(KVCACHE_GGML_SSE2)
    static_assert(B == 8);
    float amf[B];
    std::memcpy(amf, am, sizeof amf);
    block_scales_sse2(amf, 127.0f, id, dh);
#else
    for (std::size_t i = 0; i < B; ++i) {
      const block_scale sc = q8_0_scale(detail::bit_cast<float>(am[i]));
      id[i] = sc.id;
      dh[i] = sc.dh;
    }
#endif
    for (std::size_t i = 0; i < nb; ++i) {
      std::int8_t q[32];
#if defined(KVCACHE_GGML_SSE2)
      q8_0_codes_sse2(x + i * 32, id[i], q);
#else
      for (std::size_t j = 0; j < 32; ++j) q[j] = static_cast<std::int8_t>(q8_0_code_fast(x[i * 32 + j], id[i]));
#endif
      std::byte* o = out + (b0 + i) * sizeof(block_q8_0);
      std::memcpy(o, &dh[i], 2);
      std::memcpy(o + 2, q, 32);
    }
  }
}

//! `blocks` q4_0 blocks of the values of type t at src, byte-exact with quantize_block_q4_0.
inline void quantize_blocks_q4_0(const void* src, std::size_t blocks, dtype t, std::byte* out) noexcept {
  constexpr std::size_t B = fast_batch;
  alignas(16) float x[B * 32];
  for (std::size_t b0 = 0; b0 < blocks; b0 += B) {
    const std::size_t nb = blocks - b0 < B ? blocks - b0 : B;
    if (detail::simd_halves && t == dtype::f16)
      detail::halves_to_floats(static_cast<const std::byte*>(src) + b0 * 64, nb * 32, x);
    else detail::load_row(src, b0 * 32, nb * 32, t, x);
    std::int32_t am[B] = {};
    float mx[B] = {};
#if defined(KVCACHE_GGML_SSE2)
    for (std::size_t i = 0; i < nb; ++i) {
      std::int32_t first;
      block_amax_sse2(x + i * 32, am[i], first);
      mx[i] = am[i] == 0 ? 0.0f : x[i * 32 + static_cast<std::size_t>(first & 31)];
    }
#else
    block_amax(x, nb, am);
    for (std::size_t i = 0; i < nb; ++i) {  // the first element reaching the max, with its sign
      std::int32_t first = 32;  // an index min-reduction (the max is always reached: < 32)
      for (std::int32_t j = 0; j < 32; ++j) {
        const std::int32_t a = detail::bit_cast<std::int32_t>(x[i * 32 + static_cast<std::size_t>(j)]) & 0x7fffffff;
        const std::int32_t cand = a == am[i] ? j : 32;
        first = cand < first ? cand : first;
      }
      mx[i] = am[i] == 0 ? 0.0f : x[i * 32 + static_cast<std::size_t>(first & 31)];
    }
#endif
    float id[B];
    std::uint16_t dh[B];
#if defined(KVCACHE_GGML_SSE2)
    block_scales_sse2(mx, -8.0f, id, dh);
#else
    for (std::size_t i = 0; i < B; ++i) {
      const block_scale sc = q4_0_scale(mx[i]);
      id[i] = sc.id;
      dh[i] = sc.dh;
    }
#endif
    for (std::size_t i = 0; i < nb; ++i) {
      std::uint8_t qs[16];
      const float* xi = x + i * 32;
#if defined(KVCACHE_GGML_SSE2)
      q4_0_codes_sse2(xi, id[i], qs);
#else
      for (std::size_t j = 0; j < 16; ++j)
        qs[j] = static_cast<std::uint8_t>(q4_0_code(xi[j], id[i]) | (q4_0_code(xi[j + 16], id[i]) << 4));
#endif
      std::byte* o = out + (b0 + i) * sizeof(block_q4_0);
      std::memcpy(o, &dh[i], 2);
      std::memcpy(o + 2, qs, 16);
    }
  }
}

//! `blocks` q4_0 blocks to fp32, as dequantize_block_q4_0 on each.
inline void dequantize_blocks_q4_0(const std::byte* in, std::size_t blocks, float* __restrict y) noexcept {
  for (std::size_t b = 0; b < blocks; ++b, in += sizeof(block_q4_0), y += 32) {
    std::uint16_t dh;
    std::memcpy(&dh, in, 2);
    const float d = detail::half_bits_to_float(dh);
    std::uint8_t qs[16];
    std::memcpy(qs, in + 2, 16);
    float lo[16], hi[16];
    for (std::size_t j = 0; j < 16; ++j) {
      lo[j] = static_cast<float>(static_cast<std::int32_t>(qs[j] & 0x0f) - 8) * d;
      hi[j] = static_cast<float>(static_cast<std::int32_t>(qs[j] >> 4) - 8) * d;
    }
    std::memcpy(y, lo, sizeof lo);
    std::memcpy(y + 16, hi, sizeof hi);
  }
}

}  // namespace ggml

namespace detail {
//! The common shell of the two block formats: rows of head_dim/32 blocks of `Bytes` bytes.
template <class Derived, std::size_t Bytes>
struct ggml_row_format {
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept {
    return g.head_dim / 32 * Bytes;
  }
  [[nodiscard]] std::size_t scale_bytes(const geometry&) const noexcept { return 0; }

  [[nodiscard]] status bind(const geometry& g) const {
    if (g.head_dim % 32 != 0)
      return {errc::invalid_argument, std::string(Derived::name()) + ": head_dim " +
                                          std::to_string(g.head_dim) +
                                          " is not a multiple of the 32-value block"};
    return {};
  }
  //! Finite, and small enough that the block's fp16 scale (amax / divisor) stays finite: a
  //! finite 3e38 would otherwise store an infinite scale and decode to NaN (found by fuzz/).
  [[nodiscard]] status validate(const void* src, std::size_t elements, dtype t) const {
    return check_finite(Derived::name(), src, elements, t, 65504.0f * Derived::scale_divisor);
  }
  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* /*scales*/, quant_context = {}) const noexcept {
    Derived::quantize_blocks(src, rows * (g.head_dim / 32), g.type, codes);
  }
  void decode(const std::byte* codes, const std::byte* /*scales*/, std::size_t rows,
              const geometry& g, float* dst) const noexcept {
    Derived::dequantize_blocks(codes, rows * (g.head_dim / 32), dst);
  }
};
}  // namespace detail

//! llama.cpp's q8_0 K/V cache type (34 bytes per 32 values, in-band fp16 scale).
struct q8_0 : detail::ggml_row_format<q8_0, sizeof(ggml::block_q8_0)> {
  static constexpr unsigned bits = 8;
  static constexpr unsigned group = 32;
  static constexpr const char* name() noexcept { return "q8_0"; }
  static constexpr float scale_divisor = 127.0f;  // d = amax / 127
  static void quantize_block(const float* x, std::byte* out) noexcept { ggml::quantize_block_q8_0(x, out); }
  static void dequantize_block(const std::byte* in, float* y) noexcept { ggml::dequantize_block_q8_0(in, y); }
  static void quantize_blocks(const void* src, std::size_t blocks, dtype t, std::byte* out) noexcept {
    ggml::quantize_blocks_q8_0(src, blocks, t, out);
  }
  static void dequantize_blocks(const std::byte* in, std::size_t blocks, float* y) noexcept {
    for (std::size_t b = 0; b < blocks; ++b) ggml::dequantize_block_q8_0(in + b * sizeof(ggml::block_q8_0), y + b * 32);
  }
};

//! llama.cpp's q4_0 K/V cache type (18 bytes per 32 values, in-band fp16 scale).
struct q4_0 : detail::ggml_row_format<q4_0, sizeof(ggml::block_q4_0)> {
  static constexpr unsigned bits = 4;
  static constexpr unsigned group = 32;
  static constexpr const char* name() noexcept { return "q4_0"; }
  static constexpr float scale_divisor = 8.0f;  // |d| = amax / 8
  static void quantize_block(const float* x, std::byte* out) noexcept { ggml::quantize_block_q4_0(x, out); }
  static void dequantize_block(const std::byte* in, float* y) noexcept { ggml::dequantize_block_q4_0(in, y); }
  static void quantize_blocks(const void* src, std::size_t blocks, dtype t, std::byte* out) noexcept {
    ggml::quantize_blocks_q4_0(src, blocks, t, out);
  }
  static void dequantize_blocks(const std::byte* in, std::size_t blocks, float* y) noexcept {
    ggml::dequantize_blocks_q4_0(in, blocks, y);
  }
};

static_assert(quantizer<q8_0>);
static_assert(quantizer<q4_0>);

KVCACHE_NAMESPACE_END
