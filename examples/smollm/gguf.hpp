// SPDX-License-Identifier: Apache-2.0
//! @file
//! A GGUF (v2/v3) reader: header, metadata (every value type, arrays included), tensor infos,
//! alignment and data offset, over a read-only memory map of the file; and dequantization of
//! F32, F16, BF16, Q4_0, Q4_1 and Q8_0 rows to fp32 (block layouts as in ggml).
//!
//! Every malformed input (truncated file, bad magic, unknown type, a tensor outside the file,
//! absurd counts) is a `kvcache::status` from `file::open`, never a crash.
#pragma once

#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace smollm::gguf {

//! Metadata value types of the GGUF format.
enum class vtype : std::uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8,
  array = 9, u64 = 10, i64 = 11, f64 = 12,
};

//! ggml tensor types this reader knows the size of (dequantizable ones: see `dequantizable`).
enum class ttype : std::uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9, q2_k = 10,
  q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, q8_k = 15, bf16 = 30,
};

struct type_traits {
  const char* name;
  std::uint32_t block;       //!< values per block
  std::uint32_t block_bytes; //!< bytes per block
};

//! Block size and bytes of a tensor type; `name == nullptr` for an unknown type.
inline type_traits traits(std::uint32_t t) noexcept {
  switch (static_cast<ttype>(t)) {
    case ttype::f32: return {"F32", 1, 4};
    case ttype::f16: return {"F16", 1, 2};
    case ttype::bf16: return {"BF16", 1, 2};
    case ttype::q4_0: return {"Q4_0", 32, 18};
    case ttype::q4_1: return {"Q4_1", 32, 20};
    case ttype::q5_0: return {"Q5_0", 32, 22};
    case ttype::q5_1: return {"Q5_1", 32, 24};
    case ttype::q8_0: return {"Q8_0", 32, 34};
    case ttype::q8_1: return {"Q8_1", 32, 36};
    case ttype::q2_k: return {"Q2_K", 256, 84};
    case ttype::q3_k: return {"Q3_K", 256, 110};
    case ttype::q4_k: return {"Q4_K", 256, 144};
    case ttype::q5_k: return {"Q5_K", 256, 176};
    case ttype::q6_k: return {"Q6_K", 256, 210};
    case ttype::q8_k: return {"Q8_K", 256, 292};
  }
  return {nullptr, 0, 0};
}
inline bool dequantizable(std::uint32_t t) noexcept {
  switch (static_cast<ttype>(t)) {
    case ttype::f32: case ttype::f16: case ttype::bf16: case ttype::q4_0: case ttype::q4_1:
    case ttype::q8_0: return true;
    default: return false;
  }
}

//! One metadata value. Scalars in `u`/`i`/`f` (every integer also in `i` and `f`), strings in
//! `s`; arrays: `elem` is the element type, string arrays in `strs`, numeric/bool arrays in
//! `ints` and `nums`, arrays of arrays in `items`.
struct value {
  vtype type = vtype::u8;
  vtype elem = vtype::u8;
  std::uint64_t u = 0;
  std::int64_t i = 0;
  double f = 0;
  std::string s;
  std::vector<std::string> strs;
  std::vector<std::int64_t> ints;
  std::vector<double> nums;
  std::vector<value> items;
  [[nodiscard]] std::size_t size() const noexcept {
    return type != vtype::array ? 1 : elem == vtype::string ? strs.size()
                                  : elem == vtype::array    ? items.size()
                                                            : ints.size();
  }
};

struct tensor_info {
  std::string name;
  std::vector<std::uint64_t> dims;  //!< ne[0] first: dims[0] is the row length
  std::uint32_t type = 0;
  std::uint64_t offset = 0;         //!< from the start of the data section
  std::uint64_t bytes = 0;
  const std::byte* data = nullptr;  //!< in the map
  [[nodiscard]] std::uint64_t row_length() const noexcept { return dims.empty() ? 1 : dims[0]; }
  [[nodiscard]] std::uint64_t rows() const noexcept {
    std::uint64_t n = 1;
    for (std::size_t d = 1; d < dims.size(); ++d) n *= dims[d];
    return n;
  }
  [[nodiscard]] std::uint64_t elements() const noexcept { return row_length() * rows(); }
  [[nodiscard]] std::size_t row_bytes() const noexcept {
    const auto tr = traits(type);
    return static_cast<std::size_t>(row_length() / tr.block * tr.block_bytes);
  }
};

// ---- dequantization (ggml block layouts) -----------------------------------------------------

//! Decodes `n` values (a multiple of the type's block) of type `t` at `src` into `dst`.
//! The type must be dequantizable().
inline void dequantize(std::uint32_t t, const std::byte* src, float* dst, std::size_t n) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(src);
  auto h16 = [](const unsigned char* b) {
    std::uint16_t h;
    std::memcpy(&h, b, 2);
    return kvcache::half_to_float(h);
  };
  switch (static_cast<ttype>(t)) {
    case ttype::f32: std::memcpy(dst, p, n * 4); break;
    case ttype::f16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = h16(p + 2 * i);
      break;
    case ttype::bf16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t b;
        std::memcpy(&b, p + 2 * i, 2);
        const std::uint32_t w = std::uint32_t{b} << 16;
        std::memcpy(&dst[i], &w, 4);
      }
      break;
    case ttype::q4_0:  // {fp16 d; u8 qs[16]}: x = (q - 8) * d, low nibbles first
      for (std::size_t b = 0; b < n / 32; ++b, p += 18, dst += 32) {
        const float d = h16(p);
        for (int j = 0; j < 16; ++j) {
          dst[j] = static_cast<float>((p[2 + j] & 0x0F) - 8) * d;
          dst[j + 16] = static_cast<float>((p[2 + j] >> 4) - 8) * d;
        }
      }
      break;
    case ttype::q4_1:  // {fp16 d; fp16 m; u8 qs[16]}: x = q * d + m
      for (std::size_t b = 0; b < n / 32; ++b, p += 20, dst += 32) {
        const float d = h16(p), m = h16(p + 2);
        for (int j = 0; j < 16; ++j) {
          dst[j] = static_cast<float>(p[4 + j] & 0x0F) * d + m;
          dst[j + 16] = static_cast<float>(p[4 + j] >> 4) * d + m;
        }
      }
      break;
    case ttype::q8_0:  // {fp16 d; i8 qs[32]}: x = q * d
      for (std::size_t b = 0; b < n / 32; ++b, p += 34, dst += 32) {
        const float d = h16(p);
        for (int j = 0; j < 32; ++j) dst[j] = static_cast<float>(static_cast<std::int8_t>(p[2 + j])) * d;
      }
      break;
    default: break;
  }
}

// ---- the file --------------------------------------------------------------------------------

//! A parsed GGUF file over a read-only map. Move-only.
class file {
 public:
  file() = default;
  file(const file&) = delete;
  file& operator=(const file&) = delete;
  file(file&& o) noexcept { *this = std::move(o); }
  file& operator=(file&& o) noexcept {
    if (this != &o) {
      unmap();
      base_ = std::exchange(o.base_, nullptr);
      size_ = std::exchange(o.size_, 0);
      mapped_ = std::exchange(o.mapped_, false);
      owned_ = std::move(o.owned_);
      version = o.version;
      alignment = o.alignment;
      data_offset = o.data_offset;
      meta = std::move(o.meta);
      tensors = std::move(o.tensors);
      index_ = std::move(o.index_);
    }
    return *this;
  }
  ~file() { unmap(); }

  //! Maps and parses `path`.
  static kvcache::result<file> open(const std::string& path) {
    file f;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return sys_error("gguf: cannot open " + path);
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return sys_error("gguf: cannot stat " + path);
    }
    f.size_ = static_cast<std::size_t>(st.st_size);
    if (f.size_ == 0) {
      ::close(fd);
      return kvcache::status{kvcache::errc::invalid_argument, "gguf: " + path + " is empty"};
    }
    void* m = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (m == MAP_FAILED) return sys_error("gguf: cannot map " + path);
    f.base_ = static_cast<const std::byte*>(m);
    f.mapped_ = true;
    if (kvcache::status s = f.parse(path); !s) return s;
    return f;
  }
  //! Parses an in-memory image (tests); the bytes are copied.
  static kvcache::result<file> from_bytes(std::vector<std::byte> bytes, const std::string& what = "buffer") {
    file f;
    f.owned_ = std::move(bytes);
    f.base_ = f.owned_.data();
    f.size_ = f.owned_.size();
    if (kvcache::status s = f.parse(what); !s) return s;
    return f;
  }

  std::uint32_t version = 0;
  std::uint64_t alignment = 32;
  std::uint64_t data_offset = 0;
  std::map<std::string, value> meta;
  std::vector<tensor_info> tensors;

  [[nodiscard]] const value* find(const std::string& key) const {
    auto it = meta.find(key);
    return it == meta.end() ? nullptr : &it->second;
  }
  [[nodiscard]] const tensor_info* tensor(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors[it->second];
  }
  //! A numeric scalar as double; `fallback` when absent; an error when not numeric.
  [[nodiscard]] kvcache::result<double> number(const std::string& key, std::optional<double> fallback = {}) const {
    const value* v = find(key);
    if (!v) {
      if (fallback) return *fallback;
      return kvcache::status{kvcache::errc::invalid_argument, "gguf: missing metadata key " + key};
    }
    if (v->type == vtype::string || v->type == vtype::array)
      return kvcache::status{kvcache::errc::invalid_argument, "gguf: metadata " + key + " is not a number"};
    return v->f;
  }
  [[nodiscard]] std::size_t file_size() const noexcept { return size_; }

  //! Dequantizes a whole tensor to fp32 (`elements()` values).
  kvcache::status read_f32(const tensor_info& t, std::vector<float>& out) const {
    if (!dequantizable(t.type))
      return {kvcache::errc::invalid_argument,
              "gguf: tensor " + t.name + " has type " + type_name(t.type) + ", which this reader cannot dequantize"};
    out.resize(static_cast<std::size_t>(t.elements()));
    dequantize(t.type, t.data, out.data(), out.size());
    return {};
  }

  static std::string type_name(std::uint32_t t) {
    const auto tr = traits(t);
    return tr.name ? tr.name : "unknown(" + std::to_string(t) + ")";
  }

 private:
  static kvcache::status sys_error(const std::string& what) {
    return {kvcache::errc::system_error, what + ": " + std::strerror(errno)};
  }
  void unmap() noexcept {
    if (mapped_) ::munmap(const_cast<std::byte*>(base_), size_);
    mapped_ = false;
    base_ = nullptr;
    size_ = 0;
  }

  // A bounds-checked cursor; failures throw kvcache::error, caught in parse().
  struct cursor {
    const std::byte* p;
    std::size_t size, at = 0;
    void need(std::size_t n, const char* what) const {
      if (n > size - at)
        kvcache::raise(kvcache::errc::invalid_argument,
                       std::string("truncated file: ") + what + " at byte " + std::to_string(at) +
                           " needs " + std::to_string(n) + " bytes, file has " + std::to_string(size));
    }
    template <class T>
    T get(const char* what) {
      need(sizeof(T), what);
      T v;
      std::memcpy(&v, p + at, sizeof(T));
      at += sizeof(T);
      return v;
    }
    std::string str(const char* what) {
      const auto n = get<std::uint64_t>(what);
      need(n, what);
      std::string s(reinterpret_cast<const char*>(p + at), static_cast<std::size_t>(n));
      at += static_cast<std::size_t>(n);
      return s;
    }
  };

  static void scalar(cursor& c, vtype t, value& v) {
    v.type = t;
    auto set_u = [&](std::uint64_t x) { v.u = x; v.i = static_cast<std::int64_t>(x); v.f = static_cast<double>(x); };
    auto set_i = [&](std::int64_t x) { v.i = x; v.u = static_cast<std::uint64_t>(x); v.f = static_cast<double>(x); };
    switch (t) {
      case vtype::u8: set_u(c.get<std::uint8_t>("u8")); break;
      case vtype::i8: set_i(c.get<std::int8_t>("i8")); break;
      case vtype::u16: set_u(c.get<std::uint16_t>("u16")); break;
      case vtype::i16: set_i(c.get<std::int16_t>("i16")); break;
      case vtype::u32: set_u(c.get<std::uint32_t>("u32")); break;
      case vtype::i32: set_i(c.get<std::int32_t>("i32")); break;
      case vtype::u64: set_u(c.get<std::uint64_t>("u64")); break;
      case vtype::i64: set_i(c.get<std::int64_t>("i64")); break;
      case vtype::f32: v.f = c.get<float>("f32"); v.i = static_cast<std::int64_t>(v.f); break;
      case vtype::f64: v.f = c.get<double>("f64"); v.i = static_cast<std::int64_t>(v.f); break;
      case vtype::boolean: set_u(c.get<std::uint8_t>("bool") ? 1 : 0); break;
      case vtype::string: v.s = c.str("string"); break;
      case vtype::array: {
        const auto et = c.get<std::uint32_t>("array type");
        const auto n = c.get<std::uint64_t>("array length");
        if (et > 12)
          kvcache::raise(kvcache::errc::invalid_argument, "unknown array element type " + std::to_string(et));
        // every element takes at least one byte: a count beyond the file is corrupt
        if (n > c.size - c.at)
          kvcache::raise(kvcache::errc::invalid_argument, "truncated file: array of " + std::to_string(n) + " elements");
        v.elem = static_cast<vtype>(et);
        if (v.elem == vtype::string) {
          v.strs.reserve(static_cast<std::size_t>(n));
          for (std::uint64_t k = 0; k < n; ++k) v.strs.push_back(c.str("array string"));
        } else if (v.elem == vtype::array) {
          for (std::uint64_t k = 0; k < n; ++k) {
            value e;
            scalar(c, vtype::array, e);
            v.items.push_back(std::move(e));
          }
        } else {
          v.ints.reserve(static_cast<std::size_t>(n));
          v.nums.reserve(static_cast<std::size_t>(n));
          for (std::uint64_t k = 0; k < n; ++k) {
            value e;
            scalar(c, v.elem, e);
            v.ints.push_back(e.i);
            v.nums.push_back(e.f);
          }
        }
        break;
      }
      default:
        kvcache::raise(kvcache::errc::invalid_argument,
                       "unknown metadata value type " + std::to_string(static_cast<std::uint32_t>(t)));
    }
  }

  kvcache::status parse(const std::string& what) {
    try {
      cursor c{base_, size_};
      const auto magic = c.get<std::uint32_t>("magic");
      if (magic != 0x46554747u)  // "GGUF" little endian
        return {kvcache::errc::invalid_argument, "gguf: " + what + " is not a GGUF file (bad magic)"};
      version = c.get<std::uint32_t>("version");
      if (version != 2 && version != 3)
        return {kvcache::errc::invalid_argument,
                "gguf: " + what + ": unsupported GGUF version " + std::to_string(version)};
      const auto n_tensors = c.get<std::uint64_t>("tensor count");
      const auto n_kv = c.get<std::uint64_t>("metadata count");
      if (n_tensors > size_ / 8 || n_kv > size_ / 8)
        return {kvcache::errc::invalid_argument, "gguf: " + what + ": corrupt header (absurd counts)"};
      for (std::uint64_t k = 0; k < n_kv; ++k) {
        std::string key = c.str("metadata key");
        const auto t = c.get<std::uint32_t>("metadata type");
        if (t > 12)
          return {kvcache::errc::invalid_argument,
                  "gguf: " + what + ": metadata " + key + " has unknown type " + std::to_string(t)};
        value v;
        scalar(c, static_cast<vtype>(t), v);
        meta[std::move(key)] = std::move(v);
      }
      if (const value* a = find("general.alignment")) {
        if (a->type == vtype::string || a->type == vtype::array || a->u == 0 || (a->u & (a->u - 1)) != 0)
          return {kvcache::errc::invalid_argument, "gguf: " + what + ": bad general.alignment"};
        alignment = a->u;
      }
      tensors.reserve(static_cast<std::size_t>(n_tensors));
      for (std::uint64_t k = 0; k < n_tensors; ++k) {
        tensor_info ti;
        ti.name = c.str("tensor name");
        const auto nd = c.get<std::uint32_t>("tensor dims");
        if (nd == 0 || nd > 4)
          return {kvcache::errc::invalid_argument,
                  "gguf: " + what + ": tensor " + ti.name + " has " + std::to_string(nd) + " dims"};
        std::uint64_t elements = 1;  // checked as it grows: no wrap-around
        for (std::uint32_t d = 0; d < nd; ++d) {
          ti.dims.push_back(c.get<std::uint64_t>("tensor dim"));
          const std::uint64_t dim = ti.dims.back();
          if (dim == 0 || dim > (std::uint64_t{1} << 40) || elements > (std::uint64_t{1} << 40) / dim)
            return {kvcache::errc::invalid_argument, "gguf: " + what + ": tensor " + ti.name + " has a bad shape"};
          elements *= dim;
        }
        ti.type = c.get<std::uint32_t>("tensor type");
        ti.offset = c.get<std::uint64_t>("tensor offset");
        const auto tr = traits(ti.type);
        if (!tr.name)
          return {kvcache::errc::invalid_argument, "gguf: " + what + ": tensor " + ti.name +
                                                       " has unknown type " + std::to_string(ti.type)};
        if (ti.row_length() % tr.block != 0)
          return {kvcache::errc::invalid_argument,
                  "gguf: " + what + ": tensor " + ti.name + " row of " + std::to_string(ti.row_length()) +
                      " is not a multiple of the " + tr.name + " block " + std::to_string(tr.block)};
        if (ti.elements() > (std::uint64_t{1} << 40))
          return {kvcache::errc::invalid_argument, "gguf: " + what + ": tensor " + ti.name + " is too large"};
        ti.bytes = ti.elements() / tr.block * tr.block_bytes;
        if (index_.count(ti.name))
          return {kvcache::errc::invalid_argument, "gguf: " + what + ": duplicate tensor " + ti.name};
        index_[ti.name] = tensors.size();
        tensors.push_back(std::move(ti));
      }
      data_offset = (c.at + alignment - 1) / alignment * alignment;
      for (auto& t : tensors) {
        if (t.offset % alignment != 0)
          return {kvcache::errc::invalid_argument, "gguf: " + what + ": tensor " + t.name + " is misaligned"};
        if (data_offset > size_ || t.offset > size_ - data_offset || t.bytes > size_ - data_offset - t.offset)
          return {kvcache::errc::invalid_argument,
                  "gguf: " + what + ": tensor " + t.name + " (" + std::to_string(t.bytes) + " bytes at " +
                      std::to_string(data_offset + t.offset) + ") lies outside the file of " +
                      std::to_string(size_) + " bytes (truncated?)"};
        t.data = base_ + data_offset + t.offset;
      }
    } catch (const kvcache::error& e) {
      return {e.code(), "gguf: " + what + ": " + e.what()};
    } catch (const std::bad_alloc&) {
      return {kvcache::errc::invalid_argument, "gguf: " + what + ": corrupt (allocation failed)"};
    }
    return {};
  }

  const std::byte* base_ = nullptr;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::vector<std::byte> owned_;
  std::map<std::string, std::size_t> index_;
};

}  // namespace smollm::gguf
