// SPDX-License-Identifier: Apache-2.0
//! @file
//! The error model, used by every layer.
//!
//! - Operations that can fail on input or on resources (append, map, fork, evict, ...) return a
//!   `status` or a `result<T>`: no exceptions on the hot path, usable with -fno-exceptions, and a
//!   failed call leaves the object exactly as it was.
//! - Constructors cannot return a status: they validate and `raise()`, which throws
//!   `kvcache::error` (or prints and aborts when exceptions are off).
//! - `status::value()`-style accessors raise on a failed result, for code that prefers exceptions.
#pragma once

#include <kvcache/config.hpp>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

KVCACHE_NAMESPACE_BEGIN

//! What went wrong. Stable names: engines switch on these.
enum class errc : int {
  ok = 0,
  invalid_argument,    //!< a parameter outside its domain (zero sizes, bad page size, null data)
  shape_mismatch,      //!< a tensor whose shape disagrees with the geometry or the view
  unknown_sequence,    //!< a sequence id never opened, already closed, or stale
  layer_out_of_range,  //!< a layer index >= the geometry's layer count
  invalid_budget,      //!< a budget of zero, or above the reserved capacity
  capacity_exceeded,   //!< more tokens than the reserved (virtual) capacity of a range
  out_of_pages,        //!< the physical page pool cannot supply the pages needed
  signal_mismatch,     //!< a signal that does not fit the policy's state (wrong step, wrong length)
  system_error,        //!< the OS refused (mmap, memfd_create, ...); the message has errno's text
  //! check_invariants() found the cache's bookkeeping inconsistent: a bug in kvcache (or memory
  //! corrupted from outside), never the result of bad input
  invariant_violation,
};

//! Short stable name of an error code.
constexpr const char* to_string(errc e) noexcept {
  switch (e) {
    case errc::ok: return "ok";
    case errc::invalid_argument: return "invalid_argument";
    case errc::shape_mismatch: return "shape_mismatch";
    case errc::unknown_sequence: return "unknown_sequence";
    case errc::layer_out_of_range: return "layer_out_of_range";
    case errc::invalid_budget: return "invalid_budget";
    case errc::capacity_exceeded: return "capacity_exceeded";
    case errc::out_of_pages: return "out_of_pages";
    case errc::signal_mismatch: return "signal_mismatch";
    case errc::system_error: return "system_error";
    case errc::invariant_violation: return "invariant_violation";
  }
  return "unknown";
}

//! Exception carrying an errc, thrown by constructors and by `raise`.
class error : public std::runtime_error {
 public:
  error(errc code, const std::string& what) : std::runtime_error(what), code_(code) {}
  [[nodiscard]] errc code() const noexcept { return code_; }

 private:
  errc code_;
};

//! Throws `error(code, message)`; without exceptions prints it and aborts.
[[noreturn]] inline void raise(errc code, const std::string& message) {
#if KVCACHE_USE_EXCEPTIONS
  throw error(code, message);
#else
  std::fprintf(stderr, "kvcache: %s: %s\n", to_string(code), message.c_str());
  std::abort();
#endif
}

//! Outcome of an operation: ok, or an error code with a message naming what was wrong.
class [[nodiscard]] status {
 public:
  status() = default;
  status(errc code, std::string message) : code_(code), message_(std::move(message)) {}

  [[nodiscard]] bool ok() const noexcept { return code_ == errc::ok; }
  explicit operator bool() const noexcept { return ok(); }
  [[nodiscard]] errc code() const noexcept { return code_; }
  [[nodiscard]] const std::string& message() const noexcept { return message_; }

  //! Raises (throws) when not ok; for callers that prefer exceptions.
  void check() const {
    if (!ok()) raise(code_, message_);
  }

 private:
  errc code_ = errc::ok;
  std::string message_;
};

//! A value or a failed status (std::expected is C++23).
template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : value_(std::move(value)) {}  // NOLINT: implicit on purpose, like expected
  result(status st) : status_(std::move(st)) { KVCACHE_ASSERT(!status_.ok()); }  // NOLINT

  [[nodiscard]] bool ok() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  [[nodiscard]] const status& error() const noexcept { return status_; }
  [[nodiscard]] errc code() const noexcept { return status_.code(); }

  //! The value; raises the stored error when there is none.
  T& value() & {
    if (!ok()) raise(status_.code(), status_.message());
    return *value_;
  }
  const T& value() const& {
    if (!ok()) raise(status_.code(), status_.message());
    return *value_;
  }
  T&& value() && {
    if (!ok()) raise(status_.code(), status_.message());
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

 private:
  std::optional<T> value_;
  status status_;
};

KVCACHE_NAMESPACE_END

//! Return early from a function returning status/result when `expr` (a status) failed.
#define KVCACHE_TRY(expr)                               \
  do {                                                  \
    if (auto kvcache_try_st_ = (expr); !kvcache_try_st_) \
      return kvcache_try_st_;                           \
  } while (0)
