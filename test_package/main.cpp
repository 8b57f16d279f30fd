// SPDX-License-Identifier: Apache-2.0
//! @file
//! Package smoke test (Conan's test_package, also the pkg-config consumer test): open a cache on
//! the installed headers, append a few tokens, and read them back through a view.
#include <kvcache/kvcache.hpp>

#include <cstdint>
#include <cstring>
#include <iostream>
#include <vector>

int main() {
  using namespace kvcache;
  constexpr std::uint32_t heads = 2, dim = 8, tokens = 5;

  cache_config cfg;
  cfg.geo = {.layers = 1, .kv_heads = heads, .query_heads = heads, .head_dim = dim,
             .type = dtype::f32};
  cfg.max_tokens = 64;
  cache<heap_memory, keep_all> kc(cfg);

  std::vector<float> k(tokens * heads * dim), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(i);
    v[i] = -static_cast<float>(i);
  }
  result<seq_id> s = kc.open(tokens);
  if (!s) {
    std::cerr << "open: " << s.error().message() << '\n';
    return 1;
  }
  status st = kc.append(*s, 0, kv_tensor{k.data(), dtype::f32, tokens, heads, dim},
                        kv_tensor{v.data(), dtype::f32, tokens, heads, dim});
  if (!st) {
    std::cerr << "append: " << st.message() << '\n';
    return 1;
  }
  result<layer_view> view = kc.view(*s, 0);
  if (!view || view->rows != tokens) {
    std::cerr << "view: expected " << tokens << " rows\n";
    return 1;
  }
  // Every (token, head) row must come back bit for bit, at its position.
  for (std::uint32_t t = 0; t < tokens; ++t) {
    for (std::uint32_t h = 0; h < heads; ++h) {
      const std::size_t at = (std::size_t{t} * heads + h) * dim;
      if (view->position(t, h) != static_cast<std::int32_t>(t) ||
          std::memcmp(view->k_row(t, h), &k[at], dim * sizeof(float)) != 0 ||
          std::memcmp(view->v_row(t, h), &v[at], dim * sizeof(float)) != 0) {
        std::cerr << "row (" << t << ", " << h << ") differs\n";
        return 1;
      }
    }
  }
  if (!kc.close(*s)) return 1;
  std::cout << "kvcache " << version_string << ": " << tokens << " tokens round-tripped\n";
  return 0;
}
