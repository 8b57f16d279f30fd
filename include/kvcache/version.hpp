// SPDX-License-Identifier: Apache-2.0
//! @file
//! Library version. This file is the single source of truth: CMake parses the three
//! KVCACHE_VERSION_* lines below, so keep their `#define NAME <number>` form.
#pragma once

#include <string_view>

#define KVCACHE_VERSION_MAJOR 0
#define KVCACHE_VERSION_MINOR 1
#define KVCACHE_VERSION_PATCH 0

//! Single integer for `#if` comparisons: major * 10000 + minor * 100 + patch (fmt style).
#define KVCACHE_VERSION \
  (KVCACHE_VERSION_MAJOR * 10000 + KVCACHE_VERSION_MINOR * 100 + KVCACHE_VERSION_PATCH)

#define KVCACHE_DETAIL_STRINGIFY_IMPL(x) #x
#define KVCACHE_DETAIL_STRINGIFY(x) KVCACHE_DETAIL_STRINGIFY_IMPL(x)

//! "MAJOR.MINOR.PATCH" as a string literal, built from the macros above.
#define KVCACHE_VERSION_STRING                                                    \
  KVCACHE_DETAIL_STRINGIFY(KVCACHE_VERSION_MAJOR)                                 \
  "." KVCACHE_DETAIL_STRINGIFY(KVCACHE_VERSION_MINOR) "." KVCACHE_DETAIL_STRINGIFY( \
      KVCACHE_VERSION_PATCH)

namespace kvcache {

//! The library version as "MAJOR.MINOR.PATCH" (null-terminated).
inline constexpr std::string_view version_string = KVCACHE_VERSION_STRING;

}  // namespace kvcache
