// SPDX-License-Identifier: Apache-2.0
//! @file
//! Package consumer: the installed headers are found and usable from a plain C++20 program.
#include <kvcache/version.hpp>
#if __has_include(<kvcache/kvcache.hpp>)
#  include <kvcache/kvcache.hpp>
#endif

#include <iostream>

int main() {
  std::cout << "kvcache " << kvcache::version_string << '\n';
  return 0;
}
