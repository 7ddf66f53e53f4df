#include "microkernel.h"

namespace lora_ext::cpu {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads/stores

LORA_EXT_CLONES
void micro_6x16(int64_t K, const float* const rows[kMR], const float* panel, float out[kMR][kNR]) {
  v8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {};
  v8 c30 = {}, c31 = {}, c40 = {}, c41 = {}, c50 = {}, c51 = {};
  const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2];
  const float *r3 = rows[3], *r4 = rows[4], *r5 = rows[5];
  for (int64_t k = 0; k < K; ++k) {
    const v8 b0 = *reinterpret_cast<const v8u*>(panel + k * kNR);
    const v8 b1 = *reinterpret_cast<const v8u*>(panel + k * kNR + 8);
    float a;
    a = r0[k]; c00 += a * b0; c01 += a * b1;
    a = r1[k]; c10 += a * b0; c11 += a * b1;
    a = r2[k]; c20 += a * b0; c21 += a * b1;
    a = r3[k]; c30 += a * b0; c31 += a * b1;
    a = r4[k]; c40 += a * b0; c41 += a * b1;
    a = r5[k]; c50 += a * b0; c51 += a * b1;
  }
  const v8 acc[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int m = 0; m < kMR; ++m) {
    *reinterpret_cast<v8u*>(&out[m][0]) = acc[m][0];
    *reinterpret_cast<v8u*>(&out[m][8]) = acc[m][1];
  }
}

}  // namespace lora_ext::cpu
