// SPDX-License-Identifier: Apache-2.0
//! @file
//! main() of the CUDA tests, compiled by the host compiler: Catch2 v2's implementation under
//! nvcc costs ~45 s more per build, so it lives here and the .cu files only declare test cases.
//!
//! Without a device it runs the no-device checks (the backend refuses cleanly), prints
//! "SKIPPED: no CUDA device" and returns 0 (CTest then reports a skip), or 1 if they fail.
//! `--list-tests` (or any --list option) works without a device.
#if KVCACHE_CATCH2_MAJOR >= 3
#  include <catch2/catch_session.hpp>
#else
#  define CATCH_CONFIG_RUNNER
#  include "catch.hpp"
#endif

#include <cstdio>
#include <cstring>

// Defined in test_cuda_vmm.cu.
bool kvcache_cuda_test_device_available();
int kvcache_cuda_test_no_device_checks();  // number of failed checks

int main(int argc, char** argv) {
  // Listing runs nothing: allowed without a device.
  const bool listing = argc > 1 && std::strncmp(argv[1], "--list", 6) == 0;
  if (!listing && !kvcache_cuda_test_device_available()) {
    const int failed = kvcache_cuda_test_no_device_checks();
    if (failed) {
      std::printf("FAILED: %d no-device check(s)\n", failed);
      return 1;
    }
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  return Catch::Session().run(argc, argv);
}
