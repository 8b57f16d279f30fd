// SPDX-License-Identifier: Apache-2.0
//! @file
//! Helpers shared by the unit tests (not part of the library).
#pragma once

#include <kvcache/core/error.hpp>
#include <kvcache/memory/backend.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kvtest {

//! The code of the kvcache::error that f throws, or nullopt when it throws none.
template <class F>
std::optional<kvcache::errc> thrown_code(F&& f, std::string* what = nullptr) {
  try {
    f();
  } catch (const kvcache::error& e) {
    if (what) *what = e.what();
    return e.code();
  }
  return std::nullopt;
}

//! "" when equal, else the fields that differ (so a failed CHECK shows them).
inline std::string stats_diff(const kvcache::memory_stats& a, const kvcache::memory_stats& b) {
  std::string d;
  auto f = [&](const char* name, std::size_t x, std::size_t y) {
    if (x != y) d += std::string(name) + ": " + std::to_string(x) + " -> " + std::to_string(y) + "; ";
  };
  f("page_size", a.page_size, b.page_size);
  f("pages_total", a.pages_total, b.pages_total);
  f("pages_free", a.pages_free, b.pages_free);
  f("pages_mapped", a.pages_mapped, b.pages_mapped);
  f("pages_idle", a.pages_idle, b.pages_idle);
  f("pages_shared", a.pages_shared, b.pages_shared);
  f("ranges_active", a.ranges_active, b.ranges_active);
  f("ranges_idle", a.ranges_idle, b.ranges_idle);
  f("bytes_reserved", a.bytes_reserved, b.bytes_reserved);
  f("map_calls", a.map_calls, b.map_calls);
  f("pages_mapped_total", a.pages_mapped_total, b.pages_mapped_total);
  f("pages_unmapped_total", a.pages_unmapped_total, b.pages_unmapped_total);
  f("pages_reclaimed", a.pages_reclaimed, b.pages_reclaimed);
  f("cow_copies", a.cow_copies, b.cow_copies);
  f("ranges_reused", a.ranges_reused, b.ranges_reused);
  f("pages_mapped_ahead", a.pages_mapped_ahead, b.pages_mapped_ahead);
  f("ahead_skipped", a.ahead_skipped, b.ahead_skipped);
  return d;
}

//! A byte pattern that differs between seeds and along the bytes (also across pages).
inline std::byte pattern_byte(std::uint32_t seed, std::size_t i) {
  std::uint64_t x = (std::uint64_t{seed} << 40) ^ i;
  x ^= x >> 29;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 32;
  return static_cast<std::byte>(x & 0xff);
}
inline void fill(std::byte* p, std::size_t n, std::uint32_t seed, std::size_t from = 0) {
  for (std::size_t i = 0; i < n; ++i) p[i] = pattern_byte(seed, from + i);
}
//! True when p[0, n) holds fill(.., seed, from).
inline bool holds(const std::byte* p, std::size_t n, std::uint32_t seed, std::size_t from = 0) {
  for (std::size_t i = 0; i < n; ++i)
    if (p[i] != pattern_byte(seed, from + i)) return false;
  return true;
}
inline std::vector<std::byte> copy_of(const std::byte* p, std::size_t n) {
  return std::vector<std::byte>(p, p + n);
}

}  // namespace kvtest
