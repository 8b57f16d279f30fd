// SPDX-License-Identifier: Apache-2.0
//! @file
//! The quantizer concept: how one (token, head) row of K or V is stored. A quantizer knows
//! neither which tokens stay nor where bytes live.
//!
//! A quantizer `Q` provides, for a geometry g:
//! - `code_bytes(g)`: bytes of one stored (token, head) row in the K/V range (codes, and for
//!   llama.cpp blocks the in-band fp16 scales that ggml's layout interleaves);
//! - `scale_bytes(g)`: bytes of its out-of-band metadata (scales, zeros) per row; 0 when none.
//!   The cache stores them in a range of their own beside the codes, `[slot][kv_head]`;
//! - `encode(src, rows, g, codes, scales, ctx)`: `rows` consecutive rows of g.type elements to
//!   codes (and `rows * scale_bytes(g)` bytes of metadata). `ctx` names the layer, K or V, and the
//!   KV head of the first row (row r belongs to head (ctx.first_head + r) % kv_heads). Not const:
//!   formats with calibrated state (fp8 scales from the first append) may update it.
//!   Precondition: finite input (the cache checks it with `validate` first);
//! - `decode(codes, scales, rows, g, dst)`: back to fp32 (reference attention, dense helpers).
//!   `scales` points at the first row's metadata (row r at scales + r * scale_bytes(g)); for
//!   formats whose scale is shared per layer or per head (fp8), at that one fp32 scale, used for
//!   every row decoded by the call (so decode one head at a time).
//! - `Q::name()`.
//!
//! Optional hooks, detected by the cache (call them through the `quant_*` helpers below):
//! - `status bind(const geometry&)`: checks the format fits the geometry (llama.cpp blocks need
//!   head_dim % 32 == 0, ...) and sizes per-layer state. The cache constructor raises on failure.
//! - `status validate(const void* src, std::size_t elements, dtype) const`: rejects input the
//!   format cannot store faithfully (NaN/Inf): append fails with invalid_argument before any
//!   state changes.
//! - `void calibrate(const void* src, std::uint32_t tokens, const geometry&, quant_context)`:
//!   sees a whole append (`[tokens][kv_heads][head_dim]`) before it is encoded.
//! - `const float* shared_scales(std::uint32_t layer, kv_part) const` and
//!   `std::size_t shared_scale_head_stride() const`: scales held by the quantizer (per layer or
//!   per head), which views expose as k_scales/v_scales with a slot stride of 0.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

KVCACHE_NAMESPACE_BEGIN

//! K or V.
enum class kv_part : std::uint8_t { k, v };

//! What an encode call is about.
struct quant_context {
  std::uint32_t layer = 0;
  kv_part part = kv_part::k;
  std::uint32_t first_head = 0;  //!< KV head of the first row; row r has head (first_head + r) % H
};

template <class Q>
concept quantizer = requires(Q& mq, const Q& q, const geometry& g, const void* src, std::byte* dst,
                             const std::byte* csrc, float* out, std::size_t rows, quant_context ctx) {
  { q.code_bytes(g) } -> std::same_as<std::size_t>;
  { q.scale_bytes(g) } -> std::same_as<std::size_t>;
  { mq.encode(src, rows, g, dst, dst, ctx) } -> std::same_as<void>;
  { q.decode(csrc, csrc, rows, g, out) } -> std::same_as<void>;
  { Q::name() } -> std::convertible_to<const char*>;
};

// ---- optional hooks -------------------------------------------------------------------------

template <class Q>
status quant_bind(Q& q, const geometry& g) {
  if constexpr (requires { { q.bind(g) } -> std::same_as<status>; }) return q.bind(g);
  else return {};
}
template <class Q>
status quant_validate(const Q& q, const void* src, std::size_t elements, dtype t) {
  if constexpr (requires { { q.validate(src, elements, t) } -> std::same_as<status>; })
    return q.validate(src, elements, t);
  else return {};
}
template <class Q>
void quant_calibrate(Q& q, const void* src, std::uint32_t tokens, const geometry& g, quant_context ctx) {
  if constexpr (requires { q.calibrate(src, tokens, g, ctx); }) q.calibrate(src, tokens, g, ctx);
}
//! Scales the quantizer holds for (layer, part), or null when its scales are per row (or none).
template <class Q>
const float* quant_shared_scales(const Q& q, std::uint32_t layer, kv_part part) {
  if constexpr (requires { { q.shared_scales(layer, part) } -> std::convertible_to<const float*>; })
    return q.shared_scales(layer, part);
  else return nullptr;
}
template <class Q>
std::size_t quant_shared_scale_head_stride(const Q& q) {
  if constexpr (requires { { q.shared_scale_head_stride() } -> std::same_as<std::size_t>; })
    return q.shared_scale_head_stride();
  else return 0;
}

//! Code width in bits (`Q::bits`; 0 when the format stores the engine's element type as is).
template <class Q>
constexpr std::uint32_t quant_bits() noexcept {
  if constexpr (requires { Q::bits; }) return Q::bits;
  else return 0;
}
//! Values sharing one scale along head_dim (`Q::group`; 0 when the scale is not per group).
template <class Q>
constexpr std::uint32_t quant_group() noexcept {
  if constexpr (requires { Q::group; }) return Q::group;
  else return 0;
}

//! True for formats whose keys are grouped along tokens (KIVI): the cache keeps their newest keys
//! in a full-precision residual window and quantizes whole groups (see kivi.hpp).
template <class Q>
constexpr bool quant_token_grouped() noexcept {
  if constexpr (requires { Q::token_grouped_keys; }) return Q::token_grouped_keys;
  else return false;
}

// ---- helpers shared by the formats ----------------------------------------------------------

namespace detail {

//! fp16 bits -> fp32 (exact), branch-free so loops over it vectorize: the exponent is rebased
//! by one multiply by 2^112 (exact for normals and subnormals alike, as half_to_float does), and
//! inf/NaN (payload kept) are merged in with a select.
KVCACHE_HOST_DEVICE float half_bits_to_float(std::uint32_t h) noexcept {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  const std::uint32_t em = h & 0x7fffu;
  const std::uint32_t b = detail::bit_cast<std::uint32_t>(detail::bit_cast<float>(em << 13) * 0x1p112f);
  const std::uint32_t special = (em << 13) + (224u << 23);
  const std::uint32_t is_special = 0u - static_cast<std::uint32_t>(em >= 0x7c00u);  // mask
  return detail::bit_cast<float>((b & ~is_special) | (special & is_special) | sign);
}

//! fp32 x·y, x + y and x / y rounded to nearest even, never fused: on the device the explicit
//! intrinsics keep nvcc from contracting a multiply and an add into one FMA (which rounds once),
//! so device kernels give the host's bits. On the host plain operators (x86-64 without -march
//! has no FMA; a host build that contracts, e.g. -march=native with GCC's -ffp-contract=fast,
//! can differ from the device in the last bit of KIVI/q4_0 results).
KVCACHE_HOST_DEVICE float mul_rn(float x, float y) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}
KVCACHE_HOST_DEVICE float add_rn(float x, float y) noexcept {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(x, y);
#else
  return x + y;
#endif
}
KVCACHE_HOST_DEVICE float div_rn(float x, float y) noexcept {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(x, y);
#else
  return x / y;
#endif
}

//! A signed integer whose order is the order of the (non-NaN) floats: integer min/max
//! reductions vectorize where float ones do not (without -ffast-math).
KVCACHE_HOST_DEVICE std::int32_t order_key(float f) noexcept {
  const auto b = detail::bit_cast<std::int32_t>(f);
  return b ^ ((b >> 31) & 0x7fffffff);
}
KVCACHE_HOST_DEVICE float from_order_key(std::int32_t k) noexcept {
  return detail::bit_cast<float>(k ^ ((k >> 31) & 0x7fffffff));
}

//! Largest |x| of n elements, as the bit pattern of its fp32 value: for non-negative floats the
//! integer order is the float order, and an integer max vectorizes. Non-finite input gives a
//! value >= 0x7f800000.
inline std::uint32_t max_abs_bits(const void* src, std::size_t n, dtype t) noexcept {
  std::int32_t m = 0;
  const auto* p = static_cast<const std::byte*>(src);
  if (t == dtype::f32) {
    for (std::size_t i = 0; i < n; ++i) {
      std::int32_t b;
      std::memcpy(&b, p + 4 * i, 4);
      b &= 0x7fffffff;
      m = b > m ? b : m;
    }
    return static_cast<std::uint32_t>(m);
  }
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    const std::int32_t b = h & 0x7fff;
    m = b > m ? b : m;
  }
  const auto um = static_cast<std::uint32_t>(m);
  if (t == dtype::bf16) return um << 16;
  // f16: the fp32 pattern of the same value (inf/NaN map above 0x7f800000)
  return detail::bit_cast<std::uint32_t>(half_bits_to_float(um));
}

//! ok, or invalid_argument naming the first NaN/Inf element (or the first element whose
//! magnitude exceeds `limit`, for formats with fp16 metadata).
inline status check_finite(const char* format, const void* src, std::size_t n, dtype t,
                           float limit = 0.0f) {
  const std::uint32_t bound =
      limit > 0.0f ? detail::bit_cast<std::uint32_t>(limit) : 0x7f7fffffu;  // largest finite
  if (max_abs_bits(src, n, t) <= bound) return {};
  for (std::size_t i = 0; i < n; ++i) {
    const float x = load_as_float(src, i, t);
    if (!(x == x) || !(detail::bit_cast<std::uint32_t>(x) << 1 >> 1 <= bound))
      return {errc::invalid_argument,
              std::string(format) + ": element " + std::to_string(i) + " of the input is " +
                  (x != x ? "NaN" : (x - x != 0.0f ? "infinite" : "beyond the format's range (" +
                                                                      std::to_string(x) + ")")) +
                  "; quantized caches reject non-finite K/V instead of storing garbage"};
  }
  return {};
}

//! n elements of type t starting at element i0 of src, to fp32. One loop per type: vectorizes.
inline void load_row(const void* src, std::size_t i0, std::size_t n, dtype t, float* dst) noexcept {
  const auto* p = static_cast<const std::byte*>(src);
  switch (t) {
    case dtype::f32: std::memcpy(dst, p + i0 * 4, n * 4); return;
    case dtype::f16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, p + (i0 + i) * 2, 2);
        dst[i] = half_bits_to_float(h);
      }
      return;
    case dtype::bf16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, p + (i0 + i) * 2, 2);
        dst[i] = bf16_to_float(h);
      }
      return;
  }
}

//! fp32 -> fp16, rounded toward -inf (so the stored value is <= f).
KVCACHE_HOST_DEVICE std::uint16_t half_round_down(float f) noexcept {
  std::uint16_t h = float_to_half(f);
  if (half_to_float(h) > f)
    h = (h & 0x8000u) ? static_cast<std::uint16_t>(h + 1)
                      : (h == 0 ? std::uint16_t{0x8001u} : static_cast<std::uint16_t>(h - 1));
  return h;
}
//! fp32 >= 0 -> fp16, rounded toward +inf (so the stored value is >= f).
KVCACHE_HOST_DEVICE std::uint16_t half_round_up(float f) noexcept {
  std::uint16_t h = float_to_half(f);
  if (half_to_float(h) < f) h = static_cast<std::uint16_t>(h + 1);
  return h;
}

}  // namespace detail

KVCACHE_NAMESPACE_END
