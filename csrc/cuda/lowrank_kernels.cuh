// Shared by the single-adapter low-rank kernels: lowrank_kernels.cu (plan, decode kernels,
// CUDA-core tiles, launches) and lowrank_tc_kernels.cu (TF32 tensor-core tiles). CUDA headers only.
#pragma once
#include "../lowrank_job.h"
#include "common.cuh"

namespace lora_ext::cuda {

constexpr int kSmallT = 8;  // jobs of up to this many tokens take the decode kernels

// Dropout as passed to kernels: the seed stays in device memory and is read in the kernel.
struct DropArg {
  bool on = false;
  float p = 0.f;
  const int64_t* seed = nullptr;
  __device__ Dropout make() const { return Dropout::make(p, on ? static_cast<uint64_t>(*seed) : 0); }
};

// The expand's epilogue (v: the product element, output dropout already applied):
// y[m, n] += s * v, rounded once (overwrite: y = bias[n] + s * v, y not read).
template <class T>
struct AddY {
  T* y;
  int64_t ldy;
  float scale;
  bool overwrite;
  const T* bias;
  __device__ void operator()(int64_t m, int64_t n, float v) const {
    T* p = y + m * ldy + n;
    const float y0 = !overwrite ? to_f32(*p) : bias != nullptr ? to_f32(bias[n]) : 0.f;
    *p = from_f32<T>(y0 + scale * v);
  }
};

// Tensor-core halves of a 16-bit job (T = __half / __nv_bfloat16, more than kSmallT tokens):
// shrink_tc writes u over rank tiles of bn (16/32/64) rows and K chunks of kchunk, the chunks
// spread over blocks_z blocks along z: one each (out = job.work, the partials of every chunk) or
// all in one (out = job.u); vec: x and A allow 16-byte loads.
template <class T>
cudaError_t shrink_tc(const LowRankJob& j, float* out, int bn, int64_t kchunk, int64_t blocks_z,
                      bool vec, DropArg drop, cudaStream_t s);
template <class T>
cudaError_t expand_tc(const LowRankJob& j, DropArg drop, cudaStream_t s);

}  // namespace lora_ext::cuda
