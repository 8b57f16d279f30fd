// SPDX-License-Identifier: Apache-2.0
//! @file
//! `cuda_holding`: the holding tier of a GPU working tier (memory/holding_tier.hpp) in pinned
//! host memory, with its transport on CUDA streams. `tiered<cuda_vmm, cuda_holding>` is the
//! two-tier GPU memory: attention reads `cuda_vmm`'s device pages, demoted rows wait in page-locked
//! host memory, and the copies between the two run as DMA (cudaMemcpyAsync).
//!
//! | basic_holding<> (host_holding)      | cuda_holding                                          |
//! | ----------------------------------- | ----------------------------------------------------- |
//! | std::allocator (pageable)           | `pinned_allocator` over a `pinned_pool` (cudaHostAlloc)|
//! | copy_in / copy_out: memcpy          | cudaMemcpyAsync on the sync stream + its synchronize  |
//! | submit: a batch on a worker thread  | cudaMemcpyAsync of each op on the async stream, then  |
//! |                                     | cudaEventRecord; ticket = the batch's event index     |
//! | wait / done: the worker's counter   | cudaEventSynchronize / cudaEventQuery                 |
//!
//! **Pinned memory.** `basic_holding` keeps a group's bytes in a `std::vector<std::byte, Alloc>`
//! that grows by reallocation. cudaHostAlloc costs far more than malloc (a driver call that
//! page-locks the range and maps it for the device), so a cudaHostAlloc per growth would put that
//! on every hold. `pinned_pool` (the default) carves blocks out of large pinned chunks (64 MiB)
//! in power-of-two size classes (512 B up to 1/8 of a chunk; larger blocks get a cudaHostAlloc
//! of their own) and keeps freed blocks on per-class free lists for the next group. Consequences: allocation is a free-list pop once the pool is warm;
//! the pinned footprint is the pool's high-water mark (chunks go back with the pool, i.e. when
//! the tier and every copy of its allocator are gone); a block may be up to 2x its request
//! (class rounding; vector growth adds its own slack). `pinned_pool_config::reserve_bytes`
//! allocates chunks up front, so no cudaHostAlloc happens while decoding. A default-constructed
//! `pinned_allocator` (no pool) calls cudaHostAlloc/cudaFreeHost for every block.
//!
//! **Streams and ordering.** Both streams are *blocking* streams (cudaStreamCreate's default):
//! they are ordered after earlier work on the legacy default stream, where the library's kernels
//! run (kernels.cuh, cuda_vmm copy-on-write), and the legacy stream's later work waits for them.
//! So a copy_in reads rows the engine's appends wrote, and a kernel launched after copy_out
//! sees the fetched rows. copy_in/copy_out use a stream of their own, so a synchronous fetch (a
//! prefetch miss) does not queue behind a prefetch batch in flight. An engine that runs its
//! kernels on a non-blocking stream (or with --default-stream per-thread) must synchronize that
//! stream before a hold or a restore.
//!
//! **Errors.** The transport keeps `basic_holding`'s signatures (`void copy_in(...)`, `std::uint64_t
//! submit(...)`, `void wait(...)`), so a cache written against `host_holding` runs on it
//! unchanged. A failed CUDA call is recorded (the first failure stays) and reported by
//! `transport_status()` and by `check()` (the cache's invariant check); `try_copy_in`,
//! `try_copy_out`, `try_submit`, `try_wait` return the status of the call itself. A failed
//! submit returns a ticket that is already done (its copies may not have run). Without a device
//! the constructor raises `error(system_error, "cuda_holding: no CUDA device")`.
//!
//! Device: the tier makes its device (constructor argument) current on the calling thread before
//! each CUDA call. Copies may involve device, pinned and pageable memory (cudaMemcpyDefault:
//! unified addressing); pageable memory makes a copy synchronous with the host.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/cuda/driver.cuh>
#include <kvcache/memory/holding_tier.hpp>

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// nvcc's front end flags `st = f();` (status is [[nodiscard]] and operator= returns status&).
#if defined(__NVCC__)
#  pragma nv_diagnostic push
#  pragma nv_diag_suppress 2810
#endif

KVCACHE_NAMESPACE_BEGIN

//! Construction parameters of `pinned_pool`.
struct pinned_pool_config {
  std::size_t chunk_bytes = std::size_t{64} << 20;  //!< pinned chunk size (a power of two)
  std::size_t reserve_bytes = 0;  //!< pinned up front (rounded up to whole chunks)
};

//! Gauges of a `pinned_pool`.
struct pinned_stats {
  std::size_t pinned_bytes = 0;    //!< page-locked now (chunks and large blocks)
  std::size_t in_use_bytes = 0;    //!< handed out (rounded to the size class)
  std::uint64_t host_allocs = 0;   //!< cudaHostAlloc calls so far
  std::uint64_t allocations = 0;   //!< blocks handed out so far
};

//! Page-locked host memory in power-of-two size classes carved from large chunks; freed blocks
//! are kept for reuse (see the file comment). Thread-safe.
class pinned_pool {
 public:
  static constexpr std::size_t min_block = 512;  //!< smallest class (and alignment)

  //! Raises `error(system_error)` when the chunk size is not a power of two >= 8 * min_block, or
  //! when the reservation cannot be pinned.
  explicit pinned_pool(const pinned_pool_config& cfg = {}) : chunk_(cfg.chunk_bytes) {
    if (chunk_ < 8 * min_block || (chunk_ & (chunk_ - 1)) != 0)
      raise(errc::invalid_argument, "pinned_pool: chunk_bytes " + std::to_string(chunk_) +
                                        " is not a power of two >= " +
                                        std::to_string(8 * min_block));
    max_class_ = chunk_ / 8;
    const std::lock_guard<std::mutex> lock(m_);
    for (std::size_t pinned = 0; pinned < cfg.reserve_bytes; pinned += chunk_) {
      const status st = add_chunk();
      if (!st) {
        release_all();
        raise(st.code(), "pinned_pool: reserving " + std::to_string(cfg.reserve_bytes) +
                             " bytes: " + st.message());
      }
    }
  }
  pinned_pool(const pinned_pool&) = delete;
  pinned_pool& operator=(const pinned_pool&) = delete;
  ~pinned_pool() { release_all(); }

  //! A block of at least `bytes` (aligned to min_block), or nullptr when it cannot be pinned.
  [[nodiscard]] void* allocate(std::size_t bytes) noexcept {
    const std::size_t size = block_size(bytes);
    const std::lock_guard<std::mutex> lock(m_);
    void* p = nullptr;
    if (size > max_class_) {
      (void)host_alloc(&p, size);
    } else {
      auto& list = free_[class_of(size)];
      if (list.empty() && !carve(size)) return nullptr;
      p = list.back();
      list.pop_back();
    }
    if (p) {
      st_.in_use_bytes += size;
      ++st_.allocations;
    }
    return p;
  }
  //! Returns a block from allocate(bytes) (the same `bytes`).
  void deallocate(void* p, std::size_t bytes) noexcept {
    if (!p) return;
    const std::size_t size = block_size(bytes);
    const std::lock_guard<std::mutex> lock(m_);
    st_.in_use_bytes -= size;
    if (size > max_class_) {
      (void)cudaFreeHost(p);
      st_.pinned_bytes -= size;
    } else {
      free_[class_of(size)].push_back(p);
    }
  }

  [[nodiscard]] pinned_stats stats() const {
    const std::lock_guard<std::mutex> lock(m_);
    return st_;
  }
  [[nodiscard]] std::size_t chunk_bytes() const noexcept { return chunk_; }

  //! The block size a request of `bytes` gets: its power-of-two class (>= min_block); above
  //! chunk_bytes / 8, rounded up to min_block only.
  [[nodiscard]] std::size_t block_size(std::size_t bytes) const noexcept {
    std::size_t s = min_block;
    while (s < bytes && s <= max_class_) s <<= 1;
    if (s > max_class_) return (bytes + min_block - 1) / min_block * min_block;
    return s;
  }

 private:
  static constexpr std::size_t classes = 64;
  static std::size_t class_of(std::size_t size) noexcept {
    std::size_t k = 0;
    while ((std::size_t{1} << k) < size) ++k;
    return k;
  }
  status host_alloc(void** p, std::size_t bytes) noexcept {
    const cudaError_t e = cudaHostAlloc(p, bytes, cudaHostAllocPortable);
    if (e != cudaSuccess) {
      *p = nullptr;
      return gpu::runtime_status(e, "cudaHostAlloc");
    }
    ++st_.host_allocs;
    st_.pinned_bytes += bytes;
    return {};
  }
  status add_chunk() noexcept {
    void* p = nullptr;
    KVCACHE_TRY(host_alloc(&p, chunk_));
    try {
      chunks_.push_back(p);
    } catch (...) {
      (void)cudaFreeHost(p);
      st_.pinned_bytes -= chunk_;
      return {errc::system_error, "pinned_pool: out of host memory"};
    }
    // A fresh chunk is cut into max-class blocks; carve() splits them further on demand.
    auto* b = static_cast<std::byte*>(p);
    auto& list = free_[class_of(max_class_)];
    for (std::size_t off = 0; off < chunk_; off += max_class_) push(list, b + off);
    return {};
  }
  static void push(std::vector<void*>& list, void* p) noexcept {
    try {
      list.push_back(p);
    } catch (...) {  // the block is lost to the pool until it goes (the chunk is still freed)
    }
  }
  //! Makes a block of class `size` available: splits the smallest larger free block, or adds a
  //! chunk. False when no chunk can be pinned.
  bool carve(std::size_t size) noexcept {
    std::size_t k = class_of(size) + 1;
    const std::size_t top = class_of(max_class_);
    while (k <= top && free_[k].empty()) ++k;
    if (k > top) {
      if (!add_chunk().ok()) return false;
      k = top;
      if (class_of(size) == top) return true;
    }
    // Split the block of class k in halves down to class_of(size), keeping the upper halves.
    auto* b = static_cast<std::byte*>(free_[k].back());
    free_[k].pop_back();
    for (std::size_t j = k; j > class_of(size); --j) {
      const std::size_t half = std::size_t{1} << (j - 1);
      push(free_[j - 1], b + half);
    }
    push(free_[class_of(size)], b);
    return true;
  }
  void release_all() noexcept {
    for (void* c : chunks_) (void)cudaFreeHost(c);
    chunks_.clear();
    for (auto& l : free_) l.clear();
  }

  std::size_t chunk_, max_class_ = 0;
  mutable std::mutex m_;
  std::vector<void*> chunks_;
  std::array<std::vector<void*>, classes> free_{};
  pinned_stats st_;
};

//! Allocator of page-locked host memory: from a shared `pinned_pool`, or (default-constructed)
//! a cudaHostAlloc per block. Throws std::bad_alloc when memory cannot be pinned.
template <class T>
class pinned_allocator {
 public:
  using value_type = T;
  using propagate_on_container_copy_assignment = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;

  pinned_allocator() noexcept = default;
  explicit pinned_allocator(std::shared_ptr<pinned_pool> pool) noexcept : pool_(std::move(pool)) {}
  template <class U>
  pinned_allocator(const pinned_allocator<U>& o) noexcept : pool_(o.pool()) {}  // NOLINT: rebind

  [[nodiscard]] T* allocate(std::size_t n) {
    if (n > std::size_t(-1) / sizeof(T)) throw std::bad_alloc();
    const std::size_t bytes = n * sizeof(T);
    void* p = nullptr;
    if (pool_) {
      p = pool_->allocate(bytes);
    } else if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
      (void)cudaGetLastError();
      p = nullptr;
    }
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (pool_)
      pool_->deallocate(p, n * sizeof(T));
    else
      (void)cudaFreeHost(p);
  }

  [[nodiscard]] const std::shared_ptr<pinned_pool>& pool() const noexcept { return pool_; }

  template <class U>
  friend bool operator==(const pinned_allocator& a, const pinned_allocator<U>& b) noexcept {
    return a.pool_ == b.pool();
  }

 private:
  std::shared_ptr<pinned_pool> pool_;
};

//! Construction parameters of `cuda_holding`.
struct cuda_holding_config {
  std::size_t capacity = ~std::size_t{0};  //!< bytes the tier may hold (rows and tags)
  int device = 0;
  bool use_pool = true;      //!< false: a cudaHostAlloc per block (no pinned_pool)
  pinned_pool_config pool;   //!< when use_pool
};

namespace detail {
//! cuda_holding's first base: checks the device and makes the pool before basic_holding is
//! built with an allocator of it (bases are initialized in declaration order).
struct cuda_holding_pool {
  explicit cuda_holding_pool(const cuda_holding_config& cfg) {
    if (!gpu::device_available()) raise(errc::system_error, "cuda_holding: no CUDA device");
    if (const cudaError_t e = cudaSetDevice(cfg.device); e != cudaSuccess)
      raise(errc::system_error,
            "cuda_holding: " + gpu::runtime_status(e, "cudaSetDevice").message());
    if (cfg.use_pool) pool = std::make_shared<pinned_pool>(cfg.pool);
  }
  std::shared_ptr<pinned_pool> pool;  // null: a cudaHostAlloc per block
};
}  // namespace detail

//! The holding tier in pinned host memory, its transport on two CUDA streams of `device`.
class cuda_holding : private detail::cuda_holding_pool,
                     public basic_holding<pinned_allocator<std::byte>> {
  using base = basic_holding<pinned_allocator<std::byte>>;

 public:
  //! Raises `error(system_error, "cuda_holding: no CUDA device")` without a device, and
  //! system_error naming the call when a stream, an event or the pool reservation fails.
  explicit cuda_holding(const cuda_holding_config& cfg = {})
      : detail::cuda_holding_pool(cfg),
        base(cfg.capacity, pinned_allocator<std::byte>(pool)),
        t_(std::make_unique<transport>(cfg.device)) {}
  explicit cuda_holding(std::size_t capacity) : cuda_holding(config_of(capacity)) {}

  cuda_holding(cuda_holding&&) noexcept = default;
  //! Waits for this tier's copies in flight before its groups go (the defaulted assignment would
  //! free them first).
  cuda_holding& operator=(cuda_holding&& o) noexcept {
    if (this != &o) {
      t_.reset();
      detail::cuda_holding_pool::operator=(std::move(o));
      base::operator=(std::move(o));
      t_ = std::move(o.t_);
    }
    return *this;
  }
  ~cuda_holding() = default;  // t_ first: its streams are synchronized before the groups go

  [[nodiscard]] int device() const noexcept { return t_->device; }
  //! The stream the asynchronous batches run on (an engine may make its kernels wait for it).
  [[nodiscard]] cudaStream_t stream() const noexcept { return t_->async; }
  //! The pinned pool's gauges (all zero without a pool).
  [[nodiscard]] pinned_stats pinned() const { return pool ? pool->stats() : pinned_stats{}; }

  //! The first transport failure so far (ok when none).
  [[nodiscard]] status transport_status() const {
    const std::lock_guard<std::mutex> lock(t_->m);
    return t_->failure;
  }
  //! basic_holding's check, then the transport's first failure.
  [[nodiscard]] status check() const {
    KVCACHE_TRY(base::check());
    return transport_status();
  }

  // ---- transport (hides basic_holding's) ---------------------------------------------------

  //! Working tier -> holding tier (device or host -> pinned), complete on return.
  void copy_in(std::byte* held, const std::byte* working, std::size_t n) const noexcept {
    (void)try_copy_in(held, working, n);
  }
  //! Holding tier -> working tier (pinned -> device or host), complete on return.
  void copy_out(std::byte* working, const std::byte* held, std::size_t n) const noexcept {
    (void)try_copy_out(working, held, n);
  }
  //! Starts a batch of copies on the tier's async stream; returns its ticket (0 for an empty
  //! batch: nothing to wait for). A failed batch's ticket is done at once (see transport_status).
  std::uint64_t submit(std::vector<copy_op> ops) {
    auto r = try_submit(ops);
    return r.ok() ? *r : 0;
  }
  //! Waits for batch `ticket` and every earlier one (0: returns at once).
  void wait(std::uint64_t ticket) { (void)try_wait(ticket); }
  //! True when batch `ticket` (and every earlier one) has completed, or failed.
  [[nodiscard]] bool done(std::uint64_t ticket) const {
    if (ticket == 0) return true;
    std::unique_lock<std::mutex> lock(t_->m);
    if (ticket <= t_->done_upto) return true;
    const cudaEvent_t e = t_->event_of(ticket);
    lock.unlock();
    if (!e) return true;  // unknown ticket: nothing pending under it
    const cudaError_t q = cudaEventQuery(e);
    if (q == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    lock.lock();
    if (q != cudaSuccess) t_->fail(gpu::runtime_status(q, "cudaEventQuery(cuda_holding)"));
    t_->retire(ticket);
    return true;
  }

  //! copy_in with the call's status.
  status try_copy_in(std::byte* held, const std::byte* working, std::size_t n) const {
    return sync_copy(held, working, n, "cuda_holding copy_in");
  }
  //! copy_out with the call's status.
  status try_copy_out(std::byte* working, const std::byte* held, std::size_t n) const {
    return sync_copy(working, held, n, "cuda_holding copy_out");
  }
  //! submit with the call's status. On failure the copies already issued may still run: call
  //! try_wait on the last good ticket (or synchronize stream()) before freeing their buffers.
  result<std::uint64_t> try_submit(const std::vector<copy_op>& ops) {
    if (ops.empty()) return std::uint64_t{0};
    const std::lock_guard<std::mutex> lock(t_->m);
    status st = t_->make_current();
    for (std::size_t i = 0; st.ok() && i < ops.size(); ++i)
      if (ops[i].bytes)
        st = gpu::runtime_status(cudaMemcpyAsync(ops[i].dst, ops[i].src, ops[i].bytes,
                                                 cudaMemcpyDefault, t_->async),
                                 "cudaMemcpyAsync(cuda_holding submit)");
    cudaEvent_t e = nullptr;
    if (st.ok()) st = t_->take_event(e);
    if (st.ok()) {
      st = gpu::runtime_status(cudaEventRecord(e, t_->async), "cudaEventRecord(cuda_holding)");
      if (!st) t_->spare.push_back(e);
    }
    if (!st) {
      t_->fail(st);
      return st;
    }
    const std::uint64_t t = t_->base + t_->pending.size() + 1;
    t_->pending.push_back(e);
    return t;
  }
  //! wait with the call's status (of the wait; transport_status() keeps earlier failures).
  status try_wait(std::uint64_t ticket) {
    if (ticket == 0) return {};
    std::unique_lock<std::mutex> lock(t_->m);
    if (ticket <= t_->done_upto) return {};
    const cudaEvent_t e = t_->event_of(ticket);
    if (!e) return {};
    KVCACHE_TRY(t_->make_current());
    lock.unlock();
    // Stream order: the event of batch t completes after every earlier batch.
    status st = gpu::runtime_status(cudaEventSynchronize(e), "cudaEventSynchronize(cuda_holding)");
    lock.lock();
    if (!st) t_->fail(st);
    t_->retire(ticket);
    return st;
  }

 private:
  // Behind a pointer: streams, events and the mutex stay put when the tier moves.
  struct transport {
    explicit transport(int dev) : device(dev) {
      check_or_raise(make_current());
      check_or_raise(gpu::runtime_status(cudaStreamCreate(&sync), "cudaStreamCreate(cuda_holding)"));
      const status st =
          gpu::runtime_status(cudaStreamCreate(&async), "cudaStreamCreate(cuda_holding)");
      if (!st) {
        (void)cudaStreamDestroy(sync);
        check_or_raise(st);
      }
    }
    transport(const transport&) = delete;
    transport& operator=(const transport&) = delete;
    ~transport() {
      (void)make_current();
      if (async) (void)cudaStreamSynchronize(async);  // no copy may outlive the tier's memory
      if (sync) (void)cudaStreamSynchronize(sync);
      for (cudaEvent_t e : pending) (void)cudaEventDestroy(e);
      for (cudaEvent_t e : spare) (void)cudaEventDestroy(e);
      if (async) (void)cudaStreamDestroy(async);
      if (sync) (void)cudaStreamDestroy(sync);
    }
    static void check_or_raise(const status& st) {
      if (!st) raise(st.code(), "cuda_holding: " + st.message());
    }
    [[nodiscard]] status make_current() const {
      return gpu::runtime_status(cudaSetDevice(device), "cudaSetDevice(cuda_holding)");
    }
    void fail(const status& st) {
      if (failure.ok()) failure = st;
    }
    //! The event of a pending ticket (null when done or never issued).
    [[nodiscard]] cudaEvent_t event_of(std::uint64_t t) const {
      if (t <= base || t > base + pending.size()) return nullptr;
      return pending[t - base - 1];
    }
    //! Tickets up to t are done: their events go back to the spares.
    void retire(std::uint64_t t) {
      if (t > done_upto) done_upto = t;
      while (base < done_upto && !pending.empty()) {
        spare.push_back(pending.front());
        pending.pop_front();
        ++base;
      }
    }
    status take_event(cudaEvent_t& e) {
      if (!spare.empty()) {
        e = spare.back();
        spare.pop_back();
        return {};
      }
      return gpu::runtime_status(cudaEventCreateWithFlags(&e, cudaEventDisableTiming),
                                 "cudaEventCreate(cuda_holding)");
    }

    int device = 0;
    cudaStream_t sync = nullptr;   // copy_in / copy_out
    cudaStream_t async = nullptr;  // submitted batches
    mutable std::mutex m;       // events, tickets, failure
    std::mutex sync_m;          // one synchronous copy at a time on `sync`
    std::deque<cudaEvent_t> pending;  // events of tickets base+1 .. base+pending.size()
    std::vector<cudaEvent_t> spare;
    std::uint64_t base = 0, done_upto = 0;
    status failure;
  };

  static cuda_holding_config config_of(std::size_t capacity) {
    cuda_holding_config cfg;
    cfg.capacity = capacity;
    return cfg;
  }

  status sync_copy(std::byte* dst, const std::byte* src, std::size_t n, const char* what) const {
    if (n == 0) return {};
    const std::lock_guard<std::mutex> lock(t_->sync_m);
    status st = t_->make_current();
    if (st.ok())
      st = gpu::runtime_status(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, t_->sync), what);
    if (st.ok()) st = gpu::runtime_status(cudaStreamSynchronize(t_->sync), what);
    if (!st) {
      const std::lock_guard<std::mutex> l(t_->m);
      t_->fail(st);
    }
    return st;
  }

  std::unique_ptr<transport> t_;
};

KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
