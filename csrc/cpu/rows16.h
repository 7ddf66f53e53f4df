// fp32 <-> 16-bit rows for the CPU kernels (torch-free), 8 lanes at a time, with the bits of
// c10's scalar conversions: round to nearest even; a NaN becomes 0x7FC0 (bf16) or
// sign | 0x7E00 (fp16). bf16 elements are their uint16_t bits, fp16 ones _Float16.
// Each entry point is cloned for AVX2 and AVX-512 (LORA_EXT_CLONES); fp16 uses the F16C
// instructions where the CPU has them (picked at the first call).
#pragma once
#include <cstdint>

namespace lora_ext::cpu {

void to_f32(const uint16_t* src, int64_t n, float* dst);
void to_f32(const _Float16* src, int64_t n, float* dst);
void from_f32(const float* src, int64_t n, uint16_t* dst);
void from_f32(const float* src, int64_t n, _Float16* dst);
// y[i] = round(float(y[i]) + a * x[i]): one rounding per element
void axpy_rounded(uint16_t* y, const float* x, float a, int64_t n);
void axpy_rounded(_Float16* y, const float* x, float a, int64_t n);

}  // namespace lora_ext::cpu
