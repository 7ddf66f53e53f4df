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

// Merge kernels (merge_kernels.cu; element math in ../merge_math.h). W [P, Q] has row stride
// ld; the fp32 operands L [>= round_up(P, 64), Rt] and R [Rt, ldr >= round_up(Q, 256)] are
// zero padded (rows of L, columns of R) so the kernels read them without bounds checks.
// exact == false: W = merged(W, L R). exact == true (remerge_, W contiguous): the
// transition from the old operands (Lo, Ro, Rto; Rto == 0: W is W0, first merge, codes are
// written) to the new ones, codes/fails as described in merge_math.h.
struct MergeParams {
  void* w;
  int64_t P, Q, ld;
  const float* L;
  const float* R;
  int64_t Rt, ldr;
  const float* Lo;
  const float* Ro;
  int64_t Rto, ldro;
  uint32_t* codes;
  uint32_t* fails;
  int bits;
  bool exact;
};
cudaError_t merge(DType dt, const MergeParams& p, cudaStream_t stream);

// W.flat[idx[t]] = merged(vals[t], S at that element) for t < n (Rt == 0: vals[t]).
struct MergePointsParams {
  void* w;
  int64_t P, Q;
  const int64_t* idx;
  const void* vals;
  int64_t n;
  const float* L;
  const float* R;
  int64_t Rt, ldr;
};
cudaError_t merge_points(DType dt, const MergePointsParams& p, cudaStream_t stream);

// Comma-separated SM architectures this binary holds code for (nvcc's __CUDA_ARCH_LIST__).
const char* compiled_archs();
// Multiprocessor count of a device, cached after the first query.
int num_sms(int device);

}  // namespace lora_ext::cuda
