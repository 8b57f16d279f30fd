// SPDX-License-Identifier: Apache-2.0
//! @file
//! slot_table: slots per head, holes reused most-recent-first, rows(), dense(), divergence.
#include <kvcache/core/slot_table.hpp>

#include <cstdint>
#include <vector>

#include "catch.hpp"

using kvcache::slot_table;

TEST_CASE("slot_table: a fresh table is empty with full room", "[core][slot_table]") {
  const slot_table t(3, 10);
  CHECK(t.heads() == 3);
  CHECK(t.capacity() == 10);
  CHECK(t.rows() == 0);
  CHECK(t.live_total() == 0);
  CHECK(t.dense());  // no rows: nothing to mask
  for (std::uint32_t h = 0; h < 3; ++h) {
    CHECK(t.live(h) == 0);
    CHECK(t.frontier(h) == 0);
    CHECK(t.room(h) == 10);
    CHECK(t.holes(h).empty());
    for (std::uint32_t i = 0; i < 10; ++i) CHECK(t.peek(h, i) == i);
  }
}

TEST_CASE("slot_table: place fills the frontier and records positions", "[core][slot_table]") {
  slot_table t(2, 8);
  for (std::int32_t pos = 0; pos < 5; ++pos) {
    CHECK(t.peek(0, 0) == static_cast<std::uint32_t>(pos));
    CHECK(t.place(0, pos) == static_cast<std::uint32_t>(pos));
    CHECK(t.place(1, 100 + pos) == static_cast<std::uint32_t>(pos));
  }
  CHECK(t.rows() == 5);
  CHECK(t.live(0) == 5);
  CHECK(t.live(1) == 5);
  CHECK(t.live_total() == 10);
  CHECK(t.frontier(0) == 5);
  CHECK(t.room(0) == 3);
  CHECK(t.dense());
  CHECK(t.live_data()[0] == 5);
  CHECK(t.live_data()[1] == 5);
  for (std::uint32_t s = 0; s < 5; ++s) {
    CHECK(t.position(s, 0) == static_cast<std::int32_t>(s));
    CHECK(t.position(s, 1) == static_cast<std::int32_t>(100 + s));
    // positions() is [row][head]
    CHECK(t.positions()[s * 2 + 0] == static_cast<std::int32_t>(s));
    CHECK(t.positions()[s * 2 + 1] == static_cast<std::int32_t>(100 + s));
  }
  // peek looks ahead without taking
  CHECK(t.peek(0, 0) == 5);
  CHECK(t.peek(0, 2) == 7);
  CHECK(t.frontier(0) == 5);
}

TEST_CASE("slot_table: vacate makes holes that are reused most recent first", "[core][slot_table]") {
  slot_table t(1, 6);
  for (std::int32_t pos = 0; pos < 6; ++pos) t.place(0, pos);
  CHECK(t.room(0) == 0);

  t.vacate(0, 1);
  t.vacate(0, 4);
  CHECK(t.position(1, 0) == slot_table::empty);
  CHECK(t.position(4, 0) == slot_table::empty);
  CHECK(t.live(0) == 4);
  CHECK(t.rows() == 6);  // rows never shrink: slots stay where they are
  CHECK(!t.dense());
  CHECK(t.room(0) == 2);
  CHECK(t.holes(0) == std::vector<std::uint32_t>{1, 4});
  CHECK(t.peek(0, 0) == 4);  // most recently freed first
  CHECK(t.peek(0, 1) == 1);

  CHECK(t.place(0, 6) == 4);
  CHECK(t.place(0, 7) == 1);
  CHECK(t.position(4, 0) == 6);
  CHECK(t.position(1, 0) == 7);
  CHECK(t.rows() == 6);
  CHECK(t.dense());
  CHECK(t.room(0) == 0);
  CHECK(t.holes(0).empty());
}

TEST_CASE("slot_table: holes are taken before the frontier", "[core][slot_table]") {
  slot_table t(1, 10);
  for (std::int32_t pos = 0; pos < 4; ++pos) t.place(0, pos);
  t.vacate(0, 0);
  CHECK(t.room(0) == 1 + 6);
  CHECK(t.peek(0, 0) == 0);  // the hole
  CHECK(t.peek(0, 1) == 4);  // then the frontier
  CHECK(t.peek(0, 2) == 5);
  CHECK(t.place(0, 4) == 0);
  CHECK(t.place(0, 5) == 4);
  CHECK(t.rows() == 5);
  CHECK(t.frontier(0) == 5);
}

TEST_CASE("slot_table: heads diverge, rows() is the highest frontier", "[core][slot_table]") {
  slot_table t(3, 8);
  for (std::int32_t pos = 0; pos < 4; ++pos)
    for (std::uint32_t h = 0; h < 3; ++h) t.place(h, pos);
  // Each head evicts a different token.
  t.vacate(0, 1);
  t.vacate(1, 2);
  t.vacate(2, 3);
  CHECK(t.live_total() == 9);
  CHECK(!t.dense());
  // The next token goes to a different row in every head.
  CHECK(t.place(0, 4) == 1);
  CHECK(t.place(1, 4) == 2);
  CHECK(t.place(2, 4) == 3);
  CHECK(t.position(1, 0) == 4);
  CHECK(t.position(1, 1) == 1);  // head 1 still holds position 1 in row 1
  CHECK(t.position(2, 1) == 4);
  CHECK(t.position(2, 0) == 2);
  CHECK(t.dense());
  CHECK(t.rows() == 4);

  // Only head 2 grows: rows follows it, the other heads' cells in the new rows are empty.
  CHECK(t.place(2, 5) == 4);
  CHECK(t.place(2, 6) == 5);
  CHECK(t.rows() == 6);
  CHECK(t.frontier(0) == 4);
  CHECK(t.frontier(2) == 6);
  CHECK(t.position(4, 0) == slot_table::empty);
  CHECK(t.position(5, 1) == slot_table::empty);
  CHECK(t.position(5, 2) == 6);
  CHECK(!t.dense());
  CHECK(t.room(0) == 4);
  CHECK(t.room(2) == 2);
}

TEST_CASE("slot_table: reserve does not change the table; copies are independent",
          "[core][slot_table]") {
  slot_table t(2, 16);
  t.reserve(16);
  CHECK(t.rows() == 0);
  CHECK(t.live_total() == 0);
  t.place(0, 0);
  t.place(1, 0);
  slot_table copy = t;
  copy.vacate(0, 0);
  copy.place(1, 1);
  CHECK(t.position(0, 0) == 0);
  CHECK(t.rows() == 1);
  CHECK(t.live_total() == 2);
  CHECK(copy.position(0, 0) == slot_table::empty);
  CHECK(copy.rows() == 2);
  CHECK(copy.live_total() == 2);
}
