// SPDX-License-Identifier: Apache-2.0
//! @file
//! Device quantization (cuda/quant.cuh) against the host formats, bit for bit: encode bytes
//! (codes and KIVI metadata), decode values, device dequantize_dense, and caches on cuda_vmm with
//! the device quantizers against host caches fed the same appends.
//!
//! NaN policy: the kernels are fed finite input only (the quantizers' validate rejects NaN/Inf
//! before anything is encoded; tested below). The fp8 decode of every code, NaN codes included,
//! is compared with NaN == NaN (the device's NaN bit pattern is canonical, the host's is not).
//!
//! Catch2 test cases, joined to kvcache_cuda_tests; main() is tests/cuda/main.cpp, which skips
//! everything without a device.

#if defined(__NVCC__)
#  pragma nv_diag_suppress 2810
#endif

#include <kvcache/cache.hpp>
#include <kvcache/core/chunk.hpp>
#include <kvcache/cuda/cuda_vmm.cuh>
#include <kvcache/cuda/quant.cuh>
#include <kvcache/evict/keep_all.hpp>
#include <kvcache/evict/sink_window.hpp>
#include <kvcache/memory/heap.hpp>
#include <kvcache/quant/dense.hpp>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"

namespace kv = kvcache;
namespace gpu = kvcache::gpu;
using kv::dtype;

namespace {

using bytes = std::vector<std::byte>;

// ---- device buffers --------------------------------------------------------------------------

struct dbuf {
  std::byte* p = nullptr;
  std::size_t n = 0;
  explicit dbuf(std::size_t size) : n(size) {
    REQUIRE(cudaMalloc(&p, size ? size : 1) == cudaSuccess);
    REQUIRE(cudaMemset(p, 0xcd, size ? size : 1) == cudaSuccess);
  }
  explicit dbuf(const bytes& h) : dbuf(h.size()) {
    REQUIRE(cudaMemcpy(p, h.data(), n, cudaMemcpyHostToDevice) == cudaSuccess);
  }
  dbuf(const dbuf&) = delete;
  dbuf& operator=(const dbuf&) = delete;
  ~dbuf() { (void)cudaFree(p); }
  [[nodiscard]] bytes host() const {
    bytes h(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(h.data(), p, n, cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
};

void ok(const kv::status& st) {
  INFO(st.message());
  REQUIRE(st.ok());
}

// ---- inputs: random rows and edge blocks (finite) -------------------------------------------

void put(bytes& b, std::size_t i, dtype t, float f) {
  kv::store_from_float(b.data(), i, t, f);
}

//! `n` elements of type t; edge: every 32-value block follows one of several hard patterns.
bytes make_input(dtype t, std::size_t n, unsigned seed, bool edge, float limit = 60000.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  bytes b(n * kv::size_of(t));
  for (std::size_t i = 0; i < n; ++i) put(b, i, t, nd(rng) * (i % 7 == 0 ? 20.0f : 1.0f));
  if (!edge) return b;
  for (std::size_t blk = 0; blk * 32 < n; ++blk) {
    const std::size_t at = blk * 32;
    const std::size_t m = n - at < 32 ? n - at : 32;
    for (std::size_t j = 0; j < m; ++j) {
      float x = 0.0f;
      switch (blk % 10) {
        case 0: x = 0.0f; break;                                      // all zero
        case 1: x = -0.0f; break;                                     // all -0
        case 2: x = 3.25f; break;                                     // constant
        case 3: x = j == 0 ? 127.0f : static_cast<float>(j) - 16.5f; break;  // q8_0 ties (id = 1)
        case 4: x = j == 5 ? 7.0f : (j == 20 ? -7.0f : 0.5f); break;         // q4_0: first of equal |max|
        case 5: x = (j % 2 ? -1.0f : 1.0f) * 1e-6f * static_cast<float>(j + 1); break;  // tiny
        case 6: x = (j % 3 ? 1.0f : -1.0f) * limit * static_cast<float>(j + 1) / 32.0f; break;  // large
        case 7: x = j == 31 ? -limit : 1.0f; break;                          // negative max last
        case 8: x = static_cast<float>(j % 4) * 0.25f - 0.375f; break;       // KIVI ties at .5
        default: x = nd(rng) * 1000.0f; break;
      }
      put(b, at + j, t, x);
    }
  }
  return b;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
std::size_t first_diff(const bytes& a, const bytes& b) {
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (a[i] != b[i]) return i;
  return a.size() == b.size() ? a.size() : std::min(a.size(), b.size());
}
#define CHECK_BYTES(a, b)                                           \
  do {                                                              \
    INFO("first difference at byte " << first_diff((a), (b)));       \
    CHECK((a) == (b));                                              \
  } while (0)

//! Device dense output (f32, f16, bf16) checked against the host's fp32 values.
void check_dense(const dbuf& d, dtype out, const std::vector<float>& want) {
  const bytes got = d.host();
  if (out == dtype::f32) {
    REQUIRE(got.size() >= want.size() * 4);
    std::vector<float> f(want.size());
    std::memcpy(f.data(), got.data(), f.size() * 4);
    CHECK(same_bits(f, want));
    return;
  }
  bytes exp(want.size() * 2);
  for (std::size_t i = 0; i < want.size(); ++i) put(exp, i, out, want[i]);
  bytes g(got.begin(), got.begin() + static_cast<std::ptrdiff_t>(exp.size()));
  CHECK_BYTES(g, exp);
}

constexpr dtype kTypes[] = {dtype::f32, dtype::f16, dtype::bf16};
constexpr dtype kOuts[] = {dtype::f32, dtype::f16, dtype::bf16};

// ---- kernels vs host: q8_0, q4_0 ------------------------------------------------------------

template <class Host>
void ggml_case(dtype t, std::uint32_t D, std::size_t rows, bool edge, unsigned seed) {
  const kv::geometry g{1, 1, 1, D, t};
  const Host host{};
  const bytes in = make_input(t, rows * D, seed, edge);
  bytes want(rows * host.code_bytes(g));
  host.encode(in.data(), rows, g, want.data(), nullptr);

  dbuf din(in), dcodes(want.size());
  ok(gpu::encode_ggml<Host>(din.p, t, rows, D, dcodes.p));
  CHECK_BYTES(dcodes.host(), want);

  std::vector<float> dec(rows * D);
  host.decode(want.data(), nullptr, rows, g, dec.data());
  dbuf codes(want);
  for (dtype out : kOuts) {
    dbuf dd(rows * D * kv::size_of(out));
    ok(gpu::decode_ggml<Host>(codes.p, rows, D, dd.p, out));
    check_dense(dd, out, dec);
  }
}

TEST_CASE("gpu quant: q8_0 and q4_0 kernels write the host's bytes and decode to its values",
          "[cuda][quant]") {
  unsigned seed = 1;
  for (dtype t : kTypes)
    for (std::uint32_t D : {32u, 64u, 128u, 256u})
      for (bool edge : {false, true}) {
        INFO("type " << kv::to_string(t) << " head_dim " << D << (edge ? " edge" : " random"));
        ggml_case<kv::q8_0>(t, D, 67, edge, seed++);
        ggml_case<kv::q4_0>(t, D, 67, edge, seed++);
      }
}

// ---- kernels vs host: kivi_per_token ---------------------------------------------------------

template <unsigned Bits, unsigned Group>
void kivi_case(dtype t, std::uint32_t D, std::size_t rows, bool edge, unsigned seed) {
  using Host = kv::kivi_per_token<Bits, Group>;
  const kv::geometry g{1, 1, 1, D, t};
  const Host host{};
  const bytes in = make_input(t, rows * D, seed, edge);
  bytes want(rows * host.code_bytes(g)), want_meta(rows * host.scale_bytes(g));
  host.encode(in.data(), rows, g, want.data(), want_meta.data());

  dbuf din(in), dcodes(want.size()), dmeta(want_meta.size());
  ok(gpu::encode_kivi_per_token<Bits, Group>(din.p, t, rows, D, dcodes.p, dmeta.p));
  CHECK_BYTES(dcodes.host(), want);
  CHECK_BYTES(dmeta.host(), want_meta);

  std::vector<float> dec(rows * D);
  host.decode(want.data(), want_meta.data(), rows, g, dec.data());
  dbuf codes(want), meta(want_meta);
  for (dtype out : kOuts) {
    dbuf dd(rows * D * kv::size_of(out));
    ok(gpu::decode_kivi_per_token<Bits, Group>(codes.p, meta.p, rows, D, dd.p, out));
    check_dense(dd, out, dec);
  }
}

TEST_CASE("gpu quant: kivi_per_token kernels write the host's codes and metadata",
          "[cuda][quant][kivi]") {
  unsigned seed = 100;
  for (dtype t : kTypes)
    for (bool edge : {false, true}) {
      INFO("type " << kv::to_string(t) << (edge ? " edge" : " random"));
      // warp path (groups of 32, 2/4/8 bits)
      kivi_case<2, 32>(t, 128, 41, edge, seed++);
      kivi_case<4, 32>(t, 128, 41, edge, seed++);
      kivi_case<8, 32>(t, 64, 41, edge, seed++);
      kivi_case<6, 32>(t, 64, 41, edge, seed++);
      kivi_case<4, 32>(t, 96, 41, edge, seed++);
      // thread-per-group path (the host's kivi_encode_group on the device)
      kivi_case<2, 64>(t, 128, 23, edge, seed++);
      kivi_case<3, 32>(t, 64, 23, edge, seed++);
      kivi_case<4, 128>(t, 128, 23, edge, seed++);
      kivi_case<5, 16>(t, 80, 23, edge, seed++);
    }
}

// ---- kernels vs host: fp8_e4m3 ---------------------------------------------------------------

TEST_CASE("gpu quant: fp8_e4m3 kernels write the host's bytes (per layer and per head scales)",
          "[cuda][quant][fp8]") {
  unsigned seed = 200;
  for (dtype t : kTypes)
    for (std::uint32_t D : {128u, 70u})  // 70: the one-value-per-thread path
      for (bool per_head : {false, true})
        for (bool edge : {false, true}) {
          INFO("type " << kv::to_string(t) << " head_dim " << D << (per_head ? " per head" : "")
                       << (edge ? " edge" : " random"));
          const std::uint32_t H = 3, first = 2;
          const std::size_t rows = 3 * 29 + 1;
          const kv::geometry g{2, H, H, D, t};
          std::vector<float> ks = {0.37f, 1.0f, 2.5f, 0.011f, 3.0f, 7.0f};  // [layers][H]
          std::vector<float> vs = {1.5f, 0.5f, 0.25f, 9.0f, 1.0f, 0.75f};
          if (!per_head) {
            ks.resize(2);
            vs.resize(2);
          }
          kv::fp8_e4m3 host(per_head ? kv::scale_granularity::per_head : kv::scale_granularity::per_layer,
                            ks, vs);
          ok(host.bind(g));
          const bytes in = make_input(t, rows * D, seed++, edge);  // beyond ±448·scale: saturates
          bytes want(rows * D);
          const kv::quant_context ctx{1, kv::kv_part::v, first};
          host.encode(in.data(), rows, g, want.data(), nullptr, ctx);

          const std::uint32_t sh = per_head ? H : 1;
          std::vector<float> layer_scales(vs.begin() + sh, vs.begin() + 2 * sh);  // layer 1, V
          bytes sb(layer_scales.size() * 4);
          std::memcpy(sb.data(), layer_scales.data(), sb.size());
          dbuf din(in), dcodes(want.size()), dscales(sb);
          ok(gpu::encode_fp8_e4m3(din.p, t, rows, D, dcodes.p,
                                  reinterpret_cast<const float*>(dscales.p), sh, H, first));
          CHECK_BYTES(dcodes.host(), want);

          // decode: one head's rows with that head's scale, as the host decode takes it
          const float s = layer_scales[0];
          std::vector<float> dec(rows * D);
          host.decode(want.data(), reinterpret_cast<const std::byte*>(&s), rows, g, dec.data());
          dbuf codes(want);
          for (dtype out : kOuts) {
            dbuf dd(rows * D * kv::size_of(out));
            ok(gpu::decode_fp8_e4m3(codes.p, rows, D, reinterpret_cast<const float*>(dscales.p), dd.p,
                                    out));
            check_dense(dd, out, dec);
          }
        }
}

TEST_CASE("gpu quant: fp8 decode of every code equals the host's (NaN as NaN)", "[cuda][quant][fp8]") {
  bytes codes(256);
  for (int c = 0; c < 256; ++c) codes[c] = static_cast<std::byte>(c);
  const kv::geometry g{1, 1, 1, 256, dtype::f32};
  for (float scale : {1.0f, 0.0078125f, 3.3f}) {
    std::vector<float> want(256);
    kv::fp8_e4m3{}.decode(codes.data(), reinterpret_cast<const std::byte*>(&scale), 1, g, want.data());
    bytes sb(4);
    std::memcpy(sb.data(), &scale, 4);
    dbuf dc(codes), ds(sb), dd(256 * 4);
    ok(gpu::decode_fp8_e4m3(dc.p, 1, 256, reinterpret_cast<const float*>(ds.p), dd.p));
    const bytes got = dd.host();
    for (int c = 0; c < 256; ++c) {
      float f;
      std::memcpy(&f, got.data() + 4 * c, 4);
      INFO("code " << c << " scale " << scale);
      if (std::isnan(want[c])) CHECK(std::isnan(f));
      else CHECK(std::memcmp(&f, &want[c], 4) == 0);
    }
  }
}

// ---- device quantizers: encode_chunks, validation -------------------------------------------

TEST_CASE("cuda_q8_0: encode_chunks (many chunks) and encode, host or device input, equal host encode",
          "[cuda][quant]") {
  const kv::geometry g{1, 2, 2, 64, dtype::f16};
  const std::size_t rows = 300, row = g.head_bytes(), code = kv::q8_0{}.code_bytes(g);
  const bytes k = make_input(g.type, rows * 64, 7, true), v = make_input(g.type, rows * 64, 8, false);
  // 150 chunks of 2 rows, scattered in reverse order (K and V: 300 jobs, several launches)
  std::vector<kv::row_chunk> chunks;
  for (std::size_t i = 0; i < rows / 2; ++i) chunks.push_back({(rows - 2 - 2 * i) * code, 2 * i, 2});
  bytes wk(rows * code), wv(rows * code);
  for (const auto& c : chunks) {
    kv::q8_0{}.encode(k.data() + c.src * row, c.rows, g, wk.data() + c.dst, nullptr);
    kv::q8_0{}.encode(v.data() + c.src * row, c.rows, g, wv.data() + c.dst, nullptr);
  }
  dbuf dk(k), dv(v);
  for (bool device_input : {true, false}) {
    INFO((device_input ? "device input" : "host input"));
    kv::cuda_q8_0 q;
    dbuf ck(wk.size()), cv(wv.size());
    q.encode_chunks(device_input ? static_cast<const void*>(dk.p) : k.data(),
                    device_input ? static_cast<const void*>(dv.p) : v.data(), chunks, g, ck.p, cv.p);
    CHECK_BYTES(ck.host(), wk);
    CHECK_BYTES(cv.host(), wv);
    // the quantizer's decode (host output) reads the codes back
    std::vector<float> a(rows * 64), b(rows * 64);
    q.decode(ck.p, nullptr, rows, g, a.data());
    kv::q8_0{}.decode(wk.data(), nullptr, rows, g, b.data());
    CHECK(same_bits(a, b));
    // per-chunk encode (the quantizer interface) writes the same bytes
    dbuf pk(wk.size());
    for (const auto& c : chunks)
      q.encode(device_input ? static_cast<const void*>(dk.p + c.src * row) : k.data() + c.src * row,
               c.rows, g, pk.p + c.dst, nullptr);
    CHECK_BYTES(pk.host(), wk);
  }
}

TEST_CASE("device quantizers: validate rejects NaN/Inf (and KIVI's |x| > 65504), host or device",
          "[cuda][quant]") {
  const std::size_t n = 4096;
  bytes good = make_input(dtype::f16, n, 3, false);
  bytes nan = good, inf = good, big = make_input(dtype::f32, n, 3, false);
  put(nan, 1234, dtype::f16, std::nanf(""));
  put(inf, n - 1, dtype::f16, -INFINITY);
  put(big, 77, dtype::f32, 70000.0f);
  dbuf dgood(good), dnan(nan), dinf(inf), dbig(big);
  const kv::cuda_q8_0 q;
  const kv::cuda_kivi_per_token<4> kq;
  const kv::cuda_fp8_e4m3 fq;
  CHECK(q.validate(dgood.p, n, dtype::f16).ok());
  CHECK(q.validate(good.data(), n, dtype::f16).ok());
  for (const void* p : {static_cast<const void*>(dnan.p), static_cast<const void*>(nan.data())}) {
    const auto st = q.validate(p, n, dtype::f16);
    CHECK(st.code() == kv::errc::invalid_argument);
    CHECK(st.message().find("element 1234") != std::string::npos);
  }
  CHECK(fq.validate(dinf.p, n, dtype::f16).code() == kv::errc::invalid_argument);
  CHECK(kq.validate(dinf.p, n, dtype::f16).code() == kv::errc::invalid_argument);
  CHECK(kq.validate(dbig.p, n, dtype::f32).code() == kv::errc::invalid_argument);
  CHECK(q.validate(dbig.p, n, dtype::f32).ok());  // q8_0 has no fp16-range limit on x
}

// ---- caches on cuda_vmm against host caches --------------------------------------------------

kv::cuda_vmm make_vmm(std::size_t pages) { return kv::cuda_vmm(kv::cuda_vmm_config{0, 0, pages, true}); }

//! The rows a view holds (live slots only: empty slots hold whatever they last held), codes and
//! per-row metadata, read from device or host memory.
struct rows_dump {
  bytes k, v, ks, vs;
  std::vector<std::int32_t> pos;
};
rows_dump dump(const kv::layer_view& w, bool device) {
  rows_dump d;
  auto get = [&](const std::byte* p, std::size_t n, bytes& out) {
    const std::size_t at = out.size();
    out.resize(at + n);
    if (device) REQUIRE(cudaMemcpy(out.data() + at, p, n, cudaMemcpyDeviceToHost) == cudaSuccess);
    else std::memcpy(out.data() + at, p, n);
  };
  for (std::uint32_t s = 0; s < w.rows; ++s)
    for (std::uint32_t h = 0; h < w.kv_heads; ++h) {
      d.pos.push_back(w.position(s, h));
      if (w.position(s, h) < 0) continue;
      get(w.k_row(s, h), w.row_bytes, d.k);
      get(w.v_row(s, h), w.row_bytes, d.v);
      if (w.scale_bytes) {
        get(w.k_scale(s, h), w.scale_bytes, d.ks);
        get(w.v_scale(s, h), w.scale_bytes, d.vs);
      }
    }
  return d;
}
void check_same_rows(const kv::layer_view& dev, const kv::layer_view& host) {
  REQUIRE(dev.rows == host.rows);
  REQUIRE(dev.row_bytes == host.row_bytes);
  REQUIRE(std::string(dev.format) == host.format);
  const rows_dump a = dump(dev, true), b = dump(host, false);
  CHECK(a.pos == b.pos);
  CHECK_BYTES(a.k, b.k);
  CHECK_BYTES(a.v, b.v);
  CHECK_BYTES(a.ks, b.ks);
  CHECK_BYTES(a.vs, b.vs);
}

//! Device dense (f32 and f16) of a device view == host dequantize_dense of the host view.
template <class DevQ, class HostQ>
void check_dense_view(const kv::layer_view& dev, const DevQ& dq, const kv::layer_view& host,
                      const HostQ& hq) {
  const std::size_t n = std::size_t{host.rows} * host.kv_heads * host.head_dim;
  std::vector<float> hk(n), hv(n);
  ok(kv::dequantize_dense(host, hq, hk.data(), hv.data()));
  // empty slots hold different bytes in the two caches: compare live rows only
  auto mask = [&](std::vector<float>& f) {
    for (std::uint32_t s = 0; s < host.rows; ++s)
      for (std::uint32_t h = 0; h < host.kv_heads; ++h)
        if (host.position(s, h) < 0)
          std::fill_n(f.begin() + static_cast<std::ptrdiff_t>((std::size_t{s} * host.kv_heads + h) * host.head_dim),
                      host.head_dim, 0.0f);
  };
  mask(hk);
  mask(hv);
  for (dtype out : {dtype::f32, dtype::f16}) {
    dbuf dk(n * kv::size_of(out)), dv(n * kv::size_of(out));
    ok(gpu::dequantize_dense(dev, dq, dk.p, dv.p, out));
    auto back = [&](const dbuf& d) {
      const bytes b = d.host();
      std::vector<float> f(n);
      for (std::size_t i = 0; i < n; ++i) f[i] = kv::load_as_float(b.data(), i, out);
      if (out == dtype::f16)  // compare through the same rounding
        for (std::size_t i = 0; i < n; ++i) f[i] = kv::half_to_float(kv::float_to_half(f[i]));
      mask(f);
      return f;
    };
    auto round = [&](std::vector<float> f) {
      if (out == dtype::f16)
        for (auto& x : f) x = kv::half_to_float(kv::float_to_half(x));
      return f;
    };
    CHECK(same_bits(back(dk), round(hk)));
    CHECK(same_bits(back(dv), round(hv)));
  }
}

constexpr kv::geometry kGeo{2, 4, 8, 128, dtype::f16};

struct appends {
  std::vector<bytes> k, v;  // per append
  std::vector<std::uint32_t> tokens;
  void add(std::uint32_t n, unsigned seed, bool edge) {
    const std::size_t e = std::size_t{n} * kGeo.kv_heads * kGeo.head_dim;
    k.push_back(make_input(kGeo.type, e, seed, edge));
    v.push_back(make_input(kGeo.type, e, seed + 1000, !edge));
    tokens.push_back(n);
  }
};

//! The same appends (and evictions) into a device cache and a host cache; layer 0 from host
//! memory, layer 1 from device memory. evict_at: after that many appends, evict().
template <class DevCache, class HostCache>
void run_both(DevCache& dc, HostCache& hc, const appends& a, std::size_t evict_at = ~std::size_t{0}) {
  auto ds = dc.open(0);
  auto hs = hc.open(0);
  REQUIRE(ds.ok());
  REQUIRE(hs.ok());
  for (std::size_t i = 0; i < a.tokens.size(); ++i) {
    if (i == evict_at) {
      ok(dc.evict(*ds));
      ok(hc.evict(*hs));
    }
    const std::uint32_t n = a.tokens[i];
    dbuf dk(a.k[i]), dv(a.v[i]);
    for (std::uint32_t l = 0; l < kGeo.layers; ++l) {
      const void* kp = l == 0 ? static_cast<const void*>(a.k[i].data()) : dk.p;
      const void* vp = l == 0 ? static_cast<const void*>(a.v[i].data()) : dv.p;
      ok(dc.append(*ds, l, {kp, kGeo.type, n, kGeo.kv_heads, kGeo.head_dim},
                   {vp, kGeo.type, n, kGeo.kv_heads, kGeo.head_dim}));
      ok(hc.append(*hs, l, {a.k[i].data(), kGeo.type, n, kGeo.kv_heads, kGeo.head_dim},
                   {a.v[i].data(), kGeo.type, n, kGeo.kv_heads, kGeo.head_dim}));
    }
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);  // dk/dv freed at scope exit
  }
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  for (std::uint32_t l = 0; l < kGeo.layers; ++l) {
    INFO("layer " << l);
    auto dv = dc.view(*ds, l);
    auto hv = hc.view(*hs, l);
    REQUIRE(dv.ok());
    REQUIRE(hv.ok());
    check_same_rows(*dv, *hv);
    check_dense_view(*dv, dc.quant(), *hv, hc.quant());
  }
}

appends prefill_and_decode() {
  appends a;
  a.add(300, 11, true);
  for (unsigned i = 0; i < 6; ++i) a.add(1, 20 + i, i % 2 == 0);
  a.add(37, 40, false);
  return a;
}

TEST_CASE("cache<cuda_vmm, keep_all, cuda_q8_0> stores the host cache's bytes", "[cuda][quant][cache]") {
  const kv::layout order = GENERATE(kv::layout::token_major, kv::layout::head_major);
  INFO((order == kv::layout::token_major ? "token_major" : "head_major"));
  const kv::cache_config cfg{kGeo, 512, 0, order};
  kv::cache<kv::cuda_vmm, kv::keep_all, kv::cuda_q8_0> dc(cfg, make_vmm(16));
  kv::cache<kv::heap_memory, kv::keep_all, kv::q8_0> hc(cfg);
  run_both(dc, hc, prefill_and_decode());
}

TEST_CASE("cache<cuda_vmm, sink_window, cuda_q8_0>: refilled evicted slots match the host cache",
          "[cuda][quant][cache]") {
  const kv::cache_config cfg{kGeo, 96, 48};
  kv::cache<kv::cuda_vmm, kv::sink_window, kv::cuda_q8_0> dc(cfg, make_vmm(16), kv::sink_window(4));
  kv::cache<kv::heap_memory, kv::sink_window, kv::q8_0> hc(cfg, kv::heap_memory{}, kv::sink_window(4));
  appends a;
  a.add(90, 5, true);
  a.add(30, 6, false);  // after evict(): into the holes
  for (unsigned i = 0; i < 4; ++i) a.add(1, 60 + i, true);
  run_both(dc, hc, a, 1);
}

TEST_CASE("cache<cuda_vmm, keep_all, cuda_kivi_per_token<4>> stores the host cache's codes and metadata",
          "[cuda][quant][cache][kivi]") {
  const kv::layout order = GENERATE(kv::layout::token_major, kv::layout::head_major);
  const kv::cache_config cfg{kGeo, 512, 0, order};
  kv::cache<kv::cuda_vmm, kv::keep_all, kv::cuda_kivi_per_token<4>> dc(cfg, make_vmm(16));
  kv::cache<kv::heap_memory, kv::keep_all, kv::kivi_per_token<4>> hc(cfg);
  run_both(dc, hc, prefill_and_decode());
}

TEST_CASE("cache<cuda_vmm, keep_all, cuda_fp8_e4m3>: given and calibrated scales as the host's",
          "[cuda][quant][cache][fp8]") {
  const kv::cache_config cfg{kGeo, 512};
  SECTION("per layer, calibrated from the first append") {
    kv::cache<kv::cuda_vmm, kv::keep_all, kv::cuda_fp8_e4m3> dc(cfg, make_vmm(16));
    kv::cache<kv::heap_memory, kv::keep_all, kv::fp8_e4m3> hc(cfg);
    run_both(dc, hc, prefill_and_decode());
    for (std::uint32_t l = 0; l < kGeo.layers; ++l)
      for (auto part : {kv::kv_part::k, kv::kv_part::v}) {
        CHECK(dc.quant().scale(l, part) == hc.quant().scale(l, part));
        CHECK(dc.quant().scale(l, part) > 0.0f);
      }
  }
  SECTION("per head, calibrated") {
    const auto gran = kv::scale_granularity::per_head;
    kv::cache<kv::cuda_vmm, kv::keep_all, kv::cuda_fp8_e4m3> dc(cfg, make_vmm(16), {},
                                                               kv::cuda_fp8_e4m3(gran));
    kv::cache<kv::heap_memory, kv::keep_all, kv::fp8_e4m3> hc(cfg, kv::heap_memory{}, kv::keep_all{}, kv::fp8_e4m3(gran));
    run_both(dc, hc, prefill_and_decode());
    for (std::uint32_t h = 0; h < kGeo.kv_heads; ++h)
      CHECK(dc.quant().scale(1, kv::kv_part::v, h) == hc.quant().scale(1, kv::kv_part::v, h));
  }
  SECTION("per head, given") {
    const auto gran = kv::scale_granularity::per_head;
    std::vector<float> ks(8), vs(8);
    for (std::size_t i = 0; i < 8; ++i) {
      ks[i] = 0.01f * static_cast<float>(i + 1);
      vs[i] = 0.5f + static_cast<float>(i);
    }
    kv::cache<kv::cuda_vmm, kv::keep_all, kv::cuda_fp8_e4m3> dc(cfg, make_vmm(16), {},
                                                               kv::cuda_fp8_e4m3(gran, ks, vs));
    kv::cache<kv::heap_memory, kv::keep_all, kv::fp8_e4m3> hc(cfg, kv::heap_memory{}, kv::keep_all{}, kv::fp8_e4m3(gran, ks, vs));
    run_both(dc, hc, prefill_and_decode());
  }
}

TEST_CASE("cache<cuda_vmm, ..., cuda_q8_0>: a NaN in device input fails the append, nothing stored",
          "[cuda][quant][cache]") {
  const kv::cache_config cfg{kGeo, 64};
  kv::cache<kv::cuda_vmm, kv::keep_all, kv::cuda_q8_0> dc(cfg, make_vmm(8));
  auto s = dc.open(0);
  REQUIRE(s.ok());
  const std::size_t e = std::size_t{kGeo.kv_heads} * kGeo.head_dim * 4;
  bytes k = make_input(kGeo.type, e, 1, false), v = make_input(kGeo.type, e, 2, false);
  put(v, 300, kGeo.type, std::nanf(""));
  dbuf dk(k), dv(v);
  const auto st = dc.append(*s, 0, {dk.p, kGeo.type, 4, kGeo.kv_heads, kGeo.head_dim},
                            {dv.p, kGeo.type, 4, kGeo.kv_heads, kGeo.head_dim});
  CHECK(st.code() == kv::errc::invalid_argument);
  auto w = dc.view(*s, 0);
  REQUIRE(w.ok());
  CHECK(w->rows == 0);
}

}  // namespace
