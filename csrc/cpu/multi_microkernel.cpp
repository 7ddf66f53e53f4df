#include "multi_microkernel.h"

#include <cstring>

#include "lowrank_microkernel.h"
#include "vec16.h"

namespace lora_ext::cpu {
namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef _Float16 h8 __attribute__((vector_size(16)));

#define AI inline __attribute__((always_inline))

AI v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
AI v8 load8(const _Float16* p) {  // c10's conversion, 8 lanes of integer arithmetic (vec16.h)
  h8 h;
  std::memcpy(&h, p, sizeof(h));
  return vec16::widen(h);
}
AI v8 load8(const uint16_t* p) {  // bf16: the top half of an fp32
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  v8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
#if defined(__x86_64__) && defined(__GNUC__)
// fp16 read through the F16C instructions: the element type of the tiles instantiated in
// functions compiled for x86-64-v3 (inline asm: the template bodies carry no target attribute)
struct F16C16 {
  _Float16 h;
};
AI v8 load8(const F16C16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  v8 v;
  asm("vcvtph2ps %1, %0" : "=x"(v) : "x"(h));
  return v;
}
AI float tof(F16C16 v) { return static_cast<float>(v.h); }
#endif
AI float tof(float v) { return v; }
AI float tof(_Float16 v) { return static_cast<float>(v); }
AI float tof(uint16_t v) {
  const uint32_t w = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

AI float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// out[j][t] = a[j][:K] . x[t][:K]
template <class E, int NJ, int NT>
AI void dot_tile(const E* const* a, const E* const* x, int64_t K, float (*out)[4]) {
  v8 acc[NJ][NT];
#pragma GCC unroll 4
  for (int j = 0; j < NJ; ++j)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[j][t] = v8{};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    v8 av[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) av[j] = load8(a[j] + k);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const v8 xv = load8(x[t] + k);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[j][t] += av[j] * xv;
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NJ; ++j)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      float s = hsum(acc[j][t]);
      for (int64_t kk = k; kk < K; ++kk) s += tof(a[j][kk]) * tof(x[t][kk]);
      out[j][t] = s;
    }
}

template <class E, int NT>
AI void shrink_nt(const E* A, int64_t lda, int64_t r, const E* const* x, int64_t K,
                  float* const* u) {
  float out[2][4];
  int64_t j = 0;
  for (; j + 2 <= r; j += 2) {
    const E* a[2] = {A + j * lda, A + (j + 1) * lda};
    dot_tile<E, 2, NT>(a, x, K, out);
    for (int t = 0; t < NT; ++t) {
      u[t][j] = out[0][t];
      u[t][j + 1] = out[1][t];
    }
  }
  if (j < r) {
    const E* a[1] = {A + j * lda};
    dot_tile<E, 1, NT>(a, x, K, out);
    for (int t = 0; t < NT; ++t) u[t][j] = out[0][t];
  }
}

template <class E>
AI void shrink_tile(const E* A, int64_t lda, int64_t r, const E* const* x, int nt, int64_t K,
                    float* const* u) {
  switch (nt) {
    case 1: return shrink_nt<E, 1>(A, lda, r, x, K, u);
    case 2: return shrink_nt<E, 2>(A, lda, r, x, K, u);
    case 3: return shrink_nt<E, 3>(A, lda, r, x, K, u);
    default: return shrink_nt<E, 4>(A, lda, r, x, K, u);
  }
}

// Folds 8 accumulators into one vector: result[i] = sum of the lanes of acc[i].
AI v8 fold8(const v8* acc) {
  const v8i lo1 = {0, 8, 2, 10, 4, 12, 6, 14}, hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
  const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8i lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
  v8 w[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    w[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], lo1) +
           __builtin_shuffle(acc[2 * i], acc[2 * i + 1], hi1);
  const v8 z0 = __builtin_shuffle(w[0], w[1], lo2) + __builtin_shuffle(w[0], w[1], hi2);
  const v8 z1 = __builtin_shuffle(w[2], w[3], lo2) + __builtin_shuffle(w[2], w[3], hi2);
  return __builtin_shuffle(z0, z1, lo3) + __builtin_shuffle(z0, z1, hi3);
}

template <class E>
AI void expand_rows(const E* B, int64_t ldb, int64_t r, int64_t nrows, const float* u,
                    float* out) {
  const int64_t r8 = r - r % 8;
  int64_t o = 0;
  for (; o + 8 <= nrows; o += 8) {
    v8 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = v8{};
    for (int64_t j = 0; j < r8; j += 8) {
      const v8 uv = load8(u + j);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] += load8(B + (o + i) * ldb + j) * uv;
    }
    v8 res = fold8(acc);
    for (int64_t j = r8; j < r; ++j) {
      v8 bv;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) bv[i] = tof(B[(o + i) * ldb + j]);
      res += bv * u[j];
    }
    std::memcpy(out + o, &res, sizeof(res));
  }
  for (; o < nrows; ++o) {
    v8 acc = {};
    for (int64_t j = 0; j < r8; j += 8) acc += load8(B + o * ldb + j) * load8(u + j);
    float s = hsum(acc);
    for (int64_t j = r8; j < r; ++j) s += tof(B[o * ldb + j]) * u[j];
    out[o] = s;
  }
}

}  // namespace

#define LORA_EXT_MULTI_DEF(E, SUF)                                                           \
  LORA_EXT_CLONES void shrink_tile_##SUF(const E* A, int64_t lda, int64_t r,                 \
                                         const E* const* x, int nt, int64_t K,                \
                                         float* const* u) {                                   \
    shrink_tile<E>(A, lda, r, x, nt, K, u);                                                   \
  }                                                                                           \
  LORA_EXT_CLONES void expand_rows_##SUF(const E* B, int64_t ldb, int64_t r, int64_t nrows,  \
                                         const float* u, float* out) {                        \
    expand_rows<E>(B, ldb, r, nrows, u, out);                                                 \
  }
LORA_EXT_MULTI_DEF(float, f32)
namespace {
LORA_EXT_MULTI_DEF(uint16_t, bf16_fma)  // bf16 widened to fp32 FMAs
LORA_EXT_MULTI_DEF(_Float16, f16_steps)  // fp16 by vec16's integer steps

using ShrinkF16 = void (*)(const _Float16*, int64_t, int64_t, const _Float16* const*, int, int64_t,
                           float* const*);
using ExpandF16 = void (*)(const _Float16*, int64_t, int64_t, int64_t, const float*, float*);
#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_EXT_V3 __attribute__((target("arch=x86-64-v3")))
LORA_EXT_V3 void shrink_tile_f16c(const _Float16* A, int64_t lda, int64_t r, const _Float16* const* x,
                                  int nt, int64_t K, float* const* u) {
  shrink_tile<F16C16>(reinterpret_cast<const F16C16*>(A), lda, r,
                      reinterpret_cast<const F16C16* const*>(x), nt, K, u);
}
LORA_EXT_V3 void expand_rows_f16c(const _Float16* B, int64_t ldb, int64_t r, int64_t nrows,
                                  const float* u, float* out) {
  expand_rows<F16C16>(reinterpret_cast<const F16C16*>(B), ldb, r, nrows, u, out);
}
#endif
struct F16Tiles {
  ShrinkF16 shrink = shrink_tile_f16_steps;
  ExpandF16 expand = expand_rows_f16_steps;
};
const F16Tiles& f16_tiles() {  // F16C where f16c_conversions(), picked at first use
  static const F16Tiles t = [] {
    F16Tiles f;
#if defined(__x86_64__) && defined(__GNUC__)
    if (f16c_conversions()) f = {shrink_tile_f16c, expand_rows_f16c};
#endif
    return f;
  }();
  return t;
}
}  // namespace
#undef LORA_EXT_MULTI_DEF

// bf16: the AVX512-BF16 dot products where the CPU has them (bf16_dot(), bf16_dot.cpp)
void shrink_tile_bf16(const uint16_t* A, int64_t lda, int64_t r, const uint16_t* const* x, int nt,
                      int64_t K, float* const* u) {
  (bf16_dot() ? shrink_rows_bf16 : shrink_tile_bf16_fma)(A, lda, r, x, nt, K, u);
}
void expand_rows_bf16(const uint16_t* B, int64_t ldb, int64_t r, int64_t nrows, const float* u,
                      float* out) {
  expand_rows_bf16_fma(B, ldb, r, nrows, u, out);
}
void shrink_tile_f16(const _Float16* A, int64_t lda, int64_t r, const _Float16* const* x, int nt,
                     int64_t K, float* const* u) {
  f16_tiles().shrink(A, lda, r, x, nt, K, u);
}
void expand_rows_f16(const _Float16* B, int64_t ldb, int64_t r, int64_t nrows, const float* u,
                     float* out) {
  f16_tiles().expand(B, ldb, r, nrows, u, out);
}

}  // namespace lora_ext::cpu
