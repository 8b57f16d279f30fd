// SPDX-License-Identifier: Apache-2.0
//! @file
//! The error model: status, result<T>, raise/error, KVCACHE_TRY and the errc names.
#include <kvcache/core/error.hpp>

#include <cstring>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>

#include "catch.hpp"
#include "support.hpp"

using kvcache::errc;
using kvcache::result;
using kvcache::status;

using kvtest::thrown_code;

namespace {

struct point {
  int x = 0;
  int y = 0;
};

int evaluations = 0;

status counted(status st) {
  ++evaluations;
  return st;
}

// Returns early when `first` fails; otherwise reaches the end and bumps `reached`.
status try_in_status(int& reached, status first) {
  KVCACHE_TRY(counted(std::move(first)));
  ++reached;
  return {errc::signal_mismatch, "reached the end"};
}

result<int> try_in_result(int& reached, status first) {
  KVCACHE_TRY(counted(std::move(first)));
  ++reached;
  return 42;
}

constexpr errc all_codes[] = {
    errc::ok,           errc::invalid_argument,  errc::shape_mismatch, errc::unknown_sequence,
    errc::layer_out_of_range, errc::invalid_budget, errc::capacity_exceeded, errc::out_of_pages,
    errc::signal_mismatch, errc::system_error, errc::invariant_violation,
};

}  // namespace

TEST_CASE("status: default is ok, an error carries its code and message", "[core][error]") {
  const status ok;
  CHECK(ok.ok());
  CHECK(static_cast<bool>(ok));
  CHECK(ok.code() == errc::ok);
  CHECK(ok.message().empty());

  const status bad{errc::out_of_pages, "need 3 pages, 1 free"};
  CHECK(!bad.ok());
  CHECK(!static_cast<bool>(bad));
  CHECK(bad.code() == errc::out_of_pages);
  CHECK(bad.message() == "need 3 pages, 1 free");
}

TEST_CASE("status::check throws kvcache::error with the code only when failed", "[core][error]") {
  CHECK(!thrown_code([] { status{}.check(); }).has_value());

  std::string what;
  const auto code = thrown_code([] { status{errc::shape_mismatch, "k is [1][2][3]"}.check(); }, &what);
  REQUIRE(code.has_value());
  CHECK(*code == errc::shape_mismatch);
  CHECK(what == "k is [1][2][3]");
}

TEST_CASE("raise throws kvcache::error, a std::runtime_error, with the code", "[core][error]") {
  for (errc c : all_codes) {
    std::string what;
    const auto code = thrown_code([c] { kvcache::raise(c, "message"); }, &what);
    REQUIRE(code.has_value());
    CHECK(*code == c);
    CHECK(what == "message");
  }
  bool caught_as_runtime_error = false;
  try {
    kvcache::raise(errc::system_error, "mmap failed");
  } catch (const std::runtime_error& e) {
    caught_as_runtime_error = std::strcmp(e.what(), "mmap failed") == 0;
  }
  CHECK(caught_as_runtime_error);

  const kvcache::error e(errc::invalid_budget, "budget 0");
  CHECK(e.code() == errc::invalid_budget);
  CHECK(std::string(e.what()) == "budget 0");
}

TEST_CASE("result<T>: a value or a failed status", "[core][error]") {
  SECTION("value") {
    result<int> r = 7;
    CHECK(r.ok());
    CHECK(static_cast<bool>(r));
    CHECK(r.code() == errc::ok);
    CHECK(r.error().ok());
    CHECK(r.value() == 7);
    CHECK(*r == 7);
    *r = 8;
    CHECK(r.value() == 8);
    const result<int>& cr = r;
    CHECK(cr.value() == 8);
  }
  SECTION("struct value through operator->") {
    result<point> r = point{3, 4};
    REQUIRE(r.ok());
    CHECK(r->x == 3);
    CHECK(r->y == 4);
    r->y = 9;
    CHECK(r.value().y == 9);
  }
  SECTION("error") {
    result<int> r = status{errc::unknown_sequence, "sequence 3/1 is not open"};
    CHECK(!r.ok());
    CHECK(!static_cast<bool>(r));
    CHECK(r.code() == errc::unknown_sequence);
    CHECK(r.error().code() == errc::unknown_sequence);
    CHECK(r.error().message() == "sequence 3/1 is not open");
    std::string what;
    const auto code = thrown_code([&] { (void)r.value(); }, &what);
    REQUIRE(code.has_value());
    CHECK(*code == errc::unknown_sequence);
    CHECK(what == "sequence 3/1 is not open");
    CHECK(thrown_code([&] { (void)*r; }) == errc::unknown_sequence);
    CHECK(thrown_code([&] { (void)r.operator->(); }) == errc::unknown_sequence);
    const result<int>& cr = r;
    CHECK(thrown_code([&] { (void)cr.value(); }) == errc::unknown_sequence);
    CHECK(thrown_code([&] { (void)std::move(r).value(); }) == errc::unknown_sequence);
  }
  SECTION("move-only value moves out of an rvalue") {
    result<std::unique_ptr<int>> r = std::make_unique<int>(5);
    REQUIRE(r.ok());
    std::unique_ptr<int> p = std::move(r).value();
    REQUIRE(p != nullptr);
    CHECK(*p == 5);
  }
}

TEST_CASE("KVCACHE_TRY returns the failed status early and evaluates once", "[core][error]") {
  SECTION("in a function returning status") {
    int reached = 0;
    evaluations = 0;
    const status failed = try_in_status(reached, {errc::layer_out_of_range, "layer 9"});
    CHECK(evaluations == 1);
    CHECK(reached == 0);
    CHECK(failed.code() == errc::layer_out_of_range);
    CHECK(failed.message() == "layer 9");

    evaluations = 0;
    const status passed = try_in_status(reached, {});
    CHECK(evaluations == 1);
    CHECK(reached == 1);
    CHECK(passed.code() == errc::signal_mismatch);  // the code after the TRY ran
  }
  SECTION("in a function returning result<T>") {
    int reached = 0;
    evaluations = 0;
    const result<int> failed = try_in_result(reached, {errc::capacity_exceeded, "full"});
    CHECK(evaluations == 1);
    CHECK(reached == 0);
    CHECK(failed.code() == errc::capacity_exceeded);
    CHECK(failed.error().message() == "full");

    const result<int> passed = try_in_result(reached, {});
    CHECK(reached == 1);
    REQUIRE(passed.ok());
    CHECK(passed.value() == 42);
  }
}

TEST_CASE("to_string names every errc, distinctly", "[core][error]") {
  CHECK(std::string(kvcache::to_string(errc::ok)) == "ok");
  CHECK(std::string(kvcache::to_string(errc::invalid_argument)) == "invalid_argument");
  CHECK(std::string(kvcache::to_string(errc::shape_mismatch)) == "shape_mismatch");
  CHECK(std::string(kvcache::to_string(errc::unknown_sequence)) == "unknown_sequence");
  CHECK(std::string(kvcache::to_string(errc::layer_out_of_range)) == "layer_out_of_range");
  CHECK(std::string(kvcache::to_string(errc::invalid_budget)) == "invalid_budget");
  CHECK(std::string(kvcache::to_string(errc::capacity_exceeded)) == "capacity_exceeded");
  CHECK(std::string(kvcache::to_string(errc::out_of_pages)) == "out_of_pages");
  CHECK(std::string(kvcache::to_string(errc::signal_mismatch)) == "signal_mismatch");
  CHECK(std::string(kvcache::to_string(errc::system_error)) == "system_error");
  CHECK(std::string(kvcache::to_string(static_cast<errc>(1000))) == "unknown");

  std::set<std::string> names;
  for (errc c : all_codes) names.insert(kvcache::to_string(c));
  CHECK(names.size() == std::size(all_codes));
  CHECK(names.count("unknown") == 0);

  // Usable in constant expressions (engines switch on names at compile time in logs).
  static_assert(kvcache::to_string(errc::out_of_pages)[0] == 'o');
}
