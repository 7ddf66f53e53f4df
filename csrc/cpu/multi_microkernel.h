// Vector kernels of the CPU multi-adapter op (torch-free), for the few-tokens-per-adapter
// case where packing weights into panels would cost more than it saves.
//
// Tiling:
//   shrink_tile: u[t][j] = A[j, :K] . x[t, :K] for up to 4 tokens and all r rows; rows of A
//     are taken two at a time against the (up to 4) token rows, i.e. a 2 x 4 block of
//     8-lane fp32 accumulators (8 + 2 + 1 vector registers), one pass over K each; every
//     A row is read once per 4 tokens, and the partial vectors are summed once at the end.
//   expand_rows: out[o] = B[o, :r] . u[:r] for a run of rows of B (row stride ldb); 8 rows
//     at a time as 8 vector accumulators over r, folded into one vector of 8 results by a
//     3-level shuffle-add tree (no scalar horizontal sums).
// Elements are float, _Float16 (fp16 bits) or uint16_t (bf16 bits), converted to fp32 on
// load. Each entry point is cloned for AVX2+FMA and AVX-512 (see lowrank_microkernel.h); fp16
// tiles use the F16C instructions where f16c_conversions() (lowrank_microkernel.h), bf16 tiles the
// AVX512-BF16 dot products (shrink_rows_bf16) where bf16_dot().
#pragma once
#include <cstdint>

namespace lora_ext::cpu {

#define LORA_EXT_MULTI_DECL(E, SUF)                                                        \
  void shrink_tile_##SUF(const E* A, int64_t lda, int64_t r, const E* const* x, int nt,     \
                         int64_t K, float* const* u);                                      \
  void expand_rows_##SUF(const E* B, int64_t ldb, int64_t r, int64_t nrows, const float* u, \
                         float* out);
LORA_EXT_MULTI_DECL(float, f32)
LORA_EXT_MULTI_DECL(_Float16, f16)
LORA_EXT_MULTI_DECL(uint16_t, bf16)
#undef LORA_EXT_MULTI_DECL

}  // namespace lora_ext::cpu
