// SPDX-License-Identifier: Apache-2.0
//! @file
//! Package consumer: the installed headers are found and usable from a plain C++20 program.
#include <kvcache/version.hpp>
#if __has_include(<kvcache/kvcache.hpp>)
#  include <kvcache/kvcache.hpp>
#endif

#include <iostream>

#if defined(KVCACHE_CONSUMER_CUDA)
#  include <cuda_runtime_api.h>  // found through kvcache::cuda -> CUDA::cudart
#endif

int main() {
  std::cout << "kvcache " << kvcache::version_string << '\n';
#if defined(KVCACHE_CONSUMER_CUDA)
  int runtime = 0;  // needs no driver and no device
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess || runtime <= 0) return 1;
  std::cout << "kvcache::cuda: CUDA runtime " << runtime << '\n';
#endif
  return 0;
}
