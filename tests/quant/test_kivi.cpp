// SPDX-License-Identifier: Apache-2.0
//! @file
//! KIVI codes: round-trip bounds (|error| <= scale/2) for every width 2..8, per token and per
//! channel; input checks; and KIVI's claim: at 2 bits, per-channel keys give a smaller
//! attention-output error than per-token keys when some channels carry outliers.
#include <kvcache/quant/kivi.hpp>
#include <kvcache/reference/attention.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "catch.hpp"

namespace kv = kvcache;

namespace {

template <unsigned Bits, unsigned Group>
void check_per_token_round_trip(unsigned seed) {
  using Q = kv::kivi_per_token<Bits, Group>;
  const kv::geometry g{1, 2, 2, 128, kv::dtype::f32};
  const std::size_t rows = 64, D = g.head_dim, G = D / Group;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> x(rows * D);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::size_t r = i / D;
    x[i] = n(rng) * (r % 3 == 0 ? 100.0f : 1.0f) + (r % 5 == 0 ? 1000.0f : 0.0f);  // offsets: tiny range near a big min
    if (r == 7) x[i] = 0.3f;                       // a constant row
    if (r == 8) x[i] = static_cast<float>(i % 2);  // two values
  }
  Q q;
  REQUIRE(q.code_bytes(g) == D * Bits / 8);
  REQUIRE(q.scale_bytes(g) == G * 4);
  std::vector<std::byte> codes(rows * q.code_bytes(g)), meta(rows * q.scale_bytes(g));
  q.encode(x.data(), rows, g, codes.data(), meta.data());
  std::vector<float> y(x.size());
  q.decode(codes.data(), meta.data(), rows, g, y.data());
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t i = 0; i < G; ++i) {
      std::uint16_t s16, z16;
      std::memcpy(&s16, meta.data() + r * G * 4 + 2 * i, 2);
      std::memcpy(&z16, meta.data() + r * G * 4 + 2 * (G + i), 2);
      const float s = kv::half_to_float(s16);
      for (std::size_t j = 0; j < Group; ++j) {
        const std::size_t e = r * D + i * Group + j;
        INFO("bits " << Bits << " group " << Group << " row " << r << " elem " << e << " scale " << s);
        REQUIRE(std::fabs(y[e] - x[e]) <= s / 2 * (1 + 1e-5f) + std::fabs(x[e]) * 1e-6f);
      }
    }
  // a constant row decodes within fp16 rounding; 0 stays exact in a two-valued row (the zero)
  for (std::size_t d = 0; d < D; ++d) {
    CHECK(std::fabs(y[7 * D + d] - 0.3f) <= 2e-4f);
    if ((8 * D + d) % 2 == 0) CHECK(y[8 * D + d] == 0.0f);
  }
}

template <unsigned Bits>
void check_per_channel_round_trip(std::size_t tokens, unsigned seed) {
  const std::size_t D = 64;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> x(tokens * D);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = n(rng) * (i % D == 5 ? 30.0f : 1.0f) + (i % D == 9 ? -500.0f : 0.0f);
  const std::size_t stride = D * Bits / 8 + 3;  // rows need not be adjacent
  std::vector<std::byte> codes(tokens * stride), meta(4 * D);
  kv::kivi_encode_channels<Bits>(x.data(), tokens, D, codes.data(), stride, meta.data());
  std::vector<float> y(x.size());
  kv::kivi_decode_channels<Bits>(codes.data(), stride, tokens, D, meta.data(), y.data());
  for (std::size_t c = 0; c < D; ++c) {
    std::uint16_t s16;
    std::memcpy(&s16, meta.data() + 2 * c, 2);
    const float s = kv::half_to_float(s16);
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::size_t e = t * D + c;
      INFO("bits " << Bits << " tokens " << tokens << " channel " << c);
      REQUIRE(std::fabs(y[e] - x[e]) <= s / 2 * (1 + 1e-5f) + std::fabs(x[e]) * 1e-6f);
    }
  }
}

}  // namespace

TEST_CASE("kivi per token: |error| <= scale/2 for every width and some group sizes", "[quant][kivi]") {
  check_per_token_round_trip<2, 32>(1);
  check_per_token_round_trip<3, 32>(2);
  check_per_token_round_trip<4, 32>(3);
  check_per_token_round_trip<5, 16>(4);
  check_per_token_round_trip<6, 64>(5);
  check_per_token_round_trip<7, 8>(6);
  check_per_token_round_trip<8, 128>(7);
  check_per_token_round_trip<2, 8>(8);
}

TEST_CASE("kivi per channel: |error| <= scale/2, odd token counts", "[quant][kivi]") {
  for (std::size_t tokens : {1u, 2u, 7u, 32u, 33u}) {
    check_per_channel_round_trip<2>(tokens, 10);
    check_per_channel_round_trip<3>(tokens, 11);
    check_per_channel_round_trip<4>(tokens, 12);
    check_per_channel_round_trip<6>(tokens, 13);
    check_per_channel_round_trip<8>(tokens, 14);
  }
}

TEST_CASE("kivi: shapes, NaN/Inf and values beyond fp16 are refused with a clear error", "[quant][kivi]") {
  kv::kivi_per_token<2, 32> q;
  CHECK(q.bind({1, 1, 1, 128, kv::dtype::f16}));
  CHECK(q.bind({1, 1, 1, 80, kv::dtype::f16}).code() == kv::errc::invalid_argument);
  std::vector<float> x(64, 1.0f);
  CHECK(q.validate(x.data(), x.size(), kv::dtype::f32));
  x[3] = 70000.0f;
  auto st = q.validate(x.data(), x.size(), kv::dtype::f32);
  CHECK(st.code() == kv::errc::invalid_argument);
  CHECK(st.message().find("beyond") != std::string::npos);
  x[3] = -std::numeric_limits<float>::infinity();
  CHECK(q.validate(x.data(), x.size(), kv::dtype::f32).message().find("infinite") != std::string::npos);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK(q.validate(x.data(), x.size(), kv::dtype::f32).message().find("NaN") != std::string::npos);
  x[3] = 65504.0f;
  CHECK(q.validate(x.data(), x.size(), kv::dtype::f32));
}

TEST_CASE("kivi at 2 bits: per-channel keys beat per-token keys on outlier channels", "[quant][kivi][attention]") {
  // One KV head, 4 query heads, 128 tokens, head_dim 128. Keys carry outlier channels of large,
  // consistent magnitude (KIVI Fig. 2: a few key channels are offset far from the rest, with a
  // spread like the others'); values are plain. Values are quantized per token in
  // both variants: only the key format differs.
  const std::uint32_t T = 128, D = 128, QH = 4;
  std::mt19937 rng(42);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> channel_scale(D, 1.0f), channel_bias(D, 0.0f);
  for (std::uint32_t c = 0; c < D; c += 16) {
    channel_scale[c] = 1.5f;
    channel_bias[c] = 20.0f;
  }
  std::vector<float> K(std::size_t{T} * D), V(K.size()), Q(std::size_t{QH} * D);
  for (std::size_t i = 0; i < K.size(); ++i) {
    K[i] = n(rng) * channel_scale[i % D] + channel_bias[i % D];
    V[i] = n(rng);
  }
  for (auto& q : Q) q = n(rng) * 0.5f;
  std::vector<std::int32_t> pos(T);
  for (std::uint32_t t = 0; t < T; ++t) pos[t] = static_cast<std::int32_t>(t);

  auto attend = [&](std::vector<float>& keys, std::vector<float>& vals) {
    kv::layer_view v;
    v.k = reinterpret_cast<std::byte*>(keys.data());
    v.v = reinterpret_cast<std::byte*>(vals.data());
    v.slot_stride = v.head_stride = v.row_bytes = D * sizeof(float);
    v.type = kv::dtype::f32;
    v.kv_heads = 1;
    v.head_dim = D;
    v.rows = T;
    v.positions = pos.data();
    std::vector<float> out(std::size_t{QH} * D);
    REQUIRE(kv::reference::attention(v, QH, Q.data(), 1, nullptr, out.data()));
    return out;
  };
  auto rel_error = [](const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      num += (a[i] - b[i]) * double(a[i] - b[i]);
      den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
  };

  const kv::geometry g{1, 1, QH, D, kv::dtype::f32};
  kv::kivi_per_token<2, 32> per_token;
  std::vector<std::byte> codes(T * per_token.code_bytes(g)), meta(T * per_token.scale_bytes(g));
  std::vector<float> Vq(V.size()), Kt(K.size()), Kc(K.size());
  per_token.encode(V.data(), T, g, codes.data(), meta.data());
  per_token.decode(codes.data(), meta.data(), T, g, Vq.data());
  per_token.encode(K.data(), T, g, codes.data(), meta.data());
  per_token.decode(codes.data(), meta.data(), T, g, Kt.data());
  std::vector<std::byte> kcodes(T * D * 2 / 8), kmeta(4 * D);
  for (std::uint32_t t0 = 0; t0 < T; t0 += 32) {  // groups of 32 tokens, per channel
    kv::kivi_encode_channels<2>(K.data() + t0 * D, 32, D, kcodes.data() + t0 * D / 4, D / 4, kmeta.data());
    kv::kivi_decode_channels<2>(kcodes.data() + t0 * D / 4, D / 4, 32, D, kmeta.data(), Kc.data() + t0 * D);
  }
  const auto exact = attend(K, V);
  const double e_token = rel_error(attend(Kt, Vq), exact);
  const double e_channel = rel_error(attend(Kc, Vq), exact);
  INFO("relative attention-output error at 2 bits: per-token keys " << e_token << ", per-channel keys " << e_channel);
  CHECK(e_channel < e_token * 0.75);

  // and on keys without outliers both are in the same range (sanity: no format is broken)
  for (std::size_t i = 0; i < K.size(); ++i) K[i] = n(rng);
  per_token.encode(K.data(), T, g, codes.data(), meta.data());
  per_token.decode(codes.data(), meta.data(), T, g, Kt.data());
  for (std::uint32_t t0 = 0; t0 < T; t0 += 32) {
    kv::kivi_encode_channels<2>(K.data() + t0 * D, 32, D, kcodes.data() + t0 * D / 4, D / 4, kmeta.data());
    kv::kivi_decode_channels<2>(kcodes.data() + t0 * D / 4, D / 4, 32, D, kmeta.data(), Kc.data() + t0 * D);
  }
  const auto exact2 = attend(K, V);
  CHECK(rel_error(attend(Kt, Vq), exact2) < 0.5);
  CHECK(rel_error(attend(Kc, Vq), exact2) < 0.5);
}

namespace {
// The batched kivi_per_token encode/decode against kivi_encode_group/kivi_decode_group per group.
template <unsigned Bits, unsigned Group>
void check_per_token_equals_groups(kv::dtype t, unsigned seed) {
  using Q = kv::kivi_per_token<Bits, Group>;
  const std::size_t D = 2 * Group > 64 ? 2 * Group : 64, G = D / Group, rows = 21, N = rows * D;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> x(N);
  for (std::size_t i = 0; i < N; ++i) x[i] = n(rng) * ((i / Group) % 3 == 0 ? 50.0f : 1.0f);
  for (std::size_t j = 0; j < Group; ++j) x[Group + j] = -0.0f;  // a constant group (-0: zero16 0x8000)
  for (std::size_t j = 0; j < Group; ++j) x[2 * Group + j] = j % 2 ? 0.0f : -0.0f;
  std::vector<std::uint16_t> h(N);
  std::vector<float> w(x);
  if (t != kv::dtype::f32)
    for (std::size_t i = 0; i < N; ++i) {
      h[i] = t == kv::dtype::f16 ? kv::float_to_half(x[i]) : kv::float_to_bf16(x[i]);
      w[i] = kv::load_as_float(h.data(), i, t);
    }
  const void* src = t == kv::dtype::f32 ? static_cast<const void*>(x.data()) : h.data();
  const kv::geometry g{1, 1, 1, static_cast<std::uint32_t>(D), t};
  Q q;
  std::vector<std::byte> codes(rows * q.code_bytes(g)), meta(rows * q.scale_bytes(g));
  q.encode(src, rows, g, codes.data(), meta.data());
  std::vector<float> y(N), yr(N);
  q.decode(codes.data(), meta.data(), rows, g, y.data());
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t i = 0; i < G; ++i) {
      std::byte c[256];
      std::uint16_t s16, z16, s, z;
      kv::kivi_encode_group<Bits>(w.data() + (r * G + i) * Group, Group, c, s16, z16);
      std::memcpy(&s, meta.data() + r * G * 4 + 2 * i, 2);
      std::memcpy(&z, meta.data() + r * G * 4 + 2 * (G + i), 2);
      INFO("bits " << Bits << " group " << Group << " dtype " << kv::to_string(t) << " row " << r << " group " << i);
      REQUIRE(s == s16);
      REQUIRE(z == z16);
      REQUIRE(std::memcmp(c, codes.data() + (r * G + i) * Q::group_bytes, Q::group_bytes) == 0);
      kv::kivi_decode_group<Bits>(c, Group, s16, z16, yr.data() + (r * G + i) * Group);
    }
  CHECK(std::memcmp(y.data(), yr.data(), N * 4) == 0);
}
}  // namespace

TEST_CASE("kivi per token: the batched encode and decode equal the per-group functions", "[quant][kivi]") {
  for (kv::dtype t : {kv::dtype::f32, kv::dtype::f16, kv::dtype::bf16}) {
    check_per_token_equals_groups<2, 32>(t, 51);
    check_per_token_equals_groups<3, 32>(t, 52);
    check_per_token_equals_groups<4, 32>(t, 53);
    check_per_token_equals_groups<8, 32>(t, 54);
    check_per_token_equals_groups<2, 8>(t, 55);
    check_per_token_equals_groups<4, 16>(t, 56);
    check_per_token_equals_groups<2, 128>(t, 57);
    check_per_token_equals_groups<4, 256>(t, 58);
    check_per_token_equals_groups<5, 64>(t, 59);
  }
}
