// SPDX-License-Identifier: Apache-2.0
//! @file
//! Every quantizer composed with the cache object: append (prefill, decode, odd lengths), views
//! carrying the scales, reference attention over the quantized view against attention over the
//! same live tokens at full precision; with slot reuse (sink_window, heavy_hitter), head-major
//! layout, fork; NaN/Inf refused with the cache unchanged; wrong shapes refused.
#include <kvcache/cache.hpp>
#include <kvcache/evict/heavy_hitter.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/memory/host_vmm.hpp>
#include <kvcache/quant/dense.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>
#include <kvcache/reference/attention.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "support.hpp"

namespace kv = kvcache;

namespace {

constexpr std::uint32_t kLayers = 2, kHeads = 2, kQHeads = 4, kDim = 64;

kv::geometry geo() { return {kLayers, kHeads, kQHeads, kDim, kv::dtype::f16}; }

//! All K/V appended to one layer, by position: fp16 as given, and its exact fp32 value.
struct history {
  std::vector<std::uint16_t> k16, v16;
  std::vector<float> k, v;  // [position][head][dim]
  std::mt19937 rng{99};

  //! n new tokens; keys have outlier channels (per-channel offsets), values are plain.
  std::pair<kv::kv_tensor, kv::kv_tensor> make(std::uint32_t n) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const std::size_t at = k16.size(), add = std::size_t{n} * kHeads * kDim;
    for (std::size_t i = 0; i < add; ++i) {
      const std::size_t c = i % kDim;
      const float kx = nd(rng) + (c % 16 == 3 ? 6.0f : 0.0f), vx = nd(rng);
      k16.push_back(kv::float_to_half(kx));
      v16.push_back(kv::float_to_half(vx));
      k.push_back(kv::half_to_float(k16.back()));
      v.push_back(kv::half_to_float(v16.back()));
    }
    kv::kv_tensor kt{k16.data() + at, kv::dtype::f16, n, kHeads, kDim};
    kv::kv_tensor vt{v16.data() + at, kv::dtype::f16, n, kHeads, kDim};
    return {kt, vt};
  }
};

//! Attention output of one query per query head over the quantized view, and over a dense fp32
//! view holding the same live tokens (by position) at full precision; relative L2 error.
template <class Q>
double attention_error(const kv::layer_view& qv, const Q& quant, const history& hist,
                       std::vector<float>* probs = nullptr) {
  const std::size_t rows = qv.rows;
  std::vector<float> K(rows * kHeads * kDim, 0.0f), V(K.size(), 0.0f);
  std::vector<std::int32_t> pos(rows * kHeads);
  for (std::uint32_t s = 0; s < qv.rows; ++s)
    for (std::uint32_t h = 0; h < kHeads; ++h) {
      const std::int32_t p = qv.position(s, h);
      pos[s * kHeads + h] = p;
      if (p < 0) continue;
      for (std::uint32_t d = 0; d < kDim; ++d) {
        K[(s * kHeads + h) * kDim + d] = hist.k[(std::size_t{static_cast<std::uint32_t>(p)} * kHeads + h) * kDim + d];
        V[(s * kHeads + h) * kDim + d] = hist.v[(std::size_t{static_cast<std::uint32_t>(p)} * kHeads + h) * kDim + d];
      }
    }
  kv::layer_view dv;
  dv.k = reinterpret_cast<std::byte*>(K.data());
  dv.v = reinterpret_cast<std::byte*>(V.data());
  dv.slot_stride = kHeads * kDim * sizeof(float);
  dv.head_stride = dv.row_bytes = kDim * sizeof(float);
  dv.type = kv::dtype::f32;
  dv.kv_heads = kHeads;
  dv.head_dim = kDim;
  dv.rows = qv.rows;
  dv.positions = pos.data();
  std::vector<float> q(kQHeads * kDim);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  for (auto& x : q) x = nd(rng);
  std::vector<float> out_q(q.size()), out_d(q.size());
  REQUIRE(kv::reference::attention(qv, kQHeads, q.data(), 1, nullptr, out_q.data(), probs ? probs->data() : nullptr, quant));
  REQUIRE(kv::reference::attention(dv, kQHeads, q.data(), 1, nullptr, out_d.data()));
  double num = 0, den = 0;
  for (std::size_t i = 0; i < q.size(); ++i) {
    num += (out_q[i] - out_d[i]) * double(out_q[i] - out_d[i]);
    den += double(out_d[i]) * out_d[i];
  }
  return std::sqrt(num / den);
}

kv::host_vmm small_vmm() { return kv::host_vmm(kv::host_vmm_config{64 * 1024, 256, true}); }

template <class Q>
double tolerance();
template <> double tolerance<kv::passthrough>() { return 1e-6; }
template <> double tolerance<kv::fp8_e4m3>() { return 0.06; }
template <> double tolerance<kv::q8_0>() { return 0.015; }
template <> double tolerance<kv::q4_0>() { return 0.2; }
template <> double tolerance<kv::kivi_per_token<8>>() { return 0.01; }
template <> double tolerance<kv::kivi_per_token<4>>() { return 0.2; }
template <> double tolerance<kv::kivi_per_token<3, 16>>() { return 0.3; }
template <> double tolerance<kv::kivi_per_token<2>>() { return 0.8; }

}  // namespace

TEMPLATE_TEST_CASE("quantized cache: append, view, reference attention within the format's error",
                   "[quant][cache]", kv::passthrough, kv::fp8_e4m3, kv::q8_0, kv::q4_0,
                   kv::kivi_per_token<8>, kv::kivi_per_token<4>, (kv::kivi_per_token<3, 16>),
                   kv::kivi_per_token<2>) {
  const kv::layout order = GENERATE(kv::layout::token_major, kv::layout::head_major);
  kv::cache<kv::host_vmm, kv::keep_all, TestType> c({geo(), 128, 0, order}, small_vmm());
  auto s = c.open().value();
  history h0, h1;
  h1.rng.seed(100);
  for (std::uint32_t n : {37u, 1u, 1u, 5u, 1u, 19u}) {  // prefill then decode, odd lengths
    auto [k0, v0] = h0.make(n);
    REQUIRE(c.append(s, 0, k0, v0));
    auto [k1, v1] = h1.make(n);
    REQUIRE(c.append(s, 1, k1, v1));
  }
  for (std::uint32_t layer : {0u, 1u}) {
    const auto v = c.view(s, layer).value();
    REQUIRE(v.rows == 64);
    CHECK(std::string(v.format) == TestType::name());
    CHECK(v.bits == kv::quant_bits<TestType>());
    CHECK(v.row_bytes == c.quant().code_bytes(geo()));
    if (c.quant().scale_bytes(geo()) > 0) {
      CHECK(v.k_scales != nullptr);
      CHECK(v.scale_bytes == c.quant().scale_bytes(geo()));
    }
    const double err = attention_error(v, c.quant(), layer ? h1 : h0);
    INFO(TestType::name() << " layer " << layer << " " << kv::to_string(order) << ": relative attention error " << err);
    CHECK(err <= tolerance<TestType>());
  }
  // bytes per token: codes + out-of-band metadata of K and V, all heads, one layer
  const auto st = c.stats();
  CHECK(st.bytes_live == st.entries_live * 2 * (c.quant().code_bytes(geo()) + c.quant().scale_bytes(geo())));
  if (order == kv::layout::token_major) CHECK(st.bytes_backed >= st.bytes_live);
}

TEMPLATE_TEST_CASE("quantized cache: slot reuse with sink_window and heavy_hitter, fork",
                   "[quant][cache][evict]", kv::fp8_e4m3, kv::q8_0, kv::q4_0, kv::kivi_per_token<4>,
                   kv::kivi_per_token<2>) {
  SECTION("sink_window: the window slides through reused slots") {
    kv::cache<kv::host_vmm, kv::sink_window, TestType> c({geo(), 40, 32}, small_vmm(), kv::sink_window(4));
    auto s = c.open().value();
    history h;
    auto [k, v] = h.make(30);
    REQUIRE(c.append(s, 0, k, v));
    for (int step = 0; step < 45; ++step) {
      REQUIRE(c.evict(s, 0, 1));
      auto [kt, vt] = h.make(1);
      REQUIRE(c.append(s, 0, kt, vt));
    }
    const auto view = c.view(s, 0).value();
    CHECK(view.rows <= 40);
    CHECK(view.next_position == 75);
    const double err = attention_error(view, c.quant(), h);
    INFO(TestType::name() << " sink_window: relative attention error " << err);
    CHECK(err <= tolerance<TestType>());

    auto f = c.fork(s).value();  // the fork sees the same codes and scales
    const auto fv = c.view(f, 0).value();
    CHECK(attention_error(fv, c.quant(), h) == err);
  }
  SECTION("heavy_hitter: per-head victims, holes refilled one row at a time") {
    using hh = kv::heavy_hitter<>;
    kv::cache<kv::host_vmm, hh, TestType> c({geo(), 24, 16}, small_vmm(),
                                           hh(kv::heavy_hitter_config{0.1f, 0.1f, 8, 8}));
    auto s = c.open().value();
    history h;
    std::vector<float> probs;
    auto step = [&](std::uint32_t n) {
      auto [kt, vt] = h.make(n);
      REQUIRE(c.append(s, 0, kt, vt));
      const auto view = c.view(s, 0).value();
      probs.assign(std::size_t{kQHeads} * view.rows, 0.0f);
      const double err = attention_error(view, c.quant(), h, &probs);
      REQUIRE(c.observe(s, 0, kv::attention_signal{probs.data(), kQHeads, 1, view.rows}));
      REQUIRE(c.evict(s, 0));
      return err;
    };
    step(20);
    double worst = 0;
    for (int i = 0; i < 30; ++i) worst = std::max(worst, step(1));
    const auto view = c.view(s, 0).value();
    CHECK(view.next_position == 50);
    bool heads_differ = false;  // H2O keeps a different set per head: the rows path is not taken
    for (std::uint32_t sl = 0; sl < view.rows; ++sl) heads_differ |= view.position(sl, 0) != view.position(sl, 1);
    CHECK(heads_differ);
    INFO(TestType::name() << " heavy_hitter: worst relative attention error " << worst);
    CHECK(worst <= tolerance<TestType>());
  }
}

TEST_CASE("quantized cache: fp8 scales per layer and per head reach the view", "[quant][cache][fp8]") {
  kv::cache<kv::heap_memory, kv::keep_all, kv::fp8_e4m3> given(
      {geo(), 16}, kv::heap_memory{}, kv::keep_all{},
      kv::fp8_e4m3(kv::scale_granularity::per_layer, {0.5f, 0.25f}, {1.0f, 2.0f}));
  auto s = given.open().value();
  history h;
  auto [k, v] = h.make(3);
  REQUIRE(given.append(s, 1, k, v));
  auto view = given.view(s, 1).value();
  float ks = 0, vs = 0;
  std::memcpy(&ks, view.k_scale(2, 1), 4);
  std::memcpy(&vs, view.v_scale(0, 0), 4);
  CHECK(ks == 0.25f);
  CHECK(vs == 2.0f);
  CHECK(view.scale_slot_stride == 0);
  CHECK(view.scale_head_stride == 0);
  CHECK(static_cast<std::uint8_t>(view.k_row(1, 1)[5]) == kv::float_to_e4m3(h.k[(1 * kHeads + 1) * kDim + 5] / 0.25f));

  kv::cache<kv::heap_memory, kv::keep_all, kv::fp8_e4m3> per_head(
      {geo(), 16}, kv::heap_memory{}, kv::keep_all{}, kv::fp8_e4m3(kv::scale_granularity::per_head));
  auto s2 = per_head.open().value();
  REQUIRE(per_head.append(s2, 0, k, v));
  view = per_head.view(s2, 0).value();
  CHECK(view.scale_head_stride == sizeof(float));
  float h0 = 0, h1 = 0;
  std::memcpy(&h0, view.k_scale(0, 0), 4);
  std::memcpy(&h1, view.k_scale(0, 1), 4);
  CHECK(h0 == per_head.quant().scale(0, kv::kv_part::k, 0));
  CHECK(h1 == per_head.quant().scale(0, kv::kv_part::k, 1));
  CHECK(h0 > 0.0f);
  CHECK(h0 != h1);
}

TEMPLATE_TEST_CASE("quantized cache: NaN/Inf refused at append, cache unchanged; bad shapes refused",
                   "[quant][cache]", kv::fp8_e4m3, kv::q8_0, kv::q4_0, kv::kivi_per_token<2>) {
  kv::cache<kv::host_vmm, kv::keep_all, TestType> c({geo(), 64}, small_vmm());
  auto s = c.open().value();
  history h;
  auto [k, v] = h.make(4);
  REQUIRE(c.append(s, 0, k, v));
  const auto before = c.stats();
  for (std::uint16_t bad : {std::uint16_t{0x7e00}, std::uint16_t{0x7c00}, std::uint16_t{0xfc00}}) {
    auto [k2, v2] = h.make(3);
    h.v16[h.v16.size() - 7] = bad;  // a NaN / +Inf / -Inf in V
    auto st = c.append(s, 0, k2, v2);
    CHECK(st.code() == kv::errc::invalid_argument);
    CHECK(st.message().find("append: v of layer 0") != std::string::npos);
    CHECK(kvtest::stats_diff(before.memory, c.stats().memory).empty());
    CHECK(c.view(s, 0).value().rows == 4);
    CHECK(c.view(s, 0).value().next_position == 4);
  }
  // head_dim that the format cannot block: the constructor raises
  const kv::geometry odd{1, 1, 1, 40, kv::dtype::f16};
  const auto code = kvtest::thrown_code([&] { kv::cache<kv::heap_memory, kv::keep_all, TestType> bad({odd, 8}); });
  if (std::string(TestType::name()) == "fp8_e4m3") CHECK(!code.has_value());
  else CHECK(code == kv::errc::invalid_argument);
}

TEST_CASE("dequantize_dense: the dense helper matches decode and checks the format", "[quant][cache]") {
  kv::cache<kv::host_vmm, kv::keep_all, kv::kivi_per_token<4>> c({geo(), 32}, small_vmm());
  auto s = c.open().value();
  history h;
  auto [k, v] = h.make(9);
  REQUIRE(c.append(s, 1, k, v));
  const auto view = c.view(s, 1).value();
  std::vector<float> K(std::size_t{view.rows} * kHeads * kDim), V(K.size()), K2, V2;
  REQUIRE(kv::dequantize_dense(view, c.quant(), K.data(), V.data()));
  kv::reference::dequantize(view, K2, V2, c.quant());
  CHECK(K == K2);
  CHECK(V == V2);
  for (std::size_t i = 0; i < K.size(); ++i) REQUIRE(std::fabs(K[i] - h.k[i]) < 0.7f);  // 4-bit
  CHECK(kv::dequantize_dense(view, kv::q4_0{}, K.data(), nullptr).code() == kv::errc::shape_mismatch);
}

TEST_CASE("quantized cache: batch views carry each sequence's scales", "[quant][cache]") {
  kv::cache<kv::host_vmm, kv::keep_all, kv::kivi_per_token<2>> c({geo(), 32}, small_vmm());
  auto a = c.open().value();
  auto b = c.open().value();
  history h;
  auto [k, v] = h.make(5);
  REQUIRE(c.append(a, 0, k, v));
  REQUIRE(c.append(b, 0, k, v));
  const kv::seq_id ids[2] = {a, b};
  const auto bv = c.batch(ids, 0).value();
  REQUIRE(bv.k_scales.size() == 2);
  CHECK(bv.k_scales[0] == c.view(a, 0).value().k_scales);
  CHECK(bv.v_scales[1] == c.view(b, 0).value().v_scales);
  CHECK(bv.scale_bytes == c.quant().scale_bytes(geo()));
  CHECK(bv.scale_slot_stride == kHeads * bv.scale_bytes);
  CHECK(std::string(bv.format) == "kivi_per_token");
  CHECK(bv.bits == 2);
  CHECK(bv.group == 32);
}

// ---- KIVI: keys per channel with a residual window, in the cache ----------------------------

TEMPLATE_TEST_CASE("kivi in the cache: residual window transitions, odd lengths, group requantization on slot reuse",
                   "[quant][cache][kivi]", (kv::kivi<2, 32, 32>), (kv::kivi<4, 32, 64>), (kv::kivi<3, 16, 32>)) {
  using Q = TestType;
  constexpr std::uint32_t R = Q::residual;
  SECTION("keep_all: keys stay at full precision until a window fills") {
    kv::cache<kv::host_vmm, kv::keep_all, Q> c({geo(), 160}, small_vmm());
    auto s = c.open().value();
    history h;
    std::uint32_t total = 0;
    for (std::uint32_t n : {R - 1, 1u, 3u, R + 5, 1u, 1u, 17u}) {  // odd lengths across windows
      auto [k, v] = h.make(n);
      REQUIRE(c.append(s, 0, k, v));
      total += n;
      const auto view = c.view(s, 0).value();
      REQUIRE(view.k_residual != nullptr);
      for (std::uint32_t hd = 0; hd < kHeads; ++hd) CHECK(view.k_quantized[hd] == total / R * R);
      // a key in the window is bit-exact; one below it within its group's scale/2
      std::vector<float> key(kDim);
      for (std::uint32_t sl = 0; sl < view.rows; ++sl)
        for (std::uint32_t hd = 0; hd < kHeads; ++hd) {
          kv::decode_key(view, c.quant(), sl, hd, key.data());
          const float* truth = &h.k[(std::size_t{sl} * kHeads + hd) * kDim];
          if (view.k_in_residual(sl, hd)) {
            for (std::uint32_t d = 0; d < kDim; ++d) REQUIRE(key[d] == truth[d]);
          } else {
            const std::byte* meta = view.k_group_meta(sl / Q::group, hd);
            for (std::uint32_t d = 0; d < kDim; ++d) {
              std::uint16_t s16;
              std::memcpy(&s16, meta + 2 * d, 2);
              REQUIRE(std::fabs(key[d] - truth[d]) <= kv::half_to_float(s16) / 2 * 1.0001f + 1e-6f);
            }
          }
        }
    }
    const double err = attention_error(c.view(s, 0).value(), c.quant(), h);
    INFO("kivi keep_all: relative attention error " << err);
    CHECK(err < (Q::bits == 2 ? 0.5 : 0.2));
  }
  SECTION("heavy_hitter: evicted slots of quantized groups are refilled (requantized)") {
    using hh = kv::heavy_hitter<>;
    kv::cache<kv::host_vmm, hh, Q> c({geo(), R + 8, R}, small_vmm(),
                                     hh(kv::heavy_hitter_config{0.1f, 0.1f, R / 2, R / 2}));
    auto s = c.open().value();
    history h;
    std::vector<float> probs;
    double worst = 0;
    auto step = [&](std::uint32_t n) {
      auto [kt, vt] = h.make(n);
      REQUIRE(c.append(s, 0, kt, vt));
      const auto view = c.view(s, 0).value();
      probs.assign(std::size_t{kQHeads} * view.rows, 0.0f);
      worst = std::max(worst, attention_error(view, c.quant(), h, &probs));
      REQUIRE(c.observe(s, 0, kv::attention_signal{probs.data(), kQHeads, 1, view.rows}));
      REQUIRE(c.evict(s, 0));
    };
    step(R + 3);
    for (int i = 0; i < 40; ++i) step(1);
    const auto view = c.view(s, 0).value();
    CHECK(view.next_position == R + 43);
    CHECK(view.k_quantized[0] >= R);  // the first window was quantized, then slots in it reused
    INFO("kivi heavy_hitter: worst relative attention error " << worst);
    CHECK(worst < (Q::bits == 2 ? 0.6 : 0.25));
  }
  SECTION("sink_window + fork") {
    kv::cache<kv::host_vmm, kv::sink_window, Q> c({geo(), 2 * R + 4, 2 * R}, small_vmm(), kv::sink_window(4));
    auto s = c.open().value();
    history h;
    auto [k, v] = h.make(2 * R - 3);
    REQUIRE(c.append(s, 0, k, v));
    for (std::uint32_t i = 0; i < R + 9; ++i) {
      REQUIRE(c.evict(s, 0, 1));
      auto [kt, vt] = h.make(1);
      REQUIRE(c.append(s, 0, kt, vt));
    }
    const double err = attention_error(c.view(s, 0).value(), c.quant(), h);
    INFO("kivi sink_window: relative attention error " << err);
    CHECK(err < (Q::bits == 2 ? 0.5 : 0.2));
    auto f = c.fork(s).value();
    CHECK(attention_error(c.view(f, 0).value(), c.quant(), h) == err);
  }
}

TEST_CASE("kivi in the cache: per-channel keys beat per-token keys on outlier channels at 2 bits",
          "[quant][cache][kivi]") {
  // history's keys carry offset channels (every 16th channel +6): KIVI's observation.
  kv::cache<kv::host_vmm, kv::keep_all, kv::kivi<2, 32, 32>> ch({geo(), 160}, small_vmm());
  kv::cache<kv::host_vmm, kv::keep_all, kv::kivi_per_token<2, 32>> tok({geo(), 160}, small_vmm());
  auto a = ch.open().value();
  auto b = tok.open().value();
  history h;
  auto [k, v] = h.make(128);  // four whole windows: every key quantized
  REQUIRE(ch.append(a, 0, k, v));
  REQUIRE(tok.append(b, 0, k, v));
  CHECK(ch.view(a, 0).value().k_quantized[0] == 128);
  const double e_channel = attention_error(ch.view(a, 0).value(), ch.quant(), h);
  const double e_token = attention_error(tok.view(b, 0).value(), tok.quant(), h);
  INFO("per-channel keys " << e_channel << ", per-token keys " << e_token);
  CHECK(e_channel < e_token);
}

TEST_CASE("kivi in the cache: head_major is refused", "[quant][cache][kivi]") {
  const auto code = kvtest::thrown_code([] {
    kv::cache<kv::heap_memory, kv::keep_all, kv::kivi<2, 32, 32>> c({geo(), 64, 0, kv::layout::head_major});
  });
  CHECK(code == kv::errc::invalid_argument);
}
