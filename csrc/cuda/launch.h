// Host entry points of the CUDA kernels, torch-free: the .cpp launchers call these
// with raw pointers and the current stream; each returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../dtype.h"

namespace lora_ext::cuda {

// y[T, out] += scale * (x[T, in] A[r, in]^T) B[out, r]^T. u is an fp32 workspace [T, r].
// Rows of x and y have strides ldx and ldy; A and B are contiguous.
struct LoraApplyParams {
  void* y;
  const void* x;
  const void* A;
  const void* B;
  float* u;
  int64_t T, in, out, r, ldx, ldy;
  float scale;
  int num_sms;
};
cudaError_t lora_apply(DType dt, const LoraApplyParams& p, cudaStream_t stream);

// Comma-separated SM architectures this binary holds code for (nvcc's __CUDA_ARCH_LIST__).
const char* compiled_archs();
// Multiprocessor count of a device, cached after the first query.
int num_sms(int device);

}  // namespace lora_ext::cuda
