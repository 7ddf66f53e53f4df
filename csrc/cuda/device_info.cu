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

int num_sms(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();  // clear the sticky-free error; fall back to a typical count
      n = 108;
    }
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace lora_ext::cuda
