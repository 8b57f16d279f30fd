// SPDX-License-Identifier: Apache-2.0
//! @file
//! The page bookkeeping every virtual-memory backend shares (host memfd pages, CUDA handles):
//! reference counts and the free list, best-fit choice among idle ranges, and the exact count of
//! pages that reclaiming idle ranges would free. Pure metadata: no mapping calls here.
#pragma once

#include <kvcache/config.hpp>

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

using page_id = std::uint32_t;
inline constexpr page_id no_page = ~page_id{0};

//! Reference counts (one per mapping) and the free list of a pool of `pages` pages.
class page_refs {
 public:
  page_refs() = default;
  explicit page_refs(std::size_t pages) : refs_(pages, 0) {
    free_.reserve(pages);
    // Descending, so pops come out ascending: fresh runs are contiguous in the pool.
    for (std::size_t i = pages; i-- > 0;) free_.push_back(static_cast<page_id>(i));
  }

  [[nodiscard]] std::size_t pages() const noexcept { return refs_.size(); }
  [[nodiscard]] std::size_t free_pages() const noexcept { return free_.size(); }
  [[nodiscard]] std::uint32_t refs(page_id p) const noexcept { return refs_[p]; }
  [[nodiscard]] const std::vector<page_id>& free_list() const noexcept { return free_; }
  //! Pages mapped in more than one place.
  [[nodiscard]] std::size_t shared() const noexcept {
    std::size_t n = 0;
    for (auto c : refs_) n += c > 1;
    return n;
  }

  //! Takes a free page with one reference. Precondition: free_pages() > 0.
  page_id take() noexcept {
    KVCACHE_ASSERT(!free_.empty());
    const page_id p = free_.back();
    free_.pop_back();
    refs_[p] = 1;
    return p;
  }
  void retain(page_id p) noexcept {
    KVCACHE_ASSERT(refs_[p] > 0);
    ++refs_[p];
  }
  //! Drops one reference; returns true when the page went back to the free list.
  bool release(page_id p) noexcept {
    KVCACHE_ASSERT(refs_[p] > 0);
    if (--refs_[p] != 0) return false;
    free_.push_back(p);
    return true;
  }

 private:
  std::vector<std::uint32_t> refs_;  // metadata apart from the data it describes
  std::vector<page_id> free_;
};

//! vAttention's best fit among idle ranges of capacity `capacity`: the fewest mapped pages that
//! still cover `want` pages; when none covers it (or want is 0, unknown), the most mapped.
//! Ranges are records with `.mapped`; `capacity_of(rec)` gives a record's capacity in bytes.
template <class Rec, class CapacityOf>
std::uint32_t best_fit(const std::vector<std::uint32_t>& idle, const std::vector<Rec>& ranges,
                       std::size_t capacity, std::size_t want, CapacityOf capacity_of) {
  constexpr std::uint32_t none = ~std::uint32_t{0};
  std::uint32_t best = none;
  for (std::uint32_t r : idle) {
    const auto& rec = ranges[r];
    if (capacity_of(rec) != capacity) continue;
    if (best == none) {
      best = r;
      continue;
    }
    const std::size_t m = rec.mapped, bm = ranges[best].mapped;
    const bool covers = want > 0 && m >= want, best_covers = want > 0 && bm >= want;
    if (covers != best_covers ? covers : (covers ? m < bm : m > bm)) best = r;
  }
  return best;
}

//! Pages that unmapping every idle range would free: those all of whose mappings are idle.
//! Ranges are records with `.table` (page index -> page id or no_page).
template <class Rec>
std::size_t reclaimable_pages(const std::vector<std::uint32_t>& idle, const std::vector<Rec>& ranges,
                              const page_refs& refs) {
  std::unordered_map<page_id, std::uint32_t> idle_maps;
  for (std::uint32_t r : idle)
    for (page_id p : ranges[r].table)
      if (p != no_page) ++idle_maps[p];
  std::size_t n = 0;
  for (auto [p, c] : idle_maps) n += c == refs.refs(p);
  return n;
}

KVCACHE_NAMESPACE_END
