// SPDX-License-Identifier: Apache-2.0
// Tests of examples/smollm without the real model: a synthetic GGUF written here (metadata of
// every type, arrays, tensors of each type) read back and dequantized; the tokenizer on a tiny
// vocabulary; and a tiny random 2-layer Llama through kvcache against a naive full-attention
// forward pass computed here. With the real model in ${XDG_CACHE_HOME:-~/.cache}/kvcache, it
// also checks the perplexity of a fixed KJV passage. Exit status: 0 when every check passes.

#include "test_check.hpp"
#include "gguf.hpp"
#include "model.hpp"
#include "tokenizer.hpp"

#include <kvcache/kvcache.hpp>
#include <kvcache/evict/sentence.hpp>
#include <kvcache/memory/tiered.hpp>
#include <kvcache/quant/ggml_blocks.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <unistd.h>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace {

using smollm_test::failures;

using namespace smollm;

//! A cache for decoding token by token: `budget` tokens (+1 for the step's own), 0 = all `tokens`.
kvcache::cache_config token_budget_config(const config& c, std::size_t tokens, std::uint32_t budget) {
  kvcache::cache_config cfg;
  cfg.geo = kv_geometry(c);
  cfg.max_tokens = budget ? budget + 1 : static_cast<std::uint32_t>(tokens);
  cfg.budget = budget;
  return cfg;
}

// ---- a GGUF writer -------------------------------------------------------------------------------

struct writer {
  std::vector<std::byte> b;
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
  }
  void str(const std::string& s) {
    put<std::uint64_t>(s.size());
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    b.insert(b.end(), p, p + s.size());
  }
  void key(const std::string& k, gguf::vtype t) {
    str(k);
    put<std::uint32_t>(static_cast<std::uint32_t>(t));
  }
};

struct tensor_spec {
  std::string name;
  std::vector<std::uint64_t> dims;
  gguf::ttype type;
  std::vector<float> values;  // what the writer quantizes
};

std::uint16_t h(float f) { return kvcache::float_to_half(f); }

// Quantizes `values` of one tensor into ggml blocks (simple reference encoders).
std::vector<std::byte> encode(const tensor_spec& t) {
  writer w;
  const auto& x = t.values;
  switch (t.type) {
    case gguf::ttype::f32:
      for (float v : x) w.put(v);
      break;
    case gguf::ttype::f16:
      for (float v : x) w.put(h(v));
      break;
    case gguf::ttype::q8_0:
      for (std::size_t b = 0; b < x.size(); b += 32) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b + j]));
        const float d = amax / 127;
        w.put(h(d));
        for (int j = 0; j < 32; ++j)
          w.put(static_cast<std::int8_t>(d ? std::lround(x[b + j] / d) : 0));
      }
      break;
    case gguf::ttype::q4_1:
      for (std::size_t b = 0; b < x.size(); b += 32) {
        float mn = x[b], mx = x[b];
        for (int j = 0; j < 32; ++j) mn = std::min(mn, x[b + j]), mx = std::max(mx, x[b + j]);
        const float d = (mx - mn) / 15;
        w.put(h(d));
        w.put(h(mn));
        for (int j = 0; j < 16; ++j) {
          auto q = [&](float v) { return static_cast<int>(std::clamp(d ? std::lround((v - mn) / d) : 0L, 0L, 15L)); };
          w.put(static_cast<std::uint8_t>(q(x[b + j]) | (q(x[b + 16 + j]) << 4)));
        }
      }
      break;
    default: break;
  }
  return w.b;
}

// Naive decoding of the bytes encode() wrote, element by element (the reader's twin).
float naive_value(gguf::ttype t, const std::vector<std::byte>& bytes, std::size_t i) {
  auto u8 = [&](std::size_t at) { return static_cast<unsigned>(std::to_integer<unsigned char>(bytes[at])); };
  auto f16 = [&](std::size_t at) { return kvcache::half_to_float(static_cast<std::uint16_t>(u8(at) | (u8(at + 1) << 8))); };
  const std::size_t blk = i / 32, j = i % 32;
  switch (t) {
    case gguf::ttype::f32: {
      float v;
      std::memcpy(&v, bytes.data() + 4 * i, 4);
      return v;
    }
    case gguf::ttype::f16: return f16(2 * i);
    case gguf::ttype::q8_0: {
      const std::size_t at = blk * 34;
      return f16(at) * static_cast<float>(static_cast<std::int8_t>(u8(at + 2 + j)));
    }
    case gguf::ttype::q4_1: {
      const std::size_t at = blk * 20;
      const unsigned q = j < 16 ? (u8(at + 4 + j) & 15u) : (u8(at + 4 + j - 16) >> 4);
      return static_cast<float>(q) * f16(at) + f16(at + 2);
    }
    default: return NAN;
  }
}

struct image {
  std::vector<std::byte> bytes;
  std::size_t first_tensor_info = 0;  // where the first tensor's info starts
  std::size_t data_offset = 0;
  std::vector<std::vector<std::byte>> encoded;
};

// Writes a GGUF v3 file: the metadata given by `meta` (a callback on the writer), then tensors.
template <class Meta>
image write_gguf(const std::vector<tensor_spec>& tensors, std::uint64_t n_kv, Meta meta, std::uint64_t align = 32) {
  image img;
  writer w;
  w.put<std::uint32_t>(0x46554747u);
  w.put<std::uint32_t>(3);
  w.put<std::uint64_t>(tensors.size());
  w.put<std::uint64_t>(n_kv);
  meta(w);
  img.first_tensor_info = w.b.size();
  std::uint64_t off = 0;
  for (const auto& t : tensors) {
    img.encoded.push_back(encode(t));
    w.str(t.name);
    w.put<std::uint32_t>(static_cast<std::uint32_t>(t.dims.size()));
    for (auto d : t.dims) w.put(d);
    w.put<std::uint32_t>(static_cast<std::uint32_t>(t.type));
    w.put(off);
    off += (img.encoded.back().size() + align - 1) / align * align;
  }
  while (w.b.size() % align) w.put<std::uint8_t>(0);
  img.data_offset = w.b.size();
  for (const auto& e : img.encoded) {
    w.b.insert(w.b.end(), e.begin(), e.end());
    while ((w.b.size() - img.data_offset) % align) w.put<std::uint8_t>(0);
  }
  img.bytes = std::move(w.b);
  return img;
}

std::vector<float> randn(std::size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> g(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

// ---- 1. the reader -------------------------------------------------------------------------------

void test_reader() {
  std::mt19937 rng(1);
  std::vector<tensor_spec> ts = {
      {"a.f32", {32, 3}, gguf::ttype::f32, randn(96, rng, 1.0f)},
      {"b.f16", {64, 2}, gguf::ttype::f16, randn(128, rng, 1.0f)},
      {"c.q8_0", {64, 3}, gguf::ttype::q8_0, randn(192, rng, 2.0f)},
      {"d.q4_1", {96, 2, 2}, gguf::ttype::q4_1, randn(384, rng, 0.5f)},
  };
  auto meta = [](writer& w) {
    w.key("general.architecture", gguf::vtype::string); w.str("llama");
    w.key("general.alignment", gguf::vtype::u32); w.put<std::uint32_t>(32);
    w.key("t.u8", gguf::vtype::u8); w.put<std::uint8_t>(200);
    w.key("t.i8", gguf::vtype::i8); w.put<std::int8_t>(-5);
    w.key("t.u16", gguf::vtype::u16); w.put<std::uint16_t>(60000);
    w.key("t.i16", gguf::vtype::i16); w.put<std::int16_t>(-30000);
    w.key("t.i32", gguf::vtype::i32); w.put<std::int32_t>(-7);
    w.key("t.f32", gguf::vtype::f32); w.put<float>(1.5f);
    w.key("t.bool", gguf::vtype::boolean); w.put<std::uint8_t>(1);
    w.key("t.u64", gguf::vtype::u64); w.put<std::uint64_t>(1ull << 40);
    w.key("t.i64", gguf::vtype::i64); w.put<std::int64_t>(-(1ll << 40));
    w.key("t.f64", gguf::vtype::f64); w.put<double>(0.25);
    w.key("t.strs", gguf::vtype::array); w.put<std::uint32_t>(8); w.put<std::uint64_t>(3);
    w.str("x"); w.str(""); w.str("héllo");
    w.key("t.i32s", gguf::vtype::array); w.put<std::uint32_t>(5); w.put<std::uint64_t>(3);
    w.put<std::int32_t>(1); w.put<std::int32_t>(-2); w.put<std::int32_t>(3);
    w.key("t.nested", gguf::vtype::array); w.put<std::uint32_t>(9); w.put<std::uint64_t>(2);
    w.put<std::uint32_t>(0); w.put<std::uint64_t>(2); w.put<std::uint8_t>(7); w.put<std::uint8_t>(8);
    w.put<std::uint32_t>(6); w.put<std::uint64_t>(1); w.put<float>(2.5f);
  };
  const std::uint64_t n_kv = 15;
  const image img = write_gguf(ts, n_kv, meta);
  auto f = gguf::file::from_bytes(img.bytes);
  CHECK(f.ok(), "%s", f.ok() ? "" : f.error().message().c_str());
  if (!f) return;
  CHECK(f->version == 3, "version %u", f->version);
  CHECK(f->meta.size() == n_kv, "%zu keys", f->meta.size());
  CHECK(f->data_offset == img.data_offset, "data offset %llu vs %zu", (unsigned long long)f->data_offset, img.data_offset);
  CHECK(f->find("general.architecture")->s == "llama", "arch");
  CHECK(f->find("t.u8")->u == 200 && f->find("t.i8")->i == -5 && f->find("t.u16")->u == 60000 &&
            f->find("t.i16")->i == -30000 && f->find("t.i32")->i == -7 && f->find("t.f32")->f == 1.5 &&
            f->find("t.bool")->u == 1 && f->find("t.u64")->u == (1ull << 40) &&
            f->find("t.i64")->i == -(1ll << 40) && f->find("t.f64")->f == 0.25,
        "scalars");
  const auto* strs = f->find("t.strs");
  CHECK(strs && strs->size() == 3 && strs->strs[2] == "héllo" && strs->strs[1].empty(), "string array");
  const auto* ints = f->find("t.i32s");
  CHECK(ints && ints->ints == (std::vector<std::int64_t>{1, -2, 3}), "int array");
  const auto* nested = f->find("t.nested");
  CHECK(nested && nested->items.size() == 2 && nested->items[0].ints == (std::vector<std::int64_t>{7, 8}) &&
            nested->items[1].nums == std::vector<double>{2.5},
        "nested array");
  CHECK(!f->find("missing"), "missing key");
  CHECK(f->number("t.i32").value() == -7 && !f->number("general.architecture").ok() &&
            f->number("nope", 3.0).value() == 3.0,
        "number()");
  CHECK(f->tensors.size() == ts.size(), "tensor count");
  for (std::size_t k = 0; k < ts.size(); ++k) {
    const auto* t = f->tensor(ts[k].name);
    CHECK(t != nullptr, "tensor %s", ts[k].name.c_str());
    if (!t) continue;
    CHECK(t->dims == ts[k].dims && t->type == static_cast<std::uint32_t>(ts[k].type) &&
              t->elements() == ts[k].values.size() && t->bytes == img.encoded[k].size(),
          "info of %s", t->name.c_str());
    std::vector<float> got;
    CHECK(f->read_f32(*t, got).ok(), "read %s", t->name.c_str());
    double max_q = 0;  // quantization error against the source values
    for (std::size_t i = 0; i < got.size(); ++i) {
      const float want = naive_value(ts[k].type, img.encoded[k], i);
      if (got[i] != want) {
        CHECK(got[i] == want, "%s[%zu] = %g, naive %g", t->name.c_str(), i, got[i], want);
        break;
      }
      max_q = std::max(max_q, double(std::fabs(got[i] - ts[k].values[i])));
    }
    const double tol = ts[k].type == gguf::ttype::f32 ? 0 : ts[k].type == gguf::ttype::f16 ? 3e-3
                       : ts[k].type == gguf::ttype::q8_0                                 ? 0.05
                                                                                         : 0.12;
    CHECK(max_q <= tol, "%s: max error vs source %g > %g", t->name.c_str(), max_q, tol);
  }

  // Malformed files: a status, never a crash.
  for (std::size_t cut = 0; cut < img.bytes.size(); cut += (cut < img.data_offset ? 1 : 61)) {
    auto g = gguf::file::from_bytes(std::vector<std::byte>(img.bytes.begin(), img.bytes.begin() + static_cast<std::ptrdiff_t>(cut)));
    CHECK(!g.ok(), "a file cut at %zu of %zu bytes was accepted", cut, img.bytes.size());
    if (g.ok()) break;
  }
  {
    auto bad = img.bytes;
    bad[0] = std::byte{'X'};
    auto g = gguf::file::from_bytes(bad);
    CHECK(!g.ok() && g.error().message().find("magic") != std::string::npos, "bad magic");
  }
  {  // unknown tensor type: the first tensor's type field
    auto bad = img.bytes;
    const std::size_t at = img.first_tensor_info + 8 + ts[0].name.size() + 4 + 8 * ts[0].dims.size();
    const std::uint32_t t = 99;
    std::memcpy(bad.data() + at, &t, 4);
    auto g = gguf::file::from_bytes(bad);
    CHECK(!g.ok() && g.error().message().find("unknown type") != std::string::npos, "unknown type: %s",
          g.ok() ? "accepted" : g.error().message().c_str());
    // and the offset field after it: far outside the file
    const std::uint64_t off = 1ull << 30;
    bad = img.bytes;
    std::memcpy(bad.data() + at + 4, &off, 8);
    g = gguf::file::from_bytes(bad);
    CHECK(!g.ok() && g.error().message().find("outside the file") != std::string::npos, "tensor out of bounds: %s",
          g.ok() ? "accepted" : g.error().message().c_str());
  }
  {  // a huge array length
    writer w;
    w.put<std::uint32_t>(0x46554747u);
    w.put<std::uint32_t>(3);
    w.put<std::uint64_t>(0);
    w.put<std::uint64_t>(1);
    w.key("a", gguf::vtype::array);
    w.put<std::uint32_t>(8);
    w.put<std::uint64_t>(1ull << 60);
    auto g = gguf::file::from_bytes(w.b);
    CHECK(!g.ok(), "huge array accepted");
  }
  {  // dims whose product wraps around 2^64
    writer w;
    w.put<std::uint32_t>(0x46554747u);
    w.put<std::uint32_t>(3);
    w.put<std::uint64_t>(1);
    w.put<std::uint64_t>(0);
    w.str("t");
    w.put<std::uint32_t>(4);
    for (int d = 0; d < 4; ++d) w.put<std::uint64_t>(1ull << 32);
    w.put<std::uint32_t>(0);
    w.put<std::uint64_t>(0);
    auto g = gguf::file::from_bytes(w.b);
    CHECK(!g.ok() && g.error().message().find("bad shape") != std::string::npos, "wrapping dims: %s",
          g.ok() ? "accepted" : g.error().message().c_str());
  }
  {
    auto g = gguf::file::open("/nonexistent/model.gguf");
    CHECK(!g.ok() && g.error().code() == kvcache::errc::system_error, "missing file");
  }
}

// ---- 2. the tokenizer ----------------------------------------------------------------------------

// The 256 byte symbols of GPT-2's byte-level alphabet, in byte order (ids 0..255).
std::vector<std::string> byte_symbols() {
  std::vector<std::string> out(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const unsigned cp = keep ? static_cast<unsigned>(b) : 256u + static_cast<unsigned>(n++);
    std::string s;
    if (cp < 0x80) s.push_back(static_cast<char>(cp));
    else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    out[static_cast<std::size_t>(b)] = s;
  }
  return out;
}

void test_tokenizer() {
  using V = std::vector<std::string>;
  CHECK(tokenizer::pre_tokenize("Hello, world! 123  x") == (V{"Hello", ",", " world", "!", " ", "1", "2", "3", " ", " x"}),
        "pre_tokenize 1");
  CHECK(tokenizer::pre_tokenize("don't\n\nStop  ") == (V{"don", "'t", "\n", "\n", "Stop", "  "}), "pre_tokenize 2");
  CHECK(tokenizer::pre_tokenize("a ... b's") == (V{"a", " ...", " b", "'s"}), "pre_tokenize 3");
  CHECK(tokenizer::pre_tokenize("naïve café") == (V{"naïve", " café"}), "pre_tokenize 4 (non-ASCII letters)");
  // Whitespace before a digit: llama.cpp splits the digits off first and runs `\s+(?!\S)` within each
  // piece, so the whole run stays one pre-token (dict-devil, token 40,734: ".\n" + 12 spaces + "18").
  const std::string sp12(12, ' ');
  CHECK(tokenizer::pre_tokenize(".\n" + sp12 + "18") == (V{".", "\n" + sp12, "1", "8"}), "pre_tokenize 5 (\\n+spaces, digit)");
  CHECK(tokenizer::pre_tokenize("a   5") == (V{"a", "   ", "5"}), "pre_tokenize 6 (spaces, digit)");
  CHECK(tokenizer::pre_tokenize("x 5") == (V{"x", " ", "5"}), "pre_tokenize 7 (one space, digit)");
  CHECK(tokenizer::pre_tokenize("\n\n2") == (V{"\n\n", "2"}), "pre_tokenize 8 (newlines, digit)");
  CHECK(tokenizer::pre_tokenize("1  2\t 3") == (V{"1", "  ", "2", "\t ", "3"}), "pre_tokenize 9 (between digits)");
  CHECK(tokenizer::pre_tokenize("\n   x") == (V{"\n  ", " x"}), "pre_tokenize 10 (before a letter: one given back)");

  V tokens = byte_symbols();  // ids 0..255
  const std::string G = tokens[' '];  // "Ġ"
  V merges = {"h e", "l l", "he ll", "hell o", G + " w", "o r", G + "w or", "l d", G + "wor ld"};
  for (const auto& m : merges) tokens.push_back(m.substr(0, m.find(' ')) + m.substr(m.find(' ') + 1));
  const std::int32_t im_start = static_cast<std::int32_t>(tokens.size());
  tokens.push_back("<|im_start|>");
  std::vector<std::int64_t> types(tokens.size(), 1);
  types.back() = 3;
  tokenizer tok;
  CHECK(tok.init(tokens, merges, types).ok(), "init");
  auto id = [&](const std::string& s) {
    return static_cast<std::int32_t>(std::find(tokens.begin(), tokens.end(), s) - tokens.begin());
  };
  const auto ids = tok.encode("hello world!");
  CHECK(ids == (std::vector<std::int32_t>{id("hello"), id(G + "world"), '!'}), "encode: %zu ids", ids.size());
  CHECK(tok.decode(ids) == "hello world!", "decode");
  const std::string odd = "héllo\t\x01 wörld 42";
  CHECK(tok.decode(tok.encode(odd)) == odd, "round trip of bytes");
  const auto sp = tok.encode("<|im_start|>hello", true);
  CHECK(sp.size() == 2 && sp[0] == im_start && sp[1] == id("hello"), "special token parsed");
  CHECK(tok.encode("<|im_start|>", false).size() > 1, "special token not parsed when off");
}

// ---- 3. a tiny model through kvcache vs a naive forward pass --------------------------------------

struct tiny {
  config c;
  std::vector<tensor_spec> tensors;
};

tiny make_tiny(std::mt19937& rng) {
  tiny t;
  t.c = config{2, 128, 4, 2, 32, 64, 300, 128, 1e-5f, 10000.0f};
  const std::uint64_t H = 128, KV = 64, F = 64, Vc = 300;
  auto add = [&](std::string name, std::uint64_t cols, std::uint64_t rows, gguf::ttype ty, float scale) {
    std::vector<std::uint64_t> dims = rows == 1 ? std::vector<std::uint64_t>{cols} : std::vector<std::uint64_t>{cols, rows};
    auto v = randn(cols * rows, rng, scale);
    if (rows == 1)
      for (auto& x : v) x = 1.0f + 0.1f * x;  // norm weights around 1
    t.tensors.push_back({std::move(name), dims, ty, std::move(v)});
  };
  add("token_embd.weight", H, Vc, gguf::ttype::q8_0, 1.0f);
  add("output_norm.weight", H, 1, gguf::ttype::f32, 1.0f);
  for (int l = 0; l < 2; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    add(p + "attn_norm.weight", H, 1, gguf::ttype::f32, 1);
    add(p + "attn_q.weight", H, H, gguf::ttype::q4_1, 0.12f);
    add(p + "attn_k.weight", H, KV, gguf::ttype::q4_1, 0.12f);
    add(p + "attn_v.weight", H, KV, gguf::ttype::f16, 0.15f);
    add(p + "attn_output.weight", H, H, gguf::ttype::q8_0, 0.1f);
    add(p + "ffn_norm.weight", H, 1, gguf::ttype::f32, 1);
    add(p + "ffn_gate.weight", H, F, gguf::ttype::q4_1, 0.15f);
    add(p + "ffn_up.weight", H, F, gguf::ttype::f32, 0.15f);
    add(p + "ffn_down.weight", F, H, gguf::ttype::q8_0, 0.2f);
  }
  return t;
}

image tiny_image(const tiny& t) {
  auto meta = [&](writer& w) {
    w.key("general.architecture", gguf::vtype::string); w.str("llama");
    w.key("llama.block_count", gguf::vtype::u32); w.put<std::uint32_t>(t.c.layers);
    w.key("llama.embedding_length", gguf::vtype::u32); w.put<std::uint32_t>(t.c.hidden);
    w.key("llama.attention.head_count", gguf::vtype::u32); w.put<std::uint32_t>(t.c.heads);
    w.key("llama.attention.head_count_kv", gguf::vtype::u32); w.put<std::uint32_t>(t.c.kv_heads);
    w.key("llama.feed_forward_length", gguf::vtype::u32); w.put<std::uint32_t>(t.c.ffn);
    w.key("llama.attention.layer_norm_rms_epsilon", gguf::vtype::f32); w.put<float>(t.c.eps);
    w.key("llama.rope.freq_base", gguf::vtype::f32); w.put<float>(t.c.rope_base);
  };
  return write_gguf(t.tensors, 8, meta);
}

// The whole sequence at once, no cache: causal attention over all previous tokens, in double.
std::vector<double> naive_forward(const weights& W, const std::vector<std::int32_t>& toks) {
  const config& c = W.cfg;
  const std::size_t T = toks.size(), H = c.hidden, D = c.head_dim, QH = c.heads, KH = c.kv_heads, F = c.ffn;
  std::vector<double> x(T * H), logits(T * c.vocab);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t i = 0; i < H; ++i) x[t * H + i] = W.embd(std::size_t(toks[t]), i);
  auto norm = [&](const std::vector<double>& in, const std::vector<float>& w) {
    std::vector<double> out(in.size());
    for (std::size_t t = 0; t < T; ++t) {
      double ss = 0;
      for (std::size_t i = 0; i < H; ++i) ss += in[t * H + i] * in[t * H + i];
      const double r = 1.0 / std::sqrt(ss / double(H) + c.eps);
      for (std::size_t i = 0; i < H; ++i) out[t * H + i] = in[t * H + i] * r * w[i];
    }
    return out;
  };
  auto mm = [&](const matrix& w, std::size_t rows, std::size_t cols, const std::vector<double>& in) {
    std::vector<double> out(T * rows);
    for (std::size_t t = 0; t < T; ++t)
      for (std::size_t r = 0; r < rows; ++r) {
        double s = 0;
        for (std::size_t i = 0; i < cols; ++i) s += double(w(r, i)) * in[t * cols + i];
        out[t * rows + r] = s;
      }
    return out;
  };
  auto rope = [&](std::vector<double>& v, std::size_t heads) {  // adjacent pairs
    for (std::size_t t = 0; t < T; ++t)
      for (std::size_t hh = 0; hh < heads; ++hh)
        for (std::size_t i = 0; i < D / 2; ++i) {
          const double th = double(t) / std::pow(double(c.rope_base), 2.0 * double(i) / double(D));
          double* p = &v[t * heads * D + hh * D + 2 * i];
          const double a = p[0], b = p[1];
          p[0] = a * std::cos(th) - b * std::sin(th);
          p[1] = a * std::sin(th) + b * std::cos(th);
        }
  };
  for (const auto& L : W.layers) {
    auto xn = norm(x, L.attn_norm);
    auto q = mm(L.wq, QH * D, H, xn), k = mm(L.wk, KH * D, H, xn), v = mm(L.wv, KH * D, H, xn);
    rope(q, QH);
    rope(k, KH);
    std::vector<double> att(T * QH * D, 0.0);
    for (std::size_t t = 0; t < T; ++t)
      for (std::size_t qh = 0; qh < QH; ++qh) {
        const std::size_t kh = qh / (QH / KH);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (std::size_t u = 0; u <= t; ++u) {
          double d = 0;
          for (std::size_t i = 0; i < D; ++i) d += q[t * QH * D + qh * D + i] * k[u * KH * D + kh * D + i];
          s[u] = d / std::sqrt(double(D));
          mx = std::max(mx, s[u]);
        }
        double sum = 0;
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (std::size_t u = 0; u <= t; ++u)
          for (std::size_t i = 0; i < D; ++i) att[t * QH * D + qh * D + i] += s[u] / sum * v[u * KH * D + kh * D + i];
      }
    auto o = mm(L.wo, H, H, att);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    xn = norm(x, L.ffn_norm);
    auto g = mm(L.w_gate, F, H, xn), u = mm(L.w_up, F, H, xn);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    std::vector<double> gd(g.begin(), g.end());
    std::vector<double> d(T * H);
    for (std::size_t t = 0; t < T; ++t)
      for (std::size_t r = 0; r < H; ++r) {
        double sacc = 0;
        for (std::size_t i = 0; i < F; ++i) sacc += double(L.w_down(r, i)) * gd[t * F + i];
        d[t * H + r] = sacc;
      }
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += d[i];
  }
  auto xn = norm(x, W.out_norm);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t r = 0; r < c.vocab; ++r) {
      double s = 0;
      for (std::size_t i = 0; i < H; ++i) s += double(W.embd(r, i)) * xn[t * H + i];
      logits[t * c.vocab + r] = s;
    }
  return logits;
}

//! The memory a policy's cache needs: a tiered one (a holding tier behind host_vmm) for tiered
//! policies (SentenceKV), else host_vmm.
template <class Policy>
using memory_for = std::conditional_t<kvcache::tiered_policy<Policy>, kvcache::tiered<kvcache::host_vmm>,
                                      kvcache::host_vmm>;

//! The logits of every token of `toks`, fed `chunk` at a time; `boundary`: the sentence-ending
//! token ids (policies that consume boundary_signal get each step's ids, as the tool gives them).
template <class Policy, class Quant = kvcache::passthrough>
std::vector<float> run_engine(const weights& W, const std::vector<std::int32_t>& toks, std::uint32_t chunk,
                              thread_pool& pool, Policy policy = {}, std::uint32_t budget = 0, Quant quant = {},
                              const std::vector<std::int32_t>& boundary = {}) {
  kvcache::cache_config cfg;
  cfg.geo = kv_geometry(W.cfg);
  cfg.max_tokens = budget ? budget + chunk : static_cast<std::uint32_t>(toks.size());
  cfg.budget = budget;
  kvcache::host_vmm_config vm;
  vm.pool_pages = 6 * std::size_t{cfg.geo.layers} * (std::size_t{cfg.max_tokens} * cfg.geo.token_bytes() / vm.page_size + 2);
  kvcache::cache<memory_for<Policy>, Policy, Quant> kc(cfg, memory_for<Policy>{kvcache::host_vmm{vm}},
                                                       std::move(policy), std::move(quant));
  cache_sequence<decltype(kc)> seq(kc, W.cfg, pool);
  seq.set_boundary_ids(boundary);
  engine e(W, pool);
  const std::uint32_t V = W.cfg.vocab;
  std::vector<float> logits(toks.size() * V);
  for (std::uint32_t at = 0; at < toks.size(); at += chunk) {
    const std::uint32_t m = std::min<std::uint32_t>(chunk, static_cast<std::uint32_t>(toks.size()) - at);
    seq.set_step_tokens(toks.data() + at, m);
    auto st = e.forward(seq, toks.data() + at, m, logits.data() + std::size_t{at} * V, true);
    CHECK(st.ok(), "forward: %s", st.message().c_str());
    if (!st) break;
  }
  return logits;
}

double max_rel(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / den;
}

void test_forward() {
  std::mt19937 rng(7);
  const tiny t = make_tiny(rng);
  const image img = tiny_image(t);
  auto f = gguf::file::from_bytes(img.bytes, "tiny");
  CHECK(f.ok(), "%s", f.ok() ? "" : f.error().message().c_str());
  if (!f) return;
  auto w = load(*f);
  CHECK(w.ok(), "%s", w.ok() ? "" : w.error().message().c_str());
  if (!w) return;
  CHECK(w->cfg.layers == 2 && w->cfg.head_dim == 32 && w->cfg.vocab == 300 && w->output.rows == 0, "config");
  std::vector<std::int32_t> toks(40);
  for (auto& x : toks) x = static_cast<std::int32_t>(rng() % 300);
  const auto ref = naive_forward(*w, toks);
  thread_pool pool(2);
  const auto by_token = run_engine(*w, toks, 1, pool, kvcache::keep_all{});
  for (std::uint32_t chunk : {1u, 7u, 40u}) {
    const auto got = run_engine(*w, toks, chunk, pool, kvcache::keep_all{});
    const double e = max_rel(got, ref);
    CHECK(e < 1e-4, "keep_all, chunk %u: max error %g of the logits' range", chunk, e);
    // the step size changes no bit (a quantized cache would amplify any difference)
    CHECK(got == by_token, "keep_all, chunk %u: not bit-identical to token by token", chunk);
  }
  // A budget the sequence never reaches changes nothing.
  const auto sw = run_engine(*w, toks, 1, pool, kvcache::sink_window{4}, 40);
  CHECK(max_rel(sw, ref) < 1e-4, "sink_window with a budget of all tokens: %g", max_rel(sw, ref));
  // Under a budget: runs, and is not the same as keep_all.
  const auto sw16 = run_engine(*w, toks, 1, pool, kvcache::sink_window{4}, 16);
  CHECK(max_rel(sw16, ref) > 1e-3, "sink_window with budget 16 equals keep_all?");
  kvcache::heavy_hitter_config hc;
  hc.heavy = 8;
  hc.recent = 8;
  const auto hh = run_engine(*w, toks, 1, pool, kvcache::heavy_hitter<kvcache::attention_signal>(hc), 16);
  CHECK(std::isfinite(max_rel(hh, ref)), "heavy_hitter");
  const auto sk = run_engine(*w, toks, 8, pool, kvcache::snapkv<kvcache::query_signal>(kvcache::snapkv_config{4, 3, kvcache::pooling::max}), 16);
  CHECK(std::isfinite(max_rel(sk, ref)), "snapkv");
  // A quantized cache stays close (q8_0 keys/values).
  const auto q8 = run_engine(*w, toks, 5, pool, kvcache::keep_all{}, 0, kvcache::q8_0{});
  CHECK(q8 == run_engine(*w, toks, 1, pool, kvcache::keep_all{}, 0, kvcache::q8_0{}),
        "q8_0: chunk 5 is not bit-identical to token by token");
  const auto q4 = run_engine(*w, toks, 5, pool, kvcache::keep_all{}, 0, kvcache::q4_0{});
  std::printf("tiny model: max logit error of the K/V formats, relative to the logits' range: q8_0 %.2e, "
              "q4_0 %.2e\n", max_rel(q8, ref), max_rel(q4, ref));
  CHECK(max_rel(q8, ref) < 0.05 && max_rel(q8, ref) < max_rel(q4, ref), "q8_0 keep_all: %g", max_rel(q8, ref));
  // fp16 weights (the tool's default): the same forward pass on the rounded weights.
  auto w16 = load(*f, weight_format::f16);
  CHECK(w16.ok() && w16->layers[0].wq.f32.empty() && !w16->layers[0].wq.f16.empty(), "f16 weights");
  if (w16) {
    const auto ref16 = naive_forward(*w16, toks);
    const auto got16 = run_engine(*w16, toks, 3, pool, kvcache::keep_all{});
    CHECK(max_rel(got16, ref16) < 1e-4, "f16 weights: %g", max_rel(got16, ref16));
    CHECK(max_rel(got16, ref) < 1e-2, "f16 vs f32 weights: %g", max_rel(got16, ref));
  }
  // A batch of sequences of different cache types gives each sequence exactly what it gets alone
  // (the tool's --sweep relies on it): one weight pass, per-sequence attention.
  {
    auto make_cfg = [&](std::uint32_t budget) { return token_budget_config(w->cfg, toks.size(), budget); };
    kvcache::host_vmm_config vm;
    vm.pool_pages = 256;
    using full_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all, kvcache::passthrough>;
    using sink_t = kvcache::cache<kvcache::host_vmm, kvcache::sink_window, kvcache::passthrough>;
    using q8_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all, kvcache::q8_0>;
    using h2o_t = kvcache::cache<kvcache::host_vmm, kvcache::heavy_hitter<kvcache::attention_signal>, kvcache::passthrough>;
    auto run = [&](bool batched) {
      cache_sequence<full_t> a(std::make_unique<full_t>(make_cfg(0), kvcache::host_vmm{vm}), w->cfg, pool);
      cache_sequence<sink_t> b(std::make_unique<sink_t>(make_cfg(12), kvcache::host_vmm{vm}, kvcache::sink_window{4}),
                               w->cfg, pool);
      cache_sequence<q8_t> c(std::make_unique<q8_t>(make_cfg(0), kvcache::host_vmm{vm}), w->cfg, pool);
      cache_sequence<h2o_t> d(std::make_unique<h2o_t>(make_cfg(16), kvcache::host_vmm{vm},
                                                      kvcache::heavy_hitter<kvcache::attention_signal>(hc)),
                              w->cfg, pool);
      kv_sequence* seqs[] = {&a, &b, &c, &d};
      const std::uint32_t V = w->cfg.vocab;
      std::vector<float> out(4 * toks.size() * V);
      engine e(*w, pool);
      for (std::uint32_t at = 0; at < toks.size(); ++at) {
        std::vector<float> step(4 * V);
        if (batched) {
          const std::int32_t four[] = {toks[at], toks[at], toks[at], toks[at]};
          CHECK(e.forward(std::span(seqs, 4), four, 1, step.data()).ok(), "batched forward");
        } else {
          for (std::size_t s = 0; s < 4; ++s) CHECK(e.forward(*seqs[s], &toks[at], 1, step.data() + s * V).ok(), "forward");
        }
        for (std::size_t s = 0; s < 4; ++s) std::copy_n(step.data() + s * V, V, out.data() + (s * toks.size() + at) * V);
      }
      CHECK(a.position() == static_cast<std::int64_t>(toks.size()), "position %lld", (long long)a.position());
      CHECK(b.stats().entries_live < a.stats().entries_live, "the sink_window sequence evicted nothing");
      return out;
    };
    const auto alone = run(false), batched = run(true);
    CHECK(alone == batched, "a batch of 4 caches differs from the caches run alone");
    CHECK(std::equal(alone.begin(), alone.begin() + static_cast<std::ptrdiff_t>(toks.size() * w->cfg.vocab), ref.begin(),
                     [](float x, double y) { return std::fabs(x - y) < 1e-3 * std::max(1.0, std::fabs(y)); }),
          "the keep_all sequence of the batch is not the naive forward pass");
  }
  {  // a token id out of range: an error naming it, and no sequence moved
    kvcache::cache_config cfg;
    cfg.geo = kv_geometry(w->cfg);
    cfg.max_tokens = 8;
    kvcache::cache<kvcache::host_vmm, kvcache::keep_all, kvcache::passthrough> kc(cfg);
    cache_sequence<decltype(kc)> s(kc, w->cfg, pool);
    engine e(*w, pool);
    const std::int32_t bad_tok[] = {1, 300};
    const auto st = e.forward(s, bad_tok, 2, nullptr);
    CHECK(!st.ok() && st.message().find("300") != std::string::npos && s.position() == 0 &&
              kc.stats().entries_live == 0,
          "bad token: %s", st.message().c_str());
  }
  // A wrong shape is an error, not a crash.
  tiny bad = t;
  bad.tensors[3].dims = {128, 8};  // attn_q with 8 rows
  bad.tensors[3].values.resize(1024);
  auto fb = gguf::file::from_bytes(tiny_image(bad).bytes, "bad");
  CHECK(fb.ok() && !load(*fb).ok(), "wrong shape accepted");
}

// ---- SentenceKV through the engine -------------------------------------------------------------

using sentence_cache = kvcache::cache<kvcache::tiered<kvcache::host_vmm>, kvcache::sentence_kv, kvcache::passthrough>;

//! SentenceKV scaled down to the tiny model: 4 sinks, 4 recent tokens.
kvcache::sentence_kv tiny_sentence_kv() {
  kvcache::sentence_kv_config sc;
  sc.start = 4;
  sc.recent = 4;
  return kvcache::sentence_kv(sc);
}

std::unique_ptr<sentence_cache> new_sentence_cache(const config& c, std::uint32_t budget) {
  kvcache::cache_config cfg;
  cfg.geo = kv_geometry(c);
  cfg.max_tokens = budget + 1;
  cfg.budget = budget;
  kvcache::host_vmm_config vm;
  vm.pool_pages = 256;
  return std::make_unique<sentence_cache>(cfg, kvcache::tiered<kvcache::host_vmm>(kvcache::host_vmm{vm}),
                                          tiny_sentence_kv());
}

// The engine drives a tiered policy as the paper's decode loop does: each step's queries, keys and
// sentence ends (from the step's token ids) before its attention, which sees at most the budget.
void test_sentence_kv() {
  std::mt19937 rng(11);
  const tiny t = make_tiny(rng);
  auto f = gguf::file::from_bytes(tiny_image(t).bytes, "tiny");
  auto w = f ? load(*f) : kvcache::result<weights>(f.error());
  CHECK(w.ok(), "%s", w.ok() ? "" : w.error().message().c_str());
  if (!w) return;
  // 120 tokens in sentences of 4 to 11 tokens, each ending with token 13 (the synthetic ".")
  const std::vector<std::int32_t> boundary = {13};
  std::vector<std::int32_t> toks;
  while (toks.size() < 120) {
    const std::size_t len = 3 + rng() % 8;
    for (std::size_t i = 0; i < len && toks.size() < 119; ++i) toks.push_back(20 + static_cast<std::int32_t>(rng() % 280));
    toks.push_back(13);
  }
  thread_pool pool(2);
  const std::uint32_t budget = 24, V = w->cfg.vocab, KH = w->cfg.kv_heads;
  {  // alone: every step's view per head within the budget; sentences demoted, then promoted
    cache_sequence<sentence_cache> s(new_sentence_cache(w->cfg, budget), w->cfg, pool);
    CHECK(s.tiered(), "a sentence_kv sequence is not tiered");
    s.set_boundary_ids(boundary);
    engine e(*w, pool);
    std::vector<float> logits(V);
    std::uint32_t most = 0;
    std::uint64_t promoted_after_close = 0;
    for (std::uint32_t at = 0; at < toks.size(); ++at) {
      s.set_step_tokens(&toks[at], 1);
      const auto st = e.forward(s, &toks[at], 1, logits.data());
      CHECK(st.ok(), "sentence_kv forward at %u: %s", at, st.message().c_str());
      if (!st) return;
      for (std::uint32_t l = 0; l < w->cfg.layers; ++l) {
        auto vr = s.cache().view(s.id(), l);
        CHECK(vr.ok(), "view");
        if (!vr) return;
        for (std::uint32_t h = 0; h < KH; ++h) {
          std::uint32_t live = 0;
          for (std::uint32_t r = 0; r < vr->rows; ++r) live += vr->positions[std::size_t{r} * KH + h] >= 0;
          most = std::max(most, live);
          CHECK(live <= budget, "step %u, layer %u, head %u: %u tokens in the view, budget %u", at, l, h, live, budget);
        }
      }
      if (at == 60) promoted_after_close = s.stats().tier.bytes_promoted;
    }
    const auto ts = s.stats().tier;
    std::printf("tiny model, sentence_kv at budget %u of %zu tokens: at most %u per head in a view; %llu B "
                "demoted, %llu B promoted, %llu B prefetched, %llu rows hit, %llu missed\n",
                budget, toks.size(), most, static_cast<unsigned long long>(ts.bytes_demoted),
                static_cast<unsigned long long>(ts.bytes_promoted), static_cast<unsigned long long>(ts.bytes_prefetched),
                static_cast<unsigned long long>(ts.rows_hit), static_cast<unsigned long long>(ts.rows_missed));
    CHECK(most == budget, "the views never filled the budget (%u of %u)", most, budget);
    CHECK(ts.bytes_demoted > 0, "nothing demoted");
    CHECK(promoted_after_close > 0 && ts.bytes_promoted > promoted_after_close,
          "sentences closed but nothing promoted (%llu B at token 60, %llu B at the end)",
          static_cast<unsigned long long>(promoted_after_close), static_cast<unsigned long long>(ts.bytes_promoted));
    // without the step's token ids: an error, the cache untouched
    cache_sequence<sentence_cache> bare(new_sentence_cache(w->cfg, budget), w->cfg, pool);
    const auto st = e.forward(bare, &toks[0], 1, logits.data());
    CHECK(!st.ok() && st.message().find("set_step_tokens") != std::string::npos && bare.position() == 0 &&
              bare.stats().entries_live == 0,
          "sentence_kv without token ids: %s", st.ok() ? "accepted" : st.message().c_str());
  }
  // keep_all's logits while every token is a sink or recent (8 tokens), not after
  const auto full = run_engine(*w, toks, 1, pool, kvcache::keep_all{});
  const auto sk = run_engine(*w, toks, 1, pool, tiny_sentence_kv(), budget, kvcache::passthrough{}, boundary);
  CHECK(sk != full, "sentence_kv at budget %u gives keep_all's logits", budget);
  CHECK(std::equal(sk.begin(), sk.begin() + std::ptrdiff_t{8} * V, full.begin()),
        "sentence_kv differs from keep_all while all tokens are sinks or recent");
  // A sentence_kv row gives the same bits alone and in a batch with other caches (the tool's --sweep).
  {
    auto make_cfg = [&](std::uint32_t budget) { return token_budget_config(w->cfg, toks.size(), budget); };
    kvcache::host_vmm_config vm;
    vm.pool_pages = 256;
    using full_t = kvcache::cache<kvcache::host_vmm, kvcache::keep_all, kvcache::passthrough>;
    using sink_t = kvcache::cache<kvcache::host_vmm, kvcache::sink_window, kvcache::passthrough>;
    auto run = [&](bool batched) {
      cache_sequence<full_t> a(std::make_unique<full_t>(make_cfg(0), kvcache::host_vmm{vm}), w->cfg, pool);
      cache_sequence<sentence_cache> b(new_sentence_cache(w->cfg, budget), w->cfg, pool);
      cache_sequence<sink_t> c(std::make_unique<sink_t>(make_cfg(budget), kvcache::host_vmm{vm}, kvcache::sink_window{4}),
                               w->cfg, pool);
      kv_sequence* seqs[] = {&a, &b, &c};
      for (auto* q : seqs) q->set_boundary_ids(boundary);
      std::vector<float> out(3 * toks.size() * V);
      engine e(*w, pool);
      for (std::uint32_t at = 0; at < toks.size(); ++at) {
        std::vector<float> step(3 * V);
        for (auto* q : seqs) q->set_step_tokens(&toks[at], 1);
        if (batched) {
          const std::int32_t three[] = {toks[at], toks[at], toks[at]};
          CHECK(e.forward(std::span(seqs, 3), three, 1, step.data()).ok(), "batched forward");
        } else {
          for (std::size_t q = 0; q < 3; ++q)
            CHECK(e.forward(*seqs[q], &toks[at], 1, step.data() + q * V).ok(), "forward");
        }
        for (std::size_t q = 0; q < 3; ++q) std::copy_n(step.data() + q * V, V, out.data() + (q * toks.size() + at) * V);
      }
      CHECK(b.stats().tier.bytes_promoted > 0, "the batch's sentence_kv row promoted nothing");
      return out;
    };
    const auto alone = run(false), batched = run(true);
    CHECK(alone == batched, "a batch with a sentence_kv row differs from its caches run alone");
    CHECK(std::equal(sk.begin(), sk.end(), alone.begin() + static_cast<std::ptrdiff_t>(toks.size() * V)),
          "the sentence_kv row of the batch differs from run_engine's");
  }
}

// ---- model files on disk: missing, empty, truncated --------------------------------------------

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("smollm_test_" + std::to_string(::getpid()) + "_" + name)).string();
}

bool write_file(const std::string& path, const std::byte* data, std::size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n));
  return static_cast<bool>(out);
}

// A model file cut short (a download interrupted, a disk full) is a clear error from open(), not
// a crash or garbage weights: for the synthetic model at many lengths, and for the real one.
void test_model_files(const std::string& real_model) {
  std::mt19937 rng(3);
  const image img = tiny_image(make_tiny(rng));
  const std::string path = temp_path("tiny.gguf");
  CHECK(write_file(path, img.bytes.data(), img.bytes.size()), "write %s", path.c_str());
  {
    auto f = gguf::file::open(path);
    CHECK(f.ok() && load(*f).ok(), "the whole synthetic model: %s", f.ok() ? "load failed" : f.error().message().c_str());
  }
  const std::size_t n = img.bytes.size();
  std::size_t last_end = img.data_offset;  // the end of the last tensor's bytes (padding follows)
  for (std::size_t k = 0; k < img.encoded.size(); ++k)
    last_end += k + 1 < img.encoded.size() ? (img.encoded[k].size() + 31) / 32 * 32 : img.encoded[k].size();
  for (const std::size_t cut : {std::size_t{0}, std::size_t{3}, img.first_tensor_info - 5, img.data_offset + 1,
                                (img.data_offset + n) / 2, last_end - 1}) {
    CHECK(write_file(path, img.bytes.data(), cut), "write %s", path.c_str());
    auto f = gguf::file::open(path);
    const std::string msg = f.ok() ? "" : f.error().message();
    CHECK(!f.ok() && f.error().code() != kvcache::errc::system_error &&
              (msg.find("truncated") != std::string::npos || msg.find("empty") != std::string::npos),
          "synthetic model cut at %zu of %zu bytes: %s", cut, n, f.ok() ? "accepted" : msg.c_str());
  }
  std::filesystem::remove(path);

  std::error_code ec;
  const auto size = std::filesystem::file_size(real_model, ec);
  if (ec) return;  // no real model: test_real_model says so
  // the real model cut in the middle of its tensors: the error names the first tensor it misses
  std::ifstream in(real_model, std::ios::binary);
  std::vector<char> half(static_cast<std::size_t>(size / 2));
  in.read(half.data(), static_cast<std::streamsize>(half.size()));
  const std::string cut_path = temp_path("real_cut.gguf");
  CHECK(write_file(cut_path, reinterpret_cast<const std::byte*>(half.data()), half.size()), "write %s", cut_path.c_str());
  auto f = gguf::file::open(cut_path);
  const std::string msg = f.ok() ? "" : f.error().message();
  CHECK(!f.ok() && msg.find("tensor blk.") != std::string::npos && msg.find("outside the file") != std::string::npos,
        "the real model cut in half: %s", f.ok() ? "accepted" : msg.c_str());
  std::printf("real model cut in half: \"%s\"\n", msg.c_str());
  std::filesystem::remove(cut_path);
}

// ---- 4. the real model, when it is in the cache folder -----------------------------------------

// Genesis 1:1-13 (KJV, public domain).
const char* kPassage =
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n"
    "And God said, Let there be light: and there was light.\n"
    "And God saw the light, that it was good: and God divided the light from the darkness.\n"
    "And God called the light Day, and the darkness he called Night. And the evening and the morning were the first day.\n"
    "And God said, Let there be a firmament in the midst of the waters, and let it divide the waters from the waters.\n"
    "And God made the firmament, and divided the waters which were under the firmament from the waters which were above the firmament: and it was so.\n"
    "And God called the firmament Heaven. And the evening and the morning were the second day.\n"
    "And God said, Let the waters under the heaven be gathered together unto one place, and let the dry land appear: and it was so.\n"
    "And God called the dry land Earth; and the gathering together of the waters called he Seas: and God saw that it was good.\n"
    "And God said, Let the earth bring forth grass, the herb yielding seed, and the fruit tree yielding fruit after his kind, whose seed is in itself, upon the earth: and it was so.\n"
    "And the earth brought forth grass, and herb yielding seed after his kind, and the tree yielding fruit, whose seed was in itself, after his kind: and God saw that it was good.\n"
    "And the evening and the morning were the third day.\n";

template <class Policy>
double perplexity(const weights& W, const std::vector<std::int32_t>& toks, thread_pool& pool, Policy p,
                  std::uint32_t budget, const std::vector<std::int32_t>& boundary = {}) {
  const auto logits = run_engine(W, toks, 1, pool, std::move(p), budget, kvcache::passthrough{}, boundary);
  const std::uint32_t V = W.cfg.vocab;
  double nll = 0;
  for (std::size_t t = 0; t + 1 < toks.size(); ++t) {
    const float* l = logits.data() + t * V;
    const float mx = *std::max_element(l, l + V);
    double s = 0;
    for (std::uint32_t i = 0; i < V; ++i) s += std::exp(double(l[i]) - mx);
    nll -= double(l[toks[t + 1]]) - mx - std::log(s);
  }
  return std::exp(nll / double(toks.size() - 1));
}

std::string real_model_path() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  return (xdg && *xdg ? std::string(xdg) : std::string(home ? home : ".") + "/.cache") +
         "/kvcache/SmolLM2-135M-Instruct.Q4_1.gguf";
}

void test_real_model(const std::string& path) {
  auto f = gguf::file::open(path);
  if (!f) {  // missing: skip; present but unreadable (truncated, corrupt): a failure
    CHECK(f.error().code() == kvcache::errc::system_error, "the cached model is corrupt: %s",
          f.error().message().c_str());
    std::printf("real model: skipped (%s; scripts/fetch-model fetches it)\n", f.error().message().c_str());
    return;
  }
  tokenizer tok;
  CHECK(tok.init(*f).ok(), "tokenizer of the real model");
  auto w = load(*f);
  CHECK(w.ok(), "%s", w.ok() ? "" : w.error().message().c_str());
  if (!w) return;
  auto toks = tok.encode(kPassage);
  CHECK(toks.size() >= 256, "the passage has %zu tokens", toks.size());
  toks.resize(std::min<std::size_t>(toks.size(), 256));
  CHECK(tok.decode(toks).rfind("In the beginning God created", 0) == 0, "decode of the passage");
  thread_pool pool(2);
  const double full = perplexity(*w, toks, pool, kvcache::keep_all{}, 0);
  kvcache::heavy_hitter_config hc;
  hc.heavy = 64;
  hc.recent = 64;
  const double h2o = perplexity(*w, toks, pool, kvcache::heavy_hitter<kvcache::attention_signal>(hc), 128);
  std::printf("real model: perplexity of Genesis 1:1-13 (256 tokens): keep_all %.4f, heavy_hitter 50%% %.4f\n",
              full, h2o);
  // Recorded with this engine (fp32 weights from the Q4_1 file, fp32 K/V): 3.8955 and 3.9576.
  CHECK(std::fabs(full / 3.8955 - 1) < 0.01, "keep_all perplexity %g is not within 1%% of 3.8955", full);
  CHECK(h2o < full * 1.10, "heavy_hitter at 50%% (%g) is not within 10%% of keep_all (%g)", h2o, full);
  // SentenceKV (the paper's defaults: 32 sinks, 32 recent) at the same budget, its sentence ends
  // the tokenizer's single-token boundary strings
  const auto boundary = kvcache::sentence_boundary_ids([&](std::string_view piece) -> std::int32_t {
    const auto ids = tok.encode(std::string(piece));
    return ids.size() == 1 ? ids[0] : -1;
  });
  CHECK(!boundary.empty(), "no sentence boundary is a single token");
  const double skv = perplexity(*w, toks, pool, kvcache::sentence_kv{}, 128, boundary);
  std::printf("real model: sentence_kv 50%% %.4f (%zu boundary ids)\n", skv, boundary.size());
  CHECK(skv < full * 1.10, "sentence_kv at 50%% (%g) is not within 10%% of keep_all (%g)", skv, full);
}

}  // namespace

int main() {
  test_reader();
  test_tokenizer();
  test_forward();
  test_sentence_kv();
  test_model_files(real_model_path());
  test_real_model(real_model_path());
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all smollm checks passed\n");
  return 0;
}
