// The low-rank job every single-adapter kernel runs (torch-free, shared by CPU and CUDA):
//
//   shrink  u[T, r]  = (keep_x ⊙ x)[T, in] · A[r, in]^T                  (fp32 result)
//   expand  y[T, out] += scale · keep_y ⊙ (u[T, r] · B[out, r]^T)         (rounded once)
//
// lora_linear's backward (g as x, B^T as A, A^T as B) may also accumulate the weight
// gradients in the same pass over the tokens, unscaled, in fp32 (CPU backend only):
//   dA [r, nf] = u^T (keep_f ⊙ xf)    xf [T, nf]: the forward's x (mask index t * nf + k)
//   dBt[r, in] = uf^T x               uf [T, r]: the forward's fp32 u
// x == nullptr: u is given (expand only). y == nullptr: shrink only (u is the output).
// Dropout keeps element i of a [T, width] tensor (i = t * width + col) when
// hash(seed, i) >= p * 2^32 and scales kept values by 1 / (1 - p); the same mask can be
// regenerated in backward from the seed, so no mask is stored.
#pragma once
#include <cstdint>

#include "dtype.h"  // LORA_EXT_HD

namespace lora_ext {

struct LowRankJob {
  const void* x = nullptr;  // [T, in], row stride ldx
  int64_t ldx = 0;
  const void* A = nullptr;  // [r, in] contiguous
  float* u = nullptr;       // [T, r] contiguous fp32 (may be a workspace)
  const void* B = nullptr;  // [out, r] contiguous
  void* y = nullptr;        // [T, out], row stride ldy
  int64_t ldy = 0;
  int64_t T = 0, in = 0, out = 0, r = 0;
  float scale = 1.f;
  float dropout_p = 0.f;          // > 0 enables the masks below
  const int64_t* seed = nullptr;  // one int64, in the kernel's memory space
  bool mask_x = false;            // dropout on x in the shrink
  bool mask_y = false;            // dropout on the expand's output
  // the expand writes y = bias + scale * keep_y ⊙ (u B^T) without reading y (the base GEMM then
  // accumulates into it with beta = 1); bias [out] contiguous or null
  bool overwrite_y = false;
  const void* bias = nullptr;
  // weight gradients (see above; CPU only): each output is written when non-null
  const void* xf = nullptr;  // [T, nf], row stride ldxf
  int64_t ldxf = 0, nf = 0;
  bool mask_xf = false;      // dropout on xf (the forward's mask)
  const float* uf = nullptr;  // [T, r] contiguous
  float* dA = nullptr;        // [r, nf] contiguous
  float* dBt = nullptr;       // [r, in] contiguous
  int num_sms = 1;                // CUDA only
  bool tensor_cores = false;      // CUDA only: 16-bit jobs of > 8 tokens may use TF32 tiles
  float* work = nullptr;          // CUDA only: split-K partials, lowrank_workspace() floats
};

// splitmix64 finaliser of (seed, index): a counter-based generator, identical on CPU and GPU.
LORA_EXT_HD uint32_t dropout_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep when bits >= threshold
  float keep_scale = 1.f;  // 1 / (1 - p)
  LORA_EXT_HD static Dropout make(float p, uint64_t seed) {
    Dropout d;
    d.seed = seed;
    const float t = p * 4294967296.f;
    d.threshold = !(t < 4294967040.f) ? 4294967040u : static_cast<uint32_t>(t);
    d.keep_scale = p < 1.f ? 1.f / (1.f - p) : 0.f;
    return d;
  }
  LORA_EXT_HD bool keep(uint64_t index) const { return dropout_bits(seed, index) >= threshold; }
  LORA_EXT_HD float factor(uint64_t index) const { return keep(index) ? keep_scale : 0.f; }
};

}  // namespace lora_ext
