// Device and build facts for the launchers (torch-free).
#include <atomic>

#include "launch.h"

#define LORA_EXT_STR2(...) #__VA_ARGS__
#define LORA_EXT_STR(...) LORA_EXT_STR2(__VA_ARGS__)

namespace lora_ext::cuda {

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return LORA_EXT_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

namespace {

// Device attribute `attr` of `device`, cached after the first query (fallback when it fails).
int cached_attr(cudaDeviceAttr attr, int slot, int device, int fallback) {
#if defined(LORA_EXT_EMU)  // the emulated device's attributes change between tests: no cache
  (void)slot;
  int v = 0;
  return cudaDeviceGetAttribute(&v, attr, device) == cudaSuccess ? v : fallback;
#endif
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[3][kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  const int c = cache[slot][device].load(std::memory_order_relaxed);  // value + 1; 0: unknown
  if (c > 0) return c - 1;
  int n = 0;
  if (cudaDeviceGetAttribute(&n, attr, device) != cudaSuccess || n < 0) {
    cudaGetLastError();  // clear the error; fall back to a typical value
    n = fallback;
  }
  cache[slot][device].store(n + 1, std::memory_order_relaxed);
  return n;
}

#if !defined(LORA_EXT_EMU)
__global__ void arch_probe() {}
#endif

}  // namespace

bool tf32_mma_compiled(int device) {
#if defined(LORA_EXT_EMU)
  (void)device;
  return true;
#else
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  const int d = device < 0 || device >= kMaxDevices ? 0 : device;
  const int c = cache[d].load(std::memory_order_relaxed);
  if (c > 0) return c == 2;
  cudaFuncAttributes attr{};
  bool yes = false;
  if (cudaFuncGetAttributes(&attr, arch_probe) == cudaSuccess) {
    yes = attr.ptxVersion >= 80;
  } else {
    cudaGetLastError();
  }
  cache[d].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
#endif
}

int num_sms(int device) {
  const int n = cached_attr(cudaDevAttrMultiProcessorCount, 0, device, 108);
  return n > 0 ? n : 108;
}

int compute_capability(int device) {
  return cached_attr(cudaDevAttrComputeCapabilityMajor, 1, device, 8) * 10 +
         cached_attr(cudaDevAttrComputeCapabilityMinor, 2, device, 0);
}

}  // namespace lora_ext::cuda
