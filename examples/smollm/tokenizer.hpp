// SPDX-License-Identifier: Apache-2.0
//! @file
//! Byte-level BPE (GPT-2 style) from a GGUF's `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`.
//!
//! Pre-tokenizer: SmolLM2's (`tokenizer.ggml.pre = smollm`, llama.cpp's regexes
//! `\p{N}` then `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`):
//! every digit is its own piece, then GPT-2's split within each piece (so `\s+(?!\S)` takes a
//! whole run of whitespace before a digit, as llama.cpp does). Implemented by hand, without a
//! Unicode database. Differences from the reference (none for ASCII text such as the KJV):
//!  - \p{L}: ASCII letters and every non-ASCII code point except those listed below;
//!  - \p{N}: ASCII digits, ¹²³¼½¾; other Unicode digits (Arabic-Indic, fullwidth, ...) count as L;
//!  - punctuation/symbols: ASCII ones, U+00A1..U+00BF (but ª µ º), × ÷, and U+2010..U+206F;
//!    other Unicode punctuation (CJK, fullwidth) counts as L;
//!  - whitespace: ASCII \t\n\v\f\r and space, U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028,
//!    U+2029, U+202F, U+205F, U+3000.
//!  - contractions ('s, 't, ...) are matched case-sensitively, as in GPT-2's regex.
//! Control tokens (`tokenizer.ggml.token_type` 3, e.g. `<|im_start|>`) in the text are matched
//! literally when `parse_special` is set, as llama.cpp does for chat prompts.
#pragma once

#include "gguf.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace smollm {

class tokenizer {
 public:
  tokenizer() = default;

  //! From vocabulary and merges (`"left right"` strings, in rank order); ids are indices.
  kvcache::status init(std::vector<std::string> tokens, const std::vector<std::string>& merges,
                       std::vector<std::int64_t> token_types = {}) {
    tokens_ = std::move(tokens);
    types_ = std::move(token_types);
    if (tokens_.empty()) return {kvcache::errc::invalid_argument, "tokenizer: empty vocabulary"};
    vocab_.clear();
    vocab_.reserve(tokens_.size());
    for (std::size_t i = 0; i < tokens_.size(); ++i)
      vocab_.emplace(tokens_[i], static_cast<std::int32_t>(i));
    ranks_.clear();
    ranks_.reserve(merges.size());
    for (std::size_t i = 0; i < merges.size(); ++i) {
      if (merges[i].find(' ') == std::string::npos)
        return {kvcache::errc::invalid_argument, "tokenizer: merge " + std::to_string(i) + " '" +
                                                     merges[i] + "' has no space"};
      ranks_.emplace(merges[i], static_cast<std::int32_t>(i));
    }
    // GPT-2's byte <-> unicode map: printable bytes map to themselves, others to U+0100.. .
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const std::uint32_t cp = keep ? static_cast<std::uint32_t>(b) : 256u + static_cast<std::uint32_t>(n++);
      byte_enc_[b] = utf8(cp);
      byte_dec_[cp] = static_cast<unsigned char>(b);
    }
    specials_.clear();
    for (std::size_t i = 0; i < types_.size() && i < tokens_.size(); ++i)
      if ((types_[i] == 3 || types_[i] == 4) && !tokens_[i].empty())
        specials_.push_back(static_cast<std::int32_t>(i));
    std::sort(specials_.begin(), specials_.end(), [&](std::int32_t a, std::int32_t b) {
      return tokens_[a].size() > tokens_[b].size();  // longest first
    });
    return {};
  }

  //! From a GGUF's tokenizer metadata.
  kvcache::status init(const gguf::file& f) {
    const gguf::value* model = f.find("tokenizer.ggml.model");
    if (model && model->s != "gpt2")
      return {kvcache::errc::invalid_argument,
              "tokenizer: model '" + model->s + "' is not byte-level BPE (gpt2)"};
    const gguf::value* toks = f.find("tokenizer.ggml.tokens");
    const gguf::value* merges = f.find("tokenizer.ggml.merges");
    if (!toks || toks->elem != gguf::vtype::string || !merges || merges->elem != gguf::vtype::string)
      return {kvcache::errc::invalid_argument, "tokenizer: the GGUF lacks tokenizer.ggml.tokens/merges"};
    const gguf::value* types = f.find("tokenizer.ggml.token_type");
    KVCACHE_TRY(init(toks->strs, merges->strs, types ? types->ints : std::vector<std::int64_t>{}));
    if (const auto* b = f.find("tokenizer.ggml.bos_token_id")) bos = static_cast<std::int32_t>(b->i);
    if (const auto* e = f.find("tokenizer.ggml.eos_token_id")) eos = static_cast<std::int32_t>(e->i);
    if (const auto* a = f.find("tokenizer.ggml.add_bos_token")) add_bos = a->u != 0;
    return {};
  }

  std::int32_t bos = -1, eos = -1;
  bool add_bos = false;
  [[nodiscard]] std::size_t size() const noexcept { return tokens_.size(); }
  [[nodiscard]] const std::string& piece(std::int32_t id) const { return tokens_.at(static_cast<std::size_t>(id)); }

  //! Splits text into pre-tokens (the regex above), in order.
  static std::vector<std::string> pre_tokenize(std::string_view text) {
    std::vector<std::uint32_t> cps;
    std::vector<std::size_t> at;  // byte offset of each code point
    for (std::size_t i = 0; i < text.size();) {
      at.push_back(i);
      cps.push_back(next_cp(text, i));
    }
    at.push_back(text.size());
    std::vector<std::string> out;
    const std::size_t n = cps.size();
    auto emit = [&](std::size_t a, std::size_t b) { out.emplace_back(text.substr(at[a], at[b] - at[a])); };
    std::size_t i = 0;
    while (i < n) {
      const cls c = classify(cps[i]);
      if (c == cls::digit) {  // \p{N}: one digit per piece
        emit(i, i + 1);
        ++i;
        continue;
      }
      if (cps[i] == '\'' && i + 1 < n) {  // contractions
        const auto is = [&](std::size_t k, char ch) { return i + k < n && cps[i + k] == static_cast<std::uint32_t>(ch); };
        std::size_t len = 0;
        if (is(1, 's') || is(1, 't') || is(1, 'm') || is(1, 'd')) len = 2;
        else if ((is(1, 'r') && is(2, 'e')) || (is(1, 'v') && is(2, 'e')) || (is(1, 'l') && is(2, 'l'))) len = 3;
        if (len) {
          emit(i, i + len);
          i += len;
          continue;
        }
      }
      // ` ?X+` with an optional leading space (' ' only, as in the regex)
      std::size_t j = i;
      if (cps[j] == ' ' && j + 1 < n && classify(cps[j + 1]) != cls::space) ++j;
      const cls k = classify(cps[j]);
      if (k == cls::letter || k == cls::punct) {
        std::size_t e = j + 1;
        while (e < n && classify(cps[e]) == k) ++e;
        emit(i, e);
        i = e;
        continue;
      }
      if (k == cls::digit) {  // " 5": the space stands alone (digits were split before)
        emit(i, j);
        i = j;
        continue;
      }
      // whitespace: `\s+(?!\S)` leaves the last space for the next word, else `\s+`. llama.cpp
      // runs the second regex on each piece the `\p{N}` split left, so before a digit (the end of
      // a piece) the lookahead sees nothing and the whole run is one pre-token.
      std::size_t e = i;
      while (e < n && classify(cps[e]) == cls::space) ++e;
      if (e < n && e - i > 1 && classify(cps[e]) != cls::digit) --e;  // followed by L/P: give one back
      emit(i, e);
      i = e;
    }
    return out;
  }

  //! Encodes UTF-8 text. `parse_special`: control tokens written in the text become their ids.
  [[nodiscard]] std::vector<std::int32_t> encode(std::string_view text, bool parse_special = false) const {
    std::vector<std::int32_t> ids;
    if (add_bos && bos >= 0) ids.push_back(bos);
    std::size_t start = 0;
    while (start <= text.size()) {
      std::size_t hit = text.size();
      std::int32_t hit_id = -1;
      if (parse_special)
        for (std::int32_t s : specials_) {
          const std::size_t p = text.find(tokens_[s], start);
          if (p != std::string_view::npos && p < hit) hit = p, hit_id = s;
        }
      for (const auto& w : pre_tokenize(text.substr(start, hit - start))) bpe(w, ids);
      if (hit_id < 0) break;
      ids.push_back(hit_id);
      start = hit + tokens_[hit_id].size();
    }
    return ids;
  }

  //! Decodes ids to UTF-8 (control tokens as their text).
  [[nodiscard]] std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string out;
    for (std::int32_t id : ids) out += decode(id);
    return out;
  }
  [[nodiscard]] std::string decode(std::int32_t id) const {
    if (id < 0 || static_cast<std::size_t>(id) >= tokens_.size()) return {};
    const std::string& t = tokens_[static_cast<std::size_t>(id)];
    if (static_cast<std::size_t>(id) < types_.size() && (types_[id] == 3 || types_[id] == 4)) return t;
    std::string out;
    std::string_view sv(t);
    for (std::size_t i = 0; i < sv.size();) {
      const std::uint32_t cp = next_cp(sv, i);
      auto it = byte_dec_.find(cp);
      if (it != byte_dec_.end()) out.push_back(static_cast<char>(it->second));
      else out += utf8(cp);
    }
    return out;
  }

 private:
  enum class cls { letter, digit, punct, space };
  static cls classify(std::uint32_t c) {
    if (c < 128) {
      if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return cls::letter;
      if (c >= '0' && c <= '9') return cls::digit;
      if (c == ' ' || (c >= 9 && c <= 13)) return cls::space;
      return cls::punct;
    }
    if (c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
        c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000)
      return cls::space;
    if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE)) return cls::digit;
    if ((c >= 0xA1 && c <= 0xBF && c != 0xAA && c != 0xB5 && c != 0xBA) || c == 0xD7 || c == 0xF7 ||
        (c >= 0x2010 && c <= 0x206F) || c < 0xA0)
      return cls::punct;
    return cls::letter;
  }
  static std::uint32_t next_cp(std::string_view s, std::size_t& i) {
    const auto b = static_cast<unsigned char>(s[i]);
    int len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 1;
    if (i + static_cast<std::size_t>(len) > s.size()) len = 1;
    std::uint32_t cp = len == 1 ? b : len == 2 ? (b & 0x1Fu) : len == 3 ? (b & 0x0Fu) : (b & 0x07u);
    for (int k = 1; k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      if ((c & 0xC0) != 0x80) {  // invalid sequence: take the lead byte alone
        len = 1;
        cp = b;
        break;
      }
      cp = (cp << 6) | (c & 0x3Fu);
    }
    i += static_cast<std::size_t>(len);
    return cp;
  }
  static std::string utf8(std::uint32_t cp) {
    std::string s;
    if (cp < 0x80) s.push_back(static_cast<char>(cp));
    else if (cp < 0x800) {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      s.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      s.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      s.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    return s;
  }

  // BPE over one pre-token: its bytes as byte-level symbols, merged by rank.
  void bpe(const std::string& word, std::vector<std::int32_t>& ids) const {
    std::vector<std::string> sym;
    sym.reserve(word.size());
    for (unsigned char b : word) sym.push_back(byte_enc_[b]);
    std::string key;
    while (sym.size() > 1) {
      std::int32_t best = std::numeric_limits<std::int32_t>::max();
      std::size_t at = 0;
      for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
        key.assign(sym[i]).append(1, ' ').append(sym[i + 1]);
        auto it = ranks_.find(key);
        if (it != ranks_.end() && it->second < best) best = it->second, at = i;
      }
      if (best == std::numeric_limits<std::int32_t>::max()) break;
      sym[at] += sym[at + 1];
      sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    for (const auto& s : sym) {
      auto it = vocab_.find(s);
      if (it != vocab_.end()) {
        ids.push_back(it->second);
        continue;
      }
      // not in the vocabulary (a malformed vocabulary): fall back to its single bytes
      std::string_view sv(s);
      for (std::size_t i = 0; i < sv.size();) {
        const std::size_t i0 = i;
        next_cp(sv, i);
        auto b = vocab_.find(std::string(sv.substr(i0, i - i0)));
        if (b != vocab_.end()) ids.push_back(b->second);
      }
    }
  }

  std::vector<std::string> tokens_;
  std::vector<std::int64_t> types_;
  std::unordered_map<std::string, std::int32_t> vocab_;
  std::unordered_map<std::string, std::int32_t> ranks_;
  std::string byte_enc_[256];
  std::unordered_map<std::uint32_t, unsigned char> byte_dec_;
  std::vector<std::int32_t> specials_;
};

}  // namespace smollm
