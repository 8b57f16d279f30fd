// SPDX-License-Identifier: Apache-2.0
//! @file
//! The version macros, kvcache::version_string and the CMake project version agree.
#include <kvcache/version.hpp>

#include <string>

#include "catch.hpp"

TEST_CASE("version macros match version_string", "[core][version]") {
  const std::string from_macros = std::to_string(KVCACHE_VERSION_MAJOR) + "." +
                                  std::to_string(KVCACHE_VERSION_MINOR) + "." +
                                  std::to_string(KVCACHE_VERSION_PATCH);
  CHECK(std::string(kvcache::version_string) == from_macros);
  CHECK(std::string(KVCACHE_VERSION_STRING) == from_macros);
  CHECK(KVCACHE_VERSION ==
        KVCACHE_VERSION_MAJOR * 10000 + KVCACHE_VERSION_MINOR * 100 + KVCACHE_VERSION_PATCH);
  // version_string is usable as a C string.
  CHECK(kvcache::version_string.data()[kvcache::version_string.size()] == '\0');
}

#ifdef KVCACHE_TEST_CMAKE_VERSION
TEST_CASE("CMake parsed the same version from version.hpp", "[core][version]") {
  CHECK(std::string(kvcache::version_string) == KVCACHE_TEST_CMAKE_VERSION);
}
#endif
