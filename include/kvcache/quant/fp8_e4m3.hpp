// SPDX-License-Identifier: Apache-2.0
//! @file
//! `fp8_e4m3`: K/V stored as OCP FP8 E4M3FN bytes with an fp32 scale per layer (for K and for V,
//! as vLLM and TensorRT-LLM do) or per KV head; `x ≈ fp8 · scale`.
//!
//! E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits; subnormals m·2^-9; max ±448; no
//! infinities; NaN = S.1111.111. Encoding divides by the scale (as vLLM's `x / scale`), rounds to
//! nearest even and saturates: anything beyond ±448 (±inf included) becomes ±448, NaN becomes NaN
//! (0x7f | sign). Inside the cache NaN/Inf never get that far: `validate` rejects them.
//!
//! Scales are given (a calibrated checkpoint's k_scale/v_scale) or computed from the first append
//! of each (layer, K|V[, head]) as amax / 448 (vLLM's calculate_kv_scales); 1.0 if that append is
//! all zeros. They are shared by every sequence and exposed to kernels by the view
//! (k_scales/v_scales with slot stride 0).
//! Calibrating from the first append means from a whole prompt when the engine prefills in one
//! append; an engine that appends token by token must pass scales (or a scale of 1.0 for
//! activations known to lie within ±448): one token's amax makes later tokens saturate
//! (SmolLM2 perplexity 3.90 -> 29.8 measured in examples/smollm).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

// SSE2 kernels for x86-64's baseline build; with AVX2 (-march=native) g++ vectorizes the portable
// loops 8 wide, which is faster. KVCACHE_NO_SIMD forces the portable loops (tests use it).
#if defined(__SSE2__) && !defined(__AVX2__) && !defined(__CUDA_ARCH__) && !defined(KVCACHE_NO_SIMD)
#  include <emmintrin.h>
#  define KVCACHE_FP8_SSE2 1
#endif

KVCACHE_NAMESPACE_BEGIN

//! Largest finite E4M3FN magnitude.
inline constexpr float e4m3_max = 448.0f;

//! fp32 -> E4M3FN, round to nearest even, saturating to ±448; NaN -> 0x7f|sign. Branch-free
//! (the cases are merged with masks, so loops over it vectorize).
KVCACHE_HOST_DEVICE std::uint8_t float_to_e4m3(float x) noexcept {
  const std::uint32_t b = detail::bit_cast<std::uint32_t>(x);
  const std::uint32_t sign = (b >> 24) & 0x80u;
  const std::uint32_t a = b & 0x7fffffffu;
  const std::uint32_t ac = a < 0x43e00000u ? a : 0x43e00000u;  // clamp to 448 (inf, NaN too)
  // normal: round the mantissa to 3 bits (ties to even), rebias the exponent 127 -> 7
  const std::uint32_t norm = ((ac + 0x7ffffu + ((ac >> 20) & 1u)) >> 20) - (120u << 3);
  // subnormal (|x| < 2^-6): m = rne(|x| * 2^9), by the 2^23 magic-number addition
  const float sub_f = detail::bit_cast<float>(ac) * 512.0f + 8388608.0f;
  const std::uint32_t sub = detail::bit_cast<std::uint32_t>(sub_f) - 0x4b000000u;
  const std::uint32_t is_sub = 0u - static_cast<std::uint32_t>(ac < 0x3c800000u);
  const std::uint32_t is_nan = 0u - static_cast<std::uint32_t>(a > 0x7f800000u);
  std::uint32_t code = (norm & ~is_sub) | (sub & is_sub);
  code = (code & ~is_nan) | (0x7fu & is_nan);
  return static_cast<std::uint8_t>(code | sign);
}

//! E4M3FN -> fp32 (exact), branch-free and without denormal arithmetic: normals by an exponent
//! rebias (127 - 7), subnormals m·2^-9 by an exact int -> float conversion.
KVCACHE_HOST_DEVICE float e4m3_to_float(std::uint8_t c) noexcept {
  const std::uint32_t em = c & 0x7fu;
  const std::uint32_t norm = (em << 20) + (120u << 23);
  const std::uint32_t sub =
      detail::bit_cast<std::uint32_t>(static_cast<float>(static_cast<std::int32_t>(em)) * 0x1p-9f);
  const std::uint32_t is_sub = 0u - static_cast<std::uint32_t>(em < 8u);
  const std::uint32_t is_nan = 0u - static_cast<std::uint32_t>(em == 0x7fu);
  std::uint32_t bits = (norm & ~is_sub) | (sub & is_sub);
  bits = (bits & ~is_nan) | (0x7fc00000u & is_nan);
  return detail::bit_cast<float>(bits | (static_cast<std::uint32_t>(c & 0x80u) << 24));
}

//! One value with its scale: E4M3FN code of x / scale (host encode and the device kernels).
KVCACHE_HOST_DEVICE std::uint8_t e4m3_encode(float x, float scale) noexcept {
  return float_to_e4m3(detail::div_rn(x, scale));
}
//! code · scale (the host decode reads the same value from e4m3_table()).
KVCACHE_HOST_DEVICE float e4m3_decode(std::uint8_t c, float scale) noexcept {
  return detail::mul_rn(e4m3_to_float(c), scale);
}

//! A calibrated scale from the largest |x| of an append: amax / 448, or 1 when amax is 0 (or
//! not finite). The host quantizer and the device one (cuda/quant.cuh) both use it.
KVCACHE_HOST_DEVICE float fp8_scale_from_amax(float amax) noexcept {
  return amax > 0.0f && amax <= 3.4e38f ? detail::div_rn(amax, e4m3_max) : 1.0f;
}

//! How fp8 scales are shared.
enum class scale_granularity : std::uint8_t {
  per_layer,  //!< one scale for K and one for V per layer (vLLM, TensorRT-LLM)
  per_head,   //!< one per (layer, KV head) for K and for V (vLLM's FlashAttention backend)
};

//! The 256 E4M3FN values (host decode table).
inline const float* e4m3_table() noexcept {
  static const auto table = [] {
    struct t { float v[256]; } r{};
    for (int c = 0; c < 256; ++c) r.v[c] = e4m3_to_float(static_cast<std::uint8_t>(c));
    return r;
  }();
  return table.v;
}

namespace detail {
#if defined(KVCACHE_FP8_SSE2)
//! The SSE2 body of e4m3_encode32_recip (Div: x / v, exact, for the flagged blocks; else x·v).
template <bool Div>
inline bool e4m3_encode32_sse2(const float* __restrict x, float r, std::uint8_t* __restrict o) noexcept {
  // float_to_e4m3 with SSE2 (x86-64's baseline), the same result for every input: |q| clamped to
  // 448 by minps (NaN -> 448, then 0x7f by the unordered mask); normals rounded by the integer
  // RNE of float_to_e4m3; subnormals by adding 2^14 (its ulp is 2^-9: one E4M3 subnormal step)
  const __m128 vr = _mm_set1_ps(r), vmax = _mm_set1_ps(448.0f), vsub = _mm_set1_ps(0x1p-6f),
               vmagic = _mm_set1_ps(16384.0f);
  const __m128i absm = _mm_set1_epi32(0x7fffffff), one = _mm_set1_epi32(1), rnd = _mm_set1_epi32(0x7ffff),
                bias = _mm_set1_epi32(120 << 3), magic = _mm_set1_epi32(0x46800000),
                x7f = _mm_set1_epi32(0x7f), x80 = _mm_set1_epi32(0x80), eight = _mm_set1_epi32(8),
                low19 = _mm_set1_epi32(0x7ffff), lim = _mm_set1_epi32(17);
  __m128i near = _mm_setzero_si128();
  for (std::size_t j = 0; j < 32; j += 16) {
    __m128i c[4];
    for (std::size_t k = 0; k < 4; ++k) {
      const __m128 q = Div ? _mm_div_ps(_mm_loadu_ps(x + j + 4 * k), vr) : _mm_mul_ps(_mm_loadu_ps(x + j + 4 * k), vr);
      const __m128i b = _mm_castps_si128(q);
      near = _mm_or_si128(near, _mm_cmplt_epi32(_mm_and_si128(_mm_add_epi32(b, eight), low19), lim));
      const __m128 cf = _mm_min_ps(_mm_castsi128_ps(_mm_and_si128(b, absm)), vmax);
      const __m128i ac = _mm_castps_si128(cf);
      const __m128i norm = _mm_sub_epi32(
          _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(ac, rnd), _mm_and_si128(_mm_srli_epi32(ac, 20), one)), 20), bias);
      const __m128i sub = _mm_sub_epi32(_mm_castps_si128(_mm_add_ps(cf, vmagic)), magic);
      const __m128i is_sub = _mm_castps_si128(_mm_cmplt_ps(cf, vsub));
      __m128i code = _mm_or_si128(_mm_and_si128(is_sub, sub), _mm_andnot_si128(is_sub, norm));
      code = _mm_or_si128(code, _mm_and_si128(_mm_castps_si128(_mm_cmpunord_ps(q, q)), x7f));
      c[k] = _mm_or_si128(code, _mm_and_si128(_mm_srli_epi32(b, 24), x80));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j),
                     _mm_packus_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3])));
  }
  return _mm_movemask_epi8(near) == 0;
}
#endif

//! Host encode of 32 fp32 values as e4m3_encode(x, scale) would, by x·r with r = 1/scale (a
//! multiply instead of a divide; the loop vectorizes). x·r is within a few ulps of the correctly
//! rounded x / scale, so the two give different codes only if a rounding boundary of E4M3 (a
//! midpoint between neighbours, or 2^-10) lies within those ulps: those all have their low 19
//! bits zero, so any q whose low 19 bits are within 8 of 0 (mod 2^19) flags the block, and
//! returns false: the caller then encodes it by division. Flagged blocks are rare (~3e-5 per value).
inline bool e4m3_encode32_recip(const float* __restrict x, float r, std::uint8_t* __restrict o) noexcept {
#if defined(KVCACHE_FP8_SSE2)
  return e4m3_encode32_sse2<false>(x, r, o);
#else
  std::uint32_t near = 0;
  for (std::size_t j = 0; j < 32; ++j) {
    const float q = x[j] * r;
    near |= static_cast<std::uint32_t>(((detail::bit_cast<std::uint32_t>(q) + 8u) & 0x7ffffu) <= 16u);
    o[j] = float_to_e4m3(q);
  }
  return near == 0;
#endif
}
//! Host encode: n values of type t from element i0 of src to codes e4m3_encode(x, scale).
inline void e4m3_encode_span(const void* src, std::size_t i0, std::size_t n, dtype t, float scale,
                             std::uint8_t* out) noexcept {
  // r is exact enough only while 1/scale is a normal float
  const bool recip = scale >= 0x1p-125f && scale <= 0x1p125f;
  const float r = 1.0f / scale;
  alignas(16) float buf[32];
  std::size_t k = 0;
  for (; k < n; k += 32) {
    const std::size_t m = n - k < 32 ? n - k : 32;
    if (simd_halves && t == dtype::f16) halves_to_floats(static_cast<const std::byte*>(src) + 2 * (i0 + k), m, buf);
    else load_row(src, i0 + k, m, t, buf);
    if (m == 32 && recip && e4m3_encode32_recip(buf, r, out + k)) continue;
#if defined(KVCACHE_FP8_SSE2)
    if (m == 32) {  // divps is IEEE division: the same quotients as e4m3_encode's
      e4m3_encode32_sse2<true>(buf, scale, out + k);
      continue;
    }
#endif
    for (std::size_t j = 0; j < m; ++j) out[k + j] = e4m3_encode(buf[j], scale);
  }
}
}  // namespace detail

class fp8_e4m3 {
 public:
  static constexpr unsigned bits = 8;  // group: none (one scale per layer or per head)

  //! Scales computed from the first append of each (layer, K|V[, head]).
  explicit fp8_e4m3(scale_granularity gran = scale_granularity::per_layer) : gran_(gran) {}
  //! Given scales: `[layers]` (per_layer) or `[layers][kv_heads]` (per_head), each > 0 and finite.
  fp8_e4m3(scale_granularity gran, std::vector<float> k_scales, std::vector<float> v_scales)
      : gran_(gran), given_(true), k_(std::move(k_scales)), v_(std::move(v_scales)) {}

  static constexpr const char* name() noexcept { return "fp8_e4m3"; }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept { return g.head_dim; }
  [[nodiscard]] std::size_t scale_bytes(const geometry&) const noexcept { return 0; }
  [[nodiscard]] scale_granularity granularity() const noexcept { return gran_; }

  status bind(const geometry& g) {
    heads_ = gran_ == scale_granularity::per_head ? g.kv_heads : 1;
    if (heads_ > 1024) return {errc::invalid_argument, "fp8_e4m3: per-head scales support up to 1024 kv heads"};
    const std::size_t n = std::size_t{g.layers} * heads_;
    if (!given_) {  // keep scales already calibrated for this shape (a quantizer passed on)
      if (k_.size() != n || v_.size() != n) {
        k_.assign(n, 0.0f);
        v_.assign(n, 0.0f);
      }
      return {};
    }
    if (k_.size() != n || v_.size() != n)
      return {errc::shape_mismatch, "fp8_e4m3: " + std::to_string(k_.size()) + " K and " +
                                        std::to_string(v_.size()) + " V scales given, expected " +
                                        std::to_string(n) + " (layers" +
                                        (heads_ > 1 ? " x kv_heads)" : ")")};
    for (std::size_t i = 0; i < n; ++i)
      if (!(k_[i] > 0.0f && k_[i] <= 3.4e38f) || !(v_[i] > 0.0f && v_[i] <= 3.4e38f))
        return {errc::invalid_argument,
                "fp8_e4m3: scale " + std::to_string(i) + " is not a positive finite number"};
    return {};
  }

  [[nodiscard]] status validate(const void* src, std::size_t elements, dtype t) const {
    return detail::check_finite(name(), src, elements, t);
  }

  //! Sets the still-unset scales of (ctx.layer, ctx.part) to amax / 448 of this append
  //! (`[tokens][kv_heads][head_dim]`).
  void calibrate(const void* src, std::uint32_t tokens, const geometry& g, quant_context ctx) {
    ctx.first_head = 0;
    calibrate_rows(src, std::size_t{tokens} * g.kv_heads, g, ctx);
  }

  //! Encodes with the scales of (ctx.layer, ctx.part); scales still unset are first calibrated
  //! from these rows (the cache calls calibrate() on the whole append before).
  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* /*scales*/, quant_context ctx = {}) {
    calibrate_rows(src, rows, g, ctx);
    const std::size_t D = g.head_dim;
    const float* s = table(ctx.part) + std::size_t{ctx.layer} * heads_;
    auto* out = reinterpret_cast<std::uint8_t*>(codes);
    if (heads_ == 1) return detail::e4m3_encode_span(src, 0, rows * D, g.type, s[0], out);
    for (std::size_t r = 0; r < rows; ++r)
      detail::e4m3_encode_span(src, r * D, D, g.type, s[(ctx.first_head + r) % g.kv_heads], out + r * D);
  }

  //! `scales` points at the fp32 scale of these rows' (layer, part, head); null means 1.
  void decode(const std::byte* codes, const std::byte* scales, std::size_t rows, const geometry& g,
              float* dst) const noexcept {
    float scale = 1.0f;
    if (scales) std::memcpy(&scale, scales, sizeof scale);
    const auto* in = reinterpret_cast<const std::uint8_t*>(codes);
    const std::size_t n = rows * g.head_dim;
    const float* lut = e4m3_table();  // one load per value: the host's fastest path, at -O2 too
    for (std::size_t i = 0; i < n; ++i) dst[i] = lut[in[i]] * scale;
  }

  //! `[kv_heads]` (per head) or `[1]` (per layer) scales of (layer, part); null before bind().
  [[nodiscard]] const float* shared_scales(std::uint32_t layer, kv_part part) const noexcept {
    const auto& t = part == kv_part::k ? k_ : v_;
    return t.empty() ? nullptr : t.data() + std::size_t{layer} * heads_;
  }
  [[nodiscard]] std::size_t shared_scale_head_stride() const noexcept {
    return gran_ == scale_granularity::per_head ? sizeof(float) : 0;
  }
  //! The scale of (layer, part, head); 0 while not yet calibrated.
  [[nodiscard]] float scale(std::uint32_t layer, kv_part part, std::uint32_t head = 0) const noexcept {
    const float* s = shared_scales(layer, part);
    return s ? s[heads_ > 1 ? head : 0] : 0.0f;
  }

 private:
  void ensure(const geometry& g) {
    if (k_.empty()) (void)bind(g);
  }
  // Rows r = 0..rows-1 belong to head (first_head + r) % kv_heads.
  void calibrate_rows(const void* src, std::size_t rows, const geometry& g, quant_context ctx) {
    ensure(g);
    float* s = table(ctx.part) + std::size_t{ctx.layer} * heads_;
    bool unset = false;
    for (std::uint32_t h = 0; h < heads_; ++h) unset |= s[h] == 0.0f;
    if (!unset) return;
    float amax[1024] = {};  // per scale of this layer (kv_heads <= 1024 checked by bind)
    bool seen[1024] = {};
    const std::size_t D = g.head_dim;
    for (std::size_t r = 0; r < rows; ++r) {
      const std::size_t h = heads_ > 1 ? (ctx.first_head + r) % g.kv_heads : 0;
      const float f = detail::bit_cast<float>(detail::max_abs_bits(
          static_cast<const std::byte*>(src) + r * D * size_of(g.type), D, g.type));
      amax[h] = f > amax[h] ? f : amax[h];
      seen[h] = true;
    }
    for (std::uint32_t h = 0; h < heads_; ++h)
      if (s[h] == 0.0f && seen[h])
        s[h] = fp8_scale_from_amax(amax[h]);
  }
  float* table(kv_part p) noexcept { return p == kv_part::k ? k_.data() : v_.data(); }

  scale_granularity gran_ = scale_granularity::per_layer;
  bool given_ = false;
  std::uint32_t heads_ = 1;
  std::vector<float> k_, v_;
};

static_assert(quantizer<fp8_e4m3>);

KVCACHE_NAMESPACE_END
