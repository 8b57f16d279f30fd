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
  //! Out-of-band quantization metadata of (slot s, head h) at
  //! `k_scales + s*scale_slot_stride + h*scale_head_stride` (`k_scale(s, h)`); null when the
  //! format has none. Per-row formats (KIVI groups: `[groups]` fp16 scales then `[groups]` fp16
  //! zeros) lay it out like the codes, `scale_bytes` per row, in a range of its own. Formats with
  //! one fp32 scale per layer (fp8 per layer) have both strides 0; per KV head (fp8 per head), a
  //! slot stride of 0 and a head stride of 4. llama.cpp blocks keep their fp16 scale in band.
  const std::byte* k_scales = nullptr;
  const std::byte* v_scales = nullptr;
  std::size_t scale_bytes = 0;        //!< bytes of metadata per (slot, head) row; 0 when shared
  std::size_t scale_slot_stride = 0;
  std::size_t scale_head_stride = 0;

  //! The storage format, for kernels that dequantize in registers: the quantizer's name()
  //! ("none", "fp8_e4m3", "q8_0", "q4_0", "kivi_per_token"), its code width in bits (0: the
  //! engine's element type is stored as is) and its group of values sharing a scale along
  //! head_dim (32 for llama.cpp blocks and KIVI groups; 0 when the scale is not per group: fp8
  //! (per layer or per head), none).
  const char* format = "none";
  std::uint32_t bits = 0;
  std::uint32_t group = 0;

  //! Token-grouped keys (KIVI, token_major only): keys of slots >= k_quantized[h] are at full
  //! precision (`type`) in the residual window, row (slot % residual, head) at
  //! `k_residual + ((slot % residual) * kv_heads + head) * head_dim * size_of(type)`; keys below
  //! are codes in k_row() with per-(group, head) metadata at k_group_meta(). Null/0 otherwise.
  const std::byte* k_residual = nullptr;
  const std::uint32_t* k_quantized = nullptr;  //!< `[kv_heads]` slots below are quantized
  std::uint32_t residual = 0;

  //! True when the key of (slot, head) is in the full-precision residual window.
  [[nodiscard]] bool k_in_residual(std::uint32_t slot, std::uint32_t head) const noexcept {
    return k_residual && slot >= k_quantized[head];
  }
  [[nodiscard]] const std::byte* k_residual_row(std::uint32_t slot, std::uint32_t head) const noexcept {
    return k_residual + (std::size_t{slot % residual} * kv_heads + head) * head_dim * size_of(type);
  }
  //! Key metadata of (group, head) for token-grouped keys: `[head_dim]` fp16 scales, then zeros.
  [[nodiscard]] const std::byte* k_group_meta(std::uint32_t grp, std::uint32_t head) const noexcept {
    return k_scales + (std::size_t{grp} * kv_heads + head) * 4 * head_dim;
  }

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
    return k_scales ? k_scales + slot * scale_slot_stride + head * scale_head_stride : nullptr;
  }
  [[nodiscard]] const std::byte* v_scale(std::uint32_t slot, std::uint32_t head) const noexcept {
    return v_scales ? v_scales + slot * scale_slot_stride + head * scale_head_stride : nullptr;
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
  //! Per sequence: out-of-band metadata (see layer_view::k_scales); empty when the format has
  //! none. Strides and sizes are common to all entries.
  std::vector<const std::byte*> k_scales;
  std::vector<const std::byte*> v_scales;
  std::size_t scale_bytes = 0;
  std::size_t scale_slot_stride = 0;
  std::size_t scale_head_stride = 0;
  const char* format = "none";
  std::uint32_t bits = 0;
  std::uint32_t group = 0;
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
