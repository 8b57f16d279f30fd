// SPDX-License-Identifier: Apache-2.0
//! @file
//! Library-wide configuration: language check, namespace, overridable assert/throw knobs.
#pragma once

#if !defined(_MSVC_LANG) && __cplusplus < 202002L
#  error "kvcache needs C++20 (compile with -std=c++20 or later)"
#endif

#include <cstdio>
#include <cstdlib>

// Engines often build with -fno-exceptions: detect it, and let the user force either way.
#ifndef KVCACHE_USE_EXCEPTIONS
#  if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
#    define KVCACHE_USE_EXCEPTIONS 1
#  else
#    define KVCACHE_USE_EXCEPTIONS 0
#  endif
#endif

//! Host/device qualifier: only nvcc sees __host__ __device__.
#if defined(__CUDACC__)
#  define KVCACHE_HOST_DEVICE __host__ __device__ inline
#else
#  define KVCACHE_HOST_DEVICE inline
#endif

//! True when the translation unit is compiled by a CUDA compiler.
#if defined(__CUDACC__)
#  define KVCACHE_HAS_CUDA() 1
#else
#  define KVCACHE_HAS_CUDA() 0
#endif

//! Internal-consistency assertion (a bug in kvcache, never bad user input: that gets a status).
#ifndef KVCACHE_ASSERT
#  ifdef NDEBUG
#    define KVCACHE_ASSERT(cond) ((void)0)
#  else
#    define KVCACHE_ASSERT(cond)                                                               \
       ((cond) ? (void)0                                                                       \
               : (std::fprintf(stderr, "kvcache: assertion failed: %s (%s:%d)\n", #cond,       \
                               __FILE__, __LINE__),                                            \
                  std::abort()))
#  endif
#endif

// ABI namespace: a layout-changing release bumps the inline namespace.
#define KVCACHE_NAMESPACE_BEGIN namespace kvcache { inline namespace v0_1 {
#define KVCACHE_NAMESPACE_END } }
