// SPDX-License-Identifier: Apache-2.0
//! @file
//! Bit packing, every width 1..8, against a bit-by-bit reference of the LSB-first stream.
#include <kvcache/quant/bitpack.hpp>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "catch.hpp"

namespace {

// Bit j of the stream, read the slow way.
int stream_bit(const std::vector<std::byte>& b, std::size_t j) {
  return (static_cast<unsigned>(b[j / 8]) >> (j % 8)) & 1u;
}

}  // namespace

TEST_CASE("pack_bits: every width, every length up to 70, matches the LSB-first stream", "[quant][bitpack]") {
  std::mt19937 rng(7);
  for (unsigned w = 1; w <= 8; ++w) {
    for (std::size_t n = 0; n <= 70; ++n) {
      std::vector<std::uint8_t> codes(n);
      for (auto& c : codes) c = static_cast<std::uint8_t>(rng() & ((1u << w) - 1));
      std::vector<std::byte> packed(kvcache::packed_bytes(n, w) + 1, std::byte{0xAB});
      REQUIRE(kvcache::pack_bits(codes.data(), n, w, packed.data()));
      CHECK(packed.back() == std::byte{0xAB});  // nothing written past packed_bytes
      packed.pop_back();
      for (std::size_t i = 0; i < n; ++i)
        for (unsigned k = 0; k < w; ++k)
          REQUIRE(stream_bit(packed, w * i + k) == ((codes[i] >> k) & 1));
      for (std::size_t j = n * w; j < packed.size() * 8; ++j) REQUIRE(stream_bit(packed, j) == 0);
      std::vector<std::uint8_t> back(n + 1, 0xCD);
      REQUIRE(kvcache::unpack_bits(packed.data(), n, w, back.data()));
      CHECK(back.back() == 0xCD);
      back.pop_back();
      REQUIRE(back == codes);
    }
  }
}

TEST_CASE("pack_bits: 2 and 4 bits match KIVI's int32 layout; high bits are masked", "[quant][bitpack]") {
  const std::uint8_t codes[16] = {1, 2, 3, 0, 3, 3, 1, 0, 2, 2, 1, 1, 0, 3, 2, 1};
  std::byte out[4];
  kvcache::pack_bits<2>(codes, 16, out);
  std::uint32_t word = 0;
  for (int i = 0; i < 16; ++i) word |= std::uint32_t{codes[i]} << (2 * i);  // KIVI new_pack.py
  for (int k = 0; k < 4; ++k) CHECK(static_cast<std::uint32_t>(out[k]) == ((word >> (8 * k)) & 0xff));

  const std::uint8_t wide[8] = {0xff, 0x10, 0x2f, 0, 0, 0, 0, 0x81};
  std::byte o4[4];
  kvcache::pack_bits<4>(wide, 8, o4);
  CHECK(o4[0] == std::byte{0x0f});
  CHECK(o4[1] == std::byte{0x0f});
  CHECK(o4[3] == std::byte{0x10});
  CHECK_FALSE(kvcache::pack_bits(wide, 8, 9, o4));
  CHECK_FALSE(kvcache::unpack_bits(o4, 8, 0, nullptr));
}

#include <kvcache/core/dtype.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cstring>

TEST_CASE("half_bits_to_float: all 65536 fp16 patterns widen exactly (the quantizers' input path)", "[quant]") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float a = kvcache::detail::half_bits_to_float(h);
    const float b = kvcache::half_to_float(static_cast<std::uint16_t>(h));
    std::uint32_t ab, bb;
    std::memcpy(&ab, &a, 4);
    std::memcpy(&bb, &b, 4);
    INFO("half " << h);
    REQUIRE(ab == bb);
  }
}

TEST_CASE("halves_to_floats: all 65536 fp16 patterns, any offset, as half_to_float", "[quant]") {
  std::vector<std::uint16_t> h(65536 + 7);
  for (std::uint32_t i = 0; i < 65536; ++i) h[i + 3] = static_cast<std::uint16_t>(i);
  std::vector<float> y(h.size());
  for (std::size_t off : {0, 3}) {  // unaligned starts, a tail of 7 or 2 values
    kvcache::detail::halves_to_floats(h.data() + off, h.size() - off, y.data());
    for (std::size_t i = 0; i < h.size() - off; ++i) {
      const float b = kvcache::half_to_float(h[off + i]);
      std::uint32_t ab, bb;
      std::memcpy(&ab, &y[i], 4);
      std::memcpy(&bb, &b, 4);
      if (kvcache::detail::simd_halves && (h[off + i] & 0x7c00u) == 0x7c00u && (h[off + i] & 0x3ffu))
        ab &= ~0x00400000u, bb &= ~0x00400000u;  // NaN: F16C's vcvtph2ps quiets a signalling one
      INFO("half " << h[off + i]);
      REQUIRE(ab == bb);
    }
  }
}
