// SPDX-License-Identifier: Apache-2.0
//! @file
//! The holding tier: memory behind a cache's working tier (the pool attention reads), where
//! token K/V wait until a policy brings them back (SentenceKV's sentences, EpiCache's episodes).
//!
//! It stores **groups**: rows of a fixed size, each with an int32 tag (the cache tags a token's
//! row with its position), appended in order and read back by index. A group is named by a
//! `hold_key` the cache composes (owner = sequence, group = layer/head/sentence); this layer
//! knows nothing of tokens. It also owns the **transport** between the tiers: synchronous
//! copies, and asynchronous batches run on a worker of its own (a thread here; a CUDA stream
//! for pinned host memory, cuda/holding.cuh) so that a prefetch overlaps the engine's compute.
//!
//! `basic_holding<Alloc>` keeps groups in memory from `Alloc` (std::allocator: pageable host
//! memory; a pinned allocator for GPU working tiers). Thread safety: every member may be called
//! from any thread (one mutex). A group's bytes stay put until that group is extended or erased:
//! the caller must not extend or erase a group while a copy from it is in flight (the cache waits
//! for a layer's prefetch before it holds rows of that layer).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

//! Names a group of the holding tier: `owner` (the cache: a sequence) and `group` within it.
struct hold_key {
  std::uint64_t owner = 0;
  std::uint64_t group = 0;
  friend bool operator==(const hold_key&, const hold_key&) = default;
};

//! Counters and gauges of a holding tier and the moves through it (cache_stats::tier).
struct tier_stats {
  std::size_t bytes_held = 0;       //!< bytes in the holding tier now (rows and tags)
  std::size_t peak_bytes_held = 0;  //!< the most it held at once
  std::size_t groups = 0;           //!< groups held now
  // cumulative counters (the cache adds the moves it makes)
  std::uint64_t bytes_demoted = 0;     //!< working -> holding
  std::uint64_t bytes_promoted = 0;    //!< holding -> working (fetches and restores)
  std::uint64_t bytes_prefetched = 0;  //!< holding -> staging by prefetch
  std::uint64_t rows_hit = 0;          //!< fetched rows found staged by a prefetch
  std::uint64_t rows_missed = 0;       //!< fetched rows copied synchronously from the holding tier
  std::uint64_t prefetch_waits = 0;    //!< fetches that had to wait for a prefetch still running
};

//! One copy of an asynchronous batch: `bytes` from `src` to `dst`.
struct copy_op {
  std::byte* dst = nullptr;
  const std::byte* src = nullptr;
  std::size_t bytes = 0;
};

namespace detail {
struct hold_key_hash {
  std::size_t operator()(const hold_key& k) const noexcept {
    std::uint64_t x = k.owner * 0x9e3779b97f4a7c15ull ^ (k.group + 0x632be59bd9b4e019ull);
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ull;
    return static_cast<std::size_t>(x ^ (x >> 29));
  }
};

//! Runs batches of host copies on one background thread, in submission order. Tickets count
//! batches: wait(t) returns once batch t (and every earlier one) is done.
class copy_worker {
 public:
  copy_worker() = default;
  copy_worker(const copy_worker&) = delete;
  copy_worker& operator=(const copy_worker&) = delete;
  ~copy_worker() {
    {
      const std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  std::uint64_t submit(std::vector<copy_op> ops) {
    std::unique_lock<std::mutex> lock(m_);
    if (!thread_.joinable()) thread_ = std::thread([this] { run(); });  // started on first use
    queue_.push_back(std::move(ops));
    const std::uint64_t t = ++submitted_;
    lock.unlock();
    cv_.notify_all();
    return t;
  }
  void wait(std::uint64_t ticket) {
    std::unique_lock<std::mutex> lock(m_);
    done_cv_.wait(lock, [&] { return done_ >= ticket; });
  }
  [[nodiscard]] bool done(std::uint64_t ticket) const {
    const std::lock_guard<std::mutex> lock(m_);
    return done_ >= ticket;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping with nothing left
      std::vector<copy_op> ops = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      for (const auto& op : ops) std::memcpy(op.dst, op.src, op.bytes);
      lock.lock();
      ++done_;
      done_cv_.notify_all();
    }
  }

  mutable std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::deque<std::vector<copy_op>> queue_;
  std::uint64_t submitted_ = 0, done_ = 0;
  bool stop_ = false;
  std::thread thread_;
};
}  // namespace detail

//! Groups of tagged rows in memory from `Alloc`, with host copies as the transport.
template <class Alloc = std::allocator<std::byte>>
class basic_holding {
 public:
  using allocator_type = Alloc;
  static constexpr std::size_t unlimited = ~std::size_t{0};

  //! What find() returns: the group's rows (`count` × `row_bytes`) and their tags.
  struct group_view {
    const std::byte* rows = nullptr;
    const std::int32_t* tags = nullptr;
    std::uint32_t count = 0;
    std::size_t row_bytes = 0;
  };

  //! @param capacity bytes the tier may hold (rows and tags); extend() past it fails.
  explicit basic_holding(std::size_t capacity = unlimited, Alloc alloc = Alloc{})
      : s_(std::make_unique<shared>(capacity, std::move(alloc))) {}

  [[nodiscard]] std::size_t capacity() const noexcept { return s_->capacity; }
  [[nodiscard]] std::size_t bytes() const {
    const std::lock_guard<std::mutex> lock(s_->m);
    return s_->held;
  }

  //! Ok when `rows` more rows of `row_bytes` fit in the group (and the tier): nothing changes.
  [[nodiscard]] status can_extend(const hold_key& key, std::size_t row_bytes, std::size_t rows) const {
    const std::lock_guard<std::mutex> lock(s_->m);
    return check_extend(key, row_bytes, rows);
  }
  //! Appends `tags.size()` rows of `row_bytes` to the group (made if absent) and returns where
  //! to write their bytes (valid until the group is next extended or erased). All or nothing.
  result<std::byte*> extend(const hold_key& key, std::size_t row_bytes,
                            std::span<const std::int32_t> tags) {
    const std::lock_guard<std::mutex> lock(s_->m);
    KVCACHE_TRY(check_extend(key, row_bytes, tags.size()));
    auto [it, made] = s_->groups.try_emplace(key, s_->alloc);
    group& g = it->second;
    if (made) g.row_bytes = row_bytes;
    const std::size_t at = g.bytes.size();
    try {
      g.bytes.resize(at + tags.size() * row_bytes);
      g.tags.insert(g.tags.end(), tags.begin(), tags.end());
    } catch (const std::bad_alloc&) {
      g.bytes.resize(at);
      g.tags.resize(at / row_bytes);
      if (made) s_->groups.erase(it);
      return status{errc::system_error, "holding tier: host allocation of " +
                                             std::to_string(tags.size() * row_bytes) +
                                             " bytes failed"};
    }
    add_held(tags.size() * (row_bytes + sizeof(std::int32_t)));
    return g.bytes.data() + at;
  }
  //! The group's rows; count 0 when it is not held.
  [[nodiscard]] group_view find(const hold_key& key) const {
    const std::lock_guard<std::mutex> lock(s_->m);
    const auto it = s_->groups.find(key);
    if (it == s_->groups.end()) return {};
    const group& g = it->second;
    return {g.bytes.data(), g.tags.data(), static_cast<std::uint32_t>(g.tags.size()), g.row_bytes};
  }
  //! Drops one group; returns the bytes freed.
  std::size_t erase(const hold_key& key) {
    const std::lock_guard<std::mutex> lock(s_->m);
    const auto it = s_->groups.find(key);
    if (it == s_->groups.end()) return 0;
    const std::size_t b = footprint(it->second);
    s_->groups.erase(it);
    s_->held -= b;
    return b;
  }
  //! Drops every group of `owner` (a closed sequence); returns the bytes freed.
  std::size_t erase_owner(std::uint64_t owner) {
    const std::lock_guard<std::mutex> lock(s_->m);
    std::size_t b = 0;
    for (auto it = s_->groups.begin(); it != s_->groups.end();) {
      if (it->first.owner == owner) {
        b += footprint(it->second);
        it = s_->groups.erase(it);
      } else {
        ++it;
      }
    }
    s_->held -= b;
    return b;
  }
  //! Copies every group of `from` to owner `to` (a fork), all or nothing.
  status copy_owner(std::uint64_t from, std::uint64_t to) {
    const std::lock_guard<std::mutex> lock(s_->m);
    std::size_t b = 0;
    std::vector<std::pair<hold_key, const group*>> src;
    for (const auto& [k, g] : s_->groups)
      if (k.owner == from) {
        if (s_->groups.count(hold_key{to, k.group}))
          return {errc::invalid_argument, "holding tier: owner " + std::to_string(to) +
                                              " already holds group " + std::to_string(k.group)};
        src.push_back({k, &g});
        b += footprint(g);
      }
    if (b > s_->capacity - std::min(s_->capacity, s_->held))
      return {errc::capacity_exceeded, "holding tier: a copy of " + std::to_string(b) +
                                       " bytes exceeds its capacity of " +
                                       std::to_string(s_->capacity) + " (" +
                                       std::to_string(s_->held) + " held)"};
    std::vector<std::pair<hold_key, group>> made;
    made.reserve(src.size());
    try {
      for (const auto& [k, g] : src) made.push_back({hold_key{to, k.group}, *g});
    } catch (const std::bad_alloc&) {
      return {errc::system_error, "holding tier: host allocation failed while copying a fork"};
    }
    for (auto& [k, g] : made) s_->groups.emplace(k, std::move(g));
    add_held(b);
    return {};
  }

  [[nodiscard]] tier_stats stats() const {
    const std::lock_guard<std::mutex> lock(s_->m);
    tier_stats st;
    st.bytes_held = s_->held;
    st.peak_bytes_held = s_->peak;
    st.groups = s_->groups.size();
    return st;
  }
  //! Ok when every group's bytes and tags agree with its row size and the gauge (check.hpp).
  [[nodiscard]] status check() const {
    const std::lock_guard<std::mutex> lock(s_->m);
    std::size_t b = 0;
    for (const auto& [k, g] : s_->groups) {
      if (g.row_bytes == 0 || g.bytes.size() != g.tags.size() * g.row_bytes)
        return {errc::invariant_violation, "holding tier: group " + std::to_string(k.owner) + "/" +
                                               std::to_string(k.group) + " has " +
                                               std::to_string(g.bytes.size()) + " bytes for " +
                                               std::to_string(g.tags.size()) + " rows of " +
                                               std::to_string(g.row_bytes)};
      b += footprint(g);
    }
    if (b != s_->held)
      return {errc::invariant_violation, "holding tier: groups hold " + std::to_string(b) +
                                             " bytes, the gauge says " + std::to_string(s_->held)};
    return {};
  }

  // ---- transport ---------------------------------------------------------------------------

  //! Working tier -> holding tier, synchronous.
  void copy_in(std::byte* held, const std::byte* working, std::size_t n) const noexcept {
    std::memcpy(held, working, n);
  }
  //! Holding tier -> working tier, synchronous.
  void copy_out(std::byte* working, const std::byte* held, std::size_t n) const noexcept {
    std::memcpy(working, held, n);
  }
  //! Starts a batch of copies on the tier's worker and returns its ticket.
  std::uint64_t submit(std::vector<copy_op> ops) { return s_->worker.submit(std::move(ops)); }
  //! Waits for batch `ticket` (0: none, returns at once).
  void wait(std::uint64_t ticket) {
    if (ticket) s_->worker.wait(ticket);
  }
  [[nodiscard]] bool done(std::uint64_t ticket) const { return !ticket || s_->worker.done(ticket); }

 private:
  using byte_vector = std::vector<std::byte, Alloc>;
  struct group {
    explicit group(const Alloc& a) : bytes(a) {}
    byte_vector bytes;
    std::vector<std::int32_t> tags;
    std::size_t row_bytes = 0;
  };
  // Behind a pointer: the tier moves with its cache while its worker thread and mutex stay put.
  struct shared {
    shared(std::size_t cap, Alloc a) : capacity(cap), alloc(std::move(a)) {}
    std::size_t capacity;
    Alloc alloc;
    mutable std::mutex m;
    std::unordered_map<hold_key, group, detail::hold_key_hash> groups;
    std::size_t held = 0, peak = 0;
    detail::copy_worker worker;
  };

  static std::size_t footprint(const group& g) noexcept {
    return g.bytes.size() + g.tags.size() * sizeof(std::int32_t);
  }
  status check_extend(const hold_key& key, std::size_t row_bytes, std::size_t rows) const {
    if (row_bytes == 0) return {errc::invalid_argument, "holding tier: rows of 0 bytes"};
    const auto it = s_->groups.find(key);
    if (it != s_->groups.end() && it->second.row_bytes != row_bytes)
      return {errc::invalid_argument, "holding tier: group " + std::to_string(key.group) +
                                          " holds rows of " + std::to_string(it->second.row_bytes) +
                                          " bytes, not " + std::to_string(row_bytes)};
    const std::size_t need = rows * (row_bytes + sizeof(std::int32_t));
    if (need > s_->capacity - std::min(s_->capacity, s_->held))
      return {errc::capacity_exceeded, "holding tier: " + std::to_string(need) +
                                       " more bytes exceed its capacity of " +
                                       std::to_string(s_->capacity) + " (" +
                                       std::to_string(s_->held) + " held)"};
    return {};
  }
  void add_held(std::size_t b) noexcept {
    s_->held += b;
    s_->peak = std::max(s_->peak, s_->held);
  }

  std::unique_ptr<shared> s_;
};

//! The holding tier in pageable host memory (the host working tier's partner).
using host_holding = basic_holding<>;

KVCACHE_NAMESPACE_END
