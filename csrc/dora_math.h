// dora_norm (DoRA's column norm): the reduction order shared by the CPU and CUDA kernels, so that
// both give the same bits (torch-free, host + device).
//
//   n[o] = sqrt(sum_i v[o, i]^2),  v = dec(W[o, i]) + S[o, i]
//
// with S merge_'s fp32 fma chain (merge_math.h, operands from merge_glue.h) and one fp32 add (v is
// not rounded to W's dtype). Squares are accumulated as acc = fma(v, v, acc) from +0, in classes:
//   - `in` is cut into chunks of kDoraChunk consecutive indices i; every chunk gives one partial, the
//     partials are added in chunk order ((p0 + p1) + p2 ...), then a correctly rounded sqrt; a NaN
//     norm is written as 0x7FC00000 (the GPU's and CPU's NaN bits differ otherwise).
//   - inside a chunk the order depends on how the kernels see the weight: as merge_glue.h's [P, Q]
//     view with unit column stride, `in` runs along Q ("rows": W [out, in] row-major, or W [in, out]
//     column-major with fan_in_fan_out) or along P ("columns": fan_in_fan_out, transformers Conv1D).
//     rows: 128 classes c = i mod 128, each an fma chain over the chunk's i = c, c + 128, ...
//       (ascending); combined by halving x[c] += x[c + h] (c < h) for h = 64, 32, 16, 8, 4, then
//       (x0 + x1) + (x2 + x3). (CUDA: a thread holds the columns 4 lane + u of each 128 and chains
//       them over the chunk's column tiles; the halvings are lane exchanges of the warp.)
//     columns: 8 classes w = (i mod BP) / RPT (BP, RPT = 64, 8 for fp32 weights and 32, 4 for
//       16-bit ones: the CUDA merge tile's rows per block / per thread), each an fma chain in
//       ascending i; combined as ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
// So the bits depend on the layout (rows / columns) and for columns on W's dtype class, never on
// the device, the thread count or the schedule. fp32 squares overflow to inf above |v| ~ 1.8e19
// (as torch.linalg.norm's fp32 sums do).
#pragma once
#include <cmath>
#include <cstdint>

#include "merge_math.h"  // LORA_EXT_HD, bits_f32

namespace lora_ext::dora_math {

constexpr int64_t kDoraChunk = 512;  // `in` indices per partial
constexpr int kRowClasses = 128;
constexpr int kColClasses = 8;

// Column mode: rows per block / per class run, by the weight's element width.
template <class F>
constexpr int col_block() {
  return F::kBits == 16 ? 32 : 64;
}
template <class F>
constexpr int col_run() {
  return F::kBits == 16 ? 4 : 8;
}
template <class F>
LORA_EXT_HD int col_class(int64_t i) {
  return static_cast<int>((i % col_block<F>()) / col_run<F>());
}

// Rows: the 128 class sums of a chunk -> its partial (x is overwritten).
LORA_EXT_HD float row_combine(float* x) {
  for (int h = kRowClasses / 2; h >= 4; h >>= 1)
    for (int c = 0; c < h; ++c) x[c] = x[c] + x[c + h];
  return (x[0] + x[1]) + (x[2] + x[3]);
}

// Columns: the 8 class sums of a chunk -> its partial.
LORA_EXT_HD float col_combine(float a0, float a1, float a2, float a3, float a4, float a5, float a6,
                              float a7) {
  return ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7));
}

// The norm from the sum of the partials.
LORA_EXT_HD float finish(float sum) {
  if (sum != sum) return merge_math::bits_f32(0x7FC00000u);
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(sum);
#else
  return std::sqrt(sum);
#endif
}

}  // namespace lora_ext::dora_math
