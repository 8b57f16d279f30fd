// SPDX-License-Identifier: Apache-2.0
//! @file
//! What an attention kernel gets: a view of one (sequence, layer), and a batch view over many
//! sequences (pointer arrays and lengths, the shape varlen kernels take).
//!
//! A view is valid until the next mutating call on its sequence (append, evict, fork, close):
//! the bytes stay put (virtual-memory backends never move them), but lengths and positions move
//! on, and the heap baseline may move the bytes.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/geometry.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

struct layer_view {
  std::byte* k = nullptr;  //!< K codes, slot (s, head h) at k + s*slot_stride + h*head_stride
  std::byte* v = nullptr;  //!< V codes, same strides as K
  std::size_t slot_stride = 0;
  std::size_t head_stride = 0;
  std::size_t row_bytes = 0;  //!< bytes of one (slot, head) row of codes
  //! Out-of-band quantization metadata, `scale_bytes` per (slot, head) at
  //! `[slot][kv_head]`; null when the format has none.
  const std::byte* k_scales = nullptr;
  const std::byte* v_scales = nullptr;
  std::size_t scale_bytes = 0;

  dtype type = dtype::f16;  //!< element type the engine appends (and what passthrough stores)
  layout order = layout::token_major;
  std::uint32_t kv_heads = 0;
  std::uint32_t head_dim = 0;

  std::uint32_t rows = 0;                  //!< slots in use: kernels read slots [0, rows)
  const std::int32_t* positions = nullptr;  //!< `[rows][kv_heads]`, -1 marks an empty slot
  const std::uint32_t* live = nullptr;      //!< `[kv_heads]` live tokens per head
  std::int64_t next_position = 0;           //!< tokens appended to this layer so far
  bool dense = true;  //!< every slot below rows is live in every head: no masking needed

  [[nodiscard]] std::int32_t position(std::uint32_t slot, std::uint32_t head) const noexcept {
    return positions[std::size_t{slot} * kv_heads + head];
  }
  [[nodiscard]] std::size_t offset(std::uint32_t slot, std::uint32_t head) const noexcept {
    return slot * slot_stride + head * head_stride;
  }
  [[nodiscard]] const std::byte* k_row(std::uint32_t slot, std::uint32_t head) const noexcept {
    return k + offset(slot, head);
  }
  [[nodiscard]] const std::byte* v_row(std::uint32_t slot, std::uint32_t head) const noexcept {
    return v + offset(slot, head);
  }
  [[nodiscard]] const std::byte* k_scale(std::uint32_t slot, std::uint32_t head) const noexcept {
    return k_scales ? k_scales + (std::size_t{slot} * kv_heads + head) * scale_bytes : nullptr;
  }
  [[nodiscard]] const std::byte* v_scale(std::uint32_t slot, std::uint32_t head) const noexcept {
    return v_scales ? v_scales + (std::size_t{slot} * kv_heads + head) * scale_bytes : nullptr;
  }
};

//! One layer of many sequences: entry i describes the i-th requested sequence. Strides and
//! formats are common to all entries.
struct batch_view {
  std::vector<std::byte*> k;
  std::vector<std::byte*> v;
  std::vector<std::uint32_t> rows;                //!< per sequence: slots in use
  std::vector<const std::int32_t*> positions;    //!< per sequence: `[rows][kv_heads]`
  std::vector<std::int32_t> cu_rows;              //!< prefix sums of rows (size n+1), varlen style
  std::size_t slot_stride = 0;
  std::size_t head_stride = 0;
  std::size_t row_bytes = 0;
  dtype type = dtype::f16;
  layout order = layout::token_major;
  std::uint32_t kv_heads = 0;
  std::uint32_t head_dim = 0;
  bool dense = true;  //!< all entries dense

  [[nodiscard]] std::size_t size() const noexcept { return k.size(); }
};

KVCACHE_NAMESPACE_END
