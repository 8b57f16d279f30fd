// SPDX-License-Identifier: Apache-2.0
//! @file
//! Budgets (tokens kept per head) from a number, a ratio of the prompt, or a table indexed by
//! (row, layer), where a row is a decode step or a scale; plus ScaleKV's drafter/refiner budgets
//! and an attention-selectivity measure to classify layers.
//!
//! The cache enforces budgets (`cache::set_budget(layer, n)`, `set_budget(layer, head, n)`);
//! these helpers compute them and apply a table row to any cache (duck-typed, so this header
//! depends on core/ only).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

//! max(1, floor(ratio * prompt)): H2O's heavy/recent sizes, SnapKV-style ratio budgets.
inline std::uint32_t budget_from_ratio(std::uint32_t prompt, double ratio) noexcept {
  const double b = std::floor(ratio * static_cast<double>(prompt));
  return b < 1.0 ? 1u : static_cast<std::uint32_t>(std::min(b, 4294967295.0));
}

//! Budgets per (row, layer): row = a decode step, a scale, ... Rows past the end reuse the last
//! row. An entry of 0 means "no entry" (the caller's default applies).
class budget_table {
 public:
  budget_table() = default;
  //! @param rows `[row][layer]`; every row must have `layers` entries (raises otherwise).
  budget_table(std::uint32_t layers, std::vector<std::vector<std::uint32_t>> rows)
      : layers_(layers), rows_(std::move(rows)) {
    for (std::size_t r = 0; r < rows_.size(); ++r)
      if (rows_[r].size() != layers_)
        raise(errc::invalid_budget, "budget_table: row " + std::to_string(r) + " has " +
                                        std::to_string(rows_[r].size()) + " entries, expected " +
                                        std::to_string(layers_) + " layers");
  }
  //! The same budget for every layer at every row.
  static budget_table uniform(std::uint32_t layers, std::uint32_t tokens) {
    return budget_table(layers, {std::vector<std::uint32_t>(layers, tokens)});
  }

  [[nodiscard]] bool empty() const noexcept { return rows_.empty(); }
  [[nodiscard]] std::uint32_t layers() const noexcept { return layers_; }
  [[nodiscard]] std::size_t rows() const noexcept { return rows_.size(); }
  //! The entry (0 = none); rows past the end read the last row, layers out of range read 0.
  [[nodiscard]] std::uint32_t at(std::size_t row, std::uint32_t layer) const noexcept {
    if (rows_.empty() || layer >= layers_) return 0;
    return rows_[std::min(row, rows_.size() - 1)][layer];
  }

  //! Sets row `row` as the cache's per-layer budgets (entries of 0 leave the layer as it is).
  //! All entries are checked against the cache first: on error nothing changed.
  template <class Cache>
  status apply(Cache& c, std::size_t row) const {
    if (layers_ != c.geo().layers)
      return {errc::invalid_budget, "budget_table: " + std::to_string(layers_) +
                                        " layers, the cache has " +
                                        std::to_string(c.geo().layers)};
    for (std::uint32_t l = 0; l < layers_; ++l) {
      const std::uint32_t b = at(row, l);
      if (b > c.config().max_tokens)
        return {errc::invalid_budget, "budget_table: layer " + std::to_string(l) + " budget " +
                                          std::to_string(b) + " exceeds max_tokens " +
                                          std::to_string(c.config().max_tokens)};
    }
    for (std::uint32_t l = 0; l < layers_; ++l)
      if (const std::uint32_t b = at(row, l)) KVCACHE_TRY(c.set_budget(l, b));
    return {};
  }

 private:
  std::uint32_t layers_ = 0;
  std::vector<std::vector<std::uint32_t>> rows_;
};

// ---- ScaleKV: drafters and refiners ------------------------------------------------------------

//! ScaleKV's two kinds of layers: drafters attend broadly over earlier scales (large cache),
//! refiners focus on the current token map (small cache).
enum class layer_role : std::uint8_t { refiner, drafter };

//! Refiner budget such that the per-layer average stays `average`:
//! nD * drafter + (L - nD) * refiner = L * average (ScaleKV's released budgets keep it at 650).
//! Returns 0 when the drafters alone exceed the total.
inline std::uint32_t refiner_budget(std::uint32_t layers, std::uint32_t drafters,
                                    std::uint32_t average, std::uint32_t drafter_budget) noexcept {
  if (drafters >= layers) return 0;
  const std::int64_t rest =
      std::int64_t{layers} * average - std::int64_t{drafters} * drafter_budget;
  return rest <= 0 ? 0 : static_cast<std::uint32_t>(rest / (layers - drafters));
}

//! A ScaleKV budget table, rows indexed by the **next** scale (0-based): after scale s the cache
//! of layer l is cut to `at(s + 1, l)`. `first_row` rows of no entry (0: no compression beyond
//! the policy's base capacity), then one row per (roles, drafter budget, refiner budget).
inline budget_table scale_budgets(std::uint32_t layers, std::uint32_t first_row,
                                  const std::vector<std::vector<layer_role>>& roles,
                                  const std::vector<std::pair<std::uint32_t, std::uint32_t>>& max_min) {
  if (roles.size() != max_min.size())
    raise(errc::invalid_budget, "scale_budgets: roles and budgets differ in length");
  std::vector<std::vector<std::uint32_t>> rows(first_row, std::vector<std::uint32_t>(layers, 0));
  for (std::size_t r = 0; r < roles.size(); ++r) {
    if (roles[r].size() != layers)
      raise(errc::invalid_budget, "scale_budgets: a role row does not have one role per layer");
    std::vector<std::uint32_t> row(layers);
    for (std::uint32_t l = 0; l < layers; ++l)
      row[l] = roles[r][l] == layer_role::drafter ? max_min[r].first : max_min[r].second;
    rows.push_back(std::move(row));
  }
  return budget_table(layers, std::move(rows));
}

//! ScaleKV's released 10% budgets for Infinity-8B (40 blocks; budgets/8b_10%_budget.json):
//! blocks {0, 1, 2} are drafters at every compressed scale; "Scale 9..13" (1-based next scale)
//! Max/Min = 909/629, 1464/584, 2463/503, 4054/374, 6200/200 (average 650 per layer). Rows 0..7
//! have no entry (no compression while the cache is at most the 650-token base).
inline budget_table scalekv_infinity_8b_10pct() {
  constexpr std::uint32_t L = 40;
  std::vector<layer_role> r(L, layer_role::refiner);
  r[0] = r[1] = r[2] = layer_role::drafter;
  return scale_budgets(L, 8, std::vector<std::vector<layer_role>>(5, r),
                       {{909, 629}, {1464, 584}, {2463, 503}, {4054, 374}, {6200, 200}});
}

//! **Attention selectivity index (ours; ScaleKV's formula is not public).** For one layer at one
//! scale, from the attention of the scale's queries: with `c` the mean share of attention on the
//! current scale's tokens and `E` the normalized entropy (in [0, 1]) of the attention over the
//! earlier scales' tokens (renormalized, averaged over query rows),
//!     ASI = 1 - (1 - c) * E
//! High ASI: the layer looks at the current map, or at few earlier tokens (a **refiner**).
//! Low ASI: much attention spread over the history (a **drafter**). This matches the paper's
//! description (share on the current map combined with concentration over the history).
//! @param probs   `[rows][slots]` attention probabilities (any number of query rows/heads)
//! @param current `[slots]` nonzero where the slot holds a current-scale token; empty slots must
//!                have probability 0
inline double attention_selectivity(const float* probs, std::size_t rows, std::size_t slots,
                                    const std::uint8_t* current) {
  if (rows == 0 || slots == 0) return 1.0;
  std::size_t hist = 0;
  for (std::size_t s = 0; s < slots; ++s) hist += current[s] ? 0 : 1;
  double c_sum = 0.0, e_sum = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* p = probs + r * slots;
    double cur = 0.0, past = 0.0;
    for (std::size_t s = 0; s < slots; ++s) (current[s] ? cur : past) += p[s];
    const double tot = cur + past;
    c_sum += tot > 0 ? cur / tot : 1.0;
    double h = 0.0;
    if (past > 0 && hist > 1) {
      for (std::size_t s = 0; s < slots; ++s)
        if (!current[s] && p[s] > 0) {
          const double q = p[s] / past;
          h -= q * std::log(q);
        }
      h /= std::log(static_cast<double>(hist));
    }
    e_sum += h;
  }
  const double c = c_sum / static_cast<double>(rows), e = e_sum / static_cast<double>(rows);
  return 1.0 - (1.0 - c) * e;
}

//! The `drafters` layers of lowest selectivity are drafters (ties: lower layer index first).
inline std::vector<layer_role> classify_layers(const std::vector<double>& asi,
                                               std::uint32_t drafters) {
  std::vector<std::uint32_t> idx(asi.size());
  std::iota(idx.begin(), idx.end(), 0u);
  std::stable_sort(idx.begin(), idx.end(),
                   [&](std::uint32_t a, std::uint32_t b) { return asi[a] < asi[b]; });
  std::vector<layer_role> roles(asi.size(), layer_role::refiner);
  for (std::uint32_t i = 0; i < std::min<std::size_t>(drafters, idx.size()); ++i)
    roles[idx[i]] = layer_role::drafter;
  return roles;
}

KVCACHE_NAMESPACE_END
