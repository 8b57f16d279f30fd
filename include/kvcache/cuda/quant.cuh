// SPDX-License-Identifier: Apache-2.0
//! @file
//! Device encode/decode kernels for the quantized formats (fp8_e4m3, q8_0, q4_0,
//! kivi_per_token), their host launchers, a device `dequantize_dense`, and device quantizers for
//! a `cache<cuda_vmm, Policy, Q>`: `cuda_q8_0`, `cuda_q4_0`, `cuda_kivi_per_token<Bits, Group>`,
//! `cuda_fp8_e4m3`.
//!
//! Bit for bit with the host. The kernels call the host headers' scalar functions
//! (`e4m3_encode`, `ggml::q8_0_scale`/`q8_0_code`, `ggml::q4_0_scale`/`q4_0_code`,
//! `detail::kivi_make_params`/`kivi_code`/`kivi_value`, `half_to_float`, ... all
//! KVCACHE_HOST_DEVICE): one implementation on both sides. Their arithmetic is written with
//! `detail::mul_rn/add_rn/div_rn` (never fused into an FMA, IEEE division whatever
//! --use_fast_math/-prec-div say), and block reductions are integer max/min of fp32 bit patterns
//! (order-independent), so the device writes the host encoders' bytes and decodes to the host's
//! floats. The host must not contract either (x86-64 without -march=...: it cannot).
//! The parallel shape differs: a q8_0/q4_0 block or a KIVI group of 32 values is 8 lanes of a
//! warp, 4 consecutive values each (so the per-block scale math runs once per 8 lanes): amax and
//! min/max by 8-lane shuffle reductions, q4_0's high nibbles by a shuffle, KIVI codes of even
//! widths packed per lane (4 codes = Bits/2 whole bytes). Other KIVI groups (Group != 32, or odd
//! widths) use one thread per group calling the host's `kivi_encode_group` itself. fp8 and every
//! decode are elementwise (4 values per thread where aligned).
//!
//! NaN/Inf: the host formats reject them at append (`validate`). The kernels never check: fed
//! NaN/Inf they write what the shared scalar code gives (fp8 saturates Inf to ±448 and keeps NaN;
//! q8_0/q4_0/KIVI give meaningless blocks), without faulting. The device quantizers' `validate`
//! does reject them, for host and device input alike (device input: one max-|x| reduction kernel
//! and a 4-byte read back, i.e. a host synchronization per append; disable with
//! `check_input(false)` when the engine guarantees finite K/V).
//!
//! Layout and inputs: `rows` consecutive rows of head_dim elements of `type` (f32, f16, bf16;
//! naturally aligned) in device memory; codes (and KIVI metadata) in the host encoders' byte
//! layout; dense output `[rows][head_dim]` (launchers) or `[view.rows][kv_heads][head_dim]`
//! (`dequantize_dense`) as f32, f16 or bf16 (f16/bf16: the fp32 value rounded to nearest even).
//! Launchers are asynchronous on `stream` and return a status for bad arguments or a failed
//! launch. nvcc only; sm_80 or newer (warp reductions).
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/chunk.hpp>
#include <kvcache/core/dtype.hpp>
#include <kvcache/core/error.hpp>
#include <kvcache/core/geometry.hpp>
#include <kvcache/core/view.hpp>
#include <kvcache/cuda/driver.cuh>
#include <kvcache/quant/fp8_e4m3.hpp>
#include <kvcache/quant/ggml_blocks.hpp>
#include <kvcache/quant/kivi.hpp>
#include <kvcache/quant/quantizer.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

KVCACHE_NAMESPACE_BEGIN

namespace gpu {

//! Rows of codes addressed like a view: row (slot s, head h) at codes + s*slot_stride +
//! h*head_stride, its metadata (KIVI: fp16 scales then zeros; fp8: the fp32 scale, null = 1) at
//! meta + s*meta_slot_stride + h*meta_head_stride. Decoded row (s, h) goes to dense row s*heads+h.
struct strided_rows {
  const std::byte* codes = nullptr;
  std::size_t slot_stride = 0, head_stride = 0;
  const std::byte* meta = nullptr;
  std::size_t meta_slot_stride = 0, meta_head_stride = 0;
  std::uint32_t slots = 0, heads = 1;
};

namespace quant_detail {

inline constexpr unsigned threads = 256;
inline constexpr std::size_t max_grid = 1u << 20;

template <dtype T>
using dtype_tag = std::integral_constant<dtype, T>;

//! f(dtype_tag<t>{}) for the run-time type t.
template <class F>
status with_dtype(dtype t, F&& f) {
  switch (t) {
    case dtype::f32: return f(dtype_tag<dtype::f32>{});
    case dtype::f16: return f(dtype_tag<dtype::f16>{});
    case dtype::bf16: return f(dtype_tag<dtype::bf16>{});
  }
  return {errc::invalid_argument, "kvcache::gpu: unknown dtype"};
}

inline status launched(const char* what) {
  return runtime_status(cudaGetLastError(), what);
}
inline unsigned grid_for(std::size_t work_items, std::size_t per_block) {
  std::size_t b = (work_items + per_block - 1) / per_block;
  if (b == 0) b = 1;
  return static_cast<unsigned>(b < max_grid ? b : max_grid);
}
inline bool aligned(const void* p, std::size_t a) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % a == 0;
}

// ---- element access (the host's conversions) ------------------------------------------------

template <dtype T>
__device__ __forceinline__ float load1(const std::byte* p, std::size_t i) {
  if constexpr (T == dtype::f32) return reinterpret_cast<const float*>(p)[i];
  else if constexpr (T == dtype::f16)
    return kvcache::detail::half_bits_to_float(reinterpret_cast<const std::uint16_t*>(p)[i]);
  else return bf16_to_float(reinterpret_cast<const std::uint16_t*>(p)[i]);
}
//! V consecutive elements from element i (V = 4: i·size aligned to 4 elements).
template <dtype T, int V>
__device__ __forceinline__ void loadv(const std::byte* p, std::size_t i, float* x) {
  if constexpr (V == 4) {
    if constexpr (T == dtype::f32) {
      const float4 f = reinterpret_cast<const float4*>(p)[i / 4];
      x[0] = f.x, x[1] = f.y, x[2] = f.z, x[3] = f.w;
    } else {
      const uint2 u = reinterpret_cast<const uint2*>(p)[i / 4];
      const std::uint32_t h[4] = {u.x & 0xffffu, u.x >> 16, u.y & 0xffffu, u.y >> 16};
      for (int k = 0; k < 4; ++k)
        x[k] = T == dtype::f16 ? kvcache::detail::half_bits_to_float(h[k])
                               : bf16_to_float(static_cast<std::uint16_t>(h[k]));
    }
  } else {
    for (int k = 0; k < V; ++k) x[k] = load1<T>(p, i + k);
  }
}
template <dtype T, int V>
__device__ __forceinline__ void storev(std::byte* p, std::size_t i, const float* y) {
  if constexpr (V == 4 && T == dtype::f32) {
    reinterpret_cast<float4*>(p)[i / 4] = make_float4(y[0], y[1], y[2], y[3]);
  } else if constexpr (V == 4) {
    std::uint32_t h[4];
    for (int k = 0; k < 4; ++k) h[k] = T == dtype::f16 ? float_to_half(y[k]) : float_to_bf16(y[k]);
    reinterpret_cast<uint2*>(p)[i / 4] = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
  } else {
    for (int k = 0; k < V; ++k) {
      if constexpr (T == dtype::f32) reinterpret_cast<float*>(p)[i + k] = y[k];
      else if constexpr (T == dtype::f16) reinterpret_cast<std::uint16_t*>(p)[i + k] = float_to_half(y[k]);
      else reinterpret_cast<std::uint16_t*>(p)[i + k] = float_to_bf16(y[k]);
    }
  }
}
__device__ __forceinline__ std::uint16_t load_u16(const std::byte* p) {  // any alignment
  return static_cast<std::uint16_t>(static_cast<unsigned>(p[0]) | (static_cast<unsigned>(p[1]) << 8));
}
__device__ __forceinline__ void store_u16(std::byte* p, std::uint16_t v) {
  p[0] = static_cast<std::byte>(v & 0xffu);
  p[1] = static_cast<std::byte>(v >> 8);
}
__device__ __forceinline__ std::uint32_t abs_bits(float x) {
  return __float_as_uint(x) & 0x7fffffffu;
}
__device__ __forceinline__ std::uint32_t umax(std::uint32_t a, std::uint32_t b) { return a > b ? a : b; }
//! Max / min over the aligned group of 8 lanes (lanes 8g .. 8g+7); every lane of the warp calls.
template <class T>
__device__ __forceinline__ T group8_max(T v) {
  for (int o = 4; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
template <class T>
__device__ __forceinline__ T group8_min(T v) {
  for (int o = 4; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// ---- per-format device pieces (scalar math from the host headers) ---------------------------

//! fp8: decode of element j of a row; meta = the fp32 scale (null: 1).
struct fp8_dev {
    __device__ static float value(const std::byte* codes, const std::byte* meta, std::uint32_t j,
                                std::uint32_t) {
    const float s = meta ? *reinterpret_cast<const float*>(meta) : 1.0f;
    return e4m3_decode(static_cast<std::uint8_t>(codes[j]), s);
  }
};

struct q8_0_dev {
  static constexpr std::uint32_t block_bytes = sizeof(ggml::block_q8_0);
  __device__ static float value(const std::byte* codes, const std::byte*, std::uint32_t j,
                                std::uint32_t) {
    const std::byte* b = codes + (j >> 5) * block_bytes;
    const float d = half_to_float(load_u16(b));
    const auto q = static_cast<std::int8_t>(b[2 + (j & 31u)]);
    return kvcache::detail::mul_rn(static_cast<float>(q), d);
  }
  //! ggml::quantize_block_q8_0 by the 8 lanes of a block (values sub·4 .. sub·4+3 each).
  __device__ static void encode_group(const float* x, unsigned sub, bool active, std::uint32_t blk,
                                      std::byte* codes, std::byte*, std::uint32_t) {
    std::uint32_t a = 0;
    for (int k = 0; k < 4; ++k) a = umax(a, abs_bits(x[k]));
    const std::uint32_t amax = group8_max(a);
    const ggml::block_scale s = ggml::q8_0_scale(__uint_as_float(amax));
    if (!active) return;
    std::byte* out = codes + std::size_t{blk} * block_bytes;
    if (sub == 0) store_u16(out, s.dh);
    for (int k = 0; k < 4; ++k)
      out[2 + sub * 4 + k] = static_cast<std::byte>(ggml::q8_0_code(x[k], s.id));
  }
};

struct q4_0_dev {
  static constexpr std::uint32_t block_bytes = sizeof(ggml::block_q4_0);
  __device__ static float value(const std::byte* codes, const std::byte*, std::uint32_t j,
                                std::uint32_t) {
    const std::byte* b = codes + (j >> 5) * block_bytes;
    const float d = half_to_float(load_u16(b));
    const std::uint32_t jj = j & 31u;
    const auto byte = static_cast<std::uint32_t>(b[2 + (jj & 15u)]);
    const std::uint32_t nib = jj < 16 ? byte & 15u : byte >> 4;
    return kvcache::detail::mul_rn(static_cast<float>(static_cast<std::int32_t>(nib) - 8), d);
  }
  //! ggml::quantize_block_q4_0 by the 8 lanes of a block: amax by a group max, the first value
  //! reaching it by a group min of indices; value j+16 (lane sub+4) gives byte j its high nibble.
  __device__ static void encode_group(const float* x, unsigned sub, bool active, std::uint32_t blk,
                                      std::byte* codes, std::byte*, std::uint32_t) {
    std::uint32_t a[4], m = 0;
    for (int k = 0; k < 4; ++k) m = umax(m, a[k] = abs_bits(x[k]));
    const std::uint32_t amax = group8_max(m);
    std::uint32_t first = 32;
    for (int k = 3; k >= 0; --k)
      if (a[k] == amax) first = sub * 4 + static_cast<unsigned>(k);
    first = group8_min(first);  // < 32: the lane holding amax found itself
    const unsigned fk = first & 3u;
    const float mine = fk == 0 ? x[0] : fk == 1 ? x[1] : fk == 2 ? x[2] : x[3];
    const unsigned lane = threadIdx.x & 31u;
    const float at_first = __shfl_sync(0xffffffffu, mine, (lane & ~7u) + (first >> 2));
    const float mx = amax == 0 ? 0.0f : at_first;
    const ggml::block_scale s = ggml::q4_0_scale(mx);
    std::int32_t q[4], hi[4];
    for (int k = 0; k < 4; ++k) q[k] = ggml::q4_0_code(x[k], s.id);
    for (int k = 0; k < 4; ++k) hi[k] = __shfl_down_sync(0xffffffffu, q[k], 4);
    if (!active) return;
    std::byte* out = codes + std::size_t{blk} * block_bytes;
    if (sub == 0) store_u16(out, s.dh);
    if (sub < 4)
      for (int k = 0; k < 4; ++k) out[2 + sub * 4 + k] = static_cast<std::byte>(q[k] | (hi[k] << 4));
  }
};

//! kivi_per_token<Bits, Group>: codes `[groups][Group·Bits/8]`, metadata `[groups]` fp16 scales
//! then `[groups]` fp16 zeros per row.
template <unsigned Bits, unsigned Group>
struct kivi_dev {
  static constexpr std::uint32_t group_bytes = Group * Bits / 8;
  static constexpr unsigned levels = (1u << Bits) - 1;
  __device__ static float value(const std::byte* codes, const std::byte* meta, std::uint32_t j,
                                std::uint32_t D) {
    const std::uint32_t G = D / Group, gi = j / Group, jj = j % Group;
    const std::byte* p = codes + gi * group_bytes;
    const std::uint32_t bit = jj * Bits, at = bit >> 3, sh = bit & 7u;
    std::uint32_t v = static_cast<std::uint32_t>(p[at]);
    if (sh + Bits > 8) v |= static_cast<std::uint32_t>(p[at + 1]) << 8;
    const std::uint32_t q = (v >> sh) & levels;
    return kvcache::detail::kivi_value(q, half_to_float(load_u16(meta + 2 * gi)),
                                       half_to_float(load_u16(meta + 2 * (G + gi))));
  }
  //! Group == 32, even Bits: kivi_encode_group by the 8 lanes of a group; a lane's 4 codes fill
  //! Bits/2 whole bytes of the packed stream (code i at bits [Bits·i, Bits·i + Bits)).
  static constexpr bool warp_path = Group == 32 && Bits % 2 == 0;
  __device__ static void encode_group(const float* x, unsigned sub, bool active, std::uint32_t blk,
                                      std::byte* codes, std::byte* meta, std::uint32_t groups_per_row) {
    static_assert(warp_path);
    std::int32_t mn = kvcache::detail::order_key(x[0]), mx = mn;
    for (int k = 1; k < 4; ++k) {
      const std::int32_t o = kvcache::detail::order_key(x[k]);
      mn = o < mn ? o : mn;
      mx = o > mx ? o : mx;
    }
    mn = group8_min(mn);
    mx = group8_max(mx);
    const auto p = kvcache::detail::kivi_make_params(kvcache::detail::from_order_key(mn),
                                                     kvcache::detail::from_order_key(mx), levels);
    if (!active) return;
    std::uint32_t packed = 0;
    for (int k = 0; k < 4; ++k)
      packed |= (static_cast<std::uint32_t>(kvcache::detail::kivi_code(x[k], p.zero, p.inv, levels)) &
                 levels) << (Bits * k);
    std::byte* c = codes + std::size_t{blk} * group_bytes + sub * (Bits / 2);
    for (unsigned b = 0; b < Bits / 2; ++b) c[b] = static_cast<std::byte>((packed >> (8 * b)) & 0xffu);
    const std::uint32_t r = blk / groups_per_row, i = blk % groups_per_row;
    std::byte* m = meta + std::size_t{r} * groups_per_row * 4;
    if (sub == 0) store_u16(m + 2 * i, p.scale16);
    if (sub == 1) store_u16(m + 2 * (groups_per_row + i), p.zero16);
  }
};

//! The device pieces of a host format (and of the device quantizers, by their host_format).
template <class F>
struct device_of;
template <>
struct device_of<fp8_e4m3> { using type = fp8_dev; };
template <>
struct device_of<q8_0> { using type = q8_0_dev; };
template <>
struct device_of<q4_0> { using type = q4_0_dev; };
template <unsigned B, unsigned G>
struct device_of<kivi_per_token<B, G>> { using type = kivi_dev<B, G>; };

template <class Q>
struct host_format_of { using type = Q; };
template <class Q>
  requires requires { typename Q::host_format; }
struct host_format_of<Q> { using type = typename Q::host_format; };

// ---- kernels (templates: header-defined kernels must not be plain functions, see kernels.cuh)

//! Encode jobs of one launch, by value (under the 4 KiB parameter limit). Job k covers the
//! blocks [first, first + blocks) of the launch.
struct encode_job {
  const std::byte* src;
  std::byte* codes;
  std::byte* meta;
  std::size_t first;
  std::uint32_t blocks;
};
struct encode_batch {
  static constexpr std::uint32_t capacity = 64;
  encode_job job[capacity];
  std::uint32_t count = 0;
  std::size_t total = 0;
};

//! 8 lanes per 32-value block (q8_0, q4_0, KIVI groups of 32), 4 consecutive values per lane,
//! 4 blocks per warp. The loop is warp-uniform (the group reductions shuffle across the warp);
//! lanes past the last block compute on zeros and store nothing. Vec: 4-value vector loads.
template <class Fmt, dtype T, bool Vec>
__global__ void __launch_bounds__(threads)
    encode_blocks_kernel(const __grid_constant__ encode_batch b, std::uint32_t blocks_per_row) {
  const unsigned lane = threadIdx.x & 31u, sub = lane & 7u;
  const std::size_t warp = std::size_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32;
  const std::size_t warps = std::size_t{gridDim.x} * (blockDim.x / 32);
  for (std::size_t base = warp * 4; base < b.total; base += warps * 4) {
    const std::size_t u = base + (lane >> 3);
    const bool active = u < b.total;
    std::uint32_t lo = 0;
    if (active) {
      std::uint32_t hi = b.count - 1;
      while (lo < hi) {
        const std::uint32_t mid = (lo + hi + 1) / 2;
        if (b.job[mid].first <= u) lo = mid;
        else hi = mid - 1;
      }
    }
    const encode_job& jb = b.job[lo];
    const std::uint32_t blk = active ? static_cast<std::uint32_t>(u - jb.first) : 0;
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) {
      const std::size_t e = std::size_t{blk} * 32 + sub * 4;
      if constexpr (Vec) loadv<T, 4>(jb.src, e, x);
      else
        for (int k = 0; k < 4; ++k) x[k] = load1<T>(jb.src, e + k);
    }
    Fmt::encode_group(x, sub, active, blk, jb.codes, jb.meta, blocks_per_row);
  }
}

//! One thread per KIVI group: the host's kivi_encode_group itself.
template <unsigned Bits, unsigned Group, dtype T>
__global__ void __launch_bounds__(threads)
    kivi_encode_thread_kernel(const std::byte* src, std::size_t groups, std::byte* codes,
                              std::byte* meta, std::uint32_t groups_per_row) {
  for (std::size_t g = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; g < groups;
       g += std::size_t{gridDim.x} * blockDim.x) {
    float x[Group];
    for (unsigned j = 0; j < Group; ++j) x[j] = load1<T>(src, g * Group + j);
    std::uint16_t s, z;
    kivi_encode_group<Bits>(x, Group, codes + g * (Group * Bits / 8), s, z);
    const std::size_t r = g / groups_per_row, i = g % groups_per_row;
    std::byte* m = meta + r * groups_per_row * 4;
    store_u16(m + 2 * i, s);
    store_u16(m + 2 * (groups_per_row + i), z);
  }
}

//! fp8: V values per thread, `tpr` threads per row; row r's scale is
//! scales[(first_head + r) % kv_heads] when scale_heads > 1, else scales[0].
template <dtype T, int V>
__global__ void __launch_bounds__(threads)
    fp8_encode_kernel(const std::byte* src, std::uint32_t rows, std::uint32_t D, std::byte* out,
                      const float* scales, std::uint32_t scale_heads, std::uint32_t kv_heads,
                      std::uint32_t first_head, std::uint32_t tpr) {
  const std::uint32_t rpb = blockDim.x / tpr, lr = threadIdx.x / tpr;
  const std::uint32_t j0 = threadIdx.x % tpr * V;
  if (lr >= rpb) return;
  for (std::uint32_t r = blockIdx.x * rpb + lr; r < rows; r += gridDim.x * rpb) {
    const float s = scales[scale_heads > 1 ? (first_head + r % kv_heads) % kv_heads : 0];
    const std::size_t base = std::size_t{r} * D;
    for (std::uint32_t j = j0; j < D; j += tpr * V) {
      float x[V];
      loadv<T, V>(src, base + j, x);
      if constexpr (V == 4) {
        std::uint32_t c = 0;
        for (int k = 0; k < 4; ++k) c |= static_cast<std::uint32_t>(e4m3_encode(x[k], s)) << (8 * k);
        *reinterpret_cast<std::uint32_t*>(out + base + j) = c;
      } else {
        out[base + j] = static_cast<std::byte>(e4m3_encode(x[0], s));
      }
    }
  }
}

//! Decode of strided rows: blockIdx.y = head, `tpr` threads per row, V values per thread.
template <class Fmt, dtype O, int V>
__global__ void __launch_bounds__(threads)
    decode_rows_kernel(const strided_rows in, std::uint32_t D, std::byte* dst, std::uint32_t tpr) {
  const std::uint32_t rpb = blockDim.x / tpr, lr = threadIdx.x / tpr;
  const std::uint32_t j0 = threadIdx.x % tpr * V, h = blockIdx.y;
  if (lr >= rpb) return;
  for (std::uint32_t s = blockIdx.x * rpb + lr; s < in.slots; s += gridDim.x * rpb) {
    const std::byte* codes = in.codes + s * in.slot_stride + h * in.head_stride;
    const std::byte* meta =
        in.meta ? in.meta + s * in.meta_slot_stride + h * in.meta_head_stride : nullptr;
    const std::size_t base = (std::size_t{s} * in.heads + h) * D;
    for (std::uint32_t j = j0; j < D; j += tpr * V) {
      float y[V];
      for (int k = 0; k < V; ++k) y[k] = Fmt::value(codes, meta, j + k, D);
      storev<O, V>(dst, base + j, y);
    }
  }
}

//! Largest |x| bit pattern of n elements (as fp32, as detail::max_abs_bits) into *out.
template <dtype T>
__global__ void __launch_bounds__(threads)
    max_abs_kernel(const std::byte* src, std::size_t n, unsigned* out) {
  unsigned m = 0;
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const unsigned a = abs_bits(load1<T>(src, i));
    m = a > m ? a : m;
  }
  m = __reduce_max_sync(0xffffffffu, m);
  if ((threadIdx.x & 31u) == 0) atomicMax(out, m);
}

//! Per-row largest |x|, max-reduced into out[(first_head + r) % bins] (out[0] when bins is 1).
template <dtype T>
__global__ void __launch_bounds__(threads)
    max_abs_rows_kernel(const std::byte* src, std::uint32_t rows, std::uint32_t D,
                        std::uint32_t bins, std::uint32_t first_head, unsigned* out) {
  const unsigned lane = threadIdx.x & 31u;
  const std::uint32_t warps = gridDim.x * (blockDim.x / 32);
  for (std::uint32_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    unsigned m = 0;
    for (std::uint32_t j = lane; j < D; j += 32) {
      const unsigned a = abs_bits(load1<T>(src, std::size_t{r} * D + j));
      m = a > m ? a : m;
    }
    m = __reduce_max_sync(0xffffffffu, m);
    if (lane == 0) atomicMax(out + (bins > 1 ? (first_head + r % bins) % bins : 0), m);
  }
}

// ---- launch helpers -------------------------------------------------------------------------

//! Threads per row for V values per thread (at most a block; rows longer loop).
inline std::uint32_t threads_per_row(std::uint32_t D, int V) {
  const std::uint32_t t = D / static_cast<std::uint32_t>(V);
  return t < threads ? (t ? t : 1) : threads;
}

template <class Fmt>
status launch_blocks(dtype t, const encode_batch& b, std::uint32_t blocks_per_row,
                     cudaStream_t stream) {
  if (b.total == 0) return {};
  bool vec = true;  // every job's rows start 4-value aligned (blocks are 32 values)
  for (std::uint32_t i = 0; i < b.count; ++i) vec = vec && aligned(b.job[i].src, 4 * size_of(t));
  const unsigned grid = grid_for(b.total, threads / 32 * 4);  // 4 blocks per warp
  return with_dtype(t, [&](auto tag) -> status {
    constexpr dtype T = decltype(tag)::value;
    if (vec) encode_blocks_kernel<Fmt, T, true><<<grid, threads, 0, stream>>>(b, blocks_per_row);
    else encode_blocks_kernel<Fmt, T, false><<<grid, threads, 0, stream>>>(b, blocks_per_row);
    return launched("kvcache::gpu::encode (block formats)");
  });
}

//! Kernels index rows and 32-value blocks with 32 bits.
inline status check_rows(std::size_t rows, std::uint32_t head_dim, const char* what) {
  if (rows >= (std::size_t{1} << 32) || rows * (head_dim / 32 + 1) >= (std::size_t{1} << 32))
    return {errc::invalid_argument, std::string(what) + ": too many rows for one call"};
  return {};
}

}  // namespace quant_detail

// ---- launchers: encode ------------------------------------------------------------------------

//! `rows` rows of `head_dim` elements at `src` to E4M3FN codes (`rows·head_dim` bytes). Row r's
//! scale is `scales[(first_head + r) % kv_heads]` when `scale_heads > 1` (per head), else
//! `scales[0]` (per layer); `scales` is device memory, each > 0 (as fp8_e4m3::encode).
inline status encode_fp8_e4m3(const void* src, dtype type, std::size_t rows, std::uint32_t head_dim,
                              std::byte* codes, const float* scales, std::uint32_t scale_heads = 1,
                              std::uint32_t kv_heads = 1, std::uint32_t first_head = 0,
                              cudaStream_t stream = nullptr) {
  using namespace quant_detail;
  if (rows == 0) return {};
  KVCACHE_TRY(check_rows(rows, head_dim, "encode_fp8_e4m3"));
  if (scale_heads > 1 && kv_heads == 0)
    return {errc::invalid_argument, "encode_fp8_e4m3: per-head scales need kv_heads"};
  const bool vec = head_dim % 4 == 0 && aligned(src, 4 * size_of(type)) && aligned(codes, 4);
  const auto* s = static_cast<const std::byte*>(src);
  const auto R = static_cast<std::uint32_t>(rows);
  return with_dtype(type, [&](auto tag) -> status {
    constexpr dtype T = decltype(tag)::value;
    if (vec) {
      const std::uint32_t tpr = threads_per_row(head_dim, 4);
      fp8_encode_kernel<T, 4><<<grid_for(rows, threads / tpr), threads, 0, stream>>>(
          s, R, head_dim, codes, scales, scale_heads, kv_heads, first_head, tpr);
    } else {
      const std::uint32_t tpr = threads_per_row(head_dim, 1);
      fp8_encode_kernel<T, 1><<<grid_for(rows, threads / tpr), threads, 0, stream>>>(
          s, R, head_dim, codes, scales, scale_heads, kv_heads, first_head, tpr);
    }
    return launched("kvcache::gpu::encode_fp8_e4m3");
  });
}

//! `rows` rows to llama.cpp blocks (Fmt = q8_0 or q4_0; head_dim % 32 == 0), as Fmt::encode.
template <class Fmt>
status encode_ggml(const void* src, dtype type, std::size_t rows, std::uint32_t head_dim,
                   std::byte* codes, cudaStream_t stream = nullptr) {
  static_assert(std::is_same_v<Fmt, q8_0> || std::is_same_v<Fmt, q4_0>);
  using namespace quant_detail;
  if (head_dim % 32 != 0) return {errc::invalid_argument, "encode_ggml: head_dim % 32 != 0"};
  if (rows == 0) return {};
  KVCACHE_TRY(check_rows(rows, head_dim, "encode_ggml"));
  encode_batch b;
  b.job[0] = {static_cast<const std::byte*>(src), codes, nullptr, 0,
              static_cast<std::uint32_t>(rows * (head_dim / 32))};
  b.count = 1;
  b.total = b.job[0].blocks;
  return launch_blocks<typename device_of<Fmt>::type>(type, b, head_dim / 32, stream);
}
inline status encode_q8_0(const void* src, dtype type, std::size_t rows, std::uint32_t head_dim,
                          std::byte* codes, cudaStream_t stream = nullptr) {
  return encode_ggml<q8_0>(src, type, rows, head_dim, codes, stream);
}
inline status encode_q4_0(const void* src, dtype type, std::size_t rows, std::uint32_t head_dim,
                          std::byte* codes, cudaStream_t stream = nullptr) {
  return encode_ggml<q4_0>(src, type, rows, head_dim, codes, stream);
}

//! `rows` rows to kivi_per_token<Bits, Group> codes and metadata (`rows·head_dim/Group·4` bytes
//! at `meta`), as kivi_per_token::encode.
template <unsigned Bits, unsigned Group = 32>
status encode_kivi_per_token(const void* src, dtype type, std::size_t rows, std::uint32_t head_dim,
                             std::byte* codes, std::byte* meta, cudaStream_t stream = nullptr) {
  using namespace quant_detail;
  if (head_dim % Group != 0)
    return {errc::invalid_argument, "encode_kivi_per_token: head_dim % Group != 0"};
  if (rows == 0) return {};
  KVCACHE_TRY(check_rows(rows, head_dim, "encode_kivi_per_token"));
  const std::uint32_t G = head_dim / Group;
  const std::size_t groups = rows * G;
  if constexpr (kivi_dev<Bits, Group>::warp_path) {
    encode_batch b;
    b.job[0] = {static_cast<const std::byte*>(src), codes, meta, 0,
                static_cast<std::uint32_t>(groups)};
    b.count = 1;
    b.total = groups;
    return launch_blocks<kivi_dev<Bits, Group>>(type, b, G, stream);
  } else {
    return with_dtype(type, [&](auto tag) -> status {
      kivi_encode_thread_kernel<Bits, Group, decltype(tag)::value>
          <<<grid_for(groups, threads), threads, 0, stream>>>(static_cast<const std::byte*>(src),
                                                             groups, codes, meta, G);
      return launched("kvcache::gpu::encode_kivi_per_token");
    });
  }
}

// ---- launchers: decode ------------------------------------------------------------------------

//! Decodes strided rows of host format `Fmt` (fp8_e4m3, q8_0, q4_0, kivi_per_token<B, G>) to
//! dense `[slots][heads][head_dim]` elements of `out` at `dst`: the host decode's fp32 values
//! (f16/bf16: rounded to nearest even).
template <class Fmt>
status decode_rows(const strided_rows& in, std::uint32_t head_dim, void* dst, dtype out = dtype::f32,
                   cudaStream_t stream = nullptr) {
  using namespace quant_detail;
  using D = typename device_of<Fmt>::type;
  if (in.slots == 0 || in.heads == 0 || head_dim == 0) return {};
  if (in.heads > 65535) return {errc::invalid_argument, "decode_rows: more than 65535 heads"};
  KVCACHE_TRY(check_rows(std::size_t{in.slots} * in.heads, head_dim, "decode_rows"));
  if constexpr (quant_group<Fmt>() != 0)
    if (head_dim % quant_group<Fmt>() != 0)
      return {errc::invalid_argument, "decode_rows: head_dim is not a multiple of the group"};
  const bool vec = head_dim % 4 == 0 && quant_detail::aligned(dst, 4 * size_of(out));
  auto* d = static_cast<std::byte*>(dst);
  return with_dtype(out, [&](auto tag) -> status {
    constexpr dtype O = decltype(tag)::value;
    const std::uint32_t tpr = threads_per_row(head_dim, vec ? 4 : 1);
    const dim3 grid(grid_for(in.slots, threads / tpr), in.heads);
    if (vec) decode_rows_kernel<D, O, 4><<<grid, threads, 0, stream>>>(in, head_dim, d, tpr);
    else decode_rows_kernel<D, O, 1><<<grid, threads, 0, stream>>>(in, head_dim, d, tpr);
    return launched("kvcache::gpu::decode_rows");
  });
}

//! `rows` contiguous fp8 rows; `scale` is device memory (one fp32 for every row), null = 1.
inline status decode_fp8_e4m3(const std::byte* codes, std::size_t rows, std::uint32_t head_dim,
                              const float* scale, void* dst, dtype out = dtype::f32,
                              cudaStream_t stream = nullptr) {
  strided_rows in{codes, head_dim, 0, reinterpret_cast<const std::byte*>(scale), 0, 0,
                  static_cast<std::uint32_t>(rows), 1};
  if (rows > 0xffffffffu) return {errc::invalid_argument, "decode_fp8_e4m3: too many rows"};
  return decode_rows<fp8_e4m3>(in, head_dim, dst, out, stream);
}
template <class Fmt>
status decode_ggml(const std::byte* codes, std::size_t rows, std::uint32_t head_dim, void* dst,
                   dtype out = dtype::f32, cudaStream_t stream = nullptr) {
  if (rows > 0xffffffffu) return {errc::invalid_argument, "decode_ggml: too many rows"};
  const std::size_t row = head_dim / 32 * quant_detail::device_of<Fmt>::type::block_bytes;
  strided_rows in{codes, row, 0, nullptr, 0, 0, static_cast<std::uint32_t>(rows), 1};
  return decode_rows<Fmt>(in, head_dim, dst, out, stream);
}
inline status decode_q8_0(const std::byte* codes, std::size_t rows, std::uint32_t head_dim,
                          void* dst, dtype out = dtype::f32, cudaStream_t stream = nullptr) {
  return decode_ggml<q8_0>(codes, rows, head_dim, dst, out, stream);
}
inline status decode_q4_0(const std::byte* codes, std::size_t rows, std::uint32_t head_dim,
                          void* dst, dtype out = dtype::f32, cudaStream_t stream = nullptr) {
  return decode_ggml<q4_0>(codes, rows, head_dim, dst, out, stream);
}
template <unsigned Bits, unsigned Group = 32>
status decode_kivi_per_token(const std::byte* codes, const std::byte* meta, std::size_t rows,
                             std::uint32_t head_dim, void* dst, dtype out = dtype::f32,
                             cudaStream_t stream = nullptr) {
  if (rows > 0xffffffffu) return {errc::invalid_argument, "decode_kivi_per_token: too many rows"};
  const std::size_t G = head_dim / Group;
  strided_rows in{codes, G * (Group * Bits / 8), 0, meta, G * 4, 0,
                  static_cast<std::uint32_t>(rows), 1};
  return decode_rows<kivi_per_token<Bits, Group>>(in, head_dim, dst, out, stream);
}

//! Device dequantize-to-dense: K and V of `view` (device memory: a cache<cuda_vmm> with
//! quantizer `quant`, host or device flavour of the format) to dense `[view.rows][kv_heads]
//! [head_dim]` elements of `out` at k and v (device memory; either may be null to skip it).
//! Asynchronous on `stream`. The values are the host `dequantize_dense`'s (f16/bf16: rounded).
//! Empty slots are decoded too. fp8 views must carry device scales (cuda_fp8_e4m3 does).
//! Token-grouped KIVI keys (`kivi<...>`) are not supported on the device.
template <quantizer Q>
status dequantize_dense(const layer_view& view, const Q& quant, void* k, void* v,
                        dtype out = dtype::f32, cudaStream_t stream = nullptr) {
  static_assert(!quant_token_grouped<Q>(),
                "kvcache::gpu::dequantize_dense: token-grouped KIVI keys are host only");
  using H = typename quant_detail::host_format_of<Q>::type;
  const geometry g{1, view.kv_heads, view.kv_heads, view.head_dim, view.type};
  if (std::strcmp(view.format, Q::name()) != 0 || view.row_bytes != quant.code_bytes(g))
    return {errc::shape_mismatch, std::string("gpu::dequantize_dense: the view stores '") +
                                      view.format + "' rows of " + std::to_string(view.row_bytes) +
                                      " bytes; the quantizer is '" + Q::name() + "'"};
  strided_rows in{nullptr, view.slot_stride, view.head_stride, nullptr,
                  view.scale_slot_stride, view.scale_head_stride, view.rows, view.kv_heads};
  if (k) {
    in.codes = view.k;
    in.meta = view.k_scales;
    KVCACHE_TRY(decode_rows<H>(in, view.head_dim, k, out, stream));
  }
  if (v) {
    in.codes = view.v;
    in.meta = view.v_scales;
    KVCACHE_TRY(decode_rows<H>(in, view.head_dim, v, out, stream));
  }
  return {};
}

// ---- device quantizers -------------------------------------------------------------------------

namespace quant_detail {

struct device_free {
  void operator()(void* p) const noexcept { (void)cudaFree(p); }
};

//! A growable device buffer.
class device_buffer {
 public:
  //! At least `bytes` (the old contents are lost when it grows).
  status try_reserve(std::size_t bytes, const char* what) {
    if (bytes > size_) {
      void* p = nullptr;
      p_.reset();
      size_ = 0;
      KVCACHE_TRY(runtime_status(cudaMalloc(&p, bytes), what));
      p_.reset(static_cast<std::byte*>(p));
      size_ = bytes;
    }
    return {};
  }
  std::byte* reserve(std::size_t bytes, const char* what) {
    const status st = try_reserve(bytes, what);
    if (!st) raise(st.code(), st.message());
    return p_.get();
  }
  [[nodiscard]] std::byte* get() const noexcept { return p_.get(); }

  static void raise_on(cudaError_t e, const char* what) {
    const status st = runtime_status(e, what);
    if (!st) raise(st.code(), st.message());
  }

 private:
  std::unique_ptr<std::byte, device_free> p_;
  std::size_t size_ = 0;
};

inline void raise_on(const status& st, const char* what) {
  if (!st) raise(st.code(), std::string(what) + ": " + st.message());
}

using gpu::on_current_device;

//! What every device quantizer shares: its stream, staging of host input, input validation,
//! reading codes back for the host decode.
class device_io {
 public:
  device_io() = default;
  explicit device_io(cudaStream_t s) : stream_(s) {}

  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
  void check_input(bool on) noexcept { check_ = on; }
  [[nodiscard]] bool checks_input() const noexcept { return check_; }

  //! `src` itself when a kernel can read it, else a device copy (in staging buffer `slot`, 0
  //! or 1) made in stream order; the host buffer may be reused when this returns.
  const std::byte* stage(const void* src, std::size_t bytes, int slot) {
    if (on_current_device(src)) return static_cast<const std::byte*>(src);
    std::byte* d = staging_[slot].reserve(bytes, "kvcache device quantizer: staging buffer");
    device_buffer::raise_on(cudaMemcpyAsync(d, src, bytes, cudaMemcpyDefault, stream_),
                            "kvcache device quantizer: staging host input");
    return d;
  }

  //! Per-row max |x| bit patterns into `bins` counters (on the host when src is host memory):
  //! detail::max_abs_bits of each row, max-reduced per bin (row r: (first_head + r) % bins).
  std::vector<std::uint32_t> row_amax(const void* src, std::size_t rows, std::uint32_t D, dtype t,
                                      std::uint32_t bins, std::uint32_t first_head) {
    std::vector<std::uint32_t> m(bins, 0);
    if (!on_current_device(src)) {
      for (std::size_t r = 0; r < rows; ++r) {
        const std::uint32_t b = kvcache::detail::max_abs_bits(
            static_cast<const std::byte*>(src) + r * D * size_of(t), D, t);
        auto& slot = m[bins > 1 ? (first_head + r) % bins : 0];
        slot = b > slot ? b : slot;
      }
      return m;
    }
    raise_on(check_rows(rows, D, "fp8 calibration"), "kvcache device quantizer");
    auto* d = reinterpret_cast<unsigned*>(
        counters_.reserve(bins * sizeof(unsigned), "kvcache device quantizer: counters"));
    device_buffer::raise_on(cudaMemsetAsync(d, 0, bins * sizeof(unsigned), stream_),
                            "kvcache device quantizer: counters");
    raise_on(with_dtype(t,
                        [&](auto tag) -> status {
                          max_abs_rows_kernel<decltype(tag)::value>
                              <<<grid_for(rows, threads / 32), threads, 0, stream_>>>(
                                  static_cast<const std::byte*>(src),
                                  static_cast<std::uint32_t>(rows), D, bins, first_head, d);
                          return launched("max_abs_rows_kernel");
                        }),
             "kvcache device quantizer");
    device_buffer::raise_on(cudaMemcpyAsync(m.data(), d, bins * sizeof(unsigned),
                                            cudaMemcpyDeviceToHost, stream_),
                            "kvcache device quantizer: counters");
    device_buffer::raise_on(cudaStreamSynchronize(stream_), "kvcache device quantizer");
    return m;
  }

  //! The host formats' validate (detail::check_finite) for host or device input.
  status validate(const char* format, const void* src, std::size_t n, dtype t, float limit) {
    if (!check_ || n == 0) return {};
    if (!on_current_device(src)) return kvcache::detail::check_finite(format, src, n, t, limit);
    const std::uint32_t bound =
        limit > 0.0f ? kvcache::detail::bit_cast<std::uint32_t>(limit) : 0x7f7fffffu;
    KVCACHE_TRY(counters_.try_reserve(sizeof(unsigned), "validate"));
    auto* d = reinterpret_cast<unsigned*>(counters_.get());
    KVCACHE_TRY(runtime_status(cudaMemsetAsync(d, 0, sizeof(unsigned), stream_), "validate"));
    KVCACHE_TRY(with_dtype(t, [&](auto tag) -> status {
      max_abs_kernel<decltype(tag)::value>
          <<<grid_for(n, threads), threads, 0, stream_>>>(static_cast<const std::byte*>(src), n, d);
      return launched("max_abs_kernel");
    }));
    unsigned m = 0;
    KVCACHE_TRY(runtime_status(
        cudaMemcpyAsync(&m, d, sizeof m, cudaMemcpyDeviceToHost, stream_), "validate"));
    KVCACHE_TRY(runtime_status(cudaStreamSynchronize(stream_), "validate"));
    if (m <= bound) return {};
    std::vector<std::byte> host(n * size_of(t));  // rare: find the element for the message
    KVCACHE_TRY(runtime_status(cudaMemcpy(host.data(), src, host.size(), cudaMemcpyDefault),
                               "validate"));
    return kvcache::detail::check_finite(format, host.data(), n, t, limit);
  }

  //! Device bytes to the host, after the stream's work.
  std::vector<std::byte> to_host(const std::byte* p, std::size_t bytes) const {
    std::vector<std::byte> h(bytes);
    if (bytes == 0) return h;
    device_buffer::raise_on(cudaStreamSynchronize(stream_), "kvcache device quantizer: decode");
    device_buffer::raise_on(cudaMemcpy(h.data(), p, bytes, cudaMemcpyDefault),
                            "kvcache device quantizer: decode");
    return h;
  }

 private:
  cudaStream_t stream_ = nullptr;
  bool check_ = true;
  device_buffer staging_[2];
  device_buffer counters_;
};

}  // namespace quant_detail

//! llama.cpp blocks (`Host` = q8_0 or q4_0) encoded on the device, for a `cache<cuda_vmm>`:
//! the host format's bytes and name. `encode_chunks` (the cache's batched path, scale_bytes 0)
//! encodes every chunk of an append's K and V in one launch per 32 chunks; host input is staged
//! to the device first. Everything runs in stream order on one stream (the legacy default
//! stream unless given; use a blocking stream, as for cuda_passthrough). `validate` rejects
//! NaN/Inf (a synchronizing check for device input; `check_input(false)` skips it).
//! `decode` (host output, the quantizer interface) reads the codes back. A runtime error raises
//! kvcache::error. One quantizer per cache; not thread-safe (its scratch). nvcc only.
template <class Host>
class cuda_ggml_format {
 public:
  using host_format = Host;
  static constexpr unsigned bits = Host::bits;
  static constexpr unsigned group = Host::group;

  cuda_ggml_format() = default;
  explicit cuda_ggml_format(cudaStream_t stream) : io_(stream) {}

  static constexpr const char* name() noexcept { return Host::name(); }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept { return Host{}.code_bytes(g); }
  [[nodiscard]] std::size_t scale_bytes(const geometry&) const noexcept { return 0; }
  [[nodiscard]] status bind(const geometry& g) const { return Host{}.bind(g); }
  //! The host format's bound: the block's fp16 scale (amax / divisor) must stay finite.
  [[nodiscard]] status validate(const void* src, std::size_t elements, dtype t) const {
    return io_.validate(name(), src, elements, t, 65504.0f * Host::scale_divisor);
  }
  void check_input(bool on) noexcept { io_.check_input(on); }
  [[nodiscard]] cudaStream_t stream() const noexcept { return io_.stream(); }

  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* /*scales*/, quant_context = {}) {
    const std::byte* s = io_.stage(src, rows * g.head_bytes(), 0);
    quant_detail::raise_on(gpu::encode_ggml<Host>(s, g.type, rows, g.head_dim, codes, io_.stream()),
                           "cuda quantizer encode");
  }

  //! An append's K and V (`[tokens][kv_heads]` rows) into their ranges: chunk c's rows
  //! [src, src+rows) to k_base + dst and v_base + dst.
  void encode_chunks(const void* k_src, const void* v_src, std::span<const row_chunk> chunks,
                     const geometry& g, std::byte* k_base, std::byte* v_base) {
    if (chunks.empty()) return;
    std::size_t rows = 0;
    for (const auto& c : chunks) rows = c.src + c.rows > rows ? c.src + c.rows : rows;
    const std::size_t row = g.head_bytes();
    const std::byte* ks = io_.stage(k_src, rows * row, 0);
    const std::byte* vs = io_.stage(v_src, rows * row, 1);
    const std::uint32_t per_row = g.head_dim / 32;
    const std::size_t code_row = code_bytes(g);
    quant_detail::encode_batch b;
    auto flush = [&] {
      quant_detail::raise_on(
          quant_detail::launch_blocks<typename quant_detail::device_of<Host>::type>(
              g.type, b, per_row, io_.stream()),
          "cuda quantizer encode_chunks");
      b.count = 0;
      b.total = 0;
    };
    auto add = [&](const std::byte* src, std::byte* base, const row_chunk& c) {
      // one job holds < 2^32 blocks; split bigger chunks
      const std::size_t max_rows = (std::size_t{1} << 30) / per_row;
      for (std::size_t r0 = 0; r0 < c.rows; r0 += max_rows) {
        const std::size_t n = c.rows - r0 < max_rows ? c.rows - r0 : max_rows;
        if (b.count == quant_detail::encode_batch::capacity) flush();
        b.job[b.count++] = {src + (c.src + r0) * row, base + c.dst + r0 * code_row, nullptr,
                            b.total, static_cast<std::uint32_t>(n * per_row)};
        b.total += n * per_row;
      }
    };
    for (const auto& c : chunks) {
      add(ks, k_base, c);
      add(vs, v_base, c);
    }
    flush();
  }

  void decode(const std::byte* codes, const std::byte* scales, std::size_t rows, const geometry& g,
              float* dst) const {
    const auto h = io_.to_host(codes, rows * code_bytes(g));
    Host{}.decode(h.data(), scales, rows, g, dst);
  }

 private:
  mutable quant_detail::device_io io_;  // validate (const in the concept) uses its counters
};

using cuda_q8_0 = cuda_ggml_format<q8_0>;
using cuda_q4_0 = cuda_ggml_format<q4_0>;

//! kivi_per_token<Bits, Group> encoded on the device (codes and out-of-band fp16 metadata in the
//! cache's device ranges: the cache calls `encode` per chunk, since the format has metadata).
//! Same stream, staging and validation rules as cuda_ggml_format; validate also rejects
//! |x| > 65504, as the host format does.
template <unsigned Bits, unsigned Group = 32>
class cuda_kivi_per_token {
 public:
  using host_format = kivi_per_token<Bits, Group>;
  static constexpr unsigned bits = Bits;
  static constexpr unsigned group = Group;

  cuda_kivi_per_token() = default;
  explicit cuda_kivi_per_token(cudaStream_t stream) : io_(stream) {}

  static constexpr const char* name() noexcept { return host_format::name(); }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept { return host_format{}.code_bytes(g); }
  [[nodiscard]] std::size_t scale_bytes(const geometry& g) const noexcept { return host_format{}.scale_bytes(g); }
  [[nodiscard]] status bind(const geometry& g) const { return host_format{}.bind(g); }
  [[nodiscard]] status validate(const void* src, std::size_t elements, dtype t) const {
    return io_.validate(name(), src, elements, t, kivi_input_limit);
  }
  void check_input(bool on) noexcept { io_.check_input(on); }
  [[nodiscard]] cudaStream_t stream() const noexcept { return io_.stream(); }

  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* scales, quant_context = {}) {
    const std::byte* s = io_.stage(src, rows * g.head_bytes(), 0);
    quant_detail::raise_on(gpu::encode_kivi_per_token<Bits, Group>(s, g.type, rows, g.head_dim,
                                                                   codes, scales, io_.stream()),
                           "cuda_kivi_per_token::encode");
  }
  void decode(const std::byte* codes, const std::byte* scales, std::size_t rows, const geometry& g,
              float* dst) const {
    const auto c = io_.to_host(codes, rows * code_bytes(g));
    const auto m = io_.to_host(scales, rows * scale_bytes(g));
    host_format{}.decode(c.data(), m.data(), rows, g, dst);
  }

 private:
  mutable quant_detail::device_io io_;
};

//! fp8_e4m3 encoded on the device, scales shared per layer (or per KV head) for K and for V.
//! Scales given at construction (a checkpoint's k_scale/v_scale), or calibrated from the first
//! append of each (layer, K|V) as amax / 448 exactly as the host format does (device input: one
//! reduction kernel and a read back). The scales live in device memory: `shared_scales` (and so
//! the view's k_scales/v_scales) point there, for attention kernels; `scale()` reads the host
//! copy. No `encode_chunks`: it has no layer to pick scales by, so the cache encodes per chunk
//! (one launch per chunk; one per tensor for an aligned token-major append).
class cuda_fp8_e4m3 {
 public:
  using host_format = fp8_e4m3;
  static constexpr unsigned bits = 8;

  //! Per-layer scales calibrated from the first append (legacy default stream).
  cuda_fp8_e4m3() = default;
  explicit cuda_fp8_e4m3(scale_granularity gran, cudaStream_t stream = nullptr)
      : io_(stream), gran_(gran) {}
  cuda_fp8_e4m3(scale_granularity gran, std::vector<float> k_scales, std::vector<float> v_scales,
                cudaStream_t stream = nullptr)
      : io_(stream), gran_(gran), given_(true), k_(std::move(k_scales)), v_(std::move(v_scales)) {}

  static constexpr const char* name() noexcept { return fp8_e4m3::name(); }
  [[nodiscard]] std::size_t code_bytes(const geometry& g) const noexcept { return g.head_dim; }
  [[nodiscard]] std::size_t scale_bytes(const geometry&) const noexcept { return 0; }
  [[nodiscard]] scale_granularity granularity() const noexcept { return gran_; }
  void check_input(bool on) noexcept { io_.check_input(on); }
  [[nodiscard]] cudaStream_t stream() const noexcept { return io_.stream(); }

  //! As fp8_e4m3::bind (the same checks of given scales), then the scales go to the device.
  status bind(const geometry& g) {
    fp8_e4m3 host = given_ ? fp8_e4m3(gran_, k_, v_) : fp8_e4m3(gran_);
    KVCACHE_TRY(host.bind(g));
    heads_ = gran_ == scale_granularity::per_head ? g.kv_heads : 1;
    kv_heads_ = g.kv_heads;
    const std::size_t n = std::size_t{g.layers} * heads_;
    if (!given_ && (k_.size() != n || v_.size() != n)) {
      k_.assign(n, 0.0f);
      v_.assign(n, 0.0f);
    }
    KVCACHE_TRY(dev_.try_reserve(2 * (n ? n : 1) * sizeof(float), "cuda_fp8_e4m3: scales"));
    return upload();
  }
  [[nodiscard]] status validate(const void* src, std::size_t elements, dtype t) const {
    return io_.validate(name(), src, elements, t, 0.0f);
  }
  //! Sets the still-unset scales of (ctx.layer, ctx.part) from this append.
  void calibrate(const void* src, std::uint32_t tokens, const geometry& g, quant_context ctx) {
    ctx.first_head = 0;
    calibrate_rows(src, std::size_t{tokens} * g.kv_heads, g, ctx);
  }
  void encode(const void* src, std::size_t rows, const geometry& g, std::byte* codes,
              std::byte* /*scales*/, quant_context ctx = {}) {
    calibrate_rows(src, rows, g, ctx);
    const std::byte* s = io_.stage(src, rows * g.head_bytes(), 0);
    quant_detail::raise_on(
        gpu::encode_fp8_e4m3(s, g.type, rows, g.head_dim, codes, device_scales(ctx.layer, ctx.part),
                             heads_, g.kv_heads, ctx.first_head, io_.stream()),
        "cuda_fp8_e4m3::encode");
  }
  //! `scales` (host or device memory) points at the fp32 scale of these rows; null means 1.
  void decode(const std::byte* codes, const std::byte* scales, std::size_t rows, const geometry& g,
              float* dst) const {
    const auto c = io_.to_host(codes, rows * g.head_dim);
    float scale = 1.0f;
    if (scales)
      quant_detail::device_buffer::raise_on(
          cudaMemcpy(&scale, scales, sizeof scale, cudaMemcpyDefault), "cuda_fp8_e4m3::decode");
    fp8_e4m3{}.decode(c.data(), reinterpret_cast<const std::byte*>(&scale), rows, g, dst);
  }

  //! Device pointer to the `[heads]` (per head) or `[1]` scales of (layer, part); null before bind.
  [[nodiscard]] const float* shared_scales(std::uint32_t layer, kv_part part) const noexcept {
    return dev_.get() ? device_scales(layer, part) : nullptr;
  }
  [[nodiscard]] std::size_t shared_scale_head_stride() const noexcept {
    return gran_ == scale_granularity::per_head ? sizeof(float) : 0;
  }
  //! The scale of (layer, part, head) (host copy); 0 while not yet calibrated.
  [[nodiscard]] float scale(std::uint32_t layer, kv_part part, std::uint32_t head = 0) const noexcept {
    const auto& t = part == kv_part::k ? k_ : v_;
    const std::size_t i = std::size_t{layer} * heads_ + (heads_ > 1 ? head : 0);
    return i < t.size() ? t[i] : 0.0f;
  }

 private:
  float* device_scales(std::uint32_t layer, kv_part part) const noexcept {
    auto* base = reinterpret_cast<float*>(dev_.get());
    return base + (part == kv_part::k ? 0 : k_.size()) + std::size_t{layer} * heads_;
  }
  //! Host scales to the device (in stream order, waited for: the host copies change later).
  status upload() {
    auto* base = reinterpret_cast<float*>(dev_.get());
    const std::size_t bytes = k_.size() * sizeof(float);
    if (bytes == 0) return {};
    KVCACHE_TRY(runtime_status(
        cudaMemcpyAsync(base, k_.data(), bytes, cudaMemcpyHostToDevice, io_.stream()),
        "cuda_fp8_e4m3: scales"));
    KVCACHE_TRY(runtime_status(
        cudaMemcpyAsync(base + k_.size(), v_.data(), bytes, cudaMemcpyHostToDevice, io_.stream()),
        "cuda_fp8_e4m3: scales"));
    return runtime_status(cudaStreamSynchronize(io_.stream()), "cuda_fp8_e4m3: scales");
  }
  void calibrate_rows(const void* src, std::size_t rows, const geometry& g, quant_context ctx) {
    if (!dev_.get()) {
      if (status st = bind(g); !st) raise(st.code(), st.message());
    }
    auto& t = ctx.part == kv_part::k ? k_ : v_;
    const std::size_t at = std::size_t{ctx.layer} * heads_;
    bool unset = false;
    for (std::uint32_t h = 0; h < heads_; ++h) unset |= t[at + h] == 0.0f;
    if (!unset || rows == 0) return;
    const auto amax = io_.row_amax(src, rows, g.head_dim, g.type, heads_ > 1 ? g.kv_heads : 1,
                                   heads_ > 1 ? ctx.first_head : 0);
    std::vector<bool> seen(heads_, false);
    for (std::size_t r = 0; r < rows && r < heads_; ++r)
      seen[heads_ > 1 ? (ctx.first_head + r) % g.kv_heads : 0] = true;
    for (std::uint32_t h = 0; h < heads_; ++h)
      if (t[at + h] == 0.0f && seen[h])
        t[at + h] = fp8_scale_from_amax(kvcache::detail::bit_cast<float>(amax[h]));
    quant_detail::raise_on(upload(), "cuda_fp8_e4m3: calibration");
  }

  mutable quant_detail::device_io io_;  // validate (const in the concept) uses its counters
  scale_granularity gran_ = scale_granularity::per_layer;
  bool given_ = false;
  std::uint32_t heads_ = 1, kv_heads_ = 0;
  std::vector<float> k_, v_;            // host copies
  quant_detail::device_buffer dev_;     // [k: layers*heads][v: layers*heads]
};

}  // namespace gpu

using gpu::cuda_fp8_e4m3;
using gpu::cuda_kivi_per_token;
using gpu::cuda_q4_0;
using gpu::cuda_q8_0;

static_assert(quantizer<gpu::cuda_q8_0>);
static_assert(quantizer<gpu::cuda_q4_0>);
static_assert(quantizer<gpu::cuda_kivi_per_token<4>>);
static_assert(quantizer<gpu::cuda_fp8_e4m3>);

KVCACHE_NAMESPACE_END
