// SPDX-License-Identifier: Apache-2.0
//! @file
//! The CUDA driver's virtual-memory API, reached without linking libcuda.
//!
//! A binary linked against libcuda does not even load on a machine without a driver. The
//! runtime (cudart) loads the driver lazily, so we ask it for the driver entry points with
//! `cudaGetDriverEntryPointByVersion` (CUDA >= 12.5): the binary starts everywhere, and
//! `device_available()` says false (cleanly, no error left behind) where there is no GPU.
//!
//! Driver errors become `kvcache::status`: `errc::out_of_pages` for CUDA_ERROR_OUT_OF_MEMORY,
//! `errc::system_error` otherwise, with the driver's error name in the message.
//! nvcc only (`.cuh`): host headers never include `cuda/`.
#pragma once

#include <kvcache/config.hpp>
#include <kvcache/core/error.hpp>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12050
#  error "kvcache/cuda needs CUDA >= 12.5 (cudaGetDriverEntryPointByVersion)"
#endif

// nvcc's front end flags `st = f();` (status is [[nodiscard]] and operator= returns status&).
#if defined(__NVCC__)
#  pragma nv_diagnostic push
#  pragma nv_diag_suppress 2810
#endif

KVCACHE_NAMESPACE_BEGIN
namespace gpu {

//! Driver functions kvcache uses (ABI of CUDA 12.0, the version passed to the entry-point query).
struct driver_api {
  CUresult (*get_error_name)(CUresult, const char**) = nullptr;
  CUresult (*mem_create)(CUmemGenericAllocationHandle*, std::size_t, const CUmemAllocationProp*,
                         unsigned long long) = nullptr;
  CUresult (*mem_release)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*mem_address_reserve)(CUdeviceptr*, std::size_t, std::size_t, CUdeviceptr,
                                  unsigned long long) = nullptr;
  CUresult (*mem_address_free)(CUdeviceptr, std::size_t) = nullptr;
  CUresult (*mem_map)(CUdeviceptr, std::size_t, std::size_t, CUmemGenericAllocationHandle,
                      unsigned long long) = nullptr;
  CUresult (*mem_unmap)(CUdeviceptr, std::size_t) = nullptr;
  CUresult (*mem_set_access)(CUdeviceptr, std::size_t, const CUmemAccessDesc*,
                             std::size_t) = nullptr;
  CUresult (*mem_get_allocation_granularity)(std::size_t*, const CUmemAllocationProp*,
                                             CUmemAllocationGranularity_flags) = nullptr;
};

//! The CUDA version whose ABI the entry points are requested for.
inline constexpr unsigned driver_abi_version = 12000;

//! True when the runtime sees at least one device. Never fails: a missing driver or no device
//! gives false, and the runtime's sticky-free error state is cleared.
inline bool device_available() noexcept {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave the error for the next runtime call to report
    return false;
  }
  return n > 0;
}

//! A runtime error as a status (system_error; out_of_pages for cudaErrorMemoryAllocation).
inline status runtime_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return {};
  (void)cudaGetLastError();
  return {e == cudaErrorMemoryAllocation ? errc::out_of_pages : errc::system_error,
          std::string(what) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
              ")"};
}

//! True for device (or managed) memory of the current device: a kernel launched there can read
//! it. Host memory (pageable or pinned) and other devices' memory answer false.
inline bool on_current_device(const void* p) noexcept {
  cudaPointerAttributes a{};
  int dev = -1;
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess || cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) && a.device == dev;
}

namespace detail {

struct driver_load {
  driver_api api;
  status st;
};

template <class F>
status entry_point(const char* symbol, F& fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t e =
      cudaGetDriverEntryPointByVersion(symbol, &p, driver_abi_version, cudaEnableDefault, &q);
  if (e != cudaSuccess) return runtime_status(e, (std::string("driver entry point ") + symbol).c_str());
  if (q != cudaDriverEntryPointSuccess || p == nullptr)
    return {errc::system_error,
            std::string("driver entry point ") + symbol +
                (q == cudaDriverEntryPointVersionNotSufficent ? ": driver too old"
                                                               : ": symbol not found")};
  fn = reinterpret_cast<F>(p);
  return {};
}

inline driver_load load_driver() {
  driver_load r;
  if (!device_available()) {
    r.st = {errc::system_error, "no CUDA device"};
    return r;
  }
  auto& a = r.api;
  status st;
  auto get = [&](const char* sym, auto& fn) {
    if (st.ok()) st = entry_point(sym, fn);
  };
  get("cuGetErrorName", a.get_error_name);
  get("cuMemCreate", a.mem_create);
  get("cuMemRelease", a.mem_release);
  get("cuMemAddressReserve", a.mem_address_reserve);
  get("cuMemAddressFree", a.mem_address_free);
  get("cuMemMap", a.mem_map);
  get("cuMemUnmap", a.mem_unmap);
  get("cuMemSetAccess", a.mem_set_access);
  get("cuMemGetAllocationGranularity", a.mem_get_allocation_granularity);
  r.st = std::move(st);
  return r;
}

}  // namespace detail

//! The driver table, loaded once per process (thread-safe); fails with "no CUDA device" or
//! the entry point that could not be found. The pointer stays valid for the process' life.
inline result<const driver_api*> driver() {
  static const detail::driver_load loaded = detail::load_driver();
  if (!loaded.st.ok()) return loaded.st;
  return &loaded.api;
}

//! A driver result as a status: ok, out_of_pages (CUDA_ERROR_OUT_OF_MEMORY) or system_error,
//! naming the call and the driver's error name.
inline status driver_status(const driver_api& api, CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return {};
  const char* name = nullptr;
  if (api.get_error_name == nullptr || api.get_error_name(r, &name) != CUDA_SUCCESS || !name)
    name = "CUDA_ERROR_UNKNOWN";
  return {r == CUDA_ERROR_OUT_OF_MEMORY ? errc::out_of_pages : errc::system_error,
          std::string(what) + " failed: " + name + " (" + std::to_string(static_cast<int>(r)) +
              ")"};
}

}  // namespace gpu
KVCACHE_NAMESPACE_END

#if defined(__NVCC__)
#  pragma nv_diagnostic pop
#endif
