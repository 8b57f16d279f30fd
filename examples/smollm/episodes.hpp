// SPDX-License-Identifier: Apache-2.0
//! @file
//! What EpiCache (ALGORITHMS.md §4) needs of the engine beyond `cache_sequence`: a sequence that
//! appends without feeding or evicting (the driver scores and evicts between blocks), a probe
//! that runs a patch through the model over a sequence's cached context WITHOUT appending it and
//! keeps each layer's patch queries, and segment embeddings (mean-pooled final hidden states).
//! Used by episodes.cpp (the `smollm_episodes` tool) and test_episodes.cpp.
#pragma once

#include "model.hpp"

#include <kvcache/kvcache.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace smollm {

//! One sequence of a cache, driven step by step by `engine::forward`, in one of two modes:
//! - `append` (default): the step's K/V are appended, its queries attend over the layer's view.
//!   Unlike cache_sequence, no signal is fed and nothing is evicted: block-wise prefill scores and
//!   evicts between blocks (with the probe's queries), decode after the history evicts nothing.
//! - `probe`: the step's tokens (a patch) attend over the cached context plus the patch itself
//!   (causal within it) and are NOT appended; the cache is only read. Each layer's queries (after
//!   RoPE) are kept: `queries(l)` is `[n][heads][head_dim]` fp32, what `probe_signal` carries.
//!   Set the position to the context's (`engine::set_position`) before each probe pass.
//! K/V are decoded to fp32 per step (any quantizer); attention is attend_row, the same kernel and
//! slot order as cache_sequence, so a probe's queries equal those of a normal forward of the
//! patch appended after the same context (test_episodes checks it bit for bit on keep_all).
template <class Cache>
class episode_sequence final : public kv_sequence {
 public:
  enum class mode { append, probe };

  //! Views (and in append mode appends to) sequence `s` of `kc`, which outlive this object.
  episode_sequence(Cache& kc, kvcache::seq_id s, const config& c, thread_pool& pool)
      : kc_(kc), c_(c), pool_(pool), seq_(s), q_(c.layers), k_(c.layers) {}

  void set_mode(mode m) noexcept { mode_ = m; }
  //! A block-restricted mask (EpiCache's layer profile, ALGORITHMS.md §4 step 5): a query sees
  //! the first `sinks` positions and the block of `block` positions (50% overlap: blocks start
  //! every block/2) that ends with its own stride. A step must stay within one stride of block/2
  //! positions. `block` 0: full causal attention (the default).
  void set_block_mask(std::uint32_t sinks, std::uint32_t block) noexcept {
    sinks_ = sinks;
    block_ = block;
  }
  //! The keys (after RoPE) of the last step of layer `l`, `[n][kv_heads][head_dim]`.
  [[nodiscard]] const std::vector<float>& keys(std::uint32_t l) const { return k_[l]; }
  [[nodiscard]] kvcache::seq_id id() const noexcept { return seq_; }
  [[nodiscard]] Cache& cache() noexcept { return kc_; }
  [[nodiscard]] kvcache::cache_stats stats() const override { return kc_.stats(); }
  //! The queries of layer `l` of the last step (either mode), `[n][heads][head_dim]`.
  [[nodiscard]] const std::vector<float>& queries(std::uint32_t l) const { return q_[l]; }
  [[nodiscard]] std::uint32_t probe_tokens() const noexcept { return probe_n_; }

  kvcache::status attend(std::uint32_t l, std::uint32_t n, const float* q, const float* k, const float* v,
                         float* out) override {
    const std::uint32_t D = c_.head_dim, QH = c_.heads, KH = c_.kv_heads, G = QH / KH;
    const std::size_t QD = std::size_t{QH} * D, KD = std::size_t{KH} * D;
    auto t0 = std::chrono::steady_clock::now();
    if (mode_ == mode::append) {
      const kvcache::kv_tensor kt{k, kvcache::dtype::f32, n, KH, D};
      const kvcache::kv_tensor vt{v, kvcache::dtype::f32, n, KH, D};
      KVCACHE_TRY(kc_.append(seq_, l, kt, vt));
    }
    q_[l].assign(q, q + n * QD);  // kept in both modes (the test compares them)
    k_[l].assign(k, k + n * KD);
    probe_n_ = n;
    auto vr = kc_.view(seq_, l);
    if (!vr) return vr.error();
    const kvcache::layer_view view = *vr;
    time.cache += seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    const std::uint32_t Rc = view.rows;                          // the cache's rows
    const std::uint32_t R = Rc + (mode_ == mode::probe ? n : 0);  // + the patch, after them
    kd_.resize(std::size_t{R} * KD);
    vd_.resize(kd_.size());
    pos_.resize(std::size_t{R} * KH);
    pool_.run(2, [&](unsigned half) {
      for (std::uint32_t s = half; s < Rc; s += 2)
        for (std::uint32_t h = 0; h < KH; ++h) {
          const std::size_t o = (std::size_t{s} * KH + h) * D;
          kvcache::decode_key(view, kc_.quant(), s, h, kd_.data() + o);
          kvcache::decode_value(view, kc_.quant(), s, h, vd_.data() + o);
          pos_[std::size_t{s} * KH + h] = view.positions[std::size_t{s} * KH + h];
        }
    });
    const std::int64_t pos = position();
    if (block_ > 0) {  // the block of the step's stride: [start, ...), plus the sinks
      const std::int64_t half = block_ / 2, start = std::max<std::int64_t>(0, (pos / half) * half - half);
      if ((pos + n - 1) / half != pos / half)
        return {kvcache::errc::invalid_argument, "block mask: a step crosses a stride of block/2"};
      for (auto& p : pos_)
        if (p >= static_cast<std::int32_t>(sinks_) && p < start) p = -1;
    }
    if (mode_ == mode::probe) {
      std::copy_n(k, n * KD, kd_.begin() + static_cast<std::ptrdiff_t>(std::size_t{Rc} * KD));
      std::copy_n(v, n * KD, vd_.begin() + static_cast<std::ptrdiff_t>(std::size_t{Rc} * KD));
      for (std::uint32_t t = 0; t < n; ++t)
        for (std::uint32_t h = 0; h < KH; ++h)
          pos_[std::size_t{Rc + t} * KH + h] = static_cast<std::int32_t>(pos + t);
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    pool_.run(QH, [&](unsigned qh) {
      thread_local std::vector<float> p;
      p.resize(R);
      const std::uint32_t h = qh / G;
      for (std::uint32_t t = 0; t < n; ++t)
        attend_row(q + t * QD + std::size_t{qh} * D, kd_.data() + std::size_t{h} * D, vd_.data() + std::size_t{h} * D,
                   KD, pos_.data() + h, KH, pos + t, R, D, scale, p.data(), out + t * QD + std::size_t{qh} * D);
    });
    time.attention += seconds_since(t0);
    return {};
  }

 private:
  Cache& kc_;
  const config& c_;
  thread_pool& pool_;
  kvcache::seq_id seq_;
  mode mode_ = mode::append;
  std::vector<std::vector<float>> q_, k_;
  std::uint32_t probe_n_ = 0, sinks_ = 0, block_ = 0;
  std::vector<float> kd_, vd_;
  std::vector<std::int32_t> pos_;
};

//! Runs `patch` as a probe after sequence `seq`'s context (its position: `context_pos`), leaving the
//! cache as it was; afterwards `seq.queries(l)` holds each layer's patch queries.
template <class Cache>
kvcache::status run_probe(engine& e, episode_sequence<Cache>& seq, std::int64_t context_pos,
                          std::span<const std::int32_t> patch) {
  seq.set_mode(episode_sequence<Cache>::mode::probe);
  engine::set_position(seq, context_pos);
  auto st = e.forward(seq, patch.data(), static_cast<std::uint32_t>(patch.size()), nullptr);
  engine::set_position(seq, context_pos);
  seq.set_mode(episode_sequence<Cache>::mode::append);
  return st;
}

//! Feeds every layer the probe's queries (`probe_signal`) and evicts to the budget.
template <class Cache>
kvcache::status score_and_evict(episode_sequence<Cache>& seq, std::uint32_t layers) {
  for (std::uint32_t l = 0; l < layers; ++l) {
    const auto& q = seq.queries(l);
    KVCACHE_TRY(seq.cache().observe(seq.id(), l, kvcache::probe_signal{q.data(), kvcache::dtype::f32, seq.probe_tokens()}));
    KVCACHE_TRY(seq.cache().evict(seq.id(), l));
  }
  return {};
}

//! The embedding of a text run alone (from position 0, in a fresh sequence of `kc`): the mean of
//! its tokens' final hidden states (after the output norm), L2-normalised.
template <class Cache>
kvcache::result<std::vector<float>> embed(engine& e, Cache& kc, const config& c, thread_pool& pool,
                                          std::span<const std::int32_t> tokens) {
  auto s = kc.open();
  if (!s) return s.error();
  std::vector<float> hid(tokens.size() * std::size_t{c.hidden}), out(c.hidden, 0.0f);
  kvcache::status st;
  {
    episode_sequence<Cache> seq(kc, *s, c, pool);
    st = e.forward(seq, tokens.data(), static_cast<std::uint32_t>(tokens.size()), nullptr, false, hid.data());
  }
  (void)kc.close(*s);
  if (!st) return st;
  std::vector<double> acc(c.hidden, 0.0);
  for (std::size_t t = 0; t < tokens.size(); ++t)
    for (std::uint32_t i = 0; i < c.hidden; ++i) acc[i] += hid[t * c.hidden + i];
  double nn = 0;
  for (double a : acc) nn += a * a;
  nn = std::sqrt(nn);
  for (std::uint32_t i = 0; i < c.hidden; ++i) out[i] = static_cast<float>(nn > 0 ? acc[i] / nn : 0.0);
  return out;
}

}  // namespace smollm
