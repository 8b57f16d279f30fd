// SPDX-License-Identifier: Apache-2.0
//! @file
//! Signals an engine feeds to its eviction policy, and compile-time lists of them.
//!
//! A policy declares `using signals = signal_list<...>` with what it consumes. The cache's
//! `observe()` takes exactly those: a missing one, or one that nobody consumes, is a compile
//! error (see cache.hpp), so an engine never computes what its policy ignores.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/dtype.hpp>

#include <cstdint>
#include <type_traits>

KVCACHE_NAMESPACE_BEGIN

//! Attention probabilities of the step: `[query_heads][queries][slots]` fp32, over the slots of
//! the layer's current view (slot order, the step's own tokens included; empty slots get 0).
struct attention_signal {
  const float* probs = nullptr;
  std::uint32_t query_heads = 0;
  std::uint32_t queries = 0;
  std::uint32_t slots = 0;
};

//! Per-key sums of the step's attention probabilities, `[query_heads][slots]` fp32: what a fused
//! kernel (FlashAttention) can emit as column sums instead of the whole matrix. Same slot order as
//! attention_signal (the layer's current view, empty slots 0).
struct attention_sum_signal {
  const float* sums = nullptr;
  std::uint32_t query_heads = 0;
  std::uint32_t slots = 0;
};

//! The step's queries (after RoPE): `[queries][query_heads][head_dim]` in `type`. They are the
//! queries of the last `queries` tokens appended to the layer (positions next - queries .. next - 1),
//! so policies that score them against the cached keys mask causally by position.
struct query_signal {
  const void* data = nullptr;
  dtype type = dtype::f32;
  std::uint32_t queries = 0;
};

//! Keys of the tokens just appended, `[tokens][kv_heads][head_dim]` in `type` (policies that
//! summarize keys, e.g. sentence means, read them here instead of from the stored format).
struct key_signal {
  const void* data = nullptr;
  dtype type = dtype::f32;
  std::uint32_t tokens = 0;
};

//! Boundaries of the tokens just appended: `flags[i] != 0` when token i ends a sentence/segment.
struct boundary_signal {
  const std::uint8_t* flags = nullptr;
  std::uint32_t tokens = 0;
};

//! Queries that attend to every cached token and are not cached themselves,
//! `[queries][query_heads][head_dim]` in `type` (after RoPE): EpiCache's medoid patch, KVzip's
//! reconstruction prompt. The engine runs them through the model without appending their K/V.
struct probe_signal {
  const void* data = nullptr;
  dtype type = dtype::f32;
  std::uint32_t queries = 0;
};

//! Scale index (visual autoregressive models) of each token just appended. `grid_h` x `grid_w` is
//! the token map of the newest scale (row-major, the scale's tokens in that order); 0 = unknown.
struct scale_signal {
  const std::uint32_t* ids = nullptr;
  std::uint32_t tokens = 0;
  std::uint32_t grid_h = 0;
  std::uint32_t grid_w = 0;
};

//! A compile-time set of signal types.
template <class... S>
struct signal_list {
  template <class T>
  static constexpr bool contains = (std::is_same_v<T, S> || ...);
  static constexpr std::size_t size = sizeof...(S);
};

template <class T>
inline constexpr bool is_signal =
    std::is_same_v<T, attention_signal> || std::is_same_v<T, attention_sum_signal> ||
    std::is_same_v<T, query_signal> ||
    std::is_same_v<T, key_signal> || std::is_same_v<T, boundary_signal> ||
    std::is_same_v<T, scale_signal> || std::is_same_v<T, probe_signal>;

namespace detail {
template <class T, class... Pack>
inline constexpr bool in_pack = (std::is_same_v<T, Pack> || ...);
template <class List, class... Given>
struct covers;
template <class... Needed, class... Given>
struct covers<signal_list<Needed...>, Given...> {
  static constexpr bool value = (in_pack<Needed, Given...> && ...);
};
}  // namespace detail

//! True when the arguments `Given...` include every signal in `List`.
template <class List, class... Given>
inline constexpr bool covers_signals = detail::covers<List, Given...>::value;

KVCACHE_NAMESPACE_END
