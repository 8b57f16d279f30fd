// SPDX-License-Identifier: Apache-2.0
//! @file
//! Bit packing of small unsigned codes, LSB first, for any width 1..8 (3, 5, 6 and 7 bits cross
//! byte boundaries).
//!
//! Code i of a stream occupies bits [W·i, W·i + W) of the stream, and byte k of the output holds
//! stream bits [8k, 8k + 8), least significant bit first. For W ∈ {1, 2, 4, 8} this is KIVI's
//! layout (32/W codes per little-endian int32, element i at bits [W·i, W·i + W)). n codes take
//! `packed_bytes(n, W)` = ceil(n·W / 8) bytes; the unused high bits of the last byte are zero.
//!
//! The loops work on blocks of 8 codes (W whole bytes) with no per-element branch, so g++ -O3
//! vectorizes or at least unrolls them.
#pragma once

#include <kvcache/config.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

KVCACHE_NAMESPACE_BEGIN

//! Bytes holding n codes of `width` bits.
KVCACHE_HOST_DEVICE constexpr std::size_t packed_bytes(std::size_t n, unsigned width) noexcept {
  return (n * width + 7) / 8;
}

//! Packs n codes (each < 2^W; higher bits are masked off) into packed_bytes(n, W) bytes.
template <unsigned W>
KVCACHE_HOST_DEVICE void pack_bits(const std::uint8_t* in, std::size_t n, std::byte* out) noexcept {
  static_assert(W >= 1 && W <= 8, "kvcache: pack_bits width must be in [1, 8]");
  constexpr unsigned mask = (1u << W) - 1;
  if constexpr (W == 8) {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::byte>(in[i]);
  } else if constexpr (8 % W == 0) {  // whole codes per byte: a byte loop, which vectorizes
    constexpr unsigned per = 8 / W;
    const std::size_t whole = n / per;
    for (std::size_t k = 0; k < whole; ++k) {
      unsigned byte = 0;
      for (unsigned j = 0; j < per; ++j) byte |= (in[k * per + j] & mask) << (W * j);
      out[k] = static_cast<std::byte>(byte);
    }
    if (const std::size_t rest = n - whole * per; rest) {
      unsigned byte = 0;
      for (std::size_t j = 0; j < rest; ++j) byte |= (in[whole * per + j] & mask) << (W * j);
      out[whole] = static_cast<std::byte>(byte);
    }
  } else {  // 3, 5, 6, 7 bits: blocks of 8 codes fill W whole bytes
    const std::size_t blocks = n / 8;
    for (std::size_t b = 0; b < blocks; ++b) {
      std::uint64_t acc = 0;
      for (unsigned j = 0; j < 8; ++j) acc |= std::uint64_t{in[b * 8 + j] & mask} << (W * j);
      for (unsigned k = 0; k < W; ++k) out[b * W + k] = static_cast<std::byte>(acc >> (8 * k));
    }
    if (const std::size_t rest = n - blocks * 8; rest) {
      std::uint64_t acc = 0;
      for (std::size_t j = 0; j < rest; ++j) acc |= std::uint64_t{in[blocks * 8 + j] & mask} << (W * j);
      const std::size_t bytes = packed_bytes(rest, W);
      for (std::size_t k = 0; k < bytes; ++k) out[blocks * W + k] = static_cast<std::byte>(acc >> (8 * k));
    }
  }
}

//! Unpacks n codes of W bits written by pack_bits<W>.
template <unsigned W>
KVCACHE_HOST_DEVICE void unpack_bits(const std::byte* in, std::size_t n, std::uint8_t* out) noexcept {
  static_assert(W >= 1 && W <= 8, "kvcache: unpack_bits width must be in [1, 8]");
  constexpr unsigned mask = (1u << W) - 1;
  if constexpr (W == 8) {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>(in[i]);
  } else if constexpr (8 % W == 0) {
    constexpr unsigned per = 8 / W;
    const std::size_t whole = n / per;
    if constexpr ((W == 2 || W == 4) && std::endian::native == std::endian::little) {
      // the byte's `per` codes written as one little-endian word (a contiguous store: this
      // vectorizes far better than `per` strided byte stores)
      using word = std::conditional_t<W == 4, std::uint16_t, std::uint32_t>;
      for (std::size_t k = 0; k < whole; ++k) {
        const std::uint32_t byte = static_cast<std::uint8_t>(in[k]);
        std::uint32_t w = 0;
        for (unsigned j = 0; j < per; ++j) w |= ((byte >> (W * j)) & mask) << (8 * j);
        const auto ww = static_cast<word>(w);
        std::memcpy(out + k * per, &ww, sizeof ww);
      }
    } else {
      for (std::size_t k = 0; k < whole; ++k) {
        const unsigned byte = static_cast<std::uint8_t>(in[k]);
        for (unsigned j = 0; j < per; ++j) out[k * per + j] = static_cast<std::uint8_t>((byte >> (W * j)) & mask);
      }
    }
    if (const std::size_t rest = n - whole * per; rest) {
      const unsigned byte = static_cast<std::uint8_t>(in[whole]);
      for (std::size_t j = 0; j < rest; ++j) out[whole * per + j] = static_cast<std::uint8_t>((byte >> (W * j)) & mask);
    }
  } else {
    const std::size_t blocks = n / 8;
    for (std::size_t b = 0; b < blocks; ++b) {
      std::uint64_t acc = 0;
      for (unsigned k = 0; k < W; ++k) acc |= std::uint64_t{static_cast<std::uint8_t>(in[b * W + k])} << (8 * k);
      for (unsigned j = 0; j < 8; ++j) out[b * 8 + j] = static_cast<std::uint8_t>((acc >> (W * j)) & mask);
    }
    if (const std::size_t rest = n - blocks * 8; rest) {
      std::uint64_t acc = 0;
      const std::size_t bytes = packed_bytes(rest, W);
      for (std::size_t k = 0; k < bytes; ++k)
        acc |= std::uint64_t{static_cast<std::uint8_t>(in[blocks * W + k])} << (8 * k);
      for (std::size_t j = 0; j < rest; ++j)
        out[blocks * 8 + j] = static_cast<std::uint8_t>((acc >> (W * j)) & mask);
    }
  }
}

//! Run-time width (1..8): dispatches to pack_bits<W>. Returns false for a width outside [1, 8].
inline bool pack_bits(const std::uint8_t* in, std::size_t n, unsigned width, std::byte* out) noexcept {
  switch (width) {
    case 1: pack_bits<1>(in, n, out); return true;
    case 2: pack_bits<2>(in, n, out); return true;
    case 3: pack_bits<3>(in, n, out); return true;
    case 4: pack_bits<4>(in, n, out); return true;
    case 5: pack_bits<5>(in, n, out); return true;
    case 6: pack_bits<6>(in, n, out); return true;
    case 7: pack_bits<7>(in, n, out); return true;
    case 8: pack_bits<8>(in, n, out); return true;
    default: return false;
  }
}
//! Run-time width (1..8): dispatches to unpack_bits<W>. Returns false for a width outside [1, 8].
inline bool unpack_bits(const std::byte* in, std::size_t n, unsigned width, std::uint8_t* out) noexcept {
  switch (width) {
    case 1: unpack_bits<1>(in, n, out); return true;
    case 2: unpack_bits<2>(in, n, out); return true;
    case 3: unpack_bits<3>(in, n, out); return true;
    case 4: unpack_bits<4>(in, n, out); return true;
    case 5: unpack_bits<5>(in, n, out); return true;
    case 6: unpack_bits<6>(in, n, out); return true;
    case 7: unpack_bits<7>(in, n, out); return true;
    case 8: unpack_bits<8>(in, n, out); return true;
    default: return false;
  }
}

KVCACHE_NAMESPACE_END
