// SPDX-License-Identifier: Apache-2.0
//! @file
//! Catch2 v2/v3 shim: tests include "catch.hpp" only and keep to the common subset
//! (TEST_CASE, SECTION, REQUIRE/CHECK, TEMPLATE_TEST_CASE, GENERATE, Approx).
#pragma once

// Normally set by tests/CMakeLists.txt from the Catch2 that CMake found.
#ifndef KVCACHE_CATCH2_MAJOR
#  if __has_include(<catch2/catch_all.hpp>)
#    define KVCACHE_CATCH2_MAJOR 3
#  else
#    define KVCACHE_CATCH2_MAJOR 2
#  endif
#endif

#if KVCACHE_CATCH2_MAJOR >= 3
#  include <catch2/catch_all.hpp>
using Catch::Approx;  // v2 has a global Approx; match it.
#else
#  include <catch2/catch.hpp>
#endif
