// SPDX-License-Identifier: Apache-2.0
//! @file
//! `slot_table`: per (sequence, layer) metadata mapping token slots to original positions,
//! per KV head. Kept apart from the K/V bytes it describes.
//!
//! Slots are rows of the layer's K/V range. Each head fills its own rows: an evicted slot becomes
//! a hole that the head's next token is written into (no data moves); otherwise the head's
//! frontier row advances. Heads may therefore hold different tokens in the same row.
#pragma once

#include <kvcache/config.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

class slot_table {
 public:
  static constexpr std::int32_t empty = -1;

  slot_table() = default;
  slot_table(std::uint32_t heads, std::uint32_t capacity)
      : heads_(heads), capacity_(capacity), live_(heads, 0), frontier_(heads, 0), holes_(heads) {}

  [[nodiscard]] std::uint32_t heads() const noexcept { return heads_; }
  [[nodiscard]] std::uint32_t capacity() const noexcept { return capacity_; }
  //! Rows in use: the highest frontier over heads. Kernels read rows [0, rows()).
  [[nodiscard]] std::uint32_t rows() const noexcept { return rows_; }
  [[nodiscard]] std::uint32_t live(std::uint32_t head) const noexcept { return live_[head]; }
  [[nodiscard]] const std::uint32_t* live_data() const noexcept { return live_.data(); }
  [[nodiscard]] std::uint32_t frontier(std::uint32_t head) const noexcept { return frontier_[head]; }
  [[nodiscard]] const std::vector<std::uint32_t>& holes(std::uint32_t head) const noexcept {
    return holes_[head];
  }
  //! Original position of the token in (slot, head), or `empty`.
  [[nodiscard]] std::int32_t position(std::uint32_t slot, std::uint32_t head) const noexcept {
    return pos_[std::size_t{slot} * heads_ + head];
  }
  //! `[rows][heads]` positions, -1 for empty slots.
  [[nodiscard]] const std::int32_t* positions() const noexcept { return pos_.data(); }
  //! Total live (slot, head) entries.
  [[nodiscard]] std::uint64_t live_total() const noexcept {
    std::uint64_t s = 0;
    for (auto l : live_) s += l;
    return s;
  }
  //! True when every row below rows() is live in every head (kernels may skip masking).
  [[nodiscard]] bool dense() const noexcept { return live_total() == std::uint64_t{rows_} * heads_; }

  //! Slots that `head` can still take: holes plus rows above its frontier.
  [[nodiscard]] std::uint32_t room(std::uint32_t head) const noexcept {
    return static_cast<std::uint32_t>(holes_[head].size()) + (capacity_ - frontier_[head]);
  }

  //! The slot the i-th next token of `head` would take (i < room(head)), without taking it:
  //! holes first (most recently freed first), then the frontier.
  [[nodiscard]] std::uint32_t peek(std::uint32_t head, std::uint32_t i) const noexcept {
    const auto& h = holes_[head];
    if (i < h.size()) return h[h.size() - 1 - i];
    return frontier_[head] + (i - static_cast<std::uint32_t>(h.size()));
  }

  //! Puts the token at `position` into the slot peek(head, 0) names; returns that slot.
  std::uint32_t place(std::uint32_t head, std::int32_t position) {
    std::uint32_t slot;
    if (!holes_[head].empty()) {
      slot = holes_[head].back();
      holes_[head].pop_back();
    } else {
      slot = frontier_[head]++;
      if (slot >= rows_) {
        rows_ = slot + 1;
        pos_.resize(std::size_t{rows_} * heads_, empty);
      }
    }
    pos_[std::size_t{slot} * heads_ + head] = position;
    ++live_[head];
    return slot;
  }

  //! True when no head has holes and all frontiers are equal: the next tokens of every head go
  //! to the same consecutive rows (the common case, served by place_rows()).
  [[nodiscard]] bool aligned() const noexcept {
    for (std::uint32_t h = 0; h < heads_; ++h)
      if (!holes_[h].empty() || frontier_[h] != frontier_[0]) return false;
    return true;
  }

  //! Places n tokens at positions first..first+n-1 in rows frontier..frontier+n-1 of every head.
  //! Precondition: aligned() and room for n.
  void place_rows(std::uint32_t n, std::int32_t first) {
    const std::uint32_t f = frontier_[0];
    KVCACHE_ASSERT(aligned() && f + n <= capacity_);
    if (f + n > rows_) {
      rows_ = f + n;
      pos_.resize(std::size_t{rows_} * heads_, empty);
    }
    std::int32_t* p = pos_.data() + std::size_t{f} * heads_;
    for (std::uint32_t i = 0; i < n; ++i)
      for (std::uint32_t h = 0; h < heads_; ++h) *p++ = first + static_cast<std::int32_t>(i);
    for (std::uint32_t h = 0; h < heads_; ++h) {
      frontier_[h] += n;
      live_[h] += n;
    }
  }

  //! Evicts the token in (slot, head); the slot becomes a hole.
  void vacate(std::uint32_t head, std::uint32_t slot) {
    auto& p = pos_[std::size_t{slot} * heads_ + head];
    KVCACHE_ASSERT(p != empty);
    p = empty;
    --live_[head];
    holes_[head].push_back(slot);
  }

  //! Grows the reservation for rows (so appends do not reallocate metadata on the hot path).
  void reserve(std::uint32_t rows) { pos_.reserve(std::size_t{rows} * heads_); }

 private:
  std::uint32_t heads_ = 0;
  std::uint32_t capacity_ = 0;
  std::uint32_t rows_ = 0;
  std::vector<std::int32_t> pos_;  // [row][head]
  std::vector<std::uint32_t> live_;
  std::vector<std::uint32_t> frontier_;
  std::vector<std::vector<std::uint32_t>> holes_;  // per head, a stack of evicted slots
};

KVCACHE_NAMESPACE_END
