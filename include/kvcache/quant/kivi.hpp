// SPDX-License-Identifier: Apache-2.0
//! @file
//! KIVI-style asymmetric integer codes (Liu et al., ICML'24): `scale = (max - min) / (2^b - 1)`,
//! `zero = min`, `q = clamp(round((x - zero) / scale), 0, 2^b - 1)`, `x ≈ q·scale + zero`, with
//! scale and zero stored in fp16 out of band (beside the codes, never interleaved with them).
//!
//! - `kivi_per_token<Bits, Group>`: every (token, head) row is cut into head_dim/Group groups of
//!   Group consecutive channels (KIVI's value format; used for keys it is the per-token baseline
//!   KIVI argues against). Composes with the cache and with slot reuse directly.
//! - `kivi_encode_channels` / `kivi_decode_channels`: KIVI's key format, one group of up to
//!   Group consecutive tokens of one head quantized per channel (the statistics run along the
//!   token axis), so an outlier channel only costs its own precision.
//!
//! Widths: any Bits in [2, 8] (2, 4, 8 as in KIVI; 3, 5, 6, 7 packed across byte boundaries).
//! Codes are packed LSB first (bitpack.hpp); Group % 8 == 0 so every group starts on a byte.
//! Keys are packed along the channel axis inside each token's row (KIVI packs keys along tokens):
//! a token's codes then stay inside its own slot, which slot reuse and per-row addressing need.
//!
//! Rounding of the fp16 metadata (a deviation from KIVI, which rounds min and scale to nearest):
//! zero is min rounded toward -inf and scale is rounded toward +inf, and the codes are computed
//! from those stored fp16 values, so every input lies inside [zero, zero + (2^b-1)·scale] and the
//! round-trip error is at most scale/2 (up to fp32 rounding), whatever fp16 does to min.
//! Input must be finite with |x| <= 65504 (the fp16 range of the metadata): `validate` rejects
//! anything else with a clear error.
//!
//! Composition with eviction (slot reuse):
//! - `kivi_per_token` groups lie inside one (token, head) row, so a reused slot is simply
//!   rewritten: it composes with every policy (tested with sink_window and heavy_hitter).
//! - Token-grouped keys (`kivi<Bits, Group, Residual>`) do not: a group's scale and zero depend
//!   on all its tokens. Chosen design (the cache implements it, see `kivi` below): group g of a
//!   head covers slots [g·G, (g+1)·G); keys stay in a full-precision residual window until its
//!   Residual slots have all been filled, then its groups are quantized per channel; when an
//!   evicted slot of a quantized group is refilled, that group is requantized (decode its G rows,
//!   replace the row, encode again): the other G-1 rows take a second rounding, so their error is
//!   bounded by the new scale/2 plus the old scale/2 instead of scale/2. Tested with keep_all,
//!   sink_window and heavy_hitter.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/quant/bitpack.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

// SSE2 kernels (x86-64's baseline; faster than g++'s vectorization at -march=native too).
// KVCACHE_NO_SIMD forces the portable loops (tests use it).
#if defined(__SSE2__) && !defined(__CUDA_ARCH__) && !defined(KVCACHE_NO_SIMD)
#  include <emmintrin.h>
#  define KVCACHE_KIVI_SSE2 1
#endif

KVCACHE_NAMESPACE_BEGIN

//! Largest magnitude the KIVI formats accept (fp16's largest finite value).
inline constexpr float kivi_input_limit = 65504.0f;

namespace detail {

//! fp16 scale and zero for values in [mn, mx], and the fp32 values quantization uses.
struct kivi_params {
  std::uint16_t scale16, zero16;
  float scale, zero, inv;
};
KVCACHE_HOST_DEVICE kivi_params kivi_make_params(float mn, float mx, unsigned levels) noexcept {
  kivi_params p;
  p.zero16 = half_round_down(mn);
  p.zero = half_to_float(p.zero16);
  p.scale16 = half_round_up(div_rn(add_rn(mx, -p.zero), static_cast<float>(levels)));
  p.scale = half_to_float(p.scale16);
  p.inv = p.scale > 0.0f ? div_rn(1.0f, p.scale) : 0.0f;
  return p;
}

//! Code of x: round((x - zero)·inv) clamped to [0, levels]. x >= zero by construction.
KVCACHE_HOST_DEVICE std::uint8_t kivi_code(float x, float zero, float inv, float levels) noexcept {
  float v = add_rn(mul_rn(add_rn(x, -zero), inv), 0.5f);
  v = v < levels + 0.5f ? v : levels + 0.5f;
  v = v > 0.0f ? v : 0.0f;
  return static_cast<std::uint8_t>(static_cast<std::int32_t>(v));
}

//! Decoded value of code q: q·scale + zero (two roundings, never fused).
KVCACHE_HOST_DEVICE float kivi_value(std::uint32_t q, float scale, float zero) noexcept {
  return add_rn(mul_rn(static_cast<float>(q), scale), zero);
}

}  // namespace detail

namespace detail {
// ---- host fast paths: the parameters of many groups (or channels) at once ----------------------
// kivi_make_params per group is scalar work (two directed fp16 roundings, two divisions) that
// cost more than the group's 32 codes; computed for n groups in one branch-free loop (float_to_half
// and half_bits_to_float are branch-free) it vectorizes. Results are those of kivi_make_params.

//! half_round_down / half_round_up, branch-free (same results).
inline std::uint16_t kivi_half_down(float f) noexcept {
  const std::int32_t h = float_to_half(f);
  const std::int32_t zero = -static_cast<std::int32_t>(h == 0);  // masks: no control flow
  const std::int32_t adj = (zero & 0x8001) | (~zero & (h - 1 + 2 * (h >> 15)));  // toward -inf
  const std::int32_t up = -static_cast<std::int32_t>(half_bits_to_float(static_cast<std::uint32_t>(h)) > f);
  return static_cast<std::uint16_t>((up & adj) | (~up & h));
}
inline std::uint16_t kivi_half_up(float f) noexcept {
  const std::int32_t h = float_to_half(f);
  return static_cast<std::uint16_t>(h + static_cast<std::int32_t>(half_bits_to_float(static_cast<std::uint32_t>(h)) < f));
}

//! kivi_make_params for n (min, max) pairs given as order keys: zero, 1/scale and the fp16 bits.
inline void kivi_params_n(const std::int32_t* __restrict kmn, const std::int32_t* __restrict kmx,
                          std::size_t n, unsigned levels, float* __restrict zero,
                          float* __restrict inv, std::uint16_t* __restrict s16,
                          std::uint16_t* __restrict z16) noexcept {
  const float lv = static_cast<float>(levels);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint16_t zh = kivi_half_down(from_order_key(kmn[i]));
    const float z = half_bits_to_float(zh);
    const std::uint16_t sh = kivi_half_up((from_order_key(kmx[i]) - z) / lv);
    const float sc = half_bits_to_float(sh);
    zero[i] = z;
    const std::int32_t pos = -static_cast<std::int32_t>(sc > 0.0f);  // masks: no division by 0
    const float den = bit_cast<float>((bit_cast<std::int32_t>(sc) & pos) | (0x3f800000 & ~pos));
    inv[i] = bit_cast<float>(bit_cast<std::int32_t>(1.0f / den) & pos);
    z16[i] = zh;
    s16[i] = sh;
  }
}

#if defined(KVCACHE_KIVI_SSE2)
//! kivi_codes_fixed for Bits 2, 4, 8 with SSE2 (x86-64's baseline): the same float operations
//! (minps/maxps are the `v < top ? v : top`, `v > 0 ? v : 0` selects), codes narrowed with
//! saturating packs (they are in [0, 255]) and packed with shifts inside 16/32-bit lanes.
//! n (a multiple of 16) values; one zero/inv for all (PerLane false) or one per value (true).
template <unsigned Bits, bool PerLane>
inline void kivi_codes_sse2(const float* __restrict x, std::size_t n, const float* zero, const float* inv,
                            std::byte* out) noexcept {
  const __m128 half = _mm_set1_ps(0.5f), top = _mm_set1_ps(static_cast<float>((1u << Bits) - 1) + 0.5f),
               nil = _mm_setzero_ps();
  const __m128 z1 = _mm_set1_ps(*zero), iv1 = _mm_set1_ps(*inv);
  for (std::size_t j = 0; j < n; j += 16) {
    __m128i c[4];
    for (std::size_t k = 0; k < 4; ++k) {
      const __m128 z = PerLane ? _mm_loadu_ps(zero + j + 4 * k) : z1;
      const __m128 iv = PerLane ? _mm_loadu_ps(inv + j + 4 * k) : iv1;
      __m128 v = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(x + j + 4 * k), z), iv), half);
      v = _mm_max_ps(_mm_min_ps(v, top), nil);
      c[k] = _mm_cvttps_epi32(v);
    }
    // 16 codes as bytes (code j in byte j)
    const __m128i b = _mm_packus_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3]));
    if constexpr (Bits == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), b);
    } else if constexpr (Bits == 4) {  // 16-bit lane c0 | c1 << 8 -> c0 | c1 << 4
      const __m128i t = _mm_and_si128(_mm_or_si128(b, _mm_srli_epi16(b, 4)), _mm_set1_epi16(0xff));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j / 2), _mm_packus_epi16(t, t));
    } else {  // Bits == 2: 32-bit lane c0 | c1 << 8 | c2 << 16 | c3 << 24 -> c0 | c1 << 2 | c2 << 4 | c3 << 6
      __m128i t = _mm_or_si128(b, _mm_srli_epi32(b, 6));
      t = _mm_and_si128(_mm_or_si128(t, _mm_srli_epi32(t, 12)), _mm_set1_epi32(0xff));
      t = _mm_packs_epi32(t, t);
      const int w = _mm_cvtsi128_si32(_mm_packus_epi16(t, t));
      std::memcpy(out + j / 4, &w, 4);
    }
  }
}
//! Group 2-bit codes to q·s + z with SSE2, without unpacking: each 32-bit lane holds its code's
//! byte masked to the code's bits (3 << 2j), converted exactly, times s·2^-2j (exact: s is an
//! fp16 value), so the product and its rounding are those of q·s.
template <std::size_t Group>
inline void kivi_decode2_sse2(const std::byte* codes, float s, float z, float* __restrict y) noexcept {
  const __m128i masks = _mm_set_epi32(0xc0, 0x30, 0x0c, 0x03);
  const __m128 sv = _mm_mul_ps(_mm_set1_ps(s), _mm_set_ps(0x1p-6f, 0x1p-4f, 0x1p-2f, 1.0f)), zv = _mm_set1_ps(z);
  for (std::size_t j = 0; j < Group; j += 16) {
    int w;
    std::memcpy(&w, codes + j / 4, 4);
    __m128i b = _mm_cvtsi32_si128(w);
    b = _mm_unpacklo_epi8(b, b);
    b = _mm_unpacklo_epi16(b, b);  // byte k in every byte of lane k
    const __m128i l0 = _mm_shuffle_epi32(b, 0x00), l1 = _mm_shuffle_epi32(b, 0x55),
                  l2 = _mm_shuffle_epi32(b, 0xaa), l3 = _mm_shuffle_epi32(b, 0xff);
    _mm_storeu_ps(y + j, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_and_si128(l0, masks)), sv), zv));
    _mm_storeu_ps(y + j + 4, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_and_si128(l1, masks)), sv), zv));
    _mm_storeu_ps(y + j + 8, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_and_si128(l2, masks)), sv), zv));
    _mm_storeu_ps(y + j + 12, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_and_si128(l3, masks)), sv), zv));
  }
}
#endif

//! Codes of Group values with one (zero, inv): kivi_code on each, then packed.
template <unsigned Bits, std::size_t Group>
inline void kivi_codes_fixed(const float* __restrict x, float zero, float inv, std::byte* out) noexcept {
#if defined(KVCACHE_KIVI_SSE2)
  if constexpr ((Bits == 2 || Bits == 4 || Bits == 8) && Group % 16 == 0)
    return kivi_codes_sse2<Bits, false>(x, Group, &zero, &inv, out);
#endif
  constexpr float top = static_cast<float>((1u << Bits) - 1) + 0.5f;
  std::int32_t q[Group];  // 32-bit codes: packing from them vectorizes better than from bytes
  for (std::size_t j = 0; j < Group; ++j) {
    float v = (x[j] - zero) * inv + 0.5f;
    v = v < top ? v : top;
    v = v > 0.0f ? v : 0.0f;
    q[j] = static_cast<std::int32_t>(v);
  }
  if constexpr (8 % Bits == 0) {  // pack_bits' layout: code j of byte k at bits [Bits·j, Bits·j + Bits)
    constexpr std::size_t per = 8 / Bits;
    for (std::size_t k = 0; k < Group / per; ++k) {
      std::int32_t b = 0;
      for (std::size_t j = 0; j < per; ++j) b |= q[k * per + j] << (Bits * j);
      out[k] = static_cast<std::byte>(b);
    }
  } else {
    std::uint8_t q8[Group];
    for (std::size_t j = 0; j < Group; ++j) q8[j] = static_cast<std::uint8_t>(q[j]);
    pack_bits<Bits>(q8, Group, out);
  }
}

//! kivi_per_token::encode over `groups` consecutive groups of Group values of type t at src
//! (flat group index gi = row·G + i), metadata as kivi_per_token lays it out.
template <unsigned Bits, std::size_t Group>
inline void kivi_encode_groups(const void* src, std::size_t groups, std::size_t G, dtype t,
                               std::byte* codes, std::byte* meta) noexcept {
  constexpr std::size_t B = Group >= 128 ? 2 : 256 / Group;  // groups per batch
  constexpr std::size_t gbytes = Group * Bits / 8;
  alignas(16) float x[B * Group];
  std::int32_t kmn[B], kmx[B];
  float zero[B], inv[B];
  std::uint16_t s16[B], z16[B];
  for (std::size_t g0 = 0; g0 < groups; g0 += B) {
    const std::size_t nb = groups - g0 < B ? groups - g0 : B;
    for (std::size_t i = 0; i < B; ++i) kmn[i] = kmx[i] = 0;
    if (t == dtype::f16) {  // min/max of 16-bit order keys of the fp16 bits (pminsw/pmaxsw)
      alignas(16) std::int16_t h[B * Group];
      std::memcpy(h, static_cast<const std::byte*>(src) + g0 * Group * 2, nb * Group * 2);
      if (simd_halves) halves_to_floats(h, nb * Group, x);
      else
        for (std::size_t j = 0; j < nb * Group; ++j) x[j] = half_bits_to_float(static_cast<std::uint16_t>(h[j]));
      for (std::size_t i = 0; i < nb; ++i) {
        std::int16_t lo = 0x7fff, hi = -0x8000;
        for (std::size_t j = 0; j < Group; ++j) {
          const std::int16_t v = h[i * Group + j];
          const auto k = static_cast<std::int16_t>(v ^ ((v >> 15) & 0x7fff));
          lo = k < lo ? k : lo;
          hi = k > hi ? k : hi;
        }
        // back to fp16 bits, widened exactly: the fp32 order keys of the same values
        kmn[i] = order_key(half_bits_to_float(static_cast<std::uint16_t>(lo ^ ((lo >> 15) & 0x7fff))));
        kmx[i] = order_key(half_bits_to_float(static_cast<std::uint16_t>(hi ^ ((hi >> 15) & 0x7fff))));
      }
    } else {
     load_row(src, g0 * Group, nb * Group, t, x);
     for (std::size_t i = 0; i < nb; ++i) {
      std::int32_t lo = order_key(x[i * Group]), hi = lo;
      for (std::size_t j = 0; j < Group; ++j) {
        const std::int32_t k = order_key(x[i * Group + j]);
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
      }
      kmn[i] = lo;
      kmx[i] = hi;
     }
    }
    kivi_params_n(kmn, kmx, B, (1u << Bits) - 1, zero, inv, s16, z16);
    for (std::size_t i = 0; i < nb; ++i) {
      const std::size_t gi = g0 + i, r = gi / G, c = gi % G;
      kivi_codes_fixed<Bits, Group>(x + i * Group, zero[i], inv[i], codes + gi * gbytes);
      std::memcpy(meta + r * G * 4 + 2 * c, &s16[i], 2);
      std::memcpy(meta + r * G * 4 + 2 * (G + c), &z16[i], 2);
    }
  }
}
}  // namespace detail

//! One group of n fp32 values (n <= 256) to n packed Bits-wide codes; returns fp16 scale, zero.
template <unsigned Bits>
KVCACHE_HOST_DEVICE void kivi_encode_group(const float* x, std::size_t n, std::byte* codes, std::uint16_t& scale16,
                       std::uint16_t& zero16) noexcept {
  static_assert(Bits >= 2 && Bits <= 8, "kvcache: KIVI codes are 2 to 8 bits wide");
  constexpr unsigned levels = (1u << Bits) - 1;
  std::int32_t kmn = detail::order_key(x[0]), kmx = kmn;  // integer keys: the reductions vectorize
  for (std::size_t j = 0; j < n; ++j) {
    const std::int32_t k = detail::order_key(x[j]);
    kmn = k < kmn ? k : kmn;
    kmx = k > kmx ? k : kmx;
  }
  const auto p = detail::kivi_make_params(detail::from_order_key(kmn), detail::from_order_key(kmx), levels);
  std::uint8_t q[256];
  for (std::size_t j = 0; j < n; ++j) q[j] = detail::kivi_code(x[j], p.zero, p.inv, levels);
  pack_bits<Bits>(q, n, codes);
  scale16 = p.scale16;
  zero16 = p.zero16;
}

//! Inverse of kivi_encode_group.
template <unsigned Bits>
KVCACHE_HOST_DEVICE void kivi_decode_group(const std::byte* codes, std::size_t n, std::uint16_t scale16,
                       std::uint16_t zero16, float* y) noexcept {
  std::uint8_t q[256];
  unpack_bits<Bits>(codes, n, q);
  const float s = half_to_float(scale16), z = half_to_float(zero16);
  for (std::size_t j = 0; j < n; ++j) y[j] = detail::kivi_value(q[j], s, z);
}

//! KIVI's values (and per-token keys): rows of head_dim/Group channel groups.
//! Codes: `[groups][Group·Bits/8]` bytes per row; metadata (out of band, `scale_bytes` per row):
//! `[groups]` fp16 scales, then `[groups]` fp16 zeros.
//! @tparam Bits  code width, 2..8
//! @tparam Group channels per group, a multiple of 8 (KIVI: 32); head_dim % Group == 0
template <unsigned Bits, unsigned Group = 32>
struct kivi_per_token {
  static_assert(Bits >= 2 && Bits <= 8, "kvcache: KIVI codes are 2 to 8 bits wide");
  static_assert(Group % 8 == 0 && Group >= 8 && Group <= 256,
                "kvcache: KIVI groups are a multiple of 8 values, at most 256");
  static constexpr unsigned bits = Bits;
  static constexpr unsigned group = Group;
  static constexpr std::size_t group_bytes = Group * Bits / 8;

  static constexpr const char* name() noexcept { return "kivi_per_token"; }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept {
    return g.head_dim / Group * group_bytes;
  }
  [[nodiscard]] std::size_t scale_bytes(const geometry& g) const noexcept {
    return g.head_dim / Group * 4;
  }
  [[nodiscard]] status bind(const geometry& g) const {
    if (g.head_dim % Group != 0)
      return {errc::invalid_argument, std::string(name()) + ": head_dim " +
                                          std::to_string(g.head_dim) + " is not a multiple of the group " +
                                          std::to_string(Group)};
    return {};
  }
  [[nodiscard]] status validate(const void* src, std::size_t elements, dtype t) const {
    return detail::check_finite(name(), src, elements, t, kivi_input_limit);
  }
  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* scales, quant_context = {}) const noexcept {
    const std::size_t G = g.head_dim / Group;  // batched: same bytes as kivi_encode_group per group
    detail::kivi_encode_groups<Bits, Group>(src, rows * G, G, g.type, codes, scales);
  }
  void decode(const std::byte* codes, const std::byte* scales, std::size_t rows, const geometry& g,
              float* dst) const noexcept {
    const std::size_t G = g.head_dim / Group;
#if defined(KVCACHE_KIVI_SSE2)
    if constexpr (Bits == 2 && Group % 16 == 0)
      if (G <= 64) {  // the values of kivi_decode_group, by the SSE2 kernel
        alignas(16) float sz[128];  // a row's G scales then G zeros, widened together
        for (std::size_t r = 0; r < rows; ++r) {
          detail::halves_to_floats(scales + r * G * 4, 2 * G, sz);
          for (std::size_t i = 0; i < G; ++i)
            detail::kivi_decode2_sse2<Group>(codes + (r * G + i) * group_bytes, sz[i], sz[G + i],
                                             dst + (r * G + i) * Group);
        }
        return;
      }
#endif
    for (std::size_t r = 0; r < rows; ++r) {
      const std::byte* meta = scales + r * G * 4;
      for (std::size_t i = 0; i < G; ++i) {
        std::uint16_t s, z;
        std::memcpy(&s, meta + 2 * i, 2);
        std::memcpy(&z, meta + 2 * (G + i), 2);
        kivi_decode_group<Bits>(codes + (r * G + i) * group_bytes, Group, s, z,
                                dst + (r * G + i) * Group);
      }
    }
  }
};

//! KIVI keys: `tokens` rows (<= 256) of one head, `[tokens][dim]` fp32 at x, quantized per
//! channel. Row t's codes (dim·Bits/8 bytes, dim % 8 == 0) go to codes + t·code_stride; the
//! metadata to `meta`: `[dim]` fp16 scales, then `[dim]` fp16 zeros.
template <unsigned Bits>
void kivi_encode_channels(const float* x, std::size_t tokens, std::size_t dim, std::byte* codes,
                          std::size_t code_stride, std::byte* meta) noexcept {
  static_assert(Bits >= 2 && Bits <= 8, "kvcache: KIVI codes are 2 to 8 bits wide");
  constexpr unsigned levels = (1u << Bits) - 1;
  constexpr std::size_t chunk = 256;  // channels per pass: bounded stack buffers
  std::int32_t mn[chunk], mx[chunk];  // order keys (integer min/max vectorize)
  float zero[chunk], inv[chunk];
  std::uint8_t q[chunk];
  for (std::size_t c0 = 0; c0 < dim; c0 += chunk) {
    const std::size_t n = dim - c0 < chunk ? dim - c0 : chunk;
    for (std::size_t c = 0; c < n; ++c) mn[c] = mx[c] = detail::order_key(x[c0 + c]);
    for (std::size_t t = 1; t < tokens; ++t) {
      const float* row = x + t * dim + c0;
      for (std::size_t c = 0; c < n; ++c) {
        const std::int32_t k = detail::order_key(row[c]);
        mn[c] = k < mn[c] ? k : mn[c];
        mx[c] = k > mx[c] ? k : mx[c];
      }
    }
    std::uint16_t s16[chunk], z16[chunk];  // kivi_make_params of every channel, in one vectorized loop
    detail::kivi_params_n(mn, mx, n, levels, zero, inv, s16, z16);
    std::memcpy(meta + 2 * c0, s16, 2 * n);
    std::memcpy(meta + 2 * (dim + c0), z16, 2 * n);
    for (std::size_t t = 0; t < tokens; ++t) {
      const float* row = x + t * dim + c0;
#if defined(KVCACHE_KIVI_SSE2)
      if constexpr (Bits == 2 || Bits == 4 || Bits == 8)
        if (n % 16 == 0) {  // the same codes as kivi_code, packed as pack_bits
          detail::kivi_codes_sse2<Bits, true>(row, n, zero, inv, codes + t * code_stride + c0 * Bits / 8);
          continue;
        }
#endif
      for (std::size_t c = 0; c < n; ++c) q[c] = detail::kivi_code(row[c], zero[c], inv[c], levels);
      pack_bits<Bits>(q, n, codes + t * code_stride + c0 * Bits / 8);
    }
  }
}

//! Inverse of kivi_encode_channels for `tokens` rows.
template <unsigned Bits>
void kivi_decode_channels(const std::byte* codes, std::size_t code_stride, std::size_t tokens,
                          std::size_t dim, const std::byte* meta, float* y) noexcept {
  std::uint8_t q[256];
  float sf[256], zf[256];  // each channel's scale and zero widened once, not once per token
  for (std::size_t c0 = 0; c0 < dim; c0 += 256) {
    const std::size_t n = dim - c0 < 256 ? dim - c0 : 256;
    std::uint16_t s16[256], z16[256];
    std::memcpy(s16, meta + 2 * c0, 2 * n);
    std::memcpy(z16, meta + 2 * (dim + c0), 2 * n);
    for (std::size_t c = 0; c < n; ++c) {
      sf[c] = detail::half_bits_to_float(s16[c]);
      zf[c] = detail::half_bits_to_float(z16[c]);
    }
    for (std::size_t t = 0; t < tokens; ++t) {
      unpack_bits<Bits>(codes + t * code_stride + c0 * Bits / 8, n, q);
      float* __restrict out = y + t * dim + c0;
      for (std::size_t c = 0; c < n; ++c) out[c] = static_cast<float>(q[c]) * sf[c] + zf[c];
    }
  }
}

//! KIVI: keys per channel in groups of Group tokens, values per token in groups of Group
//! channels, the newest keys at full precision in a residual window.
//!
//! In the cache (token_major layout): group g of a KV head covers slots [g·Group, (g+1)·Group).
//! The keys of the slots at and above `k_quantized[h]` (a multiple of Residual) sit at full
//! precision (the engine's element type) in the residual range, row (slot % Residual, head);
//! when a head's frontier reaches k_quantized[h] + Residual, the Residual/Group groups of the
//! window are quantized per channel (codes into the slots' rows, Bits·head_dim/8 bytes, packed
//! along channels) and the window moves on. A slot below k_quantized[h] that is refilled after an
//! eviction requantizes its group (decode the Group rows, replace the row, encode again; the other
//! rows take a second rounding). Key metadata of (group g, head h): `[head_dim]` fp16 scales then
//! `[head_dim]` fp16 zeros at k_scales + (g·kv_heads + h)·4·head_dim (layer_view::k_group_meta).
//! Values are kivi_per_token<Bits, Group> rows (no residual for values: KIVI's value window only
//! delays their quantization; here they are quantized on arrival).
//! @tparam Residual full-precision key window in tokens, a multiple of Group (KIVI: 32-128)
template <unsigned Bits, unsigned Group = 32, unsigned Residual = 128>
struct kivi : kivi_per_token<Bits, Group> {
  static_assert(Residual % Group == 0 && Residual >= Group,
                "kvcache: the KIVI residual window is a positive multiple of the group");
  static constexpr bool token_grouped_keys = true;
  static constexpr unsigned residual = Residual;
  static constexpr const char* name() noexcept { return "kivi"; }

  //! Group rows `[Group][head_dim]` fp32 at x: codes to row t at codes + t·code_stride, metadata
  //! (4·head_dim bytes) to meta.
  void encode_key_group(const float* x, const geometry& g, std::byte* codes, std::size_t code_stride,
                        std::byte* meta) const noexcept {
    kivi_encode_channels<Bits>(x, Group, g.head_dim, codes, code_stride, meta);
  }
  void decode_key_group(const std::byte* codes, std::size_t code_stride, std::size_t rows,
                        const geometry& g, const std::byte* meta, float* y) const noexcept {
    kivi_decode_channels<Bits>(codes, code_stride, rows, g.head_dim, meta, y);
  }
  //! Key metadata bytes of one (group, head).
  [[nodiscard]] static constexpr std::size_t key_meta_bytes(const geometry& g) noexcept {
    return std::size_t{4} * g.head_dim;
  }
};

static_assert(quantizer<kivi_per_token<2>>);
static_assert(quantizer<kivi<2, 32, 32>>);
static_assert(quantizer<kivi_per_token<4>>);

KVCACHE_NAMESPACE_END
