// Host entry points of the CUDA kernels, torch-free: the .cpp launchers call these
// with raw pointers and the current stream; each returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../dtype.h"
#include "../lowrank.h"

namespace lora_ext::cuda {

// The single-adapter low-rank job of csrc/lowrank.h (seed in device memory).
cudaError_t lowrank(DType dt, const LowRankJob& job, cudaStream_t stream);
// dst[t, :] = keep(t * width + k) * src[t, :] (src row stride ld, dst contiguous).
cudaError_t dropout_rows(DType dt, const void* src, int64_t ld, void* dst, int64_t T, int64_t width,
                         float p, const int64_t* seed, int num_sms, cudaStream_t stream);

// Comma-separated SM architectures this binary holds code for (nvcc's __CUDA_ARCH_LIST__).
const char* compiled_archs();
// Multiprocessor count of a device, cached after the first query.
int num_sms(int device);

}  // namespace lora_ext::cuda
