// SPDX-License-Identifier: Apache-2.0
//! @file
//! `row_chunk`: one contiguous copy of an append's plan. The cache turns an append into chunks
//! (consecutive input rows going to consecutive bytes of a K or V range) and hands them to the
//! quantizer, which encodes them one by one, or all at once where it has a batched path (one
//! kernel launch on a device).
#pragma once

#include <kvcache/config.hpp>

#include <cstddef>

KVCACHE_NAMESPACE_BEGIN

struct row_chunk {
  std::size_t dst;   //!< byte offset in the range of the first row's codes
  std::size_t src;   //!< index of the first (token, head) row in the input `[tokens][heads]`
  std::size_t rows;  //!< consecutive (token, head) rows
};

KVCACHE_NAMESPACE_END
