// Planted-bug kernels: each has one defect the emulation harness must catch (tests/emu/
// test_detectors.py asserts that it does). Built only into the emulated library.
// lora_ext_emu_planted(name) runs one and returns what the emulator reported, then a line
// "result <hex of the output bytes>" (how the schedule-dependent bugs show).
#include <cstdio>
#include <string>
#include <vector>

#include <mma.h>

#include "cuda/launch.h"

namespace {

// Reads one element past the end of x (global out-of-bounds).
__global__ void oob_global(const float* x, float* out, int n) {
  const int i = threadIdx.x;
  out[i] = x[i + 1 == n ? n : i];  // thread n - 1 reads x[n]
}

// Writes one element past the end of a shared array.
__global__ void oob_shared(float* out) {
  __shared__ float s[64];
  s[threadIdx.x + 1] = 1.f;  // thread 63 writes s[64]
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Reads a neighbour's shared-memory element without a barrier in between.
__global__ void missing_sync(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x + 1);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];  // needs __syncthreads() before this read
  __syncthreads();
  s[threadIdx.x] = 0.f;
}

// Only the first warp reaches the barrier; the others exit.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Threads wait at two different barriers.
__global__ void split_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// A full-warp shuffle after half of the warp has exited.
__global__ void bad_mask(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1.f, 1);
}

// A 16-byte load from an address that is only 4-byte aligned.
__global__ void misaligned(const float* x, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(x + 1);
  out[threadIdx.x] = v.x;
}

// A WMMA tile loaded from a 16-byte (not 32-byte) aligned shared-memory address.
__global__ void wmma_misaligned(float* out) {
  __shared__ __align__(32) float tile[16 * 8 + 4];
  for (int i = threadIdx.x; i < 16 * 8 + 4; i += 32) tile[i] = 1.f;
  __syncwarp();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                         nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile + 4, 8);
  out[threadIdx.x] = a.x[0];
}

// Float atomics into one cell: the sum's bits depend on the order of the adds.
__global__ void atomic_order(float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = 3.f / (i + 1) + static_cast<float>(i);  // sum ~ 33000: fp32 ulp 2^-8
  atomicAdd(out, v);
}

// A correct kernel (block reduction through shared memory and shuffles): no finding, the same
// result under every schedule.
__global__ void correct(const float* x, float* out) {
  __shared__ float part[4];
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = part[0] + part[1] + part[2] + part[3];
}

std::string g_report;

}  // namespace

extern "C" const char* lora_ext_emu_planted(const char* name_c) {
  const std::string name(name_c);
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[i] = 0.25f * i - 3.f;
  float* xin = new float[64];  // exactly 64 elements: one past is out of bounds
  for (int i = 0; i < 64; ++i) xin[i] = x[i];
  std::vector<float> out(256, 0.f);
  float* o = out.data();
  if (name == "oob_global") {
    LORA_EXT_LAUNCH(oob_global, 1, 64, 0, nullptr, xin, o, 64);
  } else if (name == "oob_shared") {
    LORA_EXT_LAUNCH(oob_shared, 1, 64, 0, nullptr, o);
  } else if (name == "missing_sync") {
    LORA_EXT_LAUNCH(missing_sync, 1, 64, 0, nullptr, o);
  } else if (name == "divergent_barrier") {
    LORA_EXT_LAUNCH(divergent_barrier, 1, 64, 0, nullptr, o);
  } else if (name == "split_barrier") {
    LORA_EXT_LAUNCH(split_barrier, 1, 64, 0, nullptr, o);
  } else if (name == "bad_mask") {
    LORA_EXT_LAUNCH(bad_mask, 1, 64, 0, nullptr, o);
  } else if (name == "misaligned") {
    LORA_EXT_LAUNCH(misaligned, 1, 32, 0, nullptr, x.data(), o);
  } else if (name == "wmma_misaligned") {
    LORA_EXT_LAUNCH(wmma_misaligned, 1, 32, 0, nullptr, o);
  } else if (name == "atomic_order") {
    LORA_EXT_LAUNCH(atomic_order, 4, 64, 0, nullptr, o);
  } else if (name == "correct") {
    LORA_EXT_LAUNCH(correct, 2, 128, 0, nullptr, x.data(), o);
  } else if (name == "bad_config") {
    LORA_EXT_LAUNCH(correct, dim3(1, 70000), 128, 0, nullptr, x.data(), o);
  } else {
    g_report = "unknown planted kernel " + name;
    delete[] xin;
    return g_report.c_str();
  }
  const cudaError_t err = cudaGetLastError();
  g_report = lora_ext::emu::take_errors();
  if (err != cudaSuccess) g_report += std::string("error ") + cudaGetErrorString(err) + "\n";
  g_report += "result ";
  const unsigned char* b = reinterpret_cast<const unsigned char*>(o);
  char hex[3];
  for (size_t i = 0; i < out.size() * sizeof(float); ++i) {
    std::snprintf(hex, sizeof(hex), "%02x", b[i]);
    g_report += hex;
  }
  delete[] xin;
  return g_report.c_str();
}
