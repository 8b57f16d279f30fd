// SPDX-License-Identifier: Apache-2.0
//! @file
//! The vocabulary every memory backend shares: range ids, write requests, statistics, and the
//! `memory_backend` concept the cache object is written against.
//!
//! A backend hands out **ranges**: contiguous address ranges of a fixed capacity whose bytes are
//! backed on demand. It knows nothing of tokens, policies or formats; it moves bytes and pages.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>

KVCACHE_NAMESPACE_BEGIN

//! Index of a range inside its backend.
using range_id = std::uint32_t;
inline constexpr range_id no_range = ~range_id{0};

//! "Make bytes [begin, end) of `range` backed and private to it (copy-on-write resolved)."
struct write_request {
  range_id range = no_range;
  std::size_t begin = 0;
  std::size_t end = 0;
};

//! Counters and gauges of a backend. Pages are `page_size` bytes (the heap backend reports bytes
//! as pages of 1 byte).
struct memory_stats {
  std::size_t page_size = 0;
  std::size_t pages_total = 0;   //!< physical pages in the pool
  std::size_t pages_free = 0;    //!< in the pool's free list
  std::size_t pages_mapped = 0;  //!< mappings over all ranges (a shared page counts once per range)
  std::size_t pages_idle = 0;    //!< mapped in idle ranges: reclaimable (deferred reclamation)
  std::size_t pages_shared = 0;  //!< physical pages mapped in more than one range
  std::size_t ranges_active = 0;
  std::size_t ranges_idle = 0;
  std::size_t bytes_reserved = 0;  //!< virtual address space reserved by all ranges
  // cumulative counters
  std::size_t map_calls = 0;     //!< system (or driver) map calls issued
  std::size_t pages_mapped_total = 0;
  std::size_t pages_unmapped_total = 0;
  std::size_t pages_reclaimed = 0;  //!< taken back from idle ranges when the pool ran short
  std::size_t cow_copies = 0;       //!< pages copied on first write after a fork
  std::size_t ranges_reused = 0;    //!< acquisitions served by an idle range
  std::size_t pages_mapped_ahead = 0;  //!< mapped by the background step (map_ahead)
  std::size_t ahead_skipped = 0;       //!< pages map_ahead skipped: the pool could not supply them

  //! Physical pages held by ranges (mapped somewhere).
  [[nodiscard]] std::size_t pages_in_use() const noexcept { return pages_total - pages_free; }
};

//! What the cache object needs from a memory backend.
template <class M>
concept memory_backend = requires(M& m, const M& cm, range_id r, std::size_t n,
                                  std::span<const write_request> reqs) {
  //! A range of at least n bytes of capacity; reuses an idle range (best fit for `hint` bytes).
  { m.acquire(n, n) } -> std::same_as<result<range_id>>;
  //! Back and privatize the requested bytes; all or nothing.
  { m.prepare(reqs) } -> std::same_as<status>;
  //! A new range sharing the first n bytes of r (zero copy where the backend can).
  { m.fork(r, n) } -> std::same_as<result<range_id>>;
  //! The range is finished; its memory may be kept for reuse (deferred reclamation).
  { m.release(r) } -> std::same_as<void>;
  { cm.data(r) } -> std::same_as<std::byte*>;
  { cm.capacity(r) } -> std::same_as<std::size_t>;
  //! Bytes the range holds backed (mapped pages × page size).
  { cm.backed_bytes(r) } -> std::same_as<std::size_t>;
  //! The unit of backing (page size), which the cache aligns per-head regions to.
  { cm.granularity() } -> std::same_as<std::size_t>;
  { cm.stats() } -> std::same_as<memory_stats>;
};

//! Rounds n up to a multiple of m (m > 0).
constexpr std::size_t round_up(std::size_t n, std::size_t m) noexcept { return (n + m - 1) / m * m; }

KVCACHE_NAMESPACE_END
