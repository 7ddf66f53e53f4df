// Torch-side helpers shared by the CUDA launchers: device guard, current stream, error check,
// capture status. Built with -DLORA_EXT_EMU (csrc/cuda/emu), the launchers run the emulated
// kernels on CPU tensors instead: no device, no streams, errors reported the same way.
#pragma once
#include <ATen/ATen.h>

#include "launch.h"

#if defined(LORA_EXT_EMU)

namespace lora_ext::cuda {
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }
inline int sm_count(const at::Tensor&) { return num_sms(0); }
inline bool capturing() { return false; }
}  // namespace lora_ext::cuda
#define LORA_EXT_CUDA_CHECK(expr)                                                              \
  do {                                                                                         \
    const cudaError_t err_ = (expr);                                                           \
    TORCH_CHECK(err_ == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(err_), "\n", \
                ::lora_ext::emu::take_errors());                                               \
  } while (0)

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace lora_ext::cuda {
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
inline int sm_count(const at::Tensor& t) { return num_sms(t.device().index()); }
// Is the current stream being captured into a CUDA graph (no host syncs allowed)?
inline bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}
}  // namespace lora_ext::cuda
#define LORA_EXT_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)

#endif
