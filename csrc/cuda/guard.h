// Torch-side helpers shared by the CUDA launchers.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launch.h"

namespace lora_ext::cuda {

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline int sm_count(const at::Tensor& t) { return num_sms(t.device().index()); }

}  // namespace lora_ext::cuda
