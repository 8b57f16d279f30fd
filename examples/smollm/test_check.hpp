// SPDX-License-Identifier: Apache-2.0
//! @file
//! The check of the example's test programs (plain executables that ctest runs; the example
//! builds without Catch2): a failed CHECK prints where and why and counts; main() returns the count.
#pragma once

#include <cstdio>

namespace smollm_test {
inline int failures = 0;
}  // namespace smollm_test

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++smollm_test::failures;                                    \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)
